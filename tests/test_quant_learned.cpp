// The gradient-based quantizers (docs/quantizers.md, 4): learnable-po2's
// initialisation, exponent rounding and exponent gradient (reference values
// 4 and 6), lsq's scale gradient, both against closed forms computed here and
// finite differences of the smooth surrogate the straight-through estimator
// differentiates.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "engine/random.h"
#include "quant/learnable_po2.h"
#include "quant/lsq.h"
#include "quant/quantizer.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::check_rounded_once;
using hfq::testing::edit_state;
using hfq::testing::gamma_double_n;
using hfq::testing::kUnitRoundoff;
using hfq::testing::mse_loss;
using hfq::testing::state_tensor;

namespace {

QuantizerOptions plain_learnable(ExponentRounding rounding) {
    QuantizerOptions opt;
    opt.rounding = rounding;
    opt.second_moments = false;
    opt.outlier_mask = false;
    return opt;
}

Variable& log2_scale(Quantizer& q) { return *q.named_parameters().at(0).second; }

std::vector<float> normal_values(int64_t n, uint64_t seed, float scale) {
    Rng rng(seed);
    std::vector<float> v(n);
    for (float& x : v) x = scale * rng.normal();
    return v;
}

// The smooth surrogate of one element whose STE branch is frozen at scale s0:
// in range s * (x/s + c) with c = rint(x/s0) - x/s0 held constant, below the
// grid -qn s, above qp s. Its derivatives are what the STE claims.
double surrogate(double x, double s, float x0, float s0, const Grid& g) {
    const float r = std::nearbyint(x0 / s0);
    if (r < -g.qn) return -g.qn * s;
    if (r > g.qp) return g.qp * s;
    const double c = double(r) - double(x0) / s0;
    return s * (x / s + c);
}

// A central difference of the surrogate with step h (in the unit of the
// argument moved: x, s or e) has no truncation error in x or s, where the
// surrogate is linear (x + s c in range, +-q s clipped), only the double
// roundings of its two evaluations: at most 6 each (c, the scale moved by
// 2^(+-h) for e, x / s, the sum, the product) on values below
// M = |x| + 2 s (q + 1), so the quotient is within gamma_double(6) M / h.
double surrogate_difference_slack(double x, double s, const Grid& g, double h) {
    return gamma_double_n(6) * (std::fabs(x) + 2 * s * (std::max(g.qn, g.qp) + 1)) / h;
}

// log2(3 std / qp) of a group, std the population standard deviation, in
// double: what learnable-po2 initialises e to (before its floor).
double initial_exponent(const std::vector<float>& x, int qp) {
    double mean = 0, var = 0;
    for (float v : x) mean += v / double(x.size());
    for (float v : x) var += (v - mean) * (v - mean) / double(x.size());
    return std::log2(3 * std::sqrt(var) / qp);
}

// How far two double evaluations of initial_exponent (the quantizer's and the
// test's, summing in other orders) may be apart: the two passes' sums of n
// terms, the square root and the logarithm, a generous 4 n + 8 roundings of
// 2^-53 on values below |e| + 1 (the variance's condition, 1 + mean^2 / var,
// is below 2 for these groups).
double initial_exponent_slack(size_t n, double e) {
    return 2 * gamma_double_n(4.0 * double(n) + 8) * (std::fabs(e) + 1);
}

}  // namespace

TEST_CASE("reference 4: learnable-po2 initialisation e = log2(max(3 std / qp, 1e-5)), not rounded") {
    for (auto [values, expected] : {std::pair{std::vector<float>{6, 5, 1, 8, 3, -8}, 1.1528215},
                                    std::pair{std::vector<float>{6, 5, 1, 1, 3, -1}, 0.0599999}}) {
        auto q = make_quantizer("learnable-po2", QuantizerOptions{}, {6});
        CHECK(!q->initialized());
        q->fake_quantize(Variable(Tensor::from_vector({6}, values)), true);
        CHECK(q->initialized());
        const float e = log2_scale(*q).value().f32()[0];
        // docs/quantizers.md (7.4) gives e to 7 decimals (half a unit of the last: 5e-8); the
        // quantizer computes it in double and rounds it to float once.
        const double exact = initial_exponent(values, 7);
        CHECK(std::fabs(exact - expected) <= 0.5e-7);
        check_rounded_once("initial e", e, exact, initial_exponent_slack(values.size(), exact));
        CHECK(q->report().continuous_exponents == std::vector<float>{e});
    }
    // The floor 1e-5 for a constant group, and per channel (channels along axis 0).
    QuantizerOptions per_channel;
    per_channel.per_channel = true;
    auto pc = make_quantizer("learnable-po2", per_channel, {2, 3});
    const Variable x(Tensor::from_vector({2, 3}, {0, 0, 0, 6, 5, 1}));
    pc->fake_quantize(x, true);
    // The floor: log2 of the float 1e-5 in double (glibc's, or folded by the
    // compiler here: within an ulp of each other), rounded to float.
    const double e_floor = std::log2(double(1e-5f));
    check_rounded_once("initial e, floor", log2_scale(*pc).value().f32()[0], e_floor, 0x1p-52 * std::fabs(e_floor));
    const double e1 = std::log2(3 * std::sqrt(14.0 / 3) / 7);  // std of [6, 5, 1]
    check_rounded_once("initial e, channel 1", log2_scale(*pc).value().f32()[1], e1, initial_exponent_slack(3, e1));
}

TEST_CASE("reference 6: dL/de = ln 2 in rint mode; SGD steps to 0.306853 and 0.459674") {
    const std::vector<float> xv{6, 5, 1, 8, 3, -8};
    const Tensor x = Tensor::from_vector({6}, xv);
    auto q = make_quantizer("learnable-po2", plain_learnable(ExponentRounding::rint), {6});
    Variable& e = log2_scale(*q);

    // dL/de = s ln 2 sum g t is ln 2 for exact gradients; mse_loss's
    // gradients (+-1/3 here) are rounded to float, which moves the sum by u
    // of its terms' magnitude (1/2 with s = 2), and the result is rounded
    // once: within 2 u ln 2 of ln 2.
    const double ln2 = std::log(2.0);
    const double grad_slack = kUnitRoundoff * ln2;

    // First call initialises e = 1.1528215; rint -> 1, s = 2.
    Variable loss = mse_loss(q->fake_quantize(Variable(x), true), x);
    CHECK(q->report().exponents == std::vector<int>{1});
    const double e0 = initial_exponent(xv, 7);
    loss.backward();
    check_rounded_once("dL/de from the initial e", e.grad().f32()[0], ln2, grad_slack);
    e.value().f32()[0] -= 1.0f * e.grad().f32()[0];  // SGD, learning rate 1
    // The reference 0.459674 (7.6) = e0 - ln 2 to 6 decimals (5e-7); e0 and the
    // gradient were rounded to float (their slack), then their difference.
    CHECK(std::fabs((e0 - ln2) - 0.459674) <= 0.5e-6);
    check_rounded_once("e after one step", e.value().f32()[0], e0 - ln2,
                       kUnitRoundoff * std::fabs(e0) + initial_exponent_slack(xv.size(), e0) + 2 * grad_slack);

    // From e = 1 exactly: 1 - dL/de is exact in float (Sterbenz), so within
    // the gradient's bound of the reference 1 - ln 2 = 0.306853 (6 decimals).
    e.zero_grad();
    e.value().f32()[0] = 1.0f;
    mse_loss(q->fake_quantize(Variable(x), true), x).backward();
    check_rounded_once("dL/de from e = 1", e.grad().f32()[0], ln2, grad_slack);
    e.value().f32()[0] -= 1.0f * e.grad().f32()[0];
    CHECK(std::fabs((1 - ln2) - 0.306853) <= 0.5e-6);
    check_rounded_once("e after a step from 1", e.value().f32()[0], 1 - ln2, 2 * grad_slack);
}

TEST_CASE("learnable-po2 exponent rounding: ceil, rint, msqe-round (ties to ceil)") {
    // The reference suite's cases: x = [6, 8], [5, 3], [1, -8] (one channel each).
    const Tensor x = Tensor::from_vector({3, 2}, {6, 8, 5, 3, 1, -8});
    auto exponents_for = [&](ExponentRounding mode, std::vector<double> scales) {
        QuantizerOptions opt = plain_learnable(mode);
        opt.per_channel = true;
        auto q = make_quantizer("learnable-po2", opt, {3, 2});
        edit_state(*q, [](const std::string& name, Tensor& t) {
            if (name == "initialized") t.data<int32_t>()[0] = 1;
        });
        for (int c = 0; c < 3; ++c) log2_scale(*q).value().f32()[c] = float(std::log2(scales[c]));
        q->fake_quantize(Variable(x), true);
        return q->report().exponents;
    };
    using R = ExponentRounding;
    CHECK(exponents_for(R::rint, {1.3, 3.1, 0.3}) == std::vector<int>{0, 2, -2});
    CHECK(exponents_for(R::ceil, {1.3, 3.1, 0.3}) == std::vector<int>{1, 2, -1});
    CHECK(exponents_for(R::msqe_round, {1.5, 1.5, 1.5}) == std::vector<int>{1, 0, 1});  // [1, -8]: a tie
    CHECK(exponents_for(R::msqe_round, {2.1, 0.51, 0.251}) == std::vector<int>{1, 0, -1});
    // Per tensor: E(1) = 2 < E(2) = 3 on [6, 5, 1, 8, 3, -8] -> floor.
    auto q = make_quantizer("learnable-po2", plain_learnable(R::msqe_round), {6});
    edit_state(*q, [](const std::string& name, Tensor& t) {
        if (name == "initialized") t.data<int32_t>()[0] = 1;
    });
    log2_scale(*q).value().f32()[0] = float(std::log2(1.5));
    q->fake_quantize(Variable(Tensor::from_vector({6}, {6, 5, 1, 8, 3, -8})), true);
    CHECK(q->report().exponents == std::vector<int>{0});
}

TEST_CASE("learnable-po2 msqe-round weights: sqrt(M) and the range mask |x| <= 2^e (qp + 0.5)") {
    // The reference suite's weighted cases, channels [6.6, 8.5], [5, 3], [1, -8],
    // e = log2([1.1, 0.9, 0.9]).
    const Tensor x = Tensor::from_vector({3, 2}, {6.6f, 8.5f, 5, 3, 1, -8});
    auto exponents_for = [&](bool outlier_mask, std::vector<float> m) {
        QuantizerOptions opt;
        opt.per_channel = true;
        opt.outlier_mask = outlier_mask;
        auto q = make_quantizer("learnable-po2", opt, {3, 2});
        edit_state(*q, [&](const std::string& name, Tensor& t) {
            if (name == "initialized") t.data<int32_t>()[0] = 1;
            if (name == "second_moment") t.copy_from(Tensor::from_vector({3, 2}, m));
        });
        const double scales[3] = {1.1, 0.9, 0.9};
        for (int c = 0; c < 3; ++c) log2_scale(*q).value().f32()[c] = float(std::log2(scales[c]));
        q->fake_quantize(Variable(x), true);
        return q->report().exponents;
    };
    CHECK(exponents_for(false, {2, 2, 2, 2, 2, 2}) == std::vector<int>{1, 0, 0});
    CHECK(exponents_for(true, {2, 2, 2, 2, 2, 2}) == std::vector<int>{0, 0, 0});  // 8.5 > 1.1 * 7.5
    CHECK(exponents_for(false, {2, 0, 2, 2, 2, 0}) == std::vector<int>{0, 0, 0});
}

TEST_CASE("learnable-po2 gradients: closed form and finite differences of the surrogate") {
    for (ExponentRounding mode : {ExponentRounding::ceil, ExponentRounding::rint, ExponentRounding::msqe_round}) {
        CAPTURE(exponent_rounding_name(mode));
        QuantizerOptions opt;
        opt.rounding = mode;
        opt.per_channel = true;
        const int64_t groups = 3, n = 40;
        // Different spreads per channel, a few large values that clip.
        std::vector<float> xv = normal_values(groups * n, 11, 1.0f);
        for (int64_t c = 0; c < groups; ++c)
            for (int64_t i = 0; i < n; ++i) xv[c * n + i] *= float(c + 1) * (i % 13 == 0 ? 4.0f : 1.0f);
        const std::vector<float> rv = normal_values(groups * n, 12, 1.0f);  // dL/dy
        auto q = make_quantizer("learnable-po2", opt, {groups, n});
        Variable w(Tensor::from_vector({groups, n}, xv), true);
        Variable y = q->fake_quantize(w, true);
        y.backward(Tensor::from_vector({groups, n}, rv));
        const Variable& e = log2_scale(*q);
        const std::vector<float> scales = q->report().scales;
        const Grid& g = q->grid();

        int clipped = 0;
        for (int64_t c = 0; c < groups; ++c) {
            const float s = scales[c];
            // Closed form: dL/de = sum g s ln2 t, t = rint(u) - u / -qn / qp
            // (u = x / s and t exact in float and double: s is a power of two).
            // The quantizer sums g t in double and rounds s ln2 times it to
            // float once; the two double sums of n terms differ by at most
            // 2 gamma_double(n + 3) of their magnitude.
            double closed = 0, magnitude = 0, numeric_e = 0, difference_slack = 0;
            const double h = 1e-4, a = h * std::log(2.0);
            for (int64_t i = c * n; i < (c + 1) * n; ++i) {
                const double u = double(xv[i]) / s;
                const double r = std::nearbyint(u);
                const bool in = r >= -g.qn && r <= g.qp;
                const double t = r < -g.qn ? -g.qn : r > g.qp ? g.qp : r - u;
                closed += rv[i] * s * std::log(2.0) * t;
                magnitude += std::fabs(rv[i] * s * std::log(2.0) * t);
                clipped += !in;
                // Surrogate with s(e) = 2^(e + (k - e)) = s * 2^(de): central difference in e.
                numeric_e += rv[i] *
                             (surrogate(xv[i], s * std::exp2(h), xv[i], s, g) -
                              surrogate(xv[i], s * std::exp2(-h), xv[i], s, g)) /
                             (2 * h);
                difference_slack += std::fabs(rv[i]) * surrogate_difference_slack(xv[i], s, g, h);
                // d/dx of the surrogate: 1 in range, 0 clipped: the STE.
                const double dx_num = (surrogate(double(xv[i]) + 1e-3, s, xv[i], s, g) -
                                       surrogate(double(xv[i]) - 1e-3, s, xv[i], s, g)) /
                                      2e-3;
                CHECK(std::fabs(dx_num - (in ? 1 : 0)) <= surrogate_difference_slack(xv[i], s, g, 1e-3));
                CHECK(w.grad().f32()[i] == (in ? rv[i] : 0.0f));
            }
            check_rounded_once("dL/de", e.grad().f32()[c], closed, 2 * gamma_double_n(double(n + 3)) * magnitude);
            // In e the surrogate is x + s 2^de c: the central difference is the
            // derivative times sinh(a) / a, a = h ln 2 (1 + a^2 / 6: 8e-10).
            CHECK(std::fabs(numeric_e - closed * std::sinh(a) / a) <=
                  difference_slack + gamma_double_n(double(n + 3)) * magnitude);
        }
        CHECK(clipped > 0);
    }
}

TEST_CASE("learnable-po2: second moments updated in backward, evaluation uses the current e") {
    QuantizerOptions opt;  // msqe-round with sqrt(M) and the mask
    const std::vector<float> xv = normal_values(32, 5, 0.1f);
    auto q = make_quantizer("learnable-po2", opt, {32});
    Variable w(Tensor::from_vector({32}, xv), true);
    Variable y = q->fake_quantize(w, true);
    const float s = q->report().scales.at(0);
    const std::vector<float> gv = normal_values(32, 6, 1.0f);
    y.backward(Tensor::from_vector({32}, gv));
    const Tensor M = state_tensor(*q, "second_moment");
    for (int i = 0; i < 32; ++i) {
        const float u = std::nearbyint(xv[i] / s);
        hfq::testing::check_second_moment("M", M.f32()[i], 0.999f, 1.0f, gv[i], u >= -7 && u <= 7);
    }
    // Move e by one: evaluation follows e (rounded anew), changes no state.
    Variable& e = log2_scale(*q);
    e.value().f32()[0] += 1.0f;
    const int64_t step = q->step();
    Variable ye = q->fake_quantize(w, false);
    CHECK(q->step() == step);
    CHECK(state_tensor(*q, "second_moment").to_vector() == M.to_vector());
    const std::vector<float> yv = ye.value().to_vector();
    bool coarser = false;
    for (int i = 0; i < 32; ++i) {
        const float code = yv[i] / (2 * s);
        coarser = coarser || yv[i] != y.value().f32()[i];
        CHECK(code == std::nearbyint(code));  // on the grid of 2s (a power of two: exact)
    }
    CHECK(coarser);
}

TEST_CASE("lsq: initialisation, forward on a real scale, gradients") {
    const int64_t groups = 2, n = 50;
    std::vector<float> xv = normal_values(groups * n, 21, 0.5f);
    for (int64_t i = n; i < 2 * n; ++i) xv[i] *= 3.0f;
    QuantizerOptions opt;
    opt.per_channel = true;
    auto q = make_quantizer("lsq", opt, {groups, n});
    Variable w(Tensor::from_vector({groups, n}, xv), true);
    Variable y = q->fake_quantize(w, true);
    Variable& s_param = *q->named_parameters().at(0).second;
    CHECK(q->named_parameters().at(0).first == "scale");
    const Grid& g = q->grid();
    // s = 2 mean|x| / sqrt(qp), in double, rounded to float once; the two
    // double sums of n |x| agree to gamma_double(n + 3) of their value.
    for (int64_t c = 0; c < groups; ++c) {
        double mean_abs = 0;
        for (int64_t i = c * n; i < (c + 1) * n; ++i) mean_abs += std::fabs(xv[i]) / n;
        const double s0 = 2 * mean_abs / std::sqrt(7.0);
        check_rounded_once("initial lsq scale", s_param.value().f32()[c], s0, 2 * gamma_double_n(double(n + 3)) * s0);
    }
    CHECK(q->report().exponents.empty());
    CHECK(q->report().scales == s_param.value().to_vector());

    // Make some weights clip: shrink the scale of channel 0 before a second step.
    s_param.value().f32()[0] *= 0.5f;
    y = q->fake_quantize(w, true);
    const std::vector<float> rv = normal_values(groups * n, 22, 1.0f);
    y.backward(Tensor::from_vector({groups, n}, rv));
    int clipped = 0;
    for (int64_t c = 0; c < groups; ++c) {
        const float s = s_param.value().f32()[c];
        // Closed form: dL/ds = grad_scale sum g t. The quantizer's t = r - u
        // takes u = x / s in float (within 2 u |x / s| of the double u here:
        // a division, or a product with 1 / s); it sums g t in double and
        // rounds grad_scale times the sum to float once.
        double closed = 0, magnitude = 0, t_slack = 0, numeric = 0, difference_slack = 0;
        const double h = 1e-4 * s;
        for (int64_t i = c * n; i < (c + 1) * n; ++i) {
            const float r = std::nearbyint(xv[i] / s);
            CHECK(y.value().f32()[i] == s * std::fmin(std::fmax(r, -7.0f), 7.0f));
            const double u = double(xv[i]) / s;
            const bool in = r >= -g.qn && r <= g.qp;
            const double t = r < -g.qn ? -g.qn : r > g.qp ? g.qp : double(r) - u;
            clipped += !in;
            closed += rv[i] * t;
            magnitude += std::fabs(rv[i] * t);
            if (in) t_slack += std::fabs(rv[i]) * 2 * kUnitRoundoff * std::fabs(u);
            numeric += rv[i] * (surrogate(xv[i], s + h, xv[i], s, g) - surrogate(xv[i], s - h, xv[i], s, g)) / (2 * h);
            difference_slack += std::fabs(rv[i]) * surrogate_difference_slack(xv[i], s, g, h);
            CHECK(w.grad().f32()[i] == (in ? rv[i] : 0.0f));
        }
        const double grad_scale = 1.0 / std::sqrt(double(n) * g.qp);  // N: the group's elements
        check_rounded_once("dL/ds", s_param.grad().f32()[c], closed * grad_scale,
                           (t_slack + 2 * gamma_double_n(double(n + 3)) * magnitude) * grad_scale);
        // The surrogate is linear in s: its central difference is the closed form.
        CHECK(std::fabs(numeric - closed) <= difference_slack + gamma_double_n(double(n + 3)) * magnitude);
    }
    CHECK(clipped > 0);

    // A scale an optimizer step carried below min_init_scale (here: past zero)
    // is projected back onto it: in evaluation only for that forward, in
    // training into the parameter too. Channel 0 keeps its scale.
    const float kept = s_param.value().f32()[0], floor = opt.min_init_scale;
    s_param.value().f32()[1] = -0.1f;
    y = q->fake_quantize(w, false);
    CHECK(s_param.value().f32()[1] == -0.1f);
    for (int64_t i = n; i < 2 * n; ++i)  // on the grid of the floor (almost all clip to +-7 floor)
        CHECK(y.value().f32()[i] == floor * std::fmin(std::fmax(std::nearbyint(xv[i] / floor), -7.0f), 7.0f));
    y = q->fake_quantize(w, true);
    CHECK(s_param.value().f32()[1] == floor);
    CHECK(s_param.value().f32()[0] == kept);
    CHECK(q->report().scales == std::vector<float>{kept, floor});

    // A scale that is not finite is refused with a clear message.
    s_param.value().f32()[1] = std::numeric_limits<float>::quiet_NaN();
    const std::string msg = hfq::testing::error_message([&] { q->fake_quantize(w, true); });
    CHECK(msg.find("scale of group 1") != std::string::npos);
    CHECK(msg.find("finite") != std::string::npos);
}
