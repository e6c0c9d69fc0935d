#include "study/cell.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "engine/check.h"

namespace hfq::study {
namespace {

double number_or_nan(const Json& j) { return j.is_number() ? j.get<double>() : CellResult::kNone; }

double number_or_nan(const Json& j, const char* key) {
    return j.is_object() && j.contains(key) ? number_or_nan(j.at(key)) : CellResult::kNone;
}

// The mean of the finite values (NaN when there is none).
double finite_mean(const std::vector<double>& v) {
    double sum = 0;
    int64_t n = 0;
    for (double x : v)
        if (std::isfinite(x)) sum += x, ++n;
    return n ? sum / double(n) : CellResult::kNone;
}

Json flips_json(const FlipCounts& f) { return {{"total", f.total}, {"late", f.late}}; }
FlipCounts flips_from(const Json& j) { return {j.at("total").get<int64_t>(), j.at("late").get<int64_t>()}; }

}  // namespace

std::vector<double> epoch_test_top1(const std::string& run_dir, const std::string& stage) {
    std::vector<double> out;
    const RunRecord run = read_run_log(run_dir + "/metrics.jsonl");
    for (const Json& e : run.stage(stage).epochs) out.push_back(number_or_nan(e.value("test", Json()), "top1"));
    return out;
}

CellResult summarize_run(const CellSpec& cell, const std::string& run_dir, const std::string& histogram_layer,
                         int plot_layers, double late_fraction) {
    CellResult r;
    r.cell = cell;
    const std::string summary_path = run_dir + "/summary.json";
    std::ifstream summary_file(summary_path);
    HFQ_CHECK(summary_file.good(), summary_path, ": missing (the cell's run did not finish)");
    const Json summary = Json::parse(summary_file, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(summary.is_object() && summary.contains("fake_quant"), summary_path, ": not a QAT run's summary");
    std::ifstream config_file(run_dir + "/config.json");
    r.config = Json::parse(config_file, nullptr, false);
    HFQ_CHECK(r.config.is_object(), run_dir, "/config.json: missing or not JSON");
    r.float_top1 = number_or_nan(summary.value("float", Json()), "top1");
    r.fake_quant_top1 = number_or_nan(summary.at("fake_quant"), "top1");
    r.integer_top1 = number_or_nan(summary.value("integer_export", Json()), "top1");
    r.seconds = number_or_nan(summary.value("seconds", Json()), "qat");
    const int64_t total_steps = summary.at("steps").get<int64_t>();

    const StageRecord rec = read_run_log(run_dir + "/metrics.jsonl").qat;
    HFQ_CHECK(int64_t(rec.steps.size()) == total_steps, run_dir, "/metrics.jsonl: ", rec.steps.size(),
              " QAT step lines for ", total_steps, " steps (the study needs a line every step: log_every 1)");
    r.steps = rec.steps;

    const FlipSummary flips = summarize_flips(rec, plot_layers, total_steps, late_fraction);
    r.has_exponents = flips.has_exponents;
    r.flips = flips.total;
    r.traces = flips.traces;
    std::vector<double> clipped, changed;
    for (const LayerRecord& l : rec.layers) {
        clipped.insert(clipped.end(), l.clipped.begin(), l.clipped.end());
        changed.insert(changed.end(), l.changed.begin(), l.changed.end());
    }
    r.mean_clipped = finite_mean(clipped);
    r.mean_codes_changed = finite_mean(changed);

    r.mean_error.resize(rec.steps.size());
    std::vector<double> at_step(rec.layers.size());
    for (size_t t = 0; t < rec.steps.size(); ++t) {
        for (size_t li = 0; li < rec.layers.size(); ++li) at_step[li] = rec.layers[li].error[t];
        r.mean_error[t] = finite_mean(at_step);
    }

    std::vector<double> speeds;
    for (const Json& e : rec.epochs) {
        r.epoch_top1.push_back(number_or_nan(e.value("test", Json()), "top1"));
        r.epoch_integer_top1.push_back(number_or_nan(e.value("test_integer", Json()), "top1"));
        speeds.push_back(number_or_nan(e, "images_per_second"));
    }
    r.images_per_second = finite_mean(speeds);

    // The histogram layer, as trained.
    const quant::QuantPolicy unused;  // final.safetensors carries its own policy
    for (DepthwiseLayer& d : depthwise_layers(run_dir + "/final.safetensors", unused))
        if (d.name == histogram_layer) r.histogram = std::move(d);
    HFQ_CHECK(r.histogram.name == histogram_layer, run_dir, "/final.safetensors: no quantized depthwise layer '",
              histogram_layer, "'");
    return r;
}

Json to_json(const CellResult& r) {
    Json traces = Json::array();
    for (const ExponentTrace& t : r.traces)
        traces.push_back({{"layer", t.layer},
                          {"group", t.group},
                          {"per_channel", t.per_channel},
                          {"flips", flips_json(t.flips)},
                          {"exponents", t.exponents}});
    const DepthwiseLayer& h = r.histogram;
    const CellSpec& c = r.cell;
    return {{"cell",
             {{"arch", c.arch},
              {"bits", c.bits},
              {"per_channel", c.per_channel},
              {"bn_stats", c.bn_stats},
              {"method", c.method},
              {"fix", c.fix},
              {"seed", c.seed}}},
            {"config", r.config},
            {"float_top1", r.float_top1},
            {"fake_quant_top1", r.fake_quant_top1},
            {"integer_top1", r.integer_top1},
            {"flips", r.has_exponents ? flips_json(r.flips) : Json()},
            {"mean_clipped", r.mean_clipped},
            {"mean_codes_changed", r.mean_codes_changed},
            {"seconds", r.seconds},
            {"images_per_second", r.images_per_second},
            {"steps", r.steps},
            {"mean_error", r.mean_error},
            {"traces", traces},
            {"epoch_top1", r.epoch_top1},
            {"epoch_integer_top1", r.epoch_integer_top1},
            {"histogram",
             {{"layer", h.name},
              {"per_channel", h.per_channel},
              {"qn", h.qn},
              {"qp", h.qp},
              {"scales", h.scales},
              {"weights", h.weights}}}};
}

CellResult cell_result_from_json(const Json& j, const std::string& source) {
    try {
        CellResult r;
        const Json& c = j.at("cell");
        r.cell = {c.at("arch").get<std::string>(),   c.at("bits").get<int>(),
                  c.at("per_channel").get<bool>(),   c.at("bn_stats").get<std::string>(),
                  c.at("method").get<std::string>(), c.at("fix").get<std::string>(),
                  c.at("seed").get<int>()};
        r.config = j.at("config");
        r.float_top1 = number_or_nan(j.at("float_top1"));
        r.fake_quant_top1 = number_or_nan(j.at("fake_quant_top1"));
        r.integer_top1 = number_or_nan(j.at("integer_top1"));
        r.has_exponents = !j.at("flips").is_null();
        if (r.has_exponents) r.flips = flips_from(j.at("flips"));
        r.mean_clipped = number_or_nan(j.at("mean_clipped"));
        r.mean_codes_changed = number_or_nan(j.at("mean_codes_changed"));
        r.seconds = number_or_nan(j.at("seconds"));
        r.images_per_second = number_or_nan(j.at("images_per_second"));
        r.steps = j.at("steps").get<std::vector<int64_t>>();
        for (const Json& e : j.at("mean_error")) r.mean_error.push_back(number_or_nan(e));
        for (const Json& t : j.at("traces"))
            // Results written before traces carried "per_channel": the cell's setting.
            r.traces.push_back({t.at("layer").get<std::string>(), t.at("group").get<int64_t>(),
                                t.value("per_channel", r.config.value("per-channel", false)), flips_from(t.at("flips")),
                                t.at("exponents").get<std::vector<int>>()});
        for (const Json& e : j.at("epoch_top1")) r.epoch_top1.push_back(number_or_nan(e));
        for (const Json& e : j.at("epoch_integer_top1")) r.epoch_integer_top1.push_back(number_or_nan(e));
        const Json& h = j.at("histogram");
        r.histogram.name = h.at("layer").get<std::string>();
        r.histogram.per_channel = h.at("per_channel").get<bool>();
        r.histogram.qn = h.at("qn").get<int>();
        r.histogram.qp = h.at("qp").get<int>();
        r.histogram.scales = h.at("scales").get<std::vector<float>>();
        r.histogram.weights = h.at("weights").get<std::vector<float>>();
        return r;
    } catch (const Json::exception& e) {
        throw Error(cat(source, ": not a study cell result (", e.what(), ")"));
    }
}

}  // namespace hfq::study
