/* lm_head_loss: the LM head (logits = x W^T) and the mean token cross-entropy in one op, over chunks of
 * chunk_rows rows, so that the [N, V] logits and their gradient never exist at once: at 128K tokens and
 * a 32000-entry vocabulary they would take 8 GB each in BF16, more than all the saved block inputs of
 * a 1.1B model together.
 *
 * Forward: per chunk, the chunk's logits (one GEMM) and their cross-entropy; only the per-row
 * log-sum-exp [N] is kept. Backward: per chunk, the logits again (one GEMM more than the unfused pair),
 * dlogits = dloss (softmax - onehot) / n_valid, dx += dlogits W, dW += dlogits^T x. Both use the
 * backend's GEMM and cross-entropy entries, so every backend that has those runs it (cuBLAS on CUDA).
 *
 * The logits are kept in the statistics dtype (F32 for BF16 activations): the GEMM accumulates in F32
 * anyway, and rounding them to BF16 first costs the softmax an error of |logit| x 2^-9 in each
 * probability (2-3% for the largest logits of a 32000-entry vocabulary), which reached 1% in dW and dx.
 * Their gradient is in the activation dtype, as the GEMMs read it; the weight gradient has the weight's
 * dtype (F32), and every chunk's GEMM adds into it with beta = 1 in F32.
 *
 * With one chunk (chunk_rows >= N) on F32 or F64 activations the kernel calls are exactly those of
 * op_linear followed by op_cross_entropy, so the loss and the gradients are bit-identical to them. With
 * several, the loss is the mean of the chunks' means weighted by their counted rows (a different
 * summation order: equal to float rounding) and the weight gradient sums the chunks' GEMMs. */
#include "../kernels/util.h"
#include "ops.h"

typedef struct LmHeadLossParams {
    Tensor *lse; /* [N] */
    int ignore_index;
    int64_t n_valid; /* rows whose target counts */
    int64_t chunk_rows;
} LmHeadLossParams;

/* The logits of rows [begin, begin + n) of x2 into logits (a [n, V] buffer). */
static void chunk_logits(Engine *e, Tensor *logits, const Tensor *x2, const Tensor *w, int64_t begin, int64_t n) {
    Tensor xc = tensor_first_dim_range(x2, begin, n);
    e->be->matmul(logits, &xc, w, false, true, 1.0f, 0.0f);
}

Tensor *op_lm_head_loss(Engine *e, Tensor *x, Tensor *w, Tensor *targets, int ignore_index, int64_t chunk_rows) {
    check_shape("lm_head_loss", "weight", w, SHAPE(-1, tensor_dim(x, -1)));
    if (targets->dtype != DT_I32) fatal("lm_head_loss: targets must be i32");
    const int64_t N = tensor_rows(x), V = w->shape[0];
    if (targets->numel != N)
        fatal("lm_head_loss: %lld targets for %lld rows of hidden states", (long long)targets->numel, (long long)N);
    if (chunk_rows < 1) fatal("lm_head_loss: chunk_rows = %lld, expected >= 1", (long long)chunk_rows);
    engine_op_begin(e);
    const DType sd = stat_dtype(x->dtype);
    Tensor *loss = engine_empty(e, sd, SHAPE(1));
    Tensor *lse = engine_empty(e, sd, SHAPE(N));
    const Tensor x2 = tensor_as_rows(x);
    const int64_t rows = N < chunk_rows ? N : chunk_rows;
    /* the chunk buffers live until the end of this forward */
    ArenaMark md = arena_mark(&e->data), mh = arena_mark(&e->host);
    Tensor *logits = engine_empty(e, sd, SHAPE(rows > 0 ? rows : 1, V));
    int64_t n_valid = 0;
    if (rows == N) {
        chunk_logits(e, logits, &x2, w, 0, N);
        n_valid = e->be->cross_entropy_forward(loss, lse, logits, targets, ignore_index);
    } else {
        Tensor *chunk_loss = engine_empty(e, sd, SHAPE(1));
        e->be->zero(loss->data, tensor_bytes(loss));
        for (int64_t begin = 0; begin < N; begin += rows) {
            const int64_t n = N - begin < rows ? N - begin : rows;
            Tensor lc = tensor_first_dim_range(logits, 0, n), lsec = tensor_first_dim_range(lse, begin, n);
            Tensor tc = tensor_first_dim_range(targets, begin, n);
            chunk_logits(e, &lc, &x2, w, begin, n);
            const int64_t counted = e->be->cross_entropy_forward(chunk_loss, &lsec, &lc, &tc, ignore_index);
            /* the chunk's mean back to its sum, so that the total is the mean over all counted rows */
            if (counted) e->be->axpy(loss, chunk_loss, (float)counted);
            n_valid += counted;
        }
        if (n_valid) e->be->scale(loss, (float)(1.0 / (double)n_valid));
    }
    arena_rewind(&e->data, md);
    arena_rewind(&e->host, mh);
    Tensor *in[3] = {x, w, targets};
    if (engine_wants_grad(e, in, 2)) {
        Node *n = engine_record(e, OP_lm_head_loss, in, 3, &loss, 1);
        *NODE_PARAMS(n, LmHeadLossParams) = (LmHeadLossParams){lse, ignore_index, n_valid, chunk_rows};
    }
    engine_op_end(e, OP_lm_head_loss);
    return loss;
}

void backward_lm_head_loss(Engine *e, Node *n) {
    const LmHeadLossParams *lp = NODE_PARAMS(n, LmHeadLossParams);
    Tensor *x = n->in[0], *w = n->in[1], *targets = n->in[2], *dloss = n->out[0]->grad;
    Tensor *gx = engine_grad(e, x), *gw = engine_grad(e, w);
    const int64_t N = tensor_rows(x), V = w->shape[0];
    if ((!gx && !gw) || N == 0) return;
    const Tensor x2 = tensor_as_rows(x);
    Tensor gx2 = gx ? tensor_as_rows(gx) : x2;
    const int64_t rows = N < lp->chunk_rows ? N : lp->chunk_rows;
    ArenaMark md = arena_mark(&e->data), mh = arena_mark(&e->host);
    Tensor *logits = engine_empty(e, stat_dtype(x->dtype), SHAPE(rows, V));
    Tensor *dlogits = engine_empty(e, x->dtype, SHAPE(rows, V));
    for (int64_t begin = 0; begin < N; begin += rows) {
        const int64_t nr = N - begin < rows ? N - begin : rows;
        Tensor lc = tensor_first_dim_range(logits, 0, nr), dlc = tensor_first_dim_range(dlogits, 0, nr);
        Tensor lsec = tensor_first_dim_range(lp->lse, begin, nr), tc = tensor_first_dim_range(targets, begin, nr);
        chunk_logits(e, &lc, &x2, w, begin, nr);
        e->be->zero(dlc.data, tensor_bytes(&dlc));
        e->be->cross_entropy_backward(&dlc, dloss, &lc, &lsec, &tc, lp->ignore_index, lp->n_valid);
        if (gx) {
            Tensor gxc = tensor_first_dim_range(&gx2, begin, nr);
            e->be->matmul(&gxc, &dlc, w, false, false, 1.0f, 1.0f); /* dx += dlogits W */
        }
        if (gw) {
            Tensor xc = tensor_first_dim_range(&x2, begin, nr);
            e->be->matmul(gw, &dlc, &xc, true, false, 1.0f, 1.0f); /* dW += dlogits^T x */
        }
    }
    arena_rewind(&e->data, md);
    arena_rewind(&e->host, mh);
}
