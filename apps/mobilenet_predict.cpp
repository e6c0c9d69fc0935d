// mobilenet_predict: classifies images (or a tensor batch) with a MobileNet
// checkpoint, in evaluation mode.
//
//   mobilenet_predict --weights model.safetensors cat.jpg dog.png
//   mobilenet_predict --weights model.safetensors --tensor batch.safetensors
//   mobilenet_predict --weights mobilenet_v2.safetensors --arch v2 --width 1.0 --classes 1000 img.jpg
//
// Standard output: one JSON object per input, one per line:
//   {"input": "cat.jpg", "logits": [...all classes...], "top5": [[index, probability], ...]}
// An input that cannot be read gives {"input": ..., "error": "..."} and the
// exit status 2; a bad checkpoint or option gives a message on standard error
// and the exit status 1.
//
// The architecture comes from the checkpoint's "hfq.model" metadata, or from
// --arch/--width/--classes/--input-channels/--small-input (needed for
// converted torchvision weights without metadata; they override metadata).
// Images are decoded and preprocessed by the data library as the checkpoint's
// "hfq.preprocessing" says (resize the shorter side, centre crop, normalize),
// ImageNet's 256 / 224 and mean / std without it. --tensor reads an NCHW
// float32 batch: the tensor named "input", else the file's first tensor.
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
#include "engine/check.h"
#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/model.h"

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

// Runs the model on {N, H, W, C}: one JSON line per row.
std::vector<Json> predict(Model& model, const Tensor& batch, const std::vector<std::string>& names) {
    NoGradGuard no_grad;
    const Tensor logits = model(Variable(batch)).value();  // {N, classes}
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
void predict_tensor(Model& model, const std::string& path, int batch_size) {
    const SafetensorsFile file = read_safetensors(path);
    HFQ_CHECK(!file.tensors.empty(), path, ": holds no tensor");
    const Tensor& t = file.has("input") ? file.get("input") : file.tensors.front().second;
    const std::string name = file.has("input") ? "input" : file.tensors.front().first;
    HFQ_CHECK(t.dtype() == DType::f32 && (t.rank() == 4 || t.rank() == 3), path, ": tensor '", name,
              "' must be float32 NCHW (or CHW), got ", dtype_name(t.dtype()), " ", shape_str(t.shape()));
    const Tensor nchw = t.rank() == 4 ? t : t.reshape({1, t.dim(0), t.dim(1), t.dim(2)});
    const int64_t n = nchw.dim(0), c = nchw.dim(1), h = nchw.dim(2), w = nchw.dim(3);
    HFQ_CHECK(c == model.config().input_channels, path, ": tensor '", name, "' has ", c, " channels, the model takes ",
              model.config().input_channels);
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
        print(predict(model, batch, names));
    }
}

// Image files, through the data library's evaluation transform. Returns the
// number of unreadable images (each reported as an "error" line).
int predict_images(Model& model, const std::vector<std::string>& paths, const Preprocessing& pre, int batch_size) {
    const int channels = model.config().input_channels;
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
            std::vector<Json> results = predict(model, batch.slice0(0, static_cast<int64_t>(names.size())), names);
            for (size_t k = 0; k < slots.size(); ++k) lines[slots[k]] = std::move(results[k]);
        }
        print(lines);
    }
    return failures;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Classify images or a tensor batch with a MobileNet checkpoint (JSON lines on standard output)"};
    Options o;
    app.add_option("--weights", o.weights, "checkpoint (.safetensors)")->required()->check(CLI::ExistingFile);
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
    CLI11_PARSE(app, argc, argv);

    try {
        HFQ_CHECK(o.tensor.empty() != o.images.empty(), "give image files or --tensor FILE (one of them)");
        const SafetensorsFile file = read_safetensors(o.weights);
        const ModelConfig config = choose_config(o, file);
        std::shared_ptr<Model> model = build_model(config);
        load_state_dict(*model, file);
        model->eval();
        if (!o.tensor.empty()) {
            predict_tensor(*model, o.tensor, o.batch_size);
            return 0;
        }
        const Preprocessing pre = choose_preprocessing(file, config.input_channels);
        return predict_images(*model, o.images, pre, o.batch_size) == 0 ? 0 : 2;
    } catch (const std::exception& e) {
        std::cerr << "mobilenet_predict: " << e.what() << '\n';
        return 1;
    }
}
