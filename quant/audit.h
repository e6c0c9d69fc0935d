// The audit of an export (quant/export.h): what hardware would compute is
// what was trained.
//
//   export_quantized_model(path, model, policy);
//   AuditReport r = audit_export(model, path, sample_batch);
//   std::cout << r.to_string();  HFQ_CHECK(r.passed(), ...);
//
// For every quantized layer of the training graph:
//  1. Weights: codes * 2^exp (lsq: codes * scale) rebuilt from the file must
//     equal, element for element, the fake-quantized weight the training graph
//     uses in evaluation mode (Q(W), or Q(W_fold) with the moving statistics),
//     and the stored bias the graph's (folded) bias, bit for bit.
//  2. Outputs: the layer run from the export alone - a direct loop that
//     accumulates x * code in double, then scales by 2^exp and adds the bias,
//     independent of oneDNN - and the export's IntegerLayer (what
//     build_model_from_export runs) are compared with the training graph's
//     evaluation-mode output of that layer on the same input (random normal
//     values, {2, 9, 9, C} for a convolution, {2, in} for a linear layer).
//     Each output must lie within what float rounding allows, whatever the
//     order of the sums: with n products per output and the magnitude
//     M = sum |x code| s + |bias|, the training graph's float convolution is
//     within gamma(n + 2) M of the exact value (n products and the bias
//     summed, Q(W) = code * s rounded once), the direct loop within u M (one
//     rounding of a double), the IntegerLayer within gamma(n + 3) M (bias / s
//     rounded, the sum, the product with s); gamma(n) = n u / (1 - n u),
//     u = 2^-24. So the direct loop is held to gamma(n + 3) M, the
//     IntegerLayer to 2 gamma(n + 3) M (the bound ratios), and the largest
//     |difference| / max |training output| is reported as well.
// Activation quantizers: the stored exponent must be the one evaluation uses.
// With a sample input, the whole rebuilt model's logits are compared with the
// training graph's (evaluation mode) too.
#pragma once
#include <limits>
#include <string>
#include <vector>

#include "engine/tensor.h"
#include "layers/model.h"

namespace hfq::quant {

struct LayerAudit {
    std::string name, kind;
    int64_t weights = 0;            // elements compared
    int64_t weight_mismatches = 0;  // rebuilt weight != training graph's
    bool bias_exact = false;
    double reference_rel_diff = 0;      // direct double loop vs training graph
    double integer_layer_rel_diff = 0;  // IntegerLayer vs training graph
    // The worst |difference| / its rounding bound (<= 1: within).
    double reference_bound_ratio = 0;
    double integer_layer_bound_ratio = 0;
};

struct AuditReport {
    std::vector<LayerAudit> layers;
    int64_t activations = 0, activation_mismatches = 0;
    double logits_rel_diff = std::numeric_limits<double>::quiet_NaN();  // with a sample input
    double top1_agreement = std::numeric_limits<double>::quiet_NaN();   // fraction of equal argmax

    int64_t weight_mismatches() const;
    double max_rel_diff() const;     // over layers, both comparisons
    double max_bound_ratio() const;  // over layers, both comparisons
    // Weights and biases exact, activation exponents equal, layer outputs
    // within their rounding bounds.
    bool passed() const;
    // One line per layer and a summary.
    std::string to_string() const;
};

// `model` is the trained, quantized training graph; its mode is restored
// afterwards. sample_input (optional): a batch {N, H, W, C} for the
// end-to-end logits comparison.
AuditReport audit_export(Model& model, const std::string& export_path, const Tensor& sample_input = {},
                         uint64_t seed = 0);

}  // namespace hfq::quant
