/* rmsnorm: RMSNorm over the last dim with an optional learnable gain (plain w, or Gemma's 1 + w).
 * Applied to [N, C] for the block norms and to [N, H, D] for per-head q/k norms. */
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
