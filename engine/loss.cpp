// Cross-entropy with label smoothing, and the sum / mean reductions. Plain
// loops; every sum runs in double in a fixed order.
#include <algorithm>
#include <cmath>

#include "engine/check.h"
#include "engine/ops.h"
#include "engine/tensor_math.h"

namespace hfq {

// For one row z of K logits, target t = (1 - eps) one_hot(y) + eps / K:
//   loss = -sum_k t_k log softmax(z)_k = lse(z) - sum_k t_k z_k,
//   lse(z) = m + log sum_k exp(z_k - m), m = max_k z_k (no overflow),
//   d loss / d z = softmax(z) - t.
// The batch loss is the mean over the N rows.
Variable cross_entropy(const Variable& logits, const std::vector<int32_t>& labels, float label_smoothing) {
    const Tensor& z = logits.value();
    HFQ_CHECK(z.rank() == 2 && z.dtype() == DType::f32 && z.dim(0) > 0 && z.dim(1) > 0,
              "cross_entropy: logits must be a non-empty f32 {N,K} tensor, got ", shape_str(z.shape()));
    const int64_t n = z.dim(0), k = z.dim(1);
    HFQ_CHECK(static_cast<int64_t>(labels.size()) == n, "cross_entropy: ", labels.size(), " labels for logits ",
              shape_str(z.shape()));
    for (int64_t i = 0; i < n; ++i)
        HFQ_CHECK(labels[i] >= 0 && labels[i] < k, "cross_entropy: label ", labels[i], " at index ", i,
                  " is outside [0, ", k, ")");
    HFQ_CHECK(label_smoothing >= 0.0f && label_smoothing <= 1.0f,
              "cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);

    const double eps = label_smoothing;
    Tensor probs = Tensor::empty(z.shape());  // softmax(z), kept for the backward
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float* zi = z.f32() + i * k;
        float* pi = probs.f32() + i * k;
        const double m = *std::max_element(zi, zi + k);
        double sum_exp = 0, sum_z = 0;
        for (int64_t j = 0; j < k; ++j) {
            sum_exp += std::exp(zi[j] - m);
            sum_z += zi[j];
        }
        const double lse = m + std::log(sum_exp);
        for (int64_t j = 0; j < k; ++j) pi[j] = static_cast<float>(std::exp(zi[j] - lse));
        total += lse - (1.0 - eps) * zi[labels[i]] - eps / k * sum_z;
    }
    Tensor loss = Tensor::full({1}, static_cast<float>(total / n));

    return make_result(loss, "cross_entropy", {logits}, [logits, probs, labels, eps](const Tensor& dy) {
        const int64_t n = probs.dim(0), k = probs.dim(1);
        const double g = double(dy.item()) / n;
        Tensor dz = Tensor::empty(probs.shape());
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < k; ++j) {
                const double target = (j == labels[i] ? 1.0 - eps : 0.0) + eps / k;
                dz.f32()[i * k + j] = static_cast<float>(g * (probs.f32()[i * k + j] - target));
            }
        logits.accumulate_grad(dz);
    });
}

namespace {

// The sum of all elements (times 1 / count for the mean) -> {1}; the
// gradient is dy (divided by the count) everywhere.
Variable scaled_sum(const char* op, const Variable& x, bool divide_by_count) {
    const Tensor& xv = x.value();
    HFQ_CHECK(xv.dtype() == DType::f32, op, ": input must be f32, got ", dtype_name(xv.dtype()));
    HFQ_CHECK(!divide_by_count || xv.numel() > 0, op, ": mean of an empty tensor ", shape_str(xv.shape()));
    const double factor = divide_by_count ? 1.0 / double(xv.numel()) : 1.0;
    return make_result(Tensor::full({1}, static_cast<float>(factor * sum_f64(xv))), op, {x},
                       [x, factor](const Tensor& dy) {
                           x.accumulate_grad(Tensor::full(x.shape(), static_cast<float>(factor * dy.item())));
                       });
}

}  // namespace

Variable sum(const Variable& x) { return scaled_sum("sum", x, false); }
Variable mean(const Variable& x) { return scaled_sum("mean", x, true); }

}  // namespace hfq
