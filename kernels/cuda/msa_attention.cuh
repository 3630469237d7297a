/* Internals shared by the three files of the CUDA MSA attention: msa_attention.cu (the schedule, the
 * reductions and the entry points), msa_attention_tc.cu (the tensor-core tile kernels) and
 * msa_attention_cc.cu (the CUDA-core tile kernels). The schedule's tile descriptor, the arguments of
 * every tile kernel, and each tile implementation's geometry and launch; the design is described at the
 * top of msa_attention.cu. */
#ifndef MSA_CUDA_MSA_ATTENTION_CUH
#define MSA_CUDA_MSA_ATTENTION_CUH

#include "msa_plan.cuh"

namespace msacuda {

/* One tile: packed rows [piece*M, piece*M + rows) of segment (gr = g*Rb + r, ks). Entry ebase + j of
 * the chunk's entry array is the tile's j-th query; packed row p is query (off0 + p) / G, head
 * (off0 + p) % G. Keys [klo, khi). */
struct __align__(16) TileDesc {
    int gr, ks, ebase, rows, off0, klo, khi, piece;
};
constexpr int TILE_ROWS = 0xffff, TILE_FIRST = 1 << 16, TILE_LAST = 1 << 17; /* in TileDesc.rows */

/* Everything a tile kernel reads; one struct for the four tile kernels (unused fields null). A packed row's
 * meta (int4) is {query row (-1: invalid), head, partial slot, the row's token (-1: invalid)}: the row addresses
 * q, dout, lse, dsum, qi, idx_lse and the partials, the token is the causal limit (key <= token); they are one
 * number without a query_index. msa_row_meta builds it. */
struct TileArgs {
    const void *q, *k, *v, *dout;
    const float *lse, *dsum;          /* backward: [Hq, Nq] */
    const TileDesc *desc;
    const int2 *ent;
    const int *tile_off;              /* total tiles at [n_gr] */
    void *opart;                      /* forward: [Qc][Hq][NS][D] of the partial type */
    float *lpart;                     /* forward: [Qc][Hq][NS] log-sum-exp (natural log) */
    void *dqp;                        /* backward: [Qc][Hq][NS][D] dQ partials of the partial type, NULL without dq */
    float *acck, *accv;               /* backward: fp32 [N, Hkv, D], NULL when not wanted */
    float *cut;                       /* backward: [grid][2][2][KB][D] parts of split segments */
    int n_gr, Rb, N, Hq, Hkv, G, NS, nks, c0;
    int Nq;                           /* query rows: q, dout, lse, dsum, qi, idx_lse and the entries count them */
    const int32_t *q_token;           /* [Nq] the token of each query row (MsaParams.query_index), NULL: the row */
    float scale;
    /* the KL folded into the backward (msa_attention_kl_backward; tensor cores only), unused without */
    const void *qi, *ki;              /* [Nq, Hkv, Di], [N, Di] */
    const float *idx_lse;             /* [Hkv, Nq] */
    float *dqip;                      /* [Qc][Hkv][NS][Di] fp32 dqi partials, NULL without dqi */
    float *accki;                     /* [Hkv][N][Di] fp32: each group's dki, NULL without dki */
    float *cutki;                     /* [grid][2][KB][Di] parts of split segments */
    double *klpart;                   /* [grid]: the KL (log2 units) of each CTA's pairs, NULL without kl */
    int lgG;                          /* log2 G when G is a power of two (always with the KL), else -1 */
    float isl2;                       /* index_scale * log2(e) */
};

/* x / G: a shift when G is a power of two (every shape the tensor-core KL takes), not an integer division */
__device__ __forceinline__ int div_G(const TileArgs &a, int x) { return a.lgG >= 0 ? x >> a.lgG : x / a.G; }

/* The meta of a packed row from its entry e (row, slot) and head: see TileArgs. */
__device__ __forceinline__ int4 msa_row_meta(const TileArgs &a, int2 e, int head, int ks) {
    if (e.y < 0) return make_int4(-1, 0, 0, -1);
    return make_int4(e.x, head, e.y * a.nks + ks, msa_row_token(a.q_token, e.x, a.N));
}

/* the contiguous tile range of this CTA; the fixup kernel uses the same formula */
__device__ __forceinline__ void cta_range(int T, int c, int nc, int &tb, int &te) {
    tb = (int)((int64_t)c * T / nc);
    te = (int)((int64_t)(c + 1) * T / nc);
}

/* A tile kernel's geometry for one call: packed rows (M) and keys (KB) per tile, threads, dynamic
 * shared memory, the persistent grid; nks (key segments per block) and NS (partial slots per query
 * head) follow from the block size and are set by the schedule. */
struct Geo {
    int M, KB, threads, grid, nks, NS;
    size_t smem;
};

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

/* Tensor cores (msa_attention_tc.cu): BF16 with D = 64 or 128; partial outputs (forward O, backward dQ) in
 * bf16. The backward with the KL folded in (Di > 0) takes BF16 qi/ki with Di = 64 or 128 and G a power of
 * two with at most 8 queries per tile (msa_tc_kl_handles); Di = 0: the attention alone. */
bool msa_tc_handles(DType dt, int D);
bool msa_tc_kl_handles(DType dt, int D, int G, int Di);
Geo msa_tc_forward_geo(int D);
void msa_tc_forward_tiles(const Geo &g, const TileArgs &a, int D);
Geo msa_tc_backward_geo(int D, int Di);
void msa_tc_backward_tiles(const Geo &g, const TileArgs &a, int D, int Di);

/* CUDA cores (msa_attention_cc.cu): every other call (F32, and BF16 with other head dims up to 256);
 * partial outputs (forward O, backward dQ) in fp32. */
Geo msa_cc_forward_geo(DType dt, int D);
void msa_cc_forward_tiles(const Geo &g, const TileArgs &a, DType dt, int D);
Geo msa_cc_backward_geo(DType dt, int D);
void msa_cc_backward_tiles(const Geo &g, const TileArgs &a, DType dt, int D);

}  // namespace msacuda

#endif
