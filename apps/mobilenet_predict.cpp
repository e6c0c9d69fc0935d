// mobilenet_predict: classifies images (or a tensor batch) with anything
// train_mobilenet writes, in evaluation mode.
//
//   mobilenet_predict --weights model.safetensors cat.jpg dog.png
//   mobilenet_predict --weights model.safetensors --tensor batch.safetensors
//   mobilenet_predict --weights mobilenet_v2.safetensors --arch v2 --width 1.0 --classes 1000 img.jpg
//   mobilenet_predict --weights run/export.safetensors --fake-quant img.jpg
//
// What runs depends on the file's metadata:
//   a float checkpoint (float.safetensors, torchvision weights)
//       the float model;
//   a QAT checkpoint ("hfq.quant_policy": final.safetensors, or a run's
//   checkpoint.safetensors, whose optimizer state is skipped)
//       the fake-quant model, rebuilt as train_mobilenet restores it
//       (quantize_model with the policy, then the checkpoint's tensors);
//       --integer, for a W4A8 policy (activation bits): the model exported to a
//       temporary file (removed afterwards) and run by the integer engine;
//   an export ("hfq.export": export.safetensors)
//       W4A8 (every layer's input on an activation grid): the integer engine
//       (deploy/integer_engine.h), integer arithmetic only;
//       weight-only, or W4A8 with --fake-quant: the model rebuilt from the
//       export (quant::build_model_from_export: IntegerLayers in float).
// The fake-quant model and the integer engine give the same logits bit for
// bit on a W4A8 model (the engine's claim, tests/test_integer_engine.cpp), so
// --integer / --fake-quant choose how the numbers are computed, not what they
// are. A choice the file does not offer (--integer on a float or weight-only
// model, --fake-quant on a float checkpoint, both flags) is an error;
// --fake-quant where it is the default (a QAT checkpoint, a weight-only
// export) changes nothing.
//
// Standard output: one JSON object per input, one per line:
//   {"input": "cat.jpg", "logits": [...all classes...], "top5": [[index, probability], ...]}
// An input that cannot be read gives {"input": ..., "error": "..."} and the
// exit status 2; a bad checkpoint or option gives a message on standard error
// and the exit status 1.
//
// The architecture comes from the file's "hfq.model" metadata, or, for a
// checkpoint, from --arch/--width/--classes/--input-channels/--small-input
// (needed for converted torchvision weights without metadata; they override
// metadata). Images are decoded and preprocessed by the data library as the
// file's "hfq.preprocessing" says (resize the shorter side, centre crop,
// normalize), ImageNet's 256 / 224 and mean / std without it. --tensor reads
// an NCHW float32 batch: the tensor named "input", else the file's first tensor.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "data/image_folder.h"
#include "deploy/integer_engine.h"
#include "engine/check.h"
#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/model.h"
#include "quant/export.h"
#include "train/evaluate.h"
#include "train/qat_checkpoint.h"
#include "train/training_checkpoint.h"

using namespace hfq;

namespace {

// JSON whose floating-point numbers are float: logits print as the shortest
// decimal that reads back as the same float (0.1, not 0.10000000149011612).
using Json =
    nlohmann::basic_json<nlohmann::ordered_map, std::vector, std::string, bool, std::int64_t, std::uint64_t, float>;

struct Options {
    std::string weights;
    std::string tensor;
    std::vector<std::string> images;
    std::string arch;
    double width = 1.0;
    int classes = 1000;
    int input_channels = 3;
    bool small_input = false;
    int batch_size = 16;
    bool integer = false;     // run the integer engine
    bool fake_quant = false;  // run a model in float arithmetic
};

// The model config: the command line's when --arch is given, else the
// checkpoint's metadata.
ModelConfig choose_config(const Options& o, const SafetensorsFile& file) {
    if (!o.arch.empty()) {
        ModelConfig c;
        c.arch = parse_arch(o.arch);
        c.width = o.width;
        c.classes = o.classes;
        c.input_channels = o.input_channels;
        c.small_input = o.small_input;
        c.validate();
        return c;
    }
    std::optional<ModelConfig> c = checkpoint_model_config(file);
    HFQ_CHECK(c, o.weights, ": the checkpoint has no \"", kModelConfigKey,
              "\" metadata; give the architecture with --arch v1|v2 --width W --classes N [--small-input]");
    return *c;
}

Preprocessing choose_preprocessing(const SafetensorsFile& file, int input_channels) {
    if (std::optional<Preprocessing> p = checkpoint_preprocessing(file)) return *p;
    Preprocessing p;  // ImageNet's evaluation transform
    HFQ_CHECK(input_channels == 3, file.source, ": no \"", kPreprocessingKey,
              "\" metadata, and ImageNet's mean and std are for 3 channels, not ", input_channels);
    return p;
}

// What computes the logits, chosen once from the file: a function from
// images {N, H, W, C} to logits {N, classes} (train/evaluate.h's LogitsFn), so
// that every kind of file goes through the same input and output code.
struct Network {
    ModelConfig config;  // what the inputs must fit (input channels)
    LogitsFn logits;
};

Network model_network(std::shared_ptr<Model> model) {
    model->eval();
    return {model->config(), [model](const Tensor& images) {
                NoGradGuard no_grad;
                return (*model)(Variable(images)).value();
            }};
}

Network engine_network(std::shared_ptr<const deploy::IntegerEngine> engine) {
    return {engine->model().config(), [engine](const Tensor& images) { return engine->run(images).float_logits(); }};
}

Network export_network(const Options& o, const SafetensorsFile& file) {
    HFQ_CHECK(o.arch.empty(), o.weights, ": an export runs the network of its \"", kModelConfigKey,
              "\" metadata; --arch is for checkpoints");
    if (quant::is_w4a8_export(file) && !o.fake_quant)
        return engine_network(std::make_shared<const deploy::IntegerEngine>(file));
    HFQ_CHECK(!o.integer, o.weights,
              ": a weight-only export (its layers' inputs are on no activation grid): --integer runs the integer "
              "engine, which needs a W4A8 export (train_mobilenet --activation-bits 8)");
    return model_network(quant::build_model_from_export(file));
}

// As train_mobilenet restores a QAT run (train/qat_checkpoint.h); for
// --integer exported as a run's end exports it, to a temporary file the
// engine reads whole when built.
Network qat_network(const Options& o, const SafetensorsFile& file) {
    const QatModel qat = restore_qat_checkpoint(file, choose_config(o, file));
    HFQ_CHECK(!o.integer || qat.policy.activation_bits > 0, o.weights,
              ": a weight-only QAT checkpoint (no activation bits in its policy): --integer runs the integer "
              "engine, which needs a W4A8 model (train_mobilenet --activation-bits 8)");
    if (!o.integer) return model_network(qat.model);
    const TemporaryExport exported(qat, checkpoint_preprocessing(file));
    return engine_network(std::make_shared<const deploy::IntegerEngine>(exported.path()));
}

Network choose_network(const Options& o, const SafetensorsFile& file) {
    HFQ_CHECK(!(o.integer && o.fake_quant), "--integer and --fake-quant exclude each other: give one of them");
    if (file.metadata.count(quant::kExportKey)) return export_network(o, file);
    if (file.metadata.count(quant::kQuantPolicyKey)) return qat_network(o, file);
    HFQ_CHECK(!o.integer && !o.fake_quant, o.weights, ": a float checkpoint (no \"", quant::kQuantPolicyKey, "\" or \"",
              quant::kExportKey, "\" metadata): --integer and --fake-quant are for quantized models");
    std::shared_ptr<Model> model = build_model(choose_config(o, file));
    load_state_dict(*model, model_tensors(file));
    return model_network(model);
}

// softmax(logits) in double, then the k largest as [index, probability].
Json top_k(const float* logits, int n, int k) {
    const double peak = *std::max_element(logits, logits + n);
    std::vector<double> p(n);
    double total = 0;
    for (int i = 0; i < n; ++i) total += p[i] = std::exp(double(logits[i]) - peak);
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    k = std::min(k, n);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) { return p[a] > p[b]; });
    Json out = Json::array();
    for (int i = 0; i < k; ++i) out.push_back({order[i], static_cast<float>(p[order[i]] / total)});
    return out;
}

// Runs the network on {N, H, W, C}: one JSON line per row.
std::vector<Json> predict(const Network& network, const Tensor& batch, const std::vector<std::string>& names) {
    const Tensor logits = network.logits(batch);  // {N, classes}
    const int classes = static_cast<int>(logits.dim(1));
    std::vector<Json> lines;
    for (size_t i = 0; i < names.size(); ++i) {
        const float* row = logits.f32() + i * classes;
        Json line;
        line["input"] = names[i];
        line["logits"] = std::vector<float>(row, row + classes);
        line["top5"] = top_k(row, classes, 5);
        lines.push_back(std::move(line));
    }
    return lines;
}

void print(const std::vector<Json>& lines) {
    for (const Json& line : lines) std::cout << line.dump() << '\n';
    std::cout.flush();
}

// --tensor: an NCHW float32 batch ({C, H, W} for one input), to NHWC.
void predict_tensor(const Network& network, const std::string& path, int batch_size) {
    const SafetensorsFile file = read_safetensors(path);
    HFQ_CHECK(!file.tensors.empty(), path, ": holds no tensor");
    const Tensor& t = file.has("input") ? file.get("input") : file.tensors.front().second;
    const std::string name = file.has("input") ? "input" : file.tensors.front().first;
    HFQ_CHECK(t.dtype() == DType::f32 && (t.rank() == 4 || t.rank() == 3), path, ": tensor '", name,
              "' must be float32 NCHW (or CHW), got ", dtype_name(t.dtype()), " ", shape_str(t.shape()));
    const Tensor nchw = t.rank() == 4 ? t : t.reshape({1, t.dim(0), t.dim(1), t.dim(2)});
    const int64_t n = nchw.dim(0), c = nchw.dim(1), h = nchw.dim(2), w = nchw.dim(3);
    HFQ_CHECK(c == network.config.input_channels, path, ": tensor '", name, "' has ", c, " channels, the model takes ",
              network.config.input_channels);
    for (int64_t first = 0; first < n; first += batch_size) {
        const int64_t count = std::min<int64_t>(batch_size, n - first);
        Tensor batch = Tensor::empty({count, h, w, c});
        const float* src = nchw.f32() + first * c * h * w;
        float* dst = batch.f32();
        for (int64_t i = 0; i < count; ++i)
            for (int64_t ch = 0; ch < c; ++ch)
                for (int64_t p = 0; p < h * w; ++p) dst[(i * h * w + p) * c + ch] = src[(i * c + ch) * h * w + p];
        std::vector<std::string> names;
        for (int64_t i = 0; i < count; ++i) names.push_back(cat(path, "[", first + i, "]"));
        print(predict(network, batch, names));
    }
}

// Image files, through the data library's evaluation transform. Returns the
// number of unreadable images (each reported as an "error" line).
int predict_images(const Network& network, const std::vector<std::string>& paths, const Preprocessing& pre,
                   int batch_size) {
    const int channels = network.config.input_channels;
    HFQ_CHECK(channels == 1 || channels == 3, "images need a model with 1 or 3 input channels, not ", channels);
    HFQ_CHECK(static_cast<int>(pre.mean.size()) == channels, "the preprocessing metadata has ", pre.mean.size(),
              " mean values for a model with ", channels, " input channels");
    ImageTransformOptions transform;
    transform.size = pre.crop_size;
    transform.train = false;
    transform.eval_crop_fraction = double(pre.crop_size) / pre.resize_size;
    transform.dct_scaling = false;  // full-resolution decode: the reference pipeline's pixels
    if (channels == 3) {
        for (int c = 0; c < 3; ++c) {
            transform.normalization.mean[c] = static_cast<float>(pre.mean[c]);
            transform.normalization.std[c] = static_cast<float>(pre.std[c]);
        }
    }  // 1 channel: RGB in [0, 1] (mean 0, std 1), converted to grey below
    std::vector<ImageFolder::Sample> samples;
    for (const std::string& p : paths) samples.push_back({p, 0});
    const ImageFolder images(samples, {"unknown"}, transform);

    const int64_t side = pre.crop_size, pixels = side * side;
    Tensor rgb = Tensor::empty({side, side, 3});
    Rng unused;  // evaluation draws no random numbers
    int failures = 0;
    for (size_t first = 0; first < paths.size(); first += batch_size) {
        const size_t count = std::min<size_t>(batch_size, paths.size() - first);
        Tensor batch = Tensor::empty({static_cast<int64_t>(count), side, side, channels});
        std::vector<Json> lines(count);  // in input order; unreadable ones get an "error" line
        std::vector<size_t> slots;       // lines[] index of each image in the batch
        std::vector<std::string> names;
        for (size_t i = 0; i < count; ++i) {
            const std::string& path = paths[first + i];
            float* dst = batch.f32() + names.size() * pixels * channels;
            try {
                if (channels == 3) {
                    images.load(static_cast<int64_t>(first + i), unused, dst);
                } else {
                    // Luma as PIL's convert("L") and torchvision's Grayscale.
                    images.load(static_cast<int64_t>(first + i), unused, rgb.f32());
                    const float* s = rgb.f32();
                    for (int64_t p = 0; p < pixels; ++p) {
                        const float grey = 0.299f * s[3 * p] + 0.587f * s[3 * p + 1] + 0.114f * s[3 * p + 2];
                        dst[p] = static_cast<float>((grey - pre.mean[0]) / pre.std[0]);
                    }
                }
                names.push_back(path);
                slots.push_back(i);
            } catch (const Error& e) {  // unreadable: report it, go on with the others
                lines[i]["input"] = path;
                lines[i]["error"] = e.what();
                ++failures;
            }
        }
        if (!names.empty()) {
            std::vector<Json> results = predict(network, batch.slice0(0, static_cast<int64_t>(names.size())), names);
            for (size_t k = 0; k < slots.size(); ++k) lines[slots[k]] = std::move(results[k]);
        }
        print(lines);
    }
    return failures;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Classify images or a tensor batch with a MobileNet checkpoint or export (JSON lines on stdout)"};
    Options o;
    app.add_option("--weights", o.weights, "checkpoint or export (.safetensors)")->required()->check(CLI::ExistingFile);
    app.add_option("--tensor", o.tensor, "safetensors file with an NCHW float32 batch ('input' or the first tensor)")
        ->check(CLI::ExistingFile);
    app.add_option("images", o.images, "JPEG or PNG files");
    app.add_option("--arch", o.arch, "v1 or v2: architecture when the checkpoint has no hfq.model metadata")
        ->check(CLI::IsMember({"v1", "v2", "mobilenet_v1", "mobilenet_v2"}));
    app.add_option("--width", o.width, "width multiplier (with --arch)")->capture_default_str();
    app.add_option("--classes", o.classes, "number of classes (with --arch)")->capture_default_str();
    app.add_option("--input-channels", o.input_channels, "1 or 3 (with --arch)")->capture_default_str();
    app.add_flag("--small-input", o.small_input, "small-input variant (with --arch)");
    app.add_option("--batch-size", o.batch_size, "inputs per forward pass")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    app.add_flag("--integer", o.integer,
                 "run the integer engine: the default for a W4A8 export; a W4A8 QAT checkpoint is exported to a "
                 "temporary file for it");
    app.add_flag("--fake-quant", o.fake_quant,
                 "for a W4A8 export: run the model rebuilt from it (float arithmetic), not the integer engine");
    CLI11_PARSE(app, argc, argv);

    try {
        HFQ_CHECK(o.tensor.empty() != o.images.empty(), "give image files or --tensor FILE (one of them)");
        const SafetensorsFile file = read_safetensors(o.weights);
        const Network network = choose_network(o, file);
        if (!o.tensor.empty()) {
            predict_tensor(network, o.tensor, o.batch_size);
            return 0;
        }
        const Preprocessing pre = choose_preprocessing(file, network.config.input_channels);
        return predict_images(network, o.images, pre, o.batch_size) == 0 ? 0 : 2;
    } catch (const std::exception& e) {
        std::cerr << "mobilenet_predict: " << e.what() << '\n';
        return 1;
    }
}
