// Fashion-MNIST: 28x28 grayscale pictures of clothing in 10 classes, 60,000
// for training and 10,000 for testing, read from the IDX files (gzip-compressed
// or not) that Debian's dataset-fashion-mnist installs under
// /usr/share/datasets/fashion-mnist.
//
// Samples are resized to the model's input size, written as 1 channel or 3
// (replicated), optionally augmented with a random crop from the zero-padded
// image and a horizontal flip, and normalized with the training set's mean and
// standard deviation.
#pragma once
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/image_transform.h"

namespace hfq {

// An IDX file of unsigned bytes, after its header was checked.
struct IdxImages {
    int64_t count = 0;
    int rows = 0, cols = 0;
    std::vector<uint8_t> pixels;  // {count, rows, cols}
};
// Reads an IDX3 image file (magic 2051). Throws hfq::Error naming the file if
// it cannot be read, is truncated or has trailing data, its magic number is
// wrong, or it does not hold `expected_count` images of rows x cols.
IdxImages read_idx_images(const std::string& path, int64_t expected_count, int rows, int cols);
// Reads an IDX1 label file (magic 2049) of `expected_count` labels, each < num_classes.
std::vector<uint8_t> read_idx_labels(const std::string& path, int64_t expected_count, int num_classes);

// Mean 0.2860 and standard deviation 0.3530 of all 60000 * 784 training pixels
// scaled to [0, 1] (computed with numpy from train-images-idx3-ubyte.gz:
// 0.286041 and 0.353024), the same value for every channel.
Normalization fashion_mnist_normalization();

struct FashionMnistOptions {
    std::string dir = "/usr/share/datasets/fashion-mnist";
    bool train_split = true;  // train-* (60,000 images) or t10k-* (10,000)
    int size = 28;            // output size x size
    int channels = 1;         // 1, or 3 with the gray value replicated
    bool augment = false;     // random crop from the padded image + horizontal flip
    int crop_padding = 4;     // zero padding around the resized image for the random crop
    float flip_probability = 0.5f;
    Normalization normalization = fashion_mnist_normalization();
};

class FashionMnist : public Dataset {
public:
    static constexpr int kRows = 28, kCols = 28, kClasses = 10;

    explicit FashionMnist(const FashionMnistOptions& options);

    int64_t size() const override { return images_.count; }
    int num_classes() const override { return kClasses; }
    Shape sample_shape() const override { return {options_.size, options_.size, options_.channels}; }
    int32_t label(int64_t index) const override { return labels_.at(index); }
    std::string name(int64_t index) const override;
    void load(int64_t index, Rng& rng, float* out) const override;

    // The stored 28x28 picture of sample `index`, row-major.
    const uint8_t* pixels(int64_t index) const { return images_.pixels.data() + index * kRows * kCols; }
    const FashionMnistOptions& options() const { return options_; }

private:
    FashionMnistOptions options_;
    std::string images_path_;
    IdxImages images_;
    std::vector<uint8_t> labels_;
};

}  // namespace hfq
