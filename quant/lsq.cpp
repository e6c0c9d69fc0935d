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
    // The scale is a positive quantity, but a step of the scale's optimizer
    // (Adam: about its learning rate, whatever the gradient's size) can carry
    // a tiny scale (a near-dead channel) past zero. Project it back onto
    // s >= min_init_scale, as torch.ao's learnable fake-quantize clamps its
    // scale to eps; in training the parameter itself is set, so the next
    // optimizer step starts from the projected value.
    const float floor = options_.min_init_scale;
    for (int64_t gi = 0; gi < groups_.count; ++gi) {
        HFQ_CHECK(std::isfinite(choice.scale[gi]), who(), ": the scale of group ", gi, " is ", choice.scale[gi],
                  "; it must be finite (did training diverge?)");
        if (choice.scale[gi] < floor) {
            choice.scale[gi] = floor;
            if (training) s_.value().f32()[gi] = floor;
        }
    }
    return choice;
}

double LsqQuantizer::scale_gradient_factor(int64_t, float) const {
    return 1.0 / std::sqrt(double(groups_.size) * grid_.qp);
}

}  // namespace hfq::quant
