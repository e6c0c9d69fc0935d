// Diagnostics for conv2d (declared in engine/ops.h, implemented in
// engine/conv2d.cpp): which oneDNN kernels a convolution configuration runs.
#pragma once
#include <string>

#include "engine/ops.h"

namespace hfq {

// The oneDNN implementation names (primitive_desc::impl_info_str(), e.g.
// "jit_dw:avx2", "gemm:jit", "ref:any") that conv2d uses for these shapes,
// for its forward, backward-data and backward-weights passes. Creates the
// primitives if conv2d has not met this configuration yet; throws, as conv2d
// does, on shapes it would reject.
struct Conv2dImplNames {
    std::string forward, backward_data, backward_weights;
};
Conv2dImplNames conv2d_impl_names(const Shape& x, const Shape& weight, bool has_bias, const Conv2dParams& p);

}  // namespace hfq
