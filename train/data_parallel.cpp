#include "train/data_parallel.h"

#include <chrono>
#include <cmath>
#include <cstring>

#include "engine/check.h"
#include "engine/replicas.h"
#include "quant/quantize_model.h"
#include "train/mpi_job.h"

namespace hfq {
namespace {

bool is_running_statistic(const std::string& name) {
    auto ends_with = [&](const char* tail) {
        const size_t n = std::strlen(tail);
        return name.size() >= n && name.compare(name.size() - n, n, tail) == 0;
    };
    return ends_with("running_mean") || ends_with("running_var");
}

// A 64-bit hash of a tensor's bytes (FNV-1a over 8-byte words): equal
// tensors hash equal; a changed bit changes the hash but with probability 2^-64.
uint64_t hash_bytes(const void* data, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    const auto* p = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x100000001b3ULL;
    }
    for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

// Runs the collective `sum` and adds its cost to `e`.
template <class Sum>
void timed(DataParallel::Exchange& e, int64_t bytes, Sum sum) {
    const auto t0 = std::chrono::steady_clock::now();
    sum();
    e.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    e.calls += 1;
    e.bytes += bytes;
}

// The tensors combine_gradients adds up, in one order every rank shares.
struct Slot {
    float* data;
    int64_t count;
};

}  // namespace

DataParallel::DataParallel(bool sync_bn) : ranks_(mpi::size()), sync_bn_(sync_bn) {
    if (!active()) return;
    replicas::install(
        [this](double* values, int64_t count) {
            timed(traffic_.batch_statistics, count * sizeof(double),
                  [&] { mpi::sum(values, count, "the batch statistics"); });
        },
        sync_bn, ranks_, [] { return mpi::rank(); });
}

DataParallel::~DataParallel() {
    if (active()) replicas::install({}, false, 1, {});
}

void DataParallel::attach(Model& model) {
    model_ = &model;
    if (!active()) return;
    for (const quant::QuantizedLayer& layer : quant::quantized_layers(model))
        layer.quantizer->defer_second_moments(true);
}

void DataParallel::combine_forward(StepStats& stats) {
    if (!active()) return;
    // A loss that is not finite on one rank makes the sum not finite: no rank applies the step.
    double v[2] = {stats.loss, static_cast<double>(stats.correct)};
    timed(traffic_.step_results, sizeof v, [&] { mpi::sum(v, 2, cat("the loss of step ", step_)); });
    stats.loss = static_cast<float>(v[0] / ranks_);
    stats.correct = static_cast<int64_t>(v[1]);
}

void DataParallel::combine_gradients() {
    if (!active()) return;
    HFQ_CHECK(model_ != nullptr, "DataParallel: combine_gradients before attach");
    std::vector<Slot> slots;
    for (const NamedParameter& p : model_->named_parameters()) {
        Tensor g = p.var.grad();  // shares the gradient's memory
        if (g.defined()) slots.push_back({g.f32(), g.numel()});
    }
    std::vector<quant::Quantizer*> pending;
    for (const quant::QuantizedLayer& layer : quant::quantized_layers(*model_))
        if (Tensor* g = layer.quantizer->pending_second_moment_gradient()) {
            slots.push_back({g->f32(), g->numel()});
            pending.push_back(layer.quantizer);
        }
    if (!sync_bn_)
        for (auto& [name, t] : model_->named_buffers())
            if (is_running_statistic(name)) slots.push_back({t->f32(), t->numel()});

    int64_t total = 0;
    for (const Slot& s : slots) total += s.count;
    buffer_.resize(total);
    float* b = buffer_.data();
    for (const Slot& s : slots) b = std::copy(s.data, s.data + s.count, b);
    timed(traffic_.gradients, total * sizeof(float),
          [&] { mpi::sum(buffer_.data(), total, cat("the gradients of step ", step_)); });
    // The average: the gradient of the global batch's mean loss.
    const float inv = 1.0f / static_cast<float>(ranks_);
    const float* in = buffer_.data();
    for (const Slot& s : slots)
        for (int64_t i = 0; i < s.count; ++i) s.data[i] = *in++ * inv;
    for (quant::Quantizer* q : pending) q->apply_second_moments();
}

bool DataParallel::any(bool flag, const std::string& what) {
    if (!active()) return flag;
    double v = flag ? 1.0 : 0.0;
    mpi::sum(&v, 1, what);
    return v > 0;
}

int64_t DataParallel::sum(int64_t value, const std::string& what) {
    int64_t total = 0;
    for (uint64_t v : mpi::all_gather({static_cast<uint64_t>(value)}, what)) total += static_cast<int64_t>(v);
    return total;
}

int64_t DataParallel::max(int64_t value, const std::string& what) {
    int64_t m = value;
    for (uint64_t v : mpi::all_gather({static_cast<uint64_t>(value)}, what)) m = std::max(m, static_cast<int64_t>(v));
    return m;
}

void DataParallel::check_same_state(int64_t step) {
    if (!active()) return;
    HFQ_CHECK(model_ != nullptr, "DataParallel: check_same_state before attach");
    std::vector<std::string> names;
    std::vector<uint64_t> hashes;
    for (const auto& [name, t] : model_->state_dict()) {
        names.push_back(name);
        hashes.push_back(hash_bytes(t.raw(), t.nbytes()));
    }
    const std::vector<uint64_t> all = mpi::all_gather(hashes, cat("the state check of step ", step));
    const size_t n = hashes.size();
    for (int r = 1; r < ranks_; ++r)
        for (size_t i = 0; i < n; ++i)
            HFQ_CHECK(all[r * n + i] == all[i], "step ", step, ": rank ", r, "'s ", names[i],
                      " differs from rank 0's: the ranks no longer train the same model (a bug, or a faulty "
                      "node). Stopping; checkpoints hold rank 0's state.");
}

void DataParallel::sum_eval(double* values, int64_t count) { mpi::sum(values, count, "the evaluation's sums"); }

}  // namespace hfq
