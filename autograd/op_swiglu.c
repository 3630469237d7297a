/* swiglu: out = silu(gate) * up, the gated activation of the SwiGLU feed-forward. */
#include "ops.h"

Tensor *op_swiglu(Engine *e, Tensor *gate, Tensor *up) {
    check_same_shape("swiglu", gate, up);
    engine_op_begin(e);
    Tensor *out = engine_empty_like(e, gate);
    e->be->swiglu_forward(out, gate, up);
    Tensor *in[2] = {gate, up};
    if (engine_wants_grad(e, in, 2)) engine_record(e, OP_swiglu, in, 2, &out, 1);
    engine_op_end(e, OP_swiglu);
    return out;
}

void backward_swiglu(Engine *e, Node *n) {
    Tensor *gg = engine_grad(e, n->in[0]), *gu = engine_grad(e, n->in[1]);
    if (gg || gu) e->be->swiglu_backward(gg, gu, n->out[0]->grad, n->in[0], n->in[1]);
}
