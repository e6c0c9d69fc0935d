// Image decoding (TurboJPEG with DCT scaling, grayscale, CMYK, the OpenCV
// fallback, corrupt data) and the shared pixel transforms.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>

#include "data/dataset.h"
#include "data/image_decode.h"
#include "data/image_transform.h"
#include "test_data_util.h"

using namespace hfq;
using hfq::test::encode_jpeg;
using hfq::test::encode_png;
using hfq::test::gradient_rgb;

namespace {

CropPlanner whole_image(int out_w, int out_h) {
    return [=](int w, int h) { return CropRequest{{0, 0, w, h}, out_w, out_h}; };
}

double mean_abs_diff(const cv::Mat& a, const cv::Mat& b) {
    REQUIRE(a.size() == b.size());
    REQUIRE(a.type() == b.type());
    cv::Mat diff;
    cv::absdiff(a, b, diff);
    const cv::Scalar s = cv::mean(diff);
    return (s[0] + s[1] + s[2]) / a.channels();
}

std::string unreadable_message(ImageDecoder& decoder, const std::vector<uint8_t>& bytes) {
    try {
        decoder.decode_crop(bytes, whole_image(8, 8), true);
    } catch (const UnreadableSample& e) {
        return e.what();
    }
    return "(no error)";
}

}  // namespace

TEST_CASE("a JPEG decodes to RGB in the right channel order") {
    const cv::Mat rgb = gradient_rgb(64, 48, 200);
    ImageDecoder decoder;
    const cv::Mat out = decoder.decode_crop(encode_jpeg(rgb), whole_image(64, 48), true);
    REQUIRE(out.cols == 64);
    REQUIRE(out.rows == 48);
    CHECK(decoder.last_scale_denominator() == 1);
    CHECK(mean_abs_diff(out, rgb) < 2.0);
    // Blue channel (index 2) is the constant 200: a BGR mix-up would show.
    CHECK(std::abs(out.at<cv::Vec3b>(10, 10)[2] - 200) <= 3);
}

TEST_CASE("DCT scaling decodes at the strongest reduction that still covers the crop") {
    const cv::Mat rgb = gradient_rgb(640, 480);
    const auto jpeg = encode_jpeg(rgb);
    ImageDecoder decoder;

    // Whole image to 80x60: 1/8 still leaves 80x60 pixels.
    cv::Mat out = decoder.decode_crop(jpeg, whole_image(80, 60), true);
    CHECK(decoder.last_scale_denominator() == 8);
    CHECK(out.cols == 80);
    CHECK(out.rows == 60);
    cv::Mat reference;
    cv::resize(rgb, reference, cv::Size(80, 60), 0, 0, cv::INTER_AREA);
    CHECK(mean_abs_diff(out, reference) < 3.0);

    // A 300x300 crop at (100, 40) for a 100x100 output: 1/2 (150 >= 100), not 1/4 (75 < 100).
    const CropPlanner crop = [](int, int) { return CropRequest{{100, 40, 300, 300}, 100, 100}; };
    out = decoder.decode_crop(jpeg, crop, true);
    CHECK(decoder.last_scale_denominator() == 2);
    CHECK(out.cols == 150);
    CHECK(out.rows == 150);
    cv::resize(rgb(cv::Rect(100, 40, 300, 300)), reference, cv::Size(150, 150), 0, 0, cv::INTER_AREA);
    CHECK(mean_abs_diff(out, reference) < 3.0);

    // Without DCT scaling the crop comes back at full resolution.
    out = decoder.decode_crop(jpeg, crop, false);
    CHECK(decoder.last_scale_denominator() == 1);
    CHECK(out.cols == 300);
    CHECK(mean_abs_diff(out, rgb(cv::Rect(100, 40, 300, 300))) < 2.0);
}

TEST_CASE("a grayscale JPEG comes out as R = G = B") {
    cv::Mat gray(40, 50, CV_8UC1);
    for (int y = 0; y < gray.rows; ++y)
        for (int x = 0; x < gray.cols; ++x) gray.at<uint8_t>(y, x) = static_cast<uint8_t>(5 * x);
    ImageDecoder decoder;
    const cv::Mat out = decoder.decode_crop(encode_jpeg(gray), whole_image(50, 40), true);
    REQUIRE(out.channels() == 3);
    int worst = 0;
    for (int y = 0; y < out.rows; ++y)
        for (int x = 0; x < out.cols; ++x) {
            const cv::Vec3b p = out.at<cv::Vec3b>(y, x);
            CHECK(p[0] == p[1]);
            CHECK(p[1] == p[2]);
            worst = std::max(worst, std::abs(p[0] - 5 * x));
        }
    CHECK(worst <= 4);
}

TEST_CASE("a CMYK JPEG (Adobe, inverted as Photoshop writes it) converts to the right RGB") {
    // Left half pure red ink-wise (C=0, M=Y=255, K=0), right half 50% grey via K.
    // Adobe CMYK files store 255 - ink.
    cv::Mat cmyk(32, 64, CV_8UC4);
    for (int y = 0; y < 32; ++y)
        for (int x = 0; x < 64; ++x) {
            const cv::Vec4b ink = x < 32 ? cv::Vec4b(0, 255, 255, 0) : cv::Vec4b(0, 0, 0, 128);
            cmyk.at<cv::Vec4b>(y, x) = cv::Vec4b(255 - ink[0], 255 - ink[1], 255 - ink[2], 255 - ink[3]);
        }
    const auto jpeg = encode_jpeg(cmyk);
    CHECK(jpeg_has_adobe_marker(jpeg));
    CHECK_FALSE(jpeg_has_adobe_marker(encode_jpeg(gradient_rgb(16, 16))));
    ImageDecoder decoder;
    const cv::Mat out = decoder.decode_crop(jpeg, whole_image(64, 32), true);
    const cv::Vec3b red = out.at<cv::Vec3b>(16, 8), grey = out.at<cv::Vec3b>(16, 56);
    CHECK(red[0] >= 250);
    CHECK(red[1] <= 5);
    CHECK(red[2] <= 5);
    for (int c = 0; c < 3; ++c) CHECK(std::abs(grey[c] - 127) <= 3);  // 255 * (255 - 128) / 255
}

TEST_CASE("a PNG (named .JPEG in ImageNet) decodes through OpenCV, exactly and as RGB") {
    const cv::Mat rgb = gradient_rgb(33, 21, 17);
    ImageDecoder decoder;
    const cv::Mat out = decoder.decode_crop(encode_png(rgb), whole_image(33, 21), true);
    CHECK(decoder.last_scale_denominator() == 1);
    CHECK(mean_abs_diff(out, rgb) == 0.0);
    // The crop is honoured on this path too.
    const CropPlanner crop = [](int, int) { return CropRequest{{3, 4, 10, 5}, 10, 5}; };
    CHECK(mean_abs_diff(decoder.decode_crop(encode_png(rgb), crop, true), rgb(cv::Rect(3, 4, 10, 5))) == 0.0);
}

TEST_CASE("corrupt, truncated and oversized images are UnreadableSample, not crashes or grey images") {
    ImageDecoder decoder;
    const auto jpeg = encode_jpeg(gradient_rgb(64, 64));

    std::vector<uint8_t> garbage(500);
    for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<uint8_t>(i * 37 + 11);
    CHECK(unreadable_message(decoder, garbage).find("neither a JPEG") != std::string::npos);
    CHECK(unreadable_message(decoder, {}) == "empty file");

    std::vector<uint8_t> truncated(jpeg.begin(), jpeg.begin() + jpeg.size() / 2);
    CHECK(unreadable_message(decoder, truncated).find("Premature end") != std::string::npos);

    std::vector<uint8_t> bad_header(jpeg.begin(), jpeg.begin() + 20);  // SOI and part of JFIF only
    CHECK(unreadable_message(decoder, bad_header).find("not a readable JPEG") != std::string::npos);

    std::vector<uint8_t> scrambled = jpeg;  // entropy-coded data overwritten
    for (size_t i = scrambled.size() / 3; i < scrambled.size() - 2; ++i) scrambled[i] = 0xFF;
    CHECK(unreadable_message(decoder, scrambled).find("corrupt or truncated JPEG") != std::string::npos);

    const auto png = encode_png(gradient_rgb(64, 64));
    std::vector<uint8_t> truncated_png(png.begin(), png.begin() + png.size() / 2);
    CHECK(unreadable_message(decoder, truncated_png).find("neither a JPEG") != std::string::npos);

    // A frame header claiming 60000 x 60000 pixels: refused before allocating.
    std::vector<uint8_t> huge = jpeg;
    for (size_t i = 2; i + 8 < huge.size(); ++i)
        if (huge[i] == 0xFF && huge[i + 1] == 0xC0) {  // SOF0: FF C0 len(2) precision(1) height(2) width(2)
            huge[i + 5] = huge[i + 7] = 0xEA;
            huge[i + 6] = huge[i + 8] = 0x60;
            break;
        }
    CHECK(unreadable_message(decoder, huge).find("pixel limit") != std::string::npos);

    // The decoder still works after all that.
    CHECK(decoder.decode_crop(jpeg, whole_image(64, 64), true).cols == 64);
}

TEST_CASE("random_resized_crop follows torchvision's rules") {
    Rng rng(7);
    const RandomResizedCropOptions options;  // scale 0.08-1, ratio 3/4-4/3
    int fallbacks = 0;
    for (int i = 0; i < 500; ++i) {
        const CropRect c = random_resized_crop(500, 375, options, rng);
        REQUIRE(c.x >= 0);
        REQUIRE(c.y >= 0);
        REQUIRE(c.x + c.width <= 500);
        REQUIRE(c.y + c.height <= 375);
        const double area = double(c.width) * c.height / (500.0 * 375.0);
        const double ratio = double(c.width) / c.height;
        if (c.width == 500 && c.height == 375)
            ++fallbacks;  // 4:3 fits the ratio range: whole image
        else {
            CHECK(area >= 0.08 * 0.95);
            CHECK(area <= 1.0);
            CHECK(ratio >= 0.75 * 0.97);
            CHECK(ratio <= 4.0 / 3.0 * 1.03);
        }
    }
    CHECK(fallbacks < 25);  // rare: a random box fits in most tries

    // Same generator state, same crop.
    Rng a(99), b(99);
    const CropRect ca = random_resized_crop(640, 480, options, a), cb = random_resized_crop(640, 480, options, b);
    CHECK(ca.x == cb.x);
    CHECK(ca.y == cb.y);
    CHECK(ca.width == cb.width);
    CHECK(ca.height == cb.height);

    // No box can fit a 1000x10 strip with ratio 1..1 and scale 0.9..1: the
    // fallback is the centred crop of the largest allowed ratio, 10x10.
    const CropRect f = random_resized_crop(1000, 10, {0.9, 1.0, 1.0, 1.0}, rng);
    CHECK(f.x == 495);
    CHECK(f.y == 0);
    CHECK(f.width == 10);
    CHECK(f.height == 10);
    // A tall strip falls back to the smallest ratio: width 12, height round(12 / 0.75) = 16.
    const CropRect t = random_resized_crop(12, 1000, {0.9, 1.0, 0.75, 0.75}, rng);
    CHECK(t.width == 12);
    CHECK(t.height == 16);
    CHECK(t.y == 492);

    CHECK_THROWS_WITH_AS(random_resized_crop(10, 10, {0.5, 0.2, 0.75, 1.33}, rng), doctest::Contains("scale range"),
                         Error);
}

TEST_CASE("center_crop is the region Resize(size / 0.875) + CenterCrop(size) keeps") {
    // 500x375 at 224: shorter side 375 -> 256, the 224 crop is 224 * 375 / 256 = 328.1 -> 328 source pixels.
    const CropRect c = center_crop(500, 375, 224);
    CHECK(c.width == 328);
    CHECK(c.height == 328);
    CHECK(c.x == 86);
    CHECK(c.y == 23);
    const CropRect square = center_crop(256, 256, 224);
    CHECK(square.width == 224);
    CHECK(square.x == 16);
}

TEST_CASE("dct_scale_denominator and scale_crop") {
    CHECK(dct_scale_denominator({0, 0, 1000, 900}, 224, 224) == 4);  // 900 >= 896
    CHECK(dct_scale_denominator({0, 0, 1000, 895}, 224, 224) == 2);
    CHECK(dct_scale_denominator({0, 0, 447, 1000}, 224, 224) == 1);
    CHECK(dct_scale_denominator({0, 0, 1792, 1792}, 224, 224) == 8);
    // Outward rounding keeps at least crop / d pixels.
    const CropRect s = scale_crop({5, 6, 301, 300}, 4, 200, 150);
    CHECK(s.x == 1);
    CHECK(s.y == 1);
    CHECK(s.width == 76);   // ceil(306 / 4) - 1
    CHECK(s.height == 76);  // ceil(306 / 4) - 1
}

TEST_CASE("resize_image box-filters strong shrinks instead of skipping pixels") {
    cv::Mat checker(8, 8, CV_8UC1);
    for (int y = 0; y < 8; ++y)
        for (int x = 0; x < 8; ++x) checker.at<uint8_t>(y, x) = ((x + y) % 2) ? 255 : 0;
    cv::Mat out;
    resize_image(checker, 2, 2, out);  // 4x shrink: INTER_AREA averages the 16 pixels
    for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 2; ++x) CHECK(std::abs(out.at<uint8_t>(y, x) - 128) <= 1);  // 127.5, rounded either way
    resize_image(checker, 8, 8, out);                                                   // same size: a copy
    CHECK(cv::countNonZero(out != checker) == 0);
}

TEST_CASE("write_normalized: normalization, flip, zero padding, channel replication") {
    const Normalization norm{{0.5f, 0.25f, 0.125f}, {0.5f, 0.25f, 2.0f}};
    cv::Mat rgb(2, 3, CV_8UC3);  // pixel (y, x) = (10y + x, 100 + x, 255)
    for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 3; ++x) rgb.at<cv::Vec3b>(y, x) = cv::Vec3b(10 * y + x, 100 + x, 255);
    // The loader's v * scale + bias and this (v / 255 - mean) / std round
    // differently: a few float32 roundings of values of order 1, far inside
    // Approx's default 1.2e-5 x (1 + |value|).
    auto expect = [&](float value, int c) { return doctest::Approx((value / 255.f - norm.mean[c]) / norm.std[c]); };

    std::vector<float> out(2 * 3 * 3);
    write_normalized(rgb, 0, 0, false, norm, 2, 3, 3, out.data());
    for (int y = 0; y < 2; ++y)
        for (int x = 0; x < 3; ++x) {
            const float* p = &out[(y * 3 + x) * 3];
            CHECK(p[0] == expect(10 * y + x, 0));
            CHECK(p[1] == expect(100 + x, 1));
            CHECK(p[2] == expect(255, 2));
        }

    write_normalized(rgb, 0, 0, true, norm, 2, 3, 3, out.data());  // mirrored columns
    CHECK(out[0] == expect(2, 0));
    CHECK(out[(1 * 3 + 2) * 3] == expect(10, 0));

    // Window shifted by (+1, -1): row -1 and column 3 are padding (pixel 0).
    write_normalized(rgb, 1, -1, false, norm, 2, 3, 3, out.data());
    CHECK(out[0] == expect(0, 0));                    // (0, 0) <- row -1: padding
    CHECK(out[(1 * 3 + 0) * 3] == expect(1, 0));      // (1, 0) <- pixel (0, 1)
    CHECK(out[(1 * 3 + 2) * 3 + 1] == expect(0, 1));  // (1, 2) <- column 3: padding

    cv::Mat gray(1, 2, CV_8UC1);
    gray.at<uint8_t>(0, 0) = 51;
    gray.at<uint8_t>(0, 1) = 204;
    std::vector<float> g(2 * 3);
    write_normalized(gray, 0, 0, false, norm, 1, 2, 3, g.data());
    for (int c = 0; c < 3; ++c) {
        CHECK(g[c] == expect(51, c));
        CHECK(g[3 + c] == expect(204, c));
    }
    CHECK_THROWS_AS(write_normalized(rgb, 0, 0, false, norm, 2, 3, 1, out.data()), Error);
}
