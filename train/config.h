// The trainer's configuration: every option of train_mobilenet, with its
// default. One list in config.cpp names each field once; the command line,
// the JSON config file, the resolved config saved next to the checkpoints and
// --help are all generated from it, so they cannot disagree.
//
// Where values come from, later ones winning:
//   1. the defaults below;
//   2. with --resume DIR: DIR/config.json, the resolved config of that run;
//      else with --config FILE: FILE, a flat JSON object {"lr": 0.05, ...}
//      keyed by option names without the dashes;
//   3. the command line.
// When resuming, only the run-control options (threads, logging,
// checkpointing, stopping, paths of the data, the limit on unreadable files)
// may differ from the run's saved config: anything else would change the
// result of the training.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "data/dataset.h"
#include "quant/quantize_model.h"

namespace hfq {

struct TrainConfig {
    // ---- Data ----
    std::string data = "/usr/share/datasets/fashion-mnist";
    std::string val_ground_truth;  // ImageNet with a flat val/ folder (default ROOT/LOC_val_solution.csv)
    int input_size = 0;            // 0: 32 for Fashion-MNIST, 224 for ImageNet
    bool augment = true;
    int64_t train_limit = 0;  // use this many training samples (0: all), evenly spaced
    int64_t test_limit = 0;   // likewise for the test set
    // Unreadable images (corrupt or truncated files) tolerated, as a fraction
    // of the training or test set; each is replaced by the next image.
    double max_bad_fraction = kDefaultMaxBadFraction;
    int loader_threads = 1;
    int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));

    // ---- Model ----
    std::string arch = "v1";
    double width = 0.5;
    std::string small_input = "auto";  // auto: on for inputs of 64 pixels or less
    std::string activation = "relu6";
    double dropout = -1;     // < 0: the architecture's default
    int input_channels = 0;  // 0: 1 for Fashion-MNIST, 3 for ImageNet

    // ---- Float training ----
    int epochs = 12;
    int batch_size = 128;
    double lr = 0.2;
    double momentum = 0.9;
    bool nesterov = false;
    double weight_decay = 5e-5;
    std::string schedule = "cosine";
    double warmup_epochs = 1;
    double lr_step_epochs = 30;  // step schedule: epochs between decays
    double lr_gamma = 0.1;       // step schedule: decay factor
    double min_lr_factor = 0;    // floor of the schedule, as a fraction of the base rate
    double label_smoothing = 0.1;
    double clip_grad_norm = 0;  // 0: off
    std::string init_from;      // start from these weights (a checkpoint)
    bool init_partial = false;  // ... skipping tensors that do not fit (a new classifier)

    // ---- Quantization-aware training ----
    std::string quantizer = "msqe-po2";  // or "none": float training only
    int bits = 4;
    // One power-of-two scale per output channel (still a shift per channel in
    // hardware; README, "The default run", compares it with per tensor).
    bool per_channel = true;
    int first_layer_bits = 8;  // 0: same as --bits
    int last_layer_bits = 8;
    bool fold_bn = true;
    // Zero the weights of dead channels before QAT (quant::zero_dead_channels):
    // folding makes them ~300x the live weights, which wrecks a per-tensor grid.
    bool zero_dead_channels = true;
    int activation_bits = 0;              // 0: weights only
    std::string rounding = "msqe-round";  // learnable-po2's exponent rounding
    bool second_moments = true;
    bool outlier_mask = true;
    bool line_search = true;
    int qat_epochs = 4;
    double qat_lr = 0.01;
    double qat_warmup_epochs = 0;
    double freeze_bn_at = 0.5;                 // fraction of QAT's steps with batch statistics in folded layers (1: all)
    std::string bn_stats = "quantized-conv";   // their source: quantized-conv or float-conv (quant::QuantPolicy)
    int64_t stable_start_step = -1;            // QAT step at which the stable exponent starts averaging (-1: off)
    int64_t stable_switch_step = -1;           // QAT step at which layers switch to it (-1: never)
    std::string quantizer_optimizer = "adam";  // for learnable scales: adam or sgd
    double quantizer_lr = 1e-3;
    double quantizer_weight_decay = 0;

    // ---- Run ----
    std::string out;     // empty: runs/<arch>-<dataset>-<date-time>
    std::string config;  // JSON file of option values
    std::string resume;  // continue the run in this folder
    uint64_t seed = 0;
    int log_every = 50;             // steps between metrics lines
    int64_t checkpoint_every = 0;   // steps between checkpoints (0: at each epoch's end only)
    int eval_every = 1;             // epochs between evaluations (the last epoch of a stage always)
    int64_t stop_after_steps = 0;   // stop (with a checkpoint) after this many steps in this invocation
    std::string progress = "auto";  // auto (a bar on a terminal, else lines), bar, lines, none

    // ---- Data parallel (under mpirun: train/data_parallel.h) ----
    bool sync_bn = false;        // batch statistics over the global batch, not each rank's part
    double rank_timeout = 300;   // seconds a collective waits for the other ranks before the job is aborted
    int64_t check_every = 100;   // steps between the ranks' comparison of their weights and state (0: at epochs' ends)

    // Throws hfq::Error naming the option and the problem.
    void validate() const;
    // The flat JSON object of every option (the resolved config).
    std::string to_json() const;
    // Applies a flat JSON object of option values over this config. Unknown
    // keys and values of the wrong type are errors naming `source` and the key.
    void apply_json(const std::string& text, const std::string& source);
    // The names of the options that change what training computes (all but
    // the run-control ones) whose values differ between the two configs.
    static std::vector<std::string> training_differences(const TrainConfig& a, const TrainConfig& b);

    // Derived settings.
    // For quantizer != "none". qat_steps: QAT's length in steps
    // (qat_epochs x batches per epoch), which --freeze-bn-at is a fraction of.
    quant::QuantPolicy quant_policy(int64_t qat_steps) const;
    // The QAT step from which folded layers use the moving statistics (-1: never).
    int64_t freeze_bn_step(int64_t qat_steps) const;
    bool qat() const { return quantizer != "none"; }
};

// The outcome of reading a command line.
struct ParsedArgs {
    TrainConfig config;
    bool run = false;     // false: print `message` and exit with `exit_code`
    int exit_code = 0;    // 0 for --help, non-zero for errors
    std::string message;  // the help text, or the error message
};
ParsedArgs parse_args(int argc, const char* const* argv);

}  // namespace hfq
