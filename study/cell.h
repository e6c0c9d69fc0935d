// One cell of the study: a QAT run from the float checkpoint, and what the
// report needs from it, read back from the trainer's output folder
// (summary.json, metrics.jsonl with one line per step, final.safetensors).
//
// Folder of a cell: <out>/cells/<id>/
//   run/          the trainer's output folder (train/trainer.h)
//   result.json   the CellResult, written atomically once the run finished:
//                 a cell with this file is finished and is not run again
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "study/depthwise.h"
#include "study/flips.h"
#include "study/grid.h"
#include "study/run_log.h"
#include "train/metrics.h"

namespace hfq::study {

struct CellResult {
    CellSpec cell;
    Json config;  // the cell's TrainConfig (as the trainer resolved it)
    static constexpr double kNone = std::numeric_limits<double>::quiet_NaN();

    // Test-set top-1, fractions.
    double float_top1 = kNone, fake_quant_top1 = kNone, integer_top1 = kNone;
    // Exponent flips over every quantized layer and scale group (none for lsq,
    // whose scale is real: has_exponents false).
    bool has_exponents = true;
    FlipCounts flips;
    // Means over the steps and the quantized layers (each layer counts once).
    double mean_clipped = kNone, mean_codes_changed = kNone;
    double seconds = kNone, images_per_second = kNone;  // of QAT

    // Per step (the QAT steps 1..T, as logged).
    std::vector<int64_t> steps;
    std::vector<double> mean_error;     // error per element, mean over the layers
    std::vector<ExponentTrace> traces;  // the groups of the layers that flipped most, most first (summarize_flips)
    // Per QAT epoch.
    std::vector<double> epoch_top1, epoch_integer_top1;
    // The histogram layer after training.
    DepthwiseLayer histogram;
};

Json to_json(const CellResult& r);
CellResult cell_result_from_json(const Json& j, const std::string& source);

// The test-set top-1 after each epoch of a stage ("float", "qat") of the run
// in run_dir (NaN for an epoch without evaluation).
std::vector<double> epoch_test_top1(const std::string& run_dir, const std::string& stage);

// Reads a finished run folder. `histogram_layer`: the depthwise layer whose
// weights and grid to keep; `plot_layers`: how many layers' exponent traces.
CellResult summarize_run(const CellSpec& cell, const std::string& run_dir, const std::string& histogram_layer,
                         int plot_layers, double late_fraction);

}  // namespace hfq::study
