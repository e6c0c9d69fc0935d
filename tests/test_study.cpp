// The study (study/): the flip counter against scripted exponent sequences
// and against the quantizer's own count; plot ticks; the seeds' statistics
// (t quantiles against published values, paired intervals); a tiny grid over
// two seeds end to end (float model, two methods, report tables and figures),
// its resumption (finished cells are not run again, an interrupted one is)
// and its refusal of changed settings.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "engine/random.h"
#include "layers/checkpoint.h"
#include "layers/model.h"
#include "quant/quantizer.h"
#include "study/flips.h"
#include "study/plot.h"
#include "study/stats.h"
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

TEST_CASE("stats: Student's t quantiles, mean, standard deviation and the paired 95 % interval") {
    // Published two-sided 95 % critical values (rounded to 3 decimals: the tolerance).
    const std::pair<int, double> table[] = {{1, 12.706}, {2, 4.303}, {3, 3.182}, {4, 2.776},
                                            {9, 2.262},  {10, 2.228}, {30, 2.042}};
    for (const auto& [df, t] : table) {
        INFO("df ", df);
        CHECK(std::abs(study::t_quantile(0.975, df) - t) < 5e-4);
    }
    CHECK(std::abs(study::t_quantile(0.995, 5) - 4.032) < 5e-4);
    CHECK_THROWS_AS(study::t_quantile(0.4, 3), Error);

    const std::vector<double> x{1, 2, 4};
    CHECK(study::mean_of(x) == doctest::Approx(7.0 / 3));
    CHECK(study::sd_of(x) == doctest::Approx(std::sqrt((16.0 / 9 + 1.0 / 9 + 25.0 / 9) / 2)));
    CHECK(std::isnan(study::sd_of(std::vector<double>{1})));

    // d = a - b = (1, 2, 0.5): mean 7/6, sd sqrt(7/12), half-width 4.303 sd / sqrt(3) = 1.897: contains 0.
    const std::vector<double> a{91, 92, 90.5}, b{90, 90, 90};
    const study::PairedDifference d = study::paired_difference(a, b);
    CHECK(d.differences == std::vector<double>{1, 2, 0.5});
    CHECK(d.mean == doctest::Approx(7.0 / 6));
    CHECK(d.sd == doctest::Approx(std::sqrt(7.0 / 12)));
    CHECK(d.hi - d.mean == doctest::Approx(study::t_quantile(0.975, 2) * std::sqrt(7.0 / 12) / std::sqrt(3.0)));
    CHECK(d.mean - d.lo == doctest::Approx(d.hi - d.mean));
    CHECK(d.verdict() == "not distinguishable");
    // Four seeds, each 1 +- 0.1 higher: the interval lies above zero.
    CHECK(study::paired_difference(std::vector<double>{2, 2.1, 1.9, 2}, std::vector<double>{1, 1, 1, 1}).verdict() ==
          "higher");
    CHECK(study::paired_difference(std::vector<double>{0, 0.1, -0.1, 0}, std::vector<double>{1, 1, 1, 1}).verdict() ==
          "lower");
    CHECK(study::paired_difference(std::vector<double>{2}, std::vector<double>{1}).verdict() == "one seed");
    CHECK_THROWS_AS(study::paired_difference(std::vector<double>{1, 2}, std::vector<double>{1}), Error);
}

TEST_CASE("A tiny study over two seeds: float model, two methods, the report; interrupted and run again") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");  // 48 training images: 6 steps of 8 per epoch
    study::StudyOptions o;
    o.out = dir / "study";
    o.archs = {"v1"};
    o.methods = {"msqe-baseline", "msqe-po2"};
    o.bits = {4};
    o.granularities = {"tensor"};
    o.bn_stats = {"float-conv"};
    o.seeds = 2;
    o.train = test::tiny_config(dir / "images", "");
    o.train.qat_epochs = 2;  // 12 QAT steps; the last 20 % are steps 11 and 12
    o.plot_layers = 2;
    std::vector<std::string> said;
    const study::StudyOutcome r = study::run_study(o, [&](const std::string& s) { said.push_back(s); });
    REQUIRE(!r.interrupted);
    CHECK(r.floats_trained);
    CHECK(r.cells_run == 4);
    CHECK(r.cells_reused == 0);

    // The results table: one row per method, the mean and every seed's value.
    const std::string md = read_text(r.report);
    std::map<std::string, std::vector<double>> top1;  // per method, per seed (percent)
    for (const char* method : {"msqe-baseline", "msqe-po2"}) {
        INFO(method);
        std::vector<Json> results;
        for (int seed = 0; seed < 2; ++seed) {
            const std::string cell_dir = dir / cat("study/cells/v1-4bit-tensor-", method, "/seed", seed);
            const Json summary = Json::parse(read_text(cell_dir + "/run/summary.json"));
            const Json result = Json::parse(read_text(cell_dir + "/result.json"));
            const Json config = Json::parse(read_text(cell_dir + "/run/config.json"));
            CHECK(config.at("seed").get<uint64_t>() == o.train.seed + uint64_t(seed));
            CHECK(config.at("bits").get<int>() == 4);
            CHECK(!config.at("per-channel").get<bool>());
            CHECK(result.at("fake_quant_top1").get<double>() == summary.at("fake_quant").at("top1").get<double>());
            top1[method].push_back(100 * summary.at("fake_quant").at("top1").get<double>());
            results.push_back(result);

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
            const double clipped = result.at("mean_clipped").get<double>();
            CHECK((clipped >= 0 && clipped <= 1));
            CHECK(result.at("traces").size() == 2);
            CHECK(result.at("histogram").at("weights").size() > 0);
        }
        const std::vector<double>& v = top1[method];
        const std::vector<std::string> row = table_row(md, cat("| MobileNetV1 x0.25 | 4 bits per tensor | ", method, " |"));
        REQUIRE(row.size() == 12);
        const double mean = (v[0] + v[1]) / 2, sd = std::abs(v[0] - v[1]) / std::sqrt(2.0);
        char expected[64];
        std::snprintf(expected, sizeof expected, "%.2f ± %.2f", mean, sd);
        CHECK(row[3] == expected);
        std::snprintf(expected, sizeof expected, "%.2f, %.2f", v[0], v[1]);
        CHECK(row[4] == expected);
        const double flips0 = double(results[0].at("flips").at("late").get<int64_t>()),
                     flips1 = double(results[1].at("flips").at("late").get<int64_t>());
        std::snprintf(expected, sizeof expected, "%.1f ± %.1f", (flips0 + flips1) / 2,
                      std::abs(flips0 - flips1) / std::sqrt(2.0));
        CHECK(row[7] == expected);
    }
    // The paired comparison: each seed's difference, their mean and the
    // interval mean -+ 12.706 sd / sqrt(2) (one degree of freedom).
    const std::vector<std::string> cmp = table_row(
        md, "| MobileNetV1 x0.25 | 4 bits per tensor | msqe-po2 against msqe-baseline | fake-quant top-1 (points) |");
    REQUIRE(cmp.size() == 8);
    const double d0 = top1["msqe-po2"][0] - top1["msqe-baseline"][0], d1 = top1["msqe-po2"][1] - top1["msqe-baseline"][1];
    char expected[96];
    std::snprintf(expected, sizeof expected, "%+.2f, %+.2f", d0, d1);
    CHECK(cmp[4] == expected);
    std::snprintf(expected, sizeof expected, "%+.2f", (d0 + d1) / 2);
    CHECK(cmp[5] == expected);
    const double half = study::t_quantile(0.975, 1) * std::abs(d0 - d1) / std::sqrt(2.0) / std::sqrt(2.0);
    std::snprintf(expected, sizeof expected, "[%+.2f, %+.2f]", (d0 + d1) / 2 - half, (d0 + d1) / 2 + half);
    CHECK(cmp[6] == expected);
    CHECK((cmp[7] == "reproduced" || cmp[7] == "reversed" || cmp[7] == "not distinguishable"));
    CHECK(md.find("**the improved MSQE method (outlier sensitivity)**") != std::string::npos);
    // The float model is named relative to the report folder.
    CHECK(md.find("float model `float-v1/run/final.safetensors`") != std::string::npos);
    CHECK(md.find(dir.path.string()) == std::string::npos);

    // The figures: six, each a PNG of the size the report states.
    REQUIRE(r.figures.size() == 6);
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
    const std::string cell = "study/cells/v1-4bit-tensor-msqe-po2/seed1";
    const std::string metrics_before = read_text(dir / (cell + "/run/metrics.jsonl"));
    const std::string float_before = read_text(dir / "study/float-v1/run/metrics.jsonl");
    const study::StudyOutcome again = study::run_study(o);
    CHECK(!again.floats_trained);
    CHECK(again.cells_run == 0);
    CHECK(again.cells_reused == 4);
    CHECK(read_text(dir / (cell + "/run/metrics.jsonl")) == metrics_before);
    CHECK(read_text(dir / "study/float-v1/run/metrics.jsonl") == float_before);
    CHECK(read_text(again.report) == md);

    // A study interrupted inside one seed's cell: that cell alone runs again,
    // and (same seed, same float model) gives the same result.
    fs::remove_all(dir / cell);
    const study::StudyOutcome resumed = study::run_study(o);
    CHECK(resumed.cells_run == 1);
    CHECK(resumed.cells_reused == 3);
    CHECK(read_text(resumed.report) == md);

    // The same folder with other settings is refused, naming the option.
    study::StudyOptions other = o;
    other.train.qat_lr = 0.02;
    try {
        study::run_study(other);
        FAIL("a changed --qat-lr was accepted");
    } catch (const Error& e) {
        CHECK(std::string(e.what()).find("--qat-lr differs") != std::string::npos);
    }
}

TEST_CASE("The grid: bits, scales, batch statistics, fixes and seeds, and each cell's trainer options") {
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
    o.bits = {4};
    o.granularities = {"tensor"};
    o.bn_stats = {"float-conv"};
    o.seeds = 1;
    o.fixes = {"default", "none", "stable-exponent", "all"};
    std::vector<std::string> ids;
    for (const study::CellSpec& c : study::make_grid(o)) ids.push_back(c.id());
    // msqe-po2 takes every fix; msqe-round the mask and second moments (and none); the others only default.
    const std::string p = "v1-4bit-tensor-";
    CHECK(ids == std::vector<std::string>{p + "msqe-baseline/seed0", p + "msqe-po2/seed0", p + "msqe-po2.none/seed0",
                                          p + "msqe-po2.stable-exponent/seed0", p + "msqe-po2.all/seed0",
                                          p + "learnable-po2-ceil/seed0", p + "learnable-po2-msqe-round/seed0",
                                          p + "learnable-po2-msqe-round.none/seed0", p + "lsq/seed0"});

    // Bits x granularity x batch statistics x seeds; the modes after the
    // first only at --bn-stats-bits; MobileNetV2 only in the --v2-* lists.
    study::StudyOptions g;
    g.archs = {"v1", "v2"};
    g.methods = {"msqe-po2"};
    g.bits = {3, 4};
    g.v2_bits = {4};
    g.v2_granularities = {"tensor", "channel"};
    g.v2_bn_stats = {"float-conv", "quantized-conv-freeze"};
    g.granularities = {"tensor", "channel"};
    g.bn_stats = {"float-conv", "quantized-conv-freeze"};
    g.bn_stats_bits = {4};
    g.seeds = 2;
    ids.clear();
    for (const study::CellSpec& c : study::make_grid(g)) ids.push_back(c.id());
    CHECK(ids.size() == 2 * 2 * (1 + 2) + 2 * 2 * 1 * 2);  // V1: 3 bits 2 scales + 4 bits 2 scales x 2 modes; V2: 4 bits
    CHECK(ids.front() == "v1-3bit-tensor-msqe-po2/seed0");
    CHECK(std::count(ids.begin(), ids.end(), "v1-4bit-channel-qconv-freeze-msqe-po2/seed1") == 1);
    CHECK(std::count(ids.begin(), ids.end(), "v1-3bit-tensor-qconv-freeze-msqe-po2/seed0") == 0);
    CHECK(std::count_if(ids.begin(), ids.end(), [](const std::string& id) { return id.rfind("v2-3bit", 0) == 0; }) == 0);
    CHECK(ids.back() == "v2-4bit-channel-qconv-freeze-msqe-po2/seed1");
    // V2 cut as the default study cuts it: 4 bits per tensor, float-conv.
    g.v2_granularities = {"tensor"};
    g.v2_bn_stats = {"float-conv"};
    ids.clear();
    for (const study::CellSpec& c : study::make_grid(g))
        if (c.arch == "v2") ids.push_back(c.id());
    CHECK(ids == std::vector<std::string>{"v2-4bit-tensor-msqe-po2/seed0", "v2-4bit-tensor-msqe-po2/seed1"});
    g.v2_bits = {2};
    CHECK_THROWS_WITH_AS(g.validate(), doctest::Contains("no MobileNetV2 cell"), Error);
    g.v2_bits = {4};
    g.v2_bn_stats = {"quantized-conv"};
    CHECK_THROWS_WITH_AS(g.validate(), doctest::Contains("no MobileNetV2 cell"), Error);
    g.v2_bn_stats = {"float-conv"};
    g.bn_stats_bits = {2};
    CHECK_THROWS_WITH_AS(g.validate(), doctest::Contains("--bn-stats-bits: 2 is not one of --bits"), Error);
    g.bn_stats_bits = {4};
    g.bits = {3, 9};
    CHECK_THROWS_WITH_AS(g.validate(), doctest::Contains("bit widths are 2..8"), Error);
    g.bits = {3, 4};
    g.float_seeds = true;
    g.float_checkpoints = {float_file};
    CHECK_THROWS_WITH_AS(g.validate(), doctest::Contains("--float-seeds"), Error);

    auto config = [&](const std::string& method, const std::string& fix) {
        return study::cell_train_config(o, {"v1", 4, false, "float-conv", method, fix, 0}, float_file, dir / "run",
                                        100);
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
    CHECK(plain.bn_stats == "float-conv");
    CHECK(plain.freeze_bn_step(100) == -1);
    const TrainConfig round = config("learnable-po2-msqe-round", "default");
    CHECK(round.quantizer == "learnable-po2");
    CHECK(round.rounding == "msqe-round");
    CHECK(round.width == 0.25);  // the float checkpoint's model
    // The cell's bits, scales, batch statistics and seed.
    const study::CellSpec spec{"v1", 3, true, "quantized-conv-freeze", "msqe-po2", "default", 2};
    const TrainConfig c = study::cell_train_config(o, spec, float_file, dir / "run", 100);
    CHECK(c.bits == 3);
    CHECK(c.per_channel);
    CHECK(c.bn_stats == "quantized-conv");
    CHECK(c.freeze_bn_step(100) == 50);
    CHECK(c.seed == o.train.seed + 2);
    CHECK(spec.id() == "v1-3bit-channel-qconv-freeze-msqe-po2/seed2");
    CHECK(spec.setting() == "3 bits per channel, quantized-conv + freeze");
    CHECK(study::CellSpec{"v1", 4, false, "float-conv", "msqe-po2", "all", 0}.label() == "msqe-po2, all fixes");
}
