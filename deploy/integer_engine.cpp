#include "deploy/integer_engine.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "engine/check.h"
#include "engine/ops.h"
#include "layers/activation.h"
#include "layers/mobilenet_v2.h"
#include "layers/pooling.h"
#include "layers/sequential.h"
#include "quant/activation_quantizer.h"
#include "quant/export.h"
#include "quant/quantize_model.h"

namespace hfq::deploy {

int64_t divide_round_half_even(int64_t n, int64_t d) {
    int64_t q = n / d, r = n % d;  // C++ truncates: make r >= 0
    if (r < 0) r += d, q -= 1;
    if (2 * r > d || (2 * r == d && (q & 1))) q += 1;
    return q;
}

int64_t shift_round_half_even(int64_t v, int s) {
    if (s <= 0) return v * (int64_t(1) << -s);
    const int64_t q = v >> s;  // floor (arithmetic shift), r = v - q 2^s in [0, 2^s)
    const int64_t r = v - q * (int64_t(1) << s), half = int64_t(1) << (s - 1);
    return q + (r > half || (r == half && (q & 1)));
}

Tensor IntegerEngine::Result::float_logits() const {
    Tensor y = Tensor::empty(logits.shape);
    const int64_t classes = logits.shape.back();
    for (size_t i = 0; i < logits.acc.size(); ++i)
        y.f32()[i] = std::ldexp(float(logits.acc[i]), logits.unit[i % size_t(classes)]);
    return y;
}

namespace {

using quant::ActivationEnds;
using quant::ActivationQuantizer;
using quant::IntegerLayer;

// A layer's weights in the order the loops read them. A convolution (per
// group) or the classifier is a matrix-vector product per output pixel:
// out[o] = bias[o] + sum_j patch[j] W[j][o], the patch being the window's
// codes in NHWC order, j = (ky K + kx) cg + i (cg = input channels per group).
// W is stored in pairs of rows, w[((j / 2) O8 + o) 2 + j % 2] (O8 = the
// group's outputs rounded up to 8, the patch length up to even, zeros in
// the padding), which is what AVX2's vpmaddwd multiplies: 8 outputs x 2
// inputs, int16 x int16 summed into int32, per instruction. A depthwise
// convolution instead runs over channels: w[(ky K + kx) C + c].
struct PreparedLayer {
    std::vector<int16_t> w;
    std::vector<int> e_w;  // per output channel
    bool depthwise = false;
    int64_t rows = 0, padded_outputs = 0;  // the patch length (even) and O8, per group
};

PreparedLayer prepare(const IntegerLayer& l) {
    const Tensor& codes = l.codes();
    const int8_t* q = codes.data<int8_t>();
    const int64_t out = codes.dim(0), groups = l.is_conv() ? l.params().groups : 1;
    const int64_t cg = codes.dim(1), k = l.is_conv() ? codes.dim(2) : 1, og = out / groups;
    PreparedLayer p;
    p.depthwise = l.is_conv() && cg == 1 && groups == out && out > 1;
    if (p.depthwise) {
        p.w.resize(size_t(codes.numel()));
        for (int64_t o = 0; o < out; ++o)
            for (int64_t t = 0; t < k * k; ++t) p.w[size_t(t * out + o)] = q[o * k * k + t];
    } else {
        p.rows = (k * k * cg + 1) / 2 * 2;
        p.padded_outputs = (og + 7) / 8 * 8;
        p.w.assign(size_t(groups * p.rows * p.padded_outputs), 0);
        for (int64_t o = 0; o < out; ++o)
            for (int64_t i = 0; i < cg; ++i)
                for (int64_t t = 0; t < k * k; ++t) {
                    const int64_t g = o / og, j = t * cg + i;
                    p.w[size_t(g * p.rows * p.padded_outputs + ((j / 2) * p.padded_outputs + o % og) * 2 + j % 2)] =
                        q[(o * cg + i) * k * k + t];
                }
    }
    for (int64_t o = 0; o < out; ++o) p.e_w.push_back(l.exponents()[l.exponents().size() == 1 ? 0 : size_t(o)]);
    return p;
}

// out[o] = bias[o] + sum_j x[j] W[j][o] for the group's outputs, W one
// group's block of PreparedLayer::w and x `rows` codes (even). Eight
// accumulator registers of 8 outputs at a time; the sums cannot overflow
// int32 (the export bounds every partial sum).
void matvec(const int16_t* x, const PreparedLayer& p, const int16_t* w, const int32_t* bias, int64_t outputs,
            int32_t* out) {
    constexpr int64_t kBlock = 64;  // outputs per pass: 8 registers
    const int64_t o8 = p.padded_outputs;
    for (int64_t o0 = 0; o0 < o8; o0 += kBlock) {
        const int64_t vectors = std::min(kBlock, o8 - o0) / 8;
        __m256i acc[kBlock / 8];
        for (int64_t v = 0; v < vectors; ++v) acc[v] = _mm256_setzero_si256();
        for (int64_t j = 0; j < p.rows; j += 2) {
            int32_t pair;  // x[j] in the low half, x[j + 1] in the high half: vpmaddwd's operand order
            std::memcpy(&pair, x + j, sizeof pair);
            const __m256i xx = _mm256_set1_epi32(pair);
            const int16_t* wj = w + ((j / 2) * o8 + o0) * 2;
            for (int64_t v = 0; v < vectors; ++v)
                acc[v] = _mm256_add_epi32(
                    acc[v], _mm256_madd_epi16(xx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wj + 16 * v))));
        }
        int32_t sums[kBlock];
        for (int64_t v = 0; v < vectors; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + 8 * v), acc[v]);
        for (int64_t o = o0; o < std::min(o0 + kBlock, outputs); ++o) out[o] = bias[o] + sums[o - o0];
    }
}

// What flows between modules: the image (before the first layer), codes, or
// an accumulator that the next quantizer turns into codes.
struct Value {
    enum Kind { image, codes, accumulator } kind = image;
    const Tensor* pixels = nullptr;
    CodeTensor c;
    Accumulator a;
};

class Runner {
public:
    Runner(const std::map<const IntegerLayer*, PreparedLayer>& layers, const std::string& source,
           IntegerEngine::Result* result, bool keep)
        : layers_(layers), source_(source), result_(result), keep_(keep) {}

    Value run(Module& m, Value x, const std::string& name) {
        if (auto* l = dynamic_cast<IntegerLayer*>(&m)) return layer(*l, std::move(x), name);
        if (auto* a = dynamic_cast<quant::QuantizedActivation*>(&m)) return activation(*a, std::move(x), name);
        if (auto* b = dynamic_cast<InvertedResidual*>(&m)) return block(*b, std::move(x), name);
        if (dynamic_cast<Dropout*>(&m)) return x;  // evaluation: the identity
        if (dynamic_cast<Sequential*>(&m) || dynamic_cast<Model*>(&m)) {
            for (const Module::Child& c : m.children())  // an inline child has its parent's name (layers/module.h)
                x = run(*c.module, std::move(x), c.is_inline ? name : join_name(name, c.name));
            return x;
        }
        throw Error(cat(source_, ": the integer engine cannot run '", name, "' (", m.type_name(), ")"));
    }

private:
    const CodeTensor& need_codes(const Value& x, const std::string& name) const {
        HFQ_CHECK(x.kind == Value::codes, source_, ": '", name, "' takes ",
                  x.kind == Value::image ? "the image" : "an accumulator",
                  " where integer hardware needs codes (a tensor no activation quantizer put on a grid)");
        return x.c;
    }

    // The image's codes: clip(rint(x / 2^e)), the input quantizer's float step.
    CodeTensor quantize_image(const Tensor& x, ActivationQuantizer& q, const std::string& name) {
        CodeTensor c{x.shape(), std::vector<int16_t>(size_t(x.numel())), q.exponent(), q.grid(), name, ""};
        for (int64_t i = 0; i < x.numel(); ++i) {
            const float v = std::nearbyint(std::ldexp(x.f32()[i], -c.exponent));
            c.codes[size_t(i)] = int16_t(std::clamp(v, float(-c.grid.qn), float(c.grid.qp)));
        }
        return c;
    }

    // c = clip(round_half_even(acc 2^(unit - e) / divisor), lo, hi), hi at most
    // round_half_even(6 2^-e) for ReLU6, lo 0 on an unsigned grid.
    CodeTensor requantize(const Accumulator& a, ActivationQuantizer& q, bool relu6, const std::string& name) {
        const quant::Grid& g = q.grid();
        const int e = q.exponent();
        int64_t lo = g.is_signed ? -g.qn : 0, hi = g.qp;
        if (relu6) {  // round_half_even(6 2^-e), capped where it exceeds qp anyway
            const int64_t six = e <= 0 ? (-e > 40 ? hi : 6LL << -e) : (e > 40 ? 0 : divide_round_half_even(6, 1LL << e));
            hi = std::min(hi, six);
        }
        HFQ_CHECK(a.divisor > 0 && a.divisor < (1 << 14), source_, ": '", name, "' divides by ", a.divisor,
                  " (a pooling over more than 2^14 positions is not exact in the fake-quant graph)");
        CodeTensor c{a.shape, std::vector<int16_t>(a.acc.size()), e, g, name, a.producer};
        const int64_t channels = int64_t(a.unit.size()), pixels = int64_t(a.acc.size()) / channels;
        // The usual case, every channel a right shift by 1..30 of an
        // accumulator below 2^30 (a layer's or a sum's, proven below 2^24):
        // round_half_even(v / 2^s) = (v + 2^(s-1) - 1 + (v / 2^s odd)) >> s,
        // without a branch, so the loop vectorises (variable shifts: vpsravd).
        bool shifts_only = a.divisor == 1;
        std::vector<int32_t> shift(static_cast<size_t>(channels));
        for (int64_t ch = 0; ch < channels; ++ch) {
            shift[size_t(ch)] = e - a.unit[size_t(ch)];
            shifts_only = shifts_only && shift[size_t(ch)] >= 1 && shift[size_t(ch)] <= 30;
        }
        if (shifts_only && std::all_of(a.acc.begin(), a.acc.end(), [](int32_t v) { return std::abs(v) < (1 << 30); })) {
            const int32_t lo32 = int32_t(lo), hi32 = int32_t(hi);
#pragma omp parallel for schedule(static)
            for (int64_t px = 0; px < pixels; ++px) {
                const int32_t* v = a.acc.data() + px * channels;
                int16_t* out = c.codes.data() + px * channels;
                for (int64_t ch = 0; ch < channels; ++ch) {
                    const int32_t sh = shift[size_t(ch)];
                    const int32_t q = (v[ch] + (1 << (sh - 1)) - 1 + ((v[ch] >> sh) & 1)) >> sh;
                    out[ch] = int16_t(std::clamp(q, lo32, hi32));
                }
            }
            record(name, c);
            return c;
        }
#pragma omp parallel for schedule(static)
        for (int64_t px = 0; px < pixels; ++px)
            for (int64_t ch = 0; ch < channels; ++ch) {
                const int shift = a.unit[size_t(ch)] - e;  // value in codes: acc 2^shift / divisor
                const size_t i = size_t(px * channels + ch);
                const int64_t v = a.acc[i];
                int64_t r;
                if (shift > 31) {  // |acc| < 2^31: a shift beyond 31 leaves only 0 inside the grid
                    r = v > 0 ? hi : v < 0 ? lo : 0;
                } else if (-shift > 47) {  // |acc| < 2^31, divisor < 2^14: below 2^-47 only 0 is left
                    r = 0;
                } else if (a.divisor == 1) {  // a layer's accumulator or a sum: a shift with rounding
                    r = shift_round_half_even(v, -shift);
                } else {
                    r = shift >= 0 ? divide_round_half_even(v * (int64_t(1) << shift), a.divisor)
                                   : divide_round_half_even(v, a.divisor << -shift);
                }
                c.codes[i] = int16_t(std::clamp(r, lo, hi));
            }
        record(name, c);
        return c;
    }

    void record(const std::string& name, const CodeTensor& c) {
        if (!keep_) return;
        result_->boundary_names.push_back(name);
        result_->boundaries.push_back(c);
    }

    // acc[n, oy, ox, o] = bias_code[o] + sum over the window and the group's
    // input channels of code_x code_w: per output pixel, the window's codes
    // (zero outside the image) gathered into a patch, then matvec.
    Accumulator convolution(const CodeTensor& x, const IntegerLayer& l, const PreparedLayer& p) {
        const Conv2dParams& prm = l.params();
        const int64_t n = x.shape[0], h = x.shape[1], w = x.shape[2], c = x.shape[3];
        const int64_t out = l.codes().dim(0), cg = l.codes().dim(1), k = l.codes().dim(2);
        const int64_t groups = prm.groups, og = out / groups;
        HFQ_CHECK(c == cg * groups, source_, ": layer '", l.name(), "' expects ", cg * groups,
                  " input channels, got ", c);
        const ConvExtent rows = conv_extent(h, k, prm), cols = conv_extent(w, k, prm);
        Accumulator a{{n, rows.out, cols.out, out}, std::vector<int32_t>(size_t(n * rows.out * cols.out * out)), {}, 1, ""};
        for (int64_t o = 0; o < out; ++o) a.unit.push_back(x.exponent + p.e_w[size_t(o)]);
        const int32_t* bias = l.bias_code().data<int32_t>();
#pragma omp parallel
        {
            std::vector<int16_t> patch(static_cast<size_t>(p.rows), 0);  // the window, and a 0 to make it even
#pragma omp for collapse(2) schedule(static)
            for (int64_t b = 0; b < n; ++b)
                for (int64_t oy = 0; oy < rows.out; ++oy)
                    for (int64_t ox = 0; ox < cols.out; ++ox) {
                        int32_t* acc = a.acc.data() + ((b * rows.out + oy) * cols.out + ox) * out;
                        const int64_t y0 = oy * prm.stride - rows.pad_before, x0 = ox * prm.stride - cols.pad_before;
                        auto code = [&](int64_t ky, int64_t kx, int64_t ch) -> int16_t {
                            const int64_t iy = y0 + ky, ix = x0 + kx;
                            return iy < 0 || iy >= h || ix < 0 || ix >= w ? 0
                                                                          : x.codes[size_t(((b * h + iy) * w + ix) * c + ch)];
                        };
                        if (p.depthwise) {  // every channel its own 1-channel window, vectorised over channels
                            std::copy(bias, bias + out, acc);
                            for (int64_t ky = 0; ky < k; ++ky)
                                for (int64_t kx = 0; kx < k; ++kx) {
                                    const int64_t iy = y0 + ky, ix = x0 + kx;
                                    if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                                    const int16_t* xp = x.codes.data() + ((b * h + iy) * w + ix) * c;
                                    const int16_t* wp = p.w.data() + (ky * k + kx) * out;
                                    for (int64_t o = 0; o < out; ++o) acc[o] += int32_t(xp[o]) * int32_t(wp[o]);
                                }
                            continue;
                        }
                        for (int64_t g = 0; g < groups; ++g) {
                            for (int64_t ky = 0, t = 0; ky < k; ++ky)
                                for (int64_t kx = 0; kx < k; ++kx)
                                    for (int64_t i = 0; i < cg; ++i) patch[size_t(t++)] = code(ky, kx, g * cg + i);
                            matvec(patch.data(), p, p.w.data() + g * p.rows * p.padded_outputs, bias + g * og, og,
                                   acc + g * og);
                        }
                    }
        }
        return a;
    }

    // acc[b, o] = bias_code[o] + sum_i code_x[b, i] code_w[o, i]
    Accumulator linear(const CodeTensor& x, const IntegerLayer& l, const PreparedLayer& p) {
        const int64_t n = x.shape[0], in = l.codes().dim(1), out = l.codes().dim(0);
        HFQ_CHECK(x.shape.size() == 2 && x.shape[1] == in, source_, ": layer '", l.name(), "' expects {N, ", in,
                  "}, got ", shape_str(x.shape));
        Accumulator a{{n, out}, std::vector<int32_t>(size_t(n * out)), {}, 1, ""};
        for (int64_t o = 0; o < out; ++o) a.unit.push_back(x.exponent + p.e_w[size_t(o)]);
        const int32_t* bias = l.bias_code().data<int32_t>();
#pragma omp parallel
        {
            std::vector<int16_t> row(static_cast<size_t>(p.rows), 0);  // the features, and a 0 to make them even
#pragma omp for schedule(static)
            for (int64_t b = 0; b < n; ++b) {
                std::copy_n(x.codes.data() + b * in, in, row.begin());
                matvec(row.data(), p, p.w.data(), bias, out, a.acc.data() + b * out);
            }
        }
        return a;
    }

    Value layer(IntegerLayer& l, Value x, const std::string& name) {
        auto prepared = layers_.find(&l);
        HFQ_CHECK(prepared != layers_.end(), source_, ": layer '", name, "' was not prepared");
        if (ActivationQuantizer* q = l.input_quantizer()) {
            HFQ_CHECK(x.kind == Value::image, source_, ": layer '", name, "' quantizes an input that is not the image");
            x.c = quantize_image(*x.pixels, *q, join_name(name, ActivationEnds::kInputName));
            x.kind = Value::codes;
            record(x.c.site, x.c);
        }
        const CodeTensor& in = need_codes(x, name);
        // The bias codes were made for the grid of this site (the export's claim).
        HFQ_CHECK(in.site == l.input_site(), source_, ": layer '", name, "' runs on the codes of '", in.site,
                  "' but its bias codes were made for '", l.input_site(), "'");
        Value y;
        y.kind = Value::accumulator;
        y.a = l.is_conv() ? convolution(in, l, prepared->second) : linear(in, l, prepared->second);
        y.a.producer = l.name();
        if (ActivationQuantizer* q = l.output_quantizer()) {
            y.c = requantize(y.a, *q, false, join_name(name, ActivationEnds::kOutputName));
            y.kind = Value::codes;
        }
        return y;
    }

    // ReLU / ReLU6 of an accumulator, or the global pooling of codes, then the quantizer.
    Value activation(quant::QuantizedActivation& qa, Value x, const std::string& name) {
        Module& act = qa.activation();
        Accumulator a;
        bool relu6 = false;
        if (dynamic_cast<GlobalAvgPool*>(&act)) {
            const CodeTensor& c = need_codes(x, name);
            const int64_t n = c.shape[0], hw = c.shape[1] * c.shape[2], ch = c.shape[3];
            a = Accumulator{{n, ch}, std::vector<int32_t>(size_t(n * ch), 0), std::vector<int>(size_t(ch), c.exponent),
                            hw, ""};
            for (int64_t b = 0; b < n; ++b)
                for (int64_t k = 0; k < hw; ++k)
                    for (int64_t j = 0; j < ch; ++j) a.acc[size_t(b * ch + j)] += c.codes[size_t((b * hw + k) * ch + j)];
        } else {
            relu6 = dynamic_cast<ReLU6*>(&act) != nullptr;
            HFQ_CHECK(relu6 || dynamic_cast<ReLU*>(&act), source_, ": the integer engine cannot run the activation '",
                      name, "' (", act.type_name(), ")");
            HFQ_CHECK(x.kind == Value::accumulator, source_, ": activation '", name, "' needs a layer's accumulator");
            a = std::move(x.a);
        }
        // ReLU: the unsigned grid's lower clip. ReLU6: also the upper clamp.
        HFQ_CHECK(!qa.quantizer().grid().is_signed, source_, ": '", name, "' is on a signed grid after an activation");
        Value y;
        y.kind = Value::codes;
        y.c = requantize(a, qa.quantizer(), relu6, name);
        return y;
    }

    // x + conv(x), the two code tensors aligned by a shift, then the sum's quantizer.
    Value block(InvertedResidual& b, Value x, const std::string& name) {
        Value y = run(*b.child("conv"), x, join_name(name, "conv"));
        if (!b.uses_residual()) return y;
        const CodeTensor& lhs = need_codes(x, name);
        const CodeTensor& rhs = need_codes(y, name);
        auto* q = dynamic_cast<ActivationQuantizer*>(b.after_add());
        HFQ_CHECK(q, source_, ": the residual sum of '", name, "' has no quantizer");
        const int m = std::min(lhs.exponent, rhs.exponent);
        const int sl = lhs.exponent - m, sr = rhs.exponent - m;
        // float32 adds the two exactly while 127 (2^sl + 2^sr) < 2^24.
        HFQ_CHECK(std::max(sl, sr) <= 16, source_, ": the residual sum of '", name, "' aligns exponents ", lhs.exponent,
                  " and ", rhs.exponent, ", too far apart for an exact float32 sum in the fake-quant graph");
        Accumulator a{lhs.shape, std::vector<int32_t>(lhs.codes.size()), std::vector<int>(size_t(lhs.shape.back()), m), 1, ""};
        for (size_t i = 0; i < a.acc.size(); ++i)  // products, not shifts: the codes may be negative
            a.acc[i] = int32_t(lhs.codes[i]) * (1 << sl) + int32_t(rhs.codes[i]) * (1 << sr);
        Value out;
        out.kind = Value::codes;
        out.c = requantize(a, *q, false, join_name(name, quant::kSumQuantizerName));
        return out;
    }

    const std::map<const IntegerLayer*, PreparedLayer>& layers_;
    const std::string& source_;
    IntegerEngine::Result* result_;
    bool keep_;
};

}  // namespace

struct IntegerEngine::Prepared {
    std::map<const IntegerLayer*, PreparedLayer> layers;
};

IntegerEngine::IntegerEngine(const std::string& export_path) : IntegerEngine(read_safetensors(export_path)) {}

IntegerEngine::IntegerEngine(const SafetensorsFile& file)
    : model_(quant::build_model_from_export(file)), source_(file.source), prepared_(std::make_unique<Prepared>()) {
    for (auto& [name, m] : model_->named_modules()) {
        auto* l = dynamic_cast<IntegerLayer*>(m);
        if (!l) continue;
        HFQ_CHECK(l->bias_code().defined() && !l->exponents().empty(), source_, ": layer '", l->name(),
                  "' has no input grid: the integer engine runs W4A8 exports (--activation-bits 8), not weight-only ones");
        prepared_->layers[l] = prepare(*l);
    }
    HFQ_CHECK(!prepared_->layers.empty(), source_, ": the export has no quantized layer");
}

IntegerEngine::~IntegerEngine() = default;

IntegerEngine::Result IntegerEngine::run(const Tensor& images, bool keep_boundaries) const {
    HFQ_CHECK(images.rank() == 4 && images.dtype() == DType::f32 && images.dim(3) == model_->config().input_channels,
              source_, ": the integer engine takes f32 images {N, H, W, ", model_->config().input_channels, "}, got ",
              shape_str(images.shape()));
    Result r;
    Runner runner(prepared_->layers, source_, &r, keep_boundaries);
    Value x;
    x.pixels = &images;
    Value y = runner.run(*model_, std::move(x), "");
    HFQ_CHECK(y.kind == Value::accumulator && y.a.shape.size() == 2, source_,
              ": the network does not end in a layer's accumulator (the logits)");
    r.logits = std::move(y.a);
    return r;
}

}  // namespace hfq::deploy
