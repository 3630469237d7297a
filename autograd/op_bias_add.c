/* bias_add: y = x + b, b broadcast over every row of x (b has x's last dim). The q/k/v projection
 * biases of Qwen2-family checkpoints (model.qkv_bias); kept apart from op_linear so the bias-free
 * Llama path stays one GEMM. */
#include "ops.h"

#include "../kernels/util.h"

Tensor *op_bias_add(Engine *e, Tensor *x, Tensor *b) {
    check_shape("bias_add", "bias", b, SHAPE(tensor_dim(x, -1)));
    if (!e->be->bias_add_forward) /* a backend that has not caught up yet: say so rather than crash */
        fatal("the %s backend has no bias_add kernel (needed by model.qkv_bias)", e->be->name);
    engine_op_begin(e);
    Tensor *y = engine_empty_like(e, x);
    Tensor x2 = tensor_as_rows(x), y2 = tensor_as_rows(y);
    e->be->bias_add_forward(&y2, &x2, b);
    Tensor *in[2] = {x, b};
    if (engine_wants_grad(e, in, 2)) engine_record(e, OP_bias_add, in, 2, &y, 1);
    engine_op_end(e, OP_bias_add);
    return y;
}

void backward_bias_add(Engine *e, Node *n) {
    Tensor *dy = n->out[0]->grad;
    Tensor *gx = engine_grad(e, n->in[0]), *gb = engine_grad(e, n->in[1]);
    if (gx) e->be->axpy(gx, dy, 1.0f); /* dx += dy */
    if (gb) {
        Tensor dy2 = tensor_as_rows(dy);
        e->be->bias_add_backward(gb, &dy2); /* db += sum over rows of dy */
    }
}
