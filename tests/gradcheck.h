// Numerical gradient check used by every op's test.
//
// For an op f(inputs) -> output, the analytic gradient of the scalar
// L = sum(R * f(inputs)), R a fixed random tensor, is compared with central
// finite differences (L(x + h) - L(x - h)) / 2h at up to `max_points`
// positions of every input (all positions when the input is small).
// L is accumulated in double so that the differences are not lost in f32
// rounding of the sum.
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "engine/autograd.h"
#include "engine/random.h"
#include "engine/tensor.h"

namespace hfq::testing {

inline Tensor random_tensor(const Shape& shape, uint64_t seed, float scale = 1.0f) {
    Rng rng(seed);
    Tensor t = Tensor::empty(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = scale * rng.normal();
    return t;
}

inline double weighted_sum(const Tensor& out, const Tensor& r) {
    double s = 0;
    for (int64_t i = 0; i < out.numel(); ++i) s += double(out.f32()[i]) * r.f32()[i];
    return s;
}

using OpFn = std::function<Variable(const std::vector<Variable>&)>;

struct GradCheckOptions {
    double step = 1e-3;          // finite-difference step h
    double tolerance = 2e-2;     // |analytic - numeric| <= tolerance * max(1, |numeric|) ... scaled below
    double abs_tolerance = 2e-3;
    int max_points = 64;         // positions checked per input
    std::vector<bool> check;     // which inputs to check (default: all)
    uint64_t seed = 7;
};

// Runs the check; failures are reported through doctest with the input index
// and the element position.
inline void check_gradients(const OpFn& f, const std::vector<Tensor>& inputs, GradCheckOptions opt = {}) {
    std::vector<Variable> vars;
    for (const Tensor& t : inputs) vars.emplace_back(t.clone(), true);
    Variable out = f(vars);
    const Tensor r = random_tensor(out.shape(), opt.seed);
    out.backward(r);

    Rng pick(opt.seed + 1);
    for (size_t i = 0; i < inputs.size(); ++i) {
        if (!opt.check.empty() && !opt.check[i]) continue;
        const Tensor& analytic = vars[i].grad();
        REQUIRE_MESSAGE(analytic.defined(), "input ", i, " received no gradient");
        const int64_t n = inputs[i].numel();
        const bool all = n <= opt.max_points;
        for (int64_t k = 0; k < (all ? n : opt.max_points); ++k) {
            const int64_t j = all ? k : static_cast<int64_t>(pick.below(n));
            auto loss_at = [&](double delta) {
                std::vector<Variable> probe;
                for (size_t m = 0; m < inputs.size(); ++m) probe.emplace_back(inputs[m].clone(), false);
                probe[i].value().f32()[j] += static_cast<float>(delta);
                NoGradGuard no_grad;
                return weighted_sum(f(probe).value(), r);
            };
            // Use the actually representable perturbation for the quotient.
            const float x0 = inputs[i].f32()[j];
            const double hp = double(x0 + float(opt.step)) - x0;
            const double hm = x0 - double(x0 - float(opt.step));
            const double numeric = (loss_at(opt.step) - loss_at(-opt.step)) / (hp + hm);
            const double a = analytic.f32()[j];
            INFO("input ", i, " element ", j, ": analytic ", a, " numeric ", numeric);
            CHECK(std::fabs(a - numeric) <= opt.abs_tolerance + opt.tolerance * std::fabs(numeric));
        }
    }
}

}  // namespace hfq::testing
