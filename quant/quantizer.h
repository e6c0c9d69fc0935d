// Weight quantizers: the interface, the options and the factory.
//
//   QuantizerOptions opt;                 // 4 bits, signed, per tensor, paper defaults
//   opt.per_channel = true;
//   auto q = make_quantizer("msqe-po2", opt, weight.shape());
//   Variable wq = q->fake_quantize(weight, /*training=*/true);   // use wq in the conv
//   ... loss.backward();                  // dL/dweight (straight-through), M updated
//
// learnable-po2 and lsq also train their scale: hand it to an optimizer
// (layers/optimizer.h), built once, stepped after each backward (in a model,
// quantize_model registers it as a ParamGroup::quantizer parameter and
// TrainStep gives that group its own optimizer):
//   std::vector<NamedParameter> scale;
//   for (auto& [name, p] : q->named_parameters()) scale.push_back({name, *p, ParamGroup::quantizer});
//   Adam adam(scale, {.lr = 1e-3f});
//
// Methods (docs/quantizers.md, sections 3 and 4):
//   "msqe-baseline"  po2 scale recomputed from scratch each step (3.1)
//   "msqe-po2"       the paper's MSQE quantizer: warm start, weighted LS, line search (3.2)
//   "learnable-po2"  trained log2-scale e, rounded by ceil / rint / msqe-round (4.1)
//   "lsq"            trained real scale s (4.2)
//
// Training and evaluation. fake_quantize(w, true) chooses the scales (and
// updates the quantizer's state: first-call initialisation, exponents,
// stable exponent, diagnostics); the backward of its result passes dL/dy to
// the weights through the straight-through estimator, updates the second
// moments M, and gives the learnable scale its gradient. fake_quantize(w,
// false) changes nothing: it uses the current exponent (msqe-po2: the one the
// last training step chose; learnable-po2: the rounding of the current e;
// lsq: the current s; msqe-baseline is stateless and recomputes). Evaluating
// a quantizer that never trained computes what its first training step would
// use, without storing it.
//
// The backward closure keeps a pointer to the quantizer and the input values:
// run backward before the quantizer is destroyed and before the weights are
// changed in place.
//
// Deferred second moments (data-parallel training, where each process's
// backward sees only the gradient of its own part of the batch, but M must
// follow the gradient averaged over the processes so that they all keep the
// same M and choose the same exponents):
//   q->defer_second_moments(true);
//   ... loss.backward();                  // dL/dweight and the scale gradient as usual, M unchanged
//   if (Tensor* g = q->pending_second_moment_gradient()) average_over_processes(*g);
//   q->apply_second_moments();            // M updated from g, exactly as a backward with dy = g
// While deferring, a training backward keeps a copy of its dy and what the
// straight-through mask needs (the input values, copied if they are the
// weights', and the scales), so the weights may change between the backward
// and apply_second_moments(). A second training backward before the pending
// gradient is applied throws (also once deferring is turned off again);
// load_state() drops a pending gradient. Quantizers without second moments
// never have one.
//
// Saving and restoring. Trainable scales: named_parameters() (leaf Variables
// with requires_grad, for the optimizer and the model's parameters). All other
// state lives in tensors the quantizer reads at every call, so they can be
// registered as a module's buffers and loaded in place: named_buffers()
// (step count, initialisation flag, second moments M, exponents, stable
// exponent and its flags). state() / load_state() are the same tensors as a
// snapshot and a checked restore. Parameters and buffers are both needed to
// continue training exactly: a quantizer whose "initialized" flag is 0
// initialises itself again from the first weights it sees in training.
// Diagnostics history (flip counts, previous codes) is not state: load_state()
// resets it, reset_diagnostics() does so after loading buffers in place.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/autograd.h"
#include "engine/tensor.h"
#include "quant/diagnostics.h"
#include "quant/grid.h"

namespace hfq::quant {

// How learnable-po2 turns its continuous e into the integer exponent in use.
enum class ExponentRounding {
    ceil,        // ceil(e): TQT's choice, the baseline of the gradient-based class
    rint,        // rint(e)
    msqe_round,  // Round-to-Lower-MSQE: floor(e) if E(2^floor e) < E(2^ceil e), else ceil(e)
};
// "ceil", "rint", "msqe-round"; throws hfq::Error listing the valid names.
ExponentRounding parse_exponent_rounding(const std::string& name);
const char* exponent_rounding_name(ExponentRounding r);

// Every option of every method, with the paper's defaults. Options a method
// does not use are ignored by it.
struct QuantizerOptions {
    int bits = 4;              // 2..8
    bool is_signed = true;     // false: unsigned grid 0..2^b-1, input through ReLU first
    bool per_channel = false;  // one scale per output channel (axis 0) instead of per tensor

    // msqe-baseline (3.1)
    int baseline_iters = 5;  // least-squares iterations

    // msqe-po2 (3.2) and, where said, learnable-po2 (4.1)
    int lls_iters = 3;  // warm-started least-squares iterations, best kept
    bool line_search = true;
    int line_search_range = 6;   // offsets -range/2 .. +range/2 around the LS result
    bool second_moments = true;  // weight the error by the gradients' second moments M (also 4.1)
    float second_moments_decay = 0.999f;
    bool sqrt_second_moments = true;  // weight by sqrt(M) rather than M (also 4.1)
    bool outlier_mask = true;         // msqe-po2: drop |x| > sigma std; learnable: |x| > 2^e (qp + 0.5)
    float outlier_sigma = 2.0f;
    bool stable_scale = false;  // keep an EMA ebar of the exponent the trainer can switch to
    float stable_decay = 0.99f;

    // learnable-po2 (4.1)
    ExponentRounding rounding = ExponentRounding::msqe_round;
    float min_init_scale = 1e-5f;  // e = log2(max(3 std / qp, min_init_scale)) at the first call; lsq: its scale's floor
};

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Quantizer {
public:
    virtual ~Quantizer() = default;
    Quantizer(const Quantizer&) = delete;
    Quantizer& operator=(const Quantizer&) = delete;

    // y = Q(weight), same shape; see the header comment for training / eval.
    Variable fake_quantize(const Variable& weight, bool training);

    const std::string& method() const { return method_; }
    const QuantizerOptions& options() const { return options_; }
    const Shape& weight_shape() const { return shape_; }
    const Grid& grid() const { return grid_; }
    const ScaleGroups& groups() const { return groups_; }
    bool initialized() const { return initialized_.data<int32_t>()[0] != 0; }
    int64_t step() const { return step_.data<int64_t>()[0]; }  // training forward passes so far

    // The trainable scale, a leaf Variable with requires_grad, shape {groups}:
    // learnable-po2 {"log2_scale", e}, lsq {"scale", s}; none for the msqe methods.
    // The pointers refer to the quantizer's own members.
    virtual std::vector<std::pair<std::string, Variable*>> named_parameters() { return {}; }
    // The state tensors, the quantizer's own (write through them to restore):
    //   "step" s64 {1}, "initialized" s32 {1}, "second_moment" f32 {weight shape}
    //   (if kept), and per method e.g. "exponent" s32 {groups}.
    std::vector<std::pair<std::string, Tensor*>> named_buffers();

    // A snapshot (copies) of named_buffers(), and its checked restoration.
    NamedTensors state() const;
    void load_state(const NamedTensors& tensors);
    void reset_diagnostics();

    // The stable-exponent schedule (msqe-po2 with stable_scale): the trainer
    // turns on updating of ebar, later switches the output to 2^rint(ebar)
    // (updates stop then). Throws for a quantizer without a stable exponent.
    virtual bool has_stable_scale() const { return false; }
    virtual void set_stable_updating(bool on);
    virtual void set_stable_switched(bool on);

    // Diagnostics of the last training step; "flips" count the exponent
    // changes since the previous report() and are reset by it.
    QuantizerDiagnostics report();

    // Deferred second-moment updates (see the header comment). While on, a
    // training backward leaves M as it is and keeps its gradient pending.
    void defer_second_moments(bool on) { defer_m_ = on; }
    // The pending gradient (a copy of the backward's dy, weight shape), for
    // the caller to change in place; nullptr when nothing is pending.
    Tensor* pending_second_moment_gradient() { return pending_ ? &pending_->grad : nullptr; }
    // M's update from the pending gradient, the same arithmetic as an
    // immediate backward's; then nothing is pending. No-op if nothing is.
    void apply_second_moments();

    // What fake_quantize(weight, false) computes, in the form hardware stores
    // it: y[i] = scale[g] * codes[i] for the elements i of scale group g, with
    // scale[g] = 2^exponent[g] for the power-of-two methods (exponent is empty
    // for lsq). Changes nothing. For export and audit (quant/export.h).
    struct IntegerForm {
        std::vector<int16_t> codes;  // weight shape, row-major, in [-qn, qp]
        std::vector<float> scale;    // per group
        std::vector<int> exponent;   // per group (power-of-two methods)
    };
    IntegerForm integer_form(const Tensor& weight);
    // The exponents the last fake_quantize used, per group (empty for lsq,
    // or before any call): what a W4A8 layer's bias quantization needs.
    const std::vector<int>& exponents_of_last_pass() const { return pass_exponents_; }

protected:
    Quantizer(std::string method, const QuantizerOptions& options, const Shape& weight_shape);

    // The scales one forward pass uses, per group.
    struct ScaleChoice {
        std::vector<float> scale;       // output scale s (also the scale of the STE mask)
        std::vector<float> code_scale;  // scale the codes are rounded at; empty: = scale
        std::vector<int> exponent;      // power-of-two methods: log2(scale); lsq: empty
    };
    // x is the quantizer's input (after the ReLU on the unsigned grid), finite.
    // When training, update the state; otherwise change nothing.
    virtual ScaleChoice choose_scales(const Tensor& x, bool training) = 0;

    // Hooks with the common defaults.
    virtual Rounding code_rounding() const { return Rounding::half_even; }
    virtual bool identity_ste() const { return false; }
    // The scale parameter and dL/dparam_g = factor(g) * sum_i g_i t_i.
    virtual Variable scale_parameter() const { return {}; }
    virtual double scale_gradient_factor(int64_t group, float scale) const { return 0; }
    // Method-specific state tensors beyond step / initialized / second moments.
    virtual void add_buffers(std::vector<std::pair<std::string, Tensor*>>& out) {}
    virtual void describe(QuantizerDiagnostics& d) const {}

    // The per-element weights w of the error and of least squares:
    //   w = (sqrt(M) or M, if second moments are on) * 1[|x| <= threshold[group]]
    // (the mask only if thresholds is not null). Returns nullptr when w would
    // be all ones, else a pointer into weights_buffer_.
    const float* element_weights(const Tensor& x, const std::vector<double>* thresholds);
    std::string who() const { return "quantizer " + method_; }

    std::string method_;
    QuantizerOptions options_;
    Shape shape_;
    Grid grid_;
    ScaleGroups groups_;
    Tensor step_ = Tensor::zeros({1}, DType::s64);
    Tensor initialized_ = Tensor::zeros({1}, DType::s32);
    Tensor second_moments_;              // M, same shape as the weights; undefined when not kept
    std::vector<float> weights_buffer_;  // reused for the per-element weights w

private:
    // fake_quantize's steps. Throws if x (the input after the ReLU) holds a
    // NaN or infinity, before any state changes.
    void refuse_non_finite(const Tensor& x) const;
    // y = out_scale * codes, group by group, with each group's error, clipped
    // and (when training) changed-code counts; training keeps the codes to
    // compare the next step's with.
    Tensor quantize_groups(const Tensor& x, const ScaleChoice& choice, bool training, std::vector<PassStats>& stats);
    // The backward of y for the gradient dy: straight-through to the weights,
    // the second moments' update, the scale parameter's gradient factor[g] *
    // sum_i dy_i t_i.
    void backward_groups(const Tensor& dy, const Variable& weight, const Variable& param, const Tensor& x,
                         const std::vector<float>& scales, const std::vector<double>& factor, bool update_m);
    void track(const ScaleChoice& choice, const std::vector<PassStats>& stats);

    // A deferred second-moment update: the gradient and what its mask needs.
    struct PendingSecondMoments {
        Tensor grad;
        Tensor x;
        std::vector<float> scales;
    };
    bool defer_m_ = false;
    std::optional<PendingSecondMoments> pending_;

    std::vector<int> pass_exponents_;

    // Diagnostics history (not part of the state).
    std::vector<int> last_exponents_;
    std::vector<float> last_scales_;
    std::vector<int64_t> flips_;
    std::vector<int16_t> last_codes_;
    bool have_codes_ = false;
    bool have_pass_ = false;
    bool have_changed_ = false;
    PassStats last_pass_;
};

// Constructs a quantizer for weights of `weight_shape`. Throws hfq::Error for
// an unknown method (listing the known ones), bits outside 2..8, an empty
// shape or an option out of range.
std::unique_ptr<Quantizer> make_quantizer(const std::string& method, const QuantizerOptions& options,
                                          const Shape& weight_shape);
const std::vector<std::string>& quantizer_methods();

}  // namespace hfq::quant
