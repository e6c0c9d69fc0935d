// One training step of a model: zero the gradients, forward, cross-entropy
// (with label smoothing), backward, optional gradient clipping, and the
// optimizer updates. The trainer and the benchmark (apps/hfq_bench) drive the
// same code:
//
//   TrainStep step(model, options);          // builds the optimizers
//   step.set_lr_factor(schedule.factor(t));  // each step
//   StepStats s = step.run(batch.images, batch.labels);
//
// Optimizers: SGD (momentum, Nesterov, weight decay on ParamGroup::weight
// only) for weights, biases and batch norm; learnable quantizer scales
// (ParamGroup::quantizer) get their own optimizer, Adam or SGD, with its own
// learning rate and no weight decay by default.
//
// Data parallel (train/data_parallel.h): with TrainStepOptions::sync the
// loss is the global batch's and the gradients are averaged over the ranks
// between the backward and the updates.
//
// A step whose loss is not finite changes nothing (no backward, no update);
// with the gradient norm computed, neither does one whose gradient is not
// finite. StepStats::applied says which.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "layers/model.h"
#include "layers/optimizer.h"

namespace hfq {

struct StepStats;

// What a step shares with the other ranks of a data-parallel run
// (train/data_parallel.h); a single process has none.
class StepSync {
public:
    virtual ~StepSync() = default;
    // After the forward: the loss and top-1 hits of the global batch.
    virtual void combine_forward(StepStats& stats) = 0;
    // After the backward: the gradients averaged over the ranks (and what
    // else the update reads), before clipping and the optimizers.
    virtual void combine_gradients() = 0;
};

struct TrainStepOptions {
    SgdOptions sgd;                            // lr = the base rate of weights, biases and batch norm
    std::string quantizer_optimizer = "adam";  // "adam" or "sgd" (plain, no momentum)
    float quantizer_lr = 1e-3f;                // base rate of quantizer parameters
    float quantizer_weight_decay = 0.0f;
    float label_smoothing = 0.0f;
    float clip_grad_norm = 0.0f;  // > 0: scale gradients so their global L2 norm is at most this
    StepSync* sync = nullptr;     // data-parallel runs: the other ranks' share of the step
};

struct StepStats {
    float loss = 0;         // mean cross-entropy of the batch (with label smoothing)
    int64_t correct = 0;    // top-1 hits in the batch
    double grad_norm = -1;  // global L2 norm before clipping; -1 when not computed
    bool applied = false;   // false: loss or gradient not finite, the parameters are unchanged
};

class TrainStep {
public:
    TrainStep(Model& model, const TrainStepOptions& options);

    // images {N, H, W, C}, labels N class indices. The gradient norm is
    // computed when clipping is on or `want_grad_norm` (it reads every
    // gradient once, in a fixed order).
    StepStats run(const Tensor& images, const std::vector<int32_t>& labels, bool want_grad_norm = false);

    // Sets every optimizer's learning rate to its base rate times `factor`.
    void set_lr_factor(double factor);
    // The current rates (base rate times the last factor): of the weights,
    // biases and batch norm, and of the quantizer parameters (0 if none).
    float lr() const { return weight_optimizer_->lr(); }
    float quantizer_lr() const { return quantizer_optimizer_ ? quantizer_optimizer_->lr() : 0.0f; }
    bool has_quantizer_optimizer() const { return quantizer_optimizer_ != nullptr; }

    // The optimizers by role ("weights", and "quantizer" when the model has
    // quantizer parameters), for checkpoints.
    std::vector<std::pair<std::string, Optimizer*>> optimizers();

private:
    double gradient_norm() const;
    void scale_gradients(float factor);

    Model& model_;
    TrainStepOptions options_;
    std::unique_ptr<Optimizer> weight_optimizer_;     // SGD: weights, biases, batch norm
    std::unique_ptr<Optimizer> quantizer_optimizer_;  // Adam or SGD: quantizer parameters; null if none
};

// The global L2 norm of the gradients of `params` (those that have one),
// summed in double in a fixed order: the same value at any thread count.
double global_grad_norm(const std::vector<NamedParameter>& params);

// Top-1 hits of logits {N, K} against labels.
int64_t count_correct(const Tensor& logits, const std::vector<int32_t>& labels);

}  // namespace hfq
