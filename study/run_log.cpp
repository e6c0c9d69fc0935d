#include "study/run_log.h"

#include <algorithm>
#include <fstream>
#include <limits>

#include "engine/check.h"

namespace hfq::study {
namespace {

double number_or_nan(const Json& j) {
    return j.is_number() ? j.get<double>() : std::numeric_limits<double>::quiet_NaN();
}

void add_step(StageRecord& s, const Json& j) {
    static const Json kNoLayers = Json::array();  // float steps
    const Json& q = j.contains("quantizers") ? j.at("quantizers") : kNoLayers;
    if (s.steps.empty() && s.layers.empty())
        for (const Json& l : q) {
            LayerRecord& added = s.layers.emplace_back();
            added.name = l.at("name").get<std::string>();
            added.per_channel = l.value("per_channel", false);
        }
    HFQ_CHECK(q.size() == s.layers.size(), q.size(), " quantized layers, earlier lines had ", s.layers.size());
    const int64_t step = j.at("stage_step").get<int64_t>();
    HFQ_CHECK(s.steps.empty() || step > s.steps.back(), "step ", step, " after step ", s.steps.back());
    s.steps.push_back(step);
    s.global_steps.push_back(j.at("step").get<int64_t>());
    for (size_t i = 0; i < q.size(); ++i) {
        LayerRecord& l = s.layers[i];
        l.exponents.push_back(q[i].at("exponents").get<std::vector<int>>());
        l.error.push_back(number_or_nan(q[i].at("error_per_element")));
        l.clipped.push_back(number_or_nan(q[i].at("clipped_fraction")));
        l.changed.push_back(number_or_nan(q[i].at("codes_changed_fraction")));
    }
}

// Forgets what a stage logged after global step `step`.
void drop_after(StageRecord& s, int64_t step) {
    while (!s.global_steps.empty() && s.global_steps.back() > step) {
        s.steps.pop_back();
        s.global_steps.pop_back();
        for (LayerRecord& l : s.layers) {
            l.exponents.pop_back();
            l.error.pop_back();
            l.clipped.pop_back();
            l.changed.pop_back();
        }
    }
    while (!s.epochs.empty() && s.epochs.back().at("step").get<int64_t>() > step) s.epochs.pop_back();
}

StageRecord* stage_of(RunRecord& r, const Json& j) {
    const std::string stage = j.at("stage").get<std::string>();
    HFQ_CHECK(stage == "float" || stage == "qat", "unknown stage '", stage, "'");
    return stage == "float" ? &r.float_stage : &r.qat;
}

void add_line(RunRecord& r, const Json& j) {
    const std::string type = j.at("type").get<std::string>();
    if (type == "start") {
        r.start = j;
    } else if (type == "resume") {
        const int64_t s = j.at("step").get<int64_t>();
        drop_after(r.float_stage, s);
        drop_after(r.qat, s);
        r.stopped_at = -1;
        r.finished = false;
    } else if (type == "step") {
        add_step(*stage_of(r, j), j);
    } else if (type == "epoch") {
        stage_of(r, j)->epochs.push_back(j);
    } else if (type == "stop") {
        r.stopped_at = j.at("step").get<int64_t>();
    } else if (type == "final") {
        r.finished = true;
    }
}

}  // namespace

const StageRecord& RunRecord::stage(const std::string& name) const {
    HFQ_CHECK(name == "float" || name == "qat", "RunRecord: unknown stage '", name, "'");
    return name == "float" ? float_stage : qat;
}

RunRecord read_run_log(const std::string& path) {
    std::ifstream in(path);
    HFQ_CHECK(in.good(), path, ": cannot open the metrics file");
    RunRecord r;
    int64_t line_number = 0;
    for (std::string line; std::getline(in, line);) {
        ++line_number;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded() && in.peek() == std::ifstream::traits_type::eof()) {
            // The last line, cut short: a run killed while writing it.
            r.truncated = true;
            break;
        }
        HFQ_CHECK(!j.is_discarded() && j.is_object() && j.contains("type"), path, " line ", line_number,
                  ": not a metrics record");
        try {
            add_line(r, j);
        } catch (const Json::exception& e) {
            throw Error(cat(path, " line ", line_number, ": ", e.what()));
        } catch (const Error& e) {
            throw Error(cat(path, " line ", line_number, ": ", e.what()));
        }
    }
    return r;
}

FlipSummary summarize_flips(const StageRecord& stage, int count, int64_t total_steps, double late_fraction) {
    struct LayerFlips {
        size_t index;
        int64_t total = 0, best_group = 0, best = -1;
    };
    FlipSummary out;
    std::vector<LayerFlips> per_layer;
    std::vector<int> sequence(stage.steps.size());
    for (size_t li = 0; li < stage.layers.size(); ++li) {
        const LayerRecord& l = stage.layers[li];
        const size_t groups = l.exponents.empty() ? 0 : l.exponents.front().size();
        if (groups == 0) continue;  // lsq: a real scale
        out.has_exponents = true;
        LayerFlips lf{li};
        for (size_t g = 0; g < groups; ++g) {
            for (size_t t = 0; t < stage.steps.size(); ++t) sequence[t] = l.exponents[t].at(g);
            const FlipCounts c = count_flips(stage.steps, sequence, total_steps, late_fraction);
            out.total.total += c.total;
            out.total.late += c.late;
            lf.total += c.total;
            if (c.total > lf.best) lf.best = c.total, lf.best_group = int64_t(g);
        }
        per_layer.push_back(lf);
    }

    std::stable_sort(per_layer.begin(), per_layer.end(),
                     [](const LayerFlips& a, const LayerFlips& b) { return a.total > b.total; });
    for (size_t k = 0; k < per_layer.size() && int(k) < count; ++k) {
        const LayerRecord& l = stage.layers[per_layer[k].index];
        ExponentTrace trace{l.name, per_layer[k].best_group, l.per_channel, {}, {}};
        for (const std::vector<int>& e : l.exponents) trace.exponents.push_back(e.at(size_t(trace.group)));
        trace.flips = count_flips(stage.steps, trace.exponents, total_steps, late_fraction);
        out.traces.push_back(std::move(trace));
    }
    return out;
}

}  // namespace hfq::study
