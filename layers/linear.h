// Fully connected layer: x {N, in} -> {N, out}; weight {out, in}, bias {out}.
#pragma once
#include "layers/module.h"

namespace hfq {

class Linear : public Module {
public:
    Linear(int in_features, int out_features, bool bias = true);

    Variable forward(const Variable& x) override { return apply(x, weight_); }
    // The layer with `weight` in place of its own (e.g. a quantized one).
    Variable apply(const Variable& x, const Variable& weight) const;

    int in_features() const { return in_; }
    int out_features() const { return out_; }
    Variable& weight() { return weight_; }
    Variable& bias() { return bias_; }  // undefined without bias

    std::string type_name() const override { return "Linear"; }
    std::string describe() const override;
    int64_t macs(const Shape& input, const Shape& output) const override;

protected:
    void reset_parameters(Rng& rng) override;  // weight ~ N(0, 0.01), zero bias (torchvision)

private:
    int in_, out_;
    Variable weight_, bias_;
};

}  // namespace hfq
