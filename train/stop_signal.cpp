#include "train/stop_signal.h"

#include <atomic>
#include <csignal>

namespace hfq {
namespace {

std::atomic<int> g_signal{0};
struct sigaction g_old_int {
}, g_old_term{};

extern "C" void on_stop_signal(int sig) { g_signal.store(sig); }

}  // namespace

StopSignalGuard::StopSignalGuard() {
    g_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | SA_RESTART;
    sigaction(SIGINT, &sa, &g_old_int);
    sigaction(SIGTERM, &sa, &g_old_term);
}

StopSignalGuard::~StopSignalGuard() {
    sigaction(SIGINT, &g_old_int, nullptr);
    sigaction(SIGTERM, &g_old_term, nullptr);
}

int stop_signal() { return g_signal.load(); }

}  // namespace hfq
