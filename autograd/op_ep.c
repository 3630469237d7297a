/* Expert parallelism (issue 7; layers/moe.c wires it): the P ranks of an expert-parallel group route
 * different tokens, and rank r holds the routed experts [r*El, (r+1)*El) of the E = P*El experts. After
 * the local routing and permutation (op_moe_permute: the N*k assignment rows of this rank grouped by
 * expert 0..E-1), two all-to-alls take the rows to their experts' owners and the outputs back:
 *
 *   ep_dispatch  xs [N*k, C]  this rank's rows, grouped by global expert
 *            ->  xr [M, C]    the rows every rank routed to this rank's experts, grouped by local expert,
 *                             within an expert by source rank, within a source in the source's order
 *   ep_return    yr [M, C'] -> ys [N*k, C']: the experts' outputs back where the rows came from
 *
 * Layout: the rows for rank r are one contiguous range of xs (the segments of its experts), so the
 * all-to-allv sends them as they lie; what arrives is ordered [source s][local expert j]. A row
 * permutation (`order`, applied with the moe_permute kernels at k = 1) makes it [j][s], so that each
 * local expert is one segment (offsets [El+1]) for the grouped GEMMs. When the ranks' tokens are
 * consecutive slices of the batch (the trainer splits it so), [j][s] keeps every expert's rows in global
 * token order: the order a single process would give them. The per-expert row counts travel first (an
 * all-to-all of El counts per pair of ranks, host memory): the receiver needs them for its buffer
 * size, its receive displacements and the permutation.
 *
 * Backward: each exchange only moves rows (a permutation across the ranks), so its adjoint is its
 * inverse: ep_dispatch's backward sends the gradient rows back the way ep_return sends outputs, and
 * vice versa. Every rank of the group runs the same ops in the same order, forward and backward (the
 * tape has the same shape on every rank, and a node is recorded or not on every rank alike), which
 * keeps the collectives matched; the rows themselves may be any number, zero included. The
 * collectives wait on the host, so these ops synchronise the device.
 *
 * The group is a Comm (kernels/comm.h), which train/ hands in, so this file knows nothing of MPI. In
 * a group of one rank every exchange is a local copy, done here with the backend, so such a Comm needs
 * no implementation (comm_single). The dispatch plan lives in the engine's host arena and the Comm in
 * the trainer's Run: both outlive the tape (the node holds the plan by pointer, ptr[0]). */
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"
#include "ops.h"

/* ---- the layout (pure host arithmetic; tests/test_ep.c checks it against a simulated group) -------- */

void ep_send_layout(const int32_t *offsets, int P, int El, int64_t *send_rows, int64_t *send_first) {
    for (int r = 0; r < P; r++) {
        send_first[r] = offsets[r * El];
        send_rows[r] = offsets[(r + 1) * El] - offsets[r * El];
    }
}

int64_t ep_recv_layout(const int32_t *recv_counts, int P, int El, int64_t *recv_rows, int64_t *recv_first,
                       int32_t *local_offsets) {
    int64_t M = 0;
    for (int s = 0; s < P; s++) {
        recv_first[s] = M;
        recv_rows[s] = 0;
        for (int j = 0; j < El; j++) recv_rows[s] += recv_counts[s * El + j];
        M += recv_rows[s];
    }
    local_offsets[0] = 0;
    for (int j = 0; j < El; j++) {
        int64_t n = 0;
        for (int s = 0; s < P; s++) n += recv_counts[s * El + j];
        local_offsets[j + 1] = (int32_t)(local_offsets[j] + n);
    }
    return M;
}

void ep_recv_order(const int32_t *recv_counts, int P, int El, const int32_t *local_offsets, int32_t *order) {
    /* walk the received buffer in its order ([s][j]); each local expert's cursor starts at its segment
     * and advances source by source, which puts source s after sources 0..s-1 inside the segment */
    int32_t *cursor = xmalloc((size_t)El * sizeof(int32_t));
    memcpy(cursor, local_offsets, (size_t)El * sizeof(int32_t));
    int64_t t = 0;
    for (int s = 0; s < P; s++)
        for (int j = 0; j < El; j++)
            for (int32_t i = 0; i < recv_counts[s * El + j]; i++) order[t++] = cursor[j]++;
    free(cursor);
}

/* ---- the plan: counts exchanged, displacements, permutation ----------------------------------- */

EpDispatch *op_ep_dispatch_plan(Engine *e, const MoePlan *plan, const Comm *g) {
    if (!g) fatal("ep_dispatch: no expert-parallel group");
    const int P = g->size, E = plan->num_experts;
    if (E % P)
        fatal("ep_dispatch: %d experts do not split over the %d ranks of the expert-parallel group", E, P);
    const int El = E / P;
    engine_op_begin(e);
    EpDispatch *d = arena_alloc(&e->host, sizeof(EpDispatch));
    memset(d, 0, sizeof(*d));
    d->g = g;
    d->ranks = P;
    d->local_experts = El;
    d->rows_in = plan->rows->numel;
    int64_t *idx = arena_alloc(&e->host, 4 * (size_t)P * sizeof(int64_t));
    d->send_rows = idx, d->send_first = idx + P, d->recv_rows = idx + 2 * P, d->recv_first = idx + 3 * P;
    d->recv_counts = arena_alloc(&e->host, (size_t)P * El * sizeof(int32_t));

    int32_t *off = xmalloc((size_t)(E + 1) * sizeof(int32_t)), *counts = xmalloc((size_t)E * sizeof(int32_t));
    tensor_to_host(e, off, plan->offsets);
    ep_send_layout(off, P, El, d->send_rows, d->send_first);
    /* counts[e] for the experts of rank r form block r: exactly what rank r must learn from us */
    for (int x = 0; x < E; x++) counts[x] = off[x + 1] - off[x];
    if (P == 1) memcpy(d->recv_counts, counts, (size_t)El * sizeof(int32_t));
    else g->all_to_all(g, counts, d->recv_counts, El, DT_I32, DEV_CPU);
    free(counts);
    free(off);

    int32_t *local_off = xmalloc((size_t)(El + 1) * sizeof(int32_t));
    d->rows_out = ep_recv_layout(d->recv_counts, P, El, d->recv_rows, d->recv_first, local_off);
    d->offsets = engine_empty(e, DT_I32, SHAPE(El + 1));
    tensor_from_host(e, d->offsets, local_off);
    /* [s][j] is already [j][s] with one source or one local expert */
    if (P > 1 && El > 1) {
        int32_t *order = xmalloc((size_t)(d->rows_out > 0 ? d->rows_out : 1) * sizeof(int32_t));
        ep_recv_order(d->recv_counts, P, El, local_off, order);
        d->order = engine_empty(e, DT_I32, SHAPE(d->rows_out, 1));
        tensor_from_host(e, d->order, order);
        free(order);
    }
    free(local_off);
    engine_op_end_named(e, "ep_dispatch_plan");
    return d;
}

/* ---- the two exchanges ------------------------------------------------------------------------ */

/* src rows -> dst rows across the group: to_owners sends the dispatch direction (send ranges of xs,
 * receive ranges of the [s][j] buffer), else the return direction. */
static void exchange_rows(Engine *e, const EpDispatch *d, const Tensor *src, Tensor *dst, bool to_owners) {
    const int P = d->ranks;
    if (P == 1) { /* every row stays where it is (rows_in = rows_out): a local copy */
        if (src->numel) e->be->copy(dst->data, src->data, tensor_bytes(src));
        return;
    }
    const int64_t C = tensor_dim(src, -1);
    int64_t *c = xmalloc(4 * (size_t)P * sizeof(int64_t)), *sc = c, *sd = c + P, *rc = c + 2 * P, *rd = c + 3 * P;
    const int64_t *s_rows = to_owners ? d->send_rows : d->recv_rows, *s_first = to_owners ? d->send_first : d->recv_first;
    const int64_t *r_rows = to_owners ? d->recv_rows : d->send_rows, *r_first = to_owners ? d->recv_first : d->send_first;
    for (int r = 0; r < P; r++) {
        sc[r] = s_rows[r] * C, sd[r] = s_first[r] * C;
        rc[r] = r_rows[r] * C, rd[r] = r_first[r] * C;
    }
    d->g->all_to_allv(d->g, src->data, sc, sd, dst->data, rc, rd, src->dtype, src->device);
    free(c);
}

/* Dispatch direction, no tape: xs [rows_in, C] -> [M, C] grouped by local expert. */
static Tensor *to_owners(Engine *e, const EpDispatch *d, const Tensor *xs) {
    const int64_t C = tensor_dim(xs, -1);
    Tensor *recv = engine_empty(e, xs->dtype, SHAPE(d->rows_out, C));
    exchange_rows(e, d, xs, recv, true);
    if (!d->order) return recv;
    Tensor *xr = engine_empty(e, xs->dtype, SHAPE(d->rows_out, C));
    BACKEND_REQUIRE(e->be, moe_permute_forward);
    e->be->moe_permute_forward(xr, recv, d->order); /* xr[order[t]] = recv[t] */
    return xr;
}

/* Return direction, no tape: yr [M, C] grouped by local expert -> [rows_in, C] in xs's order. */
static Tensor *from_owners(Engine *e, const EpDispatch *d, const Tensor *yr) {
    const int64_t C = tensor_dim(yr, -1);
    const Tensor *send = yr;
    if (d->order) {
        Tensor *g = engine_zeros(e, yr->dtype, SHAPE(d->rows_out, C));
        BACKEND_REQUIRE(e->be, moe_permute_backward);
        e->be->moe_permute_backward(g, yr, d->order); /* g[t] = yr[order[t]]: back to [s][j] */
        send = g;
    }
    Tensor *ys = engine_empty(e, yr->dtype, SHAPE(d->rows_in, C));
    exchange_rows(e, d, send, ys, false);
    return ys;
}

/* ep_dispatch and ep_return: the dispatch plan both directions follow */
typedef struct EpParams {
    const EpDispatch *dispatch;
} EpParams;

Tensor *op_ep_dispatch(Engine *e, Tensor *xs, const EpDispatch *d) {
    check_shape("ep_dispatch", "xs", xs, SHAPE(d->rows_in, -1));
    engine_op_begin(e);
    Tensor *xr = to_owners(e, d, xs);
    if (engine_wants_grad(e, &xs, 1)) {
        Node *n = engine_record(e, OP_ep_dispatch, &xs, 1, &xr, 1);
        NODE_PARAMS(n, EpParams)->dispatch = d;
    }
    engine_op_end(e, OP_ep_dispatch);
    return xr;
}

void backward_ep_dispatch(Engine *e, Node *n) {
    /* the input requires grad (the node exists), so gx is there on every rank and the collective runs on all */
    Tensor *gx = engine_grad(e, n->in[0]);
    e->be->axpy(gx, from_owners(e, NODE_PARAMS(n, EpParams)->dispatch, n->out[0]->grad), 1.0f);
}

Tensor *op_ep_return(Engine *e, Tensor *yr, const EpDispatch *d) {
    check_shape("ep_return", "yr", yr, SHAPE(d->rows_out, -1));
    engine_op_begin(e);
    Tensor *ys = from_owners(e, d, yr);
    if (engine_wants_grad(e, &yr, 1)) {
        Node *n = engine_record(e, OP_ep_return, &yr, 1, &ys, 1);
        NODE_PARAMS(n, EpParams)->dispatch = d;
    }
    engine_op_end(e, OP_ep_return);
    return ys;
}

void backward_ep_return(Engine *e, Node *n) {
    Tensor *gy = engine_grad(e, n->in[0]);
    e->be->axpy(gy, to_owners(e, NODE_PARAMS(n, EpParams)->dispatch, n->out[0]->grad), 1.0f);
}
