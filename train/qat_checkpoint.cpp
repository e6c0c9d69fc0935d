#include "train/qat_checkpoint.h"

#include <unistd.h>

#include <atomic>
#include <filesystem>

#include "engine/check.h"
#include "layers/checkpoint.h"
#include "quant/export.h"
#include "train/training_checkpoint.h"

namespace hfq {

QatModel restore_qat_checkpoint(const SafetensorsFile& file, const std::optional<ModelConfig>& config) {
    QatModel qat;
    try {
        qat.policy = quant::QuantPolicy::from_json(file.metadata.at(quant::kQuantPolicyKey));
    } catch (const std::exception& e) {  // absent (std::out_of_range) or not a policy (hfq::Error)
        throw Error(cat(file.source, ": metadata '", quant::kQuantPolicyKey, "': ", e.what()));
    }
    const std::optional<ModelConfig> c = config ? config : checkpoint_model_config(file);
    HFQ_CHECK(c, file.source, ": the checkpoint has no '", kModelConfigKey, "' metadata");
    qat.model = build_model(*c);
    quant::quantize_model(*qat.model, qat.policy);
    load_state_dict(*qat.model, model_tensors(file));
    qat.model->eval();
    return qat;
}

TemporaryExport::TemporaryExport(const QatModel& qat, const std::optional<Preprocessing>& preprocessing) {
    static std::atomic<int> count{0};
    path_ = (std::filesystem::temp_directory_path() /
             cat("hfq-export-", ::getpid(), "-", count++, ".safetensors"))
                .string();
    try {
        quant::export_quantized_model(path_, *qat.model, qat.policy, preprocessing);
    } catch (...) {
        std::error_code ignored;
        std::filesystem::remove(path_, ignored);
        throw;
    }
}

TemporaryExport::~TemporaryExport() {
    std::error_code ignored;
    std::filesystem::remove(path_, ignored);
}

}  // namespace hfq
