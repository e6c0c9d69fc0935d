// What the study runs: the grid of cells (architecture x bits x scale
// granularity x batch-statistics mode x method x fix x seed), and the trainer
// configuration of each cell.
//
// Methods, the paper's two quantizer classes in their traditional and
// improved forms, plus LSQ for reference:
//   msqe-baseline              po2 scale recomputed from scratch each step (docs/quantizers.md, 3.1)
//   msqe-po2                   the paper's MSQE quantizer (3.2)
//   learnable-po2-ceil         TQT: learned log2-scale rounded up (4.1, rounding ceil)
//   learnable-po2-msqe-round   the paper's fix, Round-to-Lower-MSQE (4.1)
//   lsq                        learned real scale (4.2)
// Fixes, for the ablations, each switched on alone on top of the method
// with every fix off:
//   default          the method as docs/quantizers.md defines it (msqe-po2: outlier mask,
//                    second moments and line search on, stable exponent off)
//   none             every fix off
//   outlier-mask     msqe-po2, learnable-po2-msqe-round
//   second-moments   msqe-po2, learnable-po2-msqe-round
//   line-search      msqe-po2
//   stable-exponent  msqe-po2 (averaging from stable_start of the QAT steps,
//                    switched at stable_switch)
// and, for the stable exponent in the paper's setting:
//   all              msqe-po2 with every fix on: its defaults plus the stable
//                    exponent
// A fix that does not apply to a method makes no cell for it.
//
// Batch statistics of the folded layers during QAT (the trainer's --bn-stats):
//   float-conv             a second, float convolution (the trainer's default)
//   quantized-conv         the quantized convolution's own (about half the work)
//   quantized-conv-freeze  quantized-conv, batch norm frozen at half of the QAT steps
// The first mode given runs at every bit width; the others at --bn-stats-bits
// only (the question there: does the faster mode cost accuracy?).
//
// MobileNetV2 runs the part of the grid also in v2_bits, v2_granularities and
// v2_bn_stats (the default study cuts it to 4 bits per tensor, float-conv).
//
// Seeds: every cell runs with seeds 0..N-1, i.e. the trainer's seed + k (data
// order, augmentation, dropout), all from the same float model, or with
// float_seeds from the float model of seed k. The same k is the same data
// order in every cell: differences between two methods are paired by seed.
#pragma once
#include <string>
#include <vector>

#include "train/config.h"

namespace hfq::study {

struct StudyOptions {
    std::string out = "qat-study";  // the report folder
    std::vector<std::string> archs = {"v1", "v2"};
    std::vector<std::string> methods = {"msqe-baseline", "msqe-po2", "learnable-po2-ceil", "learnable-po2-msqe-round",
                                        "lsq"};
    std::vector<std::string> fixes = {"default"};
    std::vector<int> bits = {2, 3, 4};                               // weight bits (first convolution, classifier: 8)
    std::vector<std::string> granularities = {"tensor", "channel"};  // one scale per tensor / per output channel
    std::vector<std::string> bn_stats = {"float-conv", "quantized-conv", "quantized-conv-freeze"};
    std::vector<int> bn_stats_bits = {4};  // where the modes after the first run
    // MobileNetV2 (6x the training time of V1 here) runs only the part of the
    // grid also in these lists.
    std::vector<int> v2_bits = {4};
    std::vector<std::string> v2_granularities = {"tensor"};
    std::vector<std::string> v2_bn_stats = {"float-conv"};
    int seeds = 3;
    bool float_seeds = false;  // a float model per seed (else one per architecture)
    // Float models to start from, one per architecture (their metadata says
    // which); an architecture without one is trained first.
    std::vector<std::string> float_checkpoints;
    // Everything else of the runs: data, model width, float and QAT schedule,
    // the first seed, threads. arch, bits, per_channel, bn_stats,
    // freeze_bn_step, seed, quantizer, rounding and the fix options are set per
    // cell.
    TrainConfig train = default_train_config();
    // Each cell's QAT epoch sees this many training samples, evenly spaced
    // (0: all, as the float training does).
    int64_t qat_train_limit = 6000;
    double stable_start = 0.5;    // stable-exponent fix: start averaging at this fraction of the QAT steps
    double stable_switch = 0.8;   // ... and switch to the average here
    double late_fraction = 0.2;   // "late" flips: in this last fraction of the QAT steps
    int plot_layers = 3;          // layers per method in the exponent figure
    std::string histogram_layer;  // depthwise layer of the histogram ("": the most outlier-heavy)

    // The trainer's defaults with the study's, chosen so that the default
    // study (Fashion-MNIST, V1 and V2 at width 0.5) takes about two hours on
    // 2 cores (docs/study.md): 5 float epochs, one QAT epoch per cell.
    static TrainConfig default_train_config();
    // Throws hfq::Error naming the bad option.
    void validate() const;
};

struct CellSpec {
    std::string arch;    // "v1", "v2"
    int bits = 4;
    bool per_channel = false;
    std::string bn_stats = "float-conv";
    std::string method;  // one of the grid's method names
    std::string fix = "default";  // "default", "none", or one fix
    int seed = 0;                 // 0..seeds-1
    // The cell without its seed: "v1-4bit-tensor-msqe-po2",
    // "v1-3bit-channel-qconv-freeze-msqe-po2.line-search".
    std::string group() const;
    // The cell's folder under cells/: "<group>/seed<k>".
    std::string id() const;
    // "msqe-po2", "msqe-po2 + line-search", "msqe-po2, no fixes"
    std::string label() const;
    // "4 bits per tensor", "4 bits per channel, quantized-conv + freeze"
    std::string setting() const;
};

const std::vector<std::string>& grid_methods();
const std::vector<std::string>& grid_fixes();
const std::vector<std::string>& grid_bn_stats();
bool fix_applies(const std::string& fix, const std::string& method);

// Every cell of the options: architectures outermost, then bits,
// granularities, batch-statistics modes, methods, fixes, seeds, in the order
// given; combinations where the fix does not apply are left out.
std::vector<CellSpec> make_grid(const StudyOptions& options);

// The trainer configuration of a cell: QAT only (epochs 0) from the float
// checkpoint, whose model configuration (arch, width, ...) it takes; the
// quantizer and fix options of the cell; a metrics line every step (the
// exponent record the flips are counted from). `qat_steps`: the cell's number
// of QAT steps (for the stable-exponent schedule and the batch-norm freeze).
TrainConfig cell_train_config(const StudyOptions& options, const CellSpec& cell, const std::string& float_checkpoint,
                              const std::string& run_dir, int64_t qat_steps);

}  // namespace hfq::study
