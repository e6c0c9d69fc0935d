// SIGINT / SIGTERM during a run: the handler only records the signal; the
// training loop reads stop_signal() after each step, lets the step finish,
// saves a checkpoint and returns (train/trainer.h).
#pragma once

namespace hfq {

// Installs the handlers for its lifetime (the previous ones come back after).
// SA_RESETHAND restores the default action after the first signal, so a
// second Ctrl-C ends the process at once.
class StopSignalGuard {
public:
    StopSignalGuard();
    ~StopSignalGuard();
    StopSignalGuard(const StopSignalGuard&) = delete;
    StopSignalGuard& operator=(const StopSignalGuard&) = delete;
};

// The signal received since the guard was installed, or 0.
int stop_signal();

}  // namespace hfq
