// export.onnx (deploy/onnx_export.h) run in onnxruntime: for MobileNetV1
// and V2 trained a few steps (4-bit msqe-po2 per channel, folded, first and
// last layer at 8 bits), onnxruntime's logits on a batch equal those of the
// model hfq rebuilds from the export within a derived float32 bound, with
// the same top-1; the file holds the export's codes and exponents and its
// metadata; a changed code is caught; a broken export is a clear error.
//
// onnxruntime runs in node (tests/onnx/run_onnx.mjs, onnxruntime-node from
// tests/onnx/node_modules, installed by scripts/setup.sh).
#include <doctest/doctest.h>
#include <onnx/onnx_pb.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "deploy/onnx_export.h"
#include "engine/atomic_file.h"
#include "engine/ops.h"
#include "layers/activation.h"
#include "layers/mobilenet_v2.h"
#include "layers/pooling.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "layers/checkpoint.h"
#include "deploy/integer_engine.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"
#include "tests/test_model_util.h"
#include "tests/test_train_util.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using hfq::testing::error_message;
using hfq::testing::gamma_double_n;
using hfq::testing::gamma_n;
using hfq::testing::random_tensor;

namespace {

// Named per process: ctest runs this test's thread and ISA variants at once.
std::string temp_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / cat("hfq_test_onnx_", ::getpid(), "_", name)).string();
}

constexpr int kBatch = 16, kSize = 16, kClasses = 5;

// A 4-bit msqe-po2 per-channel model, folded, first and last layers at 8
// bits (the policy's defaults), after a few SGD steps on random images: batch
// norm's moving statistics and the exponents are trained ones, not the
// initial ones. With activation_bits, W4A8 (activation quantizers too).
// In evaluation mode.
std::pair<std::shared_ptr<Model>, quant::QuantPolicy> trained_model(Arch arch, int activation_bits) {
    auto model = build_model(hfq::testing::small_model_config(arch, kClasses), 31);
    quant::QuantPolicy policy;
    policy.method = "msqe-po2";
    policy.options.bits = 4;
    policy.options.per_channel = true;
    policy.activation_bits = activation_bits;
    quant::quantize_model(*model, policy);
    hfq::testing::train_steps(*model, random_tensor({8, kSize, kSize, 3}, 32), 3);
    model->eval();
    return {model, policy};
}

// trained_model's export in a file; returns its path.
std::string trained_export(Arch arch, int activation_bits = 0) {
    const auto [model, policy] = trained_model(arch, activation_bits);
    const std::string path = temp_path(cat(arch_name(arch), ".safetensors"));
    quant::export_quantized_model(path, *model, policy);
    return path;
}

onnx::ModelProto read_onnx(const std::string& path) {
    const std::vector<std::byte> bytes = read_file_bytes(path);
    onnx::ModelProto m;
    REQUIRE(m.ParseFromArray(bytes.data(), int(bytes.size())));
    return m;
}

void write_onnx_proto(const onnx::ModelProto& m, const std::string& path) {
    std::string bytes;
    REQUIRE(m.SerializeToString(&bytes));
    write_file_atomically(path, bytes);
}

const onnx::TensorProto& initializer(const onnx::ModelProto& m, const std::string& name) {
    for (const onnx::TensorProto& t : m.graph().initializer())
        if (t.name() == name) return t;
    FAIL("export.onnx has no initializer '", name, "'");
    throw;
}

// How many of the layer's codes in the ONNX file differ from the export's
// or leave the layer's grid (+-7 at 4 bits, +-127 at 8).
int64_t codes_differing(const onnx::ModelProto& m, const SafetensorsFile& file, const nlohmann::json& layer) {
    const std::string name = layer.at("name");
    const Tensor& codes = file.get(name + ".q");
    const onnx::TensorProto& q = initializer(m, name + ".q");
    CHECK(q.data_type() == onnx::TensorProto::INT8);
    CHECK(std::vector<int64_t>(q.dims().begin(), q.dims().end()) == codes.shape());
    REQUIRE(q.raw_data().size() == size_t(codes.numel()));
    const int limit = (1 << (layer.at("bits").get<int>() - 1)) - 1;
    int64_t differing = 0;
    for (int64_t i = 0; i < codes.numel(); ++i) {
        const int8_t c = int8_t(q.raw_data()[i]);
        differing += c != codes.data<int8_t>()[i] || std::abs(c) > limit;
    }
    return differing;
}

// The output of a command's standard output, and its exit status.
std::pair<std::string, int> run(const std::string& command) {
    FILE* p = ::popen(command.c_str(), "r");
    REQUIRE(p);
    std::string out;
    char buf[256];
    while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    return {out, ::pclose(p)};
}

// onnxruntime's output for the batch x {N, H, W, C}, through node, at the
// graph optimization level "all" (its default) or "basic" (tests/onnx/run_onnx.mjs).
Tensor onnxruntime_logits(const std::string& model, const Tensor& x, const std::string& level = "all") {
    const auto [node, found] = run("command -v node");
    if (found != 0 || !std::filesystem::exists(HFQ_ONNX_NODE_MODULES "/onnxruntime-node"))
        FAIL("node or onnxruntime-node (" HFQ_ONNX_NODE_MODULES ") is missing: run scripts/setup.sh");
    const std::string in = temp_path("input.f32"), out = temp_path("output.f32");
    write_file_atomically(in, std::span(reinterpret_cast<const std::byte*>(x.f32()), size_t(x.numel()) * 4));
    const std::string shape = cat(x.dim(0), ",", x.dim(1), ",", x.dim(2), ",", x.dim(3));
    const auto [said, status] =
        run(cat("node '" HFQ_ONNX_RUNNER "' '", model, "' '", in, "' ", shape, " '", out, "' ", level, " 2>&1"));
    INFO(said);
    REQUIRE(status == 0);
    CHECK(said == cat("output ", x.dim(0), ",", kClasses, "\n"));
    const std::vector<std::byte> bytes = read_file_bytes(out);
    std::filesystem::remove(in);
    std::filesystem::remove(out);
    Tensor y = Tensor::empty({x.dim(0), kClasses});
    REQUIRE(bytes.size() == size_t(y.numel()) * 4);
    std::memcpy(y.f32(), bytes.data(), bytes.size());
    return y;
}

// ---- The bound ---------------------------------------------------------------
// hfq (H) and onnxruntime (O) evaluate the same real function of the same
// float input, step by step, each rounding in float32 in its own order.
// Each step's output differs between the sides by the two sides' roundings
// of the step (its local bound, below) plus what the differences of its
// inputs become; a difference at a step's output reaches logit k as J_k
// times it, J_k the derivative of the logit with respect to that output (the
// gradient of a zero probe added there, from hfq's backward), so the logits
// differ by at most the sum over the steps of |J_k| times the local bounds.
// Local bounds (Higham, Lemma 3.1 and eq. 3.5: a sum of n terms, in any
// order, with or without FMA, is within gamma(n) of the sum of |terms|):
//  - conv or linear, y = W x + b, n products per output: W = codes 2^e on
//    both sides (O's DequantizeLinear is exact, a code times 2^e is a float;
//    H's conv(x, codes, b / 2^e) 2^e only scales by powers of two), so each
//    side is within gamma(n + 1) (|W| |x| + |b|): 2 gamma(n + 1) of it;
//  - the residual sum, one rounding a side: 2 u |a + b|;
//  - global average pooling of m values (a sum and a division, or a
//    multiplication by a rounded 1/m): 2 gamma(m + 1) mean |x|;
//  - ReLU6, ReLU and dropout (identity in evaluation) are exact.
// This is first order, as tests/test_quant_export.cpp's bound on the same
// network: the network is piecewise linear, and a unit within a rounding of
// a ReLU6 kink may clamp on one side only; J_k comes from a float32
// backward whose own rounding is second order. A worst case carried through
// |W| instead grows like the product of the layers' norms: on V2 here it is
// 1e18 times the differences, and would not notice a wrong code.
struct Walk {
    std::vector<Variable> probes;  // one per step, zero, at the step's output
    std::vector<Tensor> local;     // the steps' local bounds
    Tensor classifier_input;       // the last layer's input (for the changed-code check)
};

Variable walk(Module& m, const Variable& x, Walk& w) {
    using hfq::testing::abs_of;
    using hfq::testing::bound_from;
    const auto probe = [&](const Variable& y, const Tensor& local) {
        w.probes.emplace_back(Tensor::zeros(y.shape()), true);
        w.local.push_back(local);
        return add(y, w.probes.back());
    };
    if (auto* l = dynamic_cast<quant::IntegerLayer*>(&m)) {
        REQUIRE(!l->input_quantizer());  // weight-only: no activation grids
        REQUIRE(!l->output_quantizer());
        Tensor magnitude;
        {
            NoGradGuard no_grad;
            const Variable ax(abs_of(x.value())), aw(abs_of(l->weights())), ab(abs_of(l->bias()));
            magnitude = l->is_conv() ? conv2d(ax, aw, ab, l->params()).value() : linear(ax, aw, ab).value();
        }
        if (!l->is_conv()) w.classifier_input = x.value();
        const int64_t n = l->codes().numel() / l->codes().dim(0);  // products per output
        return probe(m.forward(x), bound_from(magnitude, 2 * gamma_n(double(n + 1)), n + 1));
    }
    if (auto* b = dynamic_cast<InvertedResidual*>(&m)) {
        const Variable y = walk(*b->child("conv"), x, w);
        if (!b->uses_residual()) return y;
        REQUIRE(!b->after_add());
        const Variable sum = add(x, y);
        return probe(sum, bound_from(abs_of(sum.value()), 2 * testing::kUnitRoundoff, 1));
    }
    if (dynamic_cast<Model*>(&m) || dynamic_cast<Sequential*>(&m)) {
        Variable y = x;
        for (const Module::Child& c : m.children()) y = walk(*c.module, y, w);
        return y;
    }
    if (dynamic_cast<ReLU6*>(&m) || dynamic_cast<ReLU*>(&m) || dynamic_cast<Dropout*>(&m)) return m.forward(x);
    if (dynamic_cast<GlobalAvgPool*>(&m)) {
        Tensor magnitude;
        {
            NoGradGuard no_grad;
            magnitude = global_avg_pool(Variable(abs_of(x.value()))).value();
        }
        const int64_t hw = x.value().dim(1) * x.value().dim(2);
        return probe(m.forward(x), bound_from(magnitude, 2 * gamma_n(double(hw + 1)), hw + 1));
    }
    FAIL("the bound has no rule for a ", m.type_name());
    return x;
}

// hfq's logits and the bound on |hfq - onnxruntime| for each of them.
struct Bounded {
    Tensor logits;
    std::vector<double> bound;
    Tensor classifier_input;
};
Bounded hfq_logits(Model& model, const Tensor& input) {
    const int64_t rows = input.dim(0);
    Bounded r{Tensor(), std::vector<double>(size_t(rows * kClasses), 0.0), Tensor()};
    for (int64_t k = 0; k < kClasses; ++k) {  // the forward again for each logit's backward
        Walk w;
        const Variable y = walk(model, Variable(input), w);
        if (k == 0) {
            r.logits = y.value().clone();
            r.classifier_input = w.classifier_input;
        }
        Tensor seed = Tensor::zeros(y.shape());
        for (int64_t row = 0; row < rows; ++row) seed.f32()[row * kClasses + k] = 1;
        y.backward(seed);  // each row's logit depends on its own image only (evaluation mode)
        for (size_t s = 0; s < w.probes.size(); ++s) {
            const Tensor& g = w.probes[s].grad();
            const int64_t per_row = g.numel() / rows;
            for (int64_t i = 0; i < g.numel(); ++i)
                r.bound[size_t((i / per_row) * kClasses + k)] += std::fabs(g.f32()[i]) * double(w.local[s].f32()[i]);
        }
    }
    // Summed in double over at most a few 10^5 terms a logit: relative
    // error below gamma_double(10^6), far below the rounding of the result.
    for (double& b : r.bound) b *= 1 + gamma_double_n(1e6);
    return r;
}

// The worst |a - b| / d over the logits.
double worst_ratio(const Tensor& a, const Tensor& b, const std::vector<double>& d) {
    double worst = 0;
    for (int64_t i = 0; i < a.numel(); ++i) {
        const double diff = std::fabs(double(a.f32()[i]) - double(b.f32()[i]));
        if (diff > 0) worst = std::max(worst, d[i] > 0 ? diff / d[i] : INFINITY);
    }
    return worst;
}

int64_t top1(const Tensor& logits, int64_t row) {
    const float* r = logits.f32() + row * kClasses;
    return std::max_element(r, r + kClasses) - r;
}

void check_model_in_onnxruntime(Arch arch) {
    INFO(std::string(arch_name(arch)));
    const std::string exported = trained_export(arch), onnx_path = temp_path(cat(arch_name(arch), ".onnx"));
    const SafetensorsFile file = read_safetensors(exported);
    deploy::write_onnx(file, onnx_path);
    const nlohmann::json meta = nlohmann::json::parse(file.metadata.at(quant::kExportKey));

    // The file: codes, scales 2^exp on axis 0, each DequantizeLinear feeding
    // its Conv / Gemm directly, the metadata.
    const onnx::ModelProto m = read_onnx(onnx_path);
    CHECK(m.producer_name() == "hfq");
    CHECK(m.opset_import(0).version() == 13);
    for (const auto& [key, value] : file.metadata) {
        if (key.rfind("hfq.", 0) != 0) continue;  // safetensors' own "format"
        const auto& props = m.metadata_props();
        CHECK_MESSAGE(std::any_of(props.begin(), props.end(),
                                  [&](const auto& p) { return p.key() == key && p.value() == value; }),
                      key);
    }
    for (const nlohmann::json& e : meta.at("layers")) {
        const std::string name = e.at("name");
        INFO(name);
        const Tensor& codes = file.get(name + ".q");
        const Tensor& exps = file.get(name + ".exp");
        CHECK(codes_differing(m, file, e) == 0);
        const onnx::TensorProto& s = initializer(m, name + ".scale");
        REQUIRE(s.raw_data().size() == size_t(codes.dim(0)) * 4);
        for (int64_t c = 0; c < codes.dim(0); ++c) {
            float v;
            std::memcpy(&v, s.raw_data().data() + 4 * c, 4);
            CHECK(v == std::ldexp(1.0f, exps.data<int32_t>()[exps.numel() == 1 ? 0 : c]));
        }
        int consumers = 0;
        for (const onnx::NodeProto& n : m.graph().node()) {
            if (n.op_type() == "DequantizeLinear" && n.input(0) == name + ".q") {
                CHECK(n.output(0) == name + ".weight");
                REQUIRE(n.attribute_size() == 1);
                CHECK((n.attribute(0).name() == "axis" && n.attribute(0).i() == 0));
            }
            if (std::find(n.input().begin(), n.input().end(), name + ".weight") != n.input().end()) {
                ++consumers;
                CHECK(n.op_type() == (e.at("op") == "conv" ? "Conv" : "Gemm"));
            }
        }
        CHECK(consumers == 1);
    }

    // The logits: hfq's (walking the rebuilt model, with the bound) against onnxruntime's.
    const std::shared_ptr<Model> model = quant::build_model_from_export(file);
    const Tensor x = random_tensor({kBatch, kSize, kSize, 3}, 33);
    const Bounded hfq = hfq_logits(*model, x);
    {
        NoGradGuard no_grad;  // the walk is the model's forward, bit for bit (the probes add zeros)
        CHECK(hfq.logits.to_vector() == (*model)(Variable(x)).value().to_vector());
    }
    const Tensor ort = onnxruntime_logits(onnx_path, x);
    const double ratio = worst_ratio(ort, hfq.logits, hfq.bound);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE("worst |onnxruntime - hfq| / bound = ", ratio);
    CHECK(ratio <= 1.0);
    for (int64_t i = 0; i < kBatch; ++i) CHECK_MESSAGE(top1(ort, i) == top1(hfq.logits, i), "image ", i);

    // A code changed in the file: one step of a 4-bit code is caught by the
    // comparison of the codes. Its effect on the logits can lie within the
    // float32 bound (a worst case, ~10^3 times the realised differences
    // here); a classifier code changed by 64 steps, at the input the
    // classifier sees largest, leaves the bound.
    const nlohmann::json& four_bits = meta.at("layers")[1];
    const nlohmann::json& classifier = meta.at("layers").back();
    REQUIRE(four_bits.at("bits") == 4);
    const Tensor& in = hfq.classifier_input;
    int64_t widest = 0;
    for (int64_t i = 0; i < in.numel(); ++i)
        if (std::fabs(in.f32()[i]) > std::fabs(in.f32()[widest])) widest = i;
    onnx::ModelProto changed = m;
    for (onnx::TensorProto& t : *changed.mutable_graph()->mutable_initializer()) {
        std::string& raw = *t.mutable_raw_data();
        if (t.name() == four_bits.at("name").get<std::string>() + ".q") raw[0] = char(raw[0] > 0 ? raw[0] - 1 : raw[0] + 1);
        if (t.name() == classifier.at("name").get<std::string>() + ".q") {
            char& code = raw[widest % in.dim(1)];  // row 0 (logit 0), that input
            code = char(code > 0 ? code - 64 : code + 64);
        }
    }
    CHECK(codes_differing(changed, file, four_bits) == 1);
    CHECK(codes_differing(changed, file, classifier) == 1);
    write_onnx_proto(changed, onnx_path);
    const double changed_ratio = worst_ratio(onnxruntime_logits(onnx_path, x), hfq.logits, hfq.bound);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE("codes changed: worst ratio = ", changed_ratio);
    CHECK(changed_ratio > 1.0);

    std::filesystem::remove(exported);
    std::filesystem::remove(onnx_path);
}

}  // namespace

TEST_CASE("export.onnx of MobileNetV1 runs in onnxruntime as hfq's model rebuilt from the export") {
    check_model_in_onnxruntime(Arch::mobilenet_v1);
}

TEST_CASE("export.onnx of MobileNetV2 runs in onnxruntime as hfq's model rebuilt from the export") {
    check_model_in_onnxruntime(Arch::mobilenet_v2);
}

// W4A8: the file is written and checked, with one QuantizeLinear /
// DequantizeLinear pair per activation quantizer, uint8 or int8 as the
// entry's "signed" says.
TEST_CASE("export.onnx of a W4A8 MobileNetV2: a Q/DQ pair per activation quantizer, signed or not") {
    const std::string exported = trained_export(Arch::mobilenet_v2, 8), onnx_path = temp_path("w4a8.onnx");
    const SafetensorsFile file = read_safetensors(exported);
    deploy::write_onnx(file, onnx_path);
    const onnx::ModelProto m = read_onnx(onnx_path);
    const nlohmann::json activations = nlohmann::json::parse(file.metadata.at(quant::kExportKey)).at("activations");
    int signed_sites = 0;
    for (const nlohmann::json& a : activations) {
        const std::string name = a.at("name");
        INFO(name);
        signed_sites += a.at("signed").get<bool>();
        const auto q = std::find_if(m.graph().node().begin(), m.graph().node().end(), [&](const onnx::NodeProto& n) {
            return n.op_type() == "QuantizeLinear" && n.output(0) == name + ".codes";
        });
        REQUIRE(q != m.graph().node().end());
        CHECK(initializer(m, q->input(2)).data_type() ==
              (a.at("signed").get<bool>() ? onnx::TensorProto::INT8 : onnx::TensorProto::UINT8));
        float scale;
        std::memcpy(&scale, initializer(m, q->input(1)).raw_data().data(), 4);
        CHECK(scale == std::ldexp(1.0f, file.get(name + ".exp").data<int32_t>()[0]));
    }
    CHECK(signed_sites > 0);  // the image, the linear bottlenecks and the sums
    CHECK(signed_sites < int(activations.size()));
    const int64_t pairs = std::count_if(m.graph().node().begin(), m.graph().node().end(),
                                        [](const onnx::NodeProto& n) { return n.op_type() == "QuantizeLinear"; });
    CHECK(pairs == int64_t(activations.size()));
    std::filesystem::remove(exported);
    std::filesystem::remove(onnx_path);
}

namespace {

// A W4A8 model's logits in onnxruntime against the integer engine's (which
// are the fake-quant model's, bit for bit: tests/test_integer_engine.cpp).
// Up to the classifier, onnxruntime computes the engine's codes exactly:
//  - QuantizeLinear of the image: x / 2^e is exact, both round half to even;
//  - a convolution's products c_x c_w 2^u and its partial sums are integers
//    below 2^24 units (the export's accumulator bound), exact in float32 in
//    any order; the bias is b_code 2^u;
//  - global average pooling: the sum is exact, the mean one division. A tie
//    of the next grid's rounding is a float (9 bits), so the division is
//    exact there; elsewhere the exact mean is at least 1 / (2 m 2^d) code
//    steps from a tie (m = H W values, d = the next grid's exponent minus
//    the input's, when positive), far more than a float32 rounding of a mean
//    below 256 steps (2^-16 steps) when d <= 8, which the test checks.
// The classifier is where they differ: the engine sums K + 1 integers
// exactly (rounded once to float), onnxruntime in float32, in its order. So
//   |O_j - E_j| <= gamma(K + 2) S_j,   S_j = (sum_k |c_x,k c_w,jk| + |b_j|) 2^u_j
// (gamma(K + 1) for onnxruntime's sum, u <= gamma(1) for the engine's rounding).
// That is the ONNX operators' arithmetic, which onnxruntime follows at the
// optimization level "basic". At its default level, "all", it fuses each QDQ
// convolution into its int8 QLinearConv, whose products are integers summed
// in int32 (exact) and whose requantization multiplies by the exact 2^k and
// rounds half to even: the same codes, as long as no partial sum saturates.
// On x86 without VNNI its u8 x s8 kernel does saturate pairs of 8-bit-weight
// products in int16 unless the session sets x64quantprecision, which
// run_onnx.mjs does (docs/deploy.md: without it the first convolution's codes
// differ on every Fashion-MNIST test image). The pooling and the classifier
// stay float at both levels. So both levels are held to the same bound.
void check_w4a8_in_onnxruntime(Arch arch, const std::string& level) {
    const std::string exported = trained_export(arch, 8), onnx_path = temp_path("w4a8-logits.onnx");
    deploy::write_onnx(exported, onnx_path);
    const Tensor x = random_tensor({kBatch, kSize, kSize, 3}, 35);
    const deploy::IntegerEngine engine(exported);
    const deploy::IntegerEngine::Result r = engine.run(x, /*keep_boundaries=*/true);
    const Tensor hfq = r.float_logits();

    const quant::IntegerLayer* classifier = nullptr;
    for (auto& [n, m] : const_cast<Model&>(engine.model()).named_modules())
        if (auto* l = dynamic_cast<quant::IntegerLayer*>(m)) classifier = l;  // the last one
    REQUIRE(classifier);
    REQUIRE(!classifier->is_conv());
    // The classifier's input, the pooled codes; the boundary before them is the pooling's input.
    const auto at = std::find_if(r.boundaries.begin(), r.boundaries.end(),
                                 [&](const deploy::CodeTensor& c) { return c.site == classifier->input_site(); });
    REQUIRE(at != r.boundaries.end());
    REQUIRE(at != r.boundaries.begin());
    const deploy::CodeTensor* pooled = &*at;
    CHECK(pooled->exponent - std::prev(at)->exponent <= 8);  // the pooling argument above
    const int64_t k = classifier->codes().dim(1);
    const int8_t* w = classifier->codes().data<int8_t>();
    const int32_t* b = classifier->bias_code().data<int32_t>();
    std::vector<double> bound(size_t(hfq.numel()));
    for (int64_t i = 0; i < kBatch; ++i)
        for (int64_t j = 0; j < kClasses; ++j) {
            double s = std::fabs(double(b[j]));
            for (int64_t t = 0; t < k; ++t) s += std::fabs(double(pooled->codes[size_t(i * k + t)]) * w[j * k + t]);
            const int e = classifier->exponents()[classifier->exponents().size() == 1 ? 0 : size_t(j)];
            bound[size_t(i * kClasses + j)] = gamma_n(double(k + 2)) * std::ldexp(s, pooled->exponent + e);
        }
    const Tensor ort = onnxruntime_logits(onnx_path, x, level);
    const double ratio = worst_ratio(ort, hfq, bound);
    if (std::getenv("HFQ_SHOW_ERRORS"))
        MESSAGE(std::string(arch_name(arch)), " W4A8, level ", level, ": worst |onnxruntime - engine| / bound = ", ratio);
    CHECK(ratio <= 1.0);
    for (int64_t i = 0; i < kBatch; ++i) CHECK_MESSAGE(top1(ort, i) == top1(hfq, i), "image ", i);
    std::filesystem::remove(exported);
    std::filesystem::remove(onnx_path);
}

}  // namespace

TEST_CASE("export.onnx of a W4A8 MobileNetV1 in onnxruntime: the integer engine's logits, within the classifier's bound") {
    check_w4a8_in_onnxruntime(Arch::mobilenet_v1, "basic");
    check_w4a8_in_onnxruntime(Arch::mobilenet_v1, "all");
}

TEST_CASE("export.onnx of a W4A8 MobileNetV2 in onnxruntime: the integer engine's logits, within the classifier's bound") {
    check_w4a8_in_onnxruntime(Arch::mobilenet_v2, "basic");
    check_w4a8_in_onnxruntime(Arch::mobilenet_v2, "all");
}

TEST_CASE("a broken export is an error naming the file and the tensor") {
    const std::string exported = trained_export(Arch::mobilenet_v1), onnx_path = temp_path("broken.onnx");
    const SafetensorsFile file = read_safetensors(exported);
    const std::string layer = nlohmann::json::parse(file.metadata.at(quant::kExportKey)).at("layers")[1].at("name");
    // A copy of the export without `drop`, or with `reshaped` flattened.
    const auto tampered = [&](const std::string& drop, const std::string& reshaped) {
        std::vector<std::pair<std::string, Tensor>> tensors;
        for (const auto& [n, t] : file.tensors) {
            if (n == drop) continue;
            tensors.emplace_back(n, n == reshaped ? t.clone().reshape({t.numel()}) : t);
        }
        const std::string path = temp_path("tampered.safetensors");
        write_safetensors(path, tensors, file.metadata);
        return path;
    };
    const auto message = [&](const std::string& path) {
        return error_message([&] { deploy::write_onnx(path, onnx_path); });
    };
    const std::string no_exp = message(tampered(layer + ".exp", ""));
    CHECK(no_exp.find(layer + ".exp") != std::string::npos);
    CHECK(no_exp.find("tampered.safetensors") != std::string::npos);
    const std::string bad_shape = message(tampered("", layer + ".q"));
    CHECK(bad_shape.find(layer + ".q") != std::string::npos);
    CHECK(bad_shape.find("tampered.safetensors") != std::string::npos);
    CHECK(!std::filesystem::exists(onnx_path));
    std::filesystem::remove(temp_path("tampered.safetensors"));
    std::filesystem::remove(exported);
}

TEST_CASE("export_onnx: from an export or from its QAT checkpoint, write_onnx's bytes; a float checkpoint is refused") {
    const std::string exe = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "export_onnx").string();
    REQUIRE_MESSAGE(std::filesystem::exists(exe), exe, " is not built");
    const auto [model, policy] = trained_model(Arch::mobilenet_v2, 8);
    const std::string exported = temp_path("program.safetensors"), qat = temp_path("program-qat.safetensors"),
                      plain = temp_path("program-float.safetensors"), expected = temp_path("expected.onnx"),
                      tmp = temp_path("tmp");
    quant::export_quantized_model(exported, *model, policy);
    save_checkpoint(qat, *model, std::nullopt, {{quant::kQuantPolicyKey, policy.to_json()}});
    save_checkpoint(plain, *build_model(hfq::testing::small_model_config(Arch::mobilenet_v2, kClasses), 31));
    deploy::write_onnx(exported, expected);
    const std::vector<std::byte> want = read_file_bytes(expected);
    std::filesystem::create_directory(tmp);

    // Without -o: the input's name with .onnx.
    const auto [said, status] = run(exe + " '" + exported + "' 2>&1");
    INFO(said);
    CHECK(status == 0);
    const std::string beside = temp_path("program.onnx");
    CHECK(said == "export_onnx: wrote " + beside + "\n");
    CHECK(read_file_bytes(beside) == want);
    // A QAT checkpoint is exported as a run's end exports it, to a temporary
    // file that is gone afterwards.
    const std::string from_qat = temp_path("from-qat.onnx");
    const auto [said_qat, status_qat] = run("TMPDIR='" + tmp + "' " + exe + " '" + qat + "' -o '" + from_qat + "' 2>&1");
    INFO(said_qat);
    CHECK(status_qat == 0);
    CHECK(read_file_bytes(from_qat) == want);
    CHECK(std::filesystem::is_empty(tmp));

    const std::string refused = temp_path("refused.onnx");
    const auto [said_float, status_float] = run(exe + " '" + plain + "' -o '" + refused + "' 2>&1");
    CHECK(WEXITSTATUS(status_float) == 1);
    CHECK_MESSAGE(said_float.find(plain + ": neither an export") != std::string::npos, said_float);
    CHECK_MESSAGE(said_float.find("a float model has no quantized layers to export") != std::string::npos, said_float);
    CHECK(!std::filesystem::exists(refused));

    for (const std::string& f : {exported, qat, plain, expected, beside, from_qat}) std::filesystem::remove(f);
    std::filesystem::remove_all(tmp);
}

TEST_CASE("check_onnx: a run folder's export.onnx on its test images, against the integer engine") {
    const std::string exe = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "check_onnx").string();
    REQUIRE_MESSAGE(std::filesystem::exists(exe), exe, " is not built");
    test::TempDir dir;
    test::make_image_folder(dir / "images");  // 18 test images, 3 classes
    TrainConfig config = test::tiny_config(dir / "images", dir / "run");
    std::filesystem::create_directories(dir / "run");
    write_file_atomically(dir / "run/config.json", config.to_json());
    const auto [model, policy] = trained_model(Arch::mobilenet_v1, 8);  // 5 classes: the images' 3 and 2 unused
    quant::export_quantized_model(dir / "run/export.safetensors", *model, policy);
    deploy::write_onnx(dir / "run/export.safetensors", dir / "run/export.onnx");

    // V1 W4A8 at level basic: identical logits. Up to the classifier the codes
    // are exact (the W4A8 test above says why), and V1 x0.25's classifier
    // sums 256 features: 256 * 255 * 127 < 2^24 units, exact in float32 too.
    const auto [said, status] = run(cat(exe, " '", dir / "run", "' --level basic 2>&1"));
    INFO(said);
    CHECK(status == 0);
    CHECK(said.find("export.onnx on 18 test images (onnxruntime at level basic)") != std::string::npos);
    CHECK(said.find("hfq (the integer engine) top-1") != std::string::npos);
    CHECK(said.find("same top-1 on 18, identical logits on 18; largest |logit difference| 0\n") != std::string::npos);
    // The default level, with its fused int8 convolutions: the same codes (the W4A8 test above).
    const auto [said_all, status_all] = run(cat(exe, " '", dir / "run", "' 2>&1"));
    INFO(said_all);
    CHECK(status_all == 0);
    CHECK(said_all.find("export.onnx on 18 test images (onnxruntime at level all)") != std::string::npos);
    CHECK(said_all.find("same top-1 on 18, identical logits on 18; largest |logit difference| 0\n") !=
          std::string::npos);
    std::filesystem::remove(dir / "run/export.onnx");
    const auto [missing, missing_status] = run(cat(exe, " '", dir / "run", "' 2>&1"));
    CHECK(WEXITSTATUS(missing_status) == 1);
    CHECK_MESSAGE(missing.find("export.onnx does not exist") != std::string::npos, missing);
}
