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
// A folded conv + batch norm pair (quant/folded_conv_bn.h) keeps both layers'
// names and adds the freeze flag "<parent>.bn_frozen_<conv child>".
// Activation quantizers (policy.activation_bits: W4A8, every tensor that
// enters a convolution or the classifier on a power-of-two grid) sit at the
// activation's place, "<activation>.activation_quantizer.*" (ReLU, ReLU6,
// the global pooling), at the first layer's input, "<layer>.input_quantizer.*",
// at a linear bottleneck's output, "<layer>.output_quantizer.*", and after a
// residual sum, "<block>.add_quantizer.*" (quant/activation_quantizer.h);
// each layer's bias is then quantized at its accumulator's scale
// (quant/accumulator.h).
//
// Which layers: every Conv2d and Linear, in model order. The first Conv2d is
// the "first layer", the last Linear (the classifier) the "last layer". With
// fold_bn, a Conv2d without bias directly followed by a BatchNorm2d
// in the same parent is folded with it; other convolutions are wrapped alone
// (their batch norm stays a float layer).
//
// Checkpoints: the quantizers' state is in the model's parameters and
// buffers, so save_checkpoint / load_checkpoint (layers/checkpoint.h) carry
// it; store policy.to_json() under kQuantPolicyKey, and to resume, build the
// model, quantize_model with the stored policy, load the checkpoint, then
// reset_diagnostics(model) (diagnostics history is not state).
#pragma once
#include <string>
#include <vector>

#include "layers/model.h"
#include "quant/quantizer.h"

namespace hfq::quant {

class QuantizedModule;
class ActivationQuantizer;

// Checkpoint / export metadata key of the policy JSON.
inline constexpr const char* kQuantPolicyKey = "hfq.quant_policy";
// The child name of a residual block's sum quantizer (W4A8).
inline constexpr const char* kSumQuantizerName = "add_quantizer";

struct QuantPolicy {
    std::string method = "msqe-po2";  // any of quantizer_methods()
    QuantizerOptions options;         // bits, per-channel, every method option
    // The first convolution and the classifier are commonly kept at higher
    // precision; 0 means "same as options.bits".
    int first_layer_bits = 8;
    int last_layer_bits = 8;
    // Fold each convolution's following batch norm into it (docs/quantizers.md, 6).
    bool fold_bn = true;  // train_mobilenet --fold-bn
    // Training steps after which folded layers stop using batch statistics and
    // switch to the moving statistics (-1: never, until switched by hand).
    int64_t freeze_bn_step = -1;  // train_mobilenet: --freeze-bn-at x QAT's steps
    // Where folded layers take their batch statistics from until they freeze
    // (quant/folded_conv_bn.h): "float-conv", a second float convolution
    // (Jacob et al.), or "quantized-conv", the quantized convolution's output
    // in float units (PyTorch's ConvBn2d: one convolution, about half the work).
    // The library's defaults are a policy's meaning without these keys (saved
    // before them); train_mobilenet's are quantized-conv, frozen half-way.
    std::string bn_stats = "float-conv";  // --bn-stats
    // Optional activation quantization after ReLU/ReLU6 (unsigned grid,
    // learnable-po2), for W4A8-style simulation. 0 = off.
    int activation_bits = 0;

    // Throws hfq::Error naming the bad field (method, bits, ...).
    void validate() const;
    // {"method": "msqe-po2", "bits": 4, "signed": true, "per_channel": false,
    //  ... every QuantizerOptions field ..., "first_layer_bits": 8, "last_layer_bits": 8,
    //  "fold_bn": true, "freeze_bn_step": -1, "bn_stats": "float-conv",
    //  "activation_bits": 0}  (from_json: a missing key keeps its default; the
    //  keys of older policies, "fold_batch_norm", "freeze_bn_after_steps" and
    //  "batch_statistics", are read as the same settings)
    std::string to_json() const;                            // stored in checkpoint metadata
    static QuantPolicy from_json(const std::string& json);  // strict, errors name the key
};

// A wrapped layer, as the trainer and the diagnostics see it.
struct QuantizedLayer {
    std::string name;                   // the layer's name in the model ("features.3.0")
    std::string kind;                   // "conv", "conv+bn (folded)", "linear"
    Quantizer* quantizer;               // owned by the wrapper module
    QuantizedModule* module = nullptr;  // the wrapper (quant/quantized_layers.h, folded_conv_bn.h)
};

// An activation quantizer (policy.activation_bits > 0), as the diagnostics
// and the export see it. Where it sits (`site`):
//   "activation"  after the activation (or pooling) `owner`, which it wraps
//   "input"       at the input of the layer `owner` (the network's first)
//   "output"      at the output of the layer `owner` (a linear bottleneck)
//   "sum"         after the residual sum of the block `owner`
struct QuantizedActivationSite {
    std::string name;                // "features.3.2" (activation: the activation's name),
                                     // "features.0.input_quantizer", "features.4.add_quantizer", ...
    ActivationQuantizer* quantizer;  // owned by the model
    std::string site, owner;
};

// Wraps the model's layers in place by the policy. Throws if the model is
// already quantized or the policy is invalid.
void quantize_model(Model& model, const QuantPolicy& policy);
// The quantized layers in model order (empty for a float model). Activation
// quantizers are not Quantizers (their input changes shape with the batch):
// they are listed by quantized_activations().
std::vector<QuantizedLayer> quantized_layers(Model& model);
std::vector<QuantizedActivationSite> quantized_activations(Model& model);
// Whether quantize_model has wrapped anything in this model.
bool is_quantized(Model& model);

// Batch-norm freezing of the folded layers (docs/quantizers.md, 6), by hand.
void freeze_batch_norm(Model& model, bool frozen = true);
// The stable-exponent schedule of msqe-po2 quantizers that keep one.
void set_stable_updating(Model& model, bool on);
void set_stable_switched(Model& model, bool on);
// Dead channels of the folded pairs: output channels whose moving variance
// is below 1e-6 * eps, i.e. whose convolution output is constant over the
// training data (a depthwise channel whose input channel ReLU6 never lets
// through). Their weights do not matter (batch norm maps a constant to beta),
// but folding divides them by sqrt(eps): W_fold = gamma W / sqrt(var + eps)
// makes them ~300x the live weights, and a per-tensor grid sized for them
// rounds every live weight of the layer to zero. This sets their weights and
// moving mean to zero (the channel then outputs exactly beta; before, it
// varied by less than 0.1 % of |gamma|) and returns what it changed. Call it
// after quantize_model and before the first training step (the quantizers
// initialise their scales from the weights they first see).
struct DeadChannels {
    std::string layer;          // the convolution's name
    int64_t channels = 0;       // its output channels
    std::vector<int64_t> dead;  // the channels zeroed
};
std::vector<DeadChannels> zero_dead_channels(Model& model);
// Forgets every quantizer's diagnostics history (flips, previous codes), e.g.
// after loading a checkpoint into the model.
void reset_diagnostics(Model& model);

}  // namespace hfq::quant
