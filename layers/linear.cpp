#include "layers/linear.h"

#include "engine/check.h"
#include "engine/ops.h"
#include "layers/init.h"

namespace hfq {

Linear::Linear(int in_features, int out_features, bool bias) : in_(in_features), out_(out_features) {
    HFQ_CHECK(in_features > 0 && out_features > 0, "Linear: invalid sizes in=", in_features, " out=", out_features);
    weight_ = Variable(Tensor::zeros({out_features, in_features}), true);
    register_parameter("weight", &weight_, ParamGroup::weight);
    if (bias) {
        bias_ = Variable(Tensor::zeros({out_features}), true);
        register_parameter("bias", &bias_, ParamGroup::bias);
    }
}

Variable Linear::apply(const Variable& x, const Variable& weight) const { return linear(x, weight, bias_); }

std::string Linear::describe() const {
    return cat("Linear(", in_, ", ", out_, bias_.defined() ? "" : ", no bias", ")");
}

int64_t Linear::macs(const Shape&, const Shape& output) const { return shape_numel(output) * in_; }

void Linear::reset_parameters(Rng& rng) {
    init_normal(weight_.value(), rng, 0.0f, 0.01f);
    if (bias_.defined()) bias_.value().fill(0.0f);
}

}  // namespace hfq
