// Batch normalization over the channels of an NHWC activation, with
// PyTorch's semantics and state: parameters weight (gamma) and bias (beta),
// buffers running_mean, running_var and num_batches_tracked (int64, +1 per
// training forward).
#pragma once
#include <typeinfo>

#include "layers/module.h"

namespace hfq {

class BatchNorm2d : public Module {
public:
    explicit BatchNorm2d(int channels, float momentum = 0.1f, float eps = 1e-5f);

    Variable forward(const Variable& x) override;
    // ReLU6(forward(x)) as one op (engine batch_norm_relu6): the same values,
    // gradients and state updates, without keeping the normalised value alive
    // until backward. Exact type only: a subclass runs as itself.
    bool fuses_relu6() const override { return typeid(*this) == typeid(BatchNorm2d); }
    Variable forward_relu6(const Variable& x) override;

    int channels() const { return channels_; }
    float momentum() const { return momentum_; }
    float eps() const { return eps_; }
    Variable& weight() { return weight_; }
    Variable& bias() { return bias_; }
    Tensor& running_mean() { return running_mean_; }
    Tensor& running_var() { return running_var_; }
    int64_t num_batches_tracked() const { return num_batches_tracked_.data<int64_t>()[0]; }

    std::string type_name() const override { return "BatchNorm2d"; }
    std::string describe() const override;

protected:
    // gamma 1, beta 0, running statistics reset (as torchvision).
    void reset_parameters(Rng& rng) override;

private:
    template <class Op>
    Variable apply(Op op, const Variable& x);

    int channels_;
    float momentum_, eps_;
    Variable weight_, bias_;
    Tensor running_mean_, running_var_;
    Tensor num_batches_tracked_;  // int64 scalar (shape [])
};

}  // namespace hfq
