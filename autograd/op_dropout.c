/* dropout: y = x * keep / (1 - p), keep drawn per element from (seed, offset + index)
 * (kernels/dropout_mask.h; seed: an i32 [2] tensor in the backend's memory, which must hold the same seed
 * until the backward). The mask is never stored: the backward regenerates it, and so does an
 * activation-recomputing replay of the forward, from the same (seed, offset). */
#include "ops.h"

typedef struct DropoutParams {
    float p;
    const Tensor *seed;
    int64_t offset;
} DropoutParams;

Tensor *op_dropout(Engine *e, Tensor *x, float p, const Tensor *seed, int64_t offset) {
    if (p == 0.0f) return x; /* no work, no call */
    engine_op_begin(e);
    Tensor *y = engine_empty_like(e, x);
    e->be->dropout_forward(y, x, p, seed, offset);
    if (engine_wants_grad(e, &x, 1)) {
        Node *n = engine_record(e, OP_dropout, &x, 1, &y, 1);
        *NODE_PARAMS(n, DropoutParams) = (DropoutParams){p, seed, offset};
    }
    engine_op_end(e, OP_dropout);
    return y;
}

void backward_dropout(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]);
    if (!gx) return;
    const DropoutParams *dp = NODE_PARAMS(n, DropoutParams);
    e->be->dropout_backward(gx, n->out[0]->grad, dp->p, dp->seed, dp->offset);
}
