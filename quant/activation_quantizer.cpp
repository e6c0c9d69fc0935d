#include "quant/activation_quantizer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "engine/check.h"

namespace hfq::quant {

ActivationQuantizer::ActivationQuantizer(int bits, ExponentRounding rounding, float min_init_scale)
    : grid_(make_grid(bits, /*is_signed=*/false, "activation quantizer")),
      rounding_(rounding),
      min_init_scale_(min_init_scale),
      e_(Tensor::zeros({1}), true) {
    HFQ_CHECK(min_init_scale > 0, "activation quantizer: min_init_scale must be > 0, got ", min_init_scale);
    register_parameter("log2_scale", &e_, ParamGroup::quantizer);
    register_buffer("exponent", &exponent_);
    register_buffer("step", &step_);
    register_buffer("initialized", &initialized_);
}

std::string ActivationQuantizer::describe() const {
    return cat("learnable-po2 activations, ", grid_.bits, " bits unsigned, ", exponent_rounding_name(rounding_));
}

int ActivationQuantizer::choose_exponent(const float* x, int64_t n, float e) {
    HFQ_CHECK(std::isfinite(e) && std::fabs(e) < 120, "activation quantizer: the log2-scale e is ", e,
              ", outside the float range of a scale (did training diverge?)");
    if (rounding_ == ExponentRounding::ceil) return int(std::ceil(e));
    if (rounding_ == ExponentRounding::rint) return int(std::nearbyint(e));
    if (std::floor(e) == std::ceil(e)) return int(e);  // nothing to choose: skip the mask
    // Round-to-Lower-MSQE with w = 1[|x| <= 2^e (qp + 0.5)] (no second moments:
    // an activation has no per-element state).
    const double limit = std::exp2(double(e)) * (grid_.qp + 0.5);
    mask_.resize(n);
    group_element_weights(x, nullptr, false, limit, n, mask_.data());
    return msqe_rounded_exponent(x, mask_.data(), n, e, grid_);
}

Variable ActivationQuantizer::forward(const Variable& input) {
    const Tensor& v = input.value();
    HFQ_CHECK(v.dtype() == DType::f32 && v.numel() > 0, "activation quantizer: needs a non-empty f32 input, got ",
              shape_str(v.shape()));
    const int64_t n = v.numel();
    // The unsigned grid sees ReLU(x) (a no-op after ReLU / ReLU6).
    const float* pv = v.f32();
    HFQ_CHECK(count_non_finite(pv, n) == 0, "activation quantizer: the input contains NaN or infinity");
    Tensor x = Tensor::empty(v.shape());
    float* px = x.f32();
    for_each_chunk(n, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) px[i] = std::max(pv[i], 0.0f);
    });
    const bool training = is_training();
    int k;
    if (training || !initialized()) {
        float e = e_.value().f32()[0];
        if (!initialized()) {
            e = float(std::log2(std::max(3.0 * population_std(x.f32(), n) / grid_.qp, double(min_init_scale_))));
            if (training) e_.value().f32()[0] = e;
        }
        k = choose_exponent(x.f32(), n, e);
    } else {
        k = exponent();
    }
    const float s = exp2_scale(k);

    Tensor y = Tensor::empty(v.shape());
    const PassStats stats = quantize_group(x.f32(), y.f32(), nullptr, false, n, s, s, grid_, Rounding::half_even);
    if (training) {
        flips_ += have_pass_ && k != last_exponent_;
        last_exponent_ = k;
        last_error_ = stats.error / double(n);
        last_clipped_ = double(stats.clipped) / double(n);
        have_pass_ = true;
        exponent_.data<int32_t>()[0] = k;
        step_.data<int64_t>()[0] += 1;
        initialized_.data<int32_t>()[0] = 1;
    }

    const Variable e_param = e_;
    return make_result(
        y, "activation_quantize", {input, e_param}, [input, e_param, x, s, n, g = grid_](const Tensor& dy) {
            Tensor dx = input.requires_grad() ? Tensor::empty(dy.shape()) : Tensor();
            BackwardGroup bg;
            bg.x = x.f32();
            bg.grad = dy.f32();
            bg.dx = dx.defined() ? dx.f32() : nullptr;
            bg.want_scale_sum = e_param.requires_grad();
            const double sum = backward_group(bg, n, s, g);
            if (dx.defined()) input.accumulate_grad(dx);
            if (e_param.requires_grad())
                e_param.accumulate_grad(Tensor::full({1}, float(double(s) * std::log(2.0) * sum)));  // ds/de = s ln 2
        });
}

QuantizerDiagnostics ActivationQuantizer::report() {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    QuantizerDiagnostics d;
    d.method = "learnable-po2 (activations)";
    d.step = step();
    if (have_pass_) {
        d.exponents = {last_exponent_};
        d.scales = {exp2_scale(last_exponent_)};
    }
    d.continuous_exponents = {e_.value().f32()[0]};
    d.flips_per_group = {flips_};
    d.flips = flips_;
    d.error_per_element = have_pass_ ? last_error_ : nan;
    d.clipped_fraction = have_pass_ ? last_clipped_ : nan;
    d.codes_changed_fraction = nan;
    flips_ = 0;
    return d;
}

void ActivationQuantizer::reset_diagnostics() {
    have_pass_ = false;
    flips_ = 0;
}

QuantizedActivation::QuantizedActivation(std::shared_ptr<Module> activation,
                                         std::shared_ptr<ActivationQuantizer> quantizer)
    : activation_(std::move(activation)), quantizer_(std::move(quantizer)) {
    HFQ_CHECK(activation_ != nullptr && quantizer_ != nullptr, "QuantizedActivation: null activation or quantizer");
    const bool training = activation_->is_training();
    register_inline(activation_);
    register_module("activation_quantizer", quantizer_);
    train(training);
}

}  // namespace hfq::quant
