/* Context parallelism over the sequence (dist.cp_mode = sequence; train/model.c splits the tokens,
 * layers/attention.c calls this): ring attention.
 *
 * The P ranks of a cp group share a micro-batch; each holds its own tokens of it (the zigzag split of
 * model_cp_tokens: chunks r and 2P-1-r of every sequence, so that causal attention costs every rank
 * the same) and runs every op but attention on them alone, head count unchanged (so P need not divide
 * the KV heads). Attention needs every earlier key of each query's document: the ranks' K/V blocks
 * travel around the ring (rank r sends to r+1 and receives from r-1, P-1 times), and each rank merges
 * the softmax over the block it holds into its running output with the log-sum-exp rule (the backend's
 * attention_ring_forward). After the last block, out and lse are those of the softmax over every
 * visible key: the single-process attention, up to the rounding of the merges.
 *
 * Tokens are named by their global index in the micro-batch (index [n], i32): a query sees a key when
 * the key's index lies between the start of the query's document (from the whole micro-batch's
 * cu_seqlens) and the query's own index, whichever rank holds either.
 *
 * Backward: the K/V blocks go around the ring again, each with its dK/dV accumulator: the rank that holds
 * a block adds its queries' share (attention_ring_backward, from the saved final out and lse), and after
 * P shifts every accumulator is back on the rank that owns the block, holding the sum over all ranks'
 * queries. dQ stays local.
 *
 * The ring's shift is the group's all_to_allv with one non-empty block (to r+1; from r-1), so it goes
 * through the same timed wait as every collective of dist/ (a rank that dies or hangs mid-ring ends the
 * job with a message after dist.timeout). Each rank of the group runs the same shifts in the same order,
 * forward and backward (the tape has the same shape on every rank). */
#include <math.h>
#include <stdlib.h>

#include "../kernels/util.h"
#include "ops.h"

typedef struct RingAttentionParams {
    const Comm *group;
    Tensor *lse;       /* [Hq, n] the final log-sum-exp */
    Tensor *all_index; /* [P * n] i32: rank s's token indices at s * n */
    float scale;
} RingAttentionParams;

/* Part i of a ring buffer [parts, n, H, D], as a tensor [n, H, D] over the same memory. */
static Tensor *part(Engine *e, const Tensor *buf, int64_t i) {
    Tensor *p = arena_alloc(&e->host, sizeof(Tensor));
    *p = *buf;
    p->ndim = 3;
    p->shape[0] = buf->shape[1], p->shape[1] = buf->shape[2], p->shape[2] = buf->shape[3];
    p->numel = buf->numel / buf->shape[0];
    p->data = (char *)buf->data + (size_t)(i * p->numel) * dtype_size(buf->dtype);
    p->grad = NULL;
    p->requires_grad = false;
    return p;
}

/* Rank s's token indices [n] within the gathered [P * n]. */
static Tensor *owner_index(Engine *e, const Tensor *all, int64_t s, int64_t n) {
    Tensor *p = arena_alloc(&e->host, sizeof(Tensor));
    *p = *all;
    p->shape[0] = n;
    p->numel = n;
    p->data = (int32_t *)all->data + s * n;
    return p;
}

/* send[first .. first + count) to rank r+1; recv[first ..] from rank r-1 (the rest of recv untouched). */
static void ring_shift(const Comm *g, const Tensor *send, Tensor *recv, int64_t first, int64_t count) {
    const int P = g->size, next = (g->rank + 1) % P, prev = (g->rank + P - 1) % P;
    int64_t *v = xcalloc((size_t)(4 * P), sizeof(int64_t)), *sc = v, *sd = v + P, *rc = v + 2 * P, *rd = v + 3 * P;
    sc[next] = count, sd[next] = first;
    rc[prev] = count, rd[prev] = first;
    g->all_to_allv(g, send->data, sc, sd, recv->data, rc, rd, send->dtype, send->device);
    free(v);
}

Tensor *op_cp_ring_attention(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens, Tensor *index,
                             float scale, const Comm *g, Tensor **lse_out) {
    if (!g) fatal("cp_ring_attention: no context-parallel group");
    if (q->ndim != 3 || k->ndim != 3) fatal("cp_ring_attention: q and k must be [n, heads, head_dim]");
    const int64_t n = q->shape[0], Hq = q->shape[1], Hkv = k->shape[1], D = q->shape[2], P = g->size;
    check_shape("cp_ring_attention", "k", k, SHAPE(n, Hkv, D));
    check_shape("cp_ring_attention", "v", v, SHAPE(n, Hkv, D));
    check_shape("cp_ring_attention", "index", index, SHAPE(n));
    if (index->dtype != DT_I32 || cu_seqlens->dtype != DT_I32)
        fatal("cp_ring_attention: index and cu_seqlens must be i32, got %s and %s", dtype_name(index->dtype),
              dtype_name(cu_seqlens->dtype));
    BACKEND_REQUIRE(e->be, attention_ring_forward);
    engine_op_begin(e);
    Tensor *all_index = engine_empty(e, DT_I32, SHAPE(P * n));
    if (P > 1) g->all_gather(g, index->data, all_index->data, n, DT_I32, index->device);
    else e->be->copy(all_index->data, index->data, tensor_bytes(index));
    Tensor *out = engine_zeros(e, q->dtype, SHAPE(n, Hq, D));
    Tensor *lse = engine_empty(e, stat_dtype(q->dtype), SHAPE(Hq, n));
    void *no_keys_yet = xmalloc(tensor_bytes(lse)); /* lse = -inf: the merge's empty start */
    for (int64_t i = 0; i < lse->numel; i++)
        if (lse->dtype == DT_F64) ((double *)no_keys_yet)[i] = -INFINITY;
        else ((float *)no_keys_yet)[i] = -INFINITY;
    tensor_from_host(e, lse, no_keys_yet);
    free(no_keys_yet);
    Tensor *held = engine_empty(e, k->dtype, SHAPE(2, n, Hkv, D)), *next = engine_empty_like(e, held);
    e->be->copy(part(e, held, 0)->data, k->data, tensor_bytes(k));
    e->be->copy(part(e, held, 1)->data, v->data, tensor_bytes(v));
    for (int64_t step = 0; step < P; step++) {
        const int64_t owner = (g->rank - step + P) % P; /* whose block this rank holds at this step */
        e->be->attention_ring_forward(out, lse, q, part(e, held, 0), part(e, held, 1), index,
                                      owner_index(e, all_index, owner, n), cu_seqlens, scale);
        if (step + 1 < P) {
            ring_shift(g, held, next, 0, held->numel);
            Tensor *t = held;
            held = next, next = t;
        }
    }
    Tensor *in[5] = {q, k, v, cu_seqlens, index};
    if (engine_wants_grad(e, in, 3)) {
        Node *node = engine_record(e, OP_cp_ring_attention, in, 5, &out, 1);
        *NODE_PARAMS(node, RingAttentionParams) = (RingAttentionParams){g, lse, all_index, scale};
    }
    engine_op_end(e, OP_cp_ring_attention);
    if (lse_out) *lse_out = lse;
    return out;
}

void backward_cp_ring_attention(Engine *e, Node *node) {
    Tensor *q = node->in[0], *k = node->in[1], *v = node->in[2], *cu_seqlens = node->in[3], *index = node->in[4];
    Tensor *gq = engine_grad(e, q), *gk = engine_grad(e, k), *gv = engine_grad(e, v);
    const RingAttentionParams *rp = NODE_PARAMS(node, RingAttentionParams);
    const Comm *g = rp->group;
    const int64_t n = q->shape[0], Hkv = k->shape[1], D = k->shape[2], P = g->size;
    /* k, v, and their gradient accumulators travel together; the last shift carries the accumulators home */
    Tensor *held = engine_zeros(e, k->dtype, SHAPE(4, n, Hkv, D)), *next = engine_empty_like(e, held);
    e->be->copy(part(e, held, 0)->data, k->data, tensor_bytes(k));
    e->be->copy(part(e, held, 1)->data, v->data, tensor_bytes(v));
    const int64_t block = held->numel / 4;
    for (int64_t step = 0; step < P; step++) {
        const int64_t owner = (g->rank - step + P) % P;
        e->be->attention_ring_backward(gq, gk ? part(e, held, 2) : NULL, gv ? part(e, held, 3) : NULL,
                                       node->out[0]->grad, q, part(e, held, 0), part(e, held, 1), node->out[0],
                                       rp->lse, index, owner_index(e, rp->all_index, owner, n), cu_seqlens,
                                       rp->scale);
        if (P > 1) {
            if (step + 1 < P) ring_shift(g, held, next, 0, held->numel);
            else ring_shift(g, held, next, 2 * block, 2 * block);
            Tensor *t = held;
            held = next, next = t;
        }
    }
    if (gk) e->be->axpy(gk, part(e, held, 2), 1.0f);
    if (gv) e->be->axpy(gv, part(e, held, 3), 1.0f);
}
