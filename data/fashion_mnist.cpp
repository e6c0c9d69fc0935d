#include "data/fashion_mnist.h"

#include <algorithm>
#include <climits>
#include <filesystem>

#include <zlib.h>

namespace hfq {

namespace {

// A gzip (or plain) file read with zlib, every failure an error naming it.
class GzReader {
public:
    explicit GzReader(const std::string& path) : path_(path), file_(gzopen(path.c_str(), "rb")) {
        HFQ_CHECK(file_ != nullptr, path, ": cannot open");
    }
    ~GzReader() { gzclose(file_); }
    GzReader(const GzReader&) = delete;
    GzReader& operator=(const GzReader&) = delete;

    // Reads exactly n bytes of `what`.
    void read(uint8_t* dst, size_t n, const char* what) {
        size_t done = 0;
        while (done < n) {
            const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, INT_MAX / 2));
            const int got = gzread(file_, dst + done, chunk);
            check_stream();
            HFQ_CHECK(got > 0, path_, ": truncated: the file ends after ", done, " of the ", n, " bytes of its ", what);
            done += static_cast<size_t>(got);
        }
    }
    // Throws unless the data is over (a longer file is not the file we expect).
    void expect_end() {
        uint8_t extra = 0;
        const int got = gzread(file_, &extra, 1);
        check_stream();
        HFQ_CHECK(got == 0, path_, ": unexpected data after the expected contents (wrong or corrupted file)");
    }

private:
    void check_stream() {
        int code = Z_OK;
        const char* message = gzerror(file_, &code);
        HFQ_CHECK(code == Z_OK || code == Z_STREAM_END, path_, ": truncated or corrupted gzip data (", message, ")");
    }

    std::string path_;
    gzFile file_;
};

uint32_t read_u32_be(GzReader& in, const char* what) {
    uint8_t b[4];
    in.read(b, 4, what);
    return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
}

void check_magic(uint32_t magic, uint32_t expected, const std::string& path, const char* kind) {
    HFQ_CHECK(magic == expected, path, ": magic number ", magic, ", expected ", expected, " (an IDX file of ", kind,
              ")");
}

void check_count(uint32_t count, int64_t expected, const std::string& path, const char* what) {
    HFQ_CHECK(count == expected, path, ": holds ", count, " ", what, ", expected ", expected);
}

// dir/name.gz, else the uncompressed dir/name.
std::string find_idx_file(const std::string& dir, const std::string& name) {
    namespace fs = std::filesystem;
    const fs::path gz = fs::path(dir) / (name + ".gz"), plain = fs::path(dir) / name;
    if (fs::exists(gz)) return gz.string();
    if (fs::exists(plain)) return plain.string();
    throw Error(cat("FashionMnist: neither ", gz.string(), " nor ", plain.string(),
                    " exists (Debian's dataset-fashion-mnist package installs them)"));
}

}  // namespace

IdxImages read_idx_images(const std::string& path, int64_t expected_count, int rows, int cols) {
    GzReader in(path);
    check_magic(read_u32_be(in, "header"), 2051, path, "unsigned-byte images");
    IdxImages images;
    const uint32_t count = read_u32_be(in, "header");
    check_count(count, expected_count, path, "images");
    images.count = count;
    images.rows = static_cast<int>(read_u32_be(in, "header"));
    images.cols = static_cast<int>(read_u32_be(in, "header"));
    HFQ_CHECK(images.rows == rows && images.cols == cols, path, ": images are ", images.rows, "x", images.cols,
              ", expected ", rows, "x", cols);
    images.pixels.resize(static_cast<size_t>(count) * rows * cols);
    in.read(images.pixels.data(), images.pixels.size(), "pixels");
    in.expect_end();
    return images;
}

std::vector<uint8_t> read_idx_labels(const std::string& path, int64_t expected_count, int num_classes) {
    GzReader in(path);
    check_magic(read_u32_be(in, "header"), 2049, path, "unsigned-byte labels");
    const uint32_t count = read_u32_be(in, "header");
    check_count(count, expected_count, path, "labels");
    std::vector<uint8_t> labels(count);
    in.read(labels.data(), labels.size(), "labels");
    in.expect_end();
    for (size_t i = 0; i < labels.size(); ++i)
        HFQ_CHECK(labels[i] < num_classes, path, ": label ", int(labels[i]), " of item ", i, " is not below ",
                  num_classes);
    return labels;
}

Normalization fashion_mnist_normalization() { return {{0.2860f, 0.2860f, 0.2860f}, {0.3530f, 0.3530f, 0.3530f}}; }

FashionMnist::FashionMnist(const FashionMnistOptions& options) : options_(options) {
    const FashionMnistOptions& o = options_;
    HFQ_CHECK(o.size > 0, "FashionMnist: size must be positive, got ", o.size);
    HFQ_CHECK(o.channels == 1 || o.channels == 3, "FashionMnist: channels must be 1 or 3, got ", o.channels);
    HFQ_CHECK(o.crop_padding >= 0, "FashionMnist: crop_padding must not be negative, got ", o.crop_padding);
    HFQ_CHECK(o.flip_probability >= 0 && o.flip_probability <= 1,
              "FashionMnist: flip_probability must be in [0, 1], got ", o.flip_probability);
    const std::string prefix = o.train_split ? "train" : "t10k";
    const int64_t count = o.train_split ? 60000 : 10000;
    images_path_ = find_idx_file(o.dir, prefix + "-images-idx3-ubyte");
    images_ = read_idx_images(images_path_, count, kRows, kCols);
    labels_ = read_idx_labels(find_idx_file(o.dir, prefix + "-labels-idx1-ubyte"), count, kClasses);
}

std::string FashionMnist::name(int64_t index) const { return cat(images_path_, "[", index, "]"); }

void FashionMnist::load(int64_t index, Rng& rng, float* out) const {
    HFQ_CHECK(index >= 0 && index < size(), "FashionMnist::load: index ", index, " outside [0, ", size(), ")");
    thread_local cv::Mat resized;
    const int s = options_.size;
    const cv::Mat picture(kRows, kCols, CV_8UC1, const_cast<uint8_t*>(pixels(index)));
    resize_image(picture, s, s, resized);
    // torchvision's RandomCrop(size, padding): the window's corner in the
    // padded image is uniform in [0, 2 * padding], row first.
    int offset_x = 0, offset_y = 0;
    bool flip = false;
    if (options_.augment) {
        const int p = options_.crop_padding;
        offset_y = static_cast<int>(rng.below(2 * p + 1)) - p;
        offset_x = static_cast<int>(rng.below(2 * p + 1)) - p;
        flip = rng.uniform() < options_.flip_probability;
    }
    write_normalized(resized, offset_x, offset_y, flip, options_.normalization, s, s, options_.channels, out);
}

}  // namespace hfq
