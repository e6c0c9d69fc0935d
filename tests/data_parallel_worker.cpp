// The program tests/test_data_parallel.cpp runs, under mpirun and alone: a
// few float and QAT steps of a small MobileNetV1 on fixed random batches,
// then the whole model state (parameters and buffers, quantizer state
// included) written to a safetensors file.
//
//   data_parallel_worker OUT [--no-sync-bn] [--permute SEED]
//
// Under mpirun -np N each rank trains on its part (B/N images) of every
// global batch of B through DataParallel (train/data_parallel.h), with sync
// batch norm unless --no-sync-bn, and writes OUT.rank<r>. Alone it trains on
// the whole batch and writes OUT; --permute SEED shuffles the images within
// every batch first: the same training in other summation orders, the
// yardstick of the comparison's bound.
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>

#include "engine/check.h"
#include "engine/random.h"
#include "engine/safetensors.h"
#include "layers/model.h"
#include "quant/quantize_model.h"
#include "train/data_parallel.h"
#include "train/mpi_job.h"
#include "train/train_step.h"

namespace {

using namespace hfq;

constexpr int64_t kBatch = 16, kSize = 16, kChannels = 3, kClasses = 4;
// Few steps at small learning rates: a freshly initialised network on random
// images is chaotic (the permutations' differences grow ~30x per step), and a
// comparison is only sharp while the reordering's effect is still small.
constexpr int kFloatSteps = 2, kQatSteps = 2;
constexpr float kFloatLr = 0.002f, kQatLr = 0.001f;

struct Batch {
    Tensor images;  // {B, 16, 16, 3}
    std::vector<int32_t> labels;
};

// Global batch `step`: the same pixels and labels in every process. Class c
// adds c to one channel's mean, so that training has something to learn.
Batch global_batch(int step, uint64_t permute_seed) {
    Rng rng = Rng::derive(1234, {static_cast<uint64_t>(step)});
    Batch b{Tensor::empty({kBatch, kSize, kSize, kChannels}), std::vector<int32_t>(kBatch)};
    const int64_t per_image = kSize * kSize * kChannels;
    for (int64_t i = 0; i < kBatch; ++i) {
        b.labels[i] = static_cast<int32_t>(rng.below(kClasses));
        for (int64_t k = 0; k < per_image; ++k)
            b.images.f32()[i * per_image + k] = rng.normal() + (k % kChannels == b.labels[i] % kChannels ? 1.0f : 0.0f);
    }
    if (permute_seed == 0) return b;
    std::vector<int64_t> order(kBatch);
    std::iota(order.begin(), order.end(), 0);
    Rng shuffle = Rng::derive(permute_seed, {static_cast<uint64_t>(step)});
    for (int64_t i = kBatch - 1; i > 0; --i) std::swap(order[i], order[shuffle.below(i + 1)]);
    Batch p{Tensor::empty(b.images.shape()), std::vector<int32_t>(kBatch)};
    for (int64_t i = 0; i < kBatch; ++i) {
        std::memcpy(p.images.f32() + i * per_image, b.images.f32() + order[i] * per_image, per_image * sizeof(float));
        p.labels[i] = b.labels[order[i]];
    }
    return p;
}

// This rank's part: images [B r / N, B (r + 1) / N).
Batch part_of(const Batch& b, int part, int parts) {
    const int64_t begin = kBatch * part / parts, end = kBatch * (part + 1) / parts;
    const int64_t per_image = kSize * kSize * kChannels;
    Batch p{Tensor::empty({end - begin, kSize, kSize, kChannels}),
            std::vector<int32_t>(b.labels.begin() + begin, b.labels.begin() + end)};
    std::memcpy(p.images.f32(), b.images.f32() + begin * per_image, (end - begin) * per_image * sizeof(float));
    return p;
}

void train(Model& model, DataParallel& dp, float lr, int first_step, int steps, uint64_t permute_seed) {
    TrainStepOptions o;
    o.sgd.lr = lr;
    o.sgd.momentum = 0.9f;
    o.sgd.weight_decay = 1e-4f;
    if (dp.active()) o.sync = &dp;
    dp.attach(model);
    TrainStep step(model, o);
    for (int s = first_step; s < first_step + steps; ++s) {
        const Batch b = part_of(global_batch(s, permute_seed), mpi::rank(), mpi::size());
        dp.set_step(s);
        const StepStats stats = step.run(b.images, b.labels);
        HFQ_CHECK(stats.applied, "step ", s, " was not applied (loss ", stats.loss, ")");
    }
}

}  // namespace

int main(int argc, char** argv) {
    mpi::Session session(argc, argv);
    try {
        HFQ_CHECK(argc >= 2, "usage: data_parallel_worker OUT [--no-sync-bn] [--permute SEED]");
        const std::string out = argv[1];
        bool sync_bn = true;
        uint64_t permute_seed = 0;
        for (int i = 2; i < argc; ++i) {
            if (std::strcmp(argv[i], "--no-sync-bn") == 0)
                sync_bn = false;
            else if (std::strcmp(argv[i], "--permute") == 0 && i + 1 < argc)
                permute_seed = std::stoull(argv[++i]);
            else
                throw Error(cat("data_parallel_worker: unknown argument ", argv[i]));
        }
        ModelConfig mc;
        mc.arch = Arch::mobilenet_v1;
        mc.width = 0.25;
        mc.classes = kClasses;
        mc.input_channels = kChannels;
        mc.small_input = true;
        std::shared_ptr<Model> model = build_model(mc, 7);
        DataParallel dp(sync_bn);
        train(*model, dp, kFloatLr, 0, kFloatSteps, permute_seed);
        quant::QuantPolicy policy;  // the default run's: msqe-po2, 4 bits per channel, folded, float-conv statistics
        policy.options.per_channel = true;
        quant::quantize_model(*model, policy);
        train(*model, dp, kQatLr, kFloatSteps, kQatSteps, permute_seed);
        const std::string file = mpi::launched() ? cat(out, ".rank", mpi::rank()) : out;
        write_safetensors(file, model->state_dict());
        return 0;
    } catch (const std::exception& e) {
        if (mpi::size() > 1) mpi::abort(cat("rank ", mpi::rank(), ": ", e.what()), 1);
        std::fprintf(stderr, "data_parallel_worker: %s\n", e.what());
        return 1;
    }
}
