// curves.png of a training run (train_mobilenet writes it into the run folder
// after every epoch and at the end), drawn from the run's metrics.jsonl
// (run_log.h). One column of panels, 1000 pixels wide:
//   loss per epoch       training (label-smoothed, mean over the epoch's steps) and test (cross-entropy),
//                        on a log scale;
//                        float epochs 1..F, then QAT epochs at F+1.., the stage boundary dashed
//   top-1 per epoch      training, test, and during QAT the integer export's test top-1
//   exponents (QAT)      exponent against QAT step of the layers whose exponent flips most
//                        (summarize_flips over the logged steps); absent without a logged QAT
//                        step or without exponents (lsq)
// Epochs without an evaluation (--eval-every) have no test point. A run with
// no finished epoch yet still gets its panels, titled so.
#pragma once
#include <string>
#include <vector>

#include "study/plot.h"
#include "study/run_log.h"

namespace hfq::study {

constexpr int kCurveLayers = 3;  // layers in the exponent panel

// The layers of the exponent panel: the `count` whose logged QAT exponents
// flip most (summarize_flips), most first.
std::vector<ExponentTrace> most_flipping_layers(const RunRecord& run, int count = kCurveLayers);

// The figure of a run, as described above.
Figure run_curves_figure(const RunRecord& run, int layers = kCurveLayers);

// Reads <run_folder>/metrics.jsonl and writes <run_folder>/curves.png
// atomically (a reader never sees half a picture). Throws hfq::Error naming
// the file when metrics.jsonl is missing or unreadable (a truncated last line
// is not: it is ignored).
FigureFile write_run_curves(const std::string& run_folder, int layers = kCurveLayers);

}  // namespace hfq::study
