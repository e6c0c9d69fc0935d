// A per-layer table of a model: output shape, parameters and multiply-
// accumulates (MACs), found by running one forward pass (evaluation mode, no
// gradients, zeros as input) and recording each layer's call.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "layers/module.h"

namespace hfq {

struct SummaryRow {
    std::string name;         // hierarchical module name, e.g. "features.3.conv.0.0"
    std::string description;  // e.g. "Conv2d(16, 96, k=1, s=1, p=0)"
    Shape output;             // NHWC, batch 1
    int64_t params = 0;       // parameters of this layer (and of what it wraps)
    int64_t macs = 0;         // per image
};

struct ModelSummary {
    Shape input;  // NHWC, batch 1
    std::vector<SummaryRow> rows;
    int64_t total_params = 0;  // all parameters of the model
    int64_t total_macs = 0;    // per image
    std::string to_string() const;
};

// `input` is {1, H, W, C}. The model's training mode is restored afterwards;
// no state changes (batch norm runs on its running statistics).
ModelSummary summarize(Module& model, const Shape& input);

}  // namespace hfq
