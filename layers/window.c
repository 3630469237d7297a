/* Sliding-window attention, block-granular (model.attention = "window"): each query reads the keys of
 * its own block and of the msa.local_blocks - 1 blocks before it in its document, plus the document's
 * first msa.init_blocks blocks (attention sinks), with exact softmax over them, causal inside its own
 * block; blocks of msa.block_size tokens count from each document's first token. A window of
 * local_blocks * block_size tokens (at least (local_blocks - 1) * block_size + 1 of them for each query).
 *
 * The selection is fixed by position, so this is MSA's sparse attention with only its forced blocks:
 * the same kernels (the plan and the block-sparse attention, backend.h), no index branch, no KL, no
 * auxiliary loss, and nothing to warm up (LayerContext.dense does not apply). The selection is built on
 * the host from the documents' boundaries and uploaded: one small copy each way per layer and forward. */
#include "window.h"

#include <stdlib.h>

#include "../autograd/ops.h"
#include "../kernels/util.h"
#include "msa.h"

typedef struct WindowLayer {
    AttentionFrame frame;
    MsaParams params; /* topk_blocks = init_blocks + local_blocks, all of them forced */
} WindowLayer;

static MsaParams window_params(const RunConfig *c) {
    MsaParams p = msa_settings(c).params;
    p.topk_blocks = p.init_blocks + p.local_blocks;
    return p;
}

/* topk [Hkv, N, K] of the documents cu[0..ndocs]: for each token its sink blocks and its window, ascending,
 * -1 in the slots a token near its document's start does not fill */
static void window_selection(int32_t *topk, const int32_t *cu, int64_t ndocs, int64_t Hkv, const MsaParams *p) {
    const int64_t N = cu[ndocs], K = p->topk_blocks;
    for (int64_t d = 0; d < ndocs; d++)
        for (int64_t t = cu[d]; t < cu[d + 1]; t++) {
            const int64_t own = (t - cu[d]) / p->block_size;
            const int64_t sinks = own + 1 < p->init_blocks ? own + 1 : p->init_blocks;
            const int64_t first = own - p->local_blocks + 1 > sinks ? own - p->local_blocks + 1 : sinks;
            int32_t *slot = topk + t * K;
            int64_t n = 0;
            for (int64_t b = 0; b < sinks; b++) slot[n++] = (int32_t)b;
            for (int64_t b = first; b <= own; b++) slot[n++] = (int32_t)b;
            while (n < K) slot[n++] = -1;
        }
    for (int64_t g = 1; g < Hkv; g++)
        for (int64_t i = 0; i < N * K; i++) topk[g * N * K + i] = topk[i];
}

Tensor *window_attend(Engine *e, const MsaParams *p, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens) {
    const int64_t N = q->shape[0], Hkv = k->shape[1], ndocs = cu_seqlens->numel - 1, K = p->topk_blocks;
    engine_op_begin(e);
    int32_t *cu = xmalloc((size_t)(ndocs + 1) * sizeof(int32_t));
    int32_t *sel = xmalloc((size_t)(Hkv * N * K) * sizeof(int32_t));
    tensor_to_host(e, cu, cu_seqlens);
    if (cu[0] != 0 || cu[ndocs] != N)
        fatal("window attention: cu_seqlens must run from 0 to N = %lld tokens, got %d .. %d", (long long)N, cu[0],
              cu[ndocs]);
    window_selection(sel, cu, ndocs, Hkv, p);
    Tensor *topk = engine_empty(e, DT_I32, SHAPE(Hkv, N, K));
    tensor_from_host(e, topk, sel);
    free(cu);
    free(sel);
    engine_op_end_named(e, "window_selection");
    engine_op_begin(e);
    Tensor *plan = engine_empty(e, DT_I32, SHAPE(Hkv, msa_plan_width(N, K)));
    BACKEND_REQUIRE(e->be, msa_plan);
    e->be->msa_plan(plan, topk, cu_seqlens, p);
    engine_op_end_named(e, "window_plan");
    return op_msa_attention(e, q, k, v, topk, plan, cu_seqlens, p, NULL);
}

static void window_declare(void *self, const LayerSetup *s) {
    WindowLayer *L = self;
    attention_declare(&L->frame, s);
    L->params = window_params(s->cfg);
    char why[256];
    if (!msa_check(&L->params, "msa.", why, sizeof why)) fatal("layer %d: %s", s->layer, why);
}

static Tensor *window_forward(void *self, Engine *e, Tensor *x, const LayerContext *ctx, Tensor **aux) {
    const WindowLayer *L = self;
    Tensor *q, *k, *v;
    attention_project(&L->frame, e, x, ctx, &q, &k, &v);
    *aux = NULL;
    return attention_output(&L->frame, e, window_attend(e, &L->params, q, k, v, ctx->cu_seqlens), ctx);
}

static bool window_requires(Device backend, const RunConfig *c, char *why, size_t n) {
    const MsaParams p = window_params(c);
    return msa_check(&p, "msa.", why, n) && attention_requires(backend, c, why, n);
}

const LayerKind attention_window = {
    .size = sizeof(WindowLayer),
    .requires = window_requires,
    .declare = window_declare,
    .forward = window_forward,
};
