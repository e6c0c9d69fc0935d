// The depthwise weight gradient conv2d computes itself (engine/conv2d_depthwise.cpp)
// where oneDNN 2.6 has no depthwise kernel for it.
#pragma once
#include <cstdint>

namespace hfq {

// The name conv2d_impl_names reports for the backward-weights pass when
// conv2d runs depthwise_weight_gradient.
inline constexpr const char* kDepthwiseWeightsImplName = "hfq:depthwise_weights";

// A depthwise convolution (one filter per channel, groups = channels), as
// the weight gradient sees it.
struct DepthwiseShape {
    int64_t n, h, w, channels;  // x  {N,H,W,C}
    int64_t ho, wo;             // dy {N,Ho,Wo,C}
    int64_t kh, kw, stride;     // weight {C,1,KH,KW}
    int64_t pad_top, pad_left;
};

// dW {C,1,KH,KW} and, if db is not null, db {C}, from x and dy (NHWC):
//   dW[c,i,j] = sum over n,oh,ow of dy[n,oh,ow,c] * x[n, oh*s - pad_top + i, ow*s - pad_left + j, c]
//   db[c]     = sum over n,oh,ow of dy[n,oh,ow,c]
// taps outside x contributing nothing. Summed in float, each channel over
// the pixels in order (n, oh, ow), so the result does not depend on the
// thread count.
void depthwise_weight_gradient(const float* x, const float* dy, float* dw, float* db, const DepthwiseShape& s);

}  // namespace hfq
