/* MSA Main Branch on the GPU (DESIGN §4, msa_spec.md e.4, e.5, e.9): exact softmax attention of every
 * query head over the tokens of its group's selected blocks (causal inside the query's own block), and
 * its backward, organised KV-outer from the plan (backend.h: the block -> queries reverse map).
 * Semantics exactly as the CPU reference (kernels/cpu/msa_attention_impl.h); topk NULL (dense warm-up)
 * is the dense causal kernel (cuda_attention_forward / _backward), identical by definition.
 *
 * Work decomposition. A "segment" is (group g, block row r, key segment ks): up to KB keys of block r
 * (ks > 0 only when the block size exceeds KB). Its queries are the row's plan list; their G heads
 * each make one "packed row" (query-major: query li, head hh -> packed row li*G + hh), so for
 * G = 16 a 128-row tile is 8 queries x 16 heads, and one K/V tile serves every head of the group
 * (paper §4.2 "query concatenation"). A "tile" is M consecutive packed rows of one segment.
 * Queries are processed in chunks [c0, c1) (each row's sub-list found by binary search, the lists
 * being ascending) so that the per-query partial buffers stay under partial_budget() at any N.
 * Per chunk, four small kernels build the schedule: rows' sub-lists (count), prefix sums (scan), one
 * 32-byte descriptor per tile (desc), and per entry (query of a row) its token and its slot, i.e. the
 * position of the row's block in topk[g][t] (entries). Tiles are ordered (g, r, ks, piece); a
 * persistent grid gives each CTA a contiguous range of tiles, so consecutive tiles of a CTA share a
 * segment and its K/V stay in shared memory, and a hot row (block 0 selected by every query) simply
 * spans the ranges of several CTAs.
 *
 * Forward: per tile, S = Q K^T over the segment's keys, online softmax (causal mask key <= t, which
 * only bites in the query's own block), O = P V; the normalised O (bf16 for BF16 inputs, fp32 else)
 * and its log-sum-exp go to the partial slot (slot * nks + ks) of (query, head). A combine kernel
 * merges each (query, head)'s partials in slot order (deterministic) into out and lse.
 * Backward: Dsum = rowsum(dO * O); per tile, S^T = K Q^T and dP^T = V dO^T (rows = keys: each warp
 * owns 16 keys), P = exp(scale S - lse), dS = P (dP - Dsum), dV += P^T dO and dK += dS^T Q kept in
 * registers for the whole segment, dQ_partial = dS K (bf16 for BF16 inputs, fp32 else) per slot, combined
 * in slot order like the forward. dK/dV of a segment split over several CTAs (hot rows) go through a per-CTA
 * fp32 buffer summed in CTA order by a fixup kernel; all dK/dV land in fp32 accumulators added to dk/dv at the end.
 * No atomics anywhere: results are run-to-run deterministic on a given GPU (they depend on the SM
 * count through the tile ranges only in fp32 rounding of dK/dV).
 *
 * msa_attention_kl_backward folds the KL alignment loss into the tensor-core backward (its section of
 * msa_attention_tc.cu): per tile the teacher from the P it already has, the student from qi/ki; dqi per
 * (query, slot) partials combined like dQ (one head per group), dki per group in fp32 like dK (split
 * segments through the same fixup), summed over the groups at the end; the KL value per CTA, summed in
 * CTA order. The gradient's coefficient is read on the device (no host wait). Shapes the fold does not
 * take (F32, other head dims, G not a power of two or more than 8 queries per tile) run the separate
 * kernels in sequence (msa_kl.cu).
 *
 * Two implementations of the tile kernels share that schedule, each in its own file behind the
 * interface of msa_attention.cuh (this file holds the schedule, the reductions and the entry points):
 *   - msa_attention_tc.cu, tensor cores (BF16, D = 64 or 128): 8 warps, mma.sync m16n8k16 bf16 with
 *     fp32 accumulation, ldmatrix from XOR-swizzled shared memory, a 3-stage cp.async pipeline
 *     (descriptor, entries, gathered Q / dO rows one tile ahead) so the gathers overlap the previous
 *     tile's math. Forward tile 128 packed rows x 128 keys (16 rows per warp, 64-key sub-tiles);
 *     backward tile 32 (D = 128) or 64 (D = 64) packed rows x 128 keys.
 *   - msa_attention_cc.cu, CUDA cores (F32 inputs, other head dims up to 256): the same structure in
 *     fp32 with 32-row tiles and 32-key (16 for D > 128) segments; exact to fp32 rounding, for the
 *     fp32 checks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "limits.h"
#include "msa_attention.cuh"

using namespace msacuda;

namespace {

constexpr unsigned FULL = 0xffffffffu;
/* Bytes of per-query partials (forward O + lse, or backward dQ) per chunk: 1/32 of the device's memory,
 * at least 1 GiB and at most 4 GiB (2.3 GiB on an 80 GB H100). They live in scratch(), which keeps its
 * largest size (x 1.25) for the rest of the run, beside the activations at their peak: a fixed 3 GiB made
 * the 1.1B model's MSA run at 256K ask for 2.95 GB more with 2 GB free (issue 15), and a fixed 1 GiB cut
 * a 64/4/128 layer's backward at 32K into 16 chunks, whose launches, fixups and tails cost 7.6 of its 61
 * ms against one chunk (Nsight Compute and build/bench, ninth session). The budget depends on the device
 * alone, not on its free memory at the call, so that the chunks, and with them the tile ranges that set
 * dK/dV's fp32 rounding, are the same in every step of a run. */
size_t partial_budget() {
    static size_t budget = 0;
    if (!budget) {
        size_t free_b = 0, total_b = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        budget = std::min(std::max(total_b / 32, (size_t)1 << 30), (size_t)4 << 30);
    }
    return budget;
}

/* ------------------------------------------------------------------------------------------------
 * Schedule
 * ---------------------------------------------------------------------------------------------- */

/* Plan of group g: row_ptr [N+1] | q_idx [NK] | row_lo [N] | row_hi [N] (backend.h; N tokens, NK = Nq * k, q_idx
 * holding query rows: msa_plan_width_rows). */
struct PlanView {
    const int32_t *plan;
    int64_t P, NK;
    int N;
    __device__ __forceinline__ const int32_t *row_ptr(int g) const { return plan + g * P; }
    __device__ __forceinline__ const int32_t *q_idx(int g) const { return plan + g * P + (N + 1); }
    __device__ __forceinline__ const int32_t *row_lo(int g) const { return plan + g * P + (N + 1) + NK; }
    __device__ __forceinline__ const int32_t *row_hi(int g) const { return plan + g * P + (N + 1) + NK + N; }
};

/* Per (g, r): the row's queries in [c0, c1) are q_idx[rs .. rs + cnt); its tiles number
 * nks * ceil(cnt * G / M). */
__global__ void sched_count_kernel(int *rs, int *cnt, int *ntiles, PlanView pv, int Rb, int n_gr, int c0, int c1, int G,
                                   int M, int nks) {
    for (int gr = blockIdx.x * blockDim.x + threadIdx.x; gr < n_gr; gr += gridDim.x * blockDim.x) {
        const int g = gr / Rb, r = gr - g * Rb;
        const int32_t *rp = pv.row_ptr(g), *qi = pv.q_idx(g);
        const int a = min(max(rp[r], 0), (int)pv.NK), b = min(max(rp[r + 1], a), (int)pv.NK);
        const int lo = a + lower_bound(qi + a, b - a, c0), hi = a + lower_bound(qi + a, b - a, c1);
        rs[gr] = lo;
        cnt[gr] = hi - lo;
        ntiles[gr] = nks * (int)(((int64_t)(hi - lo) * G + M - 1) / M);
    }
}

/* Exclusive prefix sums qoff = scan(cnt), tile_off = scan(ntiles), totals at [n] (the tile total
 * capped at the descriptor buffer, which a plan consistent with topk never reaches). One block of 1024
 * threads, each summing a contiguous stretch (n is at most Hkv * (N/B + ndocs)). */
__global__ void __launch_bounds__(1024) sched_scan_kernel(int *qoff, int *tile_off, const int *cnt, const int *ntiles,
                                                         int n, int tile_bound) {
    __shared__ int w1[32], w2[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int per = (n + 1023) / 1024, i0 = min(tid * per, n), i1 = min(i0 + per, n);
    int s1 = 0, s2 = 0;
    for (int i = i0; i < i1; i++) {
        s1 += cnt[i];
        s2 += ntiles[i];
    }
    int x1 = s1, x2 = s2; /* inclusive warp scan */
    for (int o = 1; o < 32; o <<= 1) {
        const int y1 = __shfl_up_sync(FULL, x1, o), y2 = __shfl_up_sync(FULL, x2, o);
        if (lane >= o) {
            x1 += y1;
            x2 += y2;
        }
    }
    if (lane == 31) {
        w1[warp] = x1;
        w2[warp] = x2;
    }
    __syncthreads();
    if (warp == 0) {
        int z1 = w1[lane], z2 = w2[lane];
        for (int o = 1; o < 32; o <<= 1) {
            const int y1 = __shfl_up_sync(FULL, z1, o), y2 = __shfl_up_sync(FULL, z2, o);
            if (lane >= o) {
                z1 += y1;
                z2 += y2;
            }
        }
        w1[lane] = z1; /* inclusive over warps */
        w2[lane] = z2;
    }
    __syncthreads();
    int e1 = x1 - s1 + (warp ? w1[warp - 1] : 0), e2 = x2 - s2 + (warp ? w2[warp - 1] : 0);
    for (int i = i0; i < i1; i++) {
        qoff[i] = e1;
        tile_off[i] = e2;
        e1 += cnt[i];
        e2 += ntiles[i];
    }
    if (tid == 1023) {
        qoff[n] = w1[31];
        tile_off[n] = min(w2[31], tile_bound);
    }
}

__global__ void sched_desc_kernel(TileDesc *desc, const int *tile_off, const int *qoff, const int *cnt, PlanView pv, int Rb,
                                  int n_gr, int G, int M, int nks, int KB, int bound) {
    const int T = min(tile_off[n_gr], bound);
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < T; j += gridDim.x * blockDim.x) {
        const int gr = upper_bound(tile_off, n_gr + 1, j) - 1;
        const int g = gr / Rb, r = gr - g * Rb;
        const int local = j - tile_off[gr], tpr = (tile_off[gr + 1] - tile_off[gr]) / nks;
        const int ks = local / tpr, piece = local - ks * tpr;
        const int64_t pi0 = (int64_t)piece * M, rows = min((int64_t)M, (int64_t)cnt[gr] * G - pi0);
        const int lo = min(max(pv.row_lo(g)[r], 0), pv.N), hi = min(max(pv.row_hi(g)[r], lo), pv.N);
        const int klo = lo + ks * KB; /* a segment past the block's end is empty (klo = khi) */
        TileDesc d;
        d.gr = gr;
        d.ks = ks;
        d.ebase = qoff[gr] + (int)(pi0 / G);
        d.rows = (int)rows | (piece == 0 ? TILE_FIRST : 0) | (piece == tpr - 1 ? TILE_LAST : 0);
        d.off0 = (int)(pi0 % G);
        d.klo = min(klo, hi);
        d.khi = min(hi, klo + KB);
        d.piece = piece;
        desc[j] = d;
    }
}

/* Entry e of the chunk (query li of row gr's sub-list): its query row t and slot (the position of the
 * row's block in topk[g][t]; -1 when absent, which makes the packed rows invalid). */
__global__ void sched_entries_kernel(int2 *ent, const int *qoff, const int *rs, PlanView pv, const int32_t *topk,
                                     const int32_t *q_token, int Nq, const int32_t *cu, int ndocs, int K, int B, int Rb,
                                     int n_gr, int c0, int c1, int bound) {
    const int E = min(qoff[n_gr], bound);
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
        const int gr = upper_bound(qoff, n_gr + 1, e) - 1;
        const int g = gr / Rb, r = gr - g * Rb;
        const int t = pv.q_idx(g)[rs[gr] + (e - qoff[gr])];
        int slot = -1;
        if (t >= c0 && t < c1) {
            const int tok = msa_row_token(q_token, t, pv.N);
            const int ds = cu[msa_doc_of(cu, ndocs, tok)], lo = pv.row_lo(g)[r];
            if (lo >= ds && lo <= tok) {
                const int b = (lo - ds) / B;
                slot = msa_topk_slot(topk + ((int64_t)g * Nq + t) * K, K, b);
            }
        }
        ent[e] = make_int2(t, slot);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Reductions: combine, Dsum, dK/dV fixup and finish
 * ---------------------------------------------------------------------------------------------- */

/* Number of leading selected slots of topk[g][t] (the CPU's support loop stops at the first -1), for the row
 * of each aligned group of W lanes (W a power of two). */
template <int W> __device__ __forceinline__ int selected_slots(const int32_t *row, int K) {
    int first_neg = K;
    for (int i = threadIdx.x & (W - 1); i < K; i += W)
        if (row[i] < 0) {
            first_neg = i;
            break;
        }
    return lanes_min<W>(first_neg);
}

/* The combines below read a (query, head)'s partials slot by slot, each row on an aligned group of W lanes
 * (32 / W rows a warp). A lane holds STEPS vectors of VPL elements of a slot (elements (j * W + lane % W) *
 * VPL) and keeps U slots' loads in flight before it adds the first of them (the adds keep slot order, so the
 * sums are the same bits for any U and W). Why the shapes:
 *   - a plain loop over the slots waited for each load in turn and ran the forward's combine at a third of
 *     the memory's bandwidth; U = 16 slots (a query's whole top-16 selection) in flight fixed that
 *     (eleventh session);
 *   - with a warp a row, each warp still waited for three round trips (topk, then the partials, then dq's
 *     read-modify-write or the lse partials) for its 2 KB (D = 64, bf16): both combines read ~1.2 TB/s at
 *     32K (thirteenth session's kernel times). BF16 partials at D = 64 and 128 now take 16 bytes a lane
 *     (VPL 8), so a row is D / 8 lanes and a warp carries 4 or 2 rows: each round trip moves 2-4 times the
 *     bytes. These keep U = 8 slots in flight (COMBINE_UNROLL_LANES): with 16, ptxas took 167-187
 *     registers (one CTA an SM), and capping them spilled.
 * fp32 partials (the CUDA-core path, F32) keep a warp a row, one vector a lane (W 32, VPL 2 or 4); other D
 * take STEPS = 8 / VPL (any D up to CUDA_HEAD_DIM_MAX, guarded) and U = 4. Both kernels are bounded to
 * two CTAs of 256 an SM (at most 128 registers). */
constexpr int COMBINE_UNROLL_WIDE = 16, COMBINE_UNROLL_LANES = 8, COMBINE_UNROLL = 4;

/* Lane gl's (of its row's W) elements of slots s .. s + U - 1 (those below s1) of a row's partials src
 * [slot][D], as loaded: converted to fp32 when added */
template <typename PT, int W, int VPL, int STEPS, int U>
__device__ __forceinline__ void load_slots(Vec<PT, VPL> (&x)[U][STEPS], const PT *src, int s, int s1, int D, int gl) {
    /* the one-vector layouts (STEPS = 1) are chosen only where W * VPL = D: with D a constant, the U addresses
     * are one base plus immediates (ptxas kept a 64-bit address a slot) */
    const int Dr = STEPS == 1 ? W * VPL : D;
    const PT *base = src + (int64_t)s * Dr;
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int j = 0; j < STEPS; j++) {
            const int e = (j * W + gl) * VPL;
            if (s + u < s1 && e < D) x[u][j] = load_vec<PT, VPL>(base + u * Dr + e);
        }
}

/* acc[j][:] += w * x[j][:] (w = 1: the dQ combine), in fp32 */
template <typename PT, int W, int VPL, int STEPS>
__device__ __forceinline__ void add_slot(float (&acc)[STEPS][VPL], const Vec<PT, VPL> (&x)[STEPS], float w, int D,
                                         int gl) {
#pragma unroll
    for (int j = 0; j < STEPS; j++)
        if ((j * W + gl) * VPL < D)
#pragma unroll
            for (int v = 0; v < VPL; v++) acc[j][v] += w * to_f32(x[j].v[v]);
}

/* One group of W lanes per (chunk query, head): out = sum_s exp(lse_s - LSE) O_s over the valid partials in
 * slot order, lse = LSE. The weights of a chunk of C = max(U, W) slots are computed before its loads are
 * added, C / W a lane (where every lane used to read lp[s] and take its exponential before the slot's load),
 * and the adds take them by a shuffle inside the row's group. The slot loop runs to the warp's largest count
 * (the shuffles need every lane); a row's own count guards its loads and adds. */
template <typename T, typename PT, int W, int VPL, int STEPS, int U>
__global__ void __launch_bounds__(256, 2)
    msa_fwd_combine_kernel(T *out, float *lse, const PT *opart, const float *lpart, const int32_t *topk, int c0, int nq,
                           int Nq, int Hq, int G, int K, int nks, int NS, int D) {
    constexpr int R = 32 / W, C = U > W ? U : W;
    static_assert(C % U == 0 && C % W == 0, "a chunk of weights holds whole load groups and whole lane groups");
    const int lane = threadIdx.x & 31, gl = lane & (W - 1);
    const int64_t row = ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R + lane / W;
    const bool live = row < (int64_t)nq * Hq; /* a row past the chunk still takes part in the shuffles */
    const int tq = live ? (int)(row / Hq) : 0, h = live ? (int)(row % Hq) : 0, t = c0 + tq;
    const int sel = selected_slots<W>(topk + ((int64_t)(h / G) * Nq + t) * K, K), ns = live ? sel * nks : 0;
    const int ns_warp = -warp_min(-ns);
    const float *lp = lpart + (live ? row : 0) * NS;
    const PT *src = opart + (live ? row : 0) * NS * D;
    Vec<PT, VPL> x[U][STEPS];
    load_slots<PT, W, VPL, STEPS, U>(x, src, 0, min(ns, U), D, gl); /* before the statistics, whose loads it overlaps */
    float mx = -INFINITY;
    for (int s = gl; s < ns; s += W) mx = fmaxf(mx, lp[s]);
    mx = lanes_max<W>(mx);
    float sum = 0.0f;
    if (mx != -INFINITY)
        for (int s = gl; s < ns; s += W) sum += expf(lp[s] - mx);
    sum = lanes_sum<W>(sum);
    const float L = mx != -INFINITY ? mx + logf(sum) : -INFINITY;
    float acc[STEPS][VPL];
#pragma unroll
    for (int j = 0; j < STEPS; j++)
#pragma unroll
        for (int v = 0; v < VPL; v++) acc[j][v] = 0.0f;
    for (int s0 = 0; s0 < ns_warp; s0 += C) {
        const int s1 = min(ns, s0 + C);
        float wl[C / W];
#pragma unroll
        for (int k = 0; k < C / W; k++) {
            const int s = s0 + k * W + gl;
            wl[k] = s < s1 && L != -INFINITY ? expf(lp[s] - L) : 0.0f;
        }
        for (int s = s0; s < min(ns_warp, s0 + C); s += U) {
            if (s > 0) load_slots<PT, W, VPL, STEPS, U>(x, src, s, s1, D, gl);
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = s - s0 + u; /* slot s + u's place in the chunk: u when C = U, and C / W = 1 else */
                const float w = __shfl_sync(0xffffffffu, wl[C / W == 1 ? 0 : u / W], i & (W - 1), W);
                if (s + u < s1 && w != 0.0f) add_slot<PT, W, VPL, STEPS>(acc, x[u], w, D, gl);
            }
        }
    }
    if (!live) return;
    T *dst = out + ((int64_t)t * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        const int e = (j * W + gl) * VPL;
        if (e < D) store_f32<T, VPL>(dst + e, acc[j]);
    }
    if (gl == 0) lse[(int64_t)h * Nq + t] = L;
}

/* One group of W lanes per (chunk query, head): dq += scale * sum of the valid dQ partials (of type PT) in slot
 * order, in fp32 (scale times scale_grad[0] when given: the KL's dqi, viewed as one head per group, G = 1,
 * D = Di). */
template <typename T, typename PT, int W, int VPL, int STEPS, int U>
__global__ void __launch_bounds__(256, 2)
    msa_dq_combine_kernel(T *dq, const PT *dqp, const int32_t *topk, int c0, int nq, int Nq, int Hq, int G, int K,
                          int nks, int NS, int D, float scale, const float *scale_grad) {
    constexpr int R = 32 / W;
    const int lane = threadIdx.x & 31, gl = lane & (W - 1);
    const int64_t row = ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R + lane / W;
    const bool live = row < (int64_t)nq * Hq; /* a row past the chunk still takes part in the shuffles */
    if (scale_grad) scale *= *scale_grad;
    const int tq = live ? (int)(row / Hq) : 0, h = live ? (int)(row % Hq) : 0, t = c0 + tq;
    const int sel = selected_slots<W>(topk + ((int64_t)(h / G) * Nq + t) * K, K), ns = live ? sel * nks : 0;
    float acc[STEPS][VPL];
#pragma unroll
    for (int j = 0; j < STEPS; j++)
#pragma unroll
        for (int v = 0; v < VPL; v++) acc[j][v] = 0.0f;
    const PT *src = dqp + (live ? row : 0) * NS * D;
    for (int s = 0; s < ns; s += U) {
        Vec<PT, VPL> x[U][STEPS];
        load_slots<PT, W, VPL, STEPS, U>(x, src, s, ns, D, gl);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (s + u >= ns) break;
            add_slot<PT, W, VPL, STEPS>(acc, x[u], 1.0f, D, gl);
        }
    }
    if (!live) return;
    T *dst = dq + ((int64_t)t * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        const int e = (j * W + gl) * VPL;
        if (e < D) {
            float x[VPL];
            load_f32<T, VPL>(dst + e, x);
#pragma unroll
            for (int v = 0; v < VPL; v++) x[v] += scale * acc[j][v];
            store_f32<T, VPL>(dst + e, x);
        }
    }
}

/* Dsum[h, t] = dout[t, h, :] . out[t, h, :], one warp per (t, h) */
template <typename T> __global__ void msa_dsum_kernel(float *dsum, const T *dout, const T *out, int N, int Hq, int D) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (int64_t)N * Hq) return;
    const T *x = dout + row * D, *y = out + row * D;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += to_f32(x[d]) * to_f32(y[d]);
    s = warp_sum(s);
    if (lane == 0) dsum[(row % Hq) * N + row / Hq] = s;
}

/* For each segment split over CTAs (blocks (c, y) for the CTA c where it starts): sum the parts in CTA
 * order into the fp32 accumulators, the segment's elements spread over the FIXUP_SLICES blocks of c. A
 * hot block's segment spans tens of CTAs: one block per segment summed them in a serial loop of 0.15 ms
 * while the rest of the GPU idled, once per query chunk (2.5 ms of a 64/4/128 layer's backward at 32K,
 * Nsight Compute). Each element's sum keeps its CTA order, so the bits are the same. */
constexpr int FIXUP_SLICES = 16;
__global__ void msa_dkv_fixup_kernel(float *acck, float *accv, const float *cut, float *accki, const float *cutki,
                                     const TileDesc *desc, const int *tile_off, int n_gr, int nks, int Rb, int N, int Hkv,
                                     int D, int Di, int KB) {
    const int T = tile_off[n_gr], nc = gridDim.x, c = blockIdx.x;
    int tb, te;
    cta_range(T, c, nc, tb, te);
    if (tb >= te) return;
    const TileDesc dl = desc[te - 1];
    if (dl.rows & TILE_LAST) return; /* the CTA's last segment ends inside it */
    const int first = te - 1 - dl.piece;
    if (first < tb) return; /* it started in an earlier CTA, whose block does the sum */
    const int tpr = (tile_off[dl.gr + 1] - tile_off[dl.gr]) / nks, last = first + tpr - 1;
    const int c1 = (int)(((int64_t)(last + 1) * nc - 1) / T); /* the CTA holding the last tile */
    const int g = dl.gr / Rb, n = (acck || accv) ? (dl.khi - dl.klo) * D : 0;
    const int64_t part = (int64_t)KB * D;
    const int i0 = blockIdx.y * blockDim.x + threadIdx.x, di = gridDim.y * blockDim.x;
    for (int idx = i0; idx < n; idx += di) {
        float sk = cut[((int64_t)c * 2 + 1) * 2 * part + idx], sv = cut[(((int64_t)c * 2 + 1) * 2 + 1) * part + idx];
        for (int cc = c + 1; cc <= c1; cc++) {
            int b0, e0;
            cta_range(T, cc, nc, b0, e0);
            if (b0 >= e0) continue;
            sk += cut[((int64_t)cc * 2) * 2 * part + idx];
            sv += cut[((int64_t)cc * 2 * 2 + 1) * part + idx];
        }
        const int kr = idx / D, dd = idx - kr * D;
        const int64_t o = ((int64_t)(dl.klo + kr) * Hkv + g) * D + dd;
        if (acck) acck[o] += sk;
        if (accv) accv[o] += sv;
    }
    /* the KL's dki of the segment: [cta][slot][KB][Di] parts into group g's accumulator */
    const int ni = accki ? (dl.khi - dl.klo) * Di : 0;
    const int64_t parti = (int64_t)KB * Di;
    for (int idx = i0; idx < ni; idx += di) {
        float si = cutki[((int64_t)c * 2 + 1) * parti + idx];
        for (int cc = c + 1; cc <= c1; cc++) {
            int b0, e0;
            cta_range(T, cc, nc, b0, e0);
            if (b0 >= e0) continue;
            si += cutki[(int64_t)cc * 2 * parti + idx];
        }
        accki[((int64_t)g * N + dl.klo) * Di + idx] += si;
    }
}

/* dki += mul * mul_grad[0] * (the groups' fp32 dki summed in group order) */
template <typename T>
__global__ void msa_dki_final_kernel(T *dki, const float *accki, int64_t n, int Hkv, float mul, const float *mul_grad) {
    const float m = mul_grad ? mul * *mul_grad : mul;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int g = 0; g < Hkv; g++) s += accki[(int64_t)g * n + i];
        dki[i] = from_f32<T>(to_f32(dki[i]) + m * s);
    }
}

/* kl = (the CTAs' KL in CTA order, log2 units) * ln 2 / pairs: the mean KL, one block */
__global__ void __launch_bounds__(1024) msa_kl_final_kernel(float *kl, const double *klpart, int n, double pairs) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += klpart[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) kl[0] = pairs > 0 ? (float)(acc * 0.6931471805599453 / pairs) : 0.0f;
}

/* grad += mul * acc, acc having a row of `width` per token: grad's row of token j is key_rows[j] (NULL: j; -1 or
 * outside [0, M): none, a token whose keys no query read, whose acc row is 0). The tokens' rows are distinct, so
 * every element of grad has one writer. */
template <typename T>
__global__ void msa_add_acc_kernel(T *grad, const float *acc, int64_t n, int64_t width, const int32_t *key_rows, int M,
                                   float mul) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = i;
        if (key_rows) {
            const int64_t j = i / width;
            const int r = key_rows[j];
            if (r < 0 || r >= M) continue;
            o = (int64_t)r * width + (i - j * width);
        }
        grad[o] = from_f32<T>(to_f32(grad[o]) + mul * acc[i]);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Host side
 * ---------------------------------------------------------------------------------------------- */

/* Carve one scratch region: a first pass with base = nullptr only measures. */
struct Carve {
    char *base;
    size_t off;
    template <typename X> X *take(int64_t n) {
        off = align256(off);
        X *p = base ? (X *)(base + off) : nullptr;
        off += (size_t)(n > 0 ? n : 1) * sizeof(X);
        return p;
    }
};

/* One call's shapes. */
/* One call's shapes: N tokens (the key side), Nq query rows (N without a query_index), whose tokens are
 * q_token (NULL: row t is token t). */
struct Shape {
    int N, Nq, Hq, Hkv, D, G, K, B, ndocs, Rb, n_gr;
    int64_t P;
    const int32_t *q_token;
};

/* Per-chunk schedule buffers. */
struct Sched {
    int *rs, *cnt, *ntiles, *qoff, *tile_off;
    TileDesc *desc;
    int2 *ent;
    int tile_bound, ent_bound;
};

void sched_carve(Carve &cv, Sched &s, const Shape &sh, const Geo &geo, int Qc) {
    const int64_t E = (int64_t)Qc * sh.K * sh.Hkv;
    const int64_t Tb = (int64_t)geo.nks * ((E * sh.G + geo.M - 1) / geo.M + (E < sh.n_gr ? E : sh.n_gr));
    if (E >= INT32_MAX || Tb >= INT32_MAX) fatal("cuda msa_attention: a chunk of %d queries needs too many tiles", Qc);
    s.tile_bound = (int)Tb;
    s.ent_bound = (int)E;
    s.rs = cv.take<int>(sh.n_gr);
    s.cnt = cv.take<int>(sh.n_gr);
    s.ntiles = cv.take<int>(sh.n_gr);
    s.qoff = cv.take<int>(sh.n_gr + 1);
    s.tile_off = cv.take<int>(sh.n_gr + 1);
    s.desc = cv.take<TileDesc>(Tb);
    s.ent = cv.take<int2>(E);
}

void sched_build(const Sched &s, const Shape &sh, const Geo &geo, const int32_t *plan, const int32_t *topk,
                 const int32_t *cu, int c0, int c1) {
    const PlanView pv{plan, sh.P, (int64_t)sh.Nq * sh.K, sh.N};
    sched_count_kernel<<<grid_for(sh.n_gr, 256), 256, 0, stream()>>>(s.rs, s.cnt, s.ntiles, pv, sh.Rb, sh.n_gr, c0, c1, sh.G, geo.M,
                                                        geo.nks);
    LAUNCH_CHECK("msa_attention schedule count");
    sched_scan_kernel<<<1, 1024, 0, stream()>>>(s.qoff, s.tile_off, s.cnt, s.ntiles, sh.n_gr, s.tile_bound);
    LAUNCH_CHECK("msa_attention schedule scan");
    sched_desc_kernel<<<grid_for(s.tile_bound, 256), 256, 0, stream()>>>(s.desc, s.tile_off, s.qoff, s.cnt, pv, sh.Rb, sh.n_gr, sh.G,
                                                            geo.M, geo.nks, geo.KB, s.tile_bound);
    LAUNCH_CHECK("msa_attention schedule tiles");
    sched_entries_kernel<<<grid_for(s.ent_bound, 256), 256, 0, stream()>>>(s.ent, s.qoff, s.rs, pv, topk, sh.q_token, sh.Nq, cu,
                                                              sh.ndocs, sh.K, sh.B, sh.Rb, sh.n_gr, c0, c1, s.ent_bound);
    LAUNCH_CHECK("msa_attention schedule entries");
}

/* Queries per chunk: the partials of a chunk (bytes_per_query each) stay under partial_budget().
 * MSA_CUDA_MSA_CHUNK=n overrides it (tests use it to exercise several chunks on small inputs). */
int chunk_queries(int N, size_t bytes_per_query) {
    int64_t q = bytes_per_query ? (int64_t)(partial_budget() / bytes_per_query) : N;
    const char *env = getenv("MSA_CUDA_MSA_CHUNK");
    if (env && atoi(env) > 0) q = atoi(env);
    if (q > N) q = N;
    return q < 1 ? 1 : (int)q;
}


/* Validate what the entries share; returns the shape (P, Rb from N, K, B, ndocs). q has Nq rows; k and v have N
 * (a row per token) or, with key_rows, the fetched rows (M of them). */
Shape check_common(const char *what, const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *topk, const Tensor *plan,
                   const Tensor *cu, const MsaParams *p) {
    const int64_t ndocs = msa_check_params(what, p, cu);
    if (!q || !k || !v) fatal("cuda %s: q, k and v are required", what);
    if (q->ndim != 3) fatal("cuda %s: q must be [Nq, Hq, D], got %d dims", what, q->ndim);
    if (k->ndim != 3) fatal("cuda %s: k must be [N, Hkv, D], got %d dims", what, k->ndim);
    const int64_t Nq = q->shape[0], N = msa_token_count(k, p), M = k->shape[0];
    const int64_t Hq = q->shape[1], Hkv = k->shape[1], D = q->shape[2];
    const int32_t *q_token = msa_query_tokens(what, p, Nq, N);
    if (k->shape[2] != D) fatal("cuda %s: q head dim %lld differs from k head dim %lld", what, (long long)D, (long long)k->shape[2]);
    if (v->ndim != 3 || v->shape[0] != M || v->shape[1] != Hkv || v->shape[2] != D)
        fatal("cuda %s: v must be [%lld, %lld, %lld] like k", what, (long long)M, (long long)Hkv, (long long)D);
    if (Hkv <= 0 || Hq % Hkv != 0) fatal("cuda %s: %lld query heads are not a multiple of %lld KV heads", what, (long long)Hq, (long long)Hkv);
    if (D < 1 || D > CUDA_HEAD_DIM_MAX)
        fatal("cuda %s: head dim %lld not supported (1..%d, kernels/cuda/limits.h CUDA_HEAD_DIM_MAX)", what, (long long)D,
              CUDA_HEAD_DIM_MAX);
    if (q->dtype != k->dtype || q->dtype != v->dtype)
        fatal("cuda %s: q, k, v must share one dtype (got %s, %s, %s)", what, dt_name(q->dtype), dt_name(k->dtype), dt_name(v->dtype));
    if (q->dtype != DT_F32 && q->dtype != DT_BF16) fatal("cuda %s: dtype %s not supported (f32 or bf16)", what, dt_name(q->dtype));
    if (N >= INT32_MAX / 2 || M >= INT32_MAX / 2 || Hq > CUDA_HEADS_MAX) fatal("cuda %s: too many tokens or heads", what);
    const int64_t K = p->topk_blocks;
    if (topk) {
        if (topk->dtype != DT_I32) fatal("cuda %s: topk must be i32, got %s", what, dt_name(topk->dtype));
        if (topk->ndim != 3 || topk->shape[0] != Hkv || topk->shape[1] != Nq || topk->shape[2] != K)
            fatal("cuda %s: topk must be [Hidx = %lld, Nq = %lld, topk_blocks = %lld]", what, (long long)Hkv, (long long)Nq,
                  (long long)K);
        if (Nq * K >= INT32_MAX) fatal("cuda %s: Nq * topk_blocks = %lld does not fit the i32 plan", what, (long long)(Nq * K));
    } else if (plan) {
        fatal("cuda %s: a plan without topk (a NULL topk means every visible block, which has no plan)", what);
    } else if (q_token) {
        fatal("cuda %s: a NULL topk (every visible block) with a query_index: under sequence-split context parallelism "
              "the dense warm-up runs the ring attention (layers/msa.c)", what);
    }
    if (plan && q_token)
        fatal("cuda %s: a plan with a query_index (the plan's rows are the tokens; the kernels build their own)", what);
    const int64_t P = msa_plan_width_rows(N, Nq, K);
    if (plan && (plan->dtype != DT_I32 || plan->numel != Hkv * P))
        fatal("cuda %s: plan must be i32 [Hidx, msa_plan_width(N, k)] = [%lld, %lld], got %s with %lld elements", what,
              (long long)Hkv, (long long)P, dt_name(plan->dtype), (long long)plan->numel);
    Shape s;
    s.N = (int)N;
    s.Nq = (int)Nq;
    s.Hq = (int)Hq;
    s.Hkv = (int)Hkv;
    s.D = (int)D;
    s.G = (int)(Hq / Hkv);
    s.K = (int)K;
    s.B = p->block_size;
    s.ndocs = (int)ndocs;
    /* rows of the plan: sum over documents of ceil(len / B) <= N/B + ndocs (and <= N) */
    const int64_t rb = N / p->block_size + ndocs;
    s.Rb = (int)(rb < N ? rb : N);
    s.n_gr = (int)(Hkv * s.Rb);
    s.P = P;
    s.q_token = q_token;
    return s;
}

/* key_rows' data (NULL without) */
const int32_t *key_rows_of(const MsaParams *p) { return p->key_rows ? (const int32_t *)p->key_rows->data : nullptr; }

/* The plan to use: the caller's, or a temporary built here (msa_temporary_plan). */
const int32_t *get_plan(const Tensor *plan, const Tensor *topk, const Tensor *cu, const MsaParams *p, const Shape &sh) {
    if (plan) return (const int32_t *)plan->data;
    return msa_temporary_plan(topk, cu, p, sh.N);
}

/* blocks of 256 threads for rows (query, head) at 32 / W rows a warp */
template <int W> unsigned combine_blocks(int64_t rows) { return (unsigned)((rows + 8 * (32 / W) - 1) / (8 * (32 / W))); }

/* A combine's lane layout (see COMBINE_UNROLL_WIDE), one choice for both combines: bf16 partials at D = 128 and
 * 64 16 bytes a lane (a row on 16 or 8 lanes), fp32 ones one vector a lane, every slot of a top-16 selection in
 * flight; other D the general layout. launch(CombineLayout<...>{}) instantiates the kernel for it. */
template <int W_, int VPL_, int STEPS_, int U_> struct CombineLayout {
    static constexpr int W = W_, VPL = VPL_, STEPS = STEPS_, U = U_;
};
template <typename PT, typename F> void with_combine_layout(int D, F &&launch) {
    if constexpr (std::is_same<PT, bf16>::value) {
        if (D == 128) return launch(CombineLayout<16, 8, 1, COMBINE_UNROLL_LANES>{});
        if (D == 64) return launch(CombineLayout<8, 8, 1, COMBINE_UNROLL_LANES>{});
    }
    if (D == 128) launch(CombineLayout<32, 4, 1, COMBINE_UNROLL_WIDE>{});
    else if (D == 64) launch(CombineLayout<32, 2, 1, COMBINE_UNROLL_WIDE>{});
    else if (D % 128 == 0) launch(CombineLayout<32, 4, 2, COMBINE_UNROLL>{});
    else if (D % 64 == 0) launch(CombineLayout<32, 2, 4, COMBINE_UNROLL>{});
    else launch(CombineLayout<32, 1, 8, COMBINE_UNROLL>{});
}

template <typename T, typename PT>
void fwd_combine(Tensor *out, Tensor *lse, const PT *opart, const float *lpart, const int32_t *topk, const Shape &sh, int c0,
                 int nq, int nks, int NS) {
    with_combine_layout<PT>(sh.D, [&](auto layout) {
        using L = decltype(layout);
        msa_fwd_combine_kernel<T, PT, L::W, L::VPL, L::STEPS, L::U>
            <<<combine_blocks<L::W>((int64_t)nq * sh.Hq), 256, 0, stream()>>>(
                (T *)out->data, (float *)lse->data, opart, lpart, topk, c0, nq, sh.Nq, sh.Hq, sh.G, sh.K, nks, NS,
                sh.D);
    });
    LAUNCH_CHECK("msa_attention_forward combine");
}

/* dq += scale (* scale_grad[0]) * the partials of heads H of G per group, head dim D: the attention's dq
 * (H = Hq, G, D), or the KL's dqi (H = Hkv, G = 1, D = Di) */
template <typename T, typename PT>
void dq_combine(Tensor *dq, const PT *dqp, const int32_t *topk, const Shape &sh, int H, int G, int D, int c0, int nq,
                int nks, int NS, float scale, const float *scale_grad) {
    with_combine_layout<PT>(D, [&](auto layout) {
        using L = decltype(layout);
        msa_dq_combine_kernel<T, PT, L::W, L::VPL, L::STEPS, L::U>
            <<<combine_blocks<L::W>((int64_t)nq * H), 256, 0, stream()>>>(
                (T *)dq->data, dqp, topk, c0, nq, sh.Nq, H, G, sh.K, nks, NS, D, scale, scale_grad);
    });
    LAUNCH_CHECK("msa_attention_backward dq combine");
}

/* The TileArgs fields the forward and the backward share: the inputs, the chunk schedule's buffers and
 * the shapes. The rest stays null until the caller sets its direction's buffers; c0 is set per chunk
 * (for_each_chunk). */
TileArgs tile_args(const Tensor *q, const Tensor *k, const Tensor *v, const Sched &sc, const Shape &sh, const Geo &geo,
                   float scale) {
    TileArgs a;
    memset(&a, 0, sizeof a);
    a.q = q->data;
    a.k = k->data;
    a.v = v->data;
    a.desc = sc.desc;
    a.ent = sc.ent;
    a.tile_off = sc.tile_off;
    a.n_gr = sh.n_gr;
    a.Rb = sh.Rb;
    a.N = sh.N;
    a.Nq = sh.Nq;
    a.q_token = sh.q_token;
    a.Hq = sh.Hq;
    a.Hkv = sh.Hkv;
    a.G = sh.G;
    a.lgG = (sh.G & (sh.G - 1)) == 0 ? __builtin_ctz((unsigned)sh.G) : -1;
    a.NS = geo.NS;
    a.nks = geo.nks;
    a.scale = scale;
    return a;
}

/* The query chunks [c0, c1) of Qc queries in order: each chunk's schedule is built into sc and a.c0
 * set, then run(c0, c1) launches the chunk's kernels (which read the schedule and a). */
template <typename Run>
void for_each_chunk(const Sched &sc, const Shape &sh, const Geo &geo, const int32_t *plan, const int32_t *topk,
                    const int32_t *cu, int Qc, TileArgs &a, Run run) {
    for (int c0 = 0; c0 < sh.Nq; c0 += Qc) {
        const int c1 = sh.Nq - c0 > Qc ? c0 + Qc : sh.Nq;
        sched_build(sc, sh, geo, plan, topk, cu, c0, c1);
        a.c0 = c0;
        run(c0, c1);
    }
}

/* The geometry of the tile kernels for this call (the grid is measured once per kernel); Di > 0: the
 * tensor-core backward with the KL folded in. */
Geo tile_geo(DType dt, const Shape &sh, bool backward, int Di) {
    const bool tc = msa_tc_handles(dt, sh.D);
    Geo g = backward ? (tc ? msa_tc_backward_geo(sh.D, Di) : msa_cc_backward_geo(dt, sh.D))
                     : (tc ? msa_tc_forward_geo(sh.D) : msa_cc_forward_geo(dt, sh.D));
    g.nks = (sh.B + g.KB - 1) / g.KB;
    g.NS = sh.K * g.nks;
    return g;
}

template <typename T>
void forward_impl(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v, const int32_t *topk,
                  const int32_t *plan, const int32_t *cu, const Shape &sh, float scale) {
    const bool tc = msa_tc_handles(q->dtype, sh.D);
    const Geo geo = tile_geo(q->dtype, sh, false, 0);
    const size_t psz = tc ? sizeof(bf16) : sizeof(float); /* partial O: bf16 on the tensor-core path */
    const int Qc = chunk_queries(sh.Nq, (size_t)sh.Hq * geo.NS * (sh.D * psz + sizeof(float)));
    Carve cv{nullptr, 0};
    Sched sc;
    void *opart = nullptr;
    float *lpart = nullptr;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) cv = Carve{(char *)scratch(cv.off), 0};
        sched_carve(cv, sc, sh, geo, Qc);
        opart = cv.take<char>((int64_t)Qc * sh.Hq * geo.NS * sh.D * (int64_t)psz);
        lpart = cv.take<float>((int64_t)Qc * sh.Hq * geo.NS);
    }
    TileArgs a = tile_args(q, k, v, sc, sh, geo, scale);
    a.opart = opart;
    a.lpart = lpart;
    for_each_chunk(sc, sh, geo, plan, topk, cu, Qc, a, [&](int c0, int c1) {
        if (tc) {
            msa_tc_forward_tiles(geo, a, sh.D);
            fwd_combine<T, bf16>(out, lse, (const bf16 *)opart, lpart, topk, sh, c0, c1 - c0, geo.nks, geo.NS);
        } else {
            msa_cc_forward_tiles(geo, a, q->dtype, sh.D);
            fwd_combine<T, float>(out, lse, (const float *)opart, lpart, topk, sh, c0, c1 - c0, geo.nks, geo.NS);
        }
    });
}

/* The KL folded into the backward (msa_attention_kl_backward on the tensor cores): its inputs, outputs
 * (NULL: not wanted) and the gradient's coefficient mul * grad[0] (grad NULL: mul), index scale included. */
struct KlFold {
    const Tensor *qi, *ki, *idx_lse;
    Tensor *dqi, *dki, *kl;
    const float *grad;
    float mul, index_scale;
    int Di;
};

template <typename T>
void backward_impl(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k, const Tensor *v,
                   const Tensor *out, const Tensor *lse, const int32_t *topk, const int32_t *plan, const int32_t *cu,
                   const Shape &sh, float scale, const KlFold *kl, const int32_t *k_rows, int k_count) {
    const bool tc = msa_tc_handles(q->dtype, sh.D);
    const int Di = kl ? kl->Di : 0;
    const Geo geo = tile_geo(q->dtype, sh, true, Di);
    const size_t dq_psz = tc ? sizeof(bf16) : sizeof(float); /* dQ partials: bf16 on the tensor-core path */
    const size_t per_query = (dq ? (size_t)sh.Hq * geo.NS * sh.D * dq_psz : 0) +
                             (kl && kl->dqi ? (size_t)sh.Hkv * geo.NS * Di * sizeof(float) : 0);
    const int Qc = chunk_queries(sh.Nq, per_query);
    const bool want_kv = dk || dv;
    const int64_t nkv = (int64_t)sh.N * sh.Hkv * sh.D, nki = (int64_t)sh.N * Di;
    Carve cv{nullptr, 0};
    Sched sc;
    float *dsum = nullptr, *acck = nullptr, *accv = nullptr, *cut = nullptr;
    void *dqp = nullptr;
    float *dqip = nullptr, *accki = nullptr, *cutki = nullptr;
    double *klpart = nullptr;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) cv = Carve{(char *)scratch(cv.off), 0};
        dsum = cv.take<float>((int64_t)sh.Hq * sh.Nq);
        acck = dk ? cv.take<float>(nkv) : nullptr;
        accv = dv ? cv.take<float>(nkv) : nullptr;
        cut = want_kv ? cv.take<float>((int64_t)geo.grid * 2 * 2 * geo.KB * sh.D) : nullptr;
        dqp = dq ? cv.take<char>((int64_t)Qc * sh.Hq * geo.NS * sh.D * (int64_t)dq_psz) : nullptr;
        if (kl) {
            dqip = kl->dqi ? cv.take<float>((int64_t)Qc * sh.Hkv * geo.NS * Di) : nullptr;
            accki = kl->dki ? cv.take<float>((int64_t)sh.Hkv * nki) : nullptr;
            cutki = kl->dki ? cv.take<float>((int64_t)geo.grid * 2 * geo.KB * Di) : nullptr;
            klpart = kl->kl ? cv.take<double>(geo.grid) : nullptr;
        }
        sched_carve(cv, sc, sh, geo, Qc);
    }
    const int64_t rows = (int64_t)sh.Nq * sh.Hq;
    msa_dsum_kernel<T><<<(unsigned)((rows + 7) / 8), 256, 0, stream()>>>(dsum, (const T *)dout->data, (const T *)out->data, sh.Nq, sh.Hq,
                                                            sh.D);
    LAUNCH_CHECK("msa_attention_backward dsum");
    if (acck) CUDA_CHECK(cudaMemsetAsync(acck, 0, (size_t)nkv * sizeof(float), stream()));
    if (accv) CUDA_CHECK(cudaMemsetAsync(accv, 0, (size_t)nkv * sizeof(float), stream()));
    if (accki) CUDA_CHECK(cudaMemsetAsync(accki, 0, (size_t)(sh.Hkv * nki) * sizeof(float), stream()));
    if (klpart) CUDA_CHECK(cudaMemsetAsync(klpart, 0, (size_t)geo.grid * sizeof(double), stream()));
    TileArgs a = tile_args(q, k, v, sc, sh, geo, scale);
    a.dout = dout->data;
    a.lse = (const float *)lse->data;
    a.dsum = dsum;
    a.dqp = dqp;
    a.acck = acck;
    a.accv = accv;
    a.cut = cut;
    if (kl) {
        a.qi = kl->qi->data;
        a.ki = kl->ki->data;
        a.idx_lse = (const float *)kl->idx_lse->data;
        a.dqip = dqip;
        a.accki = accki;
        a.cutki = cutki;
        a.klpart = klpart;
        a.isl2 = kl->index_scale * 1.4426950408889634f;
    }
    for_each_chunk(sc, sh, geo, plan, topk, cu, Qc, a, [&](int c0, int c1) {
        if (tc) msa_tc_backward_tiles(geo, a, sh.D, Di);
        else msa_cc_backward_tiles(geo, a, q->dtype, sh.D);
        if (want_kv || accki) {
            msa_dkv_fixup_kernel<<<dim3(geo.grid, FIXUP_SLICES), 256, 0, stream()>>>(acck, accv, cut, accki, cutki, sc.desc, sc.tile_off, sh.n_gr, geo.nks,
                                                    sh.Rb, sh.N, sh.Hkv, sh.D, Di, geo.KB);
            LAUNCH_CHECK("msa_attention_backward dk dv fixup");
        }
        const int nq = c1 - c0, nks = geo.nks, NS = geo.NS;
        if (dq && tc)
            dq_combine<T, bf16>(dq, (const bf16 *)dqp, topk, sh, sh.Hq, sh.G, sh.D, c0, nq, nks, NS, scale, nullptr);
        else if (dq)
            dq_combine<T, float>(dq, (const float *)dqp, topk, sh, sh.Hq, sh.G, sh.D, c0, nq, nks, NS, scale, nullptr);
        if (kl && kl->dqi)
            dq_combine<T, float>(kl->dqi, a.dqip, topk, sh, sh.Hkv, 1, kl->Di, c0, nq, nks, NS, kl->mul, kl->grad);
    });
    /* dK/dV into the caller's rows: the tokens' (k_rows NULL), or the fetched rows key_rows names */
    const int64_t width = (int64_t)sh.Hkv * sh.D;
    if (acck) {
        msa_add_acc_kernel<T><<<grid_for(nkv, 256), 256, 0, stream()>>>((T *)dk->data, acck, nkv, width, k_rows, k_count, scale);
        LAUNCH_CHECK("msa_attention_backward dk");
    }
    if (accv) {
        msa_add_acc_kernel<T><<<grid_for(nkv, 256), 256, 0, stream()>>>((T *)dv->data, accv, nkv, width, k_rows, k_count, 1.0f);
        LAUNCH_CHECK("msa_attention_backward dv");
    }
    if (accki) {
        msa_dki_final_kernel<T><<<grid_for(nki, 256), 256, 0, stream()>>>((T *)kl->dki->data, accki, nki, sh.Hkv, kl->mul, kl->grad);
        LAUNCH_CHECK("msa_attention_kl_backward dki");
    }
    if (klpart) {
        msa_kl_mean((float *)kl->kl->data, klpart, geo.grid, (double)sh.Nq * sh.Hkv);
    }
}


}  // namespace

namespace msacuda {
void msa_kl_mean(float *kl, const double *parts, int n, double pairs) {
    msa_kl_final_kernel<<<1, 1024, 0, stream()>>>(kl, parts, n, pairs);
    LAUNCH_CHECK("msa kl mean");
}
}  // namespace msacuda

extern "C" void cuda_msa_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                           const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens,
                                           const MsaParams *p) {
    init();
    const char *what = "msa_attention_forward";
    const Shape sh = check_common(what, q, k, v, topk, plan, cu_seqlens, p);
    if (!out || out->numel != q->numel || out->dtype != q->dtype) fatal("cuda %s: out must have q's shape and dtype", what);
    if (!lse || lse->numel != (int64_t)sh.Hq * sh.Nq || lse->dtype != DT_F32) fatal("cuda %s: lse must be f32 [Hq, Nq]", what);
    if (!topk) { /* dense warm-up: every visible block = causal attention within the document */
        cuda_attention_forward(out, lse, q, k, v, cu_seqlens, p->scale);
        return;
    }
    if (sh.N == 0 || sh.Nq == 0) return;
    const int32_t *pl = get_plan(plan, topk, cu_seqlens, p, sh);
    const Tensor kt = msa_keys_by_token(what, k, p, 0), vt = msa_keys_by_token(what, v, p, 1);
    DISPATCH_FLOAT(q->dtype, T, what,
                   forward_impl<T>(out, lse, q, &kt, &vt, (const int32_t *)topk->data, pl, (const int32_t *)cu_seqlens->data,
                                   sh, p->scale));
}

extern "C" void cuda_msa_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                            const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                            const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens,
                                            const MsaParams *p) {
    init();
    const char *what = "msa_attention_backward";
    const Shape sh = check_common(what, q, k, v, topk, plan, cu_seqlens, p);
    if (!dq && !dk && !dv) return;
    if (!dout || !out || dout->numel != q->numel || out->numel != q->numel || dout->dtype != q->dtype || out->dtype != q->dtype)
        fatal("cuda %s: dout and out must have q's shape and dtype", what);
    if (!lse || lse->numel != (int64_t)sh.Hq * sh.Nq || lse->dtype != DT_F32) fatal("cuda %s: lse must be f32 [Hq, Nq]", what);
    const Tensor *grads[3] = {dq, dk, dv}, *like[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (grads[i] && (grads[i]->numel != like[i]->numel || grads[i]->dtype != q->dtype))
            fatal("cuda %s: gradients must have their inputs' shapes and dtype", what);
    if (!topk) {
        cuda_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens, p->scale);
        return;
    }
    if (sh.N == 0 || sh.Nq == 0) return;
    const int32_t *pl = get_plan(plan, topk, cu_seqlens, p, sh);
    const Tensor kt = msa_keys_by_token(what, k, p, 0), vt = msa_keys_by_token(what, v, p, 1);
    DISPATCH_FLOAT(q->dtype, T, what,
                   backward_impl<T>(dq, dk, dv, dout, q, &kt, &vt, out, lse, (const int32_t *)topk->data, pl,
                                    (const int32_t *)cu_seqlens->data, sh, p->scale, nullptr, key_rows_of(p),
                                    (int)k->shape[0]));
}


extern "C" void cuda_msa_attention_kl_backward(Tensor *dq, Tensor *dk, Tensor *dv, Tensor *dqi, Tensor *dki, Tensor *kl,
                                               const Tensor *dout, const Tensor *q, const Tensor *k, const Tensor *v,
                                               const Tensor *out, const Tensor *lse, const Tensor *qi, const Tensor *ki,
                                               const Tensor *idx_lse, const Tensor *topk, const Tensor *plan,
                                               const Tensor *cu_seqlens, const MsaParams *p, const Tensor *kl_grad,
                                               float kl_weight) {
    init();
    const char *what = "msa_attention_kl_backward";
    const Shape sh = check_common(what, q, k, v, topk, plan, cu_seqlens, p);
    if (!topk) fatal("cuda %s: topk is required (the dense warm-up has msa_kl_backward)", what);
    if (!dq && !dk && !dv && !dqi && !dki && !kl) return;
    if ((dq || dk || dv) && !dout) fatal("cuda %s: dout is required for dq, dk or dv", what);
    if (dout && (dout->numel != q->numel || dout->dtype != q->dtype)) fatal("cuda %s: dout must have q's shape and dtype", what);
    if (!out || out->numel != q->numel || out->dtype != q->dtype) fatal("cuda %s: out must have q's shape and dtype", what);
    if (!lse || lse->numel != (int64_t)sh.Hq * sh.Nq || lse->dtype != DT_F32) fatal("cuda %s: lse must be f32 [Hq, Nq]", what);
    const Tensor *grads[3] = {dq, dk, dv}, *like[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (grads[i] && (grads[i]->numel != like[i]->numel || grads[i]->dtype != q->dtype))
            fatal("cuda %s: gradients must have their inputs' shapes and dtype", what);
    if (!qi || !ki || qi->ndim != 3 || qi->shape[0] != sh.Nq || qi->shape[1] != sh.Hkv || ki->ndim != 2 ||
        ki->shape[0] != sh.N || ki->shape[1] != qi->shape[2] || qi->dtype != ki->dtype)
        fatal("cuda %s: qi must be [Nq, Hidx = Hkv, Di] and ki [N, Di] of one dtype", what);
    if (!idx_lse || idx_lse->numel != (int64_t)sh.Hkv * sh.Nq || idx_lse->dtype != DT_F32)
        fatal("cuda %s: idx_lse must be f32 [Hidx, Nq] (the indexer's)", what);
    if ((dqi && (dqi->numel != qi->numel || dqi->dtype != qi->dtype)) || (dki && (dki->numel != ki->numel || dki->dtype != ki->dtype)))
        fatal("cuda %s: dqi and dki must have qi's and ki's shapes and dtype", what);
    if ((kl && (kl->numel != 1 || kl->dtype != DT_F32)) || (kl_grad && (kl_grad->numel != 1 || kl_grad->dtype != DT_F32)))
        fatal("cuda %s: kl and kl_grad must be f32 scalars", what);
    const Tensor *dev[] = {dq, dk, dv, dqi, dki, kl, dout, out, lse, qi, ki, idx_lse, kl_grad};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i] && dev[i]->device != DEV_CUDA) fatal("cuda %s: every tensor must be on the CUDA device", what);
    if (sh.N == 0 || sh.Nq == 0) {
        if (kl) CUDA_CHECK(cudaMemsetAsync(kl->data, 0, sizeof(float), stream()));
        return;
    }
    const int Di = (int)qi->shape[2];
    /* the gradient's coefficient: kl_weight * kl_grad[0] / (Nq * Hidx), kl_grad read on the device */
    const float mul = (float)((double)kl_weight / ((double)sh.Nq * sh.Hkv));
    const float *grad = kl_grad ? (const float *)kl_grad->data : nullptr;
    /* MSA_CUDA_KL_FOLD=0 runs the separate kernels for every shape: the fold is new, and a user who suspects it
     * can compare the two paths without rebuilding */
    const char *fold_env = getenv("MSA_CUDA_KL_FOLD");
    const bool fold_off = fold_env && !strcmp(fold_env, "0");
    if (fold_off || !dout || (!dqi && !dki && !kl) || !msa_tc_kl_handles(q->dtype, sh.D, sh.G, Di) ||
        qi->dtype != DT_BF16) {
        /* the separate kernels in sequence (the CUDA-core shapes and dtypes, or no dout) */
        if (dq || dk || dv) cuda_msa_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, topk, plan, cu_seqlens, p);
        msa_kl_backward_scaled(dqi, dki, kl, q, k, lse, qi, ki, idx_lse, topk, plan, cu_seqlens, p, mul, grad);
        return;
    }
    const int32_t *pl = get_plan(plan, topk, cu_seqlens, p, sh);
    const KlFold fold = {qi, ki, idx_lse, dqi, dki, kl, grad, mul * p->index_scale, p->index_scale, Di};
    const Tensor kt = msa_keys_by_token(what, k, p, 0), vt = msa_keys_by_token(what, v, p, 1);
    backward_impl<bf16>(dq, dk, dv, dout, q, &kt, &vt, out, lse, (const int32_t *)topk->data, pl,
                        (const int32_t *)cu_seqlens->data, sh, p->scale, &fold, key_rows_of(p), (int)k->shape[0]);
}
