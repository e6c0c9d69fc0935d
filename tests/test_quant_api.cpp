// The quantizer interface: the factory and its errors, bad input, saving and
// restoring state, diagnostics, per-channel groups, and determinism across
// thread counts.
#include <doctest/doctest.h>

#include <omp.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "engine/random.h"
#include "quant/msqe_po2.h"
#include "quant/quantizer.h"
#include "tests/float_error.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::error_message;
using hfq::testing::state_tensor;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

Tensor normal_tensor(const Shape& shape, uint64_t seed, float scale) {
    Rng rng(seed);
    Tensor t = Tensor::empty(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = scale * rng.normal();
    return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// One training step with a fixed upstream gradient; returns the output.
Tensor train_step(Quantizer& q, const Tensor& w, const Tensor& g) {
    Variable wv(w, true);
    Variable y = q.fake_quantize(wv, true);
    y.backward(g);
    return y.value();
}

}  // namespace

TEST_CASE("factory: the four methods, clear errors for unknown names and bad options") {
    for (const std::string& m : quantizer_methods()) {
        auto q = make_quantizer(m, QuantizerOptions{}, {4, 3});
        CHECK(q->method() == m);
        CHECK(q->groups().count == 1);
        CHECK(q->groups().size == 12);
    }
    std::string msg = error_message([] { make_quantizer("msqe", QuantizerOptions{}, {4}); });
    CHECK(contains(msg, "unknown method 'msqe'"));
    CHECK(contains(msg, "msqe-baseline, msqe-po2, learnable-po2, lsq"));
    for (int bits : {1, 9, 0, -4}) {
        QuantizerOptions opt;
        opt.bits = bits;
        msg = error_message([&] { make_quantizer("msqe-po2", opt, {4}); });
        CHECK(contains(msg, "msqe-po2"));
        CHECK(contains(msg, "bits must be in 2..8, got " + std::to_string(bits)));
    }
    for (int bits = 2; bits <= 8; ++bits) {
        QuantizerOptions opt;
        opt.bits = bits;
        CHECK_NOTHROW(make_quantizer("lsq", opt, {4}));
    }
    QuantizerOptions bad;
    bad.second_moments_decay = 1.0f;
    CHECK(contains(error_message([&] { make_quantizer("msqe-po2", bad, {4}); }), "second_moments_decay"));
    bad = {};
    bad.line_search_range = 1;
    CHECK(contains(error_message([&] { make_quantizer("msqe-po2", bad, {4}); }), "line_search_range"));
    bad = {};
    bad.outlier_sigma = 0;
    CHECK(contains(error_message([&] { make_quantizer("msqe-po2", bad, {4}); }), "outlier_sigma"));
    CHECK(contains(error_message([] { make_quantizer("lsq", QuantizerOptions{}, {0, 3}); }), "no elements"));
    CHECK(parse_exponent_rounding("msqe-round") == ExponentRounding::msqe_round);
    CHECK(parse_exponent_rounding("ceil") == ExponentRounding::ceil);
    CHECK(contains(error_message([] { parse_exponent_rounding("floor"); }), "ceil, rint, msqe-round"));
}

TEST_CASE("bad input to fake_quantize: shape, dtype, NaN") {
    auto q = make_quantizer("msqe-po2", QuantizerOptions{}, {4, 3});
    std::string msg = error_message([&] { q->fake_quantize(Variable(Tensor::zeros({3, 4})), true); });
    CHECK(contains(msg, "msqe-po2"));
    CHECK(contains(msg, "[3, 4]"));
    CHECK(contains(msg, "[4, 3]"));
    msg = error_message([&] { q->fake_quantize(Variable(Tensor::zeros({4, 3}, DType::s32)), true); });
    CHECK(contains(msg, "f32"));
    CHECK(contains(error_message([&] { q->fake_quantize(Variable(), true); }), "undefined"));

    QuantizerOptions opt;
    opt.per_channel = true;
    for (const std::string& m : quantizer_methods()) {
        auto pc = make_quantizer(m, opt, {4, 3});
        Tensor w = normal_tensor({4, 3}, 1, 1.0f);
        w.f32()[7] = std::numeric_limits<float>::quiet_NaN();
        msg = error_message([&] { pc->fake_quantize(Variable(w), true); });
        CHECK(contains(msg, "scale group 2 contain NaN or infinity"));
        CHECK(!pc->initialized());  // refused before any state changed
        w.f32()[7] = std::numeric_limits<float>::infinity();
        CHECK(contains(error_message([&] { pc->fake_quantize(Variable(w), false); }), "NaN or infinity"));
    }
    // A learnable exponent that diverged.
    auto l = make_quantizer("learnable-po2", QuantizerOptions{}, {4});
    l->fake_quantize(Variable(Tensor::from_vector({4}, {1, 2, 3, 4})), true);
    l->named_parameters()[0].second->value().f32()[0] = std::numeric_limits<float>::quiet_NaN();
    CHECK(contains(error_message([&] {
                       l->fake_quantize(Variable(Tensor::from_vector({4}, {1, 2, 3, 4})), true);
                   }),
                   "log2-scale e of scale group 0"));
}

TEST_CASE("per channel: each output channel quantized as if alone") {
    Tensor w = normal_tensor({3, 2, 3, 3}, 3, 0.2f);
    for (int c = 1; c < 3; ++c)  // very different ranges per channel
        for (int64_t i = c * 18; i < (c + 1) * 18; ++i) w.f32()[i] *= float(1 << (3 * c));
    for (const std::string& m : quantizer_methods()) {
        CAPTURE(m);
        QuantizerOptions pc_opt;
        pc_opt.per_channel = true;
        auto pc = make_quantizer(m, pc_opt, w.shape());
        CHECK(pc->groups().count == 3);
        const Tensor y = pc->fake_quantize(Variable(w), true).value();
        auto pt = make_quantizer(m, QuantizerOptions{}, w.shape());
        const Tensor yt = pt->fake_quantize(Variable(w), true).value();
        CHECK(!same_bytes(y, yt));  // one scale for all is not the same
        for (int c = 0; c < 3; ++c) {
            const Tensor wc = w.slice0(c, c + 1).clone();
            auto alone = make_quantizer(m, QuantizerOptions{}, wc.shape());
            const Tensor yc = alone->fake_quantize(Variable(wc), true).value();
            CHECK(same_bytes(yc, y.slice0(c, c + 1).clone()));
            CHECK(alone->report().scales.at(0) == pc->report().scales.at(c));
        }
    }
}

TEST_CASE("state round trip: a restored quantizer continues exactly") {
    for (const std::string& m : quantizer_methods()) {
        CAPTURE(m);
        QuantizerOptions opt;
        opt.per_channel = true;
        opt.stable_scale = m == "msqe-po2";
        const Shape shape{4, 25};
        auto a = make_quantizer(m, opt, shape);
        if (a->has_stable_scale()) a->set_stable_updating(true);
        for (int step = 0; step < 3; ++step)
            train_step(*a, normal_tensor(shape, 10 + step, 0.3f), normal_tensor(shape, 20 + step, 1.0f));

        // Save: parameters and state; restore into a fresh quantizer.
        const NamedTensors saved = a->state();
        auto b = make_quantizer(m, opt, shape);
        b->load_state(saved);
        const auto pa = a->named_parameters(), pb = b->named_parameters();
        REQUIRE(pa.size() == pb.size());
        for (size_t i = 0; i < pa.size(); ++i) pb[i].second->value().copy_from(pa[i].second->value());
        CHECK(b->initialized());
        CHECK(b->step() == 3);
        if (a->has_stable_scale()) {
            a->set_stable_switched(true);
            b->set_stable_switched(true);
        }
        const Tensor w = normal_tensor(shape, 99, 0.3f), g = normal_tensor(shape, 98, 1.0f);
        CHECK(same_bytes(train_step(*a, w, g), train_step(*b, w, g)));
        const NamedTensors sa = a->state(), sb = b->state();
        REQUIRE(sa.size() == sb.size());
        for (size_t i = 0; i < sa.size(); ++i) CHECK_MESSAGE(same_bytes(sa[i].second, sb[i].second), sa[i].first);
        // The state is a snapshot: training on does not change `saved`.
        CHECK(saved[0].second.data<int64_t>()[0] == 3);
    }

    // load_state checks names, shapes and dtypes before changing anything.
    auto q = make_quantizer("msqe-po2", QuantizerOptions{}, {4});
    NamedTensors st = q->state();
    NamedTensors missing(st.begin() + 1, st.end());
    CHECK(contains(error_message([&] { q->load_state(missing); }), "missing tensor 'step'"));
    NamedTensors extra = st;
    extra.emplace_back("log2_scale", Tensor::zeros({1}));
    CHECK(contains(error_message([&] { q->load_state(extra); }), "unknown tensor 'log2_scale'"));
    NamedTensors wrong = st;
    for (auto& [name, t] : wrong)
        if (name == "second_moment") t = Tensor::zeros({5});
    std::string msg = error_message([&] { q->load_state(wrong); });
    CHECK(contains(msg, "'second_moment' should be f32 [4], got f32 [5]"));
    wrong = st;
    for (auto& [name, t] : wrong)
        if (name == "exponent") t = Tensor::full({1}, 3.0f);
    CHECK(contains(error_message([&] { q->load_state(wrong); }), "'exponent' should be s32 [1]"));
    CHECK(!q->initialized());

    // named_buffers() are the live tensors: writing through them restores too.
    auto r = make_quantizer("msqe-po2", QuantizerOptions{}, {6});
    for (auto& [name, t] : r->named_buffers()) {
        if (name == "initialized") t->data<int32_t>()[0] = 1;
        if (name == "exponent") t->data<int32_t>()[0] = -1;
    }
    CHECK(static_cast<MsqePo2Quantizer&>(*r).exponents() == std::vector<int>{-1});
    const Tensor y = r->fake_quantize(Variable(Tensor::from_vector({6}, {1, 2, 3, 3.5f, 0.5f, 2})), false).value();
    CHECK(y.to_vector() == std::vector<float>{1, 2, 3, 3.5f, 0.5f, 2});  // s = 1/2, nothing clipped
}

TEST_CASE("diagnostics: exponents, flips, error, clipped and changed fractions") {
    QuantizerOptions opt;
    opt.outlier_mask = false;
    auto q = make_quantizer("msqe-po2", opt, {8});
    QuantizerDiagnostics d = q->report();
    CHECK(d.step == 0);
    CHECK(std::isnan(d.error_per_element));
    CHECK(std::isnan(d.codes_changed_fraction));

    const std::vector<float> a{0.1f, -0.2f, 0.35f, 0.5f, -0.8f, 1.0f, 0.05f, -0.6f};
    const Tensor ya = q->fake_quantize(Variable(Tensor::from_vector({8}, a)), true).value();
    d = q->report();
    CHECK(d.method == "msqe-po2");
    CHECK(d.step == 1);
    REQUIRE(d.exponents.size() == 1);
    const float s = exp2_scale(d.exponents[0]);
    CHECK(d.scales == std::vector<float>{s});
    double err = 0;
    int clipped = 0;
    for (int i = 0; i < 8; ++i) {
        err += (double(a[i]) - ya.f32()[i]) * (double(a[i]) - ya.f32()[i]);
        const float r = std::nearbyint(a[i] / s);
        clipped += r < -7 || r > 7;
    }
    // Both sum the 8 squares of x - y (exact in double) in double, in other
    // orders, then divide by 8 (exact): each within gamma_double(8) of the
    // exact sum of positive terms, so within 2 gamma_double(9) of each other.
    CHECK(std::fabs(d.error_per_element - err / 8) <= 2 * hfq::testing::gamma_double_n(9) * err / 8);
    CHECK(d.clipped_fraction == clipped / 8.0);   // a count over 8: exact
    CHECK(std::isnan(d.codes_changed_fraction));  // nothing to compare with yet
    CHECK(d.continuous_exponents.empty());

    // Scale every weight by 4: the exponent moves by 2 (a flip), no code changes.
    std::vector<float> b = a;
    for (float& v : b) v *= 4;
    q->fake_quantize(Variable(Tensor::from_vector({8}, b)), true);
    d = q->report();
    CHECK(d.exponents[0] == int(std::log2(s)) + 2);
    CHECK(d.flips == 1);
    CHECK(d.codes_changed_fraction == 0.0);
    // Move two weights across a rounding boundary: 2 of 8 codes change.
    b[0] += 2.5f * 4 * s;
    b[1] -= 1.5f * 4 * s;
    q->fake_quantize(Variable(Tensor::from_vector({8}, b)), true);
    d = q->report();
    CHECK(d.exponents[0] == int(std::log2(s)) + 2);
    CHECK(d.flips == 0);
    CHECK(d.codes_changed_fraction == 2.0 / 8);
    // Evaluation passes do not count.
    q->fake_quantize(Variable(Tensor::from_vector({8}, a)), false);
    CHECK(q->report().step == 3);
}

namespace {

// Three training steps of a `method` quantizer from weights w0 with gradient g
// (the weights move by -0.5 g each step) at 1 thread and at each of `others`:
// outputs, state, scale parameters and their gradients, and the diagnostics'
// error must be the same bytes.
void check_same_at_thread_counts(const std::string& method, const QuantizerOptions& opt, const Tensor& w0,
                                 const Tensor& g, std::initializer_list<int> others) {
    auto run = [&](int threads) {
        omp_set_num_threads(threads);
        REQUIRE(omp_get_max_threads() == threads);
        auto q = make_quantizer(method, opt, w0.shape());
        std::vector<Tensor> outputs;
        Tensor w = w0.clone();
        for (int step = 0; step < 3; ++step) {
            outputs.push_back(train_step(*q, w, g));
            for (int64_t i = 0; i < w.numel(); ++i) w.f32()[i] -= 0.5f * g.f32()[i];
        }
        NamedTensors st = q->state();
        for (auto& [name, p] : q->named_parameters()) st.emplace_back(name, p->value().clone());
        for (auto& [name, p] : q->named_parameters()) st.emplace_back(name + ".grad", p->grad().clone());
        return std::tuple{outputs, st, q->report().error_per_element};
    };
    const auto [y1, s1, e1] = run(1);
    for (int threads : others) {
        CAPTURE(threads);
        const auto [y2, s2, e2] = run(threads);
        for (size_t i = 0; i < y1.size(); ++i) CHECK(same_bytes(y1[i], y2[i]));
        REQUIRE(s1.size() == s2.size());
        for (size_t i = 0; i < s1.size(); ++i) CHECK_MESSAGE(same_bytes(s1[i].second, s2[i].second), s1[i].first);
        CHECK(e1 == e2);
    }
    omp_set_num_threads(2);
}

}  // namespace

TEST_CASE("determinism: the same exponents and codes with 1 and 2 threads") {
    // 100k elements, 100 output channels of 1000.
    const Shape shape{100, 10, 10, 10};
    Tensor w0 = normal_tensor(shape, 31, 0.05f);
    for (int64_t c = 0; c < 100; ++c)  // varied ranges and a few outliers
        for (int64_t i = c * 1000; i < (c + 1) * 1000; ++i) w0.f32()[i] *= (1.0f + c % 7) * (i % 97 == 0 ? 6.0f : 1.0f);
    const Tensor g = normal_tensor(shape, 32, 1e-3f);
    QuantizerOptions opt;
    opt.per_channel = true;
    // Per channel: the groups are what threads split (one group is one thread's).
    for (const std::string& m : quantizer_methods()) {
        CAPTURE(m);
        check_same_at_thread_counts(m, opt, w0, g, {2});
    }
}

TEST_CASE("determinism: a per-tensor group of many chunks gives the same results at 1, 2 and 3 threads") {
    // 300k elements in one scale group: its passes are split into chunks that
    // the threads share (grid.h); the sums must not notice.
    const Shape shape{300, 1000};
    Tensor w0 = normal_tensor(shape, 41, 0.05f);
    for (int64_t i = 0; i < w0.numel(); i += 101) w0.f32()[i] *= 7.0f;  // outliers for the mask
    const Tensor g = normal_tensor(shape, 42, 1e-3f);
    REQUIRE(w0.numel() > 4 * kChunk);
    for (const std::string& m : quantizer_methods()) {
        CAPTURE(m);
        check_same_at_thread_counts(m, QuantizerOptions{}, w0, g, {2, 3});
    }
}
