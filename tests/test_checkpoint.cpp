// Checkpoints: bit-exact round trips, PyTorch-written files, and the errors
// for corrupt, truncated and mismatched files; partial loads.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "engine/ops.h"
#include "layers/batch_norm.h"
#include "layers/checkpoint.h"
#include "tests/gradcheck.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

// A fresh folder per test case, removed afterwards.
struct TempDir {
    fs::path path;
    TempDir() {
        path = fs::temp_directory_path() / ("hfq_test_checkpoint_" + std::to_string(::getpid()));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() { fs::remove_all(path); }
    std::string file(const std::string& name) const { return (path / name).string(); }
};

bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

void check_same_state(const Module& a, const Module& b) {
    const auto sa = a.state_dict(), sb = b.state_dict();
    REQUIRE(sa.size() == sb.size());
    for (size_t i = 0; i < sa.size(); ++i) {
        INFO(sa[i].first);
        CHECK(sa[i].first == sb[i].first);
        CHECK(same_bytes(sa[i].second, sb[i].second));
    }
}

const ModelConfig kSmallV2{.arch = Arch::mobilenet_v2, .width = 0.25, .classes = 10};

// A model whose batch norm buffers are not at their initial values.
std::shared_ptr<Model> trained_once(const ModelConfig& c, uint64_t seed) {
    auto m = build_model(c, seed);
    (*m)(Variable(testing::random_tensor({2, 32, 32, c.input_channels}, seed)));
    return m;
}

std::vector<std::byte> bytes_of(const std::string& path) { return read_file_bytes(path); }

void write_bytes(const std::string& path, const std::vector<std::byte>& bytes, size_t n) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(n));
}

}  // namespace

TEST_CASE("round trip is bit-exact, metadata included") {
    TempDir dir;
    auto a = trained_once(kSmallV2, 1);
    CHECK(dynamic_cast<BatchNorm2d&>(a->find("features.0.1")).num_batches_tracked() == 1);
    Preprocessing pre{.resize_size = 36, .crop_size = 32, .mean = {0.5f, 0.25f, 0.125f}, .std = {0.2f, 0.3f, 0.4f}};
    save_checkpoint(dir.file("a.safetensors"), *a, pre, {{"epoch", "3"}});

    auto b = build_model(kSmallV2, 2);
    const LoadReport report = load_checkpoint(dir.file("a.safetensors"), *b);
    CHECK(report.loaded.size() == a->state_dict().size());
    CHECK(report.missing.empty());
    CHECK(report.unexpected.empty());
    check_same_state(*a, *b);
    CHECK(dynamic_cast<BatchNorm2d&>(b->find("features.0.1")).num_batches_tracked() == 1);

    // Saving the loaded model writes the very same bytes.
    save_checkpoint(dir.file("b.safetensors"), *b, pre, {{"epoch", "3"}});
    CHECK(bytes_of(dir.file("a.safetensors")) == bytes_of(dir.file("b.safetensors")));

    const SafetensorsFile f = read_safetensors(dir.file("a.safetensors"));
    CHECK(f.metadata.at("format") == "pt");
    CHECK(f.metadata.at("epoch") == "3");
    REQUIRE(checkpoint_model_config(f));
    CHECK(checkpoint_model_config(f)->to_json() == kSmallV2.to_json());
    REQUIRE(checkpoint_preprocessing(f));
    CHECK(checkpoint_preprocessing(f)->to_json() == pre.to_json());
    CHECK(f.tensors.front().first == "features.0.0.weight");  // PyTorch's order and names

    // Loading keeps the model's tensors (an optimizer holding them stays valid).
    const Tensor before = b->named_parameters()[0].var.value();
    load_checkpoint(dir.file("a.safetensors"), *b);
    CHECK(b->named_parameters()[0].var.value().shares_storage_with(before));
}

TEST_CASE("a state dict written by PyTorch loads as it is") {
    // Written by tests/fixtures/make_model_fixtures.py: torchvision's
    // mobilenet_v2 state dict (float16 values, int64 num_batches_tracked).
    const SafetensorsFile f = read_safetensors(HFQ_TEST_DATA_DIR "/model_v2.safetensors");
    const auto config = checkpoint_model_config(f);
    REQUIRE(config);
    CHECK(config->width == 0.5);
    CHECK(config->classes == 10);
    auto m = build_model(*config);
    const LoadReport r = load_state_dict(*m, f);
    CHECK(r.loaded.size() == f.tensors.size());
    CHECK(dynamic_cast<BatchNorm2d&>(m->find("features.5.conv.1.1")).num_batches_tracked() == 5);
    CHECK(!checkpoint_preprocessing(f));
    // Every name of the file is one of ours, in the same order.
    const auto ours = m->state_dict();
    for (size_t i = 0; i < ours.size(); ++i) CHECK(ours[i].first == f.tensors[i].first);
}

TEST_CASE("mismatched files: errors name the tensor, the model is left unchanged") {
    TempDir dir;
    auto a = trained_once(kSmallV2, 1);
    const std::string path = dir.file("a.safetensors");
    save_checkpoint(path, *a);
    auto original = a->state_dict();
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (auto& [n, t] : original) tensors.emplace_back(n, t.clone());

    auto target = build_model(kSmallV2, 5);
    auto expect_unchanged = [&] {
        auto fresh = build_model(kSmallV2, 5);
        check_same_state(*target, *fresh);
    };

    SUBCASE("other width") {
        auto wider = build_model({.arch = Arch::mobilenet_v2, .width = 0.5, .classes = 10});
        CHECK_THROWS_WITH_AS(load_checkpoint(path, *wider),
                             doctest::Contains("tensor 'features.0.0.weight' is f32 [8, 3, 3, 3] in the file but "
                                               "f32 [16, 3, 3, 3] in the model"),
                             Error);
    }
    SUBCASE("other dtype") {
        for (auto& [n, t] : tensors)
            if (n == "features.7.conv.1.1.num_batches_tracked") t = Tensor::zeros({});
        write_safetensors(path, tensors);
        CHECK_THROWS_WITH_AS(load_checkpoint(path, *target),
                             doctest::Contains("'features.7.conv.1.1.num_batches_tracked' is f32 [] in the file but "
                                               "s64 [] in the model"),
                             Error);
        expect_unchanged();
    }
    SUBCASE("missing tensor") {
        tensors.erase(tensors.begin() + 10);
        write_safetensors(path, tensors);
        CHECK_THROWS_WITH_AS(
            load_checkpoint(path, *target),
            doctest::Contains(("the model's tensor '" + original[10].first + "' is missing from the file").c_str()),
            Error);
        expect_unchanged();
    }
    SUBCASE("unexpected tensor") {
        tensors.emplace_back("features.99.weight", Tensor::zeros({1}));
        write_safetensors(path, tensors);
        CHECK_THROWS_WITH_AS(load_checkpoint(path, *target),
                             doctest::Contains("the file's tensor 'features.99.weight' is not in the model"), Error);
        expect_unchanged();
    }
    SUBCASE("bad metadata") {
        write_safetensors(path, tensors, {{kModelConfigKey, R"({"arch":"v3"})"}, {kPreprocessingKey, "{]"}});
        const SafetensorsFile f = read_safetensors(path);
        CHECK_THROWS_WITH_AS(checkpoint_model_config(f),
                             doctest::Contains("metadata 'hfq.model': model config: "
                                               "unknown arch 'v3'"),
                             Error);
        CHECK_THROWS_WITH_AS(checkpoint_preprocessing(f), doctest::Contains("not a JSON object"), Error);
    }
}

TEST_CASE("truncated and corrupt files give an error naming the file") {
    TempDir dir;
    auto a = trained_once(kSmallV2, 1);
    const std::string good = dir.file("good.safetensors"), bad = dir.file("bad.safetensors");
    save_checkpoint(good, *a);
    const std::vector<std::byte> bytes = bytes_of(good);
    auto target = build_model(kSmallV2, 5);

    // Cut anywhere: in the length, the header, the data.
    for (size_t n : {size_t(0), size_t(5), size_t(8), size_t(100), bytes.size() / 2, bytes.size() - 1}) {
        CAPTURE(n);
        write_bytes(bad, bytes, n);
        CHECK_THROWS_WITH_AS(load_checkpoint(bad, *target), doctest::Contains(bad.c_str()), Error);
    }
    // Garbage in the header.
    std::vector<std::byte> corrupt = bytes;
    for (size_t i = 8; i < 40; ++i) corrupt[i] = std::byte{'#'};
    write_bytes(bad, corrupt, corrupt.size());
    CHECK_THROWS_WITH_AS(load_checkpoint(bad, *target), doctest::Contains(bad.c_str()), Error);
    // A header length pointing past the end.
    corrupt = bytes;
    corrupt[6] = std::byte{0x7f};
    write_bytes(bad, corrupt, corrupt.size());
    CHECK_THROWS_WITH_AS(load_checkpoint(bad, *target), doctest::Contains(bad.c_str()), Error);
    CHECK_THROWS_WITH_AS(load_checkpoint(dir.file("absent.safetensors"), *target),
                         doctest::Contains("absent.safetensors"), Error);
    check_same_state(*target, *build_model(kSmallV2, 5));

    // A failed save leaves the previous file intact.
    CHECK_THROWS_AS(save_checkpoint(dir.file("no/such/folder/x.safetensors"), *a), Error);
    fs::create_directories(dir.file("taken"));
    CHECK_THROWS_AS(save_checkpoint(dir.file("taken"), *a), Error);
    CHECK(bytes_of(good) == bytes);
}

TEST_CASE("partial load for a new classifier head") {
    TempDir dir;
    auto a = trained_once(kSmallV2, 1);
    save_checkpoint(dir.file("a.safetensors"), *a);
    ModelConfig five = kSmallV2;
    five.classes = 5;
    auto b = build_model(five, 3);
    CHECK_THROWS_WITH_AS(load_checkpoint(dir.file("a.safetensors"), *b),
                         doctest::Contains("'classifier.1.weight' is f32 [10, 1280]"), Error);
    const Tensor head_before = dynamic_cast<Module&>(b->find("classifier.1")).named_parameters()[0].var.value().clone();
    const LoadReport r = load_checkpoint(dir.file("a.safetensors"), *b, {.partial = true});
    CHECK(r.mismatched == std::vector<std::string>{"classifier.1.weight", "classifier.1.bias"});
    CHECK(r.missing.empty());
    CHECK(r.unexpected.empty());
    CHECK(r.loaded.size() + 2 == a->state_dict().size());
    CHECK(r.to_string().find("classifier.1.weight") != std::string::npos);
    // Everything but the head now equals a's; the head kept its initial values.
    const auto sa = a->state_dict(), sb = b->state_dict();
    for (size_t i = 0; i + 2 < sa.size(); ++i) CHECK(same_bytes(sa[i].second, sb[i].second));
    CHECK(same_bytes(b->find("classifier.1").named_parameters()[0].var.value(), head_before));

    // Missing and unexpected tensors are reported too.
    auto state = a->state_dict();
    state.erase(state.begin());
    state.emplace_back("extra", Tensor::zeros({2}));
    write_safetensors(dir.file("c.safetensors"), state);
    const LoadReport r2 = load_checkpoint(dir.file("c.safetensors"), *a, {.partial = true});
    CHECK(r2.missing == std::vector<std::string>{"features.0.0.weight"});
    CHECK(r2.unexpected == std::vector<std::string>{"extra"});
}

TEST_CASE("preprocessing metadata") {
    const Preprocessing p;
    CHECK(p.to_json() == R"({"resize_size":256,"crop_size":224,"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225]})");
    CHECK(Preprocessing::from_json(p.to_json()).to_json() == p.to_json());
    const Preprocessing grey =
        Preprocessing::from_json(R"({"resize_size":32,"crop_size":28,"mean":[0.286],"std":[0.353]})");
    CHECK(grey.mean.size() == 1);
    CHECK_THROWS_WITH_AS(Preprocessing::from_json(R"({"crop_size":300})"),
                         doctest::Contains("crop_size <= resize_size"), Error);
    CHECK_THROWS_WITH_AS(Preprocessing::from_json(R"({"mean":[0.5]})"), doctest::Contains("one value per channel"),
                         Error);
    CHECK_THROWS_WITH_AS(Preprocessing::from_json(R"({"std":[1, 0, 1]})"), doctest::Contains("positive"), Error);
    CHECK_THROWS_WITH_AS(Preprocessing::from_json(R"({"scale":1})"), doctest::Contains("unknown key 'scale'"), Error);
}
