// avg_pool2d, global_avg_pool, flatten: values against a direct loop (padding
// excluded from the count), finite-difference gradients, bad arguments.
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

// Average pooling on {N,H,W,C}, counting only the positions inside the image
// (or, for a broken variant, the padded ones too).
Tensor reference_avg_pool(const Tensor& x, int k, int stride, int pad, bool count_padding = false) {
    const int64_t n = x.dim(0), h = x.dim(1), w = x.dim(2), c = x.dim(3);
    const int64_t ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
    Tensor y = Tensor::empty({n, ho, wo, c});
    for (int64_t b = 0; b < n; ++b)
        for (int64_t i = 0; i < ho; ++i)
            for (int64_t j = 0; j < wo; ++j)
                for (int64_t ch = 0; ch < c; ++ch) {
                    double s = 0;
                    int count = 0;
                    for (int64_t u = i * stride - pad; u < i * stride - pad + k; ++u)
                        for (int64_t v = j * stride - pad; v < j * stride - pad + k; ++v)
                            if (u >= 0 && u < h && v >= 0 && v < w) {
                                s += x.f32()[((b * h + u) * w + v) * c + ch];
                                ++count;
                            }
                    y.f32()[((b * ho + i) * wo + j) * c + ch] = static_cast<float>(s / (count_padding ? k * k : count));
                }
    return y;
}

}  // namespace

TEST_CASE("avg_pool2d leaves padding out of the count") {
    // 3x3 image 1..9, 3x3 window, stride 1, padding 1.
    const Tensor x = Tensor::from_vector({1, 3, 3, 1}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
    const Tensor y = avg_pool2d(Variable(x), 3, 1, 1).value();
    REQUIRE(y.shape() == Shape{1, 3, 3, 1});
    // Sums of small integers are exact; the average adds a division (or a
    // reciprocal and a product): within gamma(2) of the exact value.
    auto near = [](float v, double exact) { return std::fabs(v - exact) <= testing::gamma_n(2) * exact; };
    CHECK(near(y.f32()[0], (1 + 2 + 4 + 5) / 4.0));  // corner: 4 real values, not 9
    CHECK(near(y.f32()[1], (1 + 2 + 3 + 4 + 5 + 6) / 6.0));
    CHECK(near(y.f32()[4], 5.0));
}

TEST_CASE("avg_pool2d matches a direct loop and finite differences") {
    struct Case {
        Shape shape;
        int kernel, stride, padding;
    };
    for (const Case& c : {Case{{2, 5, 5, 3}, 3, 2, 1}, Case{{2, 4, 6, 3}, 2, 2, 0}, Case{{1, 5, 4, 2}, 3, 1, 1},
                          Case{{1, 7, 7, 4}, 7, 1, 0}}) {
        CAPTURE(shape_str(c.shape));
        CAPTURE(c.kernel);
        const Tensor x = random_tensor(c.shape, 1);
        const Tensor y = avg_pool2d(Variable(x), c.kernel, c.stride, c.padding).value();
        const Tensor expected = reference_avg_pool(x, c.kernel, c.stride, c.padding);
        REQUIRE(y.shape() == expected.shape());
        // A sum of at most k^2 terms and the division (at most 2 roundings),
        // and the loop's rounding to float: within gamma(k^2 + 2) of the
        // average of |x| over the window.
        const Tensor bound = testing::bound_from(reference_avg_pool(testing::abs_of(x), c.kernel, c.stride, c.padding),
                                                 testing::gamma_n(c.kernel * c.kernel + 2), 1);
        testing::check_within_bound("avg_pool2d vs the loop", y, expected, bound);
        if (c.padding > 0)
            testing::check_far_outside(
                "avg_pool2d vs the loop counting the padding",
                testing::worst_bound_ratio(y, reference_avg_pool(x, c.kernel, c.stride, c.padding, true), bound));
        testing::check_gradients(
            [&](const std::vector<Variable>& in) { return avg_pool2d(in[0], c.kernel, c.stride, c.padding); }, {x});
    }
}

TEST_CASE("global_avg_pool: per-channel means as {N,C}") {
    const Tensor x = random_tensor({2, 3, 5, 4}, 2);  // H != W
    const Tensor y = global_avg_pool(Variable(x)).value();
    REQUIRE(y.shape() == Shape{2, 4});
    // A sum of 15 terms and the division: within gamma(16) of the mean of
    // |x| (the double sums here err far less).
    double worst = 0, worst_neighbour = 0;
    for (int64_t n = 0; n < 2; ++n)
        for (int64_t c = 0; c < 4; ++c) {
            double s = 0, magnitude = 0, neighbour = 0;  // neighbour: channel c + 1, a wrong stride
            for (int64_t p = 0; p < 15; ++p) {
                s += x.f32()[(n * 15 + p) * 4 + c];
                magnitude += std::fabs(x.f32()[(n * 15 + p) * 4 + c]);
                neighbour += x.f32()[(n * 15 + p) * 4 + (c + 1) % 4];
            }
            const double bound = testing::gamma_n(16) * magnitude / 15;
            worst = std::max(worst, std::fabs(y.f32()[n * 4 + c] - s / 15) / bound);
            worst_neighbour = std::max(worst_neighbour, std::fabs(y.f32()[n * 4 + c] - neighbour / 15) / bound);
        }
    CHECK(worst <= 1.0);
    testing::check_far_outside("global_avg_pool vs the means of the neighbouring channels", worst_neighbour);
    testing::check_gradients([](const std::vector<Variable>& in) { return global_avg_pool(in[0]); }, {x});
}

TEST_CASE("flatten views {N, ...} as {N, rest} in memory order") {
    const Tensor x = random_tensor({2, 3, 2, 4}, 3);
    const Variable y = flatten(Variable(x));
    CHECK(y.shape() == Shape{2, 24});
    CHECK(y.value().shares_storage_with(x));
    CHECK(y.value().to_vector() == x.to_vector());
    testing::check_gradients([](const std::vector<Variable>& in) { return flatten(in[0]); }, {x});
    CHECK(flatten(Variable(Tensor::zeros({5}))).shape() == Shape{5, 1});
}

TEST_CASE("pooling rejects bad arguments") {
    const Variable x(Tensor::zeros({1, 4, 4, 2}));
    CHECK_THROWS_WITH_AS(avg_pool2d(Variable(Tensor::zeros({4, 4, 2})), 2, 2),
                         doctest::Contains("avg_pool2d: input must be"), Error);
    CHECK_THROWS_WITH_AS(avg_pool2d(x, 0, 1), doctest::Contains("avg_pool2d: need kernel >= 1"), Error);
    CHECK_THROWS_WITH_AS(avg_pool2d(x, 2, 0), doctest::Contains("stride 0"), Error);
    CHECK_THROWS_WITH_AS(avg_pool2d(x, 3, 1, 2), doctest::Contains("more than half the kernel"), Error);
    CHECK_THROWS_WITH_AS(avg_pool2d(x, 5, 1), doctest::Contains("does not fit input [1, 4, 4, 2]"), Error);
    CHECK_THROWS_WITH_AS(global_avg_pool(Variable(Tensor::zeros({2, 3}))), doctest::Contains("global_avg_pool"), Error);
    CHECK_THROWS_WITH_AS(flatten(Variable(Tensor::full({}, 1.0f))), doctest::Contains("flatten"), Error);
}

TEST_CASE("avg_pool2d gradient with overlapping windows does not depend on the thread count") {
    const Tensor x = random_tensor({4, 15, 15, 16}, 4);
    const Tensor dy = random_tensor({4, 8, 8, 16}, 5);
    auto grad = [&](int threads) {
        set_compute_threads(threads);
        Variable v(x, true);
        avg_pool2d(v, 3, 2, 1).backward(dy);
        return v.grad().to_vector();
    };
    const int threads = compute_threads();
    const std::vector<float> one = grad(1);
    CHECK(one == grad(2));
    CHECK(one == grad(3));
    set_compute_threads(threads);
}
