// batch_norm: forward against a direct double-precision computation, the
// running statistics after one and two steps, evaluation mode, gradients
// against finite differences in both modes, thread-count independence and
// bad arguments.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::channel_stats;
using testing::ChannelStats;
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

// Batch norm's output computed in double, gamma (x - mean) / sqrt(var + eps)
// + beta, rounded to float.
Tensor normalised(const Tensor& x, const ChannelStats& st, const Tensor& gamma, const Tensor& beta, float eps) {
    const int64_t channels = x.dim(3);
    Tensor y = Tensor::empty(x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % channels;
        y.f32()[i] = float(gamma.f32()[c] * (x.f32()[i] - st.mean[c]) / std::sqrt(st.var[c] + eps) + beta.f32()[c]);
    }
    return y;
}

// hfq's output is within gamma(6) of batch_norm_magnitude (float_error.h),
// normalised()'s rounding to float is one more.
Tensor normalised_bound(const Tensor& x, const ChannelStats& st, const Tensor& gamma, const Tensor& beta, float eps) {
    return testing::bound_from(testing::batch_norm_magnitude(x, gamma, beta, st, eps), testing::gamma_n(7), 1);
}

}  // namespace

TEST_CASE("batch_norm training: zero mean, unit variance, then the affine") {
    const Shape s{4, 3, 5, 6};
    const Tensor x = channel_data(s, 1);
    Tensor rm = Tensor::zeros({6}), rv = Tensor::full({6}, 1.0f);
    const Tensor ones = Tensor::full({6}, 1.0f), zeros = Tensor::zeros({6});
    Variable y = batch_norm(Variable(x), Variable(ones), Variable(zeros), rm, rv, true);
    const ChannelStats in = channel_stats(x), out = channel_stats(y.value());
    // The exact output has mean 0 and variance var / (var + eps); each
    // element is off by at most its bound B, so the mean by at most mean(B)
    // and the variance by 2 sqrt(variance) rms(B) + mean(B^2) (the double
    // sums here err far less).
    const Tensor bound = normalised_bound(x, in, ones, zeros, 1e-5f);
    for (int64_t c = 0; c < 6; ++c) {
        double mean_b = 0, mean_b2 = 0;
        for (int64_t i = c; i < x.numel(); i += 6) {
            mean_b += bound.f32()[i] * 6.0 / x.numel();
            mean_b2 += double(bound.f32()[i]) * bound.f32()[i] * 6.0 / x.numel();
        }
        const double var = in.var[c] / (in.var[c] + 1e-5);
        CHECK(std::fabs(out.mean[c]) <= mean_b);
        CHECK(std::fabs(out.var[c] - var) <= 2 * std::sqrt(var * mean_b2) + mean_b2);
    }
    const Tensor gamma = random_tensor({6}, 2), beta = random_tensor({6}, 3);
    Variable z = batch_norm(Variable(x), Variable(gamma), Variable(beta), rm, rv, true, 0.1f, 1e-3f);
    const Tensor z_bound = normalised_bound(x, in, gamma, beta, 1e-3f);
    testing::check_within_bound("batch statistics", z.value(), normalised(x, in, gamma, beta, 1e-3f), z_bound);
    const ChannelStats initial{std::vector<double>(6, 0.0), std::vector<double>(6, 1.0)};
    testing::check_far_outside(
        "the initial running statistics instead of the batch's",
        testing::worst_bound_ratio(z.value(), normalised(x, initial, gamma, beta, 1e-3f), z_bound));
}

TEST_CASE("batch_norm training: a large channel mean costs no precision") {
    Tensor x = random_tensor({8, 4, 4, 2}, 4);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += 1000.0f;
    Tensor rm = Tensor::zeros({2}), rv = Tensor::full({2}, 1.0f);
    const Tensor gamma = Tensor::full({2}, 1.0f), beta = Tensor::zeros({2});
    Variable y = batch_norm(Variable(x), Variable(gamma), Variable(beta), rm, rv, true);
    // Within the bound, whose largest part is the mean's rounding to float,
    // u |s mean|: the variance (E[x^2] - mean^2 in double) loses nothing.
    const ChannelStats in = channel_stats(x);
    const Tensor bound = normalised_bound(x, in, gamma, beta, 1e-5f);
    testing::check_within_bound("mean 1000, std 1", y.value(), normalised(x, in, gamma, beta, 1e-5f), bound);
    // The same statistics summed in float: E[x^2] ~ 1e6 cancels to ~1.
    ChannelStats in_float{std::vector<double>(2), std::vector<double>(2)};
    for (int64_t c = 0; c < 2; ++c) {
        float sx = 0, sxx = 0;
        for (int64_t i = c; i < x.numel(); i += 2) {
            sx += x.f32()[i];
            sxx += x.f32()[i] * x.f32()[i];
        }
        const float m = sx / 128, var = sxx / 128 - m * m;
        in_float.mean[c] = m;
        in_float.var[c] = std::max(var, 0.0f);
    }
    testing::check_far_outside(
        "statistics summed in float",
        testing::worst_bound_ratio(y.value(), normalised(x, in_float, gamma, beta, 1e-5f), bound));
}

TEST_CASE("batch_norm running statistics follow PyTorch's update over two steps") {
    const Shape s{2, 3, 3, 4};
    const Tensor x1 = channel_data(s, 5), x2 = channel_data(s, 6);
    Tensor rm = Tensor::from_vector({4}, {0.5f, -1, 2, 0});
    Tensor rv = Tensor::from_vector({4}, {1, 2, 0.5f, 3});
    std::vector<double> em(rm.f32(), rm.f32() + 4), ev(rv.f32(), rv.f32() + 4), ev_biased = ev;
    const double momentum = 0.25, n = 18;  // values per channel: N*H*W
    // Each step is computed in double from the stored (rounded) running
    // value and rounded to float once: the bound carries (1 - momentum) of
    // the last step's and adds gamma(2) of the new value (one rounding, and
    // the double statistics' error, ~1e-14 here).
    std::vector<double> bound_m(4, 0.0), bound_v(4, 0.0);
    double worst = 0, worst_biased = 0;
    for (const Tensor* x : {&x1, &x2}) {
        batch_norm(Variable(*x), Variable(Tensor::full({4}, 1.0f)), Variable(Tensor::zeros({4})), rm, rv, true,
                   float(momentum));
        const ChannelStats st = channel_stats(*x);
        for (int c = 0; c < 4; ++c) {
            em[c] = (1 - momentum) * em[c] + momentum * st.mean[c];
            ev[c] = (1 - momentum) * ev[c] + momentum * st.var[c] * n / (n - 1);  // unbiased
            ev_biased[c] = (1 - momentum) * ev_biased[c] + momentum * st.var[c];  // a wrong statistic
            bound_m[c] = (1 - momentum) * bound_m[c] + testing::gamma_n(2) * std::fabs(em[c]);
            bound_v[c] = (1 - momentum) * bound_v[c] + testing::gamma_n(2) * ev[c];
            CHECK(std::fabs(rm.f32()[c] - em[c]) <= bound_m[c]);
            worst = std::max(worst, std::fabs(rv.f32()[c] - ev[c]) / bound_v[c]);
            worst_biased = std::max(worst_biased, std::fabs(rv.f32()[c] - ev_biased[c]) / bound_v[c]);
        }
    }
    CHECK(worst <= 1.0);
    testing::check_far_outside("running variance vs the update with the biased variance", worst_biased);
}

TEST_CASE("batch_norm evaluation normalises with the running statistics and leaves them alone") {
    const Shape s{2, 2, 3, 3};
    const Tensor x = channel_data(s, 7);
    Tensor rm = Tensor::from_vector({3}, {-1.5f, 0.5f, 4}), rv = Tensor::from_vector({3}, {0.5f, 2, 9});
    const Tensor rm0 = rm.clone(), rv0 = rv.clone();
    const Tensor gamma = random_tensor({3}, 8), beta = random_tensor({3}, 9);
    Variable y = batch_norm(Variable(x), Variable(gamma), Variable(beta), rm, rv, false);
    const ChannelStats running{{-1.5, 0.5, 4}, {0.5, 2, 9}};
    testing::check_within_bound("running statistics", y.value(), normalised(x, running, gamma, beta, 1e-5f),
                                normalised_bound(x, running, gamma, beta, 1e-5f));
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
