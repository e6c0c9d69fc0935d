// The pointwise convolution path of conv2d (engine/conv2d_pointwise.cpp):
// 1x1 kernels, stride 1, no padding, groups 1, as matrix products.
#pragma once
#include "engine/autograd.h"

namespace hfq {

// The name conv2d_impl_names reports for these convolutions' three passes.
inline constexpr const char* kPointwiseImplName = "sgemm:pointwise";

// x {N,H,W,I}, weight {O,I,1,1}, bias {O} or undefined -> {N,H,W,O}. The
// caller (conv2d) has checked the shapes.
Variable pointwise_conv2d(const Variable& x, const Variable& weight, const Variable& bias);

}  // namespace hfq
