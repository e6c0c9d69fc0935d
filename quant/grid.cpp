#include "quant/grid.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <limits>

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

int least_squares_exponent(double sum_wqx, double sum_wqq, int64_t n) {
    const double mean_wqx = sum_wqx / double(n);
    const double mean_wqq = sum_wqq / double(n);
    return po2_exponent(mean_wqx / (mean_wqq + 1e-7));
}

namespace {

// The element loops below are written so that the compiler vectorises them
// (AVX2): no calls, no branches that depend on the element beyond selects,
// and the partial sums of a chunk on eight lanes (grid.h, summation order).
constexpr int kLanes = 8;

// add(lane, i) for i in [0, n): element i on lane i % 8; the tail after the
// last full eight continues from lane 0.
template <class Add>
inline void over_lanes(int64_t n, Add&& add) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (int lane = 0; lane < kLanes; ++lane) add(lane, i + lane);
    for (int lane = 0; i < n; ++i, ++lane) add(lane, i);
}

// lane 0 + lane 1 + ... + lane 7, in that order.
inline double add_lanes(const double (&lanes)[kLanes]) {
    double s = lanes[0];
    for (int lane = 1; lane < kLanes; ++lane) s += lanes[lane];
    return s;
}

// `pick ? a : b`, through bit masks: the same numbers, in a form the
// compiler vectorises next to double arithmetic (where it gives up on a
// plain select).
inline float select(bool pick, float a, float b) {
    const uint32_t mask = pick ? ~0u : 0u;
    return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) | (std::bit_cast<uint32_t>(b) & ~mask));
}

// A double that reduce_chunks adds up.
struct Sum {
    double value = 0;
    Sum& operator+=(const Sum& o) {
        value += o.value;
        return *this;
    }
};

// Calls f(divide) with divide(v) = v / s. When s is a power of two whose
// reciprocal is a float (the scale of every power-of-two quantizer), v * (1/s)
// is the same number as v / s: both are the real v * 2^-k rounded once. A
// multiplication costs a fraction of a division, and these loops are made of
// little else. Any other s (lsq's learned real scale) keeps the division.
bool has_exact_inverse(float s) {
    int exponent = 0;
    return std::frexp(s, &exponent) == 0.5f && std::isfinite(1.0f / s);
}

template <class F>
auto with_divide(float s, F&& f) {
    const float inverse = 1.0f / s;
    if (has_exact_inverse(s)) return f([inverse](float v) { return v * inverse; });
    return f([s](float v) { return v / s; });
}

// Calls f(round) with round(v) = rint_even(v) or round_half_away(v).
template <class F>
auto with_rounding(Rounding r, F&& f) {
    if (r == Rounding::half_away) return f([](float v) { return round_half_away(v); });
    return f([](float v) { return rint_even(v); });
}

// w (x - s q)^2 for one element with code q, in double. s q is exact (a
// power of two times a small integer), so d is x - s q exactly. One function
// for group_sums and weighted_errors: they must give the same numbers.
inline double error_term(float x, double w, double s, double q) {
    const double d = double(x) - s * q;
    return w * d * d;
}

// group_sums over one chunk; weight(i) is w[i] or 1.
template <class Divide, class Round, class Weight>
GroupSums chunk_group_sums(const float* x, int64_t n, float s, const Grid& g, Divide divide, Round round,
                           Weight weight) {
    double err[kLanes] = {}, wqx[kLanes] = {}, wqq[kLanes] = {};
    const float lo = float(-g.qn), hi = float(g.qp);
    const double sd = s;
    over_lanes(n, [&](int lane, int64_t i) {
        const double q = std::min(std::max(round(divide(x[i])), lo), hi);
        const double wi = weight(i);
        err[lane] += error_term(x[i], wi, sd, q);
        wqx[lane] += wi * q * x[i];
        wqq[lane] += wi * q * q;
    });
    return {add_lanes(err), add_lanes(wqx), add_lanes(wqq)};
}

}  // namespace

GroupSums group_sums(const float* x, const float* w, int64_t n, float s, const Grid& g, Rounding rounding) {
    return with_divide(s, [&](auto divide) {
        return with_rounding(rounding, [&](auto round) {
            return reduce_chunks<GroupSums>(n, [&](int64_t begin, int64_t end) {
                const float* xc = x + begin;
                const int64_t size = end - begin;
                if (!w) return chunk_group_sums(xc, size, s, g, divide, round, [](int64_t) { return 1.0; });
                const float* wc = w + begin;
                return chunk_group_sums(xc, size, s, g, divide, round, [wc](int64_t i) { return double(wc[i]); });
            });
        });
    });
}

namespace {

// weighted_errors over one chunk for NC scales whose reciprocals are exact
// (x / s = x * inverse, as group_sums computes it), codes rounded half to even.
template <int NC, class Weight>
std::array<double, NC> chunk_errors(const float* __restrict x, int64_t n, const float* inverse, const double* scale,
                                    float lo, float hi, Weight weight) {
    double err[NC][kLanes] = {};
    over_lanes(n, [&](int lane, int64_t i) {
        const double wi = weight(i);
        for (int c = 0; c < NC; ++c) {
            const double q = std::min(std::max(rint_even(x[i] * inverse[c]), lo), hi);
            err[c][lane] += error_term(x[i], wi, scale[c], q);
        }
    });
    std::array<double, NC> out;
    for (int c = 0; c < NC; ++c) out[c] = add_lanes(err[c]);
    return out;
}

// Calls f(std::integral_constant<int, count>) for count in 1..kErrorsPerPass:
// the kernel's candidate loop has a fixed length and unrolls.
template <int NC = kErrorsPerPass, class F>
void with_count(int count, F&& f) {
    if constexpr (NC > 1)
        if (count < NC) return with_count<NC - 1>(count, f);
    f(std::integral_constant<int, NC>{});
}

template <int NC>
struct Errors {
    std::array<double, NC> value{};
    Errors& operator+=(const Errors& o) {
        for (int c = 0; c < NC; ++c) value[c] += o.value[c];
        return *this;
    }
};

}  // namespace

void weighted_errors(const float* x, const float* w, int64_t n, const float* scales, int count, const Grid& g,
                     double* errors) {
    // Batches of up to kErrorsPerPass scales, on the stack: the searches call
    // this for every scale group, and a depthwise layer's groups are 9 weights.
    float inverse[kErrorsPerPass];
    double scale[kErrorsPerPass];
    int index[kErrorsPerPass];
    int batch = 0;
    const float lo = float(-g.qn), hi = float(g.qp);
    auto pass = [&] {
        with_count(batch, [&](auto nc) {
            constexpr int NC = decltype(nc)::value;
            const Errors<NC> total = reduce_chunks<Errors<NC>>(n, [&](int64_t begin, int64_t end) {
                const float* xc = x + begin;
                if (!w)
                    return Errors<NC>{
                        chunk_errors<NC>(xc, end - begin, inverse, scale, lo, hi, [](int64_t) { return 1.0; })};
                const float* wc = w + begin;
                return Errors<NC>{chunk_errors<NC>(xc, end - begin, inverse, scale, lo, hi,
                                                   [wc](int64_t i) { return double(wc[i]); })};
            });
            for (int c = 0; c < NC; ++c) errors[index[c]] = total.value[c];
        });
        batch = 0;
    };
    for (int j = 0; j < count; ++j) {
        // A scale without an exact reciprocal (none a power-of-two search
        // tries inside float's range) takes weighted_error's division path.
        if (!has_exact_inverse(scales[j])) {
            errors[j] = weighted_error(x, w, n, scales[j], g);
            continue;
        }
        inverse[batch] = 1.0f / scales[j];
        scale[batch] = scales[j];
        index[batch] = j;
        if (++batch == kErrorsPerPass) pass();
    }
    if (batch > 0) pass();
}

int msqe_rounded_exponent(const float* x, const float* w, int64_t n, double e, const Grid& g) {
    const int lo = int(std::floor(e)), hi = int(std::ceil(e));
    if (lo == hi) return hi;
    const float scales[2] = {exp2_scale(lo), exp2_scale(hi)};
    double errors[2];
    weighted_errors(x, w, n, scales, 2, g, errors);
    return errors[0] < errors[1] ? lo : hi;
}

double population_std(const float* x, int64_t n) {
    const double mean =
        reduce_chunks<Sum>(n,
                           [&](int64_t begin, int64_t end) {
                               double lanes[kLanes] = {};
                               over_lanes(end - begin, [&](int lane, int64_t i) { lanes[lane] += x[begin + i]; });
                               return Sum{add_lanes(lanes)};
                           })
            .value /
        double(n);
    const double var = reduce_chunks<Sum>(n, [&](int64_t begin, int64_t end) {
                           double lanes[kLanes] = {};
                           over_lanes(end - begin, [&](int lane, int64_t i) {
                               const double d = x[begin + i] - mean;
                               lanes[lane] += d * d;
                           });
                           return Sum{add_lanes(lanes)};
                       }).value;
    return std::sqrt(var / double(n));
}

float max_abs(const float* x, int64_t n) {
    struct Max {
        float value = 0;
        Max& operator+=(const Max& o) {
            value = std::max(value, o.value);
            return *this;
        }
    };
    return reduce_chunks<Max>(n,
                              [&](int64_t begin, int64_t end) {
                                  float lanes[kLanes] = {};
                                  over_lanes(end - begin, [&](int lane, int64_t i) {
                                      lanes[lane] = std::max(lanes[lane], std::fabs(x[begin + i]));
                                  });
                                  return Max{*std::max_element(lanes, lanes + kLanes)};
                              })
        .value;
}

int64_t count_non_finite(const float* x, int64_t n) {
    struct Count {
        int64_t value = 0;
        Count& operator+=(const Count& o) {
            value += o.value;
            return *this;
        }
    };
    constexpr float kMax = std::numeric_limits<float>::max();
    return reduce_chunks<Count>(n,
                                [&](int64_t begin, int64_t end) {
                                    int64_t bad = 0;  // |x| <= max is false for infinities and NaN
                                    for (int64_t i = begin; i < end; ++i) bad += !(std::fabs(x[i]) <= kMax);
                                    return Count{bad};
                                })
        .value;
}

namespace {

// out = sqrt(in) for in >= 0 (second moments never are negative). std::sqrt
// gives the same numbers (both are IEEE square roots, rounded once), but GCC
// keeps it scalar because it might have to set errno for a negative argument;
// vsqrtps does eight at a time.
void sqrt_of_nonnegative(const float* in, float* out, int64_t n) {
    int64_t i = 0;
#ifdef __AVX__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
#endif
    for (; i < n; ++i) out[i] = std::sqrt(in[i]);
}

}  // namespace

void group_element_weights(const float* x, const float* second_moments, bool take_sqrt, double limit, int64_t n,
                           float* w) {
    const float* m = second_moments;
    for_each_chunk(n, [&, x, w, m, limit](int64_t begin, int64_t end) {
        if (!m)
            std::fill(w + begin, w + end, 1.0f);
        else if (take_sqrt)
            sqrt_of_nonnegative(m + begin, w + begin, end - begin);
        else
            std::copy(m + begin, m + end, w + begin);
        for (int64_t i = begin; i < end; ++i) w[i] = select(std::fabs(double(x[i])) <= limit, w[i], 0.0f);
    });
}

namespace {

// The kernels below take everything by value and their arrays __restrict:
// a value reached through a lambda's reference capture, or an input that
// might overlap an output, could change under the stores as far as the
// compiler knows, and that keeps a loop scalar.

// quantize_group over one chunk: the outputs and counts first, then the
// error from x and y on the lanes (two simple loops vectorise; one does not).
template <class Divide, class Round>
PassStats chunk_quantize(const float* __restrict x, float* __restrict y, int16_t* __restrict codes, bool compare_codes,
                         int64_t n, float out_scale, float lo, float hi, Divide divide, Round round) {
    int64_t clipped = 0, changed = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float r = round(divide(x[i]));
        clipped += (r < lo) | (r > hi);
        const float q = std::min(std::max(r, lo), hi);
        y[i] = out_scale * q;
        if (codes) {
            const auto c = static_cast<int16_t>(q);
            changed += compare_codes & (codes[i] != c);
            codes[i] = c;
        }
    }
    double err[kLanes] = {};
    over_lanes(n, [&](int lane, int64_t i) {
        const double d = double(x[i]) - double(y[i]);
        err[lane] += d * d;
    });
    return {add_lanes(err), clipped, changed};
}

// backward_group over one chunk: one loop per output, each simple enough to
// vectorise.
template <class Divide>
double chunk_backward(const float* __restrict x, const float* __restrict grad, float* __restrict dx,
                      float* __restrict M, int64_t n, bool identity_ste, bool gate_relu, double keep, double blend,
                      bool want_scale_sum, float lo, float hi, Divide divide) {
    if (dx) {
        for (int64_t i = 0; i < n; ++i) {
            const float r = rint_even(divide(x[i]));
            const bool in = (r >= lo) & (r <= hi);
            const bool pass = (identity_ste | in) & (!gate_relu | (x[i] > 0.0f));
            dx[i] = pass ? grad[i] : 0.0f;
        }
    }
    if (M) {
        for (int64_t i = 0; i < n; ++i) {
            const float r = rint_even(divide(x[i]));
            const bool in = (r >= lo) & (r <= hi);
            const float g = select(in, grad[i], 0.0f);
            M[i] = float(keep * M[i] + blend * (double(g) * g));
        }
    }
    if (!want_scale_sum) return 0.0;
    double lanes[kLanes] = {};
    over_lanes(n, [&](int lane, int64_t i) {
        const float u = divide(x[i]);
        const float r = rint_even(u);
        const float c = std::min(std::max(r, lo), hi);  // -qn below the grid, qp above it
        const float t = select(c == r, r - u, c);
        lanes[lane] += double(grad[i]) * t;
    });
    return add_lanes(lanes);
}

}  // namespace

PassStats quantize_group(const float* x, float* y, int16_t* codes, bool compare_codes, int64_t n, float code_scale,
                         float out_scale, const Grid& g, Rounding rounding) {
    const float lo = float(-g.qn), hi = float(g.qp);
    return with_divide(code_scale, [&](auto divide) {
        return with_rounding(rounding, [&](auto round) {
            return reduce_chunks<PassStats>(n, [&](int64_t begin, int64_t end) {
                return chunk_quantize(x + begin, y + begin, codes ? codes + begin : nullptr, compare_codes, end - begin,
                                      out_scale, lo, hi, divide, round);
            });
        });
    });
}

double backward_group(const BackwardGroup& b, int64_t n, float s, const Grid& g) {
    const float lo = float(-g.qn), hi = float(g.qp);
    const double keep = b.decay, blend = 1.0 - double(b.decay);
    return with_divide(s, [&](auto divide) {
        return reduce_chunks<Sum>(n,
                                  [&](int64_t begin, int64_t end) {
                                      return Sum{chunk_backward(
                                          b.x + begin, b.grad + begin, b.dx ? b.dx + begin : nullptr,
                                          b.second_moments ? b.second_moments + begin : nullptr, end - begin,
                                          b.identity_ste, !g.is_signed, keep, blend, b.want_scale_sum, lo, hi, divide)};
                                  })
            .value;
    });
}

}  // namespace hfq::quant
