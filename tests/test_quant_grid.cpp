// The shared pieces of the quantizers (docs/quantizers.md, 2) and the reference
// values of its section 7 that concern them and the MSQE search.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/random.h"
#include "quant/grid.h"
#include "quant/msqe_po2.h"
#include "quant/quantizer.h"
#include "tests/float_error.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;

namespace {

const Grid g4 = make_grid(4, true, "test");

// A group of n values ~ N(0, sd^2) and weights in [0, 1).
struct RandomGroup {
    std::vector<float> x, w;
};
RandomGroup random_group(int64_t n, uint64_t seed, float sd) {
    Rng rng(seed);
    RandomGroup g{std::vector<float>(n), std::vector<float>(n)};
    for (int64_t i = 0; i < n; ++i) {
        g.x[i] = sd * rng.normal();
        g.w[i] = rng.uniform();
    }
    return g;
}

// E(s) = sum w (x - s q)^2 of docs/quantizers.md (2) is for decimal inputs; x and w here
// are the decimals rounded to float, each within u of it (relatively), and
// none lies near a rounding boundary of x / s, so q is the decimals'. That moves
// each term by at most |w| (u (x - s q)^2 + 2 u |x - s q| |x| + u^2 x^2) (to
// first order in the differences, the float and decimal values alike); E
// itself is summed in double, within gamma_double(n + 3) of its value.
double spec_error_slack(const std::vector<float>& x, const std::vector<float>* w, float s, double e) {
    using hfq::testing::kUnitRoundoff;
    const double u = kUnitRoundoff;
    double slack = hfq::testing::gamma_double_n(double(x.size() + 3)) * e;
    for (size_t i = 0; i < x.size(); ++i) {
        const double q = std::min(std::max(std::nearbyint(double(x[i]) / s), double(-g4.qn)), double(g4.qp));
        const double d = std::fabs(x[i] - s * q), wi = w ? std::fabs((*w)[i]) : 1.0;
        slack += wi * (u * d * d + 2 * u * d * std::fabs(x[i]) + u * u * double(x[i]) * x[i]);
    }
    return slack;
}

std::vector<float> quantized(const std::vector<float>& x, float s, const Grid& g) {
    std::vector<float> y(x.size());
    quantize_group(x.data(), y.data(), nullptr, false, int64_t(x.size()), s, s, g, Rounding::half_even);
    return y;
}

}  // namespace

TEST_CASE("grids: signed is symmetric, unsigned starts at 0") {
    CHECK(g4.qn == 7);
    CHECK(g4.qp == 7);
    const Grid g2 = make_grid(2, true, "test");
    CHECK((g2.qn == 1 && g2.qp == 1));
    const Grid g8 = make_grid(8, true, "test");
    CHECK((g8.qn == 127 && g8.qp == 127));
    const Grid u4 = make_grid(4, false, "test");
    CHECK((u4.qn == 0 && u4.qp == 15));
    const Grid u8 = make_grid(8, false, "test");
    CHECK((u8.qn == 0 && u8.qp == 255));
}

TEST_CASE("rint rounds half to even, never half away from zero") {
    CHECK(rint_even(2.5f) == 2.0f);
    CHECK(rint_even(0.5f) == 0.0f);
    CHECK(rint_even(1.5f) == 2.0f);
    CHECK(rint_even(-8.5f) == -8.0f);
    CHECK(rint_even(-0.5f) == 0.0f);
    CHECK(rint_even(3.5f) == 4.0f);
    // The codes use it: 8 bits so that -8.5 is not clipped.
    const Grid g8 = make_grid(8, true, "test");
    CHECK(quantized({2.5f, 0.5f, 1.5f, -8.5f}, 1.0f, g8) == std::vector<float>{2, 0, 2, -8});
    // msqe-baseline's rounding is half away from zero.
    CHECK(round_half_away(2.5f) == 3.0f);
    CHECK(round_half_away(0.5f) == 1.0f);
    CHECK(round_half_away(-8.5f) == -9.0f);
    CHECK(round_half_away(0.49999997f) == 0.0f);  // |v| + 0.5 must not round up in float
}

TEST_CASE("po2 includes the 1e-7") {
    CHECK(po2_exponent(1.0) == 0);
    CHECK(po2_exponent(3.5) == 2);     // log2 3.5 = 1.81
    CHECK(po2_exponent(2.8284) == 1);  // just below 2^1.5
    CHECK(po2_exponent(2.8285) == 2);  // just above
    CHECK(po2_exponent(0.0) == -23);   // log2(1e-7) = -23.25
    CHECK(po2_exponent(1e-7) == -22);  // log2(2e-7) = -22.25: the 1e-7 counts
    CHECK(exp2_scale(-3) == 0.125f);
}

TEST_CASE("codes, clipping and the in-range mask (bounds inclusive)") {
    CHECK(code_at(7.4f, 1.0f, g4) == 7.0f);
    CHECK(in_range(7.4f, 1.0f, g4));
    CHECK(code_at(7.6f, 1.0f, g4) == 7.0f);
    CHECK(!in_range(7.6f, 1.0f, g4));
    CHECK(!in_range(7.5f, 1.0f, g4));  // rint(7.5) = 8 (half to even): outside
    CHECK(in_range(6.5f, 1.0f, g4));   // rint(6.5) = 6
    CHECK(!in_range(-7.5f, 1.0f, g4));
    CHECK(in_range(-7.4f, 1.0f, g4));
    CHECK(code_at(-9.0f, 1.0f, g4) == -7.0f);
    // The reference suite's clip-mask case: 2 bits (qn = qp = 1) at its initial
    // scale 1 + 1e-7 (so 1.5 rounds down to 1, while 1.6 rounds up to 2: clipped).
    const float s = 1.0f + 1e-7f;
    const Grid g2 = make_grid(2, true, "test");
    const std::vector<float> x{0.5f, 0.0f, 1.0f, 1.5f, 1.6f, 2.0f, -0.5f, -1.0f, -1.5f, -1.6f, -2.0f};
    const std::vector<bool> mask{true, true, true, true, false, false, true, true, true, false, false};
    for (size_t i = 0; i < x.size(); ++i) CHECK_MESSAGE(in_range(x[i], s, g2) == mask[i], "x = ", x[i]);
    CHECK(!in_range(1.5f, 1.0f, g2));  // at exactly s = 1, rint(1.5) = 2 is outside
    // The scale-gradient term: rint(u) - u in range, -qn below, qp above.
    CHECK(scale_gradient_term(2.5f, 1.0f, g4) == -0.5f);
    CHECK(scale_gradient_term(1.5f, 1.0f, g4) == 0.5f);
    CHECK(scale_gradient_term(9.0f, 1.0f, g4) == 7.0f);
    CHECK(scale_gradient_term(-9.0f, 1.0f, g4) == -7.0f);
}

TEST_CASE("reference 5: Q([6, 5, 1, 8, 3, -8]; s)") {
    const std::vector<float> x{6, 5, 1, 8, 3, -8};
    CHECK(quantized(x, 2.0f, g4) == std::vector<float>{6, 4, 0, 8, 4, -8});
    CHECK(quantized(x, 1.0f, g4) == std::vector<float>{6, 5, 1, 7, 3, -7});
}

TEST_CASE("reference 3: E(1) = 0.30 (a sum), and weighted") {
    const std::vector<float> x{1.2f, 0.9f, 1.0f, 1.6f, 0.3f, 1.0f};
    CHECK(std::fabs(weighted_error(x.data(), nullptr, 6, 1.0f, g4) - 0.30) <= spec_error_slack(x, nullptr, 1.0f, 0.30));
    // The reference suite's weighted case: w = 1.1 .. 1.6 gives 0.415.
    const std::vector<float> w{1.1f, 1.2f, 1.3f, 1.4f, 1.5f, 1.6f};
    CHECK(std::fabs(weighted_error(x.data(), w.data(), 6, 1.0f, g4) - 0.415) <= spec_error_slack(x, &w, 1.0f, 0.415));
    // Zero weights remove elements.
    const std::vector<float> w0{1, 1, 1, 0, 1, 1};
    CHECK(std::fabs(weighted_error(x.data(), w0.data(), 6, 1.0f, g4) - 0.14) <= spec_error_slack(x, &w0, 1.0f, 0.14));
    // Broken: E at s = 2 instead of 1 is far from the reference value.
    hfq::testing::check_far_outside(
        "E(2) against E(1) = 0.30",
        std::fabs(weighted_error(x.data(), nullptr, 6, 2.0f, g4) - 0.30) / spec_error_slack(x, nullptr, 1.0f, 0.30));
}

TEST_CASE("least squares: the 1e-7 sits on the denominator of the mean form") {
    // mean(w q x) = 4e-7, mean(w q q) = 1e-7 over n = 1000 elements: the mean
    // form gives 4e-7 / (1e-7 + 1e-7) = 2 -> exponent 1, where 1e-7 added to
    // the sum would give 4e-4 / (1e-4 + 1e-7) ~ 4 -> exponent 2.
    const int64_t n = 1000;
    CHECK(least_squares_exponent(4e-7 * n, 1e-7 * n, n) == 1);
    CHECK(least_squares_exponent(4.0 * n, 1.0 * n, n) == 2);  // 4 / (1 + 1e-7)
    CHECK(least_squares_exponent(0.0, 0.0, n) == -23);        // no codes: po2(0)
}

TEST_CASE("reference 1: least squares gives s = 1, the line search then s = 2") {
    const std::vector<float> x{-0.17f, 2.58f, -8.75f, -3.56f, 1.56f, -0.15f, 2.15f, -0.66f, 0.49f};
    const int64_t n = int64_t(x.size());
    GroupErrors errors(x.data(), nullptr, n, g4);
    const ExponentSearch ls = least_squares_search(errors, /*start s = 1*/ 0, 3);
    CHECK(ls.exponent == 0);
    // GroupErrors computes E with weighted_error's arithmetic, per element and
    // summation order (quant/grid.h): the same double.
    CHECK(ls.error == weighted_error(x.data(), nullptr, n, 1.0f, g4));
    const ExponentSearch fine = line_search(errors, ls, 6);
    CHECK(fine.exponent == 1);
    CHECK(fine.error == weighted_error(x.data(), nullptr, n, 2.0f, g4));
    CHECK(fine.error < ls.error);
    CHECK_THROWS_WITH_AS(line_search(errors, ls, 66), doctest::Contains("line_search: range must be in 2..64"), Error);

    // The whole optimisation, through the quantizer: its first call starts at
    // rint(log2(8.75 / 7 + 1e-7)) = 0, i.e. s = 1, with w = sqrt(M) = 1.
    QuantizerOptions opt;
    opt.outlier_mask = false;
    auto q = make_quantizer("msqe-po2", opt, {n});
    Variable wq = q->fake_quantize(Variable(Tensor::from_vector({n}, x)), true);
    CHECK(static_cast<MsqePo2Quantizer&>(*q).exponents() == std::vector<int>{1});
    CHECK(wq.value().to_vector() == quantized(x, 2.0f, g4));
}

TEST_CASE("reference 2: per channel, from given start exponents") {
    // Channels along axis 0: [6, 5], [5, 3], [1, -8.5].
    const std::vector<float> x{6, 5, 5, 3, 1, -8.5f};
    const std::vector<int> start{int(std::nearbyint(std::log2(0.0012))), int(std::nearbyint(std::log2(3.5))),
                                 int(std::nearbyint(std::log2(0.00015)))};
    CHECK(start == std::vector<int>{-10, 2, -13});
    const std::vector<int> expected{0, 0, 1};  // scales [1, 1, 2]

    // The search functions, channel by channel.
    for (int c = 0; c < 3; ++c) {
        const float* xc = x.data() + 2 * c;
        GroupErrors errors(xc, nullptr, 2, g4);
        ExponentSearch best = least_squares_search(errors, start[c], 3);
        best = line_search(errors, best, 6);
        CHECK_MESSAGE(best.exponent == expected[c], "channel ", c);
    }

    // The quantizer, with the start exponents loaded as its state.
    QuantizerOptions opt;
    opt.per_channel = true;
    opt.outlier_mask = false;
    auto q = make_quantizer("msqe-po2", opt, {3, 2});
    hfq::testing::edit_state(*q, [&](const std::string& name, Tensor& t) {
        if (name == "exponent")
            for (int c = 0; c < 3; ++c) t.data<int32_t>()[c] = start[c];
        if (name == "initialized") t.data<int32_t>()[0] = 1;
    });
    Variable wq = q->fake_quantize(Variable(Tensor::from_vector({3, 2}, x)), true);
    CHECK(static_cast<MsqePo2Quantizer&>(*q).exponents() == expected);
    CHECK(wq.value().to_vector() == std::vector<float>{6, 5, 5, 3, 0, -8});
}

TEST_CASE("sums over a group follow the documented order: 8 lanes per chunk, chunks in order") {
    // 2.5 chunks, weighted: the sums must equal this loop exactly (grid.h).
    const int64_t n = 2 * kChunk + kChunk / 2 + 3;
    const auto [x, w] = random_group(n, 7, 0.3f);
    const float s = 0.125f;
    double expect_error = 0, expect_wqx = 0, expect_wqq = 0;
    for (int64_t begin = 0; begin < n; begin += kChunk) {
        const int64_t end = std::min(n, begin + kChunk);
        double err[8] = {}, wqx[8] = {}, wqq[8] = {};
        for (int64_t i = begin; i < end; ++i) {
            const int lane = int((i - begin) % 8);
            const double q = code_at(x[i], s, g4);
            const double d = double(x[i]) - double(s) * q;
            err[lane] += w[i] * d * d;
            wqx[lane] += w[i] * q * x[i];
            wqq[lane] += w[i] * q * q;
        }
        double chunk_err = err[0], chunk_wqx = wqx[0], chunk_wqq = wqq[0];
        for (int lane = 1; lane < 8; ++lane) {
            chunk_err += err[lane];
            chunk_wqx += wqx[lane];
            chunk_wqq += wqq[lane];
        }
        expect_error = begin == 0 ? chunk_err : expect_error + chunk_err;
        expect_wqx = begin == 0 ? chunk_wqx : expect_wqx + chunk_wqx;
        expect_wqq = begin == 0 ? chunk_wqq : expect_wqq + chunk_wqq;
    }
    const GroupSums sums = group_sums(x.data(), w.data(), n, s, g4);
    CHECK(sums.error == expect_error);
    CHECK(sums.wqx == expect_wqx);
    CHECK(sums.wqq == expect_wqq);
}

TEST_CASE("weighted_errors: exactly weighted_error's numbers, several scales per pass") {
    // 2.5 chunks and a tail; 1 to 9 scales (up to three passes of
    // kErrorsPerPass), two of them without an exact reciprocal (0.3 is no
    // power of two, 2^-140 has an infinite one), which go through
    // weighted_error's division path.
    const int64_t n = 2 * kChunk + kChunk / 2 + 5;
    const auto [x, w] = random_group(n, 11, 0.2f);
    const std::vector<float> scales{0.0625f, 0.03125f, 0.3f, 0.125f, 0.25f, exp2_scale(-140), 0.015625f, 1.0f, 2.0f};
    for (const float* weights : {static_cast<const float*>(nullptr), static_cast<const float*>(w.data())})
        for (int count = 1; count <= int(scales.size()); ++count) {
            std::vector<double> errors(count);
            weighted_errors(x.data(), weights, n, scales.data(), count, g4, errors.data());
            for (int j = 0; j < count; ++j)
                CHECK_MESSAGE(errors[j] == weighted_error(x.data(), weights, n, scales[j], g4), "scale ", scales[j],
                              " of ", count, weights ? ", weighted" : "");
        }
    // A group of a few elements (one partial chunk), 8 bits.
    const Grid g8 = make_grid(8, true, "test");
    double small[3];
    const float few_scales[3] = {0.5f, 0.01f, 0.001953125f};
    weighted_errors(x.data(), w.data(), 13, few_scales, 3, g8, small);
    for (int j = 0; j < 3; ++j) CHECK(small[j] == weighted_error(x.data(), w.data(), 13, few_scales[j], g8));
}

TEST_CASE("msqe_rounded_exponent: the lower error of floor and ceil, ties to ceil") {
    // x = 3: at s = 1 the code is 3 (E = 0); at s = 2, rint(1.5) = 2 gives 4 (E = 1).
    const std::vector<float> x{3.0f};
    CHECK(msqe_rounded_exponent(x.data(), nullptr, 1, 0.4, g4) == 0);
    // x = 4: exact at s = 1 and at s = 2, a tie: ceil.
    const std::vector<float> four{4.0f};
    CHECK(msqe_rounded_exponent(four.data(), nullptr, 1, 0.4, g4) == 1);
    // An integer e has nothing to choose.
    CHECK(msqe_rounded_exponent(x.data(), nullptr, 1, 2.0, g4) == 2);
    // A zero weight removes the element that decided it: then a tie (E = 0 at both).
    const std::vector<float> w0{0.0f};
    CHECK(msqe_rounded_exponent(x.data(), w0.data(), 1, 0.4, g4) == 1);
}

TEST_CASE("codes at a power-of-two scale equal those of a true division, at every exponent") {
    // The passes multiply by 1/s when s is a power of two (exact); check it
    // against x / s over the whole float range, subnormal quotients included.
    Rng rng(3);
    const Grid g8 = make_grid(8, true, "test");
    for (int e = -149; e <= 127; e += 2) {
        const float s = exp2_scale(e);
        std::vector<float> x(64);
        for (float& v : x) v = std::ldexp(rng.normal(), std::clamp(e + int(rng.below(12)) - 6, -149, 120));
        std::vector<float> y(x.size());
        std::vector<int16_t> codes(x.size());
        quantize_group(x.data(), y.data(), codes.data(), false, int64_t(x.size()), s, s, g8, Rounding::half_even);
        for (size_t i = 0; i < x.size(); ++i) {
            const float q = clip_to_grid(std::nearbyint(x[i] / s), g8);
            CHECK_MESSAGE(codes[i] == int16_t(q), "x = ", x[i], ", s = 2^", e);
            CHECK_MESSAGE(y[i] == s * q, "x = ", x[i], ", s = 2^", e);
        }
    }
}
