// A trainer run's metrics.jsonl read back (train/trainer.h writes it): the
// step and epoch lines of each stage, and which layers' exponents flipped most.
//
// The file has one JSON object per line, each with a "type":
//   "start"   once: {"step": 0, "model": {...}, "data": "fashion-mnist", "config": {...}, ...}
//   "resume"  when a later invocation continued from the checkpoint of global step S: {"step": S, ...}
//   "step"    every --log-every steps: {"stage": "float" | "qat", "epoch", "step" (global),
//             "stage_step", "loss", "train_top1", "lr", ...; QAT: "quantizers": [per layer:
//             {"name", "per_channel", "exponents": [one per scale group; empty for lsq], ...}]}
//   "epoch"   at each epoch's end: {"stage", "epoch" (1-based, of the stage), "step" (global),
//             "train_loss", "train_top1", ...; when evaluated "test": {"loss", "top1", "top5", ...};
//             QAT, when evaluated: "test_integer": {"top1", ...}}
//   "stop"    a stop (signal, --stop-after-steps): {"step", "signal"}
//   "final"   the run finished: {"summary": {...}}
//   (and "diverged", "dead_channels", which nothing here needs)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "study/flips.h"
#include "train/metrics.h"

namespace hfq::study {

// What the step lines of a stage say about one quantized layer.
struct LayerRecord {
    std::string name;
    bool per_channel = false;
    std::vector<std::vector<int>> exponents;      // per step, per scale group (no groups: lsq)
    std::vector<double> error, clipped, changed;  // per step; NaN where not available
};

// The lines of one stage ("float" or "qat").
struct StageRecord {
    std::vector<int64_t> steps;         // stage_step of each step line, increasing
    std::vector<int64_t> global_steps;  // their run-wide step
    std::vector<LayerRecord> layers;    // QAT: one per quantized layer, in the model's order
    std::vector<Json> epochs;           // the epoch lines, in order
};

struct RunRecord {
    Json start;  // the "start" line (null when the file has none)
    StageRecord float_stage, qat;
    int64_t stopped_at = -1;  // the global step of a "stop" line not followed by a "resume"; else -1
    bool finished = false;    // a "final" line
    bool truncated = false;   // the last line was cut short (a killed run) and was ignored
    const StageRecord& stage(const std::string& name) const;
};

// Reads <path>. A "resume" line at global step S means the lines after the
// checkpoint of step S were written by an interrupted invocation and were run
// again: they are dropped. An unreadable last line (cut short by a kill) is
// ignored and flagged; an unreadable line elsewhere, or a missing file, throws
// hfq::Error naming the file (and the line).
RunRecord read_run_log(const std::string& path);

// The exponent record of one scale group.
struct ExponentTrace {
    std::string layer;
    int64_t group = 0;
    bool per_channel = false;  // the layer has a scale per output channel: group is a channel
    FlipCounts flips;
    std::vector<int> exponents;  // at each step of the stage's steps
};

struct FlipSummary {
    bool has_exponents = false;  // some layer has power-of-two exponents (lsq's scale is real: none)
    FlipCounts total;            // over every layer and scale group
    // The `count` layers with the most flips (summed over their groups), most
    // first, ties in the model's order; each by its group that flips most
    // (the first of equals).
    std::vector<ExponentTrace> traces;
};

// Flips of a stage's logged exponents (count_flips: a change between two
// logged steps counts once, at the later one). `total_steps` and
// `late_fraction` place the late window.
FlipSummary summarize_flips(const StageRecord& stage, int count, int64_t total_steps, double late_fraction);

}  // namespace hfq::study
