#include "layers/optimizer.h"

#include <algorithm>
#include <unordered_map>

#include "engine/check.h"

namespace hfq {

Optimizer::Optimizer(std::vector<NamedParameter> params, float lr) : params_(std::move(params)), lr_(lr) {
    set_lr(lr);
    for (const NamedParameter& p : params_)
        HFQ_CHECK(p.var.defined() && p.var.requires_grad() && p.var.value().dtype() == DType::f32,
                  "optimizer: parameter '", p.name, "' must be an f32 Variable that requires grad");
}

void Optimizer::zero_grad() {
    for (NamedParameter& p : params_) p.var.zero_grad();
}

void Optimizer::set_lr(float lr) {
    HFQ_CHECK(lr >= 0, "optimizer: learning rate must be non-negative, got ", lr);
    lr_ = lr;
}

SGD::SGD(std::vector<NamedParameter> params, const SgdOptions& options)
    : Optimizer(std::move(params), options.lr), options_(options), momentum_(params_.size()) {
    HFQ_CHECK(options.momentum >= 0 && options.weight_decay >= 0, "SGD: momentum and weight decay must be "
              "non-negative, got ", options.momentum, " and ", options.weight_decay);
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

void SGD::step() {
    const float lr = lr_, mu = options_.momentum;
    const bool nesterov = options_.nesterov;
    for (size_t i = 0; i < params_.size(); ++i) {
        const Tensor& grad = params_[i].var.grad();
        if (!grad.defined()) continue;
        Tensor& value = params_[i].var.value();
        HFQ_CHECK(grad.shape() == value.shape(), "SGD: gradient of '", params_[i].name, "' has shape ",
                  shape_str(grad.shape()), ", the parameter ", shape_str(value.shape()));
        float* p = value.f32();
        const float* g = grad.f32();
        const float wd = decay_[i];
        const int64_t n = value.numel();
        if (mu == 0) {
            for_each_block(n, [&](int64_t begin, int64_t end) {
                for (int64_t k = begin; k < end; ++k) p[k] -= lr * (g[k] + wd * p[k]);
            });
            continue;
        }
        const bool first = !momentum_[i].defined();
        if (first) momentum_[i] = Tensor::empty(value.shape());
        float* buf = momentum_[i].f32();
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
}

std::vector<std::pair<std::string, Tensor>> SGD::state() const {
    std::vector<std::pair<std::string, Tensor>> out;
    for (size_t i = 0; i < params_.size(); ++i)
        if (momentum_[i].defined()) out.emplace_back(params_[i].name + ".momentum_buffer", momentum_[i]);
    return out;
}

void SGD::load_state(const std::vector<std::pair<std::string, Tensor>>& state) {
    std::unordered_map<std::string, size_t> index;
    for (size_t i = 0; i < params_.size(); ++i) index.emplace(params_[i].name + ".momentum_buffer", i);
    // Check everything first: a failed load changes nothing.
    for (const auto& [name, t] : state) {
        auto it = index.find(name);
        HFQ_CHECK(it != index.end(), "SGD::load_state: unknown state tensor '", name, "'");
        const Tensor& value = params_[it->second].var.value();
        HFQ_CHECK(t.shape() == value.shape() && t.dtype() == DType::f32, "SGD::load_state: '", name, "' is ",
                  dtype_name(t.dtype()), " ", shape_str(t.shape()), ", expected f32 ", shape_str(value.shape()));
    }
    for (Tensor& m : momentum_) m = Tensor();
    for (const auto& [name, t] : state) momentum_[index.at(name)] = t.clone();
}

std::vector<NamedParameter> select_params(const std::vector<NamedParameter>& params,
                                          std::initializer_list<ParamGroup> groups) {
    std::vector<NamedParameter> out;
    for (const NamedParameter& p : params)
        if (std::find(groups.begin(), groups.end(), p.group) != groups.end()) out.push_back(p);
    return out;
}

}  // namespace hfq
