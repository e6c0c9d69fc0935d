// The training and test sets a TrainConfig asks for: Fashion-MNIST or an
// ImageNet-style folder (found by looking at --data), optionally reduced to
// an evenly spaced subset, with the preprocessing a checkpoint records.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "layers/checkpoint.h"
#include "train/config.h"

namespace hfq {

struct TrainData {
    std::string kind;  // "fashion-mnist" or "imagenet"
    std::shared_ptr<const Dataset> train, test;
    int input_size = 0;
    int channels = 0;
    Preprocessing preprocessing;  // the evaluation transform, for checkpoint metadata
};

// Throws hfq::Error naming the folder when it holds neither layout.
TrainData open_datasets(const TrainConfig& config);

// `count` samples of `base`, evenly spaced (sample k is base's k * size / count),
// so a subset of a class-sorted image folder still holds every class.
class SubsetDataset : public Dataset {
public:
    SubsetDataset(std::shared_ptr<const Dataset> base, int64_t count);
    int64_t size() const override { return static_cast<int64_t>(indices_.size()); }
    int num_classes() const override { return base_->num_classes(); }
    Shape sample_shape() const override { return base_->sample_shape(); }
    int32_t label(int64_t index) const override { return base_->label(indices_.at(index)); }
    std::string name(int64_t index) const override { return base_->name(indices_.at(index)); }
    void load(int64_t index, Rng& rng, float* out) const override { base_->load(indices_.at(index), rng, out); }

private:
    std::shared_ptr<const Dataset> base_;
    std::vector<int64_t> indices_;
};

}  // namespace hfq
