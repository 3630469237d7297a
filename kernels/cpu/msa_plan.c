/* MSA plan on the CPU: the reverse map key block -> queries of a Top-k selection, in the layout
 * backend.h defines (msa_plan). The CPU's own kernels rebuild the same map per call in their MsaCtx;
 * this entry exists so that the CUDA plan, which the GPU kernels share across a layer's forward and
 * backward, has an exact reference. */
#include "msa_common.h"

void cpu_msa_plan(Tensor *plan, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p) {
    if (!topk) fatal("cpu msa_plan: topk is NULL (dense selection has no plan)");
    if (topk->dtype != DT_I32 || topk->ndim != 3)
        fatal("cpu msa_plan: topk must be i32 [Hidx, N, topk_blocks], got %s with %d dims", dtype_name(topk->dtype),
              topk->ndim);
    const int64_t H = topk->shape[0], N = topk->shape[1], K = topk->shape[2];
    const int64_t P = msa_plan_width(N, K);
    if (plan->dtype != DT_I32 || plan->numel != H * P)
        fatal("cpu msa_plan: plan must be i32 [Hidx, msa_plan_width(N, k)] = [%lld, %lld], got %s with %lld elements",
              (long long)H, (long long)P, dtype_name(plan->dtype), (long long)plan->numel);
    if (N * K >= INT32_MAX) fatal("cpu msa_plan: N * topk_blocks = %lld does not fit the i32 plan", (long long)(N * K));
    if (p && (p->query_index || p->key_rows)) fatal("cpu msa_plan: a query_index (sequence-split context parallelism) takes no plan");
    MsaCtx c = msa_ctx_init("msa_plan", N, N, cu_seqlens, p);
    c.Hkv = H;
    msa_check_topk("msa_plan", &c, topk);
    msa_build_key_queries(&c, NULL);
    const int64_t R = c.blk_base[c.ndocs];
    int32_t *out = plan->data;
    for (int64_t g = 0; g < H; g++) {
        int32_t *row_ptr = out + g * P, *q_idx = row_ptr + (N + 1), *row_lo = q_idx + N * K, *row_hi = row_lo + N;
        const int32_t *rp = c.row_ptr + g * c.row_stride;
        for (int64_t r = 0; r <= N; r++) row_ptr[r] = rp[r <= R ? r : R];
        for (int64_t i = 0; i < N * K; i++) q_idx[i] = i < rp[R] ? c.q_idx[g * c.q_stride + i] : 0;
        for (int64_t r = 0; r < N; r++) row_lo[r] = row_hi[r] = 0;
        for (int64_t d = 0; d < c.ndocs; d++)
            for (int64_t r = c.blk_base[d]; r < c.blk_base[d + 1]; r++) {
                const int64_t lo = c.cu[d] + (r - c.blk_base[d]) * c.B, hi = lo + c.B;
                row_lo[r] = (int32_t)lo;
                row_hi[r] = (int32_t)(hi < c.cu[d + 1] ? hi : c.cu[d + 1]);
            }
    }
    msa_ctx_free(&c);
}
