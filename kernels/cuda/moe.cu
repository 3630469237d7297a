/* MoE kernels of the CUDA backend (backend.h, "MoE"; DESIGN §3; train/moe.c composes them). The CPU
 * reference is kernels/cpu/moe_router*.{c,h} and moe_dispatch*.{c,h}; every kernel here computes what
 * its CPU twin does, in fp32 (the Top-k comparison in fp64, as the CPU's, so that the selection is
 * identical for identical scores).
 *
 * Dtypes (train/moe.c on CUDA): logits, scores, combine weights and the token activations BF16 (F32 is
 * accepted everywhere, for the fp32 tests; logits and scores, or scores and combine weights, may even
 * differ); idx, offsets and rows i32; the selection bias, the losses, z-loss's lse and dloss F32, the
 * routing statistics' accumulator F64; the expert weights F32 master parameters read by the GEMMs through
 * their BF16 shadow.
 *
 * Determinism: no atomic operation decides a value. Each output element is written by one thread (or
 * one warp, reducing in a fixed order); the losses are summed by one block in a fixed order (fp64); the
 * routing statistics and the selection bias's update (no host read: layers/moe.c) by one thread, in the
 * CPU's order, so that both backends give the same bits.
 * The plan is a stable radix sort (CUB) of the assignments by expert: the rows and offsets are exactly
 * the CPU's counting sort (tokens keep their order inside an expert).
 *
 * Bad input (an expert index outside [0, E), scores Top-k cannot rank, a rows entry outside the grouped
 * buffer, offsets that do not cut the grouped buffer into ordered segments) is recorded in the backend's
 * device error word (common.cuh: ERR_MOE_*, report_error_at) by the kernel that meets it and reported, with
 * the kernel's name, at the next copy to the host (check_device_errors; in training the logged steps' loss
 * read), so no kernel here makes the host wait but the per-expert GEMMs. The first kind of bad input met
 * (in stream order) is reported, at the lowest position its kernels met before the read: which thread got
 * there first decides nothing. Meanwhile the kernels skip the bad entries (a bad idx entry is sorted past
 * the last expert, outside every segment; a bad segment is computed as empty), so memory is never touched
 * outside the tensors. The per-expert GEMMs copy the offsets to the host anyway and read the error word
 * right after, so that bad input is reported as itself before the offsets it spoiled.
 *
 * The grouped GEMMs: BF16 activations with widths that are multiples of 8 and 16-byte aligned tensors
 * (training) run as one CUTLASS grouped GEMM launch per product that reads the offsets on the device
 * (moe_grouped_gemm.cuh); anything else (F32, odd widths, a BF16 weight gradient) as one cuBLASLt GEMM per
 * non-empty expert after one copy of the offsets to the host. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_grouped_gemm.cuh"
#include "primitives.cuh"

using namespace msacuda;

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int FINISH_THREADS = 1024;
/* positions are packed into 32 bits: every indexed tensor here stays below 2^31 elements */
void need_i32_positions(const char *kernel, int64_t n) {
    if (n > INT32_MAX) fatal("cuda %s: %lld entries overflow the i32 indices", kernel, (long long)n);
}

/* ---- shape and dtype checks ---- */

void need_float(const char *kernel, const Tensor *t, const char *what) {
    if (t->dtype != DT_F32 && t->dtype != DT_BF16)
        fatal("cuda %s: %s must be f32 or bf16, got %s", kernel, what, dtype_name(t->dtype));
}

void need_same_dtype(const char *kernel, const Tensor *a, const Tensor *b, const char *what) {
    if (a->dtype != b->dtype)
        fatal("cuda %s: %s must have the dtype %s, got %s", kernel, what, dtype_name(a->dtype), dtype_name(b->dtype));
}

void need_f32(const char *kernel, const Tensor *t, int64_t numel, const char *what) {
    if (t->dtype != DT_F32 || t->numel != numel)
        fatal("cuda %s: %s must be f32 with %lld elements, got %s with %lld", kernel, what, (long long)numel,
              dtype_name(t->dtype), (long long)t->numel);
}

void need_numel(const char *kernel, const Tensor *t, int64_t numel, const char *what) {
    if (t->numel != numel)
        fatal("cuda %s: %s must have %lld elements, got %lld", kernel, what, (long long)numel, (long long)t->numel);
}

/* idx i32 [N, k] for scores [N, E]; returns k */
int check_idx(const char *kernel, const Tensor *idx, int64_t N) {
    if (idx->dtype != DT_I32 || idx->ndim != 2 || idx->shape[0] != N)
        fatal("cuda %s: idx must be i32 [N, k] with N = %lld", kernel, (long long)N);
    need_i32_positions(kernel, idx->numel);
    return (int)idx->shape[1];
}

/* rows i32 [N, k] with N*k = M rows in the grouped buffer; returns k */
int check_rows(const char *kernel, const Tensor *rows, int64_t N, int64_t M) {
    if (rows->dtype != DT_I32 || rows->ndim != 2 || rows->shape[0] != N || rows->numel != M)
        fatal("cuda %s: rows must be i32 [%lld, k] with N*k = %lld rows in the grouped buffer", kernel, (long long)N,
              (long long)M);
    need_i32_positions(kernel, M);
    return (int)rows->shape[1];
}

/* The shapes of a permute or unpermute: token rows tok [N, C], the grouped buffer grp [M, C] (named
 * grp_name in the message) and rows i32 [N, k] with N*k = M. Returns k; N, C and M through the
 * references. */
int check_permute_shapes(const char *kernel, const Tensor *tok, const Tensor *grp, const char *grp_name, const Tensor *rows,
                         int64_t &N, int64_t &C, int64_t &M) {
    N = tensor_rows(tok);
    C = tensor_dim(tok, -1);
    M = tensor_rows(grp);
    const int k = check_rows(kernel, rows, N, M);
    if (tensor_dim(grp, -1) != C) fatal("cuda %s: %s must be [N*k, %lld]", kernel, grp_name, (long long)C);
    return k;
}

void check_offsets(const char *kernel, const Tensor *offsets, int64_t E) {
    if (offsets->dtype != DT_I32 || offsets->numel != E + 1)
        fatal("cuda %s: offsets must be i32 [E+1] with E = %lld", kernel, (long long)E);
}

/* a loss scalar of moe_stats_accumulate: f32 or f64 with one element, or NULL; whether it is f64 */
int stats_loss_f64(const char *what, const Tensor *loss) {
    if (!loss) return 0;
    if ((loss->dtype != DT_F32 && loss->dtype != DT_F64) || loss->numel != 1)
        fatal("cuda moe_stats_accumulate: %s must be an f32 or f64 scalar, got %s with %lld elements", what,
              dtype_name(loss->dtype), (long long)loss->numel);
    return loss->dtype == DT_F64;
}

/* ---- warp-per-row loops: warp w of the grid takes rows w, w + warps, ... (all lanes together) ---- */

__device__ __forceinline__ int64_t warp_id() { return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; }
__device__ __forceinline__ int64_t warp_count() { return ((int64_t)gridDim.x * blockDim.x) >> 5; }
__device__ __forceinline__ int64_t thread_id() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return (int64_t)gridDim.x * blockDim.x; }

/* ---------------------------------------------------------------- router scores */

template <typename Ts, typename Tl>
__global__ void scores_fwd_kernel(Ts *s, const Tl *lg, int64_t N, int64_t E, int sigmoid) {
    const int lane = threadIdx.x & 31;
    for (int64_t t = warp_id(); t < N; t += warp_count()) {
        const Tl *l = lg + t * E;
        Ts *o = s + t * E;
        if (sigmoid) {
            for (int64_t e = lane; e < E; e += 32) o[e] = from_f32<Ts>(1.0f / (1.0f + expf(-to_f32(l[e]))));
            continue;
        }
        float mx = -INFINITY;
        for (int64_t e = lane; e < E; e += 32) mx = fmaxf(mx, to_f32(l[e]));
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int64_t e = lane; e < E; e += 32) sum += expf(to_f32(l[e]) - mx);
        const float inv = 1.0f / warp_sum(sum);
        for (int64_t e = lane; e < E; e += 32) o[e] = from_f32<Ts>(expf(to_f32(l[e]) - mx) * inv);
    }
}

/* sigmoid: dl += ds s (1 - s); softmax: dl += s (ds - <ds, s>) */
template <typename Tl, typename Ts>
__global__ void scores_bwd_kernel(Tl *dl, const Ts *ds, const Ts *s, int64_t N, int64_t E, int sigmoid) {
    const int lane = threadIdx.x & 31;
    for (int64_t t = warp_id(); t < N; t += warp_count()) {
        const Ts *g = ds + t * E, *p = s + t * E;
        Tl *d = dl + t * E;
        float dot = 0.0f;
        if (!sigmoid) {
            for (int64_t e = lane; e < E; e += 32) dot += to_f32(g[e]) * to_f32(p[e]);
            dot = warp_sum(dot);
        }
        for (int64_t e = lane; e < E; e += 32) {
            const float ge = to_f32(g[e]), pe = to_f32(p[e]);
            const float v = sigmoid ? ge * pe * (1.0f - pe) : pe * (ge - dot);
            d[e] = from_f32<Tl>(to_f32(d[e]) + v);
        }
    }
}

/* ---------------------------------------------------------------- Top-k */

/* One warp per token, k rounds. As on the CPU: the order is (score + bias) descending, then expert
 * ascending, and pick j is the best element strictly after pick j-1 in that order (no per-token mask).
 * The values are fp64 sums of the score and the bias, exactly the CPU's, so the picks agree bit for bit.
 * A NaN is never "after" anything and so never picked; a token without k rankable scores is flagged. */
template <typename T>
__global__ void topk_kernel(int32_t *idx, const T *s, const float *bias, int64_t N, int E, int k,
                            int *err) {
    const int lane = threadIdx.x & 31;
    for (int64_t t = warp_id(); t < N; t += warp_count()) {
        const T *p = s + t * (int64_t)E;
        double prev_v = INFINITY;
        int prev_e = -1;
        for (int j = 0; j < k; j++) {
            double bv = 0.0;
            int be = -1;
            for (int e = lane; e < E; e += 32) { /* ascending e with a strict '>': the lowest expert wins ties */
                const double v = (double)to_f32(p[e]) + (bias ? (double)bias[e] : 0.0);
                const bool after_prev = v < prev_v || (v == prev_v && e > prev_e);
                if (after_prev && (be < 0 || v > bv)) {
                    be = e;
                    bv = v;
                }
            }
            for (int o = 16; o > 0; o >>= 1) { /* butterfly: every lane ends with the warp's best */
                const double ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const int oe = __shfl_xor_sync(0xffffffffu, be, o);
                if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) {
                    be = oe;
                    bv = ov;
                }
            }
            if (be < 0) { /* as the CPU: expert 0 and value 0 stand in; the token is reported */
                if (lane == 0) report_error_at(err, ERR_MOE_TOPK, t, j);
                be = 0;
                bv = 0.0;
            }
            if (lane == 0) idx[t * k + j] = be;
            prev_v = bv;
            prev_e = be;
        }
    }
}

/* ---------------------------------------------------------------- combine weights */

/* one thread per token (k is small): w[t,j] = scale s[t,idx[t,j]] / z */
template <typename Tw, typename Ts>
__global__ void cw_fwd_kernel(Tw *w, const Ts *s, const int32_t *idx, int64_t N, int64_t E, int k, int renorm,
                              float scale, int *err) {
    for (int64_t t = thread_id(); t < N; t += thread_count()) {
        const Ts *p = s + t * E;
        const int32_t *id = idx + t * k;
        float z = 1.0f;
        if (renorm) {
            z = 0.0f;
            for (int j = 0; j < k; j++)
                if (id[j] >= 0 && id[j] < E) z += to_f32(p[id[j]]);
        }
        for (int j = 0; j < k; j++) {
            const int32_t e = id[j];
            float v = 0.0f;
            if (e < 0 || e >= E) report_error_at(err, ERR_MOE_COMBINE, t * k + j, e);
            else v = scale * to_f32(p[e]) / z;
            w[t * k + j] = from_f32<Tw>(v);
        }
    }
}

/* w_j = scale s_j / z, z = sum_i s_i: ds_i += scale (dw_i - <dw, s>/z) / z (z = 1, no correction, without
 * renormalisation). Each token writes only its own row of ds, in slot order (a repeated expert adds twice,
 * as on the CPU). */
template <typename Ts, typename Tw>
__global__ void cw_bwd_kernel(Ts *ds, const Tw *dw, const Ts *s, const int32_t *idx, int64_t N, int64_t E, int k,
                              int renorm, float scale, int *err) {
    for (int64_t t = thread_id(); t < N; t += thread_count()) {
        const Ts *p = s + t * E;
        const Tw *g = dw + t * k;
        const int32_t *id = idx + t * k;
        Ts *d = ds + t * E;
        float z = 1.0f, gs = 0.0f;
        if (renorm) {
            z = 0.0f;
            for (int j = 0; j < k; j++)
                if (id[j] >= 0 && id[j] < E) {
                    z += to_f32(p[id[j]]);
                    gs += to_f32(g[j]) * to_f32(p[id[j]]);
                }
        }
        for (int j = 0; j < k; j++) {
            const int32_t e = id[j];
            if (e < 0 || e >= E) {
                report_error_at(err, ERR_MOE_COMBINE, t * k + j, e);
                continue;
            }
            const float v = renorm ? scale * (to_f32(g[j]) - gs / z) / z : scale * to_f32(g[j]);
            d[e] = from_f32<Ts>(to_f32(d[e]) + v);
        }
    }
}

/* ---------------------------------------------------------------- balance loss and z-loss */

/* f_e = (offsets[e+1] - offsets[e]) / M, the constant fraction of assignments expert e got */
__device__ __forceinline__ float load_fraction(const int32_t *off, int64_t e, float inv_m) {
    return (float)(off[e + 1] - off[e]) * inv_m;
}

/* One token's row p = s[t, :] in a warp: a = sum_e f_e p[e] and st = sum_e p[e], on every lane */
template <typename T>
__device__ __forceinline__ void aux_row_sums(const T *p, const int32_t *off, int64_t E, float inv_m, int lane, float &a,
                                             float &st) {
    a = 0.0f;
    st = 0.0f;
    for (int64_t e = lane; e < E; e += 32) {
        const float pe = to_f32(p[e]);
        a += load_fraction(off, e, inv_m) * pe;
        st += pe;
    }
    a = warp_sum(a);
    st = warp_sum(st);
}

/* a_t = sum_e f_e s[t,e] (/ sum_e s[t,e] when normalised), one warp per token, into val[t] */
template <typename T>
__global__ void aux_rows_kernel(float *val, const T *s, const int32_t *off, int64_t N, int64_t E, int norm) {
    const int lane = threadIdx.x & 31;
    const int32_t M = off[E];
    const float inv_m = M > 0 ? 1.0f / (float)M : 0.0f;
    for (int64_t t = warp_id(); t < N; t += warp_count()) {
        float a, st;
        aux_row_sums(s + t * E, off, E, inv_m, lane, a, st);
        if (lane == 0) val[t] = norm ? a / st : a;
    }
}

/* loss = E / N * sum_t val[t] (0 when N or M is 0): one block, fp64, fixed order */
__global__ void aux_finish_kernel(float *loss, const float *val, const int32_t *off, int64_t N, int64_t E) {
    __shared__ double sh[32];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) s += (double)val[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *loss = N > 0 && off[E] > 0 ? (float)((double)E * s / (double)N) : 0.0f;
}

/* ds[t,e] += g (f_e - a_t) / S_t when normalised, g f_e otherwise; g = dloss E / N */
template <typename T>
__global__ void aux_bwd_kernel(T *ds, const float *dloss, const T *s, const int32_t *off, int64_t N, int64_t E, int norm) {
    const int lane = threadIdx.x & 31;
    const int32_t M = off[E];
    if (M <= 0) return; /* no assignment: the loss is the constant 0 */
    const float inv_m = 1.0f / (float)M, g = (float)((double)dloss[0] * (double)E / (double)N);
    for (int64_t t = warp_id(); t < N; t += warp_count()) {
        const T *p = s + t * E;
        T *d = ds + t * E;
        float a = 0.0f, st = 1.0f;
        if (norm) {
            aux_row_sums(p, off, E, inv_m, lane, a, st);
            a /= st;
        }
        for (int64_t e = lane; e < E; e += 32)
            d[e] = from_f32<T>(to_f32(d[e]) + g * (load_fraction(off, e, inv_m) - a) / st);
    }
}

/* lse[t] = logsumexp(logits[t]), one warp per token */
template <typename T> __global__ void z_rows_kernel(float *lse, const T *lg, int64_t N, int64_t E) {
    const int lane = threadIdx.x & 31;
    for (int64_t t = warp_id(); t < N; t += warp_count()) {
        const T *l = lg + t * E;
        float mx = -INFINITY;
        for (int64_t e = lane; e < E; e += 32) mx = fmaxf(mx, to_f32(l[e]));
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int64_t e = lane; e < E; e += 32) sum += expf(to_f32(l[e]) - mx);
        sum = warp_sum(sum);
        if (lane == 0) lse[t] = mx + logf(sum);
    }
}

/* loss = mean of lse^2: one block, fp64, fixed order */
__global__ void z_finish_kernel(float *loss, const float *lse, int64_t N) {
    __shared__ double sh[32];
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) s += (double)lse[i] * (double)lse[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *loss = N > 0 ? (float)(s / (double)N) : 0.0f;
}

/* dl[t,e] += (2 dloss / N) lse_t softmax(l_t)_e */
template <typename T>
__global__ void z_bwd_kernel(T *dl, const float *dloss, const T *lg, const float *lse, int64_t N, int64_t E) {
    const float g = (float)(2.0 * (double)dloss[0] / (double)N);
    for (int64_t i = thread_id(); i < N * E; i += thread_count()) {
        const float z = lse[i / E];
        dl[i] = from_f32<T>(to_f32(dl[i]) + g * z * expf(to_f32(lg[i]) - z));
    }
}

/* ---------------------------------------------------------------- routing statistics */

/* a loss scalar (f32 or f64; null: 0) as a double */
__device__ __forceinline__ double loss_value(const void *loss, int f64) {
    if (!loss) return 0.0;
    return f64 ? *(const double *)loss : (double)*(const float *)loss;
}

/* acc[e] += offsets[e+1] - offsets[e], acc[E] += aux, acc[E+1] += z: one thread (E is small), so that the
 * sums are the CPU's */
__global__ void stats_accumulate_kernel(double *acc, const int32_t *off, int64_t E, const void *aux, int aux_f64,
                                        const void *z, int z_f64) {
    for (int64_t e = 0; e < E; e++) acc[e] += (double)(off[e + 1] - off[e]);
    acc[E] += loss_value(aux, aux_f64);
    acc[E + 1] += loss_value(z, z_f64);
}

/* bias[e] += rate sign(mean - load[e]), the mean summed in expert order in fp64 as on the CPU: one thread */
__global__ void bias_update_kernel(float *bias, const double *load, int64_t E, float rate) {
    double sum = 0.0;
    bool any = false;
    for (int64_t e = 0; e < E; e++) {
        sum += load[e];
        any |= load[e] != 0.0;
    }
    if (!any) return;
    const double mean = sum / (double)E;
    for (int64_t e = 0; e < E; e++) {
        const double d = mean - load[e];
        bias[e] = __fadd_rn(bias[e], rate * (float)((d > 0) - (d < 0))); /* no contraction: the CPU's float add */
    }
}

/* ---------------------------------------------------------------- plan */

/* keys[i] = idx[i] (E for a bad one, which sorts last and is reported with idx's E and k), vals[i] = i */
__global__ void expert_keys_kernel(uint32_t *keys, int32_t *vals, const int32_t *idx, int64_t M, int32_t E, int k,
                                   int *err) {
    for (int64_t i = thread_id(); i < M; i += thread_count()) {
        const int32_t e = idx[i];
        const bool bad = e < 0 || e >= E;
        if (bad) report_error_at(err, ERR_MOE_PLAN, i, e, E, k);
        keys[i] = bad ? (uint32_t)E : (uint32_t)e;
        vals[i] = (int32_t)i;
    }
}

/* rows[assignment at sorted position p] = p; offsets[e] = first sorted position with expert >= e */
__global__ void rows_offsets_kernel(int32_t *rows, int32_t *offsets, const uint32_t *sorted_keys,
                                   const int32_t *sorted_vals, int64_t M, int32_t E) {
    const int64_t n = M > (int64_t)E + 1 ? M : (int64_t)E + 1;
    for (int64_t p = thread_id(); p < n; p += thread_count()) {
        if (p < M) rows[sorted_vals[p]] = (int32_t)p;
        if (p <= E) offsets[p] = (int32_t)lower_bound(sorted_keys, M, (uint32_t)p);
    }
}

/* ---------------------------------------------------------------- permute / unpermute */

/* True when r = rows[a], assignment a's row in the grouped buffer, lies outside [0, M): the caller
 * skips the entry, which the one thread of its loop that `reporter` names has flagged (so that it is
 * flagged once, not once per channel). */
__device__ __forceinline__ bool bad_row(int32_t r, int64_t a, int64_t M, bool reporter, int *err) {
    if (r < 0 || r >= M) {
        if (reporter) report_error_at(err, ERR_MOE_ROWS, a, r);
        return true;
    }
    return false;
}

/* The row copies and slot sums below run a row per block step and a channel vector per thread: V channels
 * of type T in one load (16 bytes when the rows and pointers allow, else V = 1). A thread per element with
 * its row and channel from i / C and i % C (64-bit divisions, one per element) and 2-byte loads ran these
 * bandwidth-bound kernels at a third of the device's rate (the MoE profile: permute and unpermute 48 ms of a
 * 531 ms step); the sums keep their order (slots ascending, fp32), so the results are the same. The vector
 * access (Vec, load_vec, store_vec, vec_width) is primitives.cuh's. */

/* blocks for a row-per-block loop over n rows */
static int row_grid(int64_t n) { return (int)(n < (int64_t)sm_count() * 16 ? (n > 0 ? n : 1) : (int64_t)sm_count() * 16); }

/* xs[rows[a]] = x[a / k]: a row copy per assignment */
template <typename T, int V>
__global__ void permute_fwd_kernel(T *xs, const T *x, const int32_t *rows, int64_t M, int k, int64_t C, int *err) {
    for (int64_t a = blockIdx.x; a < M; a += gridDim.x) {
        const int32_t r = rows[a];
        if (bad_row(r, a, M, threadIdx.x == 0, err)) continue; /* uniform over the block */
        const T *src = x + (a / k) * C;
        T *dst = xs + (int64_t)r * C;
        for (int64_t c = (int64_t)threadIdx.x * V; c < C; c += (int64_t)blockDim.x * V) store_vec<T, V>(dst + c, load_vec<T, V>(src + c));
    }
}

/* acc = sum_j (w[t,j] if WEIGHTED) src[rows[t,j], c .. c+V) in slot order, fp32; a bad row is reported (by the
 * thread of column 0) and skipped */
template <typename T, typename Tw, int V, bool WEIGHTED>
__device__ __forceinline__ void gather_rows_sum(float (&acc)[V], const T *src, const int32_t *rows, const Tw *w, int64_t t,
                                                int k, int64_t C, int64_t c, int64_t M, int *err) {
#pragma unroll
    for (int e = 0; e < V; e++) acc[e] = 0.0f;
    for (int j = 0; j < k; j++) {
        const int32_t r = rows[t * k + j];
        if (bad_row(r, t * k + j, M, c == 0, err)) continue;
        const Vec<T, V> y = load_vec<T, V>(src + (int64_t)r * C + c);
        if constexpr (WEIGHTED) {
            const float wj = to_f32(w[t * k + j]);
#pragma unroll
            for (int e = 0; e < V; e++) acc[e] += wj * to_f32(y.v[e]);
        } else {
#pragma unroll
            for (int e = 0; e < V; e++) acc[e] += to_f32(y.v[e]);
        }
    }
}

/* dx[t,c] += sum_j dxs[rows[t,j], c] (slot order, fp32) */
template <typename T, int V>
__global__ void permute_bwd_kernel(T *dx, const T *dxs, const int32_t *rows, int64_t N, int k, int64_t C, int64_t M,
                                   int *err) {
    for (int64_t t = blockIdx.x; t < N; t += gridDim.x)
        for (int64_t c = (int64_t)threadIdx.x * V; c < C; c += (int64_t)blockDim.x * V) {
            float acc[V];
            gather_rows_sum<T, float, V, false>(acc, dxs, rows, nullptr, t, k, C, c, M, err);
            Vec<T, V> d = load_vec<T, V>(dx + t * C + c);
#pragma unroll
            for (int e = 0; e < V; e++) d.v[e] = from_f32<T>(to_f32(d.v[e]) + acc[e]);
            store_vec<T, V>(dx + t * C + c, d);
        }
}

/* out[t,c] = sum_j w[t,j] ys[rows[t,j], c] */
template <typename T, typename Tw, int V>
__global__ void unpermute_fwd_kernel(T *out, const T *ys, const Tw *w, const int32_t *rows, int64_t N, int k, int64_t C,
                                     int64_t M, int *err) {
    for (int64_t t = blockIdx.x; t < N; t += gridDim.x)
        for (int64_t c = (int64_t)threadIdx.x * V; c < C; c += (int64_t)blockDim.x * V) {
            float acc[V];
            gather_rows_sum<T, Tw, V, true>(acc, ys, rows, w, t, k, C, c, M, err);
            Vec<T, V> o;
#pragma unroll
            for (int e = 0; e < V; e++) o.v[e] = from_f32<T>(acc[e]);
            store_vec<T, V>(out + t * C + c, o);
        }
}

/* dys[rows[a], c] += w[a] dout[a / k, c], a row per assignment: rows are distinct, so no two blocks write one
 * element */
template <typename T, typename Tw, int V>
__global__ void unpermute_bwd_dys_kernel(T *dys, const T *dout, const Tw *w, const int32_t *rows, int64_t M, int k,
                                         int64_t C, int *err) {
    for (int64_t a = blockIdx.x; a < M; a += gridDim.x) {
        const int32_t r = rows[a];
        if (bad_row(r, a, M, threadIdx.x == 0, err)) continue; /* uniform over the block */
        const float wa = to_f32(w[a]);
        const T *g = dout + (a / k) * C;
        T *d = dys + (int64_t)r * C;
        for (int64_t c = (int64_t)threadIdx.x * V; c < C; c += (int64_t)blockDim.x * V) {
            Vec<T, V> x = load_vec<T, V>(d + c);
            const Vec<T, V> gv = load_vec<T, V>(g + c);
#pragma unroll
            for (int e = 0; e < V; e++) x.v[e] = from_f32<T>(to_f32(x.v[e]) + wa * to_f32(gv.v[e]));
            store_vec<T, V>(d + c, x);
        }
    }
}

/* dw[a] += <dout[a / k], ys[rows[a]]>, one warp per assignment */
template <typename T, typename Tw>
__global__ void unpermute_bwd_dw_kernel(Tw *dw, const T *dout, const T *ys, const int32_t *rows, int64_t M, int k,
                                        int64_t C, int *err) {
    const int lane = threadIdx.x & 31;
    for (int64_t a = warp_id(); a < M; a += warp_count()) {
        const int32_t r = rows[a];
        if (bad_row(r, a, M, lane == 0, err)) continue;
        const T *g = dout + (a / k) * C, *y = ys + (int64_t)r * C;
        float acc = 0.0f;
        for (int64_t c = lane; c < C; c += 32) acc += to_f32(g[c]) * to_f32(y[c]);
        acc = warp_sum(acc);
        if (lane == 0) dw[a] = from_f32<Tw>(to_f32(dw[a]) + acc);
    }
}

/* ---------------------------------------------------------------- grouped GEMM helpers */

/* rows [r0, r0 + m) of a 2-D tensor, as a 2-D tensor */
Tensor row_block(const Tensor *t, int64_t r0, int64_t m) {
    Tensor v = *t;
    const int64_t cols = t->shape[t->ndim - 1];
    v.ndim = 2;
    v.shape[0] = m;
    v.shape[1] = cols;
    v.shape[2] = v.shape[3] = 0;
    v.numel = m * cols;
    v.data = (char *)t->data + (size_t)(r0 * cols) * dtype_size(t->dtype);
    v.grad = nullptr;
    v.shadow = nullptr;
    return v;
}

/* expert e's matrix [out, in] of w [E, out, in], with the matching slice of its BF16 shadow */
Tensor expert_matrix(const Tensor *w, int64_t e) {
    Tensor v = *w;
    const int64_t out = w->shape[1], in = w->shape[2], off = e * out * in;
    v.ndim = 2;
    v.shape[0] = out;
    v.shape[1] = in;
    v.shape[2] = v.shape[3] = 0;
    v.numel = out * in;
    v.data = (char *)w->data + (size_t)off * dtype_size(w->dtype);
    v.shadow = w->shadow ? (void *)((bf16 *)w->shadow + off) : nullptr;
    v.grad = nullptr;
    return v;
}

void check_grouped(const char *kernel, const Tensor *xs, const Tensor *w, const Tensor *offsets, const Tensor *ys) {
    if (w->ndim != 3) fatal("cuda %s: w must be [E, out, in]", kernel);
    check_offsets(kernel, offsets, w->shape[0]);
    if (xs->ndim != 2 || xs->shape[1] != w->shape[2] || ys->ndim != 2 || ys->shape[1] != w->shape[1] ||
        ys->shape[0] != xs->shape[0])
        fatal("cuda %s: xs [M, in] and ys [M, out] do not match w [E, out, in]", kernel);
    need_float(kernel, xs, "xs");
    need_float(kernel, w, "w");
    need_same_dtype(kernel, xs, ys, "the output rows");
    need_i32_positions(kernel, xs->shape[0]);
}

/* The segment boundaries on the host: one device-to-host copy of the offsets per call (a synchronisation;
 * the per-expert GEMMs are sized on the host, cuBLASLt takes its shapes from there). The device error word
 * is read right after (the device is idle by then): bad input the MoE kernels met (a bad idx makes the
 * plan's offsets stop short of M) is reported as itself rather than as the offsets it spoiled. Caller
 * frees. */
int32_t *segments_to_host(const char *kernel, const Tensor *offsets, int64_t E, int64_t M) {
    int32_t *off = (int32_t *)malloc((size_t)(E + 1) * sizeof(int32_t));
    if (!off) fatal("cuda %s: out of host memory", kernel);
    copy_to_host_at(off, offsets->data, (size_t)(E + 1) * sizeof(int32_t), "moe offsets for the per-expert GEMMs");
    check_device_errors();
    if (off[0] != 0 || off[E] != M)
        fatal("cuda %s: offsets span [%d, %d), the grouped buffer has %lld rows", kernel, off[0], off[E], (long long)M);
    for (int64_t e = 0; e < E; e++)
        if (off[e + 1] < off[e]) fatal("cuda %s: offsets decrease at expert %lld", kernel, (long long)e);
    return off;
}

/* The per-expert path: one cuBLASLt GEMM per non-empty expert segment through cuda_matmul (fp32
 * accumulation; BF16 inputs with the weights read from their BF16 shadow, or all-F32), the segments sized
 * on the host after one copy of the offsets (see segments_to_host). Empty experts are skipped: no work,
 * and in backward no weight gradient. */
void per_expert_forward(Tensor *ys, const Tensor *xs, const Tensor *w, const int32_t *off) {
    for (int64_t e = 0; e < w->shape[0]; e++) {
        const int64_t r0 = off[e], m = (int64_t)off[e + 1] - off[e];
        if (m == 0) continue;
        Tensor xe = row_block(xs, r0, m), ye = row_block(ys, r0, m), we = expert_matrix(w, e);
        cuda_matmul(&ye, &xe, &we, false, true, 1.0f, 0.0f); /* ys_e = xs_e W_e^T */
    }
}

void per_expert_backward(Tensor *dxs, Tensor *dw, const Tensor *dys, const Tensor *xs, const Tensor *w, const int32_t *off) {
    for (int64_t e = 0; e < w->shape[0]; e++) {
        const int64_t r0 = off[e], m = (int64_t)off[e + 1] - off[e];
        if (m == 0) continue;
        Tensor ge = row_block(dys, r0, m);
        if (dxs) { /* dxs_e += dys_e W_e */
            Tensor dxe = row_block(dxs, r0, m), we = expert_matrix(w, e);
            cuda_matmul(&dxe, &ge, &we, false, false, 1.0f, 1.0f);
        }
        if (dw) { /* dW_e += dys_e^T xs_e (F32 master gradient: fp32 accumulation into it) */
            Tensor dwe = expert_matrix(dw, e), xe = row_block(xs, r0, m);
            dwe.shadow = nullptr;
            cuda_matmul(&dwe, &ge, &xe, true, false, 1.0f, 1.0f);
        }
    }
}

/* MSA_MOE_GEMM=per_expert forces the per-expert path (the benchmark compares the two; read on every call,
 * a string compare, so that it can switch with setenv) */
bool per_expert_forced() {
    const char *s = getenv("MSA_MOE_GEMM");
    if (!s || !s[0] || !strcmp(s, "grouped")) return false;
    if (!strcmp(s, "per_expert")) return true;
    fatal("MSA_MOE_GEMM=%s: expected \"grouped\" or \"per_expert\" (unset: grouped where it applies)", s);
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* Whether a product of the rows xs and ys (or dys) with w goes to the single-launch grouped GEMM: BF16
 * rows, widths and addresses as TMA needs them (w's BF16 values: its own, its shadow, or a copy in
 * scratch, which is aligned) */
bool single_launch(const Tensor *xs, const Tensor *ys, const Tensor *w) {
    const void *wv = w->dtype == DT_BF16 ? w->data : w->shadow;
    return xs->dtype == DT_BF16 && grouped_gemm_fits(w->shape[2], w->shape[1]) && aligned16(xs->data) &&
           aligned16(ys->data) && (!wv || aligned16(wv)) && !per_expert_forced();
}

/* Bytes of the BF16 copy of w that the single-launch path needs when w has neither BF16 values nor a shadow */
size_t weight_copy_bytes(const Tensor *w) { return w->dtype == DT_F32 && !w->shadow ? align256((size_t)w->numel * 2) : 0; }

/* w's BF16 values: itself, its parameter's BF16 shadow, or a copy cast into dst (weight_copy_bytes) */
const bf16 *weight_bf16(const Tensor *w, void *dst) {
    if (w->dtype == DT_BF16) return (const bf16 *)w->data;
    if (w->shadow) return (const bf16 *)w->shadow;
    Tensor d = *w;
    d.dtype = DT_BF16;
    d.data = dst;
    d.shadow = nullptr;
    d.grad = nullptr;
    cuda_cast(&d, w);
    return (const bf16 *)dst;
}

}  // namespace

/* ================================================================ entry points */

extern "C" void cuda_moe_scores_forward(Tensor *scores, const Tensor *logits, MoeScoreFunc func) {
    init();
    need_numel("moe_scores_forward", scores, logits->numel, "scores");
    const int64_t N = tensor_rows(logits), E = tensor_dim(logits, -1);
    if (N == 0 || E == 0) return;
    DISPATCH_FLOAT(scores->dtype, Ts, "moe_scores_forward", DISPATCH_FLOAT(logits->dtype, Tl, "moe_scores_forward", {
        scores_fwd_kernel<Ts, Tl><<<grid_for(N, WARPS), THREADS, 0, stream()>>>((Ts *)scores->data, (const Tl *)logits->data, N, E,
                                                                    func == MOE_SCORE_SIGMOID);
        LAUNCH_CHECK("moe_scores_forward");
    }));
}

extern "C" void cuda_moe_scores_backward(Tensor *dlogits, const Tensor *dscores, const Tensor *scores, MoeScoreFunc func) {
    init();
    if (!dlogits) return;
    need_numel("moe_scores_backward", dlogits, scores->numel, "dlogits");
    need_numel("moe_scores_backward", dscores, scores->numel, "dscores");
    need_same_dtype("moe_scores_backward", scores, dscores, "dscores");
    const int64_t N = tensor_rows(scores), E = tensor_dim(scores, -1);
    if (N == 0 || E == 0) return;
    DISPATCH_FLOAT(dlogits->dtype, Tl, "moe_scores_backward", DISPATCH_FLOAT(scores->dtype, Ts, "moe_scores_backward", {
        scores_bwd_kernel<Tl, Ts><<<grid_for(N, WARPS), THREADS, 0, stream()>>>((Tl *)dlogits->data, (const Ts *)dscores->data,
                                                                    (const Ts *)scores->data, N, E, func == MOE_SCORE_SIGMOID);
        LAUNCH_CHECK("moe_scores_backward");
    }));
}

extern "C" void cuda_moe_topk(Tensor *idx, const Tensor *scores, const Tensor *bias, int k) {
    init();
    if (scores->ndim != 2) fatal("cuda moe_topk: scores must be [N, E]");
    const int64_t N = scores->shape[0], E = scores->shape[1];
    if (k < 1 || k > E) fatal("cuda moe_topk: k = %d outside [1, %lld]", k, (long long)E);
    if (E > INT32_MAX) fatal("cuda moe_topk: %lld experts", (long long)E);
    if (idx->dtype != DT_I32 || idx->numel != N * k) fatal("cuda moe_topk: idx must be i32 [%lld, %d]", (long long)N, k);
    if (bias && (bias->dtype != DT_F32 || bias->numel != E)) fatal("cuda moe_topk: bias must be f32 [%lld]", (long long)E);
    need_i32_positions("moe_topk", N);
    if (N == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(scores->dtype, T, "moe_topk", {
        topk_kernel<T><<<grid_for(N, WARPS), THREADS, 0, stream()>>>((int32_t *)idx->data, (const T *)scores->data,
                                                        bias ? (const float *)bias->data : nullptr, N, (int)E, k, err);
        LAUNCH_CHECK("moe_topk");
    });
}

extern "C" void cuda_moe_combine_weights_forward(Tensor *w, const Tensor *scores, const Tensor *idx, bool renormalize,
                                                 float scale) {
    init();
    if (scores->ndim != 2) fatal("cuda moe_combine_weights_forward: scores must be [N, E]");
    const int64_t N = scores->shape[0], E = scores->shape[1];
    const int k = check_idx("moe_combine_weights_forward", idx, N);
    need_numel("moe_combine_weights_forward", w, idx->numel, "w");
    if (idx->numel == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(w->dtype, Tw, "moe_combine_weights_forward", DISPATCH_FLOAT(scores->dtype, Ts, "moe_combine_weights_forward", {
        cw_fwd_kernel<Tw, Ts><<<grid_for(N, THREADS), THREADS, 0, stream()>>>((Tw *)w->data, (const Ts *)scores->data,
                                                                  (const int32_t *)idx->data, N, E, k, renormalize, scale, err);
        LAUNCH_CHECK("moe_combine_weights_forward");
    }));
}

extern "C" void cuda_moe_combine_weights_backward(Tensor *dscores, const Tensor *dw, const Tensor *scores, const Tensor *idx,
                                                  bool renormalize, float scale) {
    init();
    if (!dscores) return;
    if (scores->ndim != 2) fatal("cuda moe_combine_weights_backward: scores must be [N, E]");
    const int64_t N = scores->shape[0], E = scores->shape[1];
    const int k = check_idx("moe_combine_weights_backward", idx, N);
    need_numel("moe_combine_weights_backward", dw, idx->numel, "dw");
    need_numel("moe_combine_weights_backward", dscores, scores->numel, "dscores");
    need_same_dtype("moe_combine_weights_backward", scores, dscores, "dscores");
    if (idx->numel == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(scores->dtype, Ts, "moe_combine_weights_backward", DISPATCH_FLOAT(dw->dtype, Tw, "moe_combine_weights_backward", {
        cw_bwd_kernel<Ts, Tw><<<grid_for(N, THREADS), THREADS, 0, stream()>>>((Ts *)dscores->data, (const Tw *)dw->data,
                                                                  (const Ts *)scores->data, (const int32_t *)idx->data, N,
                                                                  E, k, renormalize, scale, err);
        LAUNCH_CHECK("moe_combine_weights_backward");
    }));
}

/* Stable sort of the assignments by expert (sort_pairs, primitives.cuh: the tokens of an expert stay
 * in assignment order, exactly the CPU's counting sort), then rows and offsets from the sorted order.
 * No host wait: a bad expert index is recorded in the device error word (and sorted past the last
 * expert, outside every segment) and reported at the next copy to the host. */
extern "C" void cuda_moe_plan(Tensor *offsets, Tensor *rows, const Tensor *idx) {
    init();
    if (offsets->dtype != DT_I32 || rows->dtype != DT_I32 || idx->dtype != DT_I32 || rows->numel != idx->numel)
        fatal("cuda moe_plan: offsets, rows and idx must be i32, rows the shape of idx");
    const int64_t E = offsets->numel - 1, M = idx->numel, k = idx->ndim == 2 ? idx->shape[1] : 1;
    if (E < 1 || E >= INT32_MAX) fatal("cuda moe_plan: offsets must be i32 [E+1] with E >= 1 (got %lld elements)",
                                       (long long)offsets->numel);
    if (M > INT32_MAX) fatal("cuda moe_plan: %lld assignments overflow i32 rows", (long long)M);
    if (M == 0) {
        CUDA_CHECK(cudaMemsetAsync(offsets->data, 0, (size_t)(E + 1) * sizeof(int32_t), stream()));
        return;
    }
    const size_t temp_bytes = sort_pairs_temp_bytes(M, (uint32_t)E); /* keys 0 .. E (E: the bad-entry sentinel) */
    /* scratch: keys_in, keys_out, vals_in, vals_out [M] | CUB temp */
    const size_t seg = align256((size_t)M * 4);
    char *ws = (char *)scratch(4 * seg + temp_bytes);
    uint32_t *keys_in = (uint32_t *)ws, *keys_out = (uint32_t *)(ws + seg);
    int32_t *vals_in = (int32_t *)(ws + 2 * seg), *vals_out = (int32_t *)(ws + 3 * seg);
    void *temp = ws + 4 * seg;
    expert_keys_kernel<<<grid_for(M, THREADS), THREADS, 0, stream()>>>(keys_in, vals_in, (const int32_t *)idx->data, M, (int32_t)E,
                                                          (int)k, errbuf());
    LAUNCH_CHECK("moe_plan keys");
    sort_pairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out, M, (uint32_t)E);
    const int64_t n = M > E + 1 ? M : E + 1;
    rows_offsets_kernel<<<grid_for(n, THREADS), THREADS, 0, stream()>>>((int32_t *)rows->data, (int32_t *)offsets->data, keys_out,
                                                           vals_out, M, (int32_t)E);
    LAUNCH_CHECK("moe_plan finish");
}

extern "C" void cuda_moe_permute_forward(Tensor *xs, const Tensor *x, const Tensor *rows) {
    init();
    need_float("moe_permute_forward", x, "x");
    need_same_dtype("moe_permute_forward", x, xs, "xs");
    int64_t N, C, M;
    const int k = check_permute_shapes("moe_permute_forward", x, xs, "xs", rows, N, C, M);
    if (M == 0 || C == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(x->dtype, T, "moe_permute_forward", {
        if (vec_width<T>(C, {x->data, xs->data}) > 1)
            permute_fwd_kernel<T, 16 / sizeof(T)><<<row_grid(M), THREADS, 0, stream()>>>((T *)xs->data, (const T *)x->data,
                                                                                     (const int32_t *)rows->data, M, k, C, err);
        else
            permute_fwd_kernel<T, 1><<<row_grid(M), THREADS, 0, stream()>>>((T *)xs->data, (const T *)x->data,
                                                                        (const int32_t *)rows->data, M, k, C, err);
    });
    LAUNCH_CHECK("moe_permute_forward");
}

extern "C" void cuda_moe_permute_backward(Tensor *dx, const Tensor *dxs, const Tensor *rows) {
    init();
    if (!dx) return;
    need_float("moe_permute_backward", dx, "dx");
    need_same_dtype("moe_permute_backward", dx, dxs, "dxs");
    int64_t N, C, M;
    const int k = check_permute_shapes("moe_permute_backward", dx, dxs, "dxs", rows, N, C, M);
    if (N == 0 || C == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(dx->dtype, T, "moe_permute_backward", {
        if (vec_width<T>(C, {dx->data, dxs->data}) > 1)
            permute_bwd_kernel<T, 16 / sizeof(T)><<<row_grid(N), THREADS, 0, stream()>>>((T *)dx->data, (const T *)dxs->data,
                                                                                     (const int32_t *)rows->data, N, k, C, M, err);
        else
            permute_bwd_kernel<T, 1><<<row_grid(N), THREADS, 0, stream()>>>((T *)dx->data, (const T *)dxs->data,
                                                                        (const int32_t *)rows->data, N, k, C, M, err);
        LAUNCH_CHECK("moe_permute_backward");
    });
}

extern "C" void cuda_moe_unpermute_forward(Tensor *out, const Tensor *ys, const Tensor *w, const Tensor *rows) {
    init();
    need_float("moe_unpermute_forward", ys, "ys");
    need_same_dtype("moe_unpermute_forward", ys, out, "out");
    int64_t N, C, M;
    const int k = check_permute_shapes("moe_unpermute_forward", out, ys, "ys", rows, N, C, M);
    if (w->numel != rows->numel) fatal("cuda moe_unpermute_forward: weights must be [N, k]");
    if (N == 0 || C == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(ys->dtype, T, "moe_unpermute_forward", DISPATCH_FLOAT(w->dtype, Tw, "moe_unpermute_forward", {
        if (vec_width<T>(C, {out->data, ys->data}) > 1)
            unpermute_fwd_kernel<T, Tw, 16 / sizeof(T)><<<row_grid(N), THREADS, 0, stream()>>>(
                (T *)out->data, (const T *)ys->data, (const Tw *)w->data, (const int32_t *)rows->data, N, k, C, M, err);
        else
            unpermute_fwd_kernel<T, Tw, 1><<<row_grid(N), THREADS, 0, stream()>>>(
                (T *)out->data, (const T *)ys->data, (const Tw *)w->data, (const int32_t *)rows->data, N, k, C, M, err);
        LAUNCH_CHECK("moe_unpermute_forward");
    }));
}

extern "C" void cuda_moe_unpermute_backward(Tensor *dys, Tensor *dw, const Tensor *dout, const Tensor *ys, const Tensor *w,
                                            const Tensor *rows) {
    init();
    if (!dys && !dw) return;
    need_float("moe_unpermute_backward", ys, "ys");
    need_same_dtype("moe_unpermute_backward", ys, dout, "dout");
    if (dys) need_same_dtype("moe_unpermute_backward", ys, dys, "dys");
    if (dys) need_numel("moe_unpermute_backward", dys, ys->numel, "dys");
    if (dw) need_same_dtype("moe_unpermute_backward", w, dw, "dw");
    if (dw) need_numel("moe_unpermute_backward", dw, w->numel, "dw");
    int64_t N, C, M;
    const int k = check_permute_shapes("moe_unpermute_backward", dout, ys, "ys", rows, N, C, M);
    if (w->numel != rows->numel) fatal("cuda moe_unpermute_backward: weights must be [N, k]");
    if (M == 0 || C == 0) return;
    int *err = errbuf();
    DISPATCH_FLOAT(ys->dtype, T, "moe_unpermute_backward", DISPATCH_FLOAT(w->dtype, Tw, "moe_unpermute_backward", {
        if (dys) {
            if (vec_width<T>(C, {dys->data, dout->data}) > 1)
                unpermute_bwd_dys_kernel<T, Tw, 16 / sizeof(T)><<<row_grid(M), THREADS, 0, stream()>>>(
                    (T *)dys->data, (const T *)dout->data, (const Tw *)w->data, (const int32_t *)rows->data, M, k, C, err);
            else
                unpermute_bwd_dys_kernel<T, Tw, 1><<<row_grid(M), THREADS, 0, stream()>>>(
                    (T *)dys->data, (const T *)dout->data, (const Tw *)w->data, (const int32_t *)rows->data, M, k, C, err);
            LAUNCH_CHECK("moe_unpermute_backward dys");
        }
        if (dw) {
            unpermute_bwd_dw_kernel<T, Tw><<<grid_for(M, WARPS), THREADS, 0, stream()>>>(
                (Tw *)dw->data, (const T *)dout->data, (const T *)ys->data, (const int32_t *)rows->data, M, k, C, err);
            LAUNCH_CHECK("moe_unpermute_backward dw");
        }
    }));
}

extern "C" void cuda_grouped_matmul_forward(Tensor *ys, const Tensor *xs, const Tensor *w, const Tensor *offsets) {
    init();
    check_grouped("grouped_matmul_forward", xs, w, offsets, ys);
    const int64_t E = w->shape[0], M = xs->shape[0], out = w->shape[1], in = w->shape[2];
    if (single_launch(xs, ys, w)) {
        const size_t wb = weight_copy_bytes(w);
        char *ws = (char *)scratch(wb + grouped_gemm_workspace(GROUPED_FORWARD, E));
        grouped_gemm(GROUPED_FORWARD, ys->data, (const bf16 *)xs->data, weight_bf16(w, ws), (const int32_t *)offsets->data,
                     E, M, out, in, errbuf(), ws + wb);
        return;
    }
    int32_t *off = segments_to_host("grouped_matmul_forward", offsets, E, M);
    per_expert_forward(ys, xs, w, off);
    free(off);
}

extern "C" void cuda_grouped_matmul_backward(Tensor *dxs, Tensor *dw, const Tensor *dys, const Tensor *xs, const Tensor *w,
                                             const Tensor *offsets) {
    init();
    if (!dxs && !dw) return;
    check_grouped("grouped_matmul_backward", xs, w, offsets, dys);
    if (dxs) {
        need_same_dtype("grouped_matmul_backward", xs, dxs, "dxs");
        need_numel("grouped_matmul_backward", dxs, xs->numel, "dxs");
    }
    if (dw) {
        need_float("grouped_matmul_backward", dw, "dw");
        if (dw->ndim != 3 || dw->shape[0] != w->shape[0] || dw->shape[1] != w->shape[1] || dw->shape[2] != w->shape[2])
            fatal("cuda grouped_matmul_backward: dw must have the shape of w [E, out, in]");
    }
    const int64_t E = w->shape[0], M = xs->shape[0], out = w->shape[1], in = w->shape[2];
    /* each product on its own path: dxs is BF16 with xs, the F32 master gradient dw takes the f32 epilogue */
    const bool single = single_launch(xs, dys, w);
    Tensor *dxs_single = dxs && single && aligned16(dxs->data) ? dxs : nullptr;
    Tensor *dw_single = dw && dw->dtype == DT_F32 && single && aligned16(dw->data) ? dw : nullptr;
    if (dxs_single || dw_single) {
        const size_t wb = dxs_single ? weight_copy_bytes(w) : 0;
        const size_t dx_bytes = dxs_single ? grouped_gemm_workspace(GROUPED_DX, E) : 0;
        const size_t dw_bytes = dw_single ? grouped_gemm_workspace(GROUPED_DW, E) : 0;
        char *ws = (char *)scratch(wb + dx_bytes + dw_bytes); /* separate regions: both launches are in flight */
        int *err = errbuf();
        if (dxs_single)
            grouped_gemm(GROUPED_DX, dxs->data, (const bf16 *)dys->data, weight_bf16(w, ws), (const int32_t *)offsets->data,
                         E, M, out, in, err, ws + wb);
        if (dw_single)
            grouped_gemm(GROUPED_DW, dw->data, (const bf16 *)dys->data, (const bf16 *)xs->data,
                         (const int32_t *)offsets->data, E, M, out, in, err, ws + wb + dx_bytes);
    }
    Tensor *dxs_rest = dxs_single ? nullptr : dxs, *dw_rest = dw_single ? nullptr : dw;
    if (!dxs_rest && !dw_rest) return;
    int32_t *off = segments_to_host("grouped_matmul_backward", offsets, E, M);
    per_expert_backward(dxs_rest, dw_rest, dys, xs, w, off);
    free(off);
}

extern "C" void cuda_moe_aux_loss_forward(Tensor *loss, const Tensor *scores, const Tensor *offsets, bool normalize) {
    init();
    const int64_t N = tensor_rows(scores), E = tensor_dim(scores, -1);
    check_offsets("moe_aux_loss_forward", offsets, E);
    need_f32("moe_aux_loss_forward", loss, 1, "loss");
    if (N == 0) {
        CUDA_CHECK(cudaMemsetAsync(loss->data, 0, sizeof(float), stream()));
        return;
    }
    float *val = (float *)scratch((size_t)N * sizeof(float));
    DISPATCH_FLOAT(scores->dtype, T, "moe_aux_loss_forward", {
        aux_rows_kernel<T><<<grid_for(N, WARPS), THREADS, 0, stream()>>>(val, (const T *)scores->data, (const int32_t *)offsets->data,
                                                            N, E, normalize);
        LAUNCH_CHECK("moe_aux_loss_forward");
    });
    aux_finish_kernel<<<1, FINISH_THREADS, 0, stream()>>>((float *)loss->data, val, (const int32_t *)offsets->data, N, E);
    LAUNCH_CHECK("moe_aux_loss_finish");
}

extern "C" void cuda_moe_aux_loss_backward(Tensor *dscores, const Tensor *dloss, const Tensor *scores, const Tensor *offsets,
                                           bool normalize) {
    init();
    if (!dscores) return;
    const int64_t N = tensor_rows(scores), E = tensor_dim(scores, -1);
    check_offsets("moe_aux_loss_backward", offsets, E);
    need_f32("moe_aux_loss_backward", dloss, 1, "dloss");
    need_same_dtype("moe_aux_loss_backward", scores, dscores, "dscores");
    need_numel("moe_aux_loss_backward", dscores, scores->numel, "dscores");
    if (N == 0 || E == 0) return;
    DISPATCH_FLOAT(scores->dtype, T, "moe_aux_loss_backward", {
        aux_bwd_kernel<T><<<grid_for(N, WARPS), THREADS, 0, stream()>>>((T *)dscores->data, (const float *)dloss->data,
                                                           (const T *)scores->data, (const int32_t *)offsets->data, N, E,
                                                           normalize);
        LAUNCH_CHECK("moe_aux_loss_backward");
    });
}

extern "C" void cuda_moe_z_loss_forward(Tensor *loss, Tensor *lse, const Tensor *logits) {
    init();
    const int64_t N = tensor_rows(logits), E = tensor_dim(logits, -1);
    need_f32("moe_z_loss_forward", loss, 1, "loss");
    need_f32("moe_z_loss_forward", lse, N, "lse");
    if (N == 0) {
        CUDA_CHECK(cudaMemsetAsync(loss->data, 0, sizeof(float), stream()));
        return;
    }
    DISPATCH_FLOAT(logits->dtype, T, "moe_z_loss_forward", {
        z_rows_kernel<T><<<grid_for(N, WARPS), THREADS, 0, stream()>>>((float *)lse->data, (const T *)logits->data, N, E);
        LAUNCH_CHECK("moe_z_loss_forward");
    });
    z_finish_kernel<<<1, FINISH_THREADS, 0, stream()>>>((float *)loss->data, (const float *)lse->data, N);
    LAUNCH_CHECK("moe_z_loss_finish");
}

extern "C" void cuda_moe_z_loss_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse) {
    init();
    if (!dlogits) return;
    const int64_t N = tensor_rows(logits), E = tensor_dim(logits, -1);
    need_f32("moe_z_loss_backward", dloss, 1, "dloss");
    need_f32("moe_z_loss_backward", lse, N, "lse");
    need_same_dtype("moe_z_loss_backward", logits, dlogits, "dlogits");
    need_numel("moe_z_loss_backward", dlogits, logits->numel, "dlogits");
    if (N == 0 || E == 0) return;
    DISPATCH_FLOAT(logits->dtype, T, "moe_z_loss_backward", {
        z_bwd_kernel<T><<<grid_for(N * E, THREADS), THREADS, 0, stream()>>>((T *)dlogits->data, (const float *)dloss->data,
                                                               (const T *)logits->data, (const float *)lse->data, N, E);
        LAUNCH_CHECK("moe_z_loss_backward");
    });
}

extern "C" void cuda_moe_stats_accumulate(Tensor *acc, const Tensor *offsets, const Tensor *aux_loss, const Tensor *z_loss) {
    init();
    const int64_t E = acc->numel - 2;
    if (acc->dtype != DT_F64 || E < 1) fatal("cuda moe_stats_accumulate: acc must be f64 [E+2] with E >= 1");
    check_offsets("moe_stats_accumulate", offsets, E);
    const int aux_f64 = stats_loss_f64("aux_loss", aux_loss), z_f64 = stats_loss_f64("z_loss", z_loss);
    stats_accumulate_kernel<<<1, 1, 0, stream()>>>((double *)acc->data, (const int32_t *)offsets->data, E,
                                                   aux_loss ? aux_loss->data : nullptr, aux_f64,
                                                   z_loss ? z_loss->data : nullptr, z_f64);
    LAUNCH_CHECK("moe_stats_accumulate");
}

extern "C" void cuda_moe_bias_update(Tensor *bias, const Tensor *acc, float rate) {
    init();
    const int64_t E = bias->numel;
    if (bias->dtype != DT_F32) fatal("cuda moe_bias_update: bias must be f32 [E], got %s", dtype_name(bias->dtype));
    if (acc->dtype != DT_F64 || acc->numel < E)
        fatal("cuda moe_bias_update: acc must be f64 with at least E = %lld loads", (long long)E);
    if (E == 0) return;
    bias_update_kernel<<<1, 1, 0, stream()>>>((float *)bias->data, (const double *)acc->data, E, rate);
    LAUNCH_CHECK("moe_bias_update");
}
