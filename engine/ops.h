// The differentiable operations of the engine. Each takes and returns
// Variables; when gradients are being recorded each records its backward.
// Layouts follow engine/tensor.h: activations NHWC {N, H, W, C}, convolution
// weights OIHW, linear weights {out, in}.
//
// Every op checks its arguments and throws hfq::Error naming the op and the
// offending shapes or values.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/autograd.h"
#include "engine/random.h"

namespace hfq {

// ---- Convolution (engine/conv2d.cpp, oneDNN) ------------------------------
struct Conv2dParams {
    int stride = 1;
    int padding = 0;            // symmetric zero padding, when same_padding is false
    bool same_padding = false;  // TensorFlow 'SAME': output = ceil(in / stride),
                                // extra padding (if odd) goes bottom/right
    int groups = 1;             // groups == in_channels == out_channels: depthwise
};
// Output size and zero padding along one spatial dimension of input size
// `in` (what conv2d uses; for code that runs a convolution its own way).
// Throws if the kernel is larger than the padded input.
struct ConvExtent {
    int64_t out, pad_before, pad_after;
};
ConvExtent conv_extent(int64_t in, int64_t kernel, const Conv2dParams& p);
// x {N,H,W,Cin}, weight {Cout, Cin/groups, KH, KW}, bias {Cout} or undefined
// -> {N,Ho,Wo,Cout}
Variable conv2d(const Variable& x, const Variable& weight, const Variable& bias, const Conv2dParams& p);

// ---- Batch normalization (engine/batch_norm.cpp, plain loops) -------------
// x {N,H,W,C}; gamma, beta {C}; running_mean, running_var {C} (buffers, not
// differentiated). Training: normalise with the batch mean and the biased
// batch variance, then update the running statistics as PyTorch does:
//   running = (1 - momentum) * running + momentum * batch_stat,
// with the unbiased variance (n / (n - 1)) for running_var.
// Evaluation: normalise with the running statistics, buffers unchanged.
Variable batch_norm(const Variable& x, const Variable& gamma, const Variable& beta, Tensor& running_mean,
                    Tensor& running_var, bool training, float momentum = 0.1f, float eps = 1e-5f);
// relu6(batch_norm(...)) with the same arguments, results and running-
// statistics update, holding less memory until backward.
Variable batch_norm_relu6(const Variable& x, const Variable& gamma, const Variable& beta, Tensor& running_mean,
                          Tensor& running_var, bool training, float momentum = 0.1f, float eps = 1e-5f);

// ---- Element-wise (engine/elementwise.cpp) --------------------------------
Variable relu(const Variable& x);
Variable relu6(const Variable& x);                   // min(max(x, 0), 6)
Variable add(const Variable& a, const Variable& b);  // same shapes
// x {..., C} times a per-channel vector scale {C} (the last dimension).
Variable mul_channel(const Variable& x, const Variable& scale);
// Inverted dropout: in training zeroes each element with probability p and
// scales the rest by 1/(1-p); identity in evaluation or when p == 0. The mask
// comes from rng, so a fixed seed gives the same mask at any thread count,
// and on data-parallel replicas (engine/replicas.h) the rows of the mask one
// process would draw for the whole batch.
Variable dropout(const Variable& x, float p, bool training, Rng& rng);

// ---- Pooling and shape (engine/pooling.cpp) -------------------------------
// x {N,H,W,C} -> {N,Ho,Wo,C}; padded elements are excluded from the average
// (PyTorch's count_include_pad=False).
Variable avg_pool2d(const Variable& x, int kernel, int stride, int padding = 0);
// x {N,H,W,C} -> {N,C}
Variable global_avg_pool(const Variable& x);
// x {N, ...} -> {N, product of the rest}. On NHWC activations the order is
// H, W, C (PyTorch flattens NCHW as C, H, W; the two agree when H = W = 1,
// which is the case after global pooling).
Variable flatten(const Variable& x);

// ---- Fully connected (engine/linear.cpp, oneDNN inner product) ------------
// x {N,In}, weight {Out,In}, bias {Out} or undefined -> {N,Out}
Variable linear(const Variable& x, const Variable& weight, const Variable& bias);

// ---- Losses and reductions (engine/loss.cpp) ------------------------------
// logits {N,K}, labels N class indices in [0, K). Mean over the batch of the
// cross-entropy against the smoothed target (1 - eps) one_hot + eps / K, as
// PyTorch's cross_entropy(label_smoothing=eps). Returns a {1} tensor.
Variable cross_entropy(const Variable& logits, const std::vector<int32_t>& labels, float label_smoothing = 0.0f);
Variable sum(const Variable& x);   // -> {1}, accumulated in double
Variable mean(const Variable& x);  // -> {1}

}  // namespace hfq
