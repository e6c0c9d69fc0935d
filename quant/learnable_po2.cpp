#include "quant/learnable_po2.h"

#include <algorithm>
#include <cmath>

#include "engine/check.h"

namespace hfq::quant {

LearnablePo2Quantizer::LearnablePo2Quantizer(const QuantizerOptions& options, const Shape& weight_shape)
    : Quantizer("learnable-po2", options, weight_shape), e_(Tensor::zeros({groups_.count}), true) {
    if (options.second_moments) second_moments_ = Tensor::full(weight_shape, 1.0f);
}

Quantizer::ScaleChoice LearnablePo2Quantizer::choose_scales(const Tensor& x, bool training) {
    const float* px = x.f32();
    const int64_t n = groups_.size;

    // The continuous exponents: the parameter, or its first-call initialisation
    // (stored when training, only used when evaluating a quantizer never trained).
    std::vector<float> e = e_.value().to_vector();
    if (!initialized()) {
        for_each_group(groups_, [&](int64_t gi) {
            const double s = 3.0 * population_std(px + gi * n, n) / grid_.qp;
            e[gi] = float(std::log2(std::max(s, double(options_.min_init_scale))));
        });
        if (training) std::copy(e.begin(), e.end(), e_.value().f32());
    }
    for (int64_t gi = 0; gi < groups_.count; ++gi)
        HFQ_CHECK(std::isfinite(e[gi]) && std::fabs(e[gi]) < 120, who(), ": the log2-scale e of scale group ", gi,
                  " is ", e[gi], ", outside the float range of a scale (did training diverge?)");

    ScaleChoice choice;
    choice.exponent.resize(groups_.count);
    const ExponentRounding mode = options_.rounding;
    if (mode == ExponentRounding::msqe_round) {
        // w = sqrt(M) * 1[|x| <= 2^e (qp + 0.5)], e continuous: the grid's range.
        std::vector<double> thresholds(groups_.count);
        for (int64_t gi = 0; gi < groups_.count; ++gi) thresholds[gi] = std::exp2(double(e[gi])) * (grid_.qp + 0.5);
        const float* w = element_weights(x, options_.outlier_mask ? &thresholds : nullptr);
        for_each_group(groups_, [&](int64_t gi) {
            choice.exponent[gi] = msqe_rounded_exponent(px + gi * n, w ? w + gi * n : nullptr, n, e[gi], grid_);
        });
    } else {
        for (int64_t gi = 0; gi < groups_.count; ++gi)
            choice.exponent[gi] = int(mode == ExponentRounding::ceil ? std::ceil(e[gi]) : std::nearbyint(e[gi]));
    }
    for (int k : choice.exponent) choice.scale.push_back(exp2_scale(k));
    return choice;
}

double LearnablePo2Quantizer::scale_gradient_factor(int64_t, float scale) const {
    return double(scale) * std::log(2.0);  // ds/de = s ln 2
}

void LearnablePo2Quantizer::describe(QuantizerDiagnostics& d) const { d.continuous_exponents = e_.value().to_vector(); }

}  // namespace hfq::quant
