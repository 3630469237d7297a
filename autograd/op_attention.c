/* attention: causal GQA softmax attention inside packed documents (the dense layers' attention and
 * the reference for MSA). The forward saves lse [Hq, N]; the backward recomputes the probabilities
 * from it (flash-attention style), so nothing of size T^2 is kept. lse is not differentiable: it is
 * handed out (lse_out) only as the MSA KL's detached teacher normaliser. */
#include "../kernels/util.h"
#include "ops.h"

typedef struct AttentionParams {
    Tensor *lse; /* [Hq, N] */
    float scale;
} AttentionParams;

bool attention_results(Engine *e, const Tensor *q, const AttentionKept *kept, Tensor **out, Tensor **lse) {
    const int64_t N = q->shape[0], Hq = q->shape[1];
    if (kept) {
        *out = engine_empty_header(e, q->dtype, q->ndim, q->shape, kept->out);
        *lse = engine_empty_header(e, stat_dtype(q->dtype), SHAPE(Hq, N), kept->lse);
        return true;
    }
    *out = engine_empty_like(e, q);
    *lse = engine_empty(e, stat_dtype(q->dtype), SHAPE(Hq, N));
    return false;
}

Tensor *op_attention(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens, float scale,
                     Tensor **lse_out) {
    return op_attention_kept(e, q, k, v, cu_seqlens, scale, NULL, lse_out);
}

Tensor *op_attention_kept(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens, float scale,
                          const AttentionKept *kept, Tensor **lse_out) {
    if (q->ndim != 3) fatal("attention: q must be [N, Hq, D], got %d dims", q->ndim);
    const int64_t N = q->shape[0], Hq = q->shape[1], D = q->shape[2];
    if (k->ndim != 3) fatal("attention: k must be [N, Hkv, D], got %d dims", k->ndim);
    const int64_t Hkv = k->shape[1];
    if (k->shape[2] != D) fatal("attention: q head dim %lld differs from k head dim %lld", (long long)D, (long long)k->shape[2]);
    check_shape("attention", "k", k, SHAPE(N, Hkv, D));
    check_shape("attention", "v", v, SHAPE(N, Hkv, D));
    if (Hkv <= 0 || Hq % Hkv != 0)
        fatal("attention: %lld query heads are not a multiple of %lld KV heads", (long long)Hq, (long long)Hkv);
    if (q->dtype != k->dtype || q->dtype != v->dtype)
        fatal("attention: q, k, v dtypes differ (%s, %s, %s)", dtype_name(q->dtype), dtype_name(k->dtype), dtype_name(v->dtype));
    if (cu_seqlens->dtype != DT_I32) fatal("attention: cu_seqlens must be i32, got %s", dtype_name(cu_seqlens->dtype));
    if (cu_seqlens->ndim != 1 || cu_seqlens->numel < 2) fatal("attention: cu_seqlens must be [ndocs+1] with ndocs >= 1");
    /* On the host the check is free; a device copy would stall the stream, so CUDA kernels check there. */
    if (cu_seqlens->device == DEV_CPU) {
        const int32_t *cu = cu_seqlens->data;
        if (cu[0] != 0 || cu[cu_seqlens->numel - 1] != N)
            fatal("attention: cu_seqlens must run from 0 to N = %lld tokens, got %d .. %d", (long long)N, cu[0],
                  cu[cu_seqlens->numel - 1]);
    }
    engine_op_begin(e);
    Tensor *out, *lse;
    if (!attention_results(e, q, kept, &out, &lse)) e->be->attention_forward(out, lse, q, k, v, cu_seqlens, scale);
    Tensor *in[4] = {q, k, v, cu_seqlens};
    if (engine_wants_grad(e, in, 3)) {
        Node *n = engine_record(e, OP_attention, in, 4, &out, 1);
        *NODE_PARAMS(n, AttentionParams) = (AttentionParams){lse, scale};
    }
    engine_op_end(e, OP_attention);
    if (lse_out) *lse_out = lse;
    return out;
}

void backward_attention(Engine *e, Node *n) {
    Tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    Tensor *gq = engine_grad(e, q), *gk = engine_grad(e, k), *gv = engine_grad(e, v);
    const AttentionParams *ap = NODE_PARAMS(n, AttentionParams);
    if (gq || gk || gv)
        e->be->attention_backward(gq, gk, gv, n->out[0]->grad, q, k, v, n->out[0], ap->lse, n->in[3], ap->scale);
}
