// The MSQE quantizers (docs/quantizers.md, 3): msqe-po2's state (second moments,
// stable exponent, warm start), its straight-through backward, evaluation
// mode, and msqe-baseline's instability.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "engine/check.h"
#include "quant/msqe_po2.h"
#include "quant/quantizer.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::edit_state;
using hfq::testing::state_tensor;

namespace {

std::vector<int> exponents_of(Quantizer& q) { return q.report().exponents; }

// y = s * clip(rint(x / s)), computed here independently of quant/.
std::vector<float> reference_q(const std::vector<float>& x, float s, int qn, int qp) {
    std::vector<float> y;
    for (float v : x) y.push_back(s * std::fmin(std::fmax(std::nearbyint(v / s), float(-qn)), float(qp)));
    return y;
}

}  // namespace

TEST_CASE("msqe-po2 backward: masked straight-through and the second-moment update") {
    QuantizerOptions opt;
    opt.outlier_mask = false;
    opt.bits = 2;  // codes -1..1: clipping is common
    const std::vector<float> xv{0.3f, -1.2f, 0.9f, 2.6f, -3.1f, 1.1f, -0.7f, 0.0f};
    auto q = make_quantizer("msqe-po2", opt, {8});
    Variable w(Tensor::from_vector({8}, xv), true);
    Variable y = q->fake_quantize(w, true);
    const float s = q->report().scales.at(0);
    const std::vector<float> gv{0.5f, -2.0f, 1.5f, 3.0f, -0.25f, 4.0f, -1.0f, 2.0f};
    y.backward(Tensor::from_vector({8}, gv));

    const Tensor M = state_tensor(*q, "second_moment");
    int out_of_range = 0;
    for (int i = 0; i < 8; ++i) {
        const float u = std::nearbyint(xv[i] / s);
        const bool m = u >= -1 && u <= 1;
        out_of_range += !m;
        CHECK(w.grad().f32()[i] == (m ? gv[i] : 0.0f));
        // The first update blends with the initial ones.
        hfq::testing::check_second_moment("M after one step", M.f32()[i], 0.999f, 1.0f, gv[i], m);
    }
    CHECK(out_of_range > 0);  // the case is meaningful: some weights are clipped

    // A second step blends again: M = 0.999 M + 0.001 m g^2.
    Variable y2 = q->fake_quantize(w, true);
    REQUIRE(q->report().scales.at(0) == s);
    y2.backward(Tensor::from_vector({8}, gv));
    const Tensor M2 = state_tensor(*q, "second_moment");
    for (int i = 0; i < 8; ++i) {
        const float u = std::nearbyint(xv[i] / s);
        const bool m = u >= -1 && u <= 1;
        hfq::testing::check_second_moment("M after two steps", M2.f32()[i], 0.999f, M.f32()[i], gv[i], m);
    }

    // Backward of an evaluation-mode graph does not touch M.
    Variable y3 = q->fake_quantize(w, false);
    y3.backward(Tensor::from_vector({8}, gv));
    CHECK(state_tensor(*q, "second_moment").to_vector() == M2.to_vector());
}

TEST_CASE("msqe-po2 uses sqrt(M) and the outlier mask as weights") {
    // Two candidate exponents; M decides which one wins.
    const std::vector<float> xv{0.9f, 1.1f, 2.9f, 3.2f, -1.05f, -3.0f, 0.2f, 5.1f};
    QuantizerOptions opt;
    opt.outlier_mask = false;
    opt.line_search = true;
    auto plain = make_quantizer("msqe-po2", opt, {8});
    auto weighted = make_quantizer("msqe-po2", opt, {8});
    // Load a second-moment buffer that weights only the small elements.
    edit_state(*weighted, [&](const std::string& name, Tensor& t) {
        if (name == "second_moment")
            for (int i = 0; i < 8; ++i) t.f32()[i] = std::fabs(xv[i]) < 1.5f ? 1.0f : 1e-8f;
    });
    Variable w(Tensor::from_vector({8}, xv));
    plain->fake_quantize(w, true);
    weighted->fake_quantize(w, true);
    const int e_plain = exponents_of(*plain)[0];
    const int e_weighted = exponents_of(*weighted)[0];
    CHECK(e_weighted < e_plain);  // a finer grid for the elements that matter
    // Cross-check each choice against E computed with its own weights.
    std::vector<float> wts(8);
    for (int i = 0; i < 8; ++i) wts[i] = std::sqrt(std::fabs(xv[i]) < 1.5f ? 1.0f : 1e-8f);
    const Grid g = make_grid(4, true, "test");
    for (int d = -3; d <= 3; ++d) {
        CHECK(weighted_error(xv.data(), nullptr, 8, exp2_scale(e_plain), g) <=
              weighted_error(xv.data(), nullptr, 8, exp2_scale(e_plain + d), g));
        CHECK(weighted_error(xv.data(), wts.data(), 8, exp2_scale(e_weighted), g) <=
              weighted_error(xv.data(), wts.data(), 8, exp2_scale(e_weighted + d), g));
    }

    // The outlier mask (|x| <= 2 std) removes 40 from the error: the exponent
    // serves the bulk of the weights, not the outlier.
    std::vector<float> bulk;
    for (int i = 0; i < 63; ++i) bulk.push_back(0.1f * float((i * 37) % 21 - 10));
    bulk.push_back(40.0f);
    QuantizerOptions with_mask;
    QuantizerOptions no_mask;
    no_mask.outlier_mask = false;
    auto masked = make_quantizer("msqe-po2", with_mask, {64});
    auto unmasked = make_quantizer("msqe-po2", no_mask, {64});
    Variable b(Tensor::from_vector({64}, bulk));
    masked->fake_quantize(b, true);
    unmasked->fake_quantize(b, true);
    CHECK(exponents_of(*masked)[0] < exponents_of(*unmasked)[0]);
}

TEST_CASE("msqe-po2 warm-starts from the previous exponent; evaluation changes nothing") {
    QuantizerOptions opt;
    opt.outlier_mask = false;
    auto q = make_quantizer("msqe-po2", opt, {6});
    auto& mq = static_cast<MsqePo2Quantizer&>(*q);
    const std::vector<float> a{7, -7, 3, 1, -5, 2};      // exact at s = 1
    const std::vector<float> b{28, -28, 12, 4, -20, 8};  // exact at s = 4

    // Evaluating a quantizer that never trained: what training would pick, nothing stored.
    Variable ya = q->fake_quantize(Variable(Tensor::from_vector({6}, b)), false);
    CHECK(ya.value().to_vector() == b);
    CHECK(!q->initialized());
    CHECK(q->step() == 0);
    CHECK(mq.exponents() == std::vector<int>{0});

    q->fake_quantize(Variable(Tensor::from_vector({6}, a)), true);
    CHECK(mq.exponents() == std::vector<int>{0});
    CHECK(q->step() == 1);
    // Evaluation on b keeps e = 0 (b is clipped at 7) and changes no state.
    const NamedTensors before = q->state();
    Variable yb = q->fake_quantize(Variable(Tensor::from_vector({6}, b)), false);
    CHECK(yb.value().to_vector() == reference_q(b, 1.0f, 7, 7));
    const NamedTensors after = q->state();
    for (size_t i = 0; i < before.size(); ++i) {
        CHECK(before[i].first == after[i].first);
        CHECK(before[i].second.nbytes() == after[i].second.nbytes());
        CHECK(std::memcmp(before[i].second.raw(), after[i].second.raw(), before[i].second.nbytes()) == 0);
    }
    // Training on b moves to e = 2 (through the line search from the warm start).
    q->fake_quantize(Variable(Tensor::from_vector({6}, b)), true);
    CHECK(mq.exponents() == std::vector<int>{2});
}

TEST_CASE("msqe-po2 stable exponent: EMA of e, first update assigns, switch freezes it") {
    // Three channels, exact on the grid at s = 1, 2, 4; then all at s = 1.
    const std::vector<float> base{7, -7, 3, 1, -5, 2};
    std::vector<float> first, second;
    for (float m : {1.0f, 2.0f, 4.0f})
        for (float v : base) first.push_back(m * v);
    for (int c = 0; c < 3; ++c)
        for (float v : base) second.push_back(v);
    QuantizerOptions opt;
    opt.per_channel = true;
    opt.stable_scale = true;
    auto q = make_quantizer("msqe-po2", opt, {3, 6});
    auto& mq = static_cast<MsqePo2Quantizer&>(*q);
    CHECK(q->has_stable_scale());
    CHECK_NOTHROW(q->set_stable_switched(true));  // allowed ...
    CHECK_THROWS_AS(q->fake_quantize(Variable(Tensor::from_vector({3, 6}, first)), true),
                    Error);  // ... but no value yet
    q->set_stable_switched(false);

    // Not updating yet: ebar untouched.
    q->fake_quantize(Variable(Tensor::from_vector({3, 6}, first)), true);
    CHECK(!mq.stable_has_value());
    q->set_stable_updating(true);
    q->fake_quantize(Variable(Tensor::from_vector({3, 6}, first)), true);
    CHECK(mq.exponents() == std::vector<int>{0, 1, 2});
    CHECK(mq.stable_exponents() == std::vector<float>{0, 1, 2});  // the first update assigns
    q->fake_quantize(Variable(Tensor::from_vector({3, 6}, second)), true);
    CHECK(mq.exponents() == std::vector<int>{0, 0, 0});
    const std::vector<float> ebar = mq.stable_exponents();
    // ebar = 0.99 ebar + 0.01 * 0 in float: 0.99 * 1 and 0.99 * 2 are exact.
    CHECK(ebar[0] == 0.0f);
    CHECK(ebar[1] == 0.99f);
    CHECK(ebar[2] == 2 * 0.99f);

    // Switched: 2^rint(ebar) = [1, 2, 4] is used, ebar no longer moves.
    q->set_stable_switched(true);
    Variable y = q->fake_quantize(Variable(Tensor::from_vector({3, 6}, second)), true);
    CHECK(q->report().exponents == std::vector<int>{0, 1, 2});
    CHECK(mq.stable_exponents() == ebar);
    const std::vector<float> yv = y.value().to_vector();
    for (int c = 0; c < 3; ++c) {
        const std::vector<float> row(second.begin() + 6 * c, second.begin() + 6 * c + 6);
        const std::vector<float> expected = reference_q(row, exp2_scale(c), 7, 7);
        CHECK(std::vector<float>(yv.begin() + 6 * c, yv.begin() + 6 * c + 6) == expected);
    }
    // Evaluation follows the switch too.
    CHECK(q->fake_quantize(Variable(Tensor::from_vector({3, 6}, second)), false).value().to_vector() == yv);

    // A quantizer without the option refuses the schedule calls.
    QuantizerOptions plain;
    auto p = make_quantizer("msqe-po2", plain, {6});
    CHECK(!p->has_stable_scale());
    CHECK_THROWS_AS(p->set_stable_updating(true), Error);
    auto l = make_quantizer("learnable-po2", plain, {6});
    CHECK_THROWS_AS(l->set_stable_switched(true), Error);
}

TEST_CASE("msqe-baseline: stateless, identity STE, and flips on a tensor that alternates") {
    // Two tensors that differ in one element by 0.01: the baseline's exponent
    // alternates between -1 and -2 although E(2^-1) is far lower for both;
    // msqe-po2 keeps -1.
    const std::vector<float> a{2.48f, -1.53f, 0.57f, 2.36f, -0.64f, -1.02f, 0.51f, -1.21f};
    std::vector<float> b = a;
    b[0] = 2.47f;
    const Grid g = make_grid(4, true, "test");
    for (const std::vector<float>* x : {&a, static_cast<const std::vector<float>*>(&b)})
        CHECK(weighted_error(x->data(), nullptr, 8, 0.5f, g) < weighted_error(x->data(), nullptr, 8, 0.25f, g));

    QuantizerOptions opt;
    opt.outlier_mask = false;
    auto baseline = make_quantizer("msqe-baseline", opt, {8});
    auto po2 = make_quantizer("msqe-po2", opt, {8});
    std::vector<int> seen;
    for (int step = 0; step < 6; ++step) {
        Variable w(Tensor::from_vector({8}, step % 2 ? b : a), true);
        Variable y = baseline->fake_quantize(w, true);
        seen.push_back(baseline->report().exponents.at(0));
        po2->fake_quantize(w, true);
        // Identity STE: every element gets dL/dy, clipped or not.
        const std::vector<float> g8{1, 2, 3, 4, 5, 6, 7, 8};
        y.backward(Tensor::from_vector({8}, g8));
        CHECK(w.grad().to_vector() == g8);
    }
    CHECK(seen == std::vector<int>{-1, -2, -1, -2, -1, -2});
    QuantizerDiagnostics d = po2->report();
    CHECK(d.exponents == std::vector<int>{-1});
    CHECK(d.flips == 0);

    // The flips are counted since the last report: replay a-b-a-b.
    auto fresh = make_quantizer("msqe-baseline", opt, {8});
    for (int step = 0; step < 4; ++step)
        fresh->fake_quantize(Variable(Tensor::from_vector({8}, step % 2 ? b : a)), true);
    d = fresh->report();
    CHECK(d.flips == 3);
    CHECK(d.flips_per_group == std::vector<int64_t>{3});
    CHECK(fresh->report().flips == 0);  // reset by the report
    // Stateless: evaluation recomputes, and agrees with training on the same input.
    auto other = make_quantizer("msqe-baseline", opt, {8});
    const Tensor eval_y = other->fake_quantize(Variable(Tensor::from_vector({8}, b)), false).value();
    const Tensor train_y = fresh->fake_quantize(Variable(Tensor::from_vector({8}, b)), true).value();
    CHECK(eval_y.to_vector() == train_y.to_vector());
}

TEST_CASE("msqe-baseline: five half-away least-squares iterations; output pairs the last scale with the last codes") {
    // A group where rounding half away from zero matters: 0.5 and 1.5 at s = 1.
    const std::vector<float> x{0.5f, 1.5f, -2.5f, 7.0f, 3.5f, -0.5f};
    QuantizerOptions opt;
    auto q = make_quantizer("msqe-baseline", opt, {6});
    const std::vector<float> y = q->fake_quantize(Variable(Tensor::from_vector({6}, x)), true).value().to_vector();
    // Independent recomputation.
    int e = int(std::nearbyint(std::log2(7.0 / 7 + 1e-7)));
    int previous = e;
    for (int it = 0; it < 5; ++it) {
        const double s = std::ldexp(1.0, e);
        double zx = 0, zz = 0;
        for (float v : x) {
            const double z = std::copysign(std::min(std::floor(std::fabs(v) / s + 0.5), 7.0), v);
            zx += z * v;
            zz += z * z;
        }
        previous = e;
        e = int(std::nearbyint(std::log2((zx / 6) / (zz / 6 + 1e-7) + 1e-7)));
    }
    for (size_t i = 0; i < x.size(); ++i) {
        const double s_prev = std::ldexp(1.0, previous);
        const double z = std::copysign(std::min(std::floor(std::fabs(x[i]) / s_prev + 0.5), 7.0), x[i]);
        CHECK(y[i] == float(std::ldexp(z, e)));
    }
    CHECK(q->report().exponents == std::vector<int>{e});
}

TEST_CASE("unsigned grid: ReLU first, codes 0..2^b-1, gradient gated by the ReLU") {
    const std::vector<float> xv{-3.0f, 0.5f, 1.0f, 2.2f, 15.0f, 7.3f, -0.1f, 16.4f};
    for (const char* method : {"msqe-po2", "msqe-baseline", "learnable-po2", "lsq"}) {
        CAPTURE(method);
        const bool baseline = std::string(method) == "msqe-baseline";
        QuantizerOptions opt;
        opt.is_signed = false;
        opt.rounding = ExponentRounding::rint;
        auto q = make_quantizer(method, opt, {8});
        CHECK(q->grid().qn == 0);
        CHECK(q->grid().qp == 15);
        Variable w(Tensor::from_vector({8}, xv), true);
        Variable y = q->fake_quantize(w, true);
        const float s = q->report().scales.at(0);
        const std::vector<float> yv = y.value().to_vector();
        y.backward(Tensor::full({8}, 1.0f));
        for (int i = 0; i < 8; ++i) {
            CAPTURE(i);
            const float relu = std::max(xv[i], 0.0f);
            const float u = std::nearbyint(relu / s);
            if (!baseline) CHECK(yv[i] == s * std::fmin(u, 15.0f));
            CHECK(yv[i] >= 0.0f);
            const float code = yv[i] / s;
            CHECK((code == std::nearbyint(code) && code <= 15));
            const bool pass = xv[i] > 0 && (baseline || u <= 15);
            CHECK(w.grad().f32()[i] == (pass ? 1.0f : 0.0f));
        }
    }
}
