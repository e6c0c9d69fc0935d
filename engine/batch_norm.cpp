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
// These passes stream activation-sized tensors through memory and do little
// arithmetic, so their cost is the number of tensors they read and write.
//
// With sync batch norm (engine/replicas.h) training uses the statistics of
// the whole batch, every replica's share of it, and backward sums dx's
// per-channel sums over the replicas too (normalisation_backward).
//
// batch_norm_relu6 is relu6(batch_norm(x)) as one op. Its graph node keeps x
// alone, not the normalised value nor the output, which the two separate ops
// would keep alive until backward (one activation-sized tensor per conv-BN-
// ReLU6 block). Its backward never stores the gradient through the ReLU6
// either: both passes recompute it from x and dy where they read it.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "engine/batch_statistics.h"
#include "engine/channel_sums.h"
#include "engine/check.h"
#include "engine/ops.h"
#include "engine/replicas.h"
#include "engine/tensor_math.h"

namespace hfq {
namespace {

// Element-wise passes smaller than this stay on one thread: starting the
// others would cost more than the work (most tensors at 32x32 inputs).
constexpr int64_t kMinParallelElements = 1 << 15;

// The normalised value s * (x - mean) + beta, one element: the forward pass
// and the backward pass's ReLU6 gate both compute it here, so the gate sees
// bit for bit the value the forward pass clamped.
inline float affine(float s, float x, float mean, float beta) { return s * (x - mean) + beta; }

// The gradient through ReLU6, element (o, c): dy where the normalised value
// lies strictly inside (0, 6), where the output is not clamped (as PyTorch's
// hardtanh), else 0. The value is recomputed from x, which backward reads
// anyway, rather than read from the stored output y: one tensor fewer to
// stream through memory in each of backward's two passes.
struct GradThroughReLU6 {
    const float* dy;
    const float* x;
    const float* mean;
    const float* scale;
    const float* beta;
    float operator()(int64_t o, int64_t c) const {
        // dy loaded always, both bounds compared always and no && (each would
        // be a branch): the compiler can then vectorise the select.
        const float g = dy[o + c];
        const float v = affine(scale[c], x[o + c], mean[c], beta[c]);
        return (v > 0.0f) & (v < 6.0f) ? g : 0.0f;
    }
};

// out[r, c] = clamp(a[c] * (u[r, c] - m[c]) + b[c] * v[r, c] + d[c]); v may be
// nullptr (no such term). U and V are float pointers or readers (element()).
// Subtracting the mean before scaling keeps full float precision when a
// channel's mean is large against its spread. `clamp` maps the value before
// it is stored (identity, or ReLU6 in the fused op). out may be what v or u
// reads: every element is read before it is written.
template <class U, class V, class Clamp>
void channel_affine(float* out, U u, const float* m, const float* a, V v, const float* b, const float* d, int64_t rows,
                    int64_t channels, Clamp clamp) {
#pragma omp parallel for schedule(static) if (rows * channels >= kMinParallelElements)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * channels;
        // simd: out may be the memory u or v reads, at the same index only.
        if constexpr (std::is_same_v<V, std::nullptr_t>) {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) out[o + c] = clamp(affine(a[c], element(u, o, c), m[c], d[c]));
        } else {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c)
                out[o + c] = clamp(a[c] * (element(u, o, c) - m[c]) + b[c] * element(v, o, c) + d[c]);
        }
    }
}
const auto kIdentity = [](float v) { return v; };
const auto kReLU6 = [](float v) { return std::min(std::max(v, 0.0f), 6.0f); };

void check_vector(const char* op, const char* name, const Tensor& t, int64_t channels, const Shape& x_shape) {
    HFQ_CHECK(t.defined() && t.dtype() == DType::f32 && t.shape() == Shape{channels}, op, ": ", name,
              " must be an f32 tensor of shape [", channels, "] for input ", shape_str(x_shape), ", got ",
              t.defined() ? shape_str(t.shape()) + " " + dtype_name(t.dtype()) : std::string("an undefined tensor"));
}

// What one call normalises with, {C} each: y = scale * (x - mean) + beta.
struct Normalisation {
    Tensor mean, inv_std;  // inv_std = 1 / sqrt(var + eps)
    Tensor scale;          // gamma * inv_std
    int64_t rows;          // R, the values per channel of the statistics (all replicas' when synced)
};

// Checks the arguments of `op`; in training computes the batch statistics and
// updates the running ones, in evaluation reads the running ones.
Normalisation normalisation(const char* op, const Variable& x, const Variable& gamma, const Variable& beta,
                            Tensor& running_mean, Tensor& running_var, bool training, float momentum, float eps) {
    const Tensor& xv = x.value();
    HFQ_CHECK(xv.rank() == 4 && xv.dtype() == DType::f32, op, ": input must be an f32 {N,H,W,C} tensor, got ",
              shape_str(xv.shape()), " ", dtype_name(xv.dtype()));
    const int64_t channels = xv.dim(3);
    const int64_t rows = xv.numel() / std::max<int64_t>(channels, 1);  // N*H*W values per channel
    check_vector(op, "gamma", gamma.defined() ? gamma.value() : Tensor(), channels, xv.shape());
    check_vector(op, "beta", beta.defined() ? beta.value() : Tensor(), channels, xv.shape());
    check_vector(op, "running_mean", running_mean, channels, xv.shape());
    check_vector(op, "running_var", running_var, channels, xv.shape());
    HFQ_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
    HFQ_CHECK(momentum >= 0 && momentum <= 1, op, ": momentum must be in [0, 1], got ", momentum);
    HFQ_CHECK(!training || rows > 1, op, ": training needs more than one value per channel, input ",
              shape_str(xv.shape()));
    HFQ_CHECK(training || rows > 0, op, ": empty input ", shape_str(xv.shape()));

    Tensor mean = Tensor::empty({channels});
    Tensor inv_std = Tensor::empty({channels});
    int64_t stat_rows = rows;
    if (training) {
        const BatchStatistics batch = batch_statistics(xv.f32(), rows, channels);
        for (int64_t c = 0; c < channels; ++c) {
            mean.f32()[c] = static_cast<float>(batch.mean[c]);
            inv_std.f32()[c] = static_cast<float>(1.0 / std::sqrt(batch.var[c] + eps));
        }
        update_running_statistics(batch, momentum, running_mean, running_var);
        stat_rows = batch.rows;
    } else {
        for (int64_t c = 0; c < channels; ++c) {
            mean.f32()[c] = running_mean.f32()[c];
            inv_std.f32()[c] = static_cast<float>(1.0 / std::sqrt(double(running_var.f32()[c]) + eps));
        }
    }
    Tensor scale = mul(gamma.value(), inv_std);
    return {mean, inv_std, scale, stat_rows};
}

// The normalisation's output, mapped by clamp: {N,H,W,C}.
template <class Clamp>
Tensor normalise(const Tensor& xv, const Normalisation& n, const Tensor& beta, Clamp clamp) {
    const int64_t channels = n.mean.numel(), rows = xv.numel() / channels;
    Tensor y = Tensor::empty(xv.shape());
    channel_affine(y.f32(), xv.f32(), n.mean.f32(), n.scale.f32(), nullptr, nullptr, beta.f32(), rows, channels, clamp);
    return y;
}

// Backward of y = scale * (x - mean) + beta for the gradient dy, which G
// reads (a float pointer or GradThroughReLU6) from the memory of dy_memory.
// dx is written over that memory when nothing else holds it.
template <class G>
void normalisation_backward(const Variable& x, const Variable& gamma, const Variable& beta, const Normalisation& n,
                            bool training, G dy, const Tensor& dy_memory) {
    const Tensor& xv = x.value();
    const int64_t channels = n.mean.numel();
    const int64_t rows = xv.numel() / channels;
    const float* mean = n.mean.f32();
    const float* inv_std = n.inv_std.f32();
    const float* s = n.scale.f32();
    const ChannelSums sums = channel_sums(dy, xv.f32(), rows, channels);
    // With xhat = (x - mean) * inv_std:
    //   dbeta = sum dy,   dgamma = sum dy * xhat = inv_std * (sum dy*x - mean * sum dy).
    // Training (mean and var depend on x), with the same sums over the R rows
    // of the statistics, written Sdy, Sdyx, and DG = inv_std * (Sdyx - mean * Sdy):
    //   dx = s * (dy - Sdy / R - xhat * DG / R)
    //      = a * (x - mean) + s * dy + d,   a = -s * inv_std * DG / R,   d = -s * Sdy / R.
    // Evaluation (fixed statistics): dx = s * dy.
    //
    // Sync batch norm: the statistics are over every replica's rows, so x's
    // gradient through them involves every replica's dy: Sdy and Sdyx are
    // summed over the replicas and R counts all rows (without sync they are
    // this replica's sums, R its rows). Each replica's dy is the gradient of
    // its own mean loss, N times its rows' share of the gradient of the whole
    // batch's mean loss; dx is linear in dy, so it is N times the whole
    // batch's dx on these rows, as every gradient of this replica is, and
    // the trainer's average over the N replicas divides that out. dgamma and
    // dbeta stay sums over this replica's rows: averaged over the replicas,
    // N times each share gives the whole batch's sum (sums over all replicas
    // here would count every row N times), as PyTorch's SyncBatchNorm + DDP.
    std::vector<double> all(2 * channels);  // [Sdy | Sdyx]
    std::copy(sums.u.begin(), sums.u.end(), all.begin());
    std::copy(sums.uv.begin(), sums.uv.end(), all.begin() + channels);
    if (training && replicas::sync_batch_norm()) replicas::sum(all.data(), 2 * channels);
    const double* s_dy = all.data();
    const double* s_dyx = s_dy + channels;
    const int64_t stat_rows = n.rows;
    Tensor dgamma = Tensor::empty({channels});
    Tensor dbeta = Tensor::empty({channels});
    Tensor a = Tensor::empty({channels});
    Tensor d = Tensor::empty({channels});
    for (int64_t c = 0; c < channels; ++c) {
        const double is = inv_std[c], sc = s[c];
        dgamma.f32()[c] = static_cast<float>(is * (sums.uv[c] - mean[c] * sums.u[c]));
        dbeta.f32()[c] = static_cast<float>(sums.u[c]);
        const double dg = is * (s_dyx[c] - mean[c] * s_dy[c]);
        a.f32()[c] = static_cast<float>(-sc * is * dg / stat_rows);
        d.f32()[c] = static_cast<float>(-sc * s_dy[c] / stat_rows);
    }
    if (x.requires_grad()) {
        Tensor dx = gradient_buffer(dy_memory);
        if (training) {
            channel_affine(dx.f32(), xv.f32(), mean, a.f32(), dy, s, d.f32(), rows, channels, kIdentity);
        } else {
            const Tensor zero = Tensor::zeros({channels});
            channel_affine(dx.f32(), dy, zero.f32(), s, nullptr, nullptr, zero.f32(), rows, channels, kIdentity);
        }
        x.accumulate_grad(dx);
    }
    gamma.accumulate_grad(dgamma);
    beta.accumulate_grad(dbeta);
}

}  // namespace

Variable batch_norm(const Variable& x, const Variable& gamma, const Variable& beta, Tensor& running_mean,
                    Tensor& running_var, bool training, float momentum, float eps) {
    const Normalisation n =
        normalisation("batch_norm", x, gamma, beta, running_mean, running_var, training, momentum, eps);
    Tensor y = normalise(x.value(), n, beta.value(), kIdentity);
    return make_result(y, "batch_norm", {x, gamma, beta}, [x, gamma, beta, n, training](const Tensor& dy) {
        normalisation_backward(x, gamma, beta, n, training, dy.f32(), dy);
    });
}

Variable batch_norm_relu6(const Variable& x, const Variable& gamma, const Variable& beta, Tensor& running_mean,
                          Tensor& running_var, bool training, float momentum, float eps) {
    const Normalisation n =
        normalisation("batch_norm_relu6", x, gamma, beta, running_mean, running_var, training, momentum, eps);
    Tensor y = normalise(x.value(), n, beta.value(), kReLU6);
    // Keeps x only: ReLU6 passes the gradient where the normalised value lies
    // in (0, 6), and backward recomputes that value from x. Backward reads dy
    // and x twice (sums, then dx) and writes dx once, over dy when it can: 5
    // tensor passes, where reading the stored y for the gate took 7 and
    // storing the gated gradient first took 9.
    return make_result(y, "batch_norm_relu6", {x, gamma, beta}, [x, gamma, beta, n, training](const Tensor& dy) {
        const GradThroughReLU6 g{dy.f32(), x.value().f32(), n.mean.f32(), n.scale.f32(), beta.value().f32()};
        normalisation_backward(x, gamma, beta, n, training, g, dy);
    });
}

}  // namespace hfq
