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
 * being ascending) so that the per-query partial buffers stay under PARTIAL_BUDGET (3 GiB) at any N.
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
 * registers for the whole segment, dQ_partial = dS K (fp32) per slot, combined in slot order like the
 * forward. dK/dV of a segment split over several CTAs (hot rows) go through a per-CTA fp32 buffer
 * summed in CTA order by a fixup kernel; all dK/dV land in fp32 accumulators added to dk/dv at the end.
 * No atomics anywhere: results are run-to-run deterministic on a given GPU (they depend on the SM
 * count through the tile ranges only in fp32 rounding of dK/dV).
 *
 * Two implementations of the tile kernels share that schedule:
 *   - tensor cores (BF16, D = 64 or 128): 8 warps, mma.sync m16n8k16 bf16 with fp32 accumulation,
 *     ldmatrix from XOR-swizzled shared memory, a 3-stage cp.async pipeline (descriptor, entries,
 *     gathered Q / dO rows one tile ahead) so the gathers overlap the previous tile's math.
 *     Forward tile 128 packed rows x 128 keys (16 rows per warp, 64-key sub-tiles); backward tile
 *     32 (D = 128) or 64 (D = 64) packed rows x 128 keys.
 *   - CUDA cores (F32 inputs, other head dims up to 256): the same structure in fp32 with 32-row
 *     tiles and 32-key (16 for D > 128) segments; exact to fp32 rounding, for the fp32 checks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "msa_plan.cuh"

using namespace msacuda;

namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
/* bytes of per-query partials (forward O + lse, or backward dQ) per chunk */
constexpr size_t PARTIAL_BUDGET = (size_t)3 << 30;

/* ------------------------------------------------------------------------------------------------
 * Schedule
 * ---------------------------------------------------------------------------------------------- */

/* One tile: packed rows [piece*M, piece*M + rows) of segment (gr = g*Rb + r, ks). Entry ebase + j of
 * the chunk's entry array is the tile's j-th query; packed row p is query (off0 + p) / G, head
 * (off0 + p) % G. Keys [klo, khi). */
struct __align__(16) TileDesc {
    int gr, ks, ebase, rows, off0, klo, khi, piece;
};
constexpr int TILE_ROWS = 0xffff, TILE_FIRST = 1 << 16, TILE_LAST = 1 << 17; /* in TileDesc.rows */

/* first index in the non-decreasing a[0 .. n) with a[i] > x */
__device__ __forceinline__ int upper_bound_i32(const int *a, int n, int x) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (a[mid] <= x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Plan of group g: row_ptr [N+1] | q_idx [NK] | row_lo [N] | row_hi [N] (backend.h). */
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
        const int gr = upper_bound_i32(tile_off, n_gr + 1, j) - 1;
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

/* Entry e of the chunk (query li of row gr's sub-list): its token t and slot (the position of the
 * row's block in topk[g][t]; -1 when absent, which makes the packed rows invalid). */
__global__ void sched_entries_kernel(int2 *ent, const int *qoff, const int *rs, PlanView pv, const int32_t *topk,
                                     const int32_t *cu, int ndocs, int K, int B, int Rb, int n_gr, int c0, int c1, int bound) {
    const int E = min(qoff[n_gr], bound);
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
        const int gr = upper_bound_i32(qoff, n_gr + 1, e) - 1;
        const int g = gr / Rb, r = gr - g * Rb;
        const int t = pv.q_idx(g)[rs[gr] + (e - qoff[gr])];
        int slot = -1;
        if (t >= c0 && t < c1) {
            const int ds = cu[msa_doc_of(cu, ndocs, t)], lo = pv.row_lo(g)[r];
            if (lo >= ds && lo <= t) {
                const int b = (lo - ds) / B;
                const int32_t *row = topk + ((int64_t)g * pv.N + t) * K;
                for (int i = 0; i < K; i++) {
                    const int v = row[i];
                    if (v < 0) break;
                    if (v == b) {
                        slot = i;
                        break;
                    }
                }
            }
        }
        ent[e] = make_int2(t, slot);
    }
}

/* Everything a tile kernel reads; one struct for the four tile kernels (unused fields null). */
struct TileArgs {
    const void *q, *k, *v, *dout;
    const float *lse, *dsum;          /* backward: [Hq, N] */
    const TileDesc *desc;
    const int2 *ent;
    const int *tile_off;              /* total tiles at [n_gr] */
    void *opart;                      /* forward: [Qc][Hq][NS][D] of the partial type */
    float *lpart;                     /* forward: [Qc][Hq][NS] log-sum-exp (natural log) */
    float *dqp;                       /* backward: [Qc][Hq][NS][D] fp32, NULL without dq */
    float *acck, *accv;               /* backward: fp32 [N, Hkv, D], NULL when not wanted */
    float *cut;                       /* backward: [grid][2][2][KB][D] parts of split segments */
    int n_gr, Rb, N, Hq, Hkv, G, NS, nks, c0;
    float scale;
};

/* the contiguous tile range of this CTA; the fixup kernel uses the same formula */
__device__ __forceinline__ void cta_range(int T, int c, int nc, int &tb, int &te) {
    tb = (int)((int64_t)c * T / nc);
    te = (int)((int64_t)(c + 1) * T / nc);
}

/* ------------------------------------------------------------------------------------------------
 * PTX helpers (sm_80+): cp.async, ldmatrix, mma.sync bf16
 * ---------------------------------------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
/* 16 bytes global -> shared; zero-fill when !valid (src must still be a mapped address) */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
/* c += a (16x16, row) * b (16x8, col), bf16 in, fp32 accumulate */
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* .x (low half) = lo */
    return *reinterpret_cast<uint32_t *>(&v);
}

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
    cp_commit();
    cp_wait_all();
    __syncthreads();
    for (int j = tb; j < te && j < tb + 2; j++) tc_issue_ent(ring, a, j);
    cp_commit();
    cp_wait_all();
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
/* The fp32 accumulators of two adjacent n8 tiles (the m16n8 C layout, lo = columns 0-7, hi = 8-15) as
 * the bf16 A fragment of one m16n8k16 step over those 16 columns: the C layout of two n-tiles is the
 * A layout of a k16 step. */
__device__ __forceinline__ void acc_to_a_frag(uint32_t (&f)[4], const float (&lo)[4], const float (&hi)[4]) {
    f[0] = pack_bf16(lo[0], lo[1]);
    f[1] = pack_bf16(lo[2], lo[3]);
    f[2] = pack_bf16(hi[0], hi[1]);
    f[3] = pack_bf16(hi[2], hi[3]);
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
                    mma16816(s[2 * np], qa, b[0], b[1]);
                    mma16816(s[2 * np + 1], qa, b[2], b[3]);
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
        mx_a = fmaxf(mx_a, __shfl_xor_sync(FULL, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(FULL, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(FULL, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(FULL, mx_b, 2));
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
                    mma16816(o[2 * dp], pa, b[0], b[1]);
                    mma16816(o[2 * dp + 1], pa, b[2], b[3]);
                }
            }
        }
    }
    l_a += __shfl_xor_sync(FULL, l_a, 1);
    l_a += __shfl_xor_sync(FULL, l_a, 2);
    l_b += __shfl_xor_sync(FULL, l_b, 1);
    l_b += __shfl_xor_sync(FULL, l_b, 2);
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
    cp_commit();
    cp_wait_all();
    __syncthreads();

    for (int i = tb; i < te; i++) {
        tc_ring_advance(ring, a, i, te);
        if (i + 1 < te) tc_gather_rows<D, M>(sQ + ((i + 1) & 1) * C::Q_BYTES, (const bf16 *)a.q, ring.meta[(i + 1) & 1], a.Hq);
        cp_commit();
        tc_fwd_tile<D>(sQ + (i & 1) * C::Q_BYTES, sK, sV, ring.desc[i & 3], ring.meta[i & 1], a);
        cp_wait_all();
        __syncthreads();
        if (i + 1 < te) {
            const TileDesc &dn = ring.desc[(i + 1) & 3], &dc = ring.desc[i & 3];
            if (dn.gr != dc.gr || dn.ks != dc.ks) {
                tc_load_kv<D>(sK, sV, a, dn);
                cp_commit();
                cp_wait_all();
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
                    mma16816(st[2 * nq], ka, b[0], b[1]);
                    mma16816(st[2 * nq + 1], ka, b[2], b[3]);
                    ldsm_x4(b, os + bo);
                    mma16816(dpt[2 * nq], va, b[0], b[1]);
                    mma16816(dpt[2 * nq + 1], va, b[2], b[3]);
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
                            mma16816(acc.v[2 * dp], pa, b[0], b[1]);
                            mma16816(acc.v[2 * dp + 1], pa, b[2], b[3]);
                        }
                        if (a.acck) {
                            ldsm_x4_t(b, qs + bo);
                            mma16816(acc.k[2 * dp], da, b[0], b[1]);
                            mma16816(acc.k[2 * dp + 1], da, b[2], b[3]);
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
                mma16816(dq[2 * j2], af, b[0], b[1]);
                mma16816(dq[2 * j2 + 1], af, b[2], b[3]);
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
    cp_commit();
    cp_wait_all();
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
        cp_commit();
        const int b0 = i & 1;
        tc_bwd_tile<D>(acc, sQ + b0 * C::Q_BYTES, sO + b0 * C::Q_BYTES, sL + b0 * M, sDs + b0 * M, sdS, sK, sV,
                       ring.desc[i & 3], ring.meta[b0], a);
        cp_wait_all();
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
                cp_commit();
                cp_wait_all();
                __syncthreads();
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * CUDA-core tile kernels (F32, and BF16 with other head dims): the same schedule, fp32 math in shared
 * memory as attention.cu (lane = key for scores, lanes over the head dim for P V), one tile at a time.
 * ---------------------------------------------------------------------------------------------- */

constexpr int CC_THREADS = 128, CC_WARPS = 4, CC_M = 32, CC_QPW = 8;

template <int DPL> struct CcPitch {
    static constexpr int LP = 32 * DPL, RP = 32 * DPL + 4;
};
__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

/* the tile's row meta from global memory (thread p < CC_M) */
__device__ __forceinline__ int4 cc_meta(const TileArgs &a, const TileDesc &d, int p) {
    int4 mt = make_int4(-1, 0, 0, 0);
    if (p < (d.rows & TILE_ROWS)) {
        const int pi = d.off0 + p, lq = pi / a.G, hh = pi - lq * a.G;
        const int2 e = a.ent[d.ebase + lq];
        if (e.y >= 0) mt = make_int4(e.x, (d.gr / a.Rb) * a.G + hh, e.y * a.nks + d.ks, 0);
    }
    return mt;
}

/* rows of x [*, H, D] selected by meta (or keys klo.. < khi of head g when meta is NULL) into
 * smem rows of `pitch` floats, times mul; invalid rows and dims past D are zero */
template <typename T>
__device__ __forceinline__ void cc_load(float *dst, int pitch, int nrows, const T *x, const int4 *meta, int klo, int khi,
                                        int g, int H, int D, float mul) {
    for (int idx = threadIdx.x; idx < nrows * pitch; idx += blockDim.x) {
        const int r = idx / pitch, dd = idx - r * pitch;
        int64_t row = -1;
        if (meta) {
            if (meta[r].x >= 0) row = (int64_t)meta[r].x * H + meta[r].y;
        } else if (klo + r < khi) {
            row = (int64_t)(klo + r) * H + g;
        }
        dst[idx] = (row >= 0 && dd < D) ? to_f32(x[row * D + dd]) * mul : 0.0f;
    }
}

template <typename T, typename PT, int DPL>
__global__ void __launch_bounds__(CC_THREADS) msa_fwd_cc_kernel(TileArgs a, int D) {
    constexpr int LP = CcPitch<DPL>::LP, RP = CcPitch<DPL>::RP, KB = 32;
    extern __shared__ float4 smem4[];
    float *Qs = (float *)smem4; /* [CC_M][LP], scaled */
    float *Ks = Qs + CC_M * LP; /* [KB][RP] */
    float *Vs = Ks + KB * RP;   /* [KB][LP] */
    int4 *meta = (int4 *)(Vs + KB * LP);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    int64_t cur = -1;
    for (int i = tb; i < te; i++) {
        const TileDesc d = a.desc[i];
        const int g = d.gr / a.Rb;
        __syncthreads();
        if (threadIdx.x < CC_M) meta[threadIdx.x] = cc_meta(a, d, threadIdx.x);
        __syncthreads();
        cc_load(Qs, LP, CC_M, (const T *)a.q, meta, 0, 0, 0, a.Hq, D, a.scale);
        const int64_t seg = (int64_t)d.gr * a.nks + d.ks;
        if (seg != cur) {
            cc_load(Ks, RP, KB, (const T *)a.k, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
            cc_load(Vs, LP, KB, (const T *)a.v, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
            cur = seg;
        }
        __syncthreads();
        int4 mt[CC_QPW];
        bool any = false;
#pragma unroll
        for (int r = 0; r < CC_QPW; r++) {
            mt[r] = meta[warp * CC_QPW + r];
            any |= mt[r].x >= 0;
        }
        if (!any) continue; /* warp-uniform: meta is shared */
        float s[CC_QPW];
#pragma unroll
        for (int r = 0; r < CC_QPW; r++) s[r] = 0.0f;
        const float4 *kr = (const float4 *)(Ks + lane * RP);
        for (int d4 = 0; d4 < D4; d4++) {
            const float4 kk = kr[d4];
#pragma unroll
            for (int r = 0; r < CC_QPW; r++) s[r] += dot4(((const float4 *)(Qs + (warp * CC_QPW + r) * LP))[d4], kk);
        }
        const int key = d.klo + lane, nk = d.khi - d.klo;
#pragma unroll
        for (int r = 0; r < CC_QPW; r++) {
            if (mt[r].x < 0) continue;
            const bool vis = key < d.khi && key <= mt[r].x;
            const float mx = warp_max(vis ? s[r] : -INFINITY);
            const float p = vis ? expf(s[r] - mx) : 0.0f;
            const float l = warp_sum(p);
            float o[DPL];
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) o[jj] = 0.0f;
            for (int kk = 0; kk < nk; kk++) {
                const float pk = __shfl_sync(FULL, p, kk);
                const float *vr = Vs + kk * LP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) o[jj] += pk * vr[32 * jj];
            }
            const int64_t base = ((int64_t)(mt[r].x - a.c0) * a.Hq + mt[r].y) * a.NS + mt[r].z;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            PT *orow = (PT *)a.opart + base * D;
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) {
                const int dd = lane + 32 * jj;
                if (dd < D) orow[dd] = from_f32<PT>(o[jj] * inv);
            }
            if (lane == 0) a.lpart[base] = l > 0.0f ? mx + logf(l) : -INFINITY;
        }
    }
}

template <int DPL, int KPW>
__device__ __forceinline__ void cc_flush(float (&ak)[KPW][DPL], float (&av)[KPW][DPL], const TileDesc &d, bool started,
                                         bool ended, const TileArgs &a, int D) {
    constexpr int KB = CC_WARPS * KPW;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = d.gr / a.Rb;
    const bool whole = started && ended;
    float *cutp = a.cut + (((int64_t)blockIdx.x * 2 + (started ? 1 : 0)) * 2) * KB * D;
#pragma unroll
    for (int i = 0; i < KPW; i++) {
        const int kr = warp * KPW + i, key = d.klo + kr;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) {
            const int dd = lane + 32 * jj;
            if (key < d.khi && dd < D) {
                if (whole) {
                    const int64_t o = ((int64_t)key * a.Hkv + g) * D + dd;
                    if (a.acck) a.acck[o] += ak[i][jj];
                    if (a.accv) a.accv[o] += av[i][jj];
                } else {
                    cutp[(int64_t)kr * D + dd] = ak[i][jj];
                    cutp[(int64_t)(KB + kr) * D + dd] = av[i][jj];
                }
            }
            ak[i][jj] = av[i][jj] = 0.0f;
        }
    }
}

/* Backward tile: lanes over the 32 packed rows for P and dS of the warp's KPW keys, then over the
 * head dim for dK, dV (registers, whole segment) and, after a barrier, dQ_partial = dS K per row. */
template <typename T, int DPL, int KPW>
__global__ void __launch_bounds__(CC_THREADS) msa_bwd_cc_kernel(TileArgs a, int D) {
    constexpr int LP = CcPitch<DPL>::LP, RP = CcPitch<DPL>::RP, KB = CC_WARPS * KPW, SP = KB + 1;
    extern __shared__ float4 smem4[];
    float *Ks = (float *)smem4;  /* [KB][LP] */
    float *Vs = Ks + KB * LP;    /* [KB][LP] */
    float *Qs = Vs + KB * LP;    /* [CC_M][RP] */
    float *Os = Qs + CC_M * RP;  /* [CC_M][RP] dout */
    float *dSs = Os + CC_M * RP; /* [CC_M][SP] */
    float *Ls = dSs + CC_M * SP, *Ds = Ls + CC_M;
    int4 *meta = (int4 *)(Ds + CC_M);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    if (tb >= te) return;
    const bool want_kv = a.acck || a.accv;
    float ak[KPW][DPL], av[KPW][DPL];
#pragma unroll
    for (int i = 0; i < KPW; i++)
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) ak[i][jj] = av[i][jj] = 0.0f;
    TileDesc cd = a.desc[tb];
    bool started = (cd.rows & TILE_FIRST) != 0;
    for (int i = tb; i < te; i++) {
        const TileDesc d = a.desc[i];
        const int g = d.gr / a.Rb;
        const bool fresh = i == tb || d.gr != cd.gr || d.ks != cd.ks;
        if (fresh && i != tb) {
            if (want_kv) cc_flush<DPL, KPW>(ak, av, cd, started, (cd.rows & TILE_LAST) != 0, a, D);
            started = (d.rows & TILE_FIRST) != 0;
        }
        cd = d;
        __syncthreads();
        if (threadIdx.x < CC_M) {
            const int4 mt = cc_meta(a, d, threadIdx.x);
            meta[threadIdx.x] = mt;
            const int64_t o = (int64_t)mt.y * a.N + mt.x;
            Ls[threadIdx.x] = mt.x >= 0 ? a.lse[o] : 0.0f;
            Ds[threadIdx.x] = mt.x >= 0 ? a.dsum[o] : 0.0f;
        }
        __syncthreads();
        cc_load(Qs, RP, CC_M, (const T *)a.q, meta, 0, 0, 0, a.Hq, D, 1.0f);
        cc_load(Os, RP, CC_M, (const T *)a.dout, meta, 0, 0, 0, a.Hq, D, 1.0f);
        if (fresh) {
            cc_load(Ks, LP, KB, (const T *)a.k, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
            cc_load(Vs, LP, KB, (const T *)a.v, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
        }
        __syncthreads();
        const int t = meta[lane].x;
        const float lt = Ls[lane], dt = Ds[lane];
        float s[KPW], dp[KPW];
#pragma unroll
        for (int k = 0; k < KPW; k++) s[k] = dp[k] = 0.0f;
        const float4 *qr = (const float4 *)(Qs + lane * RP), *orr = (const float4 *)(Os + lane * RP);
        for (int d4 = 0; d4 < D4; d4++) {
            const float4 qq = qr[d4], oo = orr[d4];
#pragma unroll
            for (int k = 0; k < KPW; k++) {
                s[k] += dot4(qq, ((const float4 *)(Ks + (warp * KPW + k) * LP))[d4]);
                dp[k] += dot4(oo, ((const float4 *)(Vs + (warp * KPW + k) * LP))[d4]);
            }
        }
#pragma unroll
        for (int k = 0; k < KPW; k++) {
            const int key = d.klo + warp * KPW + k;
            const bool vis = t >= 0 && key < d.khi && key <= t;
            const float P = vis ? expf(a.scale * s[k] - lt) : 0.0f;
            const float dS = P * (dp[k] - dt);
            dSs[lane * SP + warp * KPW + k] = dS;
            if (!want_kv || !__any_sync(FULL, vis)) continue;
            for (int kk = 0; kk < CC_M; kk++) {
                const float pk = __shfl_sync(FULL, P, kk), gk = __shfl_sync(FULL, dS, kk);
                const float *orow = Os + kk * RP + lane, *qrow = Qs + kk * RP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) {
                    av[k][jj] += pk * orow[32 * jj];
                    ak[k][jj] += gk * qrow[32 * jj];
                }
            }
        }
        if (!a.dqp) continue;
        __syncthreads();
        const int nk = d.khi - d.klo;
        for (int r = warp * CC_QPW; r < (warp + 1) * CC_QPW; r++) {
            const int4 mt = meta[r];
            if (mt.x < 0) continue;
            float acc[DPL];
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) acc[jj] = 0.0f;
            for (int kk = 0; kk < nk; kk++) {
                const float gk = dSs[r * SP + kk];
                const float *krow = Ks + kk * LP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) acc[jj] += gk * krow[32 * jj];
            }
            float *dst = a.dqp + (((int64_t)(mt.x - a.c0) * a.Hq + mt.y) * a.NS + mt.z) * D;
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) {
                const int dd = lane + 32 * jj;
                if (dd < D) dst[dd] = acc[jj];
            }
        }
    }
    if (want_kv) cc_flush<DPL, KPW>(ak, av, cd, started, (cd.rows & TILE_LAST) != 0, a, D);
}

/* ------------------------------------------------------------------------------------------------
 * Reductions: combine, Dsum, dK/dV fixup and finish
 * ---------------------------------------------------------------------------------------------- */

/* VPL contiguous elements per lane per step (VPL = 1: any D, guarded), vector loads/stores */
template <typename X, int VPL> struct alignas(VPL * sizeof(X)) Vec {
    X v[VPL];
};
template <typename X, int VPL> __device__ __forceinline__ void load_f32(const X *p, float (&out)[VPL]) {
    const Vec<X, VPL> x = *(const Vec<X, VPL> *)p;
#pragma unroll
    for (int i = 0; i < VPL; i++) out[i] = to_f32(x.v[i]);
}
template <typename X, int VPL> __device__ __forceinline__ void store_f32(X *p, const float (&in)[VPL]) {
    Vec<X, VPL> x;
#pragma unroll
    for (int i = 0; i < VPL; i++) x.v[i] = from_f32<X>(in[i]);
    *(Vec<X, VPL> *)p = x;
}

/* number of leading selected slots of topk[g][t] (the CPU's support loop stops at the first -1) */
__device__ __forceinline__ int selected_slots(const int32_t *row, int K) {
    int first_neg = K;
    for (int i = threadIdx.x & 31; i < K; i += 32)
        if (row[i] < 0) {
            first_neg = i;
            break;
        }
    for (int o = 16; o > 0; o >>= 1) first_neg = min(first_neg, __shfl_xor_sync(FULL, first_neg, o));
    return first_neg;
}

/* One warp per (chunk query, head): out = sum_s exp(lse_s - LSE) O_s over the valid partials in slot
 * order, lse = LSE. */
template <typename T, typename PT, int VPL>
__global__ void msa_fwd_combine_kernel(T *out, float *lse, const PT *opart, const float *lpart, const int32_t *topk, int c0,
                                       int nq, int N, int Hq, int G, int K, int nks, int NS, int D) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (int64_t)nq * Hq) return;
    const int lane = threadIdx.x & 31;
    const int tq = (int)(row / Hq), h = (int)(row % Hq), t = c0 + tq;
    const int ns = selected_slots(topk + ((int64_t)(h / G) * N + t) * K, K) * nks;
    const float *lp = lpart + row * NS;
    float mx = -INFINITY;
    for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, lp[s]);
    mx = warp_max(mx);
    float sum = 0.0f;
    if (mx != -INFINITY)
        for (int s = lane; s < ns; s += 32) sum += expf(lp[s] - mx);
    sum = warp_sum(sum);
    const float L = mx != -INFINITY ? mx + logf(sum) : -INFINITY;
    constexpr int STEPS = 8 / VPL; /* D <= 256: at most 8 elements per lane */
    float acc[STEPS][VPL];
#pragma unroll
    for (int j = 0; j < STEPS; j++)
#pragma unroll
        for (int v = 0; v < VPL; v++) acc[j][v] = 0.0f;
    if (L != -INFINITY) {
        for (int s = 0; s < ns; s++) {
            const float w = expf(lp[s] - L);
            if (w == 0.0f) continue;
            const PT *src = opart + (row * NS + s) * D;
#pragma unroll
            for (int j = 0; j < STEPS; j++) {
                const int e = (j * 32 + lane) * VPL;
                if (e < D) {
                    float x[VPL];
                    load_f32<PT, VPL>(src + e, x);
#pragma unroll
                    for (int v = 0; v < VPL; v++) acc[j][v] += w * x[v];
                }
            }
        }
    }
    T *dst = out + ((int64_t)t * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        const int e = (j * 32 + lane) * VPL;
        if (e < D) store_f32<T, VPL>(dst + e, acc[j]);
    }
    if (lane == 0) lse[(int64_t)h * N + t] = L;
}

/* One warp per (chunk query, head): dq += scale * sum of the valid dQ partials in slot order. */
template <typename T, int VPL>
__global__ void msa_dq_combine_kernel(T *dq, const float *dqp, const int32_t *topk, int c0, int nq, int N, int Hq, int G,
                                      int K, int nks, int NS, int D, float scale) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (int64_t)nq * Hq) return;
    const int lane = threadIdx.x & 31;
    const int tq = (int)(row / Hq), h = (int)(row % Hq), t = c0 + tq;
    const int ns = selected_slots(topk + ((int64_t)(h / G) * N + t) * K, K) * nks;
    constexpr int STEPS = 8 / VPL;
    float acc[STEPS][VPL];
#pragma unroll
    for (int j = 0; j < STEPS; j++)
#pragma unroll
        for (int v = 0; v < VPL; v++) acc[j][v] = 0.0f;
    for (int s = 0; s < ns; s++) {
        const float *src = dqp + (row * NS + s) * D;
#pragma unroll
        for (int j = 0; j < STEPS; j++) {
            const int e = (j * 32 + lane) * VPL;
            if (e < D) {
                float x[VPL];
                load_f32<float, VPL>(src + e, x);
#pragma unroll
                for (int v = 0; v < VPL; v++) acc[j][v] += x[v];
            }
        }
    }
    T *dst = dq + ((int64_t)t * Hq + h) * D;
#pragma unroll
    for (int j = 0; j < STEPS; j++) {
        const int e = (j * 32 + lane) * VPL;
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

/* For each segment split over CTAs (block c = the CTA where it starts): sum the parts in CTA order
 * into the fp32 accumulators. */
__global__ void msa_dkv_fixup_kernel(float *acck, float *accv, const float *cut, const TileDesc *desc, const int *tile_off,
                                     int n_gr, int nks, int Rb, int Hkv, int D, int KB) {
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
    const int g = dl.gr / Rb, n = (dl.khi - dl.klo) * D;
    const int64_t part = (int64_t)KB * D;
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
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
}

/* grad += mul * acc */
template <typename T> __global__ void msa_add_acc_kernel(T *grad, const float *acc, int64_t n, float mul) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        grad[i] = from_f32<T>(to_f32(grad[i]) + mul * acc[i]);
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
struct Shape {
    int N, Hq, Hkv, D, G, K, B, ndocs, Rb, n_gr;
    int64_t P;
};

/* A tile kernel's geometry. */
struct Geo {
    int M, KB, threads, grid, nks, NS;
    size_t smem;
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
    const PlanView pv{plan, sh.P, (int64_t)sh.N * sh.K, sh.N};
    sched_count_kernel<<<grid_for(sh.n_gr, 256), 256>>>(s.rs, s.cnt, s.ntiles, pv, sh.Rb, sh.n_gr, c0, c1, sh.G, geo.M,
                                                        geo.nks);
    LAUNCH_CHECK("msa_attention schedule count");
    sched_scan_kernel<<<1, 1024>>>(s.qoff, s.tile_off, s.cnt, s.ntiles, sh.n_gr, s.tile_bound);
    LAUNCH_CHECK("msa_attention schedule scan");
    sched_desc_kernel<<<grid_for(s.tile_bound, 256), 256>>>(s.desc, s.tile_off, s.qoff, s.cnt, pv, sh.Rb, sh.n_gr, sh.G,
                                                            geo.M, geo.nks, geo.KB, s.tile_bound);
    LAUNCH_CHECK("msa_attention schedule tiles");
    sched_entries_kernel<<<grid_for(s.ent_bound, 256), 256>>>(s.ent, s.qoff, s.rs, pv, topk, cu, sh.ndocs, sh.K, sh.B, sh.Rb,
                                                              sh.n_gr, c0, c1, s.ent_bound);
    LAUNCH_CHECK("msa_attention schedule entries");
}

/* Queries per chunk: the partials of a chunk (bytes_per_query each) stay under PARTIAL_BUDGET.
 * MSA_CUDA_MSA_CHUNK=n overrides it (tests use it to exercise several chunks on small inputs). */
int chunk_queries(int N, size_t bytes_per_query) {
    int64_t q = bytes_per_query ? (int64_t)(PARTIAL_BUDGET / bytes_per_query) : N;
    const char *env = getenv("MSA_CUDA_MSA_CHUNK");
    if (env && atoi(env) > 0) q = atoi(env);
    if (q > N) q = N;
    return q < 1 ? 1 : (int)q;
}

/* Grid of a persistent tile kernel: every CTA the device holds at once (raising the shared-memory
 * limit first when the kernel needs more than 48 KB). Measured at the kernel's first use and kept: a
 * tile kernel's threads and shared memory are fixed by its template arguments. */
template <auto Kernel> int persistent_grid(const char *name, int threads, size_t smem) {
    static int grid = 0;
    if (grid) return grid;
    if (smem > 48 * 1024) {
        if ((int)smem > max_smem_optin())
            fatal("cuda %s: needs %zu bytes of shared memory, the device allows %d", name, smem, max_smem_optin());
        CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, smem));
    grid = sm_count() * (per_sm > 0 ? per_sm : 1);
    return grid;
}

int dpl_of(int D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8; }
bool use_tc(DType dt, int D) { return dt == DT_BF16 && (D == 64 || D == 128); }

/* Validate what both entries share; returns the shape (P, Rb from N, K, B, ndocs). */
Shape check_common(const char *what, const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *topk, const Tensor *plan,
                   const Tensor *cu, const MsaParams *p) {
    const int64_t ndocs = msa_check_params(what, p, cu);
    if (!q || !k || !v) fatal("cuda %s: q, k and v are required", what);
    if (q->ndim != 3) fatal("cuda %s: q must be [N, Hq, D], got %d dims", what, q->ndim);
    if (k->ndim != 3) fatal("cuda %s: k must be [N, Hkv, D], got %d dims", what, k->ndim);
    const int64_t N = q->shape[0], Hq = q->shape[1], Hkv = k->shape[1], D = q->shape[2];
    if (k->shape[0] != N) fatal("cuda %s: q and k must have N = %lld rows (got %lld and %lld)", what, (long long)N, (long long)N, (long long)k->shape[0]);
    if (k->shape[2] != D) fatal("cuda %s: q head dim %lld differs from k head dim %lld", what, (long long)D, (long long)k->shape[2]);
    if (v->ndim != 3 || v->shape[0] != N || v->shape[1] != Hkv || v->shape[2] != D)
        fatal("cuda %s: v must be [%lld, %lld, %lld] like k", what, (long long)N, (long long)Hkv, (long long)D);
    if (Hkv <= 0 || Hq % Hkv != 0) fatal("cuda %s: %lld query heads are not a multiple of %lld KV heads", what, (long long)Hq, (long long)Hkv);
    if (D < 1 || D > 256) fatal("cuda %s: head dim %lld not supported (1..256)", what, (long long)D);
    if (q->dtype != k->dtype || q->dtype != v->dtype)
        fatal("cuda %s: q, k, v must share one dtype (got %s, %s, %s)", what, dt_name(q->dtype), dt_name(k->dtype), dt_name(v->dtype));
    if (q->dtype != DT_F32 && q->dtype != DT_BF16) fatal("cuda %s: dtype %s not supported (f32 or bf16)", what, dt_name(q->dtype));
    if (N >= INT32_MAX / 2 || Hq > 65535) fatal("cuda %s: too many tokens or heads", what);
    const int64_t K = p->topk_blocks;
    if (topk) {
        if (topk->dtype != DT_I32) fatal("cuda %s: topk must be i32, got %s", what, dt_name(topk->dtype));
        if (topk->ndim != 3 || topk->shape[0] != Hkv || topk->shape[1] != N || topk->shape[2] != K)
            fatal("cuda %s: topk must be [Hidx = %lld, N = %lld, topk_blocks = %lld]", what, (long long)Hkv, (long long)N, (long long)K);
        if (N * K >= INT32_MAX) fatal("cuda %s: N * topk_blocks = %lld does not fit the i32 plan", what, (long long)(N * K));
    } else if (plan) {
        fatal("cuda %s: a plan without topk (a NULL topk means every visible block, which has no plan)", what);
    }
    const int64_t P = msa_plan_width(N, K);
    if (plan && (plan->dtype != DT_I32 || plan->numel != Hkv * P))
        fatal("cuda %s: plan must be i32 [Hidx, msa_plan_width(N, k)] = [%lld, %lld], got %s with %lld elements", what,
              (long long)Hkv, (long long)P, dt_name(plan->dtype), (long long)plan->numel);
    Shape s;
    s.N = (int)N;
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
    return s;
}

/* The plan to use: the caller's, or a temporary built here (then *owned, which the caller frees with
 * cuda_free). */
const int32_t *get_plan(const Tensor *plan, const Tensor *topk, const Tensor *cu, const MsaParams *p, const Shape &sh,
                        void **owned) {
    *owned = nullptr;
    if (plan) return (const int32_t *)plan->data;
    int32_t *built = msa_temporary_plan(topk, cu, p, sh.Hkv, sh.P);
    *owned = built;
    return built;
}

template <typename T, typename PT, int VPL>
void launch_fwd_combine(Tensor *out, Tensor *lse, const PT *opart, const float *lpart, const int32_t *topk, const Shape &sh,
                        int c0, int nq, int nks, int NS) {
    const int64_t rows = (int64_t)nq * sh.Hq;
    msa_fwd_combine_kernel<T, PT, VPL><<<(unsigned)((rows + 7) / 8), 256>>>((T *)out->data, (float *)lse->data, opart, lpart,
                                                                             topk, c0, nq, sh.N, sh.Hq, sh.G, sh.K, nks, NS,
                                                                             sh.D);
    LAUNCH_CHECK("msa_attention_forward combine");
}

template <typename T, typename PT>
void fwd_combine(Tensor *out, Tensor *lse, const PT *opart, const float *lpart, const int32_t *topk, const Shape &sh, int c0,
                 int nq, int nks, int NS) {
    if (sh.D % 128 == 0) launch_fwd_combine<T, PT, 4>(out, lse, opart, lpart, topk, sh, c0, nq, nks, NS);
    else if (sh.D % 64 == 0) launch_fwd_combine<T, PT, 2>(out, lse, opart, lpart, topk, sh, c0, nq, nks, NS);
    else launch_fwd_combine<T, PT, 1>(out, lse, opart, lpart, topk, sh, c0, nq, nks, NS);
}

template <typename T>
void dq_combine(Tensor *dq, const float *dqp, const int32_t *topk, const Shape &sh, int c0, int nq, int nks, int NS,
                float scale) {
    const int64_t rows = (int64_t)nq * sh.Hq;
    const unsigned blocks = (unsigned)((rows + 7) / 8);
    T *d = (T *)dq->data;
    if (sh.D % 128 == 0)
        msa_dq_combine_kernel<T, 4><<<blocks, 256>>>(d, dqp, topk, c0, nq, sh.N, sh.Hq, sh.G, sh.K, nks, NS, sh.D, scale);
    else if (sh.D % 64 == 0)
        msa_dq_combine_kernel<T, 2><<<blocks, 256>>>(d, dqp, topk, c0, nq, sh.N, sh.Hq, sh.G, sh.K, nks, NS, sh.D, scale);
    else msa_dq_combine_kernel<T, 1><<<blocks, 256>>>(d, dqp, topk, c0, nq, sh.N, sh.Hq, sh.G, sh.K, nks, NS, sh.D, scale);
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
    a.Hq = sh.Hq;
    a.Hkv = sh.Hkv;
    a.G = sh.G;
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
    for (int c0 = 0; c0 < sh.N; c0 += Qc) {
        const int c1 = sh.N - c0 > Qc ? c0 + Qc : sh.N;
        sched_build(sc, sh, geo, plan, topk, cu, c0, c1);
        a.c0 = c0;
        run(c0, c1);
    }
}

/* The geometry of the forward tile kernel for this call (the grid is measured once per kernel). */
template <typename T> Geo fwd_geo(const Shape &sh) {
    Geo g;
    if (use_tc(sizeof(T) == 2 ? DT_BF16 : DT_F32, sh.D)) {
        g.M = TcFwd<128>::M;
        g.KB = TC_KB;
        g.threads = TC_THREADS;
        if (sh.D == 128) {
            g.smem = TcFwd<128>::SMEM;
            g.grid = persistent_grid<msa_fwd_tc_kernel<128>>("msa_attention_forward", TC_THREADS, g.smem);
        } else {
            g.smem = TcFwd<64>::SMEM;
            g.grid = persistent_grid<msa_fwd_tc_kernel<64>>("msa_attention_forward", TC_THREADS, g.smem);
        }
    } else {
        const int dpl = dpl_of(sh.D), LP = 32 * dpl, RP = LP + 4;
        g.M = CC_M;
        g.KB = 32;
        g.threads = CC_THREADS;
        g.smem = (size_t)(CC_M * LP + 32 * RP + 32 * LP) * sizeof(float) + CC_M * sizeof(int4);
        const char *name = "msa_attention_forward";
        switch (dpl) {
        case 1: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 1>>(name, CC_THREADS, g.smem); break;
        case 2: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 2>>(name, CC_THREADS, g.smem); break;
        case 4: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 4>>(name, CC_THREADS, g.smem); break;
        default: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 8>>(name, CC_THREADS, g.smem); break;
        }
    }
    g.nks = (sh.B + g.KB - 1) / g.KB;
    g.NS = sh.K * g.nks;
    return g;
}

template <typename T>
void forward_impl(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v, const int32_t *topk,
                  const int32_t *plan, const int32_t *cu, const Shape &sh, float scale) {
    const bool tc = use_tc(q->dtype, sh.D);
    const Geo geo = fwd_geo<T>(sh);
    const size_t psz = tc ? sizeof(bf16) : sizeof(float); /* partial O: bf16 on the tensor-core path */
    const int Qc = chunk_queries(sh.N, (size_t)sh.Hq * geo.NS * (sh.D * psz + sizeof(float)));
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
            if (sh.D == 128) msa_fwd_tc_kernel<128><<<geo.grid, geo.threads, geo.smem>>>(a);
            else msa_fwd_tc_kernel<64><<<geo.grid, geo.threads, geo.smem>>>(a);
            LAUNCH_CHECK("msa_attention_forward tiles (tensor cores)");
            fwd_combine<T, bf16>(out, lse, (const bf16 *)opart, lpart, topk, sh, c0, c1 - c0, geo.nks, geo.NS);
        } else {
            switch (dpl_of(sh.D)) {
            case 1: msa_fwd_cc_kernel<T, float, 1><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            case 2: msa_fwd_cc_kernel<T, float, 2><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            case 4: msa_fwd_cc_kernel<T, float, 4><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            default: msa_fwd_cc_kernel<T, float, 8><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            }
            LAUNCH_CHECK("msa_attention_forward tiles");
            fwd_combine<T, float>(out, lse, (const float *)opart, lpart, topk, sh, c0, c1 - c0, geo.nks, geo.NS);
        }
    });
}

template <typename T> Geo bwd_geo(const Shape &sh) {
    Geo g;
    if (use_tc(sizeof(T) == 2 ? DT_BF16 : DT_F32, sh.D)) {
        g.KB = TC_KB;
        g.threads = TC_THREADS;
        if (sh.D == 128) {
            g.M = TcBwd<128>::M;
            g.smem = TcBwd<128>::SMEM;
            g.grid = persistent_grid<msa_bwd_tc_kernel<128>>("msa_attention_backward", TC_THREADS, g.smem);
        } else {
            g.M = TcBwd<64>::M;
            g.smem = TcBwd<64>::SMEM;
            g.grid = persistent_grid<msa_bwd_tc_kernel<64>>("msa_attention_backward", TC_THREADS, g.smem);
        }
    } else {
        const int dpl = dpl_of(sh.D), LP = 32 * dpl, RP = LP + 4, KPW = dpl <= 4 ? 8 : 4;
        g.M = CC_M;
        g.KB = CC_WARPS * KPW;
        g.threads = CC_THREADS;
        g.smem = (size_t)(2 * g.KB * LP + 2 * CC_M * RP + CC_M * (g.KB + 1) + 2 * CC_M) * sizeof(float) + CC_M * sizeof(int4);
        const char *name = "msa_attention_backward";
        switch (dpl) {
        case 1: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 1, 8>>(name, CC_THREADS, g.smem); break;
        case 2: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 2, 8>>(name, CC_THREADS, g.smem); break;
        case 4: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 4, 8>>(name, CC_THREADS, g.smem); break;
        default: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 8, 4>>(name, CC_THREADS, g.smem); break;
        }
    }
    g.nks = (sh.B + g.KB - 1) / g.KB;
    g.NS = sh.K * g.nks;
    return g;
}

template <typename T>
void backward_impl(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k, const Tensor *v,
                   const Tensor *out, const Tensor *lse, const int32_t *topk, const int32_t *plan, const int32_t *cu,
                   const Shape &sh, float scale) {
    const bool tc = use_tc(q->dtype, sh.D);
    const Geo geo = bwd_geo<T>(sh);
    const int Qc = dq ? chunk_queries(sh.N, (size_t)sh.Hq * geo.NS * sh.D * sizeof(float)) : chunk_queries(sh.N, 0);
    const bool want_kv = dk || dv;
    const int64_t nkv = (int64_t)sh.N * sh.Hkv * sh.D;
    Carve cv{nullptr, 0};
    Sched sc;
    float *dsum = nullptr, *acck = nullptr, *accv = nullptr, *cut = nullptr, *dqp = nullptr;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) cv = Carve{(char *)scratch(cv.off), 0};
        dsum = cv.take<float>((int64_t)sh.Hq * sh.N);
        acck = dk ? cv.take<float>(nkv) : nullptr;
        accv = dv ? cv.take<float>(nkv) : nullptr;
        cut = want_kv ? cv.take<float>((int64_t)geo.grid * 2 * 2 * geo.KB * sh.D) : nullptr;
        dqp = dq ? cv.take<float>((int64_t)Qc * sh.Hq * geo.NS * sh.D) : nullptr;
        sched_carve(cv, sc, sh, geo, Qc);
    }
    const int64_t rows = (int64_t)sh.N * sh.Hq;
    msa_dsum_kernel<T><<<(unsigned)((rows + 7) / 8), 256>>>(dsum, (const T *)dout->data, (const T *)out->data, sh.N, sh.Hq,
                                                            sh.D);
    LAUNCH_CHECK("msa_attention_backward dsum");
    if (acck) CUDA_CHECK(cudaMemsetAsync(acck, 0, (size_t)nkv * sizeof(float)));
    if (accv) CUDA_CHECK(cudaMemsetAsync(accv, 0, (size_t)nkv * sizeof(float)));
    TileArgs a = tile_args(q, k, v, sc, sh, geo, scale);
    a.dout = dout->data;
    a.lse = (const float *)lse->data;
    a.dsum = dsum;
    a.dqp = dqp;
    a.acck = acck;
    a.accv = accv;
    a.cut = cut;
    for_each_chunk(sc, sh, geo, plan, topk, cu, Qc, a, [&](int c0, int c1) {
        if (tc) {
            if (sh.D == 128) msa_bwd_tc_kernel<128><<<geo.grid, geo.threads, geo.smem>>>(a);
            else msa_bwd_tc_kernel<64><<<geo.grid, geo.threads, geo.smem>>>(a);
            LAUNCH_CHECK("msa_attention_backward tiles (tensor cores)");
        } else {
            switch (dpl_of(sh.D)) {
            case 1: msa_bwd_cc_kernel<T, 1, 8><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            case 2: msa_bwd_cc_kernel<T, 2, 8><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            case 4: msa_bwd_cc_kernel<T, 4, 8><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            default: msa_bwd_cc_kernel<T, 8, 4><<<geo.grid, geo.threads, geo.smem>>>(a, sh.D); break;
            }
            LAUNCH_CHECK("msa_attention_backward tiles");
        }
        if (want_kv) {
            msa_dkv_fixup_kernel<<<geo.grid, 256>>>(acck, accv, cut, sc.desc, sc.tile_off, sh.n_gr, geo.nks, sh.Rb, sh.Hkv,
                                                    sh.D, geo.KB);
            LAUNCH_CHECK("msa_attention_backward dk dv fixup");
        }
        if (dq) dq_combine<T>(dq, dqp, topk, sh, c0, c1 - c0, geo.nks, geo.NS, scale);
    });
    if (acck) {
        msa_add_acc_kernel<T><<<grid_for(nkv, 256), 256>>>((T *)dk->data, acck, nkv, scale);
        LAUNCH_CHECK("msa_attention_backward dk");
    }
    if (accv) {
        msa_add_acc_kernel<T><<<grid_for(nkv, 256), 256>>>((T *)dv->data, accv, nkv, 1.0f);
        LAUNCH_CHECK("msa_attention_backward dv");
    }
}

}  // namespace

extern "C" void cuda_msa_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                           const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens,
                                           const MsaParams *p) {
    init();
    const char *what = "msa_attention_forward";
    const Shape sh = check_common(what, q, k, v, topk, plan, cu_seqlens, p);
    if (!out || out->numel != q->numel || out->dtype != q->dtype) fatal("cuda %s: out must have q's shape and dtype", what);
    if (!lse || lse->numel != (int64_t)sh.Hq * sh.N || lse->dtype != DT_F32) fatal("cuda %s: lse must be f32 [Hq, N]", what);
    if (!topk) { /* dense warm-up: every visible block = causal attention within the document */
        cuda_attention_forward(out, lse, q, k, v, cu_seqlens, p->scale);
        return;
    }
    if (sh.N == 0) return;
    void *owned;
    const int32_t *pl = get_plan(plan, topk, cu_seqlens, p, sh, &owned);
    DISPATCH_FLOAT(q->dtype, T, what,
                   forward_impl<T>(out, lse, q, k, v, (const int32_t *)topk->data, pl, (const int32_t *)cu_seqlens->data, sh,
                                   p->scale));
    if (owned) cuda_free(owned);
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
    if (!lse || lse->numel != (int64_t)sh.Hq * sh.N || lse->dtype != DT_F32) fatal("cuda %s: lse must be f32 [Hq, N]", what);
    const Tensor *grads[3] = {dq, dk, dv}, *like[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (grads[i] && (grads[i]->numel != like[i]->numel || grads[i]->dtype != q->dtype))
            fatal("cuda %s: gradients must have their inputs' shapes and dtype", what);
    if (!topk) {
        cuda_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens, p->scale);
        return;
    }
    if (sh.N == 0) return;
    void *owned;
    const int32_t *pl = get_plan(plan, topk, cu_seqlens, p, sh, &owned);
    DISPATCH_FLOAT(q->dtype, T, what,
                   backward_impl<T>(dq, dk, dv, dout, q, k, v, out, lse, (const int32_t *)topk->data, pl,
                                    (const int32_t *)cu_seqlens->data, sh, p->scale));
    if (owned) cuda_free(owned);
}
