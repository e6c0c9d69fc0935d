#include "quant/msqe_baseline.h"

namespace hfq::quant {

MsqeBaselineQuantizer::MsqeBaselineQuantizer(const QuantizerOptions& options, const Shape& weight_shape)
    : Quantizer("msqe-baseline", options, weight_shape) {}

// Per group: s_0 = po2(max|x| / qp); for k = 1..iters: z_k = codes at s_{k-1}
// (half away from zero), s_k = LS(x, z_k, 1). The output is s_iters * z_iters,
// as in the reference: the last codes were rounded at the scale before the
// last least-squares update.
Quantizer::ScaleChoice MsqeBaselineQuantizer::choose_scales(const Tensor& x, bool /*training: stateless*/) {
    ScaleChoice choice;
    choice.exponent.resize(groups_.count);
    std::vector<int> code_exponent(groups_.count);
    const float* px = x.f32();
    const int64_t n = groups_.size;
    for_each_group(groups_, [&](int64_t gi) {
        const float* xg = px + gi * n;
        int e = po2_exponent(double(max_abs(xg, n)) / grid_.qp);
        int previous = e;
        for (int it = 0; it < options_.baseline_iters; ++it) {
            const GroupSums z = group_sums(xg, nullptr, n, exp2_scale(e), grid_, Rounding::half_away);
            previous = e;
            e = least_squares_exponent(z.wqx, z.wqq, n);
        }
        choice.exponent[gi] = e;
        code_exponent[gi] = previous;
    });
    for (int64_t gi = 0; gi < groups_.count; ++gi) {
        choice.scale.push_back(exp2_scale(choice.exponent[gi]));
        choice.code_scale.push_back(exp2_scale(code_exponent[gi]));
    }
    return choice;
}

}  // namespace hfq::quant
