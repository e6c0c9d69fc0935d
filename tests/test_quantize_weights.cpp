// quantize_weights (post-training quantization of a weights file): the
// library function against a fresh quantizer's first training step, the
// reference value 7.1 of docs/quantizers.md through the whole pipeline, the output layout,
// errors, and the program itself.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "engine/safetensors.h"
#include "quant/quantize_weights.h"
#include "tests/gradcheck.h"
#include "tests/test_data_util.h"
#include "tests/test_quant_util.h"

using namespace hfq;
using namespace hfq::quant;
using hfq::testing::error_message;
using hfq::testing::random_tensor;
namespace fs = std::filesystem;

namespace {

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

fs::path temp_dir() {
    const fs::path d = fs::temp_directory_path() / ("hfq_test_quantize_weights_" + std::to_string(::getpid()));
    fs::create_directories(d);
    return d;
}

std::string read_bytes(const fs::path& p) { return test::read_text(p.string()); }

// The input: two weight tensors, the tensor of reference value 7.1, and tensors that are not quantized.
std::string make_input(const fs::path& dir) {
    Tensor steps = Tensor::zeros({}, DType::s64);
    Tensor big = random_tensor({6, 10}, 3, 0.1f);
    big.f32()[7] = 2.5f;  // an outlier
    const std::vector<std::pair<std::string, Tensor>> tensors{
        {"conv.weight", random_tensor({4, 2, 3, 3}, 1, 0.2f)},
        {"conv.bias", random_tensor({4}, 2)},
        {"fc.weight", big},
        {"reference",
         Tensor::from_vector({3, 3}, {-0.17f, 2.58f, -8.75f, -3.56f, 1.56f, -0.15f, 2.15f, -0.66f, 0.49f})},
        {"steps", steps}};
    const std::string path = (dir / "in.safetensors").string();
    write_safetensors(path, tensors);
    return path;
}

}  // namespace

TEST_CASE("quantize_weights: every method, per tensor and per channel, = a fresh quantizer's first step") {
    const fs::path dir = temp_dir();
    const std::string in = make_input(dir), out = (dir / "out.safetensors").string();
    const SafetensorsFile src = read_safetensors(in);
    for (const std::string& method : quantizer_methods()) {
        for (bool per_channel : {false, true}) {
            INFO(method, per_channel ? " per channel" : " per tensor");
            QuantizerOptions opt;
            opt.bits = 4;
            opt.per_channel = per_channel;
            const QuantizeWeightsReport r = quantize_weights(in, out, method, opt);
            CHECK(r.tensors.size() == 3);
            CHECK(r.skipped == std::vector<std::string>{"conv.bias", "steps"});
            const SafetensorsFile f = read_safetensors(out);
            CHECK(f.tensors.size() == 9);
            const auto meta = nlohmann::json::parse(f.metadata.at(kQuantizeWeightsKey));
            CHECK(meta["method"] == method);
            CHECK(meta["bits"] == 4);
            CHECK(meta["per_channel"] == per_channel);
            for (const char* name : {"conv.weight", "fc.weight", "reference"}) {
                const Tensor& t = src.get(name);
                const int64_t groups = per_channel ? t.dim(0) : 1, size = t.numel() / groups;
                const Tensor& q = f.get(std::string(name) + ".q");
                const Tensor& err = f.get(std::string(name) + ".err");
                CHECK(q.dtype() == DType::s8);
                CHECK(q.shape() == t.shape());
                CHECK(err.shape() == Shape{groups});
                std::vector<float> scale(groups);
                if (method == "lsq") {
                    const Tensor& s = f.get(std::string(name) + ".scale");
                    CHECK(s.shape() == Shape{groups});
                    CHECK(!f.has(std::string(name) + ".exp"));
                    for (int64_t g = 0; g < groups; ++g) scale[g] = s.f32()[g];
                } else {
                    const Tensor& e = f.get(std::string(name) + ".exp");
                    CHECK(e.dtype() == DType::s32);
                    CHECK(e.shape() == Shape{groups});
                    for (int64_t g = 0; g < groups; ++g) scale[g] = std::ldexp(1.0f, e.data<int32_t>()[g]);
                }
                // A fresh quantizer's first training step computes the same weights and exponents.
                auto fresh = make_quantizer(method, opt, t.shape());
                const Tensor y = fresh->fake_quantize(Variable(t.clone(), true), true).value();
                const QuantizerDiagnostics d = fresh->report();
                for (int64_t g = 0; g < groups; ++g) {
                    CHECK(d.scales[g] == scale[g]);
                    double sum = 0;
                    for (int64_t i = g * size; i < (g + 1) * size; ++i) {
                        const int code = q.data<int8_t>()[i];
                        CHECK(std::abs(code) <= 7);
                        CHECK(scale[g] * float(code) == y.f32()[i]);
                        const double diff = double(t.f32()[i]) - y.f32()[i];
                        sum += diff * diff;
                    }
                    CHECK(err.f32()[g] == float(sum));
                }
            }
        }
    }
    fs::remove_all(dir);
}

TEST_CASE("quantize_weights: reference value 7.1 of docs/quantizers.md through the file (msqe-po2, w = 1: s = 2)") {
    const fs::path dir = temp_dir();
    const std::string in = make_input(dir), out = (dir / "out.safetensors").string();
    QuantizerOptions opt;
    opt.outlier_mask = false;  // w = 1 (second moments are 1 at the first step)
    quantize_weights(in, out, "msqe-po2", opt);
    const SafetensorsFile f = read_safetensors(out);
    CHECK(f.get("reference.exp").data<int32_t>()[0] == 1);
    const std::vector<int> expect{0, 1, -4, -2, 1, 0, 1, 0, 0};
    for (int i = 0; i < 9; ++i) CHECK(int(f.get("reference.q").data<int8_t>()[i]) == expect[i]);
    fs::remove_all(dir);
}

TEST_CASE("quantize_weights: clear errors; the input is never overwritten") {
    const fs::path dir = temp_dir();
    const std::string in = make_input(dir), out = (dir / "out.safetensors").string();
    const std::string before = read_bytes(in);
    QuantizerOptions opt;
    std::string msg = error_message([&] { quantize_weights(in, out, "msqe", opt); });
    CHECK(contains(msg, "unknown method 'msqe'"));
    opt.bits = 9;
    CHECK(contains(error_message([&] { quantize_weights(in, out, "msqe-po2", opt); }), "bits must be in 2..8, got 9"));
    opt.bits = 4;
    msg = error_message([&] { quantize_weights(in, in, "msqe-po2", opt); });
    CHECK(contains(msg, "refusing to overwrite"));
    const std::string other_spelling = (dir / "." / "in.safetensors").string();
    CHECK(contains(error_message([&] { quantize_weights(in, other_spelling, "msqe-po2", opt); }), "refusing"));
    CHECK(read_bytes(in) == before);
    const std::string missing = (dir / "missing.safetensors").string();
    CHECK(contains(error_message([&] { quantize_weights(missing, out, "msqe-po2", opt); }), missing));
    const std::string corrupt = (dir / "corrupt.safetensors").string();
    std::ofstream(corrupt, std::ios::binary) << before.substr(0, 40);
    CHECK(contains(error_message([&] { quantize_weights(corrupt, out, "msqe-po2", opt); }), corrupt));
    const std::string empty = (dir / "nothing.safetensors").string();
    write_safetensors(empty, {{"b", Tensor::zeros({3})}});
    CHECK(contains(error_message([&] { quantize_weights(empty, out, "msqe-po2", opt); }), "no float tensor"));
    CHECK(!fs::exists(out));
    fs::remove_all(dir);
}

TEST_CASE("the quantize_weights program") {
    const fs::path exe = fs::read_symlink("/proc/self/exe").parent_path() / "quantize_weights";
    REQUIRE_MESSAGE(fs::exists(exe), "build the quantize_weights target (it sits next to this test): ", exe.string());
    const fs::path dir = temp_dir();
    const std::string in = make_input(dir), out = (dir / "out.safetensors").string();
    const std::string log = (dir / "log.txt").string();
    auto run = [&](const std::string& args) {
        const int status = std::system((exe.string() + " " + args + " >" + log + " 2>&1").c_str());
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    };
    CHECK(run("--method msqe-po2 --bits 4 --per-channel " + in + " " + out) == 0);
    CHECK(contains(read_bytes(log), "conv.weight"));
    const SafetensorsFile f = read_safetensors(out);
    CHECK(f.get("conv.weight.exp").numel() == 4);
    CHECK(f.get("fc.weight.q").shape() == Shape{6, 10});
    CHECK(run("--method learnable-po2 --rounding ceil --bits 3 " + in + " " + out) == 0);
    CHECK(read_safetensors(out).get("conv.weight.exp").numel() == 1);
    CHECK(run("--method nope " + in + " " + out) == 1);
    CHECK(contains(read_bytes(log), "unknown method 'nope'"));
    CHECK(run("--method lsq --bits 1 " + in + " " + out) == 1);
    CHECK(contains(read_bytes(log), "bits must be in 2..8"));
    CHECK(run("--method lsq " + (dir / "absent.safetensors").string() + " " + out) == 1);
    CHECK(contains(read_bytes(log), "absent.safetensors"));
    CHECK(run("--method lsq " + in + " " + in) == 1);
    CHECK(run("--method lsq") != 0);  // missing arguments: CLI11's usage error
    fs::remove_all(dir);
}
