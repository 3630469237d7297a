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
 * budget), there is no query_index or key_rows (sequence-split context parallelism is the CPU's), and cu_seqlens is
 * i32 [ndocs+1] with ndocs >= 1. Returns ndocs. */
int64_t msa_check_params(const char *kernel, const MsaParams *p, const Tensor *cu_seqlens);

/* The plan of topk for a kernel given none: i32 [Hidx, P = msa_plan_width(N, k)] built by cuda_msa_plan
 * in a grow-only buffer of its own, valid until the next call (kernels on the one stream run in order, so
 * the next call's plan never overwrites one still read). cuda_msa_plan works in its own workspace, so the
 * caller may hold its scratch() region meanwhile. */
int32_t *msa_temporary_plan(const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p, int64_t Hidx, int64_t P);

/* msa_kl.cu, for the indexer and the fused attention-KL backward's fallback (msa_attention.cu):
 *   msa_selected_lse: the student's log-normaliser over the selection topk (a temporary plan), idx_lse
 *     f32 [Hidx, N] (the indexer's second output, backend.h msa_indexer);
 *   msa_kl_backward_scaled: msa_kl_backward with the coefficient coeff_mul * coeff_grad[0] read on the
 *     device (coeff_grad NULL: coeff_mul);
 *   msa_kl_value: msa_kl_forward's kl alone (its idx_lse into a temporary). */
void msa_selected_lse(Tensor *idx_lse, const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *cu_seqlens,
                      const MsaParams *p);
void msa_kl_backward_scaled(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi,
                            const Tensor *ki, const Tensor *idx_lse, const Tensor *topk, const Tensor *plan,
                            const Tensor *cu_seqlens, const MsaParams *p, float coeff_mul, const float *coeff_grad);
void msa_kl_value(Tensor *kl, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi, const Tensor *ki,
                  const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p);

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
