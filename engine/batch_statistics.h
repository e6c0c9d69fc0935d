// Batch statistics of a channels-last activation and PyTorch's update of the
// running statistics from them: what batch norm (engine/batch_norm.cpp) and
// the folded conv + batch norm's correction (quant/folded_conv_bn.cpp) both
// compute in training, written once so that the two agree bit for bit.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace hfq {

struct BatchStatistics {
    std::vector<double> mean;  // per channel
    std::vector<double> var;   // per channel, biased (divided by R): what normalises
};

// x: R = N*H*W rows of C channels, R > 0. The sums (engine/channel_sums.h)
// run in double in a fixed order, so the result does not depend on the
// thread count; var = E[x^2] - mean^2, clamped at 0.
BatchStatistics batch_statistics(const float* x, int64_t rows, int64_t channels);

// PyTorch's BatchNorm2d update, per channel, with the unbiased variance (R > 1):
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * R / (R - 1)
// computed in double and rounded to float once. running_mean and running_var
// are f32 {C}.
void update_running_statistics(const BatchStatistics& s, int64_t rows, float momentum, Tensor& running_mean,
                               Tensor& running_var);

}  // namespace hfq
