// Fully connected layer, y = x W^T + b, on oneDNN's inner product
// primitives. All tensors stay in their plain row-major layouts:
//   x {N,In} (nc), W {Out,In} (oi), b {Out}, y {N,Out} (nc).
//
// oneDNN's gemm splits the sum over In between threads for some shapes
// (e.g. 128 x 1024 -> 1000), so y would change in the last bits with the
// thread count. The layer is small next to the convolutions (forward and
// backward of 256 x 1280 -> 1000 take about 30 ms on one core), so its
// primitives are created and run on one OpenMP thread.
#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"

namespace hfq {
namespace {

class OneThread {
public:
    OneThread() : previous_(compute_threads()) { set_compute_threads(1); }
    ~OneThread() { set_compute_threads(previous_); }
    OneThread(const OneThread&) = delete;
    OneThread& operator=(const OneThread&) = delete;

private:
    int previous_;
};

struct LinearPrimitives {
    dnnl::memory::desc x, w, b, y;
    dnnl::inner_product_forward forward;
    dnnl::inner_product_backward_data backward_data;        // dx = dy W
    dnnl::inner_product_backward_weights backward_weights;  // dW = dy^T x, db = column sums of dy
};

LinearPrimitives& primitives(int64_t n, int64_t in, int64_t out, bool has_bias) {
    static PrimitiveCache<LinearPrimitives> cache;
    return cache.get(cat(n, ' ', in, ' ', out, ' ', has_bias), [&] {
        LinearPrimitives p;
        p.x = plain_desc({n, in});
        p.w = plain_desc({out, in});
        p.b = plain_desc({out});
        p.y = plain_desc({n, out});
        using ip = dnnl::inner_product_forward;
        const auto fwd = has_bias
                             ? ip::primitive_desc({dnnl::prop_kind::forward_training, p.x, p.w, p.b, p.y}, cpu_engine())
                             : ip::primitive_desc({dnnl::prop_kind::forward_training, p.x, p.w, p.y}, cpu_engine());
        using bw = dnnl::inner_product_backward_weights;
        const auto bwd_w = has_bias ? bw::primitive_desc({p.x, p.w, p.b, p.y}, cpu_engine(), fwd)
                                    : bw::primitive_desc({p.x, p.w, p.y}, cpu_engine(), fwd);
        p.forward = ip(fwd);
        p.backward_data = dnnl::inner_product_backward_data(
            dnnl::inner_product_backward_data::primitive_desc({p.x, p.w, p.y}, cpu_engine(), fwd));
        p.backward_weights = bw(bwd_w);
        return p;
    });
}

}  // namespace

Variable linear(const Variable& x, const Variable& weight, const Variable& bias) {
    const Tensor& xv = x.value();
    HFQ_CHECK(weight.defined(), "linear: weight is undefined");
    const Tensor& wv = weight.value();
    HFQ_CHECK(xv.rank() == 2 && wv.rank() == 2 && xv.dtype() == DType::f32 && wv.dtype() == DType::f32 &&
                  xv.numel() > 0 && wv.numel() > 0 && xv.dim(1) == wv.dim(1),
              "linear: need f32 input {N,In} and weight {Out,In} with matching In, got input ", shape_str(xv.shape()),
              " and weight ", shape_str(wv.shape()));
    const int64_t n = xv.dim(0), in = xv.dim(1), out = wv.dim(0);
    const bool has_bias = bias.defined();
    if (has_bias)
        HFQ_CHECK(bias.value().dtype() == DType::f32 && bias.shape() == Shape{out}, "linear: bias must have shape [",
                  out, "] for weight ", shape_str(wv.shape()), ", got ", shape_str(bias.shape()));

    const OneThread one_thread;
    LinearPrimitives& p = primitives(n, in, out, has_bias);
    Tensor y = Tensor::empty({n, out});
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, as_memory(p.x, xv)}, {DNNL_ARG_WEIGHTS, as_memory(p.w, wv)}, {DNNL_ARG_DST, as_memory(p.y, y)}};
    if (has_bias) args[DNNL_ARG_BIAS] = as_memory(p.b, bias.value());
    run_primitive("linear", p.forward, args);

    return make_result(y, "linear", {x, weight, bias}, [x, weight, bias, &p](const Tensor& dy) {
        const OneThread one_thread;
        if (x.requires_grad()) {
            Tensor dx = Tensor::empty(x.shape());
            run_primitive("linear backward (input)", p.backward_data,
                          {{DNNL_ARG_DIFF_DST, as_memory(p.y, dy)},
                           {DNNL_ARG_WEIGHTS, as_memory(p.w, weight.value())},
                           {DNNL_ARG_DIFF_SRC, as_memory(p.x, dx)}});
            x.accumulate_grad(dx);
        }
        if (weight.requires_grad() || bias.requires_grad()) {
            Tensor dw = Tensor::empty(weight.shape());
            std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, as_memory(p.x, x.value())},
                                                       {DNNL_ARG_DIFF_DST, as_memory(p.y, dy)},
                                                       {DNNL_ARG_DIFF_WEIGHTS, as_memory(p.w, dw)}};
            Tensor db;
            if (bias.defined()) {
                db = Tensor::empty(bias.shape());
                args[DNNL_ARG_DIFF_BIAS] = as_memory(p.b, db);
            }
            run_primitive("linear backward (weights)", p.backward_weights, args);
            weight.accumulate_grad(dw);
            if (bias.defined()) bias.accumulate_grad(db);
        }
    });
}

}  // namespace hfq
