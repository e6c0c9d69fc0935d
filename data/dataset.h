// Dataset: the interface the Loader runs, and the Batch it produces.
//
// A dataset is a list of labelled samples. Loading sample i writes it, already
// augmented and normalized, into one slot of a batch tensor; the random
// numbers for the augmentation come from an Rng the caller derives from
// (seed, epoch, i), so a sample's pixels never depend on which thread loaded
// it or when.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "engine/check.h"
#include "engine/random.h"
#include "engine/tensor.h"

namespace hfq {

// Thrown by Dataset::load when the stored sample cannot be decoded (corrupt or
// truncated file, unreadable file). The Loader skips and counts these; any
// other exception is a real failure and stops the run.
struct UnreadableSample : Error {
    using Error::Error;
};

// How many unreadable samples the Loader tolerates by default, as a fraction
// of the dataset (LoaderOptions::max_bad_fraction; train_mobilenet's
// --max-bad-fraction).
inline constexpr double kDefaultMaxBadFraction = 0.01;

class Dataset {
public:
    virtual ~Dataset() = default;

    virtual int64_t size() const = 0;
    virtual int num_classes() const = 0;
    // Shape of one loaded sample: {H, W, C} (the engine's NHWC minus N).
    virtual Shape sample_shape() const = 0;
    virtual int32_t label(int64_t index) const = 0;
    // Where sample `index` comes from (a file path, or "file[index]"), for messages.
    virtual std::string name(int64_t index) const = 0;
    // Writes sample `index` as H*W*C normalized floats in HWC order to `out`,
    // drawing augmentation decisions from `rng`. Thread-safe (the Loader calls
    // it from several threads at once). Throws UnreadableSample, naming the
    // file, when the sample's data cannot be decoded.
    virtual void load(int64_t index, Rng& rng, float* out) const = 0;
};

// A sample that could not be read and was replaced by another.
struct SkippedSample {
    int64_t index = 0;   // dataset index of the unreadable sample
    std::string reason;  // the UnreadableSample message (names the file)
};

struct Batch {
    Tensor images;                 // f32 {N, H, W, C}, normalized
    std::vector<int32_t> labels;   // {N}
    std::vector<int64_t> indices;  // {N}: dataset index held by each slot
    int64_t epoch = 0;
    int64_t index = 0;                   // position of this batch within its epoch
    std::vector<SkippedSample> skipped;  // unreadable samples replaced in this batch
    int64_t size() const { return static_cast<int64_t>(labels.size()); }
};

}  // namespace hfq
