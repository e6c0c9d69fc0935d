// MobileNetV2 (Sandler et al. 2018) with torchvision's structure and names,
// so torchvision's weights load unchanged:
//
//   features.0            Sequential(Conv2d 3x3 s2, BatchNorm2d, ReLU6)      stem
//   features.1 .. 17      InvertedResidual, each with a Sequential "conv":
//                           expansion t = 1 (features.1):  conv.0 = dw Conv-BN-ReLU6, conv.1 = 1x1 Conv2d, conv.2 = BN
//                           t = 6:  conv.0 = 1x1 expand Conv-BN-ReLU6, conv.1 = dw Conv-BN-ReLU6,
//                                   conv.2 = 1x1 project Conv2d, conv.3 = BN (linear bottleneck)
//   features.18           Sequential(Conv2d 1x1 -> last_channel, BatchNorm2d, ReLU6)
//   pool                  GlobalAvgPool (torchvision pools functionally; no tensors)
//   classifier.0          Dropout
//   classifier.1          Linear(last_channel, classes)
//
// e.g. features.3.conv.0.0.weight is the expansion conv of block 3.
// Channels: _make_divisible(c * width, 8); last_channel =
// _make_divisible(1280 * max(1, width), 8).
#pragma once
#include "layers/model.h"

namespace hfq {

// Expansion (1x1, if t > 1), depthwise 3x3, linear projection (1x1); the
// input is added back when the shape is unchanged (stride 1, in == out).
class InvertedResidual : public Module {
public:
    InvertedResidual(int in_channels, int out_channels, int stride, int expand_ratio);
    Variable forward(const Variable& x) override;
    bool uses_residual() const { return use_residual_; }
    // A module applied to the residual sum x + conv(x), registered as the
    // child `name` (a W4A8 model's quantizer of the sum: quant/quantize_model.h).
    void set_after_add(const std::string& name, std::shared_ptr<Module> m);
    Module* after_add() const { return after_add_.get(); }
    std::string type_name() const override { return "InvertedResidual"; }

private:
    bool use_residual_;
    std::shared_ptr<Module> after_add_;
};

class MobileNetV2 : public Model {
public:
    explicit MobileNetV2(const ModelConfig& config);
    // x {N, H, W, input_channels} -> logits {N, classes}
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "MobileNetV2"; }

    // torchvision's _make_divisible: v rounded to the nearest multiple of
    // `divisor` (at least divisor), never more than 10% below v.
    static int make_divisible(double v, int divisor = 8);
};

}  // namespace hfq
