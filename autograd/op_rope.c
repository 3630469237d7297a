/* rope: rotary position embedding on [N, H, D] (q or k, after their per-head norms), by the frequencies
 * and cos/sin scale of a RopeTable (layers/rope_scaling.h). Linear in x, so the backward needs only the
 * positions and the table: dx += s R(-angle) dy. */
#include "../kernels/util.h"
#include "ops.h"

typedef struct RopeParams {
    const RopeTable *rope; /* in the engine's host arena, as long as the node */
} RopeParams;

Tensor *op_rope(Engine *e, Tensor *x, Tensor *positions, const RopeTable *rope) {
    if (x->ndim != 3) fatal("rope: x must be [N, H, D], got %d dims", x->ndim);
    if (positions->dtype != DT_I32) fatal("rope: positions must be i32, got %s", dtype_name(positions->dtype));
    check_shape("rope", "positions", positions, SHAPE(x->shape[0]));
    if (rope->rotary_dim <= 0 || rope->rotary_dim % 2 != 0 || rope->rotary_dim > x->shape[2])
        fatal("rope: rotary_dim %d must be even and in [2, head dim %lld]", rope->rotary_dim, (long long)x->shape[2]);
    engine_op_begin(e);
    Tensor *y = engine_empty_like(e, x);
    e->be->rope_forward(y, x, positions, rope);
    if (engine_wants_grad(e, &x, 1)) {
        Tensor *in[2] = {x, positions};
        Node *n = engine_record(e, OP_rope, in, 2, &y, 1);
        *NODE_PARAMS(n, RopeParams) = (RopeParams){rope};
    }
    engine_op_end(e, OP_rope);
    return y;
}

void backward_rope(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]);
    const RopeParams *rp = NODE_PARAMS(n, RopeParams);
    if (gx) e->be->rope_backward(gx, n->out[0]->grad, n->in[1], rp->rope);
}
