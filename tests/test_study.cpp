// The study (study/): the flip counter against scripted exponent sequences
// and against the quantizer's own count; plot ticks; a tiny grid end to end
// (float model, two methods, report table and figures), its resumption
// (finished cells are not run again) and its refusal of changed settings.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "engine/random.h"
#include "layers/checkpoint.h"
#include "layers/model.h"
#include "quant/quantizer.h"
#include "study/flips.h"
#include "study/plot.h"
#include "study/study.h"
#include "tests/test_data_util.h"
#include "tests/test_train_util.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

using test::read_text;

// The cells of the Markdown table row that starts with `prefix`.
std::vector<std::string> table_row(const std::string& md, const std::string& prefix) {
    const size_t at = md.find(prefix);
    if (at == std::string::npos) return {};
    const std::string line = md.substr(at, md.find('\n', at) - at);
    std::vector<std::string> cells;
    std::stringstream s(line.substr(1));
    for (std::string cell; std::getline(s, cell, '|');) {
        const size_t b = cell.find_first_not_of(' '), e = cell.find_last_not_of(' ');
        cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
    }
    return cells;
}

std::string as_percent(double fraction) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f %%", 100 * fraction);
    return buf;
}

}  // namespace

TEST_CASE("count_flips: exponent changes from step to step, and those in the last 20 % of the steps") {
    const std::vector<int64_t> steps{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    // Changes at steps 3, 5, 9 and 10; the last 20 % of 10 steps are steps 9 and 10.
    const std::vector<int> exponents{-3, -3, -2, -2, -3, -3, -3, -3, -2, -3};
    const study::FlipCounts c = study::count_flips(steps, exponents, 10, 0.2);
    CHECK(c.total == 4);
    CHECK(c.late == 2);
    CHECK(study::count_flips(steps, std::vector<int>(10, 5), 10, 0.2).total == 0);
    // A change that reverts between two logged steps is invisible, and a
    // change is counted at the later step.
    const std::vector<int64_t> sparse{1, 5, 9};
    const study::FlipCounts s = study::count_flips(sparse, std::vector<int>{0, 0, 1}, 10, 0.2);
    CHECK(s.total == 1);
    CHECK(s.late == 1);
    CHECK(study::late_window_start(10, 0.2) == 8);
    CHECK(study::late_window_start(468, 0.2) == 374);  // 93.6 steps round to 94
    CHECK(study::late_window_start(12, 0.25) == 9);
    CHECK_THROWS_AS(study::count_flips(steps, std::vector<int>{1, 2}, 10, 0.2), Error);
    CHECK_THROWS_AS(study::count_flips(std::vector<int64_t>{1, 1}, std::vector<int>{1, 2}, 10, 0.2), Error);
}

TEST_CASE("count_flips agrees with the quantizer's own flip count (docs/quantizers.md, 5)") {
    // msqe-baseline's scale follows the weights' magnitude: weights 2^k w use
    // the exponent of w plus k. A scripted k makes a known exponent sequence.
    const Shape shape{8, 4, 3, 3};
    Rng rng(5);
    Tensor w = Tensor::empty(shape);
    for (int64_t i = 0; i < w.numel(); ++i) w.f32()[i] = 0.1f * rng.normal();
    auto q = quant::make_quantizer("msqe-baseline", {}, shape);
    const std::vector<int> k{0, 0, 1, 1, 0, 2, 2, 2, 1, 1};  // changes at steps 3, 5, 6, 9
    std::vector<int64_t> steps;
    std::vector<int> exponents;
    int64_t reported = 0;
    for (size_t t = 0; t < k.size(); ++t) {
        Tensor x = w.clone();
        for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= std::ldexp(1.0f, k[t]);
        q->fake_quantize(Variable(x), /*training=*/true);
        const quant::QuantizerDiagnostics d = q->report();
        REQUIRE(d.exponents.size() == 1);
        steps.push_back(int64_t(t + 1));
        exponents.push_back(d.exponents[0]);
        reported += d.flips;
    }
    for (size_t t = 0; t < k.size(); ++t) CHECK(exponents[t] - exponents[0] == k[t]);
    const study::FlipCounts c = study::count_flips(steps, exponents, 10, 0.2);
    CHECK(c.total == 4);
    CHECK(c.late == 1);  // step 9
    CHECK(reported == c.total);
}

TEST_CASE("plot: nice ticks, labels, and the figure's size") {
    CHECK(study::nice_ticks(0, 10, 5) == std::vector<double>{0, 2, 4, 6, 8, 10});
    CHECK(study::nice_ticks(-0.33, 0.33, 6) == std::vector<double>{-0.3, -0.2, -0.1, 0, 0.1, 0.2, 0.3});
    CHECK(study::nice_ticks(1, 1, 5).empty());
    CHECK(study::tick_label(0.25) == "0.25");
    CHECK(study::tick_label(1e-5) == "1e-05");
    study::Figure f;
    f.columns = 2;
    f.panels.resize(3);
    f.panel_width = 300;
    f.panel_height = 200;
    const cv::Size s = study::figure_size(f);
    const cv::Mat img = study::render(f);
    CHECK(s.width == 600);
    CHECK(img.cols == s.width);
    CHECK(img.rows == s.height);
    CHECK(s.height > 400);  // two rows of panels and a title band
}

TEST_CASE("A tiny study: float model, two methods, the report; run again, nothing is rerun") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");  // 48 training images: 6 steps of 8 per epoch
    study::StudyOptions o;
    o.out = dir / "study";
    o.archs = {"v1"};
    o.methods = {"msqe-baseline", "msqe-po2"};
    o.train = test::tiny_config(dir / "images", "");
    o.train.qat_epochs = 2;  // 12 QAT steps; the last 20 % are steps 11 and 12
    o.train.per_channel = false;
    o.plot_layers = 2;
    std::vector<std::string> said;
    const study::StudyOutcome r = study::run_study(o, [&](const std::string& s) { said.push_back(s); });
    REQUIRE(!r.interrupted);
    CHECK(r.floats_trained);
    CHECK(r.cells_run == 2);
    CHECK(r.cells_reused == 0);

    // The results table: one row per method, with the values of the runs.
    const std::string md = read_text(r.report);
    for (const char* method : {"msqe-baseline", "msqe-po2"}) {
        INFO(method);
        const std::string cell_dir = dir / cat("study/cells/v1-", method);
        const Json summary = Json::parse(read_text(cell_dir + "/run/summary.json"));
        const Json result = Json::parse(read_text(cell_dir + "/result.json"));
        const std::vector<std::string> row = table_row(md, cat("| MobileNetV1 x0.25 | ", method, " |"));
        REQUIRE(row.size() == 11);
        CHECK(row[2] == as_percent(summary.at("float").at("top1").get<double>()));
        CHECK(row[3] == as_percent(summary.at("fake_quant").at("top1").get<double>()));
        CHECK(row[4] == as_percent(summary.at("integer_export").at("top1").get<double>()));
        CHECK(row[5] == std::to_string(result.at("flips").at("total").get<int64_t>()));
        CHECK(row[6] == std::to_string(result.at("flips").at("late").get<int64_t>()));
        CHECK(row[7].find(" %") != std::string::npos);

        // The flips are the quantizers' own counts: every step's line of
        // metrics.jsonl reports the flips since the previous step.
        int64_t reported = 0, step_lines = 0;
        std::ifstream metrics(cell_dir + "/run/metrics.jsonl");
        for (std::string line; std::getline(metrics, line);) {
            const Json j = Json::parse(line);
            if (j.at("type") != "step") continue;
            ++step_lines;
            for (const Json& layer : j.at("quantizers")) reported += layer.at("flips").get<int64_t>();
        }
        CHECK(step_lines == 12);
        CHECK(result.at("flips").at("total").get<int64_t>() == reported);
        CHECK(reported <= 28 * 11);  // per tensor: at most one flip per layer and step after the first
        CHECK(result.at("steps").size() == 12);
        for (const Json& e : result.at("mean_error")) CHECK(e.get<double>() > 0);
        CHECK(result.at("epoch_top1").size() == 2);
        const double clipped = result.at("mean_clipped").get<double>();
        CHECK((clipped >= 0 && clipped <= 1));
        CHECK(result.at("traces").size() == 2);
        CHECK(result.at("histogram").at("weights").size() > 0);
    }
    CHECK(md.find("msqe-po2 against msqe-baseline") != std::string::npos);

    // The figures: four, each a PNG of the size the report states.
    REQUIRE(r.figures.size() == 4);
    for (const study::FigureFile& f : r.figures) {
        INFO(f.path);
        const cv::Mat img = cv::imread(f.path, cv::IMREAD_UNCHANGED);
        REQUIRE(!img.empty());
        CHECK(img.cols == f.width);
        CHECK(img.rows == f.height);
        CHECK(img.type() == CV_8UC3);
        const std::string name = fs::path(f.path).filename().string();
        CHECK(md.find(cat("(", name, ", ", f.width, " x ", f.height, " pixels)")) != std::string::npos);
        CHECK(read_text(f.path).substr(1, 3) == "PNG");
        // Something was drawn: not a blank page.
        cv::Mat grey;
        cv::cvtColor(img, grey, cv::COLOR_BGR2GRAY);
        CHECK(cv::countNonZero(grey < 128) > 1000);
    }

    // Run again: the float model and the cells are reused, their runs untouched.
    const std::string metrics_before = read_text(dir / "study/cells/v1-msqe-po2/run/metrics.jsonl");
    const std::string float_before = read_text(dir / "study/float-v1/run/metrics.jsonl");
    const study::StudyOutcome again = study::run_study(o);
    CHECK(!again.floats_trained);
    CHECK(again.cells_run == 0);
    CHECK(again.cells_reused == 2);
    CHECK(read_text(dir / "study/cells/v1-msqe-po2/run/metrics.jsonl") == metrics_before);
    CHECK(read_text(dir / "study/float-v1/run/metrics.jsonl") == float_before);
    CHECK(read_text(again.report) == md);

    // The same folder with other settings is refused, naming the option.
    study::StudyOptions other = o;
    other.train.bits = 3;
    try {
        study::run_study(other);
        FAIL("a changed --bits was accepted");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("--bits differs") != std::string::npos);
    }
}

TEST_CASE("The grid: which fixes make cells, and each cell's quantizer options") {
    test::TempDir dir;
    const std::string float_file = dir / "float.safetensors";
    ModelConfig m;
    m.arch = Arch::mobilenet_v1;
    m.width = 0.25;
    m.classes = 10;
    m.small_input = true;
    m.input_channels = 1;
    save_checkpoint(float_file, *build_model(m, 1));

    study::StudyOptions o;
    o.archs = {"v1"};
    o.fixes = {"default", "none", "stable-exponent", "all"};
    std::vector<std::string> ids;
    for (const study::CellSpec& c : study::make_grid(o)) ids.push_back(c.id());
    // msqe-po2 takes every fix; msqe-round the mask and second moments (and none); the others only default.
    CHECK(ids == std::vector<std::string>{"v1-msqe-baseline", "v1-msqe-po2", "v1-msqe-po2.none",
                                          "v1-msqe-po2.stable-exponent", "v1-msqe-po2.all", "v1-learnable-po2-ceil",
                                          "v1-learnable-po2-msqe-round", "v1-learnable-po2-msqe-round.none", "v1-lsq"});

    auto config = [&](const std::string& method, const std::string& fix) {
        return study::cell_train_config(o, {"v1", method, fix}, float_file, dir / "run", 100);
    };
    const TrainConfig all = config("msqe-po2", "all"), alone = config("msqe-po2", "stable-exponent"),
                      plain = config("msqe-po2", "default");
    CHECK((all.outlier_mask && all.second_moments && all.line_search));  // the defaults ...
    CHECK(all.stable_start_step == 50);                                  // ... plus the stable exponent
    CHECK(all.stable_switch_step == 80);
    CHECK((!alone.outlier_mask && !alone.second_moments && !alone.line_search));  // the fix alone
    CHECK(alone.stable_start_step == 50);
    CHECK((plain.outlier_mask && plain.second_moments && plain.line_search));
    CHECK(plain.stable_start_step == -1);
    const TrainConfig round = config("learnable-po2-msqe-round", "default");
    CHECK(round.quantizer == "learnable-po2");
    CHECK(round.rounding == "msqe-round");
    CHECK(round.width == 0.25);  // the float checkpoint's model
    CHECK(study::CellSpec{"v1", "msqe-po2", "all"}.label() == "msqe-po2, all fixes");
}
