#include "quant/lsq.h"

#include <algorithm>
#include <cmath>

#include "engine/check.h"

namespace hfq::quant {

LsqQuantizer::LsqQuantizer(const QuantizerOptions& options, const Shape& weight_shape)
    : Quantizer("lsq", options, weight_shape), s_(Tensor::zeros({groups_.count}), true) {}

Quantizer::ScaleChoice LsqQuantizer::choose_scales(const Tensor& x, bool training) {
    ScaleChoice choice;
    choice.scale = s_.value().to_vector();
    if (!initialized()) {
        const float* px = x.f32();
        const int64_t n = groups_.size;
        for_each_group(groups_, [&](int64_t gi) {
            double sum_abs = 0;
            for (int64_t i = gi * n, end = i + n; i < end; ++i) sum_abs += std::fabs(px[i]);
            const double s = 2.0 * (sum_abs / double(n)) / std::sqrt(double(grid_.qp));
            // An all-zero group would give s = 0 and no grid at all: floor it.
            choice.scale[gi] = float(std::max(s, double(options_.min_init_scale)));
        });
        if (training) std::copy(choice.scale.begin(), choice.scale.end(), s_.value().f32());
    }
    for (int64_t gi = 0; gi < groups_.count; ++gi)
        HFQ_CHECK(std::isfinite(choice.scale[gi]) && choice.scale[gi] > 0, who(), ": the scale of group ", gi, " is ",
                  choice.scale[gi], "; it must be positive and finite (did training diverge?)");
    return choice;
}

double LsqQuantizer::scale_gradient_factor(int64_t, float) const {
    return 1.0 / std::sqrt(double(groups_.size) * grid_.qp);
}

}  // namespace hfq::quant
