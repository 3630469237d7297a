/* swiglu_ffn: the SwiGLU feed-forward y = (silu(x Wg^T) * (x Wu^T)) Wd^T in one op, over row chunks, so that
 * its [N, F] intermediates exist for one chunk at a time (train.ffn_chunk_tokens; the "mini-sequence"
 * MLP of Luo et al. 2024, arXiv:2407.15892).
 *
 * Why: with train.recompute a block's backward replays its forward and then holds every intermediate of
 * the block at once. The feed-forward's are the largest: gate, up and their product, then their three
 * gradients, six [N, F] tensors with F about 2.75 d_model, against one [N, d_model] block input. At 64K
 * tokens of the ~1.1B model that is 4.4 GB of the block's 8 GB working set; at 256K, 17 GB.
 *
 * Forward: per chunk of `chunk_rows` rows, gate and up (two GEMMs), their SwiGLU product h, and the chunk's
 * rows of y (one GEMM); the chunk buffers are released when the op returns. Backward: per chunk, gate, up
 * and h again (two GEMMs and the SwiGLU more than the unfused ops), then dWd += dy^T h, dh = dy Wd, the
 * SwiGLU's backward into dgate and dup, dx += dup Wu and dx += dgate Wg, dWu += dup^T x, dWg += dgate^T x:
 * the unfused ops' rules in their tape order, restricted to the chunk's rows.
 *
 * With one chunk (chunk_rows >= N) nothing is recomputed: gate, up and h are kept for the backward as the
 * unfused op_linear / op_swiglu chain keeps them, and the kernel calls are that chain's, so the output and
 * every gradient are bit-identical to it. With several, dx is unchanged (rows are independent) and each
 * weight gradient sums the chunks' GEMMs (equal to float rounding). Every backend with a GEMM and the
 * SwiGLU kernels runs it. */
#include "../kernels/util.h"
#include "ops.h"

typedef struct SwigluFfnParams {
    int64_t chunk_rows;
    Tensor *gate, *up, *h; /* [N, F], kept only with one chunk */
} SwigluFfnParams;

/* gate, up and h = silu(gate) * up of rows [begin, begin + n) of x2 into the [n, F] buffers */
static void chunk_hidden(Engine *e, Tensor *gate, Tensor *up, Tensor *h, const Tensor *x2, const Tensor *wg,
                         const Tensor *wu, int64_t begin, int64_t n) {
    Tensor xc = tensor_first_dim_range(x2, begin, n);
    e->be->matmul(gate, &xc, wg, false, true, 1.0f, 0.0f);
    e->be->matmul(up, &xc, wu, false, true, 1.0f, 0.0f);
    e->be->swiglu_forward(h, gate, up);
}

Tensor *op_swiglu_ffn(Engine *e, Tensor *x, Tensor *wg, Tensor *wu, Tensor *wd, int64_t chunk_rows) {
    const int64_t C = tensor_dim(x, -1), F = wg->shape[0];
    check_shape("swiglu_ffn", "w_gate", wg, SHAPE(F, C));
    check_shape("swiglu_ffn", "w_up", wu, SHAPE(F, C));
    check_shape("swiglu_ffn", "w_down", wd, SHAPE(C, F));
    if (chunk_rows < 1) fatal("swiglu_ffn: chunk_rows = %lld, expected >= 1", (long long)chunk_rows);
    engine_op_begin(e);
    const int64_t N = tensor_rows(x), rows = N < chunk_rows ? N : chunk_rows;
    Tensor *y = engine_empty_like(e, x);
    const Tensor x2 = tensor_as_rows(x);
    Tensor y2 = tensor_as_rows(y);
    Tensor *in[4] = {x, wg, wu, wd};
    const bool grad = engine_wants_grad(e, in, 4);
    SwigluFfnParams p = {chunk_rows, NULL, NULL, NULL};
    if (rows == N && grad) {
        /* one chunk with a backward to come: the unfused chain's tensors, kept for it */
        p.gate = engine_empty(e, x->dtype, SHAPE(N, F));
        p.up = engine_empty(e, x->dtype, SHAPE(N, F));
        p.h = engine_empty(e, x->dtype, SHAPE(N, F));
        chunk_hidden(e, p.gate, p.up, p.h, &x2, wg, wu, 0, N);
        e->be->matmul(&y2, p.h, wd, false, true, 1.0f, 0.0f);
    } else {
        /* the chunk buffers live until the end of this forward (without a backward, a single chunk's too) */
        ArenaMark md = arena_mark(&e->data), mh = arena_mark(&e->host);
        Tensor *gate = engine_empty(e, x->dtype, SHAPE(rows, F)), *up = engine_empty(e, x->dtype, SHAPE(rows, F));
        Tensor *h = engine_empty(e, x->dtype, SHAPE(rows, F));
        for (int64_t begin = 0; begin < N; begin += rows) {
            const int64_t n = N - begin < rows ? N - begin : rows;
            Tensor gc = tensor_first_dim_range(gate, 0, n), uc = tensor_first_dim_range(up, 0, n);
            Tensor hc = tensor_first_dim_range(h, 0, n), yc = tensor_first_dim_range(&y2, begin, n);
            chunk_hidden(e, &gc, &uc, &hc, &x2, wg, wu, begin, n);
            e->be->matmul(&yc, &hc, wd, false, true, 1.0f, 0.0f);
        }
        arena_rewind(&e->data, md);
        arena_rewind(&e->host, mh);
    }
    if (grad) {
        Node *n = engine_record(e, OP_swiglu_ffn, in, 4, &y, 1);
        *NODE_PARAMS(n, SwigluFfnParams) = p;
    }
    engine_op_end(e, OP_swiglu_ffn);
    return y;
}

void backward_swiglu_ffn(Engine *e, Node *n) {
    const SwigluFfnParams *p = NODE_PARAMS(n, SwigluFfnParams);
    Tensor *x = n->in[0], *wg = n->in[1], *wu = n->in[2], *wd = n->in[3];
    Tensor *gx = engine_grad(e, x), *gwg = engine_grad(e, wg), *gwu = engine_grad(e, wu), *gwd = engine_grad(e, wd);
    const int64_t N = tensor_rows(x), F = wg->shape[0], rows = N < p->chunk_rows ? N : p->chunk_rows;
    if (N == 0) return;
    const Tensor x2 = tensor_as_rows(x), dy2 = tensor_as_rows(n->out[0]->grad);
    Tensor gx2 = gx ? tensor_as_rows(gx) : x2;
    ArenaMark md = arena_mark(&e->data), mh = arena_mark(&e->host);
    Tensor *gate = p->gate, *up = p->up, *h = p->h;
    if (!h) {
        gate = engine_empty(e, x->dtype, SHAPE(rows, F));
        up = engine_empty(e, x->dtype, SHAPE(rows, F));
        h = engine_empty(e, x->dtype, SHAPE(rows, F));
    }
    Tensor *dh = engine_empty(e, x->dtype, SHAPE(rows, F));
    Tensor *dgate = engine_empty(e, x->dtype, SHAPE(rows, F)), *dup = engine_empty(e, x->dtype, SHAPE(rows, F));
    for (int64_t begin = 0; begin < N; begin += rows) {
        const int64_t nr = N - begin < rows ? N - begin : rows;
        Tensor gc = tensor_first_dim_range(gate, 0, nr), uc = tensor_first_dim_range(up, 0, nr);
        Tensor hc = tensor_first_dim_range(h, 0, nr), dhc = tensor_first_dim_range(dh, 0, nr);
        Tensor dgc = tensor_first_dim_range(dgate, 0, nr), duc = tensor_first_dim_range(dup, 0, nr);
        Tensor xc = tensor_first_dim_range(&x2, begin, nr), dyc = tensor_first_dim_range(&dy2, begin, nr);
        if (!p->h) chunk_hidden(e, &gc, &uc, &hc, &x2, wg, wu, begin, nr);
        /* the down projection's rule, then the SwiGLU's (it adds into its gradients: zeroed first) */
        e->be->matmul(&dhc, &dyc, wd, false, false, 1.0f, 0.0f); /* dh = dy Wd */
        if (gwd) e->be->matmul(gwd, &dyc, &hc, true, false, 1.0f, 1.0f); /* dWd += dy^T h */
        e->be->zero(dgc.data, tensor_bytes(&dgc));
        e->be->zero(duc.data, tensor_bytes(&duc));
        e->be->swiglu_backward(&dgc, &duc, &dhc, &gc, &uc);
        /* the up projection's rule before the gate's: the unfused tape's order */
        if (gx) {
            Tensor gxc = tensor_first_dim_range(&gx2, begin, nr);
            e->be->matmul(&gxc, &duc, wu, false, false, 1.0f, 1.0f); /* dx += dup Wu */
            if (gwu) e->be->matmul(gwu, &duc, &xc, true, false, 1.0f, 1.0f); /* dWu += dup^T x */
            e->be->matmul(&gxc, &dgc, wg, false, false, 1.0f, 1.0f); /* dx += dgate Wg */
        } else if (gwu) e->be->matmul(gwu, &duc, &xc, true, false, 1.0f, 1.0f);
        if (gwg) e->be->matmul(gwg, &dgc, &xc, true, false, 1.0f, 1.0f); /* dWg += dgate^T x */
    }
    arena_rewind(&e->data, md);
    arena_rewind(&e->host, mh);
}
