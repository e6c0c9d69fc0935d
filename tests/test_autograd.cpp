// The autograd machinery itself, with small ops written in the test the way a
// custom op (a quantizer) is written.
#include <doctest/doctest.h>

#include <array>
#include <chrono>
#include <map>
#include <thread>

#include "engine/autograd.h"
#include "engine/check.h"
#include "engine/op_profile.h"
#include "engine/tensor_math.h"
#include "tests/gradcheck.h"

using namespace hfq;

namespace {

// y = x * x, element-wise.
Variable square(const Variable& x) {
    Tensor y = mul(x.value(), x.value());
    return make_result(y, "square", {x}, [x](const Tensor& dy) { x.accumulate_grad(scale(mul(x.value(), dy), 2)); });
}

// y = x * x with the factor 2 of its gradient forgotten.
Variable wrong_square(const Variable& x) {
    return make_result(mul(x.value(), x.value()), "wrong_square", {x},
                       [x](const Tensor& dy) { x.accumulate_grad(mul(x.value(), dy)); });
}

// y = a * b, element-wise.
Variable times(const Variable& a, const Variable& b) {
    return make_result(mul(a.value(), b.value()), "times", {a, b}, [a, b](const Tensor& dy) {
        a.accumulate_grad(mul(dy, b.value()));
        b.accumulate_grad(mul(dy, a.value()));
    });
}

Variable plus(const Variable& a, const Variable& b) {
    return make_result(add(a.value(), b.value()), "plus", {a, b}, [a, b](const Tensor& dy) {
        a.accumulate_grad(dy);
        b.accumulate_grad(dy);
    });
}

Variable total(const Variable& x) {
    Tensor y = Tensor::full({1}, static_cast<float>(sum_f64(x.value())));
    return make_result(y, "total", {x},
                       [x](const Tensor& dy) { x.accumulate_grad(Tensor::full(x.shape(), dy.item())); });
}

// y = -x, writing dx over dy through gradient_buffer; counts how often it
// could.
int g_reused_buffers = 0;
Variable negate(const Variable& x) {
    return make_result(scale(x.value(), -1), "negate", {x}, [x](const Tensor& dy) {
        Tensor dx = gradient_buffer(dy);
        g_reused_buffers += dx.shares_storage_with(dy);
        for (int64_t i = 0; i < dx.numel(); ++i) dx.f32()[i] = -dy.f32()[i];
        x.accumulate_grad(dx);
    });
}

}  // namespace

TEST_CASE("gradient_buffer hands a closure dy's memory only when nothing else holds it") {
    Variable x1(Tensor::from_vector({3}, {1, 2, 3}), true), x2(Tensor::from_vector({3}, {4, 5, 6}), true);
    g_reused_buffers = 0;
    // total's backward makes a fresh gradient that only the graph holds.
    total(negate(x1)).backward();
    CHECK(g_reused_buffers == 1);
    CHECK(x1.grad().to_vector() == std::vector<float>{-1, -1, -1});
    // plus hands one gradient to both inputs: writing over it in the first
    // negate's closure would turn the second's gradient into +1. The second
    // may reuse it: backward dropped the first's reference.
    g_reused_buffers = 0;
    x1.zero_grad();
    total(plus(negate(x1), negate(x2))).backward();
    CHECK(g_reused_buffers == 1);
    CHECK(x1.grad().to_vector() == std::vector<float>{-1, -1, -1});
    CHECK(x2.grad().to_vector() == std::vector<float>{-1, -1, -1});
    // A seed the caller keeps is never written over.
    const Tensor seed = Tensor::full({3}, 2.0f);
    x1.zero_grad();
    g_reused_buffers = 0;
    negate(x1).backward(seed);
    CHECK(g_reused_buffers == 0);
    CHECK(seed.to_vector() == std::vector<float>{2, 2, 2});
    CHECK(x1.grad().to_vector() == std::vector<float>{-2, -2, -2});
}

TEST_CASE("gradients accumulate where a value is used twice (residual add)") {
    Variable x(Tensor::from_vector({2}, {3, -1}), true);
    // L = sum(x*x + x) -> dL/dx = 2x + 1
    Variable y = total(plus(square(x), x));
    y.backward();
    CHECK(x.grad().to_vector() == std::vector<float>{7, -1});
    // A second graph on the same leaf adds to the gradient until zero_grad.
    total(x).backward();
    CHECK(x.grad().to_vector() == std::vector<float>{8, 0});
    x.zero_grad();
    CHECK(!x.grad().defined());
}

TEST_CASE("a diamond graph: every path contributes exactly once") {
    Variable x(Tensor::from_vector({1}, {2}), true);
    Variable a = square(x);    // x^2
    Variable b = times(a, x);  // x^3
    Variable c = plus(a, b);   // x^2 + x^3
    Variable d = times(c, a);  // x^4 + x^5
    d.backward();
    // Products and sums of small integers: exact in float.
    CHECK(x.grad().item() == 4 * 8 + 5 * 16);
}

TEST_CASE("no-grad mode records nothing, constants get no gradient") {
    Variable x(Tensor::from_vector({1}, {2}), true);
    Variable k(Tensor::from_vector({1}, {5}));
    {
        NoGradGuard guard;
        Variable y = times(x, x);
        CHECK(!y.requires_grad());
        CHECK(y.node()->inputs.empty());
    }
    CHECK(grad_enabled());
    Variable y = times(x, k);
    y.backward();
    CHECK(x.grad().item() == 5);
    CHECK(!k.grad().defined());
}

TEST_CASE("backward frees the graph; a second backward is a clear error") {
    Variable x(Tensor::from_vector({1}, {2}), true);
    Variable y = square(square(x));
    y.backward();
    CHECK(y.node()->inputs.empty());
    CHECK(!y.node()->backward);
    CHECK_THROWS_AS(y.backward(), Error);
    Variable c(Tensor::from_vector({1}, {2}));
    CHECK_THROWS_AS(c.backward(), Error);
    Variable v(Tensor::zeros({2}), true);
    CHECK_THROWS_AS(square(v).backward(), Error);  // two elements, no seed
}

TEST_CASE("the gradient checker agrees with a correct backward and rejects a wrong one by orders of magnitude") {
    const std::vector<Tensor> inputs{testing::random_tensor({3, 4}, 1), testing::random_tensor({3, 4}, 2)};
    testing::check_gradients([](const std::vector<Variable>& in) { return times(square(in[0]), in[1]); }, inputs);
    // Half the gradient of x: |a - q| = |q| / 2, against a bound of about
    // 1e-3 |q| (tolerance) where q is not near 0.
    const auto wrong = testing::gradient_points(
        [](const std::vector<Variable>& in) { return times(wrong_square(in[0]), in[1]); }, inputs);
    testing::check_far_outside("gradient check of a wrong backward", testing::worst_ratio(wrong));
}

TEST_CASE("a deep chain does not overflow the stack") {
    Variable x(Tensor::from_vector({1}, {1}), true);
    Variable y = x;
    for (int i = 0; i < 100000; ++i) y = plus(y, x);
    y.backward();
    CHECK(x.grad().item() == 100001);
}

// y = x, taking at least 20 ms forward and 10 ms backward.
Variable slow_identity(const Variable& x) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return make_result(x.value().clone(), "slow", {x}, [x](const Tensor& dy) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        x.accumulate_grad(dy);
    });
}

TEST_CASE("op_profile charges each op's forward and backward to its name and output shape") {
    Variable x(Tensor::full({3}, 2.0f), true);
    const auto t0 = std::chrono::steady_clock::now();
    op_profile::set_enabled(true);
    for (int step = 0; step < 2; ++step) total(square(slow_identity(x))).backward();
    std::thread([] { op_profile::charge(op_profile::kForward, "another thread"); }).join();  // not timed
    const std::vector<op_profile::Entry> entries = op_profile::take();
    op_profile::set_enabled(false);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    std::map<std::string, op_profile::Entry> by_name;
    double sum = 0;
    for (const op_profile::Entry& e : entries) {
        by_name[e.name] = e;
        sum += e.total();
    }
    REQUIRE(by_name.size() == 4);  // slow, square, total and the autograd bookkeeping
    const op_profile::Entry& slow = by_name.at("slow [3]");
    CHECK(slow.calls == std::array<int64_t, 2>{2, 2});
    CHECK(slow.seconds[0] >= 0.040);
    CHECK(slow.seconds[1] >= 0.020);
    CHECK(by_name.at("square [3]").calls == std::array<int64_t, 2>{2, 2});
    CHECK(by_name.at("total [1]").calls == std::array<int64_t, 2>{2, 2});
    CHECK(by_name.at("autograd bookkeeping").calls == std::array<int64_t, 2>{0, 4});
    CHECK(entries.front().name == "slow [3]");  // the most expensive first
    CHECK(sum <= elapsed);                      // the spans do not overlap
    CHECK(x.grad().f32()[0] == 8.0f);           // the profile changes no numbers: d(x^2)/dx = 4, twice

    // Off: nothing is recorded.
    total(square(x)).backward();
    CHECK(op_profile::take().empty());
}
