// batch_norm_relu6: the same values, running statistics and gradients as
// relu6(batch_norm(x)) (which test_engine_vs_torch checks against PyTorch), in
// training and evaluation; gradients against finite differences; bad
// arguments named with the op.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::random_tensor;

namespace {

// gamma around 2 and beta around 3: the normalised values cover (0, 6) and
// both clipped ends.
Tensor around(float centre, int64_t channels, uint64_t seed) {
    Tensor t = random_tensor({channels}, seed, 0.3f);
    for (int64_t c = 0; c < channels; ++c) t.f32()[c] += centre;
    return t;
}

struct Run {
    Tensor y, running_mean, running_var, dx, dgamma, dbeta;
};

Run run(bool fused, bool training, bool x_requires_grad, const Tensor& x, const Tensor& gamma, const Tensor& beta,
        const Tensor& dy) {
    Variable xv(x, x_requires_grad), g(gamma, true), b(beta, true);
    Tensor rm = Tensor::full({gamma.numel()}, 0.25f);
    Tensor rv = Tensor::full({gamma.numel()}, 1.5f);
    Variable y = fused ? batch_norm_relu6(xv, g, b, rm, rv, training, 0.2f, 1e-4f)
                       : relu6(batch_norm(xv, g, b, rm, rv, training, 0.2f, 1e-4f));
    y.backward(dy);
    return {y.value(), rm, rv, x_requires_grad ? xv.grad() : Tensor(), g.grad(), b.grad()};
}

// How far the fused and the unfused op may differ, from the lengths of
// their sums (float_error.h): each is at most its own bound from the exact
// result, so they differ by at most twice it. Both normalise with the same
// statistics and both pass dy where the same value lies inside (0, 6) (the
// gate: both compute it with one function; the next test checks it
// exactly), so each computes:
// - y: batch norm within gamma(6) of batch_norm_magnitude, then the clamp,
//   which moves no two values apart;
// - dbeta = sum dy', dgamma = inv_std (sum dy' x - mean sum dy') over the
//   R rows, dy' the gated dy: double sums of exact products (each within
//   gamma_double(R + 2) of inv_std (sum |dy x| + |mean| sum |dy|)), rounded
//   once to float;
// - dx = s (dy' - dbeta / R - xhat dgamma / R) in training, s dy' in
//   evaluation: float products and sums of those terms, whose factors
//   a = -s inv_std dgamma / R and d = -s dbeta / R are rounded once each:
//   within gamma(6) of their magnitudes.
struct Bounds {
    Tensor y, dx;
    std::vector<double> dgamma, dbeta;
};

Bounds fused_vs_unfused(const Tensor& x, const Tensor& dy, const Tensor& gamma, const Tensor& beta, bool training,
                        const Run& f) {
    const int64_t channels = gamma.numel(), rows = x.numel() / channels;
    const testing::ChannelStats st =
        training ? testing::channel_stats(x)
                 : testing::ChannelStats{std::vector<double>(channels, 0.25), std::vector<double>(channels, 1.5)};
    Bounds b{testing::bound_from(testing::batch_norm_magnitude(x, gamma, beta, st, 1e-4f), 2 * testing::gamma_n(6), 1),
             Tensor::empty(x.shape()), std::vector<double>(channels, 0.0), std::vector<double>(channels, 0.0)};
    std::vector<double> sum_dy(channels, 0.0), sum_dy_x(channels, 0.0);
    for (int64_t i = 0; i < x.numel(); ++i) {
        sum_dy[i % channels] += std::fabs(dy.f32()[i]);
        sum_dy_x[i % channels] += std::fabs(double(dy.f32()[i]) * x.f32()[i]);
    }
    const double sums = testing::gamma_double_n(double(rows + 2));
    for (int64_t c = 0; c < channels; ++c) {
        const double inv_std = 1 / std::sqrt(st.var[c] + 1e-4);
        b.dbeta[c] = 2 * (testing::gamma_n(1) * std::fabs(f.dbeta.f32()[c]) + sums * sum_dy[c]);
        b.dgamma[c] = 2 * (testing::gamma_n(1) * std::fabs(f.dgamma.f32()[c]) +
                           sums * inv_std * (sum_dy_x[c] + std::fabs(st.mean[c]) * sum_dy[c]));
    }
    for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % channels;
        const double inv_std = 1 / std::sqrt(st.var[c] + 1e-4), s = std::fabs(gamma.f32()[c]) * inv_std;
        const double gated = f.y.f32()[i] > 0 && f.y.f32()[i] < 6 ? std::fabs(dy.f32()[i]) : 0.0;
        const double xhat = std::fabs(x.f32()[i] - st.mean[c]) * inv_std;
        const double statistics = (std::fabs(f.dbeta.f32()[c]) + xhat * std::fabs(f.dgamma.f32()[c])) / rows;
        const double terms = training ? gated + statistics : gated;
        b.dx.f32()[i] = float(s * terms);
    }
    b.dx = testing::bound_from(b.dx, 2 * testing::gamma_n(6), 1);
    return b;
}

// The largest |a - b| / bound over the channels.
double worst_channel_ratio(const Tensor& a, const Tensor& b, const std::vector<double>& bound) {
    double worst = 0;
    for (int64_t c = 0; c < a.numel(); ++c)
        worst = std::max(worst, std::fabs(double(a.f32()[c]) - b.f32()[c]) / bound[c]);
    return worst;
}

int64_t count_equal(const Tensor& t, float v) {
    int64_t n = 0;
    for (float e : t.to_vector()) n += e == v;
    return n;
}

}  // namespace

TEST_CASE("batch_norm_relu6 equals relu6(batch_norm(x)): values, running statistics, every gradient") {
    // 32768 values: several reduction blocks and the multi-threaded passes.
    const Shape s{8, 16, 16, 16};
    const Tensor x = random_tensor(s, 1, 2.0f), dy = random_tensor(s, 2);
    const Tensor gamma = around(2.0f, 16, 3), beta = around(3.0f, 16, 4);
    for (bool training : {true, false})
        for (bool x_requires_grad : {true, false}) {
            CAPTURE(training);
            CAPTURE(x_requires_grad);
            const Run f = run(true, training, x_requires_grad, x, gamma, beta, dy);
            const Run u = run(false, training, x_requires_grad, x, gamma, beta, dy);
            // Both ends are clipped somewhere, so the mask is exercised.
            CHECK(count_equal(f.y, 0.0f) > 100);
            CHECK(count_equal(f.y, 6.0f) > 100);
            const Bounds bound = fused_vs_unfused(x, dy, gamma, beta, training, f);
            testing::check_within_bound("y", f.y, u.y, bound.y);
            // The same statistics, computed by the same code: bit-identical.
            CHECK(f.running_mean.to_vector() == u.running_mean.to_vector());
            CHECK(f.running_var.to_vector() == u.running_var.to_vector());
            CHECK(worst_channel_ratio(f.dgamma, u.dgamma, bound.dgamma) <= 1.0);
            CHECK(worst_channel_ratio(f.dbeta, u.dbeta, bound.dbeta) <= 1.0);
            CHECK(f.dx.defined() == x_requires_grad);
            if (x_requires_grad) testing::check_within_bound("dx", f.dx, u.dx, bound.dx);
            if (training) {
                // Broken variants: normalised with the running statistics,
                // and dx with the statistics taken as constants (s dy').
                const Run with_running = run(false, false, x_requires_grad, x, gamma, beta, dy);
                testing::check_far_outside("y with the running statistics",
                                           testing::worst_bound_ratio(f.y, with_running.y, bound.y));
                if (x_requires_grad) {
                    const testing::ChannelStats st = testing::channel_stats(x);
                    Tensor constant_statistics = Tensor::empty(s);
                    for (int64_t i = 0; i < x.numel(); ++i) {
                        const int64_t c = i % 16;
                        const bool inside = f.y.f32()[i] > 0 && f.y.f32()[i] < 6;
                        constant_statistics.f32()[i] =
                            float(gamma.f32()[c] / std::sqrt(st.var[c] + 1e-4) * (inside ? dy.f32()[i] : 0.0f));
                    }
                    testing::check_far_outside("dx with the statistics taken as constants",
                                               testing::worst_bound_ratio(f.dx, constant_statistics, bound.dx));
                }
            }
        }
}

TEST_CASE("batch_norm_relu6 backward passes the gradient exactly where the output is inside (0, 6)") {
    // Backward recomputes the normalised value from x for the ReLU6 gate. With
    // dy = 1, dbeta[c] counts the elements the gate passes (a sum of ones in
    // double: exact), which must be the elements of channel c whose output
    // the forward pass left unclamped.
    const Shape s{8, 16, 16, 16};
    const Tensor x = random_tensor(s, 1, 2.0f), ones = Tensor::full(s, 1.0f);
    const Tensor gamma = around(2.0f, 16, 3), beta = around(3.0f, 16, 4);
    for (bool training : {true, false}) {
        CAPTURE(training);
        const Run f = run(true, training, true, x, gamma, beta, ones);
        std::vector<float> inside(16, 0.0f);
        const std::vector<float> y = f.y.to_vector();
        for (size_t i = 0; i < y.size(); ++i) inside[i % 16] += y[i] > 0.0f && y[i] < 6.0f;
        CHECK(f.dbeta.to_vector() == inside);
        CHECK(count_equal(f.y, 0.0f) > 100);
        CHECK(count_equal(f.y, 6.0f) > 100);
    }
}

TEST_CASE("batch_norm and batch_norm_relu6 give the same gradients when they write dx over dy") {
    // Backward writes dx over dy when only the graph holds dy (gradient_buffer):
    // here when dy comes from the op after them (mul_channel by ones, exact),
    // not when it is the seed the caller keeps.
    const Shape s{8, 16, 16, 16};
    const Tensor x = random_tensor(s, 1, 2.0f), dy = random_tensor(s, 2);
    const Tensor gamma = around(2.0f, 16, 3), beta = around(3.0f, 16, 4);
    for (bool fused : {true, false})
        for (bool training : {true, false}) {
            CAPTURE(fused);
            CAPTURE(training);
            std::vector<std::vector<float>> dx, dgamma;
            for (bool seed_is_dy : {true, false}) {
                Variable xv(x, true), g(gamma, true), b(beta, true);
                Tensor rm = Tensor::zeros({16}), rv = Tensor::full({16}, 1.0f);
                Variable y =
                    fused ? batch_norm_relu6(xv, g, b, rm, rv, training) : batch_norm(xv, g, b, rm, rv, training);
                if (!seed_is_dy) y = mul_channel(y, Variable(Tensor::full({16}, 1.0f)));
                y.backward(dy);
                dx.push_back(xv.grad().to_vector());
                dgamma.push_back(g.grad().to_vector());
            }
            CHECK(dx[0] == dx[1]);
            CHECK(dgamma[0] == dgamma[1]);
        }
    CHECK(dy.to_vector() == random_tensor(s, 2).to_vector());  // the caller's seed is untouched
}

TEST_CASE("batch_norm_relu6 gradients match finite differences, training and evaluation") {
    Tensor rm = Tensor::zeros({4}), rv = Tensor::full({4}, 1.0f);
    const std::vector<Tensor> inputs{random_tensor({3, 2, 3, 4}, 10), around(2.0f, 4, 11), around(3.0f, 4, 12)};
    SUBCASE("training") {
        testing::check_gradients(
            [&](const std::vector<Variable>& in) { return batch_norm_relu6(in[0], in[1], in[2], rm, rv, true); },
            inputs);
    }
    SUBCASE("evaluation") {
        rm = Tensor::from_vector({4}, {0.3f, -0.2f, 1, 0});
        rv = Tensor::from_vector({4}, {0.5f, 2, 1.5f, 0.8f});
        testing::check_gradients(
            [&](const std::vector<Variable>& in) { return batch_norm_relu6(in[0], in[1], in[2], rm, rv, false); },
            inputs);
    }
}

TEST_CASE("batch_norm_relu6 rejects bad arguments with the op's name") {
    Tensor rm = Tensor::zeros({4}), rv = Tensor::full({4}, 1.0f), bad = Tensor::zeros({3});
    const Variable x(random_tensor({2, 2, 2, 4}, 17)), g(Tensor::full({4}, 1.0f)), b(Tensor::zeros({4}));
    CHECK_THROWS_WITH_AS(batch_norm_relu6(Variable(Tensor::zeros({2, 4})), g, b, rm, rv, true),
                         doctest::Contains("batch_norm_relu6: input must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm_relu6(x, Variable(bad), b, rm, rv, true),
                         doctest::Contains("batch_norm_relu6: gamma must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm_relu6(x, g, b, rm, rv, true, 1.5f), doctest::Contains("momentum"), Error);
}
