#include "quant/activation_quantizer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "engine/check.h"
#include "engine/replicas.h"
#include "layers/pooling.h"
#include "quant/accumulator.h"

namespace hfq::quant {

namespace {

// sum of term(i) over i in [0, n), in grid.h's summation order, exactly as
// grid.cpp's population_std adds: chunks of kChunk in chunk order, inside a
// chunk element i on lane i % 8 (the tail from lane 0 on), lanes added in
// order. The same arithmetic, so that without replicas activation_std is
// bit for bit population_std.
template <class Term>
double lane_sum(int64_t n, Term term) {
    constexpr int kLanes = 8;
    struct Sum {
        double value = 0;
        Sum& operator+=(const Sum& o) {
            value += o.value;
            return *this;
        }
    };
    auto chunk = [&](int64_t begin, int64_t end) {
        double lanes[kLanes] = {};
        int64_t i = begin;
        for (; i + kLanes <= end; i += kLanes)
            for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += term(i + lane);
        for (int lane = 0; i < end; ++i, ++lane) lanes[lane] += term(i);
        double s = lanes[0];
        for (int lane = 1; lane < kLanes; ++lane) s += lanes[lane];
        return Sum{s};
    };
    return reduce_chunks<Sum>(n, chunk).value;
}

}  // namespace

double activation_std(const float* x, int64_t n, bool across_replicas) {
    double sum_and_count[2] = {lane_sum(n, [x](int64_t i) { return double(x[i]); }), double(n)};
    if (across_replicas) replicas::sum(sum_and_count, 2);
    const double mean = sum_and_count[0] / sum_and_count[1];
    double squares = lane_sum(n, [x, mean](int64_t i) {
        const double d = x[i] - mean;
        return d * d;
    });
    if (across_replicas) replicas::sum(&squares, 1);
    return std::sqrt(squares / sum_and_count[1]);
}

ActivationQuantizer::ActivationQuantizer(int bits, ExponentRounding rounding, float min_init_scale, bool is_signed)
    : grid_(make_grid(bits, is_signed, "activation quantizer")),
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
    return cat("learnable-po2 activations, ", grid_.bits, " bits ", grid_.is_signed ? "signed, " : "unsigned, ",
               exponent_rounding_name(rounding_));
}

int ActivationQuantizer::choose_exponent(const float* x, int64_t n, float e, bool across_replicas) {
    HFQ_CHECK(std::isfinite(e) && std::fabs(e) < 120, "activation quantizer: the log2-scale e is ", e,
              ", outside the float range of a scale (did training diverge?)");
    if (rounding_ == ExponentRounding::ceil) return int(std::ceil(e));
    if (rounding_ == ExponentRounding::rint) return int(std::nearbyint(e));
    const int lo = int(std::floor(e)), hi = int(std::ceil(e));
    if (lo == hi) return hi;  // nothing to choose: skip the mask
    // Round-to-Lower-MSQE with w = 1[|x| <= 2^e (qp + 0.5)] (no second moments:
    // an activation has no per-element state), as msqe_rounded_exponent
    // (grid.cpp) but with E(2^lo) and E(2^hi) summed over the replicas before
    // they are compared, so that every replica picks the whole batch's k.
    const double limit = std::exp2(double(e)) * (grid_.qp + 0.5);
    mask_.resize(n);
    group_element_weights(x, nullptr, false, limit, n, mask_.data());
    const float scales[2] = {exp2_scale(lo), exp2_scale(hi)};
    double errors[2];
    weighted_errors(x, mask_.data(), n, scales, 2, grid_, errors);
    if (across_replicas) replicas::sum(errors, 2);
    return errors[0] < errors[1] ? lo : hi;  // ties go to ceil
}

Variable ActivationQuantizer::forward(const Variable& input) {
    const Tensor& v = input.value();
    HFQ_CHECK(v.dtype() == DType::f32 && v.numel() > 0, "activation quantizer: needs a non-empty f32 input, got ",
              shape_str(v.shape()));
    const int64_t n = v.numel();
    // The unsigned grid sees ReLU(x) (a no-op after ReLU / ReLU6), the signed one x.
    const float* pv = v.f32();
    HFQ_CHECK(count_non_finite(pv, n) == 0, "activation quantizer: the input contains NaN or infinity");
    Tensor x = v;
    if (!grid_.is_signed) {
        x = Tensor::empty(v.shape());
        float* px = x.f32();
        for_each_chunk(n, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) px[i] = std::max(pv[i], 0.0f);
        });
    }
    const bool training = is_training();
    // A data-parallel training step chooses on the whole batch, every
    // replica's share (replicas::active(), with or without sync batch norm):
    // every replica then holds the same e and k, as one process on the whole
    // batch would. Evaluation stays on this replica's data: it stores
    // nothing, and the replicas need not evaluate in step.
    const bool across_replicas = training && replicas::active();
    int k;
    if (training || !initialized()) {
        float e = e_.value().f32()[0];
        if (!initialized()) {
            e = float(std::log2(
                std::max(3.0 * activation_std(x.f32(), n, across_replicas) / grid_.qp, double(min_init_scale_))));
            if (training) e_.value().f32()[0] = e;
        }
        k = choose_exponent(x.f32(), n, e, across_replicas);
    } else {
        k = exponent();
    }
    last_forward_exponent_ = k;
    const float s = exp2_scale(k);

    Tensor y = Tensor::empty(v.shape());
    const PassStats stats = quantize_group(x.f32(), y.f32(), nullptr, false, n, s, s, grid_, Rounding::half_even);
    if (training) {
        // The diagnostics (error, clipped fraction) are this replica's own.
        flips_ += have_pass_ && k != last_exponent_;
        last_exponent_ = k;
        last_error_ = stats.error / double(n);
        last_clipped_ = double(stats.clipped) / double(n);
        have_pass_ = true;
        exponent_.data<int32_t>()[0] = k;
        step_.data<int64_t>()[0] += 1;
        initialized_.data<int32_t>()[0] = 1;
    }

    if (observer_) observer_(y);
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

void ActivationEnds::set_input_quantizer(std::shared_ptr<ActivationQuantizer> q) {
    HFQ_CHECK(q && !input_quantizer_, "set_input_quantizer: null, or set twice");
    input_quantizer_ = std::move(q);
    input_quantizer_->train(is_training());
    register_module(kInputName, input_quantizer_);
    input_grid_ = input_quantizer_.get();
}

void ActivationEnds::set_output_quantizer(std::shared_ptr<ActivationQuantizer> q) {
    HFQ_CHECK(q && !output_quantizer_, "set_output_quantizer: null, or set twice");
    output_quantizer_ = std::move(q);
    output_quantizer_->train(is_training());
    register_module(kOutputName, output_quantizer_);
}

Variable ActivationEnds::quantize_input(const Variable& x) {
    return input_quantizer_ && !bypassed_ ? (*input_quantizer_)(x) : x;
}
Variable ActivationEnds::quantize_output(const Variable& y) {
    return output_quantizer_ && !bypassed_ ? (*output_quantizer_)(y) : y;
}

Variable QuantizedActivation::forward(const Variable& x) {
    if (dynamic_cast<GlobalAvgPool*>(activation_.get())) return (*quantizer_)(exact_global_mean(x));
    return (*quantizer_)((*activation_)(x));
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
