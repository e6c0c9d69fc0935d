// A run's stages and what each trains with, derived from the options:
//
//   float   --epochs of float training at --lr (warm-up --warmup-epochs)
//   qat     --qat-epochs of quantization-aware training at --qat-lr
//           (--qat-warmup-epochs), with fresh optimizers and its own schedule
//
// The loader numbers its epochs across the run (the QAT stage's first epoch is
// --epochs), so the two stages see different data orders.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "train/config.h"
#include "train/lr_schedule.h"
#include "train/train_step.h"

namespace hfq {

enum class Stage { float_training, qat, done };
// "float", "qat", "done": the names in checkpoints, metrics and messages.
const char* stage_name(Stage stage);
// Throws hfq::Error naming `source` for an unknown name.
Stage parse_stage(const std::string& name, const std::string& source);

struct StagePlan {
    Stage stage = Stage::float_training;
    int epochs = 0;
    int64_t first_epoch = 0;  // the loader's epoch number of the stage's first epoch
    double lr = 0;            // base learning rate of weights, biases and batch norm
    double warmup_epochs = 0;
};

// The stages the options ask for, in order (float training, then QAT; either may be absent).
std::vector<StagePlan> plan_stages(const TrainConfig& config);

// The stage's learning-rate schedule over its epochs x batches_per_epoch steps.
LrSchedule stage_schedule(const TrainConfig& config, const StagePlan& stage, int64_t batches_per_epoch);

// The training step's optimizers, loss and clipping for the stage.
TrainStepOptions stage_step_options(const TrainConfig& config, const StagePlan& stage);

}  // namespace hfq
