/* cross_entropy: scalar mean over non-ignored rows of -log softmax(logits)[target], in fp32 or better
 * (the logits' own dtype on CPU). */
#include "../kernels/util.h"
#include "ops.h"

typedef struct CrossEntropyParams {
    Tensor *lse; /* [N] */
    int ignore_index;
    int64_t n_valid; /* rows whose target counts */
} CrossEntropyParams;

Tensor *op_cross_entropy(Engine *e, Tensor *logits, Tensor *targets, int ignore_index) {
    if (targets->dtype != DT_I32) fatal("cross_entropy: targets must be i32");
    if (targets->numel != tensor_rows(logits))
        fatal("cross_entropy: %lld targets for %lld rows of logits", (long long)targets->numel, (long long)tensor_rows(logits));
    engine_op_begin(e);
    DType sd = stat_dtype(logits->dtype);
    Tensor *loss = engine_empty(e, sd, SHAPE(1));
    Tensor *lse = engine_empty(e, sd, SHAPE(tensor_rows(logits)));
    int64_t n_valid = e->be->cross_entropy_forward(loss, lse, logits, targets, ignore_index);
    if (engine_wants_grad(e, &logits, 1)) {
        Tensor *in[2] = {logits, targets};
        Node *n = engine_record(e, OP_cross_entropy, in, 2, &loss, 1);
        *NODE_PARAMS(n, CrossEntropyParams) = (CrossEntropyParams){lse, ignore_index, n_valid};
    }
    engine_op_end(e, OP_cross_entropy);
    return loss;
}

void backward_cross_entropy(Engine *e, Node *n) {
    Tensor *gl = engine_grad(e, n->in[0]);
    const CrossEntropyParams *cp = NODE_PARAMS(n, CrossEntropyParams);
    if (gl) e->be->cross_entropy_backward(gl, n->out[0]->grad, n->in[0], cp->lse, n->in[1], cp->ignore_index, cp->n_valid);
}
