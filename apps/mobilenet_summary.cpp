// mobilenet_summary: the per-layer table of a MobileNet (output shape,
// parameters, multiply-accumulates per image) and its totals, for an
// architecture given on the command line or the one a checkpoint's metadata
// describes.
//
//   mobilenet_summary --arch v1                       # V1, width 1.0, 1000 classes, 224x224
//   mobilenet_summary --arch v2 --width 0.5 --res 96
//   mobilenet_summary --weights runs/x/final.safetensors --res 32
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "engine/check.h"
#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "layers/model.h"
#include "layers/summary.h"

using namespace hfq;

int main(int argc, char** argv) {
    CLI::App app{"mobilenet_summary: per-layer output shapes, parameters and MACs of a MobileNet"};
    std::string arch = "v1", weights;
    ModelConfig config;
    config.width = 1.0;
    int res = 224;
    bool small_input = false;
    app.add_option("--arch", arch, "v1 or v2")->capture_default_str()->check(CLI::IsMember({"v1", "v2"}));
    app.add_option("--width", config.width, "width multiplier")->capture_default_str();
    app.add_option("--classes", config.classes, "number of classes")->capture_default_str();
    app.add_option("--input-channels", config.input_channels, "1 or 3")->capture_default_str();
    app.add_flag("--small-input", small_input, "small-image stem (stride 1)");
    app.add_option("--weights", weights, "take the architecture from this checkpoint's hfq.model metadata instead")
        ->check(CLI::ExistingFile);
    app.add_option("--res", res, "input resolution (res x res)")->capture_default_str()->check(CLI::Range(8, 4096));
    CLI11_PARSE(app, argc, argv);
    try {
        if (!weights.empty()) {
            const std::optional<ModelConfig> stored = checkpoint_model_config(read_safetensors(weights));
            HFQ_CHECK(stored.has_value(), weights, ": the checkpoint has no hfq.model metadata; use --arch");
            config = *stored;
        } else {
            config.arch = parse_arch(arch);
            config.small_input = small_input;
        }
        auto model = build_model(config);
        const ModelSummary s = summarize(*model, {1, res, res, config.input_channels});
        std::printf("%s\n%s", config.to_json().c_str(), s.to_string().c_str());
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mobilenet_summary: %s\n", e.what());
        return 1;
    }
}
