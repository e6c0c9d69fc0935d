// Batch-norm folding (spec section 6): the folding ops against finite
// differences, the folded wrapper against a float convolution followed by
// batch norm (training and evaluation), the moving-statistics update, and
// freezing.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/ops.h"
#include "engine/tensor_math.h"
#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "quant/folded_conv_bn.h"
#include "tests/gradcheck.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::check_gradients;
using hfq::testing::random_tensor;

namespace {

bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

Tensor positive_tensor(const Shape& shape, uint64_t seed, float base) {
    Tensor t = random_tensor(shape, seed, 0.3f);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = base + std::fabs(t.f32()[i]);
    return t;
}

// A conv (3 -> 4 channels, 3x3) and a batch norm whose folded weights sit
// exactly on the 4-bit grid: eps = 0.25 and running_var + eps = sigma^2 with
// gamma = sigma (so gamma / sigma = 1 exactly), W = k / 8 with |k| <= 7 and
// 7 in every channel. Then Q(W_fold) = W_fold = W with every weight in range,
// and the folded wrapper must compute what conv followed by batch norm does.
struct ExactPair {
    std::shared_ptr<Conv2d> conv = Conv2d::make(3, 4, 3, 1, 1);
    std::shared_ptr<BatchNorm2d> bn = std::make_shared<BatchNorm2d>(4, 0.1f, 0.25f);

    ExactPair() {
        Rng rng(5);
        Tensor& w = conv->weight().value();
        for (int64_t i = 0; i < w.numel(); ++i) w.f32()[i] = float(int(rng.below(15)) - 7) / 8.0f;
        for (int64_t c = 0; c < 4; ++c) w.f32()[c * 27 + 4] = (c % 2 ? -7.0f : 7.0f) / 8.0f;
        const float sigma[4] = {1.0f, 2.0f, 0.5f, 3.0f};
        for (int c = 0; c < 4; ++c) {
            bn->running_var().f32()[c] = sigma[c] * sigma[c] - 0.25f;
            bn->running_mean().f32()[c] = 0.1f * float(c) - 0.15f;
            bn->weight().value().f32()[c] = sigma[c];
            bn->bias().value().f32()[c] = 0.2f * float(c) - 0.3f;
        }
    }
    // A clone of the float layers' parameters and statistics, for the reference.
    struct Float {
        Variable w, gamma, beta;
        Tensor mean, var;
    };
    Float clone() {
        return {Variable(conv->weight().value().clone(), true), Variable(bn->weight().value().clone(), true),
                Variable(bn->bias().value().clone(), true), bn->running_mean().clone(), bn->running_var().clone()};
    }
};

// A conv (4 -> 6 channels, 3x3, padding 1) without bias and a batch norm
// with random moving statistics and affine parameters; the same seed gives
// the same pair.
struct RandomPair {
    std::shared_ptr<Conv2d> conv;
    std::shared_ptr<BatchNorm2d> bn;
};
RandomPair random_pair(uint64_t seed, int stride = 1) {
    RandomPair p{Conv2d::make(4, 6, 3, stride, 1), std::make_shared<BatchNorm2d>(6)};
    p.conv->initialize(seed);
    p.bn->running_mean().copy_from(random_tensor({6}, seed + 1, 0.2f));
    p.bn->running_var().copy_from(positive_tensor({6}, seed + 2, 0.5f));
    p.bn->weight().value().copy_from(positive_tensor({6}, seed + 3, 0.5f));
    p.bn->bias().value().copy_from(random_tensor({6}, seed + 4, 0.1f));
    return p;
}

QuantizerOptions per_channel_options() {
    QuantizerOptions opt;
    opt.per_channel = true;
    return opt;
}

}  // namespace

TEST_CASE("fold_weight and fold_bias: values and gradients (finite differences)") {
    const Tensor w = random_tensor({3, 2, 3, 3}, 1);
    const Tensor gamma = random_tensor({3}, 2);
    const Tensor beta = random_tensor({3}, 3);
    const Tensor mean = random_tensor({3}, 4);
    const Tensor var = positive_tensor({3}, 5, 0.5f);
    const float eps = 1e-3f;
    NoGradGuard ng;
    const Tensor wf = fold_weight(Variable(w), Variable(gamma), var, eps).value();
    const Tensor bf = fold_bias(Variable(gamma), Variable(beta), mean, var, eps).value();
    for (int c = 0; c < 3; ++c) {
        const double inv_sigma = 1.0 / std::sqrt(double(var.f32()[c]) + eps);
        const float factor = float(gamma.f32()[c] * inv_sigma);
        for (int i = 0; i < 18; ++i) CHECK(wf.f32()[c * 18 + i] == w.f32()[c * 18 + i] * factor);
        CHECK(bf.f32()[c] == float(beta.f32()[c] - double(gamma.f32()[c]) * mean.f32()[c] * inv_sigma));
    }
}

TEST_CASE("unfold_weight: U = Q(W_fold) * sigma_ema / gamma, undoing fold_weight up to rounding") {
    const Tensor w = random_tensor({3, 2, 3, 3}, 1);
    Tensor gamma = random_tensor({3}, 2);
    const Tensor var = positive_tensor({3}, 5, 0.5f);
    const float eps = 1e-3f;
    NoGradGuard ng;
    const Tensor wf = fold_weight(Variable(w), Variable(gamma), var, eps).value();
    const Tensor u = unfold_weight(Variable(wf), Variable(gamma), var, eps).value();
    CHECK(max_rel_diff(u, w) < 1e-6);
    for (int c = 0; c < 3; ++c) {
        const float factor = float(std::sqrt(double(var.f32()[c]) + eps) / gamma.f32()[c]);
        for (int i = 0; i < 18; ++i) CHECK(u.f32()[c * 18 + i] == wf.f32()[c * 18 + i] * factor);
    }
    // gamma = 0 (W_fold = 0): U = 0, not 0 / 0.
    gamma.f32()[1] = 0.0f;
    const Tensor u0 = unfold_weight(fold_weight(Variable(w), Variable(gamma), var, eps), Variable(gamma), var, eps).value();
    for (int i = 0; i < 18; ++i) CHECK(u0.f32()[18 + i] == 0.0f);
}

TEST_CASE("fold ops and the batch-statistics correction: gradients against finite differences") {
    const Tensor var = positive_tensor({3}, 5, 0.5f);
    const Tensor mean = random_tensor({3}, 4);
    check_gradients([&](const std::vector<Variable>& v) { return fold_weight(v[0], v[1], var, 1e-3f); },
                    {random_tensor({3, 2, 3, 3}, 1), random_tensor({3}, 2)});
    check_gradients([&](const std::vector<Variable>& v) { return unfold_weight(v[0], v[1], var, 1e-3f); },
                    {random_tensor({3, 2, 3, 3}, 1), positive_tensor({3}, 2, 0.5f)});
    check_gradients([&](const std::vector<Variable>& v) { return fold_bias(v[0], v[1], mean, var, 1e-3f); },
                    {random_tensor({3}, 2), random_tensor({3}, 3)});
    // y_q, y_f, gamma, beta; the running statistics are fresh copies at every call.
    const Tensor yf = random_tensor({2, 3, 3, 3}, 6, 1.5f);
    Tensor yq = yf.clone();
    for (int64_t i = 0; i < yq.numel(); ++i) yq.f32()[i] = 0.9f * yq.f32()[i] + 0.05f;
    hfq::testing::GradCheckOptions opt;
    opt.step = 1e-2;
    check_gradients(
        [&](const std::vector<Variable>& v) {
            Tensor rm = mean.clone(), rv = var.clone();
            return batch_stat_correction(v[0], v[1], v[2], v[3], rm, rv, 0.1f, 1e-3f);
        },
        {yq, yf, random_tensor({3}, 7), random_tensor({3}, 8)}, opt);
}

TEST_CASE("folded wrapper, training with batch statistics = conv then batch norm when Q(W_fold) = W_fold") {
    for (const char* method : {"msqe-po2", "learnable-po2"})
    for (BatchStatistics statistics : {BatchStatistics::float_conv, BatchStatistics::quantized_conv}) {
        INFO(std::string(method), " ", std::string(batch_statistics_name(statistics)));
        ExactPair p;
        ExactPair::Float ref = p.clone();
        QuantizerOptions opt;
        opt.per_channel = std::string(method) == "msqe-po2";
        opt.rounding = ExponentRounding::rint;
        FoldedConvBn folded(p.conv, "0", p.bn, "1", make_quantizer(method, opt, p.conv->weight().shape()), -1,
                            statistics);
        if (std::string(method) == "learnable-po2") {  // put e where the weights are on the grid: 2^-3
            folded.quantizer().named_parameters()[0].second->value().fill(-3.0f);
            hfq::testing::edit_state(folded.quantizer(), [](const std::string& name, Tensor& t) {
                if (name == "initialized") t.data<int32_t>()[0] = 1;
            });
        }
        folded.train();
        CHECK(folded.uses_batch_statistics());

        const Tensor x = random_tensor({2, 5, 5, 3}, 9);
        Variable xa(x, true), xb(x, true);
        Variable y = folded(xa);
        Variable yref = batch_norm(conv2d(xb, ref.w, Variable(), p.conv->config().params), ref.gamma, ref.beta,
                                   ref.mean, ref.var, true, 0.1f, 0.25f);
        CHECK(max_rel_diff(y.value(), yref.value()) < 1e-5);
        const Tensor g = random_tensor(y.shape(), 10);
        y.backward(g);
        yref.backward(g);
        CHECK(max_rel_diff(xa.grad(), xb.grad()) < 1e-4);
        CHECK(max_rel_diff(p.conv->weight().grad(), ref.w.grad()) < 1e-4);
        CHECK(max_rel_diff(p.bn->weight().grad(), ref.gamma.grad()) < 1e-4);
        CHECK(max_rel_diff(p.bn->bias().grad(), ref.beta.grad()) < 1e-4);
        // PyTorch's running statistics update, as BatchNorm2d.
        CHECK(max_rel_diff(p.bn->running_mean(), ref.mean, 1e-6) < 1e-6);
        CHECK(max_rel_diff(p.bn->running_var(), ref.var) < 1e-6);
        CHECK(p.bn->num_batches_tracked() == 1);
        // The quantizer's scale gets a gradient through the folded weights.
        if (std::string(method) == "learnable-po2") CHECK(folded.quantizer().named_parameters()[0].second->grad().defined());
    }
}

TEST_CASE("folded wrapper, evaluation = conv then batch norm in evaluation (Q(W_fold) = W_fold)") {
    ExactPair p;
    ExactPair::Float ref = p.clone();
    FoldedConvBn folded(p.conv, "0", p.bn, "1", make_quantizer("msqe-po2", QuantizerOptions{}, p.conv->weight().shape()));
    folded.eval();
    CHECK(!folded.uses_batch_statistics());
    const Tensor x = random_tensor({2, 5, 5, 3}, 11);
    Variable xa(x, true), xb(x, true);
    Variable y = folded(xa);
    Variable yref = batch_norm(conv2d(xb, ref.w, Variable(), p.conv->config().params), ref.gamma, ref.beta, ref.mean,
                               ref.var, false, 0.1f, 0.25f);
    CHECK(max_rel_diff(y.value(), yref.value()) < 1e-5);
    const Tensor g = random_tensor(y.shape(), 12);
    y.backward(g);
    yref.backward(g);
    CHECK(max_rel_diff(xa.grad(), xb.grad()) < 1e-4);
    CHECK(max_rel_diff(p.conv->weight().grad(), ref.w.grad()) < 1e-4);
    CHECK(max_rel_diff(p.bn->weight().grad(), ref.gamma.grad()) < 1e-4);
    CHECK(max_rel_diff(p.bn->bias().grad(), ref.beta.grad()) < 1e-4);
    // Nothing changes in evaluation.
    CHECK(same_bytes(p.bn->running_mean(), ref.mean));
    CHECK(same_bytes(p.bn->running_var(), ref.var));
    CHECK(p.bn->num_batches_tracked() == 0);
    CHECK(folded.quantizer().step() == 0);
}

TEST_CASE("folded wrapper with real quantization: conv(x, Q(W_fold)) + b_fold; freezing after N steps or by hand") {
    auto [conv, bn] = random_pair(13, /*stride=*/2);
    const QuantizerOptions opt = per_channel_options();
    auto folded = std::make_shared<FoldedConvBn>(conv, "0", bn, "1", make_quantizer("msqe-po2", opt, conv->weight().shape()),
                                                 /*freeze_after_steps=*/2);
    const Tensor x = random_tensor({2, 7, 7, 4}, 18);

    // Two training steps with batch statistics: the statistics move.
    folded->train();
    for (int step = 1; step <= 2; ++step) {
        CHECK(folded->uses_batch_statistics());
        const Tensor mean_before = bn->running_mean().clone();
        folded->forward(Variable(x));
        CHECK(!same_bytes(bn->running_mean(), mean_before));
        CHECK(bn->num_batches_tracked() == step);
    }
    // Then frozen: y = conv(x, Q(W_fold)) + b_fold, statistics untouched.
    CHECK(!folded->uses_batch_statistics());
    const Tensor mean_before = bn->running_mean().clone(), var_before = bn->running_var().clone();
    Tensor y;
    {
        NoGradGuard ng;
        y = folded->forward(Variable(x)).value();
    }
    CHECK(same_bytes(bn->running_mean(), mean_before));
    CHECK(same_bytes(bn->running_var(), var_before));
    CHECK(bn->num_batches_tracked() == 2);
    CHECK(folded->quantizer().step() == 3);

    // The same by hand, from the definitions.
    NoGradGuard ng;
    Tensor w_fold = Tensor::empty(conv->weight().shape());
    Tensor b_fold = Tensor::empty({6});
    for (int c = 0; c < 6; ++c) {
        const double inv_sigma = 1.0 / std::sqrt(double(bn->running_var().f32()[c]) + bn->eps());
        const float factor = float(bn->weight().value().f32()[c] * inv_sigma);
        for (int i = 0; i < 36; ++i) w_fold.f32()[c * 36 + i] = conv->weight().value().f32()[c * 36 + i] * factor;
        b_fold.f32()[c] = float(bn->bias().value().f32()[c] -
                                double(bn->weight().value().f32()[c]) * bn->running_mean().f32()[c] * inv_sigma);
    }
    CHECK(same_bytes(folded->folded_weight().value(), w_fold));
    CHECK(same_bytes(folded->folded_bias().value(), b_fold));
    const Quantizer::IntegerForm f = folded->quantizer().integer_form(w_fold);
    Tensor wq = Tensor::empty(w_fold.shape());
    for (int64_t i = 0; i < wq.numel(); ++i) wq.f32()[i] = f.scale[i / 36] * float(f.codes[i]);
    const Tensor expect = conv2d(Variable(x), Variable(wq), Variable(b_fold), conv->config().params).value();
    CHECK(same_bytes(y, expect));
    // Evaluation computes the same (msqe-po2 keeps the exponent of the last step).
    folded->eval();
    CHECK(same_bytes(folded->forward(Variable(x)).value(), expect));

    // Freezing by hand, and its buffer.
    auto conv2 = Conv2d::make(4, 6, 3, 1, 1);
    auto bn2 = std::make_shared<BatchNorm2d>(6);
    FoldedConvBn f2(conv2, "3", bn2, "4", make_quantizer("msqe-po2", opt, conv2->weight().shape()));
    f2.train();
    CHECK(f2.uses_batch_statistics());
    f2.freeze();
    CHECK(!f2.uses_batch_statistics());
    bool found = false;
    for (auto& [name, t] : f2.named_buffers())
        if (name == "bn_frozen_3") found = t->data<int32_t>()[0] == 1;
    CHECK(found);
    f2.freeze(false);
    CHECK(f2.uses_batch_statistics());
    CHECK(hfq::testing::error_message([&] {
              FoldedConvBn(Conv2d::make(4, 6, 3, 1, 1, /*bias=*/true), "0", std::make_shared<BatchNorm2d>(6), "1",
                           make_quantizer("msqe-po2", opt, {6, 4, 3, 3}));
          }).find("has a bias") != std::string::npos);
}

TEST_CASE("folded wrapper, quantized-conv statistics with real quantization: batch norm of conv(x, U)") {
    auto [conv, bn] = random_pair(21);
    const Tensor w0 = conv->weight().value().clone(), gamma0 = bn->weight().value().clone();
    const Tensor beta0 = bn->bias().value().clone(), mean0 = bn->running_mean().clone(), var0 = bn->running_var().clone();
    const QuantizerOptions opt = per_channel_options();
    FoldedConvBn folded(conv, "0", bn, "1", make_quantizer("msqe-po2", opt, conv->weight().shape()), -1,
                        BatchStatistics::quantized_conv);
    folded.train();
    const Tensor x = random_tensor({2, 6, 6, 4}, 26);
    Variable xa(x, true);
    Variable y = folded(xa);
    CHECK(bn->num_batches_tracked() == 1);

    // By hand: U from the quantizer's integer form of W_fold (the statistics as they were before the step).
    Tensor w_fold = Tensor::empty(w0.shape());
    Tensor u = Tensor::empty(w0.shape());
    std::vector<float> unfold(6);
    for (int c = 0; c < 6; ++c) {
        const double inv_sigma = 1.0 / std::sqrt(double(var0.f32()[c]) + bn->eps());
        const float factor = float(gamma0.f32()[c] * inv_sigma);
        unfold[c] = float(1.0 / (inv_sigma * gamma0.f32()[c]));
        for (int i = 0; i < 36; ++i) w_fold.f32()[c * 36 + i] = w0.f32()[c * 36 + i] * factor;
    }
    const Quantizer::IntegerForm f = folded.quantizer().integer_form(w_fold);
    for (int64_t i = 0; i < u.numel(); ++i) u.f32()[i] = f.scale[i / 36] * float(f.codes[i]) * unfold[i / 36];
    Tensor mean = mean0.clone(), var = var0.clone();
    Variable xb(x, true), gamma(gamma0.clone(), true), beta(beta0.clone(), true);
    Variable expect = batch_norm(conv2d(xb, Variable(u), Variable(), conv->config().params), gamma, beta, mean, var, true,
                                 bn->momentum(), bn->eps());
    CHECK(max_rel_diff(y.value(), expect.value()) < 1e-6);
    CHECK(max_rel_diff(bn->running_mean(), mean, 1e-6) < 1e-6);  // statistics of conv(x, U), not of conv(x, W)
    CHECK(max_rel_diff(bn->running_var(), var) < 1e-6);
    // Quantization moves them: the float-conv form's running mean differs.
    {
        auto [conv_f, bn_f] = random_pair(21);  // the same layers, fresh
        FoldedConvBn float_form(conv_f, "0", bn_f, "1", make_quantizer("msqe-po2", opt, w0.shape()));
        float_form.train();
        float_form(Variable(x));
        CHECK(max_rel_diff(bn_f->running_mean(), mean, 1e-6) > 1e-4);
    }
    // Gradients reach x, W (through Q's straight-through estimator), gamma and beta.
    const Tensor g = random_tensor(y.shape(), 27);
    y.backward(g);
    expect.backward(g);
    CHECK(max_rel_diff(xa.grad(), xb.grad()) < 1e-5);
    CHECK(max_rel_diff(bn->bias().grad(), beta.grad()) < 1e-5);
    CHECK(conv->weight().grad().defined());
    CHECK(bn->weight().grad().defined());
}

TEST_CASE("batch statistics names") {
    CHECK(parse_batch_statistics("float-conv") == BatchStatistics::float_conv);
    CHECK(parse_batch_statistics("quantized-conv") == BatchStatistics::quantized_conv);
    CHECK(std::string(batch_statistics_name(BatchStatistics::quantized_conv)) == "quantized-conv");
    CHECK(hfq::testing::error_message([] { parse_batch_statistics("float"); }).find("float-conv or quantized-conv") !=
          std::string::npos);
}

TEST_CASE("folded wrapper: forward_relu6 = relu6(forward), as one op with quantized-conv statistics") {
    for (BatchStatistics statistics : {BatchStatistics::float_conv, BatchStatistics::quantized_conv}) {
        INFO(std::string(batch_statistics_name(statistics)));
        auto make = [&] {  // two identical layers: each forward updates the moving statistics
            auto [conv, bn] = random_pair(31);
            auto f = std::make_shared<FoldedConvBn>(
                conv, "0", bn, "1", make_quantizer("msqe-po2", per_channel_options(), conv->weight().shape()), -1,
                statistics);
            f->train();
            return f;
        };
        auto fused = make(), plain = make();
        CHECK(fused->fuses_relu6());
        const Tensor x = random_tensor({2, 6, 6, 4}, 33);
        Variable xa(x, true), xb(x, true);
        Variable ya = fused->forward_relu6(xa);
        Variable yb = relu6(plain->forward(xb));
        CHECK(ya.op_name() == (statistics == BatchStatistics::quantized_conv ? "batch_norm_relu6" : "relu6"));
        CHECK(same_bytes(ya.value(), yb.value()));
        CHECK(same_bytes(fused->bn().running_mean(), plain->bn().running_mean()));
        CHECK(same_bytes(fused->bn().running_var(), plain->bn().running_var()));
        const Tensor g = random_tensor(ya.shape(), 34);
        ya.backward(g);
        yb.backward(g);
        // The fused backward sums in another order than batch norm's and ReLU6's
        // (and builds may contract other multiply-adds): relative to 1e-2 at
        // least, as test_batch_norm_relu6 compares them, since the convolution's
        // backward sums these into elements near zero.
        CHECK(max_rel_diff(xa.grad(), xb.grad(), 1e-2) < 1e-5);
        CHECK(max_rel_diff(fused->conv().weight().grad(), plain->conv().weight().grad(), 1e-2) < 1e-5);
        CHECK(max_rel_diff(fused->bn().weight().grad(), plain->bn().weight().grad(), 1e-2) < 1e-5);
    }
}
