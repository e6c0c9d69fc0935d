#include "train/datasets.h"

#include <cmath>
#include <filesystem>

#include "data/fashion_mnist.h"
#include "data/image_folder.h"
#include "engine/check.h"

namespace hfq {
namespace fs = std::filesystem;

SubsetDataset::SubsetDataset(std::shared_ptr<const Dataset> base, int64_t count) : base_(std::move(base)) {
    const int64_t n = base_->size();
    HFQ_CHECK(count >= 1 && count <= n, "subset: ", count, " samples asked of a set of ", n);
    for (int64_t k = 0; k < count; ++k) indices_.push_back(k * n / count);
}

namespace {

bool is_fashion_mnist(const fs::path& dir) {
    return fs::exists(dir / "train-images-idx3-ubyte.gz") || fs::exists(dir / "train-images-idx3-ubyte");
}

std::shared_ptr<const Dataset> limit(std::shared_ptr<const Dataset> set, int64_t limit) {
    if (limit == 0 || limit >= set->size()) return set;
    return std::make_shared<SubsetDataset>(std::move(set), limit);
}

}  // namespace

TrainData open_datasets(const TrainConfig& c) {
    const fs::path dir(c.data);
    HFQ_CHECK(fs::is_directory(dir), "--data ", c.data, ": no such folder");
    TrainData d;
    if (is_fashion_mnist(dir)) {
        d.kind = "fashion-mnist";
        d.input_size = c.input_size ? c.input_size : 32;
        d.channels = c.input_channels ? c.input_channels : 1;
        FashionMnistOptions o;
        o.dir = c.data;
        o.size = d.input_size;
        o.channels = d.channels;
        o.augment = c.augment;
        // The padding of the random crop scales with the image (4 pixels at 28).
        o.crop_padding = std::max(1, static_cast<int>(std::lround(4.0 * d.input_size / 28)));
        d.train = std::make_shared<FashionMnist>(o);
        o.train_split = false;
        o.augment = false;
        d.test = std::make_shared<FashionMnist>(o);
        const Normalization n = fashion_mnist_normalization();
        d.preprocessing.resize_size = d.preprocessing.crop_size = d.input_size;
        d.preprocessing.mean.assign(d.channels, n.mean[0]);
        d.preprocessing.std.assign(d.channels, n.std[0]);
    } else if (fs::is_directory(dir / "train")) {
        d.kind = "imagenet";
        d.input_size = c.input_size ? c.input_size : 224;
        d.channels = c.input_channels ? c.input_channels : 3;
        HFQ_CHECK(d.channels == 3, "--input-channels: ImageNet-style folders give 3 channels, not ", d.channels);
        ImageTransformOptions o;
        o.size = d.input_size;
        o.train = c.augment;
        auto train = std::make_shared<ImageFolder>(ImageFolder::imagenet(c.data, "train", o));
        o.train = false;
        auto test = std::make_shared<ImageFolder>(ImageFolder::imagenet(c.data, "val", o, c.val_ground_truth));
        HFQ_CHECK(train->size() > 0 && test->size() > 0, "--data ", c.data, ": found ", train->size(), " training and ",
                  test->size(), " validation images; both are needed");
        d.train = train;
        d.test = test;
        d.preprocessing.crop_size = d.input_size;
        d.preprocessing.resize_size = static_cast<int>(std::lround(d.input_size / o.eval_crop_fraction));
        const Normalization n = imagenet_normalization();
        d.preprocessing.mean = {n.mean[0], n.mean[1], n.mean[2]};
        d.preprocessing.std = {n.std[0], n.std[1], n.std[2]};
    } else {
        throw Error(cat("--data ", c.data,
                        ": neither Fashion-MNIST (train-images-idx3-ubyte[.gz] and the other IDX "
                        "files) nor an ImageNet-style folder (",
                        (dir / "train").string(), "/<class>/*.JPEG and ", (dir / "val").string(), ")"));
    }
    d.train = limit(d.train, c.train_limit);
    d.test = limit(d.test, c.test_limit);
    HFQ_CHECK(d.train->num_classes() == d.test->num_classes(), "--data ", c.data, ": the training set has ",
              d.train->num_classes(), " classes, the validation set ", d.test->num_classes());
    return d;
}

}  // namespace hfq
