/* dropout: y = x * keep / (1 - p), keep drawn per element from (seed, offset + index)
 * (kernels/dropout_mask.h). The mask is never stored: the backward regenerates it, and so does an
 * activation-recomputing replay of the forward, from the same (seed, offset).
 * Scalars: f[0] = p; i[0] = seed (the bits of a uint64), i[1] = offset. */
#include <string.h>

#include "ops.h"

Tensor *op_dropout(Engine *e, Tensor *x, float p, uint64_t seed, int64_t offset) {
    if (p == 0.0f) return x; /* no work, no call */
    engine_op_begin(e);
    Tensor *y = engine_empty_like(e, x);
    e->be->dropout_forward(y, x, p, seed, offset);
    if (engine_wants_grad(e, &x, 1)) {
        Node *n = engine_record(e, OP_dropout, &x, 1, &y, 1);
        n->f[0] = p;
        memcpy(&n->i[0], &seed, sizeof seed);
        n->i[1] = offset;
    }
    engine_op_end(e, OP_dropout);
    return y;
}

void backward_dropout(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]);
    if (!gx) return;
    uint64_t seed;
    memcpy(&seed, &n->i[0], sizeof seed);
    e->be->dropout_backward(gx, n->out[0]->grad, (float)n->f[0], seed, n->i[1]);
}
