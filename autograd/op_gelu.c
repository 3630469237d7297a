/* gelu: y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's activation; the backward recomputes
 * f'(x) from the saved input. */
#include "ops.h"

Tensor *op_gelu(Engine *e, Tensor *x) {
    engine_op_begin(e);
    Tensor *y = engine_empty_like(e, x);
    e->be->gelu_forward(y, x);
    if (engine_wants_grad(e, &x, 1)) engine_record(e, OP_gelu, &x, 1, &y, 1);
    engine_op_end(e, OP_gelu);
    return y;
}

void backward_gelu(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]);
    if (gx) e->be->gelu_backward(gx, n->out[0]->grad, n->in[0]);
}
