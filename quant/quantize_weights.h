// Post-training quantization of a weights file (the quantize_weights program):
// any quantizer of docs/quantizers.md applied to every float tensor of rank 2 or more,
// in the state a fresh quantizer has at its first step (no gradient
// statistics yet: second moments all 1).
//
// For each such tensor T of IN, OUT holds
//   T.q     int8  {T's shape}   the integer codes
//   T.exp   int32 {groups}      the power-of-two exponents, one per tensor or,
//                               per channel, one per index of axis 0
//           (lsq: T.scale float32 {groups}, its real scales, instead)
//   T.err   float32 {groups}    the quantization error sum (T - Q(T))^2 per
//                               scale group, unweighted
// and the metadata "hfq.quantize_weights": {"method", "bits", "per_channel",
// "rounding", "source"}. Other tensors (rank < 2, integer) are not written.
#pragma once
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace hfq::quant {

inline constexpr const char* kQuantizeWeightsKey = "hfq.quantize_weights";

struct QuantizedTensorInfo {
    std::string name;
    Shape shape;
    std::vector<int> exponents;  // per group (empty for lsq)
    std::vector<float> scales;   // per group
    std::vector<double> errors;  // per group: sum (T - Q(T))^2
};

struct QuantizeWeightsReport {
    std::vector<QuantizedTensorInfo> tensors;  // in file order
    std::vector<std::string> skipped;          // not float, or rank < 2
};

// Reads `in`, writes `out` atomically. Errors (hfq::Error): unknown method or
// bad options (checked before anything is read), `out` naming the same file as
// `in` (never overwritten), a missing or corrupt input (the message names the
// file), no tensor to quantize.
QuantizeWeightsReport quantize_weights(const std::string& in, const std::string& out, const std::string& method,
                                       const QuantizerOptions& options);

// The table the program prints: name, shape, exponent(s) or scale(s), error.
std::string quantize_weights_summary(const QuantizeWeightsReport& report);

}  // namespace hfq::quant
