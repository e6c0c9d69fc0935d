// run_study: the whole study as qat_study performs it.
//
//   1. For each architecture without a given --float-checkpoint, train the
//      float model (run_training, quantizer none) in <out>/float-<arch>/
//      (resumed if an earlier invocation was interrupted, reused if finished).
//   2. Run every cell of the grid (study/grid.h) from its architecture's float
//      model: <out>/cells/<id>/ (study/cell.h). A cell with a result.json is
//      finished and is reused, after checking it was made with the same
//      settings; a cell interrupted in its run is resumed from its checkpoint.
//   3. Write the report: <out>/report.md and its figures (study/report.h).
//
// SIGINT / SIGTERM during a run: the run saves its checkpoint and the study
// stops; the same command continues where it stopped.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "study/grid.h"
#include "study/report.h"

namespace hfq::study {

struct StudyOutcome {
    bool interrupted = false;
    int signal = 0;
    int cells_run = 0;            // trained (or resumed) by this invocation
    int cells_reused = 0;         // finished earlier
    bool floats_trained = false;  // a float model was trained (or resumed) by this invocation
    std::string report;           // report.md, when written
    std::vector<FigureFile> figures;
};

// `say` receives one line per event (a float run or a cell starting or
// finishing); nullptr: silent.
StudyOutcome run_study(const StudyOptions& options, const std::function<void(const std::string&)>& say = nullptr);

}  // namespace hfq::study
