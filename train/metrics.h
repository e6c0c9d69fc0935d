// What a run reports while it trains: metrics as JSON lines (one object per
// line, appended and flushed as they happen, so a crashed run keeps its log),
// the quantizers' diagnostics per layer, and the progress display on the
// terminal.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "layers/model.h"

namespace hfq {

using Json = nlohmann::ordered_json;

// Appends JSON lines to a file. Floating-point NaN and infinities are written
// as null (JSON has no such numbers).
class MetricsLog {
public:
    MetricsLog() = default;  // writes nothing
    explicit MetricsLog(const std::string& path);
    ~MetricsLog();
    MetricsLog(const MetricsLog&) = delete;
    MetricsLog& operator=(const MetricsLog&) = delete;
    void write(const Json& record);

private:
    std::string path_;
    std::FILE* file_ = nullptr;
};

// The quantizers' diagnostics per layer (quant/diagnostics_table.h: exponents,
// flips, error per element, clipped and changed fractions, learnable
// exponents) since the last call, as JSON. Reading them resets the flip
// counts. An empty array for a float model.
Json quantizer_diagnostics(Model& model);

enum class ProgressMode { bar, lines, none };
// "auto": a bar when standard output is a terminal, lines otherwise.
ProgressMode parse_progress_mode(const std::string& option);

// The progress display: a one-line bar redrawn in place (at most 5 times a
// second) on a terminal, or a plain line per logged step.
class Progress {
public:
    struct State {
        std::string stage;              // "float", "qat"
        int64_t epoch = 0, epochs = 0;  // 1-based epoch of the stage
        int64_t step = 0, steps = 0;    // steps done in the stage, of
        double loss = 0;                // running mean since the last log
        double lr = 0;
        double images_per_second = 0;
        double eta_seconds = 0;  // of the whole run
    };
    explicit Progress(ProgressMode mode) : mode_(mode) {}
    ~Progress() { clear(); }
    ProgressMode mode() const { return mode_; }
    // Whether update() is due after a step (`logged`: the step wrote a metrics
    // line, when lines mode prints), so the caller prepares State only then.
    bool due(bool logged) const;
    void update(const State& s);
    // A message on its own line (the bar is redrawn below it by the next update).
    void message(const std::string& text);

private:
    void clear();
    ProgressMode mode_;
    bool bar_shown_ = false;
    std::chrono::steady_clock::time_point last_draw_{};
};

// "1:02:03" or "4:05".
std::string format_duration(double seconds);

}  // namespace hfq
