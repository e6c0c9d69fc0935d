// Everything a run needs before it writes anything: the data, the model (new,
// from --init-from, or restored from the checkpoint of --resume), the stages,
// where the run is, and its folder. Every check of the options, the data and
// a resumed checkpoint happens here, so bad input fails before the output
// folder is touched.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "layers/model.h"
#include "train/config.h"
#include "train/datasets.h"
#include "train/stages.h"
#include "train/training_checkpoint.h"

namespace hfq {

struct RunSetup {
    TrainData data;
    std::shared_ptr<Model> model;
    std::vector<StagePlan> stages;
    std::filesystem::path out;  // the run folder
    uint64_t loader_seed = 0;   // data order and augmentation: a stream apart from the weights' initialization
    TrainState state;           // where the run is (a resumed run: where it stopped)
    std::optional<TrainingCheckpoint> resume;  // --resume: its optimizer state, restored when its stage starts
    std::string init_from_note;                // --init-from: the tensors that were skipped, if any
    int64_t batch_size = 1;                    // --batch-size: every step trains on a full batch

    int64_t batches_per_epoch() const { return data.train->size() / batch_size; }
};

// Reads the data, builds the model and, with --resume, restores it and checks
// that the checkpoint continues this run. Fills the config's automatic fields
// (input size and channels, small_input, out) with what they resolved to.
RunSetup set_up_run(TrainConfig& config);

// Creates the run folder; a new run writes its resolved config.json there.
void create_run_folder(const RunSetup& setup, const TrainConfig& config);

}  // namespace hfq
