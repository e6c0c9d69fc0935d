#include "train/training_checkpoint.h"

#include "engine/check.h"

namespace hfq {

std::string TrainState::to_json() const {
    Json j;
    j["stage"] = stage_name(stage);
    j["stage_step"] = stage_step;
    j["global_step"] = global_step;
    j["ranks"] = ranks;
    j["next_batch"] = {{"epoch", next_batch.epoch}, {"batch", next_batch.batch}};
    j["results"] = results;
    Json r = Json::object();
    for (const auto& [name, s] : rngs) r[name] = {s.first, s.second};
    j["rngs"] = r;
    return j.dump();
}

TrainState TrainState::from_json(const std::string& text, const std::string& source) {
    const std::string where = cat(source, ": metadata '", kTrainStateKey, "'");
    Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
    HFQ_CHECK(j.is_object(), where, ": not a JSON object");
    TrainState s;
    try {
        s.stage = parse_stage(j.at("stage").get<std::string>(), where);
        s.stage_step = j.at("stage_step").get<int64_t>();
        s.global_step = j.at("global_step").get<int64_t>();
        s.ranks = j.value("ranks", 1);  // checkpoints before data-parallel training: one process
        s.next_batch.epoch = j.at("next_batch").at("epoch").get<int64_t>();
        s.next_batch.batch = j.at("next_batch").at("batch").get<int64_t>();
        s.results = j.at("results");
        for (const auto& [name, v] : j.at("rngs").items())
            s.rngs[name] = {v.at(0).get<uint64_t>(), v.at(1).get<uint64_t>()};
    } catch (const nlohmann::json::exception& e) {
        throw Error(cat(where, ": ", e.what()));
    }
    HFQ_CHECK(s.stage_step >= 0 && s.global_step >= s.stage_step && s.next_batch.epoch >= 0 && s.next_batch.batch >= 0,
              where, ": inconsistent step counts");
    HFQ_CHECK(s.ranks >= 1, where, ": 'ranks' must be at least 1, got ", s.ranks);
    HFQ_CHECK(s.results.is_object(), where, ": 'results' must be an object");
    return s;
}

void save_training_checkpoint(const std::string& path, Model& model, const NamedOptimizers& optimizers,
                              TrainState state, const TrainConfig& config, const quant::QuantPolicy& policy,
                              const Preprocessing& preprocessing) {
    state.rngs.clear();
    for (const auto& [name, rng] : model.named_rngs()) state.rngs[name] = {rng->state(), rng->stream()};

    std::vector<std::pair<std::string, Tensor>> tensors = model.state_dict();
    for (const auto& [role, optimizer] : optimizers)
        for (auto& [name, t] : optimizer->state()) tensors.emplace_back(cat(kOptimizerPrefix, role, "/", name), t);

    std::map<std::string, std::string> metadata;
    metadata["format"] = "pt";
    metadata[kModelConfigKey] = model.config().to_json();
    metadata[kPreprocessingKey] = preprocessing.to_json();
    if (quant::is_quantized(model)) metadata[quant::kQuantPolicyKey] = policy.to_json();
    metadata[kTrainConfigKey] = config.to_json();
    metadata[kTrainStateKey] = state.to_json();
    write_safetensors(path, tensors, metadata);
}

TrainingCheckpoint read_training_checkpoint(const std::string& path) {
    TrainingCheckpoint c;
    c.file = read_safetensors(path);
    auto meta = [&](const char* key) -> const std::string& {
        auto it = c.file.metadata.find(key);
        HFQ_CHECK(it != c.file.metadata.end(), path, ": not a training checkpoint (no '", key, "' metadata)");
        return it->second;
    };
    c.config.apply_json(meta(kTrainConfigKey), cat(path, ": metadata '", kTrainConfigKey, "'"));
    c.state = TrainState::from_json(meta(kTrainStateKey), path);
    if (c.file.metadata.count(quant::kQuantPolicyKey)) {
        try {
            c.policy = quant::QuantPolicy::from_json(c.file.metadata.at(quant::kQuantPolicyKey));
        } catch (const Error& e) {
            throw Error(cat(path, ": metadata '", quant::kQuantPolicyKey, "': ", e.what()));
        }
    }
    const bool quantized = c.state.stage == Stage::qat || (c.state.stage == Stage::done && c.config.qat());
    HFQ_CHECK(c.policy.has_value() == quantized, path, ": the quantization policy does not match the stage '",
              stage_name(c.state.stage), "'");
    return c;
}

SafetensorsFile model_tensors(const SafetensorsFile& file) {
    SafetensorsFile out;
    out.source = file.source;
    out.metadata = file.metadata;
    for (const auto& [name, t] : file.tensors)
        if (name.rfind(kOptimizerPrefix, 0) != 0) out.tensors.emplace_back(name, t);
    return out;
}

void restore_model(const TrainingCheckpoint& c, Model& model) {
    const auto rngs = model.named_rngs();
    for (const auto& [name, rng] : rngs)
        HFQ_CHECK(c.state.rngs.count(name), c.file.source, ": no random generator state for module '", name, "'");
    HFQ_CHECK(c.state.rngs.size() == rngs.size(), c.file.source, ": random generator states for ", c.state.rngs.size(),
              " modules, the model has ", rngs.size());
    load_state_dict(model, model_tensors(c.file));
    for (const auto& [name, rng] : rngs) {
        const auto [state, stream] = c.state.rngs.at(name);
        *rng = Rng::restore(state, stream);
    }
    if (quant::is_quantized(model)) quant::reset_diagnostics(model);
}

void restore_optimizers(const TrainingCheckpoint& c, const NamedOptimizers& optimizers) {
    std::map<std::string, std::vector<std::pair<std::string, Tensor>>> by_role;
    for (const auto& [name, t] : c.file.tensors) {
        if (name.rfind(kOptimizerPrefix, 0) != 0) continue;
        const std::string rest = name.substr(std::string(kOptimizerPrefix).size());
        const size_t slash = rest.find('/');
        HFQ_CHECK(slash != std::string::npos, c.file.source, ": malformed optimizer tensor name '", name, "'");
        by_role[rest.substr(0, slash)].emplace_back(rest.substr(slash + 1), t);
    }
    for (const auto& [role, optimizer] : optimizers) {
        auto it = by_role.find(role);
        try {
            optimizer->load_state(it == by_role.end() ? std::vector<std::pair<std::string, Tensor>>{} : it->second);
        } catch (const Error& e) {
            throw Error(cat(c.file.source, ": optimizer '", role, "': ", e.what()));
        }
        if (it != by_role.end()) by_role.erase(it);
    }
    HFQ_CHECK(by_role.empty(), c.file.source, ": state of an unknown optimizer '",
              by_role.empty() ? "" : by_role.begin()->first, "'");
}

}  // namespace hfq
