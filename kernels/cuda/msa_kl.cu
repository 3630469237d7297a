/* MSA KL alignment loss on the GPU (DESIGN §4, msa_spec.md c): forward (the mean over (token, group)
 * of KL(teacher || student) and the student's log-normaliser idx_lse) and backward (dqi, dki), with
 * the semantics of the CPU reference (kernels/cpu/msa_kl_impl.h):
 *   teacher  p_j = (1/G) sum_{h in g} exp(scale q_h.k_j - lse_h)     (detached: q, k, lse only read)
 *   student  z_j = index_scale qi_g.ki_j,  r_j = exp(z_j - idx_lse)  over the same support T(g, t)
 *   KL(g, t) = sum_j p_j (log p_j - z_j + idx_lse);   dKL/dz_j = r_j - p_j
 *   dqi[t,g] += cs sum_j (r_j - p_j) ki_j,  dki[j] += cs sum_{(t,g) reading j} (r_j - p_j) qi[t,g],
 *   cs = coeff * index_scale.
 * The support is the tokens <= t of the selected blocks (topk), or the whole causal prefix of the
 * document when topk is NULL (the dense warm-up). fp32 math everywhere; no atomics: every result is
 * a fixed-order sum, so runs are bit-identical.
 *
 * The tile step. Everything is built from one step over a key tile (<= KT keys: k rows of the group,
 * ki rows) and a chunk of QTq queries: their G heads make "packed rows" (query-major, as the paper's
 * query concatenation) so one K tile serves all heads of the group on the tensor cores:
 *   S = Q K^T (ROWS = 64 packed rows per unit, 4 units of 4 queries x 16 heads at G = 16),
 *   P[t][j] = sum_h exp2(S log2e scale - lse_h log2e)          (the teacher, times G),
 *   Z = QI KI^T (QTq x keys), then per mode:
 *   forward: per query, over the tile's valid keys, the stats (m = max z2, s = sum exp2(z2 - m),
 *     ab = sum p (log2 p - z2 + m), c = sum p) (log2 units). They merge like softmax statistics
 *     (ab shifts by (m' - m) c when the max moves), so KL = ln2 (ab + (l2 - m) c) with l2 = m + log2 s
 *     needs no second pass over the keys: idx_lse and KL come out of one pass;
 *   backward: dZ = exp2(z2 - idx_lse log2e) - P/G (masked), then dQI = dZ KI and dKI += dZ^T QI.
 * BF16 inputs use WMMA bf16 16x16x16 with fp32 accumulation for the five products (dZ rounded to bf16
 * for its two); F32 inputs run the same step on CUDA cores in fp32 (exact to fp32 rounding, for the
 * fp32 checks).
 *
 * Sparse (topk given): KV-outer from the plan (backend.h: block row -> ascending query list). A work
 * item is a "piece" of a row's list: <= QSEG = 256 queries inside one query window; the K/KI tile of
 * the row is loaded once per piece and the piece's queries are gathered chunk by chunk. Per-query
 * results that a row cannot finish (a query's support spans k rows) go to per-(query, slot) partials,
 * slot = the position of the row's block in topk[g][t]; small kernels then combine them in slot order:
 *   forward: stats (m, s, ab, c) per (query, slot) -> idx_lse[g][t] and KL(g, t);
 *   backward: dqi partial [Di] per (query, slot) -> dqi; dki of a row: one piece adds its tile
 *     straight into an fp32 accumulator [N, Di] (it owns those keys during its launch), a row split
 *     into several pieces (a hot row: block 0 selected by every query) writes one partial per piece,
 *     summed in piece order; the accumulator is added (x cs) to dki at the end.
 * Queries are processed in windows [w0, w1) (the plan's lists are ascending, so a row's sub-list is a
 * binary search away) sized so that the partials stay under WINDOW_BUDGET whatever N is; launches go
 * window by window and group by group. The work list (pieces) is built on the device from the plan:
 * count (binary searches), scan (one block per (group, window)), fill.
 *
 * Dense (topk NULL, no plan): flash-style, O(N^2) compute and O(N) memory: the forward and dqi run
 * query-outer (a CTA keeps a chunk of queries and walks the key tiles of their causal prefix, the
 * forward's stats merged per tile), dki runs key-outer (a CTA keeps a key tile and walks the later
 * queries of its documents for every group). Both recompute the teacher from q, k and lse.
 *
 * The student alone (kl_lse_kernel): the sparse forward's walk over the same work list without the
 * teacher, the statistics (m, s) of the selected tokens per (query, slot) from scores kept in registers (mma.sync
 * m16n8k16 for BF16), combined into idx_lse: the indexer's idx_lse (msa_indexer.cu).
 * The gradient's coefficient may be read on the device (a loss term's upstream gradient, so that no step
 * waits for it on the host): cs = cs_mul * cs_grad[0] (cs_grad NULL: cs_mul).
 *
 * Memory: shared memory 179 KB per CTA at D = Di = 128, G = 16 (one CTA of 8 warps per SM; the Q rows
 * of the next teacher unit load while the current one computes); global workspace (scratch) per
 * window <= WINDOW_BUDGET plus O(N) tables, and an fp32 [N, Di] dki accumulator in the sparse
 * backward. MSA_CUDA_KL_WINDOW=<tokens> overrides the window (tests). */
#include <math.h>
#include <mma.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "limits.h"
#include "msa_plan.cuh"

using namespace msacuda;
namespace wm = nvcuda::wmma;

namespace {

constexpr int THREADS = 256, NWARPS = THREADS / 32;
constexpr int QSEG = 256; /* queries per work item (piece of a row's list): bounds one CTA's work */
constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
constexpr size_t WINDOW_BUDGET = (size_t)256 << 20; /* bytes of per-window partials */

enum { FWD_SPARSE = 0, BWD_SPARSE = 1, FWD_DENSE = 2, BWD_DENSE_DQ = 3, BWD_DENSE_DK = 4 };

/* ------------------------------------------------------------------------------------------------
 * Tile geometry and the dynamic shared memory layout (computed on the host, read by the kernels)
 * ---------------------------------------------------------------------------------------------- */

struct Lay {
    int KT;           /* keys per tile step (sparse: min(B, KT max); dense: KT max) */
    int KTp, Dp, Dip; /* key tile rows and head dims padded to 16 */
    int ROWS;         /* packed (query, head) rows of one teacher unit */
    int HP, npass;    /* heads per unit, head passes per query (G > ROWS only) */
    int QS, ngrp;     /* queries per unit, units (query groups) per chunk */
    int QTq, QTp;     /* queries per chunk, padded to 16 */
    int qbuf;         /* Q tile buffers: 2 = the next unit's rows load during this unit's product */
    int ldk, ldki, ldq, ldqi, ldz; /* element pitches of the T tiles */
    int lds, ldp, ldzs, ldo;       /* float pitches: S, P, Z, O (staged outputs) */
    int o_ks, o_kis, o_qs, o_qis, o_dz, o_S, o_P, o_Z, o_meta, bytes;
};
constexpr int META = 64; /* per-query metadata slots (QTq, ROWS <= 64) */

int up16(int x) { return (x + 15) / 16 * 16; }
/* shared-memory regions start 128 bytes apart */
int align128(size_t bytes) { return (int)((bytes + 127) / 128 * 128); }

/* bf: BF16 tiles (tensor cores) or F32 (CUDA cores); sparse: key tiles are blocks (or KT-sized
 * sub-tiles of a block longer than KT), dense: KT consecutive keys; qbuf: Q tile buffers. */
Lay make_lay(bool bf, int B, int D, int Di, int G, bool sparse, int qbuf) {
    Lay L;
    memset(&L, 0, sizeof L);
    const int dmax = D > Di ? D : Di, ts = bf ? 2 : 4, pad = 16 / ts;
    /* the largest tiles that keep a CTA under the 227 KB of shared memory (see the file comment) */
    const int kt = bf ? (dmax <= 128 ? 128 : 64) : (dmax <= 128 ? 64 : 32);
    L.ROWS = (!bf && dmax > 128) ? 32 : 64;
    L.KT = sparse && B < kt ? B : kt;
    L.KTp = up16(L.KT);
    L.Dp = up16(D);
    L.Dip = up16(Di);
    L.HP = G < L.ROWS ? G : L.ROWS;
    L.npass = (G + L.HP - 1) / L.HP;
    L.QS = L.ROWS / L.HP;
    /* at least 16 queries per chunk so that the student's tiles (QTq rows) are not mostly padding */
    L.ngrp = L.QS >= 16 ? 1 : (16 + L.QS - 1) / L.QS;
    L.QTq = L.QS * L.ngrp;
    L.QTp = up16(L.QTq);
    L.qbuf = qbuf;
    /* +16 bytes per row: rows 4 banks apart, conflict-free fragment loads */
    L.ldk = L.ldq = L.Dp + pad;
    L.ldki = L.ldqi = L.Dip + pad;
    L.ldz = L.KTp + pad;
    L.lds = L.ldp = L.ldzs = L.KTp + 4;
    L.ldo = L.Dip + 4;
    size_t off = 0;
    auto take = [&](size_t bytes) {
        const size_t o = off;
        off += align128(bytes);
        return (int)o;
    };
    L.o_ks = take((size_t)L.KTp * L.ldk * ts);
    L.o_kis = take((size_t)L.KTp * L.ldki * ts);
    L.o_qs = take((size_t)qbuf * L.ROWS * L.ldq * ts);
    L.o_qis = take((size_t)L.QTp * L.ldqi * ts);
    L.o_dz = take((size_t)L.QTp * L.ldz * ts);
    /* S | P | Z while a chunk computes; the staged outputs O (dQI of a chunk, or an accumulator of
     * KTp or QTp rows) reuse the same bytes afterwards */
    const size_t spz = (size_t)L.ROWS * L.lds + (size_t)L.QTp * L.ldp + (size_t)L.QTp * L.ldzs;
    const size_t orows = (size_t)(L.KTp > L.QTp ? L.KTp : L.QTp) * L.ldo;
    L.o_S = take((spz > orows ? spz : orows) * sizeof(float));
    L.o_P = L.o_S + L.ROWS * L.lds * (int)sizeof(float);
    L.o_Z = L.o_P + L.QTp * L.ldp * (int)sizeof(float);
    L.o_meta = take((size_t)META * (7 * 4 + 16));
    L.bytes = (int)off;
    return L;
}

/* The idx_lse kernel's layout (kl_lse_kernel): the key tile KI [KTp][Dip] once per tile
 * of a piece, the chunk's QI rows [LSE_Q][Dip] in two buffers (the next chunk's rows land while this one
 * computes), two buffers of per-query metadata (LseMeta) and the two key halves' statistics [2][LSE_Q]. KTp
 * is 32, 64 or 128 (padding keys are masked): each of the 8 warps takes 16 queries x KTp / 2 keys in n8
 * tiles of the m16n8k16 product. */
constexpr int LSE_Q = 64; /* queries per chunk */
/* CTAs an SM the registers are budgeted for: two (127 registers at BF16, the configuration test_gpu ran; one fits
 * at F32, whose tiles are twice as large). Three at BF16 (72 KB of shared memory each at Di = 128, 80 registers, no
 * spill) measured faster in the sixteenth session's bench, 2.73 -> 2.60 ms for the indexer with idx_lse at 32/4/64
 * and 32K on an H100, but no test_gpu run has had it yet (kernels/cuda/NOTES.md) */
constexpr int LSE_CTAS = 2;
struct LseMeta {
    int qt[LSE_Q], tok[LSE_Q], slot[LSE_Q], tlo[LSE_Q]; /* as Sm's qt, qtok, qslot, qlo */
};
Lay lse_lay(bool bf, int B, int Di) {
    Lay L;
    memset(&L, 0, sizeof L);
    const int ts = bf ? 2 : 4, pad = 16 / ts;
    L.KT = B < 128 ? B : 128;
    for (L.KTp = 32; L.KTp < L.KT;) L.KTp *= 2;
    L.Dip = up16(Di);
    L.QTq = L.QTp = LSE_Q;
    L.ldki = L.ldqi = L.Dip + pad; /* rows 16 bytes apart in bank terms: conflict-free ldmatrix */
    const int kis = align128((size_t)L.KTp * L.ldki * ts), qis = align128((size_t)2 * LSE_Q * L.ldqi * ts);
    L.o_kis = 0;
    L.o_qis = kis;
    L.o_meta = kis + qis;
    L.bytes = L.o_meta + 2 * (int)sizeof(LseMeta) + 2 * LSE_Q * (int)sizeof(float2);
    return L;
}

template <typename T> struct Sm {
    T *ks, *kis, *qs, *qis, *dz;
    float *S, *P, *Z, *O;
    int *qt, *qlo, *qslot; /* per chunk query: row (-1: none), document start, slot (-1: none) */
    int *qtok;             /* per chunk query: its token (the causal limit; the row without a query_index) */
    float *li2, *ls2;      /* idx_lse * log2e per query; lse * log2e per packed row, 2 buffers like Q */
    float4 *stat;          /* dense forward: running (m, s, ab, c) per query */
};

template <typename T> __device__ __forceinline__ Sm<T> carve(unsigned char *b, const Lay &L) {
    Sm<T> s;
    s.ks = (T *)(b + L.o_ks);
    s.kis = (T *)(b + L.o_kis);
    s.qs = (T *)(b + L.o_qs);
    s.qis = (T *)(b + L.o_qis);
    s.dz = (T *)(b + L.o_dz);
    s.S = (float *)(b + L.o_S);
    s.P = (float *)(b + L.o_P);
    s.Z = (float *)(b + L.o_Z);
    s.O = s.S;
    int *m = (int *)(b + L.o_meta);
    s.qt = m;
    s.qlo = m + META;
    s.qslot = m + 2 * META;
    s.li2 = (float *)(m + 3 * META);
    s.ls2 = (float *)(m + 4 * META);
    s.stat = (float4 *)(m + 6 * META);
    s.qtok = m + 10 * META;
    return s;
}

/* Kernel arguments (one struct, passed as a __grid_constant__ parameter). */
template <typename T> struct KA {
    const T *q, *k, *qi, *ki;
    const float *lse, *idx_lse; /* idx_lse: the backward's input */
    const int *topk, *plan, *dstart, *dend;
    float *idx_lse_out, *vals;  /* forward: idx_lse [Hkv, Nq], KL per (t, g) at t * Hkv + g (NULL: none) */
    T *dqi, *dki;               /* dense backward: accumulated in place */
    float *part;                /* sparse: the window's per-(query, slot) partials */
    float *dki_acc, *split;     /* sparse backward: fp32 dki accumulator, split-row partials */
    double *klpart;             /* sparse backward: the KL's sum per CTA (log2 units), NULL: not wanted */
    const int4 *work;           /* sparse: this (group, window)'s pieces {row, e0, e1, split idx} */
    const int *work_n;
    int64_t Pw;                 /* plan width per group */
    int N, Hq, Hkv, G, D, Di, K, B;
    int Nq;                     /* query rows (q, qi, lse, idx_lse, topk, dqi count them; N: the tokens, k, ki) */
    const int32_t *q_token;     /* [Nq] the token of each query row, NULL: the row (MsaParams.query_index) */
    int g, w0, work_cap, split_cap, rowp;
    float sl2, isl2, invG, lg2G, cs;
    const float *cs_grad;       /* the gradient's coefficient is cs * cs_grad[0] (NULL: cs) */
    int vec_q, vec_i, want_dqi, want_dki;
    Lay L;
};

/* ------------------------------------------------------------------------------------------------
 * Loads
 * ---------------------------------------------------------------------------------------------- */

/* Rows [0, nrows) of a shared tile (pitch ld, Wp = padded width) from the global rows src(r) (W valid
 * elements; nullptr = a zero row), padding columns zero. 16-byte cp.async copies when vec (W * sizeof(T)
 * a multiple of 16 and every row 16-byte aligned), else element copies. Complete after
 * cp_async_wait_all() and a barrier. */
template <typename T, typename F>
__device__ __forceinline__ void load_tile(T *dst, int ld, int nrows, int Wp, int W, bool vec, F src) {
    constexpr int VEC = 16 / sizeof(T);
    if (vec) {
        const int cpr = Wp / VEC;
        for (int i = threadIdx.x; i < nrows * cpr; i += THREADS) {
            const int r = i / cpr, c = (i - r * cpr) * VEC;
            T *d = dst + r * ld + c;
            const T *s = src(r);
            if (s && c < W) cp_async16(smem_u32(d), s + c, true);
            else *(uint4 *)d = make_uint4(0u, 0u, 0u, 0u);
        }
    } else {
        for (int i = threadIdx.x; i < nrows * Wp; i += THREADS) {
            const int r = i / Wp, c = i - r * Wp;
            const T *s = src(r);
            dst[r * ld + c] = (s && c < W) ? s[c] : from_f32<T>(0.0f);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Tile products: C (fp32, shared) from A and B (shared). M, N, K are multiples of 16; the CTA's 8
 * warps share the work. nt: C = A B^T (A [M x K], B [N x K], row-major); nn: C = A B (B [K x N]);
 * an Acc keeps C across calls in registers: acc_nn C += A B, acc_tn C += A^T B (A stored [K x M]).
 * ---------------------------------------------------------------------------------------------- */

typedef wm::fragment<wm::accumulator, 16, 16, 16, float> FragC;

template <typename L> __device__ __forceinline__ const bf16 *tile_a(const bf16 *A, int ld, int i0, int k0) {
    if constexpr (std::is_same<L, wm::row_major>::value) return A + i0 * ld + k0;
    else return A + i0 + k0 * ld;
}
template <typename L> __device__ __forceinline__ const bf16 *tile_b(const bf16 *B, int ld, int k0, int j0) {
    if constexpr (std::is_same<L, wm::row_major>::value) return B + k0 * ld + j0;
    else return B + k0 + j0 * ld;
}

/* each warp a 2x2 block of 16x16 fragments (A and B fragments reused twice) */
template <typename LA, typename LB>
__device__ __forceinline__ void wmma_gemm(float *C, int ldc, const bf16 *A, int lda, const bf16 *B, int ldb, int M, int N,
                                          int K) {
    const int warp = threadIdx.x >> 5, fm = M >> 4, fn = N >> 4, tm = (fm + 1) >> 1, tn = (fn + 1) >> 1;
    for (int wt = warp; wt < tm * tn; wt += NWARPS) {
        const int m0 = (wt % tm) * 32, n0 = (wt / tm) * 32;
        const bool m1 = m0 + 16 < M, n1 = n0 + 16 < N;
        FragC c00, c01, c10, c11;
        wm::fill_fragment(c00, 0.0f);
        wm::fill_fragment(c01, 0.0f);
        wm::fill_fragment(c10, 0.0f);
        wm::fill_fragment(c11, 0.0f);
        for (int k0 = 0; k0 < K; k0 += 16) {
            wm::fragment<wm::matrix_a, 16, 16, 16, bf16, LA> a0, a1;
            wm::fragment<wm::matrix_b, 16, 16, 16, bf16, LB> b0, b1;
            wm::load_matrix_sync(a0, tile_a<LA>(A, lda, m0, k0), lda);
            wm::load_matrix_sync(b0, tile_b<LB>(B, ldb, k0, n0), ldb);
            wm::mma_sync(c00, a0, b0, c00);
            if (n1) {
                wm::load_matrix_sync(b1, tile_b<LB>(B, ldb, k0, n0 + 16), ldb);
                wm::mma_sync(c01, a0, b1, c01);
            }
            if (m1) {
                wm::load_matrix_sync(a1, tile_a<LA>(A, lda, m0 + 16, k0), lda);
                wm::mma_sync(c10, a1, b0, c10);
                if (n1) wm::mma_sync(c11, a1, b1, c11);
            }
        }
        wm::store_matrix_sync(C + m0 * ldc + n0, c00, ldc, wm::mem_row_major);
        if (n1) wm::store_matrix_sync(C + m0 * ldc + n0 + 16, c01, ldc, wm::mem_row_major);
        if (m1) wm::store_matrix_sync(C + (m0 + 16) * ldc + n0, c10, ldc, wm::mem_row_major);
        if (m1 && n1) wm::store_matrix_sync(C + (m0 + 16) * ldc + n0 + 16, c11, ldc, wm::mem_row_major);
    }
}

/* A persistent accumulator of up to 64 fragments (M * N <= 16384): fragment f = warp + 8 i, row-major
 * over the (M/16) x (N/16) grid. */
struct AccB {
    FragC c[8];
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < 8; i++) wm::fill_fragment(c[i], 0.0f);
    }
    template <typename LA, typename LB>
    __device__ __forceinline__ void add(const bf16 *A, int lda, const bf16 *B, int ldb, int M, int N, int K) {
        const int warp = threadIdx.x >> 5, fn = N >> 4, nf = (M >> 4) * fn;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int f = warp + NWARPS * i;
            if (f < nf) {
                const int r0 = (f / fn) * 16, c0 = (f % fn) * 16;
                for (int k0 = 0; k0 < K; k0 += 16) {
                    wm::fragment<wm::matrix_a, 16, 16, 16, bf16, LA> fa;
                    wm::fragment<wm::matrix_b, 16, 16, 16, bf16, LB> fb;
                    wm::load_matrix_sync(fa, tile_a<LA>(A, lda, r0, k0), lda);
                    wm::load_matrix_sync(fb, tile_b<LB>(B, ldb, k0, c0), ldb);
                    wm::mma_sync(c[i], fa, fb, c[i]);
                }
            }
        }
    }
    __device__ __forceinline__ void store(float *O, int ldo, int M, int N) {
        const int warp = threadIdx.x >> 5, fn = N >> 4, nf = (M >> 4) * fn;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int f = warp + NWARPS * i;
            if (f < nf) wm::store_matrix_sync(O + (f / fn) * 16 * ldo + (f % fn) * 16, c[i], ldo, wm::mem_row_major);
        }
    }
};

/* fp32 on CUDA cores; A(i, k) = A[i * a_i + k * a_k], B(k, j) = B[k * b_k + j * b_j] */
__device__ __forceinline__ void fma_gemm(float *C, int ldc, const float *A, int a_i, int a_k, const float *B, int b_k, int b_j,
                                         int M, int N, int K) {
    for (int e = threadIdx.x; e < M * N; e += THREADS) {
        const int i = e / N, j = e - i * N;
        const float *ap = A + i * a_i, *bp = B + j * b_j;
        float acc = 0.0f;
        for (int kk = 0; kk < K; kk++) acc = fmaf(ap[kk * a_k], bp[kk * b_k], acc);
        C[i * ldc + j] = acc;
    }
}

/* element e = thread + 256 i of the row-major M x N accumulator (M * N <= 8192) */
struct AccF {
    static constexpr int NV = 32;
    float v[NV];
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < NV; i++) v[i] = 0.0f;
    }
    __device__ __forceinline__ void add(const float *A, int a_i, int a_k, const float *B, int b_k, int b_j, int M, int N, int K) {
#pragma unroll
        for (int i = 0; i < NV; i++) {
            const int e = threadIdx.x + THREADS * i;
            if (e < M * N) {
                const int r = e / N, c = e - r * N;
                const float *ap = A + r * a_i, *bp = B + c * b_j;
                float acc = v[i];
                for (int kk = 0; kk < K; kk++) acc = fmaf(ap[kk * a_k], bp[kk * b_k], acc);
                v[i] = acc;
            }
        }
    }
    __device__ __forceinline__ void store(float *O, int ldo, int M, int N) const {
#pragma unroll
        for (int i = 0; i < NV; i++) {
            const int e = threadIdx.x + THREADS * i;
            if (e < M * N) O[(e / N) * ldo + e % N] = v[i];
        }
    }
};

template <typename T> struct Ops;
template <> struct Ops<bf16> {
    typedef AccB Acc;
    static __device__ __forceinline__ void nt(float *C, int ldc, const bf16 *A, int lda, const bf16 *B, int ldb, int M, int N,
                                              int K) {
        wmma_gemm<wm::row_major, wm::col_major>(C, ldc, A, lda, B, ldb, M, N, K);
    }
    static __device__ __forceinline__ void nn(float *C, int ldc, const bf16 *A, int lda, const bf16 *B, int ldb, int M, int N,
                                              int K) {
        wmma_gemm<wm::row_major, wm::row_major>(C, ldc, A, lda, B, ldb, M, N, K);
    }
    static __device__ __forceinline__ void acc_nn(Acc &c, const bf16 *A, int lda, const bf16 *B, int ldb, int M, int N, int K) {
        c.add<wm::row_major, wm::row_major>(A, lda, B, ldb, M, N, K);
    }
    static __device__ __forceinline__ void acc_tn(Acc &c, const bf16 *A, int lda, const bf16 *B, int ldb, int M, int N, int K) {
        c.add<wm::col_major, wm::row_major>(A, lda, B, ldb, M, N, K);
    }
};
template <> struct Ops<float> {
    typedef AccF Acc;
    static __device__ __forceinline__ void nt(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M, int N,
                                              int K) {
        fma_gemm(C, ldc, A, lda, 1, B, 1, ldb, M, N, K);
    }
    static __device__ __forceinline__ void nn(float *C, int ldc, const float *A, int lda, const float *B, int ldb, int M, int N,
                                              int K) {
        fma_gemm(C, ldc, A, lda, 1, B, ldb, 1, M, N, K);
    }
    static __device__ __forceinline__ void acc_nn(Acc &c, const float *A, int lda, const float *B, int ldb, int M, int N, int K) {
        c.add(A, lda, 1, B, ldb, 1, M, N, K);
    }
    static __device__ __forceinline__ void acc_tn(Acc &c, const float *A, int lda, const float *B, int ldb, int M, int N, int K) {
        c.add(A, 1, lda, B, ldb, 1, M, N, K);
    }
};

/* ------------------------------------------------------------------------------------------------
 * The tile step
 * ---------------------------------------------------------------------------------------------- */

/* Softmax-style statistics (m, s, ab, c) of two disjoint key sets, ab taken relative to the max. */
__device__ __forceinline__ float4 merge_stats(float4 a, float4 b) {
    if (b.x == -INFINITY) return a; /* b saw no key (s = ab = c = 0) */
    if (a.x == -INFINITY) return b;
    const float m = fmaxf(a.x, b.x);
    return make_float4(m, a.y * exp2f(a.x - m) + b.y * exp2f(b.x - m), a.z + (m - a.x) * a.w + b.z + (m - b.x) * b.w,
                       a.w + b.w);
}

/* One chunk of nq queries (s.qt/qlo/qslot/li2 set, behind a barrier) against the key tile
 * [j0, j0 + nk) (s.ks, s.kis issued, possibly still in flight) of group g; st = the tile's index
 * within its block (sparse: the partials of st > 0 merge into those of tile 0). Ends without a
 * barrier: the caller puts one before touching shared memory again. */
template <typename T, int MODE>
__device__ __forceinline__ void chunk_step(const KA<T> &a, const Sm<T> &s, typename Ops<T>::Acc &acc, int g, int j0, int nk,
                                           int nq, int st, double &kl) {
    const Lay &L = a.L;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    load_tile<T>(s.qis, L.ldqi, L.QTp, L.Dip, a.Di, a.vec_i != 0, [&](int r) -> const T * {
        return r < nq ? a.qi + ((int64_t)s.qt[r] * a.Hkv + g) * a.Di : nullptr;
    });
    /* the teacher, unit by unit: QS queries x HP heads in ROWS packed rows. Units are query-group
     * major, so the ones holding real queries are a prefix. Unit u's Q rows and lse go to buffer u & 1
     * (Q: buffer 0 when qbuf = 1) and are issued one unit ahead, to land while the previous unit
     * computes. */
    const int nu = min(L.ngrp * L.npass, (nq + L.QS - 1) / L.QS * L.npass);
    auto issue_q = [&](int u) {
        const int qg = u / L.npass, h0 = (u - qg * L.npass) * L.HP, hn = min(L.HP, a.G - h0);
        T *qs = s.qs + (L.qbuf == 2 ? (u & 1) : 0) * L.ROWS * L.ldq;
        load_tile<T>(qs, L.ldq, L.ROWS, L.Dp, a.D, a.vec_q != 0, [&](int m) -> const T * {
            const int ql = m / L.HP, hh = m - ql * L.HP, qq = qg * L.QS + ql;
            if (ql >= L.QS || hh >= hn || qq >= nq) return nullptr;
            return a.q + ((int64_t)s.qt[qq] * a.Hq + (int64_t)g * a.G + h0 + hh) * a.D;
        });
        if (tid < L.ROWS) {
            const int ql = tid / L.HP, hh = tid - ql * L.HP, qq = qg * L.QS + ql;
            s.ls2[(u & 1) * META + tid] = (ql < L.QS && hh < hn && qq < nq)
                                              ? a.lse[((int64_t)g * a.G + h0 + hh) * a.Nq + s.qt[qq]] * LOG2E
                                              : 0.0f;
        }
    };
    if (nu > 0) issue_q(0);
    for (int u = 0; u < nu; u++) {
        const int qg = u / L.npass, hp = u - qg * L.npass, h0 = hp * L.HP, hn = min(L.HP, a.G - h0);
        cp_async_wait_all();
        __syncthreads(); /* unit u's rows are in; the previous unit's P update is done with S */
        if (L.qbuf == 2 && u + 1 < nu) issue_q(u + 1); /* its buffer was last read by unit u - 1 */
        Ops<T>::nt(s.S, L.lds, s.qs + (L.qbuf == 2 ? (u & 1) : 0) * L.ROWS * L.ldq, L.ldq, s.ks, L.ldk, L.ROWS, L.KTp, L.Dp);
        if (u == 0) Ops<T>::nt(s.Z, L.ldzs, s.qis, L.ldqi, s.kis, L.ldki, L.QTp, L.KTp, L.Dip);
        __syncthreads();
        if (L.qbuf == 1 && u + 1 < nu) issue_q(u + 1); /* the one Q buffer is free again */
        /* P[qq][jj] = sum over the group's heads of exp(scale S - lse) (the teacher times G; masked
         * and padding entries are computed too and never read) */
        const float *ls2 = s.ls2 + (u & 1) * META;
        for (int i = tid; i < L.QS * L.KTp; i += THREADS) {
            const int ql = i / L.KTp, jj = i - ql * L.KTp, qq = qg * L.QS + ql;
            const float *sr = s.S + ql * L.HP * L.lds + jj, *lr = ls2 + ql * L.HP;
            float v = hp ? s.P[qq * L.ldp + jj] : 0.0f;
            for (int hh = 0; hh < hn; hh++) v += exp2_ftz(fmaf(sr[hh * L.lds], a.sl2, -lr[hh]));
            s.P[qq * L.ldp + jj] = v;
        }
    }
    __syncthreads();

    if constexpr (MODE == FWD_SPARSE || MODE == FWD_DENSE) {
        /* a warp per query, lanes over keys: the tile's statistics in log2 units */
        for (int qq = warp; qq < nq; qq += NWARPS) {
            const int t = s.qtok[qq], tlo = s.qlo[qq];
            const float *zr = s.Z + qq * L.ldzs, *pr = s.P + qq * L.ldp;
            float m = -INFINITY;
            for (int jj = lane; jj < nk; jj += 32) {
                const int j = j0 + jj;
                if (j <= t && j >= tlo) m = fmaxf(m, zr[jj] * a.isl2);
            }
            m = warp_max(m);
            float sum = 0.0f, ab = 0.0f, c = 0.0f;
            if (m != -INFINITY) {
                for (int jj = lane; jj < nk; jj += 32) {
                    const int j = j0 + jj;
                    if (j > t || j < tlo) continue;
                    const float z2 = zr[jj] * a.isl2, pg = pr[jj];
                    sum += exp2_ftz(z2 - m);
                    if (pg > 0.0f) { /* p log p -> 0 as p -> 0 */
                        const float p = pg * a.invG;
                        ab = fmaf(p, (log2f(pg) - a.lg2G) + (m - z2), ab);
                        c += p;
                    }
                }
            }
            sum = warp_sum(sum);
            ab = warp_sum(ab);
            c = warp_sum(c);
            if (lane == 0) {
                const float4 ts = make_float4(m, sum, ab, c);
                if constexpr (MODE == FWD_SPARSE) {
                    if (s.qslot[qq] >= 0) {
                        float4 *dst = (float4 *)a.part + ((int64_t)(s.qt[qq] - a.w0) * a.K + s.qslot[qq]);
                        *dst = st == 0 ? ts : merge_stats(*dst, ts);
                    }
                } else {
                    s.stat[qq] = merge_stats(s.stat[qq], ts);
                }
            }
        }
    } else {
        /* dz = r - p on the valid (query, key) pairs, 0 elsewhere (padding included: the products
         * below run over the padded extents); with klpart also the KL's terms p (log p - log r), log2 units,
         * where the forward pass (msa_kl_forward's FWD_SPARSE) recomputed the teacher once more for them */
        float klc = 0.0f;
        for (int i = tid; i < L.QTp * L.KTp; i += THREADS) {
            const int qq = i / L.KTp, jj = i - qq * L.KTp;
            float d = 0.0f;
            if (qq < nq && jj < nk) {
                const int j = j0 + jj;
                if (j <= s.qtok[qq] && j >= s.qlo[qq]) {
                    const float lr = fmaf(s.Z[qq * L.ldzs + jj], a.isl2, -s.li2[qq]), pg = s.P[qq * L.ldp + jj];
                    d = exp2_ftz(lr) - pg * a.invG;
                    if (MODE == BWD_SPARSE && a.klpart && pg > 0.0f && s.qslot[qq] >= 0) /* p log p -> 0 as p -> 0 */
                        klc = fmaf(pg * a.invG, (log2f(pg) - a.lg2G) - lr, klc);
                }
            }
            s.dz[qq * L.ldz + jj] = from_f32<T>(d);
        }
        kl += (double)klc;
        __syncthreads();
        if constexpr (MODE == BWD_SPARSE) {
            if (a.want_dqi) Ops<T>::nn(s.O, L.ldo, s.dz, L.ldz, s.kis, L.ldki, L.QTp, L.Dip, L.KTp);
            if (a.want_dki) Ops<T>::acc_tn(acc, s.dz, L.ldz, s.qis, L.ldqi, L.KTp, L.Dip, L.QTp);
            if (a.want_dqi) {
                __syncthreads();
                for (int i = tid; i < nq * a.Di; i += THREADS) {
                    const int qq = i / a.Di, d = i - qq * a.Di, slot = s.qslot[qq];
                    if (slot < 0) continue;
                    float *dst = a.part + ((int64_t)(s.qt[qq] - a.w0) * a.K + slot) * a.Di + d;
                    const float v = s.O[qq * L.ldo + d];
                    *dst = st == 0 ? v : *dst + v;
                }
            }
        } else if constexpr (MODE == BWD_DENSE_DQ) {
            Ops<T>::acc_nn(acc, s.dz, L.ldz, s.kis, L.ldki, L.QTp, L.Dip, L.KTp);
        } else {
            Ops<T>::acc_tn(acc, s.dz, L.ldz, s.qis, L.ldqi, L.KTp, L.Dip, L.QTp);
        }
    }
}

/* Issue the loads of a key tile: keys [j0, j0 + nk) of group g (and the index keys when with_ki). */
template <typename T>
__device__ __forceinline__ void load_keys(const KA<T> &a, const Sm<T> &s, int g, int j0, int nk, bool with_ki) {
    const Lay &L = a.L;
    if (a.k) /* (the student alone has no k) */
        load_tile<T>(s.ks, L.ldk, L.KTp, L.Dp, a.D, a.vec_q != 0, [&](int r) -> const T * {
            return r < nk ? a.k + ((int64_t)(j0 + r) * a.Hkv + g) * a.D : nullptr;
        });
    if (with_ki)
        load_tile<T>(s.kis, L.ldki, L.KTp, L.Dip, a.Di, a.vec_i != 0, [&](int r) -> const T * {
            return r < nk ? a.ki + (int64_t)(j0 + r) * a.Di : nullptr;
        });
}

/* ------------------------------------------------------------------------------------------------
 * Kernels
 * ---------------------------------------------------------------------------------------------- */

/* The plan's lists of group a.g (backend.h), and a piece of this (group, window)'s work list: its item {row, e0,
 * e1, split}, the row's tokens [lo, hi) and its document-relative block id; ok is false for a corrupt plan's row,
 * which the kernels skip (uniformly: every thread reads the same item). */
struct PlanLists {
    const int *q_idx, *row_lo, *row_hi;
};
template <typename T> __device__ __forceinline__ PlanLists plan_lists(const KA<T> &a) {
    const int *row_ptr = a.plan + (int64_t)a.g * a.Pw, *q_idx = row_ptr + a.N + 1, *row_lo = q_idx + (int64_t)a.Nq * a.K;
    return PlanLists{q_idx, row_lo, row_lo + a.N};
}
struct Piece {
    int4 wk;
    int lo, hi, blk;
    bool ok;
};
template <typename T> __device__ __forceinline__ Piece piece_at(const KA<T> &a, const PlanLists &pl, int it) {
    Piece p;
    p.wk = a.work[it];
    p.lo = pl.row_lo[p.wk.x];
    p.hi = min(pl.row_hi[p.wk.x], a.N);
    p.ok = p.lo >= 0 && p.lo < p.hi;
    p.blk = p.ok ? (p.lo - a.dstart[p.lo]) / a.B : 0;
    return p;
}

/* A query of a row's list (t = q_idx[e], its query row) in the piece of the row [lo, ..) whose document-relative
 * block is blk: its row, token, slot in its selection and document start. A corrupt plan entry stays in bounds
 * and gets slot -1, so that no partial is written for it. */
struct RowQuery {
    int t, tok, slot, tlo;
};
template <typename T> __device__ __forceinline__ RowQuery row_query(const KA<T> &a, int t, int lo, int blk) {
    RowQuery r;
    r.t = t;
    r.tok = t >= 0 && t < a.Nq ? msa_row_token(a.q_token, t, a.N) : -1;
    r.slot = -1;
    if (r.tok < lo) {
        r.t = a.q_token ? 0 : lo;
        r.tok = lo;
    } else {
        r.slot = msa_topk_slot(a.topk + ((int64_t)a.g * a.Nq + t) * a.K, a.K, blk);
    }
    r.tlo = a.dstart[r.tok];
    return r;
}

/* Sparse, KV-outer: one piece {row, e0, e1, split} per iteration, the row's keys in tiles of KT. */
template <typename T, int MODE>
__global__ void __launch_bounds__(THREADS, 1) kl_rows_kernel(const __grid_constant__ KA<T> a) {
    extern __shared__ __align__(128) unsigned char kl_smem[];
    const Lay &L = a.L;
    const Sm<T> s = carve<T>(kl_smem, L);
    const int tid = threadIdx.x, g = a.g;
    const PlanLists pl = plan_lists(a);
    typename Ops<T>::Acc acc;
    double kl = 0.0;
    const int nwork = min(*a.work_n, a.work_cap);
    for (int it = blockIdx.x; it < nwork; it += gridDim.x) {
        const Piece pc = piece_at(a, pl, it);
        if (!pc.ok) continue;
        for (int j0 = pc.lo, st = 0; j0 < pc.hi; j0 += L.KT, st++) {
            const int nk = min(L.KT, pc.hi - j0);
            __syncthreads(); /* the previous tile is done with every buffer */
            load_keys(a, s, g, j0, nk, true);
            if constexpr (MODE == BWD_SPARSE) acc.zero();
            for (int e = pc.wk.y; e < pc.wk.z; e += L.QTq) {
                const int nq = min(L.QTq, pc.wk.z - e);
                __syncthreads(); /* the previous chunk is done with the metadata */
                if (tid < L.QTq) {
                    RowQuery r = {-1, -1, -1, 0};
                    float li = 0.0f;
                    if (tid < nq) {
                        r = row_query(a, pl.q_idx[e + tid], pc.lo, pc.blk);
                        if constexpr (MODE == BWD_SPARSE) li = a.idx_lse[(int64_t)g * a.Nq + r.t] * LOG2E;
                    }
                    s.qt[tid] = r.t;
                    s.qtok[tid] = r.tok;
                    s.qslot[tid] = r.slot;
                    s.qlo[tid] = r.tlo;
                    s.li2[tid] = li;
                }
                __syncthreads();
                chunk_step<T, MODE>(a, s, acc, g, j0, nk, nq, st, kl);
            }
            cp_async_wait_all(); /* (nothing pending unless the piece was empty) */
            if constexpr (MODE == BWD_SPARSE) {
                if (a.want_dki) {
                    __syncthreads();
                    acc.store(s.O, L.ldo, L.KTp, L.Dip);
                    __syncthreads();
                    for (int i = tid; i < nk * a.Di; i += THREADS) {
                        const int jj = i / a.Di, d = i - jj * a.Di;
                        const float v = s.O[jj * L.ldo + d];
                        if (pc.wk.w < 0) a.dki_acc[(int64_t)(j0 + jj) * a.Di + d] += v; /* the row's only piece */
                        else if (pc.wk.w < a.split_cap) a.split[((int64_t)pc.wk.w * a.rowp + (j0 + jj - pc.lo)) * a.Di + d] = v;
                    }
                }
            }
        }
    }
    if constexpr (MODE == BWD_SPARSE) {
        if (a.klpart) { /* this CTA's share, added launch after launch: the (window, group) passes in their order */
            __shared__ double red[32];
            kl = block_sum(kl, red);
            if (tid == 0) a.klpart[blockIdx.x] += kl;
        }
    }
}

/* ---- idx_lse alone: the student's statistics over the selection ---- */

/* The student's scores Z = QI KI^T of a warp's 16 queries x 8 NT keys, in the m16n8 accumulator layout: z[n][0..1]
 * are query gid = lane / 4 with keys 8 n + 2 tig + {0, 1} (tig = lane % 4), z[n][2..3] query gid + 8. qs points at
 * the warp's first query row, ks at its first key row (pitches ldq, ldk; Dip columns, zero past Di). BF16 on the
 * tensor cores (mma.sync m16n8k16, fp32 accumulation); F32 on CUDA cores in the same layout, exact to fp32 rounding
 * (the fp32 checks). */
template <int NT>
__device__ __forceinline__ void student_scores(float (&z)[NT][4], const bf16 *qs, int ldq, const bf16 *ks, int ldk, int Dip) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int n = 0; n < NT; n++) z[n][0] = z[n][1] = z[n][2] = z[n][3] = 0.0f;
    /* ldmatrix rows: A's 16 query rows at k 0 / 8; B's two n8 tiles (keys 0-7, 8-15) at k 0 / 8 */
    const uint32_t qa = smem_u32(qs + (lane & 15) * ldq + (lane >> 4) * 8);
    const uint32_t ka = smem_u32(ks + ((lane & 7) + ((lane >> 4) << 3)) * ldk + ((lane >> 3) & 1) * 8);
    for (int k0 = 0; k0 < Dip; k0 += 16) {
        uint32_t af[4];
        ldsm_x4(af, qa + (uint32_t)k0 * 2);
#pragma unroll
        for (int n = 0; n < NT; n += 2) {
            uint32_t bfr[4];
            ldsm_x4(bfr, ka + (uint32_t)(n * 8 * ldk + k0) * 2);
            mma_bf16_16816(z[n], af, bfr[0], bfr[1]);
            mma_bf16_16816(z[n + 1], af, bfr[2], bfr[3]);
        }
    }
}
template <int NT>
__device__ __forceinline__ void student_scores(float (&z)[NT][4], const float *qs, int ldq, const float *ks, int ldk, int Dip) {
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int n = 0; n < NT; n++) z[n][0] = z[n][1] = z[n][2] = z[n][3] = 0.0f;
    const float *q0 = qs + gid * ldq, *q1 = q0 + 8 * ldq, *kr = ks + 2 * tig * ldk;
    for (int d = 0; d < Dip; d++) {
        const float a0 = q0[d], a1 = q1[d];
#pragma unroll
        for (int n = 0; n < NT; n++) {
            const float b0 = kr[8 * n * ldk + d], b1 = kr[(8 * n + 1) * ldk + d];
            z[n][0] = fmaf(a0, b0, z[n][0]);
            z[n][1] = fmaf(a0, b1, z[n][1]);
            z[n][2] = fmaf(a1, b0, z[n][2]);
            z[n][3] = fmaf(a1, b1, z[n][3]);
        }
    }
}

/* idx_lse's statistics: KV-outer over the work list the KL's rows kernel walks, one piece {row, e0,
 * e1} per iteration, the row's keys in tiles of KT, the piece's queries in chunks of LSE_Q whose QI rows are
 * gathered one chunk ahead (cp.async, two buffers). Each warp scores 16 queries x KTp / 2 keys into registers
 * (student_scores) and reduces its two rows a lane there: the valid keys' max and sum of 2^(z - max), log2 units,
 * over the row's four lanes; the two key halves' statistics merge in order, so the partials are deterministic.
 * The rows kernel's tile step (its WMMA product through shared memory, then the statistics read back from it, a
 * CTA's 8 warps meeting at five barriers a chunk) made this pass 1.44 ms a 32/4/64 layer at 32K, issue-bound
 * (fifteenth session); this kernel takes 0.70 (four launches of 174 us, H100, sixteenth session, docs/benchmarks.md). */
template <typename T, int NT>
__global__ void __launch_bounds__(THREADS, LSE_CTAS) kl_lse_kernel(const __grid_constant__ KA<T> a) {
    extern __shared__ __align__(128) unsigned char kl_smem[];
    const Lay &L = a.L;
    T *kis = (T *)(kl_smem + L.o_kis), *qis = (T *)(kl_smem + L.o_qis);
    LseMeta *meta = (LseMeta *)(kl_smem + L.o_meta);
    float2 *red = (float2 *)(meta + 2); /* [key half][query] */
    const int tid = threadIdx.x, warp = warp_idx_uniform(), lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    const int qw = (warp & 3) * 16, half = warp >> 2, kw = half * NT * 8; /* the warp's first query and key */
    const PlanLists pl = plan_lists(a);
    const int nwork = min(*a.work_n, a.work_cap);
    for (int it = blockIdx.x; it < nwork; it += gridDim.x) {
        const Piece pc = piece_at(a, pl, it);
        if (!pc.ok) continue;
        /* the chunk of queries [e, e + LSE_Q) into buffer b: its metadata, and its QI rows as one commit group */
        auto issue = [&](int e, int b) {
            const int nq = min(LSE_Q, pc.wk.z - e);
            if (tid < LSE_Q) {
                RowQuery r = {-1, -1, -1, 0}; /* no query: token -1 masks every key */
                if (tid < nq) r = row_query(a, pl.q_idx[e + tid], pc.lo, pc.blk);
                meta[b].qt[tid] = r.t;
                meta[b].tok[tid] = r.tok;
                meta[b].slot[tid] = r.slot;
                meta[b].tlo[tid] = r.tlo;
            }
            load_tile<T>(qis + b * LSE_Q * L.ldqi, L.ldqi, LSE_Q, L.Dip, a.Di, a.vec_i != 0, [&](int r) -> const T * {
                const int t = r < nq ? pl.q_idx[e + r] : -1;
                return t >= 0 && t < a.Nq ? a.qi + ((int64_t)t * a.Hkv + a.g) * a.Di : nullptr;
            });
            cp_async_commit();
        };
        for (int j0 = pc.lo, st = 0; j0 < pc.hi; j0 += L.KT, st++) {
            const int nk = min(L.KT, pc.hi - j0);
            __syncthreads(); /* the previous tile is done with every buffer */
            load_tile<T>(kis, L.ldki, L.KTp, L.Dip, a.Di, a.vec_i != 0, [&](int r) -> const T * {
                return r < nk ? a.ki + (int64_t)(j0 + r) * a.Di : nullptr;
            });
            issue(pc.wk.y, 0); /* (the key tile joins the first chunk's group) */
            for (int e = pc.wk.y, b = 0; e < pc.wk.z; e += LSE_Q, b ^= 1) {
                const int nq = min(LSE_Q, pc.wk.z - e);
                /* buffer b ^ 1 was last read by the previous chunk, before its second barrier; its metadata is
                 * rewritten by the same threads that read it there */
                if (e + LSE_Q < pc.wk.z) {
                    issue(e + LSE_Q, b ^ 1);
                    cp_async_wait_pending<1>();
                } else {
                    cp_async_wait_committed();
                }
                __syncthreads(); /* chunk e's rows, the key tile and the metadata are in */
                const LseMeta &m = meta[b];
                float z[NT][4];
                student_scores<NT>(z, qis + (b * LSE_Q + qw) * L.ldqi, L.ldqi, kis + kw * L.ldki, L.ldki, L.Dip);
#pragma unroll
                for (int h = 0; h < 2; h++) { /* this lane's rows: queries qw + gid and qw + gid + 8 */
                    const int q = qw + gid + 8 * h, t = m.tok[q], tlo = m.tlo[q];
                    float z2[2 * NT], mx = -INFINITY;
#pragma unroll
                    for (int n = 0; n < NT; n++)
#pragma unroll
                        for (int c = 0; c < 2; c++) {
                            const int jj = kw + 8 * n + 2 * tig + c, j = j0 + jj;
                            z2[2 * n + c] = jj < nk && j <= t && j >= tlo ? z[n][2 * h + c] * a.isl2 : -INFINITY;
                            mx = fmaxf(mx, z2[2 * n + c]);
                        }
                    mx = quad_max(mx);
                    float sum = 0.0f;
                    if (mx != -INFINITY) {
#pragma unroll
                        for (int i = 0; i < 2 * NT; i++) sum += exp2_ftz(z2[i] - mx); /* exp2(-inf) = 0 */
                    }
                    sum = quad_sum(sum);
                    if (tig == 0) red[half * LSE_Q + q] = make_float2(mx, sum);
                }
                __syncthreads(); /* both halves' statistics are in */
                if (tid < nq && m.slot[tid] >= 0) {
                    const float2 x0 = red[tid], x1 = red[LSE_Q + tid];
                    const float4 ts = merge_stats(make_float4(x0.x, x0.y, 0.0f, 0.0f), make_float4(x1.x, x1.y, 0.0f, 0.0f));
                    float4 *dst = (float4 *)a.part + ((int64_t)(m.qt[tid] - a.w0) * a.K + m.slot[tid]);
                    *dst = st == 0 ? ts : merge_stats(*dst, ts);
                }
            }
            cp_async_wait_committed(); /* (nothing in flight unless the piece was empty) */
        }
    }
}

/* Dense, query-outer: a chunk of QTq consecutive queries of group blockIdx.y against the key tiles of
 * their causal prefix. Forward: idx_lse and KL per query; backward: dqi. */
template <typename T, int MODE>
__global__ void __launch_bounds__(THREADS, 1) kl_dense_q_kernel(const __grid_constant__ KA<T> a) {
    extern __shared__ __align__(128) unsigned char kl_smem[];
    const Lay &L = a.L;
    const Sm<T> s = carve<T>(kl_smem, L);
    const int tid = threadIdx.x, g = blockIdx.y, t0 = blockIdx.x * L.QTq, nq = min(L.QTq, a.Nq - t0);
    typename Ops<T>::Acc acc;
    double unused_kl = 0.0; /* (the dense passes' KL is FWD_DENSE's, per query) */
    if constexpr (MODE == BWD_DENSE_DQ) acc.zero();
    if (tid < L.QTq) {
        const int t = tid < nq ? t0 + tid : -1, tok = t >= 0 ? msa_row_token(a.q_token, t, a.N) : -1;
        s.qt[tid] = t;
        s.qtok[tid] = tok;
        s.qslot[tid] = 0;
        s.qlo[tid] = t >= 0 ? a.dstart[tok] : 0;
        s.li2[tid] = (MODE == BWD_DENSE_DQ && t >= 0) ? a.idx_lse[(int64_t)g * a.Nq + t] * LOG2E : 0.0f;
        s.stat[tid] = make_float4(-INFINITY, 0.0f, 0.0f, 0.0f);
    }
    __syncthreads();
    /* keys [document start of the first query's token, last query's token]: with a query_index the rows' tokens
     * may skip (another rank's tokens), which the masks leave out */
    const int kend = s.qtok[nq - 1] + 1;
    for (int j0 = s.qlo[0]; j0 < kend; j0 += L.KT) {
        const int nk = min(L.KT, kend - j0);
        __syncthreads();
        load_keys(a, s, g, j0, nk, true);
        chunk_step<T, MODE>(a, s, acc, g, j0, nk, nq, 0, unused_kl);
    }
    __syncthreads();
    if constexpr (MODE == FWD_DENSE) {
        if (tid < nq) {
            const float4 r = s.stat[tid]; /* every query sees itself: s >= 1 */
            const int t = t0 + tid;
            const float ls = log2f(r.y);
            a.idx_lse_out[(int64_t)g * a.Nq + t] = (r.x + ls) * LN2;
            a.vals[(int64_t)t * a.Hkv + g] = fmaf(ls, r.w, r.z) * LN2; /* ab + (l2 - m) c */
        }
    } else {
        const float cs = a.cs_grad ? a.cs * *a.cs_grad : a.cs;
        acc.store(s.O, L.ldo, L.QTp, L.Dip);
        __syncthreads();
        for (int i = tid; i < nq * a.Di; i += THREADS) {
            const int qq = i / a.Di, d = i - qq * a.Di;
            T *o = a.dqi + ((int64_t)(t0 + qq) * a.Hkv + g) * a.Di + d;
            *o = from_f32<T>(to_f32(*o) + cs * s.O[qq * L.ldo + d]);
        }
    }
}

/* Dense, key-outer: dki of a tile of KT keys, over every group and the later queries of their
 * documents (the tile owns its keys: direct accumulation). */
template <typename T>
__global__ void __launch_bounds__(THREADS, 1) kl_dense_dk_kernel(const __grid_constant__ KA<T> a) {
    extern __shared__ __align__(128) unsigned char kl_smem[];
    const Lay &L = a.L;
    const Sm<T> s = carve<T>(kl_smem, L);
    const int tid = threadIdx.x, j0 = blockIdx.x * L.KT, nk = min(L.KT, a.N - j0);
    /* the query rows whose tokens see a key of the tile: tokens [j0, one past the last key's document) */
    int qbeg = j0, qend = a.dend[j0 + nk - 1];
    if (a.q_token) {
        qbeg = lower_bound(a.q_token, a.Nq, j0);
        qend = lower_bound(a.q_token, a.Nq, qend);
    }
    typename Ops<T>::Acc acc;
    double unused_kl = 0.0;
    acc.zero();
    for (int g = 0; g < a.Hkv; g++) {
        for (int tq = qbeg; tq < qend; tq += L.QTq) {
            const int nq = min(L.QTq, qend - tq);
            __syncthreads();
            if (tq == qbeg) load_keys(a, s, g, j0, nk, g == 0);
            if (tid < L.QTq) {
                const int t = tid < nq ? tq + tid : -1, tok = t >= 0 ? msa_row_token(a.q_token, t, a.N) : -1;
                s.qt[tid] = t;
                s.qtok[tid] = tok;
                s.qslot[tid] = 0;
                s.qlo[tid] = t >= 0 ? a.dstart[tok] : 0;
                s.li2[tid] = t >= 0 ? a.idx_lse[(int64_t)g * a.Nq + t] * LOG2E : 0.0f;
            }
            __syncthreads();
            chunk_step<T, BWD_DENSE_DK>(a, s, acc, g, j0, nk, nq, 0, unused_kl);
        }
    }
    __syncthreads();
    const float cs = a.cs_grad ? a.cs * *a.cs_grad : a.cs;
    acc.store(s.O, L.ldo, L.KTp, L.Dip);
    __syncthreads();
    for (int i = tid; i < nk * a.Di; i += THREADS) {
        const int jj = i / a.Di, d = i - jj * a.Di;
        T *o = a.dki + (int64_t)(j0 + jj) * a.Di + d;
        *o = from_f32<T>(to_f32(*o) + cs * s.O[jj * L.ldo + d]);
    }
}

/* Per-token document bounds [dstart, dend) from cu_seqlens (validated into the error word; bounds kept
 * in range whatever it holds). */
__global__ void kl_doc_bounds_kernel(int *dstart, int *dend, const int32_t *cu, int ndocs, int N, int *err) {
    const int64_t n = N > ndocs + 1 ? N : ndocs + 1;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if (i <= ndocs) {
            const bool bad = (i == 0 && cu[0] != 0) || (i == ndocs && cu[ndocs] != N) || (i > 0 && cu[i] < cu[i - 1]);
            if (bad) report_error(err, ERR_CU_SEQLENS, (int)i, cu[i]);
        }
        if (i < N) {
            const int d = msa_doc_of(cu, ndocs, i);
            dstart[i] = min(max(cu[d], 0), (int)i);
            dend[i] = max(min(cu[d + 1], N), (int)i + 1);
        }
    }
}

/* ---- the sparse work list: pieces of the rows' query lists, per (group, window) ---- */

/* per (g, w, r): the row's queries in window w are q_idx[elo .. elo + ecnt) (two binary searches in
 * its ascending list), npc = its pieces */
__global__ void kl_count_kernel(int *elo, int *ecnt, int *npc, const int *plan, int64_t Pw, int N, int Nq, int K, int W,
                                int Rb, int Nw, int64_t total) {
    const int NK = Nq * K;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int r = (int)(i % Rb);
        const int64_t gw = i / Rb;
        const int w = (int)(gw % W), g = (int)(gw / W);
        const int *row_ptr = plan + g * Pw, *q_idx = row_ptr + N + 1;
        const int b = min(max(row_ptr[r], 0), NK), e = min(max(row_ptr[r + 1], b), NK);
        const int w0 = w * Nw, w1 = min(Nq, w0 + Nw);
        const int lo = b + lower_bound(q_idx + b, e - b, w0), hi = lo + lower_bound(q_idx + lo, e - lo, w1);
        elo[i] = lo;
        ecnt[i] = hi - lo;
        npc[i] = (hi - lo + QSEG - 1) / QSEG;
    }
}

/* one block of 1024 threads per (g, w): exclusive prefix sums over the rows of the pieces (woff) and
 * of the pieces of split rows (soff: their partial slots), totals into wtot */
__global__ void __launch_bounds__(1024) kl_scan_kernel(int *woff, int *soff, int *wtot, const int *npc, int Rb) {
    __shared__ int2 wsum[32];
    const int64_t base = (int64_t)blockIdx.x * Rb;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int per = (Rb + 1023) / 1024, beg = min(Rb, tid * per), end = min(Rb, beg + per);
    int na = 0, ns = 0;
    for (int i = beg; i < end; i++) {
        const int n = npc[base + i];
        na += n;
        ns += n > 1 ? n : 0;
    }
    int ia = na, is = ns; /* inclusive scan over the warp */
    for (int o = 1; o < 32; o <<= 1) {
        const int xa = __shfl_up_sync(0xffffffffu, ia, o), xs = __shfl_up_sync(0xffffffffu, is, o);
        if (lane >= o) {
            ia += xa;
            is += xs;
        }
    }
    if (lane == 31) wsum[warp] = make_int2(ia, is);
    __syncthreads();
    if (warp == 0) {
        const int2 v = wsum[lane];
        int va = v.x, vs = v.y;
        for (int o = 1; o < 32; o <<= 1) {
            const int xa = __shfl_up_sync(0xffffffffu, va, o), xs = __shfl_up_sync(0xffffffffu, vs, o);
            if (lane >= o) {
                va += xa;
                vs += xs;
            }
        }
        __syncwarp();
        wsum[lane] = make_int2(va - v.x, vs - v.y); /* exclusive offsets of the warps */
    }
    __syncthreads();
    int ra = wsum[warp].x + ia - na, rs = wsum[warp].y + is - ns;
    for (int i = beg; i < end; i++) {
        const int n = npc[base + i];
        woff[base + i] = ra;
        soff[base + i] = rs;
        ra += n;
        rs += n > 1 ? n : 0;
    }
    if (tid == 1023) wtot[blockIdx.x] = ra;
}

__global__ void kl_fill_kernel(int4 *items, const int *elo, const int *ecnt, const int *npc, const int *woff, const int *soff,
                               int Rb, int64_t cap, int64_t total) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t gw = i / Rb;
        const int r = (int)(i % Rb), n = ecnt[i], np = npc[i], lo = elo[i];
        for (int pc = 0; pc < np; pc++) {
            const int64_t idx = (int64_t)woff[i] + pc;
            if (idx >= cap) break;
            items[gw * cap + idx] = make_int4(r, lo + pc * QSEG, lo + min(n, (pc + 1) * QSEG), np > 1 ? soff[i] + pc : -1);
        }
    }
}

/* ---- combines ---- */

/* forward, per query of the window: the slots' statistics in slot order -> idx_lse, KL */
__global__ void kl_fwd_reduce_kernel(float *idx_lse, float *vals, const float4 *part, const int *topk, int g, int w0, int nt,
                                     int Nq, int Hkv, int K) {
    for (int tl = blockIdx.x * blockDim.x + threadIdx.x; tl < nt; tl += gridDim.x * blockDim.x) {
        const int t = w0 + tl;
        const int *tk = topk + ((int64_t)g * Nq + t) * K;
        const float4 *pp = part + (int64_t)tl * K;
        float m = -INFINITY;
        for (int sl = 0; sl < K; sl++)
            if (tk[sl] >= 0) m = fmaxf(m, pp[sl].x);
        float l = -INFINITY, kl = 0.0f;
        if (m != -INFINITY) {
            float sum = 0.0f;
            for (int sl = 0; sl < K; sl++)
                if (tk[sl] >= 0) sum += pp[sl].y * exp2f(pp[sl].x - m);
            const float ls = log2f(sum);
            for (int sl = 0; sl < K; sl++)
                if (tk[sl] >= 0) {
                    const float4 v = pp[sl];
                    kl += v.z + ((m - v.x) + ls) * v.w; /* ab_s + (l2 - m_s) c_s */
                }
            l = (m + ls) * LN2;
        }
        idx_lse[(int64_t)g * Nq + t] = l;
        if (vals) vals[(int64_t)t * Hkv + g] = kl * LN2;
    }
}

/* backward, per (query of the window, dim): dqi += cs * (the slots' partials in slot order) */
template <typename T>
__global__ void kl_dqi_reduce_kernel(T *dqi, const float *part, const int *topk, int g, int w0, int nt, int Nq, int Hkv, int K,
                                     int Di, float cs_mul, const float *cs_grad) {
    const float cs = cs_grad ? cs_mul * *cs_grad : cs_mul;
    const int64_t total = (int64_t)nt * Di;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int tl = (int)(i / Di), d = (int)(i - (int64_t)tl * Di), t = w0 + tl;
        const int *tk = topk + ((int64_t)g * Nq + t) * K;
        const float *pp = part + (int64_t)tl * K * Di + d;
        float sum = 0.0f;
        for (int sl = 0; sl < K; sl++)
            if (tk[sl] >= 0) sum += pp[(int64_t)sl * Di];
        T *o = dqi + ((int64_t)t * Hkv + g) * Di + d;
        *o = from_f32<T>(to_f32(*o) + cs * sum);
    }
}

/* backward, a block per row of (g, w) split into several pieces: their dki partials in piece order */
__global__ void kl_split_reduce_kernel(float *dki_acc, const float *split, const int *npc, const int *soff, const int *plan,
                                       int64_t Pw, int g, int64_t gw, int Rb, int N, int Nq, int K, int Di, int rowp,
                                       int64_t split_cap) {
    const int r = blockIdx.x;
    const int64_t idx = gw * Rb + r;
    const int np = npc[idx], off = soff[idx];
    if (np <= 1 || off + (int64_t)np > split_cap) return;
    const int *row_lo = plan + g * Pw + (N + 1) + (int64_t)Nq * K, *row_hi = row_lo + N;
    const int lo = row_lo[r], hi = min(row_hi[r], N);
    if (lo < 0 || hi - lo > rowp) return;
    for (int64_t i = threadIdx.x; i < (int64_t)(hi - lo) * Di; i += blockDim.x) {
        const int jr = (int)(i / Di), d = (int)(i - (int64_t)jr * Di);
        float sum = 0.0f;
        for (int pc = 0; pc < np; pc++) sum += split[((int64_t)(off + pc) * rowp + jr) * Di + d];
        dki_acc[(int64_t)(lo + jr) * Di + d] += sum;
    }
}

template <typename T> __global__ void kl_dki_final_kernel(T *dki, const float *acc, int64_t n, float cs_mul, const float *cs_grad) {
    const float cs = cs_grad ? cs_mul * *cs_grad : cs_mul;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dki[i] = from_f32<T>(to_f32(dki[i]) + cs * acc[i]);
}

/* the mean of vals[0 .. n) in fp64, one block, a fixed order */
__global__ void __launch_bounds__(1024) kl_sum_kernel(float *out, const float *vals, int64_t n) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += (double)vals[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = n > 0 ? (float)(acc / (double)n) : 0.0f;
}

/* ------------------------------------------------------------------------------------------------
 * Host side
 * ---------------------------------------------------------------------------------------------- */

/* N tokens (k, ki), Nq query rows (q, qi, lse, topk; N without a query_index) whose tokens are q_token */
struct Dims {
    int N, Hq, Hkv, G, D, Di, K, B, ndocs;
    int Nq;
    const int32_t *q_token;
};

Dims check_args(const char *what, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi, const Tensor *ki,
                const Tensor *topk, const Tensor *plan, const Tensor *cu, const MsaParams *p) {
    const int64_t ndocs = msa_check_params(what, p, cu);
    if (!q || !k || !lse || !qi || !ki) fatal("cuda %s: q, k, lse, qi and ki are required", what);
    if (q->ndim != 3 || k->ndim != 3)
        fatal("cuda %s: q must be [N, Hq, D] and k [N, Hkv, D] (got %d and %d dims)", what, q->ndim, k->ndim);
    /* q, qi, lse, topk: Nq query rows; k: N tokens (or, with key_rows, the fetched rows); ki: N */
    const int64_t Nq = q->shape[0], N = msa_token_count(k, p), Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1];
    const int32_t *q_token = msa_query_tokens(what, p, Nq, N);
    if ((!p->key_rows && k->shape[0] != N) || k->shape[2] != D)
        fatal("cuda %s: k must be [N = %lld, Hkv, D = %lld], got [%lld, %lld, %lld]", what, (long long)N, (long long)D,
              (long long)k->shape[0], (long long)Hkv, (long long)k->shape[2]);
    if (Hkv <= 0 || Hq % Hkv != 0)
        fatal("cuda %s: %lld query heads are not a multiple of %lld KV heads", what, (long long)Hq, (long long)Hkv);
    if (D < 1 || D > CUDA_HEAD_DIM_MAX)
        fatal("cuda %s: head dim D = %lld not supported (1 .. %d, kernels/cuda/limits.h CUDA_HEAD_DIM_MAX)", what,
              (long long)D, CUDA_HEAD_DIM_MAX);
    if (qi->ndim != 3 || qi->shape[0] != Nq || qi->shape[1] != Hkv)
        fatal("cuda %s: qi must be [Nq = %lld, Hidx = Hkv = %lld, Di] (one index head per GQA group)", what, (long long)Nq,
              (long long)Hkv);
    const int64_t Di = qi->shape[2];
    if (Di < 1 || Di > CUDA_HEAD_DIM_MAX) /* the tiles take Di as they take D */
        fatal("cuda %s: index head dim Di = %lld not supported (1 .. %d, kernels/cuda/limits.h CUDA_HEAD_DIM_MAX)", what,
              (long long)Di, CUDA_HEAD_DIM_MAX);
    if (ki->ndim != 2 || ki->shape[0] != N || ki->shape[1] != Di)
        fatal("cuda %s: ki must be [N = %lld, Di = %lld] (one key shared by all index heads)", what, (long long)N,
              (long long)Di);
    if (q->dtype != DT_F32 && q->dtype != DT_BF16) fatal("cuda %s: dtype %s not supported (f32 or bf16)", what, dtype_name(q->dtype));
    if (k->dtype != q->dtype || qi->dtype != q->dtype || ki->dtype != q->dtype)
        fatal("cuda %s: q, k, qi and ki must share one dtype (got %s, %s, %s, %s)", what, dtype_name(q->dtype),
              dtype_name(k->dtype), dtype_name(qi->dtype), dtype_name(ki->dtype));
    if (lse->dtype != DT_F32 || lse->numel != Hq * Nq)
        fatal("cuda %s: lse must be f32 [Hq, Nq] = [%lld, %lld] (got %s with %lld elements)", what, (long long)Hq,
              (long long)Nq, dtype_name(lse->dtype), (long long)lse->numel);
    if (topk && (topk->dtype != DT_I32 || topk->ndim != 3 || topk->shape[0] != Hkv || topk->shape[1] != Nq ||
                 topk->shape[2] != p->topk_blocks))
        fatal("cuda %s: topk must be i32 [Hidx = %lld, Nq = %lld, topk_blocks = %d]", what, (long long)Hkv, (long long)Nq,
              p->topk_blocks);
    if (plan && !topk) fatal("cuda %s: a plan is given without topk (the dense KL has no plan)", what);
    if (plan && q_token)
        fatal("cuda %s: a plan with a query_index (the plan's rows are the tokens; the kernels build their own)", what);
    if (plan && (plan->dtype != DT_I32 || plan->numel != Hkv * msa_plan_width(N, p->topk_blocks)))
        fatal("cuda %s: plan must be i32 [Hidx, msa_plan_width(N, k)] = [%lld, %lld]", what, (long long)Hkv,
              (long long)msa_plan_width(N, p->topk_blocks));
    const Tensor *all[] = {q, k, lse, qi, ki, topk, plan, cu};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i] && all[i]->device != DEV_CUDA) fatal("cuda %s: every tensor must be on the CUDA device", what);
    if (N >= INT32_MAX / 2 || Hkv > CUDA_HEADS_MAX) fatal("cuda %s: too many tokens or heads", what);
    if (topk && Nq * p->topk_blocks >= INT32_MAX)
        fatal("cuda %s: Nq * topk_blocks = %lld does not fit the i32 plan", what, (long long)(Nq * p->topk_blocks));
    return Dims{(int)N,      (int)Hq,       (int)Hkv,       (int)(Hq / Hkv), (int)D,
                (int)Di,     p->topk_blocks, p->block_size, (int)ndocs,      (int)Nq, q_token};
}

Lay layout_for(const char *what, bool bf, const Dims &d, bool sparse) {
    Lay L = make_lay(bf, d.B, d.D, d.Di, d.G, sparse, 2);
    if (L.bytes > max_smem_optin()) L = make_lay(bf, d.B, d.D, d.Di, d.G, sparse, 1); /* one Q buffer */
    /* the accumulators' capacity (AccB: 64 fragments, AccF: 32 floats per thread) */
    const int most = bf ? 64 * 256 : 32 * 256, rows = L.KTp > L.QTp ? L.KTp : L.QTp;
    if (rows * L.Dip > most) fatal("cuda %s: internal tile error (%d x %d accumulator)", what, rows, L.Dip);
    if (L.bytes > max_smem_optin())
        fatal("cuda %s: D = %d, Di = %d, G = %d need %d bytes of shared memory per block, the device allows %d", what, d.D,
              d.Di, d.G, L.bytes, max_smem_optin());
    return L;
}

template <typename T>
KA<T> make_args(const Dims &d, const MsaParams *p, const Lay &L, const Tensor *q, const Tensor *k, const Tensor *lse,
                const Tensor *qi, const Tensor *ki, const Tensor *topk) {
    KA<T> a;
    memset(&a, 0, sizeof a);
    a.q = (const T *)q->data;
    a.k = (const T *)k->data;
    a.qi = (const T *)qi->data;
    a.ki = (const T *)ki->data;
    a.lse = (const float *)lse->data;
    a.topk = topk ? (const int *)topk->data : nullptr;
    a.Pw = msa_plan_width_rows(d.N, d.Nq, d.K);
    a.N = d.N;
    a.Nq = d.Nq;
    a.q_token = d.q_token;
    a.Hq = d.Hq;
    a.Hkv = d.Hkv;
    a.G = d.G;
    a.D = d.D;
    a.Di = d.Di;
    a.K = d.K;
    a.B = d.B;
    a.sl2 = p->scale * LOG2E;
    a.isl2 = p->index_scale * LOG2E;
    a.invG = 1.0f / (float)d.G;
    a.lg2G = log2f((float)d.G);
    auto al16 = [](const void *x) { return ((uintptr_t)x & 15) == 0; };
    a.vec_q = (d.D * sizeof(T)) % 16 == 0 && al16(q->data) && al16(k->data);
    a.vec_i = (d.Di * sizeof(T)) % 16 == 0 && al16(qi->data) && al16(ki->data);
    a.L = L;
    return a;
}

/* Launches a tile kernel with its dynamic shared memory (raising the kernel's limit once). */
template <typename Kern, typename A> void launch_tiles(const char *name, Kern kernel, int &raised, dim3 grid, const A &a) {
    const int smem = a.L.bytes;
    if (smem > 48 * 1024 && smem > raised) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        raised = smem;
    }
    kernel<<<grid, THREADS, smem, stream()>>>(a);
    LAUNCH_CHECK(name);
}

/* Bump allocation inside one scratch region: a first pass with base = nullptr sizes it. */
struct Bump {
    char *base;
    size_t off;
    template <typename X> X *take(int64_t n) {
        X *p = base ? (X *)(base + off) : nullptr;
        off += align256((size_t)(n > 0 ? n : 1) * sizeof(X));
        return p;
    }
};

/* The plan: the caller's, or a temporary one built here (cuda_msa_plan keeps out of scratch()). */
struct PlanHold {
    const int *ptr = nullptr;
    PlanHold(const Tensor *topk, const Tensor *plan, const Tensor *cu, const MsaParams *p, const Dims &d) {
        if (!topk) return;
        if (plan) {
            ptr = (const int *)plan->data;
            return;
        }
        ptr = (const int *)msa_temporary_plan(topk, cu, p, d.N);
    }
};

/* Query windows of the sparse path and their work lists. */
struct Sched {
    int Nw, W, Rb;
    int64_t cap, split_cap, total;
    int *elo, *ecnt, *npc, *woff, *soff, *wtot;
    int4 *items;

    /* unit_bytes: partials per window token */
    Sched(const Dims &d, int64_t unit_bytes) {
        int64_t nw = unit_bytes > 0 ? (int64_t)(WINDOW_BUDGET / (size_t)unit_bytes) : d.Nq;
        const char *env = getenv("MSA_CUDA_KL_WINDOW"); /* tests: force several windows */
        if (env && env[0] && atoll(env) > 0) nw = atoll(env);
        Nw = (int)(nw < 1 ? 1 : nw < d.Nq ? nw : d.Nq);
        W = (d.Nq + Nw - 1) / Nw;
        const int64_t rb = ((int64_t)d.N + d.B - 1) / d.B + d.ndocs;
        Rb = (int)(rb < d.N ? rb : d.N);
        const int64_t nk = (int64_t)Nw * d.K, bound = (nk + QSEG - 1) / QSEG + Rb;
        cap = nk < bound ? nk : bound; /* pieces of one (group, window) */
        split_cap = 2 * nk / QSEG + 1; /* pieces of its split rows (n > QSEG queries: < 2n/QSEG pieces) */
        total = (int64_t)d.Hkv * W * Rb;
        elo = ecnt = npc = woff = soff = wtot = nullptr;
        items = nullptr;
    }
    void carve(Bump &b, int Hkv) {
        elo = b.take<int>(total);
        ecnt = b.take<int>(total);
        npc = b.take<int>(total);
        woff = b.take<int>(total);
        soff = b.take<int>(total);
        wtot = b.take<int>((int64_t)Hkv * W);
        items = b.take<int4>((int64_t)Hkv * W * cap);
    }
    void build(const int *plan, const Dims &d) const {
        kl_count_kernel<<<grid_for(total, 256), 256, 0, stream()>>>(elo, ecnt, npc, plan, msa_plan_width_rows(d.N, d.Nq, d.K), d.N,
                                                       d.Nq, d.K, W, Rb, Nw, total);
        LAUNCH_CHECK("msa_kl count");
        kl_scan_kernel<<<d.Hkv * W, 1024, 0, stream()>>>(woff, soff, wtot, npc, Rb);
        LAUNCH_CHECK("msa_kl scan");
        kl_fill_kernel<<<grid_for(total, 256), 256, 0, stream()>>>(items, elo, ecnt, npc, woff, soff, Rb, cap, total);
        LAUNCH_CHECK("msa_kl fill");
    }
    /* point a at the work list of (g, w) */
    template <typename T> void select(KA<T> &a, int g, int w) const {
        a.g = g;
        a.w0 = w * Nw;
        a.work = items + ((int64_t)g * W + w) * cap;
        a.work_n = wtot + (int64_t)g * W + w;
        a.work_cap = (int)cap;
    }
    int window_len(int N, int w) const { return (w + 1) * Nw < N ? Nw : N - w * Nw; }
};

/* The forward-direction sparse passes (the KL value with idx_lse, or idx_lse alone): per window and
 * group the rows kernel in MODE over that work list, then the per-token reduction of its partials into
 * idx_lse and, when vals is not NULL, the per-token KL values. */
template <typename T>
void sparse_row_passes(void (*rows)(KA<T>), int &raised, KA<T> &a, const Sched &sc, const Dims &d, float *vals,
                       const char *rows_name, const char *reduce_name) {
    for (int w = 0; w < sc.W; w++)
        for (int g = 0; g < d.Hkv; g++) {
            sc.select(a, g, w);
            launch_tiles(rows_name, rows, raised, dim3((unsigned)sc.cap), a);
            const int nt = sc.window_len(d.Nq, w);
            kl_fwd_reduce_kernel<<<grid_for(nt, 256), 256, 0, stream()>>>(a.idx_lse_out, vals, (const float4 *)a.part, a.topk, g, a.w0,
                                                            nt, d.Nq, d.Hkv, d.K);
            LAUNCH_CHECK(reduce_name);
        }
}

void doc_bounds(int *dstart, int *dend, const Tensor *cu, const Dims &d) {
    kl_doc_bounds_kernel<<<grid_for((int64_t)d.N + d.ndocs + 1, 256), 256, 0, stream()>>>(dstart, dend, (const int32_t *)cu->data, d.ndocs,
                                                                            d.N, errbuf());
    LAUNCH_CHECK("msa_kl doc_bounds");
}

/* kl (the mean KL) and idx_lse (NULL: into a temporary: the value alone) */
template <typename T>
void kl_forward(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi,
                const Tensor *ki, const Tensor *topk, const Tensor *plan, const Tensor *cu, const MsaParams *p, const Dims &d) {
    const bool bf = std::is_same<T, bf16>::value;
    PlanHold ph(topk, plan, cu, p, d); /* before scratch(): nothing may take scratch after us */
    const Tensor kt = msa_keys_by_token("msa_kl_forward", k, p, 0);
    const Lay L = layout_for("msa_kl_forward", bf, d, topk != nullptr);
    KA<T> a = make_args<T>(d, p, L, q, &kt, lse, qi, ki, topk);
    a.plan = ph.ptr;
    Sched sc(d, (int64_t)d.K * (int64_t)sizeof(float4));
    int *dstart = nullptr, *dend = nullptr;
    float *vals = nullptr, *il = nullptr;
    size_t need = 0;
    for (int pass = 0; pass < 2; pass++) { /* size, then carve */
        Bump b{pass ? (char *)scratch(need) : nullptr, 0};
        dstart = b.take<int>(d.N);
        dend = b.take<int>(d.N);
        vals = b.take<float>((int64_t)d.Nq * d.Hkv);
        if (!idx_lse) il = b.take<float>((int64_t)d.Nq * d.Hkv);
        if (topk) {
            sc.carve(b, d.Hkv);
            a.part = b.take<float>((int64_t)sc.Nw * d.K * 4);
        }
        need = b.off;
    }
    a.idx_lse_out = idx_lse ? (float *)idx_lse->data : il;
    a.dstart = dstart;
    a.dend = dend;
    a.vals = vals;
    doc_bounds(dstart, dend, cu, d);
    if (!topk) {
        static int raised = 0;
        launch_tiles("msa_kl_forward dense", kl_dense_q_kernel<T, FWD_DENSE>, raised,
                     dim3((unsigned)((d.Nq + L.QTq - 1) / L.QTq), (unsigned)d.Hkv), a);
    } else {
        sc.build(ph.ptr, d);
        static int raised = 0;
        sparse_row_passes<T>(kl_rows_kernel<T, FWD_SPARSE>, raised, a, sc, d, vals, "msa_kl_forward rows",
                             "msa_kl_forward reduce");
    }
    kl_sum_kernel<<<1, 1024, 0, stream()>>>((float *)kl->data, vals, (int64_t)d.Nq * d.Hkv);
    LAUNCH_CHECK("msa_kl_forward sum");
}

/* the student's normaliser alone over the selection (kl_lse_kernel): the indexer's idx_lse */
template <typename T>
void kl_selected_lse(Tensor *idx_lse, const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                     const Tensor *cu, const MsaParams *p, const Dims &d) {
    const bool bf = std::is_same<T, bf16>::value;
    PlanHold ph(topk, plan, cu, p, d);
    const Lay L = lse_lay(bf, d.B, d.Di);
    if (L.bytes > max_smem_optin())
        fatal("cuda msa_indexer: Di = %d needs %d bytes of shared memory per block for idx_lse, the device allows %d", d.Di,
              L.bytes, max_smem_optin());
    KA<T> a;
    memset(&a, 0, sizeof a);
    a.qi = (const T *)qi->data;
    a.ki = (const T *)ki->data;
    a.topk = (const int *)topk->data;
    a.plan = ph.ptr;
    a.Pw = msa_plan_width_rows(d.N, d.Nq, d.K);
    a.N = d.N;
    a.Nq = d.Nq;
    a.q_token = d.q_token;
    a.Hq = a.Hkv = d.Hkv;
    a.G = 1;
    a.Di = d.Di;
    a.K = d.K;
    a.B = d.B;
    a.isl2 = p->index_scale * LOG2E;
    a.vec_i = (d.Di * sizeof(T)) % 16 == 0 && ((uintptr_t)qi->data & 15) == 0 && ((uintptr_t)ki->data & 15) == 0;
    a.L = L;
    a.idx_lse_out = (float *)idx_lse->data;
    Sched sc(d, (int64_t)d.K * (int64_t)sizeof(float4));
    int *dstart = nullptr, *dend = nullptr;
    size_t need = 0;
    for (int pass = 0; pass < 2; pass++) { /* size, then carve */
        Bump b{pass ? (char *)scratch(need) : nullptr, 0};
        dstart = b.take<int>(d.N);
        dend = b.take<int>(d.N);
        sc.carve(b, d.Hkv);
        a.part = b.take<float>((int64_t)sc.Nw * d.K * 4);
        need = b.off;
    }
    a.dstart = dstart;
    a.dend = dend;
    doc_bounds(dstart, dend, cu, d);
    sc.build(ph.ptr, d);
    static int raised[3] = {0, 0, 0}; /* per key-tile width: 32, 64, 128 */
    const int w = L.KTp == 32 ? 0 : L.KTp == 64 ? 1 : 2;
    void (*rows)(KA<T>) = w == 0 ? kl_lse_kernel<T, 2> : w == 1 ? kl_lse_kernel<T, 4> : kl_lse_kernel<T, 8>;
    sparse_row_passes<T>(rows, raised[w], a, sc, d, nullptr, "msa_indexer idx_lse rows", "msa_indexer idx_lse reduce");
}

/* dqi, dki += cs_mul * cs_grad[0] * dKL/dz chained to qi, ki (cs_grad NULL: cs_mul), cs_mul including the
 * index scale */
template <typename T>
void kl_backward(Tensor *dqi, Tensor *dki, Tensor *kl, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi,
                 const Tensor *ki, const Tensor *idx_lse, const Tensor *topk, const Tensor *plan, const Tensor *cu,
                 const MsaParams *p, float cs_mul, const float *cs_grad, const Dims &d) {
    if (kl && !topk) fatal("cuda msa_kl_backward: the KL value comes with the sparse backward only (topk given)");
    const bool bf = std::is_same<T, bf16>::value;
    PlanHold ph(topk, plan, cu, p, d);
    const Tensor kt = msa_keys_by_token("msa_kl_backward", k, p, 0);
    const Lay L = layout_for("msa_kl_backward", bf, d, topk != nullptr);
    KA<T> a = make_args<T>(d, p, L, q, &kt, lse, qi, ki, topk);
    a.plan = ph.ptr;
    a.idx_lse = (const float *)idx_lse->data;
    a.dqi = dqi ? (T *)dqi->data : nullptr;
    a.dki = dki ? (T *)dki->data : nullptr;
    a.want_dqi = dqi != nullptr;
    a.want_dki = dki != nullptr;
    a.cs = cs_mul;
    a.cs_grad = cs_grad;
    a.rowp = d.B < d.N ? d.B : d.N; /* rows of a block */
    const int64_t unit = (dqi ? (int64_t)d.K * d.Di * 4 : 0) + (dki ? (2 * (int64_t)d.K * a.rowp * d.Di * 4 + QSEG - 1) / QSEG : 0);
    Sched sc(d, unit);
    int *dstart = nullptr, *dend = nullptr;
    size_t need = 0;
    for (int pass = 0; pass < 2; pass++) { /* size, then carve */
        Bump b{pass ? (char *)scratch(need) : nullptr, 0};
        dstart = b.take<int>(d.N);
        dend = b.take<int>(d.N);
        if (topk) {
            sc.carve(b, d.Hkv);
            if (dqi) a.part = b.take<float>((int64_t)sc.Nw * d.K * d.Di);
            if (dki) {
                a.split = b.take<float>(sc.split_cap * a.rowp * d.Di);
                a.dki_acc = b.take<float>((int64_t)d.N * d.Di);
            }
            if (kl) a.klpart = b.take<double>(sc.cap); /* one per CTA of the rows kernel's grid */
        }
        need = b.off;
    }
    a.dstart = dstart;
    a.dend = dend;
    a.split_cap = (int)(sc.split_cap < INT32_MAX ? sc.split_cap : INT32_MAX);
    doc_bounds(dstart, dend, cu, d);
    if (!topk) {
        if (dqi) {
            static int raised = 0;
            launch_tiles("msa_kl_backward dense dqi", kl_dense_q_kernel<T, BWD_DENSE_DQ>, raised,
                         dim3((unsigned)((d.Nq + L.QTq - 1) / L.QTq), (unsigned)d.Hkv), a);
        }
        if (dki) {
            static int raised = 0;
            launch_tiles("msa_kl_backward dense dki", kl_dense_dk_kernel<T>, raised, dim3((unsigned)((d.N + L.KT - 1) / L.KT)),
                         a);
        }
        return;
    }
    sc.build(ph.ptr, d);
    if (dki) CUDA_CHECK(cudaMemsetAsync(a.dki_acc, 0, (size_t)d.N * d.Di * sizeof(float), stream()));
    if (kl) CUDA_CHECK(cudaMemsetAsync(a.klpart, 0, (size_t)sc.cap * sizeof(double), stream()));
    static int raised = 0;
    for (int w = 0; w < sc.W; w++)
        for (int g = 0; g < d.Hkv; g++) {
            sc.select(a, g, w);
            launch_tiles("msa_kl_backward rows", kl_rows_kernel<T, BWD_SPARSE>, raised, dim3((unsigned)sc.cap), a);
            const int nt = sc.window_len(d.Nq, w);
            if (dqi) {
                kl_dqi_reduce_kernel<T><<<grid_for((int64_t)nt * d.Di, 256), 256, 0, stream()>>>(a.dqi, a.part, a.topk, g, a.w0, nt, d.Nq,
                                                                                  d.Hkv, d.K, d.Di, a.cs, a.cs_grad);
                LAUNCH_CHECK("msa_kl_backward dqi reduce");
            }
            if (dki) {
                kl_split_reduce_kernel<<<sc.Rb, 256, 0, stream()>>>(a.dki_acc, a.split, sc.npc, sc.soff, ph.ptr, a.Pw, g,
                                                       (int64_t)g * sc.W + w, sc.Rb, d.N, d.Nq, d.K, d.Di, a.rowp, sc.split_cap);
                LAUNCH_CHECK("msa_kl_backward dki split reduce");
            }
        }
    if (dki) {
        const int64_t n = (int64_t)d.N * d.Di;
        kl_dki_final_kernel<T><<<grid_for(n, 256), 256, 0, stream()>>>(a.dki, a.dki_acc, n, a.cs, a.cs_grad);
        LAUNCH_CHECK("msa_kl_backward dki");
    }
    if (kl) msa_kl_mean((float *)kl->data, a.klpart, (int)sc.cap, (double)d.Nq * d.Hkv);
}

}  // namespace

extern "C" void cuda_msa_kl_forward(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                                    const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                                    const Tensor *cu_seqlens, const MsaParams *p) {
    init();
    const Dims d = check_args("msa_kl_forward", q, k, lse, qi, ki, topk, plan, cu_seqlens, p);
    if (!kl || kl->numel != 1 || kl->dtype != DT_F32 || kl->device != DEV_CUDA)
        fatal("cuda msa_kl_forward: kl must be an f32 scalar tensor on the device");
    if (!idx_lse || idx_lse->numel != (int64_t)d.Hkv * d.Nq || idx_lse->dtype != DT_F32 || idx_lse->device != DEV_CUDA)
        fatal("cuda msa_kl_forward: idx_lse must be f32 [Hidx, Nq] = [%d, %d] on the device", d.Hkv, d.Nq);
    if (d.Nq == 0) { /* the CPU's mean over no (token, group) pair */
        CUDA_CHECK(cudaMemsetAsync(kl->data, 0, sizeof(float), stream()));
        return;
    }
    DISPATCH_FLOAT(q->dtype, T, "msa_kl_forward",
                   kl_forward<T>(kl, idx_lse, q, k, lse, qi, ki, topk, plan, cu_seqlens, p, d));
}

/* The sparse KL backward's argument checks and launch, for both entries that run it (what: the entry's name
 * in messages); the coefficient is coeff_mul, times *coeff_grad when that device scalar is given. */
static void kl_backward_checked(const char *what, Tensor *dqi, Tensor *dki, Tensor *kl, const Tensor *q, const Tensor *k,
                                const Tensor *lse, const Tensor *qi, const Tensor *ki, const Tensor *idx_lse,
                                const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p,
                                float coeff_mul, const float *coeff_grad) {
    if (!dqi && !dki) return;
    const Dims d = check_args(what, q, k, lse, qi, ki, topk, plan, cu_seqlens, p);
    if (!idx_lse || idx_lse->numel != (int64_t)d.Hkv * d.Nq || idx_lse->dtype != DT_F32 || idx_lse->device != DEV_CUDA)
        fatal("cuda %s: idx_lse must be f32 [Hidx, Nq] = [%d, %d] on the device", what, d.Hkv, d.Nq);
    if ((dqi && (dqi->numel != qi->numel || dqi->dtype != qi->dtype || dqi->device != DEV_CUDA)) ||
        (dki && (dki->numel != ki->numel || dki->dtype != ki->dtype || dki->device != DEV_CUDA)))
        fatal("cuda %s: dqi and dki must have qi's and ki's shapes and dtype, on the device", what);
    if (kl && (kl->numel != 1 || kl->dtype != DT_F32 || kl->device != DEV_CUDA))
        fatal("cuda %s: kl must be an f32 scalar tensor on the device", what);
    if (d.Nq == 0) {
        if (kl) CUDA_CHECK(cudaMemsetAsync(kl->data, 0, sizeof(float), stream()));
        return;
    }
    DISPATCH_FLOAT(q->dtype, T, what,
                   kl_backward<T>(dqi, dki, kl, q, k, lse, qi, ki, idx_lse, topk, plan, cu_seqlens, p,
                                  coeff_mul * p->index_scale, coeff_grad, d));
}

extern "C" void cuda_msa_kl_backward(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse,
                                     const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                                     const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p,
                                     const Tensor *kl_grad, float kl_weight) {
    init();
    if (kl_grad && (kl_grad->numel != 1 || kl_grad->dtype != DT_F32 || kl_grad->device != DEV_CUDA))
        fatal("cuda msa_kl_backward: kl_grad must be an f32 scalar on the device");
    /* kl_weight / (Nq * Hidx) here, times kl_grad[0] on the device, as msa_attention_kl_backward */
    const float mul = (float)((double)kl_weight / ((double)qi->shape[0] * (double)qi->shape[1]));
    kl_backward_checked("msa_kl_backward", dqi, dki, nullptr, q, k, lse, qi, ki, idx_lse, topk, plan, cu_seqlens, p, mul,
                        kl_grad ? (const float *)kl_grad->data : nullptr);
}

namespace msacuda {

void msa_selected_lse(Tensor *idx_lse, const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                      const Tensor *cu_seqlens, const MsaParams *p) {
    const int64_t ndocs = msa_check_params("msa_indexer", p, cu_seqlens);
    const int64_t Nq = qi->shape[0], N = ki->shape[0], H = qi->shape[1], Di = qi->shape[2];
    const int32_t *q_token = msa_query_tokens("msa_indexer", p, Nq, N);
    if (!idx_lse || idx_lse->dtype != DT_F32 || idx_lse->numel != H * Nq || idx_lse->device != DEV_CUDA)
        fatal("cuda msa_indexer: idx_lse must be f32 [Hidx = %lld, Nq = %lld] on the device", (long long)H, (long long)Nq);
    if (Nq == 0) return;
    const Dims d{(int)N, (int)H, (int)H, 1, 0, (int)Di, p->topk_blocks, p->block_size, (int)ndocs, (int)Nq, q_token};
    DISPATCH_FLOAT(qi->dtype, T, "msa_indexer", kl_selected_lse<T>(idx_lse, qi, ki, topk, plan, cu_seqlens, p, d));
}

/* the KL's value alone: the forward pass (FWD_SPARSE), its idx_lse into a temporary */
static void kl_value(Tensor *kl, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi, const Tensor *ki,
                     const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p) {
    const Dims d = check_args("msa_attention_kl_backward", q, k, lse, qi, ki, topk, plan, cu_seqlens, p);
    if (!kl || kl->numel != 1 || kl->dtype != DT_F32 || kl->device != DEV_CUDA)
        fatal("cuda msa_attention_kl_backward: kl must be an f32 scalar tensor on the device");
    if (d.Nq == 0) {
        CUDA_CHECK(cudaMemsetAsync(kl->data, 0, sizeof(float), stream()));
        return;
    }
    DISPATCH_FLOAT(q->dtype, T, "msa_attention_kl_backward",
                   kl_forward<T>(kl, nullptr, q, k, lse, qi, ki, topk, plan, cu_seqlens, p, d));
}

void msa_kl_backward_scaled(Tensor *dqi, Tensor *dki, Tensor *kl, const Tensor *q, const Tensor *k, const Tensor *lse,
                            const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk, const Tensor *plan,
                            const Tensor *cu_seqlens, const MsaParams *p, float coeff_mul, const float *coeff_grad) {
    if (dqi || dki)
        kl_backward_checked("msa_attention_kl_backward", dqi, dki, kl, q, k, lse, qi, ki, idx_lse, topk, plan, cu_seqlens, p,
                            coeff_mul, coeff_grad);
    else if (kl)
        kl_value(kl, q, k, lse, qi, ki, topk, plan, cu_seqlens, p);
}

}  // namespace msacuda
