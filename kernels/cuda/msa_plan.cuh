/* Internals shared by the CUDA MSA kernels (msa_plan.cu, msa_indexer.cu, msa_recall.cu,
 * msa_attention.cu, msa_kl.cu): the host-side validation of MsaParams (the CPU's msa_ctx_init rules,
 * with the same messages), a temporary plan for the kernels called without one, the KL pieces other
 * files call, and the device-side lookup of a token's document. */
#ifndef MSA_CUDA_MSA_PLAN_CUH
#define MSA_CUDA_MSA_PLAN_CUH

#include "primitives.cuh"

namespace msacuda {

/* Abort with "cuda <kernel>: ..." unless block_size >= 1, topk_blocks >= 1, init_blocks >= 0,
 * local_blocks >= 1 and init_blocks + local_blocks <= topk_blocks (forced blocks stay inside the
 * budget), and cu_seqlens is i32 [ndocs+1] with ndocs >= 1. Returns ndocs. */
int64_t msa_check_params(const char *kernel, const MsaParams *p, const Tensor *cu_seqlens);

/* Sequence-split context parallelism (backend.h MsaParams): the query rows are Nq of the N tokens, row r being
 * token q_token[r] (query_index), and k/v may hold only the fetched tokens (key_rows). msa_query_tokens checks
 * the shapes on the host (query_index i32 [Nq] on the device, key_rows i32 [N] and only with a query_index;
 * without a query_index Nq must be N) and returns query_index's data, NULL without one. The values are never
 * read on the host (no wait in the step): the plan builder and msa_keys_by_token check them on the device into
 * the error word (ERR_MSA_ROWS), and the kernels clamp what they read (msa_row_token). */
const int32_t *msa_query_tokens(const char *kernel, const MsaParams *p, int64_t Nq, int64_t N);

/* The token of query row r (q_token NULL: r), kept in [0, N) whatever q_token holds. */
__device__ __forceinline__ int msa_row_token(const int32_t *q_token, int r, int N) {
    return q_token ? min(max(q_token[r], 0), N - 1) : r;
}

/* The first slot of block b in a selection row (K ids ascending, -1 padding), -1 when absent: the attention's
 * schedule and the KL's rows kernel both look up a (query, block) pair's slot. Every load of the row is issued
 * before the first compare (16-byte loads when the row allows them) rather than a compare-and-break loop's one
 * round trip per slot; the fifteenth session measured no change in either kernel's time from it (the idx_lse
 * pass is not bound by this lookup), so it is one lookup in one place, not a speed-up. */
__device__ __forceinline__ int msa_topk_slot(const int32_t *row, int K, int b) {
    int slot = -1;
    if ((K & 3) == 0 && ((uintptr_t)row & 15) == 0) {
        for (int i0 = 0; i0 < K; i0 += 16) {
            int4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++) v[u] = i0 + 4 * u < K ? __ldg((const int4 *)(row + i0) + u) : make_int4(-1, -1, -1, -1);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = i0 + 4 * u;
                if (slot < 0) slot = v[u].x == b ? i : v[u].y == b ? i + 1 : v[u].z == b ? i + 2 : v[u].w == b ? i + 3 : -1;
            }
        }
    } else {
#pragma unroll 8
        for (int i = 0; i < K; i++) {
            const int v = __ldg(row + i);
            if (slot < 0 && v == b) slot = i;
        }
    }
    return slot;
}

/* Width of the plan of Nq query rows over the key blocks of N tokens: row_ptr [N+1] | q_idx [Nq*k] | row_lo [N] |
 * row_hi [N], q_idx holding query rows. Without a query_index (Nq = N, rows = tokens) it is backend.h's
 * msa_plan_width; with one the plan is the kernels' own (the msa_plan entry, like the CPU, takes none). */
static inline int64_t msa_plan_width_rows(int64_t N, int64_t Nq, int64_t k) { return (N + 1) + Nq * k + 2 * N; }

/* The plan of topk (i32 [Hidx, Nq, k]) for a kernel given none: i32 [Hidx, msa_plan_width_rows(N, Nq, k)] in a
 * grow-only buffer of its own, valid until the next call (kernels on the one stream run in order, so the next
 * call's plan never overwrites one still read). The builder works in its own workspace, so the caller may hold
 * its scratch() region meanwhile. N: the tokens (the rows of the key side). */
int32_t *msa_temporary_plan(const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p, int64_t N);

/* k or v with a row per token: without key_rows the tensor itself; with key_rows (the fetched rows of sequence-
 * split context parallelism) a copy [N, Hkv, D] with token j's row = src row key_rows[j] and zeros where it is
 * -1 (masked keys of a selected block are multiplied by 0, never NaN), in a grow-only buffer of slot `slot`
 * (0: k, 1: v), valid until the next call with that slot. The tile kernels then load keys by token as they
 * always did; the backward adds dK/dV back through key_rows (msa_attention.cu). */
Tensor msa_keys_by_token(const char *kernel, const Tensor *src, const MsaParams *p, int slot);

/* msa_kl.cu, for the indexer and the fused attention-KL backward's fallback (msa_attention.cu):
 *   msa_selected_lse: the student's log-normaliser over the selection topk, walking its plan (NULL: a temporary
 *     one), idx_lse f32 [Hidx, N] (the indexer's second output, backend.h msa_indexer);
 *   msa_kl_backward_scaled: msa_kl_backward with the coefficient coeff_mul * coeff_grad[0] read on the
 *     device (coeff_grad NULL: coeff_mul), and kl (NULL: not wanted) the mean KL over the selection as
 *     msa_kl_forward's: from the same pass as dqi / dki when either is given (its teacher and student are
 *     at hand there, where a forward pass recomputed the teacher for it), else from msa_kl_forward's pass;
 *   msa_kl_mean (msa_attention.cu): kl = the sum of n per-CTA KL parts (log2 units, summed in CTA order)
 *     times ln 2 / pairs. */
void msa_selected_lse(Tensor *idx_lse, const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                      const Tensor *cu_seqlens, const MsaParams *p);
void msa_kl_backward_scaled(Tensor *dqi, Tensor *dki, Tensor *kl, const Tensor *q, const Tensor *k, const Tensor *lse,
                            const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk, const Tensor *plan,
                            const Tensor *cu_seqlens, const MsaParams *p, float coeff_mul, const float *coeff_grad);
void msa_kl_mean(float *kl, const double *parts, int n, double pairs);

/* The document of token t: the last d in [0, ndocs) with cu[d] <= t (empty documents are skipped
 * that way). Stays in [0, ndocs) whatever cu holds. */
__device__ __forceinline__ int msa_doc_of(const int32_t *cu, int ndocs, int64_t t) {
    int lo = 0, hi = ndocs;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cu[mid] <= t) lo = mid;
        else hi = mid;
    }
    return lo;
}

}  // namespace msacuda

#endif
