// The ONNX graph of an export, built by walking the network that
// build_model_from_export rebuilds from it (deploy/onnx_export.h says what
// each module becomes). The walk follows the modules' own forward order:
// containers (the model, Sequential) run their children in order, an
// InvertedResidual its "conv" branch, then the sum and its quantizer.
#include "deploy/onnx_export.h"

#include <onnx/checker.h>
#include <onnx/onnx_pb.h>

#include <cctype>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "layers/activation.h"
#include "layers/batch_norm.h"
#include "layers/mobilenet_v2.h"
#include "layers/pooling.h"
#include "quant/export.h"
#include "quant/quantize_model.h"

namespace hfq::deploy {
namespace {

constexpr int kOpset = 13;

// 2^e as a float scale; e outside the normal range would make the scale a
// denormal, zero or infinite, which no runtime should be handed.
float power_of_two(int e, const std::string& what, const std::string& source) {
    HFQ_CHECK(e >= -126 && e <= 127, source, ": ", what, " has the exponent ", e,
              ", outside float's normal range [-126, 127]");
    return std::ldexp(1.0f, e);
}

class GraphWriter {
public:
    GraphWriter(const SafetensorsFile& file, Model& model) : file_(file), graph_(*proto_.mutable_graph()) {
        for (auto& [name, m] : model.named_modules()) names_.emplace(m, name);
        for (const quant::QuantizedActivationSite& a : quant::quantized_activations(model))
            site_of_[a.quantizer] = a.name;
        const nlohmann::json meta = nlohmann::json::parse(file.metadata.at(quant::kExportKey));
        for (const nlohmann::json& a : meta.at("activations")) activation_entries_[a.at("name").get<std::string>()] = a;

        proto_.set_ir_version(onnx::IR_VERSION);
        proto_.set_producer_name("hfq");
        onnx::OperatorSetIdProto* opset = proto_.add_opset_import();
        opset->set_domain("");
        opset->set_version(kOpset);
        for (const auto& [key, value] : file.metadata) {
            if (key.rfind("hfq.", 0) != 0) continue;
            onnx::StringStringEntryProto* p = proto_.add_metadata_props();
            p->set_key(key);
            p->set_value(value);
        }
        graph_.set_name(arch_name(model.config().arch));

        add_value_info(graph_.add_input(), "input", {"N", "H", "W", std::to_string(model.config().input_channels)});
        const std::string x = node("Transpose", {"input"}, "input.nchw", [](onnx::NodeProto& n) {
            ints(n, "perm", {0, 3, 1, 2});
        });
        const std::string logits = emit(model, x);
        add_value_info(graph_.add_output(), logits, {"N", std::to_string(model.config().classes)});
    }

    onnx::ModelProto& proto() { return proto_; }

private:
    // The tensor the module computes from the tensor x: the nodes it becomes.
    std::string emit(Module& m, const std::string& x) {
        const std::string& name = names_.at(&m);
        if (auto* l = dynamic_cast<quant::IntegerLayer*>(&m)) return integer_layer(*l, x);
        if (auto* a = dynamic_cast<quant::QuantizedActivation*>(&m))
            return quantize(a->quantizer(), emit(a->activation(), x));
        if (auto* q = dynamic_cast<quant::ActivationQuantizer*>(&m)) return quantize(*q, x);  // a residual sum's
        if (auto* b = dynamic_cast<InvertedResidual*>(&m)) return inverted_residual(*b, name, x);
        if (dynamic_cast<Model*>(&m) || dynamic_cast<Sequential*>(&m)) {
            std::string y = x;
            for (const Module::Child& c : m.children()) y = emit(*c.module, y);
            return y;
        }
        if (dynamic_cast<ReLU*>(&m)) return node("Relu", {x}, name);
        if (dynamic_cast<ReLU6*>(&m)) return node("Clip", {x, constant("relu6.min", 0), constant("relu6.max", 6)}, name);
        if (dynamic_cast<Dropout*>(&m)) return x;  // identity in evaluation
        if (dynamic_cast<GlobalAvgPool*>(&m)) {
            const std::string pooled = node("GlobalAveragePool", {x}, name + ".pooled");  // {N, C, 1, 1}
            return node("Flatten", {pooled}, name, [](onnx::NodeProto& n) { integer(n, "axis", 1); });
        }
        if (auto* bn = dynamic_cast<BatchNorm2d*>(&m)) return batch_norm(*bn, name, x);
        throw Error(cat(file_.source, ": '", name, "' is a ", m.type_name(),
                        ", which the ONNX export has no node for"));
    }

    std::string integer_layer(quant::IntegerLayer& l, const std::string& input) {
        const std::string& name = l.name();
        std::string x = l.input_quantizer() ? quantize(*l.input_quantizer(), input) : input;
        const Tensor& codes = l.codes();
        const int64_t out = codes.dim(0);
        HFQ_CHECK(l.scales().size() == 1 || int64_t(l.scales().size()) == out, file_.source, ": '", name,
                  "' has ", l.scales().size(), " scales for ", out, " output channels");
        // One scale per output channel (a per-tensor scale repeated), so
        // every layer's DequantizeLinear is the same per-axis one.
        std::vector<float> scale(out);
        for (int64_t c = 0; c < out; ++c) {
            const size_t g = l.scales().size() == 1 ? 0 : size_t(c);
            scale[c] = l.exponents().empty() ? l.scales()[g]
                                             : power_of_two(l.exponents()[g], cat("'", name, ".exp'"), file_.source);
        }
        initializer(name + ".q", onnx::TensorProto::INT8, codes.shape(), codes.data<int8_t>(), codes.numel());
        float_initializer(name + ".scale", {out}, scale.data());
        const std::vector<int8_t> zeros(out, 0);
        initializer(name + ".zero_point", onnx::TensorProto::INT8, {out}, zeros.data(), out);
        const std::string w = node("DequantizeLinear", {name + ".q", name + ".scale", name + ".zero_point"},
                                   name + ".weight", [](onnx::NodeProto& n) { integer(n, "axis", 0); });
        float_initializer(name + ".bias", {out}, l.bias().f32());
        std::string y;
        if (l.is_conv()) {
            const Conv2dParams& p = l.params();
            y = node("Conv", {x, w, name + ".bias"}, name, [&](onnx::NodeProto& n) {
                ints(n, "kernel_shape", {codes.dim(2), codes.dim(3)});
                ints(n, "strides", {p.stride, p.stride});
                integer(n, "group", p.groups);
                // TensorFlow's SAME puts an odd extra pad at the end: SAME_UPPER.
                if (p.same_padding) text(n, "auto_pad", "SAME_UPPER");
                else ints(n, "pads", {p.padding, p.padding, p.padding, p.padding});
            });
        } else {
            y = node("Gemm", {x, w, name + ".bias"}, name, [](onnx::NodeProto& n) { integer(n, "transB", 1); });
        }
        return l.output_quantizer() ? quantize(*l.output_quantizer(), y) : y;
    }

    std::string inverted_residual(InvertedResidual& b, const std::string& name, const std::string& x) {
        const std::string y = emit(*b.child("conv"), x);
        if (!b.uses_residual()) return y;
        const std::string sum = node("Add", {x, y}, name);
        return b.after_add() ? emit(*b.after_add(), sum) : sum;
    }

    // A batch norm that was not folded: ONNX's BatchNormalization computes
    // the same evaluation-mode function from the same four tensors.
    std::string batch_norm(BatchNorm2d& bn, const std::string& name, const std::string& x) {
        const int64_t c = bn.channels();
        float_initializer(name + ".weight", {c}, bn.weight().value().f32());
        float_initializer(name + ".bias", {c}, bn.bias().value().f32());
        float_initializer(name + ".running_mean", {c}, bn.running_mean().f32());
        float_initializer(name + ".running_var", {c}, bn.running_var().f32());
        return node("BatchNormalization",
                    {x, name + ".weight", name + ".bias", name + ".running_mean", name + ".running_var"}, name,
                    [&](onnx::NodeProto& n) { real(n, "epsilon", bn.eps()); });
    }

    // x on the quantizer's grid, as a QuantizeLinear / DequantizeLinear pair.
    std::string quantize(quant::ActivationQuantizer& q, const std::string& x) {
        const auto site = site_of_.find(&q);
        HFQ_CHECK(site != site_of_.end(), file_.source, ": an activation quantizer before '", x,
                  "' is at no site the export lists");
        const std::string& name = site->second;
        const auto entry = activation_entries_.find(name);
        HFQ_CHECK(entry != activation_entries_.end(), file_.source, ": activation quantizer '", name,
                  "' has no entry in '", quant::kExportKey, "'");
        // hfq-integer-1 entries have no "signed": they were all unsigned.
        const bool is_signed = entry->second.value("signed", false);
        const quant::Grid& grid = q.grid();
        HFQ_CHECK(is_signed == grid.is_signed && grid.bits <= 8, file_.source, ": activation quantizer '", name,
                  "' is ", grid.bits, " bits ", grid.is_signed ? "signed" : "unsigned", " but its entry says ",
                  is_signed ? "signed" : "unsigned");
        const float s = power_of_two(q.exponent(), cat("'", name, ".exp'"), file_.source);
        // The storage range is int8's [-128, 127] or uint8's [0, 255]; hfq's
        // grid may be narrower (fewer bits, or a symmetric signed grid
        // without -128). Clipping x to [-qn s, qp s] first gives the same
        // codes as clipping the codes, since both ends are multiples of s.
        const int lo = is_signed ? -128 : 0, hi = is_signed ? 127 : 255;
        std::string clipped = x;
        if (-grid.qn != lo || grid.qp != hi)
            clipped = node("Clip", {x, constant(name + ".min", -grid.qn * s), constant(name + ".max", grid.qp * s)},
                           name + ".clipped");
        const std::string scale = constant(name + ".scale", s);
        const std::string zero = name + ".zero_point";
        if (is_signed) {
            const int8_t z = 0;
            initializer(zero, onnx::TensorProto::INT8, {}, &z, 1);
        } else {
            const uint8_t z = 0;
            initializer(zero, onnx::TensorProto::UINT8, {}, &z, 1);
        }
        const std::string codes = node("QuantizeLinear", {clipped, scale, zero}, name + ".codes");
        return node("DequantizeLinear", {codes, scale, zero}, name + ".dequantized");
    }

    // ---- Protobuf plumbing ---------------------------------------------------
    template <class Set = void (*)(onnx::NodeProto&)>
    std::string node(const std::string& op, const std::vector<std::string>& inputs, const std::string& output,
                     Set set = [](onnx::NodeProto&) {}) {
        HFQ_CHECK(outputs_.insert(output).second, file_.source, ": the ONNX graph would name two tensors '", output,
                  "'");
        onnx::NodeProto& n = *graph_.add_node();
        n.set_op_type(op);
        n.set_name(output);
        for (const std::string& i : inputs) n.add_input(i);
        n.add_output(output);
        set(n);
        return output;
    }
    static onnx::AttributeProto& attribute(onnx::NodeProto& n, const char* name, onnx::AttributeProto::AttributeType t) {
        onnx::AttributeProto& a = *n.add_attribute();
        a.set_name(name);
        a.set_type(t);
        return a;
    }
    static void integer(onnx::NodeProto& n, const char* name, int64_t v) {
        attribute(n, name, onnx::AttributeProto::INT).set_i(v);
    }
    static void real(onnx::NodeProto& n, const char* name, float v) {
        attribute(n, name, onnx::AttributeProto::FLOAT).set_f(v);
    }
    static void text(onnx::NodeProto& n, const char* name, const std::string& v) {
        attribute(n, name, onnx::AttributeProto::STRING).set_s(v);
    }
    static void ints(onnx::NodeProto& n, const char* name, const std::vector<int64_t>& v) {
        onnx::AttributeProto& a = attribute(n, name, onnx::AttributeProto::INTS);
        for (int64_t i : v) a.add_ints(i);
    }

    // Raw little-endian data, as TensorProto's raw_data is defined (x86-64's order).
    template <class T>
    void initializer(const std::string& name, onnx::TensorProto::DataType type, const Shape& shape, const T* data,
                     int64_t n) {
        HFQ_CHECK(outputs_.insert(name).second, file_.source, ": the ONNX graph would name two tensors '", name, "'");
        onnx::TensorProto& t = *graph_.add_initializer();
        t.set_name(name);
        t.set_data_type(type);
        for (int64_t d : shape) t.add_dims(d);
        t.set_raw_data(std::string(reinterpret_cast<const char*>(data), size_t(n) * sizeof(T)));
    }
    void float_initializer(const std::string& name, const Shape& shape, const float* data) {
        initializer(name, onnx::TensorProto::FLOAT, shape, data, shape_numel(shape));
    }
    // A float scalar initializer, added once (ReLU6's bounds are shared).
    std::string constant(const std::string& name, float v) {
        if (!outputs_.count(name)) initializer(name, onnx::TensorProto::FLOAT, {}, &v, 1);
        return name;
    }
    static void add_value_info(onnx::ValueInfoProto* info, const std::string& name,
                               const std::vector<std::string>& dims) {
        info->set_name(name);
        onnx::TypeProto::Tensor& t = *info->mutable_type()->mutable_tensor_type();
        t.set_elem_type(onnx::TensorProto::FLOAT);
        for (const std::string& d : dims) {
            onnx::TensorShapeProto::Dimension& dim = *t.mutable_shape()->add_dim();
            if (std::isdigit(static_cast<unsigned char>(d[0]))) dim.set_dim_value(std::stoll(d));
            else dim.set_dim_param(d);
        }
    }

    const SafetensorsFile& file_;
    onnx::ModelProto proto_;
    onnx::GraphProto& graph_;
    std::map<const Module*, std::string> names_;
    std::map<const quant::ActivationQuantizer*, std::string> site_of_;
    std::map<std::string, nlohmann::json> activation_entries_;
    std::set<std::string> outputs_;  // tensor names used so far (node outputs and initializers)
};

}  // namespace

void write_onnx(const SafetensorsFile& export_file, const std::string& path) {
    const std::shared_ptr<Model> model = quant::build_model_from_export(export_file);
    GraphWriter writer(export_file, *model);
    try {
        onnx::checker::check_model(writer.proto());
    } catch (const std::exception& e) {  // onnx::checker::ValidationError
        throw Error(cat(export_file.source, ": the ONNX model for ", path, " fails onnx's checker: ", e.what()));
    }
    std::string bytes;
    HFQ_CHECK(writer.proto().SerializeToString(&bytes), path, ": protobuf could not serialise the ONNX model");
    write_file_atomically(path, bytes);
}

void write_onnx(const std::string& export_path, const std::string& path) {
    write_onnx(read_safetensors(export_path), path);
}

}  // namespace hfq::deploy
