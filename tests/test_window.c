/* The sliding-window attention variant (layers/window.c, model.attention = "window"): its attention
 * against softmax attention under the window's mask written here from the definition, in float64; its
 * finite-difference gradients; a model whose windows cover every document is the dense model; and the
 * whole model's gradient check with window layers. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../layers/window.h"
#include "../train/model.h"
#include "gradcheck.h"
#include "test.h"

#define TOL 1e-6

typedef struct WindowCase {
    int B, init, local;
    int lens[3], ndocs;
} WindowCase;

static const WindowCase CASES[] = {
    {3, 0, 2, {11, 7}, 2},     /* a plain window of 2 blocks */
    {2, 1, 1, {9, 4, 6}, 3},   /* one sink block and the query's own block only */
    {4, 2, 3, {21}, 1},        /* sinks and window overlap near the start */
};
#define N_CASES ((int)(sizeof CASES / sizeof CASES[0]))

static MsaParams case_params(const WindowCase *c, int D) {
    return (MsaParams){.block_size = c->B, .topk_blocks = c->init + c->local, .init_blocks = c->init,
                       .local_blocks = c->local, .scale = 1.0f / sqrtf((float)D), .index_scale = 1.0f};
}

/* May query t (in the document starting at s) see key j? Causal, same document, and j's block is a sink
 * or one of the local_blocks blocks ending at t's own. */
static bool visible(const MsaParams *p, int64_t s, int64_t t, int64_t j) {
    const int64_t own = (t - s) / p->block_size, bj = (j - s) / p->block_size;
    return j >= s && j <= t && (bj < p->init_blocks || bj > own - p->local_blocks);
}

/* out [N, Hq, D] of softmax attention over the visible keys, in float64 */
static void reference(const Tensor *q, const Tensor *k, const Tensor *v, const int32_t *cu, int ndocs,
                      const MsaParams *p, double *out) {
    const int64_t Hq = q->shape[1], Hkv = k->shape[1], D = q->shape[2];
    for (int d = 0; d < ndocs; d++)
        for (int64_t t = cu[d]; t < cu[d + 1]; t++)
            for (int64_t h = 0; h < Hq; h++) {
                const int64_t g = h / (Hq / Hkv);
                double mx = -INFINITY, sum = 0, w[64];
                for (int64_t j = cu[d]; j <= t; j++) {
                    if (!visible(p, cu[d], t, j)) continue;
                    double s = 0;
                    for (int64_t i = 0; i < D; i++) s += tensor_get(q, (t * Hq + h) * D + i) * tensor_get(k, (j * Hkv + g) * D + i);
                    w[j - cu[d]] = s * p->scale;
                    mx = fmax(mx, w[j - cu[d]]);
                }
                for (int64_t j = cu[d]; j <= t; j++)
                    if (visible(p, cu[d], t, j)) sum += exp(w[j - cu[d]] - mx);
                for (int64_t i = 0; i < D; i++) {
                    double o = 0;
                    for (int64_t j = cu[d]; j <= t; j++)
                        if (visible(p, cu[d], t, j)) o += exp(w[j - cu[d]] - mx) / sum * tensor_get(v, (j * Hkv + g) * D + i);
                    out[(t * Hq + h) * D + i] = o;
                }
            }
}

TEST(window_matches_masked_softmax_reference) {
    Engine *e = tc->fixture;
    const int Hq = 4, Hkv = 2, D = 4;
    for (int ci = 0; ci < N_CASES; ci++) {
        const WindowCase *c = &CASES[ci];
        int N = 0;
        for (int d = 0; d < c->ndocs; d++) N += c->lens[d];
        const MsaParams p = case_params(c, D);
        Tensor *q = test_randn(DT_F64, SHAPE(N, Hq, D), 1.5, 10 + ci), *k = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 20 + ci);
        Tensor *v = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 30 + ci), *cu = test_cu_seqlens(c->lens, c->ndocs);
        double *ref = calloc((size_t)(N * Hq * D), sizeof(double));
        reference(q, k, v, cu->data, c->ndocs, &p, ref);
        engine_reset(e);
        Tensor *out = window_attend(e, &p, q, k, v, cu);
        const double err = rel_err(out->data, ref, out->numel);
        free(ref);
        test_tensor_free(q);
        test_tensor_free(k);
        test_tensor_free(v);
        test_tensor_free(cu);
        EXPECT(err < 1e-12, "case %d (block %d, init %d, local %d): relative error %.3e", ci, c->B, c->init, c->local, err);
    }
}

typedef struct GradCtx {
    MsaParams p;
    Tensor *cu;
} GradCtx;

static Tensor *f_window(Engine *e, Tensor **in, void *ctx) {
    GradCtx *g = ctx;
    return window_attend(e, &g->p, in[0], in[1], in[2], g->cu);
}

TEST(window_gradients_match_finite_differences) {
    Engine *e = tc->fixture;
    for (int ci = 0; ci < N_CASES; ci++) {
        const WindowCase *c = &CASES[ci];
        int N = 0;
        for (int d = 0; d < c->ndocs; d++) N += c->lens[d];
        GradCtx g = {case_params(c, 4), test_cu_seqlens(c->lens, c->ndocs)};
        Tensor *in[3] = {test_randn(DT_F64, SHAPE(N, 4, 4), 1.5, 40 + ci), test_randn(DT_F64, SHAPE(N, 2, 4), 1.0, 50 + ci),
                         test_randn(DT_F64, SHAPE(N, 2, 4), 1.0, 60 + ci)};
        for (int i = 0; i < 3; i++) test_requires_grad(in[i]);
        GradCheckResult r = gradcheck(e, f_window, in, 3, &g, 0, 70 + ci);
        for (int i = 0; i < 3; i++) test_tensor_free(in[i]);
        test_tensor_free(g.cu);
        EXPECT(r.max_rel_err < TOL && r.numeric_norm > 0, "case %d: input %d rel err %.3e (numeric norm %.3e)", ci,
               r.worst_input, r.max_rel_err, r.numeric_norm);
    }
}

/* ---- the variant in the model ---- */

enum { T_TOKENS = 21 };
static const int32_t TOKENS[T_TOKENS] = {1, 5, 2, 9, 3, 3, 7, 0, 4, 10, 6, 2, 8, 1, 1, 5, 9, 3, 2, 7, 4};
static const int32_t CU[3] = {0, 9, 21};

static RunConfig tiny_config(const char *attention) {
    RunConfig c;
    config_defaults(&c);
    c.model.vocab_size = 11;
    c.model.d_model = 12;
    c.model.n_layers = 2;
    c.model.n_heads = 4;
    c.model.n_kv_heads = 2;
    c.model.head_dim = 4;
    c.model.ffn_dim = 10;
    c.model.qk_norm = true;
    c.model.tie_embeddings = false;
    c.model.init_std = 0.3f;
    snprintf(c.model.attention, sizeof c.model.attention, "%s", attention);
    snprintf(c.model.msa_layers, sizeof c.model.msa_layers, "1-"); /* layer 0 dense */
    c.msa.block_size = 3;
    c.msa.init_blocks = 1;
    c.msa.local_blocks = 1;
    return c;
}

static ModelInput make_input(Engine *e) {
    int32_t targets[T_TOKENS], positions[T_TOKENS];
    for (int t = 0; t < T_TOKENS; t++) {
        targets[t] = t + 1 == CU[1] || t + 1 == CU[2] ? -1 : TOKENS[t + 1];
        positions[t] = t < CU[1] ? t : t - CU[1];
    }
    Batch b = {.B = 1, .T = T_TOKENS, .inputs = (int32_t *)TOKENS, .targets = targets, .positions = positions,
               .cu_seqlens = (int32_t *)CU, .n_segments = 2};
    return model_upload(e, &b);
}

static double loss_and_grads(Engine *e, Model *m, double *grads) {
    params_zero_grad(&m->params);
    engine_reset(e);
    ModelInput in = make_input(e);
    Tensor *loss = model_forward(m, e, &in, false).total;
    engine_backward(e, loss);
    memcpy(grads, m->params.grad, (size_t)m->params.numel * sizeof(double));
    return tensor_item(e, loss);
}

/* With windows that reach every document's start, window attention is dense attention: the same
 * parameters (the same names, so the same initial values) give the same loss and gradients. */
TEST(window_covering_every_document_is_dense_attention) {
    Engine *e = tc->fixture;
    RunConfig cw = tiny_config("window"), cd = tiny_config("dense");
    cw.msa.local_blocks = 4; /* 12 tokens >= the longer document */
    Model mw, md;
    model_build(&mw, &cw, &cpu_backend, DT_F64, 3);
    model_build(&md, &cd, &cpu_backend, DT_F64, 3);
    EXPECT(mw.params.numel == md.params.numel, "%lld vs %lld parameters", (long long)mw.params.numel,
           (long long)md.params.numel);
    double *gw = malloc((size_t)mw.params.numel * sizeof(double)), *gd = malloc((size_t)md.params.numel * sizeof(double));
    const double lw = loss_and_grads(e, &mw, gw), ld = loss_and_grads(e, &md, gd);
    const double err = rel_err(gw, gd, md.params.numel);
    free(gw);
    free(gd);
    model_free(&mw);
    model_free(&md);
    EXPECT(fabs(lw - ld) <= 1e-13 * ld && err < 1e-12, "loss %.17g vs dense %.17g, gradients differ by %.3e", lw, ld, err);
}

/* A narrow window (one sink block and the query's own block) changes the loss, and every parameter's
 * gradient matches finite differences. */
static Tensor *f_model(Engine *e, Tensor **inputs, void *ctx) {
    (void)inputs; /* the parameters are read through the model */
    ModelInput in = make_input(e);
    return model_forward(ctx, e, &in, false).total;
}

TEST(window_model_gradcheck_all_parameters) {
    Engine *e = tc->fixture;
    RunConfig cw = tiny_config("window"), cd = tiny_config("dense");
    Model mw, md;
    model_build(&mw, &cw, &cpu_backend, DT_F64, 5);
    model_build(&md, &cd, &cpu_backend, DT_F64, 5);
    engine_reset(e);
    ModelInput in = make_input(e);
    const double lw = tensor_item(e, model_forward(&mw, e, &in, false).total);
    const double ld = tensor_item(e, model_forward(&md, e, &in, false).total);
    model_free(&md);
    bool ok = true;
    for (int i = 0; i < mw.params.n; i++) {
        Tensor *t = mw.params.p[i].t;
        GradCheckResult r = gradcheck(e, f_model, &t, 1, &mw, 24, 100 + i);
        if (!(r.max_rel_err < TOL && r.numeric_norm > 0)) {
            printf("    %s: rel err %.3e, numeric norm %.3e\n", t->name, r.max_rel_err, r.numeric_norm);
            ok = false;
        }
    }
    model_free(&mw);
    EXPECT(fabs(lw - ld) > 1e-6, "the narrow window left the loss at the dense model's (%.9g)", ld);
    EXPECT(ok, "window model gradient");
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(window_matches_masked_softmax_reference);
    RUN(window_gradients_match_finite_differences);
    RUN(window_covering_every_document_is_dense_attention);
    RUN(window_model_gradcheck_all_parameters);
    engine_free(&eng);
    TEST_END();
}
