// Average pooling on NHWC activations with oneDNN's pooling primitives
// (avg_exclude_padding: padded positions are left out of the count), and the
// reshape to {N, features}.
#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"

namespace hfq {
namespace {

struct Window {
    int64_t kh, kw, stride, padding;
};

struct PoolPrimitives {
    dnnl::pooling_forward forward;
    dnnl::pooling_backward backward;
};

// x {N,H,W,C} -> {N,Ho,Wo,C}, Ho = (H + 2p - kh) / stride + 1 (rounded down).
Variable average_pool(const char* op, const Variable& x, const Window& w) {
    const Tensor& xv = x.value();
    const Shape& s = xv.shape();
    const int64_t ho = (s[1] + 2 * w.padding - w.kh) / w.stride + 1;
    const int64_t wo = (s[2] + 2 * w.padding - w.kw) / w.stride + 1;
    Tensor y = Tensor::empty({s[0], ho, wo, s[3]});
    const dnnl::memory::desc src = nhwc_desc(xv);
    const dnnl::memory::desc dst = nhwc_desc(y);

    static PrimitiveCache<PoolPrimitives> cache;
    PoolPrimitives& p = cache.get(cat(shape_str(s), w.kh, ' ', w.kw, ' ', w.stride, ' ', w.padding), [&] {
        const dnnl::memory::dims stride{w.stride, w.stride}, kernel{w.kh, w.kw}, pad{w.padding, w.padding};
        const auto alg = dnnl::algorithm::pooling_avg_exclude_padding;
        const auto fwd = dnnl::pooling_forward::primitive_desc(
            {dnnl::prop_kind::forward_training, alg, src, dst, stride, kernel, pad, pad}, cpu_engine());
        const auto bwd =
            dnnl::pooling_backward::primitive_desc({alg, src, dst, stride, kernel, pad, pad}, cpu_engine(), fwd);
        return PoolPrimitives{dnnl::pooling_forward(fwd), dnnl::pooling_backward(bwd)};
    });
    run_primitive(op, p.forward, {{DNNL_ARG_SRC, as_memory(src, xv)}, {DNNL_ARG_DST, as_memory(dst, y)}});

    return make_result(y, op, {x}, [x, src, dst, &p, name = cat(op, " backward")](const Tensor& dy) {
        Tensor dx = Tensor::empty(x.shape());
        run_primitive(name.c_str(), p.backward,
                      {{DNNL_ARG_DIFF_DST, as_memory(dst, dy)}, {DNNL_ARG_DIFF_SRC, as_memory(src, dx)}});
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
    HFQ_CHECK(kernel >= 1 && stride >= 1 && padding >= 0, "avg_pool2d: need kernel >= 1, stride >= 1, padding >= 0, got kernel ",
              kernel, " stride ", stride, " padding ", padding);
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
    return make_result(xv.reshape(out), "flatten", {x}, [x](const Tensor& dy) { x.accumulate_grad(dy.reshape(x.shape())); });
}

}  // namespace hfq
