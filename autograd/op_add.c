/* add and scale: the elementwise ops (residual connections, summing loss terms). */
#include "ops.h"

Tensor *op_add(Engine *e, Tensor *a, Tensor *b) {
    check_same_shape("add", a, b);
    engine_op_begin(e);
    Tensor *out = engine_empty_like(e, a);
    e->be->add(out, a, b);
    Tensor *in[2] = {a, b};
    if (engine_wants_grad(e, in, 2)) engine_record(e, OP_add, in, 2, &out, 1);
    engine_op_end(e, OP_add);
    return out;
}

void backward_add(Engine *e, Node *n) {
    Tensor *g = n->out[0]->grad;
    for (int i = 0; i < 2; i++) {
        Tensor *gi = engine_grad(e, n->in[i]);
        if (gi) e->be->axpy(gi, g, 1.0f);
    }
}

typedef struct ScaleParams {
    float alpha;
} ScaleParams;

Tensor *op_scale(Engine *e, Tensor *x, float alpha) {
    engine_op_begin(e);
    Tensor *out = engine_empty_like(e, x);
    e->be->copy(out->data, x->data, tensor_bytes(x));
    e->be->scale(out, alpha);
    if (engine_wants_grad(e, &x, 1)) {
        Node *n = engine_record(e, OP_scale, &x, 1, &out, 1);
        NODE_PARAMS(n, ScaleParams)->alpha = alpha;
    }
    engine_op_end(e, OP_scale);
    return out;
}

void backward_scale(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]);
    if (gx) e->be->axpy(gx, n->out[0]->grad, NODE_PARAMS(n, ScaleParams)->alpha);
}
