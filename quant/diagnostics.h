// What a quantizer reports about itself (docs/quantizers.md, 5): the quantities the
// paper uses to tell outlier sensitivity (large error, many clipped weights)
// from scale instability (flips, codes that keep changing).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace hfq::quant {

// Every "last step" value describes the most recent training forward pass;
// a quantity that is not available yet (no training step, or no previous
// step to compare with) is NaN.
struct QuantizerDiagnostics {
    std::string method;
    int64_t step = 0;                         // training forward passes so far
    std::vector<int> exponents;               // power-of-two exponent per scale group in use
                                              // (empty for lsq, whose scale is real)
    std::vector<float> scales;                // scale per group in use (2^exponent, or lsq's s)
    std::vector<float> continuous_exponents;  // learnable-po2: the trained e per group; else empty
    std::vector<int64_t> flips_per_group;     // exponent changes since the last report
    int64_t flips = 0;                        // their sum
    double error_per_element = 0;             // sum (x - Q(x))^2 / numel, unweighted
    double clipped_fraction = 0;              // weights outside the grid's range
    double codes_changed_fraction = 0;        // integer codes that changed since the previous step
};

}  // namespace hfq::quant
