#include "quant/diagnostics_table.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "quant/activation_quantizer.h"
#include "quant/quantize_model.h"

namespace hfq::quant {
namespace {

template <class T>
std::string range(const std::vector<T>& v, const char* fmt) {
    if (v.empty()) return "-";
    const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    char a[32], b[32];
    std::snprintf(a, sizeof a, fmt, double(*lo));
    std::snprintf(b, sizeof b, fmt, double(*hi));
    return *lo == *hi ? std::string(a) : std::string(a) + ".." + b;
}

std::string number(double v, const char* fmt) {
    if (std::isnan(v)) return "-";
    char s[32];
    std::snprintf(s, sizeof s, fmt, v);
    return s;
}

nlohmann::json nullable(double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); }

}  // namespace

std::vector<LayerDiagnostics> collect_diagnostics(Model& model) {
    std::vector<LayerDiagnostics> rows;
    for (const QuantizedLayer& l : quantized_layers(model))
        rows.push_back(
            {l.name, l.kind, l.quantizer->options().bits, l.quantizer->options().per_channel, l.quantizer->report()});
    for (const QuantizedActivationSite& a : quantized_activations(model))
        rows.push_back({a.name, "activation", a.quantizer->grid().bits, false, a.quantizer->report()});
    return rows;
}

std::string diagnostics_table(const std::vector<LayerDiagnostics>& rows) {
    size_t name_width = 5;
    for (const LayerDiagnostics& r : rows) name_width = std::max(name_width, r.name.size());
    std::string out;
    char line[512];
    std::snprintf(line, sizeof line, "%-*s  %-16s  %4s  %-12s  %5s  %-9s  %7s  %7s  %s\n", int(name_width), "layer",
                  "kind", "bits", "exponent", "flips", "err/elt", "clip%", "chg%", "e");
    out += line;
    for (const LayerDiagnostics& r : rows) {
        const QuantizerDiagnostics& d = r.report;
        const std::string exponent = !d.exponents.empty() ? range(d.exponents, "%.0f")
                                     : !d.scales.empty()  ? "s=" + range(d.scales, "%.3g")
                                                          : "-";
        std::snprintf(line, sizeof line, "%-*s  %-16s  %4d  %-12s  %5lld  %-9s  %7s  %7s  %s\n", int(name_width),
                      r.name.c_str(), r.kind.c_str(), r.bits, exponent.c_str(), (long long)d.flips,
                      number(d.error_per_element, "%.2e").c_str(), number(100 * d.clipped_fraction, "%.3f").c_str(),
                      number(100 * d.codes_changed_fraction, "%.2f").c_str(),
                      range(d.continuous_exponents, "%.3f").c_str());
        out += line;
    }
    return out;
}

nlohmann::json diagnostics_json(const std::vector<LayerDiagnostics>& rows) {
    nlohmann::json out = nlohmann::json::array();
    for (const LayerDiagnostics& r : rows) {
        const QuantizerDiagnostics& d = r.report;
        nlohmann::json j;
        j["name"] = r.name;
        j["kind"] = r.kind;
        j["bits"] = r.bits;
        j["per_channel"] = r.per_channel;
        j["method"] = d.method;
        j["step"] = d.step;
        j["exponents"] = d.exponents;
        j["scales"] = d.scales;
        j["continuous_exponents"] = d.continuous_exponents;
        j["flips"] = d.flips;
        j["flips_per_group"] = d.flips_per_group;
        j["error_per_element"] = nullable(d.error_per_element);
        j["clipped_fraction"] = nullable(d.clipped_fraction);
        j["codes_changed_fraction"] = nullable(d.codes_changed_fraction);
        out.push_back(j);
    }
    return out;
}

}  // namespace hfq::quant
