// Deferred second moments (quant/quantizer.h): a backward that keeps its
// gradient pending and an apply_second_moments() later give the same M, and
// so the same exponents, as the immediate update; the pending gradient is the
// one the update uses.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "engine/random.h"
#include "quant/quantizer.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::error_message;
using hfq::testing::state_tensor;

namespace {

std::vector<float> normal_values(int64_t n, Rng& rng, float scale) {
    std::vector<float> v(n);
    for (float& x : v) x = scale * rng.normal();
    return v;
}

QuantizerOptions options_for(bool per_channel) {
    QuantizerOptions opt;
    opt.per_channel = per_channel;
    opt.second_moments_decay = 0.9f;  // M follows the gradients quickly: it matters for the exponents
    return opt;
}

// One quantizer trained step by step on changing weights: fake_quantize,
// backward with the step's gradient, then (learnable-po2) a step of e.
struct Trainee {
    std::unique_ptr<Quantizer> q;
    Variable w;
    bool deferred;

    Trainee(const std::string& method, bool per_channel, const Shape& shape, const std::vector<float>& w0, bool defer)
        : q(make_quantizer(method, options_for(per_channel), shape)),
          w(Tensor::from_vector(shape, w0), true),
          deferred(defer) {
        q->defer_second_moments(defer);
    }

    void step(const std::vector<float>& grad, const std::vector<float>& dw) {
        w.zero_grad();
        for (auto& [name, p] : q->named_parameters()) p->zero_grad();
        Variable y = q->fake_quantize(w, true);
        const Tensor m_before = state_tensor(*q, "second_moment");
        y.backward(Tensor::from_vector(w.shape(), grad));
        // The weights move before apply: the pending update must not see it.
        float* pw = w.value().f32();
        for (size_t i = 0; i < dw.size(); ++i) pw[i] += dw[i];
        if (deferred) {
            CHECK(state_tensor(*q, "second_moment").to_vector() == m_before.to_vector());
            REQUIRE(q->pending_second_moment_gradient() != nullptr);
            CHECK(q->pending_second_moment_gradient()->to_vector() == grad);
            q->apply_second_moments();
        }
        CHECK(q->pending_second_moment_gradient() == nullptr);
        for (auto& [name, p] : q->named_parameters()) {
            float* e = p->value().f32();
            // A signed step: e moves by a bounded amount, across roundings.
            for (int64_t g = 0; g < p->value().numel(); ++g) e[g] -= p->grad().f32()[g] > 0 ? 0.3f : -0.3f;
        }
    }
};

}  // namespace

TEST_CASE("deferred second moments: the same M and exponents as the immediate update, step by step") {
    for (const std::string method : {"msqe-po2", "learnable-po2"}) {
        for (const bool per_channel : {false, true}) {
            CAPTURE(method);
            CAPTURE(per_channel);
            // Per channel 8 x 2048: the groups run in parallel (grid.h, for_each_group).
            const Shape shape = per_channel ? Shape{8, 2048} : Shape{300};
            const int64_t n = shape_numel(shape);
            Rng rng(17);
            const std::vector<float> w0 = normal_values(n, rng, 0.1f);
            Trainee immediate(method, per_channel, shape, w0, false);
            Trainee deferred(method, per_channel, shape, w0, true);
            for (int step = 0; step < 6; ++step) {
                CAPTURE(step);
                const std::vector<float> grad = normal_values(n, rng, float(1 + step % 3));
                const std::vector<float> dw = normal_values(n, rng, 0.02f);
                immediate.step(grad, dw);
                deferred.step(grad, dw);
                CHECK(state_tensor(*deferred.q, "second_moment").to_vector() ==
                      state_tensor(*immediate.q, "second_moment").to_vector());
                const std::vector<int> e = immediate.q->report().exponents;
                CHECK(deferred.q->report().exponents == e);
                // The rest of the backward is immediate either way.
                CHECK(deferred.w.grad().to_vector() == immediate.w.grad().to_vector());
                CHECK(deferred.w.value().to_vector() == immediate.w.value().to_vector());
                for (size_t k = 0; k < immediate.q->named_parameters().size(); ++k)
                    CHECK(deferred.q->named_parameters()[k].second->value().to_vector() ==
                          immediate.q->named_parameters()[k].second->value().to_vector());
            }
            CHECK(state_tensor(*immediate.q, "second_moment").to_vector() != std::vector<float>(n, 1.0f));
        }
    }
}

TEST_CASE("deferred second moments: the update uses the pending gradient as changed by the caller") {
    for (const std::string method : {"msqe-po2", "learnable-po2"}) {
        for (const bool per_channel : {false, true}) {
            CAPTURE(method);
            CAPTURE(per_channel);
            const Shape shape = per_channel ? Shape{4, 25} : Shape{100};
            Rng rng(3);
            const std::vector<float> w0 = normal_values(100, rng, 0.1f);
            const std::vector<float> g = normal_values(100, rng, 1.0f);
            std::vector<float> doubled = g;
            for (float& v : doubled) v *= 2;

            auto a = make_quantizer(method, options_for(per_channel), shape);
            Variable wa(Tensor::from_vector(shape, w0), true);
            a->fake_quantize(wa, true).backward(Tensor::from_vector(shape, doubled));

            auto b = make_quantizer(method, options_for(per_channel), shape);
            b->defer_second_moments(true);
            Variable wb(Tensor::from_vector(shape, w0), true);
            b->fake_quantize(wb, true).backward(Tensor::from_vector(shape, g));
            CHECK(wb.grad().to_vector() != wa.grad().to_vector());  // dL/dweight was the undoubled one
            Tensor* pending = b->pending_second_moment_gradient();
            REQUIRE(pending != nullptr);
            for (int64_t i = 0; i < pending->numel(); ++i) pending->f32()[i] *= 2;
            b->apply_second_moments();
            CHECK(state_tensor(*b, "second_moment").to_vector() == state_tensor(*a, "second_moment").to_vector());
        }
    }
}

TEST_CASE("deferred second moments: nothing pending, evaluation, a second backward, load_state") {
    Rng rng(5);
    const std::vector<float> w0 = normal_values(64, rng, 0.1f);
    const std::vector<float> g = normal_values(64, rng, 1.0f);
    auto q = make_quantizer("msqe-po2", options_for(false), {64});
    Variable w(Tensor::from_vector({64}, w0), true);

    // Apply with nothing pending changes nothing, before and after a step.
    q->apply_second_moments();
    CHECK(state_tensor(*q, "second_moment").to_vector() == std::vector<float>(64, 1.0f));
    q->fake_quantize(w, true).backward(Tensor::from_vector({64}, g));
    const std::vector<float> m1 = state_tensor(*q, "second_moment").to_vector();
    CHECK(q->pending_second_moment_gradient() == nullptr);
    q->apply_second_moments();
    CHECK(state_tensor(*q, "second_moment").to_vector() == m1);

    // An evaluation-mode backward updates no M, so defers nothing.
    q->defer_second_moments(true);
    q->fake_quantize(w, false).backward(Tensor::from_vector({64}, g));
    CHECK(q->pending_second_moment_gradient() == nullptr);

    // A second training backward before apply is refused, deferring or not.
    q->fake_quantize(w, true).backward(Tensor::from_vector({64}, g));
    REQUIRE(q->pending_second_moment_gradient() != nullptr);
    Variable again = q->fake_quantize(w, true);
    CHECK(error_message([&] { again.backward(Tensor::from_vector({64}, g)); }).find("apply_second_moments") !=
          std::string::npos);
    q->defer_second_moments(false);
    Variable immediate = q->fake_quantize(w, true);
    CHECK(error_message([&] { immediate.backward(Tensor::from_vector({64}, g)); }).find("pending") !=
          std::string::npos);
    CHECK(state_tensor(*q, "second_moment").to_vector() == m1);
    q->apply_second_moments();
    CHECK(q->pending_second_moment_gradient() == nullptr);
    CHECK(state_tensor(*q, "second_moment").to_vector() != m1);

    // load_state drops a pending gradient: it belonged to the M replaced.
    q->defer_second_moments(true);
    const std::vector<float> saved_m = state_tensor(*q, "second_moment").to_vector();
    const NamedTensors saved = q->state();
    q->fake_quantize(w, true).backward(Tensor::from_vector({64}, g));
    REQUIRE(q->pending_second_moment_gradient() != nullptr);
    q->load_state(saved);
    CHECK(q->pending_second_moment_gradient() == nullptr);
    q->apply_second_moments();
    CHECK(state_tensor(*q, "second_moment").to_vector() == saved_m);
}

TEST_CASE("deferred second moments: a quantizer without them has nothing pending") {
    Rng rng(9);
    const std::vector<float> w0 = normal_values(40, rng, 0.1f);
    const std::vector<float> g = normal_values(40, rng, 1.0f);
    QuantizerOptions no_m;
    no_m.second_moments = false;
    const std::vector<std::pair<std::string, QuantizerOptions>> cases{
        {"msqe-baseline", {}}, {"lsq", {}}, {"msqe-po2", no_m}, {"learnable-po2", no_m}};
    for (const auto& [method, opt] : cases) {
        CAPTURE(method);
        auto q = make_quantizer(method, opt, {40});
        q->defer_second_moments(true);
        Variable w(Tensor::from_vector({40}, w0), true);
        for (int step = 0; step < 2; ++step) {  // a second backward is no "second pending" either
            w.zero_grad();
            q->fake_quantize(w, true).backward(Tensor::from_vector({40}, g));
            CHECK(q->pending_second_moment_gradient() == nullptr);
            q->apply_second_moments();
        }
        for (const auto& [name, t] : q->state()) CHECK(name != "second_moment");
    }
}
