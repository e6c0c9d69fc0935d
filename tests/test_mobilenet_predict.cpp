// mobilenet_predict, run as a program: tensor and image inputs, the
// architecture from metadata or the command line, JSON lines, errors; QAT
// checkpoints and exports (weight-only and W4A8), each run the way its
// metadata says or --integer / --fake-quant choose.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "data/image_folder.h"
#include "deploy/integer_engine.h"
#include "engine/check.h"
#include "engine/ops.h"
#include "engine/tensor_math.h"
#include "layers/checkpoint.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "tests/gradcheck.h"
#include "tests/test_data_util.h"
#include "tests/test_model_util.h"
#include "train/training_checkpoint.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

const std::string kData = HFQ_TEST_DATA_DIR;

struct Run {
    int status = -1;
    std::vector<nlohmann::json> lines;
    std::string err;
};

// The program sits next to this test in the build folder. `env` goes before
// it on the shell's command line ("NAME=value ...").
Run run_predict(const std::string& args, const test::TempDir& dir, const std::string& env = "") {
    const fs::path exe = fs::read_symlink("/proc/self/exe").parent_path() / "mobilenet_predict";
    REQUIRE_MESSAGE(fs::exists(exe), exe.string(), " is not built");
    const std::string err_file = dir / "stderr.txt";
    FILE* pipe = ::popen((env + " " + exe.string() + " " + args + " 2>" + err_file).c_str(), "r");
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

// A run that printed one line per row of `expected` {N, K}, with these logits
// bit for bit.
void check_logits(const Run& r, const Tensor& expected) {
    INFO(r.err);
    REQUIRE(r.status == 0);
    REQUIRE(static_cast<int64_t>(r.lines.size()) == expected.dim(0));
    for (int64_t i = 0; i < expected.dim(0); ++i) CHECK(same_floats(logits_of(r.lines[i]), expected.slice0(i, i + 1)));
}

void check_refused(const Run& r, const std::string& message) {
    CHECK(r.status == 1);
    CHECK(r.lines.empty());
    CHECK_MESSAGE(r.err.find(message) != std::string::npos, r.err);
}

quant::QuantPolicy policy(int activation_bits) {
    quant::QuantPolicy p;
    p.options.per_channel = true;
    p.activation_bits = activation_bits;  // 8: W4A8, 0: weight-only
    p.freeze_bn_step = 3;                 // the last steps train the evaluation graph
    return p;
}

// A tiny quantized model after 5 training steps, in evaluation mode.
std::shared_ptr<Model> trained_model(Arch arch, const quant::QuantPolicy& policy) {
    auto model = build_model(testing::small_model_config(arch), 31);
    quant::quantize_model(*model, policy);
    testing::train_steps(*model, testing::random_tensor({4, 16, 16, 3}, 32), 5);
    model->eval();
    return model;
}

Tensor eval_logits(Model& model, const Tensor& x) {
    NoGradGuard ng;
    return model(Variable(x)).value();
}

// The QAT checkpoint train_mobilenet writes (final.safetensors): the model's
// tensors, its policy in the metadata.
void save_qat_checkpoint(const std::string& path, Model& model, const quant::QuantPolicy& policy) {
    save_checkpoint(path, model, std::nullopt, {{quant::kQuantPolicyKey, policy.to_json()}});
}

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

TEST_CASE("a W4A8 model: its QAT checkpoint and its export, through the fake-quant model or the integer engine") {
    test::TempDir dir;
    const quant::QuantPolicy w4a8 = policy(8);
    auto model = trained_model(Arch::mobilenet_v2, w4a8);  // V2: residual sums too
    save_qat_checkpoint(dir / "qat.safetensors", *model, w4a8);
    quant::export_quantized_model(dir / "export.safetensors", *model, w4a8);
    const Tensor x = testing::random_tensor({3, 16, 16, 3}, 7);
    write_safetensors(dir / "batch.safetensors", {{"input", to_nchw(x)}});
    const std::string batch = " --tensor " + q(dir / "batch.safetensors");
    // The program loads the checkpoint into the model quantize_model builds
    // and runs it on a batch of the same shape: the same code, the same floats.
    const Tensor fake_quant = eval_logits(*model, x);

    // QAT checkpoint: the fake-quant model.
    check_logits(run_predict("--weights " + q(dir / "qat.safetensors") + batch, dir), fake_quant);
    // QAT checkpoint, --integer: exported to a temporary file (removed
    // afterwards) and run by the integer engine.
    const std::string tmp = dir / "tmp";
    fs::create_directory(tmp);
    check_logits(run_predict("--weights " + q(dir / "qat.safetensors") + " --integer" + batch, dir, "TMPDIR=" + q(tmp)),
                 fake_quant);
    CHECK(fs::is_empty(tmp));
    // Export: the integer engine, whose logits are the fake-quant model's.
    const Run engine = run_predict("--weights " + q(dir / "export.safetensors") + batch, dir);
    check_logits(engine, deploy::IntegerEngine(dir / "export.safetensors").run(x).float_logits());
    check_logits(engine, fake_quant);
    // Export, --fake-quant: the model rebuilt from the export, in float.
    const Run rebuilt = run_predict("--weights " + q(dir / "export.safetensors") + " --fake-quant" + batch, dir);
    check_logits(rebuilt, eval_logits(*quant::build_model_from_export(dir / "export.safetensors"), x));
    check_logits(rebuilt, fake_quant);

    check_refused(run_predict("--weights " + q(dir / "export.safetensors") + " --integer --fake-quant" + batch, dir),
                  "--integer and --fake-quant exclude each other");
}

TEST_CASE("a weight-only model: its export runs the model rebuilt from it; --integer is refused") {
    test::TempDir dir;
    const quant::QuantPolicy weight_only = policy(0);
    auto model = trained_model(Arch::mobilenet_v1, weight_only);
    save_qat_checkpoint(dir / "qat.safetensors", *model, weight_only);
    quant::export_quantized_model(dir / "export.safetensors", *model, weight_only);
    const Tensor x = testing::random_tensor({3, 16, 16, 3}, 8);
    write_safetensors(dir / "batch.safetensors", {{"input", to_nchw(x)}});
    const std::string batch = " --tensor " + q(dir / "batch.safetensors");

    check_logits(run_predict("--weights " + q(dir / "qat.safetensors") + batch, dir), eval_logits(*model, x));
    // A run's checkpoint.safetensors holds the optimizers' state beside the
    // model's (train/training_checkpoint.h): left out, the same model.
    std::vector<std::pair<std::string, Tensor>> tensors = model->state_dict();
    tensors.emplace_back(std::string(kOptimizerPrefix) + "weights/momentum.0", Tensor::zeros({1}));
    write_safetensors(dir / "checkpoint.safetensors", tensors, read_safetensors(dir / "qat.safetensors").metadata);
    check_logits(run_predict("--weights " + q(dir / "checkpoint.safetensors") + batch, dir), eval_logits(*model, x));
    check_logits(run_predict("--weights " + q(dir / "export.safetensors") + batch, dir),
                 eval_logits(*quant::build_model_from_export(dir / "export.safetensors"), x));

    check_refused(run_predict("--weights " + q(dir / "export.safetensors") + " --integer" + batch, dir),
                  "a weight-only export (its layers' inputs are on no activation grid): --integer runs the integer "
                  "engine, which needs a W4A8 export");
    check_refused(run_predict("--weights " + q(dir / "qat.safetensors") + " --integer" + batch, dir),
                  "a weight-only QAT checkpoint (no activation bits in its policy)");
    check_refused(run_predict("--weights " + q(kData + "/model_v1.safetensors") + " --fake-quant" + batch, dir),
                  "a float checkpoint (no \"hfq.quant_policy\" or \"hfq.export\" metadata): --integer and "
                  "--fake-quant are for quantized models");
}
