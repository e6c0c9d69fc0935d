#include "data/image_transform.h"

#include <algorithm>
#include <cmath>

#include <opencv2/imgproc.hpp>

#include "engine/check.h"

namespace hfq {

namespace {
// Python's round(): halves go to the even neighbour (nearbyint's default mode).
int round_half_even(double v) { return static_cast<int>(std::nearbyint(v)); }
}  // namespace

void check_options(const RandomResizedCropOptions& o) {
    HFQ_CHECK(0 < o.scale_min && o.scale_min <= o.scale_max && o.scale_max <= 1.0, "random_resized_crop: scale range [",
              o.scale_min, ", ", o.scale_max, "] must lie in (0, 1]");
    HFQ_CHECK(0 < o.ratio_min && o.ratio_min <= o.ratio_max, "random_resized_crop: ratio range [", o.ratio_min, ", ",
              o.ratio_max, "] must be positive and ordered");
}

CropRect random_resized_crop(int width, int height, const RandomResizedCropOptions& o, Rng& rng) {
    HFQ_CHECK(width > 0 && height > 0, "random_resized_crop: empty image ", width, "x", height);
    check_options(o);
    const double area = static_cast<double>(width) * height;
    const double log_ratio_min = std::log(o.ratio_min), log_ratio_max = std::log(o.ratio_max);
    for (int attempt = 0; attempt < 10; ++attempt) {
        const double target_area = area * (o.scale_min + (o.scale_max - o.scale_min) * rng.uniform_f64());
        const double aspect = std::exp(log_ratio_min + (log_ratio_max - log_ratio_min) * rng.uniform_f64());
        const int w = round_half_even(std::sqrt(target_area * aspect));
        const int h = round_half_even(std::sqrt(target_area / aspect));
        if (0 < w && w <= width && 0 < h && h <= height) {
            const int y = static_cast<int>(rng.below(height - h + 1));
            const int x = static_cast<int>(rng.below(width - w + 1));
            return {x, y, w, h};
        }
    }
    // No random box fitted: the largest centred crop with an allowed ratio.
    const double in_ratio = static_cast<double>(width) / height;
    int w = width, h = height;
    if (in_ratio < o.ratio_min) {
        h = std::min(height, round_half_even(w / o.ratio_min));
    } else if (in_ratio > o.ratio_max) {
        w = std::min(width, round_half_even(h * o.ratio_max));
    }
    return {(width - w) / 2, (height - h) / 2, w, h};
}

CropRect center_crop(int width, int height, int size, double crop_fraction) {
    HFQ_CHECK(width > 0 && height > 0, "center_crop: empty image ", width, "x", height);
    HFQ_CHECK(size > 0 && crop_fraction > 0 && crop_fraction <= 1, "center_crop: size ", size, " and crop_fraction ",
              crop_fraction, " must be positive, crop_fraction at most 1");
    const int shorter = std::min(width, height);
    const double resized_shorter = std::round(size / crop_fraction);  // 256 for 224
    const int side = std::clamp(round_half_even(size * shorter / resized_shorter), 1, shorter);
    return {(width - side) / 2, (height - side) / 2, side, side};
}

int dct_scale_denominator(const CropRect& crop, int out_width, int out_height) {
    for (int d : {8, 4, 2})
        if (crop.width >= out_width * d && crop.height >= out_height * d) return d;
    return 1;
}

CropRect scale_crop(const CropRect& crop, int d, int scaled_width, int scaled_height) {
    // Outward rounding: the scaled crop keeps at least crop / d pixels per axis.
    const int x0 = crop.x / d, y0 = crop.y / d;
    const int x1 = std::min(scaled_width, (crop.x + crop.width + d - 1) / d);
    const int y1 = std::min(scaled_height, (crop.y + crop.height + d - 1) / d);
    return {x0, y0, x1 - x0, y1 - y0};
}

void resize_image(const cv::Mat& src, int out_width, int out_height, cv::Mat& dst) {
    thread_local cv::Mat halved[2];  // reused from call to call
    cv::Mat current = src;
    for (int k = 0; current.cols > 2 * out_width || current.rows > 2 * out_height; k ^= 1) {
        const int fx = current.cols > 2 * out_width ? 2 : 1, fy = current.rows > 2 * out_height ? 2 : 1;
        cv::resize(current, halved[k], cv::Size(current.cols / fx, current.rows / fy), 0, 0, cv::INTER_LINEAR);
        current = halved[k];
    }
    if (current.cols == out_width && current.rows == out_height)
        current.copyTo(dst);
    else
        cv::resize(current, dst, cv::Size(out_width, out_height), 0, 0, cv::INTER_LINEAR);
}

Normalization imagenet_normalization() { return {{0.485f, 0.456f, 0.406f}, {0.229f, 0.224f, 0.225f}}; }

namespace {

// The source pixels of output row y, in output order and with out_channels
// bytes each: image row y + offset_y, column (flip ? width - 1 - x : x) +
// offset_x for output column x; zero where that falls outside the image.
void gather_row(const cv::Mat& image, int sy, int offset_x, bool flip, int out_width, int out_channels, uint8_t* row) {
    const int in_channels = image.channels();
    if (sy < 0 || sy >= image.rows) {
        std::fill(row, row + out_width * out_channels, uint8_t{0});
        return;
    }
    const uint8_t* src = image.ptr<uint8_t>(sy);
    if (!flip && in_channels == out_channels && offset_x >= 0 && offset_x + out_width <= image.cols) {
        std::copy(src + offset_x * in_channels, src + (offset_x + out_width) * in_channels, row);
        return;
    }
    // Output columns [x_begin, x_end) read inside the image; the rest is padding.
    const int first = offset_x, last = offset_x + out_width - 1;  // source columns of x = 0 and x = out_width - 1
    const int x_begin = std::max(0, flip ? last - (image.cols - 1) : -first);
    const int x_end = std::min(out_width, flip ? last + 1 : image.cols - first);
    std::fill(row, row + out_width * out_channels, uint8_t{0});
    for (int x = x_begin; x < x_end; ++x) {
        const uint8_t* p = src + ((flip ? last - x : first + x) * in_channels);
        uint8_t* r = row + x * out_channels;
        if (in_channels == 3) {
            r[0] = p[0];
            r[1] = p[1];
            r[2] = p[2];
        } else {
            for (int c = 0; c < out_channels; ++c) r[c] = p[0];
        }
    }
}

}  // namespace

void write_normalized(const cv::Mat& image, int offset_x, int offset_y, bool flip, const Normalization& norm,
                      int out_height, int out_width, int out_channels, float* out) {
    const int in_channels = image.channels();
    HFQ_CHECK(image.depth() == CV_8U && (in_channels == 1 || in_channels == 3),
              "write_normalized: expects an 8-bit image with 1 or 3 channels, got ", in_channels, " channels");
    HFQ_CHECK(out_channels == 3 || (out_channels == 1 && in_channels == 1), "write_normalized: cannot write a ",
              in_channels, "-channel image as ", out_channels, " channels");
    // (v / 255 - mean) / std as one multiply-add per value, with the scale and
    // bias laid out like an output row so the loop below vectorizes.
    const int row_values = out_width * out_channels;
    std::vector<float> scale(row_values), bias(row_values);
    for (int j = 0; j < row_values; ++j) {
        const int c = j % out_channels;
        scale[j] = 1.f / (255.f * norm.std[c]);
        bias[j] = -norm.mean[c] / norm.std[c];
    }
    std::vector<uint8_t> row(row_values);
    for (int y = 0; y < out_height; ++y) {
        gather_row(image, y + offset_y, offset_x, flip, out_width, out_channels, row.data());
        float* o = out + static_cast<int64_t>(y) * row_values;
        for (int j = 0; j < row_values; ++j) o[j] = row[j] * scale[j] + bias[j];
    }
}

}  // namespace hfq
