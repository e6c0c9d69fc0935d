// Quantizing a model: which layers are wrapped and how (policy, names,
// parameter groups), the wrappers' computation, checkpoints that restore the
// quantizer state exactly, activation quantization, and thread-count
// determinism of a whole quantized training step.
#include <doctest/doctest.h>

#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>

#include "engine/ops.h"
#include "layers/checkpoint.h"
#include "layers/conv2d.h"
#include "layers/linear.h"
#include "layers/optimizer.h"
#include "quant/activation_quantizer.h"
#include "quant/folded_conv_bn.h"
#include "quant/quantize_model.h"
#include "quant/quantized_layers.h"
#include "tests/gradcheck.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::check_rounded_once;
using hfq::testing::error_message;
using hfq::testing::gamma_double_n;
using hfq::testing::random_tensor;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
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

std::set<std::string> state_names(const Module& m) {
    std::set<std::string> out;
    for (const auto& [name, t] : m.state_dict()) out.insert(name);
    return out;
}

int count_layers(Module& m) {
    int n = 0;
    for (auto& [name, mod] : m.named_modules()) n += dynamic_cast<Conv2d*>(mod) || dynamic_cast<Linear*>(mod);
    return n;
}

// SGD with momentum for the weights, plain SGD with a small rate for the
// quantizers' scales (as a trainer sets them apart).
struct Optimizers {
    SGD weights, scales;
    explicit Optimizers(Model& m)
        : weights(select_params(m.named_parameters(), {ParamGroup::weight, ParamGroup::bias, ParamGroup::bn}),
                  SgdOptions{0.02f, 0.9f}),
          scales(select_params(m.named_parameters(), {ParamGroup::quantizer}), SgdOptions{1e-3f}) {}
};

// One training step on a fixed batch; returns the logits.
Tensor train_step(Model& model, const Tensor& x, const std::vector<int32_t>& labels, Optimizers& opt) {
    model.train();
    opt.weights.zero_grad();
    opt.scales.zero_grad();
    Variable logits = model(Variable(x));
    Variable loss = cross_entropy(logits, labels);
    loss.backward();
    opt.weights.step();
    opt.scales.step();
    return logits.value();
}

Tensor eval_logits(Model& model, const Tensor& x) {
    model.eval();
    NoGradGuard no_grad;
    return model(Variable(x)).value();
}

const std::vector<int32_t> kLabels{0, 1, 2, 3};

}  // namespace

TEST_CASE("quantize_model wraps every conv and linear of MobileNetV1 and V2, names unchanged") {
    for (Arch arch : {Arch::mobilenet_v1, Arch::mobilenet_v2}) {
        auto model = build_model(small_config(arch), 1);
        const int layers = count_layers(*model);
        const std::set<std::string> float_names = state_names(*model);
        quantize_model(*model, QuantPolicy{});
        const auto q = quantized_layers(*model);
        REQUIRE(int(q.size()) == layers);
        CHECK(q.front().name == "features.0.0");
        CHECK(q.front().kind == "conv+bn (folded)");
        CHECK(q.front().quantizer->options().bits == 8);
        CHECK(q[1].quantizer->options().bits == 4);
        CHECK(q[q.size() - 2].quantizer->options().bits == 4);
        CHECK(q.back().kind == "linear");
        CHECK(q.back().name == (arch == Arch::mobilenet_v1 ? "classifier" : "classifier.1"));
        CHECK(q.back().quantizer->options().bits == 8);
        for (const QuantizedLayer& l : q) {
            CHECK(l.quantizer->method() == "msqe-po2");
            // Every conv of these models is followed by a batch norm: all folded.
            if (l.kind != "linear") CHECK(l.kind == "conv+bn (folded)");
        }
        // Float names survive (a float checkpoint loads), quantizer state is added.
        const std::set<std::string> names = state_names(*model);
        for (const std::string& n : float_names) CHECK_MESSAGE(names.count(n), n);
        CHECK(names.count("features.0.0.weight_quantizer.exponent"));
        CHECK(names.count("features.0.0.weight_quantizer.second_moment"));
        CHECK(names.count("features.0.1.running_var"));
        CHECK(names.count("features.0.bn_frozen_0"));
        if (arch == Arch::mobilenet_v2) {
            CHECK(q[1].name == "features.1.conv.0.0");
            CHECK(q[2].name == "features.1.conv.1");  // the t = 1 block's projection, folded with conv.2
            CHECK(names.count("features.1.conv.1.weight_quantizer.step"));
            CHECK(names.count("features.1.conv.bn_frozen_1"));
        }
        // The model still runs, in training and evaluation.
        const Tensor x = random_tensor({4, 16, 16, 3}, 3);
        model->train();
        CHECK(model->forward(Variable(x)).shape() == Shape{4, 5});
        CHECK(eval_logits(*model, x).shape() == Shape{4, 5});
        CHECK(contains(error_message([&] { quantize_model(*model, QuantPolicy{}); }), "already quantized"));
    }
}

TEST_CASE("policy: bits 0 = same, fold off, learnable exponents in their own group, bad policies") {
    auto model = build_model(small_config(Arch::mobilenet_v1), 1);
    QuantPolicy p;
    p.method = "learnable-po2";
    p.options.bits = 3;
    p.first_layer_bits = 0;
    p.last_layer_bits = 6;
    p.fold_bn = false;
    quantize_model(*model, p);
    const auto q = quantized_layers(*model);
    CHECK(q.front().kind == "conv");
    CHECK(q.front().quantizer->options().bits == 3);
    CHECK(q.back().quantizer->options().bits == 6);
    int quantizer_params = 0;
    for (const NamedParameter& np : model->named_parameters()) {
        const bool is_scale = contains(np.name, "weight_quantizer.log2_scale");
        CHECK(is_scale == (np.group == ParamGroup::quantizer));
        quantizer_params += is_scale;
    }
    CHECK(quantizer_params == int(q.size()));
    // The batch norms stay float layers.
    CHECK(dynamic_cast<BatchNorm2d*>(&model->find("features.0.1")) != nullptr);

    auto fresh = build_model(small_config(Arch::mobilenet_v1), 1);
    QuantPolicy bad;
    bad.method = "msqe";
    CHECK(contains(error_message([&] { quantize_model(*fresh, bad); }), "unknown method 'msqe'"));
    bad = {};
    bad.options.bits = 9;
    CHECK(contains(error_message([&] { quantize_model(*fresh, bad); }), "bits must be"));
    bad = {};
    bad.last_layer_bits = 1;
    CHECK(contains(error_message([&] { quantize_model(*fresh, bad); }), "last_layer_bits"));
    bad = {};
    bad.freeze_bn_step = -2;
    CHECK(contains(error_message([&] { quantize_model(*fresh, bad); }), "freeze_bn_step"));
    bad = {};
    bad.bn_stats = "float";
    CHECK(contains(error_message([&] { quantize_model(*fresh, bad); }), "float-conv or quantized-conv"));
    CHECK(!is_quantized(*fresh));  // a refused policy changes nothing

    // JSON round trip, strict parsing.
    QuantPolicy j;
    j.method = "learnable-po2";  // W4A8 (activation_bits) needs power-of-two scales
    j.options.per_channel = true;
    j.options.rounding = ExponentRounding::ceil;
    j.options.outlier_sigma = 2.5f;
    j.freeze_bn_step = 100;
    j.activation_bits = 8;
    j.bn_stats = "quantized-conv";
    const QuantPolicy back = QuantPolicy::from_json(j.to_json());
    CHECK(back.to_json() == j.to_json());
    CHECK(back.options.rounding == ExponentRounding::ceil);
    CHECK(back.freeze_bn_step == 100);
    CHECK(back.bn_stats == "quantized-conv");
    CHECK(QuantPolicy::from_json(R"({"bits": 4})").bn_stats == "float-conv");  // policies saved before the key
    // Policies saved under the old key names read as the same settings.
    const QuantPolicy old = QuantPolicy::from_json(
        R"({"fold_batch_norm": false, "freeze_bn_after_steps": 7, "batch_statistics": "quantized-conv"})");
    CHECK(!old.fold_bn);
    CHECK(old.freeze_bn_step == 7);
    CHECK(old.bn_stats == "quantized-conv");
    CHECK(contains(error_message([] { QuantPolicy::from_json(R"({"fold_batch_norm": 1})"); }),
                   "'fold_batch_norm' must be true or false"));
    CHECK(contains(error_message([] { QuantPolicy::from_json(R"({"batch_statistics": "float"})"); }),
                   "float-conv or quantized-conv"));
    CHECK(contains(error_message([] { QuantPolicy::from_json(R"({"bitz": 4})"); }), "unknown key 'bitz'"));
    CHECK(contains(error_message([] { QuantPolicy::from_json(R"({"bits": "4"})"); }), "'bits' must be an integer"));
    CHECK(contains(error_message([] { QuantPolicy::from_json(R"({"rounding": "floor"})"); }),
                   "unknown exponent rounding"));
}

TEST_CASE("Quantized<Conv2d> and Quantized<Linear> run the layer with Q(W); gradients reach W and the scale") {
    QuantizerOptions opt;
    opt.per_channel = true;
    auto conv = Conv2d::make(4, 6, 3, 1, 1);
    conv->initialize(2);
    const Tensor w0 = conv->weight().value().clone();
    auto wrapped =
        std::make_shared<QuantizedConv2d>(conv, make_quantizer("learnable-po2", opt, conv->weight().shape()));
    auto reference = make_quantizer("learnable-po2", opt, conv->weight().shape());

    const Tensor x = random_tensor({2, 5, 5, 4}, 4);
    Variable xin(x, true);
    Variable y = (*wrapped)(xin);
    Variable wref(w0, true);
    Variable yref = conv2d(Variable(x), reference->fake_quantize(wref, true), Variable(), conv->config().params);
    CHECK(same_bytes(y.value(), yref.value()));
    const Tensor g = random_tensor(y.shape(), 5);
    y.backward(g);
    yref.backward(g);
    CHECK(same_bytes(conv->weight().grad(), wref.grad()));
    auto& e = *wrapped->quantizer().named_parameters()[0].second;
    auto& eref = *reference->named_parameters()[0].second;
    CHECK(same_bytes(e.grad(), eref.grad()));
    double gsum = 0;
    for (float v : e.grad().to_vector()) gsum += std::fabs(v);
    CHECK(gsum > 0);
    CHECK(xin.grad().defined());
    CHECK(wrapped->type_name() == "Quantized<Conv2d>");
    CHECK(contains(wrapped->describe(), "learnable-po2, 4 bits signed, per channel"));

    // Evaluation mode changes nothing: two calls, identical state.
    wrapped->eval();
    const auto before = wrapped->quantizer().state();
    Tensor e1, e2;
    {
        NoGradGuard ng;
        e1 = (*wrapped)(Variable(x)).value();
        e2 = (*wrapped)(Variable(x)).value();
    }
    CHECK(same_bytes(e1, e2));
    const auto after = wrapped->quantizer().state();
    for (size_t k = 0; k < before.size(); ++k) CHECK(same_bytes(before[k].second, after[k].second));

    auto lin = std::make_shared<Linear>(6, 3);
    lin->initialize(3);
    auto qlin = std::make_shared<QuantizedLinear>(lin, make_quantizer("msqe-po2", QuantizerOptions{}, {3, 6}));
    const Tensor xl = random_tensor({2, 6}, 6);
    auto ref = make_quantizer("msqe-po2", QuantizerOptions{}, {3, 6});
    const Tensor yl = (*qlin)(Variable(xl)).value();
    const Tensor ylr = linear(Variable(xl), ref->fake_quantize(lin->weight(), true), lin->bias()).value();
    CHECK(same_bytes(yl, ylr));
    CHECK(contains(error_message([&] {
                       std::make_shared<QuantizedLinear>(lin, make_quantizer("lsq", QuantizerOptions{}, {6, 3}));
                   }),
                   "weight shape [3, 6]"));
}

TEST_CASE("checkpoints restore the quantizer state exactly: same exponents, M, step and next outputs") {
    for (const std::string method : {"msqe-po2", "learnable-po2", "lsq", "msqe-baseline"}) {
        INFO(method);
        QuantPolicy p;
        p.method = method;
        p.options.per_channel = method == "learnable-po2";
        p.options.stable_scale = method == "msqe-po2";
        p.activation_bits = method == "learnable-po2" ? 8 : 0;
        // V2 (residuals, two kinds of folded pairs) for the main methods, V1 for the others.
        const Arch arch = method == "msqe-po2" || method == "learnable-po2" ? Arch::mobilenet_v2 : Arch::mobilenet_v1;
        auto model = build_model(small_config(arch), 7);
        quantize_model(*model, p);
        if (p.options.stable_scale) set_stable_updating(*model, true);
        Optimizers opt(*model);
        const Tensor x = random_tensor({4, 16, 16, 3}, 8);
        for (int s = 0; s < 3; ++s) train_step(*model, x, kLabels, opt);

        // Named per process: ctest runs this test's thread and ISA variants at once.
        const std::string path =
            (std::filesystem::temp_directory_path() / ("hfq_quant_ckpt_" + std::to_string(::getpid()) + ".safetensors"))
                .string();
        save_checkpoint(path, *model, std::nullopt, {{kQuantPolicyKey, p.to_json()}});

        // A fresh model, quantized by the stored policy, loaded.
        const SafetensorsFile file = read_safetensors(path);
        auto restored = build_model(*checkpoint_model_config(file), 99);
        quantize_model(*restored, QuantPolicy::from_json(file.metadata.at(kQuantPolicyKey)));
        load_state_dict(*restored, file);  // strict: every name matches
        reset_diagnostics(*restored);
        std::remove(path.c_str());

        const auto a = model->state_dict(), b = restored->state_dict();
        REQUIRE(a.size() == b.size());
        for (size_t k = 0; k < a.size(); ++k) {
            CHECK(a[k].first == b[k].first);
            CHECK_MESSAGE(same_bytes(a[k].second, b[k].second), a[k].first);
        }
        const auto la = quantized_layers(*model), lb = quantized_layers(*restored);
        for (size_t k = 0; k < la.size(); ++k) {
            CHECK(la[k].quantizer->step() == 3);
            CHECK(lb[k].quantizer->step() == 3);
        }
        // The next training step and evaluation agree bit for bit.
        Optimizers opt2(*restored);
        opt2.weights.load_state(opt.weights.state());
        opt2.scales.load_state(opt.scales.state());
        CHECK(same_bytes(eval_logits(*model, x), eval_logits(*restored, x)));
        CHECK(same_bytes(train_step(*model, x, kLabels, opt), train_step(*restored, x, kLabels, opt2)));
        for (size_t k = 0; k < la.size(); ++k) {
            const QuantizerDiagnostics da = la[k].quantizer->report(), db = lb[k].quantizer->report();
            CHECK(da.exponents == db.exponents);
            CHECK(da.scales.size() == db.scales.size());
            for (size_t g = 0; g < da.scales.size(); ++g) CHECK(da.scales[g] == db.scales[g]);
        }
        CHECK(same_bytes(eval_logits(*model, x), eval_logits(*restored, x)));
    }
}

TEST_CASE("activation quantization: unsigned power-of-two grid after every ReLU6, learnable exponent") {
    auto model = build_model(small_config(Arch::mobilenet_v1), 1);
    QuantPolicy p;
    p.activation_bits = 4;
    p.options.rounding = ExponentRounding::rint;
    quantize_model(*model, p);
    const auto acts = quantized_activations(*model);
    // The image (signed), one ReLU6 per conv block, the pooling (W4A8:
    // tests/test_integer_engine.cpp checks where they sit and what they do).
    CHECK(acts.size() == 1 + 27 + 1);
    CHECK(acts.front().name == "features.0.input_quantizer");
    CHECK(acts[1].name == "features.0.2");
    CHECK(acts.back().name == "pool");
    CHECK(state_names(*model).count("features.0.2.activation_quantizer.log2_scale"));

    // One quantizer alone: outputs on the grid 2^k {0..15}, STE and scale gradients.
    ActivationQuantizer aq(4, ExponentRounding::rint);
    Tensor xv = random_tensor({2, 3, 3, 4}, 9, 2.0f);
    for (int64_t i = 0; i < xv.numel(); ++i) xv.f32()[i] = std::max(0.0f, xv.f32()[i]);
    Variable xin(xv, true);
    Variable y = aq(xin);
    const int k = aq.exponent();
    double sd = 0, mean = 0;
    for (float v : xv.to_vector()) mean += v;
    mean /= xv.numel();
    for (float v : xv.to_vector()) sd += (v - mean) * (v - mean);
    sd = std::sqrt(sd / xv.numel());
    // e = log2(3 std / qp) in double, rounded to float once; the quantizer's
    // and this double evaluation (two passes of n sums, sqrt, log2) differ by
    // a generous 4 n + 8 roundings of 2^-53 on values below |e| + 1.
    const double e_ref = std::log2(3 * sd / 15);
    check_rounded_once("activation e", aq.log2_scale().value().item(), e_ref,
                       2 * gamma_double_n(4.0 * double(xv.numel()) + 8) * (std::fabs(e_ref) + 1));
    CHECK(k == int(std::nearbyint(aq.log2_scale().value().item())));
    const float s = std::ldexp(1.0f, k);
    for (int64_t i = 0; i < xv.numel(); ++i) {
        const float code = std::min(15.0f, std::nearbyint(xv.f32()[i] / s));
        CHECK(y.value().f32()[i] == s * code);
    }
    const Tensor g = random_tensor(y.shape(), 10);
    y.backward(g);
    double expect_de = 0, magnitude = 0;
    for (int64_t i = 0; i < xv.numel(); ++i) {
        const float u = xv.f32()[i] / s;
        const float r = std::nearbyint(u);
        const bool in = r <= 15;
        CHECK(xin.grad().f32()[i] == ((in && xv.f32()[i] > 0) ? g.f32()[i] : 0.0f));
        expect_de += double(g.f32()[i]) * (in ? r - u : 15.0f);
        magnitude += std::fabs(double(g.f32()[i]) * (in ? r - u : 15.0f));
    }
    // dL/de = s ln 2 sum g t: both sides sum the same exact products (u = x / s
    // with s a power of two, r - u exact) in double in other orders, the
    // quantizer rounds the result to float once.
    const double de = expect_de * s * std::log(2.0);
    check_rounded_once("activation dL/de", aq.log2_scale().grad().item(), de,
                       2 * gamma_double_n(double(xv.numel() + 2)) * magnitude * s * std::log(2.0));
    // Evaluation keeps the exponent the last training step chose.
    aq.log2_scale().value().f32()[0] += 3;
    aq.eval();
    NoGradGuard ng;
    CHECK(same_bytes(aq(Variable(xv)).value(), y.value()));
}

TEST_CASE("a quantized training step gives the same exponents, codes and outputs at 1 and 2 threads") {
    for (const std::string method : {"msqe-po2", "learnable-po2"}) {
        INFO(method);
        std::vector<Tensor> results[2];
        std::vector<std::vector<int16_t>> codes[2];
        for (int t = 0; t < 2; ++t) {
            omp_set_num_threads(t + 1);
            auto model = build_model(small_config(Arch::mobilenet_v2), 11);
            QuantPolicy p;
            p.method = method;
            p.options.per_channel = true;
            p.activation_bits = 8;
            quantize_model(*model, p);
            Optimizers opt(*model);
            const Tensor x = random_tensor({4, 16, 16, 3}, 12);
            for (int s = 0; s < 2; ++s) results[t].push_back(train_step(*model, x, kLabels, opt));
            for (const auto& [name, tensor] : model->state_dict()) results[t].push_back(tensor.clone());
            for (const QuantizedLayer& l : quantized_layers(*model)) {
                auto* folded = dynamic_cast<FoldedConvBn*>(l.module);
                NoGradGuard ng;
                const Tensor w = folded ? folded->folded_weight().value() : l.module->named_parameters()[0].var.value();
                codes[t].push_back(l.quantizer->integer_form(w).codes);
            }
        }
        omp_set_num_threads(2);
        REQUIRE(results[0].size() == results[1].size());
        for (size_t k = 0; k < results[0].size(); ++k) CHECK(same_bytes(results[0][k], results[1][k]));
        CHECK(codes[0] == codes[1]);
    }
}

namespace {

// A dead channel as training makes one: the stem's ReLU6 never lets channel 0
// through (its beta is very negative), so the first depthwise layer's channel
// 0 sees only zeros, its moving variance is 0, and its (unused) weights fold
// to gamma W / sqrt(eps): here 50 * 316 against ~1 for the live channels.
std::shared_ptr<Model> model_with_dead_channel(uint64_t seed) {
    auto model = build_model(small_config(Arch::mobilenet_v1), seed);
    std::map<std::string, Tensor> s;
    for (auto& [name, t] : model->state_dict()) s[name] = t;
    s.at("features.0.1.bias").f32()[0] = -100.0f;
    Tensor& w = s.at("features.1.0.weight");  // {C, 1, 3, 3}
    for (int i = 0; i < 9; ++i) w.f32()[i] = (i % 2 ? -50.0f : 50.0f);
    s.at("features.1.1.running_var").f32()[0] = 0.0f;
    s.at("features.1.1.running_mean").f32()[0] = 1e-7f;
    return model;
}

// The live weights of features.1's quantized folded weight that are not zero.
int64_t live_nonzero_codes(Model& model) {
    const QuantizedLayer layer = quantized_layers(model)[1];
    REQUIRE(layer.name == "features.1.0");
    auto& pair = dynamic_cast<FoldedConvBn&>(*layer.module);
    NoGradGuard no_grad;
    const Tensor q = pair.weight_quantizer().quantize(pair.folded_weight()).value();
    int64_t n = 0;
    for (int64_t i = 9; i < q.numel(); ++i) n += q.f32()[i] != 0.0f;  // channel 0 is the first 9
    return n;
}

}  // namespace

TEST_CASE("zero_dead_channels: finds the dead channel, keeps the model's output, rescues a per-tensor grid") {
    const Tensor x = random_tensor({2, 16, 16, 3}, 4);
    QuantPolicy per_channel;
    per_channel.options.per_channel = true;
    per_channel.options.bits = 8;
    auto before = model_with_dead_channel(1);
    auto after = model_with_dead_channel(1);
    quantize_model(*before, per_channel);
    quantize_model(*after, per_channel);
    const std::vector<DeadChannels> dead = zero_dead_channels(*after);
    REQUIRE(dead.size() == 1);
    CHECK(dead[0].layer == "features.1.0");
    CHECK(dead[0].channels == 8);
    CHECK(dead[0].dead == std::vector<int64_t>{0});
    std::map<std::string, Tensor> s;
    for (auto& [name, t] : after->state_dict()) s[name] = t;
    for (int i = 0; i < 9; ++i) CHECK(s.at("features.1.0.weight").f32()[i] == 0.0f);
    CHECK(s.at("features.1.0.weight").f32()[9] != 0.0f);  // channel 1 untouched
    CHECK(s.at("features.1.1.running_mean").f32()[0] == 0.0f);
    // Per channel, the other channels' grids are their own: the output is the same, bit for bit.
    CHECK(same_bytes(eval_logits(*before, x), eval_logits(*after, x)));

    // Per tensor at 4 bits, the dead weights set msqe-baseline's grid (msqe-po2's outlier mask would leave
    // them out here): every live weight rounds to zero, until they are zeroed.
    QuantPolicy per_tensor;
    per_tensor.method = "msqe-baseline";
    auto wrecked = model_with_dead_channel(1);
    auto rescued = model_with_dead_channel(1);
    quantize_model(*wrecked, per_tensor);
    quantize_model(*rescued, per_tensor);
    CHECK(zero_dead_channels(*rescued).size() == 1);
    CHECK(live_nonzero_codes(*wrecked) == 0);
    CHECK(live_nonzero_codes(*rescued) > 7 * 9 / 2);
}
