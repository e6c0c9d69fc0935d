#include "data/loader.h"

#include <algorithm>
#include <iostream>
#include <numeric>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <opencv2/core/utility.hpp>

namespace hfq {

std::vector<int64_t> epoch_order(int64_t size, uint64_t seed, int64_t epoch, bool shuffle) {
    std::vector<int64_t> order(size);
    std::iota(order.begin(), order.end(), int64_t{0});
    if (shuffle) {  // Fisher-Yates
        Rng rng = Rng::derive(seed, {static_cast<uint64_t>(epoch)});
        for (int64_t i = size - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
    }
    return order;
}

Loader::Loader(std::shared_ptr<const Dataset> dataset, const LoaderOptions& options, LoaderPosition start,
               int64_t end_epoch)
    : dataset_(std::move(dataset)),
      options_(options),
      start_(start),
      position_(start),
      arena_(std::max(1, options.threads)),
      queue_(static_cast<size_t>(std::max(1, options.prefetch_batches))) {
    const LoaderOptions& o = options_;
    HFQ_CHECK(dataset_ != nullptr, "Loader: no dataset");
    const int64_t n = dataset_->size();
    HFQ_CHECK(n > 0, "Loader: the dataset is empty");
    HFQ_CHECK(dataset_->sample_shape().size() == 3, "Loader: samples must be {H, W, C}, the dataset says ",
              shape_str(dataset_->sample_shape()));
    HFQ_CHECK(o.batch_size > 0, "Loader: batch_size must be positive, got ", o.batch_size);
    HFQ_CHECK(o.threads >= 1, "Loader: threads must be at least 1, got ", o.threads);
    HFQ_CHECK(o.prefetch_batches >= 1, "Loader: prefetch_batches must be at least 1, got ", o.prefetch_batches);
    HFQ_CHECK(o.parts >= 1, "Loader: parts must be at least 1, got ", o.parts);
    HFQ_CHECK(o.part >= 0 && o.part < o.parts, "Loader: part must be in 0..", o.parts - 1, " for ", o.parts,
              " parts, got ", o.part);
    HFQ_CHECK(o.max_bad_fraction >= 0 && o.max_bad_fraction <= 1, "Loader: max_bad_fraction must be in [0, 1], got ",
              o.max_bad_fraction);
    batches_per_epoch_ = o.drop_last ? n / o.batch_size : (n + o.batch_size - 1) / o.batch_size;
    HFQ_CHECK(batches_per_epoch_ > 0, "Loader: with drop_last, a dataset of ", n, " samples has no full batch of ",
              o.batch_size);
    // The 1e-9 keeps a product such as 0.29 * 100 (28.999999999999996 in
    // binary) from losing a sample. At least one sample must load.
    max_unreadable_ = std::min(n - 1, static_cast<int64_t>(o.max_bad_fraction * static_cast<double>(n) + 1e-9));
    end_epoch_ = end_epoch < 0 ? start.epoch + 1 : end_epoch;
    HFQ_CHECK(start.epoch >= 0 && start.batch >= 0 && start.batch < batches_per_epoch_,
              "Loader: start position (epoch ", start.epoch, ", batch ", start.batch, ") is outside an epoch of ",
              batches_per_epoch_, " batches");
    HFQ_CHECK(end_epoch_ >= start.epoch, "Loader: end_epoch ", end_epoch_, " is before the start epoch ", start.epoch);
    // Samples are loaded in parallel by this loader's threads. OpenCV's own
    // parallel loops (its TBB arena spans every core) inside each sample would
    // add threads beyond options.threads, so OpenCV runs sequentially here.
    cv::setNumThreads(0);
    producer_ = std::thread(&Loader::produce, this);
}

Loader::~Loader() {
    stop_ = true;
    queue_.close();  // wakes a producer blocked on a full queue
    producer_.join();
}

LoaderPosition Loader::following(LoaderPosition p) const {
    return p.batch + 1 < batches_per_epoch_ ? LoaderPosition{p.epoch, p.batch + 1} : LoaderPosition{p.epoch + 1, 0};
}

void Loader::produce() {
    try {
        std::vector<int64_t> order;
        int64_t order_epoch = -1;
        for (LoaderPosition p = start_; p.epoch < end_epoch_ && !stop_; p = following(p)) {
            if (order_epoch != p.epoch) {
                order = epoch_order(dataset_->size(), options_.seed, p.epoch, options_.shuffle);
                order_epoch = p.epoch;
            }
            if (!queue_.push(Item{load_batch(p, order), nullptr})) return;  // closed: shutting down
        }
        queue_.push(Item{});  // the end
    } catch (const Error&) {
        queue_.push(Item{std::nullopt, std::current_exception()});
    } catch (const std::exception& e) {  // e.g. std::bad_alloc, cv::Exception
        queue_.push(Item{std::nullopt, std::make_exception_ptr(Error(cat("Loader: loading failed: ", e.what())))});
    } catch (...) {
        queue_.push(Item{std::nullopt, std::make_exception_ptr(Error("Loader: loading failed: unknown exception"))});
    }
}

Batch Loader::load_batch(LoaderPosition p, const std::vector<int64_t>& order) {
    const Shape sample = dataset_->sample_shape();  // {H, W, C}
    // The full batch is order[begin, begin + full); this part takes slots
    // [first, first + count) of it.
    const int64_t begin = p.batch * options_.batch_size;
    const int64_t full = std::min(options_.batch_size, dataset_->size() - begin);
    const int64_t first = full * options_.part / options_.parts;
    const int64_t count = full * (options_.part + 1) / options_.parts - first;
    const int64_t sample_numel = shape_numel(sample);
    Batch batch;
    batch.epoch = p.epoch;
    batch.index = p.batch;
    batch.images = Tensor::empty({count, sample[0], sample[1], sample[2]});  // {N, H, W, C}
    batch.labels.resize(count);
    batch.indices.resize(count);
    std::vector<std::vector<SkippedSample>> skipped(count);  // per slot: no locking
    float* images = batch.images.f32();
    arena_.execute([&] {
        // One task per sample: decode times vary a lot from image to image.
        tbb::parallel_for(
            tbb::blocked_range<int64_t>(0, count, 1),
            [&](const tbb::blocked_range<int64_t>& slots) {
                for (int64_t s = slots.begin(); s != slots.end() && !stop_; ++s)
                    load_slot(p.epoch, order[begin + first + s], images + s * sample_numel, batch, s, skipped[s]);
            },
            tbb::simple_partitioner());
    });
    for (auto& s : skipped)
        for (auto& record : s) batch.skipped.push_back(std::move(record));
    return batch;
}

void Loader::load_slot(int64_t epoch, int64_t index, float* out, Batch& batch, int64_t slot,
                       std::vector<SkippedSample>& skipped) const {
    const int64_t n = dataset_->size();
    const auto e = static_cast<uint64_t>(epoch), i = static_cast<uint64_t>(index);
    for (int64_t attempt = 0;; ++attempt) {
        // Unreadable: try the next index, with random numbers of its own
        // (keyed by the replaced sample and the attempt).
        const int64_t candidate = (index + attempt) % n;
        Rng rng = attempt == 0 ? Rng::derive(options_.seed, {e, i})
                               : Rng::derive(options_.seed, {e, i, static_cast<uint64_t>(attempt)});
        try {
            dataset_->load(candidate, rng, out);
            batch.labels[slot] = dataset_->label(candidate);
            batch.indices[slot] = candidate;
            return;
        } catch (const UnreadableSample& error) {
            skipped.push_back({candidate, error.what()});
            // Give up: these max_unreadable_ + 1 distinct samples are more
            // than allowed, so next() stops the run before the batch (its
            // slot unfilled) is handed out.
            if (attempt == max_unreadable_) return;
        }
    }
}

std::optional<Batch> Loader::next() {
    if (error_) std::rethrow_exception(error_);
    if (finished_) return std::nullopt;
    Item item;
    if (!queue_.pop(item) || (!item.batch && !item.error)) {
        finished_ = true;
        return std::nullopt;
    }
    if (item.error) {
        error_ = item.error;
        std::rethrow_exception(error_);
    }
    Batch& batch = *item.batch;
    const int64_t n = dataset_->size();
    for (const SkippedSample& s : batch.skipped) {
        ++stats_.replaced;
        if (!unreadable_.insert(s.index).second) continue;
        if (first_unreadable_.empty()) first_unreadable_ = s.reason;
        const bool skipping = static_cast<int64_t>(unreadable_.size()) <= max_unreadable_;  // else: stopping below
        std::cerr << (skipping ? "hfq: skipping unreadable image " : "hfq: unreadable image ") << s.reason << " ("
                  << unreadable_.size() << " so far; --max-bad-fraction " << options_.max_bad_fraction << " allows "
                  << max_unreadable_ << " of " << n << ")\n";
    }
    stats_.unreadable = static_cast<int64_t>(unreadable_.size());
    if (stats_.unreadable > max_unreadable_) {
        error_ = std::make_exception_ptr(Error(cat(
            "stopping: ", stats_.unreadable, " of the ", n, " images could not be read (the first: ", first_unreadable_,
            "); --max-bad-fraction ", options_.max_bad_fraction, " allows ", max_unreadable_, " of ", n,
            ". Fix or remove the files, or raise --max-bad-fraction.")));
        std::rethrow_exception(error_);
    }
    ++stats_.batches;
    stats_.samples += batch.size();
    position_ = following(position_);
    return std::move(batch);
}

}  // namespace hfq
