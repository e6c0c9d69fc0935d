#include "layers/checkpoint.h"

#include <nlohmann/json.hpp>
#include <unordered_map>

#include "engine/check.h"

namespace hfq {

void Preprocessing::validate() const {
    HFQ_CHECK(crop_size > 0 && resize_size >= crop_size, "preprocessing: need 0 < crop_size <= resize_size, got crop ",
              crop_size, ", resize ", resize_size);
    HFQ_CHECK(!mean.empty() && mean.size() == std.size(),
              "preprocessing: mean and std need one value per channel, got ", mean.size(), " and ", std.size());
    for (double s : std) HFQ_CHECK(s > 0, "preprocessing: std values must be positive, got ", s);
}

std::string Preprocessing::to_json() const {
    nlohmann::ordered_json j;
    j["resize_size"] = resize_size;
    j["crop_size"] = crop_size;
    j["mean"] = mean;
    j["std"] = std;
    return j.dump();
}

Preprocessing Preprocessing::from_json(const std::string& text) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(j.is_object(), "preprocessing: not a JSON object: ", text.substr(0, 200));
    Preprocessing p;
    for (const auto& [key, v] : j.items()) {
        if (key == "resize_size" || key == "crop_size") {
            HFQ_CHECK(v.is_number_integer(), "preprocessing: '", key, "' must be an integer, got ", v.dump());
            (key == "resize_size" ? p.resize_size : p.crop_size) = v.get<int>();
        } else if (key == "mean" || key == "std") {
            HFQ_CHECK(v.is_array(), "preprocessing: '", key, "' must be an array of numbers, got ", v.dump());
            std::vector<double>& out = key == "mean" ? p.mean : p.std;
            out.clear();
            for (const auto& x : v) {
                HFQ_CHECK(x.is_number(), "preprocessing: '", key, "' must be an array of numbers, got ", v.dump());
                out.push_back(x.get<double>());
            }
        } else {
            throw Error(cat("preprocessing: unknown key '", key, "'"));
        }
    }
    p.validate();
    return p;
}

void save_checkpoint(const std::string& path, const Module& model, const std::optional<Preprocessing>& preprocessing,
                     const std::map<std::string, std::string>& extra_metadata) {
    std::map<std::string, std::string> metadata = extra_metadata;
    metadata["format"] = "pt";
    if (const auto* m = dynamic_cast<const Model*>(&model)) metadata[kModelConfigKey] = m->config().to_json();
    if (preprocessing) {
        preprocessing->validate();
        metadata[kPreprocessingKey] = preprocessing->to_json();
    }
    write_safetensors(path, model.state_dict(), metadata);
}

std::string LoadReport::to_string() const {
    std::string out;
    for (const auto& n : missing) out += "  not in the file (left as initialised): " + n + "\n";
    for (const auto& n : unexpected) out += "  not in the model (ignored): " + n + "\n";
    for (const auto& n : mismatched) out += "  other shape or dtype (left as initialised): " + n + "\n";
    return out;
}

namespace {

// "a, b, c and 4 more"
std::string list_names(const std::vector<std::string>& names) {
    std::string out;
    for (size_t i = 0; i < names.size() && i < 3; ++i) out += (i ? ", " : "") + names[i];
    if (names.size() > 3) out += cat(" and ", names.size() - 3, " more");
    return out;
}

}  // namespace

LoadReport load_state_dict(Module& model, const SafetensorsFile& file, const LoadOptions& options) {
    const std::string where = cat("loading ", file.source.empty() ? "a checkpoint" : file.source);
    std::unordered_map<std::string, const Tensor*> in_file;
    for (const auto& [name, t] : file.tensors) in_file.emplace(name, &t);

    // The model's tensors, by name: parameter values and buffers.
    std::vector<std::pair<std::string, Tensor*>> targets;
    for (NamedParameter& p : model.named_parameters()) targets.emplace_back(p.name, &p.var.value());
    for (auto& b : model.named_buffers()) targets.push_back(b);

    // First check everything, then copy: a failed load changes nothing.
    LoadReport report;
    std::vector<std::pair<Tensor*, const Tensor*>> copies;
    for (const auto& [name, dst] : targets) {
        auto it = in_file.find(name);
        if (it == in_file.end()) {
            report.missing.push_back(name);
            continue;
        }
        const Tensor& src = *it->second;
        in_file.erase(it);
        if (src.shape() != dst->shape() || src.dtype() != dst->dtype()) {
            HFQ_CHECK(options.partial, where, ": tensor '", name, "' is ", dtype_name(src.dtype()), " ",
                      shape_str(src.shape()), " in the file but ", dtype_name(dst->dtype()), " ",
                      shape_str(dst->shape()), " in the model");
            report.mismatched.push_back(name);
            continue;
        }
        copies.emplace_back(dst, &src);
        report.loaded.push_back(name);
    }
    for (const auto& [name, t] : file.tensors)
        if (in_file.count(name)) report.unexpected.push_back(name);
    if (!options.partial) {
        HFQ_CHECK(report.missing.empty(), where, ": the model's tensor '", report.missing[0],
                  "' is missing from the file (missing: ", list_names(report.missing),
                  "); ask for a partial load to keep initial values");
        HFQ_CHECK(report.unexpected.empty(), where, ": the file's tensor '", report.unexpected[0],
                  "' is not in the model (unexpected: ", list_names(report.unexpected),
                  "); ask for a partial load to ignore it");
    }
    for (auto& [dst, src] : copies) dst->copy_from(*src);
    return report;
}

LoadReport load_checkpoint(const std::string& path, Module& model, const LoadOptions& options) {
    return load_state_dict(model, read_safetensors(path), options);
}

namespace {

template <class T>
std::optional<T> parse_metadata(const SafetensorsFile& file, const char* key) {
    auto it = file.metadata.find(key);
    if (it == file.metadata.end()) return std::nullopt;
    try {
        return T::from_json(it->second);
    } catch (const Error& e) {
        throw Error(cat(file.source, ": metadata '", key, "': ", e.what()));
    }
}

}  // namespace

std::optional<ModelConfig> checkpoint_model_config(const SafetensorsFile& file) {
    return parse_metadata<ModelConfig>(file, kModelConfigKey);
}

std::optional<Preprocessing> checkpoint_preprocessing(const SafetensorsFile& file) {
    return parse_metadata<Preprocessing>(file, kPreprocessingKey);
}

}  // namespace hfq
