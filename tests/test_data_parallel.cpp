// Data-parallel training (train/data_parallel.h) against one process: 2 MPI
// ranks x 1 thread, each on half of every batch with --sync-bn, train what
// one process trains on the whole batch. tests/data_parallel_worker.cpp does
// the training (2 float steps, then 2 steps of 4-bit per-channel msqe-po2 QAT
// with folded batch norm) and writes the whole state; this file runs it under
// mpirun and alone and compares.
//
// The bound. The two computations differ only in the order of the sums over
// the batch: the weight gradients of the convolutions (float sums over the
// images' rows), the batch statistics (double sums, then one rounding), and
// the average of the two ranks' gradients. Permuting the images inside each
// batch of the single process changes exactly those orders and nothing else,
// so it measures, on this very case, how far a reordering moves every tensor.
// A rank's tensor must lie within 8x the largest such move over three
// permutations (the factor covers the spread of maxima between orders, as the
// PyTorch comparisons of docs/correctness.md use it), plus 2^-20 of the
// tensor's largest magnitude for tensors that permuting happens to leave
// (nearly) unchanged while the split's other grouping of the double sums moves
// their last bits. Integer state (exponents, step counts) must be equal where
// no permutation changed it. Without sync batch norm each rank normalises by
// its own half's statistics: a different computation, which must miss the
// bound by far (the check can fail).
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "engine/safetensors.h"
#include "tests/test_train_util.h"

namespace fs = std::filesystem;
using namespace hfq;

namespace {

fs::path build_dir() { return fs::read_symlink("/proc/self/exe").parent_path(); }

std::string mpirun() {
    return std::string("mpirun -np 2 --oversubscribe ") + (geteuid() == 0 ? "--allow-run-as-root " : "") +
           "-x OMP_NUM_THREADS=1 ";
}

void run(const std::string& command) {
    INFO(command);
    REQUIRE(std::system(command.c_str()) == 0);
}

SafetensorsFile state(const fs::path& file) { return read_safetensors(file.string()); }

double max_abs_difference(const Tensor& a, const Tensor& b) {
    double m = 0;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(double(a.f32()[i]) - double(b.f32()[i])));
    return m;
}

double max_abs(const Tensor& a) {
    double m = 0;
    for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(double(a.f32()[i])));
    return m;
}

// The largest ratio of a float tensor's distance from `single` to its bound,
// over every tensor; integer tensors must be equal to single's where the
// permutations left them equal (counted in `integer_mismatches`).
double worst_ratio(const SafetensorsFile& single, const std::vector<SafetensorsFile>& permuted,
                   const SafetensorsFile& candidate, int& integer_mismatches, std::string& worst_name) {
    double worst = 0;
    integer_mismatches = 0;
    for (const auto& [name, s] : single.tensors) {
        const Tensor& c = candidate.get(name);
        REQUIRE(c.shape() == s.shape());
        if (s.dtype() != DType::f32) {
            bool stable = true;
            for (const SafetensorsFile& p : permuted) stable = stable && test::same_bits(p.get(name), s);
            if (stable && !test::same_bits(c, s)) ++integer_mismatches;
            continue;
        }
        double noise = 0;
        for (const SafetensorsFile& p : permuted) noise = std::max(noise, max_abs_difference(p.get(name), s));
        const double bound = 8 * noise + std::ldexp(max_abs(s), -20);
        const double d = max_abs_difference(c, s);
        const double ratio = bound > 0 ? d / bound : (d > 0 ? INFINITY : 0);
        if (ratio > worst) worst = ratio, worst_name = name;
    }
    return worst;
}

}  // namespace

TEST_CASE("2 ranks x half a batch with sync batch norm train what one process trains on the whole batch") {
    const test::TempDir tmp;
    const fs::path& dir = tmp.path;
    const std::string worker = (build_dir() / "data_parallel_worker").string();
    run(worker + " " + (dir / "single").string());
    std::vector<SafetensorsFile> permuted;
    for (int seed : {11, 12, 13}) {
        const fs::path f = dir / cat("permuted", seed);
        run(worker + " " + f.string() + " --permute " + std::to_string(seed));
        permuted.push_back(state(f));
    }
    run(mpirun() + worker + " " + (dir / "sync").string());
    run(mpirun() + worker + " " + (dir / "nosync").string() + " --no-sync-bn");

    const SafetensorsFile single = state(dir / "single");
    const SafetensorsFile rank0 = state(dir / "sync.rank0"), rank1 = state(dir / "sync.rank1");

    // The ranks hold the same model, bit for bit: weights, optimizer-visible
    // state, exponents, second moments, running statistics.
    REQUIRE(rank0.tensors.size() == single.tensors.size());
    for (const auto& [name, t] : rank0.tensors) {
        INFO(name);
        CHECK(test::same_bits(t, rank1.get(name)));
    }
    int mismatches = 0;
    std::string worst;
    const double ratio = worst_ratio(single, permuted, rank0, mismatches, worst);
    MESSAGE("2 ranks vs 1 process: worst tensor ", worst, " at ", ratio, " of its bound");
    CHECK(ratio <= 1.0);
    CHECK(mismatches == 0);

    // Per-rank batch statistics are another computation: far outside the bound.
    const SafetensorsFile nosync0 = state(dir / "nosync.rank0"), nosync1 = state(dir / "nosync.rank1");
    for (const auto& [name, t] : nosync0.tensors) CHECK(test::same_bits(t, nosync1.get(name)));  // still one model
    std::string nosync_worst;
    const double nosync_ratio = worst_ratio(single, permuted, nosync0, mismatches, nosync_worst);
    MESSAGE("without --sync-bn: worst tensor ", nosync_worst, " at ", nosync_ratio, " of its bound");
    CHECK(nosync_ratio > 10);
}
