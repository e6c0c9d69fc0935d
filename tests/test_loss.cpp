// cross_entropy (with and without label smoothing), sum and mean: values
// against direct formulas, gradients, numerical stability, bad arguments.
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

// cross_entropy sums in double and rounds the loss to float once: within
// gamma(2) of the reference (one rounding, and the double sums' error, a few
// 2^-53 of terms up to 1000 here, far below u of the loss).
bool near_reference(float loss, double reference) {
    return std::fabs(loss - reference) <= testing::gamma_n(2) * std::fabs(reference);
}

}  // namespace

TEST_CASE("cross_entropy on a hand example") {
    const Tensor z = Tensor::from_vector({2, 3}, {1, 2, 3, 1, 1, 1});
    const double e = std::exp(1.0);
    const double expected = (-std::log(e * e * e / (e + e * e + e * e * e)) + std::log(3.0)) / 2;
    CHECK(near_reference(cross_entropy(Variable(z), {2, 0}).value().item(), expected));
    CHECK(cross_entropy(Variable(z), {2, 0}).shape() == Shape{1});
}

TEST_CASE("cross_entropy with label smoothing matches PyTorch's definition") {
    const Tensor z = random_tensor({6, 5}, 1, 2.0f);
    const std::vector<int32_t> labels{0, 4, 2, 2, 1, 3};
    for (float eps : {0.0f, 0.1f, 0.5f, 1.0f}) {
        CAPTURE(eps);
        CHECK(near_reference(cross_entropy(Variable(z), labels, eps).value().item(),
                             reference_cross_entropy(z, labels, eps)));
    }
    // The smoothing left out of the reference: off by eps times the
    // difference of the two losses, far outside.
    const float smoothed = cross_entropy(Variable(z), labels, 0.1f).value().item();
    const double unsmoothed = reference_cross_entropy(z, labels, 0.0);
    testing::check_far_outside("cross_entropy vs the reference without smoothing",
                               std::fabs(smoothed - unsmoothed) / (testing::gamma_n(2) * std::fabs(unsmoothed)));
    // With smoothing the loss of a confident correct prediction does not go to 0:
    // logits (20, 0, 0), eps 0.3, target (0.8, 0.1, 0.1) -> loss = lse - 0.8 * 20
    // = 4 + log(1 + 2 e^-20) (and 0.3f's rounding).
    const Tensor sure = Tensor::from_vector({1, 3}, {20, 0, 0});
    CHECK(near_reference(cross_entropy(Variable(sure), {0}, 0.3f).value().item(),
                         reference_cross_entropy(sure, {0}, 0.3f)));
}

TEST_CASE("cross_entropy is stable for large logits") {
    const Tensor small = Tensor::from_vector({2, 3}, {0, 1, 2, -1, 0.5f, 3});
    Tensor large = small.clone();
    for (int64_t i = 0; i < large.numel(); ++i) large.f32()[i] += 1000.0f;  // exp(1000) overflows
    const float b = cross_entropy(Variable(large), {1, 2}, 0.1f).value().item();
    CHECK(std::isfinite(b));
    // b is the loss of the logits z + 1000 rounded to float. Subtracting
    // 1000 again is exact (Sterbenz), and the loss does not change when a
    // row is shifted: b must be the reference's loss of those small logits
    // to one rounding, as for small logits.
    Tensor shifted = large.clone();
    for (int64_t i = 0; i < shifted.numel(); ++i) shifted.f32()[i] -= 1000.0f;
    CHECK(near_reference(b, reference_cross_entropy(shifted, {1, 2}, 0.1)));
    CHECK(near_reference(cross_entropy(Variable(small), {1, 2}, 0.1f).value().item(),
                         reference_cross_entropy(small, {1, 2}, 0.1)));
    // lse = 1000 + log(1 + e^-2000) = 1000 in double: the loss is 2000 exactly.
    Variable v(Tensor::from_vector({1, 2}, {-1000, 1000}), true);
    Variable loss = cross_entropy(v, {0});
    CHECK(loss.value().item() == 2000.0f);
    loss.backward();
    CHECK(v.grad().to_vector() == std::vector<float>{-1, 1});
}

TEST_CASE("cross_entropy gradient: (softmax - target) / N, and finite differences") {
    const Tensor z = random_tensor({3, 4}, 2);
    const std::vector<int32_t> labels{3, 0, 1};
    const float eps = 0.2f;
    Variable v(z, true);
    cross_entropy(v, labels, eps).backward();
    // The softmax p is computed in double and stored in float (u p), then
    // (p - target) / N in double and rounded once: within gamma(2) of
    // (p + |p - target|) / N. Broken variant: the target without smoothing.
    double worst = 0, worst_unsmoothed = 0;
    for (int64_t i = 0; i < 3; ++i) {
        double norm = 0;
        for (int64_t j = 0; j < 4; ++j) norm += std::exp(double(z.f32()[i * 4 + j]));
        for (int64_t j = 0; j < 4; ++j) {
            const double p = std::exp(double(z.f32()[i * 4 + j])) / norm, hot = j == labels[i] ? 1.0 : 0.0;
            const double target = (1 - eps) * hot + eps / 4;
            const double g = v.grad().f32()[i * 4 + j], bound = testing::gamma_n(2) * (p + std::fabs(p - target)) / 3;
            worst = std::max(worst, std::fabs(g - (p - target) / 3) / bound);
            worst_unsmoothed = std::max(worst_unsmoothed, std::fabs(g - (p - hot) / 3) / bound);
        }
    }
    CHECK(worst <= 1.0);
    testing::check_far_outside("the gradient vs (softmax - one hot) / N", worst_unsmoothed);
    for (float e : {0.0f, 0.1f}) {
        testing::check_gradients(
            [&](const std::vector<Variable>& in) {
                return cross_entropy(in[0], {1, 4, 0, 2}, e);
            },
            {random_tensor({4, 5}, 3, 2.0f)});
    }
}

TEST_CASE("cross_entropy rejects bad labels and arguments") {
    const Variable z(Tensor::zeros({2, 5}));
    CHECK_THROWS_WITH_AS(cross_entropy(z, {0, 5}),
                         doctest::Contains("cross_entropy: label 5 at index 1 is outside [0, 5)"), Error);
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
    // 16777220 / 5 = 3355444 < 2^24: the double quotient, within 2^-52 of
    // it, rounds to it exactly.
    CHECK(mean(Variable(x)).value().item() == 3355444.0f);

    Variable v(random_tensor({2, 3, 4}, 4), true);
    mean(v).backward(Tensor::full({1}, 2.0f));
    CHECK(v.grad().to_vector() == std::vector<float>(24, 2.0f / 24));
    testing::check_gradients([](const std::vector<Variable>& in) { return sum(in[0]); }, {random_tensor({3, 5}, 5)});
    testing::check_gradients([](const std::vector<Variable>& in) { return mean(in[0]); }, {random_tensor({3, 5}, 6)});
    CHECK_THROWS_WITH_AS(mean(Variable(Tensor::zeros({0}))), doctest::Contains("mean: mean of an empty tensor"), Error);
    CHECK(sum(Variable(Tensor::zeros({0}))).value().item() == 0.0f);
}
