#include "engine/batch_statistics.h"

#include <algorithm>

#include "engine/channel_sums.h"

namespace hfq {

BatchStatistics batch_statistics(const float* x, int64_t rows, int64_t channels) {
    const ChannelSums s = channel_sums(x, x, rows, channels);
    BatchStatistics out{std::vector<double>(channels), std::vector<double>(channels)};
    for (int64_t c = 0; c < channels; ++c) {
        out.mean[c] = s.u[c] / rows;
        // E[x^2] - m^2 in double: cancellation costs log2(m^2 / var) of
        // double's 53 bits, harmless for float data unless |m| / std > 1e4.
        out.var[c] = std::max(0.0, s.uv[c] / rows - out.mean[c] * out.mean[c]);
    }
    return out;
}

void update_running_statistics(const BatchStatistics& s, int64_t rows, float momentum, Tensor& running_mean,
                               Tensor& running_var) {
    float* rm = running_mean.f32();
    float* rv = running_var.f32();
    for (size_t c = 0; c < s.mean.size(); ++c) {
        rm[c] = static_cast<float>((1.0 - momentum) * rm[c] + momentum * s.mean[c]);
        rv[c] = static_cast<float>((1.0 - momentum) * rv[c] + momentum * s.var[c] * rows / (rows - 1));
    }
}

}  // namespace hfq
