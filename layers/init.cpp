#include "layers/init.h"

#include <cmath>

#include "engine/check.h"

namespace hfq {

void init_normal(Tensor& t, Rng& rng, float mean, float std) {
    float* p = t.f32();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = mean + std * rng.normal();
}

void init_kaiming_normal_fan_out(Tensor& weight, Rng& rng) {
    HFQ_CHECK(weight.rank() >= 2, "init_kaiming_normal_fan_out: weight of shape ", shape_str(weight.shape()),
              " has no fan-out");
    int64_t fan_out = weight.dim(0);
    for (int i = 2; i < weight.rank(); ++i) fan_out *= weight.dim(i);
    init_normal(weight, rng, 0.0f, static_cast<float>(std::sqrt(2.0 / double(fan_out))));
}

}  // namespace hfq
