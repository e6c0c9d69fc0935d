// Plain element-wise arithmetic on f32 tensors, outside autograd: gradient
// accumulation, optimizer updates, test helpers. Shapes must match exactly
// (no broadcasting); a mismatch throws naming the function and both shapes.
#pragma once
#include "engine/tensor.h"

namespace hfq {

Tensor add(const Tensor& a, const Tensor& b);         // a + b
Tensor sub(const Tensor& a, const Tensor& b);         // a - b
Tensor mul(const Tensor& a, const Tensor& b);         // a * b
Tensor scale(const Tensor& a, float s);               // s * a
void add_(Tensor& a, const Tensor& b);                // a += b
void axpy_(Tensor& y, float alpha, const Tensor& x);  // y += alpha * x
double sum_f64(const Tensor& a);                      // in double, fixed order
float max_abs(const Tensor& a);
// Largest |a - b| / max(|b|, floor) over all elements: the relative error
// used to compare against reference values.
double max_rel_diff(const Tensor& a, const Tensor& b, double floor = 1e-3);

}  // namespace hfq
