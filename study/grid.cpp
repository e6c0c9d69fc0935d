#include "study/grid.h"

#include <algorithm>
#include <cmath>
#include <set>

#include <unistd.h>

#include "engine/check.h"
#include "layers/checkpoint.h"

namespace hfq::study {
namespace {

template <class T>
bool contains(const std::vector<T>& v, const T& x) {
    return std::find(v.begin(), v.end(), x) != v.end();
}

std::string joined(const std::vector<std::string>& v) {
    std::string out;
    for (const std::string& s : v) out += (out.empty() ? "" : ", ") + s;
    return out;
}

void check_bits(const std::vector<int>& given, const char* option) {
    HFQ_CHECK(!given.empty(), "qat_study: --", option, " needs at least one bit width");
    std::set<int> seen;
    for (int b : given) {
        HFQ_CHECK(b >= 2 && b <= 8, "qat_study: --", option, ": bit widths are 2..8, got ", b);
        HFQ_CHECK(seen.insert(b).second, "qat_study: --", option, ": ", b, " is given twice");
    }
}

// What of a grid dimension an architecture runs: everything, or for
// MobileNetV2 the part also in its --v2-* list.
template <class T>
std::vector<T> for_arch(const std::string& arch, const std::vector<T>& all, const std::vector<T>& v2_only) {
    if (arch != "v2") return all;
    std::vector<T> out;
    for (const T& x : all)
        if (contains(v2_only, x)) out.push_back(x);
    return out;
}

void check_list(const std::vector<std::string>& given, const std::vector<std::string>& known, const char* option) {
    HFQ_CHECK(!given.empty(), "qat_study: --", option, " needs at least one value (valid: ", joined(known), ")");
    std::set<std::string> seen;
    for (const std::string& s : given) {
        HFQ_CHECK(contains(known, s), "qat_study: --", option, ": unknown value '", s, "' (valid: ", joined(known),
                  ")");
        HFQ_CHECK(seen.insert(s).second, "qat_study: --", option, ": '", s, "' is given twice");
    }
}

}  // namespace

TrainConfig StudyOptions::default_train_config() {
    TrainConfig c;
    c.epochs = 5;
    c.qat_epochs = 1;
    return c;
}

void StudyOptions::validate() const {
    HFQ_CHECK(!out.empty(), "qat_study: --out: a report folder is needed");
    check_list(archs, {"v1", "v2"}, "archs");
    check_list(methods, grid_methods(), "methods");
    check_list(fixes, grid_fixes(), "fixes");
    check_bits(bits, "bits");
    check_bits(v2_bits, "v2-bits");
    check_list(granularities, {"tensor", "channel"}, "granularity");
    check_list(bn_stats, grid_bn_stats(), "bn-stats");
    check_bits(bn_stats_bits, "bn-stats-bits");
    for (int b : bn_stats_bits)
        HFQ_CHECK(contains(bits, b), "qat_study: --bn-stats-bits: ", b, " is not one of --bits");
    check_list(v2_granularities, {"tensor", "channel"}, "v2-granularity");
    check_list(v2_bn_stats, grid_bn_stats(), "v2-bn-stats");
    HFQ_CHECK(!contains(archs, std::string("v2")) || (!for_arch("v2", bits, v2_bits).empty() &&
                                                     !for_arch("v2", granularities, v2_granularities).empty() &&
                                                     !for_arch("v2", bn_stats, v2_bn_stats).empty()),
              "qat_study: no MobileNetV2 cell: none of --bits is in --v2-bits, or none of --granularity in "
              "--v2-granularity, or none of --bn-stats in --v2-bn-stats");
    HFQ_CHECK(seeds >= 1 && seeds <= 100, "qat_study: --seeds must be in 1..100, got ", seeds);
    HFQ_CHECK(!float_seeds || float_checkpoints.empty(),
              "qat_study: --float-seeds trains a float model per seed: it cannot be combined with --float-checkpoint");
    HFQ_CHECK(qat_train_limit >= 0, "qat_study: --qat-train-limit must be >= 0 (0: all), got ", qat_train_limit);
    HFQ_CHECK(train.qat_epochs >= 1, "qat_study: --qat-epochs must be >= 1, got ", train.qat_epochs);
    HFQ_CHECK(stable_start >= 0 && stable_start <= stable_switch && stable_switch < 1,
              "qat_study: --stable-start and --stable-switch must satisfy 0 <= start <= switch < 1, got ", stable_start,
              " and ", stable_switch);
    HFQ_CHECK(late_fraction > 0 && late_fraction <= 1, "qat_study: --late-fraction must be in (0, 1], got ",
              late_fraction);
    HFQ_CHECK(plot_layers >= 1 && plot_layers <= 10, "qat_study: --plot-layers must be in 1..10, got ", plot_layers);
    HFQ_CHECK(!make_grid(*this).empty(), "qat_study: no cell to run: none of the --fixes (", joined(fixes),
              ") applies to any of the --methods (", joined(methods), ")");
    // The trainer's own checks, on a configuration like a cell's.
    TrainConfig c = train;
    c.quantizer = "msqe-po2";
    try {
        c.validate();
    } catch (const Error& e) {
        throw Error(cat("qat_study: ", e.what()));
    }
}

std::string CellSpec::group() const {
    const std::string bn = bn_stats == "float-conv"       ? ""
                           : bn_stats == "quantized-conv" ? "-qconv"
                                                          : "-qconv-freeze";
    return cat(arch, "-", bits, "bit-", per_channel ? "channel" : "tensor", bn, "-", method,
               fix == "default" ? "" : "." + fix);
}

std::string CellSpec::id() const { return cat(group(), "/seed", seed); }

std::string CellSpec::setting() const {
    const std::string bn = bn_stats == "float-conv"       ? ""
                           : bn_stats == "quantized-conv" ? ", quantized-conv"
                                                          : ", quantized-conv + freeze";
    return cat(bits, " bits per ", per_channel ? "channel" : "tensor", bn);
}

std::string CellSpec::label() const {
    if (fix == "default") return method;
    if (fix == "none") return method + ", no fixes";
    if (fix == "all") return method + ", all fixes";
    return method + " + " + fix;
}

const std::vector<std::string>& grid_methods() {
    static const std::vector<std::string> m{"msqe-baseline", "msqe-po2", "learnable-po2-ceil",
                                            "learnable-po2-msqe-round", "lsq"};
    return m;
}

const std::vector<std::string>& grid_fixes() {
    static const std::vector<std::string> f{"default",         "none", "outlier-mask", "second-moments", "line-search",
                                            "stable-exponent", "all"};
    return f;
}

const std::vector<std::string>& grid_bn_stats() {
    static const std::vector<std::string> b{"float-conv", "quantized-conv", "quantized-conv-freeze"};
    return b;
}

bool fix_applies(const std::string& fix, const std::string& method) {
    if (fix == "default") return true;
    if (method == "msqe-po2") return true;
    // learnable-po2-msqe-round's "all" would be its default: no cell.
    // Round-to-Lower-MSQE weighs its error by the mask and the second moments;
    // ceil rounding, the baseline and lsq have nothing a fix could change.
    if (method == "learnable-po2-msqe-round") return fix == "none" || fix == "outlier-mask" || fix == "second-moments";
    return false;
}

std::vector<CellSpec> make_grid(const StudyOptions& options) {
    std::vector<CellSpec> cells;
    for (const std::string& arch : options.archs)
        for (int bits : for_arch(arch, options.bits, options.v2_bits))
            for (const std::string& granularity : for_arch(arch, options.granularities, options.v2_granularities))
                for (const std::string& bn : for_arch(arch, options.bn_stats, options.v2_bn_stats)) {
                    if (bn != options.bn_stats.front() && !contains(options.bn_stats_bits, bits)) continue;
                    for (const std::string& method : options.methods)
                        for (const std::string& fix : options.fixes)
                            if (fix_applies(fix, method))
                                for (int seed = 0; seed < options.seeds; ++seed)
                                    cells.push_back({arch, bits, granularity == "channel", bn, method, fix, seed});
                }
    return cells;
}

TrainConfig cell_train_config(const StudyOptions& options, const CellSpec& cell, const std::string& float_checkpoint,
                              const std::string& run_dir, int64_t qat_steps) {
    TrainConfig c = options.train;
    const SafetensorsFile file = read_safetensors(float_checkpoint);
    const std::optional<ModelConfig> model = checkpoint_model_config(file);
    HFQ_CHECK(model.has_value(), "qat_study: ", float_checkpoint, " has no model configuration (metadata '",
              kModelConfigKey, "'): not an hfq checkpoint?");
    c.arch = cell.arch;
    HFQ_CHECK(model->arch == parse_arch(cell.arch), "qat_study: ", float_checkpoint, " holds a ",
              arch_name(model->arch), ", not the cell's ", cell.arch);
    c.width = model->width;
    c.small_input = model->small_input ? "true" : "false";
    c.activation = activation_name(model->activation);
    c.dropout = model->effective_dropout();
    c.input_channels = model->input_channels;

    c.epochs = 0;
    c.init_from = float_checkpoint;
    if (options.qat_train_limit > 0) c.train_limit = options.qat_train_limit;
    c.out = run_dir;
    c.resume.clear();
    c.log_every = 1;  // every step's exponents: flips are counted from them
    c.eval_every = 1;
    // With a line every step, the trainer's "lines" progress would print one
    // per step: a bar on a terminal, else the study's own lines only.
    if (c.progress != "none") c.progress = isatty(STDOUT_FILENO) ? "bar" : "none";

    const bool learnable = cell.method.rfind("learnable-po2", 0) == 0;
    c.bits = cell.bits;
    c.per_channel = cell.per_channel;
    c.bn_stats = cell.bn_stats == "float-conv" ? "float-conv" : "quantized-conv";
    c.freeze_bn_at = cell.bn_stats == "quantized-conv-freeze" ? 0.5 : 1;
    c.seed = options.train.seed + uint64_t(cell.seed);
    c.quantizer = learnable ? "learnable-po2" : cell.method;
    if (learnable) c.rounding = cell.method == "learnable-po2-ceil" ? "ceil" : "msqe-round";
    c.stable_start_step = c.stable_switch_step = -1;
    if (cell.fix != "default" && cell.fix != "all") {
        c.outlier_mask = cell.fix == "outlier-mask";
        c.second_moments = cell.fix == "second-moments";
        c.line_search = cell.fix == "line-search";
    }
    if (cell.fix == "stable-exponent" || cell.fix == "all") {
        c.stable_start_step = std::llround(options.stable_start * double(qat_steps));
        c.stable_switch_step = std::llround(options.stable_switch * double(qat_steps));
    }
    return c;
}

}  // namespace hfq::study
