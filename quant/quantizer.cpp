#include "quant/quantizer.h"

#include <cmath>
#include <limits>
#include <map>

#include "engine/check.h"
#include "quant/learnable_po2.h"
#include "quant/lsq.h"
#include "quant/msqe_baseline.h"
#include "quant/msqe_po2.h"

namespace hfq::quant {
namespace {

void check_options(const std::string& method, const QuantizerOptions& o) {
    const std::string who = "quantizer " + method;
    HFQ_CHECK(o.baseline_iters >= 1, who, ": baseline_iters must be >= 1, got ", o.baseline_iters);
    HFQ_CHECK(o.lls_iters >= 0, who, ": lls_iters must be >= 0, got ", o.lls_iters);
    HFQ_CHECK(!o.line_search || (o.line_search_range >= 2 && o.line_search_range <= kMaxLineSearchRange), who,
              ": line_search_range must be in 2..", kMaxLineSearchRange, " (offsets -range/2..range/2), got ",
              o.line_search_range);
    HFQ_CHECK(o.second_moments_decay >= 0 && o.second_moments_decay < 1, who,
              ": second_moments_decay must be in [0, 1), got ", o.second_moments_decay);
    HFQ_CHECK(o.stable_decay >= 0 && o.stable_decay < 1, who, ": stable_decay must be in [0, 1), got ", o.stable_decay);
    HFQ_CHECK(o.outlier_sigma > 0, who, ": outlier_sigma must be > 0, got ", o.outlier_sigma);
    HFQ_CHECK(o.min_init_scale > 0, who, ": min_init_scale must be > 0, got ", o.min_init_scale);
}

Tensor relu_copy(const Tensor& w) {
    Tensor x = Tensor::empty(w.shape());
    const float* src = w.f32();
    float* dst = x.f32();
    for (int64_t i = 0, n = w.numel(); i < n; ++i) dst[i] = src[i] > 0 ? src[i] : 0.0f;
    return x;
}

}  // namespace

ExponentRounding parse_exponent_rounding(const std::string& name) {
    if (name == "ceil") return ExponentRounding::ceil;
    if (name == "rint") return ExponentRounding::rint;
    if (name == "msqe-round") return ExponentRounding::msqe_round;
    throw Error(cat("learnable-po2: unknown exponent rounding '", name, "' (valid: ceil, rint, msqe-round)"));
}

const char* exponent_rounding_name(ExponentRounding r) {
    switch (r) {
        case ExponentRounding::ceil: return "ceil";
        case ExponentRounding::rint: return "rint";
        case ExponentRounding::msqe_round: return "msqe-round";
    }
    return "?";
}

Quantizer::Quantizer(std::string method, const QuantizerOptions& options, const Shape& weight_shape)
    : method_(std::move(method)), options_(options), shape_(weight_shape) {
    grid_ = make_grid(options.bits, options.is_signed, who().c_str());
    groups_ = scale_groups(weight_shape, options.per_channel, who().c_str());
    check_options(method_, options);
}

const float* Quantizer::element_weights(const Tensor& x, const std::vector<double>* thresholds) {
    const bool use_m = second_moments_.defined();
    if (!use_m && !thresholds) return nullptr;
    weights_buffer_.resize(x.numel());
    const float* px = x.f32();
    const float* pm = use_m ? second_moments_.f32() : nullptr;
    float* w = weights_buffer_.data();
    for_each_group(groups_, [&](int64_t gi) {
        const int64_t off = gi * groups_.size;
        const double limit = thresholds ? (*thresholds)[gi] : std::numeric_limits<double>::infinity();
        group_element_weights(px + off, pm ? pm + off : nullptr, options_.sqrt_second_moments, limit, groups_.size,
                              w + off);
    });
    return w;
}

Variable Quantizer::fake_quantize(const Variable& weight, bool training) {
    HFQ_CHECK(weight.defined(), who(), ": fake_quantize got an undefined weight");
    const Tensor& w = weight.value();
    HFQ_CHECK(w.dtype() == DType::f32, who(), ": weights must be f32, got ", dtype_name(w.dtype()));
    HFQ_CHECK(w.shape() == shape_, who(), ": weight of shape ", shape_str(w.shape()),
              " but the quantizer was built for ", shape_str(shape_));
    const Tensor x = grid_.is_signed ? w : relu_copy(w);
    refuse_non_finite(x);

    ScaleChoice choice = choose_scales(x, training);
    if (choice.code_scale.empty()) choice.code_scale = choice.scale;
    std::vector<PassStats> stats;
    Tensor y = quantize_groups(x, choice, training, stats);
    pass_exponents_ = choice.exponent;
    if (training) {
        track(choice, stats);
        step_.data<int64_t>()[0] += 1;
        initialized_.data<int32_t>()[0] = 1;
    }

    // The backward: straight-through to the weights, M update, scale gradient.
    const Variable param = scale_parameter();
    std::vector<double> factor(groups_.count, 0.0);
    if (param.defined())
        for (int64_t gi = 0; gi < groups_.count; ++gi) factor[gi] = scale_gradient_factor(gi, choice.scale[gi]);
    const bool update_m = training && second_moments_.defined();
    std::vector<Variable> inputs{weight};
    if (param.defined()) inputs.push_back(param);
    auto backward = [this, weight, param, x, scales = std::move(choice.scale), factor, update_m](const Tensor& dy) {
        backward_groups(dy, weight, param, x, scales, factor, update_m);
    };
    return make_result(y, "fake_quantize " + method_, inputs, backward);
}

void Quantizer::refuse_non_finite(const Tensor& x) const {
    const float* px = x.f32();
    std::vector<int64_t> bad(groups_.count);
    for_each_group(groups_, [&](int64_t gi) { bad[gi] = count_non_finite(px + gi * groups_.size, groups_.size); });
    for (int64_t gi = 0; gi < groups_.count; ++gi)
        HFQ_CHECK(bad[gi] == 0, who(), ": the weights of scale group ", gi, " contain NaN or infinity");
}

Tensor Quantizer::quantize_groups(const Tensor& x, const ScaleChoice& choice, bool training,
                                  std::vector<PassStats>& stats) {
    Tensor y = Tensor::empty(shape_);
    if (training) last_codes_.resize(x.numel());
    int16_t* codes = training ? last_codes_.data() : nullptr;
    const bool compare = training && have_codes_;
    stats.assign(groups_.count, PassStats{});
    const float* px = x.f32();
    float* py = y.f32();
    const Rounding rounding = code_rounding();
    for_each_group(groups_, [&](int64_t gi) {
        const int64_t off = gi * groups_.size;
        stats[gi] = quantize_group(px + off, py + off, codes ? codes + off : nullptr, compare, groups_.size,
                                   choice.code_scale[gi], choice.scale[gi], grid_, rounding);
    });
    for (int64_t gi = 0; gi < groups_.count; ++gi)
        HFQ_CHECK(std::isfinite(stats[gi].error), who(), ": quantizing scale group ", gi, " at scale ",
                  choice.scale[gi], " gives non-finite values (scale out of float range)");
    return y;
}

void Quantizer::backward_groups(const Tensor& dy, const Variable& weight, const Variable& param, const Tensor& x,
                                const std::vector<float>& scales, const std::vector<double>& factor, bool update_m) {
    HFQ_CHECK(dy.shape() == shape_, who(), ": backward got a gradient of shape ", shape_str(dy.shape()),
              " for weights of shape ", shape_str(shape_));
    HFQ_CHECK(dy.dtype() == DType::f32, who(), ": backward got a ", dtype_name(dy.dtype()), " gradient");
    HFQ_CHECK(!update_m || !pending_, who(),
              ": a training backward while a deferred second-moment gradient is pending "
              "(call apply_second_moments() after each backward)");
    if (update_m && defer_m_) {
        // On the signed grid x is the weights' own tensor, which may change
        // before apply (unsigned: a ReLU copy only the closure holds).
        pending_ = PendingSecondMoments{dy.clone(), grid_.is_signed ? x.clone() : x, scales};
        update_m = false;
    }
    Tensor dx = weight.requires_grad() ? Tensor::empty(shape_) : Tensor();
    const bool want_param = param.requires_grad();
    // Raw pointers are taken here: nothing may throw inside the parallel loop.
    const float* px = x.f32();
    const float* pdy = dy.f32();
    float* pdx = dx.defined() ? dx.f32() : nullptr;
    float* pm = update_m ? second_moments_.f32() : nullptr;
    std::vector<double> sums(groups_.count, 0.0);
    for_each_group(groups_, [&](int64_t gi) {
        const int64_t off = gi * groups_.size;
        BackwardGroup b;
        b.x = px + off;
        b.grad = pdy + off;
        b.dx = pdx ? pdx + off : nullptr;
        b.second_moments = pm ? pm + off : nullptr;
        b.decay = options_.second_moments_decay;
        b.identity_ste = identity_ste();
        b.want_scale_sum = want_param;
        sums[gi] = backward_group(b, groups_.size, scales[gi], grid_);
    });
    if (dx.defined()) weight.accumulate_grad(dx);
    if (want_param) {
        Tensor dp = Tensor::empty({groups_.count});
        for (int64_t gi = 0; gi < groups_.count; ++gi) dp.f32()[gi] = float(factor[gi] * sums[gi]);
        param.accumulate_grad(dp);
    }
}

void Quantizer::apply_second_moments() {
    if (!pending_) return;
    const Tensor& g = pending_->grad;
    HFQ_CHECK(g.defined() && g.dtype() == DType::f32 && g.shape() == shape_, who(),
              ": apply_second_moments: the pending gradient must stay f32 of shape ", shape_str(shape_));
    const PendingSecondMoments p = std::move(*pending_);
    pending_.reset();
    // backward_groups' M update alone: backward_group computes it element by
    // element whatever else it is asked for.
    const float* px = p.x.f32();
    const float* pg = p.grad.f32();
    float* pm = second_moments_.f32();
    for_each_group(groups_, [&](int64_t gi) {
        const int64_t off = gi * groups_.size;
        BackwardGroup b;
        b.x = px + off;
        b.grad = pg + off;
        b.second_moments = pm + off;
        b.decay = options_.second_moments_decay;
        b.identity_ste = identity_ste();
        backward_group(b, groups_.size, p.scales[gi], grid_);
    });
}

Quantizer::IntegerForm Quantizer::integer_form(const Tensor& weight) {
    HFQ_CHECK(weight.defined() && weight.dtype() == DType::f32 && weight.shape() == shape_, who(),
              ": integer_form needs f32 weights of shape ", shape_str(shape_));
    const Tensor x = grid_.is_signed ? weight : relu_copy(weight);
    for (int64_t i = 0, n = x.numel(); i < n; ++i)
        HFQ_CHECK(std::isfinite(x.f32()[i]), who(), ": integer_form: the weights contain NaN or infinity");
    ScaleChoice choice = choose_scales(x, /*training=*/false);
    if (choice.code_scale.empty()) choice.code_scale = choice.scale;
    IntegerForm out;
    out.codes.resize(x.numel());
    std::vector<float> y(groups_.size);
    for (int64_t gi = 0; gi < groups_.count; ++gi) {  // the same pass as fake_quantize's
        const int64_t off = gi * groups_.size;
        quantize_group(x.f32() + off, y.data(), out.codes.data() + off, false, groups_.size, choice.code_scale[gi],
                       choice.scale[gi], grid_, code_rounding());
    }
    out.scale = std::move(choice.scale);
    out.exponent = std::move(choice.exponent);
    return out;
}

void Quantizer::track(const ScaleChoice& choice, const std::vector<PassStats>& stats) {
    if (flips_.empty()) flips_.assign(groups_.count, 0);
    if (!last_exponents_.empty())
        for (size_t gi = 0; gi < choice.exponent.size(); ++gi) flips_[gi] += choice.exponent[gi] != last_exponents_[gi];
    last_exponents_ = choice.exponent;
    last_scales_ = choice.scale;
    PassStats total;
    for (const PassStats& s : stats) {  // in group order: the same sum at any thread count
        total.error += s.error;
        total.clipped += s.clipped;
        total.changed += s.changed;
    }
    last_pass_ = total;
    have_changed_ = have_codes_;
    have_codes_ = true;
    have_pass_ = true;
}

QuantizerDiagnostics Quantizer::report() {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double n = double(shape_numel(shape_));
    QuantizerDiagnostics d;
    d.method = method_;
    d.step = step();
    d.exponents = last_exponents_;
    d.scales = last_scales_;
    d.flips_per_group = flips_.empty() ? std::vector<int64_t>(groups_.count, 0) : flips_;
    for (int64_t f : d.flips_per_group) d.flips += f;
    d.error_per_element = have_pass_ ? last_pass_.error / n : nan;
    d.clipped_fraction = have_pass_ ? double(last_pass_.clipped) / n : nan;
    d.codes_changed_fraction = have_changed_ ? double(last_pass_.changed) / n : nan;
    describe(d);
    flips_.assign(groups_.count, 0);
    return d;
}

std::vector<std::pair<std::string, Tensor*>> Quantizer::named_buffers() {
    std::vector<std::pair<std::string, Tensor*>> out{{"step", &step_}, {"initialized", &initialized_}};
    if (second_moments_.defined()) out.emplace_back("second_moment", &second_moments_);
    add_buffers(out);
    return out;
}

NamedTensors Quantizer::state() const {
    NamedTensors out;
    // named_buffers() hands out writable slots; here they are only copied.
    for (const auto& [name, t] : const_cast<Quantizer*>(this)->named_buffers()) out.emplace_back(name, t->clone());
    return out;
}

void Quantizer::load_state(const NamedTensors& tensors) {
    std::map<std::string, Tensor> given;
    for (const auto& [name, t] : tensors)
        HFQ_CHECK(given.emplace(name, t).second, who(), ": load_state got tensor '", name, "' twice");
    const auto slots = named_buffers();
    std::string known;
    for (const auto& [name, slot] : slots) known += (known.empty() ? "" : ", ") + name;
    // Check everything before changing anything.
    for (const auto& [name, slot] : slots) {
        auto it = given.find(name);
        HFQ_CHECK(it != given.end(), who(), ": load_state is missing tensor '", name, "'");
        const Tensor& t = it->second;
        HFQ_CHECK(t.defined() && t.dtype() == slot->dtype() && t.shape() == slot->shape(), who(), ": load_state: '",
                  name, "' should be ", dtype_name(slot->dtype()), " ", shape_str(slot->shape()), ", got ",
                  t.defined() ? dtype_name(t.dtype()) : "undefined", " ", shape_str(t.shape()));
    }
    for (const auto& [name, t] : given) {
        bool found = false;
        for (const auto& slot : slots) found = found || slot.first == name;
        HFQ_CHECK(found, who(), ": load_state got unknown tensor '", name, "' (expected: ", known, ")");
    }
    HFQ_CHECK(given.at("step").data<int64_t>()[0] >= 0, who(), ": load_state: negative step");
    for (const auto& [name, slot] : slots) slot->copy_from(given.at(name));
    pending_.reset();  // it belonged to the M just replaced
    reset_diagnostics();
}

void Quantizer::reset_diagnostics() {
    last_exponents_.clear();
    last_scales_.clear();
    flips_.clear();
    last_codes_.clear();
    have_codes_ = have_pass_ = have_changed_ = false;
}

void Quantizer::set_stable_updating(bool) {
    throw Error(cat(who(), ": has no stable exponent (it is an option of msqe-po2: stable_scale)"));
}
void Quantizer::set_stable_switched(bool) {
    throw Error(cat(who(), ": has no stable exponent (it is an option of msqe-po2: stable_scale)"));
}

const std::vector<std::string>& quantizer_methods() {
    static const std::vector<std::string> names{"msqe-baseline", "msqe-po2", "learnable-po2", "lsq"};
    return names;
}

std::unique_ptr<Quantizer> make_quantizer(const std::string& method, const QuantizerOptions& options,
                                          const Shape& weight_shape) {
    if (method == "msqe-baseline") return std::make_unique<MsqeBaselineQuantizer>(options, weight_shape);
    if (method == "msqe-po2") return std::make_unique<MsqePo2Quantizer>(options, weight_shape);
    if (method == "learnable-po2") return std::make_unique<LearnablePo2Quantizer>(options, weight_shape);
    if (method == "lsq") return std::make_unique<LsqQuantizer>(options, weight_shape);
    std::string known;
    for (const std::string& m : quantizer_methods()) known += (known.empty() ? "" : ", ") + m;
    throw Error(cat("make_quantizer: unknown method '", method, "' (valid: ", known, ")"));
}

}  // namespace hfq::quant
