// 2-D convolution layer: weight {out, in/groups, k, k} (PyTorch's OIHW),
// optional bias {out}; activations NHWC.
#pragma once
#include <memory>

#include "engine/ops.h"
#include "layers/module.h"

namespace hfq {

struct Conv2dConfig {
    int in_channels = 0;
    int out_channels = 0;
    int kernel = 1;       // square kernel
    Conv2dParams params;  // stride, padding (symmetric or SAME), groups
    bool bias = false;
};

class Conv2d : public Module {
public:
    explicit Conv2d(const Conv2dConfig& config);

    // PyTorch-style construction with padding kernel / 2 (the output keeps
    // the input size at stride 1, as in torchvision's MobileNets).
    static std::shared_ptr<Conv2d> make(int in_channels, int out_channels, int kernel, int stride = 1, int groups = 1,
                                        bool bias = false);
    // Depthwise: one k x k filter per channel (groups = channels).
    static std::shared_ptr<Conv2d> depthwise(int channels, int kernel = 3, int stride = 1, bool bias = false);
    // Pointwise: 1 x 1, mixes channels.
    static std::shared_ptr<Conv2d> pointwise(int in_channels, int out_channels, bool bias = false);

    Variable forward(const Variable& x) override { return apply(x, weight_); }
    // The convolution with `weight` in place of this layer's own weight (same
    // shape; e.g. its quantized version) and this layer's bias and config.
    // forward() is apply(x, weight()).
    Variable apply(const Variable& x, const Variable& weight) const;

    const Conv2dConfig& config() const { return config_; }
    bool is_depthwise() const;
    Variable& weight() { return weight_; }
    Variable& bias() { return bias_; }  // undefined without bias

    std::string type_name() const override { return "Conv2d"; }
    std::string describe() const override;
    int64_t macs(const Shape& input, const Shape& output) const override;

protected:
    void reset_parameters(Rng& rng) override;  // kaiming normal (fan out), zero bias

private:
    Conv2dConfig config_;
    Variable weight_;
    Variable bias_;
};

}  // namespace hfq
