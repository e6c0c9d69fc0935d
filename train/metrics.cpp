#include "train/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "engine/check.h"
#include "quant/diagnostics_table.h"

namespace hfq {

namespace {

// Whether the file exists and its last byte is not a newline: the last line
// of a run killed while writing it.
bool ends_inside_a_line(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return false;
    int last = '\n';
    if (std::fseek(f, -1, SEEK_END) == 0) last = std::fgetc(f);
    std::fclose(f);
    return last != '\n';
}

}  // namespace

MetricsLog::MetricsLog(const std::string& path) : path_(path) {
    const bool broken_last_line = ends_inside_a_line(path);
    file_ = std::fopen(path.c_str(), "a");
    HFQ_CHECK(file_ != nullptr, path, ": cannot open the metrics file for appending");
    // End the broken line, so the next record starts a line of its own and
    // readers can skip the broken one.
    if (broken_last_line) HFQ_CHECK(std::fputc('\n', file_) != EOF, path, ": cannot write the metrics line");
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

Json quantizer_diagnostics(Model& model) { return Json(quant::diagnostics_json(quant::collect_diagnostics(model))); }

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
    if (s >= 3600)
        std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(s / 3600), (long long)(s / 60 % 60),
                      (long long)(s % 60));
    else
        std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(s / 60), (long long)(s % 60));
    return buf;
}

bool Progress::due(bool logged) const {
    switch (mode_) {
        case ProgressMode::none: return false;
        case ProgressMode::lines: return logged;
        case ProgressMode::bar:
            return !bar_shown_ || std::chrono::steady_clock::now() - last_draw_ >= std::chrono::milliseconds(200);
    }
    return false;
}

void Progress::update(const State& s) {
    if (mode_ == ProgressMode::none) return;
    const std::string counters = cat(s.stage, " epoch ", s.epoch, "/", s.epochs, " step ", s.step, "/", s.steps);
    char numbers[160];
    std::snprintf(numbers, sizeof numbers, "loss %.4f  lr %.3g  %.0f img/s  ETA %s", s.loss, s.lr, s.images_per_second,
                  format_duration(s.eta_seconds).c_str());
    if (mode_ == ProgressMode::lines) {
        std::printf("%s  %s\n", counters.c_str(), numbers);
    } else {
        constexpr int kWidth = 24;
        const int filled = s.steps ? static_cast<int>(kWidth * s.step / s.steps) : kWidth;
        const std::string bar = std::string(filled, '#') + std::string(kWidth - filled, '.');
        std::printf("\r\033[K%s [%s] %s", counters.c_str(), bar.c_str(), numbers);
        last_draw_ = std::chrono::steady_clock::now();
        bar_shown_ = true;
    }
    std::fflush(stdout);
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
