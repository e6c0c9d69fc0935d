// ImageFolder on image trees the tests write: layouts and labels, the awkward
// files real ImageNet has (grayscale, CMYK, a PNG named .JPEG), clear errors,
// augmentation and normalization, and the Loader on top: determinism across
// thread counts and skip-and-count of corrupt files.
#include <doctest/doctest.h>

#include <cmath>
#include <iostream>
#include <sstream>

#include "data/image_folder.h"
#include "data/loader.h"
#include "test_data_util.h"

using namespace hfq;
using namespace hfq::test;

namespace {

ImageTransformOptions transform_options(int size, bool train = true) {
    ImageTransformOptions o;
    o.size = size;
    o.train = train;
    return o;
}

ImageTransformOptions eval_options(int size) { return transform_options(size, false); }

// The normalized value ImageNet normalization gives an 8-bit value in channel c.
float normalized(int value, int c) {
    const Normalization n = imagenet_normalization();
    return (value / 255.f - n.mean[c]) / n.std[c];
}

std::vector<float> load(const Dataset& ds, int64_t index, uint64_t seed = 0) {
    std::vector<float> out(shape_numel(ds.sample_shape()));
    Rng rng(seed);
    ds.load(index, rng, out.data());
    return out;
}

// Every pixel within `tolerance` (8-bit levels) of the colour rgb. A solid
// colour survives JPEG (quality 95, 4:4:4) up to the rounding of its DC
// coefficients and the YCbCr <-> RGB conversions (within 1 level here), and
// libjpeg-turbo's integer IDCT gives the same bits on every SIMD path, so 3
// levels holds on any CPU. A lossless PNG is exact: 0.5 level covers only the
// float32 normalization (~1e-6). A wrong channel order is off by 100+ levels.
bool all_pixels_near(const std::vector<float>& out, int r, int g, int b, float tolerance = 3.f) {
    const int rgb[3] = {r, g, b};
    const float std_min = 0.224f;
    for (size_t i = 0; i < out.size(); ++i)
        if (std::abs(out[i] - normalized(rgb[i % 3], i % 3)) > tolerance / 255.f / std_min) return false;
    return true;
}

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "(no error)";
}

// ROOT/train/{n01,n02,n03} with the awkward files, ROOT/val flat with ground truth.
struct ImageNetTree {
    TempDir dir;
    std::string root = dir / "imagenet";
    ImageNetTree() {
        // Written out of order: the class index must come from sorting.
        write_bytes(root + "/train/n02/b1.JPEG", encode_jpeg(solid_rgb(80, 60, 20, 40, 220)));
        write_bytes(root + "/train/n02/notes.txt", {'h', 'i'});    // not an image: ignored
        write_bytes(root + "/train/n02/.hidden.JPEG", {0, 1, 2});  // hidden: ignored
        write_bytes(root + "/train/n01/a1.JPEG", encode_jpeg(solid_rgb(64, 48, 200, 30, 40)));
        write_bytes(root + "/train/n01/a2_gray.JPEG", encode_jpeg(cv::Mat(50, 70, CV_8UC1, cv::Scalar(120))));
        // CMYK (Adobe-inverted: stored 255 - ink) of ink (0, 255, 0, 55): R = B = 200, G = 0.
        write_bytes(root + "/train/n01/a3_cmyk.JPEG",
                    encode_jpeg(cv::Mat(40, 40, CV_8UC4, cv::Scalar(255, 0, 255, 200))));
        write_bytes(root + "/train/n01/a4_png.JPEG", encode_png(solid_rgb(30, 40, 10, 250, 90)));
        write_bytes(root + "/train/n03/deeper/c1.jpg", encode_jpeg(solid_rgb(60, 60, 128, 128, 128)));

        write_bytes(root + "/val/ILSVRC2012_val_00000003.JPEG", encode_jpeg(solid_rgb(40, 30, 0, 0, 255)));
        write_bytes(root + "/val/ILSVRC2012_val_00000001.JPEG", encode_jpeg(solid_rgb(40, 30, 255, 0, 0)));
        write_bytes(root + "/val/ILSVRC2012_val_00000002.JPEG", encode_jpeg(solid_rgb(40, 30, 0, 255, 0)));
        std::ofstream(root + "/LOC_val_solution.csv") << "ImageId,PredictionString\n"
                                                         "ILSVRC2012_val_00000003,n03 1 2 30 20 n03 3 4 10 10\n"
                                                         "ILSVRC2012_val_00000001,n01 5 5 20 20\n"
                                                         "ILSVRC2012_val_00000002,n02 0 0 39 29\n";
    }
};

}  // namespace

TEST_CASE("ImageNet train layout: sorted wnids give the class index; every file kind loads") {
    ImageNetTree tree;
    const ImageFolder train = ImageFolder::imagenet(tree.root, "train", eval_options(16));
    REQUIRE(train.classes() == std::vector<std::string>{"n01", "n02", "n03"});
    REQUIRE(train.size() == 6);
    CHECK(train.num_classes() == 3);
    CHECK(train.sample_shape() == Shape{16, 16, 3});
    const std::vector<int32_t> labels = {0, 0, 0, 0, 1, 2};
    for (int64_t i = 0; i < train.size(); ++i) CHECK(train.label(i) == labels[i]);
    CHECK(train.name(0).ends_with("n01/a1.JPEG"));
    CHECK(train.name(5).ends_with("n03/deeper/c1.jpg"));

    // Solid colours make the expected output exact: RGB order and ImageNet normalization.
    CHECK(all_pixels_near(load(train, 0), 200, 30, 40));        // RGB JPEG
    CHECK(all_pixels_near(load(train, 1), 120, 120, 120));      // grayscale JPEG
    CHECK(all_pixels_near(load(train, 2), 200, 0, 200));        // CMYK JPEG
    CHECK(all_pixels_near(load(train, 3), 10, 250, 90, 0.5f));  // PNG named .JPEG: lossless
    CHECK(all_pixels_near(load(train, 4), 20, 40, 220));
}

TEST_CASE("ImageNet val: flat folder with LOC_val_solution.csv, or class folders, indexed like train") {
    ImageNetTree tree;
    const ImageFolder val = ImageFolder::imagenet(tree.root, "val", eval_options(8));
    REQUIRE(val.size() == 3);
    CHECK(val.name(0).ends_with("ILSVRC2012_val_00000001.JPEG"));  // sorted by file
    CHECK(val.label(0) == 0);
    CHECK(val.label(1) == 1);
    CHECK(val.label(2) == 2);
    CHECK(all_pixels_near(load(val, 2), 0, 0, 255));

    // Two-column list: labels as class names or indices.
    std::ofstream(tree.dir / "labels.csv") << "ILSVRC2012_val_00000002.JPEG,2\n\n"
                                              "ILSVRC2012_val_00000001.JPEG, n02\n";
    const ImageFolder listed = ImageFolder::from_flat_folder(tree.root + "/val", tree.dir / "labels.csv",
                                                             list_class_folders(tree.root + "/train"), eval_options(8));
    REQUIRE(listed.size() == 2);
    CHECK(listed.label(0) == 1);  // ..._00000001 -> n02
    CHECK(listed.label(1) == 2);

    // val/<wnid>/ folders: only n02 present, still class 1.
    TempDir other;
    write_bytes(other / "in/train/n01/x.JPEG", encode_jpeg(solid_rgb(8, 8, 1, 2, 3)));
    write_bytes(other / "in/train/n02/y.JPEG", encode_jpeg(solid_rgb(8, 8, 1, 2, 3)));
    write_bytes(other / "in/val/n02/z.JPEG", encode_jpeg(solid_rgb(8, 8, 1, 2, 3)));
    const ImageFolder folders = ImageFolder::imagenet(other / "in", "val", eval_options(8));
    REQUIRE(folders.size() == 1);
    CHECK(folders.label(0) == 1);
}

TEST_CASE("missing or empty folders and bad ground truth fail clearly") {
    ImageNetTree tree;
    const auto opts = eval_options(8);
    CHECK(error_of([&] {
              ImageFolder::imagenet(tree.dir / "nowhere", "train", opts);
          }).find("nowhere/train does not exist") != std::string::npos);
    CHECK(error_of([&] { ImageFolder::imagenet(tree.root, "test", opts); }).find("split must be") != std::string::npos);

    std::filesystem::create_directories(tree.root + "/train/n04");
    CHECK(error_of([&] { ImageFolder::imagenet(tree.root, "train", opts); }).find("n04 holds no image files") !=
          std::string::npos);
    std::filesystem::remove(tree.root + "/train/n04");

    std::filesystem::create_directories(tree.dir / "flat_only");
    CHECK(error_of([&] {
              ImageFolder::from_class_folders(tree.dir / "flat_only", opts);
          }).find("has no class sub-folders") != std::string::npos);

    write_bytes(tree.dir / "v/val/n99/q.JPEG", encode_jpeg(solid_rgb(8, 8, 1, 2, 3)));
    CHECK(error_of([&] {
              ImageFolder::from_class_folders(tree.dir / "v/val", opts, {"n01", "n02"});
          }).find("n99 is not one of the 2 classes") != std::string::npos);

    const auto classes = std::vector<std::string>{"n01", "n02", "n03"};
    std::ofstream(tree.dir / "missing.csv") << "ILSVRC2012_val_00000001.JPEG,n01\nILSVRC2012_val_00000009.JPEG,n01\n";
    const std::string missing =
        error_of([&] { ImageFolder::from_flat_folder(tree.root + "/val", tree.dir / "missing.csv", classes, opts); });
    CHECK(missing.find("missing.csv:2") != std::string::npos);
    CHECK(missing.find("ILSVRC2012_val_00000009.JPEG does not exist") != std::string::npos);

    std::ofstream(tree.dir / "badlabel.csv") << "ILSVRC2012_val_00000001.JPEG,n07\n";
    CHECK(error_of([&] {
              ImageFolder::from_flat_folder(tree.root + "/val", tree.dir / "badlabel.csv", classes, opts);
          }).find("badlabel.csv:1: label 'n07' is neither") != std::string::npos);

    std::ofstream(tree.dir / "nocomma.csv") << "ILSVRC2012_val_00000001.JPEG\n";
    CHECK(error_of([&] {
              ImageFolder::from_flat_folder(tree.root + "/val", tree.dir / "nocomma.csv", classes, opts);
          }).find("expected 'file,label'") != std::string::npos);

    std::filesystem::remove(tree.root + "/LOC_val_solution.csv");
    CHECK(error_of([&] { ImageFolder::imagenet(tree.root, "val", opts); }).find("cannot open the ground-truth file") !=
          std::string::npos);
}

TEST_CASE("training augmentation: random resized crop and flip; evaluation is deterministic") {
    TempDir dir;
    // Left half red, right half blue.
    cv::Mat halves = solid_rgb(64, 48, 255, 0, 0);
    halves(cv::Rect(32, 0, 32, 48)).setTo(cv::Scalar(0, 0, 255));
    write_bytes(dir / "c/x/halves.png", encode_png(halves));

    ImageTransformOptions o;
    o.size = 16;
    o.crop = {1.0, 1.0, 4.0 / 3.0, 4.0 / 3.0};  // the whole 4:3 image every time
    o.flip_probability = 0.f;
    const std::vector<float> plain = load(ImageFolder::from_class_folders(dir / "c", o), 0);
    o.flip_probability = 1.f;
    const std::vector<float> flipped = load(ImageFolder::from_class_folders(dir / "c", o), 0);
    auto red_at = [](const std::vector<float>& img, int x) { return img[(8 * 16 + x) * 3 + 0]; };
    CHECK(red_at(plain, 1) == doctest::Approx(normalized(255, 0)));
    CHECK(red_at(plain, 14) == doctest::Approx(normalized(0, 0)));
    CHECK(red_at(flipped, 1) == doctest::Approx(normalized(0, 0)));
    CHECK(red_at(flipped, 14) == doctest::Approx(normalized(255, 0)));

    // Random crops differ with the generator and repeat with it.
    write_bytes(dir / "g/x/gradient.JPEG", encode_jpeg(gradient_rgb(200, 150)));
    const ImageFolder train = ImageFolder::from_class_folders(dir / "g", transform_options(32));
    CHECK(load(train, 0, 1) == load(train, 0, 1));
    CHECK(load(train, 0, 1) != load(train, 0, 2));
    const ImageFolder eval = ImageFolder::from_class_folders(dir / "g", eval_options(32));
    CHECK(load(eval, 0, 1) == load(eval, 0, 2));
}

TEST_CASE("DCT-scaled and full decoding both match an exact resampling of the source picture") {
    TempDir dir;
    const cv::Mat source = gradient_rgb(900, 700);
    write_bytes(dir / "c/x/big.JPEG", encode_jpeg(source));
    ImageTransformOptions o = eval_options(32);  // crop 612 px -> 1/8 still leaves 76 >= 32
    const std::vector<float> scaled = load(ImageFolder::from_class_folders(dir / "c", o), 0);
    o.dct_scaling = false;
    const std::vector<float> full = load(ImageFolder::from_class_folders(dir / "c", o), 0);

    // Reference: the centre crop of the original pixels, box-filtered to 32x32.
    const CropRect c = center_crop(900, 700, 32);
    cv::Mat small;
    cv::resize(source(cv::Rect(c.x, c.y, c.width, c.height)), small, cv::Size(32, 32), 0, 0, cv::INTER_AREA);
    std::vector<float> reference(32 * 32 * 3);
    write_normalized(small, 0, 0, false, imagenet_normalization(), 32, 32, 3, reference.data());
    auto mean_abs_diff = [&](const std::vector<float>& v) {
        double d = 0;
        for (size_t i = 0; i < v.size(); ++i) d += std::abs(v[i] - reference[i]);
        return d / v.size();
    };
    MESSAGE("mean |difference| to the reference: DCT-scaled ", mean_abs_diff(scaled), ", full ", mean_abs_diff(full));
    CHECK(mean_abs_diff(scaled) < 0.02);  // about 1 level of 255
    CHECK(mean_abs_diff(full) < 0.02);
    CHECK(scaled != full);  // yet really two different decodes
}

TEST_CASE("Loader over an ImageFolder: identical batches for 1, 2 and 3 threads") {
    TempDir dir;
    for (int c = 0; c < 3; ++c)
        for (int k = 0; k < 7; ++k)
            write_bytes(dir / cat("t/n0", c, "/", k, ".JPEG"),
                        encode_jpeg(gradient_rgb(120 + 9 * k, 90 + 5 * c, 40 * c)));
    auto ds = std::make_shared<ImageFolder>(ImageFolder::from_class_folders(dir / "t", transform_options(24)));
    LoaderOptions options;
    options.batch_size = 4;
    options.seed = 5;
    std::vector<Batch> reference;
    for (int threads : {1, 2, 3}) {
        options.threads = threads;
        Loader loader(ds, options, {0, 0}, 2);
        std::vector<Batch> batches;
        while (auto b = loader.next()) batches.push_back(std::move(*b));
        REQUIRE(batches.size() == 12);  // 2 epochs of ceil(21 / 4)
        CHECK(batches.back().size() == 1);
        if (threads == 1) {
            reference = std::move(batches);
            continue;
        }
        for (size_t i = 0; i < batches.size(); ++i) {
            CHECK(batches[i].labels == reference[i].labels);
            CHECK(batches[i].indices == reference[i].indices);
            CHECK(batches[i].images.to_vector() == reference[i].images.to_vector());
        }
    }
    for (const Batch& b : reference)
        for (int64_t s = 0; s < b.size(); ++s) CHECK(b.labels[s] == ds->label(b.indices[s]));
}

TEST_CASE("corrupt and truncated files are skipped, counted, logged once, and replaced by a real image") {
    TempDir dir;
    for (int k = 0; k < 10; ++k)
        write_bytes(dir / cat("t/n01/", k, ".JPEG"), encode_jpeg(gradient_rgb(60 + k, 50, 20 * k)));
    const auto good = read_bytes(dir / "t/n01/3.JPEG");
    write_bytes(dir / "t/n01/3.JPEG", std::vector<uint8_t>(good.begin(), good.begin() + good.size() / 2));  // truncated
    write_bytes(dir / "t/n01/7.JPEG", std::vector<uint8_t>(300, 0x5A));  // corrupt bytes
    auto ds = std::make_shared<ImageFolder>(ImageFolder::from_class_folders(dir / "t", transform_options(16)));
    REQUIRE(ds->size() == 10);
    CHECK_THROWS_AS(load(*ds, 3), UnreadableSample);

    LoaderOptions options;
    options.batch_size = 4;
    options.max_bad_fraction = 0.2;  // 2 of 10 allowed
    std::ostringstream log;
    std::streambuf* saved = std::cerr.rdbuf(log.rdbuf());
    std::vector<Batch> batches;
    {
        Loader loader(ds, options, {0, 0}, 2);
        while (auto b = loader.next()) batches.push_back(std::move(*b));
        CHECK(loader.stats().unreadable == 2);
        CHECK(loader.stats().replaced == 4);  // each bad file in both epochs
        CHECK(loader.stats().samples == 20);
    }
    std::cerr.rdbuf(saved);
    const std::string text = log.str();
    CHECK(text.find("t/n01/3.JPEG: corrupt or truncated JPEG (Premature end") != std::string::npos);
    CHECK(text.find("t/n01/7.JPEG: neither a JPEG") != std::string::npos);
    CHECK(text.find("3.JPEG", text.find("3.JPEG") + 1) == std::string::npos);  // logged once

    // The slot of a bad file holds the next index, augmented with the replacement's own random numbers.
    int replaced_slots = 0;
    for (const Batch& b : batches) {
        const std::vector<int64_t> order = epoch_order(10, options.seed, b.epoch, true);
        const std::vector<float> all = b.images.to_vector();
        for (int64_t s = 0; s < b.size(); ++s) {
            const int64_t original = order[b.index * 4 + s];
            if (original != 3 && original != 7) {
                CHECK(b.indices[s] == original);
                continue;
            }
            ++replaced_slots;
            CHECK(b.indices[s] == original + 1);
            std::vector<float> expected(16 * 16 * 3);
            Rng rng = Rng::derive(options.seed, {static_cast<uint64_t>(b.epoch), static_cast<uint64_t>(original), 1});
            ds->load(original + 1, rng, expected.data());
            CHECK(std::equal(expected.begin(), expected.end(), all.begin() + s * expected.size()));
        }
    }
    CHECK(replaced_slots == 4);

    // With at most 1 of 10 allowed, the second unreadable file stops the run.
    options.max_bad_fraction = 0.1;
    saved = std::cerr.rdbuf(log.rdbuf());
    std::string error;
    {
        Loader loader(ds, options);
        try {
            while (loader.next()) {
            }
        } catch (const Error& e) {
            error = e.what();
        }
        CHECK_THROWS_AS(loader.next(), Error);  // and stays failed
    }
    std::cerr.rdbuf(saved);
    INFO(error);
    CHECK(error.starts_with("stopping: 2 of the 10 images could not be read (the first: "));
    CHECK(
        error.find("; --max-bad-fraction 0.1 allows 1 of 10. Fix or remove the files, or raise --max-bad-fraction.") !=
        std::string::npos);
}
