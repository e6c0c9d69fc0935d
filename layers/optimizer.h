// Optimizers. An optimizer updates a list of named parameters from their
// gradients; which parameters it gets is the caller's choice (select_params
// by group), so e.g. SGD can train weights, biases and batch norm while Adam
// trains quantizer parameters.
#pragma once
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "layers/module.h"

namespace hfq {

class Optimizer {
public:
    Optimizer(std::vector<NamedParameter> params, float lr);
    virtual ~Optimizer() = default;

    // One update from the current gradients. Parameters without a gradient
    // (not reached by backward) are left alone, state included, as PyTorch.
    virtual void step() = 0;
    // Forgets the gradients of this optimizer's parameters.
    void zero_grad();

    float lr() const { return lr_; }
    void set_lr(float lr);  // learning-rate schedules
    const std::vector<NamedParameter>& params() const { return params_; }

    // The optimizer's state as named tensors "<parameter name>.<state name>"
    // (sharing memory), to be saved with a training checkpoint, and restored
    // by load_state. Tensors not yet created (before the first step) are
    // absent; load_state checks names and shapes and rejects unknown names.
    virtual std::vector<std::pair<std::string, Tensor>> state() const = 0;
    virtual void load_state(const std::vector<std::pair<std::string, Tensor>>& state) = 0;

protected:
    std::vector<NamedParameter> params_;
    float lr_;
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
// State: "<name>.momentum_buffer".
class SGD : public Optimizer {
public:
    SGD(std::vector<NamedParameter> params, const SgdOptions& options);
    void step() override;
    const SgdOptions& options() const { return options_; }
    std::vector<std::pair<std::string, Tensor>> state() const override;
    void load_state(const std::vector<std::pair<std::string, Tensor>>& state) override;

private:
    SgdOptions options_;
    std::vector<float> decay_;      // per parameter: weight_decay or 0
    std::vector<Tensor> momentum_;  // per parameter; undefined until its first step
};

// The parameters whose group is one of `groups`.
std::vector<NamedParameter> select_params(const std::vector<NamedParameter>& params,
                                          std::initializer_list<ParamGroup> groups);

}  // namespace hfq
