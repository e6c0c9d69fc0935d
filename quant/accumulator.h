// What an integer accelerator's accumulator holds, in the fake-quant graph of
// a W4A8 model (policy.activation_bits > 0).
//
// A convolution or linear layer whose input is on the grid x = c_x 2^e_x and
// whose weights are w = c_w 2^e_w[o] (per output channel o, or one e_w)
// accumulates integers:   acc[o] = sum c_x c_w + b_code[o]
// in units of 2^u[o], u[o] = e_x + e_w[o] (the accumulator scale). So the
// bias must be on that grid too: as Jacob et al. 2018 and TFLite do, it is
// stored as the int32
//   b_code[o] = clamp(rint(b[o] / 2^u[o]), -(2^31 - 1), 2^31 - 1)
// and the fake-quant graph adds b_code[o] 2^u[o] in place of b[o] (training
// and evaluation), passing the gradient straight through (d b_q / d b = 1).
//
// The float32 sums of the fake-quant graph then hold integer multiples of
// 2^u[o], and are exact while every partial sum stays below 2^24 units
// (quant/export proves it per layer from the code ranges). Where it cannot
// (the classifier: 1280 features x 255 x 127 > 2^24), evaluation uses
// exact_linear, which accumulates in double: exact below 2^53 units, rounded
// once to float, as the integer engine's int32 logit converted to float.
#pragma once
#include <cstdint>
#include <vector>

#include "engine/autograd.h"

namespace hfq::quant {

// rint(b / 2^unit_exponent), clamped to the int32 range (NaN: refused).
int32_t bias_code(float b, int unit_exponent);

// The weight exponents a W4A8 layer accumulates with, per scale group:
// the quantizer's, except for a group whose codes are all zero. Its
// channels output their bias alone, and any exponent gives the same zero
// weights, but the one a quantizer picks for zeros can lie far below the
// bias (a dead channel, zeroed by quant/quantize_model.h zero_dead_channels,
// gets msqe-po2's smallest exponent), which would put the bias code beyond
// what float32 sums exactly: such a group's exponent is raised until every
// bias code of its channels is at most 2^22 in size. The fake-quant graph and
// the export use this one rule, so they agree.
//   e_w     the quantizer's exponents {groups} (1 group: per tensor)
//   w_q     the fake-quantized weights {O, ...}
//   bias    {O}
std::vector<int> accumulator_weight_exponents(int e_x, std::vector<int> e_w, const Tensor& w_q, const Tensor& bias);

// b {O} -> b_code[o] 2^u[o] with u = unit_exponents ({O} or {1} for all).
// Backward: the gradient passes unchanged.
Variable quantize_bias(const Variable& bias, const std::vector<int>& unit_exponents);

// x {N, In}, w {Out, In}, b {Out} (or undefined: zeros): y = float(sum_k double(x w) + double(b)),
// the sum exact when x, w and b are small multiples of 2^-k (no gradient:
// evaluation only; throws if asked for one).
Variable exact_linear(const Variable& x, const Variable& w, const Variable& b);

// x {N, H, W, C} -> {N, C}: float(S / (H W)) with S = sum over the H W
// positions in double (exact for codes on a grid), divided in double, then
// rounded to float: within |S / (H W)| (2^-24 + 2^-53) of the exact mean,
// and exact when the mean is a float, as every tie of the next grid's
// rounding is (so a tie stays a tie; the integer engine divides S exactly).
// The pooling of a W4A8 model (QuantizedActivation). Backward: dy / (H W).
Variable exact_global_mean(const Variable& x);

}  // namespace hfq::quant
