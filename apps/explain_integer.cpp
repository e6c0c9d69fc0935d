// explain_integer: the integer arithmetic of one output value of a W4A8
// export, number by number, as deploy/integer_engine.h computes it, re-done
// here from the export's codes and checked against the engine's result.
//
//   explain_integer runs/x/export.safetensors --layer features.1.0 --channel 5 --y 3 --x 4 --image 0
//
// The image is test image `--image` of the data set train_mobilenet would
// use (Fashion-MNIST, or --data DIR), preprocessed as for training.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

#include "deploy/integer_engine.h"
#include "engine/check.h"
#include "engine/ops.h"
#include "engine/random.h"
#include "layers/activation.h"
#include "quant/activation_quantizer.h"
#include "quant/export.h"
#include "train/datasets.h"

using namespace hfq;

namespace {

const deploy::CodeTensor& boundary(const deploy::IntegerEngine::Result& r, const std::string& what,
                                   auto&& matches) {
    for (size_t i = 0; i < r.boundaries.size(); ++i)
        if (matches(r.boundaries[i])) return r.boundaries[i];
    throw Error(cat("no layer boundary ", what));
}

std::string grid_str(const deploy::CodeTensor& c) {
    return cat("2^", c.exponent, " (", c.grid.bits, " bits ", c.grid.is_signed ? "signed" : "unsigned", ", codes ",
               c.grid.is_signed ? -c.grid.qn : 0, "..", c.grid.qp, ")");
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"The integer arithmetic of one output value of a W4A8 export, checked against the integer engine"};
    std::string path, layer_name, data;
    int64_t image = 0, channel = 0, y = 0, x = 0;
    app.add_option("export", path, "export.safetensors of a --activation-bits 8 run")
        ->required()
        ->check(CLI::ExistingFile);
    app.add_option("--layer", layer_name, "the layer (its name in the export, e.g. features.1.0)")->required();
    app.add_option("--channel", channel, "output channel")->capture_default_str();
    app.add_option("--y", y, "output row (convolutions)")->capture_default_str();
    app.add_option("--x", x, "output column (convolutions)")->capture_default_str();
    app.add_option("--image", image, "index in the test set")->capture_default_str();
    app.add_option("--data", data, "data folder, as train_mobilenet --data (default: Fashion-MNIST)");
    CLI11_PARSE(app, argc, argv);
    try {
        const deploy::IntegerEngine engine(path);
        const quant::IntegerLayer* layer = nullptr;
        for (auto& [n, m] : const_cast<Model&>(engine.model()).named_modules())
            if (auto* l = dynamic_cast<quant::IntegerLayer*>(m); l && l->name() == layer_name) layer = l;
        HFQ_CHECK(layer, path, ": no layer '", layer_name, "'");
        TrainConfig config;
        if (!data.empty()) config.data = data;
        const TrainData sets = open_datasets(config);
        HFQ_CHECK(image >= 0 && image < sets.test->size(), "--image ", image, " is outside the ", sets.test->size(),
                  " test images");
        Tensor pixels = Tensor::empty([&] {
            Shape s{1};
            for (int64_t d : sets.test->sample_shape()) s.push_back(d);
            return s;
        }());
        Rng unused;
        sets.test->load(image, unused, pixels.f32());
        const deploy::IntegerEngine::Result r = engine.run(pixels, /*keep_boundaries=*/true);

        // The layer's input codes and its window at (y, x).
        const deploy::CodeTensor& in =
            boundary(r, "named " + layer->input_site(), [&](const auto& c) { return c.site == layer->input_site(); });
        const Tensor& codes = layer->codes();
        const int64_t out = codes.dim(0);
        HFQ_CHECK(channel >= 0 && channel < out, "--channel ", channel, " is outside the layer's ", out, " channels");
        const int e_w = layer->exponents()[layer->exponents().size() == 1 ? 0 : size_t(channel)];
        const int unit = in.exponent + e_w;
        std::vector<int> xs, ws;
        if (layer->is_conv()) {
            const Conv2dParams& p = layer->params();
            const int64_t h = in.shape[1], w = in.shape[2], c = in.shape[3], cg = codes.dim(1), k = codes.dim(2);
            const ConvExtent rows = conv_extent(h, k, p), cols = conv_extent(w, k, p);
            HFQ_CHECK(y >= 0 && y < rows.out && x >= 0 && x < cols.out, "(--y, --x) = (", y, ", ", x,
                      ") is outside the layer's ", rows.out, "x", cols.out, " output");
            const int64_t group = channel / (out / p.groups);
            for (int64_t i = 0; i < cg; ++i)
                for (int64_t ky = 0; ky < k; ++ky)
                    for (int64_t kx = 0; kx < k; ++kx) {
                        const int64_t iy = y * p.stride - rows.pad_before + ky, ix = x * p.stride - cols.pad_before + kx;
                        const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
                        xs.push_back(inside ? in.codes[size_t((iy * w + ix) * c + group * cg + i)] : 0);
                        ws.push_back(codes.data<int8_t>()[((channel * cg + i) * k + ky) * k + kx]);
                    }
        } else {
            for (int64_t i = 0; i < codes.dim(1); ++i) {
                xs.push_back(in.codes[size_t(i)]);
                ws.push_back(codes.data<int8_t>()[channel * codes.dim(1) + i]);
            }
            y = x = 0;
        }
        int64_t sum = 0, nonzero = 0;
        std::string terms;
        for (size_t i = 0; i < xs.size(); ++i) {
            sum += int64_t(xs[i]) * ws[i];
            if (xs[i] != 0 && ws[i] != 0) terms += cat(nonzero++ ? " + " : "", xs[i], "*", ws[i]);
        }
        const int64_t bias = layer->bias_code().data<int32_t>()[channel], acc = sum + bias;
        std::printf("layer %s, output channel %lld at (%lld, %lld) of test image %lld (label %d)\n", layer_name.c_str(),
                    (long long)channel, (long long)y, (long long)x, (long long)image, sets.test->label(image));
        std::printf("  input  %s: codes on %s\n", in.site.c_str(), grid_str(in).c_str());
        std::printf("  weights: codes on 2^%d (this channel), accumulator unit 2^(%d + %d) = 2^%d\n", e_w,
                    in.exponent, e_w, unit);
        std::printf("  %zu products, %lld nonzero: %s\n", xs.size(), (long long)nonzero,
                    nonzero <= 40 ? terms.c_str() : "(more than 40: not listed)");
        std::printf("  sum = %lld, bias code %lld, accumulator = %lld (value %lld * 2^%d = %.9g)\n", (long long)sum,
                    (long long)bias, (long long)acc, (long long)acc, unit, std::ldexp(double(acc), unit));
        if (!layer->is_conv()) {
            std::printf("  logit = float(%lld) * 2^%d = %.9g\n", (long long)acc, unit,
                        std::ldexp(float(acc), unit));
            return 0;
        }
        // The requantization to the next grid.
        const deploy::CodeTensor& next = boundary(r, "after " + layer_name, [&](const auto& c) {
            return c.producer == layer_name;
        });
        bool relu6 = false;
        try {
            if (auto* a = dynamic_cast<quant::QuantizedActivation*>(&const_cast<Model&>(engine.model()).find(next.site)))
                relu6 = dynamic_cast<ReLU6*>(&a->activation()) != nullptr;
        } catch (const Error&) {  // an output quantizer: not a module of its own name
        }
        const int shift = next.exponent - unit;
        int64_t lo = next.grid.is_signed ? -next.grid.qn : 0, hi = next.grid.qp;
        const int64_t six = deploy::shift_round_half_even(6, next.exponent);  // ReLU6's 6 in codes
        if (relu6) hi = std::min(hi, six);
        const int64_t rounded = deploy::shift_round_half_even(acc, shift), code = std::clamp(rounded, lo, hi);
        std::printf("  next grid %s%s: %s\n", next.site.c_str(), relu6 ? " (after ReLU6)" : "", grid_str(next).c_str());
        std::printf("  shift %d: round_half_even(%lld / 2^%d) = round_half_even(%.6g) = %lld, clamp to [%lld, %lld]%s"
                    " -> code %lld (value %.9g)\n",
                    shift, (long long)acc, shift, std::ldexp(double(acc), -shift), (long long)rounded, (long long)lo,
                    (long long)hi, relu6 ? (" (ReLU6: 6 is the code " + std::to_string(six) + ")").c_str() : "", (long long)code,
                    std::ldexp(double(code), next.exponent));
        const int64_t index = (y * next.shape[2] + x) * next.shape[3] + channel;
        const int engine_code = next.codes[size_t(index)];
        std::printf("  the integer engine's code: %d (%s)\n", engine_code, engine_code == code ? "equal" : "DIFFERENT");
        return engine_code == code ? 0 : 3;
    } catch (const std::exception& e) {
        std::cerr << "explain_integer: " << e.what() << '\n';
        return 1;
    }
}
