// qat_study: the paper's comparison, reproduced. From one float model per
// architecture (trained here unless given), quantization-aware training with
// each method of the grid at each bit width and scale granularity, with
// several seeds, then a report folder: report.md (results over the seeds,
// paired differences with 95 % intervals, findings) and PNG figures.
// Everything is in the study library (study/); this is its command line.
//
//   qat_study                                     # Fashion-MNIST: the default study (docs/study.md)
//   qat_study --archs v1 --bits 4 --granularity tensor --seeds 5
//   qat_study --archs v1 --fixes none,outlier-mask,second-moments,line-search,stable-exponent
//   qat_study --data /data/imagenet --float-checkpoint v2.safetensors --archs v2
//
// Running the same command again continues: finished cells are reused,
// an interrupted run is resumed from its checkpoint.
// Exit status: 0 when the report was written, 128 + the signal after SIGINT /
// SIGTERM (the running cell saved its checkpoint), 1 for a failure, 2 for
// bad options.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <type_traits>

#include "study/study.h"
#include "train/stop_signal.h"

namespace {

template <class T>
std::string joined(const std::vector<T>& v) {
    std::string out;
    for (const T& s : v) {
        if (!out.empty()) out += ",";
        if constexpr (std::is_same_v<T, std::string>)
            out += s;
        else
            out += std::to_string(s);
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace hfq;
    watch_stop_signals();  // before any thread starts (train/stop_signal.h says why)
    study::StudyOptions o;
    TrainConfig& t = o.train;
    CLI::App app{
        "qat_study: compares hardware-friendly weight quantizers as the paper does. From one float model per "
        "architecture (trained first unless --float-checkpoint gives it), runs quantization-aware training "
        "with each method (and optionally each fix alone) at each bit width and scale granularity, over several "
        "seeds, then writes OUT/report.md (means over the seeds, paired differences with 95 % intervals, the "
        "findings) and PNG figures. Run it again to continue: finished cells are not run again.",
        "qat_study"};
    app.get_formatter()->column_width(36);

    const std::string grid = "Grid";
    app.add_option("--out", o.out, "Report folder (the runs go in its float-<arch>/ and cells/)")
        ->capture_default_str()
        ->group(grid);
    app.add_option("--archs", o.archs, "Architectures, comma-separated: v1, v2")
        ->delimiter(',')
        ->default_str(joined(o.archs))
        ->group(grid);
    app.add_option("--methods", o.methods, "Methods, comma-separated: " + joined(study::grid_methods()))
        ->delimiter(',')
        ->default_str(joined(o.methods))
        ->group(grid);
    app.add_option(
           "--fixes", o.fixes,
           "Fix variants of each method, comma-separated: default (the method as specified), none (every "
           "fix off), or one fix alone: outlier-mask, second-moments (msqe-po2, learnable-po2-msqe-round), "
           "line-search, stable-exponent (msqe-po2); or all (msqe-po2 with every fix on: its defaults plus the stable "
           "exponent); a fix that does not apply to a method makes no cell")
        ->delimiter(',')
        ->default_str(joined(o.fixes))
        ->group(grid);
    app.add_option("--float-checkpoint", o.float_checkpoints,
                   "Start from this float model (repeatable, one per architecture; its metadata says which); "
                   "architectures without one are trained with the float options below")
        ->group(grid);
    app.add_option("--bits", o.bits, "Weight bit widths, comma-separated (first convolution and classifier: 8)")
        ->delimiter(',')
        ->default_str(joined(o.bits))
        ->group(grid);
    app.add_option("--granularity", o.granularities,
                   "Scales, comma-separated: tensor (one per tensor), channel (one per output channel)")
        ->delimiter(',')
        ->default_str(joined(o.granularities))
        ->group(grid);
    app.add_option("--bn-stats", o.bn_stats,
                   "Batch statistics of the folded layers, comma-separated: float-conv, quantized-conv, "
                   "quantized-conv-freeze (quantized-conv, batch norm frozen at half of QAT); the first at every "
                   "bit width, the others at --bn-stats-bits")
        ->delimiter(',')
        ->default_str(joined(o.bn_stats))
        ->group(grid);
    app.add_option("--bn-stats-bits", o.bn_stats_bits, "Bit widths that also run the --bn-stats modes after the first")
        ->delimiter(',')
        ->default_str(joined(o.bn_stats_bits))
        ->group(grid);
    app.add_option("--v2-bits", o.v2_bits,
                   "MobileNetV2 runs only those of --bits also in this list (its cells take 6x V1's time: the "
                   "default study cuts V2 to 4 bits per tensor with float-conv statistics)")
        ->delimiter(',')
        ->default_str(joined(o.v2_bits))
        ->group(grid);
    app.add_option("--v2-granularity", o.v2_granularities, "MobileNetV2 runs only those of --granularity also here")
        ->delimiter(',')
        ->default_str(joined(o.v2_granularities))
        ->group(grid);
    app.add_option("--v2-bn-stats", o.v2_bn_stats, "MobileNetV2 runs only those of --bn-stats also here")
        ->delimiter(',')
        ->default_str(joined(o.v2_bn_stats))
        ->group(grid);
    app.add_option("--seeds", o.seeds,
                   "QAT seeds per cell (data order, augmentation): the report gives mean, standard deviation and "
                   "paired differences with 95 % intervals")
        ->capture_default_str()
        ->group(grid);
    app.add_flag("--float-seeds", o.float_seeds,
                 "Train a float model per seed too (else every seed starts from one float model per architecture)")
        ->group(grid);
    app.add_option("--stable-start", o.stable_start,
                   "stable-exponent fix: start averaging the exponent at this "
                   "fraction of the QAT steps")
        ->capture_default_str()
        ->group(grid);
    app.add_option("--stable-switch", o.stable_switch,
                   "stable-exponent fix: switch to the averaged exponent at this "
                   "fraction")
        ->capture_default_str()
        ->group(grid);

    const std::string data = "Data and model";
    app.add_option("--data", t.data,
                   "Dataset folder: Fashion-MNIST's IDX files, or ImageNet "
                   "(DIR/train/<class>/*.JPEG, DIR/val)")
        ->capture_default_str()
        ->group(data);
    app.add_option("--input-size", t.input_size,
                   "Input images are SIZE x SIZE; 0: 32 for Fashion-MNIST, 224 for "
                   "ImageNet")
        ->capture_default_str()
        ->group(data);
    app.add_option("--train-limit", t.train_limit, "Train on this many samples, evenly spaced (0: all)")
        ->capture_default_str()
        ->group(data);
    app.add_option("--test-limit", t.test_limit, "Evaluate on this many samples, evenly spaced (0: all)")
        ->capture_default_str()
        ->group(data);
    app.add_option("--max-bad-fraction", t.max_bad_fraction,
                   "Unreadable images (corrupt or truncated files) "
                   "allowed, as a fraction of the training or test set; more stop the run")
        ->capture_default_str()
        ->group(data);
    app.add_option("--width", t.width, "Width multiplier of the float models trained here")
        ->capture_default_str()
        ->group(data);

    const std::string schedule = "Training (one schedule for every run)";
    app.add_option("--epochs", t.epochs, "Epochs of float training (architectures without --float-checkpoint)")
        ->capture_default_str()
        ->group(schedule);
    app.add_option("--lr", t.lr, "Peak learning rate of float training (SGD)")->capture_default_str()->group(schedule);
    app.add_option("--warmup-epochs", t.warmup_epochs, "Linear warm-up of float training, in epochs")
        ->capture_default_str()
        ->group(schedule);
    app.add_option("--qat-epochs", t.qat_epochs, "Epochs of quantization-aware training per cell")
        ->capture_default_str()
        ->group(schedule);
    app.add_option("--qat-train-limit", o.qat_train_limit,
                   "Each cell's QAT epoch trains on this many samples, "
                   "evenly spaced (0: all)")
        ->capture_default_str()
        ->group(schedule);
    app.add_option("--qat-lr", t.qat_lr, "Peak learning rate of QAT (SGD)")->capture_default_str()->group(schedule);
    app.add_option("--quantizer-lr", t.quantizer_lr, "Learning rate of learnable scales (Adam)")
        ->capture_default_str()
        ->group(schedule);
    app.add_option("--schedule", t.schedule, "Learning-rate schedule: cosine, step or constant")
        ->capture_default_str()
        ->group(schedule);
    app.add_option("--batch-size", t.batch_size, "Training batch size")->capture_default_str()->group(schedule);
    app.add_option("--seed", t.seed, "First random seed (float models: initialisation; cells: data order, augmentation)")
        ->capture_default_str()
        ->group(schedule);

    const std::string report = "Report and run";
    app.add_option("--late-fraction", o.late_fraction,
                   "Late exponent flips: those in this last fraction of the QAT "
                   "steps")
        ->capture_default_str()
        ->group(report);
    app.add_option("--plot-layers", o.plot_layers, "Layers per method in the exponent figure (those that flip most)")
        ->capture_default_str()
        ->group(report);
    app.add_option("--histogram-layer", o.histogram_layer,
                   "Depthwise layer of the histogram figure (default: the "
                   "one with the largest max|w| / std(w) in the float model)")
        ->group(report);
    app.add_option("--threads", t.threads, "Compute threads")->capture_default_str()->group(report);
    app.add_option("--loader-threads", t.loader_threads, "Data-loading threads")->capture_default_str()->group(report);

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);  // prints the help, or the error
        return code == 0 ? 0 : 2;
    }
    try {
        o.validate();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 2;
    }
    try {
        const study::StudyOutcome r = study::run_study(o, [](const std::string& line) {
            std::printf("%s\n", line.c_str());
            std::fflush(stdout);
        });
        return r.interrupted ? 128 + r.signal : 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "\nqat_study: %s\n", e.what());
        return 1;
    }
}
