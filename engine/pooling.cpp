// Average pooling on NHWC activations (padded positions are left out of the
// count, PyTorch's count_include_pad=False), and the reshape to {N, features}.
#include <algorithm>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"

namespace hfq {
namespace {

struct Window {
    int64_t kh, kw, stride, padding;
};

// Along one axis of length `in` with `out` windows of size k: the windows
// [o*stride - padding, o*stride - padding + k) that contain position i are
// o in [first, last]; extent(o) counts the window's positions inside the image.
struct Axis {
    int64_t in, out, k, stride, padding;
    int64_t first(int64_t i) const {
        const int64_t a = i + padding - k + 1;  // o*stride >= a
        return a <= 0 ? 0 : (a + stride - 1) / stride;
    }
    int64_t last(int64_t i) const { return std::min(out - 1, (i + padding) / stride); }
    int64_t extent(int64_t o) const {
        const int64_t begin = o * stride - padding;
        return std::min(begin + k, in) - std::max<int64_t>(begin, 0);
    }
};

// dx[n, i, j, c] = sum over the windows (oh, ow) containing (i, j) of
// dy[n, oh, ow, c] / (number of image positions in that window).
// oneDNN's pooling backward adds overlapping windows in an order that depends
// on how it splits the work over threads; this loop gathers them in a fixed
// order, so dx does not depend on the thread count.
void average_pool_backward(const Tensor& dy, Tensor& dx, const Window& w) {
    const int64_t n = dx.dim(0), channels = dx.dim(3);
    const Axis rows{dx.dim(1), dy.dim(1), w.kh, w.stride, w.padding};
    const Axis cols{dx.dim(2), dy.dim(2), w.kw, w.stride, w.padding};
    const float* pdy = dy.f32();
    float* pdx = dx.f32();
#pragma omp parallel for schedule(static)
    for (int64_t ni = 0; ni < n * rows.in; ++ni) {  // one image row of one sample
        const int64_t b = ni / rows.in, i = ni % rows.in;
        for (int64_t j = 0; j < cols.in; ++j) {
            float* out = pdx + (ni * cols.in + j) * channels;
            std::fill(out, out + channels, 0.0f);
            for (int64_t oh = rows.first(i); oh <= rows.last(i); ++oh)
                for (int64_t ow = cols.first(j); ow <= cols.last(j); ++ow) {
                    const float count = static_cast<float>(rows.extent(oh) * cols.extent(ow));
                    const float* g = pdy + ((b * rows.out + oh) * cols.out + ow) * channels;
                    for (int64_t c = 0; c < channels; ++c) out[c] += g[c] / count;
                }
        }
    }
}

// x {N,H,W,C} -> {N,Ho,Wo,C}, Ho = (H + 2p - kh) / stride + 1 (rounded down).
// The forward runs on oneDNN (avg_exclude_padding), the backward above.
Variable average_pool(const char* op, const Variable& x, const Window& w) {
    const Tensor& xv = x.value();
    const Shape& s = xv.shape();
    const int64_t ho = (s[1] + 2 * w.padding - w.kh) / w.stride + 1;
    const int64_t wo = (s[2] + 2 * w.padding - w.kw) / w.stride + 1;
    Tensor y = Tensor::empty({s[0], ho, wo, s[3]});
    const dnnl::memory::desc src = nhwc_desc(xv);
    const dnnl::memory::desc dst = nhwc_desc(y);

    static PrimitiveCache<dnnl::pooling_forward> cache;
    auto& forward = cache.get(cat(shape_str(s), w.kh, ' ', w.kw, ' ', w.stride, ' ', w.padding), [&] {
        const dnnl::memory::dims stride{w.stride, w.stride}, kernel{w.kh, w.kw}, pad{w.padding, w.padding};
        return dnnl::pooling_forward(dnnl::pooling_forward::primitive_desc(
            {dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_avg_exclude_padding, src, dst, stride, kernel,
             pad, pad},
            cpu_engine()));
    });
    run_primitive(op, forward, {{DNNL_ARG_SRC, as_memory(src, xv)}, {DNNL_ARG_DST, as_memory(dst, y)}});

    return make_result(y, op, {x}, [x, w](const Tensor& dy) {
        Tensor dx = Tensor::empty(x.shape());
        average_pool_backward(dy, dx, w);
        x.accumulate_grad(dx);
    });
}

void check_activation(const char* op, const Tensor& x) {
    HFQ_CHECK(x.rank() == 4 && x.dtype() == DType::f32 && x.numel() > 0, op,
              ": input must be a non-empty f32 {N,H,W,C} tensor, got ", shape_str(x.shape()), " ",
              dtype_name(x.dtype()));
}

}  // namespace

Variable avg_pool2d(const Variable& x, int kernel, int stride, int padding) {
    const Tensor& xv = x.value();
    check_activation("avg_pool2d", xv);
    HFQ_CHECK(kernel >= 1 && stride >= 1 && padding >= 0,
              "avg_pool2d: need kernel >= 1, stride >= 1, padding >= 0, got kernel ", kernel, " stride ", stride,
              " padding ", padding);
    // As PyTorch: a window must never lie entirely in the padding.
    HFQ_CHECK(2 * padding <= kernel, "avg_pool2d: padding ", padding, " is more than half the kernel ", kernel);
    HFQ_CHECK(xv.dim(1) + 2 * padding >= kernel && xv.dim(2) + 2 * padding >= kernel, "avg_pool2d: kernel ", kernel,
              " with padding ", padding, " does not fit input ", shape_str(xv.shape()));
    return average_pool("avg_pool2d", x, {kernel, kernel, stride, padding});
}

Variable global_avg_pool(const Variable& x) {
    check_activation("global_avg_pool", x.value());
    // One window over the whole image: {N,H,W,C} -> {N,1,1,C} -> {N,C}.
    return flatten(average_pool("global_avg_pool", x, {x.value().dim(1), x.value().dim(2), 1, 0}));
}

Variable flatten(const Variable& x) {
    const Tensor& xv = x.value();
    HFQ_CHECK(xv.rank() >= 1, "flatten: input needs a batch dimension, got ", shape_str(xv.shape()));
    Shape out{xv.dim(0), 1};
    for (int i = 1; i < xv.rank(); ++i) out[1] *= xv.dim(i);
    // A view: same memory, and the gradient is the same view of dy.
    return make_result(xv.reshape(out), "flatten", {x},
                       [x](const Tensor& dy) { x.accumulate_grad(dy.reshape(x.shape())); });
}

}  // namespace hfq
