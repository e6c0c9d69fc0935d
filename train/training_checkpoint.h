// Training checkpoints: everything a run needs to continue exactly where it
// stopped, in one safetensors file written atomically.
//
//   tensors    the model's state_dict under its own names (parameters and
//              buffers, quantizer state included), and each optimizer's
//              state as "optimizer/<role>/<state name>" (role "weights" or
//              "quantizer"; '/' never appears in a module name)
//   metadata   "format": "pt", "hfq.model" and "hfq.preprocessing" (as
//              layers/checkpoint.h), "hfq.quant_policy" once quantized,
//              "hfq.train_config" (the resolved TrainConfig) and
//              "hfq.train_state" (TrainState as JSON, random generators included)
//
// The model tensors load with load_checkpoint(path, model, {.partial = true})
// too (the optimizer tensors are then reported as unexpected), but a run's
// weights are best taken from its model-only files (float.safetensors,
// final.safetensors).
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data/loader.h"
#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/optimizer.h"
#include "quant/quantize_model.h"
#include "train/config.h"
#include "train/metrics.h"
#include "train/stages.h"

namespace hfq {

inline constexpr const char* kTrainConfigKey = "hfq.train_config";
inline constexpr const char* kTrainStateKey = "hfq.train_state";
inline constexpr const char* kOptimizerPrefix = "optimizer/";

// Where a run is.
struct TrainState {
    Stage stage = Stage::float_training;  // the stage in progress (saved by its name: "float", "qat", "done")
    int64_t stage_step = 0;               // steps done in that stage
    int64_t global_step = 0;              // steps done in the run
    int ranks = 1;                        // MPI ranks that trained the last steps (train/data_parallel.h)
    LoaderPosition next_batch;            // the batch the next step trains on
    Json results = Json::object();        // evaluations at the ends of stages, times, ...
    // Random generators of modules (dropout), by module name: {state, stream}.
    std::map<std::string, std::pair<uint64_t, uint64_t>> rngs;

    std::string to_json() const;
    static TrainState from_json(const std::string& text, const std::string& source);
};

using NamedOptimizers = std::vector<std::pair<std::string, Optimizer*>>;

// Writes the checkpoint (atomically). `state.rngs` is filled from the model
// here; `policy` (the run's, train/config.h quant_policy) only once quantized.
void save_training_checkpoint(const std::string& path, Model& model, const NamedOptimizers& optimizers,
                              TrainState state, const TrainConfig& config, const quant::QuantPolicy& policy,
                              const Preprocessing& preprocessing);

struct TrainingCheckpoint {
    SafetensorsFile file;
    TrainConfig config;
    TrainState state;
    std::optional<quant::QuantPolicy> policy;  // present once the model was quantized
};
// Reads and checks the file and its metadata; errors name the file.
TrainingCheckpoint read_training_checkpoint(const std::string& path);

// Loads the model's tensors (strictly: every tensor must be there) and its
// random generators, then resets the quantizers' diagnostics history.
void restore_model(const TrainingCheckpoint& checkpoint, Model& model);
// Loads each optimizer's state (an optimizer with no state in the file starts afresh).
void restore_optimizers(const TrainingCheckpoint& checkpoint, const NamedOptimizers& optimizers);

// The model tensors of a checkpoint file (what is left without the optimizer state).
SafetensorsFile model_tensors(const SafetensorsFile& file);

}  // namespace hfq
