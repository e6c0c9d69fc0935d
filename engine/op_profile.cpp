#include "engine/op_profile.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <thread>

namespace hfq::op_profile {
namespace {

using Clock = std::chrono::steady_clock;

struct State {
    bool on = false;
    std::thread::id owner;
    Clock::time_point last;
    std::map<std::string, Entry> entries;
};

State& state() {
    static State s;
    return s;
}

}  // namespace

void set_enabled(bool on) {
    State& s = state();
    s.on = on;
    s.owner = std::this_thread::get_id();
    s.entries.clear();
    s.last = Clock::now();
}

bool enabled() { return state().on && state().owner == std::this_thread::get_id(); }

void charge(Phase phase, const std::string& name) {
    State& s = state();
    if (!enabled()) return;
    const Clock::time_point now = Clock::now();
    Entry& e = s.entries[name];
    e.name = name;
    e.seconds[phase] += std::chrono::duration<double>(now - s.last).count();
    e.calls[phase] += 1;
    s.last = now;
}

std::vector<Entry> take() {
    State& s = state();
    std::vector<Entry> out;
    for (auto& [name, e] : s.entries) out.push_back(e);
    std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.total() > b.total(); });
    s.entries.clear();
    return out;
}

}  // namespace hfq::op_profile
