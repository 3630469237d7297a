/* Whole-model float64 gradient checks of a tiny transformer (every parameter), with dense GQA
 * attention, with MSA layers (LM gradient to the backbone, KL gradient to the index branch, and no
 * KL gradient into the backbone), and with activation recomputation. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../layers/msa.h"
#include "../train/model.h"
#include "gradcheck.h"
#include "test.h"

#define TOL 1e-6

/* two documents (9 and 12 tokens) in one 21-token sequence */
enum { T_TOKENS = 21 };
static const int32_t TOKENS[T_TOKENS] = {1, 5, 2, 9, 3, 3, 7, 0, 4, 10, 6, 2, 8, 1, 1, 5, 9, 3, 2, 7, 4};
static const int32_t CU[3] = {0, 9, 21};

typedef struct ModelCheck {
    Model *m;
    bool recompute;
} ModelCheck;

static RunConfig tiny_config(bool msa) {
    RunConfig c;
    config_defaults(&c);
    c.model.vocab_size = 11;
    c.model.d_model = 12;
    c.model.n_layers = 2;
    c.model.n_heads = 4;
    c.model.n_kv_heads = 2;
    c.model.head_dim = 4;
    c.model.rotary_dim = 2; /* partial rotary */
    c.model.ffn_dim = 10;
    c.model.qk_norm = true;
    c.model.tie_embeddings = false;
    c.model.init_std = 0.3f; /* large enough that every path carries a visible gradient */
    strcpy(c.model.attention, msa ? "msa" : "dense");
    strcpy(c.model.msa_layers, "1-"); /* layer 0 dense, layer 1 MSA */
    c.msa.block_size = 3;
    c.msa.topk_blocks = 2;
    c.msa.index_dim = 6;
    c.msa.kl_weight = 1.0f;
    return c;
}

static ModelInput make_input(Engine *e) {
    Batch b = {0};
    int32_t targets[T_TOKENS], positions[T_TOKENS];
    for (int t = 0; t < T_TOKENS; t++) {
        bool last_of_doc = (t + 1 == CU[1]) || (t + 1 == CU[2]);
        targets[t] = last_of_doc ? -1 : TOKENS[t + 1];
        positions[t] = t < CU[1] ? t : t - CU[1];
    }
    b.B = 1;
    b.T = T_TOKENS;
    b.inputs = (int32_t *)TOKENS;
    b.targets = targets;
    b.positions = positions;
    b.cu_seqlens = (int32_t *)CU;
    b.n_segments = 2;
    return model_upload(e, &b);
}

static Tensor *f_model(Engine *e, Tensor **inputs, void *ctx) {
    (void)inputs; /* the parameters are read through the model */
    ModelCheck *mc = ctx;
    ModelInput in = make_input(e);
    return model_forward(mc->m, e, &in, mc->recompute).total;
}

static void collect(Model *m, Tensor **out, int *n, bool index_params) {
    *n = 0;
    for (int i = 0; i < m->params.n; i++) {
        Tensor *t = m->params.p[i].t;
        bool is_index = strstr(t->name, ".index.") != NULL;
        if (is_index == index_params) out[(*n)++] = t;
    }
}

/* msa.kl_weight of every MSA layer of a built model */
static void set_kl_weight(Model *m, float w) {
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (m->layers[l].attention.kind->learned_selection) ((MsaLayer *)m->layers[l].attention.self)->settings.kl_weight = w;
}

static MsaReplay *replay_of(Model *m, int l) { return &((MsaLayer *)m->layers[l].attention.self)->replay; }

static bool check_all(TestCtx *tc, Engine *e, Model *m, bool recompute, bool index_params, const char *what) {
    (void)tc;
    Tensor *inputs[128];
    int n;
    collect(m, inputs, &n, index_params);
    ModelCheck mc = {m, recompute};
    bool ok = true;
    /* one input at a time so that a failure names the parameter */
    for (int i = 0; i < n; i++) {
        GradCheckResult r = gradcheck(e, f_model, &inputs[i], 1, &mc, 24, 100 + i);
        if (!(r.max_rel_err < TOL && r.numeric_norm > 0)) {
            printf("    %s: %s rel err %.3e, numeric norm %.3e\n", what, inputs[i]->name, r.max_rel_err, r.numeric_norm);
            ok = false;
        }
    }
    return ok;
}

TEST(dense_model_gradcheck_all_parameters) {
    Engine *e = tc->fixture;
    RunConfig c = tiny_config(false);
    Model m;
    model_build(&m, &c, &cpu_backend, DT_F64, 7);
    EXPECT(check_all(tc, e, &m, false, false, "dense"), "dense model gradient");
    model_free(&m);
}

TEST(dense_model_gradcheck_with_recompute) {
    Engine *e = tc->fixture;
    RunConfig c = tiny_config(false);
    Model m;
    model_build(&m, &c, &cpu_backend, DT_F64, 8);
    EXPECT(check_all(tc, e, &m, true, false, "recompute"), "recomputed model gradient");
    model_free(&m);
}

TEST(msa_model_gradcheck_backbone_lm_and_index_kl) {
    Engine *e = tc->fixture;
    /* backbone: with kl_weight 0 the loss is the LM loss alone, whose gradient the backbone gets */
    RunConfig c = tiny_config(true);
    c.msa.kl_weight = 0.0f;
    Model m;
    model_build(&m, &c, &cpu_backend, DT_F64, 9);
    EXPECT(m.n_msa_layers == 1, "expected one MSA layer, got %d", m.n_msa_layers);
    EXPECT(check_all(tc, e, &m, false, false, "msa backbone"), "MSA model backbone gradient");
    /* index branch: only the KL depends on it smoothly (the selection is piecewise constant) */
    set_kl_weight(&m, 1.0f);
    EXPECT(check_all(tc, e, &m, false, true, "msa index"), "MSA model index-branch gradient");
    EXPECT(check_all(tc, e, &m, true, true, "msa index recompute"), "MSA index-branch gradient with recompute");
    model_free(&m);
}

/* the KL moves only the index branch: backbone gradients are bit-identical with and without it */
TEST(msa_kl_gives_backbone_exactly_zero_gradient) {
    Engine *e = tc->fixture;
    RunConfig c = tiny_config(true);
    Model m;
    model_build(&m, &c, &cpu_backend, DT_F64, 10);
    int64_t n = m.params.numel;
    double *g[2];
    for (int pass = 0; pass < 2; pass++) {
        set_kl_weight(&m, pass == 0 ? 0.0f : 5.0f);
        params_zero_grad(&m.params);
        engine_reset(e);
        ModelInput in = make_input(e);
        engine_backward(e, model_forward(&m, e, &in, false).total);
        g[pass] = malloc((size_t)n * sizeof(double));
        memcpy(g[pass], m.params.grad, (size_t)n * sizeof(double));
    }
    bool index_moved = false;
    for (int i = 0; i < m.params.n; i++) {
        Param *p = &m.params.p[i];
        bool is_index = strstr(p->t->name, ".index.") != NULL;
        int diff = memcmp(g[0] + p->offset, g[1] + p->offset, (size_t)p->t->numel * sizeof(double));
        if (!is_index) EXPECT(diff == 0, "KL changed the gradient of backbone parameter %s", p->t->name);
        else index_moved |= diff != 0;
    }
    EXPECT(index_moved, "KL gave the index branch no gradient");
    free(g[0]);
    free(g[1]);
    model_free(&m);
}

/* Calls of the MSA forward kernels that recomputation must not repeat (the replay reuses the
 * checkpointed forward's results: MsaReplay in layers/msa.h), counted through a wrapped CPU backend. */
static struct {
    int indexer, plan, kl_forward, fused_backward;
} msa_calls;
static void count_indexer(Tensor *topk, Tensor *idx_lse, Tensor *plan, const Tensor *qi, const Tensor *ki, const Tensor *cu,
                          const MsaParams *p) {
    msa_calls.indexer++;
    msa_calls.plan += plan != NULL; /* the sparse phase's plan comes with its idx_lse */
    cpu_backend.msa_indexer(topk, idx_lse, plan, qi, ki, cu, p);
}
static void count_plan(Tensor *plan, const Tensor *topk, const Tensor *cu, const MsaParams *p) {
    msa_calls.plan++;
    cpu_backend.msa_plan(plan, topk, cu, p);
}
static void count_kl_forward(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                             const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                             const Tensor *cu, const MsaParams *p) {
    msa_calls.kl_forward++;
    cpu_backend.msa_kl_forward(kl, idx_lse, q, k, lse, qi, ki, topk, plan, cu, p);
}

static void count_fused_backward(Tensor *dq, Tensor *dk, Tensor *dv, Tensor *dqi, Tensor *dki, Tensor *kl, const Tensor *dout,
                                 const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                 const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                                 const Tensor *plan, const Tensor *cu, const MsaParams *p, const Tensor *kl_grad, float w) {
    msa_calls.fused_backward++;
    cpu_backend.msa_attention_kl_backward(dq, dk, dv, dqi, dki, kl, dout, q, k, v, out, lse, qi, ki, idx_lse, topk, plan, cu,
                                          p, kl_grad, w);
}

/* With train.recompute an MSA layer's replay copies the selection and KL results its forward kept: the
 * indexer and KL forward run once per step as without recomputation, the plan once more per MSA layer (the
 * replay rebuilds it from the kept selection) (the sparse phase has no
 * KL forward at all: its one backward, attention and KL together, computes the KL), and the loss (the
 * forward's plus the terms the backward computed) and every gradient are bit-identical to the run
 * without it; in the dense warm-up and in the sparse phase. */
TEST(msa_recompute_reuses_the_forward_and_changes_nothing) {
    KernelBackend counting = cpu_backend;
    counting.msa_indexer = count_indexer;
    counting.msa_plan = count_plan;
    counting.msa_kl_forward = count_kl_forward;
    counting.msa_attention_kl_backward = count_fused_backward;
    Engine e;
    engine_init(&e, &counting, DT_F64, 1 << 20);
    for (int dense = 0; dense < 2; dense++) {
        RunConfig c = tiny_config(true);
        c.model.n_layers = 3; /* layers 1 and 2 MSA */
        Model m;
        model_build(&m, &c, &cpu_backend, DT_F64, 12);
        m.msa_dense = dense;
        const int64_t n = m.params.numel;
        double loss[2], *g[2];
        int calls[2][4];
        for (int recompute = 0; recompute < 2; recompute++) {
            memset(&msa_calls, 0, sizeof msa_calls);
            params_zero_grad(&m.params);
            engine_reset(&e);
            ModelInput in = make_input(&e);
            Tensor *total = model_forward(&m, &e, &in, recompute).total;
            engine_backward(&e, total);
            loss[recompute] = tensor_item(&e, total) + model_collect(&m, &e, NULL);
            g[recompute] = malloc((size_t)n * sizeof(double));
            memcpy(g[recompute], m.params.grad, (size_t)n * sizeof(double));
            calls[recompute][0] = msa_calls.indexer;
            calls[recompute][1] = msa_calls.plan;
            calls[recompute][2] = msa_calls.kl_forward;
            calls[recompute][3] = msa_calls.fused_backward;
        }
        const char *phase = dense ? "dense warm-up" : "sparse";
        EXPECT(loss[0] == loss[1], "%s: recompute changed the loss (%.17g vs %.17g)", phase, loss[0], loss[1]);
        EXPECT(memcmp(g[0], g[1], (size_t)n * sizeof(double)) == 0, "%s: recompute changed a gradient", phase);
        const int kl_fwd = dense ? 2 : 0, fused = dense ? 0 : 2; /* 2 MSA layers */
        EXPECT(calls[1][2] == kl_fwd && calls[0][2] == kl_fwd,
               "%s: KL forward ran %d times with recompute, %d without (expected %d)", phase, calls[1][2], calls[0][2], kl_fwd);
        EXPECT(calls[1][3] == fused && calls[0][3] == fused,
               "%s: the attention-KL backward ran %d times with recompute, %d without (expected %d)", phase, calls[1][3],
               calls[0][3], fused);
        EXPECT(calls[1][0] == calls[0][0] && calls[1][1] == 2 * calls[0][1] && calls[0][0] == (dense ? 0 : 2) &&
                   calls[0][1] == (dense ? 0 : 2),
               "%s: indexer/plan ran %d/%d times with recompute, %d/%d without", phase, calls[1][0], calls[1][1],
               calls[0][0], calls[0][1]);
        EXPECT(!replay_of(&m, 1)->valid && !replay_of(&m, 2)->valid, "%s: a kept forward was not consumed", phase);
        free(g[0]);
        free(g[1]);
        model_free(&m);
    }
    engine_free(&e);
}

/* What an MSA layer's replay store holds (train.recompute) between its checkpointed forward and its block's
 * backward, per token, is what the replay cannot cheaply recompute: the selection (i32 block ids, topk_blocks
 * per token and KV head) and the student's normaliser (one statistic per token and KV head), plus the dense
 * warm-up's KL scalar and each part's 64-byte alignment. The plan, a function of the selection alone, is
 * rebuilt on the replay (before: kept, Hkv x (N + 1 + N x (topk_blocks + 2)) i32 more). */
TEST(msa_replay_store_holds_the_selection_and_normaliser_per_token) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F64, 1 << 20);
    for (int dense = 0; dense < 2; dense++) {
        RunConfig c = tiny_config(true);
        c.model.n_layers = 3; /* layers 1 and 2 MSA */
        Model m;
        model_build(&m, &c, &cpu_backend, DT_F64, 13);
        m.msa_dense = dense;
        engine_reset(&e);
        ModelInput in = make_input(&e);
        model_forward(&m, &e, &in, true);
        const int64_t hkv = c.model.n_kv_heads, k = c.msa.topk_blocks, stat = (int64_t)dtype_size(stat_dtype(DT_F64));
        const int64_t bound = hkv * T_TOKENS * ((dense ? 0 : k * 4) + stat) + stat + 3 * 63;
        const char *phase = dense ? "dense warm-up" : "sparse";
        for (int l = 1; l < 3; l++) {
            const MsaReplay *rp = replay_of(&m, l);
            printf("    %s, layer %d: replay store %zu B for %d tokens, %.1f B per token (bound %.1f)\n", phase, l, rp->mem.cap,
                   T_TOKENS, (double)rp->mem.cap / T_TOKENS, (double)bound / T_TOKENS);
            EXPECT(rp->valid && rp->mem.cap <= (size_t)bound, "%s, layer %d: the replay store holds %zu bytes for %d tokens, "
                   "over the %lld of the selection and the normaliser", phase, l, rp->mem.cap, T_TOKENS, (long long)bound);
        }
        model_free(&m);
    }
    engine_free(&e);
}

/* Calls of the attention forward kernels, which train.keep_attention_outputs spares the replay. */
static int attention_forwards;
static void count_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                    const Tensor *cu, float scale) {
    attention_forwards++;
    cpu_backend.attention_forward(out, lse, q, k, v, cu, scale);
}
static void count_msa_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                        const Tensor *topk, const Tensor *plan, const Tensor *cu, const MsaParams *p) {
    attention_forwards++;
    cpu_backend.msa_attention_forward(out, lse, q, k, v, topk, plan, cu, p);
}

/* train.keep_attention_outputs: a checkpointed block keeps its attention's output and log-sum-exp, and its
 * replay in the backward takes them instead of running the attention forward again. The loss (with the terms
 * the backward computes) and every gradient are bit-identical to the recomputing run's, the attention forward
 * kernels run once per layer instead of twice, and each kept forward is consumed by its replay; for a dense
 * model and an MSA model in its dense warm-up and in its sparse phase (grad_accum-like: two steps in a row). */
TEST(kept_attention_outputs_spare_the_replay_and_change_nothing) {
    KernelBackend counting = cpu_backend;
    counting.attention_forward = count_attention_forward;
    counting.msa_attention_forward = count_msa_attention_forward;
    Engine e;
    engine_init(&e, &counting, DT_F64, 1 << 20);
    for (int variant = 0; variant < 3; variant++) { /* dense model; MSA dense warm-up; MSA sparse phase */
        const char *name = variant == 0 ? "dense" : variant == 1 ? "MSA dense warm-up" : "MSA sparse";
        double loss[2][2], *g[2];
        int forwards[2];
        int64_t n = 0;
        for (int keep = 0; keep < 2; keep++) {
            RunConfig c = tiny_config(variant > 0);
            c.model.n_layers = 3; /* MSA: layers 1 and 2 */
            c.train.keep_attention_outputs = keep;
            Model m;
            model_build(&m, &c, &cpu_backend, DT_F64, 14);
            m.msa_dense = variant == 1;
            n = m.params.numel;
            attention_forwards = 0;
            for (int step = 0; step < 2; step++) {
                params_zero_grad(&m.params);
                engine_reset(&e);
                ModelInput in = make_input(&e);
                Tensor *total = model_forward(&m, &e, &in, true).total;
                engine_backward(&e, total);
                loss[keep][step] = tensor_item(&e, total) + model_collect(&m, &e, NULL);
            }
            forwards[keep] = attention_forwards;
            g[keep] = malloc((size_t)n * sizeof(double));
            memcpy(g[keep], m.params.grad, (size_t)n * sizeof(double));
            for (int l = 0; l < 3; l++) {
                const AttentionFrame *f = m.layers[l].attention.self; /* every attention variant's state starts with it */
                EXPECT(!f->kept.valid, "%s, keep %d, layer %d: a kept forward was not consumed by its replay", name, keep, l);
            }
            model_free(&m);
        }
        for (int step = 0; step < 2; step++)
            EXPECT(loss[0][step] == loss[1][step], "%s, step %d: keeping the outputs changed the loss (%.17g vs %.17g)", name,
                   step + 1, loss[1][step], loss[0][step]);
        EXPECT(memcmp(g[0], g[1], (size_t)n * sizeof(double)) == 0, "%s: keeping the outputs changed a gradient", name);
        /* 3 layers x 2 steps: each layer's forward once, and without keeping once more in its replay */
        EXPECT(forwards[0] == 12 && forwards[1] == 6, "%s: the attention forwards ran %d times recomputing, %d keeping (expected 12, 6)",
               name, forwards[0], forwards[1]);
        free(g[0]);
        free(g[1]);
    }
    engine_free(&e);
}

/* A training step replayed as a CUDA graph runs its forwards without the host, which keeps their records (the
 * MSA KL log: one record per forward, deferred or not, whose value the device holds). model_replayed must
 * make them as the forwards did: collected after a replay over the same device values, the loss terms the
 * backwards computed and the statistics equal those collected after the real step, to the bit; in the sparse
 * phase (the KL from the backward) and in the dense warm-up (from the forward), for two micro-batches. */
TEST(replayed_step_is_accounted_as_its_forwards) {
    Engine *e = tc->fixture;
    for (int dense = 0; dense < 2; dense++) {
        RunConfig c = tiny_config(true);
        c.model.n_layers = 3;
        Model m;
        model_build(&m, &c, &cpu_backend, DT_F64, 15);
        m.msa_dense = dense;
        model_drop_collected(&m);
        for (int micro = 0; micro < 2; micro++) { /* a step of two micro-batches */
            engine_reset(e);
            ModelInput in = make_input(e);
            engine_backward(e, model_forward(&m, e, &in, micro == 1).total);
        }
        Metrics real = {0}, replay = {0};
        const double late_real = model_collect(&m, e, &real);
        model_replayed(&m, 2, T_TOKENS);
        const double late_replay = model_collect(&m, e, &replay);
        const char *phase = dense ? "dense warm-up" : "sparse";
        EXPECT(dense ? late_real == 0 : late_real > 0, "%s: the backwards' loss terms are %.17g", phase, late_real);
        EXPECT(late_replay == late_real, "%s: after a replay the backwards' loss terms are %.17g, after the step %.17g", phase,
               late_replay, late_real);
        EXPECT(real.n > 0 && real.n == replay.n, "%s: %d statistics after the step, %d after a replay", phase, real.n, replay.n);
        for (int i = 0; i < real.n && i < replay.n; i++)
            EXPECT(!strcmp(real.name[i], replay.name[i]) && real.sum[i] == replay.sum[i] && real.count[i] == replay.count[i],
                   "%s: statistic %s: %.17g over %.0f after the step, %s %.17g over %.0f after a replay", phase, real.name[i],
                   real.sum[i], real.count[i], replay.name[i], replay.sum[i], replay.count[i]);
        model_free(&m);
    }
}

/* Without gradients (evaluation, sampling) a forward holds one block's activations at a time: each extra
 * layer adds only its output (and the auxiliary loss scalar) to the arena's high-water mark, not its
 * activations; and the loss is the one the recording forward and its backward compute (the sparse
 * phase's KL terms, model_collect, added after the backward) to the last bit. */
TEST(no_grad_forward_memory_does_not_grow_with_depth) {
    Engine *e = tc->fixture;
    const int depth[2] = {2, 8};
    size_t high[2];
    for (int i = 0; i < 2; i++) {
        RunConfig c = tiny_config(true);
        c.model.n_layers = depth[i];
        Model m;
        model_build(&m, &c, &cpu_backend, DT_F64, 11);
        engine_reset(e);
        ModelInput in = make_input(e);
        Tensor *total = model_forward(&m, e, &in, false).total;
        engine_backward(e, total);
        double with_grad = tensor_item(e, total) + model_collect(&m, e, NULL);
        engine_reset(e);
        e->data.high_water = 0;
        bool prev = engine_set_grad(e, false);
        in = make_input(e);
        double no_grad = tensor_item(e, model_forward(&m, e, &in, false).total);
        engine_set_grad(e, prev);
        high[i] = e->data.high_water;
        EXPECT(no_grad == with_grad, "%d layers: no-grad loss %.17g, recording forward %.17g", depth[i], no_grad, with_grad);
        model_free(&m);
    }
    /* a block output: T x d_model doubles, 64-byte aligned; the aux scalar: one more 64-byte slot */
    const double out_bytes = ((T_TOKENS * 12 * 8 + 63) / 64) * 64 + 64;
    double per_layer = (double)(high[1] - high[0]) / (depth[1] - depth[0]);
    printf("    no-grad arena high water: %zu B (2 layers), %zu B (8 layers): %.0f B per layer, block output %.0f B\n",
           high[0], high[1], per_layer, out_bytes);
    EXPECT(per_layer <= 1.5 * out_bytes, "each layer adds %.0f bytes to a no-grad forward (its output is %.0f)", per_layer,
           out_bytes);
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(dense_model_gradcheck_all_parameters);
    RUN(dense_model_gradcheck_with_recompute);
    RUN(msa_model_gradcheck_backbone_lm_and_index_kl);
    RUN(msa_kl_gives_backbone_exactly_zero_gradient);
    RUN(no_grad_forward_memory_does_not_grow_with_depth);
    RUN(msa_recompute_reuses_the_forward_and_changes_nothing);
    RUN(msa_replay_store_holds_the_selection_and_normaliser_per_token);
    RUN(kept_attention_outputs_spare_the_replay_and_change_nothing);
    RUN(replayed_step_is_accounted_as_its_forwards);
    engine_free(&eng);
    TEST_END();
}
