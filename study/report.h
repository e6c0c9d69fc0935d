// The study's report: <out>/report.md with the results table, the
// improved-against-traditional comparisons, the figures and how every column
// is computed; and the figures, one set per architecture:
//   exponents_<arch>.png  exponent against step, the layers that flip most, a panel per method
//   error_<arch>.png      quantization error per weight against step, a line per method
//   accuracy_<arch>.png   test top-1 against epoch: float training, then each method's QAT
//   histogram_<arch>.png  one depthwise layer's weights after QAT with the chosen grid, a panel per method
#pragma once
#include <string>
#include <vector>

#include "study/cell.h"
#include "study/grid.h"
#include "study/plot.h"

namespace hfq::study {

// The float model of one architecture.
struct FloatModel {
    std::string arch;                // "v1"
    int seed = 0;                    // the study's seed index (0 unless float_seeds)
    std::string checkpoint;          // the file the cells start from
    std::string model_name;          // "MobileNetV1 x0.5"
    std::vector<double> epoch_top1;  // test top-1 per float epoch, when trained by the study
    std::string histogram_layer;     // the depthwise layer of the histogram figure
};

struct StudyData {
    std::string kind;                             // "fashion-mnist", "imagenet"
    int64_t train_samples = 0, test_samples = 0;  // what a cell trains and evaluates on
    int input_size = 0;
    int64_t qat_steps = 0;  // per cell
};

// Writes report.md and the figures into options.out; returns the figures.
std::vector<FigureFile> write_report(const StudyOptions& options, const StudyData& data,
                                     const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells);

}  // namespace hfq::study
