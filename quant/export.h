// Export of a trained quantized model in the form a fixed-point accelerator
// runs it, and the model rebuilt from that export alone.
//
// The file (safetensors, written atomically), per quantized layer <name>
// (the layer's name in the model, e.g. "features.3.0", "classifier"):
//   <name>.q      int8  {weight shape} (OIHW conv, {out, in} linear): the integer codes
//   <name>.exp    int32 {groups}: the power-of-two exponent(s), one per tensor or
//                 per output channel                       (lsq: <name>.scale f32 instead)
//   <name>.bias   f32   {out}: the folded bias (beta - gamma mu_ema / sigma_ema for a
//                 folded conv + batch norm, the layer's own bias, or zeros)
// so that layer(x) = 2^exp[c] * sum(codes * x) + bias[c] for output channel c.
// A W4A8 model's layers (an input grid: quant/accumulator.h) also store
//   <name>.bias_code int32 {out}: the bias on the accumulator grid 2^(e_x + exp[c])
//                 (and <name>.bias is exactly bias_code * 2^(e_x + exp[c])).
// Per activation quantizer <name>: <name>.exp int32 {1} (codes are 0..2^b-1,
// or -(2^(b-1) - 1)..2^(b-1) - 1 when signed).
// Every other tensor the network needs to run (e.g. a batch norm that was not
// folded) is stored under its usual name.
//
// Metadata:
//   "hfq.model"         the ModelConfig (layers/model.h): which network to build
//   "hfq.quant_policy"  the QuantPolicy (the quantizer configuration)
//   "hfq.export"        {"format": "hfq-integer-2", "layers": [...], "activations": [...]}
//                       each layer: name, kind, op ("conv" / "linear"), method, bits,
//                       signed, per_channel, scale ("power-of-two" / "real"),
//                       batch_norm (the folded bn's name, or null), input_grid
//                       (W4A8: the activation quantizer its input is on, else
//                       null), accumulator_bound (W4A8: the largest |partial
//                       sum| in units, below 2^24 for a convolution, 2^31 for
//                       the classifier: see export_quantized_model), and for
//                       convs kernel, stride, padding, same_padding, groups;
//                       each activation: name, bits, signed, rounding, site and
//                       owner (quant/quantize_model.h QuantizedActivationSite).
//                       ("hfq-integer-1", before signed activations, reads as
//                       unsigned activation sites.)
//   "hfq.preprocessing" when given
//
// The exported values are those of the training graph in evaluation mode:
// Q(W_fold) with the moving statistics (docs/quantizers.md, 6), the exponent the
// quantizer evaluates with. quant/audit.h proves it.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/conv2d.h"
#include "layers/model.h"
#include "quant/activation_quantizer.h"
#include "quant/quantize_model.h"

namespace hfq::quant {

inline constexpr const char* kExportKey = "hfq.export";
inline constexpr const char* kExportFormat = "hfq-integer-2";
inline constexpr const char* kExportFormatV1 = "hfq-integer-1";  // read too

// Whether an export is W4A8: every layer's input on an activation grid (what
// the integer engine runs; a weight-only export has null input grids).
// Malformed metadata is an error naming the file.
bool is_w4a8_export(const SafetensorsFile& file);

void export_quantized_model(const std::string& path, Model& model, const QuantPolicy& policy,
                            const std::optional<Preprocessing>& preprocessing = std::nullopt);

// What one quantized layer of the training graph exports: the float weights
// its quantizer sees (W, or W_fold of a folded pair, with the moving
// statistics), their integer form in evaluation mode, and the bias.
struct LayerTensors {
    Tensor weight;
    Quantizer::IntegerForm integer;
    Tensor bias;                   // f32 {out} (W4A8: bias_code * 2^(e_x + exp[c]))
    std::vector<int32_t> bias_code;    // W4A8: the int32 bias, else empty
    const ActivationQuantizer* input_grid = nullptr;  // W4A8
    const Conv2d* conv = nullptr;  // the convolution (null for a linear layer)
    std::string batch_norm;        // the folded batch norm's full name, or ""
};
LayerTensors layer_tensors(const QuantizedLayer& layer);

// One conv or linear layer computed from the export alone:
//   y = conv(x, codes) (or x codes^T), one float accumulation per output,
//       then * scale[c] per output channel c, then + bias[c]
// where scale = 2^exp (lsq: the stored scale). The bias is added as
// conv(x, codes) + bias / scale before scaling, which for a power-of-two
// scale is the same float result as scaling first (both are exact
// multiplications by 2^exp of one rounded sum).
class IntegerLayer : public ActivationEnds {
public:
    // Reads "<name>.q", ".exp" / ".scale", ".bias" and the layer's entry in the export metadata.
    IntegerLayer(const SafetensorsFile& file, const std::string& name);

    Variable forward(const Variable& x) override;

    const std::string& name() const { return name_; }
    bool is_conv() const { return is_conv_; }
    const Tensor& codes() const { return codes_; }                // s8 {weight shape}
    const std::vector<float>& scales() const { return scales_; }  // per group
    const std::vector<int>& exponents() const { return exponents_; }  // per group (power-of-two scales)
    const Tensor& bias() const { return bias_; }                  // f32 {out}
    const Tensor& bias_code() const { return bias_code_; }        // s32 {out}, W4A8 only (else undefined)
    // W4A8: the activation quantizer site its input is on (else empty).
    const std::string& input_site() const { return input_site_; }
    const Conv2dParams& params() const { return params_; }        // convolutions
    // codes * scale: the weights the layer computes with, f32 {weight shape}.
    Tensor weights() const;

    std::string type_name() const override { return "IntegerLayer"; }
    std::string describe() const override;
    bool summary_row() const override { return true; }
    int64_t macs(const Shape& input, const Shape& output) const override;

private:
    std::string name_;
    bool is_conv_ = true;
    Conv2dParams params_;
    Tensor codes_;               // s8
    Variable code_values_;       // the codes as f32, the convolution's weights
    std::vector<float> scales_;  // per group
    std::vector<int> exponents_;
    Tensor channel_scale_;       // f32 {out}: scale of each output channel
    Variable bias_over_scale_;   // f32 {out}
    Tensor bias_, bias_code_;
    std::string input_site_;
};

// The network rebuilt from an export alone, in evaluation mode: the float
// model of "hfq.model" with every quantized layer (a folded conv + batch norm
// pair: both) replaced by an IntegerLayer, activation quantizers fixed at
// their exported exponents, and the remaining tensors loaded. Its accuracy is
// the integer-export accuracy.
std::shared_ptr<Model> build_model_from_export(const std::string& path);
std::shared_ptr<Model> build_model_from_export(const SafetensorsFile& file);

}  // namespace hfq::quant
