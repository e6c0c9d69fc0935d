// mobilenet_predict, run as a program: tensor and image inputs, the
// architecture from metadata or the command line, JSON lines, errors.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "data/image_folder.h"
#include "engine/check.h"
#include "engine/tensor_math.h"
#include "layers/checkpoint.h"
#include "tests/gradcheck.h"
#include "tests/test_data_util.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

const std::string kData = HFQ_TEST_DATA_DIR;

struct Run {
    int status = -1;
    std::vector<nlohmann::json> lines;
    std::string err;
};

// The program sits next to this test in the build folder.
Run run_predict(const std::string& args, const test::TempDir& dir) {
    const fs::path exe = fs::read_symlink("/proc/self/exe").parent_path() / "mobilenet_predict";
    REQUIRE_MESSAGE(fs::exists(exe), exe.string(), " is not built");
    const std::string err_file = dir / "stderr.txt";
    FILE* pipe = ::popen((exe.string() + " " + args + " 2>" + err_file).c_str(), "r");
    REQUIRE(pipe != nullptr);
    Run r;
    std::string out;
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) out.append(buf, n);
    const int status = ::pclose(pipe);
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::istringstream lines(out);
    for (std::string line; std::getline(lines, line);) r.lines.push_back(nlohmann::json::parse(line));
    std::ifstream e(err_file);
    r.err.assign(std::istreambuf_iterator<char>(e), {});
    return r;
}

Tensor logits_of(const nlohmann::json& line) {
    const auto v = line.at("logits").get<std::vector<float>>();
    return Tensor::from_vector({1, static_cast<int64_t>(v.size())}, v);
}

// NHWC {N, H, W, C} -> NCHW, as a PyTorch user would save a batch.
Tensor to_nchw(const Tensor& x) {
    const int64_t n = x.dim(0), h = x.dim(1), w = x.dim(2), c = x.dim(3);
    Tensor out = Tensor::empty({n, c, h, w});
    for (int64_t i = 0; i < n; ++i)
        for (int64_t p = 0; p < h * w; ++p)
            for (int64_t ch = 0; ch < c; ++ch) out.f32()[(i * c + ch) * h * w + p] = x.f32()[(i * h * w + p) * c + ch];
    return out;
}

std::string q(const std::string& s) { return "'" + s + "'"; }

// The logits of the model in `weights` (evaluation mode) on the NHWC batch x,
// computed in this process. mobilenet_predict runs the same model on a batch
// of the same shape, through the same kernels (it inherits OMP_NUM_THREADS
// and ONEDNN_MAX_CPU_ISA), so the floats it prints must be these, bit for bit.
// (test_mobilenet holds the model's evaluation logits to PyTorch's.)
Tensor model_logits(const SafetensorsFile& weights, const Tensor& x) {
    auto model = build_model(checkpoint_model_config(weights).value());
    load_state_dict(*model, weights);
    model->eval();
    NoGradGuard ng;
    return (*model)(Variable(x)).value();
}

bool same_floats(const Tensor& a, const Tensor& b) { return a.shape() == b.shape() && a.to_vector() == b.to_vector(); }

}  // namespace

TEST_CASE("a tensor batch: logits as the model computes them, top5 from them") {
    test::TempDir dir;
    const SafetensorsFile ref = read_safetensors(kData + "/model_v2_reference.safetensors");
    // "input" is not the first tensor: it is still the one used.
    write_safetensors(dir / "batch.safetensors", {{"other", Tensor::zeros({1})}, {"input", to_nchw(ref.get("input"))}});
    const Run r = run_predict(
        "--weights " + q(kData + "/model_v2.safetensors") + " --tensor " + q(dir / "batch.safetensors"), dir);
    INFO(r.err);
    REQUIRE(r.status == 0);
    REQUIRE(r.lines.size() == 2);
    const Tensor expected = model_logits(read_safetensors(kData + "/model_v2.safetensors"), ref.get("input"));
    for (int i = 0; i < 2; ++i) {
        const nlohmann::json& line = r.lines[i];
        CHECK(line.at("input") == (dir / "batch.safetensors") + "[" + std::to_string(i) + "]");
        CHECK(same_floats(logits_of(line), expected.slice0(i, i + 1)));
        // top5: the five largest logits, softmax probabilities, descending.
        const auto top = line.at("top5");
        REQUIRE(top.size() == 5);
        const std::vector<float> logits = line.at("logits").get<std::vector<float>>();
        // The program's softmax: the same double sum of the same floats, in
        // the same order, rounded to float once.
        double total = 0;
        for (float l : logits) total += std::exp(double(l) - logits[top[0][0].get<int>()]);
        CHECK(top[0][1].get<float>() == static_cast<float>(1.0 / total));
        for (int k = 0; k < 5; ++k) {
            const int idx = top[k][0].get<int>();
            if (k > 0) CHECK(top[k][1].get<double>() <= top[k - 1][1].get<double>());
            int larger = 0;
            for (float l : logits) larger += l > logits[idx];
            CHECK(larger == k);
        }
    }
}

TEST_CASE("images: preprocessed as the checkpoint says, same result as the tensor route") {
    test::TempDir dir;
    // The fixture model with preprocessing metadata: shorter side to 72,
    // centre crop 64.
    const SafetensorsFile weights = read_safetensors(kData + "/model_v2.safetensors");
    auto model = build_model(checkpoint_model_config(weights).value());
    load_state_dict(*model, weights);
    // In evaluation mode the fixture's logits hardly depend on the input (see
    // make_model_fixtures.py); running statistics of real activations make
    // them do.
    for (int i = 0; i < 30; ++i) (*model)(Variable(testing::random_tensor({2, 64, 64, 3}, i)));
    const Preprocessing pre{.resize_size = 72, .crop_size = 64};
    save_checkpoint(dir / "m.safetensors", *model, pre);

    // Two pictures (a gradient and stripes, 90x80 and 70x100) as PNG files.
    cv::Mat a(80, 90, CV_8UC3), b(100, 70, CV_8UC3);
    a.forEach<cv::Vec3b>([](cv::Vec3b& p, const int* pos) { p = cv::Vec3b(pos[0] * 3, pos[1] * 2, 128); });
    b.forEach<cv::Vec3b>([](cv::Vec3b& p, const int* pos) { p = cv::Vec3b((pos[1] / 5) % 2 * 255, 40, pos[0]); });
    REQUIRE(cv::imwrite(dir / "a.png", a));
    REQUIRE(cv::imwrite(dir / "b.png", b));
    std::ofstream(dir / "broken.png") << "not an image";

    const Run r = run_predict("--weights " + q(dir / "m.safetensors") + " " + q(dir / "a.png") + " " +
                                  q(dir / "broken.png") + " " + q(dir / "b.png"),
                              dir);
    INFO(r.err);
    // The unreadable file comes after a good one: its line must be an error,
    // not the previous picture again.
    CHECK(r.status == 2);  // one input was unreadable
    REQUIRE(r.lines.size() == 3);
    CHECK(r.lines[1].at("input") == (dir / "broken.png"));
    CHECK(r.lines[1].contains("error"));
    CHECK(!r.lines[1].contains("logits"));

    // The same pictures through the data library's evaluation transform,
    // saved as a tensor, must give the same logits.
    ImageTransformOptions t;
    t.size = 64;
    t.train = false;
    t.eval_crop_fraction = 64.0 / 72.0;
    t.dct_scaling = false;
    const ImageFolder images({{dir / "a.png", 0}, {dir / "b.png", 0}}, {"x"}, t);
    Tensor batch = Tensor::empty({2, 64, 64, 3});
    Rng rng;
    images.load(0, rng, batch.f32());
    images.load(1, rng, batch.f32() + 64 * 64 * 3);
    write_safetensors(dir / "images.safetensors", {{"images", to_nchw(batch)}});
    const Run t_run =
        run_predict("--weights " + q(dir / "m.safetensors") + " --tensor " + q(dir / "images.safetensors"), dir);
    REQUIRE(t_run.status == 0);
    REQUIRE(t_run.lines.size() == 2);
    // The same pixels in a batch of the same shape through the same model:
    // the same floats.
    for (int i = 0; i < 2; ++i) CHECK(same_floats(logits_of(r.lines[i == 0 ? 0 : 2]), logits_of(t_run.lines[i])));
    // Different pictures, different logits (by far more than a rounding).
    CHECK(max_rel_diff(logits_of(r.lines[0]), logits_of(r.lines[2]), 1e-6) > 1e-4);
}

TEST_CASE("architecture from the command line for weights without metadata; errors") {
    test::TempDir dir;
    const SafetensorsFile ref = read_safetensors(kData + "/model_v1_reference.safetensors");
    const SafetensorsFile weights = read_safetensors(kData + "/model_v1.safetensors");
    // What a converted state dict without hfq metadata looks like.
    write_safetensors(dir / "bare.safetensors", weights.tensors);
    const Tensor one = to_nchw(ref.get("input").slice0(1, 2));
    write_safetensors(dir / "one.safetensors", {{"x", one.reshape({3, 64, 64})}});  // CHW: one input

    const Run no_arch =
        run_predict("--weights " + q(dir / "bare.safetensors") + " --tensor " + q(dir / "one.safetensors"), dir);
    CHECK(no_arch.status == 1);
    CHECK(no_arch.err.find("no \"hfq.model\" metadata; give the architecture with --arch") != std::string::npos);

    const Run ok = run_predict("--weights " + q(dir / "bare.safetensors") +
                                   " --arch v1 --width 0.5 --classes 10 --tensor " + q(dir / "one.safetensors"),
                               dir);
    INFO(ok.err);
    REQUIRE(ok.status == 0);
    REQUIRE(ok.lines.size() == 1);
    // As the model the metadata describes (v1, width 0.5, 10 classes) computes them.
    CHECK(same_floats(logits_of(ok.lines[0]), model_logits(weights, ref.get("input").slice0(1, 2))));

    const Run wrong = run_predict("--weights " + q(dir / "bare.safetensors") +
                                      " --arch v2 --width 0.5 --classes 10 --tensor " + q(dir / "one.safetensors"),
                                  dir);
    CHECK(wrong.status == 1);
    CHECK(wrong.err.find("tensor 'features.18.0.weight' is f32 [256, 256, 1, 1] in the file") != std::string::npos);

    const Run both = run_predict("--weights " + q(kData + "/model_v1.safetensors"), dir);
    CHECK(both.status == 1);
    CHECK(both.err.find("give image files or --tensor FILE") != std::string::npos);
    const Run missing = run_predict("--weights " + q(dir / "absent.safetensors") + " x.png", dir);
    CHECK(missing.status != 0);
    CHECK(missing.lines.empty());
}
