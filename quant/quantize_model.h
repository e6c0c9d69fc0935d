// Quantizing a whole model: one call wraps every convolution and linear
// layer by a policy, and a handful of model-level controls that the trainer
// drives (batch-norm freezing, the stable-exponent schedule, diagnostics).
//
//   QuantPolicy policy;                        // 4-bit msqe-po2, BN folded,
//   policy.method = "learnable-po2";           // first conv and classifier at 8 bits
//   quantize_model(model, policy);             // model's layers are now wrapped
//   ... train: every forward fake-quantizes the weights ...
//   for (auto& layer : quantized_layers(model)) layer.quantizer->report();
//
// Names: wrapped layers keep their float names (a float checkpoint loads into
// the wrapped model with a partial load that skips only quantizer state), and
// add their quantizer's parameters and buffers under "<layer>.weight_quantizer.*".
#pragma once
#include <string>
#include <vector>

#include "layers/model.h"
#include "quant/quantizer.h"

namespace hfq::quant {

struct QuantPolicy {
    std::string method = "msqe-po2";  // any of quantizer_methods()
    QuantizerOptions options;         // bits, per-channel, every method option
    // The first convolution and the classifier are commonly kept at higher
    // precision; 0 means "same as options.bits".
    int first_layer_bits = 8;
    int last_layer_bits = 8;
    // Fold each convolution's following batch norm into it (spec section 6).
    bool fold_batch_norm = true;
    // Training steps after which folded layers stop using batch statistics and
    // switch to the moving statistics (-1: never, until switched by hand).
    int64_t freeze_bn_after_steps = -1;
    // Optional activation quantization after ReLU/ReLU6 (unsigned grid,
    // learnable-po2), for W4A8-style simulation. 0 = off.
    int activation_bits = 0;

    std::string to_json() const;                    // stored in checkpoint metadata
    static QuantPolicy from_json(const std::string& json);  // strict, errors name the key
};

// A wrapped layer, as the trainer and the diagnostics see it.
struct QuantizedLayer {
    std::string name;       // the layer's name in the model ("features.3.0")
    std::string kind;       // "conv", "conv+bn (folded)", "linear", "activation"
    Quantizer* quantizer;   // owned by the wrapper module
};

// Wraps the model's layers in place by the policy. Throws if the model is
// already quantized or the policy is invalid.
void quantize_model(Model& model, const QuantPolicy& policy);
// The quantized layers in model order (empty for a float model).
std::vector<QuantizedLayer> quantized_layers(Model& model);

// Batch-norm freezing of the folded layers (spec section 6), by hand.
void freeze_batch_norm(Model& model, bool frozen = true);
// The stable-exponent schedule of msqe-po2 quantizers that keep one.
void set_stable_updating(Model& model, bool on);
void set_stable_switched(Model& model, bool on);

}  // namespace hfq::quant
