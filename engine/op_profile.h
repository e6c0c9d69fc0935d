// Where a training step's time goes, op by op (hfq_bench --profile).
//
// While on, time is charged in spans: charge(phase, name) adds the time since
// the previous charge to the entry (name, phase). Autograd charges an op's
// forward when its result is recorded (make_result; the ops of a forward
// pass run back to back, so the span is the op's own work) and its backward
// right after its closure ran; the training step charges the parts in
// between (zero-grad, the loss value, the optimizer update) under their own
// names. Only the thread that turned profiling on is timed.
//
// Off by default. Callers test enabled() before building a name, so an
// unprofiled step pays one branch per op.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace hfq::op_profile {

enum Phase { kForward = 0, kBackward = 1 };

struct Entry {
    std::string name;                 // e.g. "conv2d pointwise [32, 56, 56, 128]" or "optimizer update"
    std::array<double, 2> seconds{};  // forward (or the named part), backward
    std::array<int64_t, 2> calls{};
    double total() const { return seconds[0] + seconds[1]; }
};

// Starts (and clears) or stops profiling on the calling thread.
void set_enabled(bool on);
bool enabled();

void charge(Phase phase, const std::string& name);

// The entries since set_enabled(true) or the last take(), the most
// expensive first; clears them.
std::vector<Entry> take();

}  // namespace hfq::op_profile
