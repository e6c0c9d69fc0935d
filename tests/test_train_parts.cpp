// The trainer's pieces: the learning-rate schedules, the configuration
// (command line, config file, resume rules), the training step (optimizer
// groups, clipping, non-finite loss), evaluation counts and dataset subsets.
// The optimizers themselves: tests/test_optimizer.cpp.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "engine/check.h"
#include "engine/ops.h"
#include "layers/model.h"
#include "quant/quantize_model.h"
#include "tests/float_error.h"
#include "tests/test_data_util.h"
#include "train/config.h"
#include "train/datasets.h"
#include "train/evaluate.h"
#include "train/lr_schedule.h"
#include "train/train_step.h"

using namespace hfq;

namespace {

bool same_bits(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

ParsedArgs parse(std::vector<const char*> args) {
    args.insert(args.begin(), "train_mobilenet");
    return parse_args(static_cast<int>(args.size()), args.data());
}

}  // namespace

TEST_CASE("Learning-rate schedules: warm-up, cosine, step, constant, floor") {
    // In double, as written here: (t + 1) / warm-up, then 0.5 (1 + cos(pi s /
    // span)) over the span after it (cos(pi / 2) = 6e-17 vanishes in 1 + cos),
    // and the floor. Where a cosine remains, the compiler may fold it here
    // and glibc computes it in the schedule, each within an ulp (below 2^-53
    // for |cos| < 1): 2^-53 apart after the factor 0.5.
    LrSchedule s;
    s.total_steps = 110;
    s.warmup_steps = 10;
    CHECK(s.factor(0) == 0.1);
    CHECK(s.factor(4) == 0.5);
    CHECK(s.factor(9) == 1.0);
    CHECK(s.factor(10) == 1.0);  // cosine from its peak
    CHECK(s.factor(60) == 0.5);  // half way
    CHECK(std::fabs(s.factor(85) - 0.5 * (1 + std::cos(M_PI * 75 / 100))) <= 0x1p-53);
    CHECK(std::fabs(s.factor(109) - 0.5 * (1 + std::cos(M_PI * 99 / 100))) <= 0x1p-53);
    s.min_factor = 0.2;
    CHECK(s.factor(109) == 0.2);
    CHECK(s.factor(0) == 0.2);  // the floor applies to the warm-up too

    LrSchedule step{.kind = ScheduleKind::step, .total_steps = 100, .warmup_steps = 0, .step_size = 30, .gamma = 0.5};
    CHECK(step.factor(0) == 1.0);
    CHECK(step.factor(29) == 1.0);
    CHECK(step.factor(30) == 0.5);
    CHECK(step.factor(99) == 0.125);
    LrSchedule constant{.kind = ScheduleKind::constant, .total_steps = 10, .warmup_steps = 2};
    CHECK(constant.factor(0) == 0.5);
    CHECK(constant.factor(9) == 1.0);

    CHECK(parse_schedule("step") == ScheduleKind::step);
    CHECK_THROWS_WITH_AS(parse_schedule("linear"), doctest::Contains("known: cosine, step, constant"), Error);
    CHECK_THROWS_WITH_AS((LrSchedule{.total_steps = 5, .warmup_steps = 6}.validate()),
                         doctest::Contains("warm-up steps must be in 0..5"), Error);
}

TEST_CASE("Config: defaults, command line, config file layering, errors") {
    const ParsedArgs d = parse({});
    REQUIRE(d.run);
    CHECK(d.config.data == "/usr/share/datasets/fashion-mnist");
    CHECK(d.config.quantizer == "msqe-po2");
    CHECK(d.config.bits == 4);

    const ParsedArgs a = parse({"--lr", "0.05", "--no-augment", "--per-channel", "--quantizer", "lsq"});
    REQUIRE(a.run);
    CHECK(a.config.lr == 0.05);
    CHECK(!a.config.augment);
    CHECK(a.config.per_channel);
    CHECK(a.config.quantizer == "lsq");

    test::TempDir dir;
    const std::string file = dir / "run.json";
    test::write_bytes(file, {});
    { std::ofstream(file) << R"({"lr": 0.3, "epochs": 3, "nesterov": true, "quantizer": "none"})"; }
    const ParsedArgs f = parse({"--config", file.c_str(), "--epochs", "5"});
    REQUIRE(f.run);
    CHECK(f.config.lr == 0.3);    // from the file
    CHECK(f.config.epochs == 5);  // the command line wins
    CHECK(f.config.nesterov);
    CHECK(!f.config.qat());
    CHECK(f.config.batch_size == TrainConfig{}.batch_size);  // neither: the default

    // The resolved config round-trips through its JSON.
    TrainConfig back;
    back.apply_json(f.config.to_json(), "test");
    CHECK(back.to_json() == f.config.to_json());
    CHECK(TrainConfig::training_differences(back, f.config).empty());

    const ParsedArgs help = parse({"--help"});
    CHECK(!help.run);
    CHECK(help.exit_code == 0);
    CHECK(help.message.find("--lr FLOAT=0.2") != std::string::npos);
    CHECK(help.message.find("--fold-bn, --no-fold-bn") != std::string::npos);
    CHECK(help.message.find("(default: on)") != std::string::npos);
    CHECK(help.message.find("--max-bad-fraction FLOAT=0.01") != std::string::npos);

    auto fails = [&](std::vector<const char*> args, const char* message) {
        const ParsedArgs r = parse(args);
        CHECK(!r.run);
        CHECK(r.exit_code != 0);
        INFO(r.message);
        CHECK(r.message.find(message) != std::string::npos);
    };
    fails({"--bogus"}, "--bogus");
    fails({"--lr", "fast"}, "--lr");
    fails({"--lr", "-1"}, "--lr must be positive, got -1");
    fails({"--batch-size", "1"}, "--batch-size must be in 2..65536");
    fails({"--quantizer", "magic"}, "--quantizer magic");
    fails({"--bits", "9"}, "bits");
    fails({"--schedule", "linear"}, "unknown learning-rate schedule 'linear'");
    fails({"--stable-switch-step", "10"}, "--stable-switch-step (10) needs --stable-start-step");
    fails({"--quantizer", "lsq", "--stable-start-step", "3"}, "only msqe-po2 keeps a stable exponent");
    fails({"--progress", "loud"}, "--progress must be");
    fails({"--max-bad-fraction", "1.5"}, "--max-bad-fraction must be in [0, 1], got 1.5");
    fails({"--max-bad-fraction", "-0.01"}, "--max-bad-fraction must be in [0, 1], got -0.01");
    fails({"--max-bad-fraction", "nan"}, "option 'max-bad-fraction' must be a number");  // NaN is null in JSON
    fails({"--bn-stats", "quantized"},
          "--bn-stats: batch statistics must be float-conv or quantized-conv, got 'quantized'");
    fails({"--config", (dir / "missing.json").c_str()}, "cannot open");
    { std::ofstream(file) << R"({"lr": 0.3, "speed": 11})"; }
    fails({"--config", file.c_str()}, "unknown option 'speed'");
    { std::ofstream(file) << R"({"epochs": "many"})"; }
    fails({"--config", file.c_str()}, "option 'epochs' must be an integer, got \"many\"");
    { std::ofstream(file) << R"([1, 2])"; }
    fails({"--config", file.c_str()}, "must hold a JSON object");
    { std::ofstream(file) << R"({"lr": )"; }
    fails({"--config", file.c_str()}, "not valid JSON");
}

TEST_CASE("Config: the batch-norm freeze is a fraction of QAT; older configs' freeze-bn-step") {
    const TrainConfig d;
    CHECK(d.bn_stats == "quantized-conv");  // the default: ConvBn2d's statistics, frozen half-way
    CHECK(d.freeze_bn_at == 0.5);
    CHECK(d.freeze_bn_step(1872) == 936);  // default QAT on Fashion-MNIST: 4 epochs x 468 steps
    CHECK(d.quant_policy(1872).freeze_bn_step == 936);
    TrainConfig c;
    c.freeze_bn_at = 2.0 / 3;
    CHECK(c.freeze_bn_step(12) == 8);  // rounded, not truncated: 2/3 x 12 is 7.999...
    c.freeze_bn_at = 0;
    CHECK(c.freeze_bn_step(12) == 0);  // moving statistics from the first step
    c.freeze_bn_at = 1;
    CHECK(c.freeze_bn_step(12) == -1);  // never
    CHECK(c.quant_policy(12).freeze_bn_step == -1);

    const ParsedArgs bad = parse({"--freeze-bn-at", "1.5"});
    CHECK(!bad.run);
    CHECK(bad.message.find("--freeze-bn-at must be in [0, 1] (a fraction of QAT), got 1.5") != std::string::npos);

    // A run folder's config.json from before the option: "never" reads as 1,
    // a step number is refused naming the file (its fraction needs the data).
    TrainConfig old;
    old.apply_json(R"({"freeze-bn-step": -1, "bn-stats": "float-conv"})", "old/config.json");
    CHECK(old.freeze_bn_at == 1);
    CHECK(old.bn_stats == "float-conv");
    TrainConfig untouched;
    CHECK_THROWS_WITH_AS(untouched.apply_json(R"({"freeze-bn-step": 936})", "old/config.json"),
                         doctest::Contains("old/config.json: freeze-bn-step 936 comes from an older hfq"), Error);
    CHECK(untouched.freeze_bn_at == 0.5);  // a failed read changes nothing
}

TEST_CASE("Config: --resume takes the run's config; only run-control options may change") {
    test::TempDir dir;
    TrainConfig saved;
    saved.lr = 0.123;
    saved.epochs = 7;
    { std::ofstream(dir / "config.json") << saved.to_json(); }
    const std::string run = dir.path.string();
    const ParsedArgs r = parse({"--resume", run.c_str(), "--threads", "1", "--log-every", "3"});
    REQUIRE(r.run);
    CHECK(r.config.lr == 0.123);
    CHECK(r.config.epochs == 7);
    CHECK(r.config.threads == 1);
    CHECK(r.config.log_every == 3);
    CHECK(r.config.out == run);

    // A run stopped by unreadable files can continue with a higher limit.
    const ParsedArgs raised = parse({"--resume", run.c_str(), "--max-bad-fraction", "0.05"});
    REQUIRE(raised.run);
    CHECK(raised.config.max_bad_fraction == 0.05);

    const ParsedArgs same = parse({"--resume", run.c_str(), "--lr", "0.123"});
    CHECK(same.run);  // repeating a saved value is fine
    const ParsedArgs changed = parse({"--resume", run.c_str(), "--lr", "0.5", "--epochs", "9"});
    CHECK(!changed.run);
    CHECK(changed.message.find("--epochs, --lr would change what the run computes") != std::string::npos);
    const ParsedArgs with_config = parse({"--resume", run.c_str(), "--config", "x.json"});
    CHECK(with_config.message.find("--config cannot be combined with --resume") != std::string::npos);
    const std::string elsewhere = (dir / "nothing");
    const ParsedArgs missing = parse({"--resume", elsewhere.c_str()});
    CHECK(!missing.run);
    CHECK(missing.message.find("cannot open") != std::string::npos);
}

TEST_CASE("TrainStep: optimizer groups, gradient clipping, label smoothing, non-finite loss") {
    ModelConfig mc{.arch = Arch::mobilenet_v1, .width = 0.25, .classes = 4, .input_channels = 1, .small_input = true};
    Rng rng(3);
    Tensor images = Tensor::empty({4, 16, 16, 1});
    for (int64_t i = 0; i < images.numel(); ++i) images.f32()[i] = rng.normal();
    const std::vector<int32_t> labels = {0, 1, 2, 3};

    // Clipping: the update equals plain SGD (no momentum) on gradients scaled to the clip norm.
    auto model = build_model(mc, 1);
    auto reference = build_model(mc, 1);
    TrainStepOptions o;
    o.sgd.lr = 0.1f;
    o.label_smoothing = 0.1f;
    o.clip_grad_norm = 0.5f;
    TrainStep step(*model, o);
    REQUIRE(step.optimizers().size() == 1);
    const StepStats s = step.run(images, labels);
    REQUIRE(s.applied);
    CHECK(s.grad_norm > 0.5);  // the clip was active

    reference->train();
    Variable loss = cross_entropy((*reference)(Variable(images)), labels, 0.1f);
    CHECK(loss.value().item() == s.loss);
    loss.backward();
    const auto params = reference->named_parameters();
    // The same gradients (the same ops on the same batch: the loss above is
    // the same float). Their squares are exact in double; summed in another
    // order than the step's, the sum of N positive terms moves by at most
    // 2 gamma_double(N) of it, its square root by half that, plus the roots'
    // roundings.
    double sq = 0;
    int64_t terms = 0;
    for (const NamedParameter& p : params)
        for (float g : p.var.grad().to_vector()) {
            sq += double(g) * g;
            ++terms;
        }
    CHECK(std::fabs(std::sqrt(sq) - s.grad_norm) <= hfq::testing::gamma_double_n(double(terms + 2)) * s.grad_norm);
    CHECK(global_grad_norm(params) == s.grad_norm);  // the step's own sum, in the same order
    const float factor = static_cast<float>(0.5 / (s.grad_norm + 1e-6));
    const auto stepped = model->named_parameters();
    // The step computes p - lr (g factor) in float, as here: the same
    // roundings, except that either side may fuse the multiply-add (skip the
    // product's rounding, u |lr g'|); each result is rounded once (u of it).
    int64_t off = 0, total = 0;
    for (size_t i = 0; i < params.size(); ++i) {
        const std::vector<float> p0 = params[i].var.value().to_vector(), g = params[i].var.grad().to_vector(),
                                 p1 = stepped[i].var.value().to_vector();
        for (size_t k = 0; k < p0.size(); ++k, ++total) {
            const float update = 0.1f * (g[k] * factor), expected = p0[k] - update;
            off += std::fabs(p1[k] - expected) >
                   hfq::testing::kUnitRoundoff * (std::fabs(p1[k]) + std::fabs(expected) + std::fabs(update));
        }
    }
    CHECK(total > 10000);
    CHECK(off == 0);

    // A non-finite loss or gradient changes nothing. (A NaN pixel: relu6 clamps
    // it in the forward pass, so here the gradient is what turns non-finite.)
    Tensor bad = images.clone();
    bad.f32()[0] = std::nanf("");
    std::vector<Tensor> before;
    for (const NamedParameter& p : model->named_parameters()) before.push_back(p.var.value().clone());
    const StepStats nan_step = step.run(bad, labels);
    CHECK(!nan_step.applied);
    CHECK((!std::isfinite(nan_step.loss) || !std::isfinite(nan_step.grad_norm)));
    const auto after = model->named_parameters();
    for (size_t i = 0; i < after.size(); ++i) CHECK(same_bits(after[i].var.value(), before[i]));

    // Quantizer parameters get their own optimizer (Adam) with their own rate.
    auto qmodel = build_model(mc, 1);
    quant::QuantPolicy policy;
    policy.method = "learnable-po2";
    quant::quantize_model(*qmodel, policy);
    TrainStepOptions qo;
    qo.sgd.lr = 0.1f;
    qo.quantizer_lr = 0.01f;
    TrainStep qstep(*qmodel, qo);
    const auto optimizers = qstep.optimizers();
    REQUIRE(optimizers.size() == 2);
    CHECK(optimizers[1].first == "quantizer");
    CHECK(dynamic_cast<Adam*>(optimizers[1].second) != nullptr);
    for (const NamedParameter& p : optimizers[1].second->params()) CHECK(p.group == ParamGroup::quantizer);
    for (const NamedParameter& p : optimizers[0].second->params()) CHECK(p.group != ParamGroup::quantizer);
    CHECK(optimizers[0].second->params().size() + optimizers[1].second->params().size() ==
          qmodel->named_parameters().size());
    qstep.set_lr_factor(0.5);
    CHECK(qstep.lr() == 0.05f);
    CHECK(qstep.quantizer_lr() == 0.005f);
    const Tensor e0 = optimizers[1].second->params()[0].var.value().clone();
    CHECK(qstep.run(images, labels).applied);
    CHECK(!same_bits(optimizers[1].second->params()[0].var.value(), e0));  // the exponent trained
}

TEST_CASE("Evaluation counts: loss, top-1, top-5, ties") {
    // 3 rows, 6 classes.
    const Tensor logits = Tensor::from_vector({3, 6}, {5, 1, 1, 1, 1, 1,    // label 0: rank 0
                                                       6, 5, 4, 3, 2, 1,    // label 5: rank 5
                                                       1, 1, 1, 1, 1, 1});  // label 2: ties -> rank 2
    EvalResult r;
    accumulate_eval(logits, {0, 5, 2}, r);
    CHECK(r.samples == 3);
    CHECK(r.top1 == 1);
    CHECK(r.top5 == 2);
    const double l0 = std::log(std::exp(5.0) + 5 * std::exp(1.0)) - 5;
    const double l1 =
        std::log(std::exp(6.0) + std::exp(5.0) + std::exp(4.0) + std::exp(3.0) + std::exp(2.0) + std::exp(1.0)) - 1;
    const double l2 = std::log(6.0);
    // Both in double: per row 6 exponentials, their sum, a logarithm and two
    // additions, each within 2^-52 (exp and log as glibc's, within an ulp) of
    // values below 8; a generous 32 roundings per row on each side.
    CHECK(std::fabs(r.loss - (l0 + l1 + l2)) <= 2 * 3 * hfq::testing::gamma_double_n(32) * 8);
    CHECK(count_correct(logits, {0, 5, 2}) == 1);
    CHECK_THROWS_WITH_AS(accumulate_eval(logits, {0, 6, 1}, r), doctest::Contains("label 6 outside the 6 classes"),
                         Error);
}

namespace {

struct Numbers : Dataset {
    int64_t size() const override { return 10; }
    int num_classes() const override { return 10; }
    Shape sample_shape() const override { return {1, 1, 1}; }
    int32_t label(int64_t i) const override { return static_cast<int32_t>(i); }
    std::string name(int64_t i) const override { return cat("n", i); }
    void load(int64_t i, Rng&, float* out) const override { out[0] = float(i); }
};

}  // namespace

TEST_CASE("SubsetDataset: evenly spaced samples") {
    SubsetDataset s(std::make_shared<Numbers>(), 4);
    REQUIRE(s.size() == 4);
    std::vector<int32_t> labels;
    for (int64_t i = 0; i < 4; ++i) labels.push_back(s.label(i));
    CHECK(labels == std::vector<int32_t>{0, 2, 5, 7});
    CHECK(s.name(3) == "n7");
    CHECK_THROWS_WITH_AS(SubsetDataset(std::make_shared<Numbers>(), 11),
                         doctest::Contains("11 samples asked of a set of 10"), Error);
}
