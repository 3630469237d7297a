/* Causal GQA attention within packed documents, CPU backend (the reference the CUDA and MSA kernels
 * are tested against), and one step of ring attention (context parallelism over the sequence,
 * autograd/op_cp_sequence.c): this rank's queries against one block of keys, where neither set is a
 * contiguous run of the micro-batch. Both run the same typed bodies (attention_impl.h, the math and the
 * parallel scheme), which read the visible pairs as a range of key rows per query and a range of query
 * rows per key; the entries differ only in how they find those ranges. */
#include <stdlib.h>

#include "cpu.h"

/* Shapes, and the visible pairs as ranges of rows, shared by the typed bodies. */
typedef struct AttnDims {
    int64_t Nq, Nk, Hq, Hkv, D;
    int64_t max_keys;         /* longest key range of a query (>= 1): the per-thread score buffer */
    double work;              /* ~ multiply-adds of the forward, to decide on threading */
    double scale;
    bool merge;               /* a ring step: merge into the running (out, lse) instead of writing them */
    int32_t *key_lo, *key_hi; /* [Nq] query t sees the key rows key_lo[t] .. key_hi[t]-1 */
    int32_t *query_lo, *query_hi; /* [Nk] key j is seen by the query rows query_lo[j] .. query_hi[j]-1 */
} AttnDims;

#define CPU_IMPL "attention_impl.h"
#include "instantiate.h"

/* Shape checks shared by both entries; the ranges are left to the caller (allocated here, one block). */
static AttnDims attn_shapes(const char *kernel, const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *cu_seqlens,
                            float scale) {
    if (q->ndim != 3 || k->ndim != 3 || v->ndim != 3) fatal("cpu %s: q, k, v must be [N, H, D]", kernel);
    AttnDims a = {.Nq = q->shape[0], .Nk = k->shape[0], .Hq = q->shape[1], .Hkv = k->shape[1], .D = q->shape[2],
                  .scale = scale};
    if (k->shape[2] != a.D || v->shape[0] != a.Nk || v->shape[1] != a.Hkv || v->shape[2] != a.D)
        fatal("cpu %s: k and v must be [%lld, Hkv, %lld] like each other", kernel, (long long)a.Nk, (long long)a.D);
    if (a.Hkv <= 0 || a.Hq % a.Hkv != 0)
        fatal("cpu %s: %lld query heads are not a multiple of %lld KV heads", kernel, (long long)a.Hq, (long long)a.Hkv);
    if (cu_seqlens->dtype != DT_I32 || cu_seqlens->numel < 2)
        fatal("cpu %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1", kernel);
    a.key_lo = xmalloc((size_t)(2 * (a.Nq + a.Nk) + 1) * sizeof(int32_t));
    a.key_hi = a.key_lo + a.Nq, a.query_lo = a.key_hi + a.Nq, a.query_hi = a.query_lo + a.Nk;
    a.max_keys = 1;
    return a;
}

/* The whole micro-batch: check cu_seqlens (starts at 0, non-decreasing, ends at N); query t of document
 * [s, e) sees keys s..t, key j the queries j..e-1. */
static AttnDims attn_dims(const char *kernel, const Tensor *q, const Tensor *k, const Tensor *v,
                          const Tensor *cu_seqlens, float scale) {
    AttnDims a = attn_shapes(kernel, q, k, v, cu_seqlens, scale);
    if (a.Nk != a.Nq) fatal("cpu %s: q has %lld rows and k %lld", kernel, (long long)a.Nq, (long long)a.Nk);
    const int32_t *cu = cu_seqlens->data;
    const int64_t ndocs = cu_seqlens->numel - 1;
    if (cu[0] != 0 || cu[ndocs] != a.Nq)
        fatal("cpu %s: cu_seqlens must run from 0 to N = %lld, got %d .. %d", kernel, (long long)a.Nq, cu[0], cu[ndocs]);
    for (int64_t d = 0; d < ndocs; d++) {
        if (cu[d + 1] < cu[d]) fatal("cpu %s: cu_seqlens decreases at document %lld", kernel, (long long)d);
        const int64_t len = cu[d + 1] - cu[d];
        if (len > a.max_keys) a.max_keys = len;
        a.work += 0.5 * (double)len * (double)(len + 1);
        for (int32_t t = cu[d]; t < cu[d + 1]; t++) {
            a.key_lo[t] = cu[d], a.key_hi[t] = t + 1;
            a.query_lo[t] = t, a.query_hi[t] = cu[d + 1];
        }
    }
    a.work *= (double)(a.Hq * a.D);
    return a;
}

/* The first of the n ascending values x[] that is >= v (n when none). */
static int32_t lower_bound(const int32_t *x, int64_t n, int64_t v) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (x[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return (int32_t)lo;
}

/* The document d with cu[d] <= token < cu[d + 1]. */
static int64_t document_of(const int32_t *cu, int64_t ndocs, int32_t token) {
    int64_t lo = 0, hi = ndocs - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (cu[mid] <= token) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Check that index [n] is i32 and ascends inside cu_seqlens' tokens. */
static const int32_t *token_index(const char *kernel, const char *what, const Tensor *index, int64_t n, const int32_t *cu,
                                  int64_t ndocs) {
    if (index->dtype != DT_I32 || index->numel != n) fatal("cpu %s: %s must be i32 [%lld]", kernel, what, (long long)n);
    const int32_t *x = index->data;
    for (int64_t i = 0; i < n; i++)
        if (x[i] < cu[0] || x[i] >= cu[ndocs] || (i > 0 && x[i] <= x[i - 1]))
            fatal("cpu %s: %s[%lld] = %d: the tokens must ascend inside cu_seqlens' [%d, %d)", kernel, what, (long long)i,
                  x[i], cu[0], cu[ndocs]);
    return x;
}

/* One ring step: rows named by their tokens (q_index, k_index, ascending); query t sees key j iff key j's
 * token lies between the start of query t's document and query t's token. Both sets ascend, so each side's
 * visible rows are a run found by binary search. */
static AttnDims ring_dims(const char *kernel, const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *q_index,
                          const Tensor *k_index, const Tensor *cu_seqlens, float scale) {
    AttnDims a = attn_shapes(kernel, q, k, v, cu_seqlens, scale);
    a.merge = true;
    const int32_t *cu = cu_seqlens->data;
    const int64_t ndocs = cu_seqlens->numel - 1;
    const int32_t *qx = token_index(kernel, "q_index", q_index, a.Nq, cu, ndocs);
    const int32_t *kx = token_index(kernel, "k_index", k_index, a.Nk, cu, ndocs);
    for (int64_t t = 0; t < a.Nq; t++) {
        a.key_lo[t] = lower_bound(kx, a.Nk, cu[document_of(cu, ndocs, qx[t])]);
        a.key_hi[t] = lower_bound(kx, a.Nk, (int64_t)qx[t] + 1);
        if (a.key_hi[t] - a.key_lo[t] > a.max_keys) a.max_keys = a.key_hi[t] - a.key_lo[t];
    }
    for (int64_t j = 0; j < a.Nk; j++) {
        a.query_lo[j] = lower_bound(qx, a.Nq, kx[j]);
        a.query_hi[j] = lower_bound(qx, a.Nq, cu[document_of(cu, ndocs, kx[j]) + 1]);
    }
    a.work = (double)a.Nq * (double)a.Nk * (double)(a.Hq * a.D);
    return a;
}

static void attn_forward(const char *kernel, Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                         AttnDims *a) {
    CPU_SAME_DTYPE(kernel, q, out, lse, k, v);
    if (out->numel != q->numel || lse->numel != a->Hq * a->Nq)
        fatal("cpu %s: out must have q's shape, lse must be [Hq, Nq]", kernel);
    CPU_CALL(q, attn_fwd, out->data, lse->data, q->data, k->data, v->data, a);
    free(a->key_lo);
}

static void attn_backward(const char *kernel, Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                          const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse, AttnDims *a) {
    CPU_SAME_DTYPE(kernel, q, dq, dk, dv, dout, k, v, out, lse);
    if (dout->numel != q->numel || out->numel != q->numel || lse->numel != a->Hq * a->Nq)
        fatal("cpu %s: dout and out must have q's shape, lse must be [Hq, Nq]", kernel);
    if ((dq && dq->numel != q->numel) || (dk && dk->numel != k->numel) || (dv && dv->numel != v->numel))
        fatal("cpu %s: gradients must have their inputs' shapes", kernel);
    double *dsum = xmalloc((size_t)(a->Hq * a->Nq > 0 ? a->Hq * a->Nq : 1) * sizeof(double));
    CPU_CALL(q, attn_bwd, dq ? dq->data : NULL, dk ? dk->data : NULL, dv ? dv->data : NULL, dout->data, q->data,
             k->data, v->data, out->data, lse->data, dsum, a);
    free(dsum);
    free(a->key_lo);
}

void cpu_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                           const Tensor *cu_seqlens, float scale) {
    AttnDims a = attn_dims("attention_forward", q, k, v, cu_seqlens, scale);
    attn_forward("attention_forward", out, lse, q, k, v, &a);
}

void cpu_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                            const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                            const Tensor *cu_seqlens, float scale) {
    if (!dq && !dk && !dv) return;
    AttnDims a = attn_dims("attention_backward", q, k, v, cu_seqlens, scale);
    attn_backward("attention_backward", dq, dk, dv, dout, q, k, v, out, lse, &a);
}

void cpu_attention_ring_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens, float scale) {
    AttnDims a = ring_dims("attention_ring_forward", q, k, v, q_index, k_index, cu_seqlens, scale);
    attn_forward("attention_ring_forward", out, lse, q, k, v, &a);
}

void cpu_attention_ring_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                 const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                 const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens, float scale) {
    if (!dq && !dk && !dv) return;
    AttnDims a = ring_dims("attention_ring_backward", q, k, v, q_index, k_index, cu_seqlens, scale);
    attn_backward("attention_ring_backward", dq, dk, dv, dout, q, k, v, out, lse, &a);
}
