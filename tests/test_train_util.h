// Helpers for the trainer tests: a small generated image folder (three
// classes of distinct colours and noise, JPEG-encoded with cv::imencode), a
// configuration that trains on it in a few seconds, and file comparisons.
#pragma once
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "engine/random.h"
#include "engine/safetensors.h"
#include "tests/test_data_util.h"
#include "train/config.h"

namespace hfq::test {

// root/train/<class>/*.jpg and root/val/<class>/*.jpg, 24x24 pixels: class c
// is a blob of colour c on a noisy background at a random place.
inline void make_image_folder(const std::string& root, int train_per_class = 16, int val_per_class = 6) {
    const cv::Vec3b colours[] = {{230, 40, 40}, {40, 200, 60}, {50, 60, 220}};  // BGR for imencode
    Rng rng(99);
    for (const char* split : {"train", "val"})
        for (int c = 0; c < 3; ++c) {
            const int n = std::string(split) == "train" ? train_per_class : val_per_class;
            for (int i = 0; i < n; ++i) {
                cv::Mat image(24, 24, CV_8UC3);
                const int cx = 6 + static_cast<int>(rng.below(12)), cy = 6 + static_cast<int>(rng.below(12));
                for (int y = 0; y < 24; ++y)
                    for (int x = 0; x < 24; ++x) {
                        const bool inside = (x - cx) * (x - cx) + (y - cy) * (y - cy) < 30;
                        for (int k = 0; k < 3; ++k)
                            image.at<cv::Vec3b>(y, x)[k] =
                                static_cast<uint8_t>(inside ? colours[c][k] : 100 + static_cast<int>(rng.below(60)));
                    }
                std::vector<uint8_t> bytes;
                HFQ_CHECK(cv::imencode(".jpg", image, bytes), "make_image_folder: imencode failed");
                write_bytes(cat(root, "/", split, "/class", c, "/img", i, ".jpg"), bytes);
            }
        }
}

// Trains MobileNetV1 x0.25 on 16x16 images, batch 8, quietly.
inline TrainConfig tiny_config(const std::string& data, const std::string& out) {
    TrainConfig c;
    c.data = data;
    c.out = out;
    c.input_size = 16;
    c.augment = false;  // a random resized crop could cut the coloured blob out
    c.width = 0.25;
    c.batch_size = 8;
    c.epochs = 2;
    c.qat_epochs = 1;
    c.lr = 0.05;
    c.warmup_epochs = 0;
    c.qat_lr = 0.01;
    c.log_every = 2;
    c.threads = 2;
    c.loader_threads = 1;
    c.progress = "none";
    return c;
}

// A run's metrics.jsonl, one JSON object per line; a line that is not JSON
// throws naming the file and the line.
inline std::vector<nlohmann::json> read_metrics(const std::string& path) {
    std::vector<nlohmann::json> lines;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
        const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
        HFQ_CHECK(!j.is_discarded(), path, ": not JSON: ", line);
        lines.push_back(j);
    }
    return lines;
}

// The records of one "type" ("step", "epoch", "stop", ...), in order.
inline std::vector<nlohmann::json> of_type(const std::vector<nlohmann::json>& lines, const std::string& type) {
    std::vector<nlohmann::json> out;
    for (const auto& j : lines)
        if (j.at("type") == type) out.push_back(j);
    return out;
}

inline std::vector<uint8_t> file_bytes(const std::string& path) { return read_bytes(path); }

// The names of the files in a folder, sorted.
inline std::vector<std::string> list_files(const std::string& dir) {
    std::vector<std::string> out;
    if (!std::filesystem::exists(dir)) return out;
    for (const auto& e : std::filesystem::directory_iterator(dir)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
}

inline bool same_bits(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Names of the tensors that differ (or exist in one file only).
inline std::vector<std::string> differing_tensors(const SafetensorsFile& a, const SafetensorsFile& b) {
    std::vector<std::string> out;
    for (const auto& [name, t] : a.tensors)
        if (!b.has(name) || !same_bits(t, b.get(name))) out.push_back(name);
    for (const auto& [name, t] : b.tensors)
        if (!a.has(name)) out.push_back(name);
    return out;
}

}  // namespace hfq::test
