#include "quant/quantized_layers.h"

#include "engine/check.h"
#include "engine/ops.h"
#include "quant/accumulator.h"

namespace hfq::quant {

WeightQuantizer::WeightQuantizer(std::unique_ptr<Quantizer> quantizer) : quantizer_(std::move(quantizer)) {
    HFQ_CHECK(quantizer_ != nullptr, "WeightQuantizer: null quantizer");
    for (auto& [name, slot] : quantizer_->named_parameters()) register_parameter(name, slot, ParamGroup::quantizer);
    for (auto& [name, slot] : quantizer_->named_buffers()) register_buffer(name, slot);
}

std::string WeightQuantizer::describe() const {
    const QuantizerOptions& o = quantizer_->options();
    return cat(quantizer_->method(), ", ", o.bits, " bits ", o.is_signed ? "signed" : "unsigned",
               o.per_channel ? ", per channel" : ", per tensor");
}

template <class Layer>
Quantized<Layer>::Quantized(std::shared_ptr<Layer> layer, std::unique_ptr<Quantizer> quantizer)
    : layer_(std::move(layer)) {
    HFQ_CHECK(layer_ != nullptr, "Quantized: null layer");
    HFQ_CHECK(quantizer != nullptr && quantizer->weight_shape() == layer_->weight().shape(), "Quantized<",
              layer_->type_name(), ">: the quantizer must be made for the weight shape ",
              shape_str(layer_->weight().shape()));
    quantizer_ = std::make_shared<WeightQuantizer>(std::move(quantizer));
    register_inline(layer_);
    register_module("weight_quantizer", quantizer_);
    train(layer_->is_training());
}

template <class Layer>
Variable Quantized<Layer>::forward(const Variable& input) {
    const Variable x = quantize_input(input);
    const Variable w = quantizer_->quantize(layer_->weight());
    if (!input_grid()) return quantize_output(layer_->apply(x, w));
    const Variable b = layer_->bias().defined() ? accumulator_bias(layer_->bias(), w) : Variable();
    if constexpr (std::is_same_v<Layer, Conv2d>)
        return quantize_output(conv2d(x, w, b, layer_->config().params));
    else
        return quantize_output(is_training() ? linear(x, w, b) : exact_linear(x, w, b));
}

Variable QuantizedModule::accumulator_bias(const Variable& bias, const Variable& w_q) {
    if (!input_grid()) return bias;
    const int e_x = input_grid()->last_forward_exponent();
    HFQ_CHECK(!quantizer().exponents_of_last_pass().empty(), "quantized layer: a bias on the accumulator grid needs a "
              "power-of-two weight scale (", quantizer().method(), " has none)");
    std::vector<int> units =
        accumulator_weight_exponents(e_x, quantizer().exponents_of_last_pass(), w_q.value(), bias.value());
    for (int& u : units) u += e_x;
    return quantize_bias(bias, units);
}

template class Quantized<Conv2d>;
template class Quantized<Linear>;

}  // namespace hfq::quant
