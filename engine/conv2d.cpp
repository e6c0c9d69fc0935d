// conv2d: 2-D convolution of NHWC activations with oneDNN.
//
//   forward           y  = conv(x, W) + b
//   backward data     dx = conv_transpose(dy, W)   only when x requires grad
//   backward weights  dW, db from x and dy         only when W or b requires grad
//
// Layouts. x, y, dy and dx are NHWC tensors and oneDNN is told so (format
// tag nhwc, never `any`), so it never converts an activation to a blocked
// layout and back. Weights are stored OIHW; the forward primitive picks the
// weight layout its kernel wants (`any`) and the plain weights are reordered
// into it once per forward call. Backward data reads that same copy when it
// wants the same layout (depthwise on AVX2: Goihw8g for all three passes) and
// a reorder of it otherwise. dW comes out in the layout backward weights
// prefers, reordered to OIHW. Pointwise convolutions (1x1, stride 1) skip all
// this: they are matrix products on the plain layouts (engine/conv2d_pointwise.cpp).
// A depthwise weight gradient for which oneDNN has no depthwise kernel (tiny
// images) is hfq's own loop (engine/conv2d_depthwise.cpp).
//
// Each distinct configuration (shapes, stride, padding, groups, bias) gets its
// primitives once, in a cache; the backward ones are made on first use, so an
// evaluation-only or first-layer convolution never builds what it never runs.
#include "engine/conv2d_diagnostics.h"

#include <algorithm>
#include <optional>

#include "engine/check.h"
#include "engine/conv2d_depthwise.h"
#include "engine/conv2d_pointwise.h"
#include "engine/dnnl_context.h"

namespace hfq {
namespace {

using dnnl::memory;
using tag = memory::format_tag;

using Extent = ConvExtent;

Extent spatial_extent(int64_t in, int64_t kernel, const Conv2dParams& p, const char* dim, const Shape& x,
                      const Shape& w) {
    HFQ_CHECK(p.same_padding || in + 2 * p.padding >= kernel, "conv2d: kernel ", dim, " ", kernel,
              " is larger than the padded input ", dim, " ", in, " + 2*", p.padding, " (x ", shape_str(x), ", weight ",
              shape_str(w), ")");
    return conv_extent(in, kernel, p);
}

// Everything a convolution primitive depends on.
struct ConvGeometry {
    int64_t n, h, w, cin;  // x      {N, H, W, Cin}
    int64_t cout, kh, kw;  // weight {Cout, Cin/groups, KH, KW}
    int64_t groups, stride;
    Extent rows, cols;  // y      {N, rows.out, cols.out, Cout}
    bool has_bias;

    // Identifies the configuration in the cache and in error messages.
    std::string key() const {
        return cat("x ", shape_str({n, h, w, cin}), ", weight ", shape_str({cout, cin / groups, kh, kw}), ", groups ",
                   groups, ", stride ", stride, ", padding top/bottom/left/right ", rows.pad_before, '/',
                   rows.pad_after, '/', cols.pad_before, '/', cols.pad_after, has_bias ? ", bias" : ", no bias");
    }
    Shape y_shape() const { return {n, rows.out, cols.out, cout}; }
    // 1x1, stride 1, unpadded, ungrouped: conv2d runs it as a matrix product.
    bool pointwise() const {
        return kh == 1 && kw == 1 && stride == 1 && groups == 1 && rows.pad_before + rows.pad_after == 0 &&
               cols.pad_before + cols.pad_after == 0;
    }
    // One filter per channel.
    bool depthwise() const { return groups == cin && cout == cin; }
    DepthwiseShape depthwise_shape() const {
        return {n, h, w, cin, rows.out, cols.out, kh, kw, stride, rows.pad_before, cols.pad_before};
    }

    // oneDNN descriptors. Activations: logical NCHW dims, NHWC memory.
    memory::desc src() const { return {{n, cin, h, w}, memory::data_type::f32, tag::nhwc}; }
    memory::desc dst() const { return {{n, cout, rows.out, cols.out}, memory::data_type::f32, tag::nhwc}; }
    // oneDNN wants grouped weights as {G, Cout/G, Cin/G, KH, KW}: the same
    // memory as OIHW {Cout, Cin/G, KH, KW}.
    memory::dims weight_dims() const {
        if (groups == 1) return {cout, cin, kh, kw};
        return {groups, cout / groups, cin / groups, kh, kw};
    }
    memory::desc plain_weights() const { return plain_desc(weight_dims()); }
    memory::desc any_weights() const { return {weight_dims(), memory::data_type::f32, tag::any}; }
    memory::desc bias() const { return has_bias ? plain_desc({cout}) : memory::desc(); }
    memory::dims strides() const { return {stride, stride}; }
    memory::dims pad_before() const { return {rows.pad_before, cols.pad_before}; }
    memory::dims pad_after() const { return {rows.pad_after, cols.pad_after}; }
};

ConvGeometry conv_geometry(const Shape& x, const Shape& w, bool has_bias, const Conv2dParams& p) {
    HFQ_CHECK(x.size() == 4, "conv2d: x must be NHWC {N,H,W,C}, got ", shape_str(x));
    HFQ_CHECK(w.size() == 4, "conv2d: weight must be OIHW {Cout,Cin/groups,KH,KW}, got ", shape_str(w));
    for (int64_t d : x) HFQ_CHECK(d > 0, "conv2d: x has an empty dimension: ", shape_str(x));
    for (int64_t d : w) HFQ_CHECK(d > 0, "conv2d: weight has an empty dimension: ", shape_str(w));
    HFQ_CHECK(p.stride >= 1, "conv2d: stride must be >= 1, got ", p.stride);
    HFQ_CHECK(p.groups >= 1, "conv2d: groups must be >= 1, got ", p.groups);
    HFQ_CHECK(p.padding >= 0, "conv2d: padding must be >= 0, got ", p.padding);
    HFQ_CHECK(!(p.same_padding && p.padding != 0), "conv2d: same_padding and an explicit padding of ", p.padding,
              " both given; use one");
    const int64_t cin = x[3], cout = w[0], g = p.groups;
    HFQ_CHECK(cin % g == 0 && cout % g == 0, "conv2d: groups ", g, " must divide both the input channels ", cin, " (x ",
              shape_str(x), ") and the output channels ", cout, " (weight ", shape_str(w), ")");
    HFQ_CHECK(w[1] == cin / g, "conv2d: weight ", shape_str(w), " expects ", w[1] * g, " input channels with groups ",
              g, ", but x ", shape_str(x), " has ", cin);
    return {x[0],
            x[1],
            x[2],
            cin,
            cout,
            w[2],
            w[3],
            g,
            p.stride,
            spatial_extent(x[1], w[2], p, "height", x, w),
            spatial_extent(x[2], w[3], p, "width", x, w),
            has_bias};
}

// Scratch space comes from the tensor pool (scratchpad_mode::user): oneDNN's
// own global scratchpad is freed whenever no primitive is running, i.e. it
// would be allocated and released again on every call.
dnnl::primitive_attr user_scratchpad() {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
}

// A primitive with its descriptor (which knows the memory layouts it takes).
template <class P>
struct Kernel {
    typename P::primitive_desc pd;
    P primitive;

    explicit Kernel(typename P::primitive_desc d) : pd(std::move(d)), primitive(pd) {}

    void run(const char* pass, std::unordered_map<int, memory> args) const {
        const memory::desc scratch_desc = pd.scratchpad_desc();
        Tensor scratch = Tensor::empty({static_cast<int64_t>(scratch_desc.get_size())}, DType::s8);
        args[DNNL_ARG_SCRATCHPAD] = as_memory(scratch_desc, scratch);
        run_primitive(pass, primitive, args);
    }
};

// Turns oneDNN's refusal to build a primitive into an error naming the shapes.
template <class Make>
auto build(const char* pass, const ConvGeometry& g, Make make) {
    try {
        return make();
    } catch (const dnnl::error& e) {
        throw Error(cat("conv2d: oneDNN cannot build the ", pass, " primitive for ", g.key(), ": ", e.what()));
    }
}

// The primitives of one configuration; the backward ones are built on first
// use. Entries live in a static cache, so backward closures can hold a
// reference to them.
class ConvPrimitives {
public:
    explicit ConvPrimitives(const ConvGeometry& g)
        : g_(g), fwd_(build("forward", g, [&] {
              return Kernel<dnnl::convolution_forward>(
                  {{dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src(), g.any_weights(),
                    g.bias(), g.dst(), g.strides(), g.pad_before(), g.pad_after()},
                   user_scratchpad(),
                   cpu_engine()});
          })) {}

    const ConvGeometry& geometry() const { return g_; }
    const Kernel<dnnl::convolution_forward>& forward() const { return fwd_; }

    // Its weight layout is its own choice too: forcing the forward layout on
    // it makes oneDNN fall back to its reference kernel (ref:any) whenever
    // the two differ.
    const Kernel<dnnl::convolution_backward_data>& backward_data() {
        if (!bwd_data_)
            bwd_data_.emplace(build("backward data", g_, [&] {
                return dnnl::convolution_backward_data::primitive_desc(
                    {dnnl::algorithm::convolution_direct, g_.src(), g_.any_weights(), g_.dst(), g_.strides(),
                     g_.pad_before(), g_.pad_after()},
                    user_scratchpad(), cpu_engine(), fwd_.pd);
            }));
        return *bwd_data_;
    }

    const Kernel<dnnl::convolution_backward_weights>& backward_weights() {
        if (!bwd_weights_)
            bwd_weights_.emplace(build("backward weights", g_, [&] {
                return dnnl::convolution_backward_weights::primitive_desc(
                    {dnnl::algorithm::convolution_direct, g_.src(), g_.any_weights(), g_.bias(), g_.dst(), g_.strides(),
                     g_.pad_before(), g_.pad_after()},
                    user_scratchpad(), cpu_engine(), fwd_.pd);
            }));
        return *bwd_weights_;
    }

    // Whether the weight gradient is hfq's loop: a depthwise convolution for
    // which oneDNN offers only a generic kernel (its depthwise ones are
    // named *_dw), see engine/conv2d_depthwise.cpp.
    bool weights_by_loop() {
        if (!weights_by_loop_)
            weights_by_loop_ =
                g_.depthwise() && std::string(backward_weights().pd.impl_info_str()).find("_dw") == std::string::npos;
        return *weights_by_loop_;
    }

private:
    ConvGeometry g_;
    Kernel<dnnl::convolution_forward> fwd_;
    std::optional<Kernel<dnnl::convolution_backward_data>> bwd_data_;
    std::optional<Kernel<dnnl::convolution_backward_weights>> bwd_weights_;
    std::optional<bool> weights_by_loop_;
};

ConvPrimitives& primitives_for(const ConvGeometry& g) {
    static PrimitiveCache<ConvPrimitives> cache;
    return cache.get(g.key(), [&] { return ConvPrimitives(g); });
}

// dx {N,H,W,Cin} from dy {N,Ho,Wo,Cout} and the weights in the forward
// kernel's layout, which are reused as they are when backward data wants the
// same layout (depthwise) and reordered otherwise.
Tensor backward_data(ConvPrimitives& prims, const Tensor& dy, const Tensor& fwd_weights, const Shape& x_shape) {
    const ConvGeometry& g = prims.geometry();
    const auto& bwd = prims.backward_data();
    const Tensor weights = reorder_to(fwd_weights, prims.forward().pd.weights_desc(), bwd.pd.weights_desc());
    Tensor dx = Tensor::empty(x_shape);
    bwd.run("conv2d backward data", {{DNNL_ARG_DIFF_DST, as_memory(g.dst(), dy)},
                                     {DNNL_ARG_WEIGHTS, as_memory(bwd.pd.weights_desc(), weights)},
                                     {DNNL_ARG_DIFF_SRC, as_memory(g.src(), dx)}});
    return dx;
}

// dW {Cout,Cin/groups,KH,KW} and, with a bias, db {Cout}, from x and dy.
void backward_weights(ConvPrimitives& prims, const Tensor& dy, const Tensor& x, Tensor& dw, Tensor& db) {
    const ConvGeometry& g = prims.geometry();
    if (prims.weights_by_loop()) {
        depthwise_weight_gradient(x.f32(), dy.f32(), dw.f32(), g.has_bias ? db.f32() : nullptr, g.depthwise_shape());
        return;
    }
    const auto& bwd = prims.backward_weights();
    const memory::desc plain = g.plain_weights();
    const memory::desc kernel_layout = bwd.pd.diff_weights_desc();
    const bool direct = kernel_layout == plain;
    Tensor dw_kernel = direct ? dw : Tensor::empty({static_cast<int64_t>(kernel_layout.get_size())}, DType::s8);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, as_memory(g.src(), x)},
                                         {DNNL_ARG_DIFF_DST, as_memory(g.dst(), dy)},
                                         {DNNL_ARG_DIFF_WEIGHTS, as_memory(kernel_layout, dw_kernel)}};
    if (g.has_bias) args[DNNL_ARG_DIFF_BIAS] = as_memory(g.bias(), db);
    bwd.run("conv2d backward weights", std::move(args));
    if (!direct) reorder_into(dw_kernel, kernel_layout, dw, plain);
}

}  // namespace

ConvExtent conv_extent(int64_t in, int64_t kernel, const Conv2dParams& p) {
    const int64_t s = p.stride;
    if (p.same_padding) {
        // TensorFlow SAME: out = ceil(in / s); an odd total goes after.
        const int64_t out = (in + s - 1) / s;
        const int64_t total = std::max<int64_t>((out - 1) * s + kernel - in, 0);
        return {out, total / 2, total - total / 2};
    }
    HFQ_CHECK(in + 2 * p.padding >= kernel, "conv2d: kernel ", kernel, " is larger than the padded input ", in, " + 2*",
              p.padding);
    return {(in + 2 * p.padding - kernel) / s + 1, p.padding, p.padding};
}

Variable conv2d(const Variable& x, const Variable& weight, const Variable& bias, const Conv2dParams& p) {
    HFQ_CHECK(x.defined() && weight.defined(), "conv2d: x and weight must be defined");
    HFQ_CHECK(x.value().dtype() == DType::f32 && weight.value().dtype() == DType::f32,
              "conv2d: x and weight must be f32, got ", dtype_name(x.value().dtype()), " and ",
              dtype_name(weight.value().dtype()));
    const ConvGeometry g = conv_geometry(x.shape(), weight.shape(), bias.defined(), p);
    if (bias.defined())
        HFQ_CHECK(bias.shape() == Shape{g.cout} && bias.value().dtype() == DType::f32, "conv2d: bias must be f32 {",
                  g.cout, "} for weight ", shape_str(weight.shape()), ", got ", shape_str(bias.shape()), " ",
                  dtype_name(bias.value().dtype()));

    if (g.pointwise()) return pointwise_conv2d(x, weight, bias);

    ConvPrimitives& prims = primitives_for(g);
    const auto& fwd = prims.forward();
    // The weights in the layout the kernel wants (OIHW itself or a blocked
    // copy); backward data starts from this copy.
    const Tensor kernel_weights = reorder_to(weight.value(), g.plain_weights(), fwd.pd.weights_desc());
    Tensor y = Tensor::empty(g.y_shape());
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, as_memory(g.src(), x.value())},
                                         {DNNL_ARG_WEIGHTS, as_memory(fwd.pd.weights_desc(), kernel_weights)},
                                         {DNNL_ARG_DST, as_memory(g.dst(), y)}};
    if (g.has_bias) args[DNNL_ARG_BIAS] = as_memory(g.bias(), bias.value());
    fwd.run("conv2d", std::move(args));

    // The op's name tells the kinds apart in a profile (op_profile.h).
    const char* name = g.groups == 1                          ? "conv2d"
                       : g.groups == g.cin && g.cout == g.cin ? "conv2d depthwise"
                                                              : "conv2d grouped";
    return make_result(y, name, {x, weight, bias}, [x, weight, bias, kernel_weights, &prims](const Tensor& dy) {
        if (x.requires_grad()) x.accumulate_grad(backward_data(prims, dy, kernel_weights, x.shape()));
        // One pass gives both dW and db; it runs if either is wanted.
        if (weight.requires_grad() || bias.requires_grad()) {
            Tensor dw = Tensor::empty(weight.shape());
            Tensor db = bias.defined() ? Tensor::empty(bias.shape()) : Tensor();
            backward_weights(prims, dy, x.value(), dw, db);
            weight.accumulate_grad(dw);
            if (bias.defined()) bias.accumulate_grad(db);
        }
    });
}

Conv2dImplNames conv2d_impl_names(const Shape& x, const Shape& weight, bool has_bias, const Conv2dParams& p) {
    const ConvGeometry g = conv_geometry(x, weight, has_bias, p);
    if (g.pointwise()) return {kPointwiseImplName, kPointwiseImplName, kPointwiseImplName};
    ConvPrimitives& prims = primitives_for(g);
    return {prims.forward().pd.impl_info_str(), prims.backward_data().pd.impl_info_str(),
            prims.weights_by_loop() ? kDepthwiseWeightsImplName : prims.backward_weights().pd.impl_info_str()};
}

}  // namespace hfq
