// SIGINT / SIGTERM during a run: the signal is only recorded; the training
// loop reads stop_signal() after each step, lets the step finish, saves a
// checkpoint and returns (train/trainer.h). A second signal in the same run
// ends the process at once (the signal's default action), as does a signal
// outside a run.
//
// Why a watcher thread and not a signal handler: a handler runs on the stack
// of whichever thread the signal interrupts, and writes its frame below that
// thread's stack pointer. oneDNN 2.6's JIT sgemm (an inner dimension K above
// 252 on AVX2) points the stack pointer into a heap buffer while it runs, so
// a signal that lands there writes over the heap and glibc aborts at a later
// free ("corrupted size vs. prev_size"): test_mpi_training's SIGTERM case met
// it twice in CI (upstream: uxlfoundation/oneDNN issue 4845, fixed in 2026,
// long after the 2.6.3 that Debian 12 ships). So a program blocks the two
// signals before it starts any thread (threads inherit the mask: OpenMP's,
// oneTBB's, the loader's, MPI's), and one watcher thread takes them with
// sigwait(): no signal is ever delivered to a thread that computes.
//
//   watch_stop_signals()   first thing in main(), before any thread exists
//                          (train_mobilenet and qat_study do);
//   StopSignalGuard        a run's lifetime: a signal is recorded for it.
//
// Without watch_stop_signals() (a test calling run_training in its own
// process), the guard installs a plain handler instead (SA_RESETHAND: a
// second signal ends the process), which is safe only for a signal raised on
// a thread that is not inside oneDNN, as those tests' std::raise from a hook.
#pragma once

namespace hfq {

// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread it
// starts from now on, and starts the watcher thread. Once per process (later
// calls do nothing).
void watch_stop_signals();

// For its lifetime a stop signal is recorded (stop_signal()), not acted on.
class StopSignalGuard {
public:
    StopSignalGuard();
    ~StopSignalGuard();
    StopSignalGuard(const StopSignalGuard&) = delete;
    StopSignalGuard& operator=(const StopSignalGuard&) = delete;

private:
    bool handler_installed_ = false;  // the plain handler (no watcher thread)
};

// The signal received since the guard was made, or 0.
int stop_signal();

}  // namespace hfq
