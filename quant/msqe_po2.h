// msqe-po2 (docs/quantizers.md, 3.2): the paper's improved MSQE quantizer. The power-of-two
// exponent of every scale group is chosen by minimising the weighted
// quantization error E, warm-started from the previous step's exponent:
//   w = sqrt(M) * 1[|x| <= sigma std(x)]          (M: second moments of dL/dx)
//   iterative weighted least squares, best kept   (least_squares_search)
//   then a line search over nearby exponents      (line_search)
// and, optionally, a stable exponent ebar (an EMA of e) the trainer can switch
// the output to late in training.
#pragma once
#include <vector>

#include "quant/quantizer.h"

namespace hfq::quant {

// An exponent and its error E(2^exponent).
struct ExponentSearch {
    int exponent = 0;
    double error = 0;
};

// E(2^e) and the least-squares sums at the codes of 2^e for one group (x, w
// as in group_sums), each exponent evaluated once: the search revisits
// exponents (in a steady state least squares returns the start exponent at
// every iteration, and the line search passes over exponents least squares
// tried). The sums are a function of x, w and e alone, so a remembered value
// is exactly the one a new pass would give.
//
// The line search needs errors only: evaluate() computes those of many
// exponents in one pass (weighted_errors), and they are the same numbers
// at() would give.
class GroupErrors {
public:
    GroupErrors(const float* x, const float* w, int64_t n, const Grid& g) : x_(x), w_(w), n_(n), g_(g) {
        known_.reserve(16);  // lls_iters + 1 + a line search's 6: one allocation per group
    }
    // E and the least-squares sums at 2^exponent.
    const GroupSums& at(int exponent);
    // E at 2^exponent.
    double error(int exponent);
    // Computes E of those of exponents[0..count) not yet known, in shared passes.
    void evaluate(const int* exponents, int count);
    int64_t size() const { return n_; }

private:
    struct Known {
        int exponent;
        GroupSums sums;
        bool has_least_squares;  // false: sums.error alone (from evaluate)
    };
    Known* find(int exponent);

    const float* x_;
    const float* w_;
    int64_t n_;
    Grid g_;
    std::vector<Known> known_;
};

// Step 3: s = 2^start, best = s, q = codes at s; `iters` times:
// s' = LS(x, q, w); q = codes at s' (always); keep s' if E(s') < E(best).
ExponentSearch least_squares_search(GroupErrors& errors, int start, int iters);

// The widest line search (offsets -32..32).
constexpr int kMaxLineSearchRange = 64;

// Step 4: K = rint(log2(2^from.exponent + 1e-7)); for d = -range/2 .. +range/2
// (d != 0, in that order) take 2^(K+d) if its error is strictly lower.
// from.error must be E(2^from.exponent) with the same weights.
ExponentSearch line_search(GroupErrors& errors, ExponentSearch from, int range);

class MsqePo2Quantizer : public Quantizer {
public:
    MsqePo2Quantizer(const QuantizerOptions& options, const Shape& weight_shape);

    // e per group, as chosen by the last training step.
    std::vector<int> exponents() const;
    // ebar per group (meaningful once stable_has_value()).
    std::vector<float> stable_exponents() const { return stable_exponent_.to_vector(); }
    bool stable_has_value() const { return stable_flag(0); }
    bool stable_updating() const { return stable_flag(1); }
    bool stable_switched() const { return stable_flag(2); }

    bool has_stable_scale() const override { return options_.stable_scale; }
    void set_stable_updating(bool on) override;
    void set_stable_switched(bool on) override;

protected:
    ScaleChoice choose_scales(const Tensor& x, bool training) override;
    void add_buffers(std::vector<std::pair<std::string, Tensor*>>& out) override;

private:
    // Steps 2-5 from the start exponents.
    std::vector<int> optimise(const Tensor& x, const std::vector<int>& start);
    bool stable_flag(int i) const { return stable_flags_.data<int32_t>()[i] != 0; }
    void set_stable_flag(int i, bool on) { stable_flags_.data<int32_t>()[i] = on; }

    Tensor exponent_;         // s32 {groups}: e
    Tensor stable_exponent_;  // f32 {groups}: ebar
    Tensor stable_flags_;     // s32 {3}: ebar has a value, updating, switched
};

}  // namespace hfq::quant
