// The integer engine: a W4A8 export (quant/export.h, every layer with an
// input grid) run with integer arithmetic only, as a fixed-point accelerator
// runs it. Its logits times their scales equal the fake-quant evaluation's
// bit for bit, and so do the codes at every layer boundary
// (tests/test_integer_engine.cpp).
//
// Between layers every tensor is a code tensor: integers c on the grid of an
// activation quantizer, value c 2^e (one exponent e per tensor; 8-bit codes,
// unsigned 0..255 after a ReLU6, signed -127..127 elsewhere). A layer's
// arithmetic, for output channel o (u[o] = e_x + e_w[o] its accumulator's
// exponent):
//   acc[o] = sum_k c_x[k] c_w[o, k] + bias_code[o]               int32, exact:
//            the export proves |acc| < 2^24 (convolutions) or < 2^31 (classifier)
// then the next grid (exponent e_y, codes in [-qn, qp]) by one rounding:
//   c_y = clip(round_half_even(acc 2^(u[o] - e_y) / d), lo, hi)
// with d = 1, except after global average pooling (d = H W: the sum of the
// codes divided once, exactly, not a float mean). lo = -qn on a signed grid,
// 0 on an unsigned one (the ReLU: rounding commutes with max(., 0)), hi = qp,
// and for ReLU6 hi = min(qp, round_half_even(6 2^-e_y)) (rounding commutes
// with min(., 6) too: ReLU6 is a clamp in code units). The residual sum of
// codes a (e_a) and b (e_b) aligns them by a shift, exactly:
//   acc = a 2^(e_a - m) + b 2^(e_b - m),  m = min(e_a, e_b),  u = m.
// The logits are int32 accumulators: logit[o] = acc[o] 2^u[o].
// The image is the one float input: c = clip(rint(x / 2^e), -qn, qp), as the
// first layer's input quantizer computes it.
//
// Why this equals the fake-quant graph: there, every convolution adds
// integer multiples of 2^u[o] in float32, exact below 2^24 units (the same
// sum); the classifier adds in double (quant/accumulator.h exact_linear);
// multiplying by a power of two is exact; and the float pooling's mean
// S / (H W), rounded to float, is within |S| 2^-23 / (H W) of the exact
// quotient, too little to cross a rounding boundary of the next grid (those
// lie at least 2^(e_x - e_y) / (2 H W) away from any other value S / (H W)
// can take, in code units), since |S| < 2^22 for H W < 2^14 8-bit codes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "engine/tensor.h"
#include "layers/model.h"
#include "quant/grid.h"

namespace hfq::deploy {

// Integers on one grid: value = codes * 2^exponent.
struct CodeTensor {
    Shape shape;                 // {N, H, W, C} or {N, C}
    std::vector<int16_t> codes;  // row-major
    int exponent = 0;
    quant::Grid grid;
    std::string site;      // the activation quantizer whose grid it is
    std::string producer;  // the layer whose accumulator it was requantized from ("" otherwise)
};

// An accumulator tensor: value = acc * 2^unit[channel] / divisor.
struct Accumulator {
    Shape shape;  // {N, H, W, C} or {N, C}
    std::vector<int32_t> acc;
    std::vector<int> unit;  // per channel (the last dimension)
    int64_t divisor = 1;
    std::string producer;  // the layer that accumulated it ("" for a sum or the pooling)
};

class IntegerEngine {
public:
    // Reads the export and checks it is one the engine can run (every layer
    // has an input grid and a bias code, every tensor between layers a
    // quantizer); throws naming the file and the part that is not.
    explicit IntegerEngine(const std::string& export_path);
    explicit IntegerEngine(const SafetensorsFile& file);
    ~IntegerEngine();

    struct Result {
        Accumulator logits;                   // {N, classes}, int32 with per-class exponents
        std::vector<std::string> boundary_names;  // with keep_boundaries: every quantizer's name,
        std::vector<CodeTensor> boundaries;       // in the order they ran, and its codes
        // float(acc) * 2^unit: the logits as float (exact: 2^u scales exactly,
        // and float(acc) is what the fake-quant graph's sum rounds to).
        Tensor float_logits() const;
    };
    // images {N, H, W, C} f32, normalised as the model was trained.
    Result run(const Tensor& images, bool keep_boundaries = false) const;

    const Model& model() const { return *model_; }

private:
    struct Prepared;  // every layer's weights in the loops' order
    std::shared_ptr<Model> model_;  // the export's network (quant::build_model_from_export)
    std::string source_;
    std::unique_ptr<Prepared> prepared_;
};

// round_half_even(n / d) for d > 0, in integers.
int64_t divide_round_half_even(int64_t n, int64_t d);
// round_half_even(v / 2^s) by an arithmetic shift (s <= 0: v 2^-s), the
// same rounding without a division; |v| < 2^62.
int64_t shift_round_half_even(int64_t v, int s);

}  // namespace hfq::deploy
