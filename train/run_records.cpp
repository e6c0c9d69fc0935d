#include "train/run_records.h"

#include <algorithm>
#include <cstdio>

#include "engine/check.h"
#include "layers/summary.h"

namespace hfq {
namespace {

std::string fixed(double v, int digits) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return buf;
}

// For the epoch line: "" when none, else e.g. ", 1 unreadable training image skipped".
std::string skipped_note(int64_t count, const char* set) {
    if (count == 0) return "";
    return cat(", ", count, " unreadable ", set, count == 1 ? " image" : " images", " skipped");
}

}  // namespace

void Tally::add(const StepStats& s, int64_t n) {
    loss += double(s.loss) * n;
    correct += s.correct;
    samples += n;
    ++steps;
}

double Tally::busy() const { return std::max(1e-9, std::chrono::duration<double>(Clock::now() - t0).count() - paused); }

Json eval_json(const EvalResult& r) {
    return {{"loss", r.loss},
            {"top1", r.top1},
            {"top5", r.top5},
            {"samples", r.samples},
            {"skipped_unreadable", r.skipped},
            {"seconds", r.seconds}};
}

std::string percent(const Json& r, const char* key) {
    if (!r.is_object() || !r.contains(key)) return "-";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f %%", 100 * r[key].get<double>());
    return buf;
}

Report start_report(const TrainConfig& c, const TrainData& data, Model& model, bool resuming, int64_t global_step,
                    const std::string& out) {
    const ModelSummary summary = summarize(model, {1, data.input_size, data.input_size, data.channels});
    Report r;
    r.record = {{"type", resuming ? "resume" : "start"},
                {"step", global_step},
                {"model", Json::parse(model.config().to_json())},
                {"parameters", summary.total_params},
                {"macs_per_image", summary.total_macs},
                {"data", data.kind},
                {"train_samples", data.train->size()},
                {"test_samples", data.test->size()},
                {"threads", c.threads},
                {"loader_threads", c.loader_threads}};
    if (!resuming) r.record["config"] = Json::parse(c.to_json());
    r.line = cat(resuming ? "Resuming " : "Training ", model.type_name(), " (width ", c.width, ", ", data.input_size,
                 "x", data.input_size, "x", data.channels, ", ", model.config().classes, " classes; ",
                 summary.total_params, " parameters, ", summary.total_macs / 1e6, " M MACs per image) on ", data.kind,
                 " (", data.train->size(), " training, ", data.test->size(), " test images) in ", out,
                 resuming ? cat(" from step ", global_step) : std::string());
    return r;
}

Json step_record(const StagePlan& stage, const TrainState& state, const TrainStep& step, const StepStats& s,
                 const Tally& window, int64_t epoch, Model& model) {
    Json j = {{"type", "step"},
              {"stage", stage_name(stage.stage)},
              {"epoch", epoch},
              {"step", state.global_step},
              {"stage_step", state.stage_step},
              {"loss", window.mean_loss()},
              {"train_top1", window.accuracy()},
              {"lr", step.lr()}};
    if (step.has_quantizer_optimizer()) j["quantizer_lr"] = step.quantizer_lr();
    j["grad_norm"] = s.grad_norm;
    j["images_per_second"] = window.images_per_second();
    j["data_wait_fraction"] = window.wait / window.busy();
    if (stage.stage == Stage::qat) j["quantizers"] = quantizer_diagnostics(model);
    return j;
}

Report epoch_report(const StagePlan& stage, int64_t epoch, int64_t global_step, const Tally& tally, const Json& test,
                    const Json& test_integer, Model& model) {
    const char* name = stage_name(stage.stage);
    Report r;
    r.record = {{"type", "epoch"},
                {"stage", name},
                {"epoch", epoch},
                {"step", global_step},
                {"train_loss", tally.mean_loss()},
                {"train_top1", tally.accuracy()},
                {"images_per_second", tally.images_per_second()},
                {"data_wait_fraction", tally.wait / tally.busy()},
                {"skipped_unreadable", tally.skipped}};
    r.line = cat(name, " epoch ", epoch, "/", stage.epochs, ": train loss ", fixed(tally.mean_loss(), 4), ", top-1 ",
                 fixed(100 * tally.accuracy(), 2), " %");
    int64_t test_skipped = 0;
    if (!test.is_null()) {
        r.record["test"] = test;
        r.line += cat(" | test loss ", fixed(test["loss"].get<double>(), 4), ", top-1 ", percent(test, "top1"),
                      ", top-5 ", percent(test, "top5"));
        test_skipped = test["skipped_unreadable"].get<int64_t>();
    }
    if (!test_integer.is_null()) {
        r.record["test_integer"] = test_integer;
        r.line += cat(" | integer top-1 ", percent(test_integer, "top1"));
    }
    if (stage.stage == Stage::qat) r.record["quantizers"] = quantizer_diagnostics(model);
    r.line += cat(" (", static_cast<int64_t>(tally.images_per_second()), " img/s",
                  skipped_note(tally.skipped, "training"), skipped_note(test_skipped, "test"), ")");
    return r;
}

}  // namespace hfq
