// msqe-baseline (docs/quantizers.md, 3.1): the traditional power-of-two MSQE quantizer.
// Stateless: every forward pass starts again from s = po2(max|x| / qp) and
// runs a fixed number of least-squares iterations with codes rounded half
// away from zero. Without memory or best-keeping the exponent can flip
// between two neighbours from one step to the next - the instability the
// paper diagnoses. Its straight-through estimator is the identity.
#pragma once
#include "quant/quantizer.h"

namespace hfq::quant {

class MsqeBaselineQuantizer : public Quantizer {
public:
    MsqeBaselineQuantizer(const QuantizerOptions& options, const Shape& weight_shape);

protected:
    ScaleChoice choose_scales(const Tensor& x, bool training) override;
    Rounding code_rounding() const override { return Rounding::half_away; }
    bool identity_ste() const override { return true; }
};

}  // namespace hfq::quant
