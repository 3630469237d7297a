/* The MoE feed-forward (layers/moe.c) and its ops: float64 finite-difference gradient checks of every
 * op and of the whole layer (routing held fixed), forward values against naive per-token references
 * written here, exactness of the permutation, the E = k = 1 reduction to the dense SwiGLU, the
 * balance losses, the auxiliary-loss-free bias update, and metrics under activation checkpointing. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../autograd/params.h"
#include "../kernels/util.h"
#include "../layers/moe.h"
#include "gradcheck.h"
#include "test.h"

#define TOL 1e-6

static bool grad_ok(GradCheckResult r, const char *what) {
    if (!(r.max_rel_err < TOL && r.numeric_norm > 0)) {
        printf("    %s: rel err %.3e (input %d, numeric norm %.3e)\n", what, r.max_rel_err, r.worst_input, r.numeric_norm);
        return false;
    }
    return true;
}

static Tensor *i32_tensor(const int32_t *v, int64_t rows, int64_t cols) {
    Tensor *t = test_tensor(DT_I32, SHAPE(rows, cols));
    memcpy(t->data, v, (size_t)(rows * cols) * sizeof(int32_t));
    return t;
}

/* k distinct random experts per token (a routing not produced by the Top-k kernel) */
static Tensor *random_idx(int64_t N, int k, int E, uint64_t seed) {
    Tensor *t = test_tensor(DT_I32, SHAPE(N, k));
    int32_t *id = t->data;
    Rng r;
    rng_seed(&r, seed);
    for (int64_t n = 0; n < N; n++)
        for (int j = 0; j < k; j++) {
            int32_t e;
            bool dup;
            do {
                e = (int32_t)(rng_next(&r) % (uint64_t)E);
                dup = false;
                for (int i = 0; i < j; i++) dup |= id[n * k + i] == e;
            } while (dup);
            id[n * k + j] = e;
        }
    return t;
}

/* ---------------------------------------------------------------- naive references */

static double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }
static double silu(double v) { return v * sigmoid(v); }

/* scores of one token's logits */
static void ref_scores(double *s, const double *l, int E, MoeScoreFunc f) {
    if (f == MOE_SCORE_SIGMOID) {
        for (int e = 0; e < E; e++) s[e] = sigmoid(l[e]);
        return;
    }
    double mx = l[0], z = 0;
    for (int e = 1; e < E; e++) mx = fmax(mx, l[e]);
    for (int e = 0; e < E; e++) z += exp(l[e] - mx);
    for (int e = 0; e < E; e++) s[e] = exp(l[e] - mx) / z;
}

/* selection sort with a "taken" mask: best (score + bias), ties to the lower expert */
static void ref_topk(int32_t *idx, const double *s, const float *bias, int E, int k) {
    bool taken[64] = {0};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            if (taken[e]) continue;
            double v = s[e] + (bias ? bias[e] : 0.0), bv = best < 0 ? 0 : s[best] + (bias ? bias[best] : 0.0);
            if (best < 0 || v > bv) best = e;
        }
        taken[best] = true;
        idx[j] = best;
    }
}

/* y[C] = expert e's SwiGLU of x[C]: W_down[e] (silu(W_gate[e] x) * (W_up[e] x)) */
static void ref_swiglu(double *y, const Tensor *wg, const Tensor *wu, const Tensor *wd, int64_t e, const double *x,
                       int64_t C, int64_t F) {
    for (int64_t c = 0; c < C; c++) y[c] = 0;
    for (int64_t f = 0; f < F; f++) {
        double g = 0, u = 0;
        for (int64_t i = 0; i < C; i++) {
            g += tensor_get(wg, (e * F + f) * C + i) * x[i];
            u += tensor_get(wu, (e * F + f) * C + i) * x[i];
        }
        double h = silu(g) * u;
        for (int64_t c = 0; c < C; c++) y[c] += tensor_get(wd, (e * C + c) * F + f) * h;
    }
}

/* The whole layer, token by token: out[N*C]; idx_out[N*k] gets the selection (fixed_idx if given) */
static void ref_moe(const MoeLayerParams *p, const MoeConfig *c, const Tensor *x, const int32_t *fixed_idx,
                    int32_t *idx_out, double *out) {
    int64_t N = x->shape[0], C = x->shape[1], E = c->num_experts, F = c->expert_dim;
    int k = c->experts_per_token;
    int64_t Fs = c->shared_expert_dim ? c->shared_expert_dim : F;
    MoeScoreFunc f = strcmp(c->score_func, "sigmoid") == 0 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    double xt[64], l[64], s[64], y[64];
    for (int64_t t = 0; t < N; t++) {
        for (int64_t i = 0; i < C; i++) xt[i] = tensor_get(x, t * C + i);
        for (int64_t e = 0; e < E; e++) {
            l[e] = 0;
            for (int64_t i = 0; i < C; i++) l[e] += tensor_get(p->w_router, e * C + i) * xt[i];
        }
        ref_scores(s, l, (int)E, f);
        int32_t id[64];
        if (fixed_idx) memcpy(id, fixed_idx + t * k, (size_t)k * sizeof(int32_t));
        else ref_topk(id, s, p->bias ? (const float *)p->bias->data : NULL, (int)E, k);
        if (idx_out) memcpy(idx_out + t * k, id, (size_t)k * sizeof(int32_t));
        double z = 0;
        for (int j = 0; j < k; j++) z += s[id[j]];
        if (!c->renormalize) z = 1;
        double *o = out + t * C;
        for (int64_t i = 0; i < C; i++) o[i] = 0;
        for (int j = 0; j < k; j++) {
            double w = (double)c->routing_scale * s[id[j]] / z;
            ref_swiglu(y, p->w_gate, p->w_up, p->w_down, id[j], xt, C, F);
            for (int64_t i = 0; i < C; i++) o[i] += w * y[i];
        }
        for (int sh = 0; sh < p->n_shared; sh++) {
            ref_swiglu(y, p->shared_gate[sh], p->shared_up[sh], p->shared_down[sh], 0, xt, C, Fs);
            for (int64_t i = 0; i < C; i++) o[i] += y[i];
        }
    }
}

/* ---------------------------------------------------------------- a test layer of persistent tensors */

typedef struct TestLayer {
    MoeConfig cfg;
    MoeLayerParams p;
    Tensor *x;
    Tensor *bias_t; /* the layer's selection bias, f32 [E] on the CPU backend ... */
    float *bias;    /* ... whose data is host memory: its values */
} TestLayer;

static MoeConfig make_cfg(int E, int k, int F, int shared, int Fs, const char *func, bool renorm, float scale) {
    MoeConfig c = {.num_experts = E, .experts_per_token = k, .expert_dim = F, .shared_experts = shared,
                   .shared_expert_dim = Fs, .renormalize = renorm, .routing_scale = scale};
    snprintf(c.score_func, sizeof c.score_func, "%s", func);
    return c;
}

/* weights std: router 1 (routing spread), experts 0.5; a nonzero bias so that selection and weights
 * differ (the bias must steer only the former) */
static void layer_init(TestLayer *L, MoeConfig cfg, int64_t N, int64_t C, uint64_t seed, bool with_bias) {
    memset(L, 0, sizeof(*L));
    L->cfg = cfg;
    int64_t E = cfg.num_experts, F = cfg.expert_dim, Fs = cfg.shared_expert_dim ? cfg.shared_expert_dim : F;
    L->x = test_randn(DT_F64, SHAPE(N, C), 1, seed);
    L->p.num_experts = (int)E;
    L->p.w_router = test_randn(DT_F64, SHAPE(E, C), 1, seed + 1);
    L->p.w_gate = test_randn(DT_F64, SHAPE(E, F, C), 0.5, seed + 2);
    L->p.w_up = test_randn(DT_F64, SHAPE(E, F, C), 0.5, seed + 3);
    L->p.w_down = test_randn(DT_F64, SHAPE(E, C, F), 0.5, seed + 4);
    L->p.n_shared = cfg.shared_experts;
    for (int i = 0; i < cfg.shared_experts; i++) {
        L->p.shared_gate[i] = test_randn(DT_F64, SHAPE(Fs, C), 0.5, seed + 10 + 3 * i);
        L->p.shared_up[i] = test_randn(DT_F64, SHAPE(Fs, C), 0.5, seed + 11 + 3 * i);
        L->p.shared_down[i] = test_randn(DT_F64, SHAPE(C, Fs), 0.5, seed + 12 + 3 * i);
    }
    Rng r;
    rng_seed(&r, seed + 99);
    L->bias_t = test_tensor(DT_F32, SHAPE(E));
    L->bias = L->bias_t->data;
    for (int64_t e = 0; e < E; e++) L->bias[e] = with_bias ? (float)(0.3 * rng_normal(&r)) : 0.0f;
    L->p.bias = L->bias_t;
    L->p.be = &cpu_backend;
}

static void test_layer_free(TestLayer *L) {
    test_tensor_free(L->x);
    test_tensor_free(L->bias_t);
    test_tensor_free(L->p.w_router);
    test_tensor_free(L->p.w_gate);
    test_tensor_free(L->p.w_up);
    test_tensor_free(L->p.w_down);
    for (int i = 0; i < L->p.n_shared; i++) {
        test_tensor_free(L->p.shared_gate[i]);
        test_tensor_free(L->p.shared_up[i]);
        test_tensor_free(L->p.shared_down[i]);
    }
}

/* the layer's tensors as a gradcheck input list: x, router, gate, up, down, shared (gate, up, down)... */
static int layer_inputs(TestLayer *L, Tensor **in) {
    int n = 0;
    in[n++] = L->x;
    in[n++] = L->p.w_router;
    in[n++] = L->p.w_gate;
    in[n++] = L->p.w_up;
    in[n++] = L->p.w_down;
    for (int i = 0; i < L->p.n_shared; i++) {
        in[n++] = L->p.shared_gate[i];
        in[n++] = L->p.shared_up[i];
        in[n++] = L->p.shared_down[i];
    }
    for (int i = 0; i < n; i++) test_requires_grad(in[i]);
    return n;
}

/* ---------------------------------------------------------------- op gradient checks */

typedef struct {
    Tensor *offsets;
} GroupCtx;
static Tensor *f_grouped(Engine *e, Tensor **in, void *ctx) {
    return op_grouped_linear(e, in[0], in[1], ((GroupCtx *)ctx)->offsets);
}

TEST(grouped_linear_forward_and_grad) {
    Engine *eng = tc->fixture;
    /* 4 experts, expert 1 and 3 empty, M = 9 rows */
    int32_t off[5] = {0, 4, 4, 9, 9};
    Tensor *offsets = test_tensor(DT_I32, SHAPE(5));
    memcpy(offsets->data, off, sizeof off);
    Tensor *xs = test_randn(DT_F64, SHAPE(9, 5), 1, 200), *w = test_randn(DT_F64, SHAPE(4, 3, 5), 1, 201);
    engine_reset(eng);
    Tensor *ys = op_grouped_linear(eng, xs, w, offsets);
    double max_err = 0;
    for (int e = 0; e < 4; e++)
        for (int r = off[e]; r < off[e + 1]; r++)
            for (int o = 0; o < 3; o++) {
                double ref = 0;
                for (int i = 0; i < 5; i++) ref += tensor_get(xs, r * 5 + i) * tensor_get(w, (e * 3 + o) * 5 + i);
                max_err = fmax(max_err, fabs(ref - tensor_get(ys, r * 3 + o)));
            }
    EXPECT(max_err < 1e-12, "grouped linear forward error %.3e", max_err);
    test_requires_grad(xs);
    test_requires_grad(w);
    Tensor *in[] = {xs, w};
    GroupCtx gc = {offsets};
    EXPECT(grad_ok(gradcheck(eng, f_grouped, in, 2, &gc, 0, 202), "grouped_linear"), "grouped linear gradient");
    /* an expert that got no rows gets exactly zero weight gradient */
    for (int i = 0; i < 15; i++) EXPECT(tensor_get(w->grad, 15 + i) == 0.0, "empty expert got a gradient");
    test_tensor_free(xs);
    test_tensor_free(w);
    test_tensor_free(offsets);
}

TEST(plan_permute_unpermute_exact) {
    Engine *eng = tc->fixture;
    const int64_t N = 11, C = 6;
    const int k = 3, E = 5;
    Tensor *idx = random_idx(N, k, E, 300), *x = test_randn(DT_F64, SHAPE(N, C), 1, 301);
    const int32_t *id = idx->data;
    engine_reset(eng);
    MoePlan plan = op_moe_plan(eng, idx, E);
    const int32_t *off = plan.offsets->data, *rows = plan.rows->data;
    /* offsets are the counts' prefix sums */
    int cnt[E];
    memset(cnt, 0, sizeof cnt);
    for (int i = 0; i < N * k; i++) cnt[id[i]]++;
    EXPECT(off[0] == 0, "offsets[0] = %d", off[0]);
    for (int e = 0; e < E; e++) EXPECT(off[e + 1] - off[e] == cnt[e], "expert %d: segment %d, count %d", e, off[e + 1] - off[e], cnt[e]);
    /* rows: a permutation of 0..M-1, each inside its expert's segment, tokens in order within it */
    bool seen[64] = {0};
    for (int64_t t = 0; t < N; t++)
        for (int j = 0; j < k; j++) {
            int r = rows[t * k + j], e = id[t * k + j];
            EXPECT(r >= off[e] && r < off[e + 1], "row %d outside expert %d's segment", r, e);
            EXPECT(!seen[r], "row %d used twice", r);
            seen[r] = true;
            for (int64_t t2 = 0; t2 < t; t2++)
                for (int j2 = 0; j2 < k; j2++)
                    if (id[t2 * k + j2] == e) EXPECT(rows[t2 * k + j2] < r, "expert %d: token order not kept", e);
        }
    /* permute is an exact gather */
    Tensor *xs = op_moe_permute(eng, x, &plan);
    for (int64_t t = 0; t < N; t++)
        for (int j = 0; j < k; j++)
            EXPECT(memcmp((double *)xs->data + (int64_t)rows[t * k + j] * C, (double *)x->data + t * C, C * sizeof(double)) == 0,
                   "permuted row of (%lld, %d) differs", (long long)t, j);
    /* unpermute with one-hot weights is its exact inverse, whichever slot carries the weight */
    for (int jsel = 0; jsel < k; jsel++) {
        Tensor *w = engine_zeros(eng, DT_F64, SHAPE(N, k));
        for (int64_t t = 0; t < N; t++) ((double *)w->data)[t * k + jsel] = 1.0;
        Tensor *back = op_moe_unpermute(eng, xs, w, &plan);
        EXPECT(memcmp(back->data, x->data, (size_t)(N * C) * sizeof(double)) == 0, "unpermute(permute(x)) != x (slot %d)", jsel);
    }
    test_tensor_free(idx);
    test_tensor_free(x);
}

typedef struct {
    Tensor *idx;
    int E;
} PermCtx;
/* unpermute(permute(x) + ys, w): gradients to x, ys and w in one check */
static Tensor *f_perm(Engine *e, Tensor **in, void *ctx) {
    PermCtx *pc = ctx;
    MoePlan plan = op_moe_plan(e, pc->idx, pc->E);
    return op_moe_unpermute(e, op_add(e, op_moe_permute(e, in[0], &plan), in[1]), in[2], &plan);
}

TEST(grad_permute_unpermute) {
    Engine *eng = tc->fixture;
    const int64_t N = 7, C = 4;
    const int k = 2, E = 4;
    Tensor *idx = random_idx(N, k, E, 400);
    Tensor *x = test_randn(DT_F64, SHAPE(N, C), 1, 401), *ys = test_randn(DT_F64, SHAPE(N * k, C), 1, 402);
    Tensor *w = test_randn(DT_F64, SHAPE(N, k), 1, 403);
    test_requires_grad(x);
    test_requires_grad(ys);
    test_requires_grad(w);
    Tensor *in[] = {x, ys, w};
    PermCtx pc = {idx, E};
    EXPECT(grad_ok(gradcheck(eng, f_perm, in, 3, &pc, 0, 404), "permute/unpermute"), "permute/unpermute gradient");
    test_tensor_free(idx);
    test_tensor_free(x);
    test_tensor_free(ys);
    test_tensor_free(w);
}

typedef struct {
    MoeScoreFunc func;
    bool renorm, weights; /* weights: check the combine weights, else the scores */
    float scale;
    Tensor *idx;
} RouterCtx;
static Tensor *f_router(Engine *e, Tensor **in, void *ctx) {
    RouterCtx *rc = ctx;
    Tensor *s = op_moe_router_scores(e, in[0], rc->func);
    return rc->weights ? op_moe_combine_weights(e, s, rc->idx, rc->renorm, rc->scale) : s;
}

TEST(router_scores_and_weights) {
    Engine *eng = tc->fixture;
    const int64_t N = 6, E = 5;
    const int k = 3;
    Tensor *lg = test_randn(DT_F64, SHAPE(N, E), 1.5, 500), *idx = random_idx(N, k, E, 501);
    /* values against the naive reference */
    for (int f = 0; f < 2; f++)
        for (int rn = 0; rn < 2; rn++) {
            engine_reset(eng);
            Tensor *s = op_moe_router_scores(eng, lg, (MoeScoreFunc)f);
            Tensor *w = op_moe_combine_weights(eng, s, idx, rn, 1.7f);
            double max_err = 0;
            for (int64_t t = 0; t < N; t++) {
                double l[8], rs[8], z = 0;
                for (int e = 0; e < E; e++) l[e] = tensor_get(lg, t * E + e);
                ref_scores(rs, l, E, (MoeScoreFunc)f);
                for (int e = 0; e < E; e++) max_err = fmax(max_err, fabs(rs[e] - tensor_get(s, t * E + e)));
                for (int j = 0; j < k; j++) z += rs[((int32_t *)idx->data)[t * k + j]];
                for (int j = 0; j < k; j++) {
                    double ref = (double)1.7f * rs[((int32_t *)idx->data)[t * k + j]] / (rn ? z : 1);
                    max_err = fmax(max_err, fabs(ref - tensor_get(w, t * k + j)));
                }
            }
            EXPECT(max_err < 1e-14, "router forward error %.3e (func %d, renorm %d)", max_err, f, rn);
        }
    test_requires_grad(lg);
    Tensor *in[] = {lg};
    for (int f = 0; f < 2; f++) {
        RouterCtx rc = {(MoeScoreFunc)f, false, false, 1, idx};
        EXPECT(grad_ok(gradcheck(eng, f_router, in, 1, &rc, 0, 502), "scores"), "scores gradient (func %d)", f);
        for (int rn = 0; rn < 2; rn++) {
            RouterCtx rw = {(MoeScoreFunc)f, rn, true, 2.5f, idx};
            EXPECT(grad_ok(gradcheck(eng, f_router, in, 1, &rw, 0, 503), "weights"), "weights gradient (func %d, renorm %d)", f, rn);
        }
    }
    test_tensor_free(lg);
    test_tensor_free(idx);
}

TEST(topk_matches_reference_with_ties_and_bias) {
    Engine *eng = tc->fixture;
    const int64_t N = 40, E = 7;
    const int k = 3;
    /* scores quantised to a few levels so that ties are common */
    Tensor *s = test_tensor(DT_F64, SHAPE(N, E));
    Rng r;
    rng_seed(&r, 600);
    for (int64_t i = 0; i < N * E; i++) tensor_set(s, i, 0.25 * (double)(rng_next(&r) % 4));
    float bias[7] = {0, 0.25f, 0, -0.25f, 0, 0.5f, 0};
    Tensor *bt = test_tensor(DT_F32, SHAPE(E));
    memcpy(bt->data, bias, sizeof bias);
    for (int use_bias = 0; use_bias < 2; use_bias++) {
        engine_reset(eng);
        Tensor *idx = op_moe_topk(eng, s, use_bias ? bt : NULL, k);
        EXPECT(eng->tape_len == 0, "top-k recorded a tape node");
        for (int64_t t = 0; t < N; t++) {
            double row[7];
            int32_t ref[3];
            for (int e = 0; e < E; e++) row[e] = tensor_get(s, t * E + e);
            ref_topk(ref, row, use_bias ? bias : NULL, E, k);
            for (int j = 0; j < k; j++)
                EXPECT(((int32_t *)idx->data)[t * k + j] == ref[j], "token %lld slot %d: %d vs reference %d (bias %d)",
                       (long long)t, j, ((int32_t *)idx->data)[t * k + j], ref[j], use_bias);
        }
    }
    /* all equal: the k lowest experts, in order */
    memset(s->data, 0, tensor_bytes(s));
    engine_reset(eng);
    Tensor *idx = op_moe_topk(eng, s, NULL, k);
    for (int j = 0; j < k; j++) EXPECT(((int32_t *)idx->data)[j] == j, "all-tie slot %d got expert %d", j, ((int32_t *)idx->data)[j]);
    test_tensor_free(s);
    test_tensor_free(bt);
}

typedef struct {
    Tensor *idx;
    int E;
    bool normalize, z; /* z: the z-loss of in[0] as logits, else the aux loss of in[0] as scores */
} LossCtx;
static Tensor *f_loss(Engine *e, Tensor **in, void *ctx) {
    LossCtx *lc = ctx;
    if (lc->z) return op_moe_z_loss(e, in[0]);
    MoePlan plan = op_moe_plan(e, lc->idx, lc->E);
    return op_moe_aux_loss(e, in[0], &plan, lc->normalize);
}

TEST(aux_and_z_losses) {
    Engine *eng = tc->fixture;
    const int64_t N = 9, E = 4;
    const int k = 2;
    Tensor *idx = random_idx(N, k, E, 700), *lg = test_randn(DT_F64, SHAPE(N, E), 2, 701);
    /* positive "scores" that do not sum to 1 per token, so normalisation matters */
    Tensor *s = test_tensor(DT_F64, SHAPE(N, E));
    for (int64_t i = 0; i < N * E; i++) tensor_set(s, i, sigmoid(tensor_get(lg, i)));
    int cnt[4] = {0};
    for (int i = 0; i < N * k; i++) cnt[((int32_t *)idx->data)[i]]++;
    for (int norm = 0; norm < 2; norm++) {
        engine_reset(eng);
        MoePlan plan = op_moe_plan(eng, idx, E);
        double got = tensor_item(eng, op_moe_aux_loss(eng, s, &plan, norm)), ref = 0;
        for (int e = 0; e < E; e++) {
            double P = 0;
            for (int64_t t = 0; t < N; t++) {
                double st = 0;
                for (int e2 = 0; e2 < E; e2++) st += tensor_get(s, t * E + e2);
                P += tensor_get(s, t * E + e) / (norm ? st : 1) / N;
            }
            ref += (double)cnt[e] / (N * k) * P;
        }
        ref *= E;
        EXPECT(fabs(got - ref) < 1e-14, "aux loss %.16g vs reference %.16g (normalize %d)", got, ref, norm);
    }
    engine_reset(eng);
    double got = tensor_item(eng, op_moe_z_loss(eng, lg)), ref = 0;
    for (int64_t t = 0; t < N; t++) {
        double z = 0;
        for (int e = 0; e < E; e++) z += exp(tensor_get(lg, t * E + e));
        ref += log(z) * log(z) / N;
    }
    EXPECT(fabs(got - ref) < 1e-13, "z-loss %.16g vs reference %.16g", got, ref);
    test_requires_grad(s);
    test_requires_grad(lg);
    for (int norm = 0; norm < 2; norm++) {
        LossCtx lc = {idx, E, norm, false};
        Tensor *in[] = {s};
        EXPECT(grad_ok(gradcheck(eng, f_loss, in, 1, &lc, 0, 702), "aux loss"), "aux loss gradient (normalize %d)", norm);
    }
    LossCtx lz = {idx, E, false, true};
    Tensor *inz[] = {lg};
    EXPECT(grad_ok(gradcheck(eng, f_loss, inz, 1, &lz, 0, 703), "z-loss"), "z-loss gradient");
    test_tensor_free(idx);
    test_tensor_free(lg);
    test_tensor_free(s);
}

/* ---------------------------------------------------------------- the layer */

static const struct {
    const char *func;
    bool renorm;
    float scale;
    int shared;
} variants[] = {
    {"softmax", false, 1.0f, 0}, {"softmax", true, 1.0f, 1}, {"sigmoid", false, 2.5f, 1}, {"sigmoid", true, 2.5f, 2},
};
#define N_VARIANTS 4

TEST(layer_matches_per_token_reference) {
    Engine *eng = tc->fixture;
    for (int v = 0; v < N_VARIANTS; v++) {
        TestLayer L;
        layer_init(&L, make_cfg(6, 2, 4, variants[v].shared, 3, variants[v].func, variants[v].renorm, variants[v].scale),
                   13, 5, 800 + 20 * v, true);
        int64_t N = 13, C = 5;
        double ref[13 * 5];
        int32_t ref_idx[13 * 2];
        ref_moe(&L.p, &L.cfg, L.x, NULL, ref_idx, ref);
        engine_reset(eng);
        Tensor *out = moe_forward(eng, &L.p, &L.cfg, L.x, NULL, NULL);
        double max_err = 0, max_ref = 0;
        for (int64_t i = 0; i < N * C; i++) {
            max_err = fmax(max_err, fabs(tensor_get(out, i) - ref[i]));
            max_ref = fmax(max_ref, fabs(ref[i]));
        }
        EXPECT(max_err < 1e-12 * fmax(1, max_ref), "variant %d: layer output error %.3e", v, max_err);
        /* the bias must have changed some selection (else this test would not see it) */
        int32_t plain_idx[13 * 2];
        float saved_bias[6];
        memcpy(saved_bias, L.bias, sizeof saved_bias);
        memset(L.bias, 0, sizeof saved_bias);
        double tmp[13 * 5];
        ref_moe(&L.p, &L.cfg, L.x, NULL, plain_idx, tmp);
        memcpy(L.bias, saved_bias, sizeof saved_bias);
        EXPECT(memcmp(plain_idx, ref_idx, sizeof plain_idx) != 0, "variant %d: the bias changed no selection", v);
        test_layer_free(&L);
    }
}

/* Enough tokens that every kernel takes its OpenMP path; against the same per-token reference. */
TEST(large_layer_parallel_paths) {
    Engine *eng = tc->fixture;
    const int64_t N = 3000, C = 8;
    TestLayer L;
    MoeConfig cfg = make_cfg(16, 4, 6, 1, 5, "sigmoid", true, 2.0f);
    cfg.aux_loss_weight = 1.0f;
    layer_init(&L, cfg, N, C, 1600, true);
    double *ref = xmalloc(sizeof(double) * N * C);
    int32_t *ref_idx = xmalloc(sizeof(int32_t) * N * 4);
    ref_moe(&L.p, &cfg, L.x, NULL, ref_idx, ref);
    MoeStats st;
    moe_stats_init(&st, &cpu_backend, 16);
    engine_reset(eng);
    Tensor *aux = NULL;
    Tensor *out = moe_forward(eng, &L.p, &cfg, L.x, &st, &aux);
    double max_err = 0;
    for (int64_t i = 0; i < N * C; i++) max_err = fmax(max_err, fabs(tensor_get(out, i) - ref[i]));
    EXPECT(max_err < 1e-11, "large layer output error %.3e", max_err);
    moe_stats_read(&st);
    int64_t cnt[16] = {0};
    for (int64_t i = 0; i < N * 4; i++) cnt[ref_idx[i]]++;
    for (int e = 0; e < 16; e++) EXPECT(st.load[e] == cnt[e], "expert %d load %lld vs %lld", e, (long long)st.load[e], (long long)cnt[e]);
    EXPECT(fabs(st.aux_loss_sum - tensor_item(eng, aux)) < 1e-12, "aux metric differs from the weighted aux (weight 1)");
    free(ref);
    free(ref_idx);
    moe_stats_free(&st);
    test_layer_free(&L);
}

TEST(token_output_uses_exactly_its_topk) {
    Engine *eng = tc->fixture;
    TestLayer L;
    layer_init(&L, make_cfg(6, 2, 4, 0, 0, "softmax", true, 1.0f), 16, 5, 900, false);
    int64_t N = 16, C = 5, F = 4;
    int32_t idx[16 * 2];
    double ref[16 * 5];
    ref_moe(&L.p, &L.cfg, L.x, NULL, idx, ref);
    engine_reset(eng);
    Tensor *base = moe_forward(eng, &L.p, &L.cfg, L.x, NULL, NULL);
    double *b = xmalloc(sizeof(double) * N * C);
    memcpy(b, base->data, sizeof(double) * N * C);
    /* perturb one expert's weights at a time: exactly the tokens that selected it change */
    for (int e = 0; e < 6; e++) {
        double *wd = (double *)L.p.w_down->data + e * C * F, saved[5 * 4];
        memcpy(saved, wd, sizeof saved);
        for (int i = 0; i < C * F; i++) wd[i] += 1.0;
        engine_reset(eng);
        Tensor *out = moe_forward(eng, &L.p, &L.cfg, L.x, NULL, NULL);
        for (int64_t t = 0; t < N; t++) {
            bool sel = idx[t * 2] == e || idx[t * 2 + 1] == e;
            bool same = memcmp((double *)out->data + t * C, b + t * C, sizeof(double) * C) == 0;
            EXPECT(sel != same, "token %lld, expert %d: selected %d but output %s", (long long)t, e, sel,
                   same ? "unchanged" : "changed");
        }
        memcpy(wd, saved, sizeof saved);
    }
    free(b);
    test_layer_free(&L);
}

TEST(single_expert_equals_dense_swiglu) {
    Engine *eng = tc->fixture;
    const char *funcs[] = {"softmax", "sigmoid"};
    for (int f = 0; f < 2; f++) {
        /* softmax over one expert is 1; sigmoid is renormalised to 1 */
        TestLayer L;
        layer_init(&L, make_cfg(1, 1, 7, 0, 0, funcs[f], f == 1, 1.0f), 9, 6, 1000 + f, false);
        engine_reset(eng);
        Tensor *moe = moe_forward(eng, &L.p, &L.cfg, L.x, NULL, NULL);
        Tensor *wg = engine_view(eng, L.p.w_gate, SHAPE(7, 6)), *wu = engine_view(eng, L.p.w_up, SHAPE(7, 6));
        Tensor *wd = engine_view(eng, L.p.w_down, SHAPE(6, 7));
        Tensor *dense = op_linear(eng, op_swiglu(eng, op_linear(eng, L.x, wg), op_linear(eng, L.x, wu)), wd);
        double max_err = 0;
        for (int64_t i = 0; i < moe->numel; i++) max_err = fmax(max_err, fabs(tensor_get(moe, i) - tensor_get(dense, i)));
        EXPECT(max_err < 1e-14, "%s: E = k = 1 differs from the dense SwiGLU by %.3e", funcs[f], max_err);
        test_layer_free(&L);
    }
}

typedef struct {
    TestLayer *L;
    Tensor *idx; /* fixed routing */
    bool aux;    /* check the aux scalar instead of the output */
} LayerCtx;
static Tensor *f_layer(Engine *e, Tensor **in, void *ctx) {
    LayerCtx *lc = ctx;
    MoeLayerParams p = lc->L->p;
    p.w_router = in[1];
    p.w_gate = in[2];
    p.w_up = in[3];
    p.w_down = in[4];
    for (int i = 0; i < p.n_shared; i++) {
        p.shared_gate[i] = in[5 + 3 * i];
        p.shared_up[i] = in[6 + 3 * i];
        p.shared_down[i] = in[7 + 3 * i];
    }
    Tensor *aux = NULL;
    Tensor *out = moe_forward_routed(e, &p, &lc->L->cfg, in[0], lc->idx, NULL, &aux);
    return lc->aux ? aux : out;
}

TEST(grad_whole_layer_fixed_routing) {
    Engine *eng = tc->fixture;
    for (int v = 0; v < N_VARIANTS; v++) {
        TestLayer L;
        MoeConfig cfg = make_cfg(5, 2, 4, variants[v].shared, 3, variants[v].func, variants[v].renorm, variants[v].scale);
        cfg.aux_loss_weight = 0.7f;
        cfg.z_loss_weight = 0.3f;
        layer_init(&L, cfg, 8, 4, 1100 + 20 * v, true);
        /* the routing of the unperturbed weights, held fixed during the finite differences */
        engine_reset(eng);
        Tensor *s = op_moe_router_scores(eng, op_linear(eng, L.x, L.p.w_router), moe_score_func(&cfg));
        Tensor *bt = test_tensor(DT_F32, SHAPE(5));
        memcpy(bt->data, L.bias, 5 * sizeof(float));
        Tensor *it = op_moe_topk(eng, s, bt, 2);
        Tensor *idx = i32_tensor(it->data, 8, 2);
        Tensor *in[32];
        int n = layer_inputs(&L, in);
        for (int aux = 1; aux >= 0; aux--) { /* the output last: its gradients are checked below */
            LayerCtx lc = {&L, idx, aux};
            EXPECT(grad_ok(gradcheck(eng, f_layer, in, n, &lc, 0, 1200 + v), aux ? "layer aux" : "layer"),
                   "variant %d (%s, renorm %d, %d shared): %s gradient", v, variants[v].func, variants[v].renorm,
                   variants[v].shared, aux ? "aux-loss" : "output");
        }
        /* every input received a gradient from the output (the router through the weights) */
        for (int i = 0; i < n; i++) {
            double g = 0;
            for (int64_t j = 0; j < in[i]->numel; j++) g += fabs(tensor_get(in[i]->grad, j));
            EXPECT(g > 0, "variant %d: input %d got no gradient", v, i);
        }
        test_tensor_free(bt);
        test_tensor_free(idx);
        test_layer_free(&L);
    }
}

/* A skewed router (one expert's row aligned with a direction every token shares) and sign-based
 * bias updates: the load must approach balance, and the bias must not touch the combine weights. */
TEST(bias_update_balances_load) {
    Engine *eng = tc->fixture;
    const int64_t N = 64, C = 4;
    const int E = 4, k = 1;
    TestLayer L;
    MoeConfig cfg = make_cfg(E, k, 3, 0, 0, "sigmoid", false, 1.0f);
    cfg.bias_update_rate = 0.01f;
    layer_init(&L, cfg, N, C, 1300, false);
    for (int64_t i = 0; i < N; i++) tensor_set(L.x, i * C, 1.0 + 0.2 * tensor_get(L.x, i * C)); /* shared direction */
    for (int e = 0; e < E; e++) tensor_set(L.p.w_router, e * C, e == 0 ? 2.0 : -0.5);
    MoeStats st;
    moe_stats_init(&st, &cpu_backend, E);
    bool prev = engine_set_grad(eng, false);
    double first = 0, last = 0;
    const int steps = 400;
    for (int s = 0; s < steps; s++) {
        engine_reset(eng);
        moe_forward(eng, &L.p, &cfg, L.x, &st, NULL);
        double mx, mean;
        moe_stats_read(&st);
        moe_stats_load(&st, &mx, &mean);
        if (s == 0) first = mx / mean;
        if (s >= steps - 50) last += mx / mean / 50;
        moe_update_bias(&L.p, &cfg, &st);
        moe_stats_reset(&st);
    }
    engine_set_grad(eng, prev);
    printf("    load max/mean: first step %.2f, mean of the last 50 steps %.2f; bias %.3f %.3f %.3f %.3f\n", first, last,
           L.bias[0], L.bias[1], L.bias[2], L.bias[3]);
    EXPECT(first > 2.5, "the input is not skewed enough (max/mean %.2f)", first);
    EXPECT(last < 1.4, "bias updates did not balance the load (max/mean %.2f)", last);
    EXPECT(L.bias[0] < 0, "the overloaded expert's bias should have gone down");
    /* the weights are the unbiased scores: the layer with this bias equals the reference with it */
    double ref[64 * 4];
    ref_moe(&L.p, &cfg, L.x, NULL, NULL, ref);
    engine_reset(eng);
    Tensor *out = moe_forward(eng, &L.p, &cfg, L.x, NULL, NULL);
    double max_err = 0;
    for (int64_t i = 0; i < N * C; i++) max_err = fmax(max_err, fabs(tensor_get(out, i) - ref[i]));
    EXPECT(max_err < 1e-12, "biased layer output error %.3e", max_err);
    moe_stats_free(&st);
    test_layer_free(&L);
}

/* The routing statistics a forward must leave in the accumulator, from the per-token reference: the
 * loads counted from the selection idx [N*k], the balance loss E * sum_e f_e P_e (f_e = load_e / (N k),
 * P_e = mean over tokens of the scores, each token's divided by their sum for sigmoid scores) and the
 * z-loss, the mean over tokens of logsumexp(logits)^2. */
static void ref_router_stats(const MoeLayerParams *p, const MoeConfig *c, const Tensor *x, const int32_t *idx,
                             int64_t *load, double *aux, double *z) {
    int64_t N = x->shape[0], C = x->shape[1], E = c->num_experts;
    int k = c->experts_per_token;
    MoeScoreFunc f = strcmp(c->score_func, "sigmoid") == 0 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    double l[64], sc[64], P[64] = {0};
    for (int64_t e = 0; e < E; e++) load[e] = 0;
    for (int64_t i = 0; i < N * k; i++) load[idx[i]]++;
    *z = 0;
    for (int64_t t = 0; t < N; t++) {
        double mx = -INFINITY, lse = 0, st = 0;
        for (int64_t e = 0; e < E; e++) {
            l[e] = 0;
            for (int64_t i = 0; i < C; i++) l[e] += tensor_get(p->w_router, e * C + i) * tensor_get(x, t * C + i);
            mx = fmax(mx, l[e]);
        }
        for (int64_t e = 0; e < E; e++) lse += exp(l[e] - mx);
        lse = mx + log(lse);
        *z += lse * lse / (double)N;
        ref_scores(sc, l, (int)E, f);
        for (int64_t e = 0; e < E; e++) st += sc[e];
        for (int64_t e = 0; e < E; e++) P[e] += sc[e] / (f == MOE_SCORE_SIGMOID ? st : 1.0) / (double)N;
    }
    *aux = 0;
    for (int64_t e = 0; e < E; e++) *aux += (double)E * ((double)load[e] / (double)(N * k)) * P[e];
}

/* The kernel on its own: the loads are added as offset differences, the losses of either dtype, and a NULL
 * loss adds nothing. */
TEST(stats_accumulate_kernel) {
    const int E = 4;
    Tensor *acc = test_tensor(DT_F64, SHAPE(E + 2)), *off = test_tensor(DT_I32, SHAPE(E + 1));
    Tensor *aux32 = test_tensor(DT_F32, SHAPE(1)), *z64 = test_tensor(DT_F64, SHAPE(1));
    const double start[6] = {1.5, 0, 2, 7, 0.25, -1};
    memcpy(acc->data, start, sizeof start);
    memcpy(off->data, (int32_t[]){0, 3, 3, 8, 10}, 5 * sizeof(int32_t));
    ((float *)aux32->data)[0] = 0.75f;
    ((double *)z64->data)[0] = 0.125;
    cpu_backend.moe_stats_accumulate(acc, off, aux32, NULL);
    cpu_backend.moe_stats_accumulate(acc, off, NULL, z64);
    const double want[6] = {1.5 + 6, 0, 2 + 10, 7 + 4, 0.25 + 0.75, -1 + 0.125};
    for (int i = 0; i < E + 2; i++)
        EXPECT(((double *)acc->data)[i] == want[i], "acc[%d] = %g, want %g", i, ((double *)acc->data)[i], want[i]);
    test_tensor_free(acc);
    test_tensor_free(off);
    test_tensor_free(aux32);
    test_tensor_free(z64);
}

/* Two forwards of the layer (different tokens, a bias that steers the selection) accumulate in the
 * backend's memory exactly the loads of the reference's selections and the sum of the reference's balance
 * and z-losses; moe_stats_read brings them to the host, moe_stats_reset zeroes them. */
TEST(stats_accumulate_over_forwards) {
    Engine *eng = tc->fixture;
    for (int v = 0; v < N_VARIANTS; v++) {
        TestLayer L;
        MoeConfig cfg = make_cfg(6, 2, 4, variants[v].shared, 3, variants[v].func, variants[v].renorm, variants[v].scale);
        cfg.aux_loss_weight = v % 2 ? 0.5f : 0.0f; /* the statistics with and without the weighted terms */
        layer_init(&L, cfg, 13, 5, 1700 + 20 * v, true);
        Tensor *x2 = test_randn(DT_F64, SHAPE(13, 5), 1, 1750 + 20 * v);
        MoeStats st;
        moe_stats_init(&st, &cpu_backend, 6);
        int64_t want_load[6] = {0};
        double want_aux = 0, want_z = 0;
        for (int f = 0; f < 2; f++) {
            Tensor *x = f ? x2 : L.x;
            int32_t idx[13 * 2];
            double out[13 * 5], aux, z;
            int64_t load[6];
            ref_moe(&L.p, &cfg, x, NULL, idx, out);
            ref_router_stats(&L.p, &cfg, x, idx, load, &aux, &z);
            for (int e = 0; e < 6; e++) want_load[e] += load[e];
            want_aux += aux;
            want_z += z;
            engine_reset(eng);
            moe_forward(eng, &L.p, &cfg, x, &st, NULL);
        }
        EXPECT(st.forwards == 2 && st.tokens == 26, "variant %d: %d forwards, %lld tokens counted", v, st.forwards,
               (long long)st.tokens);
        for (int e = 0; e < 6; e++) EXPECT(st.load[e] == 0, "variant %d: the host's loads moved before moe_stats_read", v);
        moe_stats_read(&st);
        const double *acc = st.acc.data;
        for (int e = 0; e < 6; e++)
            EXPECT(st.load[e] == want_load[e] && acc[e] == (double)want_load[e], "variant %d expert %d: load %lld, want %lld",
                   v, e, (long long)st.load[e], (long long)want_load[e]);
        EXPECT(fabs(st.aux_loss_sum - want_aux) < 1e-12 * want_aux && acc[6] == st.aux_loss_sum,
               "variant %d: aux sum %.17g, want %.17g", v, st.aux_loss_sum, want_aux);
        EXPECT(fabs(st.z_loss_sum - want_z) < 1e-12 * want_z && acc[7] == st.z_loss_sum,
               "variant %d: z sum %.17g, want %.17g", v, st.z_loss_sum, want_z);
        moe_stats_reset(&st);
        for (int i = 0; i < 8; i++) EXPECT(acc[i] == 0, "variant %d: moe_stats_reset left acc[%d] = %g", v, i, acc[i]);
        EXPECT(st.forwards == 0 && st.tokens == 0 && st.aux_loss_sum == 0, "variant %d: reset left host counts", v);
        moe_stats_free(&st);
        test_tensor_free(x2);
        test_layer_free(&L);
    }
}

/* moe_bias_update (and moe_update_bias, which runs it on a layer's accumulator) against the formula of the
 * auxiliary-loss-free balancing written out here: the mean of the loads in double, each bias moved by
 * rate towards it, none where the load is the mean, and nothing at all when no token was routed. */
TEST(bias_update_matches_host_formula) {
    enum { E = 37 };
    Rng r;
    rng_seed(&r, 1800);
    Tensor *bias = test_tensor(DT_F32, SHAPE(E)), *acc = test_tensor(DT_F64, SHAPE(E + 2));
    float before[E], want[E];
    for (int trial = 0; trial < 4; trial++) {
        double *load = acc->data;
        for (int e = 0; e < E; e++) {
            before[e] = (float)(0.1 * rng_normal(&r));
            /* trial 0: every load 0; trial 1: loads whose mean is one of them (5 of 7 experts at the mean);
             * then skewed random counts */
            load[e] = trial == 0 ? 0 : trial == 1 ? (e % 7 < 5 ? 20 : e % 7 == 5 ? 12 : 28) : (double)(rng_next(&r) % (trial == 2 ? 9 : 1000));
        }
        load[E] = 3.5, load[E + 1] = -2; /* the losses after the loads: not loads */
        memcpy(bias->data, before, sizeof before);
        const float rate = trial == 3 ? 1e-3f : 0.01f;
        double sum = 0;
        for (int e = 0; e < E; e++) sum += load[e];
        const double mean = sum / E;
        int moved = 0;
        for (int e = 0; e < E; e++) {
            const double d = mean - load[e];
            const float step = sum == 0 ? 0.0f : d > 0 ? rate : d < 0 ? -rate : 0.0f;
            want[e] = before[e] + step;
            moved += step != 0;
        }
        cpu_backend.moe_bias_update(bias, acc, rate);
        for (int e = 0; e < E; e++)
            EXPECT(((float *)bias->data)[e] == want[e], "trial %d expert %d: bias %.9g, want %.9g (load %g, mean %g)", trial,
                   e, ((float *)bias->data)[e], want[e], load[e], mean);
        EXPECT(trial == 0 ? moved == 0 : moved > 0 && (trial != 1 || moved < E), "trial %d: %d biases moved", trial, moved);
    }
    /* the layer's update is the kernel on its accumulator, at the config's rate; rate 0 changes nothing */
    TestLayer L;
    MoeConfig cfg = make_cfg(E, 2, 3, 0, 0, "softmax", false, 1.0f);
    layer_init(&L, cfg, 4, 3, 1810, true);
    MoeStats st;
    moe_stats_init(&st, &cpu_backend, E);
    memcpy(st.acc.data, acc->data, (E + 2) * sizeof(double));
    memcpy(before, L.bias, sizeof before);
    moe_update_bias(&L.p, &cfg, &st);
    EXPECT(!memcmp(L.bias, before, sizeof before), "bias_update_rate 0 moved the bias");
    cfg.bias_update_rate = 1e-3f;
    memcpy(bias->data, before, sizeof before);
    cpu_backend.moe_bias_update(bias, acc, 1e-3f);
    moe_update_bias(&L.p, &cfg, &st);
    EXPECT(!memcmp(L.bias, bias->data, sizeof before), "moe_update_bias differs from moe_bias_update on its accumulator");
    EXPECT(memcmp(L.bias, before, sizeof before), "moe_update_bias moved nothing");
    moe_stats_free(&st);
    test_layer_free(&L);
    test_tensor_free(bias);
    test_tensor_free(acc);
}

/* A checkpointed segment runs the layer twice (forward, then recompute in backward): stats must
 * count it once, and loss and gradients must equal the plain run's. */
typedef struct {
    TestLayer *L;
    MoeStats *st;
} SegCtx;
static Tensor *moe_segment(Engine *e, Tensor *x, const void *closure, Tensor **aux) {
    const SegCtx *sc = closure;
    return op_add(e, x, moe_forward(e, &sc->L->p, &sc->L->cfg, x, sc->st, aux));
}

TEST(checkpointed_layer_counts_stats_once) {
    Engine *eng = tc->fixture;
    TestLayer L;
    MoeConfig cfg = make_cfg(4, 2, 3, 1, 2, "softmax", true, 1.0f);
    cfg.aux_loss_weight = 0.1f;
    cfg.z_loss_weight = 0.01f;
    layer_init(&L, cfg, 10, 4, 1400, true);
    Tensor *in[32];
    int n = layer_inputs(&L, in);
    MoeStats st;
    moe_stats_init(&st, &cpu_backend, 4);
    double loss[2], *grads[2];
    int64_t gn = L.p.w_router->numel;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < n; i++) memset(in[i]->grad->data, 0, tensor_bytes(in[i]->grad));
        moe_stats_reset(&st);
        engine_reset(eng);
        SegCtx sc = {&L, &st};
        Tensor *aux = NULL;
        Tensor *y = pass == 0 ? op_checkpoint(eng, moe_segment, &sc, L.x, &aux) : moe_segment(eng, L.x, &sc, &aux);
        Tensor *tg = engine_empty(eng, DT_I32, SHAPE(10));
        int32_t t[10] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1};
        tensor_from_host(eng, tg, t);
        Tensor *total = op_add(eng, op_cross_entropy(eng, y, tg, -1), aux);
        loss[pass] = tensor_item(eng, total);
        engine_backward(eng, total);
        grads[pass] = xmalloc(sizeof(double) * gn);
        memcpy(grads[pass], L.p.w_router->grad->data, sizeof(double) * gn);
        moe_stats_read(&st);
        EXPECT(st.forwards == 1, "pass %d: stats counted %d forwards", pass, st.forwards);
        int64_t sum = 0;
        for (int e = 0; e < 4; e++) sum += st.load[e];
        EXPECT(sum == 10 * 2 && st.tokens == 10, "pass %d: load sums to %lld", pass, (long long)sum);
        EXPECT(st.aux_loss_sum > 0 && st.z_loss_sum > 0, "pass %d: losses not recorded", pass);
    }
    EXPECT(loss[0] == loss[1], "checkpoint changes the loss: %.17g vs %.17g", loss[0], loss[1]);
    EXPECT(rel_err(grads[0], grads[1], gn) < 1e-14, "checkpoint changes router gradients: %.3e", rel_err(grads[0], grads[1], gn));
    free(grads[0]);
    free(grads[1]);
    moe_stats_free(&st);
    test_layer_free(&L);
}

/* The float32 instantiation of every kernel against the float64 layer (same fixed routing). */
TEST(float32_layer_matches_float64) {
    Engine *eng = tc->fixture;
    TestLayer L;
    MoeConfig cfg = make_cfg(5, 2, 4, 1, 3, "sigmoid", true, 1.5f);
    cfg.aux_loss_weight = 0.5f;
    cfg.z_loss_weight = 0.5f;
    layer_init(&L, cfg, 12, 6, 1500, true);
    Tensor *in64[32];
    int n = layer_inputs(&L, in64);
    Tensor *in32[32];
    for (int i = 0; i < n; i++) {
        in32[i] = test_tensor(DT_F32, in64[i]->ndim, in64[i]->shape);
        for (int64_t j = 0; j < in64[i]->numel; j++) tensor_set(in32[i], j, tensor_get(in64[i], j));
        test_requires_grad(in32[i]);
    }
    engine_reset(eng);
    Tensor *aux64 = NULL;
    Tensor *out64 = moe_forward(eng, &L.p, &cfg, L.x, NULL, &aux64);
    Engine e32;
    engine_init(&e32, &cpu_backend, DT_F32, 1 << 20);
    MoeLayerParams p32 = L.p;
    p32.w_router = in32[1], p32.w_gate = in32[2], p32.w_up = in32[3], p32.w_down = in32[4];
    p32.shared_gate[0] = in32[5], p32.shared_up[0] = in32[6], p32.shared_down[0] = in32[7];
    Tensor *aux32 = NULL;
    Tensor *out32 = moe_forward(&e32, &p32, &cfg, in32[0], NULL, &aux32);
    double *a = xmalloc(sizeof(double) * out64->numel), *b = xmalloc(sizeof(double) * out64->numel);
    for (int64_t i = 0; i < out64->numel; i++) {
        a[i] = tensor_get(out32, i);
        b[i] = tensor_get(out64, i);
    }
    double err = rel_err(a, b, out64->numel), aerr = fabs(tensor_item(&e32, aux32) / tensor_item(eng, aux64) - 1);
    EXPECT(err < 1e-5 && aerr < 1e-5, "float32 layer: output rel err %.3e, aux rel err %.3e", err, aerr);
    /* and the float32 backward runs and reaches every parameter */
    Tensor *seed = engine_empty(&e32, DT_F32, out32->ndim, out32->shape);
    for (int64_t i = 0; i < seed->numel; i++) tensor_set(seed, i, 1.0);
    engine_backward_from(&e32, out32, seed, 0);
    double g = 0;
    for (int64_t j = 0; j < in32[1]->numel; j++) g += fabs(tensor_get(in32[1]->grad, j));
    EXPECT(g > 0, "no float32 router gradient");
    free(a);
    free(b);
    engine_free(&e32);
    for (int i = 0; i < n; i++) test_tensor_free(in32[i]);
    test_layer_free(&L);
}

TEST(declare_params_names_shapes_init) {
    ParamStore ps;
    params_init(&ps, &cpu_backend, DT_F32);
    ModelConfig mc = {.d_model = 16, .n_layers = 8, .init_std = 0.02f};
    MoeConfig c = make_cfg(8, 2, 12, 2, 0, "sigmoid", true, 2.5f);
    MoeLayerParams p;
    moe_declare_params(&ps, 3, &mc, &c, &p);
    params_allocate(&ps, 42);
    const char *names[] = {"layers.3.moe.router", "layers.3.moe.w_gate", "layers.3.moe.w_up", "layers.3.moe.w_down",
                           "layers.3.moe.shared.0.w_gate", "layers.3.moe.shared.1.w_down"};
    for (int i = 0; i < 6; i++) EXPECT(params_find(&ps, names[i]), "parameter %s missing", names[i]);
    EXPECT(p.w_gate->ndim == 3 && p.w_gate->shape[0] == 8 && p.w_gate->shape[1] == 12 && p.w_gate->shape[2] == 16,
           "w_gate shape");
    EXPECT(p.w_down->shape[0] == 8 && p.w_down->shape[1] == 16 && p.w_down->shape[2] == 12, "w_down shape");
    EXPECT(p.shared_up[1]->shape[0] == 12 && p.shared_down[1]->shape[1] == 12, "shared_expert_dim 0 = expert_dim");
    EXPECT(p.w_router->shape[0] == 8 && p.w_router->shape[1] == 16, "router shape");
    Param *pd = params_find(&ps, "layers.3.moe.w_down"), *pr = params_find(&ps, "layers.3.moe.router");
    EXPECT(pd->decay && pr->decay, "router and experts decay");
    EXPECT(fabsf(pd->init_std - 0.02f / 4.0f) < 1e-9f && fabsf(pr->init_std - 0.02f) < 1e-9f, "init stds %g %g",
           pd->init_std, pr->init_std);
    EXPECT(p.bias && p.bias->dtype == DT_F32 && p.bias->numel == 8 && p.be == &cpu_backend, "bias f32 [8] of the store's backend");
    EXPECT(!params_find(&ps, "layers.3.moe.bias"), "the bias is no parameter");
    for (int e = 0; e < 8; e++) EXPECT(((float *)p.bias->data)[e] == 0.0f, "bias not zero-initialised");
    moe_free_params(&p);
    params_free(&ps);
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(grouped_linear_forward_and_grad);
    RUN(plan_permute_unpermute_exact);
    RUN(grad_permute_unpermute);
    RUN(router_scores_and_weights);
    RUN(topk_matches_reference_with_ties_and_bias);
    RUN(aux_and_z_losses);
    RUN(layer_matches_per_token_reference);
    RUN(large_layer_parallel_paths);
    RUN(token_output_uses_exactly_its_topk);
    RUN(single_expert_equals_dense_swiglu);
    RUN(grad_whole_layer_fixed_routing);
    RUN(stats_accumulate_kernel);
    RUN(stats_accumulate_over_forwards);
    RUN(bias_update_matches_host_formula);
    RUN(bias_update_balances_load);
    RUN(checkpointed_layer_counts_stats_once);
    RUN(float32_layer_matches_float64);
    RUN(declare_params_names_shapes_init);
    engine_free(&eng);
    TEST_END();
}
