/* Causal GQA attention within packed documents, CPU backend (the reference the CUDA and MSA kernels
 * are tested against). See attention_impl.h for the math and the parallel scheme. */
#include <stdlib.h>

#include "cpu.h"

/* Shapes and the per-token document bounds shared by the typed bodies. */
typedef struct AttnDims {
    int64_t N, Hq, Hkv, D;
    int64_t max_len;          /* longest document: the per-thread score buffer */
    double work;              /* ~ multiply-adds of the forward, to decide on threading */
    double scale;
    const int32_t *doc_start; /* [N] first token of each token's document */
    const int32_t *doc_end;   /* [N] one past its last token */
    int32_t *bounds;          /* owns doc_start and doc_end */
} AttnDims;

#define CPU_IMPL "attention_impl.h"
#include "instantiate.h"

/* Check the shapes and cu_seqlens (i32, starts at 0, non-decreasing, ends at N), and expand the
 * document bounds per token so that a (head, query) task finds its keys in O(1). */
static AttnDims attn_dims(const char *kernel, const Tensor *q, const Tensor *k, const Tensor *v,
                          const Tensor *cu_seqlens, float scale) {
    if (q->ndim != 3 || k->ndim != 3 || v->ndim != 3) fatal("cpu %s: q, k, v must be [N, H, D]", kernel);
    AttnDims a = {.N = q->shape[0], .Hq = q->shape[1], .Hkv = k->shape[1], .D = q->shape[2], .scale = scale};
    if (k->shape[0] != a.N || k->shape[2] != a.D || v->shape[0] != a.N || v->shape[1] != a.Hkv || v->shape[2] != a.D)
        fatal("cpu %s: k and v must be [%lld, Hkv, %lld] like each other", kernel, (long long)a.N, (long long)a.D);
    if (a.Hkv <= 0 || a.Hq % a.Hkv != 0)
        fatal("cpu %s: %lld query heads are not a multiple of %lld KV heads", kernel, (long long)a.Hq, (long long)a.Hkv);
    if (cu_seqlens->dtype != DT_I32 || cu_seqlens->numel < 2)
        fatal("cpu %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1", kernel);
    const int32_t *cu = cu_seqlens->data;
    const int64_t ndocs = cu_seqlens->numel - 1;
    if (cu[0] != 0 || cu[ndocs] != a.N)
        fatal("cpu %s: cu_seqlens must run from 0 to N = %lld, got %d .. %d", kernel, (long long)a.N, cu[0], cu[ndocs]);
    a.bounds = xmalloc((size_t)(2 * a.N) * sizeof(int32_t));
    int32_t *start = a.bounds, *end = a.bounds + a.N;
    for (int64_t d = 0; d < ndocs; d++) {
        if (cu[d + 1] < cu[d]) fatal("cpu %s: cu_seqlens decreases at document %lld", kernel, (long long)d);
        const int64_t len = cu[d + 1] - cu[d];
        if (len > a.max_len) a.max_len = len;
        a.work += 0.5 * (double)len * (double)(len + 1);
        for (int32_t t = cu[d]; t < cu[d + 1]; t++) {
            start[t] = cu[d];
            end[t] = cu[d + 1];
        }
    }
    a.work *= (double)(a.Hq * a.D);
    if (a.max_len == 0) a.max_len = 1;
    a.doc_start = start;
    a.doc_end = end;
    return a;
}

void cpu_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                           const Tensor *cu_seqlens, float scale) {
    CPU_SAME_DTYPE("attention_forward", q, out, lse, k, v);
    AttnDims a = attn_dims("attention_forward", q, k, v, cu_seqlens, scale);
    if (out->numel != q->numel) fatal("cpu attention_forward: out must have q's shape");
    if (lse->numel != a.Hq * a.N) fatal("cpu attention_forward: lse must be [Hq, N]");
    CPU_CALL(q, attn_fwd, out->data, lse->data, q->data, k->data, v->data, &a);
    free(a.bounds);
}

void cpu_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                            const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                            const Tensor *cu_seqlens, float scale) {
    if (!dq && !dk && !dv) return;
    CPU_SAME_DTYPE("attention_backward", q, dq, dk, dv, dout, k, v, out, lse);
    AttnDims a = attn_dims("attention_backward", q, k, v, cu_seqlens, scale);
    if (dout->numel != q->numel || out->numel != q->numel || lse->numel != a.Hq * a.N)
        fatal("cpu attention_backward: dout and out must have q's shape, lse must be [Hq, N]");
    if ((dq && dq->numel != q->numel) || (dk && dk->numel != k->numel) || (dv && dv->numel != v->numel))
        fatal("cpu attention_backward: gradients must have their inputs' shapes");
    double *dsum = xmalloc((size_t)(a.Hq * a.N) * sizeof(double));
    CPU_CALL(q, attn_bwd, dq ? dq->data : NULL, dk ? dk->data : NULL, dv ? dv->data : NULL, dout->data, q->data,
             k->data, v->data, out->data, lse->data, dsum, &a);
    free(dsum);
    free(a.bounds);
}
