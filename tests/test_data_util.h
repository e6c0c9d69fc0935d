// Helpers for the data tests: a temporary folder and image encoders, so the
// tests build their own small image trees (nothing is downloaded or stored).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <turbojpeg.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "engine/check.h"

namespace hfq::test {

// A fresh folder under the system's temp dir, removed with its contents.
struct TempDir {
    std::filesystem::path path;
    TempDir() {
        std::string tmpl = (std::filesystem::temp_directory_path() / "hfq_data_test_XXXXXX").string();
        HFQ_CHECK(mkdtemp(tmpl.data()) != nullptr, "TempDir: mkdtemp failed");
        path = tmpl;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string operator/(const std::string& rel) const { return (path / rel).string(); }
};

inline void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    HFQ_CHECK(out.good(), "write_bytes: cannot write ", path);
}

inline std::vector<uint8_t> read_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The file's whole content ("" when it cannot be read). A read that fails
// after the file opened throws out of libstdc++'s filebuf, whatever the
// stream's exception mask: that happens to /proc/<pid>/stat when the process
// ends between the open and the read (ESRCH), which the process scans of the
// MPI tests meet whenever another test's processes come and go.
inline std::string read_text(const std::string& path) {
    try {
        std::ifstream in(path, std::ios::binary);
        return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    } catch (const std::ios_base::failure&) {
        return "";
    }
}

// TurboJPEG compression of a continuous 8-bit image: RGB (CV_8UC3, RGB order),
// gray (CV_8UC1) or CMYK (CV_8UC4, values stored as given).
inline std::vector<uint8_t> encode_jpeg(const cv::Mat& image, int quality = 95, int subsampling = TJSAMP_444) {
    HFQ_CHECK(image.isContinuous(), "encode_jpeg: image must be continuous");
    const int format = image.channels() == 1 ? TJPF_GRAY : image.channels() == 4 ? TJPF_CMYK : TJPF_RGB;
    if (image.channels() == 1) subsampling = TJSAMP_GRAY;
    tjhandle tj = tjInitCompress();
    unsigned char* data = nullptr;
    unsigned long size = 0;
    const int status =
        tjCompress2(tj, image.data, image.cols, 0, image.rows, format, &data, &size, subsampling, quality, 0);
    std::vector<uint8_t> bytes(data, data + size);
    tjFree(data);
    tjDestroy(tj);
    HFQ_CHECK(status == 0, "encode_jpeg: tjCompress2 failed");
    return bytes;
}

// PNG of an RGB (or gray) image.
inline std::vector<uint8_t> encode_png(const cv::Mat& image) {
    cv::Mat bgr;
    if (image.channels() == 3)
        cv::cvtColor(image, bgr, cv::COLOR_RGB2BGR);
    else
        bgr = image;
    std::vector<uint8_t> bytes;
    HFQ_CHECK(cv::imencode(".png", bgr, bytes), "encode_png failed");
    return bytes;
}

// A smooth RGB test picture: red grows left to right, green top to bottom,
// blue is `blue` (so images of different classes can differ).
inline cv::Mat gradient_rgb(int width, int height, int blue = 60) {
    cv::Mat image(height, width, CV_8UC3);
    for (int y = 0; y < height; ++y)
        for (int x = 0; x < width; ++x)
            image.at<cv::Vec3b>(y, x) =
                cv::Vec3b(static_cast<uint8_t>(255 * x / std::max(1, width - 1)),
                          static_cast<uint8_t>(255 * y / std::max(1, height - 1)), static_cast<uint8_t>(blue));
    return image;
}

inline cv::Mat solid_rgb(int width, int height, uint8_t r, uint8_t g, uint8_t b) {
    return cv::Mat(height, width, CV_8UC3, cv::Scalar(r, g, b));
}

}  // namespace hfq::test
