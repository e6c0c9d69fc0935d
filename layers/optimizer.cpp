#include "layers/optimizer.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "engine/check.h"

namespace hfq {

// ---- Optimizer: the loop over the parameters, their state --------------------

Optimizer::Optimizer(const char* who, std::vector<NamedParameter> params, float lr, std::vector<StateTensor> layout)
    : who_(who), params_(std::move(params)), lr_(lr), layout_(std::move(layout)), state_(params_.size()) {
    set_lr(lr);
    for (const NamedParameter& p : params_)
        HFQ_CHECK(p.var.defined() && p.var.requires_grad() && p.var.value().dtype() == DType::f32,
                  "optimizer: parameter '", p.name, "' must be an f32 Variable that requires grad");
}

void Optimizer::step() {
    for (size_t i = 0; i < params_.size(); ++i) {
        const Tensor& grad = params_[i].var.grad();
        if (!grad.defined()) continue;
        Tensor& value = params_[i].var.value();
        HFQ_CHECK(grad.shape() == value.shape(), who_, ": gradient of '", params_[i].name, "' has shape ",
                  shape_str(grad.shape()), ", the parameter ", shape_str(value.shape()));
        update(i, value, grad);
    }
}

void Optimizer::zero_grad() {
    for (NamedParameter& p : params_) p.var.zero_grad();
}

void Optimizer::set_lr(float lr) {
    HFQ_CHECK(lr >= 0, "optimizer: learning rate must be non-negative, got ", lr);
    lr_ = lr;
}

bool Optimizer::create_state(size_t i) {
    if (!state_[i].empty()) return false;
    for (const StateTensor& s : layout_)
        state_[i].push_back(Tensor::zeros(s.per_element ? params_[i].var.value().shape() : Shape{1}, s.dtype));
    return true;
}

std::vector<std::pair<std::string, Tensor>> Optimizer::state() const {
    std::vector<std::pair<std::string, Tensor>> out;
    for (size_t i = 0; i < params_.size(); ++i)
        for (size_t k = 0; k < state_[i].size(); ++k)
            out.emplace_back(params_[i].name + "." + layout_[k].name, state_[i][k]);
    return out;
}

void Optimizer::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
    // "<parameter name>.<state name>" -> (parameter, state tensor)
    std::unordered_map<std::string, std::pair<size_t, size_t>> index;
    for (size_t i = 0; i < params_.size(); ++i)
        for (size_t k = 0; k < layout_.size(); ++k)
            index.emplace(params_[i].name + "." + layout_[k].name, std::pair{i, k});
    // Check everything first: a failed load changes nothing.
    std::vector<std::vector<bool>> given(params_.size(), std::vector<bool>(layout_.size(), false));
    for (const auto& [name, t] : state) {
        auto it = index.find(name);
        HFQ_CHECK(it != index.end(), who_, "::load_state: unknown state tensor '", name, "'");
        const auto [i, k] = it->second;
        const Shape expected = layout_[k].per_element ? params_[i].var.value().shape() : Shape{1};
        const DType dtype = layout_[k].dtype;
        HFQ_CHECK(t.shape() == expected && t.dtype() == dtype, who_, "::load_state: '", name, "' is ",
                  dtype_name(t.dtype()), " ", shape_str(t.shape()), ", expected ", dtype_name(dtype), " ",
                  shape_str(expected));
        given[i][k] = true;
    }
    std::string together;  // "exp_avg, exp_avg_sq and step"
    for (size_t k = 0; k < layout_.size(); ++k)
        together += (k == 0 ? "" : k + 1 == layout_.size() ? " and " : ", ") + std::string(layout_[k].name);
    for (size_t i = 0; i < params_.size(); ++i) {
        const auto n = std::count(given[i].begin(), given[i].end(), true);
        HFQ_CHECK(n == 0 || n == std::ssize(layout_), who_, "::load_state: incomplete state for '", params_[i].name,
                  "' (", together, " go together)");
    }
    for (std::vector<Tensor>& s : state_) s.clear();
    for (const auto& [name, t] : state) {
        const auto [i, k] = index.at(name);
        state_[i].resize(layout_.size());
        state_[i][k] = t.clone();
    }
}

std::vector<NamedParameter> select_params(const std::vector<NamedParameter>& params,
                                          std::initializer_list<ParamGroup> groups) {
    std::vector<NamedParameter> out;
    for (const NamedParameter& p : params)
        if (std::find(groups.begin(), groups.end(), p.group) != groups.end()) out.push_back(p);
    return out;
}

// ---- SGD -------------------------------------------------------------------------

SGD::SGD(std::vector<NamedParameter> params, const SgdOptions& options)
    : Optimizer("SGD", std::move(params), options.lr, {{"momentum_buffer"}}), options_(options) {
    HFQ_CHECK(options.momentum >= 0 && options.weight_decay >= 0,
              "SGD: momentum and weight decay must be "
              "non-negative, got ",
              options.momentum, " and ", options.weight_decay);
    HFQ_CHECK(!options.nesterov || options.momentum > 0, "SGD: Nesterov momentum requires momentum > 0");
    for (const NamedParameter& p : params_) {
        const auto& g = options.decay_groups;
        decay_.push_back(std::find(g.begin(), g.end(), p.group) != g.end() ? options.weight_decay : 0.0f);
    }
}

namespace {

// The update touches each element on its own, so it is split into blocks
// across the OpenMP threads (the result cannot depend on the thread count);
// small tensors stay on one thread, where starting the others costs more.
constexpr int64_t kBlock = 1 << 14;

template <class F>
void for_each_block(int64_t n, F&& f) {
    const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) f(b * kBlock, std::min(n, (b + 1) * kBlock));
}

}  // namespace

void SGD::update(size_t i, Tensor& value, const Tensor& grad) {
    const float lr = lr_, mu = options_.momentum;
    const bool nesterov = options_.nesterov;
    float* p = value.f32();
    const float* g = grad.f32();
    const float wd = decay_[i];
    const int64_t n = value.numel();
    if (mu == 0) {  // no momentum buffer
        for_each_block(n, [&](int64_t begin, int64_t end) {
            for (int64_t k = begin; k < end; ++k) p[k] -= lr * (g[k] + wd * p[k]);
        });
        return;
    }
    const bool first = create_state(i);
    float* buf = state_[i][0].f32();
    // One loop per case, each simple enough to vectorise.
    for_each_block(n, [&](int64_t begin, int64_t end) {
        if (first) {
            for (int64_t k = begin; k < end; ++k) buf[k] = g[k] + wd * p[k];
        } else {
            for (int64_t k = begin; k < end; ++k) buf[k] = mu * buf[k] + (g[k] + wd * p[k]);
        }
        if (nesterov) {
            // d = g + wd p (p not yet updated) plus mu buf.
            for (int64_t k = begin; k < end; ++k) p[k] -= lr * ((g[k] + wd * p[k]) + mu * buf[k]);
        } else {
            for (int64_t k = begin; k < end; ++k) p[k] -= lr * buf[k];
        }
    });
}

// ---- Adam ------------------------------------------------------------------------

Adam::Adam(std::vector<NamedParameter> params, const AdamOptions& options)
    : Optimizer("Adam", std::move(params), options.lr,
                {{"exp_avg"}, {"exp_avg_sq"}, {"step", DType::s64, /*per_element=*/false}}),
      options_(options) {
    HFQ_CHECK(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1,
              "Adam: betas must be in [0, 1), got ", options.beta1, " and ", options.beta2);
    HFQ_CHECK(options.eps > 0 && options.weight_decay >= 0,
              "Adam: eps must be positive and weight decay "
              "non-negative, got ",
              options.eps, " and ", options.weight_decay);
}

void Adam::update(size_t i, Tensor& value, const Tensor& grad) {
    const float b1 = options_.beta1, b2 = options_.beta2, wd = options_.weight_decay;
    create_state(i);
    Tensor& exp_avg = state_[i][0];
    Tensor& exp_avg_sq = state_[i][1];
    const int64_t t = ++state_[i][2].data<int64_t>()[0];
    // PyTorch computes the corrections in double, then uses them as Python floats.
    const double correction1 = 1 - std::pow(double(b1), double(t));
    const double correction2_sqrt = std::sqrt(1 - std::pow(double(b2), double(t)));
    const float step_size = static_cast<float>(lr_ / correction1);
    const float c2 = static_cast<float>(correction2_sqrt);
    float* p = value.f32();
    const float* g = grad.f32();
    float* m = exp_avg.f32();
    float* v = exp_avg_sq.f32();
    for (int64_t k = 0, n = value.numel(); k < n; ++k) {
        const float d = g[k] + wd * p[k];
        m[k] = b1 * m[k] + (1 - b1) * d;
        v[k] = b2 * v[k] + (1 - b2) * d * d;
        p[k] -= step_size * m[k] / (std::sqrt(v[k]) / c2 + options_.eps);
    }
}

}  // namespace hfq
