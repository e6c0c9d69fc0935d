// The pieces every weight quantizer shares (docs/quantizers.md, 2): the integer
// grid, rounding, power-of-two scales, codes, the in-range mask, the
// weighted quantization error E(s) and the weighted least-squares scale.
//
// Scale groups. A weight tensor {O, ...} (OIHW convolution or {out, in}
// linear, see engine/tensor.h) is quantized with one scale per tensor, or
// one per output channel: then channel o is the contiguous block of
// elements [o * size, (o + 1) * size).
//
// Summation order. Every sum below runs over ONE group, in double, in an
// order fixed by the group's size alone, never by the number of threads:
//   * the group is cut into chunks of kChunk elements (the last one shorter);
//   * inside a chunk, element i goes to lane i % 8 of eight partial sums
//     (the tail after the last full eight goes to lanes 0, 1, ...), and the
//     chunk's sum is lane 0 + lane 1 + ... + lane 7, added in that order;
//   * the group's sum is chunk 0 + chunk 1 + ..., added in chunk order.
// A group of at most kChunk elements (every reference value of docs/quantizers.md, 7) is
// one chunk. Threads split the work two ways, neither of which changes a
// sum: across groups (for_each_group, per-channel scales) and, for a group
// of several chunks when no outer loop is parallel already, across its
// chunks (reduce_chunks / for_each_chunk: each chunk's partial sums are
// computed whole by one thread, then added in chunk order by one thread).
// The reference (TensorFlow) sums in float32; double sums agree with it on
// every reference value and make near-ties between candidate scales rarer.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace hfq::quant {

// The integers q in [-qn, qp] a b-bit quantizer may use.
//   signed:   qn = qp = 2^(b-1) - 1 (4 bits: -7..7, -8 unused: symmetric)
//   unsigned: qn = 0, qp = 2^b - 1   (the input goes through ReLU first)
struct Grid {
    int bits = 4;
    bool is_signed = true;
    int qn = 7;
    int qp = 7;
};
// bits in 2..8; throws hfq::Error naming `who` otherwise.
Grid make_grid(int bits, bool is_signed, const char* who);

// The contiguous scale groups of a tensor: `count` groups of `size` elements.
struct ScaleGroups {
    int64_t count = 1;
    int64_t size = 0;
};
// per_channel: one group per index of axis 0; otherwise one group.
ScaleGroups scale_groups(const Shape& shape, bool per_channel, const char* who);

// rint: round half to even under the default rounding mode
// (2.5 -> 2, 0.5 -> 0, 1.5 -> 2, -8.5 -> -8). std::round would round half
// away from zero, which is not what the reference does.
inline float rint_even(float v) { return std::nearbyint(v); }
// Round half away from zero (the traditional msqe-baseline's floor(|v| + 0.5)),
// in double so that |v| + 0.5 is exact.
inline float round_half_away(float v) { return float(std::copysign(std::floor(std::fabs(double(v)) + 0.5), v)); }

// po2(v) = 2^rint(log2(v + 1e-7)); this returns the exponent. The 1e-7 is part
// of the definition: it keeps po2(0) finite (2^-23).
int po2_exponent(double v);
inline float exp2_scale(int exponent) { return std::ldexp(1.0f, exponent); }

// clip(rint(x / s), -qn, qp): the integer code of x at scale s.
// (std::min/max rather than fmin/fmax: those are library calls; inputs are finite.)
inline float clip_to_grid(float r, const Grid& g) { return std::min(std::max(r, float(-g.qn)), float(g.qp)); }
inline float code_at(float x, float s, const Grid& g) { return clip_to_grid(rint_even(x / s), g); }

// How codes are rounded: half to even (rint, every quantizer of the paper)
// or half away from zero (the traditional msqe-baseline).
enum class Rounding { half_even, half_away };
inline float round_as(float v, Rounding r) { return r == Rounding::half_even ? rint_even(v) : round_half_away(v); }
// m(x; s) = 1[-qn <= rint(x/s) <= qp] (bounds inclusive).
inline bool in_range(float x, float s, const Grid& g) {
    const float r = rint_even(x / s);
    return r >= -g.qn && r <= g.qp;
}
// The straight-through scale-gradient term of one element (docs/quantizers.md, 4.1), with
// u = x / s: rint(u) - u in range, -qn below the grid, qp above it.
inline float scale_gradient_term(float x, float s, const Grid& g) {
    const float u = x / s;
    const float r = rint_even(u);
    if (r < -g.qn) return float(-g.qn);
    if (r > g.qp) return float(g.qp);
    return r - u;
}

// ---- Chunks: the unit of summation order and of parallel work -------------

// 16384 floats (64 KiB): a chunk of x and of w stay in the L2 cache while a
// pass works on them, and a 64K-element tensor already keeps 2 threads busy.
constexpr int64_t kChunk = 1 << 14;

// The chunks [begin, end) of [0, n), in order: f(begin, end) -> T for each,
// results combined in chunk order: total = r0; total += r1; ... (T's += adds
// sums, or takes a maximum). The chunks run on the OpenMP
// threads unless the caller is inside a parallel region already, active or
// not (the outer loop owns the threads then; see for_each_group). The result never depends on the thread count.
// f must not throw.
template <class T, class F>
T reduce_chunks(int64_t n, F&& f) {
    const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
    if (chunks == 1) return f(int64_t(0), n);
    std::vector<T> part(chunks);
#pragma omp parallel for schedule(static) if (omp_get_level() == 0)
    for (int64_t c = 0; c < chunks; ++c) part[c] = f(c * kChunk, std::min(n, (c + 1) * kChunk));
    T total = part[0];
    for (int64_t c = 1; c < chunks; ++c) total += part[c];
    return total;
}

// f(begin, end) for the chunks of [0, n), element-wise work (no result),
// split across threads like reduce_chunks. f must not throw.
template <class F>
void for_each_chunk(int64_t n, F&& f) {
    const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
    if (chunks == 1) return f(int64_t(0), n);
#pragma omp parallel for schedule(static) if (omp_get_level() == 0)
    for (int64_t c = 0; c < chunks; ++c) f(c * kChunk, std::min(n, (c + 1) * kChunk));
}

// ---- Passes over one group (n elements), each summed as described above ---

// What one pass over a group at scale s yields, w the element weights
// (nullptr: all ones) and q = clip(round(x / s)) (code_at, by default):
//   error = E(s) = sum w (x - s q)^2    (a sum, not a mean)
//   wqx   = sum w q x,  wqq = sum w q q  (the least-squares sums at these codes)
struct GroupSums {
    double error = 0;
    double wqx = 0;
    double wqq = 0;
    GroupSums& operator+=(const GroupSums& o) {
        error += o.error;
        wqx += o.wqx;
        wqq += o.wqq;
        return *this;
    }
};
GroupSums group_sums(const float* x, const float* w, int64_t n, float s, const Grid& g,
                     Rounding rounding = Rounding::half_even);
inline double weighted_error(const float* x, const float* w, int64_t n, float s, const Grid& g) {
    return group_sums(x, w, n, s, g).error;
}

// E(s) at several scales (codes rounded half to even): errors[j] is exactly
// weighted_error(x, w, n, scales[j], g) -- the same arithmetic per element,
// the same summation order -- but one pass over x and w serves up to
// kErrorsPerPass scales (more would not fit the AVX2 registers), and it
// leaves out the least-squares sums. The searches that compare candidate
// scales (msqe-po2's line search, the msqe-round of learnable-po2 and of
// activations) spend most of their time here: msqe-po2's six line-search
// candidates cost about half of six group_sums passes (1M weights, 1 thread).
constexpr int kErrorsPerPass = 3;
void weighted_errors(const float* x, const float* w, int64_t n, const float* scales, int count, const Grid& g,
                     double* errors);

// Round-to-lower-MSQE (docs/quantizers.md, 4.1) of a continuous log2-scale e: floor(e) or
// ceil(e), whichever has the lower E(2^k) with weights w; ties go to ceil.
int msqe_rounded_exponent(const float* x, const float* w, int64_t n, double e, const Grid& g);

// LS = po2( mean(w q x) / (mean(w q q) + 1e-7) ), from the sums over the
// group's n elements (the 1e-7 sits on the denominator of the MEAN form).
int least_squares_exponent(double sum_wqx, double sum_wqq, int64_t n);

// Population statistics of one group: the mean and then sum (x - mean)^2,
// two passes in double.
double population_std(const float* x, int64_t n);
float max_abs(const float* x, int64_t n);
// How many elements are NaN or infinite.
int64_t count_non_finite(const float* x, int64_t n);

// The per-element weights of the error and of least squares (docs/quantizers.md, 3.2, 4.1):
//   w_i = (sqrt(M_i) if take_sqrt, else M_i; 1 if M is null) * 1[|x_i| <= limit]
void group_element_weights(const float* x, const float* second_moments, bool take_sqrt, double limit, int64_t n,
                           float* w);

// The final fake-quantization pass over one group:
//   code_i = clip(round(x_i / code_scale)),  y_i = out_scale * code_i.
// (code_scale == out_scale except for msqe-baseline, whose output pairs the
// last least-squares scale with the codes of the iteration before.)
// If `codes` is not null it holds the previous step's codes; they are compared
// (when compare_codes) and overwritten with the new ones.
struct PassStats {
    double error = 0;     // sum (x - y)^2, unweighted
    int64_t clipped = 0;  // elements whose rounded value fell outside [-qn, qp]
    int64_t changed = 0;  // codes that differ from `codes` on entry
    PassStats& operator+=(const PassStats& o) {
        error += o.error;
        clipped += o.clipped;
        changed += o.changed;
        return *this;
    }
};
PassStats quantize_group(const float* x, float* y, int16_t* codes, bool compare_codes, int64_t n, float code_scale,
                         float out_scale, const Grid& g, Rounding rounding);

// The backward pass over one group (docs/quantizers.md, 2, 3.2, 4.1, 4.2), g = dL/dy:
//   dx_i = g_i * m_i * gate_i       (m_i = 1 when identity_ste; gate_i =
//                                    1[x_i > 0] on the unsigned grid: the ReLU)
//   M_i  = decay M_i + (1 - decay) m_i g_i^2   (if M is not null)
// and returns sum_i g_i t_i with t_i = scale_gradient_term (if want_scale_sum).
// dx may be null (the weights need no gradient).
struct BackwardGroup {
    const float* x = nullptr;  // the quantizer's input (after the ReLU if unsigned)
    const float* grad = nullptr;
    float* dx = nullptr;
    float* second_moments = nullptr;
    float decay = 0;
    bool identity_ste = false;
    bool want_scale_sum = false;
};
double backward_group(const BackwardGroup& b, int64_t n, float s, const Grid& g);

// Runs f(group) for every group, groups split across OpenMP threads (each
// group is handled whole by one thread, so results do not depend on the
// thread count; a single group splits its chunks instead, see above). f must
// not throw: collect problems and check afterwards.
//
// A serial loop is a plain loop, not an `omp parallel ... if (false)`: that
// would open an inactive region, and a parallel region inside it is NESTED:
// libgomp serves nested regions with threads of their own while the top-level
// team's threads spin-wait -- three busy threads on two cores, which made a
// quantized 32x32 step 2.2x slower. For the same reason the chunk loops go
// parallel only at nesting level 0 (omp_get_level() counts inactive regions
// too; omp_in_parallel() does not).
template <class F>
void for_each_group(const ScaleGroups& groups, F&& f) {
    const bool parallel = groups.count > 1 && groups.count * groups.size >= (1 << 14);
    if (!parallel) {
        for (int64_t gi = 0; gi < groups.count; ++gi) f(gi);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t gi = 0; gi < groups.count; ++gi) f(gi);
}

}  // namespace hfq::quant
