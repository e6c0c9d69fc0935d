// batch_norm: forward against a direct double-precision computation, the
// running statistics after one and two steps, evaluation mode, gradients
// against finite differences in both modes, thread-count independence and
// bad arguments.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::random_tensor;

namespace {

// x {N,H,W,C} with channel c drawn around mean 3c - 2 with spread 1 + c.
Tensor channel_data(const Shape& s, uint64_t seed) {
    Tensor x = random_tensor(s, seed);
    const int64_t c_count = s[3];
    for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % c_count;
        x.f32()[i] = x.f32()[i] * (1.0f + c) + (3.0f * c - 2.0f);
    }
    return x;
}

struct Stats {
    std::vector<double> mean, biased_var;
};

Stats channel_stats(const Tensor& x) {
    const int64_t c_count = x.dim(3), rows = x.numel() / c_count;
    Stats s{std::vector<double>(c_count, 0.0), std::vector<double>(c_count, 0.0)};
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < c_count; ++c) s.mean[c] += x.f32()[r * c_count + c] / double(rows);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < c_count; ++c) {
            const double d = x.f32()[r * c_count + c] - s.mean[c];
            s.biased_var[c] += d * d / double(rows);
        }
    return s;
}

// gamma * (x - mean) / sqrt(var + eps) + beta, in double.
void check_normalised(const Tensor& y, const Tensor& x, const std::vector<double>& mean, const std::vector<double>& var,
                      const Tensor& gamma, const Tensor& beta, float eps) {
    const int64_t c_count = x.dim(3);
    double worst = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % c_count;
        const double expected =
            gamma.f32()[c] * (x.f32()[i] - mean[c]) / std::sqrt(var[c] + eps) + beta.f32()[c];
        worst = std::max(worst, std::fabs(y.f32()[i] - expected));
    }
    CHECK(worst < 2e-5);
}

}  // namespace

TEST_CASE("batch_norm training: zero mean, unit variance, then the affine") {
    const Shape s{4, 3, 5, 6};
    const Tensor x = channel_data(s, 1);
    Tensor rm = Tensor::zeros({6}), rv = Tensor::full({6}, 1.0f);
    Variable y = batch_norm(Variable(x), Variable(Tensor::full({6}, 1.0f)), Variable(Tensor::zeros({6})), rm, rv, true);
    const Stats out = channel_stats(y.value());
    const Stats in = channel_stats(x);
    for (int c = 0; c < 6; ++c) {
        CHECK(std::fabs(out.mean[c]) < 1e-6);
        // var / (var + eps): within 1e-5 of 1 for these spreads
        CHECK(out.biased_var[c] == doctest::Approx(in.biased_var[c] / (in.biased_var[c] + 1e-5)).epsilon(1e-5));
    }
    const Tensor gamma = random_tensor({6}, 2), beta = random_tensor({6}, 3);
    Variable z = batch_norm(Variable(x), Variable(gamma), Variable(beta), rm, rv, true, 0.1f, 1e-3f);
    check_normalised(z.value(), x, in.mean, in.biased_var, gamma, beta, 1e-3f);
}

TEST_CASE("batch_norm training: a large channel mean costs no precision") {
    Tensor x = random_tensor({8, 4, 4, 2}, 4);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += 1000.0f;
    Tensor rm = Tensor::zeros({2}), rv = Tensor::full({2}, 1.0f);
    const Tensor gamma = Tensor::full({2}, 1.0f), beta = Tensor::zeros({2});
    Variable y = batch_norm(Variable(x), Variable(gamma), Variable(beta), rm, rv, true);
    const Stats in = channel_stats(x);
    check_normalised(y.value(), x, in.mean, in.biased_var, gamma, beta, 1e-5f);
}

TEST_CASE("batch_norm running statistics follow PyTorch's update over two steps") {
    const Shape s{2, 3, 3, 4};
    const Tensor x1 = channel_data(s, 5), x2 = channel_data(s, 6);
    Tensor rm = Tensor::from_vector({4}, {0.5f, -1, 2, 0});
    Tensor rv = Tensor::from_vector({4}, {1, 2, 0.5f, 3});
    std::vector<double> em(rm.f32(), rm.f32() + 4), ev(rv.f32(), rv.f32() + 4);
    const double momentum = 0.25, n = 18;  // values per channel: N*H*W
    for (const Tensor* x : {&x1, &x2}) {
        batch_norm(Variable(*x), Variable(Tensor::full({4}, 1.0f)), Variable(Tensor::zeros({4})), rm, rv, true,
                   float(momentum));
        const Stats st = channel_stats(*x);
        for (int c = 0; c < 4; ++c) {
            em[c] = (1 - momentum) * em[c] + momentum * st.mean[c];
            ev[c] = (1 - momentum) * ev[c] + momentum * st.biased_var[c] * n / (n - 1);  // unbiased
            CHECK(rm.f32()[c] == doctest::Approx(em[c]).epsilon(1e-6));
            CHECK(rv.f32()[c] == doctest::Approx(ev[c]).epsilon(1e-6));
        }
    }
}

TEST_CASE("batch_norm evaluation normalises with the running statistics and leaves them alone") {
    const Shape s{2, 2, 3, 3};
    const Tensor x = channel_data(s, 7);
    Tensor rm = Tensor::from_vector({3}, {-1.5f, 0.5f, 4}), rv = Tensor::from_vector({3}, {0.5f, 2, 9});
    const Tensor rm0 = rm.clone(), rv0 = rv.clone();
    const Tensor gamma = random_tensor({3}, 8), beta = random_tensor({3}, 9);
    Variable y = batch_norm(Variable(x), Variable(gamma), Variable(beta), rm, rv, false);
    check_normalised(y.value(), x, {-1.5, 0.5, 4}, {0.5, 2, 9}, gamma, beta, 1e-5f);
    CHECK(rm.to_vector() == rm0.to_vector());
    CHECK(rv.to_vector() == rv0.to_vector());
    // Even with a single value per channel (allowed in evaluation only).
    Tensor one = Tensor::from_vector({1, 1, 1, 3}, {0, 1, 2});
    CHECK(batch_norm(Variable(one), Variable(gamma), Variable(beta), rm, rv, false).shape() == one.shape());
}

TEST_CASE("batch_norm gradients match finite differences, training and evaluation") {
    Tensor rm = Tensor::zeros({4}), rv = Tensor::full({4}, 1.0f);
    const std::vector<Tensor> inputs{random_tensor({3, 2, 3, 4}, 10), random_tensor({4}, 11), random_tensor({4}, 12)};
    SUBCASE("training") {
        testing::check_gradients(
            [&](const std::vector<Variable>& in) { return batch_norm(in[0], in[1], in[2], rm, rv, true); }, inputs);
    }
    SUBCASE("evaluation") {
        rm = Tensor::from_vector({4}, {0.3f, -0.2f, 1, 0});
        rv = Tensor::from_vector({4}, {0.5f, 2, 1.5f, 0.8f});
        testing::check_gradients(
            [&](const std::vector<Variable>& in) { return batch_norm(in[0], in[1], in[2], rm, rv, false); }, inputs);
    }
}

TEST_CASE("batch_norm results do not depend on the thread count") {
    // 262144 values: several reduction blocks.
    const Tensor x = channel_data({16, 16, 16, 64}, 13), dy = random_tensor({16, 16, 16, 64}, 14);
    const Tensor gamma = random_tensor({64}, 15), beta = random_tensor({64}, 16);
    auto run = [&](int threads) {
        set_compute_threads(threads);
        Variable xv(x, true), g(gamma, true), b(beta, true);
        Tensor rm = Tensor::zeros({64}), rv = Tensor::full({64}, 1.0f);
        Variable y = batch_norm(xv, g, b, rm, rv, true);
        y.backward(dy);
        return std::vector<std::vector<float>>{y.value().to_vector(), rm.to_vector(),       rv.to_vector(),
                                               xv.grad().to_vector(), g.grad().to_vector(), b.grad().to_vector()};
    };
    const int threads = compute_threads();
    const auto one = run(1);
    CHECK(one == run(2));
    CHECK(one == run(3));
    set_compute_threads(threads);
}

TEST_CASE("batch_norm rejects bad arguments with the op's name") {
    Tensor rm = Tensor::zeros({4}), rv = Tensor::full({4}, 1.0f), bad = Tensor::zeros({3});
    const Variable x(random_tensor({2, 2, 2, 4}, 17)), g(Tensor::full({4}, 1.0f)), b(Tensor::zeros({4}));
    CHECK_THROWS_WITH_AS(batch_norm(Variable(Tensor::zeros({2, 4})), g, b, rm, rv, true),
                         doctest::Contains("batch_norm: input must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(x, Variable(bad), b, rm, rv, true), doctest::Contains("gamma must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(x, g, Variable(), rm, rv, true), doctest::Contains("beta must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(x, g, b, bad, rv, true), doctest::Contains("running_mean must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(x, g, b, rm, bad, false), doctest::Contains("running_var must be"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(x, g, b, rm, rv, true, 1.5f), doctest::Contains("momentum"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(x, g, b, rm, rv, true, 0.1f, 0.0f), doctest::Contains("eps"), Error);
    CHECK_THROWS_WITH_AS(batch_norm(Variable(Tensor::zeros({1, 1, 1, 4})), g, b, rm, rv, true),
                         doctest::Contains("more than one value per channel"), Error);
}
