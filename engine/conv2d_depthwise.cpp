// The weight gradient of a depthwise convolution on tiny images. oneDNN 2.6's
// depthwise kernels (jit_dw) refuse an input of 2x2 or smaller, the tail of a
// MobileNet at 32x32 inputs, and oneDNN then falls back to a generic grouped
// convolution kernel (jit:avx512_core, or x64:gemm:jit on AVX2) that runs one
// tiny product per channel: 0.3-1 ms on AVX-512 and 4-8 ms on AVX2 for a
// gradient of a few hundred thousand multiply-adds (docs/speed.md). conv2d
// (engine/conv2d.cpp) calls this loop wherever oneDNN picks no depthwise
// kernel for the weight gradient.
//
// Work is split into blocks of 16 channels, a number fixed by the shape.
// Within a block every output pixel's dy row and the input rows under its
// taps are read once, a cache line per row; the 16 channels of each tap
// accumulate side by side (a vector) in float, in pixel order. Float, not
// double: like oneDNN's own kernels, the sum then moves in its last bits
// when the batch is reordered, and the data-parallel test's noise model
// (tests/test_data_parallel.cpp) rests on every gradient doing so.
#include "engine/conv2d_depthwise.h"

#include <algorithm>
#include <vector>

namespace hfq {

void depthwise_weight_gradient(const float* x, const float* dy, float* dw, float* db, const DepthwiseShape& s) {
    constexpr int64_t kBlock = 16;
    const int64_t channels = s.channels, taps = s.kh * s.kw;
    const int64_t blocks = (channels + kBlock - 1) / kBlock;
#pragma omp parallel if (blocks > 1)
    {
        // Per tap, then the bias: {taps + 1, kBlock}.
        std::vector<float> sums((taps + 1) * kBlock);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t c0 = b * kBlock, nc = std::min(kBlock, channels - c0);
            std::fill(sums.begin(), sums.end(), 0.0f);
            float* bias_sum = sums.data() + taps * kBlock;
            for (int64_t n = 0; n < s.n; ++n)
                for (int64_t oh = 0; oh < s.ho; ++oh)
                    for (int64_t ow = 0; ow < s.wo; ++ow) {
                        const float* g = dy + ((n * s.ho + oh) * s.wo + ow) * channels + c0;
                        for (int64_t i = 0; i < s.kh; ++i) {
                            const int64_t ih = oh * s.stride - s.pad_top + i;
                            if (ih < 0 || ih >= s.h) continue;
                            for (int64_t j = 0; j < s.kw; ++j) {
                                const int64_t iw = ow * s.stride - s.pad_left + j;
                                if (iw < 0 || iw >= s.w) continue;
                                const float* xr = x + ((n * s.h + ih) * s.w + iw) * channels + c0;
                                float* tap = sums.data() + (i * s.kw + j) * kBlock;
#pragma omp simd
                                for (int64_t c = 0; c < nc; ++c) tap[c] += g[c] * xr[c];
                            }
                        }
#pragma omp simd
                        for (int64_t c = 0; c < nc; ++c) bias_sum[c] += g[c];
                    }
            for (int64_t c = 0; c < nc; ++c) {
                for (int64_t t = 0; t < taps; ++t) dw[(c0 + c) * taps + t] = sums[t * kBlock + c];
                if (db) db[c0 + c] = bias_sum[c];
            }
        }
    }
}

}  // namespace hfq
