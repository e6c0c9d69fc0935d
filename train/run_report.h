// The end of a run: summary.json and the results table on the terminal.
//
// summary.json: {"data", "test_samples", "steps", "float"?, and for QAT runs
// "quantizer" (the policy), "fake_quant", "integer_export" (evaluations as
// train/run_records.h's eval_json), "audit" (quant/audit.h: does the export
// compute what was trained?), "layers" (the per-layer diagnostics);
// "seconds" per stage}.
#pragma once
#include <string>
#include <vector>

#include "quant/audit.h"
#include "quant/diagnostics_table.h"
#include "train/config.h"
#include "train/datasets.h"
#include "train/metrics.h"

namespace hfq {

// `results`: TrainState::results (the stages' last evaluations and times);
// `policy`, `audit` and `layers` only for QAT runs.
Json run_summary(const TrainConfig& config, const quant::QuantPolicy& policy, const TrainData& data, int64_t steps, const Json& results,
                 const quant::AuditReport& audit, const std::vector<quant::LayerDiagnostics>& layers);

// The table of results (float, fake-quant, integer export), the audit's
// verdict, the quantized layers and the training time.
std::string results_table(const TrainConfig& config, const Json& summary,
                          const std::vector<quant::LayerDiagnostics>& layers, const std::string& out);

}  // namespace hfq
