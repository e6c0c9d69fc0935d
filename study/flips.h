// Exponent flips (docs/quantizers.md, 5): how often a scale group's power-of-two
// exponent changed from one training step to the next. The paper reads
// scale instability from them, and from their count late in training, when
// the learning rate is small and a flip is no longer an adjustment but noise.
#pragma once
#include <cstdint>
#include <span>

namespace hfq::study {

struct FlipCounts {
    int64_t total = 0;  // changes over the whole record
    int64_t late = 0;   // changes at steps after late_window_start()
};

// The last `late_fraction` of `total_steps` training steps are the steps
// t > late_window_start (steps are numbered 1..total_steps; the change from
// step t-1 to step t belongs to step t). 10 steps, 0.2: steps 9 and 10.
int64_t late_window_start(int64_t total_steps, double late_fraction);

// One scale group's exponents: exponents[i] is the exponent used by training
// step steps[i] (increasing). Each entry that differs from the previous one is
// a flip, at its step. With an entry for every step this is exactly the
// quantizer's own count (Quantizer::report); with gaps, a change and its
// reversal inside a gap go unseen.
FlipCounts count_flips(std::span<const int64_t> steps, std::span<const int> exponents, int64_t total_steps,
                       double late_fraction);

}  // namespace hfq::study
