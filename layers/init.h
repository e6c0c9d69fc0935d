// Parameter initialisation schemes (as torch.nn.init), drawing from an Rng so
// a seed fixes the result.
#pragma once
#include "engine/random.h"
#include "engine/tensor.h"

namespace hfq {

// Normal(mean, std) in every element.
void init_normal(Tensor& t, Rng& rng, float mean, float std);
// He et al. for a layer followed by ReLU, scaled by the fan-out as
// torchvision's MobileNets do (kaiming_normal_(mode="fan_out")):
// std = sqrt(2 / fan_out), fan_out = shape[0] * (product of shape[2:]).
void init_kaiming_normal_fan_out(Tensor& weight, Rng& rng);

}  // namespace hfq
