/* The tensor-core tile kernels of the CUDA MSA attention (BF16, D = 64 or 128; the schedule, the
 * reductions and the entry points are in msa_attention.cu, which describes the design): 8 warps,
 * mma.sync m16n8k16 bf16 with fp32 accumulation, ldmatrix from XOR-swizzled shared memory, a 3-stage
 * cp.async pipeline (descriptor, entries, gathered Q / dO rows one tile ahead) so the gathers overlap
 * the previous tile's math. Forward tile 128 packed rows x 128 keys (16 rows per warp, 64-key
 * sub-tiles); backward tile 32 (D = 128) or 64 (D = 64) packed rows x 128 keys. */
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
 * Iteration i of a CTA computes tile i while cp.async brings the descriptor of tile i+3, the entries
 * of tile i+2 (their address comes from that descriptor) and the gathered rows of tile i+1 (their
 * addresses come from those entries): no thread ever waits on a dependent global load, only on the
 * group issued one tile earlier. Rings: descriptors 4, entries 4, row meta / row buffers 2.
 * ---------------------------------------------------------------------------------------------- */

constexpr int TC_THREADS = 256, TC_WARPS = 8, TC_KB = 128;

/* The pipeline's rings in shared memory: tile descriptors, the tiles' entries (token, slot), and per
 * packed row its meta {token t (-1: invalid row), head h, partial slot s, 0}. */
template <int M> struct TcRing {
    TileDesc desc[4];
    int2 ent[4][M];
    int4 meta[2][M];
};

template <int M>
__device__ __forceinline__ void tc_issue_desc(TcRing<M> &ring, const TileArgs &a, int j) {
    if (threadIdx.x == 0) {
        const uint32_t dst = smem_u32(&ring.desc[j & 3]);
        cp_async16(dst, a.desc + j, true);
        cp_async16(dst + 16, (const char *)(a.desc + j) + 16, true);
    }
}
template <int M>
__device__ __forceinline__ void tc_issue_ent(TcRing<M> &ring, const TileArgs &a, int j) {
    const TileDesc &d = ring.desc[j & 3];
    const int rows = d.rows & TILE_ROWS;
    const int nq = rows > 0 ? (d.off0 + rows - 1) / a.G + 1 : 0;
    for (int p = threadIdx.x; p < nq; p += TC_THREADS) cp_async8(smem_u32(&ring.ent[j & 3][p]), a.ent + d.ebase + p);
}
template <int M>
__device__ __forceinline__ void tc_build_meta(TcRing<M> &ring, const TileArgs &a, int j) {
    const TileDesc &d = ring.desc[j & 3];
    for (int p = threadIdx.x; p < M; p += TC_THREADS) {
        int4 mt = make_int4(-1, 0, 0, 0);
        if (p < (d.rows & TILE_ROWS)) {
            const int pi = d.off0 + p, lq = pi / a.G, hh = pi - lq * a.G;
            const int2 e = ring.ent[j & 3][lq];
            if (e.y >= 0) mt = make_int4(e.x, (d.gr / a.Rb) * a.G + hh, e.y * a.nks + d.ks, 0);
        }
        ring.meta[j & 1][p] = mt;
    }
}
/* gather rows (q or dout) [t, h, :] of the tile's packed rows into a swizzled buffer */
template <int D, int M>
__device__ __forceinline__ void tc_gather_rows(unsigned char *dst, const bf16 *src, const int4 *meta, int Hq) {
    constexpr int CPR = D / 8;
    for (int idx = threadIdx.x; idx < M * CPR; idx += TC_THREADS) {
        const int row = idx / CPR, ch = idx - row * CPR;
        const int4 mt = meta[row];
        const bool ok = mt.x >= 0;
        const bf16 *s = ok ? src + ((int64_t)mt.x * Hq + mt.y) * D + ch * 8 : src;
        cp_async16(smem_u32(dst) + swz<CPR>(row, ch), s, ok);
    }
}
/* the segment's keys [klo, khi) of K and V (KB rows, zero past khi) */
template <int D>
__device__ __forceinline__ void tc_load_kv(unsigned char *sK, unsigned char *sV, const TileArgs &a, const TileDesc &d) {
    constexpr int CPR = D / 8;
    const int g = d.gr / a.Rb;
    const bf16 *k = (const bf16 *)a.k, *v = (const bf16 *)a.v;
    for (int idx = threadIdx.x; idx < TC_KB * CPR; idx += TC_THREADS) {
        const int row = idx / CPR, ch = idx - row * CPR, key = d.klo + row;
        const bool ok = key < d.khi;
        const int64_t off = ok ? ((int64_t)key * a.Hkv + g) * D + ch * 8 : 0;
        cp_async16(smem_u32(sK) + swz<CPR>(row, ch), k + off, ok);
        cp_async16(smem_u32(sV) + swz<CPR>(row, ch), v + off, ok);
    }
}
/* The ring's prologue, before a CTA's first tile tb: the descriptors of tb .. tb+2, then the entries of
 * tb and tb+1 (addressed by those descriptors), then tb's row meta (built from those entries), each
 * stage waited for before the next. The kernel then gathers tb's rows and loads its K/V. */
template <int M>
__device__ __forceinline__ void tc_ring_prologue(TcRing<M> &ring, const TileArgs &a, int tb, int te) {
    for (int j = tb; j < te && j < tb + 3; j++) tc_issue_desc(ring, a, j);
    cp_async_commit();
    cp_async_wait_committed();
    __syncthreads();
    for (int j = tb; j < te && j < tb + 2; j++) tc_issue_ent(ring, a, j);
    cp_async_commit();
    cp_async_wait_committed();
    __syncthreads();
    tc_build_meta(ring, a, tb);
    __syncthreads();
}
/* The ring's steps that open iteration i of the tile loop: tile i+1's row meta from its entries, then
 * the descriptor of i+3 and the entries of i+2 issued (committed by the kernel with i+1's rows), and
 * the barrier after which i+1's meta may be read for its gather. */
template <int M>
__device__ __forceinline__ void tc_ring_advance(TcRing<M> &ring, const TileArgs &a, int i, int te) {
    if (i + 1 < te) tc_build_meta(ring, a, i + 1);
    if (i + 3 < te) tc_issue_desc(ring, a, i + 3);
    if (i + 2 < te) tc_issue_ent(ring, a, i + 2);
    __syncthreads();
}

/* ------------------------------------------------------------------------------------------------
 * Tensor-core forward
 * ---------------------------------------------------------------------------------------------- */

template <int D> struct TcFwd {
    static constexpr int M = 128, CPR = D / 8, RB = D * 2;
    static constexpr size_t Q_BYTES = (size_t)M * RB, KV_BYTES = (size_t)TC_KB * RB;
    static constexpr size_t SMEM = 2 * Q_BYTES + 2 * KV_BYTES + sizeof(TcRing<M>);
};

/* One tile: warp w owns packed rows 16w .. 16w+15 (thread rows gid and gid+8 of them). */
template <int D>
__device__ __forceinline__ void tc_fwd_tile(unsigned char *sQt, const unsigned char *sK, const unsigned char *sV,
                                            const TileDesc &d, const int4 *meta, const TileArgs &a) {
    using C = TcFwd<D>;
    constexpr int CPR = C::CPR, NT = D / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int r0 = warp * 16;
    const int4 ma = meta[r0 + gid], mb = meta[r0 + gid + 8];
    const int tmax = __reduce_max_sync(FULL, max(ma.x, mb.x));
    if (tmax < 0) return; /* no valid row in this warp (warp-uniform) */
    const float sl2 = a.scale * LOG2E;
    const uint32_t qs = smem_u32(sQt), ks = smem_u32(sK), vs = smem_u32(sV);

    float o[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const int kend = min(d.khi, tmax + 1); /* keys past it are masked for every row of the warp */

    for (int kt = 0; d.klo + kt * 64 < kend; kt++) {
        const int kbase = d.klo + kt * 64;
        const int steps = min(4, (kend - kbase + 15) >> 4); /* 16-key steps with a possibly visible key */
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t qa[4];
            ldsm_x4(qa, qs + swz<CPR>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
#pragma unroll
            for (int np = 0; np < 4; np++) {
                if (np < steps) {
                    uint32_t b[4];
                    ldsm_x4(b, ks + swz<CPR>(kt * 64 + np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
                    mma_bf16_16816(s[2 * np], qa, b[0], b[1]);
                    mma_bf16_16816(s[2 * np + 1], qa, b[2], b[3]);
                }
            }
        }
        /* mask, scale to log2 units, row max */
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = kbase + j * 8 + tig * 2 + (e & 1), t = e < 2 ? ma.x : mb.x;
                const float x = (key < d.khi && key <= t) ? s[j][e] * sl2 : -INFINITY;
                s[j][e] = x;
                if (e < 2) mx_a = fmaxf(mx_a, x);
                else mx_b = fmaxf(mx_b, x);
            }
        }
        mx_a = quad_max(mx_a);
        mx_b = quad_max(mx_b);
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        /* a row with nothing visible yet keeps max -inf: use 0 as the reference so no inf - inf */
        const float mu_a = mn_a == -INFINITY ? 0.0f : mn_a, mu_b = mn_b == -INFINITY ? 0.0f : mn_b;
        const float al_a = exp2f(m_a - mu_a), al_b = exp2f(m_b - mu_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            s[j][0] = exp2f(s[j][0] - mu_a);
            s[j][1] = exp2f(s[j][1] - mu_a);
            s[j][2] = exp2f(s[j][2] - mu_b);
            s[j][3] = exp2f(s[j][3] - mu_b);
            sum_a += s[j][0] + s[j][1];
            sum_b += s[j][2] + s[j][3];
        }
        l_a = l_a * al_a + sum_a;
        l_b = l_b * al_b + sum_b;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            o[j][0] *= al_a;
            o[j][1] *= al_a;
            o[j][2] *= al_b;
            o[j][3] *= al_b;
        }
        /* O += P V: the accumulator layout of two adjacent key n-tiles is the A fragment of a k16 step */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            if (kk < steps) {
                uint32_t pa[4];
                acc_to_a_frag(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t b[4];
                    ldsm_x4_t(b, vs + swz<CPR>(kt * 64 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
                    mma_bf16_16816(o[2 * dp], pa, b[0], b[1]);
                    mma_bf16_16816(o[2 * dp + 1], pa, b[2], b[3]);
                }
            }
        }
    }
    l_a = quad_sum(l_a);
    l_b = quad_sum(l_b);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;

    /* stage the normalised rows (bf16) in this warp's own rows of the Q buffer, then 16-byte stores */
    __syncwarp();
#pragma unroll
    for (int j = 0; j < NT; j++) {
        *(uint32_t *)(sQt + swz<CPR>(r0 + gid, j) + tig * 4) = pack_bf16(o[j][0] * inv_a, o[j][1] * inv_a);
        *(uint32_t *)(sQt + swz<CPR>(r0 + gid + 8, j) + tig * 4) = pack_bf16(o[j][2] * inv_b, o[j][3] * inv_b);
    }
    if (tig == 0) {
        if (ma.x >= 0)
            a.lpart[((int64_t)(ma.x - a.c0) * a.Hq + ma.y) * a.NS + ma.z] = l_a > 0.0f ? (m_a + log2f(l_a)) * LN2 : -INFINITY;
        if (mb.x >= 0)
            a.lpart[((int64_t)(mb.x - a.c0) * a.Hq + mb.y) * a.NS + mb.z] = l_b > 0.0f ? (m_b + log2f(l_b)) * LN2 : -INFINITY;
    }
    __syncwarp();
    bf16 *op = (bf16 *)a.opart;
#pragma unroll
    for (int it = 0; it < 16 * CPR / 32; it++) {
        const int c = lane + 32 * it, row = r0 + c / CPR, ch = c % CPR;
        const int4 mt = meta[row];
        if (mt.x < 0) continue;
        const uint4 val = *(const uint4 *)(sQt + swz<CPR>(row, ch));
        *(uint4 *)(op + (((int64_t)(mt.x - a.c0) * a.Hq + mt.y) * a.NS + mt.z) * D + ch * 8) = val;
    }
}

template <int D> __global__ void __launch_bounds__(TC_THREADS, 1) msa_fwd_tc_kernel(TileArgs a) {
    using C = TcFwd<D>;
    constexpr int M = C::M;
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char *sQ = smem, *sK = sQ + 2 * C::Q_BYTES, *sV = sK + C::KV_BYTES;
    TcRing<M> &ring = *(TcRing<M> *)(sV + C::KV_BYTES);
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    if (tb >= te) return;

    /* prologue: descriptors tb .. tb+2, entries tb, tb+1, rows of tb, K/V of tb's segment */
    tc_ring_prologue(ring, a, tb, te);
    tc_gather_rows<D, M>(sQ + (tb & 1) * C::Q_BYTES, (const bf16 *)a.q, ring.meta[tb & 1], a.Hq);
    tc_load_kv<D>(sK, sV, a, ring.desc[tb & 3]);
    cp_async_commit();
    cp_async_wait_committed();
    __syncthreads();

    for (int i = tb; i < te; i++) {
        tc_ring_advance(ring, a, i, te);
        if (i + 1 < te) tc_gather_rows<D, M>(sQ + ((i + 1) & 1) * C::Q_BYTES, (const bf16 *)a.q, ring.meta[(i + 1) & 1], a.Hq);
        cp_async_commit();
        tc_fwd_tile<D>(sQ + (i & 1) * C::Q_BYTES, sK, sV, ring.desc[i & 3], ring.meta[i & 1], a);
        cp_async_wait_committed();
        __syncthreads();
        if (i + 1 < te) {
            const TileDesc &dn = ring.desc[(i + 1) & 3], &dc = ring.desc[i & 3];
            if (dn.gr != dc.gr || dn.ks != dc.ks) {
                tc_load_kv<D>(sK, sV, a, dn);
                cp_async_commit();
                cp_async_wait_committed();
                __syncthreads();
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Tensor-core backward
 * ---------------------------------------------------------------------------------------------- */

template <int D> struct TcBwd {
    static constexpr int M = D == 128 ? 32 : 64; /* packed query rows per tile (registers: dK, dV live) */
    static constexpr int CPR = D / 8, RB = D * 2, CPRS = M / 8;
    static constexpr size_t Q_BYTES = (size_t)M * RB, KV_BYTES = (size_t)TC_KB * RB, DS_BYTES = (size_t)TC_KB * M * 2;
    static constexpr size_t SMEM = 4 * Q_BYTES + 2 * KV_BYTES + DS_BYTES + 4 * M * sizeof(float) + sizeof(TcRing<M>);
};

/* Accumulators of one segment: warp w owns keys 16w .. 16w+15 (thread rows gid, gid+8), all D. */
template <int D> struct TcDkv {
    float k[D / 8][4], v[D / 8][4];
};

/* Add a finished segment's dK/dV (unscaled) to the fp32 accumulators, or, when the segment is split
 * over CTAs, store it in this CTA's part (slot 1: the CTA where the segment starts; slot 0: the
 * others), summed in CTA order by msa_dkv_fixup_kernel. */
template <int D>
__device__ __forceinline__ void tc_flush(TcDkv<D> &acc, const TileDesc &d, bool started, bool ended, const TileArgs &a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int g = d.gr / a.Rb;
    const bool whole = started && ended;
    float *cutp = a.cut + (((int64_t)blockIdx.x * 2 + (started ? 1 : 0)) * 2) * TC_KB * D;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int kr = warp * 16 + gid + half * 8, key = d.klo + kr;
        if (key >= d.khi) continue;
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
#pragma unroll
    for (int j = 0; j < D / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc.k[j][e] = acc.v[j][e] = 0.0f;
}

template <int D>
__device__ __forceinline__ void tc_bwd_tile(TcDkv<D> &acc, const unsigned char *sQt, const unsigned char *sOt,
                                            const float *sL, const float *sDs, unsigned char *sdS, const unsigned char *sK,
                                            const unsigned char *sV, const TileDesc &d, const int4 *meta, const TileArgs &a) {
    using C = TcBwd<D>;
    constexpr int M = C::M, CPR = C::CPR, CPRS = C::CPRS, NQ = M / 8, ND = D / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int kw0 = warp * 16, nkeys = d.khi - d.klo;
    int tmax = -1;
    for (int p = lane; p < M; p += 32) tmax = max(tmax, meta[p].x);
    tmax = __reduce_max_sync(FULL, tmax);
    const bool want_kv = a.acck || a.accv;
    const float sl2 = a.scale * LOG2E;
    const uint32_t qs = smem_u32(sQt), os = smem_u32(sOt), ks = smem_u32(sK), vs = smem_u32(sV), dss = smem_u32(sdS);

    if (kw0 < nkeys) { /* warp-uniform */
        if (d.klo + kw0 > tmax) {
            /* every key of the warp is in the future of every query of the tile: dS = 0 */
            if (a.dqp)
                for (int idx = lane; idx < 16 * CPRS; idx += 32)
                    *(uint4 *)(sdS + swz<CPRS>(kw0 + idx / CPRS, idx % CPRS)) = make_uint4(0, 0, 0, 0);
        } else {
            float st[NQ][4], dpt[NQ][4];
#pragma unroll
            for (int n = 0; n < NQ; n++) st[n][0] = st[n][1] = st[n][2] = st[n][3] = dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
            /* S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x M packed rows */
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t ka[4], va[4];
                const uint32_t ao = swz<CPR>(kw0 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4));
                ldsm_x4(ka, ks + ao);
                ldsm_x4(va, vs + ao);
#pragma unroll
                for (int nq = 0; nq < M / 16; nq++) {
                    uint32_t b[4];
                    const uint32_t bo = swz<CPR>(nq * 16 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1));
                    ldsm_x4(b, qs + bo);
                    mma_bf16_16816(st[2 * nq], ka, b[0], b[1]);
                    mma_bf16_16816(st[2 * nq + 1], ka, b[2], b[3]);
                    ldsm_x4(b, os + bo);
                    mma_bf16_16816(dpt[2 * nq], va, b[0], b[1]);
                    mma_bf16_16816(dpt[2 * nq + 1], va, b[2], b[3]);
                }
            }
            /* P^T and dS^T in place (element: key kw0 + gid (+8), packed row n*8 + 2 tig (+1)) */
#pragma unroll
            for (int n = 0; n < NQ; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qr = n * 8 + tig * 2 + (e & 1), key = d.klo + kw0 + gid + (e >> 1) * 8;
                    const int t = meta[qr].x;
                    const bool vis = t >= 0 && key <= t && key < d.khi;
                    const float p = vis ? exp2f(st[n][e] * sl2 - sL[qr] * LOG2E) : 0.0f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - sDs[qr]);
                }
            }
            if (want_kv) {
                /* dV += P^T dO, dK += dS^T Q (rows = keys, k = packed rows) */
#pragma unroll
                for (int kq = 0; kq < M / 16; kq++) {
                    uint32_t pa[4], da[4];
                    acc_to_a_frag(pa, st[2 * kq], st[2 * kq + 1]);
                    acc_to_a_frag(da, dpt[2 * kq], dpt[2 * kq + 1]);
#pragma unroll
                    for (int dp = 0; dp < D / 16; dp++) {
                        uint32_t b[4];
                        const uint32_t bo = swz<CPR>(kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4));
                        if (a.accv) {
                            ldsm_x4_t(b, os + bo);
                            mma_bf16_16816(acc.v[2 * dp], pa, b[0], b[1]);
                            mma_bf16_16816(acc.v[2 * dp + 1], pa, b[2], b[3]);
                        }
                        if (a.acck) {
                            ldsm_x4_t(b, qs + bo);
                            mma_bf16_16816(acc.k[2 * dp], da, b[0], b[1]);
                            mma_bf16_16816(acc.k[2 * dp + 1], da, b[2], b[3]);
                        }
                    }
                }
            }
            if (a.dqp) {
#pragma unroll
                for (int n = 0; n < NQ; n++) {
                    *(uint32_t *)(sdS + swz<CPRS>(kw0 + gid, n) + tig * 4) = pack_bf16(dpt[n][0], dpt[n][1]);
                    *(uint32_t *)(sdS + swz<CPRS>(kw0 + gid + 8, n) + tig * 4) = pack_bf16(dpt[n][2], dpt[n][3]);
                }
            }
        }
    }
    if (!a.dqp) return; /* uniform over the CTA */
    __syncthreads();
    /* dQ_partial = dS K over the segment's keys: warp -> m-tile mt (16 packed rows), 4 d n-tiles */
    constexpr int MT = M / 16, NPW = 4;
    static_assert(MT * (ND / NPW) == TC_WARPS, "dQ work must cover the 8 warps");
    const int mt = warp % MT, n0 = (warp / MT) * NPW;
    float dq[NPW][4];
#pragma unroll
    for (int j = 0; j < NPW; j++) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.0f;
    const int nk16 = (nkeys + 15) >> 4;
#pragma unroll
    for (int kk = 0; kk < TC_KB / 16; kk++) {
        if (kk < nk16) {
            uint32_t af[4];
            ldsm_x4_t(af, dss + swz<CPRS>(kk * 16 + (lane & 7) + ((lane >> 4) & 1) * 8, mt * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int j2 = 0; j2 < NPW / 2; j2++) {
                uint32_t b[4];
                ldsm_x4_t(b, ks + swz<CPR>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + 2 * j2 + (lane >> 4)));
                mma_bf16_16816(dq[2 * j2], af, b[0], b[1]);
                mma_bf16_16816(dq[2 * j2 + 1], af, b[2], b[3]);
            }
        }
    }
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int4 m = meta[mt * 16 + gid + half * 8];
        if (m.x < 0) continue;
        float *dst = a.dqp + (((int64_t)(m.x - a.c0) * a.Hq + m.y) * a.NS + m.z) * D;
#pragma unroll
        for (int j = 0; j < NPW; j++)
            *(float2 *)(dst + (n0 + j) * 8 + tig * 2) = make_float2(dq[j][2 * half], dq[j][2 * half + 1]);
    }
}

template <int D>
__device__ __forceinline__ void tc_bwd_gather(unsigned char *sQ, unsigned char *sO, float *sL, float *sDs, const int4 *meta,
                                              const TileArgs &a) {
    constexpr int M = TcBwd<D>::M;
    tc_gather_rows<D, M>(sQ, (const bf16 *)a.q, meta, a.Hq);
    tc_gather_rows<D, M>(sO, (const bf16 *)a.dout, meta, a.Hq);
    for (int p = threadIdx.x; p < M; p += TC_THREADS) {
        const int4 mt = meta[p];
        if (mt.x >= 0) {
            const int64_t o = (int64_t)mt.y * a.N + mt.x;
            cp_async4(smem_u32(sL + p), a.lse + o);
            cp_async4(smem_u32(sDs + p), a.dsum + o);
        } else {
            sL[p] = 0.0f;
            sDs[p] = 0.0f;
        }
    }
}

template <int D> __global__ void __launch_bounds__(TC_THREADS, 1) msa_bwd_tc_kernel(TileArgs a) {
    using C = TcBwd<D>;
    constexpr int M = C::M;
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char *sQ = smem, *sO = sQ + 2 * C::Q_BYTES, *sK = sO + 2 * C::Q_BYTES, *sV = sK + C::KV_BYTES;
    unsigned char *sdS = sV + C::KV_BYTES;
    float *sL = (float *)(sdS + C::DS_BYTES), *sDs = sL + 2 * M;
    TcRing<M> &ring = *(TcRing<M> *)(sDs + 2 * M);
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    if (tb >= te) return;

    tc_ring_prologue(ring, a, tb, te);
    tc_bwd_gather<D>(sQ + (tb & 1) * C::Q_BYTES, sO + (tb & 1) * C::Q_BYTES, sL + (tb & 1) * M, sDs + (tb & 1) * M,
                     ring.meta[tb & 1], a);
    tc_load_kv<D>(sK, sV, a, ring.desc[tb & 3]);
    cp_async_commit();
    cp_async_wait_committed();
    __syncthreads();

    TcDkv<D> acc;
#pragma unroll
    for (int j = 0; j < D / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc.k[j][e] = acc.v[j][e] = 0.0f;
    bool started = (ring.desc[tb & 3].rows & TILE_FIRST) != 0;

    for (int i = tb; i < te; i++) {
        const int b1 = (i + 1) & 1;
        tc_ring_advance(ring, a, i, te);
        if (i + 1 < te) tc_bwd_gather<D>(sQ + b1 * C::Q_BYTES, sO + b1 * C::Q_BYTES, sL + b1 * M, sDs + b1 * M, ring.meta[b1], a);
        cp_async_commit();
        const int b0 = i & 1;
        tc_bwd_tile<D>(acc, sQ + b0 * C::Q_BYTES, sO + b0 * C::Q_BYTES, sL + b0 * M, sDs + b0 * M, sdS, sK, sV,
                       ring.desc[i & 3], ring.meta[b0], a);
        cp_async_wait_committed();
        __syncthreads();
        const TileDesc &dc = ring.desc[i & 3];
        if (i + 1 == te) {
            if (a.acck || a.accv) tc_flush<D>(acc, dc, started, (dc.rows & TILE_LAST) != 0, a);
        } else {
            const TileDesc &dn = ring.desc[(i + 1) & 3];
            if (dn.gr != dc.gr || dn.ks != dc.ks) {
                if (a.acck || a.accv) tc_flush<D>(acc, dc, started, (dc.rows & TILE_LAST) != 0, a);
                started = (dn.rows & TILE_FIRST) != 0;
                tc_load_kv<D>(sK, sV, a, dn);
                cp_async_commit();
                cp_async_wait_committed();
                __syncthreads();
            }
        }
    }
}

}  // namespace

namespace msacuda {

bool msa_tc_handles(DType dt, int D) { return dt == DT_BF16 && (D == 64 || D == 128); }

Geo msa_tc_forward_geo(int D) {
    Geo g;
    g.M = TcFwd<128>::M;
    g.KB = TC_KB;
    g.threads = TC_THREADS;
    if (D == 128) {
        g.smem = TcFwd<128>::SMEM;
        g.grid = persistent_grid<msa_fwd_tc_kernel<128>>("msa_attention_forward", TC_THREADS, g.smem);
    } else {
        g.smem = TcFwd<64>::SMEM;
        g.grid = persistent_grid<msa_fwd_tc_kernel<64>>("msa_attention_forward", TC_THREADS, g.smem);
    }
    return g;
}

void msa_tc_forward_tiles(const Geo &g, const TileArgs &a, int D) {
    if (D == 128) msa_fwd_tc_kernel<128><<<g.grid, g.threads, g.smem>>>(a);
    else msa_fwd_tc_kernel<64><<<g.grid, g.threads, g.smem>>>(a);
    LAUNCH_CHECK("msa_attention_forward tiles (tensor cores)");
}

Geo msa_tc_backward_geo(int D) {
    Geo g;
    g.KB = TC_KB;
    g.threads = TC_THREADS;
    if (D == 128) {
        g.M = TcBwd<128>::M;
        g.smem = TcBwd<128>::SMEM;
        g.grid = persistent_grid<msa_bwd_tc_kernel<128>>("msa_attention_backward", TC_THREADS, g.smem);
    } else {
        g.M = TcBwd<64>::M;
        g.smem = TcBwd<64>::SMEM;
        g.grid = persistent_grid<msa_bwd_tc_kernel<64>>("msa_attention_backward", TC_THREADS, g.smem);
    }
    return g;
}

void msa_tc_backward_tiles(const Geo &g, const TileArgs &a, int D) {
    if (D == 128) msa_bwd_tc_kernel<128><<<g.grid, g.threads, g.smem>>>(a);
    else msa_bwd_tc_kernel<64><<<g.grid, g.threads, g.smem>>>(a);
    LAUNCH_CHECK("msa_attention_backward tiles (tensor cores)");
}

}  // namespace msacuda
