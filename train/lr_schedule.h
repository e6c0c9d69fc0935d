// Learning-rate schedules, as a factor of the base learning rate at each step
// (every optimizer of a stage multiplies its own base rate by it, so the
// quantizer parameters' rate follows the same shape as the weights').
//
//   warm-up      steps [0, warmup): linear from 1/warmup up to 1 (step t gets (t + 1) / warmup)
//   then, with s = t - warmup and S = total - warmup:
//   cosine       0.5 (1 + cos(pi s / S))                (default; reaches 0 after the last step)
//   step         gamma ^ floor(s / step_size)
//   constant     1
//   and never below min_factor.
// The factor depends on the step alone, so a resumed run continues the
// schedule exactly.
#pragma once
#include <cstdint>
#include <string>

namespace hfq {

enum class ScheduleKind { cosine, step, constant };
ScheduleKind parse_schedule(const std::string& name);  // "cosine", "step", "constant"
const char* schedule_name(ScheduleKind k);

struct LrSchedule {
    ScheduleKind kind = ScheduleKind::cosine;
    int64_t total_steps = 1;  // steps of the stage
    int64_t warmup_steps = 0;
    int64_t step_size = 1;    // step schedule: steps between decays
    double gamma = 0.1;       // step schedule: decay factor
    double min_factor = 0.0;  // floor of the factor

    // Throws hfq::Error naming the bad field.
    void validate() const;
    // The factor for step t (0-based, t < total_steps).
    double factor(int64_t t) const;
};

}  // namespace hfq
