/* Context parallelism, head-parallel (the DeepSpeed-Ulysses scheme; layers/attention.c wires it): the P ranks
 * of a cp group share a micro-batch of N tokens, rank r holding tokens [r*N/P, (r+1)*N/P) for every op
 * but attention. Around attention two all-to-alls turn the sequence split into a head split and back:
 *
 *   seq_to_heads  x [N/P, H, D]  (this rank's tokens, every head)
 *             ->    [N, H/P, D]  (every token of the micro-batch in order, heads [r*H/P, (r+1)*H/P))
 *   heads_to_seq  the inverse
 *
 * so that the unchanged attention kernels run on the whole micro-batch (its full cu_seqlens) for this
 * rank's heads. Each exchange is linear and its adjoint is its inverse: the backward sends the gradient
 * back the other way. all_gather (MSA's single index key, needed by every head) gathers the rows of the
 * group; its adjoint is the reduce-scatter (sum) of the gradient.
 *
 * Layout: the all-to-all sends block j of its send buffer to rank j and stores what rank s sent at
 * block s. seq_to_heads first transposes x [n, P, H/P*D] into [P, n, H/P*D] (backend transpose01), so
 * block j holds rank j's heads of this rank's tokens; what arrives is [P, n, H/P, D] with block s the
 * tokens of rank s, which is already [N, H/P, D] in token order. heads_to_seq sends x as it is (block j
 * = the tokens of rank j) and transposes what arrives, [P, n, H/P*D] with block s the heads of rank s,
 * into [n, P, H/P*D] = [n, H, D].
 *
 * The group is a Comm (kernels/comm.h), which train/ hands in, so this file knows nothing of MPI. It
 * travels by pointer in the node (ptr[0]) and must outlive the tape (the trainer's Run holds it).
 * Every rank of the group runs the same ops in the same order, forward and backward (the tape has the
 * same shape on every rank), which is what keeps the collectives matched. The collectives wait on the
 * host, so these ops synchronise the device. A group of one rank is the identity and never calls the
 * Comm. */
#include "../kernels/util.h"
#include "ops.h"

/* The exchange without the tape (forward of one direction = backward of the other). */
static Tensor *exchange(Engine *e, const Tensor *x, const Comm *g, bool to_heads) {
    const int64_t P = g->size, rows = x->shape[0], H = x->shape[1], D = x->shape[2];
    BACKEND_REQUIRE(e->be, transpose01);
    if (to_heads) {
        Tensor *send = engine_empty(e, x->dtype, SHAPE(P, rows, H / P, D));
        e->be->transpose01(send, x, rows, P);
        Tensor *out = engine_empty(e, x->dtype, SHAPE(rows * P, H / P, D));
        g->all_to_all(g, send->data, out->data, x->numel / P, x->dtype, x->device);
        return out;
    }
    Tensor *recv = engine_empty(e, x->dtype, SHAPE(P, rows / P, H, D));
    g->all_to_all(g, x->data, recv->data, x->numel / P, x->dtype, x->device);
    Tensor *out = engine_empty(e, x->dtype, SHAPE(rows / P, H * P, D));
    e->be->transpose01(out, recv, P, rows / P);
    return out;
}

typedef struct CpExchangeParams {
    const Comm *group;
    bool to_heads; /* the forward's direction: token split -> head split */
} CpExchangeParams;

static Tensor *cp_exchange(Engine *e, Tensor *x, const Comm *g, bool to_heads) {
    const char *op = to_heads ? "cp_seq_to_heads" : "cp_heads_to_seq";
    if (!g) fatal("%s: no context-parallel group", op);
    if (x->ndim != 3) fatal("%s: x must be [tokens, heads, head_dim], got %d dims", op, x->ndim);
    const int64_t P = g->size;
    if (to_heads && x->shape[1] % P)
        fatal("%s: %lld heads do not split over %lld context-parallel ranks", op, (long long)x->shape[1], (long long)P);
    if (!to_heads && x->shape[0] % P)
        fatal("%s: %lld tokens do not split over %lld context-parallel ranks", op, (long long)x->shape[0], (long long)P);
    if (P == 1) return x;
    engine_op_begin(e);
    Tensor *out = exchange(e, x, g, to_heads);
    if (engine_wants_grad(e, &x, 1)) {
        Node *n = engine_record(e, OP_cp_exchange, &x, 1, &out, 1);
        *NODE_PARAMS(n, CpExchangeParams) = (CpExchangeParams){g, to_heads};
    }
    engine_op_end(e, OP_cp_exchange);
    return out;
}

Tensor *op_cp_seq_to_heads(Engine *e, Tensor *x, const Comm *g) { return cp_exchange(e, x, g, true); }
Tensor *op_cp_heads_to_seq(Engine *e, Tensor *x, const Comm *g) { return cp_exchange(e, x, g, false); }

void backward_cp_exchange(Engine *e, Node *n) {
    /* the input requires grad (the node exists), so gx is there on every rank and the collective runs on all */
    Tensor *gx = engine_grad(e, n->in[0]);
    const CpExchangeParams *cp = NODE_PARAMS(n, CpExchangeParams);
    Tensor *back = exchange(e, n->out[0]->grad, cp->group, !cp->to_heads);
    e->be->axpy(gx, back, 1.0f);
}

typedef struct CpAllGatherParams {
    const Comm *group;
} CpAllGatherParams;

Tensor *op_cp_all_gather(Engine *e, Tensor *x, const Comm *g) {
    if (!g) fatal("cp_all_gather: no context-parallel group");
    if (g->size == 1) return x;
    engine_op_begin(e);
    int64_t shape[TENSOR_MAX_DIMS];
    for (int d = 0; d < x->ndim; d++) shape[d] = x->shape[d];
    shape[0] *= g->size;
    Tensor *out = engine_empty(e, x->dtype, x->ndim, shape);
    g->all_gather(g, x->data, out->data, x->numel, x->dtype, x->device);
    if (engine_wants_grad(e, &x, 1)) {
        Node *n = engine_record(e, OP_cp_all_gather, &x, 1, &out, 1);
        NODE_PARAMS(n, CpAllGatherParams)->group = g;
    }
    engine_op_end(e, OP_cp_all_gather);
    return out;
}

void backward_cp_all_gather(Engine *e, Node *n) {
    Tensor *x = n->in[0], *gx = engine_grad(e, x);
    Tensor *part = engine_empty_like(e, x);
    const Comm *g = NODE_PARAMS(n, CpAllGatherParams)->group;
    g->reduce_scatter_sum(g, n->out[0]->grad->data, part->data, x->numel, x->dtype, x->device);
    e->be->axpy(gx, part, 1.0f);
}
