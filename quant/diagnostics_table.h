// The per-layer quantization diagnostics of a model (docs/quantizers.md, 5), as
// data for the trainer's JSON log and as a readable table:
//
//   auto rows = collect_diagnostics(model);      // calls every quantizer's report()
//   std::cout << diagnostics_table(rows);
//   log["quant"] = diagnostics_json(rows);
//
//   layer            kind              bits  exponent      flips  err/elt   clip%   chg%    e
//   features.0.0     conv+bn (folded)  8     -6            0      2.1e-07   0.000   0.12    -
//   features.1.0     conv+bn (folded)  4     -5..-2        3      4.4e-05   0.391   1.50    -
//   classifier       linear            8     -9            0      8.0e-09   0.000   0.00    -
//
// Per-channel exponents show as min..max, lsq's real scales as "s=min..max";
// "e" is the continuous exponent of learnable quantizers (min..max). A value
// not available yet (no training step; no previous step for chg%) shows "-"
// in the table and null in JSON.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "layers/model.h"
#include "quant/diagnostics.h"

namespace hfq::quant {

struct LayerDiagnostics {
    std::string name;  // "features.3.0"; activations: the activation's name
    std::string kind;  // "conv", "conv+bn (folded)", "linear", "activation"
    int bits = 0;
    bool per_channel = false;
    QuantizerDiagnostics report;
};

// Every quantized layer, then every activation quantizer, in model order.
// Calls report() on each, which resets their flip counts.
std::vector<LayerDiagnostics> collect_diagnostics(Model& model);

std::string diagnostics_table(const std::vector<LayerDiagnostics>& rows);
// [{"name", "kind", "bits", "per_channel", "method", "step", "exponents": [...],
//   "scales": [...], "continuous_exponents": [...], "flips", "flips_per_group": [...],
//   "error_per_element", "clipped_fraction", "codes_changed_fraction"}, ...]
nlohmann::json diagnostics_json(const std::vector<LayerDiagnostics>& rows);

}  // namespace hfq::quant
