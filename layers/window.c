/* Sliding-window attention, block-granular (model.attention = "window"): each query reads the keys of
 * its own block and of the msa.local_blocks - 1 blocks before it in its document, plus the document's
 * first msa.init_blocks blocks (attention sinks), with exact softmax over them, causal inside its own
 * block; blocks of msa.block_size tokens count from each document's first token. A window of
 * local_blocks * block_size tokens (at least (local_blocks - 1) * block_size + 1 of them for each query).
 *
 * The selection is fixed by position, so this is MSA's sparse attention with only its forced blocks:
 * the same kernels (the plan and the block-sparse attention, backend.h), no index branch, no KL, no
 * auxiliary loss, and nothing to warm up (LayerContext.dense does not apply). The selection is built on
 * the host from the documents' boundaries (and, split, the rank's tokens) and uploaded: small copies each way
 * per layer and forward.
 * Under sequence-split context parallelism a rank selects for its own queries and fetches the blocks of
 * their windows as MSA does (op_cp_fetch_blocks). */
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

/* topk [Hkv, Nq, K] of the query tokens (NULL: every token, Nq = N) of the documents cu[0..ndocs]: for each
 * its sink blocks and its window, ascending, -1 in the slots a token near its document's start does not fill */
static void window_selection(int32_t *topk, const int32_t *cu, int64_t ndocs, const int32_t *tokens, int64_t Nq,
                             int64_t Hkv, const MsaParams *p) {
    const int64_t N = cu[ndocs], K = p->topk_blocks;
    int32_t *doc_first = xmalloc((size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    for (int64_t d = 0; d < ndocs; d++)
        for (int64_t t = cu[d]; t < cu[d + 1]; t++) doc_first[t] = cu[d];
    for (int64_t i = 0; i < Nq; i++) {
        const int64_t t = tokens ? tokens[i] : i, own = (t - doc_first[t]) / p->block_size;
        const int64_t sinks = own + 1 < p->init_blocks ? own + 1 : p->init_blocks;
        const int64_t first = own - p->local_blocks + 1 > sinks ? own - p->local_blocks + 1 : sinks;
        int32_t *slot = topk + i * K;
        int64_t n = 0;
        for (int64_t b = 0; b < sinks; b++) slot[n++] = (int32_t)b;
        for (int64_t b = first; b <= own; b++) slot[n++] = (int32_t)b;
        while (n < K) slot[n++] = -1;
    }
    for (int64_t g = 1; g < Hkv; g++)
        for (int64_t i = 0; i < Nq * K; i++) topk[g * Nq * K + i] = topk[i];
    free(doc_first);
}

/* The selection of q's rows, whose tokens are tokens[] (NULL: row t is token t of the N = cu's last), uploaded */
static Tensor *window_topk(Engine *e, const MsaParams *p, const Tensor *cu_seqlens, const int32_t *tokens, int64_t Nq,
                           int64_t N, int64_t Hkv) {
    const int64_t ndocs = cu_seqlens->numel - 1, K = p->topk_blocks;
    engine_op_begin(e);
    int32_t *cu = xmalloc((size_t)(ndocs + 1) * sizeof(int32_t));
    int32_t *sel = xmalloc((size_t)(Hkv * Nq * K > 0 ? Hkv * Nq * K : 1) * sizeof(int32_t));
    tensor_to_host(e, cu, cu_seqlens);
    if (cu[0] != 0 || cu[ndocs] != N)
        fatal("window attention: cu_seqlens must run from 0 to N = %lld tokens, got %d .. %d", (long long)N, cu[0],
              cu[ndocs]);
    window_selection(sel, cu, ndocs, tokens, Nq, Hkv, p);
    Tensor *topk = engine_empty(e, DT_I32, SHAPE(Hkv, Nq, K));
    tensor_from_host(e, topk, sel);
    free(cu);
    free(sel);
    engine_op_end_named(e, "window_selection");
    return topk;
}

Tensor *window_attend(Engine *e, const MsaParams *p, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens) {
    const int64_t N = q->shape[0], Hkv = k->shape[1], K = p->topk_blocks;
    Tensor *topk = window_topk(e, p, cu_seqlens, NULL, N, N, Hkv);
    engine_op_begin(e);
    Tensor *plan = engine_empty(e, DT_I32, SHAPE(Hkv, msa_plan_width(N, K)));
    BACKEND_REQUIRE(e->be, msa_plan);
    e->be->msa_plan(plan, topk, cu_seqlens, p);
    engine_op_end_named(e, "window_plan");
    return op_msa_attention(e, q, k, v, topk, plan, cu_seqlens, p, NULL);
}

/* Under sequence-split context parallelism (layers/msa.c's split): this rank's queries (the tokens index) over
 * the blocks of their windows, fetched from the ranks that hold them (op_cp_fetch_blocks) */
static Tensor *window_attend_split(Engine *e, const MsaParams *p, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens,
                                   Tensor *index, const Comm *cp) {
    const int64_t n = q->shape[0], Hkv = k->shape[1];
    /* the tokens on the host for the selection: on a device one more copy right before window_topk's of
     * cu_seqlens, the two making the host wait once (the second finds nothing queued) */
    int32_t *tokens = xmalloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    tensor_to_host(e, tokens, index);
    Tensor *topk = window_topk(e, p, cu_seqlens, tokens, n, n * cp->size, Hkv), *vf, *key_rows;
    free(tokens);
    Tensor *kf = op_cp_fetch_blocks(e, k, v, topk, index, cu_seqlens, p->block_size, cp, &vf, &key_rows);
    MsaParams mine = *p;
    mine.query_index = index, mine.key_rows = key_rows;
    return op_msa_attention(e, q, kf, vf, topk, NULL, cu_seqlens, &mine, NULL);
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
    Tensor *o = ctx->cp_index && ctx->cp->size > 1
                    ? window_attend_split(e, &L->params, q, k, v, ctx->cu_seqlens, ctx->cp_index, ctx->cp)
                    : window_attend(e, &L->params, q, k, v, ctx->cu_seqlens);
    return attention_output(&L->frame, e, o, ctx);
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
