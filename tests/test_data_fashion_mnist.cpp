// Fashion-MNIST from the installed IDX files (Debian's dataset-fashion-mnist),
// and clear errors for damaged copies of them.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>

#include <zlib.h>

#include "data/fashion_mnist.h"
#include "float_error.h"
#include "test_data_util.h"

using namespace hfq;
using hfq::test::read_bytes;
using hfq::test::TempDir;
using hfq::test::write_bytes;

namespace {

const std::string kDir = "/usr/share/datasets/fashion-mnist";

// The decompressed contents of an installed IDX file.
std::vector<uint8_t> gunzip(const std::string& path) {
    gzFile f = gzopen(path.c_str(), "rb");
    REQUIRE(f != nullptr);
    std::vector<uint8_t> out;
    uint8_t chunk[1 << 16];
    for (int n; (n = gzread(f, chunk, sizeof chunk)) > 0;) out.insert(out.end(), chunk, chunk + n);
    gzclose(f);
    return out;
}

void write_gz(const std::string& path, const std::vector<uint8_t>& data) {
    gzFile f = gzopen(path.c_str(), "wb1");
    REQUIRE(f != nullptr);
    REQUIRE(gzwrite(f, data.data(), static_cast<unsigned>(data.size())) == static_cast<int>(data.size()));
    gzclose(f);
}

void put_u32_be(std::vector<uint8_t>& b, size_t at, uint32_t v) {
    for (int k = 0; k < 4; ++k) b[at + k] = static_cast<uint8_t>(v >> (24 - 8 * k));
}

std::string error_of(const FashionMnistOptions& o) {
    try {
        FashionMnist ds(o);
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}

// The training split, read once for all test cases.
const FashionMnist& train_set() {
    static const FashionMnist train({.dir = kDir, .train_split = true});
    return train;
}

int64_t pixel_sum(const FashionMnist& ds, int64_t i) {
    return std::accumulate(ds.pixels(i), ds.pixels(i) + 28 * 28, int64_t{0});
}

}  // namespace

TEST_CASE("the installed Fashion-MNIST files load with the right counts, labels and pixels") {
    // Expected values computed once, independently, with Python:
    //   b = gzip.open(f).read(); np.frombuffer(b, np.uint8, offset=16).reshape(-1, 28, 28)
    // (labels: offset=8): train[0] label 9, pixel sum 76247, pixel (14, 14) = 217;
    // train[59999] label 5, sum 16684; test[0] label 9, sum 33456; test[9999] label 5, sum 24390.
    const FashionMnist& train = train_set();
    REQUIRE(train.size() == 60000);
    CHECK(train.num_classes() == 10);
    CHECK(train.label(0) == 9);
    CHECK(pixel_sum(train, 0) == 76247);
    CHECK(train.pixels(0)[14 * 28 + 14] == 217);
    CHECK(train.label(59999) == 5);
    CHECK(pixel_sum(train, 59999) == 16684);
    std::vector<int> per_class(10);
    for (int64_t i = 0; i < train.size(); ++i) ++per_class[train.label(i)];
    CHECK(per_class == std::vector<int>(10, 6000));

    const FashionMnist test({.dir = kDir, .train_split = false});
    REQUIRE(test.size() == 10000);
    CHECK(test.label(0) == 9);
    CHECK(pixel_sum(test, 0) == 33456);
    CHECK(test.label(9999) == 5);
    CHECK(pixel_sum(test, 9999) == 24390);
    CHECK(test.name(3).ends_with("t10k-images-idx3-ubyte.gz[3]"));
}

TEST_CASE("normalized training pixels have mean 0 and standard deviation 1") {
    const FashionMnist& train = train_set();
    CHECK(train.sample_shape() == Shape{28, 28, 1});
    std::vector<float> out(28 * 28);
    double sum = 0, sum_sq = 0;         // of the loader's normalized values
    int64_t pixels = 0, pixels_sq = 0;  // of the raw 8-bit pixels, exact
    Rng rng;
    for (int64_t i = 0; i < train.size(); ++i) {
        train.load(i, rng, out.data());
        for (int k = 0; k < 28 * 28; ++k) {
            sum += out[k];
            sum_sq += double(out[k]) * out[k];
            pixels += train.pixels(i)[k];
            pixels_sq += int64_t{train.pixels(i)[k]} * train.pixels(i)[k];
        }
    }
    const double n = 60000.0 * 784, mean = sum / n, std = std::sqrt(sum_sq / n - mean * mean);
    // What the normalization (v / 255 - 0.2860) / 0.3530 gives, from the exact
    // pixel moments: the constants are the data's 0.286041 and 0.353024
    // rounded to 4 digits, so the mean is 1.2e-4, not 0, and the std 1.00007.
    const Normalization norm = fashion_mnist_normalization();
    const double m1 = double(pixels) / (255 * n), m2 = double(pixels_sq) / (255.0 * 255 * n);
    const double expect_mean = (m1 - norm.mean[0]) / norm.std[0];
    const double expect_std = std::sqrt(m2 - m1 * m1) / norm.std[0];
    // The loader computes v * scale + bias in float32 (scale = 1 / (255 std),
    // two roundings; bias = -mean / std, one): with |v * scale| <= 2.84,
    // |bias| = 0.81 and |result| <= 2.03, a value is off by at most
    // u (2 * 2.84 + 2.84 + 0.81 + 2.03) = 11.4 u = 6.8e-7, and so is the mean;
    // the variance by 2 * 2.03 times that, the std (= 1) by half of it, 1.4e-6.
    // The double sums add ~1e-9. A constant off in its 4th digit moves the
    // mean by 3e-4.
    const double value_error = 11.4 * hfq::testing::kUnitRoundoff;
    MESSAGE("mean ", mean, " (expected ", expect_mean, "), std ", std, " (expected ", expect_std, ")");
    CHECK(std::abs(mean - expect_mean) <= value_error);
    CHECK(std::abs(std - expect_std) <= 2.03 * value_error);
    CHECK(std::abs(mean) < 2e-4);  // and the constants are the data's: mean ~0, std ~1
    CHECK(std::abs(std - 1.0) < 2e-4);

    // Pixel (14, 14) of sample 0 is 217.
    train.load(0, rng, out.data());
    CHECK(std::abs(out[14 * 28 + 14] - (217 / 255.0 - norm.mean[0]) / norm.std[0]) <= value_error);
}

TEST_CASE("resizing to the model's size with 3 replicated channels") {
    const FashionMnist ds({.dir = kDir, .train_split = false, .size = 32, .channels = 3});
    CHECK(ds.sample_shape() == Shape{32, 32, 3});
    std::vector<float> out(32 * 32 * 3);
    Rng rng;
    ds.load(0, rng, out.data());
    double mean = 0;
    for (int p = 0; p < 32 * 32; ++p) {
        CHECK(out[p * 3] == out[p * 3 + 1]);
        CHECK(out[p * 3] == out[p * 3 + 2]);
        mean += out[p * 3] * 0.3530 + 0.2860;  // back to [0, 1]
    }
    // Bilinear upscaling keeps the picture's mean brightness (28x28 sum 33456).
    CHECK(mean / (32 * 32) == doctest::Approx(33456 / 255.0 / 784).epsilon(0.02));
}

TEST_CASE("training augmentation: random crop from the zero-padded picture, and flip") {
    const FashionMnist ds({.dir = kDir, .train_split = false, .augment = true});
    const FashionMnist plain({.dir = kDir, .train_split = false});
    const float background = (0 - 0.2860f) / 0.3530f;
    int flips = 0;
    for (uint64_t seed = 0; seed < 12; ++seed) {
        std::vector<float> out(28 * 28), original(28 * 28);
        Rng rng(seed), copy(seed), unused;
        ds.load(5, rng, out.data());
        plain.load(5, unused, original.data());
        // RandomCrop(28, padding=4): corner row then column in [0, 8], then the flip coin.
        const int dy = static_cast<int>(copy.below(9)) - 4, dx = static_cast<int>(copy.below(9)) - 4;
        const bool flip = copy.uniform() < 0.5f;
        flips += flip;
        for (int y = 0; y < 28; ++y)
            for (int x = 0; x < 28; ++x) {
                const int sy = y + dy, sx = (flip ? 27 - x : x) + dx;
                const bool inside = sy >= 0 && sy < 28 && sx >= 0 && sx < 28;
                REQUIRE(out[y * 28 + x] == (inside ? original[sy * 28 + sx] : background));
            }
    }
    CHECK(flips > 0);
    CHECK(flips < 12);
}

TEST_CASE("damaged copies of the files are refused with the file named") {
    TempDir dir;
    const std::string images = "t10k-images-idx3-ubyte.gz", labels = "t10k-labels-idx1-ubyte.gz";
    const std::vector<uint8_t> pixels = gunzip(kDir + "/" + images), label_bytes = gunzip(kDir + "/" + labels);
    const FashionMnistOptions o{.dir = dir.path.string(), .train_split = false};

    CHECK(error_of(o).find("t10k-images-idx3-ubyte.gz nor") != std::string::npos);  // nothing there yet

    write_bytes(dir / labels, read_bytes(kDir + "/" + labels));
    // Header faults need only the 16-byte header (the reader stops there).
    std::vector<uint8_t> bad(pixels.begin(), pixels.begin() + 16);
    put_u32_be(bad, 0, 2049);  // a label file's magic
    write_gz(dir / images, bad);
    CHECK(error_of(o) == dir / images + ": magic number 2049, expected 2051 (an IDX file of unsigned-byte images)");

    put_u32_be(bad, 0, 2051);
    put_u32_be(bad, 4, 9999);
    write_gz(dir / images, bad);
    CHECK(error_of(o) == dir / images + ": holds 9999 images, expected 10000");

    put_u32_be(bad, 4, 10000);
    put_u32_be(bad, 8, 32);
    write_gz(dir / images, bad);
    CHECK(error_of(o) == dir / images + ": images are 32x28, expected 28x28");

    bad.assign(pixels.begin(),
               pixels.begin() + 16 + 100);  // a valid gzip stream, 100 pixel bytes short of 10000 images
    write_gz(dir / images, bad);
    CHECK(error_of(o) == dir / images + ": truncated: the file ends after 100 of the 7840000 bytes of its pixels");

    bad = pixels;
    bad.push_back(0);
    write_gz(dir / images, bad);
    CHECK(error_of(o).find(dir / images + ": unexpected data after") == 0);

    const std::vector<uint8_t> gz = read_bytes(kDir + "/" + images);  // the gzip stream itself cut short
    write_bytes(dir / images, std::vector<uint8_t>(gz.begin(), gz.begin() + gz.size() / 2));
    CHECK(error_of(o).find(dir / images + ": truncated or corrupted gzip data") == 0);

    write_bytes(dir / images, read_bytes(kDir + "/" + images));
    bad = label_bytes;
    bad[8 + 123] = 10;
    write_gz(dir / labels, bad);
    CHECK(error_of(o) == dir / labels + ": label 10 of item 123 is not below 10");

    // Uncompressed files are read as well.
    std::filesystem::remove(dir / labels);
    write_bytes(dir / "t10k-labels-idx1-ubyte", label_bytes);
    const FashionMnist ds(o);
    CHECK(ds.label(0) == 9);
    CHECK(ds.label(9999) == 5);
}
