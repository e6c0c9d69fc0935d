// Data-parallel replicas (engine/replicas.h) faked in one process: two
// std::threads, each running its half of a batch, whose hook sums their
// vectors through a barrier, against one process on the whole batch.
//   * sync batch norm (batch_norm, batch_norm_relu6, quant's
//     batch_stat_correction): outputs, running statistics and input gradients
//     are the whole batch's; the two replicas' dgamma and dbeta add up to it;
//   * without sync, batch norm keeps each replica's own statistics;
//   * the activation quantizer picks the whole batch's exponent on both
//     replicas (first-step initialisation and msqe-round), with or without
//     sync batch norm;
//   * dropout: the replicas' masks and gradients are the rows of one
//     process's on the whole batch (halves, uneven rows, 0 rows on one), and
//     every rng ends in the same state;
//   * in one process (no hook, or a hook of one replica) nothing changes: the
//     activation quantizer's std is grid.cpp's population_std bit for bit,
//     and a hook of one replica changes no bit of batch norm; dropout draws
//     one uniform per element in order, hook of one replica or none.
//
// Tolerances. A replica's statistics and gradient sums differ from the whole
// batch's only in how the double sums are grouped (each half, then the two
// halves, instead of fixed blocks of the whole). The data here are small
// multiples of a power of two (dyadic()): every product of two of them and
// every partial sum is exact in double, in any grouping. Then the replicas'
// sums are the whole batch's bit for bit, so is everything computed from
// them, and the test requires identical bytes (tolerance 0). A replica that
// used its own sums, its own row count, or averaged per-replica means or
// variances would change results by far more than a bit. Only dgamma and
// dbeta, which each replica rounds to float from its own half, are compared
// with a tolerance (check_sum_of_halves).
//
// Thread safety of what the two threads call: Tensors come from the memory
// pool (a mutex), autograd's grad mode is thread_local, every Variable and
// Tensor here belongs to one thread, and OpenMP regions opened from two
// std::threads get a team each (libgomp). batch norm, the correction and
// the activation quantizer use no oneDNN.
#include <doctest/doctest.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>
#include <vector>

#include "engine/check.h"
#include "engine/ops.h"
#include "engine/replicas.h"
#include "quant/activation_quantizer.h"
#include "quant/folded_conv_bn.h"
#include "quant/grid.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"

using namespace hfq;

namespace {

bool same_bytes(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// ---- Two replicas in one process ------------------------------------------

thread_local int t_replica = -1;  // the replica this thread plays

// The sum of two replicas: each posts its vector and waits for the other's,
// adds it, and waits again so that neither posts its next vector before the
// other has read this one. a + b == b + a in floating point: both get the
// same sum.
struct TwoReplicas {
    std::barrier<> barrier{2};
    std::vector<double> posted[2];
    int64_t calls[2] = {0, 0};

    void sum(double* values, int64_t count) {
        const int me = t_replica, other = 1 - me;
        posted[me].assign(values, values + count);
        barrier.arrive_and_wait();
        HFQ_CHECK(posted[other].size() == size_t(count), "replicas out of step: sums of ", count, " and ",
                  posted[other].size(), " values");
        for (int64_t i = 0; i < count; ++i) values[i] += posted[other][i];
        barrier.arrive_and_wait();
        ++calls[me];
    }
};

// A sum of `count` replicas installed for the scope (removed even when a
// check throws); the replica is the thread's t_replica.
struct Installed {
    Installed(
        replicas::SumFn sum, bool sync_batch_norm, int count = 2, replicas::IndexFn index = [] { return t_replica; }) {
        replicas::install(std::move(sum), sync_batch_norm, count, std::move(index));
    }
    ~Installed() { replicas::install({}, false, 1, {}); }
};
// One replica with sync batch norm: its sums have nothing to add.
struct OneReplica : Installed {
    OneReplica() : Installed([](double*, int64_t) {}, true, 1, [] { return 0; }) {}
};

// Runs body(0) and body(1) on two threads with the hook installed, removes
// it and returns how many sums each replica made (the same for both). A
// replica that throws leaves the barrier (the other then runs on alone
// instead of waiting forever) and its exception is rethrown here.
int64_t run_replicas(bool sync_batch_norm, const std::function<void(int)>& body) {
    TwoReplicas r;
    std::exception_ptr error[2];
    {
        const Installed hook([&r](double* v, int64_t n) { r.sum(v, n); }, sync_batch_norm);
        std::thread threads[2];
        for (int i = 0; i < 2; ++i)
            threads[i] = std::thread([&, i] {
                t_replica = i;
                try {
                    body(i);
                } catch (...) {
                    error[i] = std::current_exception();
                    r.barrier.arrive_and_drop();
                }
            });
        for (auto& t : threads) t.join();
    }
    for (auto& e : error)
        if (e) std::rethrow_exception(e);
    CHECK(r.calls[0] == r.calls[1]);
    return r.calls[0];
}

// ---- Data whose double sums are exact ------------------------------------

// step * k for integers |k| <= 1023 (k = rint((scale * normal + offset) / step),
// clamped): at most 10 bits. A product of two such values has at most 20 bits
// on the grid step_a * step_b, and a sum of a few thousand of them stays far
// below 2^53 of that grid: exact in double, whatever the order.
Tensor dyadic(const Shape& s, uint64_t seed, float scale, float step, float offset = 0) {
    Tensor t = testing::random_tensor(s, seed, scale);
    for (int64_t i = 0; i < t.numel(); ++i)
        t.f32()[i] = step * std::clamp(std::nearbyint((t.f32()[i] + offset) / step), -1023.0f, 1023.0f);
    return t;
}

// Batch norm's input {N,H,W,C}: channel c around 3c - 2 with spread 1 + c,
// and the second half of the batch 2 higher, so that a half's statistics are
// not the whole batch's. Multiples of 1/8 below 64 in magnitude (9 bits, as
// dyadic()'s: the sums stay exact).
Tensor bn_input(const Shape& s, uint64_t seed) {
    Tensor x = testing::random_tensor(s, seed);
    const int64_t channels = s[3], half = x.numel() / 2;
    for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t c = i % channels;
        const float v = x.f32()[i] * (1.0f + c) + (3.0f * c - 2.0f) + (i >= half ? 2.0f : 0.0f);
        x.f32()[i] = std::nearbyint(v * 8) / 8;
    }
    return x;
}

// Rows [begin, begin + count) of a batch (along N), replica r's half of it,
// and two replicas' rows back together.
Tensor rows_of(const Tensor& t, int64_t begin, int64_t count) {
    Shape s = t.shape();
    s[0] = count;
    Tensor out = Tensor::empty(s);
    if (out.nbytes() > 0) std::memcpy(out.f32(), t.f32() + begin * (t.numel() / t.shape()[0]), out.nbytes());
    return out;
}
Tensor half(const Tensor& t, int r) { return rows_of(t, r * t.shape()[0] / 2, t.shape()[0] / 2); }
Tensor join(const Tensor& a, const Tensor& b) {
    Shape s = a.shape();
    s[0] += b.shape()[0];
    Tensor out = Tensor::empty(s);
    if (a.nbytes() > 0) std::memcpy(out.f32(), a.f32(), a.nbytes());
    if (b.nbytes() > 0) std::memcpy(out.f32() + a.numel(), b.f32(), b.nbytes());
    return out;
}

// The two replicas' parameter gradients a, b added, against the whole
// batch's w. Each is the float rounding of a double formula linear in the
// (exact) sums of its rows: batch norm's inv_std * (sum dy*x - mean * sum dy),
// the correction's (-mu_B / sigma_B) * sum dy, with the same inv_std, mean
// and mu_B / sigma_B on both sides; the halves' exact values add up to the
// whole's. Each double is within 2 roundings of 2^-53 of its exact value
// (batch norm: the subtraction and the product by inv_std, mean * sum dy
// being exact, a float times an exact sum of multiples of 1/8; the
// correction: its two products), each float within u = 2^-24 of its double,
// and the test's a + b in double rounds at most once more, so
//   |a + b - w| <= (u + 2^-51) (|a| + |b| + |w|) (1 + u)
// (3 roundings of 2^-53 < 2^-51; 1 + u takes the exact magnitudes from the
// rounded ones). sum dy is exact and below 2^24 ulps: dbeta adds up exactly.
void check_sum_of_halves(const std::string& what, const Tensor& a, const Tensor& b, const Tensor& w) {
    INFO(what);
    REQUIRE(a.shape() == w.shape());
    REQUIRE(b.shape() == w.shape());
    for (int64_t c = 0; c < w.numel(); ++c) {
        const double x = a.f32()[c], y = b.f32()[c], z = w.f32()[c];
        const double bound = (testing::kUnitRoundoff + 0x1p-51) * (std::fabs(x) + std::fabs(y) + std::fabs(z)) *
                             (1 + testing::kUnitRoundoff);
        INFO("channel ", c, ": ", x, " + ", y, " against ", z);
        CHECK(std::fabs(x + y - z) <= bound);
    }
}

// ---- Batch norm ------------------------------------------------------------

struct BnRun {
    Tensor y, dx, dgamma, dbeta, running_mean, running_var;
};

struct BnCase {
    bool fused;                                            // batch_norm_relu6
    Tensor gamma = dyadic({6}, 2, 0.3f, 1.0f / 16, 2.0f);  // around 2, beta around 3:
    Tensor beta = dyadic({6}, 3, 0.3f, 1.0f / 16, 3.0f);   // both ends of ReLU6 clip
    Tensor rm0 = dyadic({6}, 4, 1.0f, 1.0f / 4);
    Tensor rv0 = Tensor::full({6}, 1.5f);

    // One training step (forward and backward with dy) on x.
    BnRun step(const Tensor& x, const Tensor& dy) const {
        Variable xv(x.clone(), true), g(gamma.clone(), true), b(beta.clone(), true);
        Tensor rm = rm0.clone(), rv = rv0.clone();
        Variable y = fused ? batch_norm_relu6(xv, g, b, rm, rv, true, 0.1f, 1e-3f)
                           : batch_norm(xv, g, b, rm, rv, true, 0.1f, 1e-3f);
        const Tensor out = y.value().clone();
        y.backward(dy.clone());
        return {out, xv.grad(), g.grad(), b.grad(), rm, rv};
    }
};

}  // namespace

TEST_CASE("sync batch norm: two replicas on the halves of a batch compute the whole batch's batch norm") {
    const Shape s{4, 3, 5, 6};  // 45 rows per replica (not a power of two: a mean of means would round apart)
    const Tensor x = bn_input(s, 1), dy = dyadic(s, 5, 1.0f, 1.0f / 16);
    for (bool fused : {false, true}) {
        INFO((fused ? "batch_norm_relu6" : "batch_norm"));
        const BnCase bn{fused};
        const BnRun whole = bn.step(x, dy);
        BnRun rep[2];
        const int64_t sums = run_replicas(true, [&](int r) { rep[r] = bn.step(half(x, r), half(dy, r)); });
        CHECK(sums == 2);  // the statistics; dx's sums of dy and dy * x
        CHECK(same_bytes(join(rep[0].y, rep[1].y), whole.y));
        CHECK(same_bytes(join(rep[0].dx, rep[1].dx), whole.dx));
        for (const BnRun& r : rep) {
            CHECK(same_bytes(r.running_mean, whole.running_mean));
            // The unbiased variance of all 90 rows (R / (R - 1) with the global R).
            CHECK(same_bytes(r.running_var, whole.running_var));
        }
        // Each replica's dgamma, dbeta are its own half's (the trainer
        // averages them over replicas): together the whole batch's.
        check_sum_of_halves("dgamma", rep[0].dgamma, rep[1].dgamma, whole.dgamma);
        check_sum_of_halves("dbeta", rep[0].dbeta, rep[1].dbeta, whole.dbeta);
        // Broken: global sums for dgamma would give the whole batch's on each replica.
        CHECK(!same_bytes(rep[0].dgamma, whole.dgamma));
    }
}

TEST_CASE("batch norm with the hook installed but no sync: each replica's own statistics") {
    const Shape s{4, 3, 5, 6};
    const Tensor x = bn_input(s, 1), dy = dyadic(s, 5, 1.0f, 1.0f / 16);
    const BnCase bn{false};
    BnRun rep[2];
    CHECK(run_replicas(false, [&](int r) { rep[r] = bn.step(half(x, r), half(dy, r)); }) == 0);
    for (int r = 0; r < 2; ++r) {
        const BnRun alone = bn.step(half(x, r), half(dy, r));  // one process on the half
        CHECK(same_bytes(rep[r].y, alone.y));
        CHECK(same_bytes(rep[r].dx, alone.dx));
        CHECK(same_bytes(rep[r].running_var, alone.running_var));
    }
    // Far from the whole batch's output: 100 times the rounding-level bound
    // of a batch-norm output (float_error.h) and more, the halves' means
    // being 2 apart.
    const BnRun whole = bn.step(x, dy);
    const Tensor bound = testing::bound_from(
        testing::batch_norm_magnitude(x, bn.gamma, bn.beta, testing::channel_stats(x), 1e-3f), testing::gamma_n(7), 1);
    testing::check_far_outside("per-replica statistics against the whole batch's",
                               testing::worst_bound_ratio(join(rep[0].y, rep[1].y), whole.y, bound));
}

TEST_CASE("sync batch norm: batch_stat_correction on two replicas = on the whole batch") {
    const Shape s{4, 2, 3, 5};  // 12 rows per replica
    const Tensor yf = bn_input(s, 11);
    Tensor yq = yf.clone();  // y_q near y_f, as a quantized convolution's output: multiples of 1/16
    for (int64_t i = 0; i < yq.numel(); ++i) yq.f32()[i] = std::nearbyint(0.9f * yq.f32()[i] * 16) / 16;
    const Tensor dy = dyadic(s, 12, 1.0f, 1.0f / 16);
    const Tensor gamma = dyadic({5}, 13, 0.3f, 1.0f / 16, 1.0f), beta = dyadic({5}, 14, 1.0f, 1.0f / 16);
    const Tensor rm0 = dyadic({5}, 15, 1.0f, 1.0f / 4), rv0 = Tensor::full({5}, 2.0f);
    struct Run {
        Tensor y, dyq, dyf, dgamma, dbeta, rm, rv;
    };
    auto step = [&](const Tensor& q, const Tensor& f, const Tensor& g) {
        Variable vq(q.clone(), true), vf(f.clone(), true), vg(gamma.clone(), true), vb(beta.clone(), true);
        Tensor rm = rm0.clone(), rv = rv0.clone();
        Variable y = quant::batch_stat_correction(vq, vf, vg, vb, rm, rv, 0.1f, 1e-3f);
        const Tensor out = y.value().clone();
        y.backward(g.clone());
        return Run{out, vq.grad(), vf.grad(), vg.grad(), vb.grad(), rm, rv};
    };
    const Run whole = step(yq, yf, dy);
    Run rep[2];
    CHECK(run_replicas(true, [&](int r) { rep[r] = step(half(yq, r), half(yf, r), half(dy, r)); }) == 2);
    CHECK(same_bytes(join(rep[0].y, rep[1].y), whole.y));
    CHECK(same_bytes(join(rep[0].dyq, rep[1].dyq), whole.dyq));
    CHECK(same_bytes(join(rep[0].dyf, rep[1].dyf), whole.dyf));
    for (const Run& r : rep) {
        CHECK(same_bytes(r.rm, whole.rm));
        CHECK(same_bytes(r.rv, whole.rv));
    }
    check_sum_of_halves("dgamma", rep[0].dgamma, rep[1].dgamma, whole.dgamma);
    check_sum_of_halves("dbeta", rep[0].dbeta, rep[1].dbeta, whole.dbeta);
    // Without sync: each replica's own statistics, y_f's gradient its own.
    Run own[2];
    CHECK(run_replicas(false, [&](int r) { own[r] = step(half(yq, r), half(yf, r), half(dy, r)); }) == 0);
    CHECK(!same_bytes(join(own[0].y, own[1].y), whole.y));
    CHECK(same_bytes(own[1].dyf, step(half(yq, 1), half(yf, 1), half(dy, 1)).dyf));
}

// ---- Activation quantizer --------------------------------------------------

namespace {

struct AqRun {
    float e;
    int k;
    Tensor y;
};

// One training step of a fresh 4-bit activation quantizer on x; e_start, if
// given, is a log2-scale already initialised (the first step then only
// rounds it).
AqRun activation_step(const Tensor& x, quant::ExponentRounding rounding, const float* e_start = nullptr) {
    quant::ActivationQuantizer aq(4, rounding);
    aq.train();
    if (e_start) {
        aq.log2_scale().value().f32()[0] = *e_start;
        for (auto& [name, t] : aq.named_buffers())
            if (name == "initialized") t->data<int32_t>()[0] = 1;
    }
    const Variable y = aq(Variable(x.clone()));
    return {aq.log2_scale().value().item(), aq.exponent(), y.value()};
}

// A tensor {2, 4, 4, 2} (64 values): `count` of them equal to `value`, then
// values cycling through `fill` (repeated), the rest 0.
Tensor activations(int count, float value, const std::vector<float>& fill = {}) {
    Tensor t = Tensor::zeros({2, 4, 4, 2});
    for (int64_t i = 0; i < t.numel(); ++i)
        t.f32()[i] = i < count ? value : fill.empty() ? 0.0f : fill[i % fill.size()];
    return t;
}

}  // namespace

TEST_CASE("activation quantizer on two replicas: the whole batch's exponent on both") {
    using quant::ExponentRounding;
    for (bool sync : {false, true}) {  // replicas::active() alone decides, not sync batch norm
        INFO("sync batch norm ", sync);
        {
            INFO("first step: e from the whole batch's std");
            // Half a: 32 zeros and 32 twos (std 1: e = log2(3 / 15), k = -2);
            // half b: 32 zeros and 32 of 32 (std 16: k = 2); the whole batch:
            // mean 8.5, std sqrt(184.75) (k = 2). Every deviation from these
            // dyadic means, its square and their sums are exact: both replicas'
            // e must be the whole batch's bit for bit.
            const Tensor a = activations(32, 2.0f), b = activations(32, 32.0f), whole = join(a, b);
            const AqRun ra = activation_step(a, ExponentRounding::ceil),
                        rb = activation_step(b, ExponentRounding::ceil);
            const AqRun rw = activation_step(whole, ExponentRounding::ceil);
            REQUIRE(ra.k != rb.k);  // the halves alone disagree
            CHECK(rw.k == 2);
            AqRun rep[2];
            const int64_t sums =
                run_replicas(sync, [&](int r) { rep[r] = activation_step(r == 0 ? a : b, ExponentRounding::ceil); });
            CHECK(sums == 2);  // sum and count; squared deviations
            for (const AqRun& r : rep) {
                CHECK(r.e == rw.e);
                CHECK(r.k == rw.k);
            }
            CHECK(same_bytes(join(rep[0].y, rep[1].y), rw.y));
        }
        {
            INFO("msqe-round: floor or ceil by the whole batch's errors");
            // e = 0.5: k = 0 (s = 1) or 1 (s = 2). Half a, odd values 1..7: at
            // s = 1 no error, at s = 2 an error of 1 each, E = (0, 64): k = 0.
            // Half b, two values of 20 (inside the mask, |x| <= 2^0.5 * 15.5):
            // at s = 1 clipped to 15, error 25 each, at s = 2 exact, E = (50, 0):
            // k = 1. The whole batch: E = (50, 64): k = 0.
            const float e = 0.5f;
            const Tensor a = activations(0, 0.0f, {1, 3, 5, 7}), b = activations(2, 20.0f), whole = join(a, b);
            const ExponentRounding msqe = ExponentRounding::msqe_round;
            const AqRun ra = activation_step(a, msqe, &e), rb = activation_step(b, msqe, &e);
            const AqRun rw = activation_step(whole, msqe, &e);
            REQUIRE(ra.k == 0);
            REQUIRE(rb.k == 1);
            CHECK(rw.k == 0);
            AqRun rep[2];
            CHECK(run_replicas(sync, [&](int r) { rep[r] = activation_step(r == 0 ? a : b, msqe, &e); }) == 1);
            for (const AqRun& r : rep) CHECK(r.k == rw.k);
            CHECK(same_bytes(join(rep[0].y, rep[1].y), rw.y));
        }
    }
}

TEST_CASE("one process: the activation quantizer's choices are grid.cpp's bit for bit, hook or not") {
    using quant::ExponentRounding;
    // activation_std adds as population_std does, lanes, tails and chunks:
    // the same double, for every length up to 12 lanes and around the chunks
    // (one rounding apart in a sum moves the std half the time).
    std::vector<int64_t> lengths;
    for (int64_t n = 1; n <= 96; ++n) lengths.push_back(n);
    for (int64_t n : {quant::kChunk, quant::kChunk + 1, 2 * quant::kChunk + 8 * 3 + 5}) lengths.push_back(n);
    for (int64_t n : lengths) {
        INFO("n = ", n);
        const Tensor x = testing::random_tensor({n}, 20 + n, 3.0f);
        CHECK(quant::activation_std(x.f32(), n, false) == quant::population_std(x.f32(), n));
        CHECK(quant::activation_std(x.f32(), n, true) == quant::population_std(x.f32(), n));  // no hook: local
    }
    // Random data (not dyadic), of one chunk and of several with a tail of
    // fewer than 8 lanes: the same arithmetic in the same order.
    for (int64_t n : {int64_t(45), 2 * quant::kChunk + 8 * 3 + 5}) {
        INFO("n = ", n);
        Tensor x = testing::random_tensor({1, 1, 1, n}, 21, 2.0f);
        for (int64_t i = 0; i < n; ++i) x.f32()[i] = std::max(0.0f, x.f32()[i] + 0.5f);
        const quant::Grid g = quant::make_grid(4, false, "test");
        const float e_init = float(std::log2(std::max(3.0 * quant::population_std(x.f32(), n) / g.qp, 1e-5)));
        const float e = 0.4f;  // for msqe-round: weights w = 1[|x| <= 2^e (qp + 0.5)]
        std::vector<float> w(n);
        quant::group_element_weights(x.f32(), nullptr, false, std::exp2(double(e)) * (g.qp + 0.5), n, w.data());
        const int k_msqe = quant::msqe_rounded_exponent(x.f32(), w.data(), n, e, g);

        const AqRun init = activation_step(x, ExponentRounding::ceil);
        CHECK(init.e == e_init);
        CHECK(activation_step(x, ExponentRounding::msqe_round, &e).k == k_msqe);
        // A hook of one replica (a sum of one: nothing to add) takes the
        // replicas' code path: the same bits.
        double std_one;
        AqRun one;
        int k_one;
        {
            const OneReplica hook;
            std_one = quant::activation_std(x.f32(), n, true);
            one = activation_step(x, ExponentRounding::ceil);
            k_one = activation_step(x, ExponentRounding::msqe_round, &e).k;
        }
        CHECK(std_one == quant::population_std(x.f32(), n));
        CHECK(one.e == e_init);
        CHECK(same_bytes(one.y, init.y));
        CHECK(k_one == k_msqe);
    }
}

TEST_CASE("one process: batch norm with a hook of one replica is batch norm without one, bit for bit") {
    const Shape s{4, 3, 5, 6};
    const Tensor x = bn_input(s, 1), dy = testing::random_tensor(s, 5);  // dy not dyadic: inexact sums
    for (bool fused : {false, true}) {
        INFO((fused ? "batch_norm_relu6" : "batch_norm"));
        BnRun one;
        {
            const OneReplica hook;
            one = BnCase{fused}.step(x, dy);
        }
        const BnRun none = BnCase{fused}.step(x, dy);
        CHECK(same_bytes(one.y, none.y));
        CHECK(same_bytes(one.dx, none.dx));
        CHECK(same_bytes(one.dgamma, none.dgamma));
        CHECK(same_bytes(one.dbeta, none.dbeta));
        CHECK(same_bytes(one.running_mean, none.running_mean));
        CHECK(same_bytes(one.running_var, none.running_var));
    }
}

// ---- Dropout ---------------------------------------------------------------
//
// Each replica draws the mask of the whole batch (the same uniforms in the
// same order as one process) and keeps its rows. The output is x * mask and
// the gradient dy * mask, element by element: no sums, so nothing to
// regroup, and the same draw gives the same float. The replicas' rows must
// be one process's bit for bit (tolerance 0), and every rng ends where the
// one process's does. A replica drawing from its local tensor (the old
// dropout) repeats replica 0's mask on replica 1's rows: far from equal.

namespace {

struct DropoutRun {
    Tensor y, dx;   // dx empty for 0 rows
    uint64_t next;  // the rng's next draw
};

DropoutRun dropout_step(const Tensor& x, const Tensor& dy, uint64_t seed) {
    Rng rng(seed);
    Variable v(x.clone(), true);
    const Variable y = dropout(v, 0.3f, true, rng);
    DropoutRun run{y.value().clone(), Tensor(), 0};
    if (x.numel() > 0) {
        y.backward(dy.clone());
        run.dx = v.grad();
    }
    run.next = rng.next_u64();
    return run;
}

}  // namespace

TEST_CASE("replicas: rows_in_batch is the replica's place in the global batch") {
    CHECK(replicas::rows_in_batch(5).offset == 0);  // no hook: the batch is local
    CHECK(replicas::rows_in_batch(5).total == 5);
    replicas::Rows rows[2];
    const int64_t local[2] = {4, 2};
    CHECK(run_replicas(false, [&](int r) { rows[r] = replicas::rows_in_batch(local[r]); }) == 1);
    CHECK(rows[0].offset == 0);
    CHECK(rows[1].offset == 4);
    CHECK(rows[0].total == 6);
    CHECK(rows[1].total == 6);
}

TEST_CASE("dropout on two replicas = dropout of one process on the whole batch, bit for bit") {
    const Tensor x = testing::random_tensor({6, 5}, 30), dy = testing::random_tensor({6, 5}, 31);
    const uint64_t seed = 77;
    const DropoutRun whole = dropout_step(x, dy, seed);
    for (int64_t first : {3, 4, 0, 6}) {  // replica 0's rows: halves, uneven, 0 on one replica
        INFO("rows ", first, " + ", 6 - first);
        const int64_t begin[2] = {0, first}, count[2] = {first, 6 - first};
        DropoutRun rep[2];
        CHECK(run_replicas(false, [&](int r) {
                  rep[r] = dropout_step(rows_of(x, begin[r], count[r]), rows_of(dy, begin[r], count[r]), seed);
              }) == 1);
        CHECK(same_bytes(join(rep[0].y, rep[1].y), whole.y));
        const Tensor dx = count[0] == 0 ? rep[1].dx : count[1] == 0 ? rep[0].dx : join(rep[0].dx, rep[1].dx);
        CHECK(same_bytes(dx, whole.dx));
        for (const DropoutRun& r : rep) CHECK(r.next == whole.next);
    }
    // The local mask (the old dropout) on replica 1's half: replica 0's mask again.
    const DropoutRun local = dropout_step(rows_of(x, 3, 3), rows_of(dy, 3, 3), seed);
    CHECK(!same_bytes(local.y, rows_of(whole.y, 3, 3)));
}

TEST_CASE("one process: dropout draws its mask in element order, hook of one replica or none") {
    const Tensor x = testing::random_tensor({2, 3, 3, 4}, 32), dy = testing::random_tensor({2, 3, 3, 4}, 33);
    const float p = 0.3f, keep = 1.0f / (1.0f - p);
    Rng ref(78);  // the mask as dropout always drew it: one uniform per element, in order
    Tensor y = Tensor::empty(x.shape()), dx = Tensor::empty(x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) {
        const float m = ref.uniform() < p ? 0.0f : keep;
        y.f32()[i] = x.f32()[i] * m;
        dx.f32()[i] = dy.f32()[i] * m;
    }
    const uint64_t next = ref.next_u64();
    DropoutRun none = dropout_step(x, dy, 78), one;
    {
        const OneReplica hook;
        one = dropout_step(x, dy, 78);
    }
    for (const DropoutRun& r : {none, one}) {
        CHECK(same_bytes(r.y, y));
        CHECK(same_bytes(r.dx, dx));
        CHECK(r.next == next);
    }
}
