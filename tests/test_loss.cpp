// cross_entropy (with and without label smoothing), sum and mean: values
// against direct formulas, gradients, numerical stability, bad arguments.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::random_tensor;

namespace {

// PyTorch's definition: (1 - eps) * nll + eps * mean over classes of -log p,
// averaged over the batch; p = softmax computed directly (small logits).
double reference_cross_entropy(const Tensor& z, const std::vector<int32_t>& labels, double eps) {
    const int64_t n = z.dim(0), k = z.dim(1);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
        double norm = 0;
        for (int64_t j = 0; j < k; ++j) norm += std::exp(double(z.f32()[i * k + j]));
        double smooth = 0;
        for (int64_t j = 0; j < k; ++j) smooth += -std::log(std::exp(double(z.f32()[i * k + j])) / norm) / k;
        const double nll = -std::log(std::exp(double(z.f32()[i * k + labels[i]])) / norm);
        total += (1 - eps) * nll + eps * smooth;
    }
    return total / n;
}

}  // namespace

TEST_CASE("cross_entropy on a hand example") {
    const Tensor z = Tensor::from_vector({2, 3}, {1, 2, 3, 1, 1, 1});
    const double e = std::exp(1.0);
    const double expected = (-std::log(e * e * e / (e + e * e + e * e * e)) + std::log(3.0)) / 2;
    CHECK(cross_entropy(Variable(z), {2, 0}).value().item() == doctest::Approx(expected).epsilon(1e-6));
    CHECK(cross_entropy(Variable(z), {2, 0}).shape() == Shape{1});
}

TEST_CASE("cross_entropy with label smoothing matches PyTorch's definition") {
    const Tensor z = random_tensor({6, 5}, 1, 2.0f);
    const std::vector<int32_t> labels{0, 4, 2, 2, 1, 3};
    for (float eps : {0.0f, 0.1f, 0.5f, 1.0f}) {
        CAPTURE(eps);
        CHECK(cross_entropy(Variable(z), labels, eps).value().item() ==
              doctest::Approx(reference_cross_entropy(z, labels, eps)).epsilon(1e-6));
    }
    // With smoothing the loss of a confident correct prediction does not go to 0:
    // logits (20, 0, 0), eps 0.3, target (0.8, 0.1, 0.1) -> loss ~ 0.2 * 20.
    const Tensor sure = Tensor::from_vector({1, 3}, {20, 0, 0});
    CHECK(cross_entropy(Variable(sure), {0}, 0.3f).value().item() == doctest::Approx(4.0).epsilon(1e-4));
}

TEST_CASE("cross_entropy is stable for large logits") {
    const Tensor small = Tensor::from_vector({2, 3}, {0, 1, 2, -1, 0.5f, 3});
    Tensor large = small.clone();
    for (int64_t i = 0; i < large.numel(); ++i) large.f32()[i] += 1000.0f;  // exp(1000) overflows
    const float a = cross_entropy(Variable(small), {1, 2}, 0.1f).value().item();
    const float b = cross_entropy(Variable(large), {1, 2}, 0.1f).value().item();
    CHECK(std::isfinite(b));
    CHECK(b == doctest::Approx(a).epsilon(1e-4));
    Variable v(Tensor::from_vector({1, 2}, {-1000, 1000}), true);
    Variable loss = cross_entropy(v, {0});
    CHECK(loss.value().item() == doctest::Approx(2000.0));
    loss.backward();
    CHECK(v.grad().to_vector() == std::vector<float>{-1, 1});
}

TEST_CASE("cross_entropy gradient: (softmax - target) / N, and finite differences") {
    const Tensor z = random_tensor({3, 4}, 2);
    const std::vector<int32_t> labels{3, 0, 1};
    const float eps = 0.2f;
    Variable v(z, true);
    cross_entropy(v, labels, eps).backward();
    for (int64_t i = 0; i < 3; ++i) {
        double norm = 0;
        for (int64_t j = 0; j < 4; ++j) norm += std::exp(double(z.f32()[i * 4 + j]));
        for (int64_t j = 0; j < 4; ++j) {
            const double target = (j == labels[i] ? 1 - eps : 0) + eps / 4;
            CHECK(v.grad().f32()[i * 4 + j] ==
                  doctest::Approx((std::exp(double(z.f32()[i * 4 + j])) / norm - target) / 3).epsilon(1e-5));
        }
    }
    for (float e : {0.0f, 0.1f}) {
        testing::check_gradients([&](const std::vector<Variable>& in) { return cross_entropy(in[0], {1, 4, 0, 2}, e); },
                                 {random_tensor({4, 5}, 3, 2.0f)});
    }
}

TEST_CASE("cross_entropy rejects bad labels and arguments") {
    const Variable z(Tensor::zeros({2, 5}));
    CHECK_THROWS_WITH_AS(cross_entropy(z, {0, 5}), doctest::Contains("cross_entropy: label 5 at index 1 is outside [0, 5)"),
                         Error);
    CHECK_THROWS_WITH_AS(cross_entropy(z, {-1, 0}), doctest::Contains("label -1 at index 0"), Error);
    CHECK_THROWS_WITH_AS(cross_entropy(z, {0}), doctest::Contains("cross_entropy: 1 labels for logits [2, 5]"), Error);
    CHECK_THROWS_WITH_AS(cross_entropy(z, {0, 1}, 1.5f), doctest::Contains("label_smoothing must be in [0, 1]"), Error);
    CHECK_THROWS_WITH_AS(cross_entropy(Variable(Tensor::zeros({2, 5, 1})), {0, 1}),
                         doctest::Contains("cross_entropy: logits must be"), Error);
}

TEST_CASE("sum and mean: accumulated in double, gradient spread evenly") {
    // In float, 2^24 + 1 rounds back to 2^24: summed left to right in float
    // the four ones would vanish; in double the total is 2^24 + 4.
    const Tensor x = Tensor::from_vector({5}, {16777216, 1, 1, 1, 1});
    CHECK(sum(Variable(x)).value().item() == 16777220.0f);
    CHECK(mean(Variable(x)).value().item() == doctest::Approx(16777220.0 / 5));

    Variable v(random_tensor({2, 3, 4}, 4), true);
    mean(v).backward(Tensor::full({1}, 2.0f));
    CHECK(v.grad().to_vector() == std::vector<float>(24, 2.0f / 24));
    testing::check_gradients([](const std::vector<Variable>& in) { return sum(in[0]); }, {random_tensor({3, 5}, 5)});
    testing::check_gradients([](const std::vector<Variable>& in) { return mean(in[0]); }, {random_tensor({3, 5}, 6)});
    CHECK_THROWS_WITH_AS(mean(Variable(Tensor::zeros({0}))), doctest::Contains("mean: mean of an empty tensor"), Error);
    CHECK(sum(Variable(Tensor::zeros({0}))).value().item() == 0.0f);
}
