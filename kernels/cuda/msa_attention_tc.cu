/* The tensor-core tile kernels of the CUDA MSA attention (BF16, D = 64 or 128; the schedule, the
 * reductions and the entry points are in msa_attention.cu, which describes the design): 8 warps = two
 * warpgroups issuing Hopper warpgroup MMAs (wgmma, fp32 accumulation) on 128-byte-swizzled shared-memory
 * tiles addressed by descriptors, a 3-stage cp.async pipeline (descriptor, entries, gathered Q / dO rows
 * one tile ahead) so the gathers overlap the previous tile's math. Forward tile 128 packed rows (64 per
 * warpgroup) x 128 keys (two 64-key sub-tiles); backward tile 32 (D = 128) or 64 (D = 64) packed rows x
 * 128 keys (64 per warpgroup), optionally with the KL alignment loss folded in
 * (msa_attention_kl_backward; see the backward's section). The KL's small products stay on mma.sync. */
#include <limits.h>
#include <math.h>

#include "msa_attention.cuh"

using namespace msacuda;

namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

/* Shared-memory tile of rows of D bf16 (CPR = D/8 chunks of 16 bytes), chunk index XORed with the row
 * so that the 8 rows an ldmatrix reads hit 8 distinct bank groups. */
template <int CPR> __device__ __forceinline__ uint32_t swz(int row, int chunk) {
    static_assert(CPR == 4 || CPR % 8 == 0, "rows of 64 bytes or multiples of 128");
    if (CPR == 4) return (uint32_t)(row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4));
    return (uint32_t)(row * CPR * 16 + ((chunk ^ (row & 7)) << 4));
}

/* ------------------------------------------------------------------------------------------------
 * Tensor-core tile kernels: the common pipeline
 *
 * Iteration i of a CTA computes tile i while cp.async brings the descriptor of tile i+4, the entries
 * of tile i+3 (their address comes from that descriptor) and the gathered rows of tile i+1 (their
 * addresses come from the row meta of i+1), and the side warps build the row meta of tile i+2 from its
 * entries: no thread ever waits on a dependent global load, only on the group issued one tile earlier,
 * and everything a stage reads was made visible by the barrier that ends the previous iteration, so an
 * iteration has no barrier before its tile (with the meta one tile ahead, building it needed one).
 * Rings: descriptors 8, entries 4, row meta 4, row buffers 2.
 * ---------------------------------------------------------------------------------------------- */

constexpr int TC_THREADS = 256, TC_WARPS = 8, TC_KB = 128;
/* The tile kernels' CTA adds a producer warpgroup (warps 8-11) to the 256 computing threads: it runs the rings,
 * gathers the next tile's rows and loads a new segment's keys, in the issue slots the computing warps leave
 * while they wait on their products (the backward's issued one instruction every ~6 cycles). Named barriers: 0
 * is __syncthreads, 1-2 warpgroup_sync, TC_BAR_CONSUMERS the 256 computing threads, TC_BAR_PRODUCER the producer. */
constexpr int TC_PRODUCER_THREADS = 128, TC_WS_THREADS = TC_THREADS + TC_PRODUCER_THREADS, TC_WS_WARPS = TC_WS_THREADS / 32;
constexpr int TC_BAR_CONSUMERS = 3, TC_BAR_PRODUCER = 4;
/* registers per thread (setmaxnreg): the producer's 40 go to the computing warpgroups, 40 + 2 x 232 = 3 x 168,
 * the 168 a thread of a 384-thread CTA starts with */
constexpr int TC_PRODUCER_REGS = 40, TC_CONSUMER_REGS = 232;

/* the NT threads of barrier BAR meet (BAR 0: the whole CTA) */
template <int BAR, int NT> __device__ __forceinline__ void group_sync() {
    if constexpr (BAR == 0) __syncthreads();
    else asm volatile("bar.sync %0, %1;\n" ::"n"(BAR), "n"(NT) : "memory");
}


/* The pipeline's rings in shared memory: tile descriptors, the tiles' entries (query row, slot), and per
 * packed row its meta {query row (-1: invalid row), head h, partial slot s, token} (TileArgs). */
template <int M> struct TcRing {
    static constexpr int DESCS = 8, ENTS = 4, METAS = 4; /* live: descriptors i .. i+4, entries i+2, i+3, meta i .. i+2 */
    TileDesc desc[DESCS];
    int2 ent[ENTS][M];
    int4 meta_[METAS][M];
    __device__ __forceinline__ TileDesc &dsc(int j) { return desc[j & (DESCS - 1)]; }
    __device__ __forceinline__ int2 *entries(int j) { return ent[j & (ENTS - 1)]; }
    __device__ __forceinline__ int4 *meta(int j) { return meta_[j & (METAS - 1)]; }
};

/* The ring's and the gathers' helpers take the NT threads that run them and this thread's index t among them
 * (the producer warpgroup's, TC_BAR_PRODUCER their barrier). */
template <int M>
__device__ __forceinline__ void tc_issue_desc(TcRing<M> &ring, const TileArgs &a, int j, int t) {
    if (t == 0) {
        const uint32_t dst = smem_u32(&ring.dsc(j));
        cp_async16(dst, a.desc + j, true);
        cp_async16(dst + 16, (const char *)(a.desc + j) + 16, true);
    }
}
template <int M, int NT>
__device__ __forceinline__ void tc_issue_ent(TcRing<M> &ring, const TileArgs &a, int j, int t) {
    const TileDesc &d = ring.dsc(j);
    const int rows = d.rows & TILE_ROWS;
    const int nq = rows > 0 ? div_G(a, d.off0 + rows - 1) + 1 : 0;
    for (int p = t; p < nq; p += NT) cp_async8(smem_u32(&ring.entries(j)[p]), a.ent + d.ebase + p);
}
/* row p of tile j's meta (p >= M: none) */
template <int M>
__device__ __forceinline__ void tc_build_meta(TcRing<M> &ring, const TileArgs &a, int j, int p) {
    const TileDesc &d = ring.dsc(j);
    if (p < M) {
        int4 mt = make_int4(-1, 0, 0, -1);
        if (p < (d.rows & TILE_ROWS)) {
            const int pi = d.off0 + p, lq = div_G(a, pi), hh = pi - lq * a.G;
            mt = msa_row_meta(a, ring.entries(j)[lq], (d.gr / a.Rb) * a.G + hh, d.ks);
        }
        ring.meta(j)[p] = mt;
    }
}
/* gather rows (q or dout) [t, h, :] of the tile's packed rows into a swizzled buffer */
template <int D, int M, int NT>
__device__ __forceinline__ void tc_gather_rows(unsigned char *dst, const bf16 *src, const int4 *meta, int Hq, int t) {
    constexpr int CPR = D / 8, ROWS_PER_PASS = NT / CPR;
    static_assert(NT % CPR == 0 && (M * CPR) % NT == 0 && ROWS_PER_PASS % 8 == 0,
                  "whole passes of the block, and a thread's chunk at the same swizzle in every pass");
    /* a fixed count of passes (a loop from threadIdx.x to M * CPR the compiler cannot count cost ~40
     * instructions a chunk); this thread's chunk ch of rows row0 + ROWS_PER_PASS j, whose swizzle (row & 7) is
     * the same in every pass, so the shared address advances by a constant */
    const int row0 = t / CPR, ch = t % CPR;
    const uint32_t s0 = smem_u32(dst) + gmma_off(row0, ch, M);
#pragma unroll
    for (int j = 0; j < M * CPR / NT; j++) {
        const int4 mt = meta[row0 + j * ROWS_PER_PASS];
        const bool ok = mt.x >= 0;
        const bf16 *s = src + (ok ? ((int64_t)mt.x * Hq + mt.y) * D + ch * 8 : 0);
        cp_async16(s0 + j * ROWS_PER_PASS * 128, s, ok);
    }
}
/* the segment's keys [klo, khi) of K and V (KB rows, zero past khi) */
template <int D, int NT>
__device__ __forceinline__ void tc_load_kv(unsigned char *sK, unsigned char *sV, const TileArgs &a, const TileDesc &d, int t) {
    constexpr int CPR = D / 8;
    const int g = d.gr / a.Rb;
    const bf16 *k = (const bf16 *)a.k, *v = (const bf16 *)a.v;
    for (int idx = t; idx < TC_KB * CPR; idx += NT) {
        const int row = idx / CPR, ch = idx - row * CPR, key = d.klo + row;
        const bool ok = key < d.khi;
        const int64_t off = ok ? ((int64_t)key * a.Hkv + g) * D + ch * 8 : 0;
        cp_async16(smem_u32(sK) + gmma_off(row, ch, TC_KB), k + off, ok);
        cp_async16(smem_u32(sV) + gmma_off(row, ch, TC_KB), v + off, ok);
    }
}
/* The ring's prologue, before a CTA's first tile tb: the descriptors of tb .. tb+3, then the entries of
 * tb .. tb+2 (addressed by those descriptors), then the row meta of tb and tb+1 (built from those
 * entries), each stage waited for before the next. The kernel then gathers tb's rows and loads its K/V. */
template <int M, int NT, int BAR>
__device__ __forceinline__ void tc_ring_prologue(TcRing<M> &ring, const TileArgs &a, int tb, int te, int t, int meta_row) {
    for (int j = tb; j < te && j < tb + 4; j++) tc_issue_desc(ring, a, j, t);
    cp_async_commit();
    cp_async_wait_committed();
    group_sync<BAR, NT>();
    for (int j = tb; j < te && j < tb + 3; j++) tc_issue_ent<M, NT>(ring, a, j, t);
    cp_async_commit();
    cp_async_wait_committed();
    group_sync<BAR, NT>();
    for (int j = tb; j < te && j < tb + 2; j++) tc_build_meta(ring, a, j, meta_row);
    group_sync<BAR, NT>();
}
/* The ring's steps that open iteration i of the tile loop: the descriptor of i+4 and the entries of i+3
 * issued (committed by the kernel with i+1's rows; the descriptor of i+3 landed in iteration i-1), and
 * the row meta of i+2 from its entries (landed in iteration i-1), read by i+2's gather in iteration i+1,
 * after the barrier that ends this one. No barrier: nothing this iteration reads is written here. */
template <int M, int NT>
__device__ __forceinline__ void tc_ring_advance(TcRing<M> &ring, const TileArgs &a, int i, int te, int t, int meta_row) {
    if (i + 4 < te) tc_issue_desc(ring, a, i + 4, t);
    if (i + 3 < te) tc_issue_ent<M, NT>(ring, a, i + 3, t);
    if (i + 2 < te) tc_build_meta(ring, a, i + 2, meta_row);
}

/* whether tile i ends its segment (the next tile has other keys, or there is none) */
template <int M> __device__ __forceinline__ bool tc_seg_end(TcRing<M> &ring, int i, int te) {
    return i + 1 == te || ring.dsc(i + 1).gr != ring.dsc(i).gr || ring.dsc(i + 1).ks != ring.dsc(i).ks;
}

/* ------------------------------------------------------------------------------------------------
 * Tensor-core forward (Hopper warpgroup MMA)
 *
 * Warpgroup wg (warps 4wg .. 4wg+3) owns packed rows 64wg .. 64wg+63 of the tile, warp w rows 16w ..
 * 16w+15 (thread rows gid and gid+8). Per 64-key sub-tile: S = Q K^T as 8 (D = 128) or 4 k16 steps of
 * m64n64 with Q and K read from shared memory by the instruction, the online softmax in registers, then
 * O += P V with P as the A operand in registers and V read transposed (MN-major) from shared memory.
 * Q, K and V are never staged through registers: one descriptor per k step replaces the ldmatrix of
 * every warp (the K and V sub-tiles are read once per warpgroup instead of once per warp).
 * ---------------------------------------------------------------------------------------------- */

template <int D> struct TcFwd {
    static constexpr int M = 128, CPR = D / 8, RB = D * 2;
    static constexpr size_t Q_BYTES = (size_t)M * RB, KV_BYTES = (size_t)TC_KB * RB;
    /* + 1024: the buffers start 1024-byte aligned (the swizzle of the wgmma operands) */
    /* + the rows' lse, staged with the rows for tc_fwd_store */
    static constexpr size_t SMEM = 2 * Q_BYTES + 2 * KV_BYTES + M * sizeof(float) + sizeof(TcRing<M>) + 1024;
};

/* the 128 threads of warpgroup wg meet (named barrier 1 + wg; 0 is __syncthreads) */
__device__ __forceinline__ void warpgroup_sync(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); }

/* O += P V for 16 keys (O = P V with zero_d): the A fragment pa, V's 16 rows by descriptor dv (MN-major, panel
 * stride TC_KB rows) */
template <int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 8][4], const uint32_t (&pa)[4], uint64_t dv, bool zero_d) {
    if constexpr (D == 128) wgmma_rs_n128<1>(o, pa, dv, zero_d);
    else wgmma_rs_n64<1>(o, pa, dv, zero_d);
}

/* multiply the two rows a thread holds of an accumulator by their factors */
template <int NB> __device__ __forceinline__ void rescale_rows(float (&o)[NB][4], float fa, float fb) {
#pragma unroll
    for (int j = 0; j < NB; j++) {
        o[j][0] *= fa;
        o[j][1] *= fa;
        o[j][2] *= fb;
        o[j][3] *= fb;
    }
}

/* The online softmax of one 64-key sub-tile starting at key kbase (S in s, rows t_a / t_b see keys <= t,
 * keys < khi exist; t_min: the least t of the warp's valid rows): updates the running max (log2 units) and
 * sum, returns the factors the rows' earlier output must be scaled by and P as the A fragments of the
 * sub-tile's four k16 steps of P V. When every valid row of the warp sees the whole sub-tile (a selected
 * block before the rows' own), no key is masked; an invalid row (zero Q, never stored) then gets a softmax
 * of zeros, which is finite and read by nothing. */
__device__ __forceinline__ void fwd_softmax(float (&s)[8][4], uint32_t (&pa)[4][4], int kbase, int khi, int t_a, int t_b,
                                            int t_min, float sl2, float &m_a, float &m_b, float &l_a, float &l_b,
                                            float &al_a, float &al_b) {
    const int tig = threadIdx.x & 3;
    float mx_a = -INFINITY, mx_b = -INFINITY;
    if (kbase + 63 <= t_min && kbase + 64 <= khi) { /* warp-uniform */
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float x = s[j][e] * sl2;
                s[j][e] = x;
                if (e < 2) mx_a = fmaxf(mx_a, x);
                else mx_b = fmaxf(mx_b, x);
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kbase + j * 8 + tig * 2 + (e & 1), t = e < 2 ? t_a : t_b;
                const float x = (key < khi && key <= t) ? s[j][e] * sl2 : -INFINITY;
                s[j][e] = x;
                if (e < 2) mx_a = fmaxf(mx_a, x);
                else mx_b = fmaxf(mx_b, x);
            }
        }
    }
    mx_a = quad_max(mx_a);
    mx_b = quad_max(mx_b);
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    /* a row with nothing visible yet keeps max -inf: use 0 as the reference so no inf - inf */
    const float mu_a = mn_a == -INFINITY ? 0.0f : mn_a, mu_b = mn_b == -INFINITY ? 0.0f : mn_b;
    al_a = exp2_ftz(m_a - mu_a);
    al_b = exp2_ftz(m_b - mu_b);
    m_a = mn_a;
    m_b = mn_b;
    float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        s[j][0] = exp2_ftz(s[j][0] - mu_a);
        s[j][1] = exp2_ftz(s[j][1] - mu_a);
        s[j][2] = exp2_ftz(s[j][2] - mu_b);
        s[j][3] = exp2_ftz(s[j][3] - mu_b);
        sum_a += s[j][0] + s[j][1];
        sum_b += s[j][2] + s[j][3];
    }
    l_a = l_a * al_a + sum_a;
    l_b = l_b * al_b + sum_b;
    /* the accumulator layout of two adjacent key blocks is the A fragment of a k16 step */
#pragma unroll
    for (int kk = 0; kk < 4; kk++) acc_to_a_frag(pa[kk], s[2 * kk], s[2 * kk + 1]);
}

/* The tile's key block as its first NKT (1 or 2) 64-key sub-tiles (the rest masked for every row of the
 * warpgroup): both S = Q K^T issued at once, so the second runs on the tensor cores while the first one's
 * softmax runs on the CUDA cores, and the second one's softmax while P V of the first runs (so written; ptxas
 * moves the wait for that P V ahead of most of the softmax's exp2s: kernels/cuda/NOTES.md). NKT is a
 * template argument so that every wgmma wait is on one straight path from the products it waits for: with
 * the second product and the waits under separate run-time tests of the count, ptxas also follows the
 * path where a wait<1> comes after the first product alone (leaving it in flight while the softmax reads
 * it) and serialises every wgmma of the kernel (C7514). */
template <int D, int NKT>
__device__ __forceinline__ void fwd_block(float (&o)[D / 8][4], uint32_t qs, uint32_t ks, uint32_t vs, const TileDesc &d,
                                          int t_a, int t_b, int t_min, float sl2, float &m_a, float &m_b, float &l_a,
                                          float &l_b) {
    constexpr int M = TcFwd<D>::M;
    float s[NKT][8][4];
    const uint64_t qd = gmma_desc(qs, 16, 1024), kd = gmma_desc(ks, 16, 1024), vd = gmma_desc(vs, TC_KB * 128, 1024);
#pragma unroll
    for (int kt = 0; kt < NKT; kt++) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const uint64_t dq = gmma_desc_add(qd, (kk >> 2) * M * 128 + (kk & 3) * 32);
            const uint64_t dk = gmma_desc_add(kd, (kk >> 2) * TC_KB * 128 + kt * 64 * 128 + (kk & 3) * 32);
            wgmma_ss_n64<0, 0>(s[kt], dq, dk, kk == 0);
        }
        wgmma_commit();
    }
    wgmma_wait<NKT - 1>();
    wgmma_hold(s[0]);
    uint32_t pa[NKT][4][4]; /* one per sub-tile: P V of the first reads its registers while the second's
                             * softmax runs */
    float al_a, al_b;
    fwd_softmax(s[0], pa[0], d.klo, d.khi, t_a, t_b, t_min, sl2, m_a, m_b, l_a, l_b, al_a, al_b);
    /* the block's first product writes O (D = A B): O is never zeroed, so that ptxas can give it the wgmma's
     * registers from the start (a zeroed O lived where S's products land, and each sub-tile moved ~64 registers
     * out and back) */
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) wgmma_pv<D>(o, pa[0][kk], gmma_desc_add(vd, kk * 16 * 128), kk == 0);
    wgmma_commit();
    if constexpr (NKT == 2) {
        wgmma_wait<1>();
        wgmma_hold(s[1]);
        fwd_softmax(s[1], pa[1], d.klo + 64, d.khi, t_a, t_b, t_min, sl2, m_a, m_b, l_a, l_b, al_a, al_b);
        wgmma_wait<0>();
        wgmma_hold(o);
        rescale_rows(o, al_a, al_b);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) wgmma_pv<D>(o, pa[1][kk], gmma_desc_add(vd, (64 + kk * 16) * 128), false);
        wgmma_commit();
    }
    wgmma_wait<0>();
    wgmma_hold(o);
}

template <int D>
__device__ __forceinline__ void tc_fwd_tile(unsigned char *sQt, float *sLse, const unsigned char *sK, const unsigned char *sV,
                                            const TileDesc &d, const int4 *meta, const TileArgs &a) {
    using C = TcFwd<D>;
    constexpr int M = C::M, NT = D / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2, gid = lane >> 2, tig = lane & 3;
    const int r0 = warp * 16;
    const int4 ma = meta[r0 + gid], mb = meta[r0 + gid + 8];
    /* the warpgroup's last visible key: every warp of it computes the same value (wgmma is collective) */
    const int tmax = __reduce_max_sync(FULL, max(meta[wg * 64 + lane].w, meta[wg * 64 + 32 + lane].w));
    if (tmax < 0) return; /* no valid row in this warpgroup (warpgroup-uniform) */
    const float sl2 = a.scale * LOG2E;
    const uint32_t qs = smem_u32(sQt) + wg * 64 * 128, ks = smem_u32(sK), vs = smem_u32(sV);

    float o[NT][4]; /* written by fwd_block's first product, zero when no key is visible */
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const int kend = min(d.khi, tmax + 1); /* keys past it are masked for every row of the warpgroup */

    static_assert(TC_KB == 128, "two 64-key sub-tiles per block");
    const int nkt = kend > d.klo ? (kend - d.klo + 63) >> 6 : 0;
    /* the least last key of the warp's valid rows: sub-tiles before it need no mask */
    const int t_min = __reduce_min_sync(FULL, min(ma.w >= 0 ? ma.w : INT_MAX, mb.w >= 0 ? mb.w : INT_MAX));
    if (nkt == 2) fwd_block<D, 2>(o, qs, ks, vs, d, ma.w, mb.w, t_min, sl2, m_a, m_b, l_a, l_b);
    else if (nkt == 1) fwd_block<D, 1>(o, qs, ks, vs, d, ma.w, mb.w, t_min, sl2, m_a, m_b, l_a, l_b);
    else
#pragma unroll
        for (int j = 0; j < NT; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    l_a = quad_sum(l_a);
    l_b = quad_sum(l_b);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;

    /* stage the normalised rows (bf16) in this warp's own rows of the Q buffer once the whole warpgroup's
     * MMAs (which read those rows) are done, and their lse; tc_fwd_store writes them out */
    warpgroup_sync(wg);
#pragma unroll
    for (int j = 0; j < NT; j++) {
        *(uint32_t *)(sQt + gmma_off(r0 + gid, j, M) + tig * 4) = pack_bf16(o[j][0] * inv_a, o[j][1] * inv_a);
        *(uint32_t *)(sQt + gmma_off(r0 + gid + 8, j, M) + tig * 4) = pack_bf16(o[j][2] * inv_b, o[j][3] * inv_b);
    }
    if (tig == 0) {
        sLse[r0 + gid] = l_a > 0.0f ? (m_a + log2f(l_a)) * LN2 : -INFINITY;
        sLse[r0 + gid + 8] = l_b > 0.0f ? (m_b + log2f(l_b)) * LN2 : -INFINITY;
    }
}

/* The warp's staged rows (tc_fwd_tile) to their slots of the partials, 16-byte stores, and their lse. Called after
 * the loop's proxy fence rather than from the tile: the fence's MEMBAR waits for the thread's outstanding stores,
 * and these would be the youngest. A warpgroup the tile skipped has no valid row: nothing is stored. */
template <int D>
__device__ __forceinline__ void tc_fwd_store(const unsigned char *sQt, const float *sLse, const int4 *meta, const TileArgs &a) {
    using C = TcFwd<D>;
    constexpr int M = C::M;
    const int lane = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16;
    __syncwarp();
    bf16 *op = (bf16 *)a.opart;
#pragma unroll
    for (int it = 0; it < 16 * C::CPR / 32; it++) {
        const int c = lane + 32 * it, row = r0 + c / C::CPR, ch = c % C::CPR;
        const int4 mt = meta[row];
        if (mt.x < 0) continue;
        const uint4 val = *(const uint4 *)(sQt + gmma_off(row, ch, M));
        *(uint4 *)(op + (((int64_t)(mt.x - a.c0) * a.Hq + mt.y) * a.NS + mt.z) * D + ch * 8) = val;
    }
    if (lane < 16) {
        const int4 mt = meta[r0 + lane];
        if (mt.x >= 0) a.lpart[((int64_t)(mt.x - a.c0) * a.Hq + mt.y) * a.NS + mt.z] = sLse[r0 + lane];
    }
}

/* the dynamic shared memory rounded up to 1024 bytes (the launch asks for 1024 more) */
__device__ __forceinline__ unsigned char *smem_1024(unsigned char *p) {
    return p + ((1024 - (smem_u32(p) & 1023)) & 1023);
}

/* The forward's producer warpgroup: the rings, tile i+1's query rows while tile i is computed, each segment's K/V;
 * its barriers pair with tc_fwd_compute's one for one */
template <int D>
__device__ __forceinline__ void tc_fwd_produce(unsigned char *sQ, unsigned char *sK, unsigned char *sV, TcRing<TcFwd<D>::M> &ring,
                                               const TileArgs &a, int tb, int te) {
    using C = TcFwd<D>;
    constexpr int M = C::M, NT = TC_PRODUCER_THREADS;
    const int t = threadIdx.x - TC_THREADS;
    tc_ring_prologue<M, NT, TC_BAR_PRODUCER>(ring, a, tb, te, t, t);
    tc_gather_rows<D, M, NT>(sQ + (tb & 1) * C::Q_BYTES, (const bf16 *)a.q, ring.meta(tb), a.Hq, t);
    tc_load_kv<D, NT>(sK, sV, a, ring.dsc(tb), t);
    cp_async_commit();
    cp_async_wait_committed();
    fence_async_smem();
    __syncthreads();
    for (int i = tb; i < te; i++) {
        tc_ring_advance<M, NT>(ring, a, i, te, t, t);
        if (i + 1 < te) tc_gather_rows<D, M, NT>(sQ + ((i + 1) & 1) * C::Q_BYTES, (const bf16 *)a.q, ring.meta(i + 1), a.Hq, t);
        cp_async_commit();
        cp_async_wait_committed();
        fence_async_smem();
        __syncthreads(); /* tile i done, tile i+1's rows in place */
        if (i + 1 < te && tc_seg_end(ring, i, te)) {
            tc_load_kv<D, NT>(sK, sV, a, ring.dsc(i + 1), t);
            cp_async_commit();
            cp_async_wait_committed();
            fence_async_smem();
            __syncthreads();
        }
    }
}

/* The forward's computing warpgroups: each tile, then its rows out */
template <int D>
__device__ __forceinline__ void tc_fwd_compute(unsigned char *sQ, float *sLse, const unsigned char *sK, const unsigned char *sV,
                                               TcRing<TcFwd<D>::M> &ring, const TileArgs &a, int tb, int te) {
    using C = TcFwd<D>;
    __syncthreads(); /* the producer's prologue: tile tb's rows and keys in place */
    for (int i = tb; i < te; i++) {
        tc_fwd_tile<D>(sQ + (i & 1) * C::Q_BYTES, sLse, sK, sV, ring.dsc(i), ring.meta(i), a);
        tc_fwd_store<D>(sQ + (i & 1) * C::Q_BYTES, sLse, ring.meta(i), a);
        __syncthreads(); /* tile i done, tile i+1's rows in place */
        if (i + 1 < te && tc_seg_end(ring, i, te)) __syncthreads(); /* the next segment's keys in place */
    }
}

/* Warpgroups 0-1 compute, warpgroup 2 produces (as in the backward, msa_bwd_tc_kernel) */
template <int D> __global__ void __launch_bounds__(TC_WS_THREADS, 1) msa_fwd_tc_kernel(TileArgs a) {
    using C = TcFwd<D>;
    constexpr int M = C::M;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char *sQ = smem_1024(smem_raw), *sK = sQ + 2 * C::Q_BYTES, *sV = sK + C::KV_BYTES;
    float *sLse = (float *)(sV + C::KV_BYTES);
    TcRing<M> &ring = *(TcRing<M> *)(sLse + M);
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    if (tb >= te) return;
    if (warp_idx_uniform() >= TC_WARPS) { /* warpgroup-uniform */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(TC_PRODUCER_REGS));
        tc_fwd_produce<D>(sQ, sK, sV, ring, a, tb, te);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(TC_CONSUMER_REGS));
        tc_fwd_compute<D>(sQ, sLse, sK, sV, ring, a, tb, te);
    }
}

/* ------------------------------------------------------------------------------------------------
 * Tensor-core backward, and the KL folded into it
 *
 * With DI > 0 (msa_attention_kl_backward) each tile also does the KL's work on the pairs it already
 * holds: the tile's packed rows are whole queries (G | M, M/G <= 8 queries), so the teacher of (key,
 * query) is the mean of the P^T entries of the query's G heads, summed in registers and across the quad;
 * the student's scores Z^T = KI QI^T (the warp's 16 keys x the tile's queries, one n8 tile) come from
 * the segment's ki rows (loaded with K/V) and the tile's qi rows (gathered with Q/dO); dz = r - p with
 * r = exp(z - idx_lse) (the indexer's normaliser) is then
 *   dz is staged as bf16 [key][query slot] in a batch of 16 query slots (the queries of 16 / (M/G)
 *   consecutive tiles of one segment, their qi rows copied beside it), and each full batch (or the
 *   segment's last) is flushed with whole k16 / n16 MMAs where a tile alone would fill 2 of 16:
 *   dki += dz QI: fp32 accumulators in shared memory (each thread owns its elements, the mma C layout),
 *                 written out per segment like dK/dV (whole segments straight into the group's fp32 dki,
 *                 split ones through per-CTA parts summed by the fixup in CTA order);
 *   dqi partial = dz^T KI per (query, slot): one m16n16 mma chain per 16 dims over the segment's keys,
 *                 combined in slot order like dQ;
 *   KL += p (log p - log r) per CTA in fp64, summed in CTA order at the end.
 * No atomics: the KL's results are as deterministic as dK/dV.
 * ---------------------------------------------------------------------------------------------- */

template <int D, int DI> struct TcBwd {
    static constexpr int M = D == 128 ? 32 : 64; /* packed query rows per tile (registers: dK, dV live) */
    static constexpr int RB = D * 2;
    /* dS of the tile for dQ (bf16, 128-byte swizzle) as dS [M rows][key] */
    static constexpr size_t Q_BYTES = (size_t)M * RB, KV_BYTES = (size_t)TC_KB * RB, DS_BYTES = (size_t)TC_KB * M * 2;
    /* the KL's: ki of the segment, qi of the tile's queries (8 rows, the rows past the tile's queries
     * zero), the batch (dz [key][16 slots] bf16, the slots' qi rows and meta), the dki accumulators */
    /* BATCH: query slots a KL flush takes (32 where shared memory allows: a flush's read-add-write of the dki
     * accumulators and its barrier then serve twice the tiles) */
    static constexpr int QI_ROWS = 8, BATCH = D == 64 ? 32 : 16;
    static constexpr size_t KI_BYTES = (size_t)TC_KB * DI * 2, QI_BYTES = (size_t)QI_ROWS * DI * 2,
                            DZB_BYTES = DI > 0 ? (size_t)TC_KB * BATCH * 2 : 0, QIB_BYTES = (size_t)BATCH * DI * 2,
                            BMETA_BYTES = DI > 0 ? BATCH * sizeof(int4) : 0, KACC_BYTES = (size_t)TC_KB * DI * 4,
                            LI_BYTES = DI > 0 ? 2 * QI_ROWS * sizeof(float) : 0;
    /* two dz buffers: a batch is flushed and its buffer zeroed after the barrier that ends its last tile, while the
     * next batch's first tile, with no barrier between, writes the other one */
    static constexpr size_t KL_BYTES = KI_BYTES + 2 * QI_BYTES + 2 * DZB_BYTES + QIB_BYTES + BMETA_BYTES + KACC_BYTES + LI_BYTES;
    static constexpr size_t SMEM =
        4 * Q_BYTES + 2 * KV_BYTES + DS_BYTES + KL_BYTES + 4 * M * sizeof(float) + sizeof(TcRing<M>) + 1024;
};

/* Hopper's most dynamic shared memory a block may opt in to (227 KB): every tile kernel's layout fits it */
static_assert(TcBwd<128, 128>::SMEM <= 227 * 1024 && TcBwd<64, 128>::SMEM <= 227 * 1024 && TcFwd<128>::SMEM <= 227 * 1024,
              "the tile kernels' shared memory");

/* Accumulators of one segment: warp w owns keys 16w .. 16w+15 (thread rows gid, gid+8), all D. */
template <int D> struct TcDkv {
    float k[D / 8][4], v[D / 8][4];
};

/* The KL's shared memory (DI > 0) of the CTA, and where the tile's current buffers are. */
struct TcKlSmem {
    unsigned char *ki, *qi; /* qi: 2 buffers of QI_BYTES */
    bf16 *dzb;              /* the batch's dz [TC_KB][BATCH] (dz_off), zero where no visible pair (one of two buffers) */
    unsigned char *qib;     /* the batch's qi rows */
    int4 *bmeta;            /* the batch's query slots: the meta of the query's first packed row */
    float *kacc, *li;       /* li: 2 buffers of QI_ROWS (the tile's queries' idx_lse, natural log) */
};

/* element (key row, column) of the dki accumulators of DI columns: columns XOR-swizzled by 8 per row so the
 * float2 accesses of a half-warp (rows gid, columns 2 tig) hit 32 distinct banks */
template <int DI> __device__ __forceinline__ float *kacc_at(float *kacc, int row, int col) {
    return kacc + row * DI + (col ^ ((row & 7) << 3));
}

/* Add a finished segment's dK/dV (unscaled) to the fp32 accumulators, or, when the segment is split
 * over CTAs, store it in this CTA's part (slot 1: the CTA where the segment starts; slot 0: the
 * others), summed in CTA order by msa_dkv_fixup_kernel. The KL's dki (DI > 0) the same way, from the
 * shared-memory accumulators, which it zeroes. */
template <int D, int DI>
__device__ __forceinline__ void tc_flush(TcDkv<D> &acc, const TcKlSmem &kls, const TileDesc &d, bool started, bool ended,
                                         const TileArgs &a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int g = d.gr / a.Rb;
    const bool whole = started && ended;
    float *cutp = a.cut + (((int64_t)blockIdx.x * 2 + (started ? 1 : 0)) * 2) * TC_KB * D;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int kr = warp * 16 + gid + half * 8, key = d.klo + kr;
        if (key >= d.khi) continue;
        if (a.acck || a.accv) {
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                const int col = j * 8 + tig * 2;
                const float2 vk = make_float2(acc.k[j][2 * half], acc.k[j][2 * half + 1]);
                const float2 vv = make_float2(acc.v[j][2 * half], acc.v[j][2 * half + 1]);
                if (whole) {
                    const int64_t o = ((int64_t)key * a.Hkv + g) * D + col;
                    if (a.acck) {
                        float2 x = *(float2 *)(a.acck + o);
                        x.x += vk.x;
                        x.y += vk.y;
                        *(float2 *)(a.acck + o) = x;
                    }
                    if (a.accv) {
                        float2 x = *(float2 *)(a.accv + o);
                        x.x += vv.x;
                        x.y += vv.y;
                        *(float2 *)(a.accv + o) = x;
                    }
                } else {
                    *(float2 *)(cutp + (int64_t)kr * D + col) = vk;
                    *(float2 *)(cutp + (int64_t)(TC_KB + kr) * D + col) = vv;
                }
            }
        }
        if constexpr (DI > 0) {
            if (a.accki) {
                float *cuti = a.cutki + (((int64_t)blockIdx.x * 2 + (started ? 1 : 0)) * TC_KB + kr) * DI;
                float *dst = a.accki + ((int64_t)g * a.N + key) * DI;
#pragma unroll
                for (int j = 0; j < DI / 8; j++) {
                    const int col = j * 8 + tig * 2;
                    float2 *s = (float2 *)kacc_at<DI>(kls.kacc, kr, col);
                    const float2 v = *s;
                    *s = make_float2(0.0f, 0.0f);
                    if (whole) {
                        float2 x = *(float2 *)(dst + col);
                        x.x += v.x;
                        x.y += v.y;
                        *(float2 *)(dst + col) = x;
                    } else {
                        *(float2 *)(cuti + col) = v;
                    }
                }
            }
        }
    }
}

/* Byte offset of 16-byte chunk `chunk` (slots 8 chunk ..) of key row `key` in a dz batch [TC_KB][BATCH] bf16: the
 * chunks of a row are XOR-swizzled by the row's place in its 128-byte line group, so that the eight row addresses
 * of an ldmatrix phase (rows r .. r+7, one chunk) fall in distinct 16-byte bank groups (rows of 32 or 64 bytes
 * unswizzled would put two or four in one) */
template <int BATCH> __device__ __forceinline__ uint32_t dz_off(int key, int chunk) {
    constexpr int CH = BATCH / 8, ROWS_PER_LINE = 8 / CH;
    static_assert(CH == 2 || CH == 4, "16 or 32 slots");
    return (uint32_t)(key * BATCH * 2 + ((chunk ^ ((key / ROWS_PER_LINE) & (CH - 1))) << 4));
}

/* The teacher (times G: the sum of P over the query's G heads) of this thread's four (key, query) elements of
 * Z^T, tp[e] for key gid + 8 (e >> 1) and query 2 tig + (e & 1), from st = P^T (key rows gid, gid + 8; packed
 * row n * 8 + 2 tig + c, of query (n * 8 + 2 tig + c) >> LGG). G = 2^LGG is a template argument so that a
 * query's rows are known at compile time: G >= 8 makes whole n-tiles one query's (added, then summed over
 * the quad), G = 4 splits each n-tile between two queries (halves of the quad). The sums run in the order
 * of the general form (rows ascending from 0, then the quad), so the bits do not depend on the form. */
template <int M, int LGG> __device__ __forceinline__ void kl_teacher(const float (&st)[M / 8][4], float (&tp)[4]) {
    constexpr int NQ = M / 8, QUERIES = M >> LGG;
    static_assert(QUERIES >= 1 && QUERIES <= 8 && LGG >= 2, "msa_tc_kl_handles: 1 to 8 queries per tile, G >= 4");
    const int lane = threadIdx.x & 31, tig = lane & 3;
    tp[0] = tp[1] = tp[2] = tp[3] = 0.0f;
    if constexpr (LGG >= 3) {
        constexpr int PER = 1 << (LGG - 3); /* n-tiles per query */
#pragma unroll
        for (int q = 0; q < QUERIES; q++) {
            float sa = 0.0f, sb = 0.0f;
#pragma unroll
            for (int n = q * PER; n < (q + 1) * PER; n++) {
                sa += st[n][0];
                sa += st[n][1];
                sb += st[n][2];
                sb += st[n][3];
            }
            sa = quad_sum(sa);
            sb = quad_sum(sb);
            if (q == 2 * tig) tp[0] = sa, tp[2] = sb;
            if (q == 2 * tig + 1) tp[1] = sa, tp[3] = sb;
        }
    } else { /* G = 4: lanes tig 0-1 of n-tile n hold query 2n, lanes 2-3 query 2n + 1 */
#pragma unroll
        for (int n = 0; n < NQ; n++) {
            float sa = 0.0f, sb = 0.0f;
            sa += st[n][0];
            sa += st[n][1];
            sb += st[n][2];
            sb += st[n][3];
            sa += __shfl_xor_sync(FULL, sa, 1);
            sb += __shfl_xor_sync(FULL, sb, 1);
            /* query 2 tig is n-tile tig's first half, query 2 tig + 1 its second */
            const float a0 = __shfl_sync(FULL, sa, lane & ~3), a1 = __shfl_sync(FULL, sa, (lane & ~3) | 2);
            const float b0 = __shfl_sync(FULL, sb, lane & ~3), b1 = __shfl_sync(FULL, sb, (lane & ~3) | 2);
            if (n == tig) tp[0] = a0, tp[1] = a1, tp[2] = b0, tp[3] = b1;
        }
    }
}

/* kl_teacher for the group sizes a tile of M rows takes (msa_tc_kl_handles), nothing for the others */
template <int M, int LGG> __device__ __forceinline__ void kl_teacher_of(const float (&st)[M / 8][4], float (&tp)[4]) {
    if constexpr ((M >> LGG) >= 1 && (M >> LGG) <= 8) kl_teacher<M, LGG>(st, tp);
    else tp[0] = tp[1] = tp[2] = tp[3] = 0.0f;
}

/* The KL's part of a tile for the warp's 16 keys (they have visible pairs): st = P^T of the warp (key rows
 * gid, gid+8; packed row n*8 + 2 tig + (e & 1)), zt = Z^T, the student's scores of the same keys and the tile's
 * queries 0-7 (wgmma_keys_queries: key rows gid, gid+8, query 2 tig + (e & 1)). all_visible: every valid row
 * sees all 16 keys. Stages dz in the batch at slots pos * nqt .., returns the warp's KL share of this thread
 * (log2 units). */
template <int D, int DI>
__device__ __forceinline__ float tc_kl_keys(const float (&st)[TcBwd<D, DI>::M / 8][4], const float (&zt)[4],
                                            const TcKlSmem &kls, const float *sLIt, const TileDesc &d, const int4 *meta,
                                            int pos, bool all_visible, const TileArgs &a) {
    using C = TcBwd<D, DI>;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int kw0 = warp * 16, lgG = a.lgG, nqt = C::M >> lgG;
    /* the teacher (times G) of this thread's (key, query) elements */
    float tp[4];
    switch (lgG) { /* msa_tc_kl_handles: G = M / 8 .. M, a power of two */
    case 2: kl_teacher_of<C::M, 2>(st, tp); break;
    case 3: kl_teacher_of<C::M, 3>(st, tp); break;
    case 4: kl_teacher_of<C::M, 4>(st, tp); break;
    case 5: kl_teacher_of<C::M, 5>(st, tp); break;
    default: kl_teacher_of<C::M, 6>(st, tp); break;
    }
    const float invG = ldexpf(1.0f, -lgG), lg2G = (float)lgG;
    float dz[4], kl = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int qc = 2 * tig + (e & 1), key = d.klo + kw0 + gid + (e >> 1) * 8;
        const int t = qc < nqt ? meta[qc << lgG].w : -1;
        const bool vis = t >= 0 && (all_visible || (key <= t && key < d.khi));
        float v = 0.0f;
        if (vis) {
            const float lr = zt[e] * a.isl2 - sLIt[qc] * LOG2E; /* log2 r */
            const float p = tp[e] * invG;
            v = exp2_ftz(lr) - p;
            if (tp[e] > 0.0f) kl = fmaf(p, (log2_ftz(tp[e]) - lg2G) - lr, kl);
        }
        dz[e] = v;
    }
    if (a.accki || a.dqip) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int qc = 2 * tig + (e & 1);
            if (const int slot = pos * nqt + qc; qc < nqt && dz[e] != 0.0f)
                *(bf16 *)((unsigned char *)kls.dzb + dz_off<C::BATCH>(kw0 + gid + (e >> 1) * 8, slot >> 3) + (slot & 7) * 2) =
                    __float2bfloat16_rn(dz[e]);
        }
    }
    return kl;
}

/* Add the tile's queries to the batch at position pos: their qi rows and meta (after the tile's buffers
 * have landed; read by the flush after the loop's barrier). */
template <int D, int DI>
__device__ __forceinline__ void tc_kl_batch_add(const TcKlSmem &kls, const unsigned char *sQIt, const int4 *meta, int pos,
                                                const TileArgs &a) {
    using C = TcBwd<D, DI>;
    constexpr int CPRI = DI / 8;
    const int nqt = C::M >> a.lgG;
    for (int idx = threadIdx.x; idx < nqt * CPRI; idx += TC_THREADS) {
        const int r = idx / CPRI, ch = idx - r * CPRI;
        *(uint4 *)(kls.qib + swz<CPRI>(pos * nqt + r, ch)) = *(const uint4 *)(sQIt + gmma_off(r, ch, C::QI_ROWS));
    }
    if (threadIdx.x < nqt) kls.bmeta[pos * nqt + threadIdx.x] = meta[threadIdx.x << a.lgG];
}

/* Flush the batch (its first nslots slots; all threads, after a barrier that follows the batch's last
 * tile): dki += dz QI into the shared accumulators (warp w: keys 16w ..), the dqi partials dz^T KI of the
 * slots' queries (warp w < DI/16: dims 16w ..), then dz zeroed for the next batch. */
template <int D, int DI>
__device__ __forceinline__ void tc_kl_flush(const TcKlSmem &kls, int nslots, int nkeys, const TileArgs &a) {
    using C = TcBwd<D, DI>;
    constexpr int CPRI = DI / 8, KS = C::BATCH / 16, NT = C::BATCH / 8; /* k16 steps / n8 tiles of slots */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const uint32_t dzs = smem_u32(kls.dzb), qbs = smem_u32(kls.qib), kis = smem_u32(kls.ki);
    if (a.accki) {
        const int kw0 = warp * 16;
        uint32_t af[KS][4];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) ldsm_x4(af[ks], dzs + dz_off<C::BATCH>(kw0 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
        for (int dp = 0; dp < DI / 16; dp++) {
            float c0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                uint32_t b[4];
                ldsm_x4_t(b, qbs + swz<CPRI>(ks * 16 + (lane & 15), dp * 2 + (lane >> 4)));
                mma_bf16_16816(c0, af[ks], b[0], b[1]);
                mma_bf16_16816(c1, af[ks], b[2], b[3]);
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = kw0 + gid + half * 8, col = dp * 16 + tig * 2;
                float2 *p0 = (float2 *)kacc_at<DI>(kls.kacc, row, col), *p1 = (float2 *)kacc_at<DI>(kls.kacc, row, col + 8);
                float2 x0 = *p0, x1 = *p1;
                x0.x += c0[2 * half];
                x0.y += c0[2 * half + 1];
                x1.x += c1[2 * half];
                x1.y += c1[2 * half + 1];
                *p0 = x0;
                *p1 = x1;
            }
        }
    }
    if (a.dqip && warp < DI / 16) {
        const int mt = warp, nk16 = (nkeys + 15) >> 4;
        float c[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < TC_KB / 16; kk++) {
            if (kk < nk16) {
                uint32_t af[4];
                ldsm_x4_t(af, kis + gmma_off(kk * 16 + (lane & 7) + ((lane >> 4) & 1) * 8, mt * 2 + ((lane >> 3) & 1), TC_KB));
#pragma unroll
                for (int h = 0; h < NT / 2; h++) {
                    uint32_t b[4];
                    ldsm_x4_t(b, dzs + dz_off<C::BATCH>(kk * 16 + (lane & 15), 2 * h + (lane >> 4)));
                    mma_bf16_16816(c[2 * h], af, b[0], b[1]);
                    mma_bf16_16816(c[2 * h + 1], af, b[2], b[3]);
                }
            }
        }
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int slot = n * 8 + 2 * tig + (e & 1);
                if (slot >= nslots) continue;
                const int4 m = kls.bmeta[slot];
                if (m.x < 0) continue;
                const int dim = mt * 16 + gid + (e >> 1) * 8;
                a.dqip[(((int64_t)(m.x - a.c0) * a.Hkv + (m.y >> a.lgG)) * a.NS + m.z) * DI + dim] = c[n][e];
            }
        }
    }
    group_sync<TC_BAR_CONSUMERS, TC_THREADS>();
    for (int idx = threadIdx.x; idx < (int)(C::DZB_BYTES / 16); idx += TC_THREADS) ((uint4 *)kls.dzb)[idx] = make_uint4(0, 0, 0, 0);
}

/* Column of element col (4-aligned groups stay together) of row `row` in the fp32 [row][64] staging of the
 * 32-row tile's dQ: the fragment writes (rows 2 tig + c for one c, dims gid + const) and the float4 reads
 * (rows r, r + 1 for even r) each hit 32 distinct banks */
__device__ __forceinline__ int stage_col(int row, int col) { return col ^ ((((row >> 1) & 3) ^ ((row & 1) << 1)) << 3); }

/* X^T = A B^T over the D head dims: A the warpgroup's 64 keys of K or V (descriptor ad), B the tile's M packed rows
 * of Q or dO (bd), both K-major; issued, not committed */
template <int D, int M> __device__ __forceinline__ void wgmma_keys_rows(float (&x)[M / 8][4], uint64_t ad, uint64_t bd) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const uint32_t ko = (kk >> 2) * TC_KB * 128 + (kk & 3) * 32, qo = (kk >> 2) * M * 128 + (kk & 3) * 32;
        if constexpr (M == 32) wgmma_ss_n32<0, 0>(x, gmma_desc_add(ad, ko), gmma_desc_add(bd, qo), kk == 0);
        else wgmma_ss_n64<0, 0>(x, gmma_desc_add(ad, ko), gmma_desc_add(bd, qo), kk == 0);
    }
}

/* Z^T = KI QI^T over the DI index dims: the warpgroup's 64 keys of ki (descriptor ad, TC_KB rows a panel) against
 * the tile's NQ query rows of qi (bd), both K-major; one n8 product, issued, not committed */
template <int DI, int NQ> __device__ __forceinline__ void wgmma_keys_queries(float (&z)[1][4], uint64_t ad, uint64_t bd) {
    static_assert(NQ == 8, "one n8 tile of queries");
#pragma unroll
    for (int kk = 0; kk < DI / 16; kk++) {
        const uint32_t ko = (kk >> 2) * TC_KB * 128 + (kk & 3) * 32, qo = (kk >> 2) * NQ * 128 + (kk & 3) * 32;
        wgmma_ss_n8<0, 0>(z, gmma_desc_add(ad, ko), gmma_desc_add(bd, qo), kk == 0);
    }
}

template <int D, int DI>
__device__ __forceinline__ float tc_bwd_tile(TcDkv<D> &acc, const TcKlSmem &kls, unsigned char *sQt,
                                             unsigned char *sOt, const float *sL, const float *sDs,
                                             const unsigned char *sQIt, const float *sLIt, unsigned char *sdS,
                                             const unsigned char *sK, const unsigned char *sV, const TileDesc &d,
                                             const int4 *meta, int pos, bool fresh, const TileArgs &a) {
    using C = TcBwd<D, DI>;
    constexpr int M = C::M, NQ = M / 8;
    const int lane = threadIdx.x & 31, warp = warp_idx_uniform(), wg = warp >> 2, gid = lane >> 2, tig = lane & 3;
    const int kw0 = warp * 16, kg0 = wg * 64;
    const float sl2 = a.scale * LOG2E;
    const uint32_t qs = smem_u32(sQt), os = smem_u32(sOt), ks = smem_u32(sK), vs = smem_u32(sV), dss = smem_u32(sdS);
    float kl = 0.0f;

    { /* warpgroup-uniform branches, as every wgmma below */
        {
            /* S^T = K Q^T and dP^T = V dO^T: the warpgroup's 64 keys x the M packed rows; warp w holds keys
             * kw0 + gid (+8), packed rows n*8 + 2 tig (+1) */
            float st[NQ][4], dpt[NQ][4];
            const uint64_t kd = gmma_desc(ks + kg0 * 128, 16, 1024), vd = gmma_desc(vs + kg0 * 128, 16, 1024),
                           qd = gmma_desc(qs, 16, 1024), od = gmma_desc(os, 16, 1024);
            /* groups in order: S^T, dP^T and with the KL the student's Z^T; P is computed from S^T while the tensor
             * cores still run dP^T (and Z^T), dS once dP^T is in */
            constexpr int KLG = DI > 0 ? 1 : 0; /* the Z^T group */
            float zt[1][4];
            wgmma_fence();
            wgmma_keys_rows<D, M>(st, kd, qd);
            wgmma_commit();
            wgmma_keys_rows<D, M>(dpt, vd, od);
            wgmma_commit();
            if constexpr (DI > 0) {
                wgmma_keys_queries<DI, C::QI_ROWS>(zt, gmma_desc(smem_u32(kls.ki) + kg0 * 128, 16, 1024),
                                                   gmma_desc(smem_u32(sQIt), 16, 1024));
                wgmma_commit();
            }
            /* while the products run: the tile's visibility bound and its KL batch entry */
            int tmin = INT_MAX; /* over the valid rows (t >= 0) */
            for (int p = lane; p < M; p += 32)
                if (const int t = meta[p].w; t >= 0) tmin = min(tmin, t);
            tmin = __reduce_min_sync(FULL, tmin);
            /* every valid row sees all of this warp's 16 keys (a selected block before the row's own: all but
             * the local block of a query's selection): no mask per element. Invalid rows then get P = 1 (their Q,
             * dO, lse and Dsum are zero), which adds nothing: dS = P (dP - Dsum) = 0, their dO rows are zero in
             * dV, no dQ row is stored for them, and their queries have no KL. */
            const bool all_visible = d.klo + kw0 + 15 <= tmin && d.klo + kw0 + 16 <= d.khi;
            if constexpr (DI > 0)
                if (a.accki || a.dqip) tc_kl_batch_add<D, DI>(kls, sQIt, meta, pos, a);
            wgmma_wait<1 + KLG>();
            wgmma_hold(st);
            /* P^T in place */
            if (all_visible) {
#pragma unroll
                for (int n = 0; n < NQ; n++) {
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const float l2 = sL[n * 8 + tig * 2 + c] * LOG2E;
#pragma unroll
                        for (int e = c; e < 4; e += 2) st[n][e] = exp2_ftz(st[n][e] * sl2 - l2);
                    }
                }
            } else {
#pragma unroll
                for (int n = 0; n < NQ; n++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int qr = n * 8 + tig * 2 + (e & 1), key = d.klo + kw0 + gid + (e >> 1) * 8;
                        const int t = meta[qr].w;
                        const bool vis = t >= 0 && key <= t && key < d.khi;
                        st[n][e] = vis ? exp2_ftz(st[n][e] * sl2 - sL[qr] * LOG2E) : 0.0f;
                    }
                }
            }
            wgmma_wait<KLG>();
            wgmma_hold(dpt);
            /* dS^T in place (P = 0 where masked) */
#pragma unroll
            for (int n = 0; n < NQ; n++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float ds = sDs[n * 8 + tig * 2 + c];
#pragma unroll
                    for (int e = c; e < 4; e += 2) dpt[n][e] = st[n][e] * (dpt[n][e] - ds);
                }
            }
            /* dV += P^T dO, dK += dS^T Q (k = packed rows; dO and Q read transposed: MN-major), waited for after the
             * dS store and the KL's part, which run while the tensor cores do it */
            const bool kv_products = a.acck || a.accv;
            uint32_t pa[M / 16][4], da[M / 16][4];
            if (kv_products) {
#pragma unroll
                for (int kq = 0; kq < M / 16; kq++) {
                    acc_to_a_frag(pa[kq], st[2 * kq], st[2 * kq + 1]);
                    acc_to_a_frag(da[kq], dpt[2 * kq], dpt[2 * kq + 1]);
                }
                const uint64_t dod = gmma_desc(os, M * 128, 1024), qtd = gmma_desc(qs, M * 128, 1024);
                wgmma_fence();
#pragma unroll
                for (int kq = 0; kq < M / 16; kq++) {
                    const uint64_t dob = gmma_desc_add(dod, kq * 16 * 128), qb = gmma_desc_add(qtd, kq * 16 * 128);
                    const bool first = fresh && kq == 0; /* the segment's first product: D = A B, no zeroing */
                    if constexpr (D == 128) {
                        wgmma_rs_n128<1>(acc.v, pa[kq], dob, first);
                        wgmma_rs_n128<1>(acc.k, da[kq], qb, first);
                    } else {
                        wgmma_rs_n64<1>(acc.v, pa[kq], dob, first);
                        wgmma_rs_n64<1>(acc.k, da[kq], qb, first);
                    }
                }
            }
            wgmma_commit(); /* empty without the products: the group count the waits below rely on stays fixed */
            /* dS for dQ as dS [packed row][key], K-major like the Q tile, read by dQ^T = K^T dS^T below: written with
             * stmatrix .trans, 8x8 matrices of n-tile n (packed rows 8n ..) and key half h (keys kw0 + 8h ..), a
             * thread's pair (key gid, rows 2 tig, 2 tig + 1) of each (the same bf16 pairs as its A fragments); lane
             * 8i + r gives the address of row r of matrix i. Four instructions a thread for two n-tiles, where 2-byte
             * stores took one per element */
            if (a.dqp) {
                const int mi = lane >> 3, r = lane & 7;
#pragma unroll
                for (int n0 = 0; n0 < NQ; n0 += 2) {
                    const int n = n0 + (mi >> 1);
                    stsm_x4_t(dss + gmma_off(n * 8 + r, (kw0 >> 3) + (mi & 1), M), pack_bf16(dpt[n0][0], dpt[n0][1]),
                              pack_bf16(dpt[n0][2], dpt[n0][3]), pack_bf16(dpt[n0 + 1][0], dpt[n0 + 1][1]),
                              pack_bf16(dpt[n0 + 1][2], dpt[n0 + 1][3]));
                }
            }
            if constexpr (DI > 0) {
                wgmma_wait<1>(); /* Z^T in, dV/dK still running */
                wgmma_hold(zt);
                kl = tc_kl_keys<D, DI>(st, zt[0], kls, sLIt, d, meta, pos, all_visible, a);
            }
            if (kv_products) {
                wgmma_wait<0>();
                wgmma_hold(acc.k);
                wgmma_hold(acc.v);
            }
        }
    }
    if (!a.dqp) return kl; /* uniform over the CTA */
    fence_async_smem();
    group_sync<TC_BAR_CONSUMERS, TC_THREADS>();
    {
        /* dQ_partial^T = K^T dS^T, m64n32 per warpgroup: m64 = 64 head dims, n32 = 32 packed rows. D = 128 (M = 32):
         * warpgroup wg takes dims [64 wg, 64 wg + 64) of all 32 rows; D = 64 (M = 64): all 64 dims of rows
         * [32 wg, 32 wg + 32), so that both warpgroups share the product (as dQ = dS K it was one m64n64 on
         * warpgroup 0 while warpgroup 1 waited at the next barrier). K read transposed from [key][d] (MN-major
         * A), dS from [row][key] (K-major B, as Q in S^T = K Q^T) */
        static_assert((D == 128 && M == 32) || (D == 64 && M == 64), "32 packed rows a warpgroup");
        constexpr int ROWS = 32;
        const int dim0 = D == 128 ? wg * 64 : 0, row0 = D == 128 ? 0 : wg * ROWS;
        float dqt[ROWS / 8][4];
        const uint64_t kad = gmma_desc(ks + (dim0 / 64) * TC_KB * 128, TC_KB * 128, 1024),
                       dsd = gmma_desc(dss + row0 * 128, 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TC_KB / 16; kk++) { /* keys past the segment: dS = 0 and K = 0 */
            wgmma_ss_n32<1, 0>(dqt, gmma_desc_add(kad, kk * 16 * 128), gmma_desc_add(dsd, (kk >> 2) * M * 128 + (kk & 3) * 32), kk == 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(dqt);
        /* staged as fp32 [row][the warpgroup's 64 dims] in a tile buffer dead by now (Q: warpgroup 0, dO:
         * warpgroup 1; Q_BYTES = M * 2D >= 32 * 64 * 4 for both tiles; every product that read them was waited
         * for before the barrier above, and the next gather into them follows the loop's barrier), so that a
         * thread writes one row: held as they are, each thread's eight rows cost ptxas registers it did not have
         * (spills) */
        float *stage = (float *)(wg == 0 ? sQt : sOt);
        const int dl = (warp & 3) * 16 + gid; /* this thread's dims dl, dl + 8 */
#pragma unroll
        for (int j = 0; j < ROWS / 8; j++) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int row = j * 8 + tig * 2 + c;
                stage[row * 64 + stage_col(row, dl)] = dqt[j][c];
                stage[row * 64 + stage_col(row, dl + 8)] = dqt[j][2 + c];
            }
        }
        warpgroup_sync(wg); /* the rows go out in tc_bwd_store_dq */
    }
    return kl;
}

/* The tile's dQ partial rows, staged by tc_bwd_tile (fp32 [row][64 dims] per warpgroup, synchronised), to their
 * slots in bf16, a thread a row's quarter. Called after the loop's proxy fence rather than from the tile: the
 * fence's MEMBAR waits for the thread's outstanding stores, and these would be the youngest. bf16 because
 * the partials are the backward's largest traffic (Hq x D values per query and slot: 4.3 GB written and read
 * back at 32K, 32/4/64, top-16, 17 GB at 64/4/128); each is a finished fp32 sum over the tile's keys,
 * rounded once, and the combine adds them in fp32, as the forward's O partials. */
template <int D>
__device__ __forceinline__ void tc_bwd_store_dq(const unsigned char *sQt, const unsigned char *sOt, const int4 *meta,
                                                const TileArgs &a) {
    constexpr int ROWS = 32;
    const int wg = warp_idx_uniform() >> 2;
    const int dim0 = D == 128 ? wg * 64 : 0, row0 = D == 128 ? 0 : wg * ROWS;
    const float *stage = (const float *)(wg == 0 ? sQt : sOt);
    const int row = (threadIdx.x & 127) >> 2, q = threadIdx.x & 3; /* dims 16 v + 4 q, v < 4 */
    const int4 m = meta[row0 + row];
    if (m.x >= 0) {
        bf16 *dst = (bf16 *)a.dqp + (((int64_t)(m.x - a.c0) * a.Hq + m.y) * a.NS + m.z) * D + dim0;
#pragma unroll
        for (int v = 0; v < 4; v++) {
            const float4 x = *(const float4 *)(stage + row * 64 + stage_col(row, v * 16 + q * 4));
            *(uint2 *)(dst + v * 16 + q * 4) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
        }
    }
}

/* the rows of the tile (meta): q and dout rows, lse and Dsum; with the KL also the tile's queries' qi rows
 * (query q = packed rows q*G .., rows past the tile's queries zero) and idx_lse */
template <int D, int DI>
__device__ __forceinline__ void tc_bwd_gather(unsigned char *sQ, unsigned char *sO, float *sL, float *sDs, unsigned char *sQI,
                                              float *sLI, const int4 *meta, const TileArgs &a, int t) {
    using C = TcBwd<D, DI>;
    constexpr int M = C::M, NT = TC_PRODUCER_THREADS;
    tc_gather_rows<D, M, NT>(sQ, (const bf16 *)a.q, meta, a.Hq, t);
    tc_gather_rows<D, M, NT>(sO, (const bf16 *)a.dout, meta, a.Hq, t);
    static_assert(M <= NT, "one pass");
    if (t < M) {
        const int4 mt = meta[t];
        if (mt.x >= 0) {
            const int64_t o = (int64_t)mt.y * a.Nq + mt.x;
            cp_async4(smem_u32(sL + t), a.lse + o);
            cp_async4(smem_u32(sDs + t), a.dsum + o);
        } else {
            sL[t] = 0.0f;
            sDs[t] = 0.0f;
        }
    }
    if constexpr (DI > 0) {
        constexpr int CPRI = DI / 8;
        const int nqt = M >> a.lgG;
        static_assert(C::QI_ROWS * CPRI <= NT, "one pass");
        if (t < C::QI_ROWS * CPRI) {
            const int r = t / CPRI, ch = t % CPRI;
            const int4 mt = r < nqt ? meta[r << a.lgG] : make_int4(-1, 0, 0, 0);
            const bool ok = mt.x >= 0;
            const bf16 *src = (const bf16 *)a.qi + (ok ? ((int64_t)mt.x * a.Hkv + (mt.y >> a.lgG)) * DI + ch * 8 : 0);
            cp_async16(smem_u32(sQI) + gmma_off(r, ch, C::QI_ROWS), src, ok);
        }
        if (t < C::QI_ROWS) {
            const int4 mt = t < nqt ? meta[t << a.lgG] : make_int4(-1, 0, 0, 0);
            if (mt.x >= 0) cp_async4(smem_u32(sLI + t), a.idx_lse + (int64_t)(mt.y >> a.lgG) * a.Nq + mt.x);
            else sLI[t] = 0.0f;
        }
    }
}

/* the segment's keys of K, V (and ki with the KL), by the producer */
template <int D, int DI>
__device__ __forceinline__ void tc_bwd_load_keys(unsigned char *sK, unsigned char *sV, unsigned char *sKI, const TileArgs &a,
                                                 const TileDesc &d, int t) {
    tc_load_kv<D, TC_PRODUCER_THREADS>(sK, sV, a, d, t);
    if constexpr (DI > 0) {
        constexpr int CPRI = DI / 8;
        const bf16 *ki = (const bf16 *)a.ki;
        for (int idx = t; idx < TC_KB * CPRI; idx += TC_PRODUCER_THREADS) {
            const int row = idx / CPRI, ch = idx - row * CPRI, key = d.klo + row;
            const bool ok = key < d.khi;
            cp_async16(smem_u32(sKI) + gmma_off(row, ch, TC_KB), ki + (ok ? (int64_t)key * DI + ch * 8 : 0), ok);
        }
    }
}

/* The backward CTA's shared memory (TcBwd's layout) */
template <int D, int DI> struct TcBwdSmem {
    unsigned char *q, *o, *k, *v, *ds; /* q, o: two tile buffers each */
    float *l, *dsum;                   /* two tiles' rows each */
    TcKlSmem kls;
    TcRing<TcBwd<D, DI>::M> *ring;
    __device__ TcBwdSmem(unsigned char *raw) {
        using C = TcBwd<D, DI>;
        q = smem_1024(raw);
        o = q + 2 * C::Q_BYTES;
        k = o + 2 * C::Q_BYTES;
        v = k + C::KV_BYTES;
        ds = v + C::KV_BYTES;
        kls.ki = ds + C::DS_BYTES;
        kls.qi = kls.ki + C::KI_BYTES;
        kls.dzb = (bf16 *)(kls.qi + 2 * C::QI_BYTES);
        kls.qib = (unsigned char *)kls.dzb + 2 * C::DZB_BYTES;
        kls.bmeta = (int4 *)(kls.qib + C::QIB_BYTES);
        kls.kacc = (float *)((unsigned char *)kls.bmeta + C::BMETA_BYTES);
        kls.li = (float *)((unsigned char *)kls.kacc + C::KACC_BYTES);
        l = (float *)((unsigned char *)kls.li + C::LI_BYTES);
        dsum = l + 2 * C::M;
        ring = (TcRing<C::M> *)(dsum + 2 * C::M);
    }
};

/* The producer warpgroup: the rings, tile i+1's rows while tile i is computed, each segment's keys. Its
 * barriers pair with the computing warpgroups' (tc_bwd_compute) one for one. */
template <int D, int DI> __device__ __forceinline__ void tc_bwd_produce(TcBwdSmem<D, DI> &sm, const TileArgs &a, int tb, int te) {
    using C = TcBwd<D, DI>;
    constexpr int M = C::M;
    TcRing<M> &ring = *sm.ring;
    const int t = threadIdx.x - TC_THREADS;
    tc_ring_prologue<M, TC_PRODUCER_THREADS, TC_BAR_PRODUCER>(ring, a, tb, te, t, t);
    tc_bwd_gather<D, DI>(sm.q + (tb & 1) * C::Q_BYTES, sm.o + (tb & 1) * C::Q_BYTES, sm.l + (tb & 1) * M, sm.dsum + (tb & 1) * M,
                         sm.kls.qi + (tb & 1) * C::QI_BYTES, sm.kls.li + (tb & 1) * C::QI_ROWS, ring.meta(tb), a, t);
    tc_bwd_load_keys<D, DI>(sm.k, sm.v, sm.kls.ki, a, ring.dsc(tb), t);
    cp_async_commit();
    cp_async_wait_committed();
    fence_async_smem();
    __syncthreads();
    for (int i = tb; i < te; i++) {
        const int b1 = (i + 1) & 1;
        tc_ring_advance<M, TC_PRODUCER_THREADS>(ring, a, i, te, t, t);
        if (i + 1 < te)
            tc_bwd_gather<D, DI>(sm.q + b1 * C::Q_BYTES, sm.o + b1 * C::Q_BYTES, sm.l + b1 * M, sm.dsum + b1 * M,
                                 sm.kls.qi + b1 * C::QI_BYTES, sm.kls.li + b1 * C::QI_ROWS, ring.meta(i + 1), a, t);
        cp_async_commit();
        cp_async_wait_committed();
        fence_async_smem();
        __syncthreads(); /* tile i done, tile i+1's rows in place */
        if (i + 1 < te && tc_seg_end(ring, i, te)) {
            if constexpr (DI > 0) __syncthreads(); /* the segment's last KL flush has read its ki */
            tc_bwd_load_keys<D, DI>(sm.k, sm.v, sm.kls.ki, a, ring.dsc(i + 1), t);
            cp_async_commit();
            cp_async_wait_committed();
            fence_async_smem();
            __syncthreads();
        }
    }
}

/* The computing warpgroups: the tiles, the KL's batches, each segment's dK/dV (and dki) flush; returns this
 * thread's KL share */
template <int D, int DI>
__device__ __forceinline__ double tc_bwd_compute(TcBwdSmem<D, DI> &sm, const TileArgs &a, int tb, int te) {
    using C = TcBwd<D, DI>;
    constexpr int M = C::M;
    TcRing<M> &ring = *sm.ring;
    TcKlSmem &kls = sm.kls;
    if constexpr (DI > 0) {
        for (int i = threadIdx.x; i < TC_KB * DI; i += TC_THREADS) kls.kacc[i] = 0.0f;
        /* dz starts zero; qi rows of unused slots meet zero dz, so they must be finite: zero too */
        for (int i = threadIdx.x; i < (int)((2 * C::DZB_BYTES + C::QIB_BYTES) / 16); i += TC_THREADS)
            ((uint4 *)kls.dzb)[i] = make_uint4(0, 0, 0, 0);
    }
    __syncthreads(); /* the producer's prologue: tile tb's rows and keys in place */
    [[maybe_unused]] bf16 *const dzb0 = kls.dzb, *const dzb1 = (bf16 *)((unsigned char *)kls.dzb + C::DZB_BYTES);
    const bool want_kv = a.acck || a.accv || (DI > 0 && a.accki);
    const int kl_tiles = DI > 0 ? C::BATCH / (M >> a.lgG) : 0; /* tiles per KL batch */
    int pos = 0;                                                /* this tile's place in the batch */
    TcDkv<D> acc;
#pragma unroll
    for (int j = 0; j < D / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc.k[j][e] = acc.v[j][e] = 0.0f;
    bool started = (ring.dsc(tb).rows & TILE_FIRST) != 0;
    bool fresh = true; /* acc holds no tile yet: the next tile's first dV/dK product overwrites it */
    double kl = 0.0;
    for (int i = tb; i < te; i++) {
        const int b0 = i & 1;
        kl += (double)tc_bwd_tile<D, DI>(acc, kls, sm.q + b0 * C::Q_BYTES, sm.o + b0 * C::Q_BYTES, sm.l + b0 * M,
                                         sm.dsum + b0 * M, kls.qi + b0 * C::QI_BYTES, kls.li + b0 * C::QI_ROWS, sm.ds, sm.k,
                                         sm.v, ring.dsc(i), ring.meta(i), pos, fresh, a);
        fresh = false;
        if (a.dqp) tc_bwd_store_dq<D>(sm.q + b0 * C::Q_BYTES, sm.o + b0 * C::Q_BYTES, ring.meta(i), a);
        __syncthreads(); /* tile i done, tile i+1's rows in place */
        const TileDesc &dc = ring.dsc(i);
        const bool seg_end = tc_seg_end(ring, i, te);
        if constexpr (DI > 0) {
            if (++pos == kl_tiles || seg_end) {
                if (a.accki || a.dqip) {
                    tc_kl_flush<D, DI>(kls, pos * (M >> a.lgG), dc.khi - dc.klo, a);
                    kls.dzb = kls.dzb == dzb0 ? dzb1 : dzb0;
                }
                pos = 0;
            }
        }
        if (seg_end) {
            if (want_kv) tc_flush<D, DI>(acc, kls, dc, started, (dc.rows & TILE_LAST) != 0, a);
            if (i + 1 < te) {
                started = (ring.dsc(i + 1).rows & TILE_FIRST) != 0;
                fresh = true;
                if constexpr (DI > 0) __syncthreads(); /* the KL flush above has read ki */
                __syncthreads();                       /* the next segment's keys in place */
            }
        }
    }
    return kl;
}

/* Warpgroups 0-1 compute the tiles, warpgroup 2 produces their inputs (tc_bwd_produce); they meet once per tile,
 * at the barrier that ends it, and twice more where a segment ends. Each role runs its own loop, so that the
 * producer's few registers can go to the computing warps (setmaxnreg needs the roles' live ranges apart). */
template <int D, int DI> __global__ void __launch_bounds__(TC_WS_THREADS, 1) msa_bwd_tc_kernel(TileArgs a) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    TcBwdSmem<D, DI> sm(smem_raw);
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    if (tb >= te) return;
    double kl = 0.0;
    if (warp_idx_uniform() >= TC_WARPS) { /* warpgroup-uniform */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(TC_PRODUCER_REGS));
        tc_bwd_produce<D, DI>(sm, a, tb, te);
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(TC_CONSUMER_REGS));
        kl = tc_bwd_compute<D, DI>(sm, a, tb, te);
    }
    if constexpr (DI > 0) {
        if (a.klpart) { /* this CTA's share, added to its slot launch after launch (one chunk each) */
            __shared__ double red[TC_WS_WARPS];
            kl = block_sum(kl, red); /* the producer's share is 0 */
            if (threadIdx.x == 0) a.klpart[blockIdx.x] += kl;
        }
    }
}

}  // namespace

namespace msacuda {

bool msa_tc_handles(DType dt, int D) { return dt == DT_BF16 && (D == 64 || D == 128); }

bool msa_tc_kl_handles(DType dt, int D, int G, int Di) {
    if (!msa_tc_handles(dt, D) || (Di != 64 && Di != 128) || G < 1 || (G & (G - 1))) return false;
    const int M = D == 128 ? TcBwd<128, 0>::M : TcBwd<64, 0>::M;
    return M % G == 0 && M / G <= 8;
}

Geo msa_tc_forward_geo(int D) {
    Geo g;
    g.M = TcFwd<128>::M;
    g.KB = TC_KB;
    g.threads = TC_WS_THREADS;
    if (D == 128) {
        g.smem = TcFwd<128>::SMEM;
        g.grid = persistent_grid<msa_fwd_tc_kernel<128>>("msa_attention_forward", TC_WS_THREADS, g.smem);
    } else {
        g.smem = TcFwd<64>::SMEM;
        g.grid = persistent_grid<msa_fwd_tc_kernel<64>>("msa_attention_forward", TC_WS_THREADS, g.smem);
    }
    return g;
}

void msa_tc_forward_tiles(const Geo &g, const TileArgs &a, int D) {
    if (D == 128) msa_fwd_tc_kernel<128><<<g.grid, g.threads, g.smem, stream()>>>(a);
    else msa_fwd_tc_kernel<64><<<g.grid, g.threads, g.smem, stream()>>>(a);
    LAUNCH_CHECK("msa_attention_forward tiles (tensor cores)");
}

template <int D, int DI> Geo tc_backward_geo() {
    Geo g;
    g.KB = TC_KB;
    g.threads = TC_WS_THREADS;
    g.M = TcBwd<D, DI>::M;
    g.smem = TcBwd<D, DI>::SMEM;
    g.grid = persistent_grid<msa_bwd_tc_kernel<D, DI>>(DI ? "msa_attention_kl_backward" : "msa_attention_backward",
                                                        TC_WS_THREADS, g.smem);
    return g;
}

Geo msa_tc_backward_geo(int D, int Di) {
    if (D == 128) return Di == 128 ? tc_backward_geo<128, 128>() : Di == 64 ? tc_backward_geo<128, 64>() : tc_backward_geo<128, 0>();
    return Di == 128 ? tc_backward_geo<64, 128>() : Di == 64 ? tc_backward_geo<64, 64>() : tc_backward_geo<64, 0>();
}

void msa_tc_backward_tiles(const Geo &g, const TileArgs &a, int D, int Di) {
    if (D == 128) {
        if (Di == 128) msa_bwd_tc_kernel<128, 128><<<g.grid, g.threads, g.smem, stream()>>>(a);
        else if (Di == 64) msa_bwd_tc_kernel<128, 64><<<g.grid, g.threads, g.smem, stream()>>>(a);
        else msa_bwd_tc_kernel<128, 0><<<g.grid, g.threads, g.smem, stream()>>>(a);
    } else {
        if (Di == 128) msa_bwd_tc_kernel<64, 128><<<g.grid, g.threads, g.smem, stream()>>>(a);
        else if (Di == 64) msa_bwd_tc_kernel<64, 64><<<g.grid, g.threads, g.smem, stream()>>>(a);
        else msa_bwd_tc_kernel<64, 0><<<g.grid, g.threads, g.smem, stream()>>>(a);
    }
    LAUNCH_CHECK(Di ? "msa_attention_kl_backward tiles (tensor cores)" : "msa_attention_backward tiles (tensor cores)");
}

}  // namespace msacuda
