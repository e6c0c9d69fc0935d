// Element-wise ops. relu, relu6 and add run on oneDNN (eltwise and binary
// primitives, multi-threaded and vectorised); mul_channel and dropout are
// plain loops.
//
// Element-wise primitives see a tensor as a flat run of n floats: the result
// does not depend on the layout, and one primitive serves every shape with n
// elements.
#include <algorithm>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"
#include "engine/replicas.h"
#include "engine/tensor_math.h"

namespace hfq {
namespace {

dnnl::memory::desc flat_desc(const Tensor& t) { return plain_desc({t.numel()}); }

void check_f32(const char* op, const char* name, const Tensor& t) {
    HFQ_CHECK(t.dtype() == DType::f32 && t.numel() > 0, op, ": ", name, " must be a non-empty f32 tensor, got ",
              shape_str(t.shape()), " ", dtype_name(t.dtype()));
}

struct EltwisePrimitives {
    dnnl::eltwise_forward forward;
    dnnl::eltwise_backward backward;  // gradient from the forward's input
};

// An eltwise primitive pair with its gradient taken from the forward's input:
//   relu:          y = max(x, 0),              dx = dy where x > 0, else 0
//   clip_v2 (0,6): y = min(max(x, 0), 6),      dx = dy where 0 < x < 6, else 0
// which is how PyTorch's relu and relu6 (hardtanh) define the gradient at the kinks.
Variable eltwise(const char* op, const Variable& x, dnnl::algorithm alg, float alpha, float beta) {
    const Tensor& xv = x.value();
    check_f32(op, "input", xv);
    const dnnl::memory::desc d = flat_desc(xv);
    static PrimitiveCache<EltwisePrimitives> cache;
    EltwisePrimitives& p = cache.get(cat(op, ' ', xv.numel()), [&] {
        const auto fwd = dnnl::eltwise_forward::primitive_desc({dnnl::prop_kind::forward_training, alg, d, alpha, beta},
                                                               cpu_engine());
        const auto bwd = dnnl::eltwise_backward::primitive_desc({alg, d, d, alpha, beta}, cpu_engine(), fwd);
        return EltwisePrimitives{dnnl::eltwise_forward(fwd), dnnl::eltwise_backward(bwd)};
    });
    Tensor y = Tensor::empty(xv.shape());
    run_primitive(op, p.forward, {{DNNL_ARG_SRC, as_memory(d, xv)}, {DNNL_ARG_DST, as_memory(d, y)}});
    return make_result(y, op, {x}, [x, d, &p, name = cat(op, " backward")](const Tensor& dy) {
        Tensor dx = Tensor::empty(dy.shape());
        run_primitive(name.c_str(), p.backward,
                      {{DNNL_ARG_SRC, as_memory(d, x.value())},
                       {DNNL_ARG_DIFF_DST, as_memory(d, dy)},
                       {DNNL_ARG_DIFF_SRC, as_memory(d, dx)}});
        x.accumulate_grad(dx);
    });
}

}  // namespace

Variable relu(const Variable& x) { return eltwise("relu", x, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f); }
Variable relu6(const Variable& x) { return eltwise("relu6", x, dnnl::algorithm::eltwise_clip_v2, 0.0f, 6.0f); }

Variable add(const Variable& a, const Variable& b) {
    const Tensor& av = a.value();
    const Tensor& bv = b.value();
    check_f32("add", "a", av);
    check_f32("add", "b", bv);
    HFQ_CHECK(av.shape() == bv.shape(), "add: shapes differ, ", shape_str(av.shape()), " vs ", shape_str(bv.shape()));
    const dnnl::memory::desc d = flat_desc(av);
    static PrimitiveCache<dnnl::binary> cache;
    dnnl::binary& p = cache.get(std::to_string(av.numel()), [&] {
        return dnnl::binary(dnnl::binary::primitive_desc({dnnl::algorithm::binary_add, d, d, d}, cpu_engine()));
    });
    Tensor y = Tensor::empty(av.shape());
    run_primitive(
        "add", p,
        {{DNNL_ARG_SRC_0, as_memory(d, av)}, {DNNL_ARG_SRC_1, as_memory(d, bv)}, {DNNL_ARG_DST, as_memory(d, y)}});
    // d(a + b) = dy for both: the same tensor goes to both inputs.
    return make_result(y, "add", {a, b}, [a, b](const Tensor& dy) {
        a.accumulate_grad(dy);
        b.accumulate_grad(dy);
    });
}

namespace {

// in {..., C} times scale {C} along the last dimension.
Tensor scale_channels(const Tensor& in, const Tensor& scale) {
    const int64_t channels = scale.numel(), rows = in.numel() / channels;
    Tensor out = Tensor::empty(in.shape());
    const float* pi = in.f32();
    const float* ps = scale.f32();
    float* po = out.f32();
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < channels; ++c) po[r * channels + c] = pi[r * channels + c] * ps[c];
    return out;
}

}  // namespace

Variable mul_channel(const Variable& x, const Variable& scale) {
    const Tensor& xv = x.value();
    const Tensor& sv = scale.value();
    check_f32("mul_channel", "input", xv);
    HFQ_CHECK(xv.rank() >= 1, "mul_channel: input must have a channel dimension, got ", shape_str(xv.shape()));
    const int64_t channels = xv.dim(-1);
    HFQ_CHECK(sv.dtype() == DType::f32 && sv.shape() == Shape{channels}, "mul_channel: scale must have shape [",
              channels, "] for input ", shape_str(xv.shape()), ", got ", shape_str(sv.shape()));
    return make_result(scale_channels(xv, sv), "mul_channel", {x, scale}, [x, scale](const Tensor& dy) {
        if (x.requires_grad()) x.accumulate_grad(scale_channels(dy, scale.value()));  // dx = dy * scale
        if (scale.requires_grad()) {
            // dscale[c] = sum over rows of dy * x, in double, rows in order.
            const int64_t channels = scale.value().numel(), rows = dy.numel() / channels;
            const float* pdy = dy.f32();
            const float* px = x.value().f32();
            std::vector<double> acc(channels, 0.0);
            for (int64_t r = 0; r < rows; ++r)
                for (int64_t c = 0; c < channels; ++c) acc[c] += double(pdy[r * channels + c]) * px[r * channels + c];
            Tensor ds = Tensor::empty({channels});
            std::copy(acc.begin(), acc.end(), ds.f32());
            scale.accumulate_grad(ds);
        }
    });
}

Variable dropout(const Variable& x, float p, bool training, Rng& rng) {
    HFQ_CHECK(p >= 0.0f && p < 1.0f, "dropout: probability p must be in [0, 1), got ", p);
    if (!training || p == 0.0f) return x;
    const Tensor& xv = x.value();
    // mask = 0 with probability p, else 1 / (1 - p); drawn in element order
    // for the whole batch. A data-parallel replica holds rows [offset,
    // offset + n) of a global batch of `total` rows (x {n, ...}, f features
    // per row): it draws all total * f uniforms, as one process on the whole
    // batch would, and keeps draws [offset * f, (offset + n) * f), so that
    //   mask on the replicas, put together = mask of one process on the batch
    // (no two replicas share a mask, and every rng ends in the same state).
    // Alone, x is one row (offset 0, total 1): every draw kept, in order, as
    // ever. A replica may hold 0 rows and still draws the others'.
    const bool replicated = replicas::active();
    HFQ_CHECK(!replicated || xv.rank() >= 1, "dropout: on replicas, the input must have a batch dimension");
    if (!(replicated && xv.numel() == 0)) check_f32("dropout", "input", xv);
    const int64_t n = replicated ? xv.shape()[0] : 1;
    int64_t features = 1;  // per row; all of x's elements when alone
    for (int i = replicated ? 1 : 0; i < xv.rank(); ++i) features *= xv.shape()[i];
    const replicas::Rows rows = replicas::rows_in_batch(n);
    Tensor mask = Tensor::empty(xv.shape());
    const float keep_scale = 1.0f / (1.0f - p);
    float* pm = mask.f32();
    const int64_t first = rows.offset * features, end = first + n * features, draws = rows.total * features;
    for (int64_t i = 0; i < draws; ++i) {
        const bool drop = rng.uniform() < p;
        if (i >= first && i < end) pm[i - first] = drop ? 0.0f : keep_scale;
    }
    if (xv.numel() == 0) return x;
    return make_result(mul(xv, mask), "dropout", {x},
                       [x, mask](const Tensor& dy) { x.accumulate_grad(mul(dy, mask)); });
}

}  // namespace hfq
