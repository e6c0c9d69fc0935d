// Stop signals (train/stop_signal.h): once watch_stop_signals() has run,
// SIGINT and SIGTERM reach no thread that computes, so a signal during
// oneDNN's JIT sgemm (which points the stack pointer into the heap while K >
// 252) cannot write its frame over the heap; a run records the first signal
// and a second one ends the process; train_mobilenet stops cleanly on one.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <omp.h>
#include <pthread.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <thread>
#include <vector>

#include "engine/conv2d_pointwise.h"
#include "tests/test_train_util.h"
#include "train/stop_signal.h"
#include "train/training_checkpoint.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

// As train_mobilenet's main() does, before any thread of this process exists
// (static initialisation, before doctest's main).
const bool watching = (watch_stop_signals(), true);

using Clock = std::chrono::steady_clock;

bool stop_signals_blocked_here() {
    sigset_t mask;
    pthread_sigmask(SIG_BLOCK, nullptr, &mask);
    return sigismember(&mask, SIGINT) == 1 && sigismember(&mask, SIGTERM) == 1;
}

// train_mobilenet next to this test, started with an empty signal mask (it
// would inherit this process's blocked one) and its output in `log`.
pid_t start_trainer(const std::vector<std::string>& args, const std::string& log) {
    const std::string exe = (fs::read_symlink("/proc/self/exe").parent_path() / "train_mobilenet").string();
    REQUIRE_MESSAGE(fs::exists(exe), exe, " is not built");
    std::vector<char*> argv{const_cast<char*>(exe.c_str())};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t files;
    posix_spawn_file_actions_init(&files);
    posix_spawn_file_actions_addopen(&files, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&files, 1, 2);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    pid_t pid = 0;
    const int error = posix_spawn(&pid, exe.c_str(), &files, &attr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&files);
    posix_spawnattr_destroy(&attr);
    REQUIRE(error == 0);
    return pid;
}

// waitpid's status once the process ends, at most `seconds` from now (then
// it is killed and the test fails).
int wait_for(pid_t pid, double seconds) {
    const auto t0 = Clock::now();
    for (;;) {
        int status = 0;
        if (waitpid(pid, &status, WNOHANG) == pid) return status;
        if (std::chrono::duration<double>(Clock::now() - t0).count() > seconds) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            FAIL("train_mobilenet still ran after ", seconds, " s");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
}

// A float run of 40 epochs (240 steps of the tiny configuration), started;
// returns once its first checkpoint (epoch 1's end) is on disk.
pid_t start_long_run(const test::TempDir& dir) {
    test::make_image_folder(dir / "images");
    const std::string out = dir / "run";
    const pid_t pid = start_trainer({"--data", dir / "images", "--out", out, "--input-size", "16", "--no-augment",
                                     "--width", "0.25", "--batch-size", "8", "--epochs", "40", "--qat-epochs", "0",
                                     "--quantizer", "none", "--warmup-epochs", "0", "--threads", "2",
                                     "--loader-threads", "1", "--progress", "none"},
                                    dir / "log.txt");
    // 60 s: an epoch takes ~0.2 s, start-up ~1 s; the rest is room for a loaded machine.
    const auto t0 = Clock::now();
    while (!fs::exists(out + "/checkpoint.safetensors")) {
        int status = 0;
        REQUIRE_MESSAGE(waitpid(pid, &status, WNOHANG) == 0, "train_mobilenet ended early: ",
                        test::read_text(dir / "log.txt"));
        REQUIRE(std::chrono::duration<double>(Clock::now() - t0).count() < 60);
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return pid;
}

}  // namespace

TEST_CASE("After watch_stop_signals(), every thread started has SIGINT and SIGTERM blocked") {
    REQUIRE(watching);
    CHECK(stop_signals_blocked_here());
    // OpenMP's team (oneDNN's threads), a std::thread (the loader's
    // producer), oneTBB's workers (the loader's).
    std::atomic<int> open_omp{0}, omp_threads{0};
#pragma omp parallel num_threads(3)
    {
        omp_threads += 1;
        if (!stop_signals_blocked_here()) open_omp += 1;
    }
    CHECK(omp_threads == 3);
    CHECK(open_omp == 0);
    bool thread_blocked = false;
    std::thread([&] { thread_blocked = stop_signals_blocked_here(); }).join();
    CHECK(thread_blocked);
    std::atomic<int> open_tbb{0};
    tbb::task_arena(2).execute([&] {
        tbb::parallel_for(0, 64, [&](int) {
            std::this_thread::sleep_for(std::chrono::microseconds(200));  // let every worker take some
            if (!stop_signals_blocked_here()) open_tbb += 1;
        });
    });
    CHECK(open_tbb == 0);
}

TEST_CASE("SIGTERM while a pointwise convolution with K = 1024 runs: recorded, 300 times, results and heap intact") {
    // x {1, 8, 8, 1024} of ones, weight {64, 1024, 1, 1} of 0.5: every output
    // is 1024 * 0.5 = 512, exact in float. K = 1024 > 252: oneDNN's kernel
    // runs with the stack pointer in its heap buffer. The signal comes from
    // another thread after 0..2 ms, while this thread is in the kernel most
    // of the time; with a plain handler, glibc aborts within a few hundred
    // signals here (the frame lands in the heap).
    const Variable x(Tensor::full({1, 8, 8, 1024}, 1.0f));
    const Variable w(Tensor::full({64, 1024, 1, 1}, 0.5f));
    for (int i = 0; i < 300; ++i) {
        StopSignalGuard guard;
        std::thread sender([i] {
            std::this_thread::sleep_for(std::chrono::microseconds(i * 7 % 2000));
            kill(getpid(), SIGTERM);  // to the process, as kill(1) sends it
        });
        int64_t wrong = 0;
        const auto t0 = Clock::now();
        while (stop_signal() == 0 && Clock::now() - t0 < std::chrono::seconds(10)) {
            const Tensor y = pointwise_conv2d(x, w, Variable()).value();
            for (int64_t k = 0; k < y.numel(); ++k) wrong += y.f32()[k] != 512.0f;
        }
        sender.join();
        REQUIRE(stop_signal() == SIGTERM);
        REQUIRE(wrong == 0);
    }
}

TEST_CASE("train_mobilenet: one SIGTERM stops it with a checkpoint (exit 143); a second signal ends it at once") {
    SUBCASE("one") {
        test::TempDir dir;
        const pid_t pid = start_long_run(dir);
        REQUIRE(kill(pid, SIGTERM) == 0);
        const int status = wait_for(pid, 60);
        INFO(test::read_text(dir / "log.txt"));
        REQUIRE(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 128 + SIGTERM);
        const std::vector<nlohmann::json> stops =
            test::of_type(test::read_metrics(dir / "run/metrics.jsonl"), "stop");
        REQUIRE(stops.size() == 1);
        CHECK(stops[0].at("signal") == SIGTERM);
        const int64_t at = stops[0].at("step").get<int64_t>();
        CHECK(at >= 6);
        CHECK(at < 240);
        CHECK(read_training_checkpoint(dir / "run/checkpoint.safetensors").state.global_step == at);
    }
    SUBCASE("two") {
        test::TempDir dir;
        const pid_t pid = start_long_run(dir);
        // Two different signals: two of one kind sent at once could merge
        // into one pending signal. sigwait() takes the lower number first.
        REQUIRE(kill(pid, SIGINT) == 0);   // recorded: the run would stop after this step
        REQUIRE(kill(pid, SIGTERM) == 0);  // its default action: the process ends now
        const int status = wait_for(pid, 60);
        INFO(test::read_text(dir / "log.txt"));
        REQUIRE(WIFSIGNALED(status));
        CHECK(WTERMSIG(status) == SIGTERM);
        CHECK(test::of_type(test::read_metrics(dir / "run/metrics.jsonl"), "stop").empty());
    }
}
