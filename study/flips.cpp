#include "study/flips.h"

#include <cmath>

#include "engine/check.h"

namespace hfq::study {

int64_t late_window_start(int64_t total_steps, double late_fraction) {
    HFQ_CHECK(total_steps >= 0 && late_fraction >= 0 && late_fraction <= 1,
              "late_window_start: needs total_steps >= 0 and a fraction in [0, 1], got ", total_steps, " and ",
              late_fraction);
    return total_steps - std::llround(late_fraction * double(total_steps));
}

FlipCounts count_flips(std::span<const int64_t> steps, std::span<const int> exponents, int64_t total_steps,
                       double late_fraction) {
    HFQ_CHECK(steps.size() == exponents.size(), "count_flips: ", steps.size(), " steps but ", exponents.size(),
              " exponents");
    const int64_t late_start = late_window_start(total_steps, late_fraction);
    FlipCounts c;
    for (size_t i = 1; i < steps.size(); ++i) {
        HFQ_CHECK(steps[i] > steps[i - 1], "count_flips: steps must increase, got ", steps[i - 1], " then ", steps[i]);
        if (exponents[i] == exponents[i - 1]) continue;
        ++c.total;
        if (steps[i] > late_start) ++c.late;
    }
    return c;
}

}  // namespace hfq::study
