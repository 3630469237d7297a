/* MSA Index Branch selection on the CPU (DESIGN §4, msa_spec.md b.1-b.2): token scores
 * index_scale * <qi[t,g], ki[j]> over the visible keys of the query's document, block score = max
 * over the block's visible tokens, then per (group, query) the forced init/local blocks plus the
 * best-scoring other blocks up to topk_blocks. Output: document-relative block ids sorted ascending,
 * -1 padding. Deterministic: no exponentials, fixed reduction order, ties to the lower block id.
 *
 * With idx_lse, also the student's log-normaliser over the selected tokens (msa_spec.md b.4), computed
 * by the KL forward's own code (vec_impl.h index_lse), so the sparse phase's KL, which takes it from
 * here, has the bits the KL forward would give. The reference the CUDA indexer is held to. */
#include <stdlib.h>

#include "msa_common.h"

#define CPU_IMPL "msa_indexer_impl.h"
#include "instantiate.h"

void cpu_msa_indexer(Tensor *topk, Tensor *idx_lse, Tensor *plan, const Tensor *qi, const Tensor *ki,
                     const Tensor *cu_seqlens, const MsaParams *p) {
    CPU_SAME_DTYPE("msa_indexer", qi, ki, idx_lse);
    if (qi->ndim != 3) fatal("cpu msa_indexer: qi must be [N, Hidx, Di], got %d dims", qi->ndim);
    if (ki->ndim != 2) fatal("cpu msa_indexer: ki must be [N, Di], got %d dims", ki->ndim);
    MsaCtx c = msa_ctx_init("msa_indexer", ki->shape[0], qi->shape[0], cu_seqlens, p);
    c.Hkv = qi->shape[1];
    msa_check_index("msa_indexer", &c, qi, ki);
    if (topk->dtype != DT_I32) fatal("cpu msa_indexer: topk must be i32, got %s", dtype_name(topk->dtype));
    if (topk->ndim != 3 || topk->shape[0] != c.Hkv || topk->shape[1] != c.Nq || topk->shape[2] != c.K)
        fatal("cpu msa_indexer: topk must be [Hidx = %lld, %lld, topk_blocks = %lld]", (long long)c.Hkv,
              (long long)c.Nq, (long long)c.K);
    if (idx_lse && idx_lse->numel != c.Hkv * c.Nq)
        fatal("cpu msa_indexer: idx_lse must be [Hidx = %lld, %lld]", (long long)c.Hkv, (long long)c.Nq);
    c.topk = topk->data; /* the support of a row, for idx_lse, is read back from it */
    CPU_CALL(qi, msa_index, topk->data, idx_lse ? idx_lse->data : NULL, qi->data, ki->data, &c, p->init_blocks,
             p->local_blocks);
    msa_ctx_free(&c);
    if (plan) cpu_msa_plan(plan, topk, cu_seqlens, p);
}
