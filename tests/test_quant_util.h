// Helpers shared by the quantizer tests (tests/test_quant_*.cpp).
#pragma once
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <string>

#include "engine/autograd.h"
#include "engine/check.h"
#include "quant/quantizer.h"
#include "tests/float_error.h"

namespace hfq::testing {

// A copy of one of the quantizer's state tensors.
inline Tensor state_tensor(const quant::Quantizer& q, const std::string& name) {
    for (const auto& [n, t] : q.state())
        if (n == name) return t;
    FAIL("no state tensor ", name);
    return {};
}

// Edits a snapshot of the state and loads it back (through the checked path).
inline void edit_state(quant::Quantizer& q, const std::function<void(const std::string&, Tensor&)>& edit) {
    quant::NamedTensors st = q.state();
    for (auto& [name, t] : st) edit(name, t);
    q.load_state(st);
}

// The message of the hfq::Error f throws ("" if it throws nothing).
template <class F>
std::string error_message(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// The second-moment update M' = d M + (1 - d) m g^2 (docs/quantizers.md, 3.2; m = 1 where
// the code is in range, else 0), which the quantizer evaluates in double from
// the float M, g and decay d and rounds to float once: checked against the
// same expression evaluated here, where a multiply-add contracted on one side
// only moves the double by at most 2^-53 of each product.
inline void check_second_moment(const std::string& what, float value, float decay, float m_before, float g,
                                bool in_range) {
    const double kept = double(decay) * m_before, added = (1.0 - double(decay)) * (in_range ? double(g) * g : 0.0);
    check_rounded_once(what, value, kept + added, gamma_double_n(2) * (std::fabs(kept) + std::fabs(added)));
}

// L = mean((y - target)^2), a {1} tensor; target is a constant.
inline Variable mse_loss(const Variable& y, const Tensor& target) {
    const int64_t n = y.value().numel();
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
        const double d = double(y.value().f32()[i]) - target.f32()[i];
        sum += d * d;
    }
    return make_result(Tensor::full({1}, float(sum / n)), "mse_loss", {y}, [y, target, n](const Tensor& dl) {
        Tensor g = Tensor::empty(y.shape());
        for (int64_t i = 0; i < n; ++i)
            g.f32()[i] = float(2.0 * (double(y.value().f32()[i]) - target.f32()[i]) / n * dl.item());
        y.accumulate_grad(g);
    });
}

}  // namespace hfq::testing
