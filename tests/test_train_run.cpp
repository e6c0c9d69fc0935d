// Whole runs of the trainer, a few steps each: on a generated image folder
// and on a subset of Fashion-MNIST (loss falls, files written, metrics lines
// parse, the saved models reproduce the reported accuracy); SIGINT; a
// diverging run; corrupt images (skipped and counted, or too many: a plain
// message); bad input (missing data, unreadable checkpoints, an occupied
// output folder: clear errors, nothing written or overwritten).
#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/check.h"
#include "layers/checkpoint.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "tests/test_train_util.h"
#include "train/datasets.h"
#include "train/evaluate.h"
#include "train/trainer.h"
#include "train/training_checkpoint.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

std::string read_text(const std::string& path) {
    const std::vector<uint8_t> bytes = test::read_bytes(path);
    return {bytes.begin(), bytes.end()};
}

// Sends what the program prints to standard output to a file, while it lives.
struct CaptureStdout {
    explicit CaptureStdout(const std::string& path) {
        std::fflush(stdout);
        const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        REQUIRE(fd >= 0);
        ::dup2(fd, STDOUT_FILENO);
        ::close(fd);
    }
    ~CaptureStdout() {
        std::fflush(stdout);
        ::dup2(saved, STDOUT_FILENO);
        ::close(saved);
    }
    int saved = ::dup(STDOUT_FILENO);
};

// Rebuilds a saved model (float, or quantized by its metadata's policy) and
// evaluates it on the run's test set.
EvalResult evaluate_saved(const std::string& file, const TrainConfig& config) {
    const SafetensorsFile f = read_safetensors(file);
    auto model = build_model(*checkpoint_model_config(f));
    if (f.metadata.count(quant::kQuantPolicyKey))
        quant::quantize_model(*model, quant::QuantPolicy::from_json(f.metadata.at(quant::kQuantPolicyKey)));
    load_state_dict(*model, f);  // strict: every tensor, quantizer state included
    return evaluate(*model, open_datasets(config).test, {config.batch_size, 1});
}

// Checks what every finished run leaves behind; returns its metrics lines.
std::vector<nlohmann::json> check_finished_run(const TrainConfig& c, const RunResult& r, int64_t steps) {
    CHECK(r.status == RunStatus::finished);
    CHECK(r.global_step == steps);
    CHECK(test::list_files(c.out) == std::vector<std::string>{"checkpoint.safetensors", "config.json", "export.onnx",
                                                              "export.safetensors", "final.safetensors",
                                                              "float.safetensors", "metrics.jsonl", "summary.json"});
    const auto lines = test::read_metrics(c.out + "/metrics.jsonl");
    REQUIRE(lines.size() > 3);
    CHECK(lines.front().at("type") == "start");
    CHECK(lines.back().at("type") == "final");
    // Layer 1 (the first depthwise convolution) has one exponent per output
    // channel (the default) or one for the tensor.
    const size_t groups_1 =
        c.per_channel ? read_safetensors(c.out + "/float.safetensors").get("features.1.0.weight").shape()[0] : 1;
    const auto steps_logged = test::of_type(lines, "step");
    CHECK(static_cast<int64_t>(steps_logged.size()) == steps / c.log_every);
    for (const auto& s : steps_logged) {
        CHECK(s.at("loss").get<double>() > 0);
        CHECK(s.at("lr").get<double>() > 0);
        CHECK(s.at("images_per_second").get<double>() > 0);
        CHECK(s.at("grad_norm").get<double>() > 0);
        if (s.at("stage") == "qat") {
            const auto& q = s.at("quantizers");
            // MobileNetV1: 27 convolutions and the classifier; W4A8 also the
            // image, 27 ReLU6 and the pooling.
            REQUIRE(q.size() == (c.activation_bits ? 28 + 29 : 28));
            CHECK(q[0].at("bits") == 8);
            CHECK(q[1].at("bits") == c.bits);
            CHECK(q[1].at("per_channel") == c.per_channel);
            CHECK(q[1].at("exponents").size() == groups_1);
            CHECK(q[1].at("error_per_element").get<double>() >= 0);
        }
    }
    const auto epochs = test::of_type(lines, "epoch");
    CHECK(static_cast<int>(epochs.size()) == c.epochs + c.qat_epochs);
    for (const auto& e : epochs) {
        CHECK(e.at("test").at("top1").get<double>() >= 0);
        CHECK(e.at("test").at("top5").get<double>() >= e.at("test").at("top1").get<double>());
        CHECK(e.contains("test_integer") == (e.at("stage") == "qat"));  // the export is evaluated each QAT epoch
    }

    // The saved models reproduce the reported accuracies exactly.
    const nlohmann::json summary = nlohmann::json::parse(test::read_bytes(c.out + "/summary.json"));
    CHECK(summary.at("steps") == steps);
    const EvalResult float_model = evaluate_saved(c.out + "/float.safetensors", c);
    CHECK(float_model.top1 == summary.at("float").at("top1").get<double>());
    // The same weights, batches and kernels give the same logits, hence the
    // same double loss; JSON writes a double so that it reads back exactly.
    CHECK(float_model.loss == summary.at("float").at("loss").get<double>());
    const EvalResult final_model = evaluate_saved(c.out + "/final.safetensors", c);
    CHECK(final_model.top1 == summary.at("fake_quant").at("top1").get<double>());
    const EvalResult integer = evaluate(*quant::build_model_from_export(c.out + "/export.safetensors"),
                                        open_datasets(c).test, {c.batch_size, 1});
    CHECK(integer.top1 == summary.at("integer_export").at("top1").get<double>());
    CHECK(summary.at("audit").at("passed") == true);
    CHECK(summary.at("audit").at("weight_mismatches") == 0);
    REQUIRE(summary.at("layers").size() == (c.activation_bits ? 28 + 29 : 28));
    CHECK(summary.at("layers")[1].at("exponents").size() == groups_1);

    const TrainingCheckpoint last = read_training_checkpoint(c.out + "/checkpoint.safetensors");
    CHECK(last.state.stage == Stage::done);
    CHECK(last.state.global_step == steps);
    return lines;
}

}  // namespace

TEST_CASE("A run end to end on a generated image folder: loss falls, files, metrics, saved models") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");
    TrainConfig c = test::tiny_config(dir / "images", dir / "run");
    // Batch 8 with batch norm (statistics of 8 values per channel in the
    // 1x1 tail) is noisy: at the default 0.05 the epoch losses of 5 epochs
    // rose and fell by 0.3-0.5 and whether epoch 4 ended below epoch 0 hung
    // on the last bits of a kernel. At 0.02 over 8 epochs they fall steadily.
    c.epochs = 8;
    c.lr = 0.02;
    const RunResult r = run_training(c);
    const auto lines = check_finished_run(c, r, 6 * 9);  // 48 images, batch 8: 6 steps per epoch
    const auto epochs = test::of_type(lines, "epoch");
    const nlohmann::json& last_float = epochs[c.epochs - 1];
    CHECK(epochs[0].at("train_loss").get<double>() > last_float.at("train_loss").get<double>() + 0.1);  // float learns
    // Three easy classes: well above chance (1/3) on the training batches. (The
    // test accuracy needs batch norm's running statistics to settle, which
    // takes more than 30 steps; the Fashion-MNIST run checks it.)
    CHECK(last_float.at("train_top1").get<double>() > 0.5);
}

TEST_CASE("A W4A8 run ends with the integer engine equal to the fake-quant model on every test image") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");
    TrainConfig c = test::tiny_config(dir / "images", dir / "run");
    c.activation_bits = 8;
    c.freeze_bn_at = 2.0 / 3;  // QAT step 4 of 6
    const RunResult r = run_training(c);
    check_finished_run(c, r, 6 * (c.epochs + c.qat_epochs));  // 48 images, batch 8
    const nlohmann::json& engine = r.summary.at("integer_engine");
    CHECK(engine.at("samples") == r.summary.at("test_samples"));
    CHECK(engine.at("identical_logits") == engine.at("samples"));
    CHECK(engine.at("top1") == r.summary.at("fake_quant").at("top1"));
    CHECK(engine.at("loss") == r.summary.at("fake_quant").at("loss"));
}

TEST_CASE("A run end to end on a subset of Fashion-MNIST") {
    TrainConfig c;
    if (!fs::exists(c.data + "/train-images-idx3-ubyte.gz") && !fs::exists(c.data + "/train-images-idx3-ubyte")) {
        MESSAGE("Fashion-MNIST is not installed in ", c.data, "; skipped");
        return;
    }
    test::TempDir dir;
    c = test::tiny_config(c.data, dir / "run");
    c.train_limit = 512;
    c.test_limit = 300;
    c.batch_size = 16;
    c.log_every = 8;
    const RunResult r = run_training(c);
    const auto lines = check_finished_run(c, r, 3 * 32);
    const auto steps = test::of_type(lines, "step");
    CHECK(steps.front().at("loss").get<double>() > test::of_type(lines, "epoch")[1].at("train_loss").get<double>());
    // 10 classes: chance is 0.1, and a chance classifier's accuracy on 300
    // images has a standard deviation of sqrt(0.1 * 0.9 / 300) = 0.017, so
    // 0.2 is more than 5 of them above it. (Two epochs of 32 steps leave
    // batch norm's running statistics unsettled: 0.30-0.44 seen.)
    CHECK(r.summary.at("float").at("top1").get<double>() > 0.2);
    CHECK(r.summary.at("test_samples") == 300);
}

TEST_CASE("SIGINT: the step finishes, a checkpoint is saved, the run stops and resumes to the end") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");
    TrainConfig c = test::tiny_config(dir / "images", dir / "run");
    struct sigaction before {};
    sigaction(SIGINT, nullptr, &before);
    RunHooks hooks;
    int64_t calls = 0;
    hooks.after_step = [&](int64_t step) {
        ++calls;
        if (step == 4) std::raise(SIGINT);
    };
    const RunResult r = run_training(c, hooks);
    CHECK(r.status == RunStatus::interrupted);
    CHECK(r.signal == SIGINT);
    CHECK(r.global_step == 4);
    CHECK(calls == 4);  // the step in progress finished, no further one started
    const TrainingCheckpoint saved = read_training_checkpoint(c.out + "/checkpoint.safetensors");
    CHECK(saved.state.stage == Stage::float_training);
    CHECK(saved.state.global_step == 4);
    CHECK(saved.state.next_batch.epoch == 0);
    CHECK(saved.state.next_batch.batch == 4);
    CHECK(test::of_type(test::read_metrics(c.out + "/metrics.jsonl"), "stop").size() == 1);
    // The handler from before the run is back.
    struct sigaction now {};
    sigaction(SIGINT, nullptr, &now);
    CHECK((now.sa_handler == before.sa_handler));

    TrainConfig resume = c;
    resume.resume = c.out;
    const RunResult rest = run_training(resume);
    CHECK(rest.status == RunStatus::finished);
    CHECK(rest.global_step == 3 * 6);
    CHECK(test::of_type(test::read_metrics(c.out + "/metrics.jsonl"), "resume").size() == 1);
}

TEST_CASE("A diverging run stops with a clear message; the last good checkpoint stays") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");
    TrainConfig c = test::tiny_config(dir / "images", dir / "run");
    c.lr = 1e30;
    c.momentum = 0;
    c.checkpoint_every = 1;
    std::vector<uint8_t> last_saved;
    int64_t last_step = 0;
    RunHooks hooks;
    hooks.after_step = [&](int64_t step) {
        last_saved = test::file_bytes(c.out + "/checkpoint.safetensors");
        last_step = step;
    };
    try {
        run_training(c, hooks);
        FAIL("the run should have diverged");
    } catch (const Error& e) {
        const std::string message = e.what();
        INFO(message);
        CHECK(message.find(cat("training diverged at step ", last_step + 1)) != std::string::npos);
        CHECK(message.find(cat("the last good checkpoint, ", c.out, "/checkpoint.safetensors at step ", last_step)) !=
              std::string::npos);
    }
    REQUIRE(last_step >= 1);
    CHECK(test::file_bytes(c.out + "/checkpoint.safetensors") == last_saved);
    CHECK(read_training_checkpoint(c.out + "/checkpoint.safetensors").state.global_step == last_step);
    CHECK(test::of_type(test::read_metrics(c.out + "/metrics.jsonl"), "diverged").size() == 1);
}

TEST_CASE("Corrupt images: skipped and counted in the epoch line and metrics.jsonl, or too many stop the run") {
    test::TempDir dir;
    test::make_image_folder(dir / "images");  // 48 training, 18 test images
    const std::string bad_train = dir / "images/train/class1/img3.jpg", bad_test = dir / "images/val/class2/img0.jpg";
    test::write_bytes(bad_train, std::vector<uint8_t>(300, 0x5A));
    TrainConfig c = test::tiny_config(dir / "images", dir / "run");
    c.quantizer = "none";

    // The default, 1 %, allows none of 48: the first epoch stops.
    try {
        run_training(c);
        FAIL("the corrupt image should have stopped the run");
    } catch (const Error& e) {
        CHECK(std::string(e.what()) == cat("stopping: 1 of the 48 images could not be read (the first: ", bad_train,
                                           ": neither a JPEG nor an image OpenCV can decode (corrupt, truncated or "
                                           "unknown format)); --max-bad-fraction 0.01 allows 0 of 48. Fix or remove "
                                           "the files, or raise --max-bad-fraction."));
    }

    // 10 % allows 4 of 48 training and 1 of 18 test images: each is replaced
    // by the next image, once per epoch and once per evaluation.
    test::write_bytes(bad_test, std::vector<uint8_t>(300, 0x5A));
    c.out = dir / "run2";
    c.max_bad_fraction = 0.1;
    c.progress = "lines";
    RunResult r;
    {
        CaptureStdout out(dir / "stdout.txt");
        r = run_training(c);
    }
    CHECK(r.status == RunStatus::finished);
    const auto epochs = test::of_type(test::read_metrics(c.out + "/metrics.jsonl"), "epoch");
    REQUIRE(epochs.size() == 2);
    for (const auto& e : epochs) {
        CHECK(e.at("skipped_unreadable") == 1);
        CHECK(e.at("test").at("skipped_unreadable") == 1);
        CHECK(e.at("test").at("samples") == 18);
    }
    const std::string printed = read_text(dir / "stdout.txt");
    INFO(printed);
    CHECK(printed.find("float epoch 2/2: train loss ") != std::string::npos);
    CHECK(printed.find(" img/s, 1 unreadable training image skipped, 1 unreadable test image skipped)\n") !=
          std::string::npos);

    // A clean data set says nothing about skipping, and counts 0.
    fs::remove(bad_train);
    fs::remove(bad_test);
    c.out = dir / "run3";
    {
        CaptureStdout out(dir / "stdout.txt");
        run_training(c);
    }
    CHECK(test::of_type(test::read_metrics(c.out + "/metrics.jsonl"), "epoch")[0].at("skipped_unreadable") == 0);
    CHECK(read_text(dir / "stdout.txt").find("unreadable") == std::string::npos);
}

TEST_CASE("Bad input: clear errors, and nothing written or overwritten") {
    test::TempDir dir;
    test::make_image_folder(dir / "images", 4, 2);
    auto fails = [](const TrainConfig& c, const std::string& message) {
        try {
            run_training(c);
            FAIL("expected an error containing: ", message);
        } catch (const Error& e) {
            INFO(e.what());
            CHECK(std::string(e.what()).find(message) != std::string::npos);
        }
    };

    // Missing or unrecognisable data: no output folder appears.
    TrainConfig c = test::tiny_config(dir / "nowhere", dir / "out1");
    fails(c, cat("--data ", dir / "nowhere", ": no such folder"));
    fs::create_directories(dir / "empty");
    c.data = dir / "empty";
    fails(c, "neither Fashion-MNIST");
    c.data = dir / "images";
    c.batch_size = 64;
    fails(c, "--batch-size 64 is larger than the 12 training samples");
    CHECK(!fs::exists(dir / "out1"));

    // An unreadable --init-from.
    c = test::tiny_config(dir / "images", dir / "out2");
    test::write_bytes(dir / "garbage.safetensors", {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12});
    c.init_from = dir / "garbage.safetensors";
    fails(c, "garbage.safetensors");
    c.init_from = dir / "missing.safetensors";
    fails(c, "missing.safetensors");
    CHECK(!fs::exists(dir / "out2"));

    // A finished run to damage.
    c = test::tiny_config(dir / "images", dir / "run");
    c.epochs = 1;
    c.qat_epochs = 0;
    run_training(c);
    const std::vector<std::string> files = test::list_files(c.out);
    auto snapshot = [&] {
        std::vector<std::vector<uint8_t>> out;
        for (const std::string& f : test::list_files(c.out)) out.push_back(test::file_bytes(c.out + "/" + f));
        return out;
    };

    // Starting again in the same folder is refused.
    auto before = snapshot();
    fails(c, "already holds a run");
    CHECK(snapshot() == before);

    // Resuming from a corrupt, a truncated or a foreign checkpoint fails and changes nothing.
    TrainConfig resume = c;
    resume.resume = c.out;
    std::vector<uint8_t> good = test::file_bytes(c.out + "/checkpoint.safetensors");
    std::vector<uint8_t> truncated(good.begin(), good.begin() + good.size() / 2);
    test::write_bytes(c.out + "/checkpoint.safetensors", truncated);
    before = snapshot();
    fails(resume, "checkpoint.safetensors");
    CHECK(snapshot() == before);
    std::vector<uint8_t> corrupt = good;
    corrupt[20] = '#';  // inside the JSON header
    test::write_bytes(c.out + "/checkpoint.safetensors", corrupt);
    before = snapshot();
    fails(resume, "checkpoint.safetensors");
    CHECK(snapshot() == before);
    fs::copy_file(c.out + "/final.safetensors", c.out + "/checkpoint.safetensors",
                  fs::copy_options::overwrite_existing);
    before = snapshot();
    fails(resume, "not a training checkpoint (no 'hfq.train_config' metadata)");
    CHECK(snapshot() == before);
    CHECK(test::list_files(c.out) == files);

    // A checkpoint of another run configuration.
    test::write_bytes(c.out + "/checkpoint.safetensors", good);
    resume.lr = 0.5;
    fails(resume, "--resume: option --lr differs from the checkpoint's run");
    fs::remove(c.out + "/checkpoint.safetensors");
    resume.lr = c.lr;
    fails(resume, "no checkpoint there");
}
