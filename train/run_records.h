// What a run writes as it goes: the records of metrics.jsonl and the lines on
// the terminal, for the start of a run, a logged step and an epoch's end.
//
//   start   {"type": "start" | "resume", "step", "model", "parameters",
//            "macs_per_image", "data", "train_samples", "test_samples",
//            "threads", "loader_threads", "config" (new runs)}
//   step    {"type": "step", "stage", "epoch", "step", "stage_step", "loss",
//            "train_top1", "lr", "quantizer_lr"?, "grad_norm",
//            "images_per_second", "data_wait_fraction", "quantizers" (QAT)}
//   epoch   {"type": "epoch", "stage", "epoch", "step", "train_loss",
//            "train_top1", "images_per_second", "data_wait_fraction",
//            "skipped_unreadable", "test"?, "test_integer"? (QAT),
//            "quantizers" (QAT)}
// Losses and top-1 of "step" records are means over the steps since the last
// one; of "epoch" records, over the epoch.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

#include "layers/model.h"
#include "train/config.h"
#include "train/datasets.h"
#include "train/evaluate.h"
#include "train/metrics.h"
#include "train/stages.h"
#include "train/train_step.h"
#include "train/training_checkpoint.h"

namespace hfq {

// Training loss and accuracy summed over some steps (a log window or an epoch).
struct Tally {
    using Clock = std::chrono::steady_clock;
    double loss = 0;  // sum of batch means times batch sizes
    int64_t correct = 0, samples = 0, steps = 0;
    double wait = 0;      // seconds spent waiting for the loader
    int64_t skipped = 0;  // unreadable samples, each replaced by the next one
    double paused = 0;    // seconds spent evaluating and saving (not training)
    Clock::time_point t0 = Clock::now();

    void add(const StepStats& s, int64_t n);
    double mean_loss() const { return samples ? loss / samples : 0; }
    double accuracy() const { return samples ? double(correct) / samples : 0; }
    double busy() const;  // seconds since t0, less the pauses
    double images_per_second() const { return samples / busy(); }
};

// A metrics record and the line that says the same on the terminal.
struct Report {
    Json record;
    std::string line;
};

Report start_report(const TrainConfig& config, const TrainData& data, Model& model, bool resuming, int64_t global_step,
                    const std::string& out);

// `window`: the steps since the last step record.
Json step_record(const StagePlan& stage, const TrainState& state, const TrainStep& step, const StepStats& stats,
                 const Tally& window, int64_t epoch, Model& model);

// `test` and `test_integer`: the epoch's evaluations (null when not evaluated).
Report epoch_report(const StagePlan& stage, int64_t epoch, int64_t global_step, const Tally& epoch_tally,
                    const Json& test, const Json& test_integer, Model& model);

// An evaluation as JSON: {"loss", "top1", "top5", "samples", "skipped_unreadable", "seconds"}.
Json eval_json(const EvalResult& r);

// "12.34 %" of r[key], or "-" when absent.
std::string percent(const Json& r, const char* key);

}  // namespace hfq
