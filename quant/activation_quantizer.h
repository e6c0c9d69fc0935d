// Activation quantization (W4A8, policy.activation_bits): a tensor that
// enters a convolution or the classifier fake-quantized with a learnable
// power-of-two scale, as learnable-po2 (docs/quantizers.md, 4.1) does for
// weights: on an unsigned grid (0 .. 2^b - 1) after a ReLU / ReLU6 or the
// pooling of such outputs, on a signed one (-2^(b-1) .. 2^(b-1) - 1) for the
// network input, MobileNetV2's linear bottlenecks and its residual sums:
//
//   e        trained continuous log2-scale ("log2_scale", ParamGroup::quantizer),
//            initialised at the first training step to log2(max(3 std(x) / qp, min_init_scale))
//   k        the integer exponent: ceil(e), rint(e) or msqe-round (floor(e) if
//            E(2^floor e) < E(2^ceil e) with w = 1[|x| <= 2^e (qp + 0.5)], else ceil(e))
//   y        = 2^k clip(rint(x / 2^k), 0, qp)
//   dL/dx    = g * m(x; 2^k)                       (straight-through, clipped)
//   dL/de    = sum g 2^k ln2 t,  t = rint(u) - u in range, qp above (u = x / 2^k)
//
// Why not a Quantizer: a Quantizer is built for one weight shape and keeps
// per-element state (second moments); an activation changes shape with the
// batch and has no per-element state. The scale is one per tensor, chosen on
// the whole batch (in a data-parallel run, every replica's share of it:
// engine/replicas.h); sums are taken over fixed chunks combined in order (the
// same result at any thread count).
//
// Evaluation uses the exponent the last training step chose (a buffer), so a
// trained network's activation scale is fixed, as hardware needs it; before
// any training it computes what the first training step would use.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "layers/module.h"
#include "quant/diagnostics.h"
#include "quant/grid.h"
#include "quant/quantizer.h"

namespace hfq::quant {

// The population std of x {n}, over every replica's x when across_replicas
// (engine/replicas.h): the mean from the summed sums and counts, then the
// summed squared deviations from it. Each replica's sums are added as
// population_std (grid.cpp) adds them, and the sums over replicas are the
// identity in a single process: there it is population_std(x, n) bit for
// bit. What the first training step initialises e from (exposed for tests).
double activation_std(const float* x, int64_t n, bool across_replicas);

class ActivationQuantizer : public Module {
public:
    // bits 2..8; rounding and min_init_scale as learnable-po2's options.
    ActivationQuantizer(int bits, ExponentRounding rounding, float min_init_scale = 1e-5f, bool is_signed = false);

    Variable forward(const Variable& x) override;

    const Grid& grid() const { return grid_; }
    ExponentRounding rounding() const { return rounding_; }
    Variable& log2_scale() { return e_; }
    // The exponent evaluation uses (the last training step's choice).
    int exponent() const { return exponent_.data<int32_t>()[0]; }
    // The exponent the most recent forward used (training or evaluation):
    // the grid of the tensor it returned, which the next layer's bias
    // quantization needs (quant/accumulator.h).
    int last_forward_exponent() const { return last_forward_exponent_; }
    bool initialized() const { return initialized_.data<int32_t>()[0] != 0; }
    int64_t step() const { return step_.data<int64_t>()[0]; }

    // Called with every output of forward (values on the grid, f32): lets a
    // caller see a layer boundary's codes (the integer engine's test).
    void set_observer(std::function<void(const Tensor&)> f) { observer_ = std::move(f); }

    // As Quantizer::report(): exponent, continuous e, error per element and
    // clipped fraction of the last training step, flips since the last report.
    // codes_changed_fraction is NaN (activations change with every input).
    QuantizerDiagnostics report();
    void reset_diagnostics();

    std::string type_name() const override { return "ActivationQuantizer"; }
    std::string describe() const override;

private:
    // k for e on x; the msqe-round errors summed over the replicas when across_replicas.
    int choose_exponent(const float* x, int64_t n, float e, bool across_replicas);

    Grid grid_;
    ExponentRounding rounding_;
    float min_init_scale_;
    Variable e_;                                        // {1}
    Tensor exponent_ = Tensor::zeros({1}, DType::s32);  // the last training step's k
    Tensor step_ = Tensor::zeros({1}, DType::s64);
    Tensor initialized_ = Tensor::zeros({1}, DType::s32);
    std::vector<float> mask_;  // reused: the msqe-round weights
    int last_forward_exponent_ = 0;
    std::function<void(const Tensor&)> observer_;

    // Diagnostics history (not state).
    bool have_pass_ = false;
    int last_exponent_ = 0;
    int64_t flips_ = 0;
    double last_error_ = 0, last_clipped_ = 0;
};

// A layer that may own the quantizers at its ends: of its input (the
// network's first layer, child "input_quantizer": the image's grid) and of
// its output (a layer no activation follows, MobileNetV2's linear
// bottleneck: child "output_quantizer"). And, not owned, the quantizer whose
// grid its input is on (the previous layer's, or its own input quantizer),
// which its bias quantization needs (quant/accumulator.h). quantize_model
// sets them when policy.activation_bits > 0; otherwise all are null and
// quantize_input / quantize_output return their argument.
class ActivationEnds : public Module {
public:
    static constexpr const char* kInputName = "input_quantizer";
    static constexpr const char* kOutputName = "output_quantizer";
    void set_input_quantizer(std::shared_ptr<ActivationQuantizer> q);
    void set_output_quantizer(std::shared_ptr<ActivationQuantizer> q);
    void set_input_grid(ActivationQuantizer* q) { input_grid_ = q; }
    ActivationQuantizer* input_quantizer() const { return input_quantizer_.get(); }
    ActivationQuantizer* output_quantizer() const { return output_quantizer_.get(); }
    ActivationQuantizer* input_grid() const { return input_grid_; }

    // While one lives, the layer runs without its ends: the audit
    // (quant/audit.h) compares a layer's own arithmetic on float inputs.
    class Bypass {
    public:
        explicit Bypass(ActivationEnds& m) : m_(m), was_(m.bypassed_) { m.bypassed_ = true; }
        ~Bypass() { m_.bypassed_ = was_; }
        Bypass(const Bypass&) = delete;
        Bypass& operator=(const Bypass&) = delete;

    private:
        ActivationEnds& m_;
        bool was_;
    };

protected:
    Variable quantize_input(const Variable& x);
    Variable quantize_output(const Variable& y);

private:
    std::shared_ptr<ActivationQuantizer> input_quantizer_, output_quantizer_;
    ActivationQuantizer* input_grid_ = nullptr;
    bool bypassed_ = false;
};

// An activation layer (or the global pooling of activations) followed by its
// quantizer: forward = Q(act(x)). The
// activation is registered inline (it has no tensors), the quantizer as the
// child "activation_quantizer".
class QuantizedActivation : public Module {
public:
    QuantizedActivation(std::shared_ptr<Module> activation, std::shared_ptr<ActivationQuantizer> quantizer);
    // Q(act(x)); a global pooling takes the mean with exact_global_mean
    // (quant/accumulator.h), whose one rounding the integer engine's
    // division reproduces.
    Variable forward(const Variable& x) override;
    ActivationQuantizer& quantizer() { return *quantizer_; }
    Module& activation() { return *activation_; }
    std::string type_name() const override { return "Quantized<" + activation_->type_name() + ">"; }
    std::string describe() const override { return activation_->describe() + " @ " + quantizer_->describe(); }
    bool summary_row() const override { return true; }

private:
    std::shared_ptr<Module> activation_;
    std::shared_ptr<ActivationQuantizer> quantizer_;
};

}  // namespace hfq::quant
