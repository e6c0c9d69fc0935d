#include "layers/mobilenet_v2.h"

#include <algorithm>
#include <cmath>

#include "engine/check.h"
#include "engine/ops.h"
#include "layers/activation.h"
#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "layers/linear.h"
#include "layers/pooling.h"

namespace hfq {
namespace {

// Expansion t, output channels c, repeats n, stride s of the first repeat
// (torchvision's inverted_residual_setting).
struct Stage {
    int t, c, n, s;
};
constexpr Stage kStages[] = {{1, 16, 1, 1}, {6, 24, 2, 2},  {6, 32, 3, 2}, {6, 64, 4, 2},
                             {6, 96, 3, 1}, {6, 160, 3, 2}, {6, 320, 1, 1}};

}  // namespace

InvertedResidual::InvertedResidual(int in_channels, int out_channels, int stride, int expand_ratio)
    : use_residual_(stride == 1 && in_channels == out_channels) {
    HFQ_CHECK(stride == 1 || stride == 2, "InvertedResidual: stride must be 1 or 2, got ", stride);
    const int hidden = static_cast<int>(std::lround(double(in_channels) * expand_ratio));
    auto conv = std::make_shared<Sequential>();
    if (expand_ratio != 1) conv->add(conv_bn_act(in_channels, hidden, 1, 1, 1, Activation::relu6));
    conv->add(conv_bn_act(hidden, hidden, 3, stride, hidden, Activation::relu6));
    conv->add(Conv2d::pointwise(hidden, out_channels));
    conv->add(std::make_shared<BatchNorm2d>(out_channels));
    register_module("conv", conv);
}

Variable InvertedResidual::forward(const Variable& x) {
    Variable y = (*child("conv"))(x);
    if (!use_residual_) return y;
    y = add(x, y);
    return after_add_ ? (*after_add_)(y) : y;
}

void InvertedResidual::set_after_add(const std::string& name, std::shared_ptr<Module> m) {
    HFQ_CHECK(use_residual_ && m && !after_add_, "InvertedResidual::set_after_add: ",
              use_residual_ ? "null, or set twice" : "the block has no residual sum");
    after_add_ = std::move(m);
    after_add_->train(is_training());
    register_module(name, after_add_);
}

int MobileNetV2::make_divisible(double v, int divisor) {
    int rounded = std::max(divisor, static_cast<int>(v + divisor / 2.0) / divisor * divisor);
    if (rounded < 0.9 * v) rounded += divisor;
    return rounded;
}

MobileNetV2::MobileNetV2(const ModelConfig& config) : Model(config) {
    HFQ_CHECK(config.arch == Arch::mobilenet_v2, "MobileNetV2: config is for ", arch_name(config.arch));
    HFQ_CHECK(config.activation == Activation::relu6, "MobileNetV2: uses ReLU6 throughout");
    const double a = config.width;
    int in = make_divisible(32 * a);
    const int last_channel = make_divisible(1280 * std::max(1.0, a));

    // The small-input variant runs the stem and the first stride-2 stage
    // (24 channels) at stride 1: total stride 8 instead of 32, so a 32x32
    // input ends at 4x4 (as the CIFAR adaptation of kuangliu/pytorch-cifar).
    auto features = std::make_shared<Sequential>();
    features->add(conv_bn_act(config.input_channels, in, 3, config.small_input ? 1 : 2, 1, Activation::relu6));
    for (size_t k = 0; k < std::size(kStages); ++k) {
        const Stage& st = kStages[k];
        const int out = make_divisible(st.c * a);
        const int first_stride = (config.small_input && k == 1) ? 1 : st.s;
        for (int i = 0; i < st.n; ++i) {
            features->add(std::make_shared<InvertedResidual>(in, out, i == 0 ? first_stride : 1, st.t));
            in = out;
        }
    }
    features->add(conv_bn_act(in, last_channel, 1, 1, 1, Activation::relu6));
    register_module("features", features);
    register_module("pool", std::make_shared<GlobalAvgPool>());
    auto classifier = std::make_shared<Sequential>();
    classifier->add(std::make_shared<Dropout>(static_cast<float>(config.effective_dropout())));
    classifier->add(std::make_shared<Linear>(last_channel, config.classes));
    register_module("classifier", classifier);
}

Variable MobileNetV2::forward(const Variable& x) {
    HFQ_CHECK(x.value().rank() == 4 && x.shape()[3] == config().input_channels,
              "MobileNetV2: expected input {N, H, W, ", config().input_channels, "} (NHWC), got ",
              shape_str(x.shape()));
    // features, pool, classifier in order (see MobileNetV1::forward).
    Variable y = x;
    for (const Child& c : children()) y = (*c.module)(y);
    return y;
}

}  // namespace hfq
