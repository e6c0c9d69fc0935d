// run_training: a whole training run as train_mobilenet performs it.
//
// Stages: float training (--epochs; optionally from --init-from), then, with
// a quantizer, quantization-aware training (--qat-epochs): the model is
// wrapped by quantize_model with the policy the options describe and
// fine-tuned with fresh optimizers and its own learning-rate schedule. Each
// epoch ends with an evaluation on the test set; each stage's last one is
// kept for the final table (float, fake-quant, integer export).
//
// Output folder (--out):
//   config.json             the resolved configuration (--resume reads it)
//   metrics.jsonl           one JSON object per line: "start", "step", "epoch",
//                           "stage", "stop", "final" records
//   checkpoint.safetensors  the latest training checkpoint (train/training_checkpoint.h),
//                           replaced atomically at each epoch's end, every
//                           --checkpoint-every steps, on a stop and at the end
//   float.safetensors       the float model after float training (for --init-from)
//   final.safetensors       the final model (quantized: with its quantizer state and policy)
//   summary.json            the final results
//
// Stopping: SIGINT / SIGTERM (or --stop-after-steps) let the current step
// finish, save a checkpoint and return; --resume continues bit for bit. A
// non-finite loss (or gradient) throws hfq::Error naming the step; the
// checkpoint on disk is the last good one. Bad options, data or checkpoints
// throw hfq::Error before anything in the output folder is written.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "train/config.h"
#include "train/metrics.h"

namespace hfq {

enum class RunStatus {
    finished,     // all stages done
    stopped,      // --stop-after-steps reached
    interrupted,  // SIGINT or SIGTERM
};

struct RunResult {
    RunStatus status = RunStatus::finished;
    int signal = 0;  // the signal, when interrupted
    std::string out_dir;
    int64_t global_step = 0;  // steps done in the run
    Json summary;             // the final results (when finished)
};

struct RunHooks {
    // Called after every training step with the run's step count (tests use
    // it to raise a signal at a chosen step).
    std::function<void(int64_t global_step)> after_step;
    // Called after each epoch's record is written to metrics.jsonl, with the
    // run folder (train_mobilenet redraws curves.png there).
    std::function<void(const std::string& out_dir)> after_epoch;
};

RunResult run_training(const TrainConfig& config, const RunHooks& hooks = {});

}  // namespace hfq
