#include "train/stages.h"

#include <algorithm>
#include <cmath>

#include "engine/check.h"

namespace hfq {

const char* stage_name(Stage stage) {
    switch (stage) {
        case Stage::float_training: return "float";
        case Stage::qat: return "qat";
        case Stage::done: return "done";
    }
    return "?";
}

Stage parse_stage(const std::string& name, const std::string& source) {
    for (Stage s : {Stage::float_training, Stage::qat, Stage::done})
        if (name == stage_name(s)) return s;
    throw Error(cat(source, ": unknown stage '", name, "' (float, qat or done)"));
}

std::vector<StagePlan> plan_stages(const TrainConfig& c) {
    std::vector<StagePlan> stages;
    if (c.epochs > 0) stages.push_back({Stage::float_training, c.epochs, 0, c.lr, c.warmup_epochs});
    if (c.qat()) stages.push_back({Stage::qat, c.qat_epochs, c.epochs, c.qat_lr, c.qat_warmup_epochs});
    return stages;
}

LrSchedule stage_schedule(const TrainConfig& c, const StagePlan& stage, int64_t batches_per_epoch) {
    const int64_t total = stage.epochs * batches_per_epoch;
    LrSchedule schedule;
    schedule.kind = parse_schedule(c.schedule);
    schedule.total_steps = std::max<int64_t>(1, total);
    schedule.warmup_steps = std::min<int64_t>(total, std::llround(stage.warmup_epochs * batches_per_epoch));
    schedule.step_size = std::max<int64_t>(1, std::llround(c.lr_step_epochs * batches_per_epoch));
    schedule.gamma = c.lr_gamma;
    schedule.min_factor = c.min_lr_factor;
    schedule.validate();
    return schedule;
}

TrainStepOptions stage_step_options(const TrainConfig& c, const StagePlan& stage) {
    TrainStepOptions o;
    o.sgd.lr = static_cast<float>(stage.lr);
    o.sgd.momentum = static_cast<float>(c.momentum);
    o.sgd.nesterov = c.nesterov;
    o.sgd.weight_decay = static_cast<float>(c.weight_decay);
    o.quantizer_optimizer = c.quantizer_optimizer;
    o.quantizer_lr = static_cast<float>(c.quantizer_lr);
    o.quantizer_weight_decay = static_cast<float>(c.quantizer_weight_decay);
    o.label_smoothing = static_cast<float>(c.label_smoothing);
    o.clip_grad_norm = static_cast<float>(c.clip_grad_norm);
    return o;
}

}  // namespace hfq
