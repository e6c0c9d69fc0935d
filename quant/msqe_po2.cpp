#include "quant/msqe_po2.h"

#include <algorithm>
#include <cmath>

#include "engine/check.h"

namespace hfq::quant {

GroupErrors::Known* GroupErrors::find(int exponent) {
    for (Known& k : known_)
        if (k.exponent == exponent) return &k;
    return nullptr;
}

const GroupSums& GroupErrors::at(int exponent) {
    Known* k = find(exponent);
    if (!k) k = &known_.emplace_back(Known{exponent, {}, false});
    if (!k->has_least_squares) {
        k->sums = group_sums(x_, w_, n_, exp2_scale(exponent), g_);
        k->has_least_squares = true;
    }
    return k->sums;
}

double GroupErrors::error(int exponent) {
    if (const Known* k = find(exponent)) return k->sums.error;
    return at(exponent).error;
}

void GroupErrors::evaluate(const int* exponents, int count) {
    int todo[kErrorsPerPass];
    float scales[kErrorsPerPass];
    int pending = 0;
    auto pass = [&] {
        double errors[kErrorsPerPass];
        weighted_errors(x_, w_, n_, scales, pending, g_, errors);
        for (int j = 0; j < pending; ++j) known_.push_back(Known{todo[j], GroupSums{errors[j], 0, 0}, false});
        pending = 0;
    };
    for (int i = 0; i < count; ++i) {
        const int e = exponents[i];
        if (find(e) || std::find(todo, todo + pending, e) != todo + pending) continue;
        todo[pending] = e;
        scales[pending] = exp2_scale(e);
        if (++pending == kErrorsPerPass) pass();
    }
    if (pending > 0) pass();
}

ExponentSearch least_squares_search(GroupErrors& errors, int start, int iters) {
    GroupSums sums = errors.at(start);
    ExponentSearch best{start, sums.error};
    for (int it = 0; it < iters; ++it) {
        // sums.wqx / wqq are at the codes of the previous scale, as LS needs.
        const int e = least_squares_exponent(sums.wqx, sums.wqq, errors.size());
        sums = errors.at(e);
        if (sums.error < best.error) best = {e, sums.error};
    }
    return best;
}

ExponentSearch line_search(GroupErrors& errors, ExponentSearch from, int range) {
    HFQ_CHECK(range >= 2 && range <= kMaxLineSearchRange, "line_search: range must be in 2..", kMaxLineSearchRange,
              ", got ", range);
    const int K = po2_exponent(std::ldexp(1.0, from.exponent));
    int candidates[kMaxLineSearchRange];
    int count = 0;
    for (int d = -range / 2; d <= range / 2; ++d)
        if (d != 0) candidates[count++] = K + d;
    errors.evaluate(candidates, count);  // those least squares did not try, in shared passes
    ExponentSearch best = from;
    for (int i = 0; i < count; ++i) {
        const double err = errors.error(candidates[i]);
        if (err < best.error) best = {candidates[i], err};
    }
    return best;
}

std::vector<int> MsqePo2Quantizer::exponents() const {
    const int32_t* e = exponent_.data<int32_t>();
    return std::vector<int>(e, e + groups_.count);
}

MsqePo2Quantizer::MsqePo2Quantizer(const QuantizerOptions& options, const Shape& weight_shape)
    : Quantizer("msqe-po2", options, weight_shape) {
    exponent_ = Tensor::zeros({groups_.count}, DType::s32);
    stable_exponent_ = Tensor::zeros({groups_.count});
    stable_flags_ = Tensor::zeros({3}, DType::s32);
    if (options.second_moments) second_moments_ = Tensor::full(weight_shape, 1.0f);
}

std::vector<int> MsqePo2Quantizer::optimise(const Tensor& x, const std::vector<int>& start) {
    const float* px = x.f32();
    const int64_t n = groups_.size;
    std::vector<double> thresholds;
    if (options_.outlier_mask) {
        thresholds.resize(groups_.count);
        for_each_group(groups_,
                       [&](int64_t gi) { thresholds[gi] = options_.outlier_sigma * population_std(px + gi * n, n); });
    }
    const float* w = element_weights(x, options_.outlier_mask ? &thresholds : nullptr);
    std::vector<int> result(groups_.count);
    for_each_group(groups_, [&](int64_t gi) {
        GroupErrors errors(px + gi * n, w ? w + gi * n : nullptr, n, grid_);
        ExponentSearch best = least_squares_search(errors, start[gi], options_.lls_iters);
        if (options_.line_search) best = line_search(errors, best, options_.line_search_range);
        result[gi] = best.exponent;
    });
    return result;
}

Quantizer::ScaleChoice MsqePo2Quantizer::choose_scales(const Tensor& x, bool training) {
    ScaleChoice choice;
    if (options_.stable_scale && stable_switched()) {
        // Switched: the output uses 2^rint(ebar) and nothing is optimised any more
        // (the result would be discarded: ebar no longer updates).
        HFQ_CHECK(stable_has_value(), who(),
                  ": switched to the stable exponent before it was ever updated (call set_stable_updating(true) "
                  "and train some steps first)");
        for (float eb : stable_exponents()) choice.exponent.push_back(int(std::nearbyint(eb)));
    } else if (initialized() && !training) {
        choice.exponent = exponents();
    } else {
        std::vector<int> start = exponents();
        if (!initialized()) {  // step 1: e = rint(log2(max|x| / qp + 1e-7))
            const float* px = x.f32();
            for_each_group(groups_, [&](int64_t gi) {
                start[gi] = po2_exponent(double(max_abs(px + gi * groups_.size, groups_.size)) / grid_.qp);
            });
        }
        choice.exponent = optimise(x, start);
        if (training) {
            std::copy(choice.exponent.begin(), choice.exponent.end(), exponent_.data<int32_t>());
            if (options_.stable_scale && stable_updating()) {  // step 6: ebar = d ebar + (1 - d) e
                const float d = options_.stable_decay;
                float* ebar = stable_exponent_.f32();
                for (int64_t gi = 0; gi < groups_.count; ++gi) {
                    const float e = float(choice.exponent[gi]);
                    ebar[gi] = stable_has_value() ? d * ebar[gi] + (1.0f - d) * e : e;
                }
                set_stable_flag(0, true);
            }
        }
    }
    for (int e : choice.exponent) choice.scale.push_back(exp2_scale(e));
    return choice;
}

void MsqePo2Quantizer::set_stable_updating(bool on) {
    if (!options_.stable_scale) Quantizer::set_stable_updating(on);  // throws
    set_stable_flag(1, on);
}

void MsqePo2Quantizer::set_stable_switched(bool on) {
    if (!options_.stable_scale) Quantizer::set_stable_switched(on);  // throws
    set_stable_flag(2, on);
}

void MsqePo2Quantizer::add_buffers(std::vector<std::pair<std::string, Tensor*>>& out) {
    out.emplace_back("exponent", &exponent_);
    if (options_.stable_scale) {
        out.emplace_back("stable_exponent", &stable_exponent_);
        out.emplace_back("stable_flags", &stable_flags_);
    }
}

}  // namespace hfq::quant
