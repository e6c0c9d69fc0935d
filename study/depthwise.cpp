#include "study/depthwise.h"

#include <cmath>

#include "engine/check.h"
#include "layers/checkpoint.h"
#include "quant/export.h"
#include "train/training_checkpoint.h"

namespace hfq::study {

std::vector<DepthwiseLayer> depthwise_layers(const std::string& checkpoint, const quant::QuantPolicy& policy) {
    const SafetensorsFile file = model_tensors(read_safetensors(checkpoint));  // a training checkpoint too
    const std::optional<ModelConfig> config = checkpoint_model_config(file);
    HFQ_CHECK(config.has_value(), checkpoint, ": no model configuration (metadata '", kModelConfigKey, "')");
    std::shared_ptr<Model> model = build_model(*config);
    const auto stored = file.metadata.find(quant::kQuantPolicyKey);
    if (stored != file.metadata.end()) {
        quant::quantize_model(*model, quant::QuantPolicy::from_json(stored->second));
        load_state_dict(*model, file);  // strict: the quantizers' state too
    } else {
        load_state_dict(*model, file);
        quant::quantize_model(*model, policy);
    }
    model->eval();
    std::vector<DepthwiseLayer> out;
    for (const quant::QuantizedLayer& l : quant::quantized_layers(*model)) {
        const quant::LayerTensors t = quant::layer_tensors(l);
        if (!t.conv || !t.conv->is_depthwise()) continue;
        DepthwiseLayer d;
        d.name = l.name;
        d.weights.assign(t.weight.f32(), t.weight.f32() + t.weight.numel());
        d.scales = t.integer.scale;
        d.per_channel = l.quantizer->options().per_channel;
        d.qn = l.quantizer->grid().qn;
        d.qp = l.quantizer->grid().qp;
        out.push_back(std::move(d));
    }
    return out;
}

const DepthwiseLayer& most_outlier_heavy(const std::vector<DepthwiseLayer>& layers) {
    HFQ_CHECK(!layers.empty(), "qat_study: the model has no quantized depthwise convolution");
    auto ratio = [](const DepthwiseLayer& d) {
        double sum = 0, sum2 = 0, peak = 0;
        for (float w : d.weights) {
            sum += w;
            sum2 += double(w) * w;
            peak = std::max(peak, std::abs(double(w)));
        }
        const double n = double(d.weights.size());
        const double var = sum2 / n - (sum / n) * (sum / n);
        return var > 0 ? peak / std::sqrt(var) : 0.0;
    };
    const DepthwiseLayer* best = &layers.front();
    for (const DepthwiseLayer& d : layers)
        if (ratio(d) > ratio(*best)) best = &d;
    return *best;
}

}  // namespace hfq::study
