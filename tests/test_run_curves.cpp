// A training run's curves.png (study/run_curves.h) from a synthetic
// metrics.jsonl: 2 float epochs of 4 steps, then 2 QAT epochs of 4 steps
// whose step lines carry scripted exponents, so the layers that flip most
// are known. Also: a resumed run's repeated lines, a last line cut short by a
// kill, a broken line elsewhere, a missing file, and the runs with little to
// draw (float only, one epoch, stopped before any epoch ended, an empty log).
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "study/run_curves.h"
#include "study/run_log.h"
#include "tests/test_data_util.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

// Exponents per QAT step 1..8 of each quantized layer (per channel: of each
// channel), and the flips they make.
//   features.0   constant                        0 flips
//   features.1   channel 0: 1 flip, channel 1: 3  4 in all, the most
//   features.2   2 flips
//   features.3   3 flips
//   features.4   2 flips (a tie with features.2, which comes first in the model)
//   classifier   lsq: no exponents
struct ScriptedLayer {
    std::string name;
    bool per_channel;
    std::vector<std::vector<int>> exponents;  // per group, per step
};
const std::vector<ScriptedLayer> kLayers = {
    {"features.0", false, {{-3, -3, -3, -3, -3, -3, -3, -3}}},
    {"features.1", true, {{-4, -4, -4, -4, -5, -5, -5, -5}, {-2, -3, -3, -2, -2, -3, -3, -3}}},
    {"features.2", false, {{-6, -6, -5, -5, -5, -6, -6, -6}}},
    {"features.3", false, {{-1, 0, -1, 0, 0, 0, 0, 0}}},
    {"features.4", false, {{2, 2, 2, 3, 3, 3, 3, 2}}},
    {"classifier", false, {}},
};
constexpr int kStepsPerEpoch = 4, kFloatEpochs = 2, kQatEpochs = 2;

Json start_line(const std::string& quantizer) {
    return {{"type", "start"},
            {"step", 0},
            {"model", {{"arch", "mobilenet_v1"}, {"width", 0.25}}},
            {"data", "fashion-mnist"},
            {"config",
             {{"epochs", kFloatEpochs},
              {"qat-epochs", kQatEpochs},
              {"quantizer", quantizer},
              {"bits", 4},
              {"label-smoothing", 0.1}}}};
}

// A step line; `shift` is added to every exponent (a rerun that differs).
Json step_line(const std::string& stage, int64_t stage_step, int64_t step, int shift = 0) {
    Json j = {{"type", "step"},   {"stage", stage},           {"epoch", (stage_step - 1) / kStepsPerEpoch + 1},
              {"step", step},     {"stage_step", stage_step}, {"loss", 1.0},
              {"train_top1", 0.5}};
    if (stage != "qat") return j;
    Json layers = Json::array();
    for (const ScriptedLayer& l : kLayers) {
        std::vector<int> e;
        for (const std::vector<int>& group : l.exponents) e.push_back(group.at(size_t(stage_step - 1)) + shift);
        layers.push_back({{"name", l.name},
                          {"per_channel", l.per_channel},
                          {"exponents", e},
                          {"error_per_element", 1e-4},
                          {"clipped_fraction", 0.01},
                          {"codes_changed_fraction", nullptr}});
    }
    j["quantizers"] = layers;
    return j;
}

// An epoch line; float epoch e has train loss 2 - 0.5 e and test loss 2.1 - 0.5 e,
// QAT epochs continue from there; `evaluated` false: no test (--eval-every).
Json epoch_line(const std::string& stage, int epoch, int64_t step, bool evaluated = true) {
    const int x = stage == "qat" ? kFloatEpochs + epoch : epoch;  // on the common epoch axis
    Json j = {{"type", "epoch"},           {"stage", stage},       {"epoch", epoch}, {"step", step},
              {"train_loss", 2 - 0.3 * x}, {"train_top1", 0.1 * x}};
    if (evaluated) j["test"] = {{"loss", 2.1 - 0.3 * x}, {"top1", 0.1 * x - 0.02}, {"top5", 0.9}};
    if (evaluated && stage == "qat") j["test_integer"] = {{"loss", 2.2 - 0.3 * x}, {"top1", 0.1 * x - 0.03}};
    return j;
}

// The lines of a run of float then QAT, `float_epochs` and `qat_epochs` long.
std::vector<Json> run_lines(int float_epochs = kFloatEpochs, int qat_epochs = kQatEpochs,
                            const std::string& quantizer = "msqe-po2") {
    std::vector<Json> lines{start_line(quantizer)};
    int64_t step = 0;
    for (const auto& [stage, epochs] : {std::pair<std::string, int>{"float", float_epochs}, {"qat", qat_epochs}})
        for (int e = 1; e <= epochs; ++e) {
            for (int s = 1; s <= kStepsPerEpoch; ++s)
                lines.push_back(step_line(stage, (e - 1) * kStepsPerEpoch + s, ++step));
            lines.push_back(epoch_line(stage, e, step));
        }
    lines.push_back({{"type", "final"}, {"summary", Json::object()}});
    return lines;
}

void write_lines(const std::string& path, const std::vector<Json>& lines, const std::string& tail = "") {
    std::ofstream out(path);
    for (const Json& j : lines) out << j.dump() << "\n";
    out << tail;
}

// The image curves.png should be, by the figure's own layout.
cv::Size expected_size(const std::string& folder) {
    return study::figure_size(study::run_curves_figure(study::read_run_log(folder + "/metrics.jsonl")));
}

// Reads the written PNG back and checks it is the figure, drawn.
void check_png(const study::FigureFile& f, const std::string& folder) {
    CHECK(f.path == (fs::path(folder) / "curves.png").string());
    const cv::Mat img = cv::imread(f.path, cv::IMREAD_UNCHANGED);
    REQUIRE(!img.empty());
    CHECK(img.type() == CV_8UC3);
    CHECK(img.cols == f.width);
    CHECK(img.rows == f.height);
    CHECK(img.size() == expected_size(folder));
    cv::Mat grey;
    cv::cvtColor(img, grey, cv::COLOR_BGR2GRAY);
    CHECK(cv::countNonZero(grey < 128) > 1000);  // text, axes and lines: not a blank page
    // Written atomically: no temporary file is left next to it.
    for (const auto& entry : fs::directory_iterator(folder)) {
        const std::string name = entry.path().filename().string();
        CHECK((name == "metrics.jsonl" || name == "curves.png"));
    }
}

const study::Panel& panel_titled(const study::Figure& fig, const std::string& prefix) {
    for (const study::Panel& p : fig.panels)
        if (p.title.rfind(prefix, 0) == 0) return p;
    FAIL("no panel titled '" << prefix << "...'");
    return fig.panels.front();
}

const study::Line& line_labelled(const study::Panel& p, const std::string& prefix) {
    for (const study::Line& l : p.lines)
        if (l.label.rfind(prefix, 0) == 0) return l;
    FAIL("no line labelled '" << prefix << "...' in '" << p.title << "'");
    return p.lines.front();
}

}  // namespace

TEST_CASE("run curves: the layers whose exponents flip most, most first, each by its most flipping channel") {
    test::TempDir dir;
    write_lines(dir / "metrics.jsonl", run_lines());
    const study::RunRecord run = study::read_run_log(dir / "metrics.jsonl");
    CHECK(run.finished);
    CHECK(!run.truncated);
    CHECK(run.qat.steps == std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8});
    CHECK(run.qat.global_steps.front() == 9);

    const std::vector<study::ExponentTrace> top = study::most_flipping_layers(run, 3);
    REQUIRE(top.size() == 3);
    CHECK(top[0].layer == "features.1");
    CHECK(top[0].per_channel);
    CHECK(top[0].group == 1);  // channel 1 flips 3 times, channel 0 once
    CHECK(top[0].flips.total == 3);
    CHECK(top[0].exponents == kLayers[1].exponents[1]);
    CHECK(top[1].layer == "features.3");
    CHECK(top[1].flips.total == 3);
    CHECK(top[2].layer == "features.2");  // 2 flips, as features.4, and first in the model
    CHECK(top[2].flips.total == 2);

    // Over every layer and channel: 0 + 1 + 3 + 2 + 3 + 2; the lsq layer has none.
    const study::FlipSummary all = study::summarize_flips(run.qat, 10, 8, 0.0);
    CHECK(all.total.total == 11);
    CHECK(all.has_exponents);
    CHECK(all.traces.size() == 5);  // the classifier (lsq) is not among them
    CHECK(all.traces.back().layer == "features.0");
    CHECK(study::most_flipping_layers(study::read_run_log(dir / "metrics.jsonl"), 1).size() == 1);
}

TEST_CASE("run curves: the figure's panels hold the epochs of both stages and the chosen layers' exponents") {
    test::TempDir dir;
    write_lines(dir / "metrics.jsonl", run_lines());
    const study::Figure fig = study::run_curves_figure(study::read_run_log(dir / "metrics.jsonl"));
    REQUIRE(fig.panels.size() == 3);
    CHECK(fig.title.find("MobileNetV1 x0.25 on fashion-mnist") != std::string::npos);
    CHECK(fig.title.find("msqe-po2 4-bit QAT 2/2 epochs (finished)") != std::string::npos);

    // Float epochs 1 and 2, then QAT epochs 1 and 2 at 3 and 4; QAT starts between.
    const study::Panel& loss = panel_titled(fig, "Loss per epoch");
    const study::Line& train = line_labelled(loss, "train (label smoothing 0.1)");
    CHECK(train.x == std::vector<double>{1, 2, 3, 4});
    CHECK(train.y[3] == doctest::Approx(2 - 0.3 * 4));
    CHECK(line_labelled(loss, "test").y[0] == doctest::Approx(2.1 - 0.3));
    REQUIRE(loss.vlines.size() == 1);
    CHECK(loss.vlines[0].x == std::vector<double>{2.5});

    const study::Panel& top1 = panel_titled(fig, "Top-1 per epoch");
    CHECK(line_labelled(top1, "test").y[1] == doctest::Approx(100 * (0.2 - 0.02)));
    const study::Line& integer = line_labelled(top1, "test, integer export");
    CHECK(integer.x == std::vector<double>{3, 4});  // QAT only
    CHECK(integer.dashed);                          // on the test line when they agree
    CHECK(integer.y[0] == doctest::Approx(100 * (0.3 - 0.03)));

    // The exponents: the three layers that flip most, against QAT step, and
    // the QAT epochs' ends (steps 4 and 8 of QAT, 12 and 16 of the run).
    const study::Panel& e = panel_titled(fig, "QAT exponents of the 3 layers that flip most");
    CHECK(e.title.find("11 flips in all") != std::string::npos);
    REQUIRE(e.lines.size() == 3);
    CHECK(e.lines[0].label == "features.1 ch 1 (3 flips)");
    CHECK(e.lines[1].label == "features.3 (3 flips)");
    CHECK(e.lines[2].label == "features.2 (2 flips)");
    CHECK(e.lines[0].x == std::vector<double>{1, 2, 3, 4, 5, 6, 7, 8});
    CHECK(e.lines[1].y == std::vector<double>{-1, 0, -1, 0, 0, 0, 0, 0});
    CHECK(e.lines[0].steps);
    REQUIRE(e.vlines.size() == 1);
    CHECK(e.vlines[0].x == std::vector<double>{4, 8});

    const study::FigureFile f = study::write_run_curves(dir.path.string());
    CHECK(f.width == 1000);
    check_png(f, dir.path.string());
}

TEST_CASE("run curves: a resumed run's repeated lines count once, those of the rerun") {
    // The first invocation logged QAT steps 1..6 (run steps 9..14) and was
    // killed; its checkpoint was at run step 12 (QAT epoch 1's end). The
    // second invocation resumed there and ran steps 13..16 again.
    std::vector<Json> lines{start_line("msqe-po2")};
    const std::vector<Json> full = run_lines();
    for (const Json& j : full) {
        if (j.at("type") == "start" || j.at("type") == "final") continue;
        if (j.at("step").get<int64_t>() > 14) break;
        lines.push_back(j);
    }
    lines.back() = step_line("qat", 6, 14, /*shift=*/7);  // what the killed invocation saw at step 14
    lines.push_back({{"type", "resume"}, {"step", 12}});
    for (const Json& j : full) {
        const bool rerun = j.at("type") != "start" && j.value("step", int64_t(0)) > 12;
        if (rerun || j.at("type") == "final") lines.push_back(j);
    }

    test::TempDir dir;
    write_lines(dir / "metrics.jsonl", lines);
    const study::RunRecord run = study::read_run_log(dir / "metrics.jsonl");
    CHECK(run.qat.steps == std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8});
    CHECK(run.float_stage.steps.size() == 8);  // before the checkpoint: kept
    CHECK(run.qat.epochs.size() == 2);
    const std::vector<study::ExponentTrace> top = study::most_flipping_layers(run, 1);
    REQUIRE(top.size() == 1);
    CHECK(top[0].layer == "features.1");
    CHECK(top[0].flips.total == 3);  // the killed invocation's shifted exponents are gone
}

TEST_CASE("run curves: a last line cut short by a kill is ignored; a broken line elsewhere is an error") {
    test::TempDir dir;
    std::vector<Json> lines = run_lines();
    lines.pop_back();  // no "final": the run was killed while writing a QAT step line
    const std::string cut = step_line("qat", 8, 16).dump().substr(0, 40);  // half a line
    write_lines(dir / "metrics.jsonl", lines, cut);
    const study::RunRecord run = study::read_run_log(dir / "metrics.jsonl");
    CHECK(run.truncated);
    CHECK(!run.finished);
    CHECK(run.qat.steps.size() == 8);
    const study::Figure fig = study::run_curves_figure(run);
    CHECK(fig.title.find("(not finished), last line of metrics.jsonl cut short") != std::string::npos);
    check_png(study::write_run_curves(dir.path.string()), dir.path.string());

    // The same cut line with a newline, then more lines: not a kill, a broken file.
    fs::remove(dir / "curves.png");
    write_lines(dir / "metrics.jsonl", {lines[0], lines[1]}, cut + "\n" + lines[2].dump() + "\n");
    const std::string expected = (dir / "metrics.jsonl") + " line 3: not a metrics record";
    CHECK_THROWS_WITH_AS(study::read_run_log(dir / "metrics.jsonl"), doctest::Contains(expected.c_str()), Error);
    CHECK_THROWS_AS(study::write_run_curves(dir.path.string()), Error);
    CHECK(!fs::exists(dir / "curves.png"));
}

TEST_CASE("run curves: a folder without metrics.jsonl is an error naming the file") {
    test::TempDir dir;
    const std::string metrics = dir / "metrics.jsonl";
    const std::string missing = metrics + ": no such file", unopened = metrics + ": cannot open";
    CHECK_THROWS_WITH_AS(study::write_run_curves(dir.path.string()), doctest::Contains(missing.c_str()), Error);
    CHECK_THROWS_WITH_AS(study::read_run_log(metrics), doctest::Contains(unopened.c_str()), Error);
    CHECK(!fs::exists(dir / "curves.png"));
}

TEST_CASE("run curves: runs with little to draw still get a picture") {
    struct Case {
        std::string name;
        std::vector<Json> lines;
        size_t panels;
        std::string title_part;
    };
    std::vector<Json> stopped{start_line("msqe-po2"),
                              step_line("float", 1, 1),
                              step_line("float", 2, 2),
                              {{"type", "stop"}, {"step", 2}, {"signal", 0}}};
    std::vector<Json> one_epoch = run_lines(1, 0, "none");
    std::vector<Json> qat_only = run_lines(0, 1);  // from --init-from: QAT epoch 1 only
    std::vector<Json> lsq = run_lines(1, 1, "lsq");
    for (Json& j : lsq)
        if (j.contains("quantizers"))
            for (Json& l : j["quantizers"]) l["exponents"] = Json::array();
    std::vector<Json> unevaluated = run_lines();
    for (Json& j : unevaluated)  // --eval-every 2: no test after the first epoch of each stage
        if (j.at("type") == "epoch" && j.at("epoch") == 1) j.erase("test"), j.erase("test_integer");
    const std::vector<Case> cases = {
        {"stopped in the first epoch", stopped, 2,
         "float 0/2 epochs, msqe-po2 4-bit QAT 0/2 epochs (stopped at step 2)"},
        {"float only, one epoch", one_epoch, 2, "float 1/2 epochs (finished)"},
        {"QAT only", qat_only, 3, "float 0/2 epochs, msqe-po2 4-bit QAT 1/2"},
        {"lsq: no exponents", lsq, 2, "lsq 4-bit QAT 1/2"},
        {"not evaluated every epoch", unevaluated, 3, "(finished)"},
        {"an empty log", {}, 2, "MobileNet on ?: float 0/0 epochs (not finished)"},
    };
    for (const Case& c : cases) {
        INFO(c.name);
        test::TempDir dir;
        write_lines(dir / "metrics.jsonl", c.lines);
        const study::Figure fig = study::run_curves_figure(study::read_run_log(dir / "metrics.jsonl"));
        CHECK(fig.panels.size() == c.panels);
        CHECK(fig.title.find(c.title_part) != std::string::npos);
        check_png(study::write_run_curves(dir.path.string()), dir.path.string());
        if (c.name == "stopped in the first epoch") {
            CHECK(panel_titled(fig, "Loss per epoch").title == "Loss per epoch: no epoch finished yet");
        }
        if (c.name == "QAT only") {
            const study::Panel& loss = panel_titled(fig, "Loss per epoch");
            CHECK(loss.x_label == "QAT epoch");
            CHECK(loss.vlines.empty());  // no float stage to separate from
            CHECK(line_labelled(loss, "train").x == std::vector<double>{1});
        }
        if (c.name == "not evaluated every epoch") {
            const study::Panel& loss = panel_titled(fig, "Loss per epoch");
            CHECK(line_labelled(loss, "train").x == std::vector<double>{1, 2, 3, 4});
            CHECK(line_labelled(loss, "test").x == std::vector<double>{2, 4});
        }
    }
}
