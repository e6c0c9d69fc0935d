// The depthwise layers of a saved model as its quantizers see them: the
// weights they quantize (batch norm folded in, with the moving statistics)
// and the grid they chose, for the study's histogram figure.
#pragma once
#include <string>
#include <vector>

#include "quant/quantize_model.h"

namespace hfq::study {

struct DepthwiseLayer {
    std::string name;            // "features.5.0"
    std::vector<float> weights;  // W (or W_fold), {channels, 1, k, k} row-major
    std::vector<float> scales;   // the grid step per scale group, in evaluation mode
    bool per_channel = false;
    int qn = 7, qp = 7;  // codes in [-qn, qp]
};

// Reads a checkpoint: a quantized model (final.safetensors of a QAT run,
// quantized by its metadata's policy) or a float one, which is quantized by
// `policy` first (its quantizers then choose the scales their first training
// step would). Every quantized depthwise convolution, in model order.
std::vector<DepthwiseLayer> depthwise_layers(const std::string& checkpoint, const quant::QuantPolicy& policy);

// The layer whose weights have the largest max|w| / std(w): the one most
// affected by outliers. Throws when the list is empty.
const DepthwiseLayer& most_outlier_heavy(const std::vector<DepthwiseLayer>& layers);

}  // namespace hfq::study
