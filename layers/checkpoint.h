// Model checkpoints: every parameter and buffer as a safetensors file with
// PyTorch's names and layouts (OIHW convolution weights, {out, in} linear
// weights, int64 num_batches_tracked), so the file round-trips with
// safetensors.torch and torchvision:
//
//   torch:  model.load_state_dict(safetensors.torch.load_file("m.safetensors"))
//   hfq:    load_checkpoint("m.safetensors", model)   // also reads files
//           written by safetensors.torch.save_file(model.state_dict())
//
// Metadata (all values are strings, as the format requires):
//   "format"              "pt" (what safetensors.torch writes)
//   "hfq.model"           the ModelConfig as JSON (layers/model.h)
//   "hfq.preprocessing"   Preprocessing as JSON (below)
// plus whatever extra entries the caller adds.
//
// Loading checks every name, shape and dtype before changing anything: a
// failed load leaves the model as it was, and the error names the tensor.
// Writes are atomic (temporary file, then rename).
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/safetensors.h"
#include "layers/model.h"

namespace hfq {

inline constexpr const char* kModelConfigKey = "hfq.model";
inline constexpr const char* kPreprocessingKey = "hfq.preprocessing";

// How images are turned into the model's input (torchvision's ImageNet
// evaluation transform by default): resize the shorter side to resize_size,
// centre-crop crop_size x crop_size, scale to [0, 1], then
// (x - mean[c]) / std[c] per channel. mean and std have one entry per input
// channel.
struct Preprocessing {
    int resize_size = 256;
    int crop_size = 224;
    std::vector<double> mean = {0.485, 0.456, 0.406};
    std::vector<double> std = {0.229, 0.224, 0.225};

    void validate() const;
    // {"resize_size": 256, "crop_size": 224, "mean": [...], "std": [...]}
    std::string to_json() const;
    static Preprocessing from_json(const std::string& json);  // strict, as ModelConfig
};

// Saves model.state_dict() with the metadata above: "hfq.model" when `model`
// is a Model, "hfq.preprocessing" when given.
void save_checkpoint(const std::string& path, const Module& model,
                     const std::optional<Preprocessing>& preprocessing = std::nullopt,
                     const std::map<std::string, std::string>& extra_metadata = {});

struct LoadOptions {
    // Partial load (fine-tuning with a new classifier head): tensors of the
    // model missing from the file, tensors of the file unknown to the model,
    // and tensors whose shape or dtype differ are skipped and reported
    // instead of being errors.
    bool partial = false;
};

struct LoadReport {
    std::vector<std::string> loaded;      // copied into the model
    std::vector<std::string> missing;     // in the model, not in the file (partial only)
    std::vector<std::string> unexpected;  // in the file, not in the model (partial only)
    std::vector<std::string> mismatched;  // same name, other shape or dtype (partial only)
    // One line per skipped tensor, for the user.
    std::string to_string() const;
};

// Copies the file's tensors into the model's parameters and buffers (their
// memory is kept, so optimizers holding them stay valid).
LoadReport load_state_dict(Module& model, const SafetensorsFile& file, const LoadOptions& options = {});
LoadReport load_checkpoint(const std::string& path, Module& model, const LoadOptions& options = {});

// What a checkpoint's metadata says (nullopt when the key is absent; a
// malformed value is an error naming the file and the key).
std::optional<ModelConfig> checkpoint_model_config(const SafetensorsFile& file);
std::optional<Preprocessing> checkpoint_preprocessing(const SafetensorsFile& file);

}  // namespace hfq
