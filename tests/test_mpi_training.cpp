// train_mobilenet under mpirun (2 ranks x 1 thread, train/data_parallel.h):
// a checkpoint resumed under mpirun continues bit for bit; resumed by one
// process it continues and says it is not bit for bit; rank 0 alone writes
// the run folder; a rank killed (SIGKILL) or hung (SIGSTOP) ends the job
// within a bounded time and is named; SIGTERM to the ranks stops the job
// cleanly with a checkpoint; a global batch that does not split among the
// ranks is a plain error.
//
// Every program is started with fork + exec and waited for with a deadline:
// past it the test kills everything it started and fails, so no test can
// hang ctest. This process makes itself the "child subreaper" of what it
// starts (prctl), so ranks that outlive their mpirun are re-parented to it,
// found through /proc, killed and reaped: nothing is left running.
//
// One mpirun job at a time (2 cores). The whole file takes ~21 s here, 9 s
// of it the hung-rank test's wait; each time bound below says why it is what it is.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "engine/check.h"
#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/model.h"
#include "tests/test_train_util.h"
#include "train/training_checkpoint.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;
using Args = std::vector<std::string>;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

Args operator+(Args a, const Args& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
}

// Polls `done` every 20 ms until it holds (true) or `seconds` pass (false).
bool wait_until(const std::function<bool()>& done, double seconds) {
    const auto t0 = Clock::now();
    for (;;) {
        if (done()) return true;
        if (seconds_since(t0) > seconds) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

// ---- Processes, through /proc ------------------------------------------------

struct ProcessInfo {
    pid_t pid = 0, ppid = 0;
    char state = '?';  // 'Z': a zombie, ended but not yet reaped
};

std::vector<ProcessInfo> all_processes() {
    std::vector<ProcessInfo> out;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/proc", ec)) {
        const std::string name = e.path().filename().string();
        if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
        // "pid (comm) S ppid ...": comm may hold spaces and parentheses, so parse after the last ')'.
        const std::string stat = test::read_text("/proc/" + name + "/stat");
        const size_t close = stat.rfind(')');
        if (close == std::string::npos || close + 4 > stat.size()) continue;  // gone meanwhile
        ProcessInfo p;
        p.pid = std::stoi(name);
        p.state = stat[close + 2];
        p.ppid = std::atoi(stat.c_str() + close + 4);
        out.push_back(p);
    }
    return out;
}

// Every descendant of `root` (children, grandchildren, ...), zombies included.
std::vector<ProcessInfo> descendants(pid_t root) {
    const std::vector<ProcessInfo> all = all_processes();
    std::vector<ProcessInfo> out;
    std::vector<pid_t> parents{root};
    while (!parents.empty()) {
        const pid_t parent = parents.back();
        parents.pop_back();
        for (const ProcessInfo& p : all)
            if (p.ppid == parent) out.push_back(p), parents.push_back(p.pid);
    }
    return out;
}

// The descendants of this test process that still run (not zombies).
std::vector<pid_t> running_descendants() {
    std::vector<pid_t> out;
    for (const ProcessInfo& p : descendants(getpid()))
        if (p.state != 'Z') out.push_back(p.pid);
    return out;
}

// Reaps this process's zombie children other than `keep` (ranks re-parented
// here when their mpirun ended first).
void reap_orphans(pid_t keep) {
    for (const ProcessInfo& p : descendants(getpid()))
        if (p.ppid == getpid() && p.state == 'Z' && p.pid != keep) waitpid(p.pid, nullptr, WNOHANG);
}

// SIGCONT (a stopped process cannot act on anything else) then SIGKILL to
// every running descendant except `keep`'s pid, until none is left (at most 10 s).
void kill_descendants(pid_t keep = 0) {
    wait_until(
        [&] {
            reap_orphans(keep);
            const std::vector<pid_t> left = running_descendants();
            for (pid_t p : left)
                if (p != keep) kill(p, SIGCONT), kill(p, SIGKILL);
            return left.empty() || (left.size() == 1 && left[0] == keep);
        },
        10);
}

// The environment variable `name` a process started with ("" when absent or unreadable).
std::string initial_env(pid_t pid, const std::string& name) {
    const std::string env = test::read_text("/proc/" + std::to_string(pid) + "/environ");
    const std::string key = name + "=";
    for (size_t at = 0; at < env.size();) {
        const size_t end = env.find('\0', at);
        const std::string entry = env.substr(at, end == std::string::npos ? std::string::npos : end - at);
        if (entry.rfind(key, 0) == 0) return entry.substr(key.size());
        if (end == std::string::npos) break;
        at = end + 1;
    }
    return "";
}

// ---- A program run in the background ------------------------------------------

// A program started with fork + exec in a process group of its own: stdin
// /dev/null, stdout and stderr both to the file `log`, this process's
// environment plus `env` ("NAME=value"). The destructor kills it and
// everything it started (and re-parented here), so an early REQUIRE leaves
// nothing behind.
class Job {
public:
    Job(const Args& argv, const std::string& log, const Args& env = {}) : log_(log) {
        // Ranks whose mpirun died before them come to this process, not to init.
        prctl(PR_SET_CHILD_SUBREAPER, 1);
        // Everything the child needs is prepared before fork: between fork
        // and exec it calls only async-signal-safe functions.
        Args environment = env;
        for (char** e = environ; *e; ++e) {
            const std::string entry = *e, name = entry.substr(0, entry.find('='));
            const bool overridden =
                std::any_of(env.begin(), env.end(), [&](const std::string& x) { return x.rfind(name + "=", 0) == 0; });
            if (!overridden) environment.push_back(entry);
        }
        std::vector<char*> args, envp;
        for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        for (const std::string& e : environment) envp.push_back(const_cast<char*>(e.c_str()));
        args.push_back(nullptr), envp.push_back(nullptr);
        const int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
        const int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        REQUIRE_MESSAGE((in >= 0 && out >= 0), "cannot open /dev/null or ", log);
        t0_ = Clock::now();
        pid_ = fork();
        if (pid_ == 0) {
            setpgid(0, 0);
            dup2(in, 0), dup2(out, 1), dup2(out, 2);  // dup2's copies do not close on exec
            execvpe(args[0], args.data(), envp.data());
            _exit(127);  // not found, as a shell says it
        }
        close(in), close(out);
        REQUIRE(pid_ > 0);
        setpgid(pid_, pid_);  // also here: no race with the child's own call
    }
    ~Job() {
        if (!exited_) kill(-pid_, SIGKILL), kill(pid_, SIGKILL), waitpid(pid_, nullptr, 0);
        kill_descendants();
    }
    Job(const Job&) = delete;
    Job& operator=(const Job&) = delete;

    pid_t pid() const { return pid_; }
    // Whether the program has exited (reaped without blocking).
    bool exited() {
        if (!exited_) {
            int st = 0;
            if (waitpid(pid_, &st, WNOHANG) == pid_) {
                exited_ = true;
                seconds_ = seconds_since(t0_);
                status_ = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : -1;
            }
        }
        return exited_;
    }
    // Waits for it to exit, at most `seconds`; whether it did.
    bool wait(double seconds) {
        return wait_until([this] { return exited(); }, seconds);
    }
    // Its exit status, 128 + the signal when a signal ended it (as a shell reports it).
    int status() const { return status_; }
    double seconds() const { return seconds_; }  // from the start to the exit
    std::string output() const { return test::read_text(log_); }

private:
    std::string log_;
    pid_t pid_ = -1;
    Clock::time_point t0_;
    bool exited_ = false;
    int status_ = -1;
    double seconds_ = 0;
};

struct Result {
    int status = -1;  // exit status, 128 + signal
    double seconds = 0;
    std::string output;  // stdout and stderr, interleaved
};

// After a job's main process exited: every process it started must end too
// (a rank left behind would be a leak). 20 s: mpirun kills what remains of
// its job as it exits, and a rank needs well under a second to exit.
void check_nothing_left(const std::string& output) {
    const bool gone = wait_until(
        [] {
            reap_orphans(0);
            return running_descendants().empty();
        },
        20);
    INFO(output);
    CHECK_MESSAGE(gone, "processes of the job still run after its mpirun ended");
    kill_descendants();
}

// Runs argv to its end, at most `deadline` seconds (then kills it and
// everything it started, and fails). Checks that it left nothing running.
Result run(const Args& argv, const std::string& log, double deadline, const Args& env = {}) {
    std::string line;
    for (const std::string& a : argv) line += (line.empty() ? "" : " ") + a;
    INFO(line);
    Job job(argv, log, env);
    const bool in_time = job.wait(deadline);
    INFO(job.output());
    REQUIRE_MESSAGE(in_time, "did not end within ", deadline, " s: killed");
    Result r{job.status(), job.seconds(), job.output()};
    if (r.status == 127) FAIL_CHECK(argv[0], " was not found (PATH) or could not be started");
    check_nothing_left(r.output);
    return r;
}

// Normal runs take 1-4 s here. This deadline exists only so that a hang
// fails the test instead of ctest's 1500 s timeout; it leaves ample room for
// a loaded CI machine (ctest runs two tests at once on 2 cores).
constexpr double kRunDeadline = 120;

// ---- train_mobilenet ------------------------------------------------------------

// The program sits next to this test in the build folder.
std::string trainer() {
    static const std::string exe = (fs::read_symlink("/proc/self/exe").parent_path() / "train_mobilenet").string();
    REQUIRE_MESSAGE(fs::exists(exe), exe, " is not built");
    return exe;
}

// mpirun with 2 ranks on this machine's 2 cores (--oversubscribe: a CI
// machine with fewer cores still runs them); root needs an explicit yes.
Args mpirun() {
    Args a{"mpirun", "-np", "2", "--oversubscribe"};
    if (geteuid() == 0) a.push_back("--allow-run-as-root");
    return a;
}

// Options by name (without "--"); an empty value is a flag alone. An
// option may be given once only, so changes replace the base's values.
using Options = std::vector<std::pair<std::string, std::string>>;
Args options(Options base, const Options& changes = {}) {
    for (const auto& [name, value] : changes) {
        auto it = std::find_if(base.begin(), base.end(), [&](const auto& o) { return o.first == name; });
        if (it != base.end())
            it->second = value;
        else
            base.emplace_back(name, value);
    }
    Args out;
    for (const auto& [name, value] : base) {
        out.push_back("--" + name);
        if (!value.empty()) out.push_back(value);
    }
    return out;
}

// tests/test_train_util.h's tiny_config as options (16x16 input, width 0.25,
// batch 8: 6 steps an epoch on the 48 training images), 1 compute thread a
// rank, quiet. 2 float epochs + 1 QAT epoch (msqe-po2) = 18 steps.
constexpr int64_t kTinySteps = 18;
Args tiny(const std::string& data, const std::string& out, const Options& changes = {}) {
    return options({{"data", data},
                    {"out", out},
                    {"input-size", "16"},
                    {"no-augment", ""},
                    {"width", "0.25"},
                    {"batch-size", "8"},
                    {"epochs", "2"},
                    {"qat-epochs", "1"},
                    {"lr", "0.05"},
                    {"warmup-epochs", "0"},
                    {"qat-lr", "0.01"},
                    {"log-every", "2"},
                    {"threads", "1"},
                    {"loader-threads", "1"},
                    {"progress", "none"}},
                   changes);
}
// A float-only run of `epochs` epochs of 6 steps, otherwise tiny's.
Args long_float(const std::string& data, const std::string& out, int epochs, Options changes = {}) {
    changes.insert(changes.begin(), {{"epochs", std::to_string(epochs)}, {"qat-epochs", "0"}, {"quantizer", "none"}});
    return tiny(data, out, changes);
}

nlohmann::json read_json(const std::string& path) {
    const nlohmann::json j = nlohmann::json::parse(test::read_text(path), nullptr, false);
    REQUIRE_MESSAGE(!j.is_discarded(), path, " is not JSON");
    return j;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The pids of a job's train_mobilenet processes by rank (read from the
// OMPI_COMM_WORLD_RANK mpirun gives each), once all `ranks` have started
// (at most 60 s: they start in well under a second).
std::map<int, pid_t> rank_pids(pid_t mpirun_pid, int ranks = 2) {
    const fs::path exe = fs::canonical(trainer());
    std::map<int, pid_t> out;
    wait_until(
        [&] {
            out.clear();
            for (const ProcessInfo& p : descendants(mpirun_pid)) {
                std::error_code ec;
                const fs::path e = fs::read_symlink("/proc/" + std::to_string(p.pid) + "/exe", ec);
                const std::string rank = initial_env(p.pid, "OMPI_COMM_WORLD_RANK");
                if (!ec && e == exe && p.state != 'Z' && !rank.empty()) out[std::stoi(rank)] = p.pid;
            }
            return static_cast<int>(out.size()) == ranks;
        },
        60);
    REQUIRE_MESSAGE(static_cast<int>(out.size()) == ranks, "found ", out.size(), " of the ", ranks, " ranks");
    return out;
}

// Waits until the run in `out` has saved its first checkpoint (the end of
// epoch 1): the ranks are then mid-training. 60 s: an epoch takes ~0.2 s,
// start-up ~1 s; the rest is room for a loaded machine.
void wait_for_first_checkpoint(Job& job, const std::string& out) {
    const bool saved = wait_until([&] { return fs::exists(out + "/checkpoint.safetensors") || job.exited(); }, 60);
    INFO(job.output());
    REQUIRE_MESSAGE(saved, "no checkpoint after 60 s");
    REQUIRE_MESSAGE(!job.exited(), "the run ended before it could be interrupted");
}

// ---- Runs that several tests compare ------------------------------------------

// One image folder for the whole file, and the 2-rank runs tests 1-3 share,
// each done on first use (a test run alone with -tc does what it needs).
class Shared {
public:
    std::string images() {
        if (!images_done_) test::make_image_folder(dir_ / "images"), images_done_ = true;
        return dir_ / "images";
    }
    // An uninterrupted 2-rank run, its TMPDIR a folder of its own (test 3 looks there).
    std::string straight() {
        if (!straight_done_) {
            fs::create_directories(straight_tmp());
            const Result r = run(mpirun() + Args{trainer()} + tiny(images(), dir_ / "straight"), dir_ / "straight.log",
                                 kRunDeadline, {"TMPDIR=" + straight_tmp()});
            INFO(r.output);
            REQUIRE(r.status == 0);
            straight_done_ = true;
        }
        return dir_ / "straight";
    }
    std::string straight_tmp() { return dir_ / "straight-tmp"; }

    // The same run stopped after step 8 (inside float epoch 2) and after
    // step 15 (inside QAT), resumed each time under mpirun, with
    // --check-every 1 (kept by the resumed segments: it is in config.json).
    // A copy of the folder at step 15 is kept for test 2. Each resume gives
    // --stop-after-steps again: config.json keeps the last value given.
    std::string pieces() {
        if (!pieces_done_) {
            const std::string out = dir_ / "pieces";
            Result r =
                run(mpirun() + Args{trainer()} + tiny(images(), out, {{"stop-after-steps", "8"}, {"check-every", "1"}}),
                    dir_ / "pieces1.log", kRunDeadline);
            CHECK(r.status == 0);
            REQUIRE(read_training_checkpoint(out + "/checkpoint.safetensors").state.global_step == 8);
            r = run(mpirun() + Args{trainer(), "--resume", out, "--stop-after-steps", "7"}, dir_ / "pieces2.log",
                    kRunDeadline);
            CHECK(r.status == 0);
            const TrainingCheckpoint at15 = read_training_checkpoint(out + "/checkpoint.safetensors");
            REQUIRE(at15.state.global_step == 15);
            CHECK(at15.state.stage == Stage::qat);
            CHECK(at15.state.ranks == 2);
            CHECK(at15.config.check_every == 1);
            fs::copy(out, at15_copy(), fs::copy_options::recursive);
            r = run(mpirun() + Args{trainer(), "--resume", out, "--stop-after-steps", "0"}, dir_ / "pieces3.log",
                    kRunDeadline);
            INFO(r.output);
            REQUIRE(r.status == 0);
            // The state comparison of every step passed (it would end the job otherwise).
            CHECK(!contains(r.output, "differs from rank 0's"));
            pieces_done_ = true;
        }
        return dir_ / "pieces";
    }
    std::string at15_copy() { return dir_ / "pieces-at15"; }

    const test::TempDir& dir() const { return dir_; }

private:
    test::TempDir dir_;
    bool images_done_ = false, straight_done_ = false, pieces_done_ = false;
};

Shared& shared() {
    static Shared s;
    return s;
}

}  // namespace

TEST_CASE("1. 2 ranks: stopped and resumed under mpirun (inside float, inside QAT) = one go, bit for bit") {
    const std::string straight = shared().straight(), pieces = shared().pieces();
    for (const char* file : {"final.safetensors", "float.safetensors", "export.safetensors"}) {
        INFO(file);
        const std::vector<std::string> differ =
            test::differing_tensors(read_safetensors(straight + "/" + file), read_safetensors(pieces + "/" + file));
        INFO("differing tensors: ", differ.size(), differ.empty() ? "" : ", first " + differ[0]);
        CHECK(differ.empty());
    }
    // The last checkpoint: the optimizer state too, and where the runs are.
    const TrainingCheckpoint a = read_training_checkpoint(straight + "/checkpoint.safetensors"),
                             b = read_training_checkpoint(pieces + "/checkpoint.safetensors");
    CHECK(a.state.global_step == kTinySteps);
    CHECK(b.state.global_step == kTinySteps);
    CHECK(a.state.ranks == 2);
    CHECK(b.state.ranks == 2);
    CHECK(test::differing_tensors(a.file, b.file).empty());
    // The evaluations (sharded over the ranks, summed alike) give the same numbers.
    const nlohmann::json sa = read_json(straight + "/summary.json"), sb = read_json(pieces + "/summary.json");
    CHECK(sa.at("steps") == kTinySteps);
    CHECK(sb.at("steps") == kTinySteps);
    for (const char* model : {"float", "fake_quant", "integer_export"}) {
        INFO(model);
        CHECK(sa.at(model).at("top1") == sb.at(model).at("top1"));
        CHECK(sa.at(model).at("loss") == sb.at(model).at("loss"));
        CHECK(sa.at(model).at("samples") == 18);  // the ranks' parts of the test set add up to all of it
    }
    CHECK(sa.at("audit").at("passed") == true);
}

TEST_CASE("2. A 2-rank checkpoint resumed by one process (no mpirun) continues, not bit for bit, and finishes") {
    shared().pieces();
    const std::string copy = shared().at15_copy();
    const Result r = run({trainer(), "--resume", copy, "--stop-after-steps", "0", "--progress", "lines"},
                         shared().dir() / "single-resume.log", kRunDeadline);
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(contains(r.output, "trained on 2 ranks, this run has 1"));
    CHECK(contains(r.output, "not bit for bit"));
    const TrainingCheckpoint c = read_training_checkpoint(copy + "/checkpoint.safetensors");
    CHECK(c.state.global_step == kTinySteps);
    CHECK(c.state.ranks == 1);  // who trained the last steps
    CHECK(read_json(copy + "/summary.json").at("steps") == kTinySteps);
    CHECK(fs::exists(copy + "/final.safetensors"));
}

TEST_CASE("3. Only rank 0 writes: the run folder of 2 ranks holds what one process's holds, once") {
    const std::string two = shared().straight();
    const std::string one = shared().dir() / "one-process";
    const Result r =
        run(Args{trainer()} + tiny(shared().images(), one), shared().dir() / "one-process.log", kRunDeadline);
    INFO(r.output);
    REQUIRE(r.status == 0);
    // The same names: no second copy, no rank-suffixed file, no leftover
    // temporary (".name.tmp.*" of the atomic writes).
    const std::vector<std::string> files = test::list_files(two);
    CHECK(files == test::list_files(one));
    for (const std::string& f : files) CHECK_MESSAGE(f[0] != '.', "left in the run folder: ", f);
    // metrics.jsonl written by one rank: one start and one final record, as many epoch and step lines as one process.
    const std::vector<nlohmann::json> m2 = test::read_metrics(two + "/metrics.jsonl"),
                                      m1 = test::read_metrics(one + "/metrics.jsonl");
    CHECK(test::of_type(m2, "start").size() == 1);
    CHECK(test::of_type(m2, "final").size() == 1);
    CHECK(m2.size() == m1.size());
    for (const char* type : {"step", "epoch"}) CHECK(test::of_type(m2, type).size() == test::of_type(m1, type).size());
    // Rank 1 wrote its export to the temp folder (TMPDIR) and removed it.
    for (const std::string& f : test::list_files(shared().straight_tmp()))
        CHECK_MESSAGE(!contains(f, "hfq-export"), "left in the temp folder: ", f);
}

TEST_CASE("4. A rank killed with SIGKILL mid-run ends the whole job; mpirun names it; the checkpoint loads") {
    const std::string out = shared().dir() / "killed";
    // 500 epochs (~100 s of training): mid-run for as long as the test needs.
    Job job(mpirun() + Args{trainer()} + long_float(shared().images(), out, 500), shared().dir() / "killed.log");
    wait_for_first_checkpoint(job, out);
    const std::map<int, pid_t> ranks = rank_pids(job.pid());
    const auto t0 = Clock::now();
    REQUIRE(kill(ranks.at(1), SIGKILL) == 0);
    // Open MPI notices a dead rank at once (SIGCHLD) and ends the others:
    // ~2 s here. 60 s is room for a loaded machine, and far below the 300 s
    // default --rank-timeout, so it is mpirun, not the watchdog, that ends it.
    const bool ended = job.wait(60);
    MESSAGE("SIGKILL to rank 1: the job ended after ", seconds_since(t0), " s");
    const std::string output = job.output();
    INFO(output);
    REQUIRE_MESSAGE(ended, "the job still runs 60 s after rank 1 was killed");
    CHECK(job.status() != 0);
    CHECK(contains(output, "process rank 1"));
    CHECK(contains(output, "signal 9"));
    check_nothing_left(output);  // rank 0 is gone too

    // The last checkpoint on disk (written atomically at an epoch's end) still loads, model and all.
    const TrainingCheckpoint c = read_training_checkpoint(out + "/checkpoint.safetensors");
    CHECK(c.state.global_step > 0);
    CHECK(c.state.global_step % 6 == 0);  // epochs of 6 steps, a checkpoint at each end
    CHECK(c.state.ranks == 2);
    const auto model = build_model(checkpoint_model_config(c.file).value());
    restore_model(c, *model);
}

TEST_CASE("5. A hung rank (SIGSTOP) with --rank-timeout 3: exit status 3, and rank 0 names it") {
    const std::string out = shared().dir() / "hung";
    Job job(mpirun() + Args{trainer()} + long_float(shared().images(), out, 500, {{"rank-timeout", "3"}}),
            shared().dir() / "hung.log");
    wait_for_first_checkpoint(job, out);
    const pid_t rank1 = rank_pids(job.pid()).at(1);
    // Whatever happens below, rank 1 is resumed and killed (Job's destructor kills the rest).
    struct Resume {
        pid_t pid;
        ~Resume() {
            for (pid_t p : running_descendants())
                if (p == pid) kill(pid, SIGCONT), kill(pid, SIGKILL);
        }
    } resume{rank1};
    const auto t0 = Clock::now();
    REQUIRE(kill(rank1, SIGSTOP) == 0);
    // Rank 0 waits 3 s (--rank-timeout) in its next collective, pings for
    // 5 s (mpi_job.cpp's kPingSeconds), then aborts: ~9 s here. 30 s is
    // room for a loaded machine.
    const bool ended = job.wait(30);
    const double took = seconds_since(t0);
    MESSAGE("SIGSTOP to rank 1: the job ended after ", took, " s");
    const std::string output = job.output();
    INFO(output);
    REQUIRE_MESSAGE(ended, "the job still runs 30 s after rank 1 was stopped");
    CHECK(job.status() == 3);
    CHECK(contains(output, "Rank 1 does not answer"));
    CHECK(took >= 3);  // not before the timeout
    check_nothing_left(output);
    // The checkpoint of an epoch's end is intact.
    CHECK(read_training_checkpoint(out + "/checkpoint.safetensors").state.global_step % 6 == 0);
}

TEST_CASE("6. SIGTERM to both ranks: both exit 0, mpirun 0, a checkpoint where they stopped; --resume finishes") {
    const std::string out = shared().dir() / "terminated";
    constexpr int kEpochs = 40;  // 240 steps, ~4 s: still training when the signal comes, quick to finish
    // Each rank runs inside a shell that prints its exit status (and exits
    // with it), since mpirun reaps the ranks itself.
    const Args reporter{"/bin/sh", "-c",
                        "\"$0\" \"$@\"; s=$?; echo \"rank $OMPI_COMM_WORLD_RANK exit status $s\"; exit $s"};
    Job job(
        mpirun() + reporter + Args{trainer()} + long_float(shared().images(), out, kEpochs, {{"progress", "lines"}}),
        shared().dir() / "terminated.log");
    wait_for_first_checkpoint(job, out);
    const std::map<int, pid_t> ranks = rank_pids(job.pid());
    for (const auto& [rank, pid] : ranks) REQUIRE(kill(pid, SIGTERM) == 0);
    // The ranks finish the step, agree to stop, rank 0 saves: < 1 s here.
    const bool ended = job.wait(30);
    const std::string output = job.output();
    INFO(output);
    REQUIRE_MESSAGE(ended, "the job still runs 30 s after SIGTERM");
    CHECK(job.status() == 0);
    CHECK(contains(output, "rank 0 exit status 0"));
    CHECK(contains(output, "rank 1 exit status 0"));
    check_nothing_left(output);

    const std::vector<nlohmann::json> stops = test::of_type(test::read_metrics(out + "/metrics.jsonl"), "stop");
    REQUIRE(stops.size() == 1);
    const int64_t at = stops[0].at("step").get<int64_t>();
    CHECK(stops[0].at("signal") == SIGTERM);
    CHECK(contains(output, cat("Interrupted by signal ", SIGTERM, " at step ", at, ";")));
    CHECK(at >= 6);  // after the first checkpoint
    CHECK(at < kEpochs * 6);
    const TrainingCheckpoint c = read_training_checkpoint(out + "/checkpoint.safetensors");
    CHECK(c.state.global_step == at);
    CHECK(c.state.ranks == 2);

    const Result r =
        run(mpirun() + Args{trainer(), "--resume", out}, shared().dir() / "terminated-resume.log", kRunDeadline);
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(read_json(out + "/summary.json").at("steps") == kEpochs * 6);
    CHECK(read_training_checkpoint(out + "/checkpoint.safetensors").state.global_step == kEpochs * 6);
}

TEST_CASE("7. --batch-size 9 on 2 ranks: a plain error, at once, nothing written") {
    const std::string out = shared().dir() / "batch9";
    // It fails in the options' check, before any collective: < 1 s here.
    // 30 s means it did not hang (a hang would last the 300 s rank timeout).
    const Result r = run(mpirun() + Args{trainer()} + tiny(shared().images(), out, {{"batch-size", "9"}}),
                         shared().dir() / "batch9.log", 30);
    INFO(r.output);
    CHECK(r.status == 2);  // bad options (mpirun passes on the ranks' status)
    CHECK(contains(r.output, "--batch-size 9 is the global batch: it must split evenly among the 2 ranks"));
    CHECK(!fs::exists(out));
}
