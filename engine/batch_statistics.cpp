#include "engine/batch_statistics.h"

#include <algorithm>

#include "engine/channel_sums.h"
#include "engine/replicas.h"

namespace hfq {

BatchStatistics batch_statistics(const float* x, int64_t rows, int64_t channels) {
    const ChannelSums s = channel_sums(x, x, rows, channels);
    // [sum x (C) | sum x^2 (C) | R]: one sum over the replicas for all three
    // (the identity without sync batch norm). R is exact in a double.
    std::vector<double> sums(2 * channels + 1);
    std::copy(s.u.begin(), s.u.end(), sums.begin());
    std::copy(s.uv.begin(), s.uv.end(), sums.begin() + channels);
    sums[2 * channels] = double(rows);
    if (replicas::sync_batch_norm()) replicas::sum(sums.data(), int64_t(sums.size()));
    const double* u = sums.data();
    const double* uv = u + channels;
    BatchStatistics out{std::vector<double>(channels), std::vector<double>(channels), int64_t(sums[2 * channels])};
    for (int64_t c = 0; c < channels; ++c) {
        out.mean[c] = u[c] / out.rows;
        // E[x^2] - m^2 in double: cancellation costs log2(m^2 / var) of
        // double's 53 bits, harmless for float data unless |m| / std > 1e4.
        out.var[c] = std::max(0.0, uv[c] / out.rows - out.mean[c] * out.mean[c]);
    }
    return out;
}

void update_running_statistics(const BatchStatistics& s, float momentum, Tensor& running_mean, Tensor& running_var) {
    float* rm = running_mean.f32();
    float* rv = running_var.f32();
    const int64_t rows = s.rows;
    for (size_t c = 0; c < s.mean.size(); ++c) {
        rm[c] = static_cast<float>((1.0 - momentum) * rm[c] + momentum * s.mean[c]);
        rv[c] = static_cast<float>((1.0 - momentum) * rv[c] + momentum * s.var[c] * rows / (rows - 1));
    }
}

}  // namespace hfq
