#include "quant/quantized_layers.h"

#include "engine/check.h"

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

template class Quantized<Conv2d>;
template class Quantized<Linear>;

}  // namespace hfq::quant
