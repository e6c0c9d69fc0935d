// relu, relu6, add, mul_channel, dropout: values, the gradient at the kinks
// (PyTorch's convention), finite-difference gradients and bad arguments.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"
#include "engine/tensor_math.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::random_tensor;

namespace {

// Moves values within 0.1 of a kink to 0.1 past it, so that the finite
// differences (step 1e-3) never straddle one.
Tensor away_from(Tensor t, const std::vector<float>& kinks) {
    for (int64_t i = 0; i < t.numel(); ++i)
        for (float k : kinks)
            if (std::fabs(t.f32()[i] - k) < 0.1f) t.f32()[i] = k + (t.f32()[i] < k ? -0.1f : 0.1f);
    return t;
}

std::vector<float> grad_of(Variable (*op)(const Variable&), const std::vector<float>& x) {
    Variable v(Tensor::from_vector({int64_t(x.size())}, x), true);
    op(v).backward(Tensor::full({int64_t(x.size())}, 1.0f));
    return v.grad().to_vector();
}

}  // namespace

TEST_CASE("relu and relu6 values and their gradient at the kinks") {
    const std::vector<float> x{-2, -0.0f, 0, 0.5f, 5.999f, 6, 6.5f, 100};
    Variable v(Tensor::from_vector({2, 4}, x));
    CHECK(relu(v).value().to_vector() == std::vector<float>{0, 0, 0, 0.5f, 5.999f, 6, 6.5f, 100});
    CHECK(relu6(v).value().to_vector() == std::vector<float>{0, 0, 0, 0.5f, 5.999f, 6, 6, 6});
    // dy where 0 < x (< 6): zero exactly at 0 and at 6, as torch.relu / relu6.
    CHECK(grad_of(relu, x) == std::vector<float>{0, 0, 0, 1, 1, 1, 1, 1});
    CHECK(grad_of(relu6, x) == std::vector<float>{0, 0, 0, 1, 1, 0, 0, 0});
}

TEST_CASE("relu and relu6 gradients match finite differences") {
    const Tensor x = away_from(random_tensor({2, 3, 4, 5}, 1, 4.0f), {0, 6});
    testing::check_gradients([](const std::vector<Variable>& in) { return relu(in[0]); }, {x});
    testing::check_gradients(
        [](const std::vector<Variable>& in) { return relu6(in[0]); },
        {away_from(hfq::add(random_tensor({2, 3, 4, 5}, 2, 4.0f), Tensor::full({2, 3, 4, 5}, 3)), {0, 6})});
}

TEST_CASE("add: values and gradients, also when both inputs are the same value") {
    const Tensor a = random_tensor({2, 3, 3, 2}, 3), b = random_tensor({2, 3, 3, 2}, 4);
    const Variable sum_ab = add(Variable(a), Variable(b));
    const Tensor expected = hfq::add(a, b);
    CHECK(sum_ab.value().to_vector() == expected.to_vector());
    testing::check_gradients([](const std::vector<Variable>& in) { return add(in[0], in[1]); }, {a, b});
    Variable x(Tensor::from_vector({3}, {1, 2, 3}), true);
    add(x, x).backward(Tensor::from_vector({3}, {1, -1, 0.5f}));  // a residual add: dy reaches x twice
    CHECK(x.grad().to_vector() == std::vector<float>{2, -2, 1});
}

TEST_CASE("mul_channel scales the last dimension") {
    const Tensor x = random_tensor({2, 3, 4}, 5), s = Tensor::from_vector({4}, {2, -1, 0.5f, 3});
    const Tensor y = mul_channel(Variable(x), Variable(s)).value();
    for (int64_t i = 0; i < x.numel(); ++i) CHECK(y.f32()[i] == x.f32()[i] * s.f32()[i % 4]);
    testing::check_gradients([](const std::vector<Variable>& in) { return mul_channel(in[0], in[1]); },
                             {x, random_tensor({4}, 6)});
    // {N,H,W,C} activations too.
    testing::check_gradients([](const std::vector<Variable>& in) { return mul_channel(in[0], in[1]); },
                             {random_tensor({2, 2, 3, 5}, 7), random_tensor({5}, 8)});
}

TEST_CASE("dropout: identity in evaluation or at p = 0, inverted dropout from the rng in training") {
    const Tensor x = away_from(random_tensor({100, 100}, 9), {0});
    Rng rng(42);
    const Variable in(x);
    CHECK(dropout(in, 0.5f, false, rng).value().shares_storage_with(x));
    CHECK(dropout(in, 0.0f, true, rng).value().shares_storage_with(x));
    CHECK(rng.state() == Rng(42).state());  // the identity draws nothing

    const float p = 0.3f;
    const Tensor y = dropout(in, p, true, rng).value();
    int64_t zeros = 0, wrong = 0;  // kept values are x / (1 - p)
    for (int64_t i = 0; i < x.numel(); ++i) {
        if (y.f32()[i] == 0)
            ++zeros;
        else
            wrong += y.f32()[i] != x.f32()[i] * (1.0f / (1.0f - p));
    }
    CHECK(wrong == 0);
    // zeros ~ Binomial(10000, 0.3): 3000, standard deviation 46; within 5.
    CHECK(std::fabs(double(zeros) - p * x.numel()) <= 5 * std::sqrt(x.numel() * p * (1 - p)));

    // The same seed gives the same mask; the next draw from the stream another.
    Rng again(42);
    CHECK(dropout(in, p, true, again).value().to_vector() == y.to_vector());
    CHECK(dropout(in, p, true, again).value().to_vector() != y.to_vector());
}

TEST_CASE("dropout gradient is the mask") {
    testing::check_gradients(
        [](const std::vector<Variable>& in) {
            Rng rng(7);  // the same mask on every call
            return dropout(in[0], 0.4f, true, rng);
        },
        {random_tensor({4, 6}, 10)});
    Rng rng(3);
    Variable x(Tensor::full({50}, 2.0f), true);
    Variable y = dropout(x, 0.5f, true, rng);
    y.backward(Tensor::full({50}, 1.0f));
    for (int i = 0; i < 50; ++i) CHECK(x.grad().f32()[i] == y.value().f32()[i] / 2.0f);  // 0 or 1/(1-p)
}

TEST_CASE("element-wise ops reject bad arguments") {
    const Variable a(Tensor::zeros({2, 3})), b(Tensor::zeros({3, 2}));
    CHECK_THROWS_WITH_AS(add(a, b), doctest::Contains("add: shapes differ, [2, 3] vs [3, 2]"), Error);
    CHECK_THROWS_WITH_AS(mul_channel(a, Variable(Tensor::zeros({2}))),
                         doctest::Contains("mul_channel: scale must have shape [3]"), Error);
    Rng rng(1);
    CHECK_THROWS_WITH_AS(dropout(a, 1.0f, true, rng), doctest::Contains("dropout: probability p must be in [0, 1)"),
                         Error);
    CHECK_THROWS_AS(dropout(a, -0.1f, false, rng), Error);
    CHECK_THROWS_AS(dropout(a, std::numeric_limits<float>::quiet_NaN(), true, rng), Error);
    CHECK_THROWS_WITH_AS(relu(Variable(Tensor::zeros({0, 3}))), doctest::Contains("relu: input must be"), Error);
}
