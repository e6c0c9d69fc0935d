#include "layers/batch_norm.h"

#include "engine/check.h"
#include "engine/ops.h"

namespace hfq {

BatchNorm2d::BatchNorm2d(int channels, float momentum, float eps)
    : channels_(channels), momentum_(momentum), eps_(eps) {
    HFQ_CHECK(channels > 0 && momentum >= 0 && momentum <= 1 && eps > 0, "BatchNorm2d: invalid channels=", channels,
              " momentum=", momentum, " eps=", eps);
    weight_ = Variable(Tensor::full({channels}, 1.0f), true);
    bias_ = Variable(Tensor::zeros({channels}), true);
    running_mean_ = Tensor::zeros({channels});
    running_var_ = Tensor::full({channels}, 1.0f);
    num_batches_tracked_ = Tensor::zeros({}, DType::s64);
    register_parameter("weight", &weight_, ParamGroup::bn);
    register_parameter("bias", &bias_, ParamGroup::bn);
    register_buffer("running_mean", &running_mean_);
    register_buffer("running_var", &running_var_);
    register_buffer("num_batches_tracked", &num_batches_tracked_);
}

// op is batch_norm or batch_norm_relu6.
template <class Op>
Variable BatchNorm2d::apply(Op op, const Variable& x) {
    HFQ_CHECK(x.value().rank() == 4 && x.shape()[3] == channels_, "BatchNorm2d(", channels_,
              "): expected an NHWC input with ", channels_, " channels, got ", shape_str(x.shape()));
    Variable y = op(x, weight_, bias_, running_mean_, running_var_, is_training(), momentum_, eps_);
    if (is_training()) num_batches_tracked_.data<int64_t>()[0] += 1;
    return y;
}

Variable BatchNorm2d::forward(const Variable& x) { return apply(batch_norm, x); }
Variable BatchNorm2d::forward_relu6(const Variable& x) { return apply(batch_norm_relu6, x); }

std::string BatchNorm2d::describe() const { return cat("BatchNorm2d(", channels_, ")"); }

void BatchNorm2d::reset_parameters(Rng&) {
    weight_.value().fill(1.0f);
    bias_.value().fill(0.0f);
    running_mean_.fill(0.0f);
    running_var_.fill(1.0f);
    num_batches_tracked_.data<int64_t>()[0] = 0;
}

}  // namespace hfq
