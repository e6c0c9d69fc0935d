#include "train/run_report.h"

#include <cstdio>

#include "engine/check.h"
#include "train/run_records.h"

namespace hfq {

Json run_summary(const TrainConfig& c, const quant::QuantPolicy& policy, const TrainData& data, int64_t steps, const Json& results,
                 const quant::AuditReport& audit, const std::vector<quant::LayerDiagnostics>& layers) {
    Json summary = {{"data", data.kind}, {"test_samples", data.test->size()}, {"steps", steps}};
    if (results.contains("float")) summary["float"] = results["float"];
    if (c.qat()) {
        summary["quantizer"] = Json::parse(policy.to_json());
        summary["fake_quant"] = results["qat"];
        summary["integer_export"] = results["integer"];
        if (results.contains("integer_engine")) summary["integer_engine"] = results["integer_engine"];
        summary["audit"] = {{"passed", audit.passed()},
                            {"weight_mismatches", audit.weight_mismatches()},
                            {"max_layer_rel_diff", audit.max_rel_diff()},
                            {"logits_rel_diff", audit.logits_rel_diff},
                            {"top1_agreement", audit.top1_agreement}};
        summary["layers"] = Json(quant::diagnostics_json(layers));
    }
    if (results.contains("seconds")) summary["seconds"] = results["seconds"];
    return summary;
}

std::string results_table(const TrainConfig& c, const Json& summary, const std::vector<quant::LayerDiagnostics>& layers,
                          const std::string& out) {
    std::string table = cat("\nResults on the ", summary["data"].get<std::string>(), " test set (",
                            summary["test_samples"].get<int64_t>(), " images):\n");
    char row[160];
    std::snprintf(row, sizeof row, "  %-46s %8s %9s %9s\n", "model", "loss", "top-1", "top-5");
    table += row;
    auto add_row = [&](const std::string& name, const Json& r) {
        std::snprintf(row, sizeof row, "  %-46s %8.4f %9s %9s\n", name.c_str(), r["loss"].get<double>(),
                      percent(r, "top1").c_str(), percent(r, "top5").c_str());
        table += row;
    };
    if (summary.contains("float")) add_row("float", summary["float"]);
    if (c.qat()) {
        const std::string q = cat(c.quantizer, ", ", c.bits, " bits", c.per_channel ? " per channel" : "");
        add_row(cat("fake-quant (", q, ")"), summary["fake_quant"]);
        add_row("integer export (export.safetensors)", summary["integer_export"]);
        if (summary.contains("integer_engine")) {
            const Json& e = summary["integer_engine"];
            add_row("integer engine (W4A8, integer arithmetic)", e);
            const int64_t same = e["identical_logits"].get<int64_t>(), n = e["samples"].get<int64_t>();
            table += cat("  integer engine logits identical to fake-quant on ", same, " of ", n, " images",
                         same == n ? "" : "  <- differs: the engine does not compute the fake-quant model", "\n");
        }
        const Json& audit = summary["audit"];
        const int64_t mismatches = audit["weight_mismatches"].get<int64_t>();
        table += cat("\nExport audit: ", audit["passed"].get<bool>() ? "passed" : "FAILED", " (weights ",
                     mismatches == 0 ? "bit-exact" : cat(mismatches, " mismatches"),
                     ", largest layer-output difference ", audit["max_layer_rel_diff"].get<double>(),
                     " relative, logits ", audit["logits_rel_diff"].get<double>(), ")\n");
        table += "\nQuantized layers (scale = 2^exponent; flips and changes since the last report):\n";
        table += quant::diagnostics_table(layers);
    }
    if (summary.contains("seconds")) {
        std::string times;
        double total = 0;
        for (const auto& [stage, s] : summary["seconds"].items()) {
            times += cat(times.empty() ? "" : ", ", stage, " ", format_duration(s.get<double>()));
            total += s.get<double>();
        }
        table += cat("\nTraining time: ", times, " (total ", format_duration(total), ", evaluation included)\n");
    }
    table += cat("Run folder: ", out, "\n");
    return table;
}

}  // namespace hfq
