// Batch statistics of a channels-last activation and PyTorch's update of the
// running statistics from them: what batch norm (engine/batch_norm.cpp) and
// the folded conv + batch norm's correction (quant/folded_conv_bn.cpp) both
// compute in training, written once so that the two agree bit for bit.
//
// With sync batch norm (engine/replicas.h) the statistics are those of the
// whole batch, over every replica's share of it.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace hfq {

struct BatchStatistics {
    std::vector<double> mean;  // per channel
    std::vector<double> var;   // per channel, biased (divided by rows): what normalises
    int64_t rows = 0;          // values per channel: this replica's N*H*W, or all replicas' when synced
};

// x: R = N*H*W rows of C channels, R > 0. The sums (engine/channel_sums.h)
// run in double in a fixed order, so the result does not depend on the
// thread count; var = E[x^2] - mean^2, clamped at 0. When
// replicas::sync_batch_norm(), the sums and R are summed over the replicas
// (one replicas::sum) before dividing; otherwise they are this replica's.
BatchStatistics batch_statistics(const float* x, int64_t rows, int64_t channels);

// PyTorch's BatchNorm2d update, per channel, with the unbiased variance of
// R = s.rows values (R > 1; the global count when synced, as PyTorch's
// SyncBatchNorm):
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * R / (R - 1)
// computed in double and rounded to float once. running_mean and running_var
// are f32 {C}.
void update_running_statistics(const BatchStatistics& s, float momentum, Tensor& running_mean, Tensor& running_var);

}  // namespace hfq
