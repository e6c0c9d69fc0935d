#include "quant/quantize_weights.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "engine/check.h"
#include "engine/safetensors.h"

namespace hfq::quant {
namespace {

bool same_file(const std::string& a, const std::string& b) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::exists(a, ec) && fs::exists(b, ec)) return fs::equivalent(a, b, ec);
    return fs::weakly_canonical(a, ec) == fs::weakly_canonical(b, ec);
}

}  // namespace

QuantizeWeightsReport quantize_weights(const std::string& in, const std::string& out, const std::string& method,
                                       const QuantizerOptions& options) {
    make_quantizer(method, options, {1});  // the method name and options, before any file is touched
    HFQ_CHECK(!same_file(in, out), "quantize_weights: the output ", out,
              " is the input file; refusing to overwrite it");
    const SafetensorsFile file = read_safetensors(in);

    QuantizeWeightsReport report;
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [name, t] : file.tensors) {
        if (t.dtype() != DType::f32 || t.rank() < 2 || t.numel() == 0) {
            report.skipped.push_back(name);
            continue;
        }
        // A fresh quantizer evaluates as its first training step would choose.
        auto q = make_quantizer(method, options, t.shape());
        Quantizer::IntegerForm form;
        try {
            form = q->integer_form(t);
        } catch (const Error& e) {
            throw Error(cat(in, ": tensor '", name, "': ", e.what()));
        }
        const ScaleGroups& groups = q->groups();
        QuantizedTensorInfo info{name, t.shape(), form.exponent, form.scale, std::vector<double>(groups.count, 0.0)};
        Tensor codes = Tensor::empty(t.shape(), DType::s8);
        Tensor err = Tensor::empty({groups.count});
        for (int64_t gi = 0; gi < groups.count; ++gi) {
            double sum = 0;  // sum (x - s code)^2, y = s code exactly as fake_quantize computes it
            for (int64_t i = gi * groups.size; i < (gi + 1) * groups.size; ++i) {
                const int16_t c = form.codes[i];
                HFQ_CHECK(c >= -128 && c <= 127, in, ": tensor '", name, "': the code ", c, " does not fit int8");
                codes.data<int8_t>()[i] = static_cast<int8_t>(c);
                const double d = double(t.f32()[i]) - double(form.scale[gi] * float(c));
                sum += d * d;
            }
            info.errors[gi] = sum;
            err.f32()[gi] = float(sum);
        }
        tensors.emplace_back(name + ".q", codes);
        if (!form.exponent.empty()) {
            Tensor e = Tensor::empty({groups.count}, DType::s32);
            std::copy(form.exponent.begin(), form.exponent.end(), e.data<int32_t>());
            tensors.emplace_back(name + ".exp", e);
        } else {
            tensors.emplace_back(name + ".scale", Tensor::from_vector({groups.count}, form.scale));
        }
        tensors.emplace_back(name + ".err", err);
        report.tensors.push_back(std::move(info));
    }
    HFQ_CHECK(!report.tensors.empty(), in, ": no float tensor of rank 2 or more to quantize");

    nlohmann::ordered_json meta;
    meta["method"] = method;
    meta["bits"] = options.bits;
    meta["per_channel"] = options.per_channel;
    meta["rounding"] = exponent_rounding_name(options.rounding);
    meta["source"] = std::filesystem::path(in).filename().string();
    write_safetensors(out, tensors, {{kQuantizeWeightsKey, meta.dump()}});
    return report;
}

std::string quantize_weights_summary(const QuantizeWeightsReport& report) {
    size_t width = 6;
    for (const QuantizedTensorInfo& t : report.tensors) width = std::max(width, t.name.size());
    std::string out;
    char line[512];
    std::snprintf(line, sizeof line, "%-*s  %-18s  %6s  %-14s  %s\n", int(width), "tensor", "shape", "groups",
                  "exponent", "error (sum of squares)");
    out += line;
    for (const QuantizedTensorInfo& t : report.tensors) {
        std::string scale;
        if (!t.exponents.empty()) {
            const auto [lo, hi] = std::minmax_element(t.exponents.begin(), t.exponents.end());
            scale = *lo == *hi ? std::to_string(*lo) : std::to_string(*lo) + ".." + std::to_string(*hi);
        } else {
            const auto [lo, hi] = std::minmax_element(t.scales.begin(), t.scales.end());
            char s[64];
            std::snprintf(s, sizeof s, *lo == *hi ? "s=%.4g" : "s=%.4g..%.4g", double(*lo), double(*hi));
            scale = s;
        }
        double total = 0;
        for (double e : t.errors) total += e;
        std::snprintf(line, sizeof line, "%-*s  %-18s  %6zu  %-14s  %.6g\n", int(width), t.name.c_str(),
                      shape_str(t.shape).c_str(), t.scales.size(), scale.c_str(), total);
        out += line;
    }
    if (!report.skipped.empty())
        out += cat(report.skipped.size(), " tensor(s) not quantized (rank < 2 or not float)\n");
    return out;
}

}  // namespace hfq::quant
