// Decoding an encoded image file (in memory) to 8-bit RGB, only as large as
// the caller's crop needs.
//
// JPEGs go through TurboJPEG (libjpeg-turbo). Its decoder can run the inverse
// DCT at 1/2, 1/4 or 1/8 size, which skips most of the decoding work: the
// caller says which region it needs at which size, and the image is decoded at
// the strongest reduction that keeps that region at least that large. (The
// M/8 reductions in between are not used: libjpeg-turbo has no SIMD code for
// them and they decode slower than full size.) Grayscale JPEGs come out as
// R = G = B; CMYK/YCCK JPEGs are converted to RGB here. Anything that is not a
// JPEG (ImageNet has a PNG named .JPEG) goes through OpenCV's imdecode.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include <opencv2/core.hpp>

#include "data/image_transform.h"

namespace hfq {

// What the caller will cut out of the image: `crop` in full-resolution
// coordinates, to be resized to out_width x out_height.
struct CropRequest {
    CropRect crop;
    int out_width = 0, out_height = 0;
};
// Chooses the crop once the full-resolution size is known.
using CropPlanner = std::function<CropRequest(int width, int height)>;

// A byte buffer that grows when asked for more and is never cleared (a
// std::vector would zero every newly used byte; the decoder overwrites them all).
class ScratchBuffer {
public:
    uint8_t* get(size_t bytes) {
        if (bytes > capacity_) {
            data_.reset(new uint8_t[bytes]);
            capacity_ = bytes;
        }
        return data_.get();
    }

private:
    std::unique_ptr<uint8_t[]> data_;
    size_t capacity_ = 0;
};

// One decoder per thread: it holds a TurboJPEG handle and reuses its pixel
// buffers from image to image.
class ImageDecoder {
public:
    ImageDecoder();
    ~ImageDecoder();
    ImageDecoder(const ImageDecoder&) = delete;
    ImageDecoder& operator=(const ImageDecoder&) = delete;

    // Decodes `bytes` and returns the planner's crop as an RGB view (CV_8UC3)
    // into this decoder's buffer, valid until the next call. With dct_scaling,
    // JPEGs are decoded at the reduced size described above (the view is then
    // smaller than the crop, but never smaller than the requested output).
    // Throws UnreadableSample when the data is not a decodable image, a JPEG is
    // truncated or corrupt (libjpeg-turbo would fill the rest with grey), or
    // the image exceeds max_pixels.
    cv::Mat decode_crop(std::span<const uint8_t> bytes, const CropPlanner& plan, bool dct_scaling);

    // The DCT scaling denominator the last decode_crop used (1 when not a JPEG).
    int last_scale_denominator() const { return last_denominator_; }

    static constexpr int64_t max_pixels = 100'000'000;  // refuse decompression bombs

private:
    cv::Mat decode_jpeg(std::span<const uint8_t> bytes, const CropPlanner& plan, bool dct_scaling, CropRect& roi);
    cv::Mat decode_other(std::span<const uint8_t> bytes, const CropPlanner& plan, CropRect& roi);

    void* tj_ = nullptr;  // tjhandle
    ScratchBuffer rgb_;   // the decoded image, H x W x 3
    ScratchBuffer cmyk_;  // CMYK JPEGs decode here first
    cv::Mat other_;       // imdecode's BGR result
    int last_denominator_ = 1;
};

// True when a JPEG carries Photoshop's Adobe APP14 marker. CMYK JPEGs with it
// store inverted ink values (0 = full ink), as Photoshop and Pillow write them.
bool jpeg_has_adobe_marker(std::span<const uint8_t> bytes);

}  // namespace hfq
