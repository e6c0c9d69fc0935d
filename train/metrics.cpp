#include "train/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "engine/check.h"
#include "quant/activation_quantizer.h"
#include "quant/quantize_model.h"

namespace hfq {

MetricsLog::MetricsLog(const std::string& path) : path_(path), file_(std::fopen(path.c_str(), "a")) {
    HFQ_CHECK(file_ != nullptr, path, ": cannot open the metrics file for appending");
}

MetricsLog::~MetricsLog() {
    if (file_) std::fclose(file_);
}

void MetricsLog::write(const Json& record) {
    if (!file_) return;
    const std::string line = record.dump() + "\n";
    HFQ_CHECK(std::fwrite(line.data(), 1, line.size(), file_) == line.size() && std::fflush(file_) == 0, path_,
              ": cannot write the metrics line");
}

namespace {

// NaN (not available yet) becomes null.
Json number(double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); }

Json diagnostics_json(const quant::QuantizerDiagnostics& d) {
    Json j;
    j["step"] = d.step;
    if (!d.exponents.empty()) j["exponents"] = d.exponents;
    else j["scales"] = d.scales;
    if (!d.continuous_exponents.empty()) j["continuous_exponents"] = d.continuous_exponents;
    j["flips"] = d.flips;
    j["error_per_element"] = number(d.error_per_element);
    j["clipped_fraction"] = number(d.clipped_fraction);
    j["codes_changed_fraction"] = number(d.codes_changed_fraction);
    return j;
}

}  // namespace

Json quantizer_diagnostics(Model& model) {
    Json layers = Json::array();
    for (const quant::QuantizedLayer& l : quant::quantized_layers(model)) {
        Json j = {{"layer", l.name}, {"kind", l.kind}, {"bits", l.quantizer->grid().bits}};
        j.update(diagnostics_json(l.quantizer->report()));
        layers.push_back(std::move(j));
    }
    for (const quant::QuantizedActivationSite& a : quant::quantized_activations(model)) {
        Json j = {{"layer", a.name}, {"kind", "activation"}, {"bits", a.quantizer->grid().bits}};
        j.update(diagnostics_json(a.quantizer->report()));
        layers.push_back(std::move(j));
    }
    return layers;
}

Json quantizer_exponents(Model& model) {
    Json layers = Json::array();
    for (const quant::QuantizedLayer& l : quant::quantized_layers(model)) {
        // The exponents evaluation uses: what integer_form reports, without changing any state.
        Json j = {{"layer", l.name}, {"kind", l.kind}, {"bits", l.quantizer->grid().bits}};
        const quant::QuantizerDiagnostics d = l.quantizer->report();
        if (!d.exponents.empty()) j["exponents"] = d.exponents;
        else j["scales"] = d.scales;
        layers.push_back(std::move(j));
    }
    for (const quant::QuantizedActivationSite& a : quant::quantized_activations(model))
        layers.push_back({{"layer", a.name}, {"kind", "activation"}, {"bits", a.quantizer->grid().bits},
                          {"exponents", {a.quantizer->exponent()}}});
    return layers;
}

ProgressMode parse_progress_mode(const std::string& option) {
    if (option == "bar") return ProgressMode::bar;
    if (option == "lines") return ProgressMode::lines;
    if (option == "none") return ProgressMode::none;
    HFQ_CHECK(option == "auto", "--progress must be auto, bar, lines or none, got '", option, "'");
    return isatty(STDOUT_FILENO) ? ProgressMode::bar : ProgressMode::lines;
}

std::string format_duration(double seconds) {
    const int64_t s = std::max<int64_t>(0, std::llround(seconds));
    char buf[32];
    if (s >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(s / 3600),
                                 (long long)(s / 60 % 60), (long long)(s % 60));
    else std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(s / 60), (long long)(s % 60));
    return buf;
}

void Progress::update(const State& s, bool logged) {
    if (mode_ == ProgressMode::none) return;
    const std::string counters = cat(s.stage, " epoch ", s.epoch, "/", s.epochs, " step ", s.step, "/", s.steps);
    char numbers[160];
    std::snprintf(numbers, sizeof numbers, "loss %.4f  lr %.3g  %.0f img/s  ETA %s", s.loss, s.lr,
                  s.images_per_second, format_duration(s.eta_seconds).c_str());
    if (mode_ == ProgressMode::lines) {
        if (logged) std::printf("%s  %s\n", counters.c_str(), numbers);
        std::fflush(stdout);
        return;
    }
    const auto now = std::chrono::steady_clock::now();
    if (bar_shown_ && s.step < s.steps && now - last_draw_ < std::chrono::milliseconds(200)) return;
    last_draw_ = now;
    constexpr int kWidth = 24;
    const int filled = s.steps ? static_cast<int>(kWidth * s.step / s.steps) : kWidth;
    const std::string bar = std::string(filled, '#') + std::string(kWidth - filled, '.');
    std::printf("\r\033[K%s [%s] %s", counters.c_str(), bar.c_str(), numbers);
    std::fflush(stdout);
    bar_shown_ = true;
}

void Progress::message(const std::string& text) {
    if (mode_ == ProgressMode::none) return;
    clear();
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
}

void Progress::clear() {
    if (!bar_shown_) return;
    std::printf("\r\033[K");
    std::fflush(stdout);
    bar_shown_ = false;
}

}  // namespace hfq
