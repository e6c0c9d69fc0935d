// train_mobilenet: trains a MobileNet in float, then fine-tunes it with
// hardware-friendly weight quantization, and reports float, fake-quant and
// integer accuracy. Everything is in the trainer library (train/); this is
// its command line.
//
// The run folder also gets curves.png (study/run_curves.h: loss and top-1
// per epoch of both stages, the exponents of the layers that flip most
// during QAT), redrawn after every epoch and once more at the end. A picture
// that cannot be drawn is a warning, never a failed run.
//
//   train_mobilenet                                   # Fashion-MNIST: float, then 4-bit msqe-po2 QAT
//   train_mobilenet --help                            # every option, with its default
//   train_mobilenet --config run.json --lr 0.1        # options from a file, the command line wins
//   train_mobilenet --resume runs/mobilenet_v1-fashion-mnist-20240101-120000
//   mpirun -np 2 train_mobilenet --threads 1 --sync-bn   # data parallel (docs/distributed.md)
//
// Exit status: 0 when the run finished or stopped (--stop-after-steps) with
// a checkpoint, 128 + the signal after SIGINT / SIGTERM (checkpoint saved;
// under mpirun 0, so that mpirun does not take the stop for a failure),
// 1 for a failure (bad data or checkpoint, divergence, a CPU without the
// features the build uses: startup/cpu_check.h), 2 for bad options, 3 for
// a rank of an MPI job that died or hung (train/mpi_job.h).
#include <cstdio>
#include <exception>
#include <string>

#include "engine/check.h"
#include "study/run_curves.h"
#include "train/config.h"
#include "train/mpi_job.h"
#include "train/stop_signal.h"
#include "train/trainer.h"

namespace {

// Draws <out_dir>/curves.png; a failure is reported, not thrown: the
// training's results matter more than its picture.
void draw_curves(const std::string& out_dir) {
    try {
        hfq::study::write_run_curves(out_dir);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "\ntrain_mobilenet: warning: could not draw %s/curves.png: %s\n", out_dir.c_str(),
                     e.what());
    }
}

}  // namespace

int main(int argc, char** argv) {
    hfq::watch_stop_signals();  // before any thread starts (train/stop_signal.h says why)
    hfq::mpi::Session mpi(argc, argv);  // MPI_Init only under mpirun
    const hfq::ParsedArgs args = hfq::parse_args(argc, argv);
    if (!args.run) {  // the same on every rank: rank 0 says it
        if (hfq::mpi::is_root()) std::fprintf(args.exit_code == 0 ? stdout : stderr, "%s\n", args.message.c_str());
        return args.exit_code;
    }
    try {
        hfq::RunHooks hooks;
        hooks.after_epoch = draw_curves;  // called on rank 0 only
        const hfq::RunResult r = hfq::run_training(args.config, hooks);
        if (hfq::mpi::is_root()) draw_curves(r.out_dir);  // the last state: a stop within an epoch, the final line
        if (hfq::mpi::launched()) return 0;
        return r.status == hfq::RunStatus::interrupted ? 128 + r.signal : 0;
    } catch (const std::exception& e) {
        // Under mpirun a rank that fails alone must not leave the others
        // waiting for it: the whole job ends.
        if (hfq::mpi::size() > 1) hfq::mpi::abort(hfq::cat("rank ", hfq::mpi::rank(), ": ", e.what()), 1);
        std::fprintf(stderr, "\ntrain_mobilenet: %s\n", e.what());
        return 1;
    }
}
