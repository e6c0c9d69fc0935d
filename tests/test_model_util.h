// A small quantized MobileNet after a few training steps: what the export,
// integer-engine, ONNX and mobilenet_predict tests start from, so that batch
// norm's moving statistics, the exponents and the scales are trained values,
// not their initial ones.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/ops.h"
#include "layers/model.h"
#include "layers/optimizer.h"
#include "tests/gradcheck.h"

namespace hfq::testing {

// MobileNet x0.25 for 16x16 inputs (small_input), no dropout.
inline ModelConfig small_model_config(Arch arch, int classes = 5) {
    ModelConfig c;
    c.arch = arch;
    c.width = 0.25;
    c.classes = classes;
    c.small_input = true;
    c.dropout = 0.0;
    return c;
}

// `steps` SGD steps (lr 0.02, momentum 0.9) on the fixed batch x {N, 16, 16, 3}
// with labels 0, 1, 2, ... (modulo the classes), in training mode. The
// quantizers' own parameters train at 1e-4, as a trainer sets them up: slowly
// enough that no lsq scale crosses zero (at 1e-3 one of 0.027 met a gradient
// of 28 and did, or not, with the summation order).
inline void train_steps(Model& model, const Tensor& x, int steps) {
    const auto params = model.named_parameters();
    SGD opt(select_params(params, {ParamGroup::weight, ParamGroup::bias, ParamGroup::bn}), SgdOptions{0.02f, 0.9f});
    SGD opt_scales(select_params(params, {ParamGroup::quantizer}), SgdOptions{1e-4f});
    std::vector<int32_t> labels(static_cast<size_t>(x.dim(0)));
    for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int32_t>(i) % model.config().classes;
    model.train();
    for (int s = 0; s < steps; ++s) {
        opt.zero_grad();
        opt_scales.zero_grad();
        cross_entropy(model(Variable(x)), labels).backward();
        opt.step();
        opt_scales.step();
    }
}

}  // namespace hfq::testing
