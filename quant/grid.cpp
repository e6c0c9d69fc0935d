#include "quant/grid.h"

#include <algorithm>

#include "engine/check.h"

namespace hfq::quant {

Grid make_grid(int bits, bool is_signed, const char* who) {
    HFQ_CHECK(bits >= 2 && bits <= 8, who, ": bits must be in 2..8, got ", bits);
    Grid g;
    g.bits = bits;
    g.is_signed = is_signed;
    g.qp = is_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
    g.qn = is_signed ? g.qp : 0;
    return g;
}

ScaleGroups scale_groups(const Shape& shape, bool per_channel, const char* who) {
    const int64_t n = shape_numel(shape);
    HFQ_CHECK(!shape.empty() && n > 0, who, ": cannot quantize a tensor of shape ", shape_str(shape),
              " (it has no elements)");
    ScaleGroups groups;
    groups.count = per_channel ? shape[0] : 1;
    groups.size = n / groups.count;
    return groups;
}

int po2_exponent(double v) { return static_cast<int>(std::nearbyint(std::log2(v + 1e-7))); }

GroupSums group_sums(const float* x, const float* w, int64_t n, float s, const Grid& g, Rounding rounding) {
    // Eight interleaved partial sums (element i goes to lane i % 8) added in a
    // fixed order at the end: the compiler can vectorise the loop, and the
    // result depends on the data alone, never on the number of threads.
    constexpr int L = 8;
    double err[L] = {}, wqx[L] = {}, wqq[L] = {};
    auto add = [&](int lane, int64_t i) {
        const double q = clip_to_grid(round_as(x[i] / s, rounding), g);
        const double wi = w ? w[i] : 1.0;
        const double d = double(x[i]) - double(s) * q;
        err[lane] += wi * d * d;
        wqx[lane] += wi * q * x[i];
        wqq[lane] += wi * q * q;
    };
    int64_t i = 0;
    for (; i + L <= n; i += L)
        for (int lane = 0; lane < L; ++lane) add(lane, i + lane);
    for (int lane = 0; i < n; ++i, ++lane) add(lane, i);
    GroupSums sums;
    for (int lane = 0; lane < L; ++lane) {
        sums.error += err[lane];
        sums.wqx += wqx[lane];
        sums.wqq += wqq[lane];
    }
    return sums;
}

int least_squares_exponent(double sum_wqx, double sum_wqq, int64_t n) {
    const double mean_wqx = sum_wqx / double(n);
    const double mean_wqq = sum_wqq / double(n);
    return po2_exponent(mean_wqx / (mean_wqq + 1e-7));
}

double population_std(const float* x, int64_t n) {
    double mean = 0;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= double(n);
    double var = 0;
    for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
    return std::sqrt(var / double(n));
}

float max_abs(const float* x, int64_t n) {
    float m = 0;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
    return m;
}

PassStats quantize_group(const float* x, float* y, int16_t* codes, bool compare_codes, int64_t n,
                         float code_scale, float out_scale, const Grid& g, Rounding rounding) {
    PassStats st;
    for (int64_t i = 0; i < n; ++i) {
        const float r = round_as(x[i] / code_scale, rounding);
        const bool clipped = r < -g.qn || r > g.qp;
        const float q = clip_to_grid(r, g);
        y[i] = out_scale * q;
        const double d = double(x[i]) - double(y[i]);
        st.error += d * d;
        st.clipped += clipped;
        if (codes) {
            const auto c = static_cast<int16_t>(q);
            st.changed += compare_codes && codes[i] != c;
            codes[i] = c;
        }
    }
    return st;
}

double backward_group(const BackwardGroup& b, int64_t n, float s, const Grid& g) {
    const bool gate_relu = !g.is_signed;
    const double keep = b.decay, blend = 1.0 - double(b.decay);
    double scale_sum = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float x = b.x[i];
        const float gi = b.grad[i];
        const bool m = in_range(x, s, g);
        if (b.dx) {
            const bool pass = (b.identity_ste || m) && (!gate_relu || x > 0);
            b.dx[i] = pass ? gi : 0.0f;
        }
        if (b.second_moments) {
            float& M = b.second_moments[i];
            M = float(keep * M + blend * (m ? double(gi) * gi : 0.0));
        }
        if (b.want_scale_sum) scale_sum += double(gi) * scale_gradient_term(x, s, g);
    }
    return scale_sum;
}

}  // namespace hfq::quant
