#include "study/cell.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "engine/check.h"

namespace hfq::study {
namespace {

// What the step lines of metrics.jsonl say about one quantized layer.
struct LayerRecord {
    std::string name;
    std::vector<std::vector<int>> exponents;  // per step, per group
    std::vector<double> error, clipped, changed;  // per step; NaN where not available
};

struct RunRecord {
    std::vector<int64_t> steps;  // QAT steps, increasing
    std::vector<LayerRecord> layers;
    std::vector<Json> epochs;    // the QAT epoch lines
};

double number_or_nan(const Json& j) { return j.is_number() ? j.get<double>() : CellResult::kNone; }

double number_or_nan(const Json& j, const char* key) {
    return j.is_object() && j.contains(key) ? number_or_nan(j.at(key)) : CellResult::kNone;
}

// Reads the step and epoch lines of a stage ("float", "qat"). A "resume" line
// at step S means the lines after the checkpoint of step S were written by an
// interrupted invocation and run again: they are dropped. (The study's runs
// have one stage each, so a stage's steps and the run's steps agree.)
RunRecord read_metrics(const std::string& path, const std::string& stage) {
    std::ifstream in(path);
    HFQ_CHECK(in.good(), path, ": cannot open the metrics file");
    RunRecord r;
    int64_t line_number = 0;
    for (std::string line; std::getline(in, line);) {
        ++line_number;
        const Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
        HFQ_CHECK(!j.is_discarded() && j.is_object() && j.contains("type"), path, " line ", line_number,
                  ": not a metrics record");
        const std::string type = j.at("type").get<std::string>();
        if (type == "resume") {
            const int64_t s = j.at("step").get<int64_t>();
            while (!r.steps.empty() && r.steps.back() > s) {
                r.steps.pop_back();
                for (LayerRecord& l : r.layers) {
                    l.exponents.pop_back();
                    l.error.pop_back();
                    l.clipped.pop_back();
                    l.changed.pop_back();
                }
            }
            while (!r.epochs.empty() && r.epochs.back().at("step").get<int64_t>() > s) r.epochs.pop_back();
            continue;
        }
        if (!j.contains("stage") || j.at("stage") != stage) continue;
        if (type == "epoch") {
            r.epochs.push_back(j);
            continue;
        }
        if (type != "step") continue;
        static const Json kNoLayers = Json::array();  // float steps
        const Json& q = j.contains("quantizers") ? j.at("quantizers") : kNoLayers;
        if (r.layers.empty())
            for (const Json& l : q) r.layers.push_back({l.at("name").get<std::string>(), {}, {}, {}, {}});
        HFQ_CHECK(q.size() == r.layers.size(), path, " line ", line_number, ": ", q.size(),
                  " quantized layers, earlier lines had ", r.layers.size());
        const int64_t step = j.at("stage_step").get<int64_t>();
        HFQ_CHECK(r.steps.empty() || step > r.steps.back(), path, " line ", line_number, ": step ", step,
                  " after step ", r.steps.back());
        r.steps.push_back(step);
        for (size_t i = 0; i < q.size(); ++i) {
            LayerRecord& l = r.layers[i];
            l.exponents.push_back(q[i].at("exponents").get<std::vector<int>>());
            l.error.push_back(number_or_nan(q[i].at("error_per_element")));
            l.clipped.push_back(number_or_nan(q[i].at("clipped_fraction")));
            l.changed.push_back(number_or_nan(q[i].at("codes_changed_fraction")));
        }
    }
    return r;
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
    for (const Json& e : read_metrics(run_dir + "/metrics.jsonl", stage).epochs)
        out.push_back(number_or_nan(e.value("test", Json()), "top1"));
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

    const RunRecord rec = read_metrics(run_dir + "/metrics.jsonl", "qat");
    HFQ_CHECK(int64_t(rec.steps.size()) == total_steps, run_dir, "/metrics.jsonl: ", rec.steps.size(),
              " QAT step lines for ", total_steps, " steps (the study needs a line every step: log_every 1)");
    r.steps = rec.steps;

    // Flips, per layer and in total; each layer's most flipping group.
    struct LayerFlips {
        size_t index;
        int64_t total = 0, best_group = 0, best = -1;
    };
    std::vector<LayerFlips> per_layer;
    r.has_exponents = false;
    std::vector<double> clipped, changed;
    for (size_t li = 0; li < rec.layers.size(); ++li) {
        const LayerRecord& l = rec.layers[li];
        clipped.insert(clipped.end(), l.clipped.begin(), l.clipped.end());
        changed.insert(changed.end(), l.changed.begin(), l.changed.end());
        const size_t groups = l.exponents.empty() ? 0 : l.exponents.front().size();
        if (groups == 0) continue;  // lsq: a real scale
        r.has_exponents = true;
        LayerFlips lf{li};
        std::vector<int> sequence(rec.steps.size());
        for (size_t g = 0; g < groups; ++g) {
            for (size_t t = 0; t < rec.steps.size(); ++t) sequence[t] = l.exponents[t].at(g);
            const FlipCounts c = count_flips(rec.steps, sequence, total_steps, late_fraction);
            r.flips.total += c.total;
            r.flips.late += c.late;
            lf.total += c.total;
            if (c.total > lf.best) lf.best = c.total, lf.best_group = int64_t(g);
        }
        per_layer.push_back(lf);
    }
    r.mean_clipped = finite_mean(clipped);
    r.mean_codes_changed = finite_mean(changed);

    std::stable_sort(per_layer.begin(), per_layer.end(),
                     [](const LayerFlips& a, const LayerFlips& b) { return a.total > b.total; });
    for (size_t k = 0; k < per_layer.size() && int(k) < plot_layers; ++k) {
        const LayerRecord& l = rec.layers[per_layer[k].index];
        ExponentTrace trace{l.name, per_layer[k].best_group, {}, {}};
        for (const std::vector<int>& e : l.exponents) trace.exponents.push_back(e.at(size_t(trace.group)));
        trace.flips = count_flips(rec.steps, trace.exponents, total_steps, late_fraction);
        r.traces.push_back(std::move(trace));
    }

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
        traces.push_back({{"layer", t.layer}, {"group", t.group}, {"flips", flips_json(t.flips)},
                          {"exponents", t.exponents}});
    const DepthwiseLayer& h = r.histogram;
    return {{"cell", {{"arch", r.cell.arch}, {"method", r.cell.method}, {"fix", r.cell.fix}}},
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
             {{"layer", h.name}, {"per_channel", h.per_channel}, {"qn", h.qn}, {"qp", h.qp}, {"scales", h.scales},
              {"weights", h.weights}}}};
}

CellResult cell_result_from_json(const Json& j, const std::string& source) {
    try {
        CellResult r;
        const Json& c = j.at("cell");
        r.cell = {c.at("arch").get<std::string>(), c.at("method").get<std::string>(), c.at("fix").get<std::string>()};
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
            r.traces.push_back({t.at("layer").get<std::string>(), t.at("group").get<int64_t>(),
                                flips_from(t.at("flips")), t.at("exponents").get<std::vector<int>>()});
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
