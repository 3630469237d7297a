/* MSA Main Branch on the CPU (DESIGN §4, msa_spec.md b.3): exact softmax attention of every query
 * head over the tokens of its group's selected blocks, causal inside the query's own block; the
 * backward restricted to the same support; and the recall metric. The reference the CUDA kernels
 * are held to. See msa_attention_impl.h for the math and the parallel scheme. */
#include <stdlib.h>

#include "msa_common.h"

#define CPU_IMPL "msa_attention_impl.h"
#include "instantiate.h"

void cpu_msa_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                               const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p) {
    (void)plan; /* the forward walks each query's own selection: no reverse map */
    CPU_SAME_DTYPE("msa_attention_forward", q, out, lse, k, v);
    if (q->ndim != 3) fatal("cpu msa_attention_forward: q must be [N, Hq, D], got %d dims", q->ndim);
    MsaCtx c = msa_ctx_init("msa_attention_forward", msa_token_count(k, p), q->shape[0], cu_seqlens, p);
    msa_check_qkv("msa_attention_forward", &c, q, k, v);
    msa_check_topk("msa_attention_forward", &c, topk);
    if (out->numel != q->numel) fatal("cpu msa_attention_forward: out must have q's shape");
    if (lse->numel != c.Hq * c.Nq) fatal("cpu msa_attention_forward: lse must be [Hq, Nq]");
    CPU_CALL(q, msa_attn_fwd, out->data, lse->data, q->data, k->data, v->data, &c);
    msa_ctx_free(&c);
}

void cpu_msa_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens,
                                const MsaParams *p) {
    if (!dq && !dk && !dv) return;
    CPU_SAME_DTYPE("msa_attention_backward", q, dq, dk, dv, dout, k, v, out, lse);
    if (q->ndim != 3) fatal("cpu msa_attention_backward: q must be [N, Hq, D], got %d dims", q->ndim);
    MsaCtx c = msa_ctx_init("msa_attention_backward", msa_token_count(k, p), q->shape[0], cu_seqlens, p);
    msa_check_qkv("msa_attention_backward", &c, q, k, v);
    msa_check_topk("msa_attention_backward", &c, topk);
    if (dout->numel != q->numel || out->numel != q->numel || lse->numel != c.Hq * c.Nq)
        fatal("cpu msa_attention_backward: dout and out must have q's shape, lse must be [Hq, Nq]");
    if ((dq && dq->numel != q->numel) || (dk && dk->numel != k->numel) || (dv && dv->numel != v->numel))
        fatal("cpu msa_attention_backward: gradients must have their inputs' shapes");
    if (dk || dv) msa_build_key_queries(&c, plan);
    double *dsum = xmalloc((size_t)(c.Hq * c.Nq > 0 ? c.Hq * c.Nq : 1) * sizeof(double));
    CPU_CALL(q, msa_attn_bwd, dq ? dq->data : NULL, dk ? dk->data : NULL, dv ? dv->data : NULL, dout->data, q->data,
             k->data, v->data, out->data, lse->data, dsum, &c);
    free(dsum);
    msa_ctx_free(&c);
}

double cpu_msa_recall(const Tensor *q, const Tensor *k, const Tensor *topk, const Tensor *cu_seqlens,
                      const MsaParams *p, int query_stride) {
    CPU_SAME_DTYPE("msa_recall", q, k);
    if (query_stride < 1) fatal("cpu msa_recall: query_stride must be >= 1, got %d", query_stride);
    if (p->key_rows) fatal("cpu msa_recall: key_rows given, but the dense teacher reads every key of the prefix");
    if (q->ndim != 3) fatal("cpu msa_recall: q must be [N, Hq, D], got %d dims", q->ndim);
    MsaCtx c = msa_ctx_init("msa_recall", k->shape[0], q->shape[0], cu_seqlens, p);
    msa_check_qkv("msa_recall", &c, q, k, NULL);
    msa_check_topk("msa_recall", &c, topk);
    /* the queries whose token is a multiple of the stride: the same sample whichever rank holds them */
    int64_t *rows = xmalloc((size_t)(c.Nq > 0 ? c.Nq : 1) * sizeof(int64_t)), ns = 0;
    for (int64_t t = 0; t < c.Nq; t++)
        if (msa_query_token(&c, t) % query_stride == 0) rows[ns++] = t;
    double *vals = xmalloc((size_t)(ns * c.Hkv > 0 ? ns * c.Hkv : 1) * sizeof(double));
    CPU_CALL(q, msa_recall_body, vals, q->data, k->data, &c, rows, ns);
    double sum = 0; /* fixed order: the metric does not depend on the thread count */
    for (int64_t i = 0; i < ns * c.Hkv; i++) sum += vals[i];
    free(vals);
    free(rows);
    const int64_t cnt = ns * c.Hkv;
    msa_ctx_free(&c);
    return cnt > 0 ? sum / (double)cnt : 1.0;
}
