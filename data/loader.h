// Loader: runs a Dataset over epochs and hands out batches in order while
// the trainer computes.
//
// A producer thread walks the batch positions in order; the samples of each
// batch are loaded in parallel on a oneTBB task_arena of `threads` threads
// (the producer is one of them), straight into the batch tensor; finished
// batches wait in a bounded queue of `prefetch_batches`. Keep threads plus the
// oneDNN (OpenMP) compute threads at or below the number of cores, or they
// fight over them.
//
// Determinism: the order of epoch e is a permutation drawn from (seed, e);
// sample i of epoch e is augmented with Rng::derive(seed, {e, i}). So batch b
// of epoch e holds the same pixels whatever the thread count, and a Loader
// started at (e, b) (resuming from a checkpoint) reproduces it exactly.
//
// Parts (data-parallel training): a loader with parts = N, part = k hands out
// only its share of every batch, slots [count * k / N, count * (k + 1) / N)
// of the full batch of `count` samples (batch_size, or the last batch's size
// without drop_last). Batch numbering, batches_per_epoch() and position() are
// the full batches', and each sample keeps its random numbers, so the parts
// of N loaders put together in part order are the single loader's batch bit
// for bit (images, labels, indices). A last partial batch of fewer than N
// samples leaves some parts empty: such a loader still delivers that batch,
// with 0 images ({0, H, W, C}, no labels), so that every part sees the same
// number of batches and stays in step with the others; skip the model on
// it (a batch of 0 images is not a batch norm can use) but still take part
// in whatever the parts exchange. Training with batch_size divisible by N and
// drop_last never meets one.
//
// Unreadable samples (corrupt or truncated files): the sample is replaced by
// the next dataset index that loads (with its own random numbers), the batch
// records it in Batch::skipped, and the Loader logs its path to stderr the
// first time. Once more than max_bad_fraction of the dataset has proved
// unreadable, next() throws hfq::Error saying so in plain words: a broken
// dataset stops the run. The message names the command-line option that
// raises the limit, --max-bad-fraction, which every program that runs a
// Loader on files has (train_mobilenet, qat_study, loader_bench). (The count
// starts afresh in each Loader. A loader of one part meets, counts and limits
// only the unreadable samples of its own slots; the replacement of a slot is
// the one the single loader would make.)
//
// Errors: any other exception while loading reaches the consumer, in batch
// order, as an hfq::Error thrown by next(). The destructor stops the producer
// and joins it, also when batches are still queued.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include <tbb/task_arena.h>

#include "data/bounded_queue.h"
#include "data/dataset.h"

namespace hfq {

struct LoaderOptions {
    int64_t batch_size = 32;
    bool shuffle = true;     // false: dataset order every epoch
    bool drop_last = false;  // true: leave out the last, partial batch
    uint64_t seed = 0;
    int threads = 1;                                   // loader threads (the producer included)
    int prefetch_batches = 4;                          // finished batches kept ready
    double max_bad_fraction = kDefaultMaxBadFraction;  // of the dataset; more unreadable samples stop the run
    int part = 0;                                      // this loader's share of every batch: part of parts
    int parts = 1;                                     // (see the header comment); 0 <= part < parts
};

// A batch position: batch `batch` of epoch `epoch`.
struct LoaderPosition {
    int64_t epoch = 0;
    int64_t batch = 0;
};

struct LoaderStats {
    int64_t batches = 0;     // delivered by next()
    int64_t samples = 0;     // in those batches
    int64_t replaced = 0;    // unreadable samples replaced in them (repeats counted)
    int64_t unreadable = 0;  // distinct dataset indices found unreadable
};

// The sample order of one epoch: a permutation of 0..size-1 drawn from
// (seed, epoch), or 0..size-1 itself without shuffling.
std::vector<int64_t> epoch_order(int64_t size, uint64_t seed, int64_t epoch, bool shuffle);

class Loader {
public:
    // Produces the batches from `start` up to the end of epoch end_epoch - 1
    // (by default, the rest of start's epoch).
    Loader(std::shared_ptr<const Dataset> dataset, const LoaderOptions& options, LoaderPosition start = {},
           int64_t end_epoch = -1);
    ~Loader();
    Loader(const Loader&) = delete;
    Loader& operator=(const Loader&) = delete;

    // The next batch in order, or nullopt after the last one. Throws hfq::Error
    // when loading failed or too many samples were unreadable (and again on
    // every later call).
    std::optional<Batch> next();

    int64_t batches_per_epoch() const { return batches_per_epoch_; }
    // The position of the batch the next call to next() returns: what a
    // checkpoint saves to resume from.
    LoaderPosition position() const { return position_; }
    const LoaderStats& stats() const { return stats_; }

private:
    struct Item {  // one queue entry: a batch, an error, or (neither) the end
        std::optional<Batch> batch;
        std::exception_ptr error;
    };

    void produce();
    Batch load_batch(LoaderPosition position, const std::vector<int64_t>& order);
    void load_slot(int64_t epoch, int64_t index, float* out, Batch& batch, int64_t slot,
                   std::vector<SkippedSample>& skipped) const;
    LoaderPosition following(LoaderPosition p) const;

    const std::shared_ptr<const Dataset> dataset_;
    const LoaderOptions options_;
    int64_t batches_per_epoch_ = 0;
    int64_t max_unreadable_ = 0;  // floor(max_bad_fraction * dataset size), at most size - 1
    const LoaderPosition start_;
    int64_t end_epoch_ = 0;

    // Consumer side.
    LoaderPosition position_;
    LoaderStats stats_;
    std::unordered_set<int64_t> unreadable_;
    std::string first_unreadable_;  // the reason of the first, for the message that stops the run
    std::exception_ptr error_;
    bool finished_ = false;

    tbb::task_arena arena_;
    BoundedQueue<Item> queue_;
    std::atomic<bool> stop_{false};
    std::thread producer_;  // last: starts once everything above exists
};

}  // namespace hfq
