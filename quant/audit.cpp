#include "quant/audit.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "engine/check.h"
#include "engine/random.h"
#include "quant/activation_quantizer.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "quant/quantized_layers.h"

namespace hfq::quant {
namespace {

// gamma(n) = n u / (1 - n u), u = 2^-24: a float sum of n terms, in any
// order, with or without fused multiply-adds, is within gamma(n) times the
// sum of the terms' magnitudes of the exact sum (Higham, Accuracy and
// Stability of Numerical Algorithms, Lemma 3.1).
double gamma(double n) {
    const double nu = n * 0x1p-24;
    return nu / (1 - nu);
}

// The layer computed from the export alone, the way integer hardware does:
// per output, sum x * code (in double, so no rounding on the way), then one
// rounding of sum * scale + bias. `magnitude` receives, per output,
// sum |x code| s + |bias|, what the output's rounding bounds are made of.
Tensor reference_output(const IntegerLayer& l, const Tensor& x, std::vector<double>& magnitude) {
    const Tensor& codes = l.codes();
    const int8_t* q = codes.data<int8_t>();
    const int64_t out_ch = codes.dim(0);
    auto finish = [&](double acc, double acc_abs, int64_t o) {
        const float s = l.scales()[l.scales().size() == 1 ? 0 : o];
        magnitude.push_back(acc_abs * s + std::fabs(l.bias().f32()[o]));
        return float(acc * s + l.bias().f32()[o]);
    };
    magnitude.clear();
    if (!l.is_conv()) {  // x {N, in}, codes {out, in}
        const int64_t n = x.dim(0), in = x.dim(1);
        Tensor y = Tensor::empty({n, out_ch});
        for (int64_t b = 0; b < n; ++b)
            for (int64_t o = 0; o < out_ch; ++o) {
                double acc = 0, acc_abs = 0;
                for (int64_t i = 0; i < in; ++i) {
                    acc += double(x.f32()[b * in + i]) * q[o * in + i];
                    acc_abs += std::fabs(double(x.f32()[b * in + i]) * q[o * in + i]);
                }
                y.f32()[b * out_ch + o] = finish(acc, acc_abs, o);
            }
        return y;
    }
    // x {N, H, W, C} (NHWC), codes {O, C/groups, K, K} (OIHW)
    const Conv2dParams& p = l.params();
    const int64_t n = x.dim(0), h = x.dim(1), w = x.dim(2), c = x.dim(3);
    const int64_t cg = codes.dim(1), k = codes.dim(2), og = out_ch / p.groups;
    const ConvExtent rows = conv_extent(h, k, p), cols = conv_extent(w, k, p);
    const int64_t ho = rows.out, wo = cols.out, ph = rows.pad_before, pw = cols.pad_before;
    Tensor y = Tensor::empty({n, ho, wo, out_ch});
    for (int64_t b = 0; b < n; ++b)
        for (int64_t oy = 0; oy < ho; ++oy)
            for (int64_t ox = 0; ox < wo; ++ox)
                for (int64_t o = 0; o < out_ch; ++o) {
                    const int64_t c0 = (o / og) * cg;
                    double acc = 0, acc_abs = 0;
                    for (int64_t ky = 0; ky < k; ++ky) {
                        const int64_t iy = oy * p.stride - ph + ky;
                        if (iy < 0 || iy >= h) continue;
                        for (int64_t kx = 0; kx < k; ++kx) {
                            const int64_t ix = ox * p.stride - pw + kx;
                            if (ix < 0 || ix >= w) continue;
                            const float* xp = x.f32() + ((b * h + iy) * w + ix) * c + c0;
                            for (int64_t ci = 0; ci < cg; ++ci) {
                                const double term = double(xp[ci]) * q[((o * cg + ci) * k + ky) * k + kx];
                                acc += term;
                                acc_abs += std::fabs(term);
                            }
                        }
                    }
                    y.f32()[((b * ho + oy) * wo + ox) * out_ch + o] = finish(acc, acc_abs, o);
                }
    return y;
}

// The worst |a - b| / (factor * magnitude) over the outputs.
double bound_ratio(const Tensor& a, const Tensor& b, const std::vector<double>& magnitude, double factor) {
    double worst = 0;
    for (int64_t i = 0; i < a.numel(); ++i) {
        const double d = std::fabs(double(a.f32()[i]) - b.f32()[i]);
        if (d > 0) worst = std::max(worst, d / (factor * magnitude[size_t(i)]));
    }
    return worst;
}

// max |a - b| / max |b|
double relative_diff(const Tensor& a, const Tensor& b) {
    HFQ_CHECK(a.shape() == b.shape(), "audit: output shapes differ: ", shape_str(a.shape()), " vs ",
              shape_str(b.shape()));
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < a.numel(); ++i) {
        diff = std::max(diff, std::fabs(double(a.f32()[i]) - b.f32()[i]));
        scale = std::max(scale, std::fabs(double(b.f32()[i])));
    }
    return scale > 0 ? diff / scale : diff;
}

Tensor normal_tensor(const Shape& shape, Rng& rng) {
    Tensor t = Tensor::empty(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = rng.normal();
    return t;
}

int64_t argmax_row(const Tensor& logits, int64_t row) {
    const int64_t k = logits.dim(1);
    const float* p = logits.f32() + row * k;
    return std::max_element(p, p + k) - p;
}

}  // namespace

int64_t AuditReport::weight_mismatches() const {
    int64_t n = 0;
    for (const LayerAudit& l : layers) n += l.weight_mismatches;
    return n;
}

double AuditReport::max_rel_diff() const {
    double m = 0;
    for (const LayerAudit& l : layers) m = std::max({m, l.reference_rel_diff, l.integer_layer_rel_diff});
    return m;
}

double AuditReport::max_bound_ratio() const {
    double m = 0;
    for (const LayerAudit& l : layers) m = std::max({m, l.reference_bound_ratio, l.integer_layer_bound_ratio});
    return m;
}

bool AuditReport::passed() const {
    if (layers.empty() || weight_mismatches() != 0 || activation_mismatches != 0) return false;
    for (const LayerAudit& l : layers)
        if (!l.bias_exact) return false;
    return max_bound_ratio() <= 1;
}

std::string AuditReport::to_string() const {
    size_t width = 5;
    for (const LayerAudit& l : layers) width = std::max(width, l.name.size());
    std::string out;
    char line[512];
    std::snprintf(line, sizeof line, "%-*s  %-16s  %9s  %10s  %4s  %12s  %12s  %9s  %9s\n", int(width), "layer", "kind",
                  "weights", "mismatches", "bias", "ref rel diff", "int rel diff", "ref/bound", "int/bound");
    out += line;
    for (const LayerAudit& l : layers) {
        std::snprintf(line, sizeof line, "%-*s  %-16s  %9lld  %10lld  %4s  %12.3g  %12.3g  %9.3g  %9.3g\n", int(width),
                      l.name.c_str(), l.kind.c_str(), (long long)l.weights, (long long)l.weight_mismatches,
                      l.bias_exact ? "ok" : "DIFF", l.reference_rel_diff, l.integer_layer_rel_diff,
                      l.reference_bound_ratio, l.integer_layer_bound_ratio);
        out += line;
    }
    std::snprintf(line, sizeof line,
                  "audit: %zu layers, %lld weight mismatches, max layer output rel diff %.3g (%.3g of its rounding "
                  "bound); %lld activation exponents, %lld mismatches",
                  layers.size(), (long long)weight_mismatches(), max_rel_diff(), max_bound_ratio(),
                  (long long)activations, (long long)activation_mismatches);
    out += line;
    if (!std::isnan(logits_rel_diff)) {
        std::snprintf(line, sizeof line, "; logits rel diff %.3g, top-1 agreement %.4f", logits_rel_diff,
                      top1_agreement);
        out += line;
    }
    out += passed() ? " -> PASSED\n" : " -> FAILED\n";
    return out;
}

AuditReport audit_export(Model& model, const std::string& export_path, const Tensor& sample_input, uint64_t seed) {
    const SafetensorsFile file = read_safetensors(export_path);
    const bool was_training = model.is_training();
    model.eval();
    NoGradGuard no_grad;
    Rng rng(seed);
    AuditReport report;
    try {
        for (const QuantizedLayer& l : quantized_layers(model)) {
            LayerAudit a;
            a.name = l.name;
            a.kind = l.kind;
            const LayerTensors t = layer_tensors(l);
            IntegerLayer exported(file, l.name);
            // The layer's own arithmetic: a W4A8 model's quantizers at its
            // ends are the integer engine's to check (deploy/integer_engine.h).
            const ActivationEnds::Bypass bare_trained(*l.module), bare_exported(exported);
            // 1. Weights and bias.
            const Tensor trained = l.quantizer->fake_quantize(Variable(t.weight), /*training=*/false).value();
            const Tensor rebuilt = exported.weights();
            HFQ_CHECK(rebuilt.shape() == trained.shape(), export_path, ": layer '", l.name, "' has codes of shape ",
                      shape_str(rebuilt.shape()), " but the model's weight is ", shape_str(trained.shape()));
            a.weights = trained.numel();
            for (int64_t i = 0; i < trained.numel(); ++i) a.weight_mismatches += rebuilt.f32()[i] != trained.f32()[i];
            a.bias_exact = exported.bias().shape() == t.bias.shape() &&
                           std::memcmp(exported.bias().raw(), t.bias.raw(), t.bias.nbytes()) == 0;
            // 2. The layer's output on one input, three ways.
            const Tensor x = t.conv ? normal_tensor({2, 9, 9, t.conv->config().in_channels}, rng)
                                    : normal_tensor({2, t.weight.dim(1)}, rng);
            const Tensor y_trained = l.module->forward(Variable(x)).value();
            std::vector<double> magnitude;
            const Tensor y_reference = reference_output(exported, x, magnitude);
            const Tensor y_integer = exported.forward(Variable(x)).value();
            a.reference_rel_diff = relative_diff(y_reference, y_trained);
            a.integer_layer_rel_diff = relative_diff(y_integer, y_trained);
            const double n = double(exported.codes().numel() / exported.codes().dim(0));  // products per output
            a.reference_bound_ratio = bound_ratio(y_reference, y_trained, magnitude, gamma(n + 3));
            a.integer_layer_bound_ratio = bound_ratio(y_integer, y_trained, magnitude, 2 * gamma(n + 3));
            report.layers.push_back(a);
        }
        for (const QuantizedActivationSite& s : quantized_activations(model)) {
            const Tensor& k = file.get(s.name + ".exp");
            ++report.activations;
            report.activation_mismatches +=
                !(k.dtype() == DType::s32 && k.numel() == 1 && k.data<int32_t>()[0] == s.quantizer->exponent() &&
                  s.quantizer->initialized());
        }
        if (sample_input.defined()) {
            auto rebuilt = build_model_from_export(file);
            const Tensor a = (*rebuilt)(Variable(sample_input)).value();
            const Tensor b = model(Variable(sample_input)).value();
            report.logits_rel_diff = relative_diff(a, b);
            int64_t agree = 0;
            for (int64_t r = 0; r < a.dim(0); ++r) agree += argmax_row(a, r) == argmax_row(b, r);
            report.top1_agreement = double(agree) / double(a.dim(0));
        }
    } catch (...) {
        model.train(was_training);
        throw;
    }
    model.train(was_training);
    return report;
}

}  // namespace hfq::quant
