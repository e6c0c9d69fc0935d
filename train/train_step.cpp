#include "train/train_step.h"

#include <cmath>

#include "engine/check.h"
#include "engine/op_profile.h"
#include "engine/ops.h"

namespace hfq {

TrainStep::TrainStep(Model& model, const TrainStepOptions& options) : model_(model), options_(options) {
    const std::vector<NamedParameter> all = model.named_parameters();
    weight_optimizer_ =
        std::make_unique<SGD>(select_params(all, {ParamGroup::weight, ParamGroup::bias, ParamGroup::bn}), options.sgd);
    std::vector<NamedParameter> qparams = select_params(all, {ParamGroup::quantizer});
    if (qparams.empty()) return;
    if (options.quantizer_optimizer == "adam") {
        AdamOptions a;
        a.lr = options.quantizer_lr;
        a.weight_decay = options.quantizer_weight_decay;
        quantizer_optimizer_ = std::make_unique<Adam>(std::move(qparams), a);
    } else {
        HFQ_CHECK(options.quantizer_optimizer == "sgd", "TrainStep: quantizer optimizer must be adam or sgd, got '",
                  options.quantizer_optimizer, "'");
        SgdOptions s;
        s.lr = options.quantizer_lr;
        s.weight_decay = options.quantizer_weight_decay;
        s.decay_groups = {ParamGroup::quantizer};
        quantizer_optimizer_ = std::make_unique<SGD>(std::move(qparams), s);
    }
}

StepStats TrainStep::run(const Tensor& images, const std::vector<int32_t>& labels, bool want_grad_norm) {
    if (!model_.is_training()) model_.train();
    weight_optimizer_->zero_grad();
    if (quantizer_optimizer_) quantizer_optimizer_->zero_grad();
    if (op_profile::enabled()) op_profile::charge(op_profile::kForward, "zero-grad");

    StepStats stats;
    Variable logits = model_(Variable(images));
    Variable loss = cross_entropy(logits, labels, options_.label_smoothing);
    stats.loss = loss.value().item();
    stats.correct = count_correct(logits.value(), labels);
    if (options_.sync) options_.sync->combine_forward(stats);
    if (op_profile::enabled()) op_profile::charge(op_profile::kForward, "loss value, top-1 count");
    if (!std::isfinite(stats.loss)) return stats;
    loss.backward();
    if (options_.sync) options_.sync->combine_gradients();

    if (options_.clip_grad_norm > 0 || want_grad_norm) {
        stats.grad_norm = gradient_norm();
        if (!std::isfinite(stats.grad_norm)) return stats;
        if (options_.clip_grad_norm > 0 && stats.grad_norm > options_.clip_grad_norm)
            scale_gradients(static_cast<float>(options_.clip_grad_norm / (stats.grad_norm + 1e-6)));
        if (op_profile::enabled()) op_profile::charge(op_profile::kBackward, "gradient norm, clipping");
    }
    weight_optimizer_->step();
    if (quantizer_optimizer_) quantizer_optimizer_->step();
    if (op_profile::enabled()) op_profile::charge(op_profile::kBackward, "optimizer update");
    stats.applied = true;
    return stats;
}

void TrainStep::set_lr_factor(double factor) {
    weight_optimizer_->set_lr(static_cast<float>(options_.sgd.lr * factor));
    if (quantizer_optimizer_) quantizer_optimizer_->set_lr(static_cast<float>(options_.quantizer_lr * factor));
}

std::vector<std::pair<std::string, Optimizer*>> TrainStep::optimizers() {
    std::vector<std::pair<std::string, Optimizer*>> out = {{"weights", weight_optimizer_.get()}};
    if (quantizer_optimizer_) out.emplace_back("quantizer", quantizer_optimizer_.get());
    return out;
}

namespace {

// Sum of the squared gradients of `params`, in double, in a fixed order: eight
// independent partial sums per tensor (vectorisable), combined in order.
double grad_square_sum(const std::vector<NamedParameter>& params) {
    double total = 0;
    for (const NamedParameter& p : params) {
        const Tensor& g = p.var.grad();
        if (!g.defined()) continue;
        const float* d = g.f32();
        const int64_t n = g.numel();
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int k = 0; k < 8; ++k) part[k] += double(d[i + k]) * double(d[i + k]);
        for (; i < n; ++i) part[0] += double(d[i]) * double(d[i]);
        for (double s : part) total += s;
    }
    return total;
}

}  // namespace

double global_grad_norm(const std::vector<NamedParameter>& params) { return std::sqrt(grad_square_sum(params)); }

double TrainStep::gradient_norm() const {
    double sum = grad_square_sum(weight_optimizer_->params());
    if (quantizer_optimizer_) sum += grad_square_sum(quantizer_optimizer_->params());
    return std::sqrt(sum);
}

void TrainStep::scale_gradients(float factor) {
    for (const Optimizer* o : {weight_optimizer_.get(), quantizer_optimizer_.get()})
        if (o)
            for (const NamedParameter& p : o->params()) {
                Tensor g = p.var.grad();  // shares the gradient's memory
                if (!g.defined()) continue;
                float* d = g.f32();
                for (int64_t i = 0, n = g.numel(); i < n; ++i) d[i] *= factor;
            }
}

int64_t count_correct(const Tensor& logits, const std::vector<int32_t>& labels) {
    const int64_t n = logits.dim(0), k = logits.dim(1);
    const float* z = logits.f32();
    int64_t correct = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float* row = z + i * k;
        int64_t best = 0;
        for (int64_t j = 1; j < k; ++j)
            if (row[j] > row[best]) best = j;
        correct += best == labels[i];
    }
    return correct;
}

}  // namespace hfq
