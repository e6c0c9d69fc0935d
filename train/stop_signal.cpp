#include "train/stop_signal.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <thread>

namespace hfq {
namespace {

std::atomic<int> g_signal{0};        // the run's stop signal, 0 before one came
std::atomic<bool> g_in_run{false};   // a guard exists (watcher mode)
std::atomic<bool> g_watching{false};  // watch_stop_signals() was called
struct sigaction g_old_int {
}, g_old_term{};

sigset_t stop_signals() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    return set;
}

// The signal's default action (terminate), from the watcher thread: the
// signal unblocked there alone and raised again.
[[noreturn]] void die_by(int sig) {
    std::signal(sig, SIG_DFL);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, sig);
    pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
    std::raise(sig);
    _exit(128 + sig);  // not reached: the default action ends the process
}

// The watcher: records the first signal of a run, and ends the process on a
// second one or on one outside a run.
void watch() {
    const sigset_t set = stop_signals();
    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0) continue;
        int none = 0;
        if (!g_in_run.load() || !g_signal.compare_exchange_strong(none, sig)) die_by(sig);
    }
}

extern "C" void on_stop_signal(int sig) { g_signal.store(sig); }

}  // namespace

void watch_stop_signals() {
    if (g_watching.exchange(true)) return;
    const sigset_t set = stop_signals();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::thread(watch).detach();  // lives as long as the process
}

StopSignalGuard::StopSignalGuard() {
    g_signal.store(0);
    if (g_watching.load()) {
        g_in_run.store(true);
        return;
    }
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | SA_RESTART;
    sigaction(SIGINT, &sa, &g_old_int);
    sigaction(SIGTERM, &sa, &g_old_term);
    handler_installed_ = true;
}

StopSignalGuard::~StopSignalGuard() {
    if (!handler_installed_) {
        g_in_run.store(false);
        return;
    }
    sigaction(SIGINT, &g_old_int, nullptr);
    sigaction(SIGTERM, &g_old_term, nullptr);
}

int stop_signal() { return g_signal.load(); }

}  // namespace hfq
