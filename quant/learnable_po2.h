// learnable-po2 (docs/quantizers.md, 4.1): a TQT-style quantizer whose continuous log2-scale
// e (one per scale group) is trained by back-propagation. The forward pass
// uses the integer exponent k = ceil(e), rint(e) or - the paper's fix -
// msqe-round (Round-to-Lower-MSQE: floor(e) if that gives a strictly lower
// weighted error than ceil(e)). The exponent is straight-through:
// s = 2^(e + (k - e)) with k - e held constant, so ds/de = s ln 2 and
//   dL/de = sum_i g_i s ln2 t_i,  t_i = rint(u_i) - u_i in range, -qn below, qp above,
// with u = x / s, while dL/dx = g * m(x; s).
#pragma once
#include "quant/quantizer.h"

namespace hfq::quant {

class LearnablePo2Quantizer : public Quantizer {
public:
    LearnablePo2Quantizer(const QuantizerOptions& options, const Shape& weight_shape);

    // e {groups}: a leaf with requires_grad, initialised from the first weights
    // seen in training to log2(max(3 std / qp, min_init_scale)) (not rounded).
    const Variable& log2_scale() const { return e_; }
    std::vector<std::pair<std::string, Variable*>> named_parameters() override { return {{"log2_scale", &e_}}; }

protected:
    ScaleChoice choose_scales(const Tensor& x, bool training) override;
    Variable scale_parameter() const override { return e_; }
    double scale_gradient_factor(int64_t group, float scale) const override;
    void describe(QuantizerDiagnostics& d) const override;

private:
    Variable e_;
};

}  // namespace hfq::quant
