// Numerical gradient check used by every op's test.
//
// For an op f(inputs) -> output, the analytic gradient a of the scalar
// L = sum(R * f(inputs)), R a fixed random tensor, is compared with the
// central difference q = (L(x + h) - L(x - h)) / (h+ + h-) at up to
// `max_points` positions of every input (all positions when the input is
// small); h+ and h- are the steps x0 + h and x0 - h actually take in float.
// L is summed in double from f's float32 outputs. q differs from L'(x0) by
// - truncation, h^2/6 |L'''| (and (h+ - h-)/2 |L''|, h+ - h- at most an ulp
//   of x0). Relative to L' that is about (h/s)^2 / 6 for a feature of scale s
//   (softmax's logits, a batch's spread; kinks the tests keep 0.1 away):
//   below 1e-3 for s >= 13 h, 1.7e-7 at the default h = 1e-3 for s = 1.
// - rounding of f. An output that does not depend on x0 is bit-identical in
//   both evaluations (f is deterministic) and cancels exactly. Each output
//   that moved carries a float32 error in each evaluation: its final
//   rounding, at most u max|f|, plus those of the intermediates it is
//   computed from (partial sums, a normalised value), first order a few
//   more of the same size. Taking each within kForwardRoundings u max|f|,
//   the difference is off by at most 2 kForwardRoundings u max|f| times
//   sum |R| over the moved outputs (rounding errors of many outputs add
//   like a random walk, far less), plus the double sums' own error; q by
//   that over h+ + h-. This term is computed at every point.
// The analytic gradient carries its own float32 error, not divided by h: a
// sum of n terms is within gamma(n) of their magnitudes, first order
// (blocked sums, errors of either sign) far less. Hence
//   |a - q| <= tolerance |q| + rounding + abs_tolerance,
// tolerance = 1e-3 covering the truncation and the analytic rounding (all
// of gamma(n) up to n = 16000 for terms of one sign); abs_tolerance is for
// an op whose forward error the model above does not cover.
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "engine/autograd.h"
#include "engine/random.h"
#include "engine/tensor.h"
#include "tests/float_error.h"

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
    double tolerance = 1e-3;     // relative to |numeric| (see the top of the file)
    double abs_tolerance = 0.0;  // added to the bound
    int max_points = 64;         // positions checked per input
    std::vector<bool> check;     // which inputs to check (default: all)
    uint64_t seed = 7;
};

// Roundings of size u max|f| one output of f carries, first order.
constexpr double kForwardRoundings = 4;

// How far rounding can move L(x + h) - L(x - h), from the two outputs.
inline double rounding_of_difference(const Tensor& up, const Tensor& down, const Tensor& r) {
    double largest = 0, moved = 0, magnitude = 0;
    for (int64_t k = 0; k < up.numel(); ++k) {
        const double a = std::fabs(up.f32()[k]), b = std::fabs(down.f32()[k]), rk = std::fabs(r.f32()[k]);
        largest = std::max({largest, a, b});
        if (up.f32()[k] != down.f32()[k]) moved += rk;
        magnitude += rk * (a + b);
    }
    // The products r f are exact in double; each of the two sums is within
    // gamma_double(n) of its magnitude.
    return 2 * kForwardRoundings * kUnitRoundoff * largest * moved + gamma_double_n(double(up.numel())) * magnitude;
}

// One checked position: element `element` of input `input`.
struct GradientPoint {
    size_t input;
    int64_t element;
    double analytic, numeric, bound;
    // |analytic - numeric| / bound (0 when they are equal).
    double ratio() const {
        const double d = std::fabs(analytic - numeric);
        return d == 0 ? 0.0 : d / bound;
    }
};

// The analytic and numeric gradients, and the bound of their difference, at
// every checked position.
inline std::vector<GradientPoint> gradient_points(const OpFn& f, const std::vector<Tensor>& inputs,
                                                  const GradCheckOptions& opt = {}) {
    std::vector<Variable> vars;
    for (const Tensor& t : inputs) vars.emplace_back(t.clone(), true);
    Variable out = f(vars);
    const Tensor r = random_tensor(out.shape(), opt.seed);
    out.backward(r);

    std::vector<GradientPoint> points;
    Rng pick(opt.seed + 1);
    for (size_t i = 0; i < inputs.size(); ++i) {
        if (!opt.check.empty() && !opt.check[i]) continue;
        const Tensor& analytic = vars[i].grad();
        REQUIRE_MESSAGE(analytic.defined(), "input ", i, " received no gradient");
        const int64_t n = inputs[i].numel();
        const bool all = n <= opt.max_points;
        for (int64_t k = 0; k < (all ? n : opt.max_points); ++k) {
            const int64_t j = all ? k : static_cast<int64_t>(pick.below(n));
            auto output_at = [&](float delta) {
                std::vector<Variable> probe;
                for (size_t m = 0; m < inputs.size(); ++m) probe.emplace_back(inputs[m].clone(), false);
                probe[i].value().f32()[j] += delta;
                NoGradGuard no_grad;
                return f(probe).value();
            };
            const float h = static_cast<float>(opt.step), x0 = inputs[i].f32()[j];
            const Tensor up = output_at(h), down = output_at(-h);
            const double steps = (double(x0 + h) - x0) + (x0 - double(x0 - h));  // h+ + h-
            const double numeric = (weighted_sum(up, r) - weighted_sum(down, r)) / steps;
            const double bound =
                opt.tolerance * std::fabs(numeric) + rounding_of_difference(up, down, r) / steps + opt.abs_tolerance;
            points.push_back({i, j, analytic.f32()[j], numeric, bound});
        }
    }
    return points;
}

// The largest ratio() over the points (<= 1: all within their bounds).
inline double worst_ratio(const std::vector<GradientPoint>& points) {
    double worst = 0;
    for (const GradientPoint& p : points) worst = std::max(worst, p.ratio());
    return worst;
}

// Runs the check; failures are reported through doctest with the input index
// and the element position. HFQ_SHOW_ERRORS=1 prints the worst ratio.
inline void check_gradients(const OpFn& f, const std::vector<Tensor>& inputs, GradCheckOptions opt = {}) {
    const std::vector<GradientPoint> points = gradient_points(f, inputs, opt);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE("gradient check: worst |a - q| / bound = ", worst_ratio(points));
    for (const GradientPoint& p : points) {
        INFO("input ", p.input, " element ", p.element, ": analytic ", p.analytic, " numeric ", p.numeric, " bound ",
             p.bound);
        CHECK(p.ratio() <= 1.0);
    }
}

}  // namespace hfq::testing
