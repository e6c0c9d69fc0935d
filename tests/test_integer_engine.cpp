// The integer engine (deploy/integer_engine.h) against the fake-quant graph
// it was exported from: on every image, the codes at every layer boundary and
// the logits are the same numbers (the claim is exactness, so there is no
// tolerance: both sides compute exact integer sums, whatever the thread count
// or oneDNN's kernels). Also the rounding division, W4A8 training's own
// pieces (bias codes, signed quantizers, the accumulator bound) and the
// errors for exports the engine must refuse.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "deploy/integer_engine.h"
#include "engine/ops.h"
#include "layers/activation.h"
#include "layers/mobilenet_v2.h"
#include "quant/accumulator.h"
#include "quant/activation_quantizer.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "quant/quantized_layers.h"
#include "tests/gradcheck.h"
#include "tests/test_model_util.h"
#include "tests/test_quant_util.h"
#include "tests/test_train_util.h"
#include "train/datasets.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::deploy::IntegerEngine;
using hfq::testing::error_message;
using hfq::testing::random_tensor;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / ("hfq_test_int_" + std::to_string(::getpid()) + "_" + name))
        .string();
}

QuantPolicy w4a8_policy(const std::string& method = "msqe-po2", bool per_channel = true) {
    QuantPolicy p;
    p.method = method;
    p.options.per_channel = per_channel;
    p.activation_bits = 8;
    p.freeze_bn_step = 3;  // the last steps train the graph the engine runs
    return p;
}

// A small W4A8 model after a few SGD steps on a fixed batch. With
// dead_channel, the first depthwise layer's channel 0 has zero weights, as
// zero_dead_channels leaves a channel that never sees input (its output is
// its bias alone).
std::shared_ptr<Model> trained_model(Arch arch, const QuantPolicy& policy, int steps = 5, bool dead_channel = false) {
    auto model = build_model(hfq::testing::small_model_config(arch), 31);
    quantize_model(*model, policy);
    hfq::testing::train_steps(*model, random_tensor({4, 16, 16, 3}, 32), steps);
    if (dead_channel) {
        // Zeroed, with the exponent msqe-po2 gives zeros when it starts on
        // them (round(log2(0 + 1e-7)) = -23), as in a real run whose dead
        // channel got 2^-23 and a bias code of 2.4e8: far beyond 2^24.
        for (const NamedParameter& p : model->named_parameters())
            if (p.name == "features.1.0.weight") {  // {C, 1, 3, 3}
                Variable v = p.var;
                std::fill_n(v.value().f32(), v.value().numel() / v.value().dim(0), 0.0f);
            }
        hfq::testing::edit_state(*quantized_layers(*model)[1].quantizer, [](const std::string& name, Tensor& t) {
            if (name == "exponent") t.data<int32_t>()[0] = -23;
        });
    }
    model->eval();
    return model;
}

// The fake-quant evaluation of `images`: logits, and every activation
// quantizer's output by site name.
struct FakeQuantRun {
    Tensor logits;
    std::map<std::string, Tensor> boundaries;
};
FakeQuantRun fake_quant(Model& model, const Tensor& images) {
    FakeQuantRun r;
    const auto sites = quantized_activations(model);
    for (const QuantizedActivationSite& s : sites)
        s.quantizer->set_observer([&r, name = s.name](const Tensor& y) { r.boundaries[name] = y.clone(); });
    NoGradGuard no_grad;
    r.logits = model(Variable(images)).value();
    for (const QuantizedActivationSite& s : sites) s.quantizer->set_observer(nullptr);
    return r;
}

std::string rewritten(const std::string& path, const std::string& name, const std::function<void(Tensor&)>& edit) {
    const SafetensorsFile f = read_safetensors(path);
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [n, t] : f.tensors) {
        Tensor c = t.clone();
        if (n == name) edit(c);
        if (n == name && !c.defined()) continue;  // edit dropped it
        tensors.emplace_back(n, c);
    }
    const std::string out = temp_path("tampered.safetensors");
    write_safetensors(out, tensors, f.metadata);
    return out;
}

// Every element the same number (the float side's code 0 may be -0.0: the
// rint of a small negative value); the first difference named.
void check_same_values(const std::string& what, const Tensor& a, const Tensor& b) {
    REQUIRE_MESSAGE(a.shape() == b.shape(), what, ": ", shape_str(a.shape()), " vs ", shape_str(b.shape()));
    int64_t differ = 0, first = -1;
    for (int64_t i = 0; i < a.numel(); ++i)
        if (!(a.f32()[i] == b.f32()[i])) differ += 1, first = first < 0 ? i : first;
    CHECK_MESSAGE(differ == 0, what, ": ", differ, " of ", a.numel(), " values differ, the first at ", first, ": ",
                  first < 0 ? 0.0f : a.f32()[first], " vs ", first < 0 ? 0.0f : b.f32()[first]);
}

}  // namespace

TEST_CASE("divide_round_half_even is the exact quotient rounded half to even") {
    using hfq::deploy::divide_round_half_even;
    CHECK(divide_round_half_even(5, 2) == 2);
    CHECK(divide_round_half_even(7, 2) == 4);
    CHECK(divide_round_half_even(-5, 2) == -2);
    CHECK(divide_round_half_even(-7, 2) == -4);
    CHECK(divide_round_half_even(-1, 3) == 0);
    CHECK(divide_round_half_even(-2, 3) == -1);
    // Every numerator and small divisor against rint of the (exact) double quotient.
    for (int64_t d = 1; d <= 64; ++d)
        for (int64_t n = -300; n <= 300; ++n)
            REQUIRE_MESSAGE(divide_round_half_even(n, d) == int64_t(std::nearbyint(double(n) / double(d))), n, " / ",
                            d);
    // The shift is the same rounding by powers of two, and a left shift for s <= 0.
    for (int s = -3; s <= 12; ++s)
        for (int64_t n = -5000; n <= 5000; ++n)
            REQUIRE_MESSAGE(hfq::deploy::shift_round_half_even(n, s) == int64_t(std::nearbyint(std::ldexp(double(n), -s))),
                            n, " >> ", s);
}

TEST_CASE("bias codes: rint at the accumulator scale, clamped to int32; quantize_bias passes the gradient") {
    CHECK(bias_code(0.375f, -3) == 3);   // 3.0
    CHECK(bias_code(0.3125f, -3) == 2);  // 2.5 -> even
    CHECK(bias_code(0.4375f, -3) == 4);  // 3.5 -> even
    CHECK(bias_code(-0.3125f, -3) == -2);
    CHECK(bias_code(1e30f, -3) == 2147483647);
    CHECK(bias_code(-1e30f, -3) == -2147483647);
    CHECK(contains(error_message([] { bias_code(std::nanf(""), 0); }), "bias"));
    Variable b(Tensor::from_vector({2}, {0.3125f, -1.0f}), true);
    Variable y = quantize_bias(b, {-3, -1});
    CHECK(y.value().f32()[0] == 0.25f);
    CHECK(y.value().f32()[1] == -1.0f);
    sum(y).backward();
    CHECK(b.grad().f32()[0] == 1.0f);
    CHECK(b.grad().f32()[1] == 1.0f);
}

TEST_CASE("exact_global_mean: the mean of exact sums, its backward against finite differences") {
    const Tensor x = random_tensor({2, 7, 7, 3}, 5);
    const Tensor y = exact_global_mean(Variable(x)).value();
    for (int64_t n = 0; n < 2; ++n)
        for (int64_t c = 0; c < 3; ++c) {
            double s = 0;
            for (int64_t k = 0; k < 49; ++k) s += x.f32()[(n * 49 + k) * 3 + c];
            CHECK(y.f32()[n * 3 + c] == float(s / 49));  // the same double sum in the same order
        }
    hfq::testing::check_gradients([](const std::vector<Variable>& in) { return exact_global_mean(in[0]); }, {x});
}

TEST_CASE("a signed activation quantizer keeps negative values: clip(rint(x / 2^k), -127, 127) 2^k") {
    ActivationQuantizer q(8, ExponentRounding::rint, 1e-5f, /*is_signed=*/true);
    const Tensor x = random_tensor({2, 4, 4, 3}, 6, 3.0f);
    const Tensor y = q(Variable(x)).value();
    const float s = std::ldexp(1.0f, q.exponent());
    int negatives = 0;
    for (int64_t i = 0; i < x.numel(); ++i) {
        CHECK(y.f32()[i] == s * std::clamp(std::nearbyint(x.f32()[i] / s), -127.0f, 127.0f));
        negatives += y.f32()[i] < 0;
    }
    CHECK(negatives > 0);
    CHECK(q.last_forward_exponent() == q.exponent());
}

TEST_CASE("a W4A8 model puts every tensor that enters a layer on a grid, signed where it can be negative") {
    auto model = build_model(ModelConfig{.arch = Arch::mobilenet_v2, .width = 0.25, .classes = 5, .small_input = true},
                             1);
    int blocks = 0, residuals = 0, relu6s = 0;
    for (auto& [name, m] : model->named_modules()) {
        if (auto* b = dynamic_cast<InvertedResidual*>(m)) blocks += 1, residuals += b->uses_residual();
        relu6s += dynamic_cast<ReLU6*>(m) != nullptr;
    }
    CHECK(blocks == 17);
    quantize_model(*model, w4a8_policy());
    std::map<std::string, int> sites;
    for (const QuantizedActivationSite& s : quantized_activations(*model)) {
        sites[s.site] += 1;
        CHECK_MESSAGE(s.quantizer->grid().is_signed == (s.site != "activation"), s.name);
    }
    CHECK(sites["input"] == 1);                // the image
    CHECK(sites["output"] == blocks);          // every block's linear bottleneck
    CHECK(sites["sum"] == residuals);          // the blocks with a residual sum
    CHECK(sites["activation"] == relu6s + 1);  // and the pooling
    for (const QuantizedLayer& l : quantized_layers(*model))
        CHECK_MESSAGE(l.module->input_grid() != nullptr, l.name);
    // Not for lsq (no power-of-two scale) nor unfolded batch norm.
    QuantPolicy lsq = w4a8_policy("lsq");
    CHECK(contains(error_message([&] { lsq.validate(); }), "power-of-two"));
    QuantPolicy unfolded = w4a8_policy();
    unfolded.fold_bn = false;
    CHECK(contains(error_message([&] { unfolded.validate(); }), "fold_bn"));
    // 8-bit weights everywhere: V1's last 1x1 layer, 1024 inputs, could sum
    // 1024 x 255 x 127 > 2^24 units: refused.
    auto wide = build_model(ModelConfig{.arch = Arch::mobilenet_v1, .width = 1.0, .classes = 5, .small_input = true},
                            1);
    QuantPolicy eight = w4a8_policy();
    eight.options.bits = 8;
    CHECK(contains(error_message([&] { quantize_model(*wide, eight); }), "does not hold exactly"));
}

TEST_CASE("the integer engine equals the fake-quant evaluation exactly: every boundary's codes and the logits") {
    struct Case {
        const char* name;
        Arch arch;
        QuantPolicy policy;
        bool dead_channel = false;
    };
    const Case cases[] = {
        {"v1 msqe-po2 per channel", Arch::mobilenet_v1, w4a8_policy()},
        {"v1 msqe-po2 per channel, a dead channel", Arch::mobilenet_v1, w4a8_policy(), true},
        {"v2 msqe-po2 per channel", Arch::mobilenet_v2, w4a8_policy()},
        {"v2 learnable-po2 per tensor", Arch::mobilenet_v2, w4a8_policy("learnable-po2", false)},
    };
    for (const Case& c : cases) {
        INFO(c.name);
        auto model = trained_model(c.arch, c.policy, 5, c.dead_channel);
        const std::string path = temp_path("w4a8.safetensors");
        export_quantized_model(path, *model, c.policy);
        const IntegerEngine engine(path);
        if (c.dead_channel) {  // its exponent was raised to keep the bias code small (quant/accumulator.h)
            const int chosen = quantized_layers(*model)[1].quantizer->exponents_of_last_pass()[0];
            const int stored = read_safetensors(path).get("features.1.0.exp").data<int32_t>()[0];
            CHECK(stored > chosen);
        }
        const Tensor images = random_tensor({8, 16, 16, 3}, 33);
        const FakeQuantRun expected = fake_quant(*model, images);
        const IntegerEngine::Result got = engine.run(images, /*keep_boundaries=*/true);

        CHECK(got.boundaries.size() == quantized_activations(*model).size());
        for (size_t i = 0; i < got.boundaries.size(); ++i) {
            const deploy::CodeTensor& codes = got.boundaries[i];
            const auto it = expected.boundaries.find(got.boundary_names[i]);
            REQUIRE_MESSAGE(it != expected.boundaries.end(), got.boundary_names[i]);
            Tensor values = Tensor::empty(codes.shape);
            for (size_t k = 0; k < codes.codes.size(); ++k)
                values.f32()[k] = std::ldexp(float(codes.codes[k]), codes.exponent);
            check_same_values(got.boundary_names[i], values, it->second);
        }
        check_same_values("logits", got.float_logits(), expected.logits);

        // The check can fail: one bias code of the classifier off by one
        // moves that class's logit by 2^u on every image.
        const std::string classifier = quantized_layers(*model).back().name;
        const IntegerEngine tampered(
            rewritten(path, classifier + ".bias_code", [](Tensor& t) { t.data<int32_t>()[0] += 1; }));
        const Tensor off = tampered.run(images).float_logits();
        for (int64_t n = 0; n < off.dim(0); ++n) CHECK(off.f32()[n * off.dim(1)] != expected.logits.f32()[n * off.dim(1)]);
        std::remove(path.c_str());
        std::remove(temp_path("tampered.safetensors").c_str());
    }
}

TEST_CASE("the export proves the accumulator bound and the integer engine refuses what it cannot run") {
    auto model = trained_model(Arch::mobilenet_v1, w4a8_policy(), 2);
    const std::string path = temp_path("refuse.safetensors");
    export_quantized_model(path, *model, w4a8_policy());
    const SafetensorsFile f = read_safetensors(path);
    const nlohmann::json meta = nlohmann::json::parse(f.metadata.at(kExportKey));
    CHECK(meta["format"] == "hfq-integer-2");
    for (const nlohmann::json& l : meta["layers"]) {
        INFO(l.dump());
        REQUIRE(l["accumulator_bound"].is_number());
        CHECK(l["accumulator_bound"].get<double>() < (l["op"] == "conv" ? 16777216.0 : 2147483647.0));
        CHECK(l["input_grid"].is_string());
    }
    const std::string first = quantized_layers(*model).front().name;
    // A code outside its 8-bit grid, a missing exponent, a shape the network does not have.
    CHECK(contains(error_message([&] {
                       IntegerEngine(rewritten(path, first + ".q", [](Tensor& t) { t.data<int8_t>()[0] = -128; }));
                   }),
                   "'" + first + ".q' holds the code -128"));
    CHECK(contains(error_message([&] { IntegerEngine(rewritten(path, first + ".exp", [](Tensor& t) { t = Tensor(); })); }),
                   first + ".exp"));
    CHECK(contains(error_message([&] {
                       IntegerEngine(rewritten(path, first + ".q", [](Tensor& t) {
                           t = Tensor::zeros({t.dim(0), t.dim(1), 1, 1}, DType::s8);
                       }));
                   }),
                   "has the shape"));
    // Another format version.
    SafetensorsFile other = f;
    nlohmann::json m2 = meta;
    m2["format"] = "hfq-integer-9";
    other.metadata[kExportKey] = m2.dump();
    const std::string other_path = temp_path("other.safetensors");
    write_safetensors(other_path, other.tensors, other.metadata);
    CHECK(contains(error_message([&] { IntegerEngine{other_path}; }), "export format 'hfq-integer-9'"));
    // A weight-only export.
    auto weight_only = trained_model(Arch::mobilenet_v1, QuantPolicy{}, 1);
    const std::string wo_path = temp_path("weight_only.safetensors");
    export_quantized_model(wo_path, *weight_only, QuantPolicy{});
    CHECK(contains(error_message([&] { IntegerEngine{wo_path}; }), "W4A8"));
    for (const std::string& p : {path, other_path, wo_path, temp_path("tampered.safetensors")}) std::remove(p.c_str());
}

TEST_CASE("explain_integer: one output value worked through, equal to the engine's code; bad choices are errors") {
    const std::string exe = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "explain_integer").string();
    REQUIRE_MESSAGE(std::filesystem::exists(exe), exe, " is not built");
    test::TempDir dir;
    test::make_image_folder(dir / "images");
    auto model = trained_model(Arch::mobilenet_v2, w4a8_policy(), 2);
    const std::string path = dir / "export.safetensors";
    export_quantized_model(path, *model, w4a8_policy());
    const auto run = [&](const std::string& args) {
        FILE* p = ::popen((exe + " '" + path + "' --data '" + (dir / "images") + "' " + args + " 2>&1").c_str(), "r");
        REQUIRE(p);
        std::string out;
        char buf[256];
        while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
        const int status = ::pclose(p);
        return std::pair<std::string, int>{out, WEXITSTATUS(status)};
    };
    // The engine's own codes after layer `layer` for test image 1, as the program loads it.
    TrainConfig config;
    config.data = dir / "images";
    const TrainData sets = open_datasets(config);
    Shape shape{1};
    for (int64_t d : sets.test->sample_shape()) shape.push_back(d);
    Tensor pixels = Tensor::empty(shape);
    Rng unused;
    sets.test->load(1, unused, pixels.f32());
    const IntegerEngine engine(path);
    const IntegerEngine::Result r = engine.run(pixels, /*keep_boundaries=*/true);
    const std::string layer = quantized_layers(*model)[2].name;  // a pointwise convolution
    const deploy::CodeTensor* next = nullptr;
    for (const deploy::CodeTensor& c : r.boundaries)
        if (c.producer == layer) next = &c;
    REQUIRE(next);
    const int64_t channel = 3, y = 1, x = 2;
    const int want = next->codes[size_t((y * next->shape[2] + x) * next->shape[3] + channel)];

    const auto [out, status] = run(cat("--layer ", layer, " --channel ", channel, " --y ", y, " --x ", x, " --image 1"));
    INFO(out);
    CHECK(status == 0);
    CHECK(contains(out, cat("layer ", layer, ", output channel 3 at (1, 2) of test image 1")));
    CHECK(contains(out, cat(" -> code ", want, " (value")));
    CHECK(contains(out, cat("the integer engine's code: ", want, " (equal)")));
    // The classifier: its logit, as the engine's float logits give it.
    const std::string classifier = quantized_layers(*model).back().name;
    const auto [logit_out, logit_status] = run(cat("--layer ", classifier, " --channel 4 --image 1"));
    INFO(logit_out);
    CHECK(logit_status == 0);
    CHECK(contains(logit_out, cat(" = ", cat(std::setprecision(9), r.float_logits().f32()[4]), "\n")));

    const auto [no_layer, no_layer_status] = run("--layer features.99");
    CHECK(no_layer_status == 1);
    CHECK(contains(no_layer, path + ": no layer 'features.99'"));
    const auto [far, far_status] = run(cat("--layer ", layer, " --channel 100000"));
    CHECK(far_status == 1);
    CHECK(contains(far, "--channel 100000 is outside the layer's"));
    const auto [image, image_status] = run(cat("--layer ", layer, " --image 18"));
    CHECK(image_status == 1);
    CHECK(contains(image, "--image 18 is outside the 18 test images"));
}
