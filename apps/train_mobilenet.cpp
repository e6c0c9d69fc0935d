// train_mobilenet: trains a MobileNet in float, then fine-tunes it with
// hardware-friendly weight quantization, and reports float, fake-quant and
// integer accuracy. Everything is in the trainer library (train/); this is
// its command line.
//
//   train_mobilenet                                   # Fashion-MNIST: float, then 4-bit msqe-po2 QAT
//   train_mobilenet --help                            # every option, with its default
//   train_mobilenet --config run.json --lr 0.1        # options from a file, the command line wins
//   train_mobilenet --resume runs/mobilenet_v1-fashion-mnist-20240101-120000
//
// Exit status: 0 when the run finished or stopped (--stop-after-steps) with
// a checkpoint, 128 + the signal after SIGINT / SIGTERM (checkpoint saved),
// 1 for a failure (bad data or checkpoint, divergence, a CPU without the
// features the build uses: startup/cpu_check.h), 2 for bad options.
#include <cstdio>

#include "train/config.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
    const hfq::ParsedArgs args = hfq::parse_args(argc, argv);
    if (!args.run) {
        std::fprintf(args.exit_code == 0 ? stdout : stderr, "%s\n", args.message.c_str());
        return args.exit_code;
    }
    try {
        const hfq::RunResult r = hfq::run_training(args.config);
        return r.status == hfq::RunStatus::interrupted ? 128 + r.signal : 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "\ntrain_mobilenet: %s\n", e.what());
        return 1;
    }
}
