/* One step of ring attention (context parallelism over the sequence, autograd/op_cp_sequence.c), CPU
 * backend: causal GQA attention within documents of this rank's queries over one block of keys, where
 * neither set is a contiguous run of the micro-batch. See attention_ring_impl.h for the math. */
#include <stdlib.h>

#include "cpu.h"

typedef struct RingDims {
    int64_t Nq, Nk, Hq, Hkv, D;
    double work; /* ~ multiply-adds, to decide on threading */
    double scale;
    const int32_t *q_index, *k_index; /* [Nq], [Nk]: global token indices in the micro-batch */
    int32_t *doc_start;               /* [Nq] first token of each query's document (owned) */
} RingDims;

#define CPU_IMPL "attention_ring_impl.h"
#include "instantiate.h"

static RingDims ring_dims(const char *kernel, const Tensor *q, const Tensor *k, const Tensor *v,
                          const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens, float scale) {
    if (q->ndim != 3 || k->ndim != 3 || v->ndim != 3) fatal("cpu %s: q, k, v must be [N, H, D]", kernel);
    RingDims a = {.Nq = q->shape[0], .Nk = k->shape[0], .Hq = q->shape[1], .Hkv = k->shape[1], .D = q->shape[2],
                  .scale = scale};
    if (k->shape[2] != a.D || v->shape[0] != a.Nk || v->shape[1] != a.Hkv || v->shape[2] != a.D)
        fatal("cpu %s: k and v must be [%lld, Hkv, %lld] like each other", kernel, (long long)a.Nk, (long long)a.D);
    if (a.Hkv <= 0 || a.Hq % a.Hkv != 0)
        fatal("cpu %s: %lld query heads are not a multiple of %lld KV heads", kernel, (long long)a.Hq, (long long)a.Hkv);
    if (q_index->dtype != DT_I32 || q_index->numel != a.Nq || k_index->dtype != DT_I32 || k_index->numel != a.Nk)
        fatal("cpu %s: q_index and k_index must be i32 [%lld] and [%lld]", kernel, (long long)a.Nq, (long long)a.Nk);
    if (cu_seqlens->dtype != DT_I32 || cu_seqlens->numel < 2)
        fatal("cpu %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1", kernel);
    const int32_t *cu = cu_seqlens->data;
    const int64_t ndocs = cu_seqlens->numel - 1;
    a.q_index = q_index->data;
    a.k_index = k_index->data;
    a.doc_start = xmalloc((size_t)(a.Nq > 0 ? a.Nq : 1) * sizeof(int32_t));
    for (int64_t t = 0; t < a.Nq; t++) {
        const int32_t g = a.q_index[t];
        if (g < cu[0] || g >= cu[ndocs])
            fatal("cpu %s: query %lld has index %d outside cu_seqlens' [%d, %d)", kernel, (long long)t, g, cu[0],
                  cu[ndocs]);
        int64_t lo = 0, hi = ndocs - 1; /* the document d with cu[d] <= g < cu[d + 1] */
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (cu[mid] <= g) lo = mid;
            else hi = mid - 1;
        }
        a.doc_start[t] = cu[lo];
    }
    a.work = (double)a.Nq * (double)a.Nk * (double)(a.Hq * a.D);
    return a;
}

void cpu_attention_ring_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens, float scale) {
    CPU_SAME_DTYPE("attention_ring_forward", q, out, lse, k, v);
    RingDims a = ring_dims("attention_ring_forward", q, k, v, q_index, k_index, cu_seqlens, scale);
    if (out->numel != q->numel || lse->numel != a.Hq * a.Nq)
        fatal("cpu attention_ring_forward: out must have q's shape, lse must be [Hq, Nq]");
    CPU_CALL(q, ring_fwd, out->data, lse->data, q->data, k->data, v->data, &a);
    free(a.doc_start);
}

void cpu_attention_ring_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                 const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                 const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens, float scale) {
    if (!dq && !dk && !dv) return;
    CPU_SAME_DTYPE("attention_ring_backward", q, dq, dk, dv, dout, k, v, out, lse);
    RingDims a = ring_dims("attention_ring_backward", q, k, v, q_index, k_index, cu_seqlens, scale);
    if (dout->numel != q->numel || out->numel != q->numel || lse->numel != a.Hq * a.Nq)
        fatal("cpu attention_ring_backward: dout and out must have q's shape, lse must be [Hq, Nq]");
    if ((dq && dq->numel != q->numel) || (dk && dk->numel != k->numel) || (dv && dv->numel != v->numel))
        fatal("cpu attention_ring_backward: gradients must have their inputs' shapes");
    double *dsum = xmalloc((size_t)(a.Hq * a.Nq > 0 ? a.Hq * a.Nq : 1) * sizeof(double));
    CPU_CALL(q, ring_bwd, dq ? dq->data : NULL, dk ? dk->data : NULL, dv ? dv->data : NULL, dout->data, q->data,
             k->data, v->data, out->data, lse->data, dsum, &a);
    free(dsum);
    free(a.doc_start);
}
