// hfq's ops against numbers PyTorch computed.
//
// The fixtures tests/data/engine_*.safetensors are written by
// tests/fixtures/make_engine_fixtures.py (Debian's PyTorch, fixed seeds; the
// script documents how and in which layout). Each case loads its inputs,
// runs hfq's op forward and backward (from the stored upstream gradient dy,
// or from the loss), and compares every output, gradient and updated buffer
// with PyTorch's.
//
// Tolerance. The references were computed in float64 and rounded to float32,
// so the difference measured is hfq's own float32 error. Every tensor must
// agree within kRelTol = 1e-4 relative, per element, where elements smaller
// than kFloorFraction (1%) of the tensor's largest magnitude are measured
// against that 1% instead of against themselves: such an element is a
// difference of larger terms (a sum of products in a convolution, x - mean in
// batch norm), and its float32 error is a few ulps of those terms, not of the
// small result. Its allowed absolute error is thus 1e-6 x the largest
// magnitude, about 16 float32 ulps of it.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "engine/ops.h"
#include "engine/safetensors.h"
#include "engine/tensor_math.h"

using namespace hfq;

namespace {

constexpr double kRelTol = 1e-4;
constexpr double kFloorFraction = 1e-2;

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

// Compares one tensor with its reference (see the tolerance note above).
// HFQ_SHOW_ERRORS=1 prints every measured error.
void expect_close(const std::string& what, const Tensor& actual, const Tensor& expected) {
    INFO(what);
    REQUIRE(actual.defined());
    REQUIRE(actual.shape() == expected.shape());
    const double floor = kFloorFraction * max_abs(expected);
    const double err = max_rel_diff(actual, expected, floor > 0 ? floor : 1e-30);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(what, ": max relative difference ", err);
    CHECK(err <= kRelTol);
}

void expect_close(const SafetensorsFile& f, const std::string& name, const Tensor& actual) {
    expect_close(name, actual, f.get(name));
}

}  // namespace

TEST_CASE("conv2d matches PyTorch: forward, dx, dweight, dbias") {
    const SafetensorsFile f = load("engine_conv2d.safetensors");
    for (const std::string c : {"std3x3_s1_p1", "std3x3_s2_p1", "dw3x3_s1_p1", "dw3x3_s2_p1", "pw1x1", "same3x3_s2_even",
                                "same_dw3x3_s2_even", "same3x3_s2_odd"}) {
        CAPTURE(c);
        Conv2dParams p;
        p.stride = meta_int(f, c + ".stride");
        p.padding = meta_int(f, c + ".padding");
        p.same_padding = meta_int(f, c + ".same_padding") != 0;
        p.groups = meta_int(f, c + ".groups");
        Variable x = leaf(f, c + ".x"), w = leaf(f, c + ".weight");
        const bool has_bias = f.has(c + ".bias");
        Variable b = has_bias ? leaf(f, c + ".bias") : Variable();

        Variable y = conv2d(x, w, b, p);
        expect_close(f, c + ".y", y.value());
        y.backward(f.get(c + ".dy"));
        expect_close(f, c + ".dx", x.grad());
        expect_close(f, c + ".dweight", w.grad());
        if (has_bias) expect_close(f, c + ".dbias", b.grad());
    }
}

TEST_CASE("batch_norm matches PyTorch in training and evaluation, running statistics included") {
    const SafetensorsFile f = load("engine_batch_norm.safetensors");
    for (const std::string c : {"train", "eval"}) {
        CAPTURE(c);
        Variable x = leaf(f, c + ".x"), gamma = leaf(f, c + ".gamma"), beta = leaf(f, c + ".beta");
        Tensor running_mean = f.get(c + ".running_mean").clone();
        Tensor running_var = f.get(c + ".running_var").clone();

        Variable y = batch_norm(x, gamma, beta, running_mean, running_var, meta_int(f, c + ".training") != 0,
                                meta_float(f, c + ".momentum"), meta_float(f, c + ".eps"));
        expect_close(f, c + ".y", y.value());
        expect_close(f, c + ".running_mean_after", running_mean);
        expect_close(f, c + ".running_var_after", running_var);
        y.backward(f.get(c + ".dy"));
        expect_close(f, c + ".dx", x.grad());
        expect_close(f, c + ".dgamma", gamma.grad());
        expect_close(f, c + ".dbeta", beta.grad());
    }
}

TEST_CASE("relu6 matches PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    Variable x = leaf(f, "relu6.x");
    Variable y = relu6(x);
    expect_close(f, "relu6.y", y.value());
    y.backward(f.get("relu6.dy"));
    expect_close(f, "relu6.dx", x.grad());
}

TEST_CASE("avg_pool2d (count_include_pad=False) and global_avg_pool match PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    for (const std::string c : {"avg3x3_s2_p1", "avg3x3_s1_p1", "avg2x2_s2"}) {
        CAPTURE(c);
        Variable x = leaf(f, c + ".x");
        Variable y = avg_pool2d(x, meta_int(f, c + ".kernel"), meta_int(f, c + ".stride"), meta_int(f, c + ".padding"));
        expect_close(f, c + ".y", y.value());
        y.backward(f.get(c + ".dy"));
        expect_close(f, c + ".dx", x.grad());
    }
    Variable x = leaf(f, "global_avg_pool.x");
    Variable y = global_avg_pool(x);
    expect_close(f, "global_avg_pool.y", y.value());
    y.backward(f.get("global_avg_pool.dy"));
    expect_close(f, "global_avg_pool.dx", x.grad());
}

TEST_CASE("linear matches PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    Variable x = leaf(f, "linear.x"), w = leaf(f, "linear.weight"), b = leaf(f, "linear.bias");
    Variable y = linear(x, w, b);
    expect_close(f, "linear.y", y.value());
    y.backward(f.get("linear.dy"));
    expect_close(f, "linear.dx", x.grad());
    expect_close(f, "linear.dweight", w.grad());
    expect_close(f, "linear.dbias", b.grad());
}

TEST_CASE("cross_entropy with and without label smoothing matches PyTorch") {
    const SafetensorsFile f = load("engine_small_ops.safetensors");
    for (const std::string c : {"cross_entropy_ls0.1", "cross_entropy_ls0"}) {
        CAPTURE(c);
        Variable logits = leaf(f, c + ".logits");
        Variable loss = cross_entropy(logits, labels(f, c + ".labels"), meta_float(f, c + ".label_smoothing"));
        expect_close(f, c + ".loss", loss.value());
        loss.backward();
        expect_close(f, c + ".dlogits", logits.grad());
    }
}

// The network of make_network() in the script, layer for layer.
TEST_CASE("a small network's training step matches PyTorch: loss, logits, every gradient, running statistics") {
    const SafetensorsFile f = load("engine_network.safetensors");
    const float momentum = meta_float(f, "net.momentum"), eps = meta_float(f, "net.eps");
    const std::vector<std::string> names = {"conv1.weight", "bn1.gamma", "bn1.beta", "dw.weight",
                                            "bn2.gamma",    "bn2.beta",  "fc.weight", "fc.bias"};
    std::map<std::string, Variable> p;
    for (const std::string& n : names) p[n] = leaf(f, "net." + n);
    const int64_t width = p["bn1.gamma"].value().numel();
    Tensor bn1_mean = Tensor::zeros({width}), bn1_var = Tensor::full({width}, 1.0f);
    Tensor bn2_mean = Tensor::zeros({width}), bn2_var = Tensor::full({width}, 1.0f);

    Variable x = leaf(f, "net.x");                                          // {4,16,16,3}
    Conv2dParams conv1{.stride = 2, .padding = 1};
    Conv2dParams dw{.stride = 1, .padding = 1, .groups = static_cast<int>(width)};
    // The two batch norms and their ReLU6 as separate ops, or as the fused op
    // the layers use in training.
    bool fused = false;
    SUBCASE("batch_norm, relu6") {}
    SUBCASE("batch_norm_relu6") { fused = true; }
    auto bn_relu6 = [&](const Variable& in, const std::string& bn, Tensor& running_mean, Tensor& running_var) {
        const Variable &gamma = p[bn + ".gamma"], &beta = p[bn + ".beta"];
        return fused ? batch_norm_relu6(in, gamma, beta, running_mean, running_var, true, momentum, eps)
                     : relu6(batch_norm(in, gamma, beta, running_mean, running_var, true, momentum, eps));
    };
    Variable h = conv2d(x, p["conv1.weight"], Variable(), conv1);          // {4,8,8,8}
    h = bn_relu6(h, "bn1", bn1_mean, bn1_var);
    h = conv2d(h, p["dw.weight"], Variable(), dw);                         // {4,8,8,8}
    h = bn_relu6(h, "bn2", bn2_mean, bn2_var);
    Variable logits = linear(global_avg_pool(h), p["fc.weight"], p["fc.bias"]);  // {4,10}
    Variable loss = cross_entropy(logits, labels(f, "net.labels"), meta_float(f, "net.label_smoothing"));

    expect_close(f, "net.logits", logits.value());
    expect_close(f, "net.loss", loss.value());
    expect_close(f, "net.bn1.running_mean_after", bn1_mean);
    expect_close(f, "net.bn1.running_var_after", bn1_var);
    expect_close(f, "net.bn2.running_mean_after", bn2_mean);
    expect_close(f, "net.bn2.running_var_after", bn2_var);
    loss.backward();
    expect_close(f, "net.dx", x.grad());
    for (const std::string& n : names) expect_close(f, "net.grad." + n, p[n].grad());
}
