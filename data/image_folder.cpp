#include "data/image_folder.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/image_decode.h"

namespace hfq {

namespace fs = std::filesystem;

namespace {

// torchvision's IMG_EXTENSIONS, compared case-insensitively.
bool is_image_file(const fs::path& p) {
    std::string ext = p.extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
    static const std::set<std::string> known = {".jpg", ".jpeg", ".png",  ".ppm", ".bmp",
                                                ".pgm", ".tif",  ".tiff", ".webp"};
    return known.count(ext) > 0;
}

bool is_hidden(const fs::path& p) { return p.filename().string().starts_with("."); }

void check_folder(const std::string& dir, const char* who) {
    HFQ_CHECK(fs::exists(dir), who, ": folder ", dir, " does not exist");
    HFQ_CHECK(fs::is_directory(dir), who, ": ", dir, " is not a folder");
}

// Image files under dir, recursively, sorted by path.
std::vector<std::string> list_images(const fs::path& dir) {
    std::vector<std::string> files;
    for (const auto& entry : fs::recursive_directory_iterator(dir, fs::directory_options::follow_directory_symlink)) {
        if (entry.is_regular_file() && !is_hidden(entry.path()) && is_image_file(entry.path()))
            files.push_back(entry.path().string());
    }
    std::sort(files.begin(), files.end());
    return files;
}

std::map<std::string, int32_t> class_index(const std::vector<std::string>& classes) {
    std::map<std::string, int32_t> index;
    for (size_t i = 0; i < classes.size(); ++i) {
        HFQ_CHECK(index.emplace(classes[i], static_cast<int32_t>(i)).second, "ImageFolder: class ", classes[i],
                  " is listed twice");
    }
    return index;
}

std::string trim(const std::string& s) {
    const size_t b = s.find_first_not_of(" \t\r\n");
    if (b == std::string::npos) return "";
    return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// A ground-truth label: a class name, else a class index.
int32_t parse_label(const std::string& text, const std::map<std::string, int32_t>& index, size_t num_classes,
                    const std::string& where) {
    if (auto it = index.find(text); it != index.end()) return it->second;
    size_t used = 0;
    long value = -1;
    try {
        value = std::stol(text, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    HFQ_CHECK(used == text.size() && used > 0 && value >= 0 && value < static_cast<long>(num_classes), where,
              ": label '", text, "' is neither one of the ", num_classes, " class names nor a class index");
    return static_cast<int32_t>(value);
}

// Reads a whole file; a file that cannot be read is an unreadable sample.
void read_file(const std::string& path, std::vector<uint8_t>& bytes) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw UnreadableSample(cat("cannot open (", std::strerror(errno), ")"));
    struct stat st {};
    size_t done = 0;
    bool ok = ::fstat(fd, &st) == 0;
    if (ok) {
        bytes.resize(static_cast<size_t>(st.st_size));
        while (done < bytes.size()) {
            const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            done += static_cast<size_t>(n);
        }
        ok = done == bytes.size();
    }
    const int saved_errno = errno;
    ::close(fd);
    if (!ok) throw UnreadableSample(cat("read failed (", std::strerror(saved_errno), ")"));
}

// Per-thread decoding state, reused from sample to sample.
struct Workspace {
    ImageDecoder decoder;
    std::vector<uint8_t> bytes;
    cv::Mat resized;
};

}  // namespace

std::vector<std::string> list_class_folders(const std::string& dir) {
    check_folder(dir, "ImageFolder");
    std::vector<std::string> classes;
    for (const auto& entry : fs::directory_iterator(dir))
        if (entry.is_directory() && !is_hidden(entry.path())) classes.push_back(entry.path().filename().string());
    HFQ_CHECK(!classes.empty(), "ImageFolder: ", dir, " has no class sub-folders");
    std::sort(classes.begin(), classes.end());
    return classes;
}

ImageFolder ImageFolder::from_class_folders(const std::string& dir, const ImageTransformOptions& options,
                                            std::vector<std::string> classes) {
    const std::vector<std::string> folders = list_class_folders(dir);
    if (classes.empty()) classes = folders;
    const auto index = class_index(classes);
    std::vector<Sample> samples;
    for (const std::string& folder : folders) {
        const fs::path path = fs::path(dir) / folder;
        const auto it = index.find(folder);
        HFQ_CHECK(it != index.end(), "ImageFolder: ", path.string(), " is not one of the ", classes.size(),
                  " classes (", classes.front(), " ... ", classes.back(), ")");
        const std::vector<std::string> files = list_images(path);
        HFQ_CHECK(!files.empty(), "ImageFolder: class folder ", path.string(),
                  " holds no image files (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)");
        for (const std::string& f : files) samples.push_back({f, it->second});
    }
    return ImageFolder(std::move(samples), std::move(classes), options);
}

ImageFolder ImageFolder::from_flat_folder(const std::string& dir, const std::string& ground_truth,
                                          std::vector<std::string> classes, const ImageTransformOptions& options) {
    check_folder(dir, "ImageFolder");
    HFQ_CHECK(!classes.empty(), "ImageFolder: a flat folder (", dir, ") needs the class list to map its labels");
    std::ifstream in(ground_truth);
    HFQ_CHECK(in.good(), "ImageFolder: cannot open the ground-truth file ", ground_truth);
    const auto index = class_index(classes);
    std::vector<Sample> samples;
    std::string line;
    bool loc_form = false;  // LOC_val_solution.csv: "ImageId,PredictionString" header
    for (size_t number = 1; std::getline(in, line); ++number) {
        line = trim(line);
        if (number == 1 && line.starts_with("ImageId,PredictionString")) {
            loc_form = true;
            continue;
        }
        if (line.empty()) continue;
        const std::string where = cat(ground_truth, ":", number);
        const size_t comma = line.find(',');
        HFQ_CHECK(comma != std::string::npos, where, ": expected 'file,label', got '", line, "'");
        std::string file = trim(line.substr(0, comma));
        std::string label = trim(line.substr(comma + 1));
        if (loc_form) {  // "ILSVRC2012_val_00008726,n02119789 255 142 454 329 ..."
            label = label.substr(0, label.find(' '));
            if (fs::path(file).extension().empty()) file += ".JPEG";
        }
        const fs::path path = fs::path(dir) / file;
        HFQ_CHECK(fs::is_regular_file(path), where, ": image ", path.string(), " does not exist");
        samples.push_back({path.string(), parse_label(label, index, classes.size(), where)});
    }
    HFQ_CHECK(!samples.empty(), "ImageFolder: the ground-truth file ", ground_truth, " lists no images");
    std::sort(samples.begin(), samples.end(), [](const Sample& a, const Sample& b) { return a.path < b.path; });
    for (size_t i = 1; i < samples.size(); ++i)
        HFQ_CHECK(samples[i].path != samples[i - 1].path, "ImageFolder: ", ground_truth, " lists ", samples[i].path,
                  " twice");
    return ImageFolder(std::move(samples), std::move(classes), options);
}

ImageFolder ImageFolder::imagenet(const std::string& root, const std::string& split,
                                  const ImageTransformOptions& options, std::string ground_truth) {
    HFQ_CHECK(split == "train" || split == "val", "ImageFolder::imagenet: split must be 'train' or 'val', got '", split,
              "'");
    const std::string train_dir = (fs::path(root) / "train").string();
    HFQ_CHECK(fs::is_directory(train_dir), "ImageFolder::imagenet: ", train_dir,
              " does not exist (the class indices come from its sorted wnid folders)");
    std::vector<std::string> classes = list_class_folders(train_dir);
    if (split == "train") return from_class_folders(train_dir, options, std::move(classes));

    const std::string val_dir = (fs::path(root) / "val").string();
    check_folder(val_dir, "ImageFolder::imagenet");
    const bool has_class_folders = std::any_of(fs::directory_iterator(val_dir), fs::directory_iterator(),
                                               [](const fs::directory_entry& e) { return e.is_directory(); });
    if (has_class_folders) return from_class_folders(val_dir, options, std::move(classes));
    if (ground_truth.empty()) ground_truth = (fs::path(root) / "LOC_val_solution.csv").string();
    return from_flat_folder(val_dir, ground_truth, std::move(classes), options);
}

ImageFolder::ImageFolder(std::vector<Sample> samples, std::vector<std::string> classes,
                         const ImageTransformOptions& options)
    : samples_(std::move(samples)), classes_(std::move(classes)), options_(options) {
    HFQ_CHECK(!samples_.empty(), "ImageFolder: no samples");
    HFQ_CHECK(options_.size > 0, "ImageFolder: size must be positive, got ", options_.size);
    HFQ_CHECK(options_.flip_probability >= 0 && options_.flip_probability <= 1,
              "ImageFolder: flip_probability must be in [0, 1], got ", options_.flip_probability);
    check_options(options_.crop);
    for (const Sample& s : samples_)
        HFQ_CHECK(s.label >= 0 && s.label < num_classes(), "ImageFolder: ", s.path, " has label ", s.label,
                  ", outside [0, ", num_classes(), ")");
}

void ImageFolder::load(int64_t index, Rng& rng, float* out) const {
    const Sample& sample = samples_.at(index);
    thread_local Workspace ws;
    const int size = options_.size;
    const auto plan = [&](int width, int height) {
        const CropRect crop = options_.train ? random_resized_crop(width, height, options_.crop, rng)
                                             : center_crop(width, height, size, options_.eval_crop_fraction);
        return CropRequest{crop, size, size};
    };
    try {
        read_file(sample.path, ws.bytes);
        const cv::Mat crop = ws.decoder.decode_crop(ws.bytes, plan, options_.dct_scaling);
        const bool flip = options_.train && rng.uniform() < options_.flip_probability;
        resize_image(crop, size, size, ws.resized);
        write_normalized(ws.resized, 0, 0, flip, options_.normalization, size, size, 3, out);
    } catch (const UnreadableSample& e) {
        throw UnreadableSample(cat(sample.path, ": ", e.what()));
    }
}

}  // namespace hfq
