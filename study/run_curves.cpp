#include "study/run_curves.h"

#include <cmath>
#include <filesystem>

#include "engine/check.h"
#include "study/panels.h"

namespace hfq::study {
namespace {

constexpr int kTrainColour = 0, kTestColour = 1, kIntegerColour = 2;

// A value of the "start" line, or of the configuration it carries;
// `fallback` when the file has no start line or the key is missing.
template <typename T>
T value_in(const Json& j, const char* key, T fallback) {
    return j.is_object() && j.contains(key) && !j.at(key).is_null() ? j.at(key).get<T>() : fallback;
}
template <typename T>
T start_value(const RunRecord& run, const char* key, T fallback) {
    return value_in(run.start, key, fallback);
}
template <typename T>
T config_value(const RunRecord& run, const char* key, T fallback) {
    return value_in(value_in(run.start, "config", Json()), key, fallback);
}

double number_or_nan(const Json& j, const char* key) {
    return j.is_object() && j.contains(key) && j.at(key).is_number() ? j.at(key).get<double>() : std::nan("");
}

int last_epoch(const StageRecord& s) { return s.epochs.empty() ? 0 : s.epochs.back().at("epoch").get<int>(); }

// One quantity of the epoch lines against the common epoch axis: float
// epoch e at x = e, QAT epoch e at x = F + e (F float epochs). `value` reads
// it from an epoch line (NaN: this epoch has none, e.g. not evaluated).
template <typename Value>
Line epoch_line(const std::string& label, const RunRecord& run, int colour, Value value, bool qat_only = false) {
    Line l{label, {}, {}, colour, /*steps=*/false, /*markers=*/true};
    const int float_epochs = last_epoch(run.float_stage);
    auto add = [&](const StageRecord& s, int offset) {
        for (const Json& e : s.epochs) {
            const double v = value(e);
            // Skipped rather than a gap: with --eval-every 2 the test points still join up.
            if (!std::isfinite(v)) continue;
            l.x.push_back(offset + e.at("epoch").get<double>());
            l.y.push_back(v);
        }
    };
    if (!qat_only) add(run.float_stage, 0);
    add(run.qat, float_epochs);
    return l;
}

std::string epoch_axis(const RunRecord& run) {
    const int f = last_epoch(run.float_stage), q = last_epoch(run.qat);
    if (q == 0) return "float epoch";
    if (f == 0) return "QAT epoch";
    return cat("epoch (float 1-", f, ", then QAT ", f + 1, "-", f + q, ")");
}

// Both stages on one epoch axis, the boundary half-way between them.
Panel epoch_panel(const RunRecord& run, const std::string& title, const std::string& y_label) {
    Panel p;
    p.title = run.float_stage.epochs.empty() && run.qat.epochs.empty() ? title + ": no epoch finished yet" : title;
    p.x_label = epoch_axis(run);
    p.y_label = y_label;
    p.integer_x = true;
    if (last_epoch(run.float_stage) > 0 && !run.qat.epochs.empty())
        p.vlines.push_back(qat_start_line(last_epoch(run.float_stage) + 0.5));
    return p;
}

Panel loss_panel(const RunRecord& run) {
    Panel p = epoch_panel(run, "Loss per epoch", "loss");
    p.log_y = true;  // the first epochs' test loss can be many times the later ones (batch-norm statistics)
    const double smoothing = config_value(run, "label-smoothing", 0.0);
    const std::string train = smoothing > 0 ? cat("train (label smoothing ", smoothing, ")") : std::string("train");
    p.lines.push_back(
        epoch_line(train, run, kTrainColour, [](const Json& e) { return number_or_nan(e, "train_loss"); }));
    p.lines.push_back(epoch_line("test", run, kTestColour,
                                 [](const Json& e) { return number_or_nan(e.value("test", Json()), "loss"); }));
    return p;
}

Panel top1_panel(const RunRecord& run) {
    Panel p = epoch_panel(run, "Top-1 per epoch", "top-1 (%)");
    p.lines.push_back(
        epoch_line("train", run, kTrainColour, [](const Json& e) { return 100 * number_or_nan(e, "train_top1"); }));
    p.lines.push_back(epoch_line("test", run, kTestColour,
                                 [](const Json& e) { return 100 * number_or_nan(e.value("test", Json()), "top1"); }));
    if (!run.qat.epochs.empty()) {
        p.lines.push_back(epoch_line(
            "test, integer export", run, kIntegerColour,
            [](const Json& e) { return 100 * number_or_nan(e.value("test_integer", Json()), "top1"); },
            /*qat_only=*/true));
        p.lines.back().dashed = true;  // it often equals the fake-quant test top-1: let that line show through
    }
    return p;
}

// The flips of the logged QAT exponents. No late window (a fraction of 0):
// train_mobilenet has no such setting.
FlipSummary qat_flips(const RunRecord& run, int layers) {
    const StageRecord& q = run.qat;
    return summarize_flips(q, layers, q.steps.empty() ? 0 : q.steps.back(), 0.0);
}

Panel exponents_panel(const RunRecord& run, const FlipSummary& flips) {
    const StageRecord& q = run.qat;
    Panel p = exponent_panel(cat("QAT exponents of the ", flips.traces.size(), " layers that flip most (",
                                 flips.total.total, " flips in all layers, at ", q.steps.size(), " logged steps)"),
                             "QAT step", q.steps, flips.traces);
    // Epoch ends, in QAT steps: an epoch line has the run's step, a step line both.
    const int64_t float_steps = q.global_steps.front() - q.steps.front();
    VLines ends{"QAT epoch ends", {}, kGrey};
    for (const Json& e : q.epochs) ends.x.push_back(double(e.at("step").get<int64_t>() - float_steps));
    if (!ends.x.empty()) p.vlines.push_back(ends);
    return p;
}

std::string model_name(const RunRecord& run) {
    const Json model = start_value(run, "model", Json());
    if (!model.is_object()) return "MobileNet";
    const std::string arch = model.value("arch", std::string());
    return cat(arch == "mobilenet_v1"   ? "MobileNetV1"
               : arch == "mobilenet_v2" ? "MobileNetV2"
                                        : arch,
               " x", model.value("width", 0.0));
}

std::string figure_title(const RunRecord& run) {
    const std::string quantizer = config_value(run, "quantizer", std::string("none"));
    std::string t = cat(model_name(run), " on ", start_value(run, "data", std::string("?")), ": float ",
                        last_epoch(run.float_stage), "/", config_value(run, "epochs", 0), " epochs");
    if (quantizer != "none")
        t += cat(", ", quantizer, " ", config_value(run, "bits", 0), "-bit QAT ", last_epoch(run.qat), "/",
                 config_value(run, "qat-epochs", 0), " epochs");
    if (run.finished)
        t += " (finished)";
    else if (run.stopped_at >= 0)
        t += cat(" (stopped at step ", run.stopped_at, ")");
    else
        t += " (not finished)";
    if (run.truncated) t += ", last line of metrics.jsonl cut short";
    return t;
}

}  // namespace

std::vector<ExponentTrace> most_flipping_layers(const RunRecord& run, int count) {
    return qat_flips(run, count).traces;
}

Figure run_curves_figure(const RunRecord& run, int layers) {
    Figure fig;
    fig.title = figure_title(run);
    fig.columns = 1;
    fig.panel_width = 1000;
    fig.panel_height = 330;
    fig.align_panels = true;  // the two epoch axes one above the other
    fig.panels.push_back(loss_panel(run));
    fig.panels.push_back(top1_panel(run));
    const FlipSummary flips = qat_flips(run, layers);
    if (!run.qat.steps.empty() && flips.has_exponents) fig.panels.push_back(exponents_panel(run, flips));
    return fig;
}

FigureFile write_run_curves(const std::string& run_folder, int layers) {
    namespace fs = std::filesystem;
    const std::string metrics = (fs::path(run_folder) / "metrics.jsonl").string();
    HFQ_CHECK(fs::is_regular_file(metrics), metrics, ": no such file (not a training run's folder?)");
    const std::string path = (fs::path(run_folder) / "curves.png").string();
    const cv::Mat image = render(run_curves_figure(read_run_log(metrics), layers));
    write_png(path, image);
    return {path, image.cols, image.rows};
}

}  // namespace hfq::study
