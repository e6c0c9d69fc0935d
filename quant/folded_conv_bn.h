// A convolution with its following batch norm folded in (docs/quantizers.md, 6),
// weights fake-quantized: what a fixed-point accelerator runs is one integer
// weight tensor, one power-of-two exponent (per tensor or channel) and one
// float bias.
//
// With sigma_ema = sqrt(var_ema + eps) per output channel c:
//   W_fold = W * gamma / sigma_ema                        {O, I/g, k, k}
//   b_fold = beta - gamma * mu_ema / sigma_ema            {O}
//
// Training with batch statistics (the first freeze_bn_step steps, until
// frozen), as Jacob et al. 2018 and TensorFlow's fold_batch_norms: the float
// convolution y_f = conv(x, W) gives the batch statistics mu_B, var_B
// (sigma_B = sqrt(var_B + eps)), and
//   y = conv(x, Q(W_fold)) * sigma_ema / sigma_B + beta - gamma * mu_B / sigma_B,
// which is exactly batch norm of the float convolution when Q is the identity.
// Gradients flow to W (through Q's straight-through estimator and through the
// batch statistics), gamma, beta and the quantizer's scale. The moving
// statistics are updated as PyTorch's BatchNorm2d does (momentum, unbiased
// variance, num_batches_tracked + 1), after W_fold was formed with the values
// they had at the start of the step.
//
// Or, with BnStats::quantized_conv, as PyTorch's ConvBn2d: one
// convolution, whose output rescaled to the float convolution's units gives
// the statistics. U = Q(W_fold) * sigma_ema / gamma (unfold_weight), and
//   y = batch_norm(conv(x, U))   (batch statistics, moving-statistics update)
// which is the formula above with mu_B, var_B taken from conv(x, U) instead
// of conv(x, W), and again batch norm of the float convolution when Q is the
// identity. Half the convolution work of the float-convolution form; the
// statistics then include the quantization error.
//
// Training once frozen, evaluation and export use the moving statistics:
//   y = conv(x, Q(W_fold)) + b_fold
// with no correction and no statistics update. In a W4A8 model (an input
// grid set, quant/activation_quantizer.h ActivationEnds) b_fold is added on
// the accumulator grid (quant/accumulator.h); with batch statistics there is
// no fixed bias to quantize (the correction is per batch), so a W4A8 run
// should freeze batch norm for its last steps (--freeze-bn-step) to train
// the graph the integer engine runs.
//
// Names: the pair sits inline in its parent at the place of the convolution
// and the batch norm and keeps their names: "<conv>.weight" (the float W),
// "<conv>.weight_quantizer.*", "<bn>.weight", "<bn>.running_mean", ... plus
// the freeze flag "bn_frozen_<conv child name>" (s32 {1}), so a checkpoint
// restores it.
#pragma once
#include <memory>
#include <string>

#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "quant/quantized_layers.h"

namespace hfq::quant {

// Where the batch statistics of a folded layer come from while in use.
enum class BnStats {
    float_conv,      // "float-conv": a second, float convolution conv(x, W) (Jacob et al.)
    quantized_conv,  // "quantized-conv": conv(x, Q(W_fold) * sigma_ema / gamma) (PyTorch's ConvBn2d)
};
BnStats parse_bn_stats(const std::string& name);  // throws naming the choices
const char* bn_stats_name(BnStats s);

// U = Q(W_fold) * sigma_ema / gamma per output channel (|gamma| below 1e-12
// counts as 1e-12 of its sign), differentiable in Q(W_fold) and gamma.
Variable unfold_weight(const Variable& w_q, const Variable& gamma, const Tensor& running_var, float eps);

class FoldedConvBn : public QuantizedModule {
public:
    // conv (without bias) and bn are the children `conv_name` and `bn_name`
    // of the parent this module replaces them in; the quantizer is made for
    // the convolution's weight shape. freeze_bn_step: the number of
    // training steps that use batch statistics (-1: until freeze()).
    FoldedConvBn(std::shared_ptr<Conv2d> conv, std::string conv_name, std::shared_ptr<BatchNorm2d> bn,
                 std::string bn_name, std::unique_ptr<Quantizer> quantizer, int64_t freeze_bn_step = -1,
                 BnStats bn_stats = BnStats::float_conv);

    Variable forward(const Variable& x) override;
    // relu6(forward(x)); with quantized-conv statistics in use, batch norm and
    // ReLU6 run as one op (engine batch_norm_relu6).
    bool fuses_relu6() const override { return true; }
    Variable forward_relu6(const Variable& x) override;

    // Batch statistics in use (training, not frozen, fewer steps than freeze_bn_step)?
    bool uses_batch_statistics() const;
    void freeze(bool frozen = true);
    bool frozen_by_hand() const { return frozen_.data<int32_t>()[0] != 0; }
    int64_t freeze_bn_step() const { return freeze_bn_step_; }

    // W_fold and b_fold from the current moving statistics, as Variables
    // (differentiable in W, gamma, beta). What forward, export and audit share.
    Variable folded_weight();
    Variable folded_bias();

    Conv2d& conv() { return quantized_conv_->layer(); }
    BatchNorm2d& bn() { return *bn_; }
    const std::string& bn_name() const { return bn_name_; }
    WeightQuantizer& weight_quantizer() override { return quantized_conv_->weight_quantizer(); }
    std::string kind() const override { return "conv+bn (folded)"; }
    std::string layer_name() const override { return conv_name_; }
    std::string type_name() const override { return "FoldedConvBn"; }
    std::string describe() const override;
    int64_t macs(const Shape& input, const Shape& output) const override;

private:
    Variable run(const Variable& x, bool with_relu6);

    std::shared_ptr<QuantizedConv2d> quantized_conv_;  // conv inline + its weight quantizer
    std::shared_ptr<BatchNorm2d> bn_;
    std::string conv_name_, bn_name_;
    int64_t freeze_bn_step_;
    BnStats bn_stats_;
    Tensor frozen_ = Tensor::zeros({1}, DType::s32);
    Tensor* num_batches_tracked_ = nullptr;  // the bn's buffer
};

// The pieces of the folded computation, as differentiable ops (exposed for
// tests). inv_sigma = 1 / sqrt(var + eps) per channel, computed in double.
//   fold_weight:  W {O, ...}, gamma {O}          -> W * gamma * inv_sigma(var_ema)
//   fold_bias:    gamma, beta {O}                 -> beta - gamma * mu_ema * inv_sigma(var_ema)
Variable fold_weight(const Variable& weight, const Variable& gamma, const Tensor& running_var, float eps);
Variable fold_bias(const Variable& gamma, const Variable& beta, const Tensor& running_mean, const Tensor& running_var,
                   float eps);
// The training-time correction with batch statistics (y_q, y_f {N,H,W,C}):
//   mu_B, var_B = per-channel mean and biased variance of y_f
//   y = y_q * sigma_ema / sigma_B + beta - gamma * mu_B / sigma_B
// differentiable in y_q, y_f, gamma and beta; sigma_ema comes from
// running_var as it is on entry (the moving variance W_fold was formed with),
// then running_mean and running_var are updated with PyTorch's rule
// (unbiased variance). Sums run in double over fixed row blocks combined in
// order: the result does not depend on the thread count. With sync batch norm
// (engine/replicas.h) mu_B and var_B are those of every replica's y_f, and
// y_f's gradient through them takes every replica's dy; gamma's and beta's
// gradients stay this replica's (the trainer averages them over replicas).
Variable batch_stat_correction(const Variable& y_q, const Variable& y_f, const Variable& gamma, const Variable& beta,
                               Tensor& running_mean, Tensor& running_var, float momentum, float eps);

}  // namespace hfq::quant
