// A model = a Module plus the configuration it was built from. The
// configuration round-trips through JSON (it is stored in checkpoint
// metadata, so a checkpoint says which network its weights belong to).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "layers/module.h"
#include "layers/sequential.h"

namespace hfq {

enum class Arch { mobilenet_v1, mobilenet_v2 };
enum class Activation { relu6, relu };

struct ModelConfig {
    Arch arch = Arch::mobilenet_v2;
    double width = 1.0;  // width multiplier alpha
    int classes = 1000;
    int input_channels = 3;  // 3 (RGB) or 1 (grey)
    // For 28x28 to 64x64 inputs: V1's stem at stride 1; V2's stem and its
    // first stride-2 stage (24 channels) at stride 1.
    bool small_input = false;
    // V1 only (V2 is ReLU6 throughout, as torchvision).
    Activation activation = Activation::relu6;
    // Dropout before the classifier; unset = the architecture's default
    // (V1 0, as the shared benchmark's model; V2 0.2, as torchvision).
    std::optional<double> dropout = std::nullopt;

    double effective_dropout() const;
    // Throws hfq::Error naming the bad field.
    void validate() const;
    // {"arch": "mobilenet_v2", "width": 0.5, "classes": 10, "input_channels": 3,
    //  "small_input": false, "activation": "relu6", "dropout": 0.2}
    std::string to_json() const;
    // Strict: unknown keys and wrong types are errors naming the key; missing
    // keys keep their defaults.
    static ModelConfig from_json(const std::string& json);
};

const char* arch_name(Arch a);          // "mobilenet_v1", "mobilenet_v2"
Arch parse_arch(const std::string& s);  // also accepts "v1", "v2"
const char* activation_name(Activation a);
Activation parse_activation(const std::string& s);

class Model : public Module {
public:
    explicit Model(ModelConfig config) : config_(std::move(config)) {}
    const ModelConfig& config() const { return config_; }

private:
    ModelConfig config_;
};

// Builds the network the config describes, initialised (as torchvision)
// from `seed`.
std::shared_ptr<Model> build_model(const ModelConfig& config, uint64_t seed = 0);

// The building blocks both MobileNets share.
std::shared_ptr<Module> make_activation(Activation a);
// Sequential(Conv2d(k, stride, padding k/2, groups, no bias), BatchNorm2d,
// activation): torchvision's Conv2dNormActivation, names "0", "1", "2".
std::shared_ptr<Sequential> conv_bn_act(int in_channels, int out_channels, int kernel, int stride, int groups,
                                        Activation a);

}  // namespace hfq
