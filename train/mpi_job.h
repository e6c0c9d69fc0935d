// The MPI job this process belongs to, when mpirun started it: its rank, the
// number of ranks, and the few collectives data-parallel training needs
// (train/data_parallel.h), each guarded by a watchdog.
//
//   int main(int argc, char** argv) {
//       hfq::mpi::Session mpi(argc, argv);   // MPI_Init only under mpirun
//       ... hfq::mpi::rank(), hfq::mpi::size(), hfq::mpi::sum(v, n, "gradients") ...
//   }
//
// Without mpirun (no OMPI_COMM_WORLD_SIZE / PMIX_RANK in the environment)
// MPI is never initialised: rank 0 of 1, every collective is the identity,
// and the program is the single-process one it always was.
//
// Only the main thread calls MPI (MPI_THREAD_FUNNELED): the loader's threads
// and the OpenMP compute threads never do.
//
// A rank that dies (a crash, SIGKILL, its node lost) is Open MPI's to notice:
// mpirun prints "mpirun noticed that process rank R ... exited on signal S"
// and ends the others. A rank that hangs (stopped, deadlocked, its network
// cut) is this file's: every collective is non-blocking and waited for with
// a deadline (set_timeout). When rank 0's deadline passes it pings every
// rank; the ranks still alive are waiting inside a collective, where they
// answer; the ones that do not are named in the error, and rank 0 aborts the
// job (MPI_Abort, exit status 3). The other ranks wait 15 s longer than rank 0
// before they give up themselves, so that rank 0, if it is alive, names the
// culprit first.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace hfq::mpi {

// MPI_Init_thread when started by mpirun, MPI_Finalize at the end of main.
class Session {
public:
    Session(int& argc, char**& argv);
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;
};

bool launched();  // MPI is initialised (the process was started by mpirun)
int rank();       // 0 without mpirun
int size();       // 1 without mpirun
inline bool is_root() { return rank() == 0; }

// How long a collective may wait for the other ranks before the job is
// aborted as hung (seconds; default 300).
void set_timeout(double seconds);
double timeout();

// Element-wise sums over all ranks, in place. `what` names the collective in
// a timeout error ("the gradients of step 12"). Every rank receives the same
// sum (each element is reduced once and distributed: Open MPI's algorithms
// for MPI_SUM; the trainer's checksums verify it).
void sum(float* values, int64_t count, const std::string& what);
void sum(double* values, int64_t count, const std::string& what);
// Every rank's `values` (each the same count), rank after rank.
std::vector<uint64_t> all_gather(const std::vector<uint64_t>& values, const std::string& what);
// Rank 0's bytes to every rank (resized on the others).
void broadcast(std::string& bytes, const std::string& what);
void barrier(const std::string& what);

// Ends every rank of the job with `exit_code` after printing `message` (a
// rank that threw, so that the others do not wait for it). Without mpirun:
// std::exit.
[[noreturn]] void abort(const std::string& message, int exit_code);

}  // namespace hfq::mpi
