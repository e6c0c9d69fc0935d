// hfq_bench: training-step throughput of MobileNets and of the single ops they
// are made of, measured the way the workplace's PyTorch baseline script
// (torch_baseline.py, not part of this repository) measures PyTorch, so the
// two can be compared side by side:
//
//   train img/s = images / seconds over the timed steps; a step is the
//                 trainer's TrainStep: zero_grad + forward + cross-entropy +
//                 backward + SGD update (momentum 0.9, weight decay 4e-5) on
//                 a fixed random batch;
//   GFLOP/s     = img/s * forward MACs per image * 2 FLOP/MAC * 3
//                 (forward, input gradient, weight gradient);
//   peak memory = peak RSS of a fresh process that ran only that
//                 configuration (each configuration runs in a forked child);
//   quantized   = like the baseline, every Conv2d and Linear (first conv,
//                 depthwise convs and classifier included) has a 4-bit
//                 per-tensor weight quantizer, batch norm not folded. The
//                 baseline's "msqe" (8 power-of-two candidates) is compared
//                 with hfq's msqe-po2, which does more (least squares, line
//                 search, second moments, outlier mask); "lsq" with lsq.
//
//   hfq_bench                                   # V1 and V2 at 224 and 32, batch 32
//   hfq_bench --models v1 --res 224 --steps 5
//   hfq_bench --quants none,msqe,lsq            # float and 4-bit QAT on every layer
//   hfq_bench --ops                             # per-op forward/backward times
//   hfq_bench --profile --models v1 --res 224   # where a training step's time goes
//   hfq_bench --trainer-qat --quants msqe       # QAT as train_mobilenet runs it
//   hfq_bench --trainer-qat --bn-stats quantized-conv --quants msqe
//   hfq_bench --machine                         # FMA peak and memory bandwidth first
//   hfq_bench --ranks 1,2 --threads 2           # 1 process x 2 threads against 2 MPI ranks x 1
//   hfq_bench --json results.json
//
// With --ranks, a configuration of N > 1 ranks runs as `mpirun -np N hfq_bench
// ...` (this program, started by mpirun, runs the one configuration it is
// given data-parallel, train/data_parallel.h: --batch is the global batch,
// each rank gets --threads / N threads) and adds what the collectives cost
// per step: the gradient all-reduce, the batch-statistics sums, bytes.
#include <immintrin.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/memory_pool.h"
#include "engine/op_profile.h"
#include "engine/ops.h"
#include "layers/model.h"
#include "layers/summary.h"
#include "deploy/integer_engine.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "train/config.h"
#include "train/data_parallel.h"
#include "train/mpi_job.h"
#include "train/train_step.h"

using namespace hfq;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

struct Settings {
    int batch = 32;
    int threads = 2;
    int bits = 4;  // weight bits of the quantized configurations
    int warmup = 3;
    int steps = 5;         // at least this many timed steps ...
    double min_time = 10;  // ... and at least this many seconds of them
    int max_steps = 1000;
    uint64_t seed = 0;
    bool profile = false;                 // after the timed steps, profile as many again op by op
    bool trainer_qat = false;             // quantize as train_mobilenet's QAT does, not as the baseline
    std::string bn_stats = "quantized-conv";  // with trainer_qat: the folded layers' batch statistics ...
    bool bn_frozen = false;                   // ... or none: moving statistics, as after --freeze-bn-at
    bool sync_bn = true;                  // data parallel: batch statistics over all ranks
    int rounds = 1;                       // with --ranks: every configuration this many times, layouts alternating
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double peak_rss_mb() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024.0;  // KiB on Linux
}

Tensor random_batch(const Shape& shape, Rng& rng) {
    Tensor t = Tensor::empty(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = rng.normal();
    return t;
}

// Runs `step` s.warmup times untimed, then until enough steps and seconds
// are timed; returns the time of each timed step. `after_warmup` runs between
// the two (to start counters at the timed part).
std::vector<double> time_steps(
    const Settings& s, const std::function<void()>& step, const std::function<void()>& after_warmup = [] {}) {
    for (int i = 0; i < s.warmup; ++i) step();
    after_warmup();
    std::vector<double> times;
    double total = 0;
    while (!((int)times.size() >= s.steps && (total >= s.min_time || (int)times.size() >= s.max_steps))) {
        const auto t0 = Clock::now();
        step();
        times.push_back(seconds_since(t0));
        total += times.back();
    }
    return times;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Runs `steps` more steps with op_profile on (the timed steps ran without it:
// the profile's own bookkeeping, a few microseconds an op, stays out of the
// img/s) and returns, per entry, its forward and backward milliseconds per
// step and its calls per step (forward calls, or backward calls of what has
// no forward: the ops of one name and shape in the model, or 1 for a step
// part), the most expensive first.
json profile_steps(const std::function<void()>& step, size_t steps) {
    op_profile::set_enabled(true);
    for (size_t i = 0; i < steps; ++i) step();
    const std::vector<op_profile::Entry> entries = op_profile::take();
    op_profile::set_enabled(false);
    json rows = json::array();
    for (const op_profile::Entry& e : entries)
        rows.push_back({{"name", e.name},
                        {"forward_ms", 1e3 * e.seconds[0] / steps},
                        {"backward_ms", 1e3 * e.seconds[1] / steps},
                        {"calls_per_step", double(std::max(e.calls[0], e.calls[1])) / steps}});
    return rows;
}

// Prints profile_steps' rows: time per step, share of the profiled step.
void print_profile(const json& rows) {
    double total = 0;
    for (const json& r : rows) total += r["forward_ms"].get<double>() + r["backward_ms"].get<double>();
    std::printf("  %-44s %8s %10s %10s %7s\n", "op and output shape (or step part)", "calls", "fwd ms", "bwd ms",
                "share");
    for (const json& r : rows) {
        const double f = r["forward_ms"], b = r["backward_ms"];
        std::printf("  %-44s %8.1f %10.2f %10.2f %6.1f%%\n", r["name"].get<std::string>().c_str(),
                    r["calls_per_step"].get<double>(), f, b, 100 * (f + b) / total);
    }
    std::printf("  %-44s %8s %21.2f\n\n", "profiled step", "", total);
}

// The peak RSS of this process, or under mpirun the sum over all ranks (the
// memory the job needs on one machine).
double peak_rss_mb_all_ranks() {
    uint64_t total_kb = 0;
    for (uint64_t kb : mpi::all_gather({static_cast<uint64_t>(peak_rss_mb() * 1024)}, "the peak RSS")) total_kb += kb;
    return total_kb / 1024.0;
}

// What the collectives cost per training step (`traffic` over `steps`
// steps), and the gradient all-reduce once more on its own: the same buffer
// summed back to back after a barrier, so without any wait for a slower
// rank, which is what this machine's transport costs.
json collective_costs(const DataParallel::Traffic& traffic, size_t steps) {
    auto per_step = [&](const DataParallel::Exchange& e) {
        return json{{"calls", double(e.calls) / steps},
                    {"mb", e.bytes / 1e6 / steps},
                    {"ms", 1e3 * e.seconds / steps}};
    };
    std::vector<float> buffer(traffic.gradients.bytes / std::max<int64_t>(traffic.gradients.calls, 1) / sizeof(float));
    const int repeats = 10;
    mpi::barrier("the all-reduce timing");
    const auto t0 = Clock::now();
    for (int i = 0; i < repeats; ++i) mpi::sum(buffer.data(), buffer.size(), "the all-reduce timing");
    const double alone_ms = 1e3 * seconds_since(t0) / repeats;
    return {{"gradients", per_step(traffic.gradients)},
            {"batch_statistics", per_step(traffic.batch_statistics)},
            {"step_results", per_step(traffic.step_results)},
            {"gradient_allreduce_alone_ms", alone_ms}};
}

// The hfq method for a baseline quantizer name ("msqe", "lsq"), or the name
// itself when it is already one of hfq's methods.
std::string hfq_method(const std::string& quant) { return quant == "msqe" ? "msqe-po2" : quant; }

// One model configuration: MobileNet `arch` at resolution `res` (1000 classes,
// or 10 at 32x32, exactly as the PyTorch baseline), float ("none") or with
// `quant` weight quantizers on every layer.
json bench_model(const std::string& arch, int res, const std::string& quant, const Settings& s) {
    set_compute_threads(s.threads);
    ModelConfig config;
    config.arch = parse_arch(arch);
    config.classes = res <= 32 ? 10 : 1000;
    auto model = build_model(config, s.seed);
    const int64_t macs = summarize(*model, {1, res, res, 3}).total_macs;
    if (quant != "none") {
        TrainConfig trainer;  // train_mobilenet's defaults: per channel, batch norm folded, first and last 8 bits
        trainer.quantizer = hfq_method(quant);
        trainer.bits = s.bits;
        trainer.bn_stats = s.bn_stats;
        trainer.freeze_bn_at = s.bn_frozen ? 0 : 1;  // frozen from the first step, or never
        quant::QuantPolicy policy = trainer.quant_policy(/*qat_steps=*/0);
        if (!s.trainer_qat) {  // as the baseline: per tensor, every layer at `bits`, batch norm not folded
            policy.options.per_channel = false;
            policy.first_layer_bits = policy.last_layer_bits = 0;
            policy.fold_bn = false;
        }
        quant::quantize_model(*model, policy);
    }

    // The trainer's own step (train/train_step.h). Quantizer scales (lsq) get
    // a tiny rate: random labels would otherwise drive them negative, and the
    // benchmark is about time, not learning.
    TrainStepOptions step_options;
    step_options.sgd.lr = 0.01f;
    step_options.sgd.momentum = 0.9f;
    step_options.sgd.weight_decay = 4e-5f;
    step_options.quantizer_lr = 1e-6f;
    // Under mpirun: this rank's part of the global batch, and the step's collectives.
    const int ranks = mpi::size();
    HFQ_CHECK(s.batch % ranks == 0, "--batch ", s.batch, " is the global batch: it must split evenly among ", ranks,
              " ranks");
    const int local_batch = s.batch / ranks;
    DataParallel dp(s.sync_bn);
    dp.attach(*model);
    if (dp.active()) step_options.sync = &dp;
    TrainStep step(*model, step_options);

    Rng rng = Rng::derive(s.seed, {static_cast<uint64_t>(mpi::rank())});
    const Tensor images = random_batch({local_batch, res, res, 3}, rng);  // NHWC
    std::vector<int32_t> labels(local_batch);
    for (auto& l : labels) l = static_cast<int32_t>(rng.below(config.classes));

    model->train();
    std::vector<double> losses;
    auto train_step = [&] { losses.push_back(step.run(images, labels).loss); };
    pool_reset_peak();
    rusage ru0{};  // page faults and system time of the timed steps only (the first steps fault memory in)
    const std::vector<double> train_times = time_steps(s, train_step, [&] {
        getrusage(RUSAGE_SELF, &ru0);
        dp.reset_traffic();
    });
    rusage ru1{};
    getrusage(RUSAGE_SELF, &ru1);
    const json comm = dp.active() ? collective_costs(dp.traffic(), train_times.size()) : json();
    const json profile = s.profile ? profile_steps(train_step, train_times.size()) : json();

    // Inference is timed in a single process only (a data-parallel
    // evaluation shares nothing but its final sums).
    std::vector<double> infer_times;
    if (!dp.active()) {
        model->eval();
        NoGradGuard no_grad;
        infer_times = time_steps(s, [&] { (*model)(Variable(images)); });
    }

    double train_total = 0, infer_total = 0;
    for (double t : train_times) train_total += t;
    for (double t : infer_times) infer_total += t;
    const double train_ips = s.batch * train_times.size() / train_total;
    const double infer_ips = infer_times.empty() ? 0.0 : s.batch * infer_times.size() / infer_total;
    const double user =
        ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + 1e-6 * (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec);
    const double sys = ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec + 1e-6 * (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec);
    return {{"model", arch},
            {"res", res},
            {"quant", quant},
            {"trainer_qat", s.trainer_qat},
            {"bn_stats", s.trainer_qat ? (s.bn_frozen ? "frozen" : s.bn_stats) : "not folded"},
            {"bits", s.bits},
            {"batch", s.batch},
            {"threads", s.threads},
            {"ranks", ranks},
            {"classes", config.classes},
            {"fwd_macs_per_img", macs},
            {"train_img_s", train_ips},
            {"infer_img_s", infer_ips},
            {"train_gflop_s", train_ips * macs * 6 / 1e9},
            {"infer_gflop_s", infer_ips * macs * 2 / 1e9},
            {"train_step_median_s", median(train_times)},
            {"timed_steps", train_times.size()},
            {"train_sys_frac", sys / std::max(user + sys, 1e-9)},
            {"train_minflt_per_step", double(ru1.ru_minflt - ru0.ru_minflt) / train_times.size()},
            {"first_loss", losses.front()},
            {"last_loss", losses.back()},
            {"pool_peak_mb", pool_stats().peak_in_use_bytes / 1048576.0},
            {"peak_rss_mb", peak_rss_mb_all_ranks()},
            {"comm", comm},
            {"profile", profile}};
}

// The integer engine (deploy/integer_engine.h) beside the fake-quant
// evaluation it equals: one W4A8 model (train_mobilenet's default QAT with
// --activation-bits 8), one batch, images/s of both, and whether the logits
// are the same numbers.
json bench_integer(const std::string& arch, int res, const Settings& s) {
    set_compute_threads(s.threads);
    ModelConfig config;
    config.arch = parse_arch(arch);
    config.classes = res <= 32 ? 10 : 1000;
    auto model = build_model(config, s.seed);
    TrainConfig trainer;
    trainer.bits = s.bits;
    trainer.activation_bits = 8;
    const quant::QuantPolicy policy = trainer.quant_policy(/*qat_steps=*/0);
    quant::quantize_model(*model, policy);
    Rng rng(s.seed);
    const Tensor images = random_batch({s.batch, res, res, 3}, rng);
    std::vector<int32_t> labels(size_t(s.batch));
    for (auto& l : labels) l = static_cast<int32_t>(rng.below(config.classes));
    const TrainStepOptions step_options;
    TrainStep step(*model, step_options);
    model->train();
    for (int i = 0; i < 2; ++i) step.run(images, labels);  // every quantizer chooses its exponent

    const std::string path = cat("/tmp/hfq_bench_w4a8_", getpid(), ".safetensors");
    quant::export_quantized_model(path, *model, policy);
    const deploy::IntegerEngine engine(path);
    std::remove(path.c_str());
    model->eval();
    NoGradGuard no_grad;
    Tensor fake, integer;
    const std::vector<double> fake_times = time_steps(s, [&] { fake = (*model)(Variable(images)).value(); });
    const std::vector<double> integer_times = time_steps(s, [&] { integer = engine.run(images).float_logits(); });
    int64_t equal = 0;
    for (int64_t i = 0; i < fake.numel(); ++i) equal += fake.f32()[i] == integer.f32()[i];
    auto ips = [&](const std::vector<double>& t) {
        double total = 0;
        for (double x : t) total += x;
        return s.batch * t.size() / total;
    };
    return {{"model", arch},           {"res", res},
            {"batch", s.batch},        {"threads", s.threads},
            {"fake_quant_img_s", ips(fake_times)}, {"integer_img_s", ips(integer_times)},
            {"logits_equal", equal == fake.numel()}};
}

// Forward and backward time of single ops at the shapes of MobileNetV1 at
// 224x224, batch `s.batch`.
json bench_ops(const Settings& s) {
    set_compute_threads(s.threads);
    Rng rng(s.seed);
    const int64_t n = s.batch;
    struct OpCase {
        std::string name;
        Shape input;
        std::vector<Shape> params;  // parameter shapes (differentiated)
        int64_t macs;               // forward MACs per batch (0: not counted)
        std::function<Variable(const Variable&, const std::vector<Variable>&)> op;
    };
    Tensor running_mean = Tensor::zeros({64}), running_var = Tensor::full({64}, 1);
    const std::vector<OpCase> cases = {
        {"conv 3x3 s2 3->32 (stem)",
         {n, 224, 224, 3},
         {{32, 3, 3, 3}},
         n * 112 * 112 * 32 * 27,
         [](const Variable& x, const std::vector<Variable>& p) {
             return conv2d(x, p[0], {}, {.stride = 2, .padding = 1});
         }},
        {"depthwise 3x3 s1 112x112x64",
         {n, 112, 112, 64},
         {{64, 1, 3, 3}},
         n * 112 * 112 * 64 * 9,
         [](const Variable& x, const std::vector<Variable>& p) {
             return conv2d(x, p[0], {}, {.stride = 1, .padding = 1, .groups = 64});
         }},
        {"depthwise 3x3 s2 112x112x64",
         {n, 112, 112, 64},
         {{64, 1, 3, 3}},
         n * 56 * 56 * 64 * 9,
         [](const Variable& x, const std::vector<Variable>& p) {
             return conv2d(x, p[0], {}, {.stride = 2, .padding = 1, .groups = 64});
         }},
        {"pointwise 56x56 128->128",
         {n, 56, 56, 128},
         {{128, 128, 1, 1}},
         n * 56 * 56 * 128 * 128,
         [](const Variable& x, const std::vector<Variable>& p) { return conv2d(x, p[0], {}, {}); }},
        {"pointwise 7x7 1024->1024",
         {n, 7, 7, 1024},
         {{1024, 1024, 1, 1}},
         n * 7 * 7 * 1024 * 1024,
         [](const Variable& x, const std::vector<Variable>& p) { return conv2d(x, p[0], {}, {}); }},
        {"batch norm (train) 112x112x64",
         {n, 112, 112, 64},
         {{64}, {64}},
         0,
         [&](const Variable& x, const std::vector<Variable>& p) {
             return batch_norm(x, p[0], p[1], running_mean, running_var, true);
         }},
        {"batch norm + relu6 (train) 112x112x64",
         {n, 112, 112, 64},
         {{64}, {64}},
         0,
         [&](const Variable& x, const std::vector<Variable>& p) {
             return batch_norm_relu6(x, p[0], p[1], running_mean, running_var, true);
         }},
        {"relu6 112x112x64",
         {n, 112, 112, 64},
         {},
         0,
         [](const Variable& x, const std::vector<Variable>&) { return relu6(x); }},
        {"add 56x56x24",
         {n, 56, 56, 24},
         {},
         0,
         [](const Variable& x, const std::vector<Variable>&) { return add(x, x); }},
        {"global avg pool 7x7x1024",
         {n, 7, 7, 1024},
         {},
         0,
         [](const Variable& x, const std::vector<Variable>&) { return global_avg_pool(x); }},
        {"linear 1024->1000",
         {n, 1024},
         {{1000, 1024}, {1000}},
         n * 1024 * 1000,
         [](const Variable& x, const std::vector<Variable>& p) { return linear(x, p[0], p[1]); }},
    };
    json rows = json::array();
    for (const OpCase& c : cases) {
        Variable x(random_batch(c.input, rng), true);
        std::vector<Variable> params;
        for (const Shape& p : c.params) params.emplace_back(random_batch(p, rng), true);
        Tensor seed;
        std::vector<double> fwd, bwd;
        Settings quick = s;
        quick.min_time = 1.0;
        time_steps(quick, [&] {
            auto t0 = Clock::now();
            Variable y = c.op(x, params);
            fwd.push_back(seconds_since(t0));
            if (!seed.defined()) seed = random_batch(y.shape(), rng);
            t0 = Clock::now();
            y.backward(seed);
            bwd.push_back(seconds_since(t0));
            x.zero_grad();
            for (Variable& p : params) p.zero_grad();
        });
        const double f = median(fwd), b = median(bwd);
        json row = {{"op", c.name}, {"forward_ms", f * 1e3}, {"backward_ms", b * 1e3}};
        if (c.macs) {
            row["forward_gflop_s"] = 2.0 * c.macs / f / 1e9;
            row["backward_gflop_s"] = 4.0 * c.macs / b / 1e9;
        }
        rows.push_back(row);
    }
    return rows;
}

// Runs `work` in a forked child so that its peak RSS is its own; the child
// sends back one JSON document through a pipe. The parent never touches
// oneDNN or OpenMP (forking after OpenMP started is not safe).
json in_child(const std::function<json()>& work) {
    int fds[2];
    HFQ_CHECK(pipe(fds) == 0, "hfq_bench: pipe failed");
    const pid_t pid = fork();
    HFQ_CHECK(pid >= 0, "hfq_bench: fork failed");
    if (pid == 0) {
        close(fds[0]);
        std::string out;
        int code = 0;
        try {
            out = work().dump();
        } catch (const std::exception& e) {
            out = json{{"error", e.what()}}.dump();
            code = 1;
        }
        for (size_t done = 0; done < out.size();) {
            const ssize_t w = write(fds[1], out.data() + done, out.size() - done);
            if (w <= 0) break;
            done += w;
        }
        close(fds[1]);
        _exit(code);
    }
    close(fds[1]);
    std::string text;
    char buf[4096];
    for (ssize_t r; (r = read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, r);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    HFQ_CHECK(!text.empty(), "hfq_bench: a benchmark process died (status ", status, ")");
    json result = json::parse(text);
    HFQ_CHECK(!result.contains("error"), "hfq_bench: ", result.value("error", std::string()));
    return result;
}

// The line on which a configuration run under mpirun hands its result back.
constexpr const char* kResultMarker = "hfq_bench-result ";

// Runs one configuration on `ranks` MPI ranks: mpirun starts this program
// again with that configuration alone, and rank 0 prints its JSON result on
// a line of its own (main, under mpirun). Everything else the job prints is
// passed through.
json under_mpirun(int ranks, const std::string& arch, int res, const std::string& quant, const Settings& s) {
    HFQ_CHECK(s.threads % ranks == 0, "hfq_bench: --threads ", s.threads, " must split evenly among ", ranks,
              " ranks");
    const int threads = s.threads / ranks;
    char self[4096] = {};
    HFQ_CHECK(readlink("/proc/self/exe", self, sizeof self - 1) > 0, "hfq_bench: cannot find its own executable");
    std::string command = cat("mpirun -np ", ranks);
    if (geteuid() == 0) command += " --allow-run-as-root";
    if (ranks > static_cast<int>(std::thread::hardware_concurrency())) command += " --oversubscribe";
    // One thread per rank: Open MPI's default binding (a core per rank, for
    // up to two ranks). More: let the OS place a rank's OpenMP threads.
    if (threads > 1) command += " --bind-to none";
    command += cat(" ", self, " --models ", arch, " --res ", res, " --quants ", quant, " --bits ", s.bits,
                   " --batch ", s.batch, " --threads ", threads, " --warmup ", s.warmup, " --steps ", s.steps,
                   " --min-time ", s.min_time);
    if (s.trainer_qat) command += cat(" --trainer-qat --bn-stats ", s.bn_stats, s.bn_frozen ? " --bn-frozen" : "");
    if (s.profile) command += " --profile";
    if (!s.sync_bn) command += " --no-sync-bn";
    std::fflush(stdout);
    FILE* job = popen(command.c_str(), "r");
    HFQ_CHECK(job != nullptr, "hfq_bench: cannot start `", command, "`");
    json result;
    char line[1 << 16];
    std::string text;
    while (std::fgets(line, sizeof line, job)) {
        text += line;
        if (text.back() != '\n' && !std::feof(job)) continue;  // a longer line: read on
        if (text.rfind(kResultMarker, 0) == 0)
            result = json::parse(text.substr(std::strlen(kResultMarker)));
        else
            std::fputs(text.c_str(), stdout);
        text.clear();
    }
    const int status = pclose(job);
    HFQ_CHECK(status == 0 && !result.is_null(), "hfq_bench: `", command, "` failed (status ", status, ")");
    return result;
}

// ---- The machine's limits, for the GFLOP/s and traffic figures above ------

// Twelve independent chains of multiply-adds (more than the FMA latency
// times the FMA units, so the units never wait): v = v * b + c on `Vec`
// registers, contracted to one FMA instruction each; the empty asm keeps
// every step (the compiler may not reorder or fold the chains). Always
// inlined: in fma_avx512 it is compiled for AVX-512, which the build does not
// target.
template <class Vec>
[[gnu::always_inline]] inline void fma_chains(int64_t iters, Vec b, Vec c) {
    Vec a[12] = {};
    for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
        for (Vec& v : a) {
            v = v * b + c;
            asm volatile("" : "+x"(v));
        }
}
void fma_avx2(int64_t iters) { fma_chains(iters, _mm256_set1_ps(0.999f), _mm256_set1_ps(1e-3f)); }
__attribute__((target("avx512f"))) void fma_avx512(int64_t iters) {
    fma_chains(iters, _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-3f));
}

// FLOP/s of `chains` (floats_per_vec lanes) run on `threads` threads at once.
double fma_gflop_s(int threads, void (*chains)(int64_t), int floats_per_vec) {
    const int64_t iters = 20'000'000;
    const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads)
    chains(iters);
    return 2.0 * threads * iters * 12 * floats_per_vec / seconds_since(t0) / 1e9;
}

// y = 1.5 x + 0.5 over 2 x 256 MB (far beyond the caches): bytes read and
// written per second, the traffic a streaming op like batch norm sees.
double copy_gb_s(int threads) {
    const int64_t n = int64_t(64) << 20;
    std::vector<float> x(n, 1.0f), y(n, 0.0f);
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
        const auto t0 = Clock::now();
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; ++i) y[i] = 1.5f * x[i] + 0.5f;
        best = std::max(best, 2.0 * n * sizeof(float) / seconds_since(t0) / 1e9);
    }
    return best;
}

json bench_machine(const Settings& s) {
    json m = {{"threads", s.threads}};
    for (int t : {1, s.threads}) {
        const std::string key = t == 1 ? "1_thread" : "all_threads";
        m["fma_avx2_gflop_s"][key] = fma_gflop_s(t, fma_avx2, 8);
        if (__builtin_cpu_supports("avx512f")) m["fma_avx512_gflop_s"][key] = fma_gflop_s(t, fma_avx512, 16);
        m["copy_gb_s"][key] = copy_gb_s(t);
    }
    return m;
}

}  // namespace

int main(int argc, char** argv) {
    mpi::Session mpi_session(argc, argv);  // MPI_Init when a --ranks configuration runs under mpirun
    CLI::App app{"hfq_bench: training-step throughput of MobileNets and their ops"};
    Settings s;
    std::vector<std::string> models = {"v1", "v2"};
    std::vector<int> resolutions = {224, 32};
    std::vector<std::string> quants = {"none"};
    bool ops = false, machine = false;
    std::string json_path;
    app.add_option("--models", models, "Models: v1, v2")->delimiter(',')->check(CLI::IsMember({"v1", "v2"}));
    app.add_option("--res", resolutions, "Input resolutions (1000 classes, 10 at <= 32)")->delimiter(',');
    std::vector<std::string> quant_names = {"none", "msqe", "lsq"};
    for (const std::string& m : quant::quantizer_methods()) quant_names.push_back(m);
    app.add_option("--quants", quants, "none (float), msqe (= msqe-po2), lsq, or any hfq method")
        ->delimiter(',')
        ->check(CLI::IsMember(quant_names));
    app.add_option("--bits", s.bits, "Weight bits of the quantized configurations")->check(CLI::Range(2, 8));
    app.add_option("--batch", s.batch, "Batch size")->check(CLI::PositiveNumber);
    app.add_option("--threads", s.threads, "Compute (OpenMP) threads")->check(CLI::PositiveNumber);
    app.add_option("--warmup", s.warmup, "Untimed steps first")->check(CLI::NonNegativeNumber);
    app.add_option("--steps", s.steps, "Timed steps, at least")->check(CLI::PositiveNumber);
    app.add_option("--min-time", s.min_time, "Timed seconds, at least")->check(CLI::NonNegativeNumber);
    app.add_flag("--ops", ops, "Also time single ops at MobileNetV1-224 shapes");
    bool integer = false;
    app.add_flag("--integer", integer,
                 "Instead of training steps: the integer engine against the fake-quant evaluation of the same W4A8 "
                 "model (--activation-bits 8) and batch");
    CLI::Option* trainer_qat = app.add_flag(
        "--trainer-qat", s.trainer_qat,
        "Quantize as train_mobilenet's QAT does by default (per channel, batch norm folded, first and last "
        "layer 8 bits) instead of as the PyTorch baseline (per tensor, not folded, every layer at --bits)");
    app.add_option("--bn-stats", s.bn_stats, "With --trainer-qat: the folded layers' batch statistics")
        ->check(CLI::IsMember({"quantized-conv", "float-conv"}))
        ->needs(trainer_qat);  // the baseline's configuration does not fold
    app.add_flag("--bn-frozen", s.bn_frozen,
                 "With --trainer-qat: the folded layers on their moving statistics, as in the trainer's QAT after "
                 "--freeze-bn-at (no batch statistics)")
        ->needs(trainer_qat);
    app.add_flag("--profile", s.profile,
                 "After each configuration's timed steps, profile as many more op by op and print where the time goes "
                 "(ops merged by name and output shape)");
    app.add_flag("--machine", machine,
                 "First measure this machine's limits: FMA peak (AVX2, and AVX-512 if present) and memory copy");
    std::vector<int> ranks = {1};
    app.add_option("--ranks", ranks,
                   "Data-parallel layouts: each configuration on 1 process and/or under mpirun on N ranks, "
                   "--threads split among them, --batch the global batch")
        ->delimiter(',')
        ->check(CLI::PositiveNumber);
    app.add_option("--rounds", s.rounds, "Run every configuration this many times, the layouts alternating")
        ->check(CLI::PositiveNumber);
    bool per_rank_bn = false;
    app.add_flag("--no-sync-bn", per_rank_bn, "Data parallel: per-rank batch statistics (default: --sync-bn)");
    app.add_option("--json", json_path, "Write all results to this JSON file");
    CLI11_PARSE(app, argc, argv);
    s.sync_bn = !per_rank_bn;

    if (mpi::launched()) {  // started by under_mpirun: the one configuration, on this rank
        try {
            HFQ_CHECK(models.size() == 1 && resolutions.size() == 1 && quants.size() == 1 && !ops && !machine,
                      "hfq_bench under mpirun runs one configuration (hfq_bench --ranks starts it)");
            const json r = bench_model(models[0], resolutions[0], quants[0], s);
            if (mpi::is_root()) std::printf("%s%s\n", kResultMarker, r.dump().c_str());
            return 0;
        } catch (const std::exception& e) {
            mpi::abort(cat("hfq_bench: ", e.what()), 1);
        }
    }

    try {
        json results = {{"settings", {{"batch", s.batch}, {"threads", s.threads}}}, {"models", json::array()}};
        if (machine) {
            const json m = in_child([&] { return bench_machine(s); });
            auto row = [&](const char* what, const char* key, const char* unit) {
                if (m.contains(key))
                    std::printf("%-28s %8.1f %s on 1 thread, %8.1f on %d\n", what, m[key]["1_thread"].get<double>(),
                                unit, m[key]["all_threads"].get<double>(), s.threads);
            };
            row("FMA peak, AVX2", "fma_avx2_gflop_s", "GFLOP/s");
            row("FMA peak, AVX-512", "fma_avx512_gflop_s", "GFLOP/s");
            row("memory copy (read + write)", "copy_gb_s", "GB/s   ");
            std::printf("\n");
            results["machine"] = m;
        }
        if (integer) {
            std::printf("%-5s %5s %18s %18s %8s %13s\n", "model", "res", "fake-quant img/s", "integer img/s", "ratio",
                        "logits equal");
            for (const std::string& m : models)
                for (int res : resolutions)
                    for (int round = 0; round < s.rounds; ++round) {
                        const json r = in_child([&] { return bench_integer(m, res, s); });
                        const double f = r["fake_quant_img_s"], i = r["integer_img_s"];
                        std::printf("%-5s %5d %18.1f %18.1f %8.2f %13s\n", m.c_str(), res, f, i, i / f,
                                    r["logits_equal"].get<bool>() ? "yes" : "NO");
                        std::fflush(stdout);
                        results["integer"].push_back(r);
                    }
            if (!json_path.empty()) std::ofstream(json_path) << results.dump(1) << "\n";
            return 0;
        }
        const bool layouts = ranks != std::vector<int>{1};
        std::printf("%-5s %5s %-14s %12s %12s %10s %10s %10s", "model", "res", "quant", "train img/s", "infer img/s",
                    "GFLOP/s", "step ms", "peak MB");
        if (layouts) std::printf(" %7s %14s %14s %9s %8s", "ranks", "allreduce ms", "bn sums ms", "MB/step", "share");
        std::printf("\n");
        for (const std::string& m : models)
            for (int res : resolutions)
                for (const std::string& q : quants)
                    for (int round = 0; round < s.rounds; ++round)
                        for (int n : ranks) {
                            const json r = n == 1 ? in_child([&] { return bench_model(m, res, q, s); })
                                                  : under_mpirun(n, m, res, q, s);
                            char infer[32] = "-";  // not timed on several ranks
                            if (n == 1) std::snprintf(infer, sizeof infer, "%.1f", r["infer_img_s"].get<double>());
                            std::printf("%-5s %5d %-14s %12.1f %12s %10.1f %10.1f %10.0f", m.c_str(), res, q.c_str(),
                                        r["train_img_s"].get<double>(), infer, r["train_gflop_s"].get<double>(),
                                        1e3 * r["train_step_median_s"].get<double>(), r["peak_rss_mb"].get<double>());
                            if (layouts) {
                                const std::string layout = cat(n, "x", s.threads / n);
                                if (n == 1) {
                                    std::printf(" %7s\n", layout.c_str());
                                } else {
                                    const json& c = r["comm"];
                                    const double g = c["gradients"]["ms"], bn = c["batch_statistics"]["ms"],
                                                 sr = c["step_results"]["ms"];
                                    // The share of the mean step (the collectives' times are means too).
                                    const double step_ms = 1e3 * s.batch / r["train_img_s"].get<double>();
                                    std::printf(" %7s %8.1f (%3.1f) %14.1f %9.1f %7.1f%%\n", layout.c_str(), g,
                                                c["gradient_allreduce_alone_ms"].get<double>(), bn,
                                                c["gradients"]["mb"].get<double>(), 100 * (g + bn + sr) / step_ms);
                                }
                            } else {
                                std::printf("\n");
                            }
                            if (s.profile) print_profile(r["profile"]);
                            std::fflush(stdout);
                            results["models"].push_back(r);
                        }
        if (ops) {
            json rows = in_child([&] { return bench_ops(s); });
            std::printf("\n%-32s %12s %12s %12s %12s\n", "op (batch 32)", "fwd ms", "bwd ms", "fwd GFLOP/s",
                        "bwd GFLOP/s");
            for (const json& r : rows)
                std::printf(
                    "%-32s %12.2f %12.2f %12s %12s\n", r["op"].get<std::string>().c_str(),
                    r["forward_ms"].get<double>(), r["backward_ms"].get<double>(),
                    r.contains("forward_gflop_s") ? std::to_string((int)r["forward_gflop_s"].get<double>()).c_str()
                                                  : "-",
                    r.contains("backward_gflop_s") ? std::to_string((int)r["backward_gflop_s"].get<double>()).c_str()
                                                   : "-");
            results["ops"] = rows;
        }
        if (!json_path.empty()) {
            std::ofstream(json_path) << results.dump(1) << "\n";
            std::printf("wrote %s\n", json_path.c_str());
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "hfq_bench: %s\n", e.what());
        return 1;
    }
}
