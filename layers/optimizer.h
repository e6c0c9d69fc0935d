// Optimizers: SGD and Adam, each exactly its PyTorch namesake. An optimizer
// updates a list of named parameters from their gradients; which parameters
// it gets is the caller's choice (select_params by group), so e.g. SGD trains
// weights, biases and batch norm while Adam trains quantizer parameters.
//
// The base class holds what they share (as tinygrad's nn/optim.py): the loop
// over the parameters that have a gradient, the state tensors each parameter
// gets at its first update, and saving and restoring them by name. SGD and
// Adam only say which state tensors they keep and how one parameter is updated.
#pragma once
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "layers/module.h"

namespace hfq {

class Optimizer {
public:
    virtual ~Optimizer() = default;

    // One update from the current gradients. Parameters without a gradient
    // (not reached by backward) are left alone, state included, as PyTorch.
    void step();
    // Forgets the gradients of this optimizer's parameters.
    void zero_grad();

    float lr() const { return lr_; }
    void set_lr(float lr);  // learning-rate schedules
    const std::vector<NamedParameter>& params() const { return params_; }

    // The optimizer's state as named tensors "<parameter name>.<state name>"
    // (sharing memory), to be saved with a training checkpoint, and restored
    // by load_state. A parameter's tensors exist from its first update on;
    // load_state checks names, shapes and types, takes a parameter's tensors
    // all or none, and on any error changes nothing.
    std::vector<std::pair<std::string, Tensor>> state() const;
    void load_state(const std::vector<std::pair<std::string, Tensor>>& state);

protected:
    // A state tensor every parameter gets: f32 of the parameter's shape, or
    // (per_element false) one value of `dtype`, shape {1}.
    struct StateTensor {
        const char* name;
        DType dtype = DType::f32;
        bool per_element = true;
    };
    // `who` names the optimizer in error messages.
    Optimizer(const char* who, std::vector<NamedParameter> params, float lr, std::vector<StateTensor> layout);

    // Updates parameter i, whose gradient is defined and of its shape.
    virtual void update(size_t i, Tensor& value, const Tensor& grad) = 0;
    // Creates parameter i's state tensors (zeros) unless they exist; true if it did.
    bool create_state(size_t i);

    const char* who_;
    std::vector<NamedParameter> params_;
    float lr_;
    std::vector<StateTensor> layout_;
    std::vector<std::vector<Tensor>> state_;  // [parameter][layout_ index]; empty until created
};

struct SgdOptions {
    float lr = 0.1f;
    float momentum = 0.0f;
    bool nesterov = false;
    float weight_decay = 0.0f;
    // The groups weight decay applies to: by default only weights (not batch
    // norm parameters, biases or quantizer parameters).
    std::vector<ParamGroup> decay_groups = {ParamGroup::weight};
};

// Stochastic gradient descent with momentum, exactly PyTorch's torch.optim.SGD
// (dampening 0), per element:
//   d   = grad + wd * p           (wd = weight_decay for decayed groups, else 0)
//   buf = d                       on the first step,
//   buf = momentum * buf + d      afterwards
//   d   = d + momentum * buf      (Nesterov)   or   d = buf   (plain momentum)
//   p  -= lr * d
// State: "<name>.momentum_buffer" (none without momentum).
class SGD : public Optimizer {
public:
    SGD(std::vector<NamedParameter> params, const SgdOptions& options);
    const SgdOptions& options() const { return options_; }

private:
    void update(size_t i, Tensor& value, const Tensor& grad) override;

    SgdOptions options_;
    std::vector<float> decay_;  // per parameter: weight_decay or 0
};

struct AdamOptions {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 0.0f;  // applied to every parameter given (select them by group)
};

// Adam (Kingma & Ba 2015), exactly PyTorch's torch.optim.Adam (amsgrad off,
// weight decay as an L2 term added to the gradient), per element:
//   d  = grad + wd * p
//   m  = beta1 * m + (1 - beta1) * d
//   v  = beta2 * v + (1 - beta2) * d^2
//   t  = t + 1                                   (per parameter)
//   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The trainer uses it for quantizer parameters (learnable log2 scales), whose
// gradients are sums over whole tensors and vary in size by orders of
// magnitude between layers: Adam's per-parameter normalization suits them.
// State: "<name>.exp_avg", "<name>.exp_avg_sq" (f32, the parameter's shape)
// and "<name>.step" (s64 {1}).
class Adam : public Optimizer {
public:
    Adam(std::vector<NamedParameter> params, const AdamOptions& options);
    const AdamOptions& options() const { return options_; }

private:
    void update(size_t i, Tensor& value, const Tensor& grad) override;

    AdamOptions options_;
};

// The parameters whose group is one of `groups`.
std::vector<NamedParameter> select_params(const std::vector<NamedParameter>& params,
                                          std::initializer_list<ParamGroup> groups);

}  // namespace hfq
