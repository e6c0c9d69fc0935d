#include "train/config.h"

#include <CLI/CLI.hpp>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "engine/check.h"
#include "layers/model.h"
#include "quant/folded_conv_bn.h"
#include "train/lr_schedule.h"
#include "train/mpi_job.h"

namespace hfq {
namespace {

using Json = nlohmann::ordered_json;

// Run-control options change how a run is watched and kept, not what it
// computes; they are the only ones a resumed run may change.
enum class Kind { training, control };

// The one list of options: name (command line "--name", JSON key "name"),
// field, kind, help. Sections group --help.
template <class Config, class Visitor>
void visit_fields(Config& c, Visitor&& v) {
    const Kind T = Kind::training, C = Kind::control;
    // One option per entry, its help text continued below it: kept as written.
    // clang-format off
    v.section("Data");
    v("data", c.data, C, "Dataset folder: Fashion-MNIST's IDX files, or ImageNet (DIR/train/<class>/*.JPEG, DIR/val)");
    v("val-ground-truth", c.val_ground_truth, C, "ImageNet with a flat val/ folder: its label file "
      "(default DIR/LOC_val_solution.csv)");
    v("input-size", c.input_size, T, "Input images are SIZE x SIZE; 0: 32 for Fashion-MNIST, 224 for ImageNet");
    v("augment", c.augment, T, "Training augmentation: random crop + flip (Fashion-MNIST: padded crop; "
      "ImageNet: random resized crop)");
    v("train-limit", c.train_limit, T, "Train on this many samples, evenly spaced over the set (0: all)");
    v("test-limit", c.test_limit, T, "Evaluate on this many samples, evenly spaced (0: all)");
    // Run control: the limit decides only whether a run stops, never what a
    // batch holds, so a resumed run may change it.
    v("max-bad-fraction", c.max_bad_fraction, C, "Unreadable images (corrupt or truncated files) allowed, as a "
      "fraction of the training or test set; each is replaced by the next image, more stop the run");
    v("threads", c.threads, C, "Compute threads (oneDNN / OpenMP)");
    v("loader-threads", c.loader_threads, C, "Data-loading threads");

    v.section("Model");
    v("arch", c.arch, T, "Architecture: v1 (MobileNetV1) or v2 (MobileNetV2)");
    v("width", c.width, T, "Width multiplier");
    v("small-input", c.small_input, T, "Small-image stem (stride 1): auto (on for inputs <= 64), true, false");
    v("activation", c.activation, T, "MobileNetV1's activation: relu6 or relu");
    v("dropout", c.dropout, T, "Dropout before the classifier; negative: the architecture's default (V1 0, V2 0.2)");
    v("input-channels", c.input_channels, T, "1 (grey) or 3; 0: 1 for Fashion-MNIST, 3 for ImageNet");

    v.section("Float training");
    v("epochs", c.epochs, T, "Epochs of float training (0: start QAT from --init-from)");
    v("batch-size", c.batch_size, T, "Training batch size: the global batch (under mpirun, split evenly among the "
      "ranks)");
    v("lr", c.lr, T, "Peak learning rate of float training (SGD)");
    v("momentum", c.momentum, T, "SGD momentum");
    v("nesterov", c.nesterov, T, "Nesterov momentum");
    v("weight-decay", c.weight_decay, T, "Weight decay of convolution and linear weights (never on batch norm, "
      "biases or quantizer parameters)");
    v("schedule", c.schedule, T, "Learning-rate schedule after the warm-up: cosine, step or constant");
    v("warmup-epochs", c.warmup_epochs, T, "Linear warm-up of float training, in epochs (fractions allowed)");
    v("lr-step-epochs", c.lr_step_epochs, T, "Step schedule: epochs between decays");
    v("lr-gamma", c.lr_gamma, T, "Step schedule: decay factor");
    v("min-lr-factor", c.min_lr_factor, T, "Lowest learning rate, as a fraction of the peak");
    v("label-smoothing", c.label_smoothing, T, "Label smoothing of the training loss");
    v("clip-grad-norm", c.clip_grad_norm, T, "Clip the gradients' global L2 norm to this (0: off)");
    v("init-from", c.init_from, T, "Start from the weights of this checkpoint (e.g. a float-only run's final.safetensors, or the float.safetensors a "
      "float + QAT run saves before QAT)");
    v("init-partial", c.init_partial, T, "With --init-from: skip tensors missing or of another shape "
      "(e.g. a classifier for another number of classes)");

    v.section("Quantization-aware training");
    v("quantizer", c.quantizer, T, "Weight quantizer after float training: msqe-po2, msqe-baseline, "
      "learnable-po2, lsq, or none (float only)");
    v("bits", c.bits, T, "Weight bits");
    v("per-channel", c.per_channel, T, "One scale per output channel (else per tensor)");
    v("first-layer-bits", c.first_layer_bits, T, "Bits of the first convolution (0: --bits)");
    v("last-layer-bits", c.last_layer_bits, T, "Bits of the classifier (0: --bits)");
    v("fold-bn", c.fold_bn, T, "Fold batch norm into the convolutions before quantizing");
    v("zero-dead-channels", c.zero_dead_channels, T, "Before QAT, zero the weights of folded channels whose "
      "batch-norm variance is ~0 (constant output; folding would make their weights ~300x the others)");
    v("activation-bits", c.activation_bits, T, "W4A8 for integer hardware: every tensor that enters a layer on a "
      "power-of-two grid of this many bits (learnable-po2), biases on the accumulator grid, checked against the "
      "integer engine at the end (0: weights only)");
    v("rounding", c.rounding, T, "learnable-po2's exponent rounding: msqe-round, ceil or rint");
    v("second-moments", c.second_moments, T, "Weight the quantization error by the gradients' second moments");
    v("outlier-mask", c.outlier_mask, T, "Leave outliers out of the scale's error");
    v("line-search", c.line_search, T, "msqe-po2's line search around the least-squares exponent");
    v("qat-epochs", c.qat_epochs, T, "Epochs of quantization-aware training");
    v("qat-lr", c.qat_lr, T, "Peak learning rate of QAT (SGD; same schedule as float training)");
    v("qat-warmup-epochs", c.qat_warmup_epochs, T, "Linear warm-up of QAT, in epochs");
    v("freeze-bn-at", c.freeze_bn_at, T, "Fraction of QAT after which folded layers use the moving batch-norm "
      "statistics instead of the batch's (0: from the start, 1: never)");
    v("bn-stats", c.bn_stats, T, "Batch statistics of folded layers until they freeze: quantized-conv (the "
      "quantized convolution's, in float units; PyTorch's ConvBn2d) or float-conv (a second, float convolution; "
      "Jacob et al.: about twice the convolution work)");
    v("stable-start-step", c.stable_start_step, T, "msqe-po2: QAT step at which the stable exponent starts "
      "averaging (-1: off)");
    v("stable-switch-step", c.stable_switch_step, T, "msqe-po2: QAT step at which layers switch to the "
      "stable exponent (-1: never)");
    v("quantizer-optimizer", c.quantizer_optimizer, T, "Optimizer of learnable scales: adam or sgd");
    v("quantizer-lr", c.quantizer_lr, T, "Its peak learning rate");
    v("quantizer-weight-decay", c.quantizer_weight_decay, T, "Its weight decay");

    v.section("Run");
    v("out", c.out, C, "Output folder for checkpoints, metrics and config (default runs/<arch>-<data>-<date>)");
    v("config", c.config, C, "Read option values from this JSON file; command-line options override them");
    v("resume", c.resume, C, "Continue the run in this folder from its checkpoint");
    v("seed", c.seed, T, "Random seed (initialisation, data order, augmentation, dropout)");
    v("log-every", c.log_every, C, "Steps between metrics lines");
    v("checkpoint-every", c.checkpoint_every, C, "Steps between checkpoints (0: at the end of each epoch only)");
    v("eval-every", c.eval_every, C, "Epochs between evaluations (the last epoch of each stage always)");
    v("stop-after-steps", c.stop_after_steps, C, "Stop with a checkpoint after this many steps (0: run to the end)");
    v("progress", c.progress, C, "Progress display: auto (a bar on a terminal, lines otherwise), bar, lines, none");

    // Under mpirun only (docs/distributed.md). A resumed run may change the
    // number of ranks and --sync-bn: it then continues, not bit for bit.
    v.section("Data parallel (mpirun -np N train_mobilenet ...)");
    v("sync-bn", c.sync_bn, C, "Batch statistics over the global batch (all ranks), as one process computes "
      "them; off: each rank's own part, as PyTorch DDP without SyncBatchNorm");
    v("rank-timeout", c.rank_timeout, C, "Seconds a rank waits for the others in a collective before the job is "
      "aborted, naming the ranks that do not answer");
    v("check-every", c.check_every, C, "Steps between comparisons of every rank's weights and quantizer state "
      "(0: at each epoch's end only)");
    // clang-format on
}

// ---- JSON ----------------------------------------------------------------

struct JsonWriter {
    Json& j;
    void section(const char*) {}
    template <class T>
    void operator()(const char* name, const T& field, Kind, const char*) {
        j[name] = field;
    }
};

struct JsonReader {
    const nlohmann::json& j;
    const std::string& source;
    std::set<std::string>& known;
    void section(const char*) {}
    template <class T>
    void operator()(const char* name, T& field, Kind, const char*) {
        known.insert(name);
        auto it = j.find(name);
        if (it == j.end()) return;
        const nlohmann::json& v = *it;
        bool ok;
        if constexpr (std::is_same_v<T, bool>)
            ok = v.is_boolean();
        else if constexpr (std::is_same_v<T, std::string>)
            ok = v.is_string();
        else if constexpr (std::is_same_v<T, uint64_t>)
            ok = v.is_number_unsigned();
        else if constexpr (std::is_integral_v<T>)
            ok = v.is_number_integer();
        else
            ok = v.is_number();
        const char* expected = std::is_same_v<T, bool>          ? "true or false"
                               : std::is_same_v<T, std::string> ? "a string"
                               : std::is_same_v<T, uint64_t>    ? "a non-negative integer"
                               : std::is_integral_v<T>          ? "an integer"
                                                                : "a number";
        HFQ_CHECK(ok, source, ": option '", name, "' must be ", expected, ", got ", v.dump());
        field = v.get<T>();
    }
};

struct KindCollector {
    std::set<std::string>& control;
    void section(const char*) {}
    template <class T>
    void operator()(const char* name, const T&, Kind kind, const char*) {
        if (kind == Kind::control) control.insert(name);
    }
};

// ---- Command line ----------------------------------------------------------

struct CliBuilder {
    CLI::App& app;
    std::string group = "Options";
    void section(const char* name) { group = name; }
    template <class T>
    void operator()(const char* name, T& field, Kind, const char* help) {
        const std::string flag = std::string("--") + name;
        if constexpr (std::is_same_v<T, bool>) {
            app.add_flag(flag + ",!--no-" + name, field, cat(help, " (default: ", field ? "on" : "off", ")"))
                ->group(group);
        } else {
            app.add_option(flag, field, help)->capture_default_str()->group(group);
        }
    }
};

// CLI11 lists a negatable flag as "--augment,--no-augment{false}"; the help
// text already says the default, so the braces go.
class HelpFormatter : public CLI::Formatter {
public:
    std::string make_option_name(const CLI::Option* opt, bool positional) const override {
        std::string name;
        bool in_braces = false;
        for (char ch : CLI::Formatter::make_option_name(opt, positional)) {
            if (ch == '{' || ch == '}')
                in_braces = ch == '{';
            else if (!in_braces)
                name += ch == ',' ? std::string(", ") : std::string(1, ch);
        }
        return name;
    }
};

std::string read_text(const std::string& path, const char* what) {
    std::ifstream in(path);
    HFQ_CHECK(in.good(), what, " ", path, ": cannot open the file");
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

std::string option_list(const std::set<std::string>& names) {
    std::string out;
    for (const std::string& n : names) {
        out += out.empty() ? "--" : ", --";
        out += n;
    }
    return out;
}

}  // namespace

// ---- TrainConfig -----------------------------------------------------------

std::string TrainConfig::to_json() const {
    Json j = Json::object();
    visit_fields(*this, JsonWriter{j});
    return j.dump(2);
}

void TrainConfig::apply_json(const std::string& text, const std::string& source) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(!j.is_discarded(), source, ": not valid JSON");
    HFQ_CHECK(j.is_object(), source, ": must hold a JSON object of option values, e.g. {\"lr\": 0.05}");
    std::set<std::string> known;
    TrainConfig updated = *this;  // a failed read changes nothing
    // Configs written before --freeze-bn-at gave the freeze as a step
    // ("freeze-bn-step", -1: never); "never" is --freeze-bn-at 1, a step
    // number has no fraction without the run's data, so it is refused.
    if (auto legacy = j.find("freeze-bn-step"); legacy != j.end()) {
        HFQ_CHECK(legacy->is_number_integer() && legacy->get<int64_t>() == -1 && !j.contains("freeze-bn-at"), source,
                  ": freeze-bn-step ", legacy->dump(), " comes from an older hfq; give the freeze as a fraction of "
                  "QAT with freeze-bn-at (--freeze-bn-at) instead");
        updated.freeze_bn_at = 1;
        j.erase("freeze-bn-step");
    }
    visit_fields(updated, JsonReader{j, source, known});
    for (const auto& [key, value] : j.items())
        HFQ_CHECK(known.count(key), source, ": unknown option '", key, "' (see train_mobilenet --help)");
    *this = updated;
}

std::vector<std::string> TrainConfig::training_differences(const TrainConfig& a, const TrainConfig& b) {
    std::set<std::string> control;
    visit_fields(a, KindCollector{control});
    Json ja = Json::object(), jb = Json::object();
    visit_fields(a, JsonWriter{ja});
    visit_fields(b, JsonWriter{jb});
    std::vector<std::string> out;
    for (const auto& [key, value] : ja.items())
        if (!control.count(key) && value != jb[key]) out.push_back(key);
    return out;
}

void TrainConfig::validate() const {
    auto in_set = [](const std::string& v, std::initializer_list<const char*> set) {
        for (const char* s : set)
            if (v == s) return true;
        return false;
    };
    HFQ_CHECK(!data.empty(), "--data: a dataset folder is needed");
    HFQ_CHECK(input_size == 0 || (input_size >= 16 && input_size <= 1024),
              "--input-size must be 0 (automatic) or "
              "in 16..1024, got ",
              input_size);
    HFQ_CHECK(train_limit >= 0 && test_limit >= 0, "--train-limit and --test-limit must be >= 0 (0: all), got ",
              train_limit, " and ", test_limit);
    HFQ_CHECK(threads >= 1 && threads <= 1024, "--threads must be in 1..1024, got ", threads);
    HFQ_CHECK(loader_threads >= 1 && loader_threads <= 1024, "--loader-threads must be in 1..1024, got ",
              loader_threads);
    HFQ_CHECK(max_bad_fraction >= 0 && max_bad_fraction <= 1, "--max-bad-fraction must be in [0, 1], got ",
              max_bad_fraction);

    parse_arch(arch);
    parse_activation(activation);
    HFQ_CHECK(width > 0 && width <= 4, "--width must be in (0, 4], got ", width);
    HFQ_CHECK(in_set(small_input, {"auto", "true", "false"}), "--small-input must be auto, true or false, got '",
              small_input, "'");
    HFQ_CHECK(dropout < 1, "--dropout must be below 1 (negative: the architecture's default), got ", dropout);
    HFQ_CHECK(input_channels == 0 || input_channels == 1 || input_channels == 3,
              "--input-channels must be 0 (automatic), 1 or 3, got ", input_channels);

    HFQ_CHECK(epochs >= 0 && epochs <= 100000, "--epochs must be in 0..100000, got ", epochs);
    HFQ_CHECK(batch_size >= 2 && batch_size <= 65536, "--batch-size must be in 2..65536 (batch norm needs 2), got ",
              batch_size);
    HFQ_CHECK(batch_size % mpi::size() == 0, "--batch-size ", batch_size,
              " is the global batch: it must split evenly among the ", mpi::size(), " ranks");
    HFQ_CHECK(lr > 0, "--lr must be positive, got ", lr);
    HFQ_CHECK(momentum >= 0 && momentum < 1, "--momentum must be in [0, 1), got ", momentum);
    HFQ_CHECK(!nesterov || momentum > 0, "--nesterov needs --momentum > 0");
    HFQ_CHECK(weight_decay >= 0, "--weight-decay must be >= 0, got ", weight_decay);
    parse_schedule(schedule);
    HFQ_CHECK(warmup_epochs >= 0 && qat_warmup_epochs >= 0, "--warmup-epochs and --qat-warmup-epochs must be >= 0");
    HFQ_CHECK(lr_step_epochs > 0, "--lr-step-epochs must be positive, got ", lr_step_epochs);
    HFQ_CHECK(lr_gamma > 0 && lr_gamma <= 1, "--lr-gamma must be in (0, 1], got ", lr_gamma);
    HFQ_CHECK(min_lr_factor >= 0 && min_lr_factor <= 1, "--min-lr-factor must be in [0, 1], got ", min_lr_factor);
    HFQ_CHECK(label_smoothing >= 0 && label_smoothing < 1, "--label-smoothing must be in [0, 1), got ",
              label_smoothing);
    HFQ_CHECK(rank_timeout > 0, "--rank-timeout must be positive (seconds), got ", rank_timeout);
    HFQ_CHECK(check_every >= 0, "--check-every must be >= 0 (0: at each epoch's end only), got ", check_every);
    HFQ_CHECK(clip_grad_norm >= 0, "--clip-grad-norm must be >= 0 (0: off), got ", clip_grad_norm);
    HFQ_CHECK(!init_partial || !init_from.empty(), "--init-partial needs --init-from");

    if (qat()) {
        try {
            quant::parse_bn_stats(bn_stats);  // the one list of the names
        } catch (const Error& e) {
            throw Error(cat("--bn-stats: ", e.what()));
        }
        try {
            quant_policy(qat_epochs).validate();
        } catch (const Error& e) {
            throw Error(cat("--quantizer ", quantizer, ": ", e.what()));
        }
        HFQ_CHECK(qat_epochs >= 0 && qat_epochs <= 100000, "--qat-epochs must be in 0..100000, got ", qat_epochs);
        HFQ_CHECK(qat_lr > 0, "--qat-lr must be positive, got ", qat_lr);
        HFQ_CHECK(freeze_bn_at >= 0 && freeze_bn_at <= 1, "--freeze-bn-at must be in [0, 1] (a fraction of QAT), got ",
                  freeze_bn_at);
        HFQ_CHECK(stable_start_step >= -1 && stable_switch_step >= -1,
                  "--stable-start-step and --stable-switch-step must be >= 0, or -1 (off)");
        if (stable_start_step >= 0 || stable_switch_step >= 0) {
            HFQ_CHECK(quantizer == "msqe-po2",
                      "--stable-start-step / --stable-switch-step: only msqe-po2 keeps "
                      "a stable exponent, the quantizer is ",
                      quantizer);
            HFQ_CHECK(stable_switch_step < 0 || (stable_start_step >= 0 && stable_switch_step >= stable_start_step),
                      "--stable-switch-step (", stable_switch_step, ") needs --stable-start-step (", stable_start_step,
                      ") set and not later");
        }
        HFQ_CHECK(in_set(quantizer_optimizer, {"adam", "sgd"}), "--quantizer-optimizer must be adam or sgd, got '",
                  quantizer_optimizer, "'");
        HFQ_CHECK(quantizer_lr > 0, "--quantizer-lr must be positive, got ", quantizer_lr);
        HFQ_CHECK(quantizer_weight_decay >= 0, "--quantizer-weight-decay must be >= 0, got ", quantizer_weight_decay);
    }
    HFQ_CHECK(epochs > 0 || qat() || !init_from.empty(),
              "nothing to do: --epochs 0 with --quantizer none and no "
              "--init-from to evaluate");
    HFQ_CHECK(log_every >= 1, "--log-every must be >= 1, got ", log_every);
    HFQ_CHECK(checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: each epoch's end), got ", checkpoint_every);
    HFQ_CHECK(eval_every >= 1, "--eval-every must be >= 1, got ", eval_every);
    HFQ_CHECK(stop_after_steps >= 0, "--stop-after-steps must be >= 0 (0: never), got ", stop_after_steps);
    HFQ_CHECK(in_set(progress, {"auto", "bar", "lines", "none"}), "--progress must be auto, bar, lines or none, got '",
              progress, "'");
}

int64_t TrainConfig::freeze_bn_step(int64_t qat_steps) const {
    if (freeze_bn_at >= 1) return -1;
    return std::llround(freeze_bn_at * double(qat_steps));
}

quant::QuantPolicy TrainConfig::quant_policy(int64_t qat_steps) const {
    quant::QuantPolicy p;
    p.method = quantizer;
    p.options.bits = bits;
    p.options.per_channel = per_channel;
    p.options.rounding = quant::parse_exponent_rounding(rounding);
    p.options.second_moments = second_moments;
    p.options.outlier_mask = outlier_mask;
    p.options.line_search = line_search;
    p.options.stable_scale = stable_start_step >= 0;
    p.first_layer_bits = first_layer_bits;
    p.last_layer_bits = last_layer_bits;
    p.fold_bn = fold_bn;
    p.freeze_bn_step = freeze_bn_step(qat_steps);
    p.bn_stats = bn_stats;
    p.activation_bits = activation_bits;
    return p;
}

// ---- parse_args --------------------------------------------------------------

ParsedArgs parse_args(int argc, const char* const* argv) {
    ParsedArgs r;
    r.exit_code = 2;
    TrainConfig& c = r.config;
    CLI::App app{
        "train_mobilenet: trains a MobileNet in float, then fine-tunes it with hardware-friendly weight "
        "quantization (QAT).\nWith no options: MobileNetV1 on Fashion-MNIST, float then 4-bit msqe-po2.",
        "train_mobilenet"};
    auto formatter = std::make_shared<HelpFormatter>();
    formatter->column_width(34);
    app.formatter(formatter);
    visit_fields(c, CliBuilder{app});
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        r.message = app.help();
        r.exit_code = 0;
        return r;
    } catch (const CLI::ParseError& e) {
        r.message = cat("train_mobilenet: ", e.what(), "\nRun train_mobilenet --help for the options.");
        return r;
    }
    auto given = [&](const std::string& name) { return app.get_option("--" + name)->count() > 0; };
    try {
        // The layer beneath the command line: the resumed run's config or a config file.
        TrainConfig base;
        if (!c.resume.empty()) {
            HFQ_CHECK(c.config.empty(), "--config cannot be combined with --resume (the run's own config is used)");
            HFQ_CHECK(c.out.empty() || std::filesystem::path(c.out) == std::filesystem::path(c.resume),
                      "--out must be left out with --resume (the run continues in its folder)");
            const std::string path = (std::filesystem::path(c.resume) / "config.json").string();
            base.apply_json(read_text(path, "--resume: the run's config"), path);
        } else if (!c.config.empty()) {
            base.apply_json(read_text(c.config, "--config"), c.config);
        }
        // Merge: the command line's values where given, the base's elsewhere.
        Json from_cli = Json::parse(c.to_json()), merged = Json::parse(base.to_json());
        for (auto& [key, value] : from_cli.items())
            if (given(key)) merged[key] = value;
        TrainConfig result;
        result.apply_json(merged.dump(), "the command line");
        if (!c.resume.empty()) {
            result.out = c.resume;
            const std::vector<std::string> changed = TrainConfig::training_differences(result, base);
            std::set<std::string> names(changed.begin(), changed.end());
            HFQ_CHECK(names.empty(), "--resume: ", option_list(names),
                      " would change what the run computes; "
                      "only run-control options (threads, logging, checkpointing, stopping, --max-bad-fraction) "
                      "can differ when resuming");
        }
        result.validate();
        c = result;
    } catch (const Error& e) {
        r.message = cat("train_mobilenet: ", e.what());
        return r;
    }
    r.run = true;
    r.exit_code = 0;
    return r;
}

}  // namespace hfq
