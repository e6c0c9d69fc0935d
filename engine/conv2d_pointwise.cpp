// Pointwise (1x1, stride 1, unpadded, ungrouped) convolutions as matrix
// products on the plain layouts. An NHWC activation {N,H,W,C} is a row-major
// matrix {M = N*H*W, C}, and OIHW weights {O,I,1,1} a matrix {O,I}, so
//
//   forward           y  {M,O} = x {M,I} W^T + b
//   backward data     dx {M,I} = dy {M,O} W
//   backward weights  dW {O,I} = dy^T x,   db {O} = column sums of dy
//
// with no layout conversion at all. oneDNN's convolution primitive reorders
// the weights into its blocked layout on every call and back for dW, and its
// 1x1 kernels are slow on the tiny images of a small network's last layers
// (1x1 spatial, 1024 -> 1024 at batch 32, forward and backward: 14 ms
// against 3.6 ms here), where a 32x32 step spends much of its time.
//
// Threads. Every product is cut into tiles fixed by the shapes alone, each
// computed by one single-threaded sgemm (oneDNN runs a gemm called inside a
// parallel region on the calling thread). y and dx: tiles of rows (and
// columns), each over the whole sum. dW: chunks of the M rows it sums over,
// added in chunk order, or blocks of its own rows when M is small. So y, dx
// and dW do not depend on the thread count; nor does db, batch norm's
// fixed-order column sums (engine/channel_sums.h).
#include "engine/conv2d_pointwise.h"

#include <oneapi/dnnl/dnnl.h>

#include <algorithm>

#include "engine/channel_sums.h"
#include "engine/check.h"

namespace hfq {
namespace {

// C {m,n} = op(A) op(B) + beta C, row-major, on the calling thread's team.
void sgemm(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float beta, float* c, int64_t ldc) {
    const dnnl_status_t s = dnnl_sgemm(trans_a, trans_b, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
    HFQ_CHECK(s == dnnl_success, "conv2d (pointwise): oneDNN sgemm failed (status ", int(s), ") for ", m, "x", n, "x",
              k);
}

// out {rows, cols} = a {rows, k} op(b) (+ bias per column): b is {cols, k}
// (trans_b 'T') or {k, cols} ('N'). Tiles: chosen from the shape only, at
// most 8192 rows and at least 256 each, and when there are enough rows a
// multiple of 8 equal tiles, so that 2, 4 or 8 threads get equal shares
// (13 tiles on 2 threads would leave one idle for 1/7 of the product).
void tiled_product(const float* a, const float* b, char trans_b, const float* bias, float* out, int64_t rows,
                   int64_t cols, int64_t k) {
    const int64_t wanted_tiles = ((rows + 8191) / 8192 + 7) / 8 * 8;
    const int64_t tile_rows = std::max<int64_t>((rows + wanted_tiles - 1) / wanted_tiles, 256);
    const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows;
    // Few rows (the last layers of a small network): cut the columns too.
    const int64_t col_splits =
        row_tiles >= 8 ? 1 : std::min<int64_t>((8 + row_tiles - 1) / row_tiles, (cols + 15) / 16);
    const int64_t tile_cols = ((cols + col_splits - 1) / col_splits + 15) / 16 * 16;
    const int64_t col_tiles = (cols + tile_cols - 1) / tile_cols;
    const int64_t ldb = trans_b == 'T' ? k : cols;
#pragma omp parallel for schedule(static)  // even for one tile: sgemm then stays on one thread
    for (int64_t t = 0; t < row_tiles * col_tiles; ++t) {
        const int64_t r0 = t / col_tiles * tile_rows, c0 = t % col_tiles * tile_cols;
        const int64_t r = std::min(tile_rows, rows - r0), c = std::min(tile_cols, cols - c0);
        float* tile = out + r0 * cols + c0;
        const float* b_tile = trans_b == 'T' ? b + c0 * k : b + c0;
        if (bias)
            for (int64_t i = 0; i < r; ++i) std::copy_n(bias + c0, c, tile + i * cols);
        sgemm('N', trans_b, r, c, k, a + r0 * k, k, b_tile, ldb, bias ? 1.0f : 0.0f, tile, cols);
    }
}

// dW {out, in} = dy^T x, the sum over m rows of dy {m, out} and x {m, in}.
// Many rows (large images): 8 chunks of rows, each a single-threaded sgemm,
// their products added in chunk order. oneDNN's multi-threaded sgemm split
// these shapes badly: 401408 x 64 x 32 (MobileNetV1's first pointwise layer
// at 224, batch 32) took 10.0 ms on 2 threads, the 8 chunks 6.3 ms. Few rows
// (small images, many channels): up to 8 blocks of dW's rows, each over all
// the rows, with no partial products to keep.
void weight_gradient(const float* dy, const float* x, float* dw, int64_t m, int64_t out, int64_t in) {
    constexpr int64_t kMinChunkedRows = 16384;
    const int64_t chunks = m >= kMinChunkedRows ? 8 : 1;
    const int64_t row_blocks = chunks == 1 ? std::min<int64_t>(8, (out + 15) / 16) : 1;
    // Chunk 0 writes dW itself, chunk k > 0 its own {out, in} partial product.
    Tensor partial = chunks > 1 ? Tensor::empty({chunks - 1, out, in}) : Tensor();
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < chunks * row_blocks; ++t) {
        const int64_t k = t / row_blocks, r = t % row_blocks;
        const int64_t m0 = m * k / chunks, m1 = m * (k + 1) / chunks;
        const int64_t o0 = out * r / row_blocks, o1 = out * (r + 1) / row_blocks;
        float* product = k == 0 ? dw : partial.f32() + (k - 1) * out * in;
        sgemm('T', 'N', o1 - o0, in, m1 - m0, dy + m0 * out + o0, out, x + m0 * in, in, 0.0f, product + o0 * in, in);
    }
    if (chunks == 1) return;
    const float* p = partial.f32();
#pragma omp parallel for schedule(static) if (out * in >= 65536)
    for (int64_t i = 0; i < out * in; ++i)
        for (int64_t k = 1; k < chunks; ++k) dw[i] += p[(k - 1) * out * in + i];
}

}  // namespace

Variable pointwise_conv2d(const Variable& x, const Variable& weight, const Variable& bias) {
    const Shape& xs = x.shape();
    const int64_t m = xs[0] * xs[1] * xs[2], in = xs[3], out = weight.shape()[0];
    Tensor y = Tensor::empty({xs[0], xs[1], xs[2], out});
    tiled_product(x.value().f32(), weight.value().f32(), 'T', bias.defined() ? bias.value().f32() : nullptr, y.f32(), m,
                  out, in);

    return make_result(y, "conv2d pointwise", {x, weight, bias}, [x, weight, bias, m, in, out](const Tensor& dy) {
        if (x.requires_grad()) {
            Tensor dx = Tensor::empty(x.shape());
            tiled_product(dy.f32(), weight.value().f32(), 'N', nullptr, dx.f32(), m, in, out);
            x.accumulate_grad(dx);
        }
        if (weight.requires_grad()) {
            Tensor dw = Tensor::empty(weight.shape());
            weight_gradient(dy.f32(), x.value().f32(), dw.f32(), m, out, in);
            weight.accumulate_grad(dw);
        }
        if (bias.defined() && bias.requires_grad()) {
            const ChannelSums sums = channel_sums(dy.f32(), dy.f32(), m, out);  // db = column sums of dy
            Tensor db = Tensor::empty(bias.shape());
            for (int64_t c = 0; c < out; ++c) db.f32()[c] = static_cast<float>(sums.u[c]);
            bias.accumulate_grad(db);
        }
    });
}

}  // namespace hfq
