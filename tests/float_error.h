// Error bounds of float32 arithmetic: where the suite's tolerances come from.
//
// oneDNN picks other kernels on other CPUs (AVX-512 brgconv, AVX2 jit, and
// other blockings per thread count), and each adds its sums in another
// order, so the last bits of a result differ between machines. A tolerance
// read off what one machine printed fails on the next; every tolerance here
// is instead one of two kinds, each an argument that holds for any order.
//
// 1. Two computations of the same sums (an op against a plain loop, a fused
//    op against its parts, a folded layer against conv then batch norm). A
//    sum of n terms computed in float32 in any order, with or without fused
//    multiply-adds, differs from the exact sum by at most
//        gamma(n) * sum |terms|,   gamma(n) = n u / (1 - n u),  u = 2^-24
//    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
//    Lemma 3.1 and eq. 3.5; a product x*w adds one rounding, so a dot
//    product of length n is within gamma(n + 1)). The bound needs the
//    lengths of the sums and the magnitudes of their terms only: two
//    results of the same sums differ by at most the sum of their two
//    bounds, on every CPU and thread count. A wrong stride, padding or
//    statistic changes a result by about its own size, which is orders of
//    magnitude above gamma(n) times it for the n of these tests.
//
// 2. Comparisons with PyTorch on whole networks, where the error goes
//    through batch norm's backward and no useful bound of kind 1 exists
//    (training-mode gradients cancel in ill-conditioned ways). The fixture
//    stores the float64 result (the truth, rounded to float32) and PyTorch's
//    own float32 error against it on the same case, measured over several
//    summation orders (see the fixture scripts). Float32 error there is the
//    case's condition times the rounding of the order used; hfq adds in other
//    orders with the same first-order error, so it is held to
//    kTorchErrorMultiple times PyTorch's largest measured error.
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace hfq::testing {

// The unit roundoff of float32 (half an ulp of 1).
constexpr double kUnitRoundoff = 0x1p-24;

// gamma(n) = n u / (1 - n u): the relative bound of a float32 sum of n terms.
inline double gamma_n(double n) {
    const double nu = n * kUnitRoundoff;
    if (nu >= 0.5) FAIL("gamma_n: n = ", n, " is too long for a float32 sum bound");
    return nu / (1 - nu);
}

// A tensor holding |t|, element by element (the magnitudes a bound sums).
inline Tensor abs_of(const Tensor& t) {
    Tensor out = Tensor::empty(t.shape());
    for (int64_t i = 0; i < t.numel(); ++i) out.f32()[i] = std::fabs(t.f32()[i]);
    return out;
}

// The largest |a - b| / bound over the elements (<= 1 means a and b agree
// within the bound everywhere). A zero bound admits only equal elements.
inline double worst_bound_ratio(const Tensor& a, const Tensor& b, const Tensor& bound) {
    REQUIRE(a.shape() == b.shape());
    REQUIRE(a.shape() == bound.shape());
    double worst = 0;
    for (int64_t i = 0; i < a.numel(); ++i) {
        const double d = std::fabs(double(a.f32()[i]) - double(b.f32()[i]));
        const double m = bound.f32()[i];
        if (d == 0) continue;
        worst = std::max(worst, m > 0 ? d / m : std::numeric_limits<double>::infinity());
    }
    return worst;
}

// Checks |a - b| <= bound at every element; HFQ_SHOW_ERRORS=1 prints the
// worst ratio (how much of the bound the CPU in force used).
inline void check_within_bound(const std::string& what, const Tensor& a, const Tensor& b, const Tensor& bound) {
    INFO(what);
    const double ratio = worst_bound_ratio(a, b, bound);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(what, ": worst |a - b| / bound = ", ratio);
    CHECK(ratio <= 1.0);
}

// Checks that a deliberately broken variant lies at least 100 times its bound
// away (its worst ratio to the bound): the bound separates right from wrong
// by orders of magnitude. HFQ_SHOW_ERRORS=1 prints the ratio.
inline void check_far_outside(const std::string& what, double ratio) {
    INFO(what);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(what, ": worst |a - b| / bound = ", ratio);
    CHECK(ratio >= 100.0);
}

// gamma(n) of a sum in double, n 2^-53 / (1 - n 2^-53): hfq's statistics and
// the tests' references sum in double.
inline double gamma_double_n(double n) {
    const double nu = n * 0x1p-53;
    return nu / (1 - nu);
}

// A float the code computes in double and rounds to float once, against the
// test's own double evaluation `ref` of the same quantity: within u |ref| for
// the rounding, plus `slack`, a bound of how far the two double evaluations
// may be apart (sums in other orders: gamma_double_n of their length times
// the sum of the terms' magnitudes; a multiply-add contracted on one side
// only: 2^-53 of the product). HFQ_SHOW_ERRORS=1 prints the ratio.
inline void check_rounded_once(const std::string& what, double value, double ref, double slack = 0) {
    const double bound = kUnitRoundoff * (std::fabs(ref) + slack) + slack;
    INFO(what, ": ", value, " against ", ref, ", bound ", bound);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(what, ": |a - b| / bound = ", std::fabs(value - ref) / bound);
    CHECK(std::fabs(value - ref) <= bound);
}

// The bound factor * magnitude, element by element. The magnitudes are sums
// of nonnegative terms computed in float: one that went through k roundings
// (its sums, and the stores of its terms) is at least 1 - gamma(k) times its
// exact value, so the bound, rounded once more, is divided by 1 - gamma(k + 1).
inline Tensor bound_from(const Tensor& magnitude, double factor, int64_t roundings) {
    const double f = factor / (1 - gamma_n(double(roundings + 1)));
    Tensor b = Tensor::empty(magnitude.shape());
    for (int64_t i = 0; i < b.numel(); ++i) b.f32()[i] = float(f * magnitude.f32()[i]);
    return b;
}

// Per-channel mean and biased variance of an {N,H,W,C} tensor, two passes in
// double: what batch norm normalises with in training.
struct ChannelStats {
    std::vector<double> mean, var;
};
inline ChannelStats channel_stats(const Tensor& x) {
    const int64_t channels = x.dim(3), rows = x.numel() / channels;
    ChannelStats s{std::vector<double>(channels, 0.0), std::vector<double>(channels, 0.0)};
    for (int64_t i = 0; i < x.numel(); ++i) s.mean[i % channels] += x.f32()[i] / double(rows);
    for (int64_t i = 0; i < x.numel(); ++i) {
        const double d = x.f32()[i] - s.mean[i % channels];
        s.var[i % channels] += d * d / double(rows);
    }
    return s;
}

// Batch norm's output y = s (x - mean) + beta, s = gamma / sqrt(var + eps),
// in magnitudes: |s| (|x - mean| + |mean|) + |beta|, element by element, for
// the statistics it normalises with. hfq's float32 output is within
// gamma_n(6) times this of the exact value: s comes from two roundings
// (1 / sqrt(var + eps) to float, its product with gamma), x - mean, the
// product and the sum add three, so s (x - mean) carries 5; the mean's
// rounding to float costs u |s mean|, the sum u |beta|; the statistics'
// double sums, E[x^2] - mean^2 included, lose less than one more u while
// rows (mean / std)^2 < 2^29.
inline Tensor batch_norm_magnitude(const Tensor& x, const Tensor& gamma, const Tensor& beta, const ChannelStats& st,
                                   float eps) {
    const int64_t channels = x.dim(3);
    Tensor m = Tensor::empty(x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % channels;
        const double s = std::fabs(gamma.f32()[c]) / std::sqrt(st.var[c] + eps);
        m.f32()[i] = float(s * (std::fabs(x.f32()[i] - st.mean[c]) + std::fabs(st.mean[c])) + std::fabs(beta.f32()[c]));
    }
    return m;
}

// Kind 2. Norm-wise error of `ours` against the float64 truth:
// max |ours - truth| / max |truth|.
inline double normwise_error(const Tensor& ours, const Tensor& truth) {
    REQUIRE(ours.shape() == truth.shape());
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < ours.numel(); ++i) {
        diff = std::max(diff, std::fabs(double(ours.f32()[i]) - double(truth.f32()[i])));
        scale = std::max(scale, std::fabs(double(truth.f32()[i])));
    }
    return scale > 0 ? diff / scale : diff;
}

// hfq may be this many times less accurate than PyTorch's float32 on the
// same case: the realised error of one summation order scatters around the
// first-order bound by a factor of a few (rounding errors add like a random
// walk, sqrt(n), or in the worst case like n), and the fixtures measure
// PyTorch in only a handful of orders. A model error is of order 1e-2 or
// more; each comparison keeps a broken variant to show it stays far above.
constexpr double kTorchErrorMultiple = 8;

// The bound of a norm-wise comparison with PyTorch: the multiple of
// PyTorch's measured float32 error, and never below a few roundings of the
// result itself (a result PyTorch happened to get exact, a loss of 0.0).
inline double torch_bound(double torch_f32_error) {
    return kTorchErrorMultiple * std::max(torch_f32_error, 4 * kUnitRoundoff);
}

}  // namespace hfq::testing
