// linear: values against a direct double loop, with and without bias,
// finite-difference gradients, bad arguments.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"
#include "engine/tensor_math.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::random_tensor;

namespace {

// y[n, o] = sum_i x[n, i] * w[o, i] + b[o]
Tensor reference_linear(const Tensor& x, const Tensor& w, const Tensor* b) {
    const int64_t n = x.dim(0), in = x.dim(1), out = w.dim(0);
    Tensor y = Tensor::empty({n, out});
    for (int64_t r = 0; r < n; ++r)
        for (int64_t o = 0; o < out; ++o) {
            double s = b ? b->f32()[o] : 0.0;
            for (int64_t i = 0; i < in; ++i) s += double(x.f32()[r * in + i]) * w.f32()[o * in + i];
            y.f32()[r * out + o] = static_cast<float>(s);
        }
    return y;
}

}  // namespace

TEST_CASE("linear on a hand example") {
    const Tensor x = Tensor::from_vector({1, 3}, {1, 2, 3});
    const Tensor w = Tensor::from_vector({2, 3}, {1, 0, -1, 0.5f, 0.5f, 0.5f});
    const Tensor b = Tensor::from_vector({2}, {10, -3});
    CHECK(linear(Variable(x), Variable(w), Variable(b)).value().to_vector() == std::vector<float>{8, 0});
    CHECK(linear(Variable(x), Variable(w), Variable()).value().to_vector() == std::vector<float>{-2, 3});
}

TEST_CASE("linear matches a direct loop and finite differences") {
    const Tensor x = random_tensor({5, 7}, 1), w = random_tensor({3, 7}, 2), b = random_tensor({3}, 3);
    // Each output is b + a dot product of length 7: in float, in any order,
    // within gamma(7 + 2) of its magnitude |b| + sum |x| |w| (the loop on
    // magnitudes); the loop's double sum is rounded once (one more), the
    // magnitude too (bound_from).
    const Tensor ax = testing::abs_of(x), aw = testing::abs_of(w), ab = testing::abs_of(b);
    const Tensor bound = testing::bound_from(reference_linear(ax, aw, &ab), testing::gamma_n(7 + 3), 1);
    const Tensor bound_no_bias = testing::bound_from(reference_linear(ax, aw, nullptr), testing::gamma_n(7 + 3), 1);
    const Tensor y = linear(Variable(x), Variable(w), Variable(b)).value();
    testing::check_within_bound("linear vs the loop", y, reference_linear(x, w, &b), bound);
    testing::check_within_bound("linear without bias vs the loop", linear(Variable(x), Variable(w), Variable()).value(),
                                reference_linear(x, w, nullptr), bound_no_bias);
    testing::check_far_outside("linear vs the loop with the bias left out",
                               testing::worst_bound_ratio(y, reference_linear(x, w, nullptr), bound));
    testing::check_gradients([](const std::vector<Variable>& in) { return linear(in[0], in[1], in[2]); }, {x, w, b});
    testing::check_gradients([](const std::vector<Variable>& in) { return linear(in[0], in[1], Variable()); }, {x, w});
}

TEST_CASE("linear gradients only where needed, and a larger layer") {
    // A frozen input (the features of a frozen backbone) gets no gradient.
    const Tensor x = random_tensor({4, 64}, 4), w = random_tensor({10, 64}, 5, 0.1f), b = random_tensor({10}, 6);
    Variable xv(x), wv(w, true), bv(b, true);
    Variable y = linear(xv, wv, bv);
    y.backward(Tensor::full({4, 10}, 1.0f));
    CHECK(!xv.grad().defined());
    // With dy = 1: db[o] = N exactly (a sum of ones), dW[o, i] = sum_n x[n, i],
    // 4 exact products dy x: within gamma(4 + 1) of sum_n |x[n, i]| (the
    // double sum here errs by 3 2^-53 of it, inside gamma's slack).
    for (int64_t o = 0; o < 10; ++o) CHECK(bv.grad().f32()[o] == 4.0f);
    double worst = 0, worst_three_samples = 0;
    for (int64_t i = 0; i < 64; ++i) {
        double col = 0, magnitude = 0;
        for (int64_t n = 0; n < 3; ++n) col += x.f32()[n * 64 + i];
        const double three_samples = col;  // a wrong sum: the last sample left out
        col += x.f32()[3 * 64 + i];
        for (int64_t n = 0; n < 4; ++n) magnitude += std::fabs(x.f32()[n * 64 + i]);
        const double dw = wv.grad().f32()[3 * 64 + i], bound = testing::gamma_n(4 + 1) * magnitude;
        worst = std::max(worst, std::fabs(dw - col) / bound);
        worst_three_samples = std::max(worst_three_samples, std::fabs(dw - three_samples) / bound);
    }
    CHECK(worst <= 1.0);
    testing::check_far_outside("dW against the sum of three of the four samples", worst_three_samples);
    testing::check_gradients([](const std::vector<Variable>& in) { return linear(in[0], in[1], in[2]); },
                             {random_tensor({8, 100}, 7), random_tensor({20, 100}, 8, 0.1f), random_tensor({20}, 9)});
}

TEST_CASE("linear rejects bad arguments") {
    const Variable x(Tensor::zeros({2, 3})), w(Tensor::zeros({4, 3}));
    CHECK_THROWS_WITH_AS(linear(x, Variable(Tensor::zeros({4, 5})), Variable()),
                         doctest::Contains("linear: need f32 input {N,In} and weight {Out,In} with matching In, got "
                                           "input [2, 3] and weight [4, 5]"),
                         Error);
    CHECK_THROWS_WITH_AS(linear(Variable(Tensor::zeros({2, 3, 1})), w, Variable()), doctest::Contains("linear:"),
                         Error);
    CHECK_THROWS_WITH_AS(linear(x, w, Variable(Tensor::zeros({3}))),
                         doctest::Contains("linear: bias must have shape [4]"), Error);
    CHECK_THROWS_WITH_AS(linear(x, Variable(), Variable()), doctest::Contains("linear: weight is undefined"), Error);
}

TEST_CASE("linear results do not depend on the thread count") {
    // A classifier-like shape for which oneDNN's gemm would split the sum over In.
    const Tensor x = random_tensor({128, 1024}, 10), w = random_tensor({1000, 1024}, 11, 0.05f),
                 b = random_tensor({1000}, 12);
    const Tensor dy = random_tensor({128, 1000}, 13);
    auto run = [&](int threads) {
        set_compute_threads(threads);
        Variable xv(x, true), wv(w, true), bv(b, true);
        Variable y = linear(xv, wv, bv);
        y.backward(dy);
        return std::vector<std::vector<float>>{y.value().to_vector(), xv.grad().to_vector(), wv.grad().to_vector(),
                                               bv.grad().to_vector()};
    };
    const int threads = compute_threads();
    const auto one = run(1);
    CHECK(one == run(2));
    CHECK(one == run(3));
    CHECK(compute_threads() == 3);  // the thread count is restored after each call
    set_compute_threads(threads);
}
