#include "quant/accumulator.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/check.h"

namespace hfq::quant {

int32_t bias_code(float b, int unit_exponent) {
    HFQ_CHECK(std::isfinite(b), "bias quantization: the bias is ", b);
    const double v = std::nearbyint(std::ldexp(double(b), -unit_exponent));  // exact scaling, then half to even
    constexpr double kMax = std::numeric_limits<int32_t>::max();
    return int32_t(std::clamp(v, -kMax, kMax));
}

std::vector<int> accumulator_weight_exponents(int e_x, std::vector<int> e_w, const Tensor& w_q, const Tensor& bias) {
    const int64_t out = w_q.dim(0), per = w_q.numel() / out, groups = int64_t(e_w.size());
    HFQ_CHECK(groups == 1 || groups == out, "accumulator exponents: ", groups, " groups for ", out, " channels");
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t first = groups == 1 ? 0 : g, last = groups == 1 ? out : g + 1;  // its channels
        const float* w = w_q.f32() + first * per;
        if (std::any_of(w, w + (last - first) * per, [](float v) { return v != 0; })) continue;
        for (int64_t o = first; o < last; ++o) {
            const float b = std::fabs(bias.f32()[o]);
            // |b| / 2^(e_x + e) <= 2^22  <=>  e >= log2|b| - 22 - e_x
            if (b > 0) e_w[size_t(g)] = std::max(e_w[size_t(g)], int(std::ceil(std::log2(double(b)))) - 22 - e_x);
        }
    }
    return e_w;
}

Variable quantize_bias(const Variable& bias, const std::vector<int>& unit_exponents) {
    const Tensor& b = bias.value();
    const int64_t out = b.numel();
    HFQ_CHECK(b.rank() == 1 && b.dtype() == DType::f32, "quantize_bias: the bias must be f32 {O}, got ",
              shape_str(b.shape()));
    HFQ_CHECK(unit_exponents.size() == 1 || int64_t(unit_exponents.size()) == out, "quantize_bias: ",
              unit_exponents.size(), " accumulator exponents for ", out, " channels");
    Tensor y = Tensor::empty({out});
    for (int64_t o = 0; o < out; ++o) {
        const int u = unit_exponents[unit_exponents.size() == 1 ? 0 : o];
        y.f32()[o] = float(std::ldexp(double(bias_code(b.f32()[o], u)), u));
    }
    return make_result(y, "quantize_bias", {bias}, [bias](const Tensor& dy) { bias.accumulate_grad(dy); });
}

Variable exact_linear(const Variable& x, const Variable& w, const Variable& b) {
    HFQ_CHECK(!(grad_enabled() && (x.requires_grad() || w.requires_grad() || (b.defined() && b.requires_grad()))),
              "exact_linear: evaluation only (it has no backward)");
    const Tensor &xv = x.value(), &wv = w.value();
    const Tensor bv = b.defined() ? b.value() : Tensor::zeros({wv.rank() == 2 ? wv.dim(0) : 0});
    HFQ_CHECK(xv.rank() == 2 && wv.rank() == 2 && xv.dim(1) == wv.dim(1) && bv.numel() == wv.dim(0),
              "exact_linear: shapes ", shape_str(xv.shape()), " x ", shape_str(wv.shape()), "^T + ",
              shape_str(bv.shape()), " do not match");
    const int64_t n = xv.dim(0), in = xv.dim(1), out = wv.dim(0);
    Tensor y = Tensor::empty({n, out});
    for (int64_t i = 0; i < n; ++i)
        for (int64_t o = 0; o < out; ++o) {
            double s = bv.f32()[o];
            for (int64_t k = 0; k < in; ++k) s += double(xv.f32()[i * in + k]) * double(wv.f32()[o * in + k]);
            y.f32()[i * out + o] = float(s);
        }
    return Variable(y);
}

Variable exact_global_mean(const Variable& x) {
    const Tensor& xv = x.value();
    HFQ_CHECK(xv.rank() == 4 && xv.dtype() == DType::f32, "exact_global_mean: needs f32 {N, H, W, C}, got ",
              shape_str(xv.shape()));
    const int64_t n = xv.dim(0), hw = xv.dim(1) * xv.dim(2), c = xv.dim(3);
    Tensor y = Tensor::empty({n, c});
    std::vector<double> sum(static_cast<size_t>(c));
    for (int64_t i = 0; i < n; ++i) {
        std::fill(sum.begin(), sum.end(), 0.0);
        const float* p = xv.f32() + i * hw * c;
        for (int64_t k = 0; k < hw; ++k)
            for (int64_t ch = 0; ch < c; ++ch) sum[size_t(ch)] += p[k * c + ch];
        for (int64_t ch = 0; ch < c; ++ch) y.f32()[i * c + ch] = float(sum[size_t(ch)] / double(hw));
    }
    return make_result(y, "exact_global_mean", {x}, [x, n, hw, c](const Tensor& dy) {
        Tensor dx = Tensor::empty(x.shape());
        for (int64_t i = 0; i < n; ++i)
            for (int64_t k = 0; k < hw; ++k)
                for (int64_t ch = 0; ch < c; ++ch) dx.f32()[(i * hw + k) * c + ch] = dy.f32()[i * c + ch] / float(hw);
        x.accumulate_grad(dx);
    });
}

}  // namespace hfq::quant
