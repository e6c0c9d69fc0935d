#include "train/adam.h"

#include <cmath>
#include <unordered_map>

#include "engine/check.h"

namespace hfq {

Adam::Adam(std::vector<NamedParameter> params, const AdamOptions& options)
    : Optimizer(std::move(params), options.lr), options_(options), moments_(params_.size()) {
    HFQ_CHECK(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1,
              "Adam: betas must be in [0, 1), got ", options.beta1, " and ", options.beta2);
    HFQ_CHECK(options.eps > 0 && options.weight_decay >= 0, "Adam: eps must be positive and weight decay "
              "non-negative, got ", options.eps, " and ", options.weight_decay);
}

void Adam::step() {
    const float b1 = options_.beta1, b2 = options_.beta2, wd = options_.weight_decay;
    for (size_t i = 0; i < params_.size(); ++i) {
        const Tensor& grad = params_[i].var.grad();
        if (!grad.defined()) continue;
        Tensor& value = params_[i].var.value();
        HFQ_CHECK(grad.shape() == value.shape(), "Adam: gradient of '", params_[i].name, "' has shape ",
                  shape_str(grad.shape()), ", the parameter ", shape_str(value.shape()));
        Moments& s = moments_[i];
        if (!s.exp_avg.defined()) {
            s.exp_avg = Tensor::zeros(value.shape());
            s.exp_avg_sq = Tensor::zeros(value.shape());
        }
        const int64_t t = ++s.step.data<int64_t>()[0];
        // PyTorch computes the corrections in double, then uses them as Python floats.
        const double correction1 = 1 - std::pow(double(b1), double(t));
        const double correction2_sqrt = std::sqrt(1 - std::pow(double(b2), double(t)));
        const float step_size = static_cast<float>(lr_ / correction1);
        const float c2 = static_cast<float>(correction2_sqrt);
        float* p = value.f32();
        const float* g = grad.f32();
        float* m = s.exp_avg.f32();
        float* v = s.exp_avg_sq.f32();
        for (int64_t k = 0, n = value.numel(); k < n; ++k) {
            const float d = g[k] + wd * p[k];
            m[k] = b1 * m[k] + (1 - b1) * d;
            v[k] = b2 * v[k] + (1 - b2) * d * d;
            p[k] -= step_size * m[k] / (std::sqrt(v[k]) / c2 + options_.eps);
        }
    }
}

std::vector<std::pair<std::string, Tensor>> Adam::state() const {
    std::vector<std::pair<std::string, Tensor>> out;
    for (size_t i = 0; i < params_.size(); ++i) {
        const Moments& s = moments_[i];
        if (!s.exp_avg.defined()) continue;
        out.emplace_back(params_[i].name + ".exp_avg", s.exp_avg);
        out.emplace_back(params_[i].name + ".exp_avg_sq", s.exp_avg_sq);
        out.emplace_back(params_[i].name + ".step", s.step);
    }
    return out;
}

void Adam::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
    // name -> (parameter, which tensor: 0 exp_avg, 1 exp_avg_sq, 2 step)
    std::unordered_map<std::string, std::pair<size_t, int>> index;
    for (size_t i = 0; i < params_.size(); ++i) {
        index.emplace(params_[i].name + ".exp_avg", std::pair{i, 0});
        index.emplace(params_[i].name + ".exp_avg_sq", std::pair{i, 1});
        index.emplace(params_[i].name + ".step", std::pair{i, 2});
    }
    // Check everything first: a failed load changes nothing.
    std::vector<int> found(params_.size(), 0);
    for (const auto& [name, t] : state) {
        auto it = index.find(name);
        HFQ_CHECK(it != index.end(), "Adam::load_state: unknown state tensor '", name, "'");
        const auto [i, which] = it->second;
        const Shape expected = which == 2 ? Shape{1} : params_[i].var.value().shape();
        const DType dtype = which == 2 ? DType::s64 : DType::f32;
        HFQ_CHECK(t.shape() == expected && t.dtype() == dtype, "Adam::load_state: '", name, "' is ",
                  dtype_name(t.dtype()), " ", shape_str(t.shape()), ", expected ", dtype_name(dtype), " ",
                  shape_str(expected));
        found[i] |= 1 << which;
    }
    for (size_t i = 0; i < params_.size(); ++i)
        HFQ_CHECK(found[i] == 0 || found[i] == 7, "Adam::load_state: incomplete state for '", params_[i].name,
                  "' (exp_avg, exp_avg_sq and step go together)");
    for (Moments& s : moments_) s = Moments();
    for (const auto& [name, t] : state) {
        const auto [i, which] = index.at(name);
        Moments& s = moments_[i];
        (which == 0 ? s.exp_avg : which == 1 ? s.exp_avg_sq : s.step) = t.clone();
    }
}

}  // namespace hfq
