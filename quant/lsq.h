// lsq (docs/quantizers.md, 4.2; Esser et al. 2019, "Learned Step Size Quantization"): a real,
// not power-of-two, scale s per group trained by back-propagation, included
// as the most common learned-scale quantizer to compare against:
//   s initialised to 2 mean|x| / sqrt(qp) from the first weights seen,
//   dL/ds = sum_i g_i t_i / sqrt(N qp)  (N: the elements of the scale group),
//   dL/dx = g * m(x; s),
//   s kept >= min_init_scale (a step that carries it below is projected back).
#pragma once
#include "quant/quantizer.h"

namespace hfq::quant {

class LsqQuantizer : public Quantizer {
public:
    LsqQuantizer(const QuantizerOptions& options, const Shape& weight_shape);

    // s {groups}: a leaf with requires_grad.
    const Variable& scale() const { return s_; }
    std::vector<std::pair<std::string, Variable*>> named_parameters() override { return {{"scale", &s_}}; }

protected:
    ScaleChoice choose_scales(const Tensor& x, bool training) override;
    Variable scale_parameter() const override { return s_; }
    double scale_gradient_factor(int64_t group, float scale) const override;

private:
    Variable s_;
};

}  // namespace hfq::quant
