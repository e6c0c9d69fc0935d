#include "quant/export.h"

#include <cmath>
#include <map>
#include <set>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "engine/check.h"
#include "engine/ops.h"
#include "layers/linear.h"
#include "layers/mobilenet_v2.h"
#include "quant/accumulator.h"
#include "quant/activation_quantizer.h"
#include "quant/folded_conv_bn.h"
#include "quant/quantized_layers.h"

namespace hfq::quant {
namespace {

// "features.3.0" -> {"features.3", "0"}; "classifier" -> {"", "classifier"}
std::pair<std::string, std::string> split_name(const std::string& name) {
    const size_t dot = name.rfind('.');
    if (dot == std::string::npos) return {"", name};
    return {name.substr(0, dot), name.substr(dot + 1)};
}

nlohmann::json export_metadata(const SafetensorsFile& file) {
    auto it = file.metadata.find(kExportKey);
    HFQ_CHECK(it != file.metadata.end(), file.source, ": not an hfq export (no '", kExportKey, "' metadata)");
    nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(j.is_object(), file.source, ": metadata '", kExportKey, "' is not a JSON object");
    const std::string format = j.value("format", "");
    HFQ_CHECK(format == kExportFormat || format == kExportFormatV1, file.source, ": export format '", format,
              "' is not one this hfq reads (", kExportFormatV1, ", ", kExportFormat, ")");
    HFQ_CHECK(j.contains("layers") && j["layers"].is_array() && j.contains("activations") &&
                  j["activations"].is_array(),
              file.source, ": metadata '", kExportKey, "' is not a valid ", format, " description");
    return j;
}

template <class T>
T field(const nlohmann::json& entry, const char* key, const std::string& source) {
    HFQ_CHECK(entry.contains(key), source, ": export layer entry without '", key, "': ", entry.dump());
    try {
        return entry.at(key).get<T>();
    } catch (const std::exception&) {
        throw Error(cat(source, ": export layer entry has a bad '", key, "': ", entry.dump()));
    }
}

const nlohmann::json& layer_entry(const nlohmann::json& meta, const std::string& name, const std::string& source) {
    for (const nlohmann::json& e : meta["layers"])
        if (e.is_object() && e.value("name", "") == name) return e;
    throw Error(cat(source, ": the export has no layer '", name, "'"));
}

}  // namespace

LayerTensors layer_tensors(const QuantizedLayer& layer) {
    NoGradGuard no_grad;
    LayerTensors t;
    if (auto* folded = dynamic_cast<FoldedConvBn*>(layer.module)) {
        t.weight = folded->folded_weight().value();
        t.bias = folded->folded_bias().value();
        t.conv = &folded->conv();
        t.batch_norm = split_name(layer.name).first;
        t.batch_norm = t.batch_norm.empty() ? folded->bn_name() : t.batch_norm + "." + folded->bn_name();
    } else if (auto* qc = dynamic_cast<QuantizedConv2d*>(layer.module)) {
        t.weight = qc->layer().weight().value();
        t.bias = qc->layer().bias().defined() ? qc->layer().bias().value() : Tensor::zeros({t.weight.dim(0)});
        t.conv = &qc->layer();
    } else if (auto* ql = dynamic_cast<QuantizedLinear*>(layer.module)) {
        t.weight = ql->layer().weight().value();
        t.bias = ql->layer().bias().defined() ? ql->layer().bias().value() : Tensor::zeros({t.weight.dim(0)});
    } else {
        throw Error(cat("export: layer '", layer.name, "' is of an unknown wrapper type"));
    }
    t.integer = layer.quantizer->integer_form(t.weight);
    // W4A8: the bias as the evaluation graph adds it, on the accumulator grid.
    t.input_grid = layer.module->input_grid();
    if (t.input_grid) {
        HFQ_CHECK(!t.integer.exponent.empty(), "export: layer '", layer.name, "' has no power-of-two scale");
        const int e_x = t.input_grid->exponent();
        // The exponents the layer accumulates with (an all-zero group's raised), stored as its exponents.
        t.integer.exponent = accumulator_weight_exponents(
            e_x, t.integer.exponent, layer.quantizer->fake_quantize(Variable(t.weight), false).value(), t.bias);
        const int64_t out = t.bias.numel();
        for (int64_t c = 0; c < out; ++c) {
            const int u = e_x + t.integer.exponent[t.integer.exponent.size() == 1 ? 0 : c];
            t.bias_code.push_back(bias_code(t.bias.f32()[c], u));
            t.bias.f32()[c] = float(std::ldexp(double(t.bias_code.back()), u));
        }
    }
    return t;
}

namespace {

using NamedTensorList = std::vector<std::pair<std::string, Tensor>>;

// A wrapped layer's tensors: "<layer>.q" (the int8 codes), "<layer>.exp" (s32
// exponents, power-of-two methods) or "<layer>.scale" (f32), "<layer>.bias".
void add_layer_tensors(const std::string& path, const QuantizedLayer& l, const LayerTensors& t,
                       NamedTensorList& tensors) {
    Tensor codes = Tensor::empty(t.weight.shape(), DType::s8);
    for (size_t i = 0; i < t.integer.codes.size(); ++i) {
        const int16_t c = t.integer.codes[i];
        HFQ_CHECK(c >= -128 && c <= 127, "export ", path, ": layer '", l.name, "' has the code ", c,
                  ", which does not fit int8 (an unsigned 8-bit grid)");
        codes.data<int8_t>()[i] = static_cast<int8_t>(c);
    }
    tensors.emplace_back(l.name + ".q", codes);
    if (!t.integer.exponent.empty()) {
        Tensor e = Tensor::empty({int64_t(t.integer.exponent.size())}, DType::s32);
        std::copy(t.integer.exponent.begin(), t.integer.exponent.end(), e.data<int32_t>());
        tensors.emplace_back(l.name + ".exp", e);
    } else {
        const int64_t groups = int64_t(t.integer.scale.size());
        tensors.emplace_back(l.name + ".scale", Tensor::from_vector({groups}, t.integer.scale));
    }
    tensors.emplace_back(l.name + ".bias", t.bias.clone());
    if (!t.bias_code.empty()) {
        Tensor b = Tensor::empty({int64_t(t.bias_code.size())}, DType::s32);
        std::copy(t.bias_code.begin(), t.bias_code.end(), b.data<int32_t>());
        tensors.emplace_back(l.name + ".bias_code", b);
    }
}

// W4A8: the largest |partial sum| of a layer's accumulator, in units of
// 2^(e_x + exp[c]), whatever the order of the sum: over output channels c,
// max|c_x| sum_k |code[c, k]| + |bias_code[c]|. Below 2^24, float32 holds
// every partial sum of the fake-quant graph exactly (and int32 the integer
// engine's); the classifier, evaluated with exact_linear (double), needs
// only int32's 2^31. Refuses the export naming the layer otherwise.
double accumulator_bound(const std::string& path, const QuantizedLayer& l, const LayerTensors& t) {
    const Grid& g = t.input_grid->grid();
    const int64_t out = t.weight.dim(0), per = t.weight.numel() / out;
    double bound = 0;
    for (int64_t c = 0; c < out; ++c) {
        double codes = 0;
        for (int64_t k = 0; k < per; ++k) codes += std::abs(t.integer.codes[c * per + k]);
        bound = std::max(bound, double(std::max(g.qn, g.qp)) * codes + std::abs(double(t.bias_code[c])));
    }
    const double limit = t.conv ? 16777216.0 : 2147483647.0;
    HFQ_CHECK(bound < limit, "export ", path, ": layer '", l.name, "' could accumulate ", bound,
              " units, beyond the ", t.conv ? "2^24 float32 holds exactly" : "int32 range",
              " (too large a bias or too many bits)");
    return bound;
}

// A wrapped layer's metadata entry: how its quantizer was set and, for a
// convolution, its geometry.
nlohmann::json layer_metadata(const std::string& path, const QuantizedLayer& l, const LayerTensors& t,
                              const std::map<const ActivationQuantizer*, std::string>& site_names) {
    const Quantizer& q = *l.quantizer;
    nlohmann::json e;
    e["name"] = l.name;
    e["kind"] = l.kind;
    e["op"] = t.conv ? "conv" : "linear";
    e["method"] = q.method();
    e["bits"] = q.options().bits;
    e["signed"] = q.options().is_signed;
    e["per_channel"] = q.options().per_channel;
    e["scale"] = t.integer.exponent.empty() ? "real" : "power-of-two";
    e["batch_norm"] = t.batch_norm.empty() ? nlohmann::json(nullptr) : nlohmann::json(t.batch_norm);
    e["input_grid"] = nullptr;
    if (t.input_grid) {
        e["input_grid"] = site_names.at(t.input_grid);
        e["accumulator_bound"] = accumulator_bound(path, l, t);
    }
    if (t.conv) {
        const Conv2dConfig& c = t.conv->config();
        e["kernel"] = c.kernel;
        e["stride"] = c.params.stride;
        e["padding"] = c.params.padding;
        e["same_padding"] = c.params.same_padding;
        e["groups"] = c.params.groups;
    }
    return e;
}

// Each activation quantizer's exponent, "<activation>.exp" (s32 {1}), and
// its metadata entries.
nlohmann::json add_activations(const std::string& path, Model& model, NamedTensorList& tensors) {
    nlohmann::json entries = nlohmann::json::array();
    for (const QuantizedActivationSite& a : quantized_activations(model)) {
        HFQ_CHECK(a.quantizer->initialized(), "export ", path, ": the activation quantizer of '", a.name,
                  "' was never trained, so its exponent is not fixed yet");
        Tensor e = Tensor::empty({1}, DType::s32);
        e.data<int32_t>()[0] = a.quantizer->exponent();
        tensors.emplace_back(a.name + ".exp", e);
        entries.push_back({{"name", a.name},
                           {"bits", a.quantizer->grid().bits},
                           {"signed", a.quantizer->grid().is_signed},
                           {"rounding", exponent_rounding_name(a.quantizer->rounding())},
                           {"site", a.site},
                           {"owner", a.owner}});
    }
    return entries;
}

// Everything else the network needs, under its usual name: the state of
// every module that is not (inside) a quantized wrapper.
void add_unwrapped_state(Model& model, NamedTensorList& tensors) {
    std::set<std::string> wrapped;
    for (auto& [prefix, m] : model.named_modules())
        if (dynamic_cast<QuantizedModule*>(m) || dynamic_cast<QuantizedActivation*>(m) ||
            dynamic_cast<ActivationQuantizer*>(m))
            for (const auto& [name, t] : m->state_dict()) wrapped.insert(join_name(prefix, name));
    for (const auto& [name, t] : model.state_dict())
        if (!wrapped.count(name)) tensors.emplace_back(name, t);
}

}  // namespace

bool is_w4a8_export(const SafetensorsFile& file) {
    const nlohmann::json layers = export_metadata(file).at("layers");
    try {
        return !layers.empty() && std::all_of(layers.begin(), layers.end(),
                                              [](const nlohmann::json& l) { return !l.at("input_grid").is_null(); });
    } catch (const nlohmann::json::exception& e) {  // a layer without "input_grid"
        throw Error(cat(file.source, ": metadata '", kExportKey, "': ", e.what()));
    }
}

void export_quantized_model(const std::string& path, Model& model, const QuantPolicy& policy,
                            const std::optional<Preprocessing>& preprocessing) {
    const auto layers = quantized_layers(model);
    HFQ_CHECK(!layers.empty(), "export ", path, ": the model is not quantized (call quantize_model first)");
    NamedTensorList tensors;
    std::map<const ActivationQuantizer*, std::string> site_names;
    for (const QuantizedActivationSite& a : quantized_activations(model)) site_names[a.quantizer] = a.name;
    nlohmann::json meta_layers = nlohmann::json::array();
    for (const QuantizedLayer& l : layers) {
        const LayerTensors t = layer_tensors(l);
        add_layer_tensors(path, l, t, tensors);
        meta_layers.push_back(layer_metadata(path, l, t, site_names));
    }
    const nlohmann::json meta_acts = add_activations(path, model, tensors);
    add_unwrapped_state(model, tensors);

    std::map<std::string, std::string> metadata{
        {"format", "pt"},
        {kModelConfigKey, model.config().to_json()},
        {kQuantPolicyKey, policy.to_json()},
        {kExportKey,
         nlohmann::json{{"format", kExportFormat}, {"layers", meta_layers}, {"activations", meta_acts}}.dump()}};
    if (preprocessing) metadata[kPreprocessingKey] = preprocessing->to_json();
    write_safetensors(path, tensors, metadata);
}

IntegerLayer::IntegerLayer(const SafetensorsFile& file, const std::string& name) : name_(name) {
    const nlohmann::json meta = export_metadata(file);
    const nlohmann::json& e = layer_entry(meta, name, file.source);
    const std::string op = field<std::string>(e, "op", file.source);
    HFQ_CHECK(op == "conv" || op == "linear", file.source, ": layer '", name, "' has an unknown op '", op, "'");
    is_conv_ = op == "conv";
    codes_ = file.get(name + ".q");
    HFQ_CHECK(codes_.dtype() == DType::s8 && codes_.rank() == (is_conv_ ? 4 : 2), file.source, ": '", name,
              ".q' must be int8 of rank ", is_conv_ ? 4 : 2, ", got ", dtype_name(codes_.dtype()), " ",
              shape_str(codes_.shape()));
    const int64_t out = codes_.dim(0);
    const Grid grid = make_grid(field<int>(e, "bits", file.source), field<bool>(e, "signed", file.source),
                                "export layer");
    for (int64_t i = 0; i < codes_.numel(); ++i) {
        const int c = codes_.data<int8_t>()[i];
        HFQ_CHECK(c >= -grid.qn && c <= grid.qp, file.source, ": '", name, ".q' holds the code ", c, " at element ", i,
                  ", outside its ", grid.bits, "-bit grid [", -grid.qn, ", ", grid.qp, "]");
    }
    if (is_conv_) {
        params_.stride = field<int>(e, "stride", file.source);
        params_.padding = field<int>(e, "padding", file.source);
        params_.same_padding = field<bool>(e, "same_padding", file.source);
        params_.groups = field<int>(e, "groups", file.source);
    }
    const bool po2 = field<std::string>(e, "scale", file.source) == "power-of-two";
    const Tensor& s = file.get(name + (po2 ? ".exp" : ".scale"));
    HFQ_CHECK(s.rank() == 1 && (s.numel() == 1 || s.numel() == out) && s.dtype() == (po2 ? DType::s32 : DType::f32),
              file.source, ": '", name, po2 ? ".exp' must be int32" : ".scale' must be float32", " with 1 or ", out,
              " values, got ", dtype_name(s.dtype()), " ", shape_str(s.shape()));
    for (int64_t g = 0; g < s.numel(); ++g) {
        const float v = po2 ? std::ldexp(1.0f, s.data<int32_t>()[g]) : s.f32()[g];
        HFQ_CHECK(std::isfinite(v) && v > 0, file.source, ": '", name, "' has the unusable scale ", v, " in group ", g);
        scales_.push_back(v);
        if (po2) exponents_.push_back(s.data<int32_t>()[g]);
    }
    bias_ = file.get(name + ".bias");
    HFQ_CHECK(bias_.dtype() == DType::f32 && bias_.shape() == Shape{out}, file.source, ": '", name,
              ".bias' must be float32 [", out, "], got ", shape_str(bias_.shape()));
    if (e.contains("input_grid") && e["input_grid"].is_string()) {  // W4A8
        input_site_ = e["input_grid"].get<std::string>();
        HFQ_CHECK(po2, file.source, ": layer '", name, "' has an input grid but no power-of-two scale");
        bias_code_ = file.get(name + ".bias_code");
        HFQ_CHECK(bias_code_.dtype() == DType::s32 && bias_code_.shape() == Shape{out}, file.source, ": '", name,
                  ".bias_code' must be int32 [", out, "], got ", dtype_name(bias_code_.dtype()), " ",
                  shape_str(bias_code_.shape()));
    }

    Tensor values = Tensor::empty(codes_.shape());
    for (int64_t i = 0; i < values.numel(); ++i) values.f32()[i] = codes_.data<int8_t>()[i];
    code_values_ = Variable(values);
    channel_scale_ = Tensor::empty({out});
    Tensor b = Tensor::empty({out});
    for (int64_t c = 0; c < out; ++c) {
        channel_scale_.f32()[c] = scales_[scales_.size() == 1 ? 0 : c];
        b.f32()[c] = bias_.f32()[c] / channel_scale_.f32()[c];
    }
    bias_over_scale_ = Variable(b);
    eval();
}

Variable IntegerLayer::forward(const Variable& input) {
    const Variable x = quantize_input(input);
    // A W4A8 classifier sums in double, as its fake-quant layer evaluates (quant/accumulator.h).
    const Variable acc = is_conv_ ? conv2d(x, code_values_, bias_over_scale_, params_)
                         : bias_code_.defined() ? exact_linear(x, code_values_, bias_over_scale_)
                                                : linear(x, code_values_, bias_over_scale_);
    return quantize_output(mul_channel(acc, Variable(channel_scale_)));
}

Tensor IntegerLayer::weights() const {
    Tensor w = Tensor::empty(codes_.shape());
    const int64_t per = codes_.numel() / codes_.dim(0);
    for (int64_t i = 0; i < w.numel(); ++i)
        w.f32()[i] = channel_scale_.f32()[i / per] * float(codes_.data<int8_t>()[i]);
    return w;
}

std::string IntegerLayer::describe() const {
    return cat("IntegerLayer(", name_, ", ", is_conv_ ? "conv " : "linear ", shape_str(codes_.shape()), ")");
}

int64_t IntegerLayer::macs(const Shape&, const Shape& output) const {
    return shape_numel(output) * (codes_.numel() / codes_.dim(0));
}

std::shared_ptr<Model> build_model_from_export(const std::string& path) {
    return build_model_from_export(read_safetensors(path));
}

std::shared_ptr<Model> build_model_from_export(const SafetensorsFile& file) {
    const nlohmann::json meta = export_metadata(file);
    const std::optional<ModelConfig> config = checkpoint_model_config(file);
    HFQ_CHECK(config.has_value(), file.source, ": the export has no '", kModelConfigKey, "' metadata");
    std::shared_ptr<Model> model = build_model(*config, 0);
    model->eval();
    std::map<std::string, std::shared_ptr<IntegerLayer>> layers;
    for (const nlohmann::json& e : meta["layers"]) {
        const std::string name = field<std::string>(e, "name", file.source);
        const auto [parent_path, child] = split_name(name);
        Module& parent = model->find(parent_path);
        auto layer = std::make_shared<IntegerLayer>(file, name);
        layers[name] = layer;
        const Tensor* replaced = nullptr;
        if (auto* conv = dynamic_cast<Conv2d*>(parent.child(child).get())) replaced = &conv->weight().value();
        if (auto* lin = dynamic_cast<Linear*>(parent.child(child).get())) replaced = &lin->weight().value();
        HFQ_CHECK(replaced && replaced->shape() == layer->codes().shape(), file.source, ": '", name, ".q' has the shape ",
                  shape_str(layer->codes().shape()), " but the network of '", kModelConfigKey, "' has ",
                  replaced ? shape_str(replaced->shape()) : std::string("no conv or linear layer"), " there");
        if (e.contains("batch_norm") && e["batch_norm"].is_string())
            parent.replace_children({child, split_name(e["batch_norm"].get<std::string>()).second}, layer);
        else
            parent.replace_child(child, layer);
    }
    std::vector<std::pair<ActivationQuantizer*, int>> activations;
    for (const nlohmann::json& e : meta["activations"]) {
        const std::string name = field<std::string>(e, "name", file.source);
        const Tensor& k = file.get(name + ".exp");
        HFQ_CHECK(k.dtype() == DType::s32 && k.numel() == 1, file.source, ": '", name, ".exp' must be one int32");
        // hfq-integer-1 knew only unsigned quantizers after an activation.
        const bool is_signed = e.value("signed", false);
        const std::string site = e.value("site", "activation"), owner = e.value("owner", name);
        auto q = std::make_shared<ActivationQuantizer>(
            field<int>(e, "bits", file.source),
            parse_exponent_rounding(field<std::string>(e, "rounding", file.source)), 1e-5f, is_signed);
        auto layer = layers.find(owner);
        if (site == "activation") {
            const auto [parent_path, child] = split_name(name);
            Module& parent = model->find(parent_path);
            parent.replace_child(child, std::make_shared<QuantizedActivation>(parent.child(child), q));
        } else if ((site == "input" || site == "output") && layer != layers.end()) {
            if (site == "input") layer->second->set_input_quantizer(q);
            else layer->second->set_output_quantizer(q);
        } else if (auto* block = dynamic_cast<InvertedResidual*>(&model->find(owner)); site == "sum" && block) {
            block->set_after_add(kSumQuantizerName, q);
        } else {
            throw Error(cat(file.source, ": activation quantizer '", name, "' has the site '", site, "' of '", owner,
                            "', which the network does not have"));
        }
        activations.emplace_back(q.get(), k.data<int32_t>()[0]);
    }
    // The remaining tensors (float layers that were not folded, ...).
    const LoadReport report = load_state_dict(*model, file, LoadOptions{/*partial=*/true});
    std::set<std::string> quantizer_state;  // set from "<site>.exp" below
    for (auto& [prefix, m] : model->named_modules())
        if (dynamic_cast<ActivationQuantizer*>(m))
            for (const auto& [n, t] : m->state_dict()) quantizer_state.insert(join_name(prefix, n));
    for (const std::string& n : report.missing)
        HFQ_CHECK(quantizer_state.count(n), file.source, ": the export lacks the tensor '", n, "' the network needs");
    HFQ_CHECK(report.mismatched.empty(), file.source, ": tensor '",
              report.mismatched.empty() ? "" : report.mismatched[0], "' has the wrong shape or dtype");
    // Activation quantizers evaluate with their stored exponent.
    for (auto [q, k] : activations) {
        for (auto& [n, t] : q->named_buffers()) {
            if (n == "exponent") t->data<int32_t>()[0] = k;
            if (n == "initialized") t->data<int32_t>()[0] = 1;
        }
        q->log2_scale().value().fill(float(k));
    }
    model->eval();
    return model;
}

}  // namespace hfq::quant
