#include "data/image_decode.h"

#include <cstring>

#include <turbojpeg.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/dataset.h"
#include "engine/check.h"

namespace hfq {

namespace {

bool is_jpeg(std::span<const uint8_t> b) { return b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF; }

void check_size(int64_t width, int64_t height) {
    if (width * height > ImageDecoder::max_pixels)
        throw UnreadableSample(
            cat("a ", width, "x", height, " image is larger than the ", ImageDecoder::max_pixels, "-pixel limit"));
}

void check_crop(const CropRect& c, int width, int height) {
    HFQ_CHECK(c.width > 0 && c.height > 0 && c.x >= 0 && c.y >= 0 && c.x + c.width <= width && c.y + c.height <= height,
              "ImageDecoder: crop ", c.width, "x", c.height, "+", c.x, "+", c.y, " is not inside the ", width, "x",
              height, " image");
}

// out = (255 - ink_c) * (255 - ink_k) / 255 per channel, ink read from the
// stored values (inverted storage holds 255 - ink).
void cmyk_to_rgb(const uint8_t* cmyk, uint8_t* rgb, int64_t pixels, bool inverted) {
    for (int64_t i = 0; i < pixels; ++i, cmyk += 4, rgb += 3) {
        const int flip = inverted ? 0 : 255;
        const int k = cmyk[3] ^ flip;  // x ^ 255 == 255 - x for a byte
        for (int ch = 0; ch < 3; ++ch) rgb[ch] = static_cast<uint8_t>(((cmyk[ch] ^ flip) * k + 127) / 255);
    }
}

}  // namespace

bool jpeg_has_adobe_marker(std::span<const uint8_t> b) {
    // Walk the marker segments between SOI and the first scan (SOS).
    size_t pos = 2;
    while (pos + 4 <= b.size()) {
        if (b[pos] != 0xFF) return false;
        const uint8_t marker = b[pos + 1];
        if (marker == 0xFF) {  // fill byte
            ++pos;
            continue;
        }
        if (marker == 0xDA || marker == 0xD9) return false;  // SOS / EOI: headers are over
        const size_t length = (size_t{b[pos + 2]} << 8) | b[pos + 3];
        if (marker == 0xEE && length >= 7 && pos + 9 <= b.size() && std::memcmp(&b[pos + 4], "Adobe", 5) == 0)
            return true;
        pos += 2 + length;
    }
    return false;
}

ImageDecoder::ImageDecoder() : tj_(tjInitDecompress()) {
    HFQ_CHECK(tj_ != nullptr, "ImageDecoder: tjInitDecompress failed: ", tjGetErrorStr2(nullptr));
}

ImageDecoder::~ImageDecoder() { tjDestroy(tj_); }

cv::Mat ImageDecoder::decode_crop(std::span<const uint8_t> bytes, const CropPlanner& plan, bool dct_scaling) {
    if (bytes.empty()) throw UnreadableSample("empty file");
    CropRect roi;
    last_denominator_ = 1;
    cv::Mat image = is_jpeg(bytes) ? decode_jpeg(bytes, plan, dct_scaling, roi) : decode_other(bytes, plan, roi);
    return image(cv::Rect(roi.x, roi.y, roi.width, roi.height));
}

cv::Mat ImageDecoder::decode_jpeg(std::span<const uint8_t> bytes, const CropPlanner& plan, bool dct_scaling,
                                  CropRect& roi) {
    int width = 0, height = 0, subsampling = 0, colorspace = 0;
    if (tjDecompressHeader3(tj_, bytes.data(), bytes.size(), &width, &height, &subsampling, &colorspace) != 0)
        throw UnreadableSample(cat("not a readable JPEG (", tjGetErrorStr2(tj_), ")"));
    if (width <= 0 || height <= 0) throw UnreadableSample("not a readable JPEG (no frame header)");
    check_size(width, height);
    const CropRequest request = plan(width, height);
    check_crop(request.crop, width, height);
    const int d = dct_scaling ? dct_scale_denominator(request.crop, request.out_width, request.out_height) : 1;
    const tjscalingfactor factor{1, d};
    const int w = TJSCALED(width, factor), h = TJSCALED(height, factor);

    const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
    uint8_t* rgb = rgb_.get(size_t(w) * h * 3);
    uint8_t* target = cmyk ? cmyk_.get(size_t(w) * h * 4) : rgb;
    // Default flags: accurate integer IDCT and smooth chroma upsampling, the
    // same pixels Pillow (and so torchvision) decodes.
    const int status = tjDecompress2(tj_, bytes.data(), bytes.size(), target, w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB, 0);
    if (status != 0) {
        // A warning still yields an image, but "premature end" or "corrupt
        // data" means some of it is grey filler: not a sample to train on.
        // Extraneous bytes between markers change no pixel.
        const char* message = tjGetErrorStr2(tj_);
        const bool harmless = tjGetErrorCode(tj_) == TJERR_WARNING && std::strstr(message, "extraneous bytes");
        if (!harmless) throw UnreadableSample(cat("corrupt or truncated JPEG (", message, ")"));
    }
    if (cmyk) cmyk_to_rgb(target, rgb, int64_t(w) * h, jpeg_has_adobe_marker(bytes));
    last_denominator_ = d;
    roi = scale_crop(request.crop, d, w, h);
    return cv::Mat(h, w, CV_8UC3, rgb);
}

cv::Mat ImageDecoder::decode_other(std::span<const uint8_t> bytes, const CropPlanner& plan, CropRect& roi) {
    try {
        const cv::Mat encoded(1, static_cast<int>(bytes.size()), CV_8U, const_cast<uint8_t*>(bytes.data()));
        // Like TurboJPEG (and torchvision), ignore any EXIF orientation.
        other_ = cv::imdecode(
            encoded,
            cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);  // on failure imdecode into a buffer keeps the old image
    } catch (const cv::Exception& e) {
        throw UnreadableSample(cat("not a decodable image (OpenCV: ", e.err, ")"));
    }
    if (other_.empty())
        throw UnreadableSample("neither a JPEG nor an image OpenCV can decode (corrupt, truncated or unknown format)");
    check_size(other_.cols, other_.rows);
    const CropRequest request = plan(other_.cols, other_.rows);
    check_crop(request.crop, other_.cols, other_.rows);
    cv::Mat rgb(other_.rows, other_.cols, CV_8UC3, rgb_.get(other_.total() * 3));
    cv::cvtColor(other_, rgb, cv::COLOR_BGR2RGB);
    roi = request.crop;
    return rgb;
}

}  // namespace hfq
