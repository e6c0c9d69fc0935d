// Resume equality: a run stopped and resumed (by --stop-after-steps or by
// SIGINT, inside an epoch, at the float/QAT boundary and inside QAT) ends
// with exactly the weights, quantizer state and optimizer state of the same
// run done in one go, bit for bit.
#include <doctest/doctest.h>

#include <csignal>

#include "engine/safetensors.h"
#include "tests/test_train_util.h"
#include "train/trainer.h"
#include "train/training_checkpoint.h"

using namespace hfq;

namespace {

// 48 training images, batch 8: 6 steps per epoch; 2 float + 2 QAT epochs = 24 steps.
constexpr int64_t kSteps = 24;

TrainConfig resume_config(const std::string& data, const std::string& out, bool learnable) {
    TrainConfig c = test::tiny_config(data, out);
    c.augment = true;  // augmentation draws random numbers: they must continue too
    c.qat_epochs = 2;
    c.log_every = 5;
    c.warmup_epochs = 0.5;
    if (learnable) {
        // Adam state for the learnable exponents, dropout's random generator,
        // activation quantizers, batch-norm freezing within QAT.
        c.quantizer = "learnable-po2";
        c.dropout = 0.2;
        c.activation_bits = 8;
        c.freeze_bn_at = 2.0 / 3;  // QAT step 8 of 12
    } else {
        // msqe-po2 per channel with the stable-exponent schedule across the stops, Nesterov.
        c.per_channel = true;
        c.stable_start_step = 2;
        c.stable_switch_step = 9;
        c.nesterov = true;
        c.clip_grad_norm = 5;
    }
    return c;
}

// Runs `c` until it has done `steps` steps in this invocation (0: to the end),
// resuming from its folder if it already holds a run.
RunResult run_segment(TrainConfig c, int64_t steps, bool resume) {
    c.stop_after_steps = steps;
    if (resume) c.resume = c.out;
    return run_training(c);
}

// Same as run_segment, but stopped by SIGINT after step `at` of the run.
RunResult interrupt_at(TrainConfig c, int64_t at, bool resume) {
    if (resume) c.resume = c.out;
    RunHooks hooks;
    hooks.after_step = [at](int64_t step) {
        if (step == at) std::raise(SIGINT);
    };
    return run_training(c, hooks);
}

void check_same_checkpoint(const std::string& a, const std::string& b) {
    const TrainingCheckpoint ca = read_training_checkpoint(a), cb = read_training_checkpoint(b);
    CHECK(ca.state.global_step == cb.state.global_step);
    CHECK(ca.state.stage == cb.state.stage);
    CHECK(ca.state.stage_step == cb.state.stage_step);
    CHECK(ca.state.next_batch.epoch == cb.state.next_batch.epoch);
    CHECK(ca.state.next_batch.batch == cb.state.next_batch.batch);
    CHECK(ca.state.rngs == cb.state.rngs);
    const std::vector<std::string> differ = test::differing_tensors(ca.file, cb.file);
    INFO("differing tensors: ", differ.size(), differ.empty() ? "" : ", first " + differ[0]);
    CHECK(differ.empty());
}

void check_resume_equality(bool learnable) {
    test::TempDir dir;
    test::make_image_folder(dir / "images");
    const std::string data = dir / "images";

    // One go, and one go that stops inside QAT (step 17), for the optimizer state there.
    const TrainConfig straight = resume_config(data, dir / "straight", learnable);
    REQUIRE(run_segment(straight, 0, false).global_step == kSteps);
    const TrainConfig at17 = resume_config(data, dir / "at17", learnable);
    REQUIRE(run_segment(at17, 17, false).status == RunStatus::stopped);

    // Stopped by SIGINT inside the second float epoch (step 9), then at the
    // float / QAT boundary (step 12), then inside QAT (step 17), then to the end.
    const TrainConfig pieces = resume_config(data, dir / "pieces", learnable);
    const RunResult first = interrupt_at(pieces, 9, false);
    REQUIRE(first.status == RunStatus::interrupted);
    REQUIRE(first.global_step == 9);
    REQUIRE(run_segment(pieces, 3, true).global_step == 12);
    REQUIRE(run_segment(pieces, 5, true).global_step == 17);
    check_same_checkpoint(at17.out + "/checkpoint.safetensors", pieces.out + "/checkpoint.safetensors");
    {
        // The optimizer state was compared: it is there, for both optimizers when the exponents learn.
        const SafetensorsFile f = read_safetensors(pieces.out + "/checkpoint.safetensors");
        int weights = 0, quantizer = 0;
        for (const auto& [name, t] : f.tensors) {
            weights += name.rfind("optimizer/weights/", 0) == 0;
            quantizer += name.rfind("optimizer/quantizer/", 0) == 0;
        }
        CHECK(weights > 50);
        CHECK((quantizer > 0) == learnable);
    }
    const RunResult last = run_segment(pieces, 0, true);
    REQUIRE(last.status == RunStatus::finished);
    REQUIRE(last.global_step == kSteps);

    check_same_checkpoint(straight.out + "/checkpoint.safetensors", pieces.out + "/checkpoint.safetensors");
    for (const char* file : {"final.safetensors", "float.safetensors"}) {
        INFO(file);
        const std::vector<std::string> differ = test::differing_tensors(read_safetensors(straight.out + "/" + file),
                                                                        read_safetensors(pieces.out + "/" + file));
        CHECK(differ.empty());
    }
    // Resuming a finished run only reports again, with the same numbers.
    const RunResult again = run_segment(straight, 0, true);
    CHECK(again.global_step == kSteps);
    for (const char* key : {"loss", "top1", "top5"})
        CHECK(last.summary.at("fake_quant").at(key) == again.summary.at("fake_quant").at(key));
}

}  // namespace

TEST_CASE("Resume equality: msqe-po2 per channel, stable exponent, Nesterov, clipping") {
    check_resume_equality(false);
}

TEST_CASE("Resume equality: learnable-po2 with Adam, dropout, activation quantizers, BN freezing") {
    check_resume_equality(true);
}
