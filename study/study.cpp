#include "study/study.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "engine/memory_pool.h"
#include "layers/checkpoint.h"
#include "study/depthwise.h"
#include "train/datasets.h"
#include "train/trainer.h"

namespace hfq::study {
namespace fs = std::filesystem;
namespace {

// A training run the study owns lives in a job folder: run/ is the trainer's
// output folder, result.json is written (atomically) once the run finished
// and holds the configuration it was made with. A job with a result.json is
// done; one without is run, or resumed from its checkpoint.
std::string run_folder(const fs::path& job) { return (job / "run").string(); }
std::string result_file(const fs::path& job) { return (job / "result.json").string(); }

// The job's stored result, if it finished; an error if it was made with
// other settings (its results would not belong to this study).
std::optional<Json> finished_result(const fs::path& job, const TrainConfig& config) {
    const std::string path = result_file(job);
    if (!fs::exists(path)) return std::nullopt;
    std::ifstream in(path);
    Json j = Json::parse(in, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(j.is_object() && j.contains("config"), path, ": not a study result (delete the folder ", job.string(),
              " to run it again)");
    TrainConfig stored;
    stored.apply_json(j.at("config").dump(), path);
    const std::vector<std::string> changed = TrainConfig::training_differences(config, stored);
    HFQ_CHECK(changed.empty(), "qat_study: ", path, " was made with other settings (--",
              changed.empty() ? "" : changed[0],
              " differs: ", changed.empty() ? "" : Json::parse(stored.to_json()).at(changed[0]).dump(), " there, ",
              changed.empty() ? "" : Json::parse(config.to_json()).at(changed[0]).dump(),
              " now); use another --out, or delete ", job.string(), " to run it again");
    return j;
}

// Runs the job's training, continuing from its checkpoint if an earlier
// invocation stopped inside it.
RunResult run_or_resume(TrainConfig config, const fs::path& job) {
    const std::string run = run_folder(job);
    if (fs::exists(fs::path(run) / "checkpoint.safetensors"))
        config.resume = run;
    else
        fs::remove_all(run);  // stopped before its first checkpoint: nothing to keep
    config.out = run;
    const RunResult r = run_training(config);
    // The pool keeps freed blocks for the next step of the same shapes; the
    // next run trains another model: give them back.
    pool_release_cached();
    return r;
}

std::string model_name(const std::string& checkpoint) {
    const std::optional<ModelConfig> m = checkpoint_model_config(read_safetensors(checkpoint));
    HFQ_CHECK(m.has_value(), "qat_study: ", checkpoint, ": no model configuration (metadata '", kModelConfigKey,
              "'): not an hfq checkpoint?");
    char width[32];
    std::snprintf(width, sizeof width, "%g", m->width);
    return cat(m->arch == Arch::mobilenet_v1 ? "MobileNetV1" : "MobileNetV2", " x", width);
}

std::string percent(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f %%", 100 * v);
    return buf;
}

// The given float checkpoints, by architecture ("v1", "v2").
std::map<std::string, std::string> given_checkpoints(const StudyOptions& o) {
    std::map<std::string, std::string> out;
    for (const std::string& path : o.float_checkpoints) {
        const std::optional<ModelConfig> m = checkpoint_model_config(read_safetensors(path));
        HFQ_CHECK(m.has_value(), "qat_study: --float-checkpoint ", path, ": no model configuration (metadata '",
                  kModelConfigKey, "')");
        const std::string arch = m->arch == Arch::mobilenet_v1 ? "v1" : "v2";
        HFQ_CHECK(std::find(o.archs.begin(), o.archs.end(), arch) != o.archs.end(), "qat_study: --float-checkpoint ",
                  path, " holds a ", arch_name(m->arch), ", which is not in --archs");
        HFQ_CHECK(!out.count(arch), "qat_study: two --float-checkpoint files hold a ", arch_name(m->arch), " (",
                  out[arch], ", ", path, ")");
        out[arch] = fs::absolute(path).lexically_normal().string();
    }
    return out;
}

}  // namespace

StudyOutcome run_study(const StudyOptions& options_in, const std::function<void(const std::string&)>& say_fn) {
    auto say = [&](const std::string& s) {
        if (say_fn) say_fn(s);
    };
    StudyOptions o = options_in;
    o.validate();
    // Absolute paths: the cells record the float checkpoint's path, and a
    // later invocation from another folder must find the same settings.
    const fs::path out = fs::absolute(o.out).lexically_normal();
    o.out = out.string();
    const std::map<std::string, std::string> given = given_checkpoints(o);
    fs::create_directories(out / "cells");

    StudyData data;
    {
        TrainConfig qat = o.train;  // the data a cell trains on
        if (o.qat_train_limit > 0) qat.train_limit = o.qat_train_limit;
        const TrainData d = open_datasets(qat);
        data.kind = d.kind;
        data.train_samples = d.train->size();
        data.test_samples = d.test->size();
        data.input_size = d.input_size;
        data.qat_steps = int64_t(o.train.qat_epochs) * (d.train->size() / o.train.batch_size);
        HFQ_CHECK(data.qat_steps >= 1, "qat_study: --batch-size ", o.train.batch_size, " is larger than the ",
                  d.train->size(), " training samples");
    }

    StudyOutcome outcome;
    auto interrupted = [&](const RunResult& r) {
        outcome.interrupted = true;
        outcome.signal = r.signal;
        say(cat("Stopped in ", r.out_dir, " at step ", r.global_step, "; run the same command again to continue."));
        return outcome;
    };

    // 1. The float models: one per architecture, or one per architecture and seed.
    std::vector<FloatModel> floats;
    for (const std::string& arch : o.archs)
        for (int seed = 0; seed < (o.float_seeds ? o.seeds : 1); ++seed) {
            FloatModel f;
            f.arch = arch;
            f.seed = seed;
            if (given.count(arch)) {
                f.checkpoint = given.at(arch);
            } else {
                const fs::path job = out / (seed == 0 ? "float-" + arch : cat("float-", arch, "-seed", seed));
                TrainConfig c = o.train;
                c.arch = arch;
                c.quantizer = "none";
                c.seed = o.train.seed + uint64_t(seed);
                if (!finished_result(job, c)) {
                    say(cat("Float model ", arch, o.float_seeds ? cat(" seed ", seed) : std::string(), ": training ",
                            c.epochs, " epochs in ", run_folder(job)));
                    const RunResult r = run_or_resume(c, job);
                    if (r.status != RunStatus::finished) return interrupted(r);
                    write_file_atomically(result_file(job),
                                          Json{{"config", Json::parse(c.to_json())}}.dump(2) + "\n");
                    outcome.floats_trained = true;
                }
                f.checkpoint = run_folder(job) + "/final.safetensors";
                f.epoch_top1 = epoch_test_top1(run_folder(job), "float");
            }
            f.model_name = model_name(f.checkpoint);
            TrainConfig policy_config = o.train;
            policy_config.quantizer = "msqe-po2";
            const std::vector<DepthwiseLayer> dw = depthwise_layers(f.checkpoint, policy_config.quant_policy(/*qat_steps=*/0));
            f.histogram_layer = o.histogram_layer.empty() ? most_outlier_heavy(dw).name : o.histogram_layer;
            HFQ_CHECK(std::any_of(dw.begin(), dw.end(),
                                  [&](const DepthwiseLayer& d) { return d.name == f.histogram_layer; }),
                      "qat_study: --histogram-layer ", f.histogram_layer, " is not a depthwise convolution of ",
                      f.model_name, " (e.g. ", dw.empty() ? std::string("none") : dw.front().name, ")");
            floats.push_back(f);
        }

    // 2. The cells.
    const std::vector<CellSpec> grid = make_grid(o);
    std::vector<CellResult> results;
    for (size_t i = 0; i < grid.size(); ++i) {
        const CellSpec& cell = grid[i];
        const int float_seed = o.float_seeds ? cell.seed : 0;
        const FloatModel& f = *std::find_if(floats.begin(), floats.end(), [&](const FloatModel& m) {
            return m.arch == cell.arch && m.seed == float_seed;
        });
        const fs::path job = out / "cells" / cell.id();
        const TrainConfig config = cell_train_config(o, cell, f.checkpoint, run_folder(job), data.qat_steps);
        if (const std::optional<Json> stored = finished_result(job, config)) {
            results.push_back(cell_result_from_json(*stored, result_file(job)));
            ++outcome.cells_reused;
            continue;
        }
        say(cat("Cell ", i + 1, "/", grid.size(), ": ", f.model_name, ", ", cell.setting(), ", ", cell.label(),
                ", seed ", cell.seed, " (", data.qat_steps, " QAT steps) in ", job.string()));
        const RunResult r = run_or_resume(config, job);
        if (r.status != RunStatus::finished) return interrupted(r);
        CellResult result = summarize_run(cell, run_folder(job), f.histogram_layer, o.plot_layers, o.late_fraction);
        result.config = Json::parse(config.to_json());
        write_file_atomically(result_file(job), to_json(result).dump() + "\n");
        ++outcome.cells_run;
        say(cat("  fake-quant top-1 ", percent(result.fake_quant_top1), ", integer ", percent(result.integer_top1),
                result.has_exponents ? cat(", ", result.flips.total, " exponent flips (", result.flips.late, " late)")
                                     : std::string(),
                ", ", std::lround(result.images_per_second), " img/s, ", format_duration(result.seconds)));
        results.push_back(std::move(result));
    }

    // 3. The report.
    outcome.figures = write_report(o, data, floats, results);
    outcome.report = (out / "report.md").string();
    say(cat("Report: ", outcome.report, " (", results.size(), " cells: ", outcome.cells_run, " run now, ",
            outcome.cells_reused, " from earlier)"));
    return outcome;
}

}  // namespace hfq::study
