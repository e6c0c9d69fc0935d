// Sums over the replicas of a data-parallel job: the one place where engine
// and quant code that depends on the whole batch (batch statistics with
// sync batch norm, the activation quantizers' data-driven scale choices,
// dropout's mask) reaches the other processes.
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
// This replica's index in [0, replicas): a function, not a number, because
// the tests fake replicas as threads of one process (a thread_local index).
using IndexFn = std::function<int()>;

// Installs (or, with an empty sum, removes: the rest is then ignored) the sum
// over `replicas` replicas and this replica's index, and says whether batch
// norm reduces its statistics with it (--sync-bn).
void install(SumFn sum, bool sync_batch_norm, int replicas, IndexFn index);

// Whether a sum is installed (a data-parallel run with more than one replica).
bool active();
// Whether batch statistics are summed over the replicas (sync batch norm).
bool sync_batch_norm();

// values += every other replica's values; the identity when not active().
void sum(double* values, int64_t count);

// Where this replica's local_rows rows sit in the global batch, which is the
// replicas' rows in index order: rows [offset, offset + local_rows) of
// total. For what must be drawn for the whole batch to match one process
// (dropout's mask). One sum(); {0, local_rows} when not active().
struct Rows {
    int64_t offset, total;
};
Rows rows_in_batch(int64_t local_rows);

}  // namespace hfq::replicas
