// hfq's ops against numbers PyTorch computed.
//
// The fixtures tests/data/engine_*.safetensors are written by
// tests/fixtures/make_engine_fixtures.py (Debian's PyTorch, fixed seeds; the
// script documents how and in which layout). Each case loads its inputs,
// runs hfq's op forward and backward (from the stored upstream gradient dy,
// or from the loss), and compares every output, gradient and updated buffer
// with the float64 truth rounded to float32.
//
// Tolerance: each result is held to a bound derived in tests/float_error.h,
// and the fixture stores what the bound needs (see error_ratio below):
//  1. Sums of products (conv2d, linear, pooling): every element within
//     gamma(n + 2) * magnitude + u * |truth|, from the sum's length n.
//  2. Batch norm, the loss, the network: the norm-wise error within
//     torch_bound() of PyTorch's own float32 error on the same case.
//  relu6 clamps, which is exact: it must match bit for bit.
// Each comparison also runs one deliberately broken variant (a wrong padding,
// kernel, statistic or smoothing, a dropped bias) and checks that it misses
// its bound by at least kBrokenRatio: the bounds separate right from wrong.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "engine/ops.h"
#include "engine/safetensors.h"
#include "engine/tensor_math.h"
#include "tests/float_error.h"

using namespace hfq;
using namespace hfq::testing;

namespace {

// A wrong padding or statistic changes results by about their own size; the
// bounds are a few float32 roundings of them (some 1e-6 relative), so even a
// broken variant that changes only part of a result misses by far more.
constexpr double kBrokenRatio = 100;

SafetensorsFile load(const std::string& name) { return read_safetensors(std::string(HFQ_TEST_DATA_DIR) + "/" + name); }

const std::string& meta(const SafetensorsFile& f, const std::string& key) {
    auto it = f.metadata.find(key);
    REQUIRE_MESSAGE(it != f.metadata.end(), f.source, " has no metadata ", key);
    return it->second;
}
int meta_int(const SafetensorsFile& f, const std::string& key) { return std::stoi(meta(f, key)); }
float meta_float(const SafetensorsFile& f, const std::string& key) { return std::stof(meta(f, key)); }

// A trainable leaf holding a copy of a stored tensor.
Variable leaf(const SafetensorsFile& f, const std::string& name) { return Variable(f.get(name).clone(), true); }

std::vector<int32_t> labels(const SafetensorsFile& f, const std::string& name) {
    const Tensor& t = f.get(name);
    const int64_t* p = t.data<int64_t>();
    return std::vector<int32_t>(p, p + t.numel());
}

// The error of one result against the stored truth `name`, divided by its
// bound (<= 1: within). The fixture stores what the bound is made of:
//  - "<name>.magnitude", each element's sum of |terms| (in float64), and
//    "<name>.terms", n, the most terms in one sum. A float32 sum of n terms,
//    each a product or a quotient rounded once, is within gamma(n + 1) times
//    the magnitude of the exact sum, in any order, with or without FMAs;
//    gamma(n + 2) also covers rounding the magnitude and this bound to
//    float32. The truth is the exact value rounded to float32, so the exact
//    value is within u * |truth| of it (Higham, Theorem 2.3).
//  - "<name>.torch_error": the norm-wise error may be torch_bound() of it.
double error_ratio(const SafetensorsFile& f, const std::string& name, const Tensor& actual) {
    INFO(name);
    REQUIRE(actual.defined());
    const Tensor& truth = f.get(name);
    if (!f.has(name + ".magnitude"))
        return normwise_error(actual, truth) / torch_bound(std::stod(meta(f, name + ".torch_error")));
    const double g = gamma_n(meta_int(f, name + ".terms") + 2);
    const Tensor& magnitude = f.get(name + ".magnitude");
    Tensor bound = Tensor::empty(truth.shape());
    for (int64_t i = 0; i < truth.numel(); ++i)
        bound.f32()[i] = float(g * magnitude.f32()[i] + kUnitRoundoff * std::fabs(truth.f32()[i]));
    return worst_bound_ratio(actual, truth, bound);
}

// The results of one run of a case: (stored name, what hfq computed).
using Results = std::vector<std::pair<std::string, Tensor>>;

// Every result within its bound. HFQ_SHOW_ERRORS=1 prints every ratio.
void check_results(const SafetensorsFile& f, const Results& results) {
    for (const auto& [name, actual] : results) {
        const double ratio = error_ratio(f, name, actual);
        if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(name, ": error / bound = ", ratio);
        CHECK_MESSAGE(ratio <= 1.0, name);
    }
}

// A broken variant of a case: its worst result misses the bound by far.
void check_broken(const SafetensorsFile& f, const std::string& what, const Results& results) {
    double worst = 0;
    for (const auto& [name, actual] : results) worst = std::max(worst, error_ratio(f, name, actual));
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(what, " (broken): worst error / bound = ", worst);
    CHECK(worst >= kBrokenRatio);
}

Conv2dParams conv_params(const SafetensorsFile& f, const std::string& c) {
    return {.stride = meta_int(f, c + ".stride"),
            .padding = meta_int(f, c + ".padding"),
            .same_padding = meta_int(f, c + ".same_padding") != 0,
            .groups = meta_int(f, c + ".groups")};
}

Results run_conv2d(const SafetensorsFile& f, const std::string& c, const Conv2dParams& p) {
    Variable x = leaf(f, c + ".x"), w = leaf(f, c + ".weight");
    Variable b = f.has(c + ".bias") ? leaf(f, c + ".bias") : Variable();
    Variable y = conv2d(x, w, b, p);
    y.backward(f.get(c + ".dy"));
    Results r = {{c + ".y", y.value()}, {c + ".grad.x", x.grad()}, {c + ".grad.weight", w.grad()}};
    if (b.defined()) r.emplace_back(c + ".grad.bias", b.grad());
    return r;
}

Results run_batch_norm(const SafetensorsFile& f, const std::string& c, bool training) {
    Variable x = leaf(f, c + ".x"), gamma = leaf(f, c + ".gamma"), beta = leaf(f, c + ".beta");
    Tensor running_mean = f.get(c + ".running_mean").clone();
    Tensor running_var = f.get(c + ".running_var").clone();
    Variable y = batch_norm(x, gamma, beta, running_mean, running_var, training, meta_float(f, c + ".momentum"),
                            meta_float(f, c + ".eps"));
    y.backward(f.get(c + ".dy"));
    return {
        {c + ".y", y.value()},     {c + ".running_mean_after", running_mean}, {c + ".running_var_after", running_var},
        {c + ".grad.x", x.grad()}, {c + ".grad.gamma", gamma.grad()},         {c + ".grad.beta", beta.grad()}};
}

Results run_avg_pool2d(const SafetensorsFile& f, const std::string& c, int kernel, int stride, int padding) {
    Variable x = leaf(f, c + ".x");
    Variable y = avg_pool2d(x, kernel, stride, padding);
    y.backward(f.get(c + ".dy"));
    return {{c + ".y", y.value()}, {c + ".grad.x", x.grad()}};
}

Results run_cross_entropy(const SafetensorsFile& f, const std::string& c, float label_smoothing) {
    Variable logits = leaf(f, c + ".logits");
    Variable loss = cross_entropy(logits, labels(f, c + ".labels"), label_smoothing);
    loss.backward();
    return {{c + ".loss", loss.value()}, {c + ".grad.logits", logits.grad()}};
}

}  // namespace

TEST_CASE("conv2d matches PyTorch: forward, dx, dweight, dbias") {
    const SafetensorsFile f = load("engine_conv2d.safetensors");
    for (const std::string c : {"std3x3_s1_p1", "std3x3_s2_p1", "dw3x3_s1_p1", "dw3x3_s2_p1", "pw1x1",
                                "same3x3_s2_even", "same_dw3x3_s2_even", "same3x3_s2_odd"}) {
        CAPTURE(c);
        check_results(f, run_conv2d(f, c, conv_params(f, c)));
    }
    // TensorFlow 'SAME' pads (0, 1) here; symmetric padding 1 gives the same
    // output shape, shifted by one pixel.
    check_broken(f, "same3x3_s2_even with padding 1", run_conv2d(f, "same3x3_s2_even", {.stride = 2, .padding = 1}));
}

TEST_CASE("batch_norm matches PyTorch in training and evaluation, running statistics included") {
    const SafetensorsFile f = load("engine_batch_norm.safetensors");
    for (const std::string c : {"train", "eval"}) {
        CAPTURE(c);
        check_results(f, run_batch_norm(f, c, meta_int(f, c + ".training") != 0));
    }
    check_broken(f, "train with the running statistics", run_batch_norm(f, "train", false));
}

TEST_CASE("relu6 matches PyTorch exactly") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    Variable x = leaf(f, "relu6.x");
    Variable y = relu6(x);
    y.backward(f.get("relu6.dy"));
    // Clamping and passing dy through (or not) round nothing.
    CHECK(max_abs(sub(y.value(), f.get("relu6.y"))) == 0.0f);
    CHECK(max_abs(sub(x.grad(), f.get("relu6.grad.x"))) == 0.0f);
    // Broken: relu, no clamp at 6 (the inputs reach 6 and beyond).
    CHECK(max_abs(sub(relu(x).value(), f.get("relu6.y"))) > 0.1f);
}

TEST_CASE("avg_pool2d (count_include_pad=False) and global_avg_pool match PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    for (const std::string c : {"avg3x3_s2_p1", "avg3x3_s1_p1", "avg2x2_s2"}) {
        CAPTURE(c);
        check_results(f, run_avg_pool2d(f, c, meta_int(f, c + ".kernel"), meta_int(f, c + ".stride"),
                                        meta_int(f, c + ".padding")));
    }
    Variable x = leaf(f, "global_avg_pool.x");
    Variable y = global_avg_pool(x);
    y.backward(f.get("global_avg_pool.dy"));
    check_results(f, {{"global_avg_pool.y", y.value()}, {"global_avg_pool.grad.x", x.grad()}});
    // Kernel 3, padding 1 gives avg2x2_s2's output shape, other windows.
    check_broken(f, "avg2x2_s2 with kernel 3, padding 1", run_avg_pool2d(f, "avg2x2_s2", 3, 2, 1));
}

TEST_CASE("linear matches PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    auto run = [&](bool with_bias) {
        Variable x = leaf(f, "linear.x"), w = leaf(f, "linear.weight"), b = leaf(f, "linear.bias");
        Variable y = linear(x, w, with_bias ? b : Variable());
        y.backward(f.get("linear.dy"));
        Results r = {{"linear.y", y.value()}, {"linear.grad.x", x.grad()}, {"linear.grad.weight", w.grad()}};
        if (with_bias) r.emplace_back("linear.grad.bias", b.grad());
        return r;
    };
    check_results(f, run(true));
    check_broken(f, "linear without its bias", run(false));
}

TEST_CASE("cross_entropy with and without label smoothing matches PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    for (const std::string c : {"cross_entropy_ls0.1", "cross_entropy_ls0"}) {
        CAPTURE(c);
        check_results(f, run_cross_entropy(f, c, meta_float(f, c + ".label_smoothing")));
    }
    check_broken(f, "cross_entropy_ls0.1 without smoothing", run_cross_entropy(f, "cross_entropy_ls0.1", 0.0f));
}

// The network of make_network() in the script, layer for layer.
TEST_CASE("a small network's training step matches PyTorch: loss, logits, every gradient, running statistics") {
    const SafetensorsFile f = load("engine_network.safetensors");
    const float momentum = meta_float(f, "net.momentum"), eps = meta_float(f, "net.eps");
    const std::vector<std::string> names = {"conv1.weight", "bn1.gamma", "bn1.beta",  "dw.weight",
                                            "bn2.gamma",    "bn2.beta",  "fc.weight", "fc.bias"};
    // The two batch norms and their ReLU6 as separate ops, or as the fused op
    // the layers use in training.
    auto run = [&](bool fused, const Conv2dParams& conv1) {
        std::map<std::string, Variable> p;
        for (const std::string& n : names) p[n] = leaf(f, "net." + n);
        std::map<std::string, Tensor> stats;
        for (const std::string s : {"bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"})
            stats[s] = f.get("net." + s).clone();
        auto bn_relu6 = [&](const Variable& in, const std::string& bn) {
            const Variable &gamma = p[bn + ".gamma"], &beta = p[bn + ".beta"];
            Tensor &mean = stats[bn + ".running_mean"], &var = stats[bn + ".running_var"];
            return fused ? batch_norm_relu6(in, gamma, beta, mean, var, true, momentum, eps)
                         : relu6(batch_norm(in, gamma, beta, mean, var, true, momentum, eps));
        };
        const Conv2dParams dw{.stride = 1, .padding = 1, .groups = static_cast<int>(p["bn1.gamma"].value().numel())};
        Variable x = leaf(f, "net.x");                                                  // {4,16,16,3}
        Variable h = bn_relu6(conv2d(x, p["conv1.weight"], Variable(), conv1), "bn1");  // {4,8,8,8}
        h = bn_relu6(conv2d(h, p["dw.weight"], Variable(), dw), "bn2");                 // {4,8,8,8}
        Variable logits = linear(global_avg_pool(h), p["fc.weight"], p["fc.bias"]);     // {4,10}
        Variable loss = cross_entropy(logits, labels(f, "net.labels"), meta_float(f, "net.label_smoothing"));
        loss.backward();
        Results r = {{"net.logits", logits.value()}, {"net.loss", loss.value()}, {"net.grad.x", x.grad()}};
        for (const auto& [s, t] : stats) r.emplace_back("net." + s + "_after", t);
        for (const std::string& n : names) r.emplace_back("net.grad." + n, p[n].grad());
        return r;
    };
    const Conv2dParams conv1{.stride = 2, .padding = 1};
    check_results(f, run(false, conv1));
    check_results(f, run(true, conv1));
    // TensorFlow 'SAME' pads (0, 1): the same shapes, shifted by one pixel.
    check_broken(f, "net with conv1 'SAME' padded", run(false, {.stride = 2, .same_padding = true}));
}
