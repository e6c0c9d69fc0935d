// ImageFolder: a dataset of image files with class labels, in the layouts
// ImageNet is distributed in.
//
//   ROOT/train/<wnid>/*.JPEG    class folders; class index = position of the
//   ROOT/val/<wnid>/*.JPEG      folder name in sorted order (as torchvision)
//   ROOT/val/*.JPEG + ground truth   a flat folder and a label file, either
//       LOC_val_solution.csv ("ImageId,PredictionString" header; the first
//       token of PredictionString is the wnid) or a two-column "file,label"
//       list whose label is a class name or a class index.
//
// Samples are decoded (TurboJPEG with DCT scaling, OpenCV for other formats),
// augmented (training: random resized crop + horizontal flip; evaluation:
// shorter side to size/0.875, centre crop) and normalized with the ImageNet
// mean and standard deviation into {size, size, 3} floats.
#pragma once
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/image_transform.h"

namespace hfq {

struct ImageTransformOptions {
    int size = 224;                     // output size x size x 3
    bool train = true;                  // random resized crop + flip; else centre crop
    RandomResizedCropOptions crop;      // training crop ranges
    float flip_probability = 0.5f;      // training horizontal flip
    double eval_crop_fraction = 0.875;  // evaluation: shorter side resized to size / this
    bool dct_scaling = true;            // decode JPEGs at 1/2, 1/4, 1/8 size when the crop allows
    Normalization normalization = imagenet_normalization();
};

class ImageFolder : public Dataset {
public:
    struct Sample {
        std::string path;
        int32_t label = 0;
    };

    // dir/<class>/... (searched recursively; files with the image extensions
    // torchvision accepts). Without `classes`, the classes are dir's sub-folder
    // names, sorted. With it (e.g. the training classes, for a validation
    // folder), each sub-folder must be one of them and gets its index there.
    static ImageFolder from_class_folders(const std::string& dir, const ImageTransformOptions& options,
                                          std::vector<std::string> classes = {});
    // A flat folder of images labelled by a ground-truth file (see above);
    // `classes` maps class names to indices.
    static ImageFolder from_flat_folder(const std::string& dir, const std::string& ground_truth,
                                        std::vector<std::string> classes, const ImageTransformOptions& options);
    // ImageNet under `root`: split "train" is root/train's class folders;
    // split "val" is root/val, as class folders if it has sub-folders, else flat
    // with `ground_truth` (default root/LOC_val_solution.csv). Class indices
    // always follow root/train's sorted wnids, so train and val agree.
    static ImageFolder imagenet(const std::string& root, const std::string& split, const ImageTransformOptions& options,
                                std::string ground_truth = "");

    ImageFolder(std::vector<Sample> samples, std::vector<std::string> classes, const ImageTransformOptions& options);

    int64_t size() const override { return static_cast<int64_t>(samples_.size()); }
    int num_classes() const override { return static_cast<int>(classes_.size()); }
    Shape sample_shape() const override { return {options_.size, options_.size, 3}; }
    int32_t label(int64_t index) const override { return samples_.at(index).label; }
    std::string name(int64_t index) const override { return samples_.at(index).path; }
    void load(int64_t index, Rng& rng, float* out) const override;

    const std::vector<std::string>& classes() const { return classes_; }
    const std::vector<Sample>& samples() const { return samples_; }
    const ImageTransformOptions& options() const { return options_; }

private:
    std::vector<Sample> samples_;
    std::vector<std::string> classes_;
    ImageTransformOptions options_;
};

// The sorted names of dir's sub-folders (the classes of a class-folder tree).
std::vector<std::string> list_class_folders(const std::string& dir);

}  // namespace hfq
