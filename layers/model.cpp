#include "layers/model.h"

#include <nlohmann/json.hpp>

#include "engine/check.h"
#include "layers/activation.h"
#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "layers/mobilenet_v1.h"
#include "layers/mobilenet_v2.h"

namespace hfq {

const char* arch_name(Arch a) { return a == Arch::mobilenet_v1 ? "mobilenet_v1" : "mobilenet_v2"; }

Arch parse_arch(const std::string& s) {
    if (s == "mobilenet_v1" || s == "v1") return Arch::mobilenet_v1;
    if (s == "mobilenet_v2" || s == "v2") return Arch::mobilenet_v2;
    throw Error(cat("model config: unknown arch '", s, "' (expected mobilenet_v1 / v1 or mobilenet_v2 / v2)"));
}

const char* activation_name(Activation a) { return a == Activation::relu6 ? "relu6" : "relu"; }

Activation parse_activation(const std::string& s) {
    if (s == "relu6") return Activation::relu6;
    if (s == "relu") return Activation::relu;
    throw Error(cat("model config: unknown activation '", s, "' (expected relu6 or relu)"));
}

double ModelConfig::effective_dropout() const { return dropout ? *dropout : (arch == Arch::mobilenet_v1 ? 0.0 : 0.2); }

void ModelConfig::validate() const {
    HFQ_CHECK(width > 0 && width <= 8, "model config: width must be in (0, 8], got ", width);
    HFQ_CHECK(classes > 0, "model config: classes must be positive, got ", classes);
    HFQ_CHECK(input_channels > 0, "model config: input_channels must be positive, got ", input_channels);
    HFQ_CHECK(effective_dropout() >= 0 && effective_dropout() < 1, "model config: dropout must be in [0, 1), got ",
              effective_dropout());
    HFQ_CHECK(arch == Arch::mobilenet_v1 || activation == Activation::relu6,
              "model config: mobilenet_v2 uses relu6 throughout (activation relu is for mobilenet_v1)");
}

std::string ModelConfig::to_json() const {
    nlohmann::ordered_json j;
    j["arch"] = arch_name(arch);
    j["width"] = width;
    j["classes"] = classes;
    j["input_channels"] = input_channels;
    j["small_input"] = small_input;
    j["activation"] = activation_name(activation);
    j["dropout"] = effective_dropout();
    return j.dump();
}

ModelConfig ModelConfig::from_json(const std::string& text) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(j.is_object(), "model config: not a JSON object: ", text.substr(0, 200));
    ModelConfig c;
    for (const auto& [key, v] : j.items()) {
        auto need = [&, &key = key, &v = v](bool ok, const char* what) {
            HFQ_CHECK(ok, "model config: '", key, "' must be ", what, ", got ", v.dump());
        };
        if (key == "arch") {
            need(v.is_string(), "a string");
            c.arch = parse_arch(v.get<std::string>());
        } else if (key == "width") {
            need(v.is_number(), "a number");
            c.width = v.get<double>();
        } else if (key == "classes") {
            need(v.is_number_integer(), "an integer");
            c.classes = v.get<int>();
        } else if (key == "input_channels") {
            need(v.is_number_integer(), "an integer");
            c.input_channels = v.get<int>();
        } else if (key == "small_input") {
            need(v.is_boolean(), "true or false");
            c.small_input = v.get<bool>();
        } else if (key == "activation") {
            need(v.is_string(), "a string");
            c.activation = parse_activation(v.get<std::string>());
        } else if (key == "dropout") {
            need(v.is_number(), "a number");
            c.dropout = v.get<double>();
        } else {
            throw Error(cat("model config: unknown key '", key, "'"));
        }
    }
    c.validate();
    return c;
}

std::shared_ptr<Model> build_model(const ModelConfig& config, uint64_t seed) {
    config.validate();
    std::shared_ptr<Model> m;
    if (config.arch == Arch::mobilenet_v1)
        m = std::make_shared<MobileNetV1>(config);
    else
        m = std::make_shared<MobileNetV2>(config);
    m->initialize(seed);
    return m;
}

std::shared_ptr<Module> make_activation(Activation a) {
    if (a == Activation::relu6) return std::make_shared<ReLU6>();
    return std::make_shared<ReLU>();
}

std::shared_ptr<Sequential> conv_bn_act(int in_channels, int out_channels, int kernel, int stride, int groups,
                                        Activation a) {
    auto s = std::make_shared<Sequential>();
    s->add(Conv2d::make(in_channels, out_channels, kernel, stride, groups));
    s->add(std::make_shared<BatchNorm2d>(out_channels));
    s->add(make_activation(a));
    return s;
}

}  // namespace hfq
