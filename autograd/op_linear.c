/* linear: y = x W^T, W [out, in] (no bias, as Llama-family checkpoints). Leading dims of x are
 * flattened into rows, so [N, C] and [B, T, C] inputs both work. */
#include "ops.h"

Tensor *op_linear(Engine *e, Tensor *x, Tensor *w) { return op_linear_to(e, x, w, x->dtype); }

Tensor *op_linear_to(Engine *e, Tensor *x, Tensor *w, DType out) {
    check_shape("linear", "weight", w, SHAPE(-1, tensor_dim(x, -1)));
    engine_op_begin(e);
    int64_t shape[TENSOR_MAX_DIMS];
    for (int i = 0; i < x->ndim; i++) shape[i] = x->shape[i];
    shape[x->ndim - 1] = w->shape[0];
    Tensor *y = engine_empty(e, out, x->ndim, shape);
    Tensor x2 = tensor_as_rows(x), y2 = tensor_as_rows(y);
    e->be->matmul(&y2, &x2, w, false, true, 1.0f, 0.0f);
    Tensor *in[2] = {x, w};
    if (engine_wants_grad(e, in, 2)) engine_record(e, OP_linear, in, 2, &y, 1);
    engine_op_end(e, OP_linear);
    return y;
}

void backward_linear(Engine *e, Node *n) {
    Tensor *x = n->in[0], *w = n->in[1];
    Tensor dy = tensor_as_rows(n->out[0]->grad);
    Tensor *gx = engine_grad(e, x), *gw = engine_grad(e, w);
    if (gx) {
        Tensor gx2 = tensor_as_rows(gx);
        e->be->matmul(&gx2, &dy, w, false, false, 1.0f, 1.0f); /* dx += dy W */
    }
    if (gw) {
        Tensor x2 = tensor_as_rows(x);
        e->be->matmul(gw, &dy, &x2, true, false, 1.0f, 1.0f); /* dW += dy^T x */
    }
}
