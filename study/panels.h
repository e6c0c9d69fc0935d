// Panels that the study's report (report.h) and a training run's curves.png
// (run_curves.h) draw alike, so both show exponents and stages the same way.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "study/plot.h"
#include "study/run_log.h"

namespace hfq::study {

// The palette's grey: what belongs to no method or quantity (float training,
// stage boundaries, windows).
constexpr int kGrey = 7;

// Exponent against step: a staircase per trace (colours 0, 1, ...), in the
// legend as "layer (n flips)" or, per channel, "layer ch g (n flips)": the
// flips of the group drawn. `steps` are the steps of the traces' exponents.
Panel exponent_panel(const std::string& title, const std::string& x_label, const std::vector<int64_t>& steps,
                     const std::vector<ExponentTrace>& traces);

// The dashed grey line where quantization-aware training starts, on an epoch axis.
VLines qat_start_line(double x);

}  // namespace hfq::study
