// Batch-norm folding (docs/quantizers.md, 6): the folding ops against finite
// differences, the folded wrapper against a float convolution followed by
// batch norm (training and evaluation), the moving-statistics update, and
// freezing. Where the two sides round differently they are held to bounds
// derived from their sums' lengths (the block "How far two computations of
// conv then batch norm may be apart"), each with a broken variant far
// outside; where they run the same ops on the same bits, to equality.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "engine/ops.h"
#include "engine/tensor_math.h"
#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "quant/folded_conv_bn.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::abs_of;
using hfq::testing::bound_from;
using hfq::testing::check_gradients;
using hfq::testing::check_within_bound;
using hfq::testing::gamma_n;
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

// U = Q(W_fold) sigma_ema / gamma by hand, as the folded wrapper computes it
// with quantized-conv statistics: W_fold = W * f with f = gamma / sigma_ema
// rounded once, its integer form at the exponents the quantizer's last step
// chose, times sigma_ema / gamma rounded once. var: the running variance
// before the step.
Tensor unfolded_by_hand(Quantizer& q, const Tensor& w, const Tensor& gamma, const Tensor& var, float eps) {
    const int64_t channels = w.dim(0), per = w.numel() / channels;
    Tensor w_fold = Tensor::empty(w.shape());
    std::vector<float> unfold(channels);
    for (int64_t c = 0; c < channels; ++c) {
        const double inv_sigma = 1.0 / std::sqrt(double(var.f32()[c]) + eps);
        const float factor = float(gamma.f32()[c] * inv_sigma);
        unfold[c] = float(1.0 / (inv_sigma * gamma.f32()[c]));
        for (int64_t i = c * per; i < (c + 1) * per; ++i) w_fold.f32()[i] = w.f32()[i] * factor;
    }
    const Quantizer::IntegerForm f = q.integer_form(w_fold);
    Tensor u = Tensor::empty(w.shape());
    for (int64_t i = 0; i < u.numel(); ++i) u.f32()[i] = f.scale[i / per] * float(f.codes[i]) * unfold[i / per];
    return u;
}

// ---- How far two computations of conv then batch norm may be apart --------
//
// tests/float_error.h: a float32 sum of n terms, in any order, with or without
// fused multiply-adds, is within gamma(n) * sum |terms| of the exact sum, and
// a value that went through k roundings (products, quotients, additions) is
// within gamma(k) of its exact value. Each bound below counts, on each side
// of a comparison, the sum lengths and the roundings from the inputs to the
// result; the two sides are at most the sum of their bounds apart, so
// 2 gamma(the larger count) times the magnitudes of the terms. Doubles (batch
// norm's sums and statistics, the folding factors before their rounding to
// float) add relative errors near 2^-50, inside gamma's own slack
// (gamma(k) - k u > k^2 u^2).
//
// Per output channel: mu and sigma = sqrt(var + eps), what batch norm
// normalises with (the batch's statistics in training, the running ones in
// evaluation), s = gamma / sigma, and xhat = (c - mu) / sigma for the
// convolution output c. The convolution sums n = Cin K K products per
// output, m = Cout K K per input gradient and R = N Ho Wo (the rows) per
// weight gradient.
struct Normalisation {
    std::vector<double> mu, sigma, s;
    double xhat(const Tensor& c, int64_t i) const {
        const int64_t ch = i % c.dim(3);
        return (c.f32()[i] - mu[ch]) / sigma[ch];
    }
};

Normalisation batch_normalisation(const Tensor& c, const Tensor& gamma, float eps) {
    const hfq::testing::ChannelStats st = hfq::testing::channel_stats(c);  // the biased variance, as batch norm
    Normalisation n{st.mean, {}, {}};
    for (size_t ch = 0; ch < st.var.size(); ++ch) {
        n.sigma.push_back(std::sqrt(st.var[ch] + eps));
        n.s.push_back(gamma.f32()[ch] / n.sigma.back());
    }
    return n;
}

Normalisation running_normalisation(const Tensor& mean, const Tensor& var, const Tensor& gamma, float eps) {
    Normalisation n;
    for (int64_t ch = 0; ch < mean.numel(); ++ch) {
        n.mu.push_back(mean.f32()[ch]);
        n.sigma.push_back(std::sqrt(double(var.f32()[ch]) + eps));
        n.s.push_back(gamma.f32()[ch] / n.sigma.back());
    }
    return n;
}

// conv2d's three sums on magnitudes, for a bound of each: `out` = conv2d(|x|,
// |w|) (the forward's sum of |x||w| per output), and for a nonnegative
// output gradient d, `data` = sum |w| d per input element and `weight` = sum
// |x| d per weight.
struct ConvMagnitudes {
    Tensor out, data, weight;
};
ConvMagnitudes conv_magnitudes(const Tensor& x, const Tensor& w, const Tensor& d, const Conv2dParams& p) {
    Variable ax(abs_of(x), true), aw(abs_of(w), true);
    Variable out = conv2d(ax, aw, Variable(), p);
    out.backward(d);
    return {out.value(), ax.grad(), aw.grad()};
}

// What the comparisons compare: the output, and the gradients of x, W and
// gamma (beta's gradient is compared on its own).
struct Side {
    Tensor y, dx, dw, dgamma;
};

// Conv then batch norm with the float layers (the reference the folded
// wrapper must reproduce), and the gradients for the output gradient dy;
// c: the convolution's output.
struct ConvBn {
    Side side;
    Tensor c, dbeta;
};
ConvBn conv_then_batch_norm(const Tensor& x, ExactPair::Float& f, const Conv2dParams& p, bool training, float eps,
                            const Tensor& dy) {
    Variable xv(x, true), w(f.w.value().clone(), true), gamma(f.gamma.value().clone(), true),
        beta(f.beta.value().clone(), true);
    Variable c = conv2d(xv, w, Variable(), p);
    Variable y = batch_norm(c, gamma, beta, f.mean, f.var, training, 0.1f, eps);
    y.backward(dy);
    return {{y.value(), xv.grad(), w.grad(), gamma.grad()}, c.value(), beta.grad()};
}

// Bounds for two sides that normalise the same convolution output c with its
// batch statistics, in training, for the output gradient dy. c is common: both
// convolve x with the same weight bits through the same oneDNN primitive,
// which gives the same bits at every call (it is run-to-run deterministic on
// one machine and thread count). The sides differ in how they round the
// normalisation and its backward, and in how they split the backward's sums:
// the folded form's batch-statistics correction sends dy * ratio through
// W_fold and the statistics' part through W, two convolutions added, and
// with quantized-conv statistics the weight gradient is dU * f2 * f1 (the
// two folding factors, whose product is within two roundings of 1). w is
// the float weight, u the one the convolution used (U = Q(W_fold) sigma_ema
// / gamma; w itself when the two are one).
//  - y = s (c - mu) + beta: batch norm rounds 1 / sigma, s, c - mu, the
//    product and the sum, and its float mean costs |s mu| u (5 roundings);
//    the folded form's c * ratio + offset rounds ratio, the product, offset
//    and the sum, with magnitudes |s c| and |s mu|:
//        |y_a - y_b| <= 2 gamma(5) (|s| (|c - mu| + 2 |mu|) + |beta|).
//  - dc = s (dy - mean(dy) - xhat mean(xhat dy)) = a (c - mu) + s dy + d:
//    batch norm's a = -s mean(dy (c - mu)) / sigma^2 carries 5 roundings
//    (1 / sigma three times, s, a), then c - mu, the product and two
//    additions (9); its float mean adds |s| (|mu| / sigma) (|mean(xhat dy)|
//    + |xhat mean(dy)|) u. The correction's dy * ratio and a' (y_f - mu) + d'
//    take at most 4, one more adds the two convolutions. So |dc| <= |s| D,
//        D = |dy| + |mean dy| + (|xhat| + |mu| / sigma) |mean(xhat dy)| + |xhat| (|mu| / sigma) |mean dy|,
//    and the input gradient sums m terms dc u:
//        |dx_a - dx_b| <= 2 gamma(m + 9) sum |s| D |u|.
//  - dW sums R terms x dc, then at most 4 roundings of the folding factors:
//        |dW_a - dW_b| <= 2 gamma(R + 13) B,   B = sum |x| |s| D.
//  - dgamma: batch norm's sum(dy xhat) rounds 1 / sigma, its float mean and
//    the result. The folding ops add sum_w dW_fold w / sigma_ema and
//    sum_w dU u / gamma (and the correction's fold term sum(dy c) / sigma_B
//    comes through conv_weight(x, dy * ratio)): each within gamma(R + 12) of
//    sum_w B (|w| + |u|) / |gamma|, and added into dgamma by at most two
//    additions:
//        |dgamma_a - dgamma_b| <= 2 gamma(R + 14) (sum_rows |dy| (|xhat| + |mu| / sigma)
//                                                  + sum_w B (|w| + |u|) / |gamma|).
//  - dbeta = sum dy in double on both sides (channel_sums, one fixed order):
//    the same bits.
struct Bounds {
    Tensor y, dx, dw, dgamma;
};
Bounds training_bounds(const Tensor& x, const Tensor& c, const Tensor& w, const Tensor& u, const Tensor& gamma,
                       const Tensor& beta, const Tensor& dy, const Conv2dParams& p, float eps) {
    const Normalisation n = batch_normalisation(c, gamma, eps);
    const int64_t channels = c.dim(3), rows = c.numel() / channels;
    const int64_t m = w.dim(0) * w.dim(2) * w.dim(3), per = w.numel() / w.dim(0);
    std::vector<double> mean_dy(channels, 0.0), mean_xhat_dy(channels, 0.0);
    for (int64_t i = 0; i < c.numel(); ++i) {
        mean_dy[i % channels] += dy.f32()[i] / double(rows);
        mean_xhat_dy[i % channels] += n.xhat(c, i) * dy.f32()[i] / double(rows);
    }
    Tensor y_mag = Tensor::empty(c.shape()), sd = Tensor::empty(c.shape());
    std::vector<double> dgamma_mag(channels, 0.0);
    for (int64_t i = 0; i < c.numel(); ++i) {
        const int64_t ch = i % channels;
        const double xhat = std::fabs(n.xhat(c, i)), mu = std::fabs(n.mu[ch]) / n.sigma[ch];
        const double d = std::fabs(dy.f32()[i]) + std::fabs(mean_dy[ch]) + (xhat + mu) * std::fabs(mean_xhat_dy[ch]) +
                         xhat * mu * std::fabs(mean_dy[ch]);
        sd.f32()[i] = float(std::fabs(n.s[ch]) * d);
        y_mag.f32()[i] = float(std::fabs(n.s[ch]) * (std::fabs(c.f32()[i] - n.mu[ch]) + 2 * std::fabs(n.mu[ch])) +
                               std::fabs(beta.f32()[ch]));
        dgamma_mag[ch] += std::fabs(dy.f32()[i]) * (xhat + mu);
    }
    const ConvMagnitudes cm = conv_magnitudes(x, u, sd, p);  // cm.weight: B
    for (int64_t j = 0; j < w.numel(); ++j)
        dgamma_mag[j / per] +=
            cm.weight.f32()[j] * (std::fabs(w.f32()[j]) + std::fabs(u.f32()[j])) / std::fabs(gamma.f32()[j / per]);
    Tensor dgamma = Tensor::empty({channels});
    for (int64_t ch = 0; ch < channels; ++ch) dgamma.f32()[ch] = float(dgamma_mag[ch]);
    // The magnitudes' roundings: the store of |s| D, then the sums of m or R terms (dgamma: and its store).
    return {bound_from(y_mag, 2 * gamma_n(5), 1), bound_from(cm.data, 2 * gamma_n(double(m + 9)), m + 1),
            bound_from(cm.weight, 2 * gamma_n(double(rows + 13)), rows + 1),
            bound_from(dgamma, 2 * gamma_n(double(rows + 14)), rows + 2)};
}

// The four comparisons of one side (y, dx, dW, dgamma) with a reference:
// within the bounds, or, for a deliberately broken reference, far outside
// them (check_far_outside: the bounds separate right from wrong).
void check_within(const std::string& what, const Side& a, const Side& b, const Bounds& bound) {
    check_within_bound(what + " y", a.y, b.y, bound.y);
    check_within_bound(what + " dx", a.dx, b.dx, bound.dx);
    check_within_bound(what + " dW", a.dw, b.dw, bound.dw);
    check_within_bound(what + " dgamma", a.dgamma, b.dgamma, bound.dgamma);
}
void check_separates(const std::string& what, const Side& a, const Side& wrong, const Bounds& bound) {
    using hfq::testing::check_far_outside;
    using hfq::testing::worst_bound_ratio;
    check_far_outside(what + " (broken) y", worst_bound_ratio(a.y, wrong.y, bound.y));
    check_far_outside(what + " (broken) dx", worst_bound_ratio(a.dx, wrong.dx, bound.dx));
    check_far_outside(what + " (broken) dW", worst_bound_ratio(a.dw, wrong.dw, bound.dw));
    check_far_outside(what + " (broken) dgamma", worst_bound_ratio(a.dgamma, wrong.dgamma, bound.dgamma));
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
    // u = (w * f1) * f2 with f1 = gamma / sigma and f2 = sigma / gamma each
    // rounded to float once (from doubles): four roundings from w.
    const Tensor bound = bound_from(abs_of(w), gamma_n(4), 0);
    check_within_bound("unfold(fold(w))", u, w, bound);
    // Broken: unfolding with another eps (2e-3) moves u by ~ 1e-3 / (2 var) relative.
    const Tensor u_eps = unfold_weight(Variable(wf), Variable(gamma), var, 2 * eps).value();
    hfq::testing::check_far_outside("unfold with eps 2e-3", hfq::testing::worst_bound_ratio(u_eps, w, bound));
    for (int c = 0; c < 3; ++c) {
        const float factor = float(std::sqrt(double(var.f32()[c]) + eps) / gamma.f32()[c]);
        for (int i = 0; i < 18; ++i) CHECK(u.f32()[c * 18 + i] == wf.f32()[c * 18 + i] * factor);
    }
    // gamma = 0 (W_fold = 0): U = 0, not 0 / 0.
    gamma.f32()[1] = 0.0f;
    const Tensor u0 =
        unfold_weight(fold_weight(Variable(w), Variable(gamma), var, eps), Variable(gamma), var, eps).value();
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
        for (BnStats statistics : {BnStats::float_conv, BnStats::quantized_conv}) {
            INFO(std::string(method), " ", std::string(bn_stats_name(statistics)));
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
            // The bounds' premise: W_fold, hence Q(W_fold) and U, is W bit for bit,
            // so both sides convolve x with the same weights.
            {
                NoGradGuard ng;
                CHECK(same_bytes(folded.folded_weight().value(), ref.w.value()));
            }

            const Tensor x = random_tensor({2, 5, 5, 3}, 9);
            Variable xa(x, true);
            Variable y = folded(xa);
            const Tensor g = random_tensor(y.shape(), 10);
            y.backward(g);
            const ConvBn right = conv_then_batch_norm(x, ref, p.conv->config().params, true, 0.25f, g);
            const Bounds b = training_bounds(x, right.c, ref.w.value(), ref.w.value(), ref.gamma.value(),
                                             ref.beta.value(), g, p.conv->config().params, 0.25f);
            const Side folded_side{y.value(), xa.grad(), p.conv->weight().grad(), p.bn->weight().grad()};
            check_within("training", folded_side, right.side, b);
            CHECK(same_bytes(p.bn->bias().grad(), right.dbeta));
            // PyTorch's running statistics update, as BatchNorm2d: both sides
            // evaluate the same double expression of the same sums and round it
            // to float, so they are at most one rounding, 2 u |v|, apart (a
            // multiply-add contracted in one build and not the other moves the
            // double in its last bits).
            for (auto [mine, theirs] :
                 {std::pair<Tensor*, Tensor*>{&p.bn->running_mean(), &ref.mean}, {&p.bn->running_var(), &ref.var}})
                check_within_bound("running statistics", *mine, *theirs,
                                   bound_from(abs_of(*theirs), 2 * hfq::testing::kUnitRoundoff, 0));
            CHECK(p.bn->num_batches_tracked() == 1);
            // The quantizer's scale gets a gradient through the folded weights.
            if (std::string(method) == "learnable-po2")
                CHECK(folded.quantizer().named_parameters()[0].second->grad().defined());

            // Broken: batch norm normalising with the running statistics instead of the batch's.
            ExactPair::Float fresh = ExactPair().clone();
            check_separates("training with the running statistics", folded_side,
                            conv_then_batch_norm(x, fresh, p.conv->config().params, false, 0.25f, g).side, b);
        }
}

TEST_CASE("folded wrapper, evaluation = conv then batch norm in evaluation (Q(W_fold) = W_fold)") {
    ExactPair p;
    ExactPair::Float ref = p.clone();
    FoldedConvBn folded(p.conv, "0", p.bn, "1",
                        make_quantizer("msqe-po2", QuantizerOptions{}, p.conv->weight().shape()));
    folded.eval();
    CHECK(!folded.uses_batch_statistics());
    const Conv2dParams& params = p.conv->config().params;
    const Tensor x = random_tensor({2, 5, 5, 3}, 11);
    Variable xa(x, true);
    Variable y = folded(xa);
    const Tensor g = random_tensor(y.shape(), 12);
    y.backward(g);
    const ConvBn right = conv_then_batch_norm(x, ref, params, false, 0.25f, g);
    // The folded form computes conv(x, Q(W_fold), b_fold) in one convolution,
    // the reference conv(x, W) then s (c - mu) + beta with the running
    // statistics. With A = conv(|x|, |W|), n = 27, m = 36, R = 50:
    //  - y: the folded convolution sums n products and the bias (n + 1
    //    roundings), W_fold = W * f rounds f and the product, b_fold is
    //    rounded once (n + 3); the reference's conv is within gamma(n) A,
    //    then 1 / sigma, s, c - mu, the product and beta's sum (n + 5):
    //        |y_a - y_b| <= 2 gamma(n + 5) (|s| (A + |mu|) + |beta|).
    //  - dx: m terms dy W_fold (W_fold: 2 roundings) against m terms (s dy) W
    //    (s: 2, s dy: 1): 2 gamma(m + 3) sum |s dy| |W|.
    //  - dW: R terms x dy, then times f (2), against R terms x (s dy):
    //    2 gamma(R + 3) sum |x| |s dy|.
    //  - dgamma: the folded form's sum(dW_fold W) / sigma sums R terms per
    //    weight, fold_bias's -mu / sigma * db the R terms of db, and the two
    //    are added (R + 2); the reference's sum(dy (c - mu)) / sigma, in
    //    double from c within gamma(n) A, rounds 1 / sigma and the result
    //    (n + 2): 2 gamma(R + 2) sum_rows |dy| (A + |mu|) / sigma.
    //  - dbeta: the convolution's bias gradient, R terms in float, against
    //    their sum in double, rounded: gamma(R) sum |dy|.
    const Normalisation norm = running_normalisation(ref.mean, ref.var, ref.gamma.value(), 0.25f);
    const int64_t channels = 4, n = 27, m = 36, rows = 50;
    Tensor sdy = Tensor::empty(g.shape());
    for (int64_t i = 0; i < g.numel(); ++i) sdy.f32()[i] = float(std::fabs(norm.s[i % channels] * g.f32()[i]));
    const ConvMagnitudes cm = conv_magnitudes(x, ref.w.value(), sdy, params);
    Tensor y_mag = Tensor::empty(y.shape());
    std::vector<double> dgamma_mag(channels, 0.0), dbeta_mag(channels, 0.0);
    for (int64_t i = 0; i < y_mag.numel(); ++i) {
        const int64_t c = i % channels;
        const double a = cm.out.f32()[i], mu = std::fabs(norm.mu[c]);
        y_mag.f32()[i] = float(std::fabs(norm.s[c]) * (a + mu) + std::fabs(ref.beta.value().f32()[c]));
        dgamma_mag[c] += std::fabs(g.f32()[i]) * (a + mu) / norm.sigma[c];
        dbeta_mag[c] += std::fabs(g.f32()[i]);
    }
    Tensor dgamma = Tensor::empty({channels}), dbeta = Tensor::empty({channels});
    for (int64_t c = 0; c < channels; ++c) {
        dgamma.f32()[c] = float(dgamma_mag[c]);
        dbeta.f32()[c] = float(dbeta_mag[c]);
    }
    // The magnitudes' roundings: A's n-term sum, or |s dy|'s store and the m-
    // or R-term sums; then the store of what is made of them.
    const Bounds b{bound_from(y_mag, 2 * gamma_n(n + 5), n + 1), bound_from(cm.data, 2 * gamma_n(m + 3), m + 1),
                   bound_from(cm.weight, 2 * gamma_n(rows + 3), rows + 1),
                   bound_from(dgamma, 2 * gamma_n(rows + 2), n + 1)};
    const Side folded_side{y.value(), xa.grad(), p.conv->weight().grad(), p.bn->weight().grad()};
    check_within("evaluation", folded_side, right.side, b);
    check_within_bound("evaluation dbeta", p.bn->bias().grad(), right.dbeta, bound_from(dbeta, gamma_n(rows), 1));
    // Nothing changes in evaluation.
    CHECK(same_bytes(p.bn->running_mean(), ref.mean));
    CHECK(same_bytes(p.bn->running_var(), ref.var));
    CHECK(p.bn->num_batches_tracked() == 0);
    CHECK(folded.quantizer().step() == 0);

    // Broken: the reference normalising with the batch statistics instead of the running ones.
    ExactPair::Float fresh = ExactPair().clone();
    check_separates("evaluation with the batch statistics", folded_side,
                    conv_then_batch_norm(x, fresh, params, true, 0.25f, g).side, b);
}

TEST_CASE("folded wrapper with real quantization: conv(x, Q(W_fold)) + b_fold; freezing after N steps or by hand") {
    auto [conv, bn] = random_pair(13, /*stride=*/2);
    const QuantizerOptions opt = per_channel_options();
    auto folded =
        std::make_shared<FoldedConvBn>(conv, "0", bn, "1", make_quantizer("msqe-po2", opt, conv->weight().shape()),
                                       /*freeze_bn_step=*/2);
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
    const Tensor beta0 = bn->bias().value().clone(), mean0 = bn->running_mean().clone(),
                 var0 = bn->running_var().clone();
    const QuantizerOptions opt = per_channel_options();
    FoldedConvBn folded(conv, "0", bn, "1", make_quantizer("msqe-po2", opt, conv->weight().shape()), -1,
                        BnStats::quantized_conv);
    folded.train();
    const Tensor x = random_tensor({2, 6, 6, 4}, 26);
    Variable xa(x, true);
    Variable y = folded(xa);
    CHECK(bn->num_batches_tracked() == 1);

    // By hand: U from the quantizer's integer form of W_fold (the statistics
    // as they were before the step), bit for bit what the wrapper convolves x
    // with. Then both sides are the same ops on the same bits: the same
    // results.
    const Tensor u = unfolded_by_hand(folded.quantizer(), w0, gamma0, var0, bn->eps());
    Tensor mean = mean0.clone(), var = var0.clone();
    Variable xb(x, true), gamma(gamma0.clone(), true), beta(beta0.clone(), true);
    Variable expect = batch_norm(conv2d(xb, Variable(u), Variable(), conv->config().params), gamma, beta, mean, var,
                                 true, bn->momentum(), bn->eps());
    CHECK(same_bytes(y.value(), expect.value()));
    CHECK(same_bytes(bn->running_mean(), mean));  // statistics of conv(x, U), not of conv(x, W)
    CHECK(same_bytes(bn->running_var(), var));
    // Quantization moves them: the float-conv form's running mean differs.
    {
        auto [conv_f, bn_f] = random_pair(21);  // the same layers, fresh
        FoldedConvBn float_form(conv_f, "0", bn_f, "1", make_quantizer("msqe-po2", opt, w0.shape()));
        float_form.train();
        float_form(Variable(x));
        // 4-bit codes move each weight by up to half a step (1/16 of the
        // largest): the mean moves by some 1e-2, rounding by 1e-7 at most.
        CHECK(max_rel_diff(bn_f->running_mean(), mean, 1e-6) > 1e-4);
    }
    // Gradients reach x, W (through Q's straight-through estimator), gamma and beta.
    const Tensor g = random_tensor(y.shape(), 27);
    y.backward(g);
    expect.backward(g);
    CHECK(same_bytes(xa.grad(), xb.grad()));
    CHECK(same_bytes(bn->bias().grad(), beta.grad()));
    CHECK(conv->weight().grad().defined());
    CHECK(bn->weight().grad().defined());
}

TEST_CASE("batch statistics names") {
    CHECK(parse_bn_stats("float-conv") == BnStats::float_conv);
    CHECK(parse_bn_stats("quantized-conv") == BnStats::quantized_conv);
    CHECK(std::string(bn_stats_name(BnStats::quantized_conv)) == "quantized-conv");
    CHECK(hfq::testing::error_message([] { parse_bn_stats("float"); }).find("float-conv or quantized-conv") !=
          std::string::npos);
}

TEST_CASE("folded wrapper: forward_relu6 = relu6(forward), as one op with quantized-conv statistics") {
    for (BnStats statistics : {BnStats::float_conv, BnStats::quantized_conv}) {
        INFO(std::string(bn_stats_name(statistics)));
        auto make = [&] {  // identical layers: each forward updates the moving statistics
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
        Variable pre = plain->forward(xb);
        Variable yb = relu6(pre);
        CHECK(ya.op_name() == (statistics == BnStats::quantized_conv ? "batch_norm_relu6" : "relu6"));
        CHECK(same_bytes(ya.value(), yb.value()));
        CHECK(same_bytes(fused->bn().running_mean(), plain->bn().running_mean()));
        CHECK(same_bytes(fused->bn().running_var(), plain->bn().running_var()));
        const Tensor g = random_tensor(ya.shape(), 34);
        ya.backward(g);
        yb.backward(g);
        auto side = [](FoldedConvBn& f, const Variable& y, const Variable& x) {
            return Side{y.value(), x.grad(), f.conv().weight().grad(), f.bn().weight().grad()};
        };
        if (statistics == BnStats::float_conv) {  // relu6(forward) is what forward_relu6 runs
            CHECK(same_bytes(xa.grad(), xb.grad()));
            CHECK(same_bytes(fused->conv().weight().grad(), plain->conv().weight().grad()));
            CHECK(same_bytes(fused->bn().weight().grad(), plain->bn().weight().grad()));
            continue;
        }
        // The fused op and batch norm then ReLU6 normalise the same
        // convolution output (the same y and running statistics above) and
        // differ only in how they round the backward: the bounds of
        // training_bounds, for the gradient ReLU6 lets through (dy where the
        // output is not clamped).
        auto [conv0, bn0] = random_pair(31);  // the weights and statistics before the step
        const Tensor u = unfolded_by_hand(fused->quantizer(), conv0->weight().value(), bn0->weight().value(),
                                          bn0->running_var(), bn0->eps());
        Tensor c, gated = g.clone();
        {
            NoGradGuard ng;
            c = conv2d(Variable(x), Variable(u), Variable(), conv0->config().params).value();
        }
        for (int64_t i = 0; i < g.numel(); ++i)
            if (!(pre.value().f32()[i] >= 0.0f && pre.value().f32()[i] <= 6.0f)) gated.f32()[i] = 0.0f;
        const Bounds b = training_bounds(x, c, conv0->weight().value(), u, bn0->weight().value(), bn0->bias().value(),
                                         gated, conv0->config().params, bn0->eps());
        check_within("batch_norm_relu6", side(*fused, ya, xa), side(*plain, yb, xb), b);
        CHECK(same_bytes(fused->bn().bias().grad(), plain->bn().bias().grad()));

        // Broken: batch norm without the ReLU6 (no clamp, no gate).
        auto ungated = make();
        Variable xc(x, true);
        Variable yc = ungated->forward(xc);
        yc.backward(g);
        check_separates("batch norm without relu6", side(*fused, ya, xa), side(*ungated, yc, xc), b);
    }
}
