// A QAT checkpoint outside training: the programs that read what
// train_mobilenet writes (mobilenet_predict, export_onnx) restore such a file
// as the trainer does, and export it as a run's end does.
//
// A QAT checkpoint is a safetensors file with "hfq.quant_policy" metadata:
// final.safetensors, or a run's checkpoint.safetensors (whose optimizer
// state is left out here).
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/model.h"
#include "quant/quantize_model.h"

namespace hfq {

struct QatModel {
    std::shared_ptr<Model> model;  // in evaluation mode
    quant::QuantPolicy policy;
};

// The float model of `config` (by default the file's "hfq.model" metadata),
// wrapped by quantize_model with the file's policy, then the file's tensors.
// Errors name the file.
QatModel restore_qat_checkpoint(const SafetensorsFile& file, const std::optional<ModelConfig>& config = std::nullopt);

// The model exported as a run's end exports it (quant/export.h), to a file
// of its own in the temporary folder, removed when this object goes (also
// when an exception leaves).
class TemporaryExport {
public:
    TemporaryExport(const QatModel& qat, const std::optional<Preprocessing>& preprocessing);
    ~TemporaryExport();
    TemporaryExport(const TemporaryExport&) = delete;
    TemporaryExport& operator=(const TemporaryExport&) = delete;
    const std::string& path() const { return path_; }

private:
    std::string path_;
};

}  // namespace hfq
