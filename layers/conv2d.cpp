#include "layers/conv2d.h"

#include "engine/check.h"
#include "layers/init.h"

namespace hfq {

Conv2d::Conv2d(const Conv2dConfig& c) : config_(c) {
    const Conv2dParams& p = c.params;
    HFQ_CHECK(c.in_channels > 0 && c.out_channels > 0 && c.kernel > 0 && p.stride > 0 && p.padding >= 0 && p.groups > 0,
              "Conv2d: invalid configuration in=", c.in_channels, " out=", c.out_channels, " kernel=", c.kernel,
              " stride=", p.stride, " padding=", p.padding, " groups=", p.groups);
    HFQ_CHECK(c.in_channels % p.groups == 0 && c.out_channels % p.groups == 0, "Conv2d: groups=", p.groups,
              " must divide in=", c.in_channels, " and out=", c.out_channels);
    weight_ = Variable(Tensor::zeros({c.out_channels, c.in_channels / p.groups, c.kernel, c.kernel}), true);
    register_parameter("weight", &weight_, ParamGroup::weight);
    if (c.bias) {
        bias_ = Variable(Tensor::zeros({c.out_channels}), true);
        register_parameter("bias", &bias_, ParamGroup::bias);
    }
}

std::shared_ptr<Conv2d> Conv2d::make(int in_channels, int out_channels, int kernel, int stride, int groups, bool bias) {
    Conv2dConfig c{in_channels, out_channels, kernel, {}, bias};
    c.params.stride = stride;
    c.params.padding = kernel / 2;
    c.params.groups = groups;
    return std::make_shared<Conv2d>(c);
}

std::shared_ptr<Conv2d> Conv2d::depthwise(int channels, int kernel, int stride, bool bias) {
    return make(channels, channels, kernel, stride, channels, bias);
}

std::shared_ptr<Conv2d> Conv2d::pointwise(int in_channels, int out_channels, bool bias) {
    return make(in_channels, out_channels, 1, 1, 1, bias);
}

Variable Conv2d::apply(const Variable& x, const Variable& weight) const {
    return conv2d(x, weight, bias_, config_.params);
}

bool Conv2d::is_depthwise() const {
    return config_.params.groups > 1 && config_.params.groups == config_.in_channels &&
           config_.in_channels == config_.out_channels;
}

std::string Conv2d::describe() const {
    const Conv2dParams& p = config_.params;
    return cat("Conv2d(", config_.in_channels, ", ", config_.out_channels, ", k=", config_.kernel, ", s=", p.stride,
               p.same_padding ? ", SAME" : cat(", p=", p.padding), p.groups > 1 ? cat(", groups=", p.groups) : "",
               config_.bias ? ", bias" : "", ")");
}

// Per output element: (in / groups) * k * k multiply-accumulates.
int64_t Conv2d::macs(const Shape&, const Shape& output) const {
    return shape_numel(output) * (config_.in_channels / config_.params.groups) * config_.kernel * config_.kernel;
}

void Conv2d::reset_parameters(Rng& rng) {
    init_kaiming_normal_fan_out(weight_.value(), rng);
    if (bias_.defined()) bias_.value().fill(0.0f);
}

}  // namespace hfq
