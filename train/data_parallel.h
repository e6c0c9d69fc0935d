// Data-parallel training: N ranks of an MPI job (train/mpi_job.h) train one
// model, each on its part of every global batch (docs/distributed.md).
//
// What each step shares, and why the ranks stay identical:
//
//   after the forward   the loss and the top-1 hits (the mean loss decides,
//                       on every rank alike, whether the step is applied)
//   after the backward  one MPI_Allreduce of one float buffer, divided by N:
//                         every parameter's gradient (weights, biases, batch
//                         norm, learnable quantizer scales);
//                         the gradients msqe-po2 / learnable-po2 update their
//                         second moments M from (Quantizer::defer_second_moments:
//                         M is updated after the sum, from the average);
//                         without --sync-bn, batch norm's running statistics
//                         (the average of the ranks' updates)
//   inside the model    with --sync-bn, batch norm's sums (engine/replicas.h):
//                       N ranks x B/N samples compute the statistics of B;
//                       the activation quantizers' scale choices and where
//                       a rank's rows sit in the batch (dropout draws the
//                       whole batch's mask), always
//
// Each rank's gradient is that of its own mean loss over B/N samples; their
// average is the gradient of the global mean loss over B. Everything the
// optimizers and quantizers then compute is the same on every rank, so the
// weights, optimizer state, exponents and running statistics stay bit-identical
// without being sent; check_same_state() verifies it every --check-every steps.
//
// Without mpirun (one rank) nothing here does anything.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "layers/model.h"
#include "train/evaluate.h"
#include "train/train_step.h"

namespace hfq {

class DataParallel : public StepSync {
public:
    // Installs the sums over replicas (engine/replicas.h) when there is more
    // than one rank; the destructor removes them.
    explicit DataParallel(bool sync_bn);
    ~DataParallel() override;
    DataParallel(const DataParallel&) = delete;
    DataParallel& operator=(const DataParallel&) = delete;

    bool active() const { return ranks_ > 1; }
    int ranks() const { return ranks_; }

    // Call once the model is what will be trained (after quantize_model):
    // its quantizers defer their second-moment updates to combine_gradients.
    void attach(Model& model);

    // The step about to run (the run's count), for the collectives' names in errors.
    void set_step(int64_t step) { step_ = step; }

    // StepSync: the mean loss and the hits over all ranks; then the gradients.
    void combine_forward(StepStats& stats) override;
    void combine_gradients() override;

    // Whether any rank says `flag` (all ranks get the same answer).
    bool any(bool flag, const std::string& what);
    // The sum and the largest of every rank's value.
    int64_t sum(int64_t value, const std::string& what);
    int64_t max(int64_t value, const std::string& what);

    // Throws hfq::Error naming the first tensor in which a rank's copy differs
    // from rank 0's (a hash of every parameter and buffer, all-gathered).
    void check_same_state(int64_t step);

    // The sums of an evaluation sharded over the ranks (EvalOptions::sum).
    static void sum_eval(double* values, int64_t count);

    // What the collectives of the training steps cost since the last
    // reset_traffic() (hfq_bench --ranks prints it). The seconds are those
    // this rank spent inside the all-reduce: the transfer, and the wait for
    // a slower rank to arrive.
    struct Exchange {
        int64_t calls = 0;
        int64_t bytes = 0;  // this rank's contribution (what it sends once)
        double seconds = 0;
    };
    struct Traffic {
        Exchange step_results;      // combine_forward: loss and hits
        Exchange gradients;         // combine_gradients: the one buffer
        Exchange batch_statistics;  // the sums inside the model (--sync-bn, activation quantizers)
    };
    const Traffic& traffic() const { return traffic_; }
    void reset_traffic() { traffic_ = {}; }

private:
    int ranks_ = 1;
    bool sync_bn_ = false;
    Model* model_ = nullptr;
    int64_t step_ = 0;           // the step in progress
    std::vector<float> buffer_;  // the one all-reduced buffer, reused
    Traffic traffic_;
};

}  // namespace hfq
