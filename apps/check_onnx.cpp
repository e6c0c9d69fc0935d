// check_onnx: a run's export.onnx in onnxruntime on every test image,
// against hfq's own computation of the same export.
//
//   check_onnx runs/mobilenet_v1-fashion-mnist-20261203-120000
//   check_onnx RUN --level basic          # onnxruntime without its QDQ fusions
//
// The test images are the run's (its config.json: --data, --input-size, ...),
// preprocessed as the run evaluated them. onnxruntime runs RUN/export.onnx
// through node and onnxruntime-node (tests/onnx/run_onnx.mjs, installed by
// scripts/setup.sh; it sets session.x64quantprecision, and says why), 1000
// images a call; hfq runs RUN/export.safetensors:
// on the integer engine for a W4A8 export, as the model rebuilt from the
// export for a weight-only one. Printed: both top-1 accuracies, on how many
// images the two agree on the top class and give identical logits, and the
// largest logit difference (docs/deploy.md says what to expect and why).
// Exit status 0 after printing; 1 with a message on standard error when
// something is missing or fails.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <unistd.h>

#include "data/loader.h"
#include "deploy/integer_engine.h"
#include "engine/atomic_file.h"
#include "engine/check.h"
#include "engine/safetensors.h"
#include "quant/export.h"
#include "train/config.h"
#include "train/datasets.h"
#include "train/evaluate.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

std::string read_text(const fs::path& path) {
    const std::vector<std::byte> bytes = read_file_bytes(path.string());
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// hfq's logits for the export: the integer engine where the export is W4A8
// (every layer's input on a grid), else the model rebuilt from it.
LogitsFn hfq_logits(const SafetensorsFile& file, std::string& what) {
    if (quant::is_w4a8_export(file)) {
        what = "the integer engine";
        auto engine = std::make_shared<const deploy::IntegerEngine>(file);
        return [engine](const Tensor& images) { return engine->run(images).float_logits(); };
    }
    what = "the model rebuilt from the export";
    std::shared_ptr<Model> model = quant::build_model_from_export(file);
    model->eval();
    return [model](const Tensor& images) {
        NoGradGuard no_grad;
        return (*model)(Variable(images)).value();
    };
}

// onnxruntime's logits {N, classes} for images {N, H, W, C}.
Tensor onnxruntime_logits(const std::string& runner, const std::string& model, const Tensor& images,
                          int64_t classes, const std::string& level) {
    const std::string stem = (fs::temp_directory_path() / cat("check_onnx-", ::getpid())).string();
    const std::string in = stem + ".in.f32", out = stem + ".out.f32";
    write_file_atomically(in, std::span(reinterpret_cast<const std::byte*>(images.f32()), size_t(images.numel()) * 4));
    const std::string command = cat("node '", runner, "' '", model, "' '", in, "' ", images.dim(0), ",", images.dim(1),
                                    ",", images.dim(2), ",", images.dim(3), " '", out, "' ", level, " 2>&1");
    FILE* pipe = ::popen(command.c_str(), "r");
    HFQ_CHECK(pipe, "could not start node");
    std::string said;
    char buf[256];
    while (size_t n = std::fread(buf, 1, sizeof buf, pipe)) said.append(buf, n);
    const int status = ::pclose(pipe);
    fs::remove(in);
    HFQ_CHECK(status == 0, "onnxruntime failed (", command, "): ", said);
    const std::vector<std::byte> bytes = read_file_bytes(out);
    fs::remove(out);
    Tensor y = Tensor::empty({images.dim(0), classes});
    HFQ_CHECK(bytes.size() == size_t(y.numel()) * 4, "onnxruntime gave ", bytes.size() / 4, " values for ",
              images.dim(0), " images of ", classes, " classes");
    std::memcpy(y.f32(), bytes.data(), bytes.size());
    return y;
}

int64_t top1(const Tensor& logits, int64_t row) {
    const float* r = logits.f32() + row * logits.dim(1);
    return std::max_element(r, r + logits.dim(1)) - r;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Run a training run's export.onnx in onnxruntime on its test images and compare with hfq"};
    std::string run_dir, level = "all", runner = HFQ_ONNX_RUNNER;
    app.add_option("run", run_dir, "the run folder (config.json, export.safetensors, export.onnx)")
        ->required()
        ->check(CLI::ExistingDirectory);
    app.add_option("--level", level, "onnxruntime's graph optimization level: all (its default) or basic")
        ->check(CLI::IsMember({"all", "basic"}))
        ->capture_default_str();
    app.add_option("--runner", runner, "the node script that runs a model")->capture_default_str();
    CLI11_PARSE(app, argc, argv);
    try {
        const fs::path dir(run_dir);
        TrainConfig config;
        config.apply_json(read_text(dir / "config.json"), (dir / "config.json").string());
        const TrainData data = open_datasets(config);
        const SafetensorsFile file = read_safetensors((dir / "export.safetensors").string());
        std::string what;
        const LogitsFn hfq = hfq_logits(file, what);
        const std::string onnx = (dir / "export.onnx").string();
        HFQ_CHECK(fs::exists(onnx), onnx, " does not exist (export_onnx writes it)");

        LoaderOptions lo;
        lo.batch_size = 1000;
        lo.shuffle = false;
        lo.threads = std::max(1, config.loader_threads);
        lo.max_bad_fraction = config.max_bad_fraction;
        Loader loader(data.test, lo);
        int64_t images = 0, hfq_right = 0, ort_right = 0, same_top1 = 0, identical = 0;
        double worst = 0;
        while (std::optional<Batch> batch = loader.next()) {
            const Tensor mine = hfq(batch->images);
            const Tensor theirs = onnxruntime_logits(runner, onnx, batch->images, mine.dim(1), level);
            for (int64_t i = 0; i < batch->size(); ++i) {
                const int64_t a = top1(mine, i), b = top1(theirs, i);
                hfq_right += a == batch->labels[i];
                ort_right += b == batch->labels[i];
                same_top1 += a == b;
                bool same = true;
                for (int64_t k = 0; k < mine.dim(1); ++k) {
                    const float x = mine.f32()[i * mine.dim(1) + k], y = theirs.f32()[i * mine.dim(1) + k];
                    same = same && x == y;
                    worst = std::max(worst, std::fabs(double(x) - double(y)));
                }
                identical += same;
            }
            images += batch->size();
        }
        std::printf("%s on %lld test images (onnxruntime at level %s):\n", onnx.c_str(), (long long)images,
                    level.c_str());
        std::printf("  hfq (%s) top-1 %.2f %%, onnxruntime top-1 %.2f %%\n", what.c_str(), 100.0 * hfq_right / images,
                    100.0 * ort_right / images);
        std::printf("  same top-1 on %lld, identical logits on %lld; largest |logit difference| %.3g\n",
                    (long long)same_top1, (long long)identical, worst);
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "check_onnx: " << e.what() << '\n';
        return 1;
    }
}
