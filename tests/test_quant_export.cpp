// Export of a trained quantized model and its audit: the file's layout, the
// model rebuilt from the export alone, bit-exact weights, layer outputs equal
// up to the rounding of the accumulation, and an audit that notices tampering.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "engine/ops.h"
#include "layers/activation.h"
#include "layers/batch_norm.h"
#include "layers/checkpoint.h"
#include "layers/pooling.h"
#include "layers/sequential.h"
#include "quant/audit.h"
#include "quant/diagnostics_table.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "quant/quantized_layers.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"
#include "tests/test_model_util.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::abs_of;
using hfq::testing::error_message;
using hfq::testing::gamma_n;
using hfq::testing::random_tensor;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// Named per process: ctest runs this test's thread and ISA variants at once.
std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / ("hfq_test_export_" + std::to_string(::getpid()) + "_" + name))
        .string();
}

// A quantized model after a few SGD steps on a fixed batch (batch statistics
// and moving statistics both move, exponents settle).
std::shared_ptr<Model> trained_model(Arch arch, const QuantPolicy& policy, int steps = 3) {
    auto model = build_model(hfq::testing::small_model_config(arch), 21);
    quantize_model(*model, policy);
    hfq::testing::train_steps(*model, random_tensor({4, 16, 16, 3}, 22), steps);
    return model;
}

// A copy of the export with the tensor `name` edited.
template <class Edit>
std::string rewritten(const SafetensorsFile& f, const std::string& name, Edit edit) {
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [n, t] : f.tensors) {
        Tensor c = t.clone();
        if (n == name) edit(c);
        tensors.emplace_back(n, c);
    }
    const std::string out = temp_path("tampered.safetensors");
    write_safetensors(out, tensors, f.metadata);
    return out;
}

// How far the model rebuilt from the export may compute other logits than
// the training graph (evaluation mode) on the same input, for a MobileNetV1
// (a chain of layers), to first order in the roundings. Each step of the
// chain rounds differently on the two sides by at most a local bound:
//  - a quantized layer: the rebuilt model's conv(x, codes, b / s) s and the
//    training graph's conv(x, Q(W), b), each within gamma(n + 3) of the
//    magnitude conv(|x|, |Q(W)|) + |b| (quant/audit.h): 2 gamma(n + 3) of it;
//  - batch norm (not folded), the same op on both sides, each within
//    gamma(6) of its magnitude |s| (|x| + |mean|) + |beta|;
//  - the average pool, H W terms summed and divided: 2 gamma(H W) mean |x|;
//  - ReLU6 is exact.
// A difference d at a step's output reaches logit k as J_k d, J_k the
// derivative of the logit with respect to that output, so the logits differ
// by at most sum over the steps of |J_k| times the local bound. (First order:
// the chain is piecewise linear, and the rare unit within a rounding of
// ReLU6's kinks may clamp on one side only; J_k comes from a float32
// backward, whose own rounding is second order here.) J_k is the gradient of
// a zero probe added to each step's output. A worst-case bound carried
// through |W| instead would grow like the product of the layers' norms (to
// 1e13 times the differences here). The local bounds are magnitudes summed
// in float (bound_from makes up for their roundings).
struct Walk {
    std::map<const Module*, QuantizedLayer> quantized;
    std::vector<Variable> probes;  // one per step, zero, at the step's output
    std::vector<Tensor> local;     // the steps' local bounds
};
Variable walk(Module& m, const Variable& x, Walk& w) {
    auto probe = [&](const Variable& y, const Tensor& local) {
        w.probes.emplace_back(Tensor::zeros(y.shape()), true);
        w.local.push_back(local);
        return add(y, w.probes.back());
    };
    using hfq::testing::bound_from;
    if (auto it = w.quantized.find(&m); it != w.quantized.end()) {
        const QuantizedLayer& l = it->second;
        const LayerTensors t = layer_tensors(l);
        Tensor magnitude;
        {
            NoGradGuard ng;
            const Variable ax(abs_of(x.value())), b(abs_of(t.bias));
            const Variable aw(abs_of(l.quantizer->fake_quantize(Variable(t.weight), false).value()));
            magnitude = t.conv ? conv2d(ax, aw, b, t.conv->config().params).value() : linear(ax, aw, b).value();
        }
        const int64_t n = t.weight.numel() / t.weight.dim(0);  // products per output
        return probe(l.module->forward(x), bound_from(magnitude, 2 * gamma_n(double(n + 3)), n + 1));
    }
    if (dynamic_cast<Sequential*>(&m)) {
        Variable y = x;
        for (const Module::Child& child : m.children()) y = walk(*child.module, y, w);
        return y;
    }
    if (auto* bn = dynamic_cast<BatchNorm2d*>(&m)) {
        const Tensor magnitude = hfq::testing::batch_norm_magnitude(
            x.value(), bn->weight().value(), bn->bias().value(),
            {std::vector<double>(bn->running_mean().f32(), bn->running_mean().f32() + bn->channels()),
             std::vector<double>(bn->running_var().f32(), bn->running_var().f32() + bn->channels())},
            bn->eps());
        return probe(m.forward(x), bound_from(magnitude, 2 * gamma_n(6), 1));
    }
    if (dynamic_cast<ReLU6*>(&m)) return m.forward(x);
    if (dynamic_cast<GlobalAvgPool*>(&m)) {
        Tensor magnitude;
        {
            NoGradGuard ng;
            magnitude = global_avg_pool(Variable(abs_of(x.value()))).value();
        }
        const int64_t hw = x.value().dim(1) * x.value().dim(2);
        return probe(m.forward(x), bound_from(magnitude, 2 * gamma_n(double(hw)), hw));
    }
    FAIL("no rounding bound for ", m.describe());
    return x;
}
Tensor rebuilt_logits_bound(Model& model, const Tensor& input) {
    REQUIRE(model.config().arch == Arch::mobilenet_v1);
    const bool was_training = model.is_training();
    model.eval();
    const int64_t rows = input.dim(0), classes = model.config().classes;
    std::vector<double> bound(size_t(rows * classes), 0.0);
    for (int64_t k = 0; k < classes; ++k) {  // the forward again for each logit's backward
        Walk w;
        for (const QuantizedLayer& l : quantized_layers(model)) w.quantized.emplace(l.module, l);
        Variable y = Variable(input);
        for (const Module::Child& child : model.children()) y = walk(*child.module, y, w);
        if (k == 0) {  // the walk ran the training graph's own layers (probes add zeros): its logits
            NoGradGuard ng;
            CHECK(y.value().to_vector() == model(Variable(input)).value().to_vector());
        }
        Tensor seed = Tensor::zeros(y.shape());
        for (int64_t row = 0; row < rows; ++row) seed.f32()[row * classes + k] = 1;
        y.backward(seed);  // each row's logit depends on its own sample only
        for (size_t s = 0; s < w.probes.size(); ++s) {
            const Tensor& g = w.probes[s].grad();
            const int64_t per_row = g.numel() / rows;
            for (int64_t i = 0; i < g.numel(); ++i)
                bound[size_t((i / per_row) * classes + k)] += std::fabs(g.f32()[i]) * double(w.local[s].f32()[i]);
        }
    }
    model.train(was_training);
    Tensor out = Tensor::empty({rows, classes});
    for (int64_t i = 0; i < out.numel(); ++i) out.f32()[i] = float(bound[size_t(i)]);
    return hfq::testing::bound_from(out, 1.0, 0);  // summed in double, rounded once
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
        {"v2 learnable-po2 folded, activations, frozen after 2", Arch::mobilenet_v2, "learnable-po2", false, true, 8,
         2},
        {"v1 lsq per-channel folded", Arch::mobilenet_v1, "lsq", true, true, 0, -1},
        {"v1 msqe-baseline, batch norm not folded", Arch::mobilenet_v1, "msqe-baseline", false, false, 0, -1},
    };
    for (const Case& c : cases) {
        INFO(std::string(c.name));
        QuantPolicy p;
        p.method = c.method;
        p.options.per_channel = c.per_channel;
        p.fold_bn = c.fold;
        p.activation_bits = c.activation_bits;
        p.freeze_bn_step = c.freeze_after;
        auto model = trained_model(c.arch, p);
        const std::string path = temp_path("model.safetensors");
        export_quantized_model(path, *model, p);
        const Tensor sample = random_tensor({6, 16, 16, 3}, 23);
        const AuditReport r = audit_export(*model, path, sample);
        INFO(r.to_string());
        CHECK(r.passed());
        CHECK(r.layers.size() == quantized_layers(*model).size());
        CHECK(r.weight_mismatches() == 0);
        CHECK(r.max_bound_ratio() <= 1);  // every layer output within its rounding bound (quant/audit.h)
        CHECK(r.top1_agreement == 1.0);
        CHECK(model->is_training());  // the audit restores the mode
        if (c.activation_bits) CHECK(r.activations == int64_t(quantized_activations(*model).size()));
        // The logits. Folded with power-of-two scales, each rebuilt layer runs
        // the same convolution (the same shapes, with a bias) on codes =
        // Q(W) / 2^k and b / 2^k: every partial sum scaled by 2^-k exactly,
        // the same roundings, and the product with 2^k exact; the activation
        // quantizers use the same exponents. So the logits are the same bits.
        // Otherwise (lsq's scales; unfolded layers, whose convolution has no
        // bias in the training graph) they are within the bound carried
        // through the network, and a doubled layer is far outside it.
        if (c.fold && std::string(c.method) != "lsq") {
            CHECK(r.logits_rel_diff == 0);
        } else {
            auto rebuilt = build_model_from_export(path);
            model->eval();
            const Tensor ours = (*rebuilt)(Variable(sample)).value(), theirs = (*model)(Variable(sample)).value();
            const Tensor bound = rebuilt_logits_bound(*model, sample);
            hfq::testing::check_within_bound("logits", ours, theirs, bound);
            const std::string last = quantized_layers(*model).back().name;  // the classifier
            auto doubled = build_model_from_export(rewritten(
                read_safetensors(path), last + (std::string(c.method) == "lsq" ? ".scale" : ".exp"), [&](Tensor& t) {
                    for (int64_t i = 0; i < t.numel(); ++i) {
                        if (t.dtype() == DType::s32)
                            t.data<int32_t>()[i] += 1;
                        else
                            t.f32()[i] *= 2;
                    }
                }));
            hfq::testing::check_far_outside(
                "logits with a layer's scale doubled",
                hfq::testing::worst_bound_ratio((*doubled)(Variable(sample)).value(), theirs, bound));
            model->train();
        }

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
        for (int64_t i = 0; i < f.get(mid + ".q").numel(); ++i)
            CHECK(std::abs(int(f.get(mid + ".q").data<int8_t>()[i])) <= 7);
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
    auto rewrite = [&](const std::string& name, auto edit) { return rewritten(f, name, edit); };
    const std::string mid = quantized_layers(*model)[4].name;
    std::string bad =
        rewrite(mid + ".q", [](Tensor& t) { t.data<int8_t>()[3] = int8_t(t.data<int8_t>()[3] == 5 ? 4 : 5); });
    AuditReport r = audit_export(*model, bad);
    CHECK(!r.passed());
    CHECK(r.weight_mismatches() == 1);
    hfq::testing::check_far_outside("layer outputs with a changed code", r.max_bound_ratio());
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
    auto plain = build_model(hfq::testing::small_model_config(Arch::mobilenet_v1), 1);
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
    auto model = build_model(hfq::testing::small_model_config(Arch::mobilenet_v1), 21);
    quantize_model(*model, p);
    // Before any training: nothing measured yet.
    auto rows = collect_diagnostics(*model);
    CHECK(rows.size() == 28 + 1 + 27 + 1);  // layers; the image, 27 ReLU6 and the pooling
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
    CHECK(contains(table,
                   std::to_string(*mm.first) + (*mm.first == *mm.second ? "" : ".." + std::to_string(*mm.second))));
    const nlohmann::json j = diagnostics_json(rows);
    CHECK(j.size() == rows.size());
    CHECK(j[0]["name"] == "features.0.0");
    CHECK(j[0]["exponents"].size() == 8);
    CHECK(j[0]["error_per_element"].get<double>() == first.report.error_per_element);
    // report() resets the flip counts.
    for (const LayerDiagnostics& r : collect_diagnostics(*model)) CHECK(r.report.flips == 0);
}
