/* rmsnorm: RMSNorm over the last dim with an optional learnable gain (plain w, or Gemma's 1 + w).
 * Applied to [N, C] for the block norms and to [N, H, D] for per-head q/k norms. add_rmsnorm: a residual
 * add and the RMSNorm of its sum in one op (the residual stream of a transformer block). */
#include "ops.h"

typedef struct RmsnormParams {
    Tensor *rstd; /* [rows] */
    bool unit_offset;
} RmsnormParams;

Tensor *op_rmsnorm(Engine *e, Tensor *x, Tensor *w, float eps, bool unit_offset) {
    if (w) check_shape("rmsnorm", "gain", w, SHAPE(tensor_dim(x, -1)));
    engine_op_begin(e);
    Tensor *y = engine_empty_like(e, x);
    Tensor *rstd = engine_empty(e, stat_dtype(x->dtype), SHAPE(tensor_rows(x)));
    e->be->rmsnorm_forward(y, rstd, x, w, eps, unit_offset);
    Tensor *in[2] = {x, w};
    if (engine_wants_grad(e, in, 2)) {
        Node *n = engine_record(e, OP_rmsnorm, in, 2, &y, 1);
        *NODE_PARAMS(n, RmsnormParams) = (RmsnormParams){rstd, unit_offset};
    }
    engine_op_end(e, OP_rmsnorm);
    return y;
}

void backward_rmsnorm(Engine *e, Node *n) {
    Tensor *x = n->in[0], *w = n->in[1];
    Tensor *gx = engine_grad(e, x), *gw = engine_grad(e, w);
    const RmsnormParams *rp = NODE_PARAMS(n, RmsnormParams);
    if (gx || gw) e->be->rmsnorm_backward(gx, gw, n->out[0]->grad, x, w, rp->rstd, rp->unit_offset);
}

typedef struct AddRmsnormParams {
    Tensor *rstd; /* [rows] of h */
} AddRmsnormParams;

Tensor *op_add_rmsnorm(Engine *e, Tensor *x, Tensor *r, Tensor *w, float eps, Tensor **h_out) {
    check_same_shape("add_rmsnorm", x, r);
    if (w) check_shape("add_rmsnorm", "gain", w, SHAPE(tensor_dim(x, -1)));
    engine_op_begin(e);
    Tensor *h = engine_empty_like(e, x), *y = engine_empty_like(e, x);
    Tensor *rstd = engine_empty(e, stat_dtype(x->dtype), SHAPE(tensor_rows(x)));
    e->be->add_rmsnorm_forward(h, y, rstd, x, r, w, eps);
    Tensor *in[3] = {x, r, w};
    if (engine_wants_grad(e, in, 3)) {
        Tensor *out[2] = {h, y};
        Node *n = engine_record(e, OP_add_rmsnorm, in, 3, out, 2);
        NODE_PARAMS(n, AddRmsnormParams)->rstd = rstd;
    }
    engine_op_end(e, OP_add_rmsnorm);
    *h_out = h;
    return y;
}

void backward_add_rmsnorm(Engine *e, Node *n) {
    Tensor *x = n->in[0], *r = n->in[1], *w = n->in[2], *h = n->out[0];
    Tensor *gx = engine_grad(e, x), *gr = engine_grad(e, r), *gw = engine_grad(e, w);
    Tensor *dh = h->grad, *dy = n->out[1]->grad;
    if (!dy) { /* only h was used: the add's backward */
        if (gx) e->be->axpy(gx, dh, 1.0f);
        if (gr) e->be->axpy(gr, dh, 1.0f);
        return;
    }
    if (gx || gr || gw) e->be->add_rmsnorm_backward(gx, gr, gw, dy, dh, h, w, NODE_PARAMS(n, AddRmsnormParams)->rstd);
}
