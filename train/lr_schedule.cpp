#include "train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "engine/check.h"

namespace hfq {

ScheduleKind parse_schedule(const std::string& name) {
    if (name == "cosine") return ScheduleKind::cosine;
    if (name == "step") return ScheduleKind::step;
    if (name == "constant") return ScheduleKind::constant;
    throw Error(cat("unknown learning-rate schedule '", name, "' (known: cosine, step, constant)"));
}

const char* schedule_name(ScheduleKind k) {
    switch (k) {
        case ScheduleKind::cosine: return "cosine";
        case ScheduleKind::step: return "step";
        case ScheduleKind::constant: return "constant";
    }
    return "?";
}

void LrSchedule::validate() const {
    HFQ_CHECK(total_steps >= 1, "lr schedule: total steps must be >= 1, got ", total_steps);
    HFQ_CHECK(warmup_steps >= 0 && warmup_steps <= total_steps, "lr schedule: warm-up steps must be in 0..",
              total_steps, " (the stage's steps), got ", warmup_steps);
    HFQ_CHECK(step_size >= 1, "lr schedule: step size must be >= 1 step, got ", step_size);
    HFQ_CHECK(gamma > 0 && gamma <= 1, "lr schedule: gamma must be in (0, 1], got ", gamma);
    HFQ_CHECK(min_factor >= 0 && min_factor <= 1, "lr schedule: minimum factor must be in [0, 1], got ", min_factor);
}

double LrSchedule::factor(int64_t t) const {
    if (t < warmup_steps) return std::max(min_factor, double(t + 1) / double(warmup_steps));
    const int64_t s = t - warmup_steps, span = std::max<int64_t>(1, total_steps - warmup_steps);
    double f = 1;
    switch (kind) {
        case ScheduleKind::cosine: f = 0.5 * (1 + std::cos(std::numbers::pi * double(s) / double(span))); break;
        case ScheduleKind::step: f = std::pow(gamma, double(s / step_size)); break;
        case ScheduleKind::constant: break;
    }
    return std::max(min_factor, f);
}

}  // namespace hfq
