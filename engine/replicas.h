// Sums over the replicas of a data-parallel job: the one place where engine
// and quant code that depends on the whole batch (batch statistics with
// sync batch norm, the activation quantizers' data-driven scale choices)
// reaches the other processes.
//
// A data-parallel run (train/data_parallel.h, under mpirun) installs a sum
// that adds a vector over every process (MPI_Allreduce) and leaves it in
// place; a single process installs nothing and every function here is then
// the identity, so nothing changes for it. The engine itself knows nothing
// of MPI.
//
// Every process must call these in the same order with the same counts (they
// run the same model on batches of the same shape, so they do).
#pragma once
#include <cstdint>
#include <functional>

namespace hfq::replicas {

// values[0..count) += the same vector of every other replica, in place.
using SumFn = std::function<void(double* values, int64_t count)>;

// Installs (or, with an empty function, removes) the sum over replicas, and
// says whether batch norm reduces its statistics with it (--sync-bn).
void install(SumFn sum, bool sync_batch_norm);

// Whether a sum is installed (a data-parallel run with more than one replica).
bool active();
// Whether batch statistics are summed over the replicas (sync batch norm).
bool sync_batch_norm();

// values += every other replica's values; the identity when not active().
void sum(double* values, int64_t count);

}  // namespace hfq::replicas
