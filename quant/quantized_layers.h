// Layers with fake-quantized weights: Quantized<Conv2d> and Quantized<Linear>.
//
//   auto q = std::make_shared<Quantized<Conv2d>>(conv, make_quantizer("msqe-po2", opt, conv->weight().shape()));
//   parent.replace_child("0", q);          // the model now runs conv(x, Q(W))
//
// The wrapper registers the layer inline, so the layer keeps its names
// ("features.3.0.weight": a float checkpoint loads into the wrapped model),
// and its quantizer as the child "weight_quantizer", whose trainable scale
// (group ParamGroup::quantizer) and state buffers are named
// "features.3.0.weight_quantizer.log2_scale", "...weight_quantizer.exponent",
// ... and so are saved in checkpoints with everything else.
//
// forward(x) = layer.apply(x, Q(layer.weight)): the layer's own code path with
// the quantized weight in place of the float one (W4A8: see forward()); Q is evaluated in training
// mode (choosing scales, updating the quantizer's state) when the module is
// training, in evaluation mode (changing nothing) otherwise.
#pragma once
#include <memory>
#include <string>
#include <type_traits>

#include "layers/conv2d.h"
#include "layers/linear.h"
#include "layers/module.h"
#include "quant/activation_quantizer.h"
#include "quant/quantizer.h"

namespace hfq::quant {

// A Quantizer as a Module: its parameters and buffers become the module's.
class WeightQuantizer : public Module {
public:
    explicit WeightQuantizer(std::unique_ptr<Quantizer> quantizer);

    Quantizer& quantizer() { return *quantizer_; }
    const Quantizer& quantizer() const { return *quantizer_; }
    // Q(weight), in training mode when this module is training.
    Variable quantize(const Variable& weight) { return quantizer_->fake_quantize(weight, is_training()); }
    Variable forward(const Variable& weight) override { return quantize(weight); }

    std::string type_name() const override { return "WeightQuantizer"; }
    // "msqe-po2, 4 bits signed, per channel"
    std::string describe() const override;

private:
    std::unique_ptr<Quantizer> quantizer_;
};

// What every quantized wrapper tells the model-level code (quantize_model.h,
// diagnostics, export). Its activation quantizers, if any (W4A8), are the
// ActivationEnds'.
class QuantizedModule : public ActivationEnds {
public:
    // "conv", "linear", "conv+bn (folded)"
    virtual std::string kind() const = 0;
    virtual WeightQuantizer& weight_quantizer() = 0;
    Quantizer& quantizer() { return weight_quantizer().quantizer(); }
    // The quantized layer's name relative to this module's own name: "" when
    // the wrapper took the layer's place, the convolution's old name for a
    // folded pair (which sits inline in its parent).
    virtual std::string layer_name() const { return ""; }
    // One summary row per wrapper, with the wrapped layer's MACs.
    bool summary_row() const override { return true; }

protected:
    // With an input grid (W4A8): the bias on the accumulator grid of this
    // pass, 2^(e_x + e_w[o]) for the fake-quantized weights w_q
    // (quant/accumulator.h); without, the bias.
    Variable accumulator_bias(const Variable& bias, const Variable& w_q);
};

// Layer is Conv2d or Linear (instantiated in quantized_layers.cpp).
template <class Layer>
class Quantized : public QuantizedModule {
public:
    // The quantizer must have been made for layer->weight()'s shape.
    Quantized(std::shared_ptr<Layer> layer, std::unique_ptr<Quantizer> quantizer);

    // quantize_output(layer(quantize_input(x), Q(W), b)), b the layer's bias on
    // the accumulator grid when there is an input grid; then a linear
    // layer evaluates with exact_linear (quant/accumulator.h).
    Variable forward(const Variable& x) override;

    Layer& layer() { return *layer_; }
    const std::shared_ptr<Layer>& layer_ptr() const { return layer_; }
    WeightQuantizer& weight_quantizer() override { return *quantizer_; }
    std::string kind() const override { return std::is_same_v<Layer, Conv2d> ? "conv" : "linear"; }
    std::string type_name() const override { return "Quantized<" + layer_->type_name() + ">"; }
    std::string describe() const override { return layer_->describe() + " @ " + quantizer_->describe(); }
    int64_t macs(const Shape& input, const Shape& output) const override { return layer_->macs(input, output); }

private:
    std::shared_ptr<Layer> layer_;
    std::shared_ptr<WeightQuantizer> quantizer_;
};

extern template class Quantized<Conv2d>;
extern template class Quantized<Linear>;
using QuantizedConv2d = Quantized<Conv2d>;
using QuantizedLinear = Quantized<Linear>;

}  // namespace hfq::quant
