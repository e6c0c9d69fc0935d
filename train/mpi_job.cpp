#include "train/mpi_job.h"

#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "engine/check.h"

namespace hfq::mpi {
namespace {

using Clock = std::chrono::steady_clock;

bool g_launched = false;
int g_rank = 0, g_size = 1;
double g_timeout = 300;
MPI_Comm g_watch = MPI_COMM_NULL;  // a duplicate of MPI_COMM_WORLD: the watchdog's pings never meet other messages

constexpr int kPing = 1, kPong = 2;
constexpr double kGraceSeconds = 15;  // the other ranks wait this much longer than rank 0
constexpr double kPingSeconds = 5;    // how long rank 0 waits for the answers to its pings
constexpr int kSpinsBeforeSleep = 2000;

bool started_by_mpirun() {
    return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_RANK");
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A rank waiting in a collective answers rank 0's pings: it is alive.
void answer_pings() {
    for (;;) {
        int flag = 0;
        MPI_Status status;
        MPI_Iprobe(MPI_ANY_SOURCE, kPing, g_watch, &flag, &status);
        if (!flag) return;
        char byte = 0;
        MPI_Recv(&byte, 1, MPI_CHAR, status.MPI_SOURCE, kPing, g_watch, MPI_STATUS_IGNORE);
        MPI_Send(&byte, 1, MPI_CHAR, status.MPI_SOURCE, kPong, g_watch);  // one byte: sent eagerly, never blocks
    }
}

// Rank 0: pings every other rank; returns the ranks that did not answer
// within kPingSeconds.
std::vector<int> unanswered_pings() {
    const int others = g_size - 1;
    std::vector<MPI_Request> sends(others), receives(others);
    std::vector<char> answers(others, 0);
    char ping = 1;
    for (int r = 1; r < g_size; ++r) {
        MPI_Isend(&ping, 1, MPI_CHAR, r, kPing, g_watch, &sends[r - 1]);
        MPI_Irecv(&answers[r - 1], 1, MPI_CHAR, r, kPong, g_watch, &receives[r - 1]);
    }
    std::vector<bool> answered(others, false);
    const auto t0 = Clock::now();
    int pending = others;
    while (pending > 0 && seconds_since(t0) < kPingSeconds) {
        for (int i = 0; i < others; ++i) {
            if (answered[i]) continue;
            int done = 0;
            MPI_Test(&receives[i], &done, MPI_STATUS_IGNORE);
            if (done) answered[i] = true, --pending;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::vector<int> missing;
    for (int i = 0; i < others; ++i)
        if (!answered[i]) missing.push_back(i + 1);
    return missing;  // the requests are left behind: the job is about to be aborted
}

[[noreturn]] void hung(const std::string& what, double waited) {
    std::string message = cat("rank ", g_rank, " of ", g_size, ": ", what, " waited ", static_cast<int>(waited),
                              " s for the other ranks (--rank-timeout ", g_timeout, " s). ");
    if (g_rank == 0) {
        const std::vector<int> missing = unanswered_pings();
        if (missing.empty()) {
            message +=
                "Every rank answered a ping, so all are alive but one is stuck outside the collectives "
                "(running other code for longer than the timeout).";
        } else {
            std::string list;
            for (int r : missing) list += cat(list.empty() ? "" : ", ", r);
            message += cat(missing.size() == 1 ? "Rank " : "Ranks ", list, missing.size() == 1 ? " does" : " do",
                           " not answer (pinged for ", kPingSeconds,
                           " s): dead or hung (stopped, deadlocked, or its node unreachable).");
        }
    } else {
        message += "Rank 0 did not name a missing rank in time: rank 0 itself may be dead or hung.";
    }
    abort(message + " Aborting the job; the last checkpoint on disk is intact.", 3);
}

// Waits for a non-blocking collective, answering pings, until the deadline.
void wait(MPI_Request& request, const std::string& what) {
    const auto t0 = Clock::now();
    const double limit = g_timeout + (g_rank == 0 ? 0.0 : kGraceSeconds);
    for (int spins = 0;; ++spins) {
        int done = 0;
        MPI_Test(&request, &done, MPI_STATUS_IGNORE);
        if (done) return;
        if (g_rank != 0) answer_pings();
        if (spins >= kSpinsBeforeSleep) {  // a long wait: stop spinning, poll every 100 us
            const double waited = seconds_since(t0);
            if (waited > limit) hung(what, waited);
            std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
    }
}

int checked_count(int64_t count, const std::string& what) {
    HFQ_CHECK(count >= 0 && count <= INT_MAX, "mpi: ", what, ": ", count, " values are more than one MPI call takes");
    return static_cast<int>(count);
}

template <class T>
void sum_values(T* values, int64_t count, MPI_Datatype type, const std::string& what) {
    if (g_size == 1 || count == 0) return;
    MPI_Request request;
    MPI_Iallreduce(MPI_IN_PLACE, values, checked_count(count, what), type, MPI_SUM, MPI_COMM_WORLD, &request);
    wait(request, what);
}

}  // namespace

Session::Session(int& argc, char**& argv) {
    if (!started_by_mpirun()) return;
    // Open MPI's non-blocking all-reduce (libnbc) otherwise picks recursive
    // doubling, which sends the whole buffer at every step: 2x slower than
    // the blocking MPI_Allreduce on a 13 MB gradient. Rabenseifner's
    // algorithm (a reduce-scatter by recursive halving, then an all-gather)
    // sends each byte about twice whatever the rank count, in 2 log2(N)
    // steps, and was as fast as the blocking call or faster at every size
    // measured (docs/distributed.md). A value the user set is kept.
    setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3", 0);
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    MPI_Comm_dup(MPI_COMM_WORLD, &g_watch);
    g_launched = true;
    if (provided < MPI_THREAD_FUNNELED)
        abort(cat("this MPI library provides thread level ", provided, ", hfq needs MPI_THREAD_FUNNELED"), 1);
}

Session::~Session() {
    if (!g_launched) return;
    MPI_Comm_free(&g_watch);
    MPI_Finalize();
    g_launched = false;
}

bool launched() { return g_launched; }
int rank() { return g_rank; }
int size() { return g_size; }

void set_timeout(double seconds) {
    HFQ_CHECK(seconds > 0, "mpi: the rank timeout must be positive, got ", seconds);
    g_timeout = seconds;
}
double timeout() { return g_timeout; }

void sum(float* values, int64_t count, const std::string& what) { sum_values(values, count, MPI_FLOAT, what); }
void sum(double* values, int64_t count, const std::string& what) { sum_values(values, count, MPI_DOUBLE, what); }

std::vector<uint64_t> all_gather(const std::vector<uint64_t>& values, const std::string& what) {
    if (g_size == 1) return values;
    const int n = checked_count(static_cast<int64_t>(values.size()), what);
    std::vector<uint64_t> out(static_cast<size_t>(n) * g_size);
    MPI_Request request;
    MPI_Iallgather(values.data(), n, MPI_UINT64_T, out.data(), n, MPI_UINT64_T, MPI_COMM_WORLD, &request);
    wait(request, what);
    return out;
}

void broadcast(std::string& bytes, const std::string& what) {
    if (g_size == 1) return;
    uint64_t n = bytes.size();
    MPI_Request request;
    MPI_Ibcast(&n, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD, &request);
    wait(request, what);
    bytes.resize(n);
    MPI_Ibcast(bytes.data(), checked_count(static_cast<int64_t>(n), what), MPI_CHAR, 0, MPI_COMM_WORLD, &request);
    wait(request, what);
}

void barrier(const std::string& what) {
    if (g_size == 1) return;
    MPI_Request request;
    MPI_Ibarrier(MPI_COMM_WORLD, &request);
    wait(request, what);
}

void abort(const std::string& message, int exit_code) {
    std::fprintf(stderr, "\nhfq: %s\n", message.c_str());
    std::fflush(stderr);
    if (g_launched) MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::exit(exit_code);
}

}  // namespace hfq::mpi
