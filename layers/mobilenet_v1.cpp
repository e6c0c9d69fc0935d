#include "layers/mobilenet_v1.h"

#include <algorithm>

#include "engine/check.h"
#include "layers/activation.h"
#include "layers/linear.h"
#include "layers/pooling.h"

namespace hfq {
namespace {

// (output channels, stride) of the 13 depthwise-separable blocks (Table 1).
constexpr int kBlocks[13][2] = {{64, 1},  {128, 2}, {128, 1}, {256, 2}, {256, 1},  {512, 2}, {512, 1},
                                {512, 1}, {512, 1}, {512, 1}, {512, 1}, {1024, 2}, {1024, 1}};

}  // namespace

int MobileNetV1::channels(int c, double width) { return std::max(static_cast<int>(c * width), 8); }

MobileNetV1::MobileNetV1(const ModelConfig& config) : Model(config) {
    HFQ_CHECK(config.arch == Arch::mobilenet_v1, "MobileNetV1: config is for ", arch_name(config.arch));
    const double a = config.width;
    auto features = std::make_shared<Sequential>();
    int in = channels(32, a);
    // The small-input variant keeps full resolution in the stem (total
    // stride 16: 32x32 ends at 2x2, 64x64 at 4x4).
    features->add(conv_bn_act(config.input_channels, in, 3, config.small_input ? 1 : 2, 1, config.activation));
    for (const auto& [c, stride] : kBlocks) {
        const int out = channels(c, a);
        features->add(conv_bn_act(in, in, 3, stride, in, config.activation));  // depthwise
        features->add(conv_bn_act(in, out, 1, 1, 1, config.activation));       // pointwise
        in = out;
    }
    register_module("features", features);
    register_module("pool", std::make_shared<GlobalAvgPool>());
    if (config.effective_dropout() > 0)
        register_module("dropout", std::make_shared<Dropout>(static_cast<float>(config.effective_dropout())));
    register_module("classifier", std::make_shared<Linear>(in, config.classes));
}

Variable MobileNetV1::forward(const Variable& x) {
    HFQ_CHECK(x.value().rank() == 4 && x.shape()[3] == config().input_channels,
              "MobileNetV1: expected input {N, H, W, ", config().input_channels, "} (NHWC), got ",
              shape_str(x.shape()));
    // The children in order: features, pool, [dropout,] classifier. Walking
    // the list (rather than keeping pointers) means a layer swapped in by
    // replace_child() - a quantized wrapper - is the one that runs.
    Variable y = x;
    for (const Child& c : children()) y = (*c.module)(y);
    return y;
}

}  // namespace hfq
