#include "quant/folded_conv_bn.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/batch_statistics.h"
#include "engine/channel_sums.h"
#include "engine/check.h"
#include "engine/ops.h"
#include "engine/replicas.h"

namespace hfq::quant {
namespace {

// Element-wise passes go parallel from this many elements on (below, starting
// threads costs more than the work).
constexpr int64_t kParallelElements = 1 << 15;

void check_channel_vector(const char* op, const char* name, const Tensor& t, int64_t channels) {
    HFQ_CHECK(t.defined() && t.dtype() == DType::f32 && t.shape() == Shape{channels}, op, ": ", name,
              " must be an f32 tensor of shape [", channels, "], got ",
              t.defined() ? shape_str(t.shape()) : std::string("an undefined tensor"));
}

// 1 / sqrt(var + eps) per channel, in double.
std::vector<double> inverse_sigma(const Tensor& var, float eps) {
    std::vector<double> out(var.numel());
    for (int64_t c = 0; c < var.numel(); ++c) out[c] = 1.0 / std::sqrt(double(var.f32()[c]) + double(eps));
    return out;
}

// Checks a weight {O, ...} and the per-channel vectors that go with it; returns O.
int64_t check_weight_and_channels(const char* op, const Tensor& w, const Tensor& gamma, const Tensor& running_var) {
    HFQ_CHECK(w.dtype() == DType::f32 && w.rank() >= 2, op, ": weight must be f32 {O, ...}, got ",
              shape_str(w.shape()));
    check_channel_vector(op, "gamma", gamma, w.dim(0));
    check_channel_vector(op, "running_var", running_var, w.dim(0));
    return w.dim(0);
}

// w {O, ...} times factor[o] per output channel: the forward and the weight
// gradient of fold_weight and unfold_weight.
Tensor scale_output_channels(const Tensor& w, const std::vector<float>& factor) {
    const int64_t channels = w.dim(0), per = w.numel() / channels;
    Tensor out = Tensor::empty(w.shape());
    const float* pw = w.f32();
    float* po = out.f32();
    for (int64_t c = 0; c < channels; ++c)
        for (int64_t i = c * per; i < (c + 1) * per; ++i) po[i] = pw[i] * factor[c];
    return out;
}

// sum_i a_i b_i over each output channel of two {O, ...} tensors, in double
// times scale[o]: the gamma gradient of fold_weight and unfold_weight.
Tensor scaled_channel_dots(const Tensor& a, const Tensor& b, const std::vector<double>& scale) {
    const int64_t channels = a.dim(0), per = a.numel() / channels;
    const float* pa = a.f32();
    const float* pb = b.f32();
    Tensor out = Tensor::empty({channels});
    for (int64_t c = 0; c < channels; ++c) {
        double s = 0;
        for (int64_t i = c * per; i < (c + 1) * per; ++i) s += double(pa[i]) * pb[i];
        out.f32()[c] = float(s * scale[c]);
    }
    return out;
}

}  // namespace

Variable fold_weight(const Variable& weight, const Variable& gamma, const Tensor& running_var, float eps) {
    const int64_t channels = check_weight_and_channels("fold_weight", weight.value(), gamma.value(), running_var);
    const std::vector<double> inv_sigma = inverse_sigma(running_var, eps);
    // factor {O} = gamma / sigma_ema, rounded to float once: W_fold = W * factor.
    std::vector<float> factor(channels);
    for (int64_t c = 0; c < channels; ++c) factor[c] = float(gamma.value().f32()[c] * inv_sigma[c]);
    return make_result(scale_output_channels(weight.value(), factor), "fold_weight", {weight, gamma},
                       [weight, gamma, factor, inv_sigma](const Tensor& dy) {
                           // dW = dy * factor;  dgamma[c] = sum_i dy_i W_i / sigma_ema[c]
                           if (weight.requires_grad()) weight.accumulate_grad(scale_output_channels(dy, factor));
                           if (gamma.requires_grad())
                               gamma.accumulate_grad(scaled_channel_dots(dy, weight.value(), inv_sigma));
                       });
}

Variable fold_bias(const Variable& gamma, const Variable& beta, const Tensor& running_mean, const Tensor& running_var,
                   float eps) {
    const int64_t channels = gamma.value().numel();
    check_channel_vector("fold_bias", "gamma", gamma.value(), channels);
    check_channel_vector("fold_bias", "beta", beta.value(), channels);
    check_channel_vector("fold_bias", "running_mean", running_mean, channels);
    check_channel_vector("fold_bias", "running_var", running_var, channels);
    const std::vector<double> inv_sigma = inverse_sigma(running_var, eps);
    // d b / d gamma = -mu_ema / sigma_ema
    std::vector<double> dgamma_db(channels);
    Tensor out = Tensor::empty({channels});
    for (int64_t c = 0; c < channels; ++c) {
        dgamma_db[c] = -double(running_mean.f32()[c]) * inv_sigma[c];
        out.f32()[c] = float(beta.value().f32()[c] + gamma.value().f32()[c] * dgamma_db[c]);
    }
    return make_result(out, "fold_bias", {gamma, beta}, [gamma, beta, dgamma_db, channels](const Tensor& db) {
        beta.accumulate_grad(db);
        if (gamma.requires_grad()) {
            Tensor dg = Tensor::empty({channels});
            for (int64_t c = 0; c < channels; ++c) dg.f32()[c] = float(db.f32()[c] * dgamma_db[c]);
            gamma.accumulate_grad(dg);
        }
    });
}

BnStats parse_bn_stats(const std::string& name) {
    if (name == "float-conv") return BnStats::float_conv;
    if (name == "quantized-conv") return BnStats::quantized_conv;
    throw Error(cat("batch statistics must be float-conv or quantized-conv, got '", name, "'"));
}

const char* bn_stats_name(BnStats s) { return s == BnStats::float_conv ? "float-conv" : "quantized-conv"; }

Variable unfold_weight(const Variable& w_q, const Variable& gamma, const Tensor& running_var, float eps) {
    const int64_t channels = check_weight_and_channels("unfold_weight", w_q.value(), gamma.value(), running_var);
    const std::vector<double> inv_sigma = inverse_sigma(running_var, eps);
    // factor {O} = sigma_ema / gamma, rounded to float once: U = Q(W_fold) * factor.
    std::vector<float> factor(channels);
    std::vector<double> minus_inv_gamma(channels);
    for (int64_t c = 0; c < channels; ++c) {
        const double g = gamma.value().f32()[c];
        const double safe_gamma = std::fabs(g) >= 1e-12 ? g : std::copysign(1e-12, g);
        factor[c] = float(1.0 / (inv_sigma[c] * safe_gamma));
        minus_inv_gamma[c] = -1.0 / safe_gamma;
    }
    const Tensor u = scale_output_channels(w_q.value(), factor);
    return make_result(u, "unfold_weight", {w_q, gamma}, [w_q, gamma, u, factor, minus_inv_gamma](const Tensor& dy) {
        // dQ = dy * factor;  dgamma[c] = -sum_i dy_i U_i / gamma[c]
        if (w_q.requires_grad()) w_q.accumulate_grad(scale_output_channels(dy, factor));
        if (gamma.requires_grad()) gamma.accumulate_grad(scaled_channel_dots(dy, u, minus_inv_gamma));
    });
}

namespace {

// The backward of batch_stat_correction: what its forward pass keeps, and the
// gradient dy of its output.
struct BatchStatCorrectionBackward {
    Variable y_q, y_f, gamma, beta;
    Tensor ratio;                       // {C}: sigma_ema / sigma_B
    BatchStatistics batch;              // of y_f
    std::vector<double> inv_sigma_ema;  // before the running update
    float eps;
    int64_t rows, channels;  // of y_f here (batch.rows: of the statistics)

    void operator()(const Tensor& dy) const {
        // G = sum dy, H = sum dy * y_q (per channel). With sigma_B = sqrt(var_B + eps):
        //   d y_q   = dy * ratio
        //   d beta  = G
        //   d gamma = -mu_B / sigma_B * G
        //   d mu_B  = -gamma / sigma_B * G
        //   d var_B = -1/2 (var_B + eps)^(-3/2) (sigma_ema H - gamma mu_B G)
        //   d y_f   = d mu_B / R + 2 d var_B (y_f - mu_B) / R    (mean and biased variance of R rows)
        //
        // Sync batch norm: mu_B and var_B are over every replica's rows (R =
        // batch.rows counts them all), so d mu_B and d var_B, and through them
        // d y_f, take G and H summed over the replicas. d beta and d gamma take
        // this replica's G: its dy is the gradient of its own mean loss, N times
        // its rows' share of the whole batch's, and the trainer averages
        // parameter gradients over the N replicas, which then gives the whole
        // batch's sums (global G would count every row N times), as PyTorch's
        // SyncBatchNorm + DDP do. d y_f is linear in dy: N times the whole
        // batch's on these rows, like every gradient of this replica.
        const std::vector<double>& mean = batch.mean;
        const std::vector<double>& var = batch.var;
        const ChannelSums gs = channel_sums(dy.f32(), y_q.value().f32(), rows, channels);
        std::vector<double> all(2 * channels);  // [G | H] over the rows of the statistics
        std::copy(gs.u.begin(), gs.u.end(), all.begin());
        std::copy(gs.uv.begin(), gs.uv.end(), all.begin() + channels);
        if (replicas::sync_batch_norm()) replicas::sum(all.data(), 2 * channels);
        const int64_t stat_rows = batch.rows;
        Tensor dgamma = Tensor::empty({channels}), dbeta = Tensor::empty({channels});
        std::vector<float> a(channels), d(channels), m(channels);
        for (int64_t c = 0; c < channels; ++c) {
            const double G_local = gs.u[c], G = all[c], H = all[channels + c], g = gamma.value().f32()[c];
            const double inv_sigma_b = 1.0 / std::sqrt(var[c] + eps);
            dbeta.f32()[c] = float(G_local);
            dgamma.f32()[c] = float(-mean[c] * inv_sigma_b * G_local);
            const double dmean = -g * inv_sigma_b * G;
            const double dvar =
                -0.5 * inv_sigma_b * inv_sigma_b * inv_sigma_b * (H / inv_sigma_ema[c] - g * mean[c] * G);
            a[c] = float(2.0 * dvar / stat_rows);
            d[c] = float(dmean / stat_rows);
            m[c] = float(mean[c]);
        }
        if (y_q.requires_grad()) {
            Tensor dq = Tensor::empty(dy.shape());
            const float* pdy = dy.f32();
            const float* pr = ratio.f32();
            float* p = dq.f32();
#pragma omp parallel for schedule(static) if (rows * channels >= kParallelElements)
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t c = 0; c < channels; ++c) p[r * channels + c] = pdy[r * channels + c] * pr[c];
            y_q.accumulate_grad(dq);
        }
        if (y_f.requires_grad()) {
            Tensor df = Tensor::empty(dy.shape());
            const float* pf = y_f.value().f32();
            float* p = df.f32();
#pragma omp parallel for schedule(static) if (rows * channels >= kParallelElements)
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t c = 0; c < channels; ++c)
                    p[r * channels + c] = a[c] * (pf[r * channels + c] - m[c]) + d[c];
            y_f.accumulate_grad(df);
        }
        gamma.accumulate_grad(dgamma);
        beta.accumulate_grad(dbeta);
    }
};

}  // namespace

Variable batch_stat_correction(const Variable& y_q, const Variable& y_f, const Variable& gamma, const Variable& beta,
                               Tensor& running_mean, Tensor& running_var, float momentum, float eps) {
    const char* op = "batch_stat_correction";
    const Tensor& q = y_q.value();
    const Tensor& f = y_f.value();
    HFQ_CHECK(q.rank() == 4 && q.dtype() == DType::f32 && f.shape() == q.shape() && f.dtype() == DType::f32, op,
              ": y_q and y_f must be f32 {N,H,W,C} tensors of one shape, got ", shape_str(q.shape()), " and ",
              shape_str(f.shape()));
    const int64_t channels = q.dim(3), rows = q.numel() / channels;
    HFQ_CHECK(rows > 1, op, ": batch statistics need more than one value per channel, got ", shape_str(q.shape()));
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"gamma", &gamma.value()},
                           {"beta", &beta.value()},
                           {"running_mean", &running_mean},
                           {"running_var", &running_var}})
        check_channel_vector(op, name, *t, channels);

    // Batch statistics of the float convolution, and the per-channel affine
    //   y = y_q * ratio + offset,  ratio = sigma_ema / sigma_B,  offset = beta - gamma mu_B / sigma_B.
    const BatchStatistics batch = batch_statistics(f.f32(), rows, channels);
    const std::vector<double> inv_sigma_ema = inverse_sigma(running_var, eps);  // before the update
    Tensor ratio = Tensor::empty({channels}), offset = Tensor::empty({channels});
    for (int64_t c = 0; c < channels; ++c) {
        const double inv_sigma_b = 1.0 / std::sqrt(batch.var[c] + eps);
        ratio.f32()[c] = float(inv_sigma_b / inv_sigma_ema[c]);
        offset.f32()[c] = float(beta.value().f32()[c] - gamma.value().f32()[c] * batch.mean[c] * inv_sigma_b);
    }
    update_running_statistics(batch, momentum, running_mean, running_var);

    Tensor out = Tensor::empty(q.shape());
    {
        const float* pq = q.f32();
        const float* pr = ratio.f32();
        const float* po = offset.f32();
        float* py = out.f32();
#pragma omp parallel for schedule(static) if (rows * channels >= kParallelElements)
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < channels; ++c) py[r * channels + c] = pq[r * channels + c] * pr[c] + po[c];
    }
    return make_result(
        out, op, {y_q, y_f, gamma, beta},
        BatchStatCorrectionBackward{y_q, y_f, gamma, beta, ratio, batch, inv_sigma_ema, eps, rows, channels});
}

FoldedConvBn::FoldedConvBn(std::shared_ptr<Conv2d> conv, std::string conv_name, std::shared_ptr<BatchNorm2d> bn,
                           std::string bn_name, std::unique_ptr<Quantizer> quantizer, int64_t freeze_bn_step,
                           BnStats bn_stats)
    : bn_(std::move(bn)),
      conv_name_(std::move(conv_name)),
      bn_name_(std::move(bn_name)),
      freeze_bn_step_(freeze_bn_step),
      bn_stats_(bn_stats) {
    HFQ_CHECK(conv != nullptr && bn_ != nullptr, "FoldedConvBn: null convolution or batch norm");
    HFQ_CHECK(!conv->bias().defined(), "FoldedConvBn: convolution '", conv_name_,
              "' has a bias; only a convolution without bias is folded with its batch norm");
    HFQ_CHECK(conv->config().out_channels == bn_->channels(), "FoldedConvBn: convolution '", conv_name_, "' has ",
              conv->config().out_channels, " output channels but batch norm '", bn_name_, "' has ", bn_->channels());
    HFQ_CHECK(freeze_bn_step >= -1, "FoldedConvBn: freeze_bn_step must be >= -1, got ", freeze_bn_step);
    const bool training = conv->is_training();
    quantized_conv_ = std::make_shared<QuantizedConv2d>(std::move(conv), std::move(quantizer));
    register_module(conv_name_, quantized_conv_);
    register_module(bn_name_, bn_);
    register_buffer("bn_frozen_" + conv_name_, &frozen_);
    for (auto& [name, slot] : bn_->named_buffers())
        if (name == "num_batches_tracked") num_batches_tracked_ = slot;
    HFQ_CHECK(num_batches_tracked_ != nullptr, "FoldedConvBn: batch norm without num_batches_tracked");
    train(training);
}

bool FoldedConvBn::uses_batch_statistics() const {
    if (!is_training() || frozen_by_hand()) return false;
    return freeze_bn_step_ < 0 || quantized_conv_->quantizer().step() < freeze_bn_step_;
}

void FoldedConvBn::freeze(bool frozen) { frozen_.data<int32_t>()[0] = frozen ? 1 : 0; }

Variable FoldedConvBn::folded_weight() {
    return fold_weight(conv().weight(), bn_->weight(), bn_->running_var(), bn_->eps());
}

Variable FoldedConvBn::folded_bias() {
    return fold_bias(bn_->weight(), bn_->bias(), bn_->running_mean(), bn_->running_var(), bn_->eps());
}

Variable FoldedConvBn::forward(const Variable& x) { return run(x, false); }
Variable FoldedConvBn::forward_relu6(const Variable& x) { return run(x, true); }

Variable FoldedConvBn::run(const Variable& input, bool with_relu6) {
    const Variable x = quantize_input(input);
    const bool batch_stats = uses_batch_statistics();  // before the quantizer counts this step
    // W_fold and the correction use the moving variance as it is before this step's update.
    const Variable w_q = weight_quantizer().quantize(folded_weight());
    if (batch_stats && bn_stats_ == BnStats::quantized_conv) {  // batch norm counts the batch itself
        const Variable y = conv().apply(x, unfold_weight(w_q, bn_->weight(), bn_->running_var(), bn_->eps()));
        return with_relu6 ? bn_->forward_relu6(y) : quantize_output((*bn_)(y));
    }
    Variable y;
    if (!batch_stats) {
        y = conv2d(x, w_q, accumulator_bias(folded_bias(), w_q), conv().config().params);
    } else {
        const Variable y_q = conv().apply(x, w_q);              // conv(x, Q(W_fold))
        const Variable y_f = conv().apply(x, conv().weight());  // conv(x, W): the batch statistics
        y = batch_stat_correction(y_q, y_f, bn_->weight(), bn_->bias(), bn_->running_mean(), bn_->running_var(),
                                  bn_->momentum(), bn_->eps());
        num_batches_tracked_->data<int64_t>()[0] += 1;
    }
    return with_relu6 ? relu6(y) : quantize_output(y);
}

std::string FoldedConvBn::describe() const {
    return quantized_conv_->layer_ptr()->describe() + " + " + bn_->describe() + " folded @ " +
           const_cast<FoldedConvBn*>(this)->weight_quantizer().describe();
}

int64_t FoldedConvBn::macs(const Shape& input, const Shape& output) const {
    return quantized_conv_->layer_ptr()->macs(input, output);
}

}  // namespace hfq::quant
