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
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "layers/optimizer.h"

namespace hfq {

struct AdamOptions {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 0.0f;  // applied to every parameter given (select them by group)
};

class Adam : public Optimizer {
public:
    Adam(std::vector<NamedParameter> params, const AdamOptions& options);
    void step() override;
    const AdamOptions& options() const { return options_; }
    std::vector<std::pair<std::string, Tensor>> state() const override;
    void load_state(const std::vector<std::pair<std::string, Tensor>>& state) override;

private:
    struct Moments {
        Tensor exp_avg, exp_avg_sq;                      // undefined until the first step
        Tensor step = Tensor::zeros({1}, DType::s64);    // updates so far
    };
    AdamOptions options_;
    std::vector<Moments> moments_;  // per parameter
};

}  // namespace hfq
