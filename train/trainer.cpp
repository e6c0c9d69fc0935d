// The training loop of a run (train/trainer.h). The parts it is made of:
//
//   run_setup.h          data, model, resume checks, the run folder
//   stages.h             the stages and each one's schedule and optimizer options
//   train_step.h         one step: forward, loss, backward, the optimizer updates
//   run_records.h        metrics.jsonl records and terminal lines
//   training_checkpoint.h  the checkpoint, written atomically
//   run_report.h         summary.json and the results table
//   stop_signal.h        SIGINT / SIGTERM
//   data_parallel.h      under mpirun: what the ranks share (rank 0 alone writes files)
//
// This file is the order in which they are called.
#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>

#include <unistd.h>

#include "data/loader.h"
#include "deploy/onnx_export.h"
#include "engine/atomic_file.h"
#include "engine/check.h"
#include "layers/checkpoint.h"
#include "quant/audit.h"
#include "quant/diagnostics_table.h"
#include "quant/export.h"
#include "quant/quantize_model.h"
#include "train/data_parallel.h"
#include "train/evaluate.h"
#include "train/integer_engine_check.h"
#include "train/mpi_job.h"
#include "train/run_records.h"
#include "train/run_report.h"
#include "train/run_setup.h"
#include "train/stages.h"
#include "train/stop_signal.h"
#include "train/train_step.h"
#include "train/training_checkpoint.h"

namespace hfq {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool all_parameters_finite(Model& model) {
    for (const NamedParameter& p : model.named_parameters()) {
        const float* v = p.var.value().f32();
        for (int64_t i = 0, n = p.var.value().numel(); i < n; ++i)
            if (!std::isfinite(v[i])) return false;
    }
    return true;
}

class Trainer {
public:
    Trainer(const TrainConfig& config, const RunHooks& hooks)
        : cfg_(config),
          hooks_(hooks),
          progress_(parse_progress_mode(mpi::is_root() ? config.progress : "none")),
          dp_(config.sync_bn) {}

    RunResult run();

private:
    void start_log();
    void enter_qat();
    void report_dead_channels(const std::vector<quant::DeadChannels>& dead);
    void run_stage(const StagePlan& stage);
    void train_epochs(const StagePlan& stage, TrainStep& step, const NamedOptimizers& optimizers);
    void show_progress(const StagePlan& stage, const TrainStep& step, const Tally& window, int64_t epoch);
    void end_epoch(const StagePlan& stage, int64_t epoch, const Tally& epoch_tally);
    Json evaluate_export(Json* engine = nullptr);
    void save(const NamedOptimizers& optimizers);
    [[noreturn]] void diverged(int64_t step, const std::string& what);
    Json finish();

    EvalOptions eval_options() const;
    void say(const std::string& text) { progress_.message(text); }  // rank 0's terminal only
    void record(const Json& r) {
        if (log_) log_->write(r);  // rank 0 only
    }
    // Whether the run stops here: this rank was asked to (signal,
    // --stop-after-steps) or, under mpirun, any rank was. Every rank calls
    // it at the same points and gets the same answer.
    bool stopping();
    void share_run_folder();
    void record_time();
    std::string path(const char* file) const { return (run_.out / file).string(); }
    Model& model() { return *run_.model; }
    // The quantization of this run: --freeze-bn-at resolved over QAT's steps.
    quant::QuantPolicy quant_policy() const {
        return cfg_.quant_policy(int64_t(cfg_.qat_epochs) * run_.batches_per_epoch());
    }
    TrainState& state() { return run_.state; }

    TrainConfig cfg_;
    RunHooks hooks_;
    Progress progress_;
    RunSetup run_;
    std::unique_ptr<MetricsLog> log_;
    DataParallel dp_;
    bool stop_agreed_ = false;

    RunStatus stop_ = RunStatus::finished;  // finished: not stopping
    int64_t steps_this_run_ = 0;
    int64_t last_saved_step_ = -1;
    double stage_seconds_before_ = 0;  // the stage's time in earlier invocations (resume)
    Clock::time_point stage_clock_ = Clock::now();
    Clock::time_point stage_step_clock_ = Clock::now();  // for the ETA
    int64_t stage_steps_this_run_ = 0;
    int64_t later_steps_ = 0;  // steps of the stages after the current one, for the ETA
};

EvalOptions Trainer::eval_options() const {
    EvalOptions o;
    o.batch_size = cfg_.batch_size;
    o.loader_threads = cfg_.loader_threads;
    o.max_bad_fraction = cfg_.max_bad_fraction;
    if (dp_.active()) {
        o.part = mpi::rank();
        o.parts = dp_.ranks();
        o.sum = DataParallel::sum_eval;
    }
    return o;
}

bool Trainer::stopping() {
    const bool here = stop_ != RunStatus::finished || stop_signal() != 0;
    if (!stop_agreed_) stop_agreed_ = dp_.any(here, cat("the stop flag after step ", state().global_step));
    return stop_agreed_;
}

// Under mpirun the ranks may start in different seconds: rank 0's folder
// name (runs/<arch>-<data>-<time>) is everyone's.
// The barrier first: every rank has checked that --out holds no run before
// rank 0 writes there.
void Trainer::share_run_folder() {
    mpi::barrier("setting up the run");
    std::string out = run_.out.string();
    mpi::broadcast(out, "the run folder's name");
    run_.out = out;
    cfg_.out = out;
}

void Trainer::start_log() {
    if (mpi::is_root()) {
        create_run_folder(run_, cfg_);
        log_ = std::make_unique<MetricsLog>(path("metrics.jsonl"));
    }
    const Report r =
        start_report(cfg_, run_.data, model(), run_.resume.has_value(), state().global_step, run_.out.string());
    record(r.record);
    say(r.line);
    if (dp_.active())
        say(cat("Data parallel: ", dp_.ranks(), " ranks x ", cfg_.threads,
                cfg_.threads == 1 ? " thread, " : " threads, ", cfg_.batch_size / dp_.ranks(), " of the ",
                cfg_.batch_size, " images of each batch per rank",
                cfg_.sync_bn ? ", batch statistics over all ranks (--sync-bn)" : ", batch statistics per rank"));
}

void Trainer::record_time() {
    if (state().stage == Stage::done) return;
    state().results["seconds"][stage_name(state().stage)] = stage_seconds_before_ + seconds_since(stage_clock_);
}

void Trainer::save(const NamedOptimizers& optimizers) {
    if (!all_parameters_finite(model())) diverged(state().global_step, "a parameter is not finite");
    record_time();
    if (mpi::is_root())
        save_training_checkpoint(path("checkpoint.safetensors"), model(), optimizers, state(), cfg_,
                                 quant_policy(), run_.data.preprocessing);
    last_saved_step_ = state().global_step;
}

void Trainer::diverged(int64_t step, const std::string& what) {
    const char* stage = stage_name(state().stage);
    record({{"type", "diverged"}, {"stage", stage}, {"step", step}, {"reason", what}});
    throw Error(cat("training diverged at step ", step, " (", stage, " stage): ", what, ". Nothing was saved after ",
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
    record({{"type", "dead_channels"}, {"layers", layers}});
    if (!dead.empty()) say(cat("Dead channels (batch-norm variance ~0, weights zeroed before quantizing): ", text));
}

// The float model becomes the quantized one (unless a resumed run already is).
void Trainer::enter_qat() {
    if (quant::is_quantized(model())) return;
    if (!state().results.contains("float")) {
        // QAT straight from --init-from: measure the float model first, for the table.
        state().results["float"] = eval_json(evaluate(model(), run_.data.test, eval_options()));
    }
    if (mpi::is_root()) save_checkpoint(path("float.safetensors"), model(), run_.data.preprocessing);
    quant::quantize_model(model(), quant_policy());
    if (cfg_.zero_dead_channels) report_dead_channels(quant::zero_dead_channels(model()));
    say(cat("Quantization-aware training: ", cfg_.quantizer, ", ", cfg_.bits, " bits",
            cfg_.per_channel ? " per channel" : " per tensor", "; ", quant::quantized_layers(model()).size(),
            " layers wrapped (first ", cfg_.first_layer_bits ? cfg_.first_layer_bits : cfg_.bits, " bits, last ",
            cfg_.last_layer_bits ? cfg_.last_layer_bits : cfg_.bits, " bits)"));
}

// Exports the quantized model (export.safetensors: integer codes, exponents,
// folded biases; and export.onnx) and evaluates the network rebuilt from that file alone;
// with `engine`, for a W4A8 model, also the integer engine beside the
// fake-quant model (train/integer_engine_check.h).
// Under mpirun the other ranks write the same export to a file of their own
// (no shared file system needed) and evaluate their part of the test set.
Json Trainer::evaluate_export(Json* engine) {
    const auto t0 = Clock::now();
    const std::string file =
        mpi::is_root()
            ? path("export.safetensors")
            : (fs::temp_directory_path() / cat("hfq-export-rank", mpi::rank(), "-", getpid(), ".safetensors")).string();
    quant::export_quantized_model(file, model(), quant_policy(), run_.data.preprocessing);
    // export.onnx beside it, the same model for ONNX runtimes (deploy/onnx_export.h).
    if (mpi::is_root()) deploy::write_onnx(file, path("export.onnx"));
    const std::shared_ptr<Model> integer = quant::build_model_from_export(file);
    Json r = eval_json(evaluate(*integer, run_.data.test, eval_options()));
    r["seconds"] = seconds_since(t0);
    if (engine && quant_policy().activation_bits > 0) {
        const auto t1 = Clock::now();
        const IntegerEngineCheck c = check_integer_engine(file, model(), run_.data.test, eval_options());
        *engine = eval_json(c.engine);
        (*engine)["identical_logits"] = c.identical_logits;
        (*engine)["seconds"] = seconds_since(t1);
    }
    if (!mpi::is_root()) fs::remove(file);
    return r;
}

// Evaluates (every --eval-every epochs and at the stage's last), writes the
// epoch record; a stage's last evaluation goes into the results.
void Trainer::end_epoch(const StagePlan& stage, int64_t epoch, const Tally& epoch_tally) {
    const bool last = epoch == stage.epochs;
    Json test, test_integer;
    if (epoch % cfg_.eval_every == 0 || last) {
        test = eval_json(evaluate(model(), run_.data.test, eval_options()));
        Json engine;
        if (stage.stage == Stage::qat) test_integer = evaluate_export(last ? &engine : nullptr);
        if (last) {
            state().results[stage_name(stage.stage)] = test;
            if (stage.stage == Stage::qat) state().results["integer"] = test_integer;
            if (!engine.is_null()) state().results["integer_engine"] = engine;
        }
    }
    const Report r = epoch_report(stage, epoch, state().global_step, epoch_tally, test, test_integer, model());
    record(r.record);
    say(r.line);
    if (hooks_.after_epoch && mpi::is_root()) hooks_.after_epoch(run_.out.string());
}

void Trainer::show_progress(const StagePlan& stage, const TrainStep& step, const Tally& window, int64_t epoch) {
    const int64_t total = stage.epochs * run_.batches_per_epoch();
    Progress::State ps;
    ps.stage = stage_name(stage.stage);
    ps.epoch = epoch;
    ps.epochs = stage.epochs;
    ps.step = state().stage_step;
    ps.steps = total;
    ps.loss = window.mean_loss();
    ps.lr = step.lr();
    ps.images_per_second = window.images_per_second();
    ps.eta_seconds =
        seconds_since(stage_step_clock_) / stage_steps_this_run_ * double(total - state().stage_step + later_steps_);
    progress_.update(ps);
}

// A stage: its schedule and optimizers (restored on resume), its epochs, and
// a checkpoint if it stopped inside.
void Trainer::run_stage(const StagePlan& stage) {
    const int64_t bpe = run_.batches_per_epoch();
    const int64_t total = stage.epochs * bpe;
    if (state().stage != stage.stage) {
        state().stage = stage.stage;
        state().stage_step = 0;
    }
    const Json& seconds = state().results.contains("seconds") ? state().results["seconds"] : Json::object();
    const char* name = stage_name(stage.stage);
    stage_seconds_before_ = seconds.contains(name) ? seconds[name].get<double>() : 0.0;
    stage_clock_ = Clock::now();

    dp_.attach(model());
    TrainStepOptions options = stage_step_options(cfg_, stage);
    if (dp_.active()) options.sync = &dp_;
    TrainStep step(model(), options);
    const NamedOptimizers optimizers = step.optimizers();
    if (run_.resume) {
        if (run_.resume->state.stage == stage.stage) restore_optimizers(*run_.resume, optimizers);
        run_.resume.reset();
    }
    later_steps_ = 0;
    for (const StagePlan& s : run_.stages)
        if (s.first_epoch > stage.first_epoch) later_steps_ += s.epochs * bpe;
    stage_step_clock_ = Clock::now();
    stage_steps_this_run_ = 0;

    if (state().stage_step < total) train_epochs(stage, step, optimizers);
    // Stopped inside the stage: keep everything, optimizer state included.
    if (state().stage_step < total && last_saved_step_ != state().global_step) save(optimizers);
    record_time();
}

// The steps of a stage from where it is until it ends or the run stops, with
// the step records, the progress display, epoch ends and checkpoints.
void Trainer::train_epochs(const StagePlan& stage, TrainStep& step, const NamedOptimizers& optimizers) {
    const int64_t bpe = run_.batches_per_epoch();
    const int64_t total = stage.epochs * bpe;
    const LrSchedule schedule = stage_schedule(cfg_, stage, bpe);
    TrainState& st = state();

    LoaderOptions lo;
    lo.batch_size = cfg_.batch_size;
    lo.drop_last = true;  // every step sees a full batch
    lo.seed = run_.loader_seed;
    lo.threads = cfg_.loader_threads;
    lo.max_bad_fraction = cfg_.max_bad_fraction;
    lo.part = mpi::rank();  // this rank's part of every batch
    lo.parts = dp_.ranks();
    st.next_batch = {stage.first_epoch + st.stage_step / bpe, st.stage_step % bpe};
    Loader loader(run_.data.train, lo, st.next_batch, stage.first_epoch + stage.epochs);
    model().train();
    Tally window, epoch_tally;
    while (st.stage_step < total && !stopping()) {
        const auto wait0 = Clock::now();
        std::optional<Batch> batch = loader.next();
        HFQ_CHECK(batch.has_value(), "trainer: the loader ended before the stage did");
        const double waited = seconds_since(wait0);
        window.wait += waited;
        epoch_tally.wait += waited;
        epoch_tally.skipped += static_cast<int64_t>(batch->skipped.size());  // this rank's (summed at the epoch's end)

        if (stage.stage == Stage::qat) {
            if (st.stage_step == cfg_.stable_start_step) quant::set_stable_updating(model(), true);
            if (st.stage_step == cfg_.stable_switch_step) quant::set_stable_switched(model(), true);
        }
        step.set_lr_factor(schedule.factor(st.stage_step));
        const bool log_now = (st.stage_step + 1) % cfg_.log_every == 0;
        dp_.set_step(st.global_step + 1);
        const StepStats s = step.run(batch->images, batch->labels, log_now);
        if (!s.applied)
            diverged(st.global_step + 1,
                     std::isfinite(s.loss) ? cat("the gradient norm is ", s.grad_norm) : cat("the loss is ", s.loss));
        ++st.stage_step;
        ++st.global_step;
        ++steps_this_run_;
        ++stage_steps_this_run_;
        window.add(s, cfg_.batch_size);  // the global batch: s counts the hits of all ranks
        epoch_tally.add(s, cfg_.batch_size);
        st.next_batch = {stage.first_epoch + st.stage_step / bpe, st.stage_step % bpe};
        const int64_t epoch = (st.stage_step - 1) / bpe + 1;  // 1-based, of the stage

        if (log_now) record(step_record(stage, st, step, s, window, epoch, model()));
        if (progress_.due(log_now)) show_progress(stage, step, window, epoch);
        if (log_now) window = Tally();

        const auto pause0 = Clock::now();
        const bool epoch_end = st.stage_step % bpe == 0;
        if (epoch_end || (cfg_.check_every > 0 && st.global_step % cfg_.check_every == 0))
            dp_.check_same_state(st.global_step);
        if (epoch_end) {
            epoch_tally.skipped = dp_.sum(epoch_tally.skipped, cat("the unreadable-image count of epoch ", epoch));
            end_epoch(stage, epoch, epoch_tally);
            save(optimizers);
            epoch_tally = Tally();
        } else if (cfg_.checkpoint_every > 0 && st.global_step % cfg_.checkpoint_every == 0) {
            save(optimizers);
        }
        window.paused += seconds_since(pause0);
        if (hooks_.after_step) hooks_.after_step(st.global_step);
        if (cfg_.stop_after_steps > 0 && steps_this_run_ >= cfg_.stop_after_steps) stop_ = RunStatus::stopped;
    }
}

// After the last stage: the results no stage measured, the final model, the
// export's audit, summary.json and the table.
Json Trainer::finish() {
    Json& results = state().results;
    if (cfg_.epochs == 0 && !cfg_.qat() && !results.contains("float"))
        results["float"] = eval_json(evaluate(model(), run_.data.test, eval_options()));  // --init-from evaluated alone
    if (cfg_.qat() && !results.contains("qat")) {
        // --qat-epochs 0: post-training quantization, evaluated as it stands.
        results["qat"] = eval_json(evaluate(model(), run_.data.test, eval_options()));
        Json engine;
        results["integer"] = evaluate_export(&engine);
        if (!engine.is_null()) results["integer_engine"] = engine;
    }
    state().stage = Stage::done;

    std::map<std::string, std::string> metadata;
    if (quant::is_quantized(model())) metadata[quant::kQuantPolicyKey] = quant_policy().to_json();
    if (mpi::is_root()) save_checkpoint(path("final.safetensors"), model(), run_.data.preprocessing, metadata);
    save(NamedOptimizers{});

    std::vector<quant::LayerDiagnostics> layers;
    quant::AuditReport audit;
    if (cfg_.qat() && mpi::is_root()) {
        // The export on disk is the final model's (written by its last
        // evaluation); the audit proves it computes what was trained.
        LoaderOptions lo;
        lo.batch_size = std::min<int64_t>(16, run_.data.test->size());
        lo.shuffle = false;
        lo.max_bad_fraction = cfg_.max_bad_fraction;
        const Tensor sample = Loader(run_.data.test, lo).next()->images;
        audit = quant::audit_export(model(), path("export.safetensors"), sample);
        layers = quant::collect_diagnostics(model());
    }
    const Json summary = run_summary(cfg_, quant_policy(), run_.data, state().global_step, results, audit, layers);
    if (mpi::is_root()) write_file_atomically(path("summary.json"), summary.dump(2) + "\n");
    record({{"type", "final"}, {"summary", summary}});
    say(results_table(cfg_, summary, layers, run_.out.string()));
    return summary;
}

RunResult Trainer::run() {
    cfg_.validate();
    mpi::set_timeout(cfg_.rank_timeout);
    run_ = set_up_run(cfg_);  // everything that can fail on bad input happens before the output folder is touched
    share_run_folder();
    last_saved_step_ = run_.resume ? state().global_step : -1;
    if (!run_.init_from_note.empty()) say(run_.init_from_note);
    start_log();
    if (run_.resume && state().ranks != dp_.ranks())
        say(cat("The checkpoint was trained on ", state().ranks, state().ranks == 1 ? " rank" : " ranks",
                ", this run has ", dp_.ranks(), ": training continues, but not bit for bit as it would on ",
                state().ranks, " (other summation orders", cfg_.sync_bn ? "" : ", other batch statistics", ")."));
    state().ranks = dp_.ranks();
    StopSignalGuard signals;

    RunResult result;
    for (const StagePlan& stage : run_.stages) {
        if (state().stage == Stage::done || stopping()) break;
        if (stage.stage == Stage::float_training && state().stage == Stage::qat) continue;  // done before the resume
        if (stage.stage == Stage::qat) enter_qat();
        run_stage(stage);
    }
    if (stopping() && state().stage != Stage::done) {
        result.signal = static_cast<int>(dp_.max(stop_signal(), "the stop signal"));  // any rank's
        result.status = result.signal ? RunStatus::interrupted : RunStatus::stopped;
        record({{"type", "stop"}, {"step", state().global_step}, {"signal", result.signal}});
        say(cat(result.signal ? cat("Interrupted by signal ", result.signal) : std::string("Stopped"), " at step ",
                state().global_step, "; checkpoint saved. Continue with --resume ", run_.out.string()));
    } else {
        result.summary = finish();
    }
    result.out_dir = run_.out.string();
    result.global_step = state().global_step;
    return result;
}

}  // namespace

RunResult run_training(const TrainConfig& config, const RunHooks& hooks) { return Trainer(config, hooks).run(); }

}  // namespace hfq
