#include "quant/quantize_model.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "engine/check.h"
#include "layers/activation.h"
#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "layers/linear.h"
#include "layers/mobilenet_v2.h"
#include "layers/pooling.h"
#include "layers/sequential.h"
#include "quant/activation_quantizer.h"
#include "quant/folded_conv_bn.h"
#include "quant/quantized_layers.h"

namespace hfq::quant {
namespace {

void check_bits(const char* field, int bits, bool zero_allowed) {
    HFQ_CHECK((zero_allowed && bits == 0) || (bits >= 2 && bits <= 8), "quant policy: ", field, " must be ",
              zero_allowed ? "0 (off / same) or " : "", "in 2..8, got ", bits);
}

// A Conv2d or Linear that quantize_model wraps: its parent and its name there.
struct Site {
    Module* parent;
    std::string name;
    std::shared_ptr<Module> layer;
    std::string bn_name;  // the following BatchNorm2d to fold with ("" = none)
};

// Depth-first, in model order (the order of named_modules / state_dict).
void collect_sites(Module& m, bool fold, std::vector<Site>& sites, std::vector<Site>& activations) {
    const auto& children = m.children();
    for (size_t i = 0; i < children.size(); ++i) {
        const Module::Child& c = children[i];
        Module* child = c.module.get();
        if (auto* conv = dynamic_cast<Conv2d*>(child)) {
            Site s{&m, c.name, c.module, ""};
            if (fold && !conv->bias().defined() && i + 1 < children.size() &&
                dynamic_cast<BatchNorm2d*>(children[i + 1].module.get()))
                s.bn_name = children[i + 1].name;
            sites.push_back(s);
        } else if (dynamic_cast<Linear*>(child)) {
            sites.push_back({&m, c.name, c.module, ""});
        } else if (dynamic_cast<ReLU*>(child) || dynamic_cast<ReLU6*>(child) || dynamic_cast<GlobalAvgPool*>(child)) {
            activations.push_back({&m, c.name, c.module, ""});
        } else {
            collect_sites(*child, fold, sites, activations);
        }
    }
}

// W4A8: puts a quantizer on every tensor that enters a convolution or the
// classifier, walking the network in the order its forward runs (the
// children of the model, of a Sequential and of an InvertedResidual in
// order; the activations and the pooling are wrapped already). `grid` is
// the quantizer of the tensor the walk is at (null before the first layer:
// the image), `pending` the wrapped layer whose float output it is, if that
// output is not quantized yet. A tensor used as it is (by a layer, the
// pooling or a residual sum) is quantized where it is produced, signed: the
// image at the first layer, a linear bottleneck at its layer's output.
struct GridWalk {
    const QuantPolicy& policy;
    ActivationQuantizer* grid = nullptr;
    QuantizedModule* pending = nullptr;

    std::shared_ptr<ActivationQuantizer> signed_quantizer() const {
        return std::make_shared<ActivationQuantizer>(policy.activation_bits, policy.options.rounding,
                                                     policy.options.min_init_scale, /*is_signed=*/true);
    }
    // The tensor the walk is at, as a code tensor.
    void quantize_pending() {
        if (!pending) return;
        auto q = signed_quantizer();
        grid = q.get();
        pending->set_output_quantizer(std::move(q));
        pending = nullptr;
    }
    void layer(QuantizedModule& m, const std::string& name) {
        quantize_pending();
        if (grid) {
            m.set_input_grid(grid);
        } else {
            m.set_input_quantizer(signed_quantizer());
            grid = m.input_quantizer();
        }
        check_exact_sums(m, name);
        pending = &m;
        grid = nullptr;
    }
    // The fake-quant graph's float32 sums of a convolution are exact if no
    // partial sum can reach 2^24 units of its accumulator (quant/accumulator.h):
    // n products of at most max|c_x| max|c_w|, n = the reduction length. The
    // bias adds to it; the export checks the sum with the trained biases.
    // The classifier evaluates with exact_linear and needs no bound.
    void check_exact_sums(QuantizedModule& m, const std::string& name) const {
        Conv2d* conv = nullptr;
        if (auto* f = dynamic_cast<FoldedConvBn*>(&m)) conv = &f->conv();
        if (auto* qc = dynamic_cast<QuantizedConv2d*>(&m)) conv = &qc->layer();
        if (!conv) return;
        const Tensor& w = conv->weight().value();
        const Grid& gx = m.input_grid()->grid();
        const Grid& gw = m.quantizer().grid();
        const double bound = double(w.numel() / w.dim(0)) * std::max(gx.qn, gx.qp) * std::max(gw.qn, gw.qp);
        HFQ_CHECK(bound < 16777216.0, "quantize_model: layer '", name, "': ", w.numel() / w.dim(0),
                  " products of codes up to ", std::max(gx.qn, gx.qp), " x ", std::max(gw.qn, gw.qp), " can sum to ",
                  bound, " units, which float32 (24 bits) does not hold exactly: use fewer weight or activation bits");
    }
    void walk(Module& m, const std::string& prefix) {
        for (const Module::Child& c : m.children()) {
            Module* child = c.module.get();
            const std::string name = join_name(prefix, c.name);
            if (auto* q = dynamic_cast<QuantizedModule*>(child)) {
                layer(*q, join_name(name, q->layer_name()));
            } else if (auto* a = dynamic_cast<QuantizedActivation*>(child)) {
                // ReLU / ReLU6 take the float output; the pooling sums codes.
                if (dynamic_cast<GlobalAvgPool*>(&a->activation())) quantize_pending();
                HFQ_CHECK(grid || pending, "quantize_model: '", name, "' has no quantized input");
                pending = nullptr;
                grid = &a->quantizer();
            } else if (dynamic_cast<Dropout*>(child)) {
                // evaluation: the identity
            } else if (auto* block = dynamic_cast<InvertedResidual*>(child)) {
                quantize_pending();
                walk(*block, name);
                quantize_pending();
                if (block->uses_residual()) {
                    auto q = signed_quantizer();
                    grid = q.get();
                    block->set_after_add(kSumQuantizerName, std::move(q));
                }
            } else if (dynamic_cast<Sequential*>(child)) {
                walk(*child, name);
            } else {
                throw Error(cat("quantize_model: activation quantization does not know how to place quantizers "
                                "around '", name, "' (", child->type_name(), ")"));
            }
        }
    }
};

template <class T>
std::vector<std::pair<std::string, T*>> modules_of(Model& model) {
    std::vector<std::pair<std::string, T*>> out;
    for (auto& [name, m] : model.named_modules())
        if (auto* t = dynamic_cast<T*>(m)) out.emplace_back(name, t);
    return out;
}

}  // namespace

void QuantPolicy::validate() const {
    check_bits("bits", options.bits, false);
    check_bits("first_layer_bits", first_layer_bits, true);
    check_bits("last_layer_bits", last_layer_bits, true);
    check_bits("activation_bits", activation_bits, true);
    HFQ_CHECK(activation_bits == 0 || (fold_bn && method != "lsq"),
              "quant policy: activation quantization (activation_bits ", activation_bits,
              ") is for integer hardware: it needs fold_bn and a power-of-two weight scale (not lsq)");
    HFQ_CHECK(freeze_bn_step >= -1, "quant policy: freeze_bn_step must be >= -1 (-1: never), got ", freeze_bn_step);
    try {
        parse_bn_stats(bn_stats);
    } catch (const Error& e) {
        throw Error(cat("quant policy: ", e.what()));
    }
    make_quantizer(method, options, {1});  // the method name and the quantizer's own option checks
}

std::string QuantPolicy::to_json() const {
    const QuantizerOptions& o = options;
    nlohmann::ordered_json j;
    j["method"] = method;
    j["bits"] = o.bits;
    j["signed"] = o.is_signed;
    j["per_channel"] = o.per_channel;
    j["baseline_iters"] = o.baseline_iters;
    j["lls_iters"] = o.lls_iters;
    j["line_search"] = o.line_search;
    j["line_search_range"] = o.line_search_range;
    j["second_moments"] = o.second_moments;
    j["second_moments_decay"] = o.second_moments_decay;
    j["sqrt_second_moments"] = o.sqrt_second_moments;
    j["outlier_mask"] = o.outlier_mask;
    j["outlier_sigma"] = o.outlier_sigma;
    j["stable_scale"] = o.stable_scale;
    j["stable_decay"] = o.stable_decay;
    j["rounding"] = exponent_rounding_name(o.rounding);
    j["min_init_scale"] = o.min_init_scale;
    j["first_layer_bits"] = first_layer_bits;
    j["last_layer_bits"] = last_layer_bits;
    j["fold_bn"] = fold_bn;
    j["freeze_bn_step"] = freeze_bn_step;
    j["bn_stats"] = bn_stats;
    j["activation_bits"] = activation_bits;
    return j.dump();
}

QuantPolicy QuantPolicy::from_json(const std::string& text) {
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(j.is_object(), "quant policy: not a JSON object: ", text.substr(0, 200));
    QuantPolicy p;
    QuantizerOptions& o = p.options;
    // Policies written before these settings took their command-line names
    // (--fold-bn, --freeze-bn-step, --bn-stats) used the old keys: checkpoints
    // from then still load, with the same meaning.
    static const std::map<std::string, std::string> kOldKeys = {
        {"fold_batch_norm", "fold_bn"}, {"freeze_bn_after_steps", "freeze_bn_step"}, {"batch_statistics", "bn_stats"}};
    for (const auto& [written, v] : j.items()) {
        const auto renamed = kOldKeys.find(written);
        const std::string& key = renamed == kOldKeys.end() ? written : renamed->second;
        auto need = [&, &written = written, &v = v](bool ok, const char* what) {
            HFQ_CHECK(ok, "quant policy: '", written, "' must be ", what, ", got ", v.dump());
        };
        auto integer = [&](auto& field) {
            need(v.is_number_integer(), "an integer");
            field = v.get<std::remove_reference_t<decltype(field)>>();
        };
        auto boolean = [&](bool& field) {
            need(v.is_boolean(), "true or false");
            field = v.get<bool>();
        };
        auto number = [&](float& field) {
            need(v.is_number(), "a number");
            field = v.get<float>();
        };
        if (key == "method") {
            need(v.is_string(), "a string");
            p.method = v.get<std::string>();
        } else if (key == "rounding") {
            need(v.is_string(), "a string");
            o.rounding = parse_exponent_rounding(v.get<std::string>());
        } else if (key == "bits")
            integer(o.bits);
        else if (key == "signed")
            boolean(o.is_signed);
        else if (key == "per_channel")
            boolean(o.per_channel);
        else if (key == "baseline_iters")
            integer(o.baseline_iters);
        else if (key == "lls_iters")
            integer(o.lls_iters);
        else if (key == "line_search")
            boolean(o.line_search);
        else if (key == "line_search_range")
            integer(o.line_search_range);
        else if (key == "second_moments")
            boolean(o.second_moments);
        else if (key == "second_moments_decay")
            number(o.second_moments_decay);
        else if (key == "sqrt_second_moments")
            boolean(o.sqrt_second_moments);
        else if (key == "outlier_mask")
            boolean(o.outlier_mask);
        else if (key == "outlier_sigma")
            number(o.outlier_sigma);
        else if (key == "stable_scale")
            boolean(o.stable_scale);
        else if (key == "stable_decay")
            number(o.stable_decay);
        else if (key == "min_init_scale")
            number(o.min_init_scale);
        else if (key == "first_layer_bits")
            integer(p.first_layer_bits);
        else if (key == "last_layer_bits")
            integer(p.last_layer_bits);
        else if (key == "fold_bn")
            boolean(p.fold_bn);
        else if (key == "freeze_bn_step")
            integer(p.freeze_bn_step);
        else if (key == "bn_stats") {
            need(v.is_string(), "a string");
            p.bn_stats = v.get<std::string>();
        } else if (key == "activation_bits")
            integer(p.activation_bits);
        else
            throw Error(cat("quant policy: unknown key '", written, "'"));
    }
    p.validate();
    return p;
}

bool is_quantized(Model& model) {
    return !modules_of<QuantizedModule>(model).empty() || !modules_of<QuantizedActivation>(model).empty();
}

void quantize_model(Model& model, const QuantPolicy& policy) {
    policy.validate();
    HFQ_CHECK(!is_quantized(model), "quantize_model: the model is already quantized");
    std::vector<Site> sites, activations;
    collect_sites(model, policy.fold_bn, sites, activations);
    HFQ_CHECK(!sites.empty(), "quantize_model: the model has no Conv2d or Linear layer to quantize");

    // First conv and last linear (the classifier) may get their own bits.
    const Site* first = nullptr;
    const Site* last = nullptr;
    for (const Site& s : sites) {
        if (!first && dynamic_cast<Conv2d*>(s.layer.get())) first = &s;
        if (dynamic_cast<Linear*>(s.layer.get())) last = &s;
    }
    // Every quantizer is made (and so checked) before the model is changed.
    std::vector<std::unique_ptr<Quantizer>> quantizers;
    for (const Site& s : sites) {
        QuantizerOptions o = policy.options;
        if (&s == first && policy.first_layer_bits) o.bits = policy.first_layer_bits;
        if (&s == last && policy.last_layer_bits) o.bits = policy.last_layer_bits;
        const Shape shape = dynamic_cast<Conv2d*>(s.layer.get())
                                ? std::static_pointer_cast<Conv2d>(s.layer)->weight().shape()
                                : std::static_pointer_cast<Linear>(s.layer)->weight().shape();
        quantizers.push_back(make_quantizer(policy.method, o, shape));
    }
    for (size_t k = 0; k < sites.size(); ++k) {
        const Site& s = sites[k];
        if (auto conv = std::dynamic_pointer_cast<Conv2d>(s.layer)) {
            if (!s.bn_name.empty()) {
                auto bn = std::dynamic_pointer_cast<BatchNorm2d>(s.parent->child(s.bn_name));
                s.parent->replace_children(
                    {s.name, s.bn_name},
                    std::make_shared<FoldedConvBn>(conv, s.name, bn, s.bn_name, std::move(quantizers[k]),
                                                   policy.freeze_bn_step, parse_bn_stats(policy.bn_stats)));
            } else {
                s.parent->replace_child(s.name, std::make_shared<QuantizedConv2d>(conv, std::move(quantizers[k])));
            }
        } else {
            s.parent->replace_child(s.name, std::make_shared<QuantizedLinear>(std::static_pointer_cast<Linear>(s.layer),
                                                                              std::move(quantizers[k])));
        }
    }
    if (policy.activation_bits > 0) {
        for (const Site& s : activations)
            s.parent->replace_child(s.name, std::make_shared<QuantizedActivation>(
                                                s.layer, std::make_shared<ActivationQuantizer>(
                                                             policy.activation_bits, policy.options.rounding,
                                                             policy.options.min_init_scale)));
        GridWalk{policy}.walk(model, "");
    }
}

std::vector<QuantizedLayer> quantized_layers(Model& model) {
    std::vector<QuantizedLayer> out;
    std::set<Quantizer*> seen;  // a folded pair's inner Quantized<Conv2d> is the pair's layer
    for (auto& [name, m] : modules_of<QuantizedModule>(model)) {
        Quantizer* q = &m->quantizer();
        if (!seen.insert(q).second) continue;
        out.push_back({join_name(name, m->layer_name()), m->kind(), q, m});
    }
    return out;
}

std::vector<QuantizedActivationSite> quantized_activations(Model& model) {
    std::vector<QuantizedActivationSite> out;
    for (auto& [name, m] : model.named_modules()) {
        if (auto* a = dynamic_cast<QuantizedActivation*>(m)) out.push_back({name, &a->quantizer(), "activation", name});
        if (auto* e = dynamic_cast<ActivationEnds*>(m)) {
            const auto* q = dynamic_cast<QuantizedModule*>(m);
            const std::string layer = join_name(name, q ? q->layer_name() : "");
            if (e->input_quantizer()) out.push_back({join_name(name, ActivationEnds::kInputName), e->input_quantizer(), "input", layer});
            if (e->output_quantizer())
                out.push_back({join_name(name, ActivationEnds::kOutputName), e->output_quantizer(), "output", layer});
        }
        if (auto* b = dynamic_cast<InvertedResidual*>(m); b && b->after_add())
            if (auto* q = dynamic_cast<ActivationQuantizer*>(b->after_add()))
                out.push_back({join_name(name, kSumQuantizerName), q, "sum", name});
    }
    return out;
}

std::vector<DeadChannels> zero_dead_channels(Model& model) {
    std::vector<DeadChannels> out;
    for (auto& [name, m] : modules_of<FoldedConvBn>(model)) {
        BatchNorm2d& bn = m->bn();
        Tensor& w = m->conv().weight().value();  // {O, I/g, k, k}: a channel's weights are contiguous
        const int64_t channels = bn.channels(), per_channel = w.numel() / channels;
        DeadChannels d{join_name(name, m->layer_name()), channels, {}};
        for (int64_t c = 0; c < channels; ++c) {
            if (!(bn.running_var().f32()[c] < 1e-6f * bn.eps())) continue;
            std::fill_n(w.f32() + c * per_channel, per_channel, 0.0f);
            bn.running_mean().f32()[c] = 0.0f;
            d.dead.push_back(c);
        }
        if (!d.dead.empty()) out.push_back(std::move(d));
    }
    return out;
}

void freeze_batch_norm(Model& model, bool frozen) {
    for (auto& [name, m] : modules_of<FoldedConvBn>(model)) m->freeze(frozen);
}

namespace {
void set_stable(Model& model, bool on, bool switched) {
    int count = 0;
    for (const QuantizedLayer& l : quantized_layers(model)) {
        if (!l.quantizer->has_stable_scale()) continue;
        if (switched)
            l.quantizer->set_stable_switched(on);
        else
            l.quantizer->set_stable_updating(on);
        ++count;
    }
    HFQ_CHECK(count > 0, "set_stable_", switched ? "switched" : "updating",
              ": no quantizer of the model keeps a stable exponent (msqe-po2 with the stable_scale option)");
}
}  // namespace

void set_stable_updating(Model& model, bool on) { set_stable(model, on, false); }
void set_stable_switched(Model& model, bool on) { set_stable(model, on, true); }

void reset_diagnostics(Model& model) {
    for (const QuantizedLayer& l : quantized_layers(model)) l.quantizer->reset_diagnostics();
    for (const QuantizedActivationSite& a : quantized_activations(model)) a.quantizer->reset_diagnostics();
}

}  // namespace hfq::quant
