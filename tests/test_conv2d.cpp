// conv2d (engine/conv2d.cpp): forward against a direct convolution loop in
// double, backward against finite differences, the argument checks, and which
// oneDNN kernels the MobileNet configurations run.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "engine/check.h"
#include "engine/conv2d_diagnostics.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"

using namespace hfq;
using testing::random_tensor;

namespace {

// The geometry a test case expects, written out by hand (not computed by the
// code under test): output size and the zero padding before (top, left).
struct Expected {
    int64_t ho, wo, pad_top, pad_left;
};

// y[n,oh,ow,co] = b[co] + sum over the group's input channels ci and kernel
// taps (i,j) of x[n, oh*s - pad_top + i, ow*s - pad_left + j, ci] * w[co, ci', i, j],
// taps outside x reading zero. x {N,H,W,Cin} NHWC, w {Cout,Cin/G,KH,KW}.
Tensor reference_conv(const Tensor& x, const Tensor& w, const Tensor& b, int stride, int groups, Expected e) {
    const int64_t n_ = x.dim(0), h = x.dim(1), wd = x.dim(2), cin = x.dim(3);
    const int64_t cout = w.dim(0), cin_g = w.dim(1), kh = w.dim(2), kw = w.dim(3), cout_g = cout / groups;
    Tensor y = Tensor::empty({n_, e.ho, e.wo, cout});
    const float* px = x.f32();
    const float* pw = w.f32();
    for (int64_t n = 0; n < n_; ++n)
        for (int64_t oh = 0; oh < e.ho; ++oh)
            for (int64_t ow = 0; ow < e.wo; ++ow)
                for (int64_t co = 0; co < cout; ++co) {
                    double s = b.defined() ? b.f32()[co] : 0.0;
                    const int64_t first_ci = co / cout_g * cin_g;
                    for (int64_t c = 0; c < cin_g; ++c)
                        for (int64_t i = 0; i < kh; ++i)
                            for (int64_t j = 0; j < kw; ++j) {
                                const int64_t ih = oh * stride - e.pad_top + i, iw = ow * stride - e.pad_left + j;
                                if (ih < 0 || ih >= h || iw < 0 || iw >= wd) continue;
                                s += double(px[((n * h + ih) * wd + iw) * cin + first_ci + c]) *
                                     pw[((co * cin_g + c) * kh + i) * kw + j];
                            }
                    y.f32()[((n * e.ho + oh) * e.wo + ow) * cout + co] = static_cast<float>(s);
                }
    return y;
}

struct Case {
    const char* name;
    Shape x, w;
    Conv2dParams p;
    Expected e;
};

// Channel counts are mostly not multiples of oneDNN's 8/16 blocks, so the
// blocked weight layouts carry padding.
const Case kCases[] = {
    {"standard 3x3, pad 1", {2, 6, 7, 3}, {5, 3, 3, 3}, {1, 1, false, 1}, {6, 7, 1, 1}},
    {"standard 3x3, stride 2, pad 1", {2, 7, 8, 4}, {20, 4, 3, 3}, {2, 1, false, 1}, {4, 4, 1, 1}},
    {"depthwise 3x3, stride 1", {2, 6, 5, 8}, {8, 1, 3, 3}, {1, 1, false, 8}, {6, 5, 1, 1}},
    {"depthwise 3x3, stride 2", {2, 7, 6, 24}, {24, 1, 3, 3}, {2, 1, false, 24}, {4, 3, 1, 1}},
    {"pointwise 1x1", {2, 5, 4, 8}, {12, 8, 1, 1}, {1, 0, false, 1}, {5, 4, 0, 0}},
    // Pointwise is a matrix product cut into tiles by the shape: many rows
    // (8 tiles of 400 rows), more than 8 x 8192 rows (16 tiles of 5625), and
    // few rows with many columns (5 column tiles).
    {"pointwise 1x1, row tiles", {2, 40, 40, 5}, {7, 5, 1, 1}, {1, 0, false, 1}, {40, 40, 0, 0}},
    {"pointwise 1x1, 16 row tiles", {1, 300, 300, 3}, {4, 3, 1, 1}, {1, 0, false, 1}, {300, 300, 0, 0}},
    {"pointwise 1x1, column tiles", {3, 1, 1, 20}, {70, 20, 1, 1}, {1, 0, false, 1}, {1, 1, 0, 0}},
    // SAME, stride 2, k 3: H 8 -> 4 rows, total pad 1 -> top 0, bottom 1;
    // W 7 -> 4 cols, total pad 2 -> 1 left, 1 right.
    {"SAME 3x3 stride 2, odd extra at the bottom", {2, 8, 7, 6}, {6, 1, 3, 3}, {2, 0, true, 6}, {4, 4, 0, 1}},
    // SAME, stride 2, k 1: H 6 -> 3 with (3-1)*2+1-6 < 0, i.e. no padding.
    {"SAME 1x1 stride 2, negative total clamped to 0", {1, 6, 5, 4}, {3, 4, 1, 1}, {2, 0, true, 1}, {3, 3, 0, 0}},
    {"SAME 5x5 stride 1", {1, 5, 6, 3}, {4, 3, 5, 5}, {1, 0, true, 1}, {5, 6, 2, 2}},
    // Depthwise: channel counts off oneDNN's blocks, 3x3 and 5x5, stride 1 and
    // 2, the taps at the borders, tiny images.
    {"depthwise 3x3, 19 channels", {2, 5, 6, 19}, {19, 1, 3, 3}, {1, 1, false, 19}, {5, 6, 1, 1}},
    {"depthwise 5x5, stride 2, pad 2", {1, 9, 8, 13}, {13, 1, 5, 5}, {2, 2, false, 13}, {5, 4, 2, 2}},
    {"depthwise SAME 5x5 stride 1", {1, 4, 3, 8}, {8, 1, 5, 5}, {1, 0, true, 8}, {4, 3, 2, 2}},
    {"depthwise 3x3, stride 2, no padding", {1, 8, 9, 16}, {16, 1, 3, 3}, {2, 0, false, 16}, {3, 4, 0, 0}},
    {"depthwise 3x3 on a 1x1 image (a small network's tail)",
     {3, 1, 1, 16},
     {16, 1, 3, 3},
     {1, 1, false, 16},
     {1, 1, 1, 1}},
    {"depthwise 3x3, stride 2 on a 2x2 image", {2, 2, 2, 9}, {9, 1, 3, 3}, {2, 1, false, 9}, {1, 1, 1, 1}},
    {"depthwise 7x7", {1, 5, 5, 8}, {8, 1, 7, 7}, {1, 3, false, 8}, {5, 5, 3, 3}},
    {"groups 2", {2, 5, 5, 4}, {6, 2, 3, 3}, {1, 1, false, 2}, {5, 5, 1, 1}},
    {"groups 4, 3x1 kernel, no padding", {1, 6, 5, 8}, {8, 2, 3, 1}, {1, 0, false, 4}, {4, 5, 0, 0}},
};

Variable run_conv(const std::vector<Variable>& in, const Conv2dParams& p) {
    return conv2d(in[0], in[1], in.size() > 2 ? in[2] : Variable(), p);
}

}  // namespace

TEST_CASE("conv2d forward equals a direct convolution loop") {
    for (const Case& c : kCases) {
        for (bool with_bias : {false, true}) {
            INFO("case: ", std::string(c.name));
            CAPTURE(with_bias);
            const Tensor x = random_tensor(c.x, 1), w = random_tensor(c.w, 2);
            const Tensor b = with_bias ? random_tensor({c.w[0]}, 3) : Tensor();
            const Variable y = conv2d(Variable(x), Variable(w), with_bias ? Variable(b) : Variable(), c.p);
            REQUIRE(y.shape() == Shape{c.x[0], c.e.ho, c.e.wo, c.w[0]});
            // Each output is b + a dot product of at most n = Cin/G * KH * KW
            // taps: in float, in any order, within gamma(n + 2) of its
            // magnitude M = |b| + sum |x| |w| (the loop on |x|, |w|, |b|);
            // the loop sums in double (n 2^-53 M, inside gamma's slack), then
            // rounds once (u M more). M is rounded to float once.
            const double n = double(c.w[1] * c.w[2] * c.w[3]);
            const Tensor magnitude =
                reference_conv(testing::abs_of(x), testing::abs_of(w), with_bias ? testing::abs_of(b) : Tensor(),
                               c.p.stride, c.p.groups, c.e);
            const Tensor bound = testing::bound_from(magnitude, testing::gamma_n(n + 3), 1);
            testing::check_within_bound("conv2d vs the loop", y.value(),
                                        reference_conv(x, w, b, c.p.stride, c.p.groups, c.e), bound);
            // The loop with the window shifted one column (a wrong padding).
            Expected shifted = c.e;
            shifted.pad_left += 1;
            testing::check_far_outside(
                "conv2d vs the loop with a wrong padding",
                testing::worst_bound_ratio(y.value(), reference_conv(x, w, b, c.p.stride, c.p.groups, shifted), bound));
        }
    }
}

TEST_CASE("conv2d backward of x, weight and bias matches finite differences") {
    // conv2d is linear in each input, so a large step has no truncation error
    // and keeps f32 rounding noise small against the difference.
    testing::GradCheckOptions opt;
    opt.step = 0.05;
    opt.max_points = 32;  // per input; each point costs two forward calls
    for (const Case& c : kCases) {
        INFO("case: ", std::string(c.name));
        std::vector<Tensor> inputs{random_tensor(c.x, 4), random_tensor(c.w, 5)};
        auto f = [&](const std::vector<Variable>& in) { return run_conv(in, c.p); };
        testing::check_gradients(f, inputs, opt);  // no bias: another backward-weights primitive
        inputs.push_back(random_tensor({c.w[0]}, 6));
        testing::check_gradients(f, inputs, opt);
    }
}

TEST_CASE("conv2d backward with a constant input (first layer) or constant weights") {
    // Each skips one backward pass; what it does compute must not change.
    const Case& c = kCases[1];
    const Tensor x = random_tensor(c.x, 7), w = random_tensor(c.w, 8), dy_seed = random_tensor({2, 4, 4, 20}, 9);
    Variable x_all(x, true), w_all(w, true);
    conv2d(x_all, w_all, Variable(), c.p).backward(dy_seed);

    Variable x_const(x), w_only(w, true);
    conv2d(x_const, w_only, Variable(), c.p).backward(dy_seed);
    CHECK(!x_const.grad().defined());
    CHECK(w_only.grad().to_vector() == w_all.grad().to_vector());

    Variable x_only(x, true), w_const(w);
    conv2d(x_only, w_const, Variable(), c.p).backward(dy_seed);
    CHECK(!w_const.grad().defined());
    CHECK(x_only.grad().to_vector() == x_all.grad().to_vector());
}

TEST_CASE("conv2d rejects bad arguments with a message naming conv2d and the problem") {
    const Variable x(random_tensor({1, 5, 5, 4}, 1));
    const Variable w(random_tensor({6, 4, 3, 3}, 2));
    const Conv2dParams p{1, 1, false, 1};
    auto with = [](int stride, int padding, bool same, int groups) {
        return Conv2dParams{stride, padding, same, groups};
    };

    CHECK_THROWS_WITH_AS(conv2d(Variable(random_tensor({5, 5, 4}, 1)), w, Variable(), p),
                         doctest::Contains("conv2d: x must be NHWC"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, Variable(random_tensor({6, 4, 3}, 2)), Variable(), p),
                         doctest::Contains("conv2d: weight must be OIHW"), Error);
    CHECK_THROWS_WITH_AS(conv2d(Variable(), w, Variable(), p), doctest::Contains("conv2d: x and weight"), Error);
    // weight {6,3,3,3} wants 3 input channels, x has 4.
    CHECK_THROWS_WITH_AS(conv2d(x, Variable(random_tensor({6, 3, 3, 3}, 2)), Variable(), p),
                         doctest::Contains("conv2d: weight [6, 3, 3, 3] expects 3 input channels"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, Variable(random_tensor({6, 1, 3, 3}, 2)), Variable(), with(1, 1, false, 3)),
                         doctest::Contains("conv2d: groups 3 must divide"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, Variable(random_tensor({6, 4, 9, 3}, 2)), Variable(), p),
                         doctest::Contains("conv2d: kernel height 9 is larger than the padded input height 5"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, w, Variable(), with(0, 1, false, 1)), doctest::Contains("conv2d: stride"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, w, Variable(), with(1, -1, false, 1)), doctest::Contains("conv2d: padding"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, w, Variable(), with(1, 1, true, 1)), doctest::Contains("conv2d: same_padding"),
                         Error);
    CHECK_THROWS_WITH_AS(conv2d(x, w, Variable(), with(1, 1, false, 0)), doctest::Contains("conv2d: groups"), Error);
    CHECK_THROWS_WITH_AS(conv2d(x, w, Variable(random_tensor({5}, 3)), p),
                         doctest::Contains("conv2d: bias must be f32 {6}"), Error);
    CHECK_THROWS_WITH_AS(conv2d(Variable(Tensor::zeros({0, 5, 5, 4})), w, Variable(), p),
                         doctest::Contains("conv2d: x has an empty dimension"), Error);
    CHECK_THROWS_WITH_AS(conv2d(Variable(Tensor::zeros({1, 5, 5, 4}, DType::s8)), w, Variable(), p),
                         doctest::Contains("conv2d: x and weight must be f32"), Error);
}

namespace {

// The vector ISA oneDNN's kernels name under the ISA in force (the CPU's,
// capped by ONEDNN_MAX_CPU_ISA): avx512_core on AVX-512 machines (also with
// VNNI, BF16 or AMX: their f32 kernels are avx512_core ones), avx2 on AVX2
// machines; empty below AVX2, which hfq's x86-64-v3 build needs.
std::string kernel_isa() {
    const auto has = [](dnnl::cpu_isa isa) {
        return (unsigned(dnnl::get_effective_cpu_isa()) & unsigned(isa)) == unsigned(isa);
    };
    if (has(dnnl::cpu_isa::avx512_core)) return "avx512_core";
    if (has(dnnl::cpu_isa::avx512_mic)) return "avx512_mic";
    if (has(dnnl::cpu_isa::avx2)) return "avx2";
    return "";
}

}  // namespace

TEST_CASE("MobileNet's convolutions on NHWC run oneDNN's JIT kernels for the ISA in force, never the reference ones") {
    const std::string isa = kernel_isa();
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    REQUIRE_MESSAGE(!isa.empty(), "oneDNN runs below AVX2 here (dnnl_cpu_isa_t ",
                    unsigned(dnnl::get_effective_cpu_isa()), ", ONEDNN_MAX_CPU_ISA=", std::string(cap ? cap : "unset"),
                    "): hfq is built for x86-64-v3 and needs AVX2");
    // A JIT kernel is named <family>:<isa>: jit:avx2, jit_dw:avx2,
    // brgconv:avx512_core, brdgmm_dw:avx512_core, ... A convolution as a
    // matrix product (x64:gemm:jit) runs oneDNN's JIT sgemm, which picks the
    // ISA itself; reference kernels (ref:any, gemm:ref) are never accepted.
    auto runs_isa = [&](const std::string& name) {
        if (name.find("ref") != std::string::npos) return false;
        return name.substr(name.rfind(':') + 1).rfind(isa, 0) == 0 || name.ends_with("gemm:jit");
    };
    struct Config {
        const char* name;
        Shape x, w;
        Conv2dParams p;
    };
    const Config configs[] = {
        {"depthwise 3x3 stride 1", {4, 28, 28, 32}, {32, 1, 3, 3}, {1, 1, false, 32}},
        {"depthwise 3x3 stride 2", {4, 28, 28, 64}, {64, 1, 3, 3}, {2, 1, false, 64}},
        {"3x3 stem, stride 2", {4, 32, 32, 3}, {32, 3, 3, 3}, {2, 1, false, 1}},
    };
    for (const Config& c : configs) {
        const Conv2dImplNames names = conv2d_impl_names(c.x, c.w, false, c.p);
        INFO("case: ", std::string(c.name), ", ISA ", isa);
        INFO("forward ", names.forward, ", backward data ", names.backward_data, ", backward weights ",
             names.backward_weights);
        CHECK(runs_isa(names.forward));
        CHECK(runs_isa(names.backward_data));
        CHECK(runs_isa(names.backward_weights));
    }
    // A small network's tail (32x32 inputs): oneDNN's depthwise kernels refuse
    // images of 2x2 and smaller, and its generic fallback for the weight
    // gradient took 4-8 ms per call on AVX2; conv2d then runs its own loop.
    const Config tails[] = {
        {"depthwise on 2x2", {32, 2, 2, 512}, {512, 1, 3, 3}, {1, 1, false, 512}},
        {"depthwise on 2x2, stride 2", {32, 2, 2, 512}, {512, 1, 3, 3}, {2, 1, false, 512}},
        {"depthwise on 1x1", {32, 1, 1, 1024}, {1024, 1, 3, 3}, {1, 1, false, 1024}},
    };
    for (const Config& c : tails) {
        const Conv2dImplNames names = conv2d_impl_names(c.x, c.w, false, c.p);
        INFO("case: ", std::string(c.name), ", ISA ", isa, ", backward weights ", names.backward_weights);
        CHECK((names.backward_weights == "hfq:depthwise_weights" ||
               names.backward_weights.find("_dw") != std::string::npos));
        CHECK(runs_isa(names.forward));
        CHECK(runs_isa(names.backward_data));
    }
    // Pointwise convolutions are matrix products (engine/conv2d_pointwise.cpp).
    const Conv2dImplNames pw = conv2d_impl_names({4, 14, 14, 64}, {128, 64, 1, 1}, false, {1, 0, false, 1});
    CHECK(pw.forward == "sgemm:pointwise");
    CHECK(pw.backward_data == "sgemm:pointwise");
    CHECK(pw.backward_weights == "sgemm:pointwise");
}

TEST_CASE("pointwise conv2d: output and every gradient do not depend on the thread count") {
    // Shapes of a small network's tail (few rows, many columns: dW in row
    // blocks) and of large images (many row tiles; dW in chunks of rows from
    // 16384 rows on: 80000 here).
    const std::vector<std::pair<Shape, Shape>> shapes{
        {{32, 1, 1, 256}, {512, 256, 1, 1}}, {{4, 48, 48, 16}, {24, 16, 1, 1}}, {{2, 200, 200, 8}, {8, 8, 1, 1}}};
    const int threads_before = compute_threads();
    for (const auto& [xs, ws] : shapes) {
        const Tensor x = random_tensor(xs, 1), w = random_tensor(ws, 2), b = random_tensor({ws[0]}, 4);
        const Tensor dy = random_tensor({xs[0], xs[1], xs[2], ws[0]}, 3);
        std::vector<std::vector<float>> y, dx, dw, db;
        for (int threads : {1, 2, 3}) {
            set_compute_threads(threads);
            Variable xv(x, true), wv(w, true), bv(b, true);
            const Variable out = conv2d(xv, wv, bv, {1, 0, false, 1});
            out.backward(dy);
            y.push_back(out.value().to_vector());
            dx.push_back(xv.grad().to_vector());
            dw.push_back(wv.grad().to_vector());
            db.push_back(bv.grad().to_vector());
        }
        set_compute_threads(threads_before);
        CHECK(y[0] == y[1]);
        CHECK(y[0] == y[2]);
        CHECK(dx[0] == dx[1]);
        CHECK(dx[0] == dx[2]);
        CHECK(dw[0] == dw[1]);
        CHECK(dw[0] == dw[2]);
        CHECK(db[0] == db[1]);
        CHECK(db[0] == db[2]);
    }
}

TEST_CASE("depthwise weight gradient on tiny images (hfq's loop) is within its float rounding of the exact sum, at any thread count") {
    // dW[c,i,j] = sum over n,oh,ow of dy[n,oh,ow,c] * x[n, oh*s - pad_top + i, ow*s - pad_left + j, c],
    // db[c] = sum of dy. The loop sums m terms in float, one after another;
    // each product and each addition rounds by at most u = 2^-24 relative, so
    // the classic bound on such a sum is |computed - exact| <= gamma_m *
    // sum |term|, gamma_m = m u / (1 - m u) (Higham, Accuracy and Stability
    // of Numerical Algorithms, 3.1). The reference sums in double: its own
    // error, m * 2^-53 of the same magnitude sum, is ~2^-29 of the bound.
    struct Tail {
        const char* name;
        Shape x, w;
        Conv2dParams p;
        Expected e;
    };
    const Tail tails[] = {
        {"2x2, stride 1, 40 channels (two blocks and a part)",
         {5, 2, 2, 40},
         {40, 1, 3, 3},
         {1, 1, false, 40},
         {2, 2, 1, 1}},
        {"2x2, stride 2", {4, 2, 2, 24}, {24, 1, 3, 3}, {2, 1, false, 24}, {1, 1, 1, 1}},
        {"1x1", {6, 1, 1, 19}, {19, 1, 3, 3}, {1, 1, false, 19}, {1, 1, 1, 1}},
        {"2x1, 5x5, SAME", {3, 2, 1, 17}, {17, 1, 5, 5}, {1, 0, true, 17}, {2, 1, 2, 2}},
    };
    const int threads_before = compute_threads();
    for (const Tail& c : tails) {
        INFO("case: ", std::string(c.name));
        REQUIRE(conv2d_impl_names(c.x, c.w, true, c.p).backward_weights == "hfq:depthwise_weights");
        const Tensor x = random_tensor(c.x, 11), w = random_tensor(c.w, 12), b = random_tensor({c.w[0]}, 13);
        const Tensor dy = random_tensor({c.x[0], c.e.ho, c.e.wo, c.w[0]}, 14);
        const int64_t kh = c.w[2], kw = c.w[3], ch = c.x[3], s = c.p.stride;
        std::vector<double> dw_ref(ch * kh * kw, 0.0), dw_abs(dw_ref.size(), 0.0), db_ref(ch, 0.0), db_abs(ch, 0.0);
        std::vector<int64_t> dw_terms(dw_ref.size(), 0);  // m per dW entry; every db sums n*ho*wo terms
        for (int64_t n = 0; n < c.x[0]; ++n)
            for (int64_t oh = 0; oh < c.e.ho; ++oh)
                for (int64_t ow = 0; ow < c.e.wo; ++ow)
                    for (int64_t k = 0; k < ch; ++k) {
                        const double g = dy.f32()[((n * c.e.ho + oh) * c.e.wo + ow) * ch + k];
                        db_ref[k] += g;
                        db_abs[k] += std::abs(g);
                        for (int64_t i = 0; i < kh; ++i)
                            for (int64_t j = 0; j < kw; ++j) {
                                const int64_t ih = oh * s - c.e.pad_top + i, iw = ow * s - c.e.pad_left + j;
                                if (ih < 0 || ih >= c.x[1] || iw < 0 || iw >= c.x[2]) continue;
                                const double t = g * x.f32()[((n * c.x[1] + ih) * c.x[2] + iw) * ch + k];
                                dw_ref[(k * kh + i) * kw + j] += t;
                                dw_abs[(k * kh + i) * kw + j] += std::abs(t);
                                ++dw_terms[(k * kh + i) * kw + j];
                            }
                    }
        std::vector<std::vector<float>> dw, db;
        for (int threads : {1, 2, 3}) {
            set_compute_threads(threads);
            Variable xv(x), wv(w, true), bv(b, true);
            conv2d(xv, wv, bv, c.p).backward(dy);
            dw.push_back(wv.grad().to_vector());
            db.push_back(bv.grad().to_vector());
        }
        set_compute_threads(threads_before);
        const auto gamma = [](int64_t m) { return m * 0x1p-24 / (1 - m * 0x1p-24); };
        for (size_t k = 0; k < dw_ref.size(); ++k) {
            INFO("dW entry ", k, ": ", dw[0][k], " against ", dw_ref[k]);
            REQUIRE(std::abs(dw[0][k] - dw_ref[k]) <= gamma(dw_terms[k]) * dw_abs[k]);
        }
        const int64_t db_terms = c.x[0] * c.e.ho * c.e.wo;
        for (int64_t k = 0; k < ch; ++k) REQUIRE(std::abs(db[0][k] - db_ref[k]) <= gamma(db_terms) * db_abs[k]);
        CHECK(dw[0] == dw[1]);
        CHECK(dw[0] == dw[2]);
        CHECK(db[0] == db[1]);
        CHECK(db[0] == db[2]);
    }
}
