/* RMSNorm over the last dim on the GPU (also per head on [N, H, D]), fp32 arithmetic, rstd saved F32.
 * x/y/dy/dx share the activation dtype (BF16 or F32); the gain w and its gradient dw may be F32 master
 * weights.
 *
 * The kernels are bandwidth-bound, so the layout is chosen to read each byte once with 16-byte loads:
 * a team of threads owns a row (lanes of a warp for rows of at most 32 vectors, else the whole block), and
 * thread t of the team holds the vectors t, t + team, ... (TILES of them) of the row in registers, so
 * that the row's sum (of squares, or of x w dy) needs one team reduction and nothing is read twice.
 * The backward does dx and dw in one pass: each thread adds its columns' dy x rstd into registers over
 * the rows its team visits (a grid-stride loop over a grid of about one wave), the block's warps are
 * combined in warp order through shared memory, and a second kernel adds the blocks' partial sums in
 * block order. No atomics: the same grid on the same device gives bit-identical dw.
 *
 * The residual add + RMSNorm (add_rmsnorm_*) is the same kernels with RESIDUAL set: the forward loads x
 * and r, stores h = x + r rounded to the activation dtype and normalises that h (what the backward
 * reads); the backward adds the gradient reaching h, dh, to the norm's dx and adds the sum to both dx
 * and dr. Each rounds as the unfused add, rmsnorm and axpy kernels do, so that the fused op's results
 * are theirs bit for bit where the rows are 16-byte aligned (a model with and without recomputation,
 * which fuses one add fewer per block, trains bit-identically; tests/gpu add_rmsnorm_case). */
#include <math.h>

#include "limits.h"
#include "primitives.cuh"

using namespace msacuda;

/* Rows of at most 32 vectors go to a group of lanes of a warp, a vector a lane (the group the smallest
 * power of two of at least ROW_LANES_MIN lanes that holds the row: a warp takes 32 / lanes rows at a
 * time); longer rows take a block each, of as many threads as keep the vectors a thread holds (and its
 * registers) fewest: more resident threads, more loads in flight. */
#define WARP_ROW_VECS 32
#define ROW_LANES_MIN 4
#define WARP_ROWS_BLOCK 256 /* threads of a block of warp-owned rows */
/* A block-owned row takes at most this many threads: the bound leaves 255 registers a thread for its
 * TILES (<= 8) vectors of x and dy, the dw sums and the gains of its columns. */
#define MAX_THREADS 256

/* The gains of the thread's columns, read once: the row loop then loads only activations. */
template <typename Tw, int VEC, int TILES>
__device__ __forceinline__ void load_gains(float (&g)[TILES][VEC], const Tw *w, int C, int thread, int team, bool unit_offset) {
#pragma unroll
    for (int k = 0; k < TILES; k++) {
        const int c0 = (thread + k * team) * VEC;
#pragma unroll
        for (int j = 0; j < VEC; j++)
            g[k][j] = !w || c0 >= C ? 1.0f : unit_offset ? 1.0f + to_f32(w[c0 + j]) : to_f32(w[c0 + j]);
    }
}

/* This thread's vectors of row r of src (those inside the row). */
template <typename Tx, int VEC, int TILES>
__device__ __forceinline__ void load_row(Vec<Tx, VEC> (&v)[TILES], const Tx *src, int64_t r, int C, int thread, int team) {
#pragma unroll
    for (int k = 0; k < TILES; k++) {
        const int c0 = (thread + k * team) * VEC;
        if (c0 < C) v[k] = load_vec<Tx, VEC>(src + r * C + c0);
    }
}

/* h = x + r over this thread's vectors of row r (xv holds x, then h as the activation dtype rounds it:
 * what the norm and its backward see), stored to h. The sum as the add kernel forms it (elementwise.cu:
 * fp64, one rounding), so that h is add's h bit for bit. */
template <typename Tx, int VEC, int TILES>
__device__ __forceinline__ void add_residual(Vec<Tx, VEC> (&xv)[TILES], const Vec<Tx, VEC> (&rv)[TILES], Tx *h, int64_t r,
                                             int C, int thread, int team) {
#pragma unroll
    for (int k = 0; k < TILES; k++) {
        const int c0 = (thread + k * team) * VEC;
        if (c0 >= C) continue;
#pragma unroll
        for (int j = 0; j < VEC; j++) xv[k].v[j] = from_f64<Tx>(to_f64(xv[k].v[j]) + to_f64(rv[k].v[j]));
        *reinterpret_cast<Vec<Tx, VEC> *>(h + r * C + c0) = xv[k];
    }
}

/* The next row's loads are issued before this row's team reduction (whose barrier would otherwise let the
 * loads in flight run dry at every row), where the registers allow a second row. */
#define PREFETCH_TILES_MAX 4

/* Which rows this thread's team visits and which vectors of a row the thread holds. The loop runs over
 * rounds: round r0 gives the team the row r0 + sub, so that every lane of a warp (every thread of a block)
 * makes the same number of rounds and meets the same shuffles and barriers; a team whose row is past the
 * end sits the round out. lanes: the lanes of a warp-owned row, 0 when a block owns a row. */
struct Team {
    int64_t first_round, round_stride;
    int sub;          /* the team's row within a round */
    int thread, size; /* the thread's rank in the team, the team's threads */
};

__device__ __forceinline__ Team team_of(int lanes) {
    const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, per_warp = lanes ? 32 / lanes : 0;
    if (lanes)
        return {(blockIdx.x * (int64_t)warps + (threadIdx.x >> 5)) * per_warp, (int64_t)gridDim.x * warps * per_warp,
                lane / lanes, lane % lanes, lanes};
    return {blockIdx.x, gridDim.x, 0, (int)threadIdx.x, (int)blockDim.x};
}

/* The sum over the team; every thread of the team gets it. Called by every thread of the warp (the
 * butterfly stays within each aligned group of `lanes`) or of the block. */
__device__ __forceinline__ float team_sum(float v, int lanes, float *sh) {
    if (!lanes) return block_sum(v, sh);
    for (int o = lanes >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* The rows are held as loaded (BF16 pairs stay packed) to leave registers for the TILES vectors.
 * RESIDUAL: the row is x + res, stored to h (add_residual). */
template <typename Tx, typename Tw, int VEC, int TILES, bool RESIDUAL>
__global__ void __launch_bounds__(MAX_THREADS) rmsnorm_fwd_kernel(Tx *y, float *rstd, Tx *h, const Tx *x, const Tx *res,
                                                                  const Tw *w, int64_t rows, int C, float eps,
                                                                  bool unit_offset, int lanes) {
    __shared__ float sh[32];
    const Team tm = team_of(lanes);
    float g[TILES][VEC];
    load_gains<Tw, VEC, TILES>(g, w, C, tm.thread, tm.size, unit_offset);
    Vec<Tx, VEC> xn[TILES] = {}, rn[TILES] = {};
    if (TILES <= PREFETCH_TILES_MAX && tm.first_round + tm.sub < rows) {
        load_row(xn, x, tm.first_round + tm.sub, C, tm.thread, tm.size);
        if (RESIDUAL) load_row(rn, res, tm.first_round + tm.sub, C, tm.thread, tm.size);
    }
    for (int64_t r0 = tm.first_round; r0 < rows; r0 += tm.round_stride) {
        const int64_t r = r0 + tm.sub;
        const bool live = r < rows;
        Vec<Tx, VEC> xv[TILES] = {}, rv[TILES] = {};
        if (TILES <= PREFETCH_TILES_MAX) {
#pragma unroll
            for (int k = 0; k < TILES; k++) xv[k] = xn[k], rv[k] = rn[k];
            if (r + tm.round_stride < rows) {
                load_row(xn, x, r + tm.round_stride, C, tm.thread, tm.size);
                if (RESIDUAL) load_row(rn, res, r + tm.round_stride, C, tm.thread, tm.size);
            }
        } else if (live) {
            load_row(xv, x, r, C, tm.thread, tm.size);
            if (RESIDUAL) load_row(rv, res, r, C, tm.thread, tm.size);
        }
        if (RESIDUAL && live) add_residual(xv, rv, h, r, C, tm.thread, tm.size);
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < TILES; k++) {
            const int c0 = (tm.thread + k * tm.size) * VEC;
            if (c0 >= C) continue;
#pragma unroll
            for (int j = 0; j < VEC; j++) ss += to_f32(xv[k].v[j]) * to_f32(xv[k].v[j]);
        }
        ss = team_sum(ss, lanes, sh);
        if (!live) continue;
        const float rs = 1.0f / sqrtf(ss / (float)C + eps);
        if (tm.thread == 0) rstd[r] = rs;
#pragma unroll
        for (int k = 0; k < TILES; k++) {
            const int c0 = (tm.thread + k * tm.size) * VEC;
            if (c0 >= C) continue;
            float o[VEC];
#pragma unroll
            for (int j = 0; j < VEC; j++) o[j] = to_f32(xv[k].v[j]) * rs * g[k][j];
            store_f32(y + r * C + c0, o);
        }
    }
}

/* One element of the norm's dx added to old, rmsnorm_backward's and add_rmsnorm_backward's one expression
 * (the fused op's gradient of h rounds as the unfused rmsnorm's dx into the gradient buffer of h). */
__device__ __forceinline__ float plus_norm_dx(float old, float rs, float g, float dy, float kx, float x) {
    return old + rs * g * dy - kx * x;
}

/* dx += rstd (w dy) - rstd^3 / C (x . w dy) x, and (when dw_partial) the block's sum over its rows of
 * dy x rstd into dw_partial[blockIdx.x][:]. RESIDUAL: x is h = x + r of the forward, and dx and dr (each
 * NULL: skip) both get dh (NULL: 0) + that norm gradient. */
template <typename Tx, typename Tw, int VEC, int TILES, bool RESIDUAL>
__global__ void __launch_bounds__(MAX_THREADS) rmsnorm_bwd_kernel(Tx *dx, Tx *dr, float *dw_partial, const Tx *dy,
                                                                  const Tx *dh, const Tx *x, const Tw *w,
                                                                  const float *rstd, int64_t rows, int C,
                                                                  bool unit_offset, int lanes) {
    __shared__ float sh[32];
    const Team tm = team_of(lanes);
    float g[TILES][VEC], acc[TILES][VEC];
    load_gains<Tw, VEC, TILES>(g, w, C, tm.thread, tm.size, unit_offset);
#pragma unroll
    for (int k = 0; k < TILES; k++)
#pragma unroll
        for (int j = 0; j < VEC; j++) acc[k][j] = 0.0f;
    Vec<Tx, VEC> xn[TILES] = {}, dyn[TILES] = {};
    if (TILES <= PREFETCH_TILES_MAX && tm.first_round + tm.sub < rows) {
        load_row(xn, x, tm.first_round + tm.sub, C, tm.thread, tm.size);
        load_row(dyn, dy, tm.first_round + tm.sub, C, tm.thread, tm.size);
    }
    for (int64_t r0 = tm.first_round; r0 < rows; r0 += tm.round_stride) {
        const int64_t r = r0 + tm.sub;
        const bool live = r < rows;
        Vec<Tx, VEC> xv[TILES] = {}, dyv[TILES] = {};
        if (TILES <= PREFETCH_TILES_MAX) {
#pragma unroll
            for (int k = 0; k < TILES; k++) xv[k] = xn[k], dyv[k] = dyn[k];
            if (r + tm.round_stride < rows) {
                load_row(xn, x, r + tm.round_stride, C, tm.thread, tm.size);
                load_row(dyn, dy, r + tm.round_stride, C, tm.thread, tm.size);
            }
        } else if (live) {
            load_row(xv, x, r, C, tm.thread, tm.size);
            load_row(dyv, dy, r, C, tm.thread, tm.size);
        }
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < TILES; k++) {
            const int c0 = (tm.thread + k * tm.size) * VEC;
            if (c0 >= C) continue;
#pragma unroll
            for (int j = 0; j < VEC; j++) dot += to_f32(xv[k].v[j]) * g[k][j] * to_f32(dyv[k].v[j]);
        }
        dot = team_sum(dot, lanes, sh);
        if (!live) continue;
        const float rs = rstd[r], kx = rs * rs * rs / (float)C * dot;
#pragma unroll
        for (int k = 0; k < TILES; k++) {
            const int c0 = (tm.thread + k * tm.size) * VEC;
            if (c0 >= C) continue;
            if (dw_partial)
#pragma unroll
                for (int j = 0; j < VEC; j++) acc[k][j] += to_f32(dyv[k].v[j]) * to_f32(xv[k].v[j]) * rs;
            if (RESIDUAL) {
                /* the unfused sequence's arithmetic: dh + the norm's dx rounded to the activation dtype (its
                 * gradient buffer), then added to dx and dr as axpy adds (fp32 sum, one rounding) */
                float dsum[VEC];
                Vec<Tx, VEC> dhv = {};
                if (dh) dhv = load_vec<Tx, VEC>(dh + r * C + c0);
#pragma unroll
                for (int j = 0; j < VEC; j++)
                    dsum[j] = to_f32(from_f32<Tx>(plus_norm_dx(dh ? to_f32(dhv.v[j]) : 0.0f, rs, g[k][j],
                                                               to_f32(dyv[k].v[j]), kx, to_f32(xv[k].v[j]))));
                /* one tensor after the other, each read after the previous store: dx and dr may alias */
                Tx *const outs[2] = {dx, dr};
#pragma unroll
                for (int o = 0; o < 2; o++) {
                    if (!outs[o]) continue;
                    const Vec<Tx, VEC> old = load_vec<Tx, VEC>(outs[o] + r * C + c0);
                    float d[VEC];
#pragma unroll
                    for (int j = 0; j < VEC; j++) d[j] = to_f32(old.v[j]) + dsum[j];
                    store_f32(outs[o] + r * C + c0, d);
                }
            } else if (dx) {
                const Vec<Tx, VEC> old = load_vec<Tx, VEC>(dx + r * C + c0);
                float d[VEC];
#pragma unroll
                for (int j = 0; j < VEC; j++)
                    d[j] = plus_norm_dx(to_f32(old.v[j]), rs, g[k][j], to_f32(dyv[k].v[j]), kx, to_f32(xv[k].v[j]));
                store_f32(dx + r * C + c0, d);
            }
        }
    }
    if (!dw_partial) return;
    float *out = dw_partial + (int64_t)blockIdx.x * C;
    if (!lanes) {
#pragma unroll
        for (int k = 0; k < TILES; k++) {
            const int c0 = (tm.thread + k * tm.size) * VEC;
            if (c0 < C)
#pragma unroll
                for (int j = 0; j < VEC; j++) out[c0 + j] = acc[k][j];
        }
        return;
    }
    /* the teams of a warp hold the same columns: a butterfly over the teams (the same sums in every team),
     * then the block's warps in warp order through shared memory (a warp row holds at most WARP_ROW_VECS
     * vectors of at most 8 elements) */
#pragma unroll
    for (int k = 0; k < TILES; k++)
#pragma unroll
        for (int j = 0; j < VEC; j++)
            for (int o = lanes; o < 32; o <<= 1) acc[k][j] += __shfl_xor_sync(0xffffffffu, acc[k][j], o);
    __shared__ float sum[WARP_ROW_VECS * 8];
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int wi = 0; wi < warps; wi++) {
        if (warp == wi && tm.sub == 0)
#pragma unroll
            for (int k = 0; k < TILES; k++) {
                const int c0 = (tm.thread + k * tm.size) * VEC;
                if (c0 < C)
#pragma unroll
                    for (int j = 0; j < VEC; j++) sum[c0 + j] = wi == 0 ? acc[k][j] : sum[c0 + j] + acc[k][j];
            }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x) out[c] = sum[c];
}

/* dw[c] += the sum of partial[0 .. parts)[c] in part order: 16 running sums (parts p = y mod 16) per
 * column, then those 16 in order. */
#define FINISH_COLS 32
#define FINISH_SUMS 16
template <typename Tw> __global__ void rmsnorm_dw_finish_kernel(Tw *dw, const float *partial, int C, int parts) {
    __shared__ float sh[FINISH_SUMS][FINISH_COLS + 1];
    const int c = blockIdx.x * FINISH_COLS + threadIdx.x;
    float s = 0.0f;
    if (c < C)
        for (int p = threadIdx.y; p < parts; p += FINISH_SUMS) s += partial[(int64_t)p * C + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0 || c >= C) return;
    s = 0.0f;
    for (int i = 0; i < FINISH_SUMS; i++) s += sh[i][threadIdx.x];
    dw[c] = from_f32<Tw>(to_f32(dw[c]) + s);
}

/* How a row of C elements is spread over a team (see the file comment). */
struct Layout {
    int vec, tiles, threads; /* elements per load, loads per thread per row, threads per block */
    int lanes; /* the lanes of a warp-owned row; 0: a block a row */
};

static bool aligned16(const void *p) { return p == nullptr || (uintptr_t)p % 16 == 0; }

static Layout layout_of(const char *what, int64_t C, size_t elem_bytes, bool aligned) {
    const int wide = (int)(16 / elem_bytes);
    Layout l;
    l.vec = aligned && C % wide == 0 ? wide : 1;
    const int64_t vecs = C / l.vec;
    if (vecs <= WARP_ROW_VECS) {
        for (l.lanes = ROW_LANES_MIN; l.lanes < vecs; l.lanes *= 2) {}
        l.threads = WARP_ROWS_BLOCK;
        l.tiles = 1;
        return l;
    }
    l.lanes = 0;
    /* the fewest vectors a thread (registers) with at most MAX_THREADS threads a row */
    for (l.tiles = 1; l.tiles <= 8; l.tiles *= 2) {
        l.threads = (int)((vecs + l.tiles - 1) / l.tiles + 31) / 32 * 32;
        if (l.threads <= MAX_THREADS) return l;
    }
    fatal("cuda %s: rows of %lld elements are more than the kernels take (%d; %d in 16-byte aligned rows of a "
          "multiple of %d elements; kernels/cuda/limits.h CUDA_NORM_DIM_MAX)", what, (long long)C, MAX_THREADS * 8,
          MAX_THREADS * 8 * wide, wide);
}

/* Blocks for the grid-stride loop over the rows: about one wave, fewer when the rows run out. */
template <typename K> static int grid_of(K kernel, const Layout &l, int64_t rows) {
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, l.threads, 0));
    const int64_t rows_per_block = l.lanes ? l.threads / 32 * (32 / l.lanes) : 1,
                  need = (rows + rows_per_block - 1) / rows_per_block;
    const int64_t wave = (int64_t)sm_count() * (per_sm > 0 ? per_sm : 1);
    return (int)(need < wave ? need : wave);
}

/* Instantiate f<VEC, TILES> for the layout's values (VEC the 16-byte width of T, or 1). */
#define WITH_LAYOUT(l, T, VEC, TILES, ...)                                                        \
    do {                                                                                          \
        constexpr int WIDE_ = 16 / (int)sizeof(T);                                                \
        if ((l).vec == 1) {                                                                       \
            constexpr int VEC = 1;                                                                \
            WITH_TILES_((l).tiles, TILES, __VA_ARGS__);                                           \
        } else {                                                                                  \
            constexpr int VEC = WIDE_;                                                            \
            WITH_TILES_((l).tiles, TILES, __VA_ARGS__);                                           \
        }                                                                                         \
    } while (0)
#define WITH_TILES_(tiles, TILES, ...)                                                            \
    switch (tiles) {                                                                              \
    case 1: { constexpr int TILES = 1; __VA_ARGS__; } break;                                      \
    case 2: { constexpr int TILES = 2; __VA_ARGS__; } break;                                      \
    case 4: { constexpr int TILES = 4; __VA_ARGS__; } break;                                      \
    default: { constexpr int TILES = 8; __VA_ARGS__; } break;                                     \
    }

static void check_args(const char *what, const Tensor *x, const Tensor *w, const Tensor *rstd) {
    const int64_t C = tensor_dim(x, -1);
    if (w && w->numel != C) fatal("cuda %s: gain has %lld elements, rows have %lld", what, (long long)w->numel, (long long)C);
    if (rstd->numel != tensor_rows(x)) fatal("cuda %s: rstd must have one entry per row", what);
    if (rstd->dtype != DT_F32) fatal("cuda %s: rstd must be f32, got %s", what, dtype_name(rstd->dtype));
}

static void same_act(const char *what, const Tensor *x, const Tensor *t) {
    if (t && (t->dtype != x->dtype || t->numel != x->numel))
        fatal("cuda %s: activations and their gradients must share x's dtype (%s) and size", what, dtype_name(x->dtype));
}

/* The forward of rmsnorm (RESIDUAL false: h and res NULL) and of add_rmsnorm. */
template <bool RESIDUAL>
static void norm_forward(const char *what, Tensor *y, Tensor *rstd, Tensor *h, const Tensor *x, const Tensor *res,
                         const Tensor *w, float eps, bool unit_offset) {
    init();
    check_args(what, x, w, rstd);
    same_act(what, x, y);
    same_act(what, x, h);
    same_act(what, x, res);
    const int64_t rows = tensor_rows(x), C = tensor_dim(x, -1);
    if (rows == 0) return;
    const bool aligned = aligned16(x->data) && aligned16(y->data) && aligned16(h ? h->data : nullptr) &&
                         aligned16(res ? res->data : nullptr);
    const Layout l = layout_of(what, C, dtype_size(x->dtype), aligned);
    DISPATCH_FLOAT(x->dtype, Tx, what, DISPATCH_FLOAT(w ? w->dtype : DT_F32, Tw, what, {
        WITH_LAYOUT(l, Tx, VEC, TILES, {
            auto kernel = rmsnorm_fwd_kernel<Tx, Tw, VEC, TILES, RESIDUAL>;
            kernel<<<grid_of(kernel, l, rows), l.threads, 0, stream()>>>((Tx *)y->data, (float *)rstd->data,
                                                            h ? (Tx *)h->data : nullptr, (const Tx *)x->data,
                                                            res ? (const Tx *)res->data : nullptr,
                                                            w ? (const Tw *)w->data : nullptr, rows, (int)C, eps,
                                                            unit_offset, l.lanes);
            LAUNCH_CHECK(what);
        });
    }));
}

/* The backward of rmsnorm (RESIDUAL false: dr and dh NULL) and of add_rmsnorm (x is h). */
template <bool RESIDUAL>
static void norm_backward(const char *what, Tensor *dx, Tensor *dr, Tensor *dw, const Tensor *dy, const Tensor *dh,
                          const Tensor *x, const Tensor *w, const Tensor *rstd, bool unit_offset) {
    init();
    if (!dx && !dr && !dw) return;
    check_args(what, x, w, rstd);
    same_act(what, x, dy);
    same_act(what, x, dx);
    same_act(what, x, dr);
    same_act(what, x, dh);
    if (dw && (!w || dw->numel != w->numel)) fatal("cuda %s: dw without a gain of its size", what);
    const int64_t rows = tensor_rows(x), C = tensor_dim(x, -1);
    if (rows == 0) return;
    const bool aligned = aligned16(x->data) && aligned16(dy->data) && aligned16(dx ? dx->data : nullptr) &&
                         aligned16(dr ? dr->data : nullptr) && aligned16(dh ? dh->data : nullptr);
    const Layout l = layout_of(what, C, dtype_size(x->dtype), aligned);
    int blocks = 0;
    float *partial = nullptr;
    DISPATCH_FLOAT(x->dtype, Tx, what, DISPATCH_FLOAT(w ? w->dtype : DT_F32, Tw, what, {
        WITH_LAYOUT(l, Tx, VEC, TILES, {
            auto kernel = rmsnorm_bwd_kernel<Tx, Tw, VEC, TILES, RESIDUAL>;
            /* the plain kernel's grid for both: the same blocks sum the same rows into dw, so add_rmsnorm's
             * dw is rmsnorm's bit for bit (their occupancy is the same but in rows of single elements) */
            blocks = grid_of(rmsnorm_bwd_kernel<Tx, Tw, VEC, TILES, false>, l, rows);
            if (dw) partial = (float *)scratch((size_t)blocks * (size_t)C * sizeof(float));
            kernel<<<blocks, l.threads, 0, stream()>>>(dx ? (Tx *)dx->data : nullptr, dr ? (Tx *)dr->data : nullptr, partial,
                                          (const Tx *)dy->data, dh ? (const Tx *)dh->data : nullptr,
                                          (const Tx *)x->data, w ? (const Tw *)w->data : nullptr,
                                          (const float *)rstd->data, rows, (int)C, unit_offset, l.lanes);
            LAUNCH_CHECK(what);
        });
    }));
    if (!dw) return;
    DISPATCH_FLOAT(dw->dtype, Tw, what, {
        const dim3 threads(FINISH_COLS, FINISH_SUMS);
        rmsnorm_dw_finish_kernel<Tw><<<(unsigned)((C + FINISH_COLS - 1) / FINISH_COLS), threads, 0, stream()>>>((Tw *)dw->data, partial,
                                                                                                  (int)C, blocks);
        LAUNCH_CHECK(what);
    });
}

extern "C" void cuda_rmsnorm_forward(Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *w, float eps, bool unit_offset) {
    norm_forward<false>("rmsnorm_forward", y, rstd, nullptr, x, nullptr, w, eps, unit_offset);
}

extern "C" void cuda_rmsnorm_backward(Tensor *dx, Tensor *dw, const Tensor *dy, const Tensor *x, const Tensor *w,
                                      const Tensor *rstd, bool unit_offset) {
    norm_backward<false>("rmsnorm_backward", dx, nullptr, dw, dy, nullptr, x, w, rstd, unit_offset);
}

extern "C" void cuda_add_rmsnorm_forward(Tensor *h, Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *r,
                                         const Tensor *w, float eps) {
    if (!h || !r) fatal("cuda add_rmsnorm_forward: h and r are required");
    norm_forward<true>("add_rmsnorm_forward", y, rstd, h, x, r, w, eps, false);
}

extern "C" void cuda_add_rmsnorm_backward(Tensor *dx, Tensor *dr, Tensor *dw, const Tensor *dy, const Tensor *dh,
                                          const Tensor *h, const Tensor *w, const Tensor *rstd) {
    norm_backward<true>("add_rmsnorm_backward", dx, dr, dw, dy, dh, h, w, rstd, false);
}
