#include "train/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <ctime>
#include <filesystem>
#include <optional>

#include "data/loader.h"
#include "engine/atomic_file.h"
#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "layers/checkpoint.h"
#include "layers/summary.h"
#include "quant/audit.h"
#include "quant/diagnostics_table.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "train/datasets.h"
#include "train/evaluate.h"
#include "train/lr_schedule.h"
#include "train/train_step.h"
#include "train/training_checkpoint.h"

namespace hfq {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- Signals: SIGINT / SIGTERM ask the run to stop after the current step ----

std::atomic<int> g_signal{0};

extern "C" void on_stop_signal(int sig) { g_signal.store(sig); }

// Installs the handlers for the duration of a run. SA_RESETHAND restores the
// default action after the first signal, so a second Ctrl-C ends the process
// at once.
class SignalGuard {
public:
    SignalGuard() {
        g_signal.store(0);
        struct sigaction sa {};
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESETHAND | SA_RESTART;
        sigaction(SIGINT, &sa, &old_int_);
        sigaction(SIGTERM, &sa, &old_term_);
    }
    ~SignalGuard() {
        sigaction(SIGINT, &old_int_, nullptr);
        sigaction(SIGTERM, &old_term_, nullptr);
    }
    SignalGuard(const SignalGuard&) = delete;
    SignalGuard& operator=(const SignalGuard&) = delete;

private:
    struct sigaction old_int_ {}, old_term_ {};
};

// A stage of the run: float training or QAT.
struct Stage {
    std::string name;     // "float" or "qat"
    int epochs = 0;
    int64_t first_epoch;  // the loader's epoch number of its first epoch (data order differs between stages)
    double lr = 0, warmup_epochs = 0;
};

// Training loss and accuracy summed over some steps (a log window or an epoch).
struct Tally {
    double loss = 0;  // sum of batch means times batch sizes
    int64_t correct = 0, samples = 0, steps = 0;
    double wait = 0;    // seconds spent waiting for the loader
    int64_t skipped = 0;  // unreadable samples, each replaced by the next one
    double paused = 0;  // seconds spent evaluating and saving (not training)
    Clock::time_point t0 = Clock::now();

    void add(const StepStats& s, int64_t n) {
        loss += double(s.loss) * n;
        correct += s.correct;
        samples += n;
        ++steps;
    }
    double mean_loss() const { return samples ? loss / samples : 0; }
    double accuracy() const { return samples ? double(correct) / samples : 0; }
    double busy() const { return std::max(1e-9, seconds_since(t0) - paused); }
    double images_per_second() const { return samples / busy(); }
};

Json eval_json(const EvalResult& r) {
    return {{"loss", r.loss},       {"top1", r.top1},       {"top5", r.top5},
            {"samples", r.samples}, {"skipped_unreadable", r.skipped}, {"seconds", r.seconds}};
}

// For the epoch line: "" when none, else e.g. ", 1 unreadable training image skipped".
std::string skipped_note(int64_t count, const char* set) {
    if (count == 0) return "";
    return cat(", ", count, " unreadable ", set, count == 1 ? " image" : " images", " skipped");
}

bool all_parameters_finite(Model& model) {
    for (const NamedParameter& p : model.named_parameters()) {
        const float* v = p.var.value().f32();
        for (int64_t i = 0, n = p.var.value().numel(); i < n; ++i)
            if (!std::isfinite(v[i])) return false;
    }
    return true;
}

std::string timestamp() {
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
    return buf;
}

std::string fixed(double v, int digits) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", digits, v);
    return buf;
}

std::string percent(const Json& r, const char* key) {
    if (!r.is_object() || !r.contains(key)) return "-";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f %%", 100 * r[key].get<double>());
    return buf;
}

class Trainer {
public:
    Trainer(const TrainConfig& config, const RunHooks& hooks)
        : cfg_(config), hooks_(hooks), progress_(parse_progress_mode(config.progress)) {}

    RunResult run();

private:
    void prepare();
    void prepare_output();
    void run_stage(const Stage& stage);
    void enter_qat();
    void report_dead_channels(const std::vector<quant::DeadChannels>& dead);
    void end_epoch(const Stage& stage, int64_t epoch, const Tally& epoch_tally);
    void log_step(const Stage& stage, const TrainStep& step, const StepStats& s, const Tally& window, int64_t epoch);
    void save(const NamedOptimizers& optimizers);
    [[noreturn]] void diverged(int64_t step, const std::string& what);
    Json finish();
    EvalOptions eval_options() const { return {cfg_.batch_size, cfg_.loader_threads, cfg_.max_bad_fraction}; }
    Json evaluate_export();
    void say(const std::string& text) { progress_.message(text); }
    bool stopping() const { return stop_ != RunStatus::finished || g_signal.load() != 0; }
    void record_time();
    std::string path(const char* file) const { return (out_ / file).string(); }
    int64_t batches_per_epoch() const { return data_.train->size() / cfg_.batch_size; }

    TrainConfig cfg_;
    RunHooks hooks_;
    Progress progress_;
    TrainData data_;
    std::shared_ptr<Model> model_;
    fs::path out_;
    std::unique_ptr<MetricsLog> log_;
    std::vector<Stage> stages_;
    uint64_t loader_seed_ = 0;

    TrainState state_;
    std::optional<TrainingCheckpoint> resume_;  // until its optimizer state is restored
    RunStatus stop_ = RunStatus::finished;      // finished: not stopping
    int64_t steps_this_run_ = 0;
    int64_t last_saved_step_ = -1;
    double stage_seconds_before_ = 0;  // the stage's time in earlier invocations (resume)
    Clock::time_point stage_clock_ = Clock::now();
    Clock::time_point stage_step_clock_ = Clock::now();  // for the ETA
    int64_t stage_steps_this_run_ = 0;
};

void Trainer::prepare() {
    set_compute_threads(cfg_.threads);
    data_ = open_datasets(cfg_);
    HFQ_CHECK(data_.train->size() >= cfg_.batch_size, "--batch-size ", cfg_.batch_size, " is larger than the ",
              data_.train->size(), " training samples");
    loader_seed_ = mix64(cfg_.seed ^ 0x6c6f61646572ULL);  // data order and augmentation: a stream apart from init

    ModelConfig mc;
    mc.arch = parse_arch(cfg_.arch);
    mc.width = cfg_.width;
    mc.classes = data_.train->num_classes();
    mc.input_channels = data_.channels;
    mc.small_input = cfg_.small_input == "auto" ? data_.input_size <= 64 : cfg_.small_input == "true";
    // The resolved config says what "automatic" turned into.
    cfg_.input_size = data_.input_size;
    cfg_.input_channels = data_.channels;
    cfg_.small_input = mc.small_input ? "true" : "false";
    mc.activation = parse_activation(cfg_.activation);
    if (cfg_.dropout >= 0) mc.dropout = cfg_.dropout;
    mc.validate();
    model_ = build_model(mc, cfg_.seed);

    if (cfg_.epochs > 0) stages_.push_back({"float", cfg_.epochs, 0, cfg_.lr, cfg_.warmup_epochs});
    if (cfg_.qat()) stages_.push_back({"qat", cfg_.qat_epochs, cfg_.epochs, cfg_.qat_lr, cfg_.qat_warmup_epochs});

    if (!cfg_.resume.empty()) {
        out_ = cfg_.resume;
        const std::string file = path("checkpoint.safetensors");
        HFQ_CHECK(fs::exists(file), "--resume ", cfg_.resume, ": no checkpoint there (", file, ")");
        resume_ = read_training_checkpoint(file);
        const std::vector<std::string> changed = TrainConfig::training_differences(cfg_, resume_->config);
        HFQ_CHECK(changed.empty(), "--resume: option --", changed.empty() ? "" : changed[0],
                  " differs from the checkpoint's run (", file, ")");
        if (resume_->policy) quant::quantize_model(*model_, *resume_->policy);
        restore_model(*resume_, *model_);
        state_ = resume_->state;
        // The checkpoint's data position must be where its step count says: a
        // different dataset (size) would break the exact continuation.
        for (const Stage& s : stages_)
            if (s.name == state_.stage) {
                const LoaderPosition p{s.first_epoch + state_.stage_step / batches_per_epoch(),
                                       state_.stage_step % batches_per_epoch()};
                HFQ_CHECK(p.epoch == state_.next_batch.epoch && p.batch == state_.next_batch.batch, file,
                          ": the checkpoint's next batch is batch ", state_.next_batch.batch, " of epoch ",
                          state_.next_batch.epoch, ", but with the current data (", data_.train->size(),
                          " samples) its step count points at batch ", p.batch, " of epoch ", p.epoch,
                          "; did the dataset change?");
            }
        last_saved_step_ = state_.global_step;
    } else {
        if (!cfg_.init_from.empty()) {
            const SafetensorsFile file = model_tensors(read_safetensors(cfg_.init_from));
            const LoadReport r = load_state_dict(*model_, file, {.partial = cfg_.init_partial});
            HFQ_CHECK(!r.loaded.empty(), "--init-from ", cfg_.init_from, ": no tensor of the file fits the model");
            if (!r.missing.empty() || !r.unexpected.empty() || !r.mismatched.empty())
                say(cat("--init-from ", cfg_.init_from, ": loaded ", r.loaded.size(), " tensors, skipped:\n",
                        r.to_string()));
        }
        out_ = cfg_.out.empty() ? fs::path("runs") / cat(arch_name(mc.arch), "-", data_.kind, "-", timestamp())
                                : fs::path(cfg_.out);
        cfg_.out = out_.string();
        for (const char* f : {"config.json", "checkpoint.safetensors"})
            HFQ_CHECK(!fs::exists(out_ / f), "--out ", out_.string(), " already holds a run (", f,
                      "); continue it with --resume ", out_.string(), " or choose another --out");
    }
}

void Trainer::prepare_output() {
    std::error_code ec;
    fs::create_directories(out_, ec);
    HFQ_CHECK(!ec && fs::is_directory(out_), "--out ", out_.string(), ": cannot create the folder (", ec.message(), ")");
    if (cfg_.resume.empty()) write_file_atomically(path("config.json"), cfg_.to_json() + "\n");
    log_ = std::make_unique<MetricsLog>(path("metrics.jsonl"));

    const ModelSummary summary = summarize(*model_, {1, data_.input_size, data_.input_size, data_.channels});
    Json start = {{"type", resume_ ? "resume" : "start"},
                  {"step", state_.global_step},
                  {"model", Json::parse(model_->config().to_json())},
                  {"parameters", summary.total_params},
                  {"macs_per_image", summary.total_macs},
                  {"data", data_.kind},
                  {"train_samples", data_.train->size()},
                  {"test_samples", data_.test->size()},
                  {"threads", cfg_.threads},
                  {"loader_threads", cfg_.loader_threads}};
    if (!resume_) start["config"] = Json::parse(cfg_.to_json());
    log_->write(start);
    say(cat(resume_ ? "Resuming " : "Training ", model_->type_name(), " (width ", cfg_.width, ", ",
            data_.input_size, "x", data_.input_size, "x", data_.channels, ", ", model_->config().classes,
            " classes; ", summary.total_params, " parameters, ", summary.total_macs / 1e6, " M MACs per image) on ",
            data_.kind, " (", data_.train->size(), " training, ", data_.test->size(), " test images) in ",
            out_.string(), resume_ ? cat(" from step ", state_.global_step) : std::string()));
}

void Trainer::record_time() {
    if (state_.stage == "done") return;
    state_.results["seconds"][state_.stage] = stage_seconds_before_ + seconds_since(stage_clock_);
}

void Trainer::save(const NamedOptimizers& optimizers) {
    if (!all_parameters_finite(*model_)) diverged(state_.global_step, "a parameter is not finite");
    record_time();
    save_training_checkpoint(path("checkpoint.safetensors"), *model_, optimizers, state_, cfg_, data_.preprocessing);
    last_saved_step_ = state_.global_step;
}

void Trainer::diverged(int64_t step, const std::string& what) {
    if (log_) log_->write({{"type", "diverged"}, {"stage", state_.stage}, {"step", step}, {"reason", what}});
    throw Error(cat("training diverged at step ", step, " (", state_.stage, " stage): ", what,
                    ". Nothing was saved after ",
                    last_saved_step_ >= 0 ? cat("the last good checkpoint, ", path("checkpoint.safetensors"),
                                                " at step ", last_saved_step_)
                                          : std::string("the start (no checkpoint was written yet)"),
                    ". Try a lower --lr / --qat-lr, --clip-grad-norm or a longer warm-up."));
}

// On the terminal and in the metrics: which channels zero_dead_channels zeroed.
void Trainer::report_dead_channels(const std::vector<quant::DeadChannels>& dead) {
    Json layers = Json::array();
    std::string text;
    for (const quant::DeadChannels& d : dead) {
        layers.push_back({{"layer", d.layer}, {"channels", d.channels}, {"dead", d.dead}});
        text += cat(text.empty() ? "" : ", ", d.layer, " ", d.dead.size(), "/", d.channels);
    }
    if (log_) log_->write({{"type", "dead_channels"}, {"layers", layers}});
    if (!dead.empty())
        say(cat("Dead channels (batch-norm variance ~0, weights zeroed before quantizing): ", text));
}

void Trainer::enter_qat() {
    if (!quant::is_quantized(*model_)) {
        if (!state_.results.contains("float")) {
            // QAT straight from --init-from: measure the float model first, for the table.
            state_.results["float"] = eval_json(evaluate(*model_, data_.test, eval_options()));
        }
        save_checkpoint(path("float.safetensors"), *model_, data_.preprocessing);
        quant::quantize_model(*model_, cfg_.quant_policy());
        if (cfg_.zero_dead_channels) report_dead_channels(quant::zero_dead_channels(*model_));
        say(cat("Quantization-aware training: ", cfg_.quantizer, ", ", cfg_.bits, " bits",
                cfg_.per_channel ? " per channel" : " per tensor", "; ", quant::quantized_layers(*model_).size(),
                " layers wrapped (first ", cfg_.first_layer_bits ? cfg_.first_layer_bits : cfg_.bits, " bits, last ",
                cfg_.last_layer_bits ? cfg_.last_layer_bits : cfg_.bits, " bits)"));
    }
    if (state_.stage != "qat") {
        state_.stage = "qat";
        state_.stage_step = 0;
    }
}

void Trainer::log_step(const Stage& stage, const TrainStep& step, const StepStats& s, const Tally& window,
                       int64_t epoch) {
    Json j = {{"type", "step"},
              {"stage", stage.name},
              {"epoch", epoch},
              {"step", state_.global_step},
              {"stage_step", state_.stage_step},
              {"loss", window.mean_loss()},
              {"train_top1", window.accuracy()},
              {"lr", step.lr()}};
    if (step.has_quantizer_optimizer()) j["quantizer_lr"] = step.quantizer_lr();
    j["grad_norm"] = s.grad_norm;
    j["images_per_second"] = window.images_per_second();
    j["data_wait_fraction"] = window.wait / window.busy();
    if (stage.name == "qat") j["quantizers"] = quantizer_diagnostics(*model_);
    log_->write(j);
}

void Trainer::end_epoch(const Stage& stage, int64_t epoch, const Tally& epoch_tally) {
    const bool last = epoch == stage.epochs;
    Json j = {{"type", "epoch"},
              {"stage", stage.name},
              {"epoch", epoch},
              {"step", state_.global_step},
              {"train_loss", epoch_tally.mean_loss()},
              {"train_top1", epoch_tally.accuracy()},
              {"images_per_second", epoch_tally.images_per_second()},
              {"data_wait_fraction", epoch_tally.wait / epoch_tally.busy()},
              {"skipped_unreadable", epoch_tally.skipped}};
    std::string line = cat(stage.name, " epoch ", epoch, "/", stage.epochs, ": train loss ",
                           fixed(epoch_tally.mean_loss(), 4), ", top-1 ", fixed(100 * epoch_tally.accuracy(), 2),
                           " %");
    if (epoch % cfg_.eval_every == 0 || last) {
        j["test"] = eval_json(evaluate(*model_, data_.test, eval_options()));
        line += cat(" | test loss ", fixed(j["test"]["loss"].get<double>(), 4), ", top-1 ", percent(j["test"], "top1"),
                    ", top-5 ", percent(j["test"], "top5"));
        if (last) state_.results[stage.name] = j["test"];
        if (stage.name == "qat") {
            j["test_integer"] = evaluate_export();
            line += cat(" | integer top-1 ", percent(j["test_integer"], "top1"));
            if (last) state_.results["integer"] = j["test_integer"];
        }
    }
    if (stage.name == "qat") j["quantizers"] = quantizer_diagnostics(*model_);
    log_->write(j);
    const int64_t test_skipped = j.contains("test") ? j["test"]["skipped_unreadable"].get<int64_t>() : 0;
    say(cat(line, " (", static_cast<int64_t>(epoch_tally.images_per_second()), " img/s",
            skipped_note(epoch_tally.skipped, "training"), skipped_note(test_skipped, "test"), ")"));
}

// Exports the quantized model (export.safetensors: integer codes, exponents,
// folded biases) and evaluates the network rebuilt from that file alone.
Json Trainer::evaluate_export() {
    const auto t0 = Clock::now();
    quant::export_quantized_model(path("export.safetensors"), *model_, cfg_.quant_policy(), data_.preprocessing);
    const std::shared_ptr<Model> integer = quant::build_model_from_export(path("export.safetensors"));
    Json r = eval_json(evaluate(*integer, data_.test, eval_options()));
    r["seconds"] = seconds_since(t0);
    return r;
}

void Trainer::run_stage(const Stage& stage) {
    const int64_t bpe = batches_per_epoch();
    const int64_t total = stage.epochs * bpe;
    if (state_.stage != stage.name) {
        state_.stage = stage.name;
        state_.stage_step = 0;
    }
    stage_seconds_before_ = state_.results.contains("seconds") && state_.results["seconds"].contains(stage.name)
                                ? state_.results["seconds"][stage.name].get<double>()
                                : 0.0;
    stage_clock_ = Clock::now();

    LrSchedule schedule;
    schedule.kind = parse_schedule(cfg_.schedule);
    schedule.total_steps = std::max<int64_t>(1, total);
    schedule.warmup_steps = std::min<int64_t>(total, std::llround(stage.warmup_epochs * bpe));
    schedule.step_size = std::max<int64_t>(1, std::llround(cfg_.lr_step_epochs * bpe));
    schedule.gamma = cfg_.lr_gamma;
    schedule.min_factor = cfg_.min_lr_factor;
    schedule.validate();

    TrainStepOptions o;
    o.sgd.lr = static_cast<float>(stage.lr);
    o.sgd.momentum = static_cast<float>(cfg_.momentum);
    o.sgd.nesterov = cfg_.nesterov;
    o.sgd.weight_decay = static_cast<float>(cfg_.weight_decay);
    o.quantizer_optimizer = cfg_.quantizer_optimizer;
    o.quantizer_lr = static_cast<float>(cfg_.quantizer_lr);
    o.quantizer_weight_decay = static_cast<float>(cfg_.quantizer_weight_decay);
    o.label_smoothing = static_cast<float>(cfg_.label_smoothing);
    o.clip_grad_norm = static_cast<float>(cfg_.clip_grad_norm);
    TrainStep step(*model_, o);
    const NamedOptimizers optimizers = step.optimizers();
    if (resume_) {
        if (resume_->state.stage == stage.name) restore_optimizers(*resume_, optimizers);
        resume_.reset();
    }

    int64_t later_steps = 0;  // of the stages after this one, for the ETA
    for (const Stage& s : stages_)
        if (s.first_epoch > stage.first_epoch) later_steps += s.epochs * bpe;
    stage_step_clock_ = Clock::now();
    stage_steps_this_run_ = 0;

    if (state_.stage_step < total) {
        LoaderOptions lo;
        lo.batch_size = cfg_.batch_size;
        lo.drop_last = true;  // every step sees a full batch
        lo.seed = loader_seed_;
        lo.threads = cfg_.loader_threads;
        lo.max_bad_fraction = cfg_.max_bad_fraction;
        Loader loader(data_.train, lo, state_.next_batch = {stage.first_epoch + state_.stage_step / bpe,
                                                            state_.stage_step % bpe},
                      stage.first_epoch + stage.epochs);
        model_->train();
        Tally window, epoch_tally;
        while (state_.stage_step < total && !stopping()) {
            const auto wait0 = Clock::now();
            std::optional<Batch> batch = loader.next();
            HFQ_CHECK(batch.has_value(), "trainer: the loader ended before the stage did");
            const double waited = seconds_since(wait0);
            window.wait += waited;
            epoch_tally.wait += waited;
            epoch_tally.skipped += static_cast<int64_t>(batch->skipped.size());

            if (stage.name == "qat") {
                if (state_.stage_step == cfg_.stable_start_step) quant::set_stable_updating(*model_, true);
                if (state_.stage_step == cfg_.stable_switch_step) quant::set_stable_switched(*model_, true);
            }
            step.set_lr_factor(schedule.factor(state_.stage_step));
            const bool log_now = (state_.stage_step + 1) % cfg_.log_every == 0;
            const StepStats s = step.run(batch->images, batch->labels, log_now);
            if (!s.applied)
                diverged(state_.global_step + 1, std::isfinite(s.loss) ? cat("the gradient norm is ", s.grad_norm)
                                                                       : cat("the loss is ", s.loss));
            ++state_.stage_step;
            ++state_.global_step;
            ++steps_this_run_;
            ++stage_steps_this_run_;
            window.add(s, batch->size());
            epoch_tally.add(s, batch->size());
            state_.next_batch = {stage.first_epoch + state_.stage_step / bpe, state_.stage_step % bpe};
            const int64_t epoch = (state_.stage_step - 1) / bpe + 1;  // 1-based, of the stage

            if (log_now) log_step(stage, step, s, window, epoch);
            if (progress_.due(log_now)) {
                Progress::State ps;
                ps.stage = stage.name;
                ps.epoch = epoch;
                ps.epochs = stage.epochs;
                ps.step = state_.stage_step;
                ps.steps = total;
                ps.loss = window.mean_loss();
                ps.lr = step.lr();
                ps.images_per_second = window.images_per_second();
                ps.eta_seconds = seconds_since(stage_step_clock_) / stage_steps_this_run_ *
                                 double(total - state_.stage_step + later_steps);
                progress_.update(ps);
            }
            if (log_now) window = Tally();

            const auto pause0 = Clock::now();
            if (state_.stage_step % bpe == 0) {
                end_epoch(stage, epoch, epoch_tally);
                save(optimizers);
                epoch_tally = Tally();
            } else if (cfg_.checkpoint_every > 0 && state_.global_step % cfg_.checkpoint_every == 0) {
                save(optimizers);
            }
            window.paused += seconds_since(pause0);
            if (hooks_.after_step) hooks_.after_step(state_.global_step);
            if (cfg_.stop_after_steps > 0 && steps_this_run_ >= cfg_.stop_after_steps) stop_ = RunStatus::stopped;
        }
    }
    // Stopped inside the stage: keep everything, optimizer state included.
    if (state_.stage_step < total && last_saved_step_ != state_.global_step) save(optimizers);
    record_time();
}

Json Trainer::finish() {
    Json& results = state_.results;
    if (cfg_.epochs == 0 && !cfg_.qat() && !results.contains("float"))
        results["float"] = eval_json(evaluate(*model_, data_.test, eval_options()));  // --init-from evaluated alone
    if (cfg_.qat() && !results.contains("qat")) {
        // --qat-epochs 0: post-training quantization, evaluated as it stands.
        results["qat"] = eval_json(evaluate(*model_, data_.test, eval_options()));
        results["integer"] = evaluate_export();
    }
    state_.stage = "done";

    std::map<std::string, std::string> metadata;
    if (quant::is_quantized(*model_)) metadata[quant::kQuantPolicyKey] = cfg_.quant_policy().to_json();
    save_checkpoint(path("final.safetensors"), *model_, data_.preprocessing, metadata);
    save(NamedOptimizers{});

    Json summary = {{"data", data_.kind}, {"test_samples", data_.test->size()}, {"steps", state_.global_step}};
    if (results.contains("float")) summary["float"] = results["float"];
    std::vector<quant::LayerDiagnostics> layers;
    quant::AuditReport audit;
    if (cfg_.qat()) {
        summary["quantizer"] = Json::parse(cfg_.quant_policy().to_json());
        summary["fake_quant"] = results["qat"];
        summary["integer_export"] = results["integer"];
        // The export on disk is the final model's (written by its last
        // evaluation); the audit proves it computes what was trained.
        LoaderOptions lo;
        lo.batch_size = std::min<int64_t>(16, data_.test->size());
        lo.shuffle = false;
        lo.max_bad_fraction = cfg_.max_bad_fraction;
        const Tensor sample = Loader(data_.test, lo).next()->images;
        audit = quant::audit_export(*model_, path("export.safetensors"), sample);
        summary["audit"] = {{"passed", audit.passed()},
                            {"weight_mismatches", audit.weight_mismatches()},
                            {"max_layer_rel_diff", audit.max_rel_diff()},
                            {"logits_rel_diff", audit.logits_rel_diff},
                            {"top1_agreement", audit.top1_agreement}};
        layers = quant::collect_diagnostics(*model_);
        summary["layers"] = Json(quant::diagnostics_json(layers));
    }
    if (results.contains("seconds")) summary["seconds"] = results["seconds"];
    write_file_atomically(path("summary.json"), summary.dump(2) + "\n");
    log_->write({{"type", "final"}, {"summary", summary}});

    std::string table = cat("\nResults on the ", data_.kind, " test set (", data_.test->size(), " images):\n");
    char row[160];
    std::snprintf(row, sizeof row, "  %-46s %8s %9s %9s\n", "model", "loss", "top-1", "top-5");
    table += row;
    auto add_row = [&](const std::string& name, const Json& r) {
        std::snprintf(row, sizeof row, "  %-46s %8.4f %9s %9s\n", name.c_str(), r["loss"].get<double>(),
                      percent(r, "top1").c_str(), percent(r, "top5").c_str());
        table += row;
    };
    if (summary.contains("float")) add_row("float", summary["float"]);
    if (cfg_.qat()) {
        const std::string q = cat(cfg_.quantizer, ", ", cfg_.bits, " bits", cfg_.per_channel ? " per channel" : "");
        add_row(cat("fake-quant (", q, ")"), summary["fake_quant"]);
        add_row("integer export (export.safetensors)", summary["integer_export"]);
        table += cat("\nExport audit: ", audit.passed() ? "passed" : "FAILED", " (weights ",
                     audit.weight_mismatches() == 0 ? "bit-exact" : cat(audit.weight_mismatches(), " mismatches"),
                     ", largest layer-output difference ", audit.max_rel_diff(), " relative, logits ",
                     audit.logits_rel_diff, ")\n");
        table += "\nQuantized layers (scale = 2^exponent; flips and changes since the last report):\n";
        table += quant::diagnostics_table(layers);
    }
    if (summary.contains("seconds")) {
        std::string times;
        double total = 0;
        for (const auto& [stage, s] : summary["seconds"].items()) {
            times += cat(times.empty() ? "" : ", ", stage, " ", format_duration(s.get<double>()));
            total += s.get<double>();
        }
        table += cat("\nTraining time: ", times, " (total ", format_duration(total), ", evaluation included)\n");
    }
    table += cat("Run folder: ", out_.string(), "\n");
    say(table);
    return summary;
}

RunResult Trainer::run() {
    cfg_.validate();
    prepare();  // everything that can fail on bad input happens before the output folder is touched
    prepare_output();
    SignalGuard signals;

    RunResult result;
    for (const Stage& stage : stages_) {
        if (state_.stage == "done" || stopping()) break;
        if (stage.name == "float" && state_.stage == "qat") continue;  // done before the resume
        if (stage.name == "qat") enter_qat();
        run_stage(stage);
    }
    if (stopping() && state_.stage != "done") {
        result.status = g_signal.load() ? RunStatus::interrupted : RunStatus::stopped;
        result.signal = g_signal.load();
        log_->write({{"type", "stop"}, {"step", state_.global_step}, {"signal", result.signal}});
        say(cat(result.signal ? cat("Interrupted by signal ", result.signal) : std::string("Stopped"), " at step ",
                state_.global_step, "; checkpoint saved. Continue with --resume ", out_.string()));
    } else {
        result.summary = finish();
    }
    result.out_dir = out_.string();
    result.global_step = state_.global_step;
    return result;
}

}  // namespace

RunResult run_training(const TrainConfig& config, const RunHooks& hooks) { return Trainer(config, hooks).run(); }

}  // namespace hfq
