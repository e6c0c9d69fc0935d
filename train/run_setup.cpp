#include "train/run_setup.h"

#include <ctime>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/random.h"
#include "layers/checkpoint.h"
#include "quant/quantize_model.h"

namespace hfq {
namespace fs = std::filesystem;
namespace {

std::string timestamp() {
    const std::time_t t = std::time(nullptr);
    std::tm tm{};
    localtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
    return buf;
}

// The model the options describe; "auto" settings resolved in `c`.
ModelConfig model_config(TrainConfig& c, const TrainData& data) {
    ModelConfig mc;
    mc.arch = parse_arch(c.arch);
    mc.width = c.width;
    mc.classes = data.train->num_classes();
    mc.input_channels = data.channels;
    mc.small_input = c.small_input == "auto" ? data.input_size <= 64 : c.small_input == "true";
    // The resolved config says what "automatic" turned into.
    c.input_size = data.input_size;
    c.input_channels = data.channels;
    c.small_input = mc.small_input ? "true" : "false";
    mc.activation = parse_activation(c.activation);
    if (c.dropout >= 0) mc.dropout = c.dropout;
    mc.validate();
    return mc;
}

// --resume: the checkpoint must continue this run (same training options,
// data where its step count says); the model takes its weights and state.
void resume_from_checkpoint(const TrainConfig& c, RunSetup& s) {
    s.out = c.resume;
    const std::string file = (s.out / "checkpoint.safetensors").string();
    HFQ_CHECK(fs::exists(file), "--resume ", c.resume, ": no checkpoint there (", file, ")");
    s.resume = read_training_checkpoint(file);
    const std::vector<std::string> changed = TrainConfig::training_differences(c, s.resume->config);
    HFQ_CHECK(changed.empty(), "--resume: option --", changed.empty() ? "" : changed[0],
              " differs from the checkpoint's run (", file, ")");
    if (s.resume->policy) quant::quantize_model(*s.model, *s.resume->policy);
    restore_model(*s.resume, *s.model);
    s.state = s.resume->state;
    // The checkpoint's data position must be where its step count says: a
    // different dataset (size) would break the exact continuation.
    const int64_t bpe = s.batches_per_epoch();
    for (const StagePlan& stage : s.stages)
        if (stage.stage == s.state.stage) {
            const LoaderPosition p{stage.first_epoch + s.state.stage_step / bpe, s.state.stage_step % bpe};
            HFQ_CHECK(p.epoch == s.state.next_batch.epoch && p.batch == s.state.next_batch.batch, file,
                      ": the checkpoint's next batch is batch ", s.state.next_batch.batch, " of epoch ",
                      s.state.next_batch.epoch, ", but with the current data (", s.data.train->size(),
                      " samples) its step count points at batch ", p.batch, " of epoch ", p.epoch,
                      "; did the dataset change?");
        }
}

// A new run: weights from --init-from if given, and a folder that holds no run yet.
void start_new_run(TrainConfig& c, RunSetup& s) {
    if (!c.init_from.empty()) {
        const SafetensorsFile file = model_tensors(read_safetensors(c.init_from));
        const LoadReport r = load_state_dict(*s.model, file, {.partial = c.init_partial});
        HFQ_CHECK(!r.loaded.empty(), "--init-from ", c.init_from, ": no tensor of the file fits the model");
        if (!r.missing.empty() || !r.unexpected.empty() || !r.mismatched.empty())
            s.init_from_note =
                cat("--init-from ", c.init_from, ": loaded ", r.loaded.size(), " tensors, skipped:\n", r.to_string());
    }
    s.out = c.out.empty()
                ? fs::path("runs") / cat(arch_name(s.model->config().arch), "-", s.data.kind, "-", timestamp())
                : fs::path(c.out);
    c.out = s.out.string();
    for (const char* f : {"config.json", "checkpoint.safetensors"})
        HFQ_CHECK(!fs::exists(s.out / f), "--out ", s.out.string(), " already holds a run (", f,
                  "); continue it with --resume ", s.out.string(), " or choose another --out");
}

}  // namespace

RunSetup set_up_run(TrainConfig& c) {
    set_compute_threads(c.threads);
    RunSetup s;
    s.data = open_datasets(c);
    HFQ_CHECK(s.data.train->size() >= c.batch_size, "--batch-size ", c.batch_size, " is larger than the ",
              s.data.train->size(), " training samples");
    s.batch_size = c.batch_size;
    s.loader_seed = mix64(c.seed ^ 0x6c6f61646572ULL);
    s.model = build_model(model_config(c, s.data), c.seed);
    s.stages = plan_stages(c);
    if (!c.resume.empty())
        resume_from_checkpoint(c, s);
    else
        start_new_run(c, s);
    return s;
}

void create_run_folder(const RunSetup& s, const TrainConfig& c) {
    std::error_code ec;
    fs::create_directories(s.out, ec);
    HFQ_CHECK(!ec && fs::is_directory(s.out), "--out ", s.out.string(), ": cannot create the folder (", ec.message(),
              ")");
    if (c.resume.empty()) write_file_atomically((s.out / "config.json").string(), c.to_json() + "\n");
}

}  // namespace hfq
