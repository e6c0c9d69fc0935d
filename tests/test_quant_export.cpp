// Export of a trained quantized model and its audit: the file's layout, the
// model rebuilt from the export alone, bit-exact weights, layer outputs equal
// up to the rounding of the accumulation, and an audit that notices tampering.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/ops.h"
#include "layers/checkpoint.h"
#include "layers/optimizer.h"
#include "quant/audit.h"
#include "quant/diagnostics_table.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "tests/gradcheck.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::error_message;
using hfq::testing::random_tensor;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / ("hfq_test_export_" + name)).string();
}

ModelConfig small_config(Arch arch) {
    ModelConfig c;
    c.arch = arch;
    c.width = 0.25;
    c.classes = 5;
    c.small_input = true;
    c.dropout = 0.0;
    return c;
}

// A quantized model after a few SGD steps on a fixed batch (batch statistics
// and moving statistics both move, exponents settle).
std::shared_ptr<Model> trained_model(Arch arch, const QuantPolicy& policy, int steps = 3) {
    auto model = build_model(small_config(arch), 21);
    quantize_model(*model, policy);
    // The quantizers' scales train slower (as a trainer would set them up).
    const auto params = model->named_parameters();
    SGD opt(select_params(params, {ParamGroup::weight, ParamGroup::bias, ParamGroup::bn}), SgdOptions{0.02f, 0.9f});
    SGD opt_scales(select_params(params, {ParamGroup::quantizer}), SgdOptions{1e-3f});
    const Tensor x = random_tensor({4, 16, 16, 3}, 22);
    model->train();
    for (int s = 0; s < steps; ++s) {
        opt.zero_grad();
        opt_scales.zero_grad();
        Variable loss = cross_entropy((*model)(Variable(x)), {0, 1, 2, 3});
        loss.backward();
        opt.step();
        opt_scales.step();
    }
    return model;
}

}  // namespace

TEST_CASE("export then audit round-trips bit-exactly for every method, folded or not, with activations") {
    struct Case {
        const char* name;
        Arch arch;
        const char* method;
        bool per_channel, fold;
        int activation_bits;
        int64_t freeze_after;
    };
    const Case cases[] = {
        {"v1 msqe-po2 per-channel folded", Arch::mobilenet_v1, "msqe-po2", true, true, 0, -1},
        {"v2 learnable-po2 folded, activations, frozen after 2", Arch::mobilenet_v2, "learnable-po2", false, true, 8, 2},
        {"v1 lsq per-channel folded", Arch::mobilenet_v1, "lsq", true, true, 0, -1},
        {"v1 msqe-baseline, batch norm not folded", Arch::mobilenet_v1, "msqe-baseline", false, false, 0, -1},
    };
    for (const Case& c : cases) {
        INFO(std::string(c.name));
        QuantPolicy p;
        p.method = c.method;
        p.options.per_channel = c.per_channel;
        p.fold_batch_norm = c.fold;
        p.activation_bits = c.activation_bits;
        p.freeze_bn_after_steps = c.freeze_after;
        auto model = trained_model(c.arch, p);
        const std::string path = temp_path("model.safetensors");
        export_quantized_model(path, *model, p);
        const Tensor sample = random_tensor({6, 16, 16, 3}, 23);
        const AuditReport r = audit_export(*model, path, sample);
        INFO(r.to_string());
        CHECK(r.passed());
        CHECK(r.layers.size() == quantized_layers(*model).size());
        CHECK(r.weight_mismatches() == 0);
        CHECK(r.max_rel_diff() < 1e-5);
        CHECK(r.top1_agreement == 1.0);
        CHECK(r.logits_rel_diff < 1e-5);
        CHECK(model->is_training());  // the audit restores the mode
        if (c.activation_bits) CHECK(r.activations == int64_t(quantized_activations(*model).size()));

        // The file's layout.
        const SafetensorsFile f = read_safetensors(path);
        const std::string first = "features.0.0";
        const Tensor& q = f.get(first + ".q");
        CHECK(q.dtype() == DType::s8);
        CHECK(q.shape() == Shape{8, 3, 3, 3});
        int max_code = 0;
        for (int64_t i = 0; i < q.numel(); ++i) max_code = std::max(max_code, std::abs(int(q.data<int8_t>()[i])));
        CHECK(max_code <= 127);  // first layer: 8 bits
        CHECK(max_code > 7);
        const bool po2 = std::string(c.method) != "lsq";
        const Tensor& scale = f.get(first + (po2 ? ".exp" : ".scale"));
        CHECK(scale.dtype() == (po2 ? DType::s32 : DType::f32));
        CHECK(scale.numel() == (c.per_channel ? 8 : 1));
        CHECK(f.get(first + ".bias").shape() == Shape{8});
        const std::string mid = quantized_layers(*model)[3].name;
        for (int64_t i = 0; i < f.get(mid + ".q").numel(); ++i) CHECK(std::abs(int(f.get(mid + ".q").data<int8_t>()[i])) <= 7);
        CHECK(f.has("features.0.1.running_mean") == !c.fold);  // float batch norms only when not folded
        CHECK(!f.has(first + ".weight"));
        CHECK(!f.has(first + ".weight_quantizer.step"));
        CHECK(ModelConfig::from_json(f.metadata.at(kModelConfigKey)).to_json() == model->config().to_json());
        CHECK(QuantPolicy::from_json(f.metadata.at(kQuantPolicyKey)).to_json() == p.to_json());
        const auto meta = nlohmann::json::parse(f.metadata.at(kExportKey));
        CHECK(meta["format"] == kExportFormat);
        CHECK(meta["layers"][0]["name"] == first);
        CHECK(meta["layers"][0]["batch_norm"] == (c.fold ? nlohmann::json("features.0.1") : nlohmann::json(nullptr)));
        std::remove(path.c_str());
    }
}

TEST_CASE("a folded layer's export: codes * 2^exp + bias reproduce conv then batch norm's folded form") {
    QuantPolicy p;
    p.options.per_channel = true;
    auto model = trained_model(Arch::mobilenet_v1, p, 2);
    const std::string path = temp_path("folded.safetensors");
    export_quantized_model(path, *model, p);
    const SafetensorsFile f = read_safetensors(path);
    // By hand for the stem: W_fold = W gamma / sqrt(var + eps), Q at the exported exponent.
    Module& conv = model->find("features.0");
    Tensor w, gamma, beta, mean, var;
    for (const auto& [n, t] : conv.state_dict()) {
        if (n == "0.weight") w = t;
        if (n == "1.weight") gamma = t;
        if (n == "1.bias") beta = t;
        if (n == "1.running_mean") mean = t;
        if (n == "1.running_var") var = t;
    }
    REQUIRE(w.defined());
    const Tensor& codes = f.get("features.0.0.q");
    const Tensor& exp = f.get("features.0.0.exp");
    const Tensor& bias = f.get("features.0.0.bias");
    for (int c = 0; c < 8; ++c) {
        const double inv_sigma = 1.0 / std::sqrt(double(var.f32()[c]) + 1e-5f);
        const float factor = float(gamma.f32()[c] * inv_sigma);
        const float s = std::ldexp(1.0f, exp.data<int32_t>()[c]);
        for (int i = 0; i < 27; ++i) {
            const float wf = w.f32()[c * 27 + i] * factor;
            const float code = std::min(127.0f, std::max(-127.0f, std::nearbyint(wf / s)));
            CHECK(float(codes.data<int8_t>()[c * 27 + i]) == code);
        }
        CHECK(bias.f32()[c] == float(beta.f32()[c] - double(gamma.f32()[c]) * mean.f32()[c] * inv_sigma));
    }
    std::remove(path.c_str());
}

TEST_CASE("the audit notices a changed code, exponent or bias; bad exports are clear errors") {
    QuantPolicy p;
    auto model = trained_model(Arch::mobilenet_v1, p, 2);
    const std::string path = temp_path("tamper.safetensors");
    export_quantized_model(path, *model, p);
    SafetensorsFile f = read_safetensors(path);
    auto rewrite = [&](const std::string& name, auto edit) {
        std::vector<std::pair<std::string, Tensor>> tensors;
        for (const auto& [n, t] : f.tensors) {
            Tensor c = t.clone();
            if (n == name) edit(c);
            tensors.emplace_back(n, c);
        }
        const std::string out = temp_path("tampered.safetensors");
        write_safetensors(out, tensors, f.metadata);
        return out;
    };
    const std::string mid = quantized_layers(*model)[4].name;
    std::string bad = rewrite(mid + ".q", [](Tensor& t) { t.data<int8_t>()[3] = int8_t(t.data<int8_t>()[3] == 5 ? 4 : 5); });
    AuditReport r = audit_export(*model, bad);
    CHECK(!r.passed());
    CHECK(r.weight_mismatches() == 1);
    CHECK(r.max_rel_diff() > 1e-4);
    bad = rewrite(mid + ".exp", [](Tensor& t) { t.data<int32_t>()[0] += 1; });
    r = audit_export(*model, bad);
    CHECK(!r.passed());
    CHECK(r.weight_mismatches() > 0);
    bad = rewrite(mid + ".bias", [](Tensor& t) { t.f32()[0] = std::nextafter(t.f32()[0], 1e9f); });
    r = audit_export(*model, bad);
    CHECK(!r.passed());
    CHECK(r.weight_mismatches() == 0);
    CHECK(contains(r.to_string(), "DIFF"));
    CHECK(contains(r.to_string(), "FAILED"));
    std::remove(bad.c_str());

    // Errors that name the problem.
    auto plain = build_model(small_config(Arch::mobilenet_v1), 1);
    CHECK(contains(error_message([&] { export_quantized_model(path, *plain, p); }), "not quantized"));
    const std::string ckpt = temp_path("ckpt.safetensors");
    save_checkpoint(ckpt, *plain);
    CHECK(contains(error_message([&] { build_model_from_export(ckpt); }), "not an hfq export"));
    CHECK(contains(error_message([&] { build_model_from_export(ckpt); }), ckpt));
    std::remove(ckpt.c_str());
    std::remove(path.c_str());
}

TEST_CASE("diagnostics: per-layer table and JSON") {
    QuantPolicy p;
    p.method = "learnable-po2";
    p.options.per_channel = true;
    p.activation_bits = 8;
    auto model = build_model(small_config(Arch::mobilenet_v1), 21);
    quantize_model(*model, p);
    // Before any training: nothing measured yet.
    auto rows = collect_diagnostics(*model);
    CHECK(rows.size() == 28 + 27);
    CHECK(std::isnan(rows[0].report.error_per_element));
    CHECK(diagnostics_json(rows)[0]["error_per_element"].is_null());
    model = trained_model(Arch::mobilenet_v1, p, 2);
    rows = collect_diagnostics(*model);
    const LayerDiagnostics& first = rows[0];
    CHECK(first.name == "features.0.0");
    CHECK(first.kind == "conv+bn (folded)");
    CHECK(first.bits == 8);
    CHECK(first.per_channel);
    CHECK(first.report.step == 2);
    CHECK(first.report.exponents.size() == 8);
    CHECK(first.report.continuous_exponents.size() == 8);
    CHECK(first.report.error_per_element > 0);
    CHECK(first.report.codes_changed_fraction >= 0);
    CHECK(rows.back().kind == "activation");
    const std::string table = diagnostics_table(rows);
    CHECK(contains(table, "layer"));
    CHECK(contains(table, "features.0.0"));
    CHECK(contains(table, "conv+bn (folded)"));
    CHECK(contains(table, "classifier"));
    const auto mm = std::minmax_element(first.report.exponents.begin(), first.report.exponents.end());
    CHECK(contains(table, std::to_string(*mm.first) + (*mm.first == *mm.second ? "" : ".." + std::to_string(*mm.second))));
    const nlohmann::json j = diagnostics_json(rows);
    CHECK(j.size() == rows.size());
    CHECK(j[0]["name"] == "features.0.0");
    CHECK(j[0]["exponents"].size() == 8);
    CHECK(j[0]["error_per_element"].get<double>() == first.report.error_per_element);
    // report() resets the flip counts.
    for (const LayerDiagnostics& r : collect_diagnostics(*model)) CHECK(r.report.flips == 0);
}
