// The pixel transforms both image datasets share: choosing a crop (random
// resized crop for training, the centre crop of evaluation), resizing it, and
// writing it flipped, normalized and in the engine's HWC float layout.
#pragma once
#include <array>

#include <opencv2/core.hpp>

#include "engine/random.h"

namespace hfq {

// A rectangle of pixels in an image, in that image's coordinates.
struct CropRect {
    int x = 0, y = 0, width = 0, height = 0;
};

struct RandomResizedCropOptions {
    double scale_min = 0.08, scale_max = 1.0;             // fraction of the image's area
    double ratio_min = 3.0 / 4.0, ratio_max = 4.0 / 3.0;  // width / height
};
// Throws hfq::Error unless 0 < scale_min <= scale_max <= 1 and 0 < ratio_min <= ratio_max.
void check_options(const RandomResizedCropOptions& options);
// torchvision's RandomResizedCrop.get_params: up to ten tries at a random area
// and log-uniform aspect ratio that fits, else the largest centred crop whose
// ratio is within range. Python's round-half-to-even is kept.
CropRect random_resized_crop(int width, int height, const RandomResizedCropOptions& options, Rng& rng);

// The region that "resize the shorter side to round(size / crop_fraction), then
// centre-crop size x size" keeps, in the original image: a centred square of
// side shorter * size / round(size / crop_fraction). Cropping first and resizing
// once gives the same picture (up to sub-pixel rounding) and lets the JPEG
// decoder use DCT scaling.
CropRect center_crop(int width, int height, int size, double crop_fraction = 0.875);

// The largest JPEG DCT scaling denominator (8, 4, 2 or 1) after which `crop`
// still spans at least out_width x out_height pixels, so no pixel the output
// needs is lost to the reduced decode.
int dct_scale_denominator(const CropRect& crop, int out_width, int out_height);

// `crop` (full-resolution coordinates) in an image decoded at 1/denominator,
// whose size is scaled_width x scaled_height.
CropRect scale_crop(const CropRect& crop, int denominator, int scaled_width, int scaled_height);

// Resizes src (8-bit, 1 or 3 channels) to out_width x out_height in dst.
// Bilinear (INTER_LINEAR) while each axis shrinks by at most 2x: every source
// pixel still contributes. Beyond that bilinear would skip pixels and alias,
// so such an axis is first halved, as often as needed, by averaging pixel
// pairs: bilinear at factor 2 samples midway between two pixels, so OpenCV's
// fast INTER_LINEAR does that averaging (at an odd size the factor is
// n / floor(n / 2), slightly above 2: weights near 1/2, no shift of the
// picture). INTER_AREA, the usual antialiased
// choice, takes 3x longer at the non-integer factors crops have. With DCT
// scaling the decoder leaves more than 2x to shrink only in a few crops (7 % of
// training crops on the ImageNet-like benchmark folder, 17 % without it).
void resize_image(const cv::Mat& src, int out_width, int out_height, cv::Mat& dst);

// Per-channel mean and standard deviation of pixel values scaled to [0, 1].
struct Normalization {
    std::array<float, 3> mean{0.f, 0.f, 0.f};
    std::array<float, 3> std{1.f, 1.f, 1.f};
};
Normalization imagenet_normalization();  // mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)

// Writes an out_height x out_width window of `image` (8-bit, 1 or 3 channels,
// any row stride) to `out` as {out_height, out_width, out_channels} floats
// (value / 255 - mean) / std. Output pixel (y, x) reads image pixel
// (y + offset_y, x' + offset_x) with x' = flip ? out_width - 1 - x : x; pixels
// outside the image read as 0 (the zero padding of a padded random crop).
// A 1-channel image written to 3 channels is replicated.
void write_normalized(const cv::Mat& image, int offset_x, int offset_y, bool flip, const Normalization& norm,
                      int out_height, int out_width, int out_channels, float* out);

}  // namespace hfq
