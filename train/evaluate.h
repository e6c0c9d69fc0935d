// Evaluation over a whole dataset: mean cross-entropy, top-1 and top-5
// accuracy. The network is any function from a batch of images to logits, so
// the float model, the fake-quantized model and the exported integer model
// are measured by the same code.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>

#include "data/dataset.h"
#include "layers/module.h"

namespace hfq {

struct EvalResult {
    double loss = 0;  // mean cross-entropy (no label smoothing)
    double top1 = 0;  // fractions in [0, 1]
    double top5 = 0;
    int64_t samples = 0;
    int64_t skipped = 0;  // unreadable samples, each replaced by the next one
    double seconds = 0;
};

struct EvalOptions {
    int64_t batch_size = 256;
    int loader_threads = 1;
    double max_bad_fraction = kDefaultMaxBadFraction;  // LoaderOptions::max_bad_fraction
    // Sharded over the ranks of a data-parallel run: this rank evaluates its
    // part of every batch (LoaderOptions::part), and `sum` adds the counts
    // and sums of all parts (DataParallel::sum_eval) before the means.
    int part = 0, parts = 1;
    std::function<void(double* values, int64_t count)> sum = nullptr;
};

// images {N, H, W, C} -> logits {N, K}
using LogitsFn = std::function<Tensor(const Tensor& images)>;

EvalResult evaluate(const LogitsFn& logits, std::shared_ptr<const Dataset> data, const EvalOptions& options);
// The module in evaluation mode, without gradients; its mode is restored.
EvalResult evaluate(Module& model, std::shared_ptr<const Dataset> data, const EvalOptions& options);

// Adds a batch's cross-entropy sum and top-1 / top-5 hits to `r` (ranks count
// the classes scoring strictly higher than the label's, plus equal ones
// listed before it).
void accumulate_eval(const Tensor& logits, const std::vector<int32_t>& labels, EvalResult& r);

}  // namespace hfq
