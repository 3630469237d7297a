/* embedding: out[n, :] = W[tokens[n], :]; backward scatter-adds into W's gradient. */
#include "../kernels/util.h"
#include "ops.h"

Tensor *op_embedding(Engine *e, Tensor *w, Tensor *tokens) {
    if (tokens->dtype != DT_I32) fatal("embedding: tokens must be i32, got %s", dtype_name(tokens->dtype));
    if (w->ndim != 2) fatal("embedding: table must be 2-D");
    /* the output is an activation: the engine's activation dtype (BF16 on CUDA, where the table is
     * F32 master weights; the table's own dtype on the CPU) */
    engine_op_begin(e);
    Tensor *out = engine_empty(e, e->act_dtype, SHAPE(tokens->numel, w->shape[1]));
    e->be->embedding_forward(out, w, tokens);
    if (engine_wants_grad(e, &w, 1)) {
        Tensor *in[2] = {w, tokens};
        engine_record(e, OP_embedding, in, 2, &out, 1);
    }
    engine_op_end(e, OP_embedding);
    return out;
}

void backward_embedding(Engine *e, Node *n) {
    Tensor *gw = engine_grad(e, n->in[0]);
    if (gw) e->be->embedding_backward(gw, n->out[0]->grad, n->in[1]);
}
