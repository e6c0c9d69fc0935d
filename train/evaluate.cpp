#include "train/evaluate.h"

#include <chrono>
#include <cmath>

#include "data/loader.h"
#include "engine/autograd.h"
#include "engine/check.h"
#include "engine/ops.h"

namespace hfq {

void accumulate_eval(const Tensor& logits, const std::vector<int32_t>& labels, EvalResult& r) {
    const int64_t n = logits.dim(0), k = logits.dim(1);
    HFQ_CHECK(n == static_cast<int64_t>(labels.size()), "evaluate: ", n, " rows of logits for ", labels.size(),
              " labels");
    const float* z = logits.f32();
    for (int64_t i = 0; i < n; ++i) {
        const float* row = z + i * k;
        const int32_t y = labels[i];
        HFQ_CHECK(y >= 0 && y < k, "evaluate: label ", y, " outside the ", k, " classes");
        float max = row[0];
        for (int64_t j = 1; j < k; ++j) max = std::max(max, row[j]);
        double sum = 0;
        int64_t rank = 0;
        for (int64_t j = 0; j < k; ++j) {
            sum += std::exp(double(row[j]) - max);
            rank += row[j] > row[y] || (row[j] == row[y] && j < y);
        }
        r.loss += std::log(sum) + max - row[y];  // summed here, divided by the count at the end
        r.top1 += rank < 1;
        r.top5 += rank < 5;
    }
    r.samples += n;
}

EvalResult evaluate(const LogitsFn& logits, std::shared_ptr<const Dataset> data, const EvalOptions& options) {
    const auto t0 = std::chrono::steady_clock::now();
    LoaderOptions lo;
    lo.batch_size = options.batch_size;
    lo.shuffle = false;
    lo.threads = options.loader_threads;
    lo.max_bad_fraction = options.max_bad_fraction;
    lo.part = options.part;
    lo.parts = options.parts;
    Loader loader(std::move(data), lo);
    EvalResult r;
    while (std::optional<Batch> b = loader.next())
        if (b->size() > 0)
            accumulate_eval(logits(b->images), b->labels, r);  // a part of a short last batch may be empty
    r.skipped = loader.stats().replaced;
    if (options.sum) {
        double v[5] = {r.loss, r.top1, r.top5, double(r.samples), double(r.skipped)};
        options.sum(v, 5);
        r = {v[0], v[1], v[2], int64_t(v[3]), int64_t(v[4])};
    }
    HFQ_CHECK(r.samples > 0, "evaluate: the dataset is empty");
    r.loss /= r.samples;
    r.top1 /= r.samples;
    r.top5 /= r.samples;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

EvalResult evaluate(Module& model, std::shared_ptr<const Dataset> data, const EvalOptions& options) {
    const bool was_training = model.is_training();
    model.eval();
    NoGradGuard no_grad;
    EvalResult r;
    try {
        r = evaluate([&](const Tensor& images) { return model(Variable(images)).value(); }, std::move(data), options);
    } catch (...) {
        model.train(was_training);
        throw;
    }
    model.train(was_training);
    return r;
}

}  // namespace hfq
