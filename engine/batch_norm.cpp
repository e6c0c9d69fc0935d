// Batch normalization over the channels of an NHWC activation:
//   y = gamma * (x - mean) / sqrt(var + eps) + beta,   per channel c.
//
// Written as plain loops rather than with oneDNN's batch_normalization:
// oneDNN 2.6 (bnorm_jit) splits its per-channel sums over the OpenMP threads,
// so its statistics and gradients change in the last bits with the thread
// count. Here every sum runs over fixed blocks of rows combined in a fixed
// order, in double, so results are the same at any thread count.
//
// A {N,H,W,C} tensor is R = N*H*W rows of C channels. Both directions are
// one reduction pass (per-channel sums) and one per-channel affine pass:
//   forward:  sums of x and x*x    -> mean, var;      y  = s * (x - mean) + beta
//   backward: sums of dy and dy*x  -> dgamma, dbeta;  dx = a * (x - mean) + s * dy + d
#include <algorithm>
#include <cmath>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"
#include "engine/tensor_math.h"

namespace hfq {
namespace {

// The rows are cut into blocks of at least kMinBlockElements values, at most
// kMaxBlocks of them: a number that depends on the shape, never on the thread
// count. Enough blocks to keep many threads busy, few enough that the
// per-block partial sums stay small next to the tensor.
constexpr int64_t kMinBlockElements = 65536;
constexpr int64_t kMaxBlocks = 64;
// Element-wise passes smaller than this stay on one thread: starting the
// others would cost more than the work (most tensors at 32x32 inputs).
constexpr int64_t kMinParallelElements = 1 << 15;

struct ChannelSums {
    std::vector<double> u;   // sum over rows of u[r, c]
    std::vector<double> uv;  // sum over rows of u[r, c] * v[r, c]
};

// u, v: R x C (row-major).
ChannelSums channel_sums(const float* u, const float* v, int64_t rows, int64_t channels) {
    const int64_t blocks = std::max<int64_t>(1, std::min({rows * channels / kMinBlockElements, rows, kMaxBlocks}));
    std::vector<double> partial(blocks * 2 * channels, 0.0);  // per block: [sum u | sum u*v]
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        double* su = &partial[b * 2 * channels];
        double* suv = su + channels;
        for (int64_t r = rows * b / blocks; r < rows * (b + 1) / blocks; ++r) {
            const float* ur = u + r * channels;
            const float* vr = v + r * channels;
            for (int64_t c = 0; c < channels; ++c) {
                su[c] += ur[c];
                suv[c] += double(ur[c]) * vr[c];
            }
        }
    }
    ChannelSums s{std::vector<double>(channels, 0.0), std::vector<double>(channels, 0.0)};
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t c = 0; c < channels; ++c) {
            s.u[c] += partial[b * 2 * channels + c];
            s.uv[c] += partial[b * 2 * channels + channels + c];
        }
    return s;
}

// out[r, c] = a[c] * (u[r, c] - m[c]) + b[c] * v[r, c] + d[c]; v may be null.
// Subtracting the mean before scaling keeps full float precision when a
// channel's mean is large against its spread.
void channel_affine(float* out, const float* u, const float* m, const float* a, const float* v, const float* b,
                    const float* d, int64_t rows, int64_t channels) {
#pragma omp parallel for schedule(static) if (rows * channels >= kMinParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * channels;
        if (v) {
            for (int64_t c = 0; c < channels; ++c) out[o + c] = a[c] * (u[o + c] - m[c]) + b[c] * v[o + c] + d[c];
        } else {
            for (int64_t c = 0; c < channels; ++c) out[o + c] = a[c] * (u[o + c] - m[c]) + d[c];
        }
    }
}

void check_vector(const char* name, const Tensor& t, int64_t channels, const Shape& x_shape) {
    HFQ_CHECK(t.defined() && t.dtype() == DType::f32 && t.shape() == Shape{channels}, "batch_norm: ", name,
              " must be an f32 tensor of shape [", channels, "] for input ", shape_str(x_shape), ", got ",
              t.defined() ? shape_str(t.shape()) + " " + dtype_name(t.dtype()) : std::string("an undefined tensor"));
}

}  // namespace

Variable batch_norm(const Variable& x, const Variable& gamma, const Variable& beta, Tensor& running_mean,
                    Tensor& running_var, bool training, float momentum, float eps) {
    const Tensor& xv = x.value();
    HFQ_CHECK(xv.rank() == 4 && xv.dtype() == DType::f32, "batch_norm: input must be an f32 {N,H,W,C} tensor, got ",
              shape_str(xv.shape()), " ", dtype_name(xv.dtype()));
    const int64_t channels = xv.dim(3);
    const int64_t rows = xv.numel() / std::max<int64_t>(channels, 1);  // N*H*W values per channel
    check_vector("gamma", gamma.defined() ? gamma.value() : Tensor(), channels, xv.shape());
    check_vector("beta", beta.defined() ? beta.value() : Tensor(), channels, xv.shape());
    check_vector("running_mean", running_mean, channels, xv.shape());
    check_vector("running_var", running_var, channels, xv.shape());
    HFQ_CHECK(eps > 0, "batch_norm: eps must be positive, got ", eps);
    HFQ_CHECK(momentum >= 0 && momentum <= 1, "batch_norm: momentum must be in [0, 1], got ", momentum);
    HFQ_CHECK(!training || rows > 1, "batch_norm: training needs more than one value per channel, input ",
              shape_str(xv.shape()));
    HFQ_CHECK(training || rows > 0, "batch_norm: empty input ", shape_str(xv.shape()));

    // The statistics this call normalises with: {C} each.
    Tensor mean = Tensor::empty({channels});
    Tensor inv_std = Tensor::empty({channels});  // 1 / sqrt(var + eps)
    if (training) {
        const ChannelSums s = channel_sums(xv.f32(), xv.f32(), rows, channels);
        float* rm = running_mean.f32();
        float* rv = running_var.f32();
        for (int64_t c = 0; c < channels; ++c) {
            const double m = s.u[c] / rows;
            // E[x^2] - m^2 in double: cancellation costs log2(m^2 / var) of
            // double's 53 bits, harmless for float data unless |m| / std > 1e4.
            const double var = std::max(0.0, s.uv[c] / rows - m * m);  // biased: normalisation
            mean.f32()[c] = static_cast<float>(m);
            inv_std.f32()[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
            // PyTorch's running update uses the unbiased variance.
            rm[c] = static_cast<float>((1.0 - momentum) * rm[c] + momentum * m);
            rv[c] = static_cast<float>((1.0 - momentum) * rv[c] + momentum * var * rows / (rows - 1));
        }
    } else {
        for (int64_t c = 0; c < channels; ++c) {
            mean.f32()[c] = running_mean.f32()[c];
            inv_std.f32()[c] = static_cast<float>(1.0 / std::sqrt(double(running_var.f32()[c]) + eps));
        }
    }

    // y = s * (x - mean) + beta with s = gamma * inv_std.
    Tensor s = mul(gamma.value(), inv_std);
    Tensor y = Tensor::empty(xv.shape());
    channel_affine(y.f32(), xv.f32(), mean.f32(), s.f32(), nullptr, nullptr, beta.value().f32(), rows, channels);

    return make_result(y, "batch_norm", {x, gamma, beta}, [x, gamma, beta, mean, inv_std, s, training](const Tensor& dy) {
        const Tensor& xv = x.value();
        const int64_t channels = mean.numel();
        const int64_t rows = xv.numel() / channels;
        const ChannelSums sums = channel_sums(dy.f32(), xv.f32(), rows, channels);
        // With xhat = (x - mean) * inv_std:
        //   dbeta = sum dy,   dgamma = sum dy * xhat = inv_std * (sum dy*x - mean * sum dy).
        // Training (mean and var depend on x):
        //   dx = s * (dy - dbeta / R - xhat * dgamma / R)
        //      = a * (x - mean) + s * dy + d,   a = -s * inv_std * dgamma / R,   d = -s * dbeta / R.
        // Evaluation (fixed statistics): dx = s * dy.
        Tensor dgamma = Tensor::empty({channels});
        Tensor dbeta = Tensor::empty({channels});
        Tensor a = Tensor::empty({channels});
        Tensor d = Tensor::empty({channels});
        for (int64_t c = 0; c < channels; ++c) {
            const double is = inv_std.f32()[c], sc = s.f32()[c];
            const double dg = is * (sums.uv[c] - mean.f32()[c] * sums.u[c]);
            dgamma.f32()[c] = static_cast<float>(dg);
            dbeta.f32()[c] = static_cast<float>(sums.u[c]);
            a.f32()[c] = static_cast<float>(-sc * is * dg / rows);
            d.f32()[c] = static_cast<float>(-sc * sums.u[c] / rows);
        }
        if (x.requires_grad()) {
            Tensor dx = Tensor::empty(xv.shape());
            if (training) {
                channel_affine(dx.f32(), xv.f32(), mean.f32(), a.f32(), dy.f32(), s.f32(), d.f32(), rows, channels);
            } else {
                const Tensor zero = Tensor::zeros({channels});
                channel_affine(dx.f32(), dy.f32(), zero.f32(), s.f32(), nullptr, nullptr, zero.f32(), rows, channels);
            }
            x.accumulate_grad(dx);
        }
        gamma.accumulate_grad(dgamma);
        beta.accumulate_grad(dbeta);
    });
}

}  // namespace hfq
