/* Float64 finite-difference gradient checks of the basic ops (add, scale, linear, embedding, rmsnorm,
 * add_rmsnorm, swiglu, gelu, dropout, cross-entropy, checkpoint), forward values against naive references, and the engine's
 * views, detach and no-grad mode. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/dropout_mask.h"
#include "../kernels/util.h"
#include "gradcheck.h"
#include "test.h"

#define TOL 1e-6

static bool grad_ok(TestCtx *tc, GradCheckResult r, const char *what) {
    (void)tc;
    if (!(r.max_rel_err < TOL && r.numeric_norm > 0)) {
        printf("    %s: rel err %.3e (input %d, numeric norm %.3e)\n", what, r.max_rel_err, r.worst_input, r.numeric_norm);
        return false;
    }
    return true;
}

/* ---- functions under test (inputs: persistent f64 tensors) ---- */
static Tensor *f_add(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    return op_add(e, op_scale(e, in[0], 0.5f), op_add(e, in[1], in[0]));
}
static Tensor *f_linear(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    return op_linear(e, in[0], in[1]);
}
static Tensor *f_embedding(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    return op_embedding(e, in[0], in[1]);
}
typedef struct {
    bool unit_offset;
    bool gain;
} NormCtx;
static Tensor *f_rmsnorm(Engine *e, Tensor **in, void *ctx) {
    NormCtx *c = ctx;
    return op_rmsnorm(e, in[0], c->gain ? in[1] : NULL, 1e-5f, c->unit_offset);
}
typedef struct {
    int uses; /* what the function returns: 1 the norm y, 2 the sum h, 3 swiglu(y, h) */
    bool gain;
} AddNormCtx;
static Tensor *f_add_rmsnorm(Engine *e, Tensor **in, void *ctx) {
    const AddNormCtx *c = ctx;
    Tensor *h, *y = op_add_rmsnorm(e, in[0], in[1], c->gain ? in[2] : NULL, 1e-5f, &h);
    return c->uses == 3 ? op_swiglu(e, y, h) : c->uses == 1 ? y : h;
}
static Tensor *f_swiglu(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    return op_swiglu(e, in[0], in[1]);
}
static Tensor *f_gelu(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    return op_gelu(e, in[0]);
}
/* a dropout seed as the kernels read it: an i32 [2] tensor of its words (kernels/dropout_mask.h) */
static Tensor *seed_tensor(uint64_t seed) {
    Tensor *t = test_tensor(DT_I32, SHAPE(2));
    dropout_seed_words(seed, t->data);
    return t;
}

static Tensor *f_dropout(Engine *e, Tensor **in, void *ctx) {
    return op_dropout(e, in[0], 0.3f, ctx, 17);
}
static Tensor *f_ce(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    return op_cross_entropy(e, in[0], in[1], -1);
}

/* a two-linear "block" with a residual and an auxiliary loss: checkpointed and plain */
typedef struct {
    Tensor *w1, *w2, *targets;
} SegCtx;
/* y = x + W2 swiglu(W1 x, W1 x); aux = cross-entropy of y against fixed targets */
static Tensor *segment(Engine *e, Tensor *x, const void *closure, Tensor **aux) {
    const SegCtx *s = closure;
    Tensor *h = op_swiglu(e, op_linear(e, x, s->w1), op_linear(e, x, s->w1));
    Tensor *y = op_add(e, x, op_linear(e, h, s->w2));
    *aux = op_cross_entropy(e, y, s->targets, -1);
    return y;
}
/* two segments, checkpointed or not; the scalar output sums the final loss and both aux losses */
static Tensor *f_checkpoint(Engine *e, Tensor **in, void *ctx) {
    bool use = *(bool *)ctx;
    SegCtx *sc = arena_alloc(&e->host, sizeof(SegCtx));
    sc->w1 = in[1];
    sc->w2 = in[2];
    sc->targets = engine_empty(e, DT_I32, SHAPE(in[0]->shape[0]));
    int32_t t[5] = {0, 1, 2, 3, 4};
    tensor_from_host(e, sc->targets, t);
    Tensor *x = op_scale(e, in[0], 1.0f), *total = NULL;
    for (int i = 0; i < 2; i++) {
        Tensor *aux = NULL;
        x = use ? op_checkpoint(e, segment, sc, x, &aux) : segment(e, x, sc, &aux);
        total = total ? op_add(e, total, aux) : aux;
    }
    return op_add(e, total, op_cross_entropy(e, x, sc->targets, -1));
}

TEST(grad_add_scale) {
    Engine *eng = tc->fixture;
    Tensor *a = test_randn(DT_F64, SHAPE(3, 5), 1, 1), *b = test_randn(DT_F64, SHAPE(3, 5), 1, 2);
    test_requires_grad(a);
    test_requires_grad(b);
    Tensor *in[] = {a, b};
    EXPECT(grad_ok(tc, gradcheck(eng, f_add, in, 2, NULL, 0, 3), "add/scale"), "add/scale gradient");
    test_tensor_free(a);
    test_tensor_free(b);
}

TEST(grad_linear_odd_shapes) {
    Engine *eng = tc->fixture;
    int64_t shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {13, 9, 11}};
    for (int s = 0; s < 3; s++) {
        Tensor *x = test_randn(DT_F64, SHAPE(shapes[s][0], shapes[s][1]), 1, 10 + s);
        Tensor *w = test_randn(DT_F64, SHAPE(shapes[s][2], shapes[s][1]), 1, 20 + s);
        test_requires_grad(x);
        test_requires_grad(w);
        Tensor *in[] = {x, w};
        EXPECT(grad_ok(tc, gradcheck(eng, f_linear, in, 2, NULL, 0, 4), "linear"), "linear gradient, shape %d", s);
        test_tensor_free(x);
        test_tensor_free(w);
    }
    /* 3-D input (batched leading dims) */
    Tensor *x = test_randn(DT_F64, SHAPE(2, 3, 4), 1, 30), *w = test_randn(DT_F64, SHAPE(5, 4), 1, 31);
    test_requires_grad(x);
    test_requires_grad(w);
    Tensor *in[] = {x, w};
    EXPECT(grad_ok(tc, gradcheck(eng, f_linear, in, 2, NULL, 0, 5), "linear 3d"), "linear 3-D gradient");
    test_tensor_free(x);
    test_tensor_free(w);
}

TEST(linear_forward_matches_naive) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(6, 7), 1, 40), *w = test_randn(DT_F64, SHAPE(5, 7), 1, 41);
    engine_reset(eng);
    Tensor *y = op_linear(eng, x, w);
    double max_err = 0;
    for (int i = 0; i < 6; i++)
        for (int o = 0; o < 5; o++) {
            double ref = 0;
            for (int c = 0; c < 7; c++) ref += tensor_get(x, i * 7 + c) * tensor_get(w, o * 7 + c);
            max_err = fmax(max_err, fabs(ref - tensor_get(y, i * 5 + o)));
        }
    EXPECT(max_err < 1e-12, "linear forward error %.3e", max_err);
    test_tensor_free(x);
    test_tensor_free(w);
}

TEST(grad_embedding_repeated_tokens) {
    Engine *eng = tc->fixture;
    Tensor *w = test_randn(DT_F64, SHAPE(11, 6), 1, 50);
    Tensor *tok = test_tensor(DT_I32, SHAPE(9));
    int32_t ids[9] = {3, 0, 3, 10, 7, 3, 0, 1, 10};
    memcpy(tok->data, ids, sizeof ids);
    test_requires_grad(w);
    Tensor *in[] = {w, tok};
    EXPECT(grad_ok(tc, gradcheck(eng, f_embedding, in, 2, NULL, 0, 6), "embedding"), "embedding gradient");
    test_tensor_free(w);
    test_tensor_free(tok);
}

TEST(grad_rmsnorm_variants) {
    Engine *eng = tc->fixture;
    NormCtx variants[] = {{false, true}, {true, true}, {false, false}};
    for (int v = 0; v < 3; v++) {
        /* block norm [N, C] and per-head norm [N, H, D] */
        Tensor *xs[2] = {test_randn(DT_F64, SHAPE(7, 9), 1, 60 + v), test_randn(DT_F64, SHAPE(5, 3, 8), 1, 70 + v)};
        for (int k = 0; k < 2; k++) {
            Tensor *x = xs[k];
            Tensor *w = test_randn(DT_F64, SHAPE(tensor_dim(x, -1)), 0.5, 80 + v);
            test_requires_grad(x);
            if (variants[v].gain) test_requires_grad(w);
            Tensor *in[] = {x, w};
            EXPECT(grad_ok(tc, gradcheck(eng, f_rmsnorm, in, 2, &variants[v], 0, 7), "rmsnorm"),
                   "rmsnorm gradient, variant %d, rank %d", v, x->ndim);
            test_tensor_free(w);
            test_tensor_free(x);
        }
    }
}

TEST(rmsnorm_forward_matches_naive) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(4, 6), 2, 90), *w = test_randn(DT_F64, SHAPE(6), 1, 91);
    engine_reset(eng);
    Tensor *y = op_rmsnorm(eng, x, w, 1e-5f, true);
    double max_err = 0;
    for (int r = 0; r < 4; r++) {
        double ms = 0;
        for (int c = 0; c < 6; c++) ms += tensor_get(x, r * 6 + c) * tensor_get(x, r * 6 + c) / 6;
        for (int c = 0; c < 6; c++) {
            double ref = tensor_get(x, r * 6 + c) / sqrt(ms + (double)1e-5f) * (1 + tensor_get(w, c));
            max_err = fmax(max_err, fabs(ref - tensor_get(y, r * 6 + c)));
        }
    }
    EXPECT(max_err < 1e-12, "rmsnorm forward error %.3e", max_err);
    test_tensor_free(x);
    test_tensor_free(w);
}

TEST(grad_add_rmsnorm_variants) {
    Engine *eng = tc->fixture;
    /* both outputs used (the gradient reaching h adds to the norm's), only y (no gradient at h), only h
     * (no norm gradient: the add's), without a gain */
    AddNormCtx variants[] = {{3, true}, {1, true}, {2, true}, {3, false}};
    for (int v = 0; v < 4; v++) {
        const int64_t shapes[2][3] = {{7, 9}, {5, 3, 8}};
        for (int k = 0; k < 2; k++) {
            const int ndim = k + 2;
            Tensor *x = test_randn(DT_F64, ndim, shapes[k], 1, 200 + v), *r = test_randn(DT_F64, ndim, shapes[k], 1, 210 + v);
            Tensor *w = test_randn(DT_F64, SHAPE(tensor_dim(x, -1)), 0.5, 220 + v);
            test_requires_grad(x);
            test_requires_grad(r);
            if (variants[v].gain && variants[v].uses & 1) test_requires_grad(w);
            Tensor *in[] = {x, r, w};
            EXPECT(grad_ok(tc, gradcheck(eng, f_add_rmsnorm, in, 3, &variants[v], 0, 9), "add_rmsnorm"),
                   "add_rmsnorm gradient, variant %d, rank %d", v, ndim);
            test_tensor_free(w);
            test_tensor_free(r);
            test_tensor_free(x);
        }
    }
}

/* The residual stream of two blocks, as the model had it (add, then rmsnorm) or fused: h1 = x + a,
 * h2 = h1 + (norm(h1) W^T), out = swiglu(norm(h2), h2): h2 has two uses, as the stream between blocks. */
static Tensor *residual_chain(Engine *e, Tensor *const *in, bool fused) {
    Tensor *x = in[0], *a = in[1], *wl = in[2], *g1 = in[3], *g2 = in[4], *h1, *h2, *n1, *n2;
    if (fused) n1 = op_add_rmsnorm(e, x, a, g1, 1e-5f, &h1);
    else n1 = op_rmsnorm(e, h1 = op_add(e, x, a), g1, 1e-5f, false);
    Tensor *f = op_linear(e, n1, wl);
    if (fused) n2 = op_add_rmsnorm(e, h1, f, g2, 1e-5f, &h2);
    else n2 = op_rmsnorm(e, h2 = op_add(e, h1, f), g2, 1e-5f, false);
    return op_swiglu(e, n2, h2);
}

/* On the CPU the fused op is the unfused sequence bit for bit, forward and every gradient (what keeps a
 * model's CPU losses unchanged by the fusion); F32 as in training, rows enough for the parallel loops. */
TEST(add_rmsnorm_is_add_then_rmsnorm_bit_for_bit) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 22);
    const int64_t N = 300, C = 64;
    Tensor *in[5] = {test_randn(DT_F32, SHAPE(N, C), 1, 230), test_randn(DT_F32, SHAPE(N, C), 1, 231),
                     test_randn(DT_F32, SHAPE(C, C), 0.2, 232), test_randn(DT_F32, SHAPE(C), 0.3, 233),
                     test_randn(DT_F32, SHAPE(C), 0.3, 234)};
    Tensor *seed = test_randn(DT_F32, SHAPE(N, C), 1, 235);
    for (int i = 0; i < 5; i++) test_requires_grad(in[i]);
    float *out[2], *grad[2][5];
    for (int fused = 0; fused < 2; fused++) {
        for (int i = 0; i < 5; i++) memset(in[i]->grad->data, 0, tensor_bytes(in[i]));
        engine_reset(&e);
        Tensor *o = residual_chain(&e, in, fused);
        out[fused] = xmalloc(tensor_bytes(o));
        memcpy(out[fused], o->data, tensor_bytes(o));
        engine_backward_from(&e, o, seed, 0);
        for (int i = 0; i < 5; i++) {
            grad[fused][i] = xmalloc(tensor_bytes(in[i]));
            memcpy(grad[fused][i], in[i]->grad->data, tensor_bytes(in[i]));
        }
    }
    EXPECT(memcmp(out[0], out[1], (size_t)(N * C) * sizeof(float)) == 0, "fused forward differs from add + rmsnorm");
    const char *names[5] = {"x", "a", "W", "gain 1", "gain 2"};
    for (int i = 0; i < 5; i++) {
        EXPECT(test_norm(in[i]->grad) > 0, "the gradient of %s is zero: the comparison proves nothing", names[i]);
        EXPECT(memcmp(grad[0][i], grad[1][i], tensor_bytes(in[i])) == 0, "fused gradient of %s differs from add + rmsnorm",
               names[i]);
    }
    for (int f = 0; f < 2; f++) {
        free(out[f]);
        for (int i = 0; i < 5; i++) free(grad[f][i]);
    }
    for (int i = 0; i < 5; i++) test_tensor_free(in[i]);
    test_tensor_free(seed);
    engine_free(&e);
}

TEST(grad_swiglu) {
    Engine *eng = tc->fixture;
    Tensor *g = test_randn(DT_F64, SHAPE(5, 7), 2, 100), *u = test_randn(DT_F64, SHAPE(5, 7), 1, 101);
    test_requires_grad(g);
    test_requires_grad(u);
    Tensor *in[] = {g, u};
    EXPECT(grad_ok(tc, gradcheck(eng, f_swiglu, in, 2, NULL, 0, 8), "swiglu"), "swiglu gradient");
    test_tensor_free(g);
    test_tensor_free(u);
}

/* std 2: the saturated tails (f' -> 0 and 1) and the dip below zero around x = -0.75 */
TEST(grad_gelu) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(6, 9), 2, 103);
    test_requires_grad(x);
    EXPECT(grad_ok(tc, gradcheck(eng, f_gelu, &x, 1, NULL, 0, 8), "gelu"), "gelu gradient");
    test_tensor_free(x);
}

/* The tanh approximation against the exact GELU x Phi(x) = x/2 (1 + erf(x / sqrt 2)): within 5e-4 on
 * [-8, 8] (its worst gap is 4.7e-4), equal to it in the tails, and GPT-2's value at 1 (0.8411919906). */
TEST(gelu_forward_matches_erf_gelu) {
    Engine *eng = tc->fixture;
    const int64_t n = 1601;
    Tensor *x = test_tensor(DT_F64, SHAPE(n));
    for (int64_t i = 0; i < n; i++) tensor_set(x, i, -8.0 + 0.01 * (double)i);
    engine_reset(eng);
    Tensor *y = op_gelu(eng, x);
    double max_gap = 0;
    for (int64_t i = 0; i < n; i++) {
        const double v = tensor_get(x, i), exact = 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
        max_gap = fmax(max_gap, fabs(tensor_get(y, i) - exact));
    }
    EXPECT(max_gap < 5e-4, "largest gap to the exact GELU %.3e", max_gap);
    EXPECT(fabs(tensor_get(y, 0)) < 1e-12 && fabs(tensor_get(y, n - 1) - 8.0) < 1e-12, "tails %.3e, %.15g",
           tensor_get(y, 0), tensor_get(y, n - 1));
    EXPECT(fabs(tensor_get(y, 900) - 0.8411919906082768) < 1e-12, "gelu(1) = %.16g", tensor_get(y, 900));
    test_tensor_free(x);
}

TEST(grad_dropout) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(6, 9), 1, 102);
    test_requires_grad(x);
    Tensor *seed = seed_tensor(0x1234abcdull);
    EXPECT(grad_ok(tc, gradcheck(eng, f_dropout, &x, 1, seed, 0, 8), "dropout"), "dropout gradient");
    test_tensor_free(x);
    test_tensor_free(seed);
}

/* The mask: the dropped fraction is p (binomial, 5 sigma), kept elements are scaled by 1/(1-p), a
 * shifted offset shifts the mask (what data-parallel ranks rely on), another seed draws another mask,
 * and f32 and f64 drop the same elements. */
TEST(dropout_mask_statistics) {
    Engine *eng = tc->fixture;
    const int64_t n = 200000;
    const float p = 0.2f;
    Tensor *s99 = seed_tensor(99), *s100 = seed_tensor(100);
    Tensor *x = test_tensor(DT_F64, SHAPE(n)), *y = test_tensor(DT_F64, SHAPE(n)), *y2 = test_tensor(DT_F64, SHAPE(n));
    for (int64_t i = 0; i < n; i++) ((double *)x->data)[i] = 1.0 + (double)(i % 7);
    cpu_backend.dropout_forward(y, x, p, s99, 0);
    int64_t dropped = 0, bad_scale = 0;
    for (int64_t i = 0; i < n; i++) {
        double yi = ((double *)y->data)[i], xi = ((double *)x->data)[i];
        if (yi == 0) dropped++;
        else if (fabs(yi - xi / (1.0 - p)) > 1e-12 * xi) bad_scale++;
    }
    const double sigma = sqrt(n * p * (1 - p));
    EXPECT(fabs((double)dropped - n * p) < 5 * sigma, "dropped %lld of %lld, expected %.0f +- %.0f", (long long)dropped,
           (long long)n, n * p, 5 * sigma);
    EXPECT(bad_scale == 0, "%lld kept elements not scaled by 1/(1-p)", (long long)bad_scale);
    /* offset: element i of a call at offset 1000 is element i + 1000 of the call at offset 0 */
    Tensor *xs = test_tensor(DT_F64, SHAPE(n - 1000)), *ys = test_tensor(DT_F64, SHAPE(n - 1000));
    memcpy(xs->data, (double *)x->data + 1000, sizeof(double) * (size_t)(n - 1000));
    cpu_backend.dropout_forward(ys, xs, p, s99, 1000);
    EXPECT(memcmp(ys->data, (double *)y->data + 1000, sizeof(double) * (size_t)(n - 1000)) == 0,
           "the mask at offset 1000 differs from the shifted mask at offset 0");
    cpu_backend.dropout_forward(y2, x, p, s100, 0);
    int64_t same = 0;
    for (int64_t i = 0; i < n; i++) same += (((double *)y->data)[i] == 0) == (((double *)y2->data)[i] == 0);
    EXPECT(same < n - n / 10, "seeds 99 and 100 agree on %lld of %lld elements", (long long)same, (long long)n);
    Tensor *xf = test_copy_as(x, DT_F32), *yf = test_tensor(DT_F32, SHAPE(n));
    cpu_backend.dropout_forward(yf, xf, p, s99, 0);
    int64_t differ = 0;
    for (int64_t i = 0; i < n; i++) differ += (((float *)yf->data)[i] == 0) != (((double *)y->data)[i] == 0);
    EXPECT(differ == 0, "f32 and f64 masks differ in %lld elements", (long long)differ);
    (void)eng;
    Tensor *all[] = {x, y, y2, xs, ys, xf, yf, s99, s100};
    for (int i = 0; i < 9; i++) test_tensor_free(all[i]);
}

TEST(grad_cross_entropy_with_ignore) {
    Engine *eng = tc->fixture;
    Tensor *lg = test_randn(DT_F64, SHAPE(7, 13), 2, 110);
    Tensor *tg = test_tensor(DT_I32, SHAPE(7));
    int32_t t[7] = {0, 12, -1, 5, 5, -1, 3};
    memcpy(tg->data, t, sizeof t);
    test_requires_grad(lg);
    Tensor *in[] = {lg, tg};
    EXPECT(grad_ok(tc, gradcheck(eng, f_ce, in, 2, NULL, 0, 9), "cross_entropy"), "cross-entropy gradient");
    /* value against a naive reference, ignored rows excluded from the mean */
    engine_reset(eng);
    double got = tensor_item(eng, op_cross_entropy(eng, lg, tg, -1)), ref = 0;
    int cnt = 0;
    for (int r = 0; r < 7; r++) {
        if (t[r] < 0) continue;
        double s = 0;
        for (int v = 0; v < 13; v++) s += exp(tensor_get(lg, r * 13 + v));
        ref += log(s) - tensor_get(lg, r * 13 + t[r]);
        cnt++;
    }
    ref /= cnt;
    EXPECT(fabs(got - ref) < 1e-12, "cross-entropy %.15f vs reference %.15f", got, ref);
    /* ignored rows get exactly zero gradient */
    engine_reset(eng);
    memset(lg->grad->data, 0, tensor_bytes(lg));
    engine_backward(eng, op_cross_entropy(eng, lg, tg, -1));
    for (int v = 0; v < 13; v++) EXPECT(tensor_get(lg->grad, 2 * 13 + v) == 0.0, "ignored row got a gradient");
    test_tensor_free(lg);
    test_tensor_free(tg);
}

TEST(checkpoint_matches_plain_and_gradchecks) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(5, 6), 1, 120);
    Tensor *w1 = test_randn(DT_F64, SHAPE(8, 6), 0.5, 121), *w2 = test_randn(DT_F64, SHAPE(6, 8), 0.5, 122);
    test_requires_grad(x);
    test_requires_grad(w1);
    test_requires_grad(w2);
    Tensor *in[] = {x, w1, w2};
    bool use = true, plain = false;
    EXPECT(grad_ok(tc, gradcheck(eng, f_checkpoint, in, 3, &use, 0, 10), "checkpoint"), "checkpointed gradient");
    /* identical loss and gradients with and without recomputation */
    double *g_ck = malloc(sizeof(double) * 48), *g_pl = malloc(sizeof(double) * 48), loss_val[2];
    for (int pass = 0; pass < 2; pass++) {
        memset(w1->grad->data, 0, tensor_bytes(w1));
        memset(x->grad->data, 0, tensor_bytes(x));
        engine_reset(eng);
        Tensor *loss = f_checkpoint(eng, in, pass == 0 ? &use : &plain);
        loss_val[pass] = tensor_item(eng, loss);
        engine_backward(eng, loss);
        memcpy(pass == 0 ? g_ck : g_pl, w1->grad->data, sizeof(double) * 48);
    }
    EXPECT(loss_val[0] == loss_val[1], "checkpoint changes the loss: %.17g vs %.17g", loss_val[0], loss_val[1]);
    EXPECT(rel_err(g_ck, g_pl, 48) < 1e-14, "checkpoint changes gradients: %.3e", rel_err(g_ck, g_pl, 48));
    free(g_ck);
    free(g_pl);
    test_tensor_free(x);
    test_tensor_free(w1);
    test_tensor_free(w2);
}

/* y = x + W2 swiglu(W1 x, W1 x): segment above without its auxiliary loss */
static Tensor *block_no_aux(Engine *e, Tensor *x, const void *closure, Tensor **aux) {
    Tensor *unused = NULL;
    Tensor *y = segment(e, x, closure, &unused);
    *aux = NULL;
    return y;
}

/* The arena peak of a chain of `blocks` checkpointed blocks on x [rows, 6], forward and backward on backend
 * be, and x's gradient into gx (rows x 6 doubles). */
static size_t chain_peak_on(const KernelBackend *be, Engine *e, Tensor *x, SegCtx *sc, int blocks, bool checkpointed,
                            bool offload, double *gx) {
    memset(x->grad->data, 0, tensor_bytes(x));
    engine_free(e);
    engine_init(e, be, DT_F64, 1 << 20);
    e->offload_block_inputs = offload;
    Tensor *h = op_scale(e, x, 1.0f);
    for (int i = 0; i < blocks; i++) {
        Tensor *aux = NULL;
        h = checkpointed ? op_checkpoint(e, block_no_aux, sc, h, NULL) : block_no_aux(e, h, sc, &aux);
    }
    engine_backward(e, op_cross_entropy(e, h, sc->targets, -1));
    memcpy(gx, x->grad->data, tensor_bytes(x));
    return e->data.high_water;
}
static size_t chain_peak(Engine *e, Tensor *x, SegCtx *sc, int blocks, bool checkpointed, bool offload, double *gx) {
    return chain_peak_on(&cpu_backend, e, x, sc, blocks, checkpointed, offload, gx);
}

/* The chain tests' inputs: x [rows, 6] (with a gradient), the blocks' two weights and the targets, from seeds
 * seed, seed + 1, seed + 2. */
typedef struct ChainInputs {
    Tensor *x;
    SegCtx sc;
} ChainInputs;

static ChainInputs chain_inputs(int64_t rows, uint64_t seed) {
    ChainInputs c = {test_randn(DT_F64, SHAPE(rows, 6), 1, seed), {0}};
    c.sc = (SegCtx){test_randn(DT_F64, SHAPE(8, 6), 0.5, seed + 1), test_randn(DT_F64, SHAPE(6, 8), 0.5, seed + 2),
                    test_tensor(DT_I32, SHAPE(rows))};
    test_requires_grad(c.x);
    for (int64_t r = 0; r < rows; r++) ((int32_t *)c.sc.targets->data)[r] = (int32_t)(r % 6);
    return c;
}

static void chain_inputs_free(ChainInputs *c) {
    test_tensor_free(c->sc.targets);
    test_tensor_free(c->x);
    test_tensor_free(c->sc.w1);
    test_tensor_free(c->sc.w2);
}

/* A chain of checkpointed blocks holds two gradient buffers of a block's input for the whole chain (each
 * block's backward hands its input's gradient down in its output's buffer), not one per block: 4 more
 * blocks cost 4 saved outputs (and their auxiliary scalars), not 4 outputs and 4 gradients. Offloaded
 * (train.offload_block_inputs), the outputs leave the arena, and the gradient stays bit for bit. */
TEST(checkpoint_chain_reuses_the_gradient_buffer) {
    Engine *eng = tc->fixture;
    const int64_t rows = 64;
    ChainInputs in = chain_inputs(rows, 140);
    Tensor *x = in.x;
    SegCtx sc = in.sc;
    double *g[4];
    for (int i = 0; i < 4; i++) g[i] = malloc(tensor_bytes(x));
    const size_t four = chain_peak(eng, x, &sc, 4, true, false, g[0]), eight = chain_peak(eng, x, &sc, 8, true, false, g[1]);
    chain_peak(eng, x, &sc, 8, false, false, g[2]);
    /* offloaded, the 8 outputs leave the arena (two device slots and the host hold them) */
    const size_t offloaded = chain_peak(eng, x, &sc, 8, true, true, g[3]);
    const size_t act = (size_t)rows * 6 * sizeof(double), per_block = act + 64; /* output + aux scalar */
    EXPECT(eight - four == 4 * per_block, "4 more blocks add %zu bytes at the peak, expected %zu (one %zu-byte output each)",
           eight - four, 4 * per_block, act);
    EXPECT(memcmp(g[1], g[2], tensor_bytes(x)) == 0, "x's gradient through 8 checkpointed blocks differs from the plain chain's");
    EXPECT(memcmp(g[3], g[2], tensor_bytes(x)) == 0 && eng->n_offloaded == 8,
           "offloaded: x's gradient differs from the plain chain's (%d outputs offloaded)", eng->n_offloaded);
    EXPECT(eight - offloaded == 8 * act, "offloading 8 outputs lowers the arena peak by %zu bytes, expected %zu",
           eight - offloaded, 8 * act);
    for (int i = 0; i < 4; i++) free(g[i]);
    eng->offload_block_inputs = false;
    chain_inputs_free(&in);
}

/* The CPU backend with its asynchronous copies as late as their contract lets a device run them: a copy is
 * queued and runs only when a wait on its lane (or on the other lane, behind a later copy: the copies run in
 * issue order) needs it, so a slot written before the copy that reads it was waited for, or read before the
 * copy that fills it was, gives other bytes than the CPU's immediate copies. */
enum { MAX_DEFERRED = 256 };
static struct {
    struct {
        void *dst;
        const void *src;
        size_t bytes;
        int lane;
        int64_t matmuls; /* the GEMMs issued before the copy */
    } queue[MAX_DEFERRED];
    int queued, to_host, from_host;
    int64_t matmuls;
    int from_host_under_compute; /* copies back that ran after GEMMs issued after them (they overlap those) */
} deferred;

static void deferred_matmul(Tensor *c, const Tensor *a, const Tensor *b, bool trans_a, bool trans_b, float alpha,
                            float beta) {
    deferred.matmuls++;
    cpu_backend.matmul(c, a, b, trans_a, trans_b, alpha, beta);
}

static void deferred_push(void *dst, const void *src, size_t bytes, int lane) {
    if (deferred.queued == MAX_DEFERRED) fatal("deferred copies: the queue is full");
    deferred.queue[deferred.queued++] = (__typeof__(deferred.queue[0])){dst, src, bytes, lane, deferred.matmuls};
}
static void deferred_to_host(void *dst, const void *src, size_t bytes, int lane) {
    deferred.to_host++;
    deferred_push(dst, src, bytes, lane);
}
static void deferred_from_host(void *dst, const void *src, size_t bytes, int lane) {
    deferred.from_host++;
    deferred_push(dst, src, bytes, lane);
    deferred.queue[deferred.queued - 1].lane |= 2; /* marks a copy back */
}
static void deferred_wait(int lane) {
    int last = -1;
    for (int i = 0; i < deferred.queued; i++)
        if ((deferred.queue[i].lane & 1) == lane) last = i;
    for (int i = 0; i <= last; i++)
        if ((deferred.queue[i].lane & 2) && deferred.matmuls > deferred.queue[i].matmuls) deferred.from_host_under_compute++;
    for (int i = 0; i <= last; i++) memcpy(deferred.queue[i].dst, deferred.queue[i].src, deferred.queue[i].bytes);
    memmove(deferred.queue, deferred.queue + last + 1, (size_t)(deferred.queued - last - 1) * sizeof deferred.queue[0]);
    deferred.queued -= last + 1;
}

/* Offloaded block inputs with copies that overlap the blocks (autograd/op_checkpoint.c): run as late as the
 * lanes allow, they give the gradient of the plain chain bit for bit, and each output goes to the host once
 * and comes back once, except the last two, which the backward finds still in their slots. */
TEST(offload_copies_overlap_within_their_contract) {
    Engine *eng = tc->fixture;
    const int blocks = 7;
    ChainInputs in = chain_inputs(32, 150);
    Tensor *x = in.x;
    SegCtx sc = in.sc;
    KernelBackend late = cpu_backend;
    late.copy_to_host_async = deferred_to_host;
    late.copy_from_host_async = deferred_from_host;
    late.copy_lane_wait = deferred_wait;
    late.matmul = deferred_matmul;
    double *plain = malloc(tensor_bytes(x)), *offloaded = malloc(tensor_bytes(x));
    chain_peak(eng, x, &sc, blocks, false, false, plain);
    memset(&deferred, 0, sizeof deferred);
    chain_peak_on(&late, eng, x, &sc, blocks, true, true, offloaded);
    EXPECT(memcmp(plain, offloaded, tensor_bytes(x)) == 0, "offloaded with late copies: x's gradient differs from the plain chain's");
    EXPECT(deferred.to_host == blocks && deferred.from_host == blocks - 2,
           "%d copies to the host and %d back for %d offloaded outputs (expected %d and %d)", deferred.to_host,
           deferred.from_host, blocks, blocks, blocks - 2);
    /* each copy back was issued a block's backward ahead of the wait that needs it: GEMMs ran in between */
    EXPECT(deferred.from_host_under_compute == blocks - 2, "%d of %d copies back overlapped a block's backward",
           deferred.from_host_under_compute, blocks - 2);
    free(plain);
    free(offloaded);
    engine_free(eng);
    engine_init(eng, &cpu_backend, DT_F64, 1 << 20);
    chain_inputs_free(&in);
}

TEST(no_grad_and_detach_record_nothing) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(3, 4), 1, 130), *w = test_randn(DT_F64, SHAPE(2, 4), 1, 131);
    test_requires_grad(w);
    engine_reset(eng);
    bool prev = engine_set_grad(eng, false);
    op_linear(eng, x, w);
    engine_set_grad(eng, prev);
    EXPECT(eng->tape_len == 0, "no_grad recorded %d nodes", eng->tape_len);
    Tensor *wd = engine_detach(eng, w);
    Tensor *y = op_linear(eng, x, wd);
    EXPECT(eng->tape_len == 0 && !y->requires_grad, "detached weight still recorded");
    /* frozen parameter: requires_grad false -> no node, no gradient */
    w->requires_grad = false;
    op_linear(eng, x, w);
    EXPECT(eng->tape_len == 0, "frozen weight recorded a node");
    test_tensor_free(x);
    test_tensor_free(w);
}

TEST(view_shares_gradient) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(4, 6), 1, 140), *w = test_randn(DT_F64, SHAPE(3, 3), 1, 141);
    test_requires_grad(x);
    test_requires_grad(w);
    memset(x->grad->data, 0, tensor_bytes(x));
    engine_reset(eng);
    Tensor *xv = engine_view(eng, x, SHAPE(8, 3));
    Tensor *y = op_linear(eng, xv, w);
    Tensor *tg = engine_empty(eng, DT_I32, SHAPE(8));
    int32_t t[8] = {0, 1, 2, 0, 1, 2, 0, 1};
    tensor_from_host(eng, tg, t);
    engine_backward(eng, op_cross_entropy(eng, y, tg, -1));
    double s = 0;
    for (int i = 0; i < 24; i++) s += fabs(tensor_get(x->grad, i));
    EXPECT(s > 0, "gradient did not reach the base of a view");
    test_tensor_free(x);
    test_tensor_free(w);
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(grad_add_scale);
    RUN(grad_linear_odd_shapes);
    RUN(linear_forward_matches_naive);
    RUN(grad_embedding_repeated_tokens);
    RUN(grad_rmsnorm_variants);
    RUN(rmsnorm_forward_matches_naive);
    RUN(grad_add_rmsnorm_variants);
    RUN(add_rmsnorm_is_add_then_rmsnorm_bit_for_bit);
    RUN(grad_swiglu);
    RUN(grad_gelu);
    RUN(gelu_forward_matches_erf_gelu);
    RUN(grad_dropout);
    RUN(dropout_mask_statistics);
    RUN(grad_cross_entropy_with_ignore);
    RUN(checkpoint_matches_plain_and_gradchecks);
    RUN(checkpoint_chain_reuses_the_gradient_buffer);
    RUN(offload_copies_overlap_within_their_contract);
    RUN(no_grad_and_detach_record_nothing);
    RUN(view_shares_gradient);
    engine_free(&eng);
    TEST_END();
}
