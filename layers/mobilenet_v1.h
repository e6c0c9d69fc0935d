// MobileNetV1 (Howard et al. 2017), structured and named like the PyTorch
// model of the speed comparison (docs/speed.md), so state dicts map one to one:
//
//   features.0          Sequential(Conv2d 3x3 s2 -> 32a, BatchNorm2d, act)   stem
//   features.{2i-1}     Sequential(depthwise 3x3 conv, BatchNorm2d, act)     block i = 1..13
//   features.{2i}       Sequential(pointwise 1x1 conv, BatchNorm2d, act)
//   pool                GlobalAvgPool
//   dropout             Dropout (only when the config's dropout > 0)
//   classifier          Linear(1024a, classes)
//
// Tensor names: features.{k}.0.weight (conv), features.{k}.1.{weight, bias,
// running_mean, running_var, num_batches_tracked} (BN), classifier.{weight,
// bias}. Channels are max(int(c * width), 8) (TF-slim's rule).
#pragma once
#include "layers/model.h"

namespace hfq {

class MobileNetV1 : public Model {
public:
    explicit MobileNetV1(const ModelConfig& config);
    // x {N, H, W, input_channels} -> logits {N, classes}
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "MobileNetV1"; }

    // Channels of a layer with nominal width c at multiplier `width`.
    static int channels(int c, double width);
};

}  // namespace hfq
