// Per-channel sums over the rows of a channels-last tensor, in a fixed order:
// what batch norm (engine/batch_norm.cpp) and the folded conv-BN's batch-
// statistics correction (quant/folded_conv_bn.cpp) reduce with.
//
// A {N,H,W,C} tensor is R = N*H*W rows of C channels. The rows are cut into
// blocks of at least kMinBlockElements values, at most kMaxBlocks of them: a
// number that depends on the shape, never on the thread count. Blocks are
// summed in parallel, in double, and combined in block order, so the sums do
// not depend on the thread count. Enough blocks to keep many threads busy,
// few enough that the per-block partial sums stay small next to the tensor.
#pragma once
#include <algorithm>
#include <concepts>
#include <cstdint>
#include <vector>

namespace hfq {

// Element c of the row that starts at offset o: a float pointer is indexed, a
// reader (anything callable as r(o, c), such as batch norm's gradient through
// ReLU6) computes the value where it is read.
inline float element(const float* p, int64_t o, int64_t c) { return p[o + c]; }
template <class Reader>
requires std::invocable<const Reader&, int64_t, int64_t>
float element(const Reader& r, int64_t o, int64_t c) { return r(o, c); }

struct ChannelSums {
    std::vector<double> u;   // sum over rows of u[r, c]
    std::vector<double> uv;  // sum over rows of u[r, c] * v[r, c]
};

// u, v: R x C (row-major). U is a float pointer or a reader (see element).
template <class U>
ChannelSums channel_sums(U u, const float* v, int64_t rows, int64_t channels) {
    constexpr int64_t kMinBlockElements = 65536, kMaxBlocks = 64;
    const int64_t blocks = std::max<int64_t>(1, std::min({rows * channels / kMinBlockElements, rows, kMaxBlocks}));
    std::vector<double> partial(blocks * 2 * channels, 0.0);  // per block: [sum u | sum u*v]
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        double* su = &partial[b * 2 * channels];
        double* suv = su + channels;
        for (int64_t r = rows * b / blocks; r < rows * (b + 1) / blocks; ++r) {
            const int64_t o = r * channels;
#pragma omp simd  // each channel's sum is its own: vectorising reorders nothing
            for (int64_t c = 0; c < channels; ++c) {
                const float uc = element(u, o, c);
                su[c] += uc;
                suv[c] += double(uc) * v[o + c];
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

}  // namespace hfq
