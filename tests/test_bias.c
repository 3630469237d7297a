/* The bias_add op (Qwen2 q/k/v projection biases): float64 finite-difference gradients on 2-D and
 * 3-D inputs, the forward against a naive loop, and a tiny model with model.qkv_bias: the bias
 * parameters exist with their names, shapes, zero init and no decay, change the logits once set,
 * and pass the whole-model gradient check. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../train/model.h"
#include "gradcheck.h"
#include "test.h"

#define TOL 1e-6

static Tensor *f_bias(Engine *e, Tensor **in, void *ctx) {
    (void)ctx;
    /* through a linear so the bias gradient is summed over rows that differ */
    return op_bias_add(e, op_linear(e, in[0], in[2]), in[1]);
}

TEST(grad_bias_add_2d_and_3d) {
    Engine *eng = tc->fixture;
    int64_t shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {13, 4, 9}};
    for (int s = 0; s < 3; s++) {
        Tensor *x = test_randn(DT_F64, SHAPE(shapes[s][0], shapes[s][1]), 1, 10 + s);
        Tensor *b = test_randn(DT_F64, SHAPE(shapes[s][2]), 1, 20 + s);
        Tensor *w = test_randn(DT_F64, SHAPE(shapes[s][2], shapes[s][1]), 1, 30 + s);
        test_requires_grad(x);
        test_requires_grad(b);
        test_requires_grad(w);
        Tensor *in[] = {x, b, w};
        GradCheckResult r = gradcheck(eng, f_bias, in, 3, NULL, 0, 40 + s);
        EXPECT(r.max_rel_err < TOL && r.numeric_norm > 0, "shape %d: rel err %.3e (input %d)", s, r.max_rel_err,
               r.worst_input);
        test_tensor_free(x);
        test_tensor_free(b);
        test_tensor_free(w);
    }
    /* 3-D input: the bias broadcasts over both leading dims */
    Tensor *x = test_randn(DT_F64, SHAPE(2, 3, 4), 1, 50), *b = test_randn(DT_F64, SHAPE(5), 1, 51);
    Tensor *w = test_randn(DT_F64, SHAPE(5, 4), 1, 52);
    test_requires_grad(x);
    test_requires_grad(b);
    test_requires_grad(w);
    Tensor *in[] = {x, b, w};
    GradCheckResult r = gradcheck(eng, f_bias, in, 3, NULL, 0, 53);
    EXPECT(r.max_rel_err < TOL && r.numeric_norm > 0, "3-D: rel err %.3e (input %d)", r.max_rel_err, r.worst_input);
    test_tensor_free(x);
    test_tensor_free(b);
    test_tensor_free(w);
}

TEST(bias_add_forward_matches_naive) {
    Engine *eng = tc->fixture;
    Tensor *x = test_randn(DT_F64, SHAPE(3, 4, 5), 1, 60), *b = test_randn(DT_F64, SHAPE(5), 1, 61);
    engine_reset(eng);
    Tensor *y = op_bias_add(eng, x, b);
    EXPECT(y->ndim == 3 && y->shape[0] == 3 && y->shape[1] == 4 && y->shape[2] == 5, "output shape");
    for (int64_t i = 0; i < x->numel; i++) {
        double want = tensor_get(x, i) + tensor_get(b, i % 5);
        EXPECT(tensor_get(y, i) == want, "element %lld: %g, want %g", (long long)i, tensor_get(y, i), want);
    }
    test_tensor_free(x);
    test_tensor_free(b);
}

/* ---- the model with model.qkv_bias ---- */

enum { T_TOKENS = 9 };
static const int32_t TOKENS[T_TOKENS] = {1, 5, 2, 9, 3, 3, 7, 0, 4};
static const int32_t CU[2] = {0, T_TOKENS};

static RunConfig bias_config(void) {
    RunConfig c;
    config_defaults(&c);
    c.model.vocab_size = 11;
    c.model.d_model = 12;
    c.model.n_layers = 2;
    c.model.n_heads = 4;
    c.model.n_kv_heads = 2;
    c.model.head_dim = 4;
    c.model.ffn_dim = 10;
    c.model.qkv_bias = true;
    c.model.tie_embeddings = true;
    c.model.init_std = 0.3f;
    return c;
}

static ModelInput make_input(Engine *e) {
    int32_t targets[T_TOKENS], positions[T_TOKENS];
    for (int t = 0; t < T_TOKENS; t++) {
        targets[t] = t + 1 < T_TOKENS ? TOKENS[t + 1] : -1;
        positions[t] = t;
    }
    Batch b = {.B = 1, .T = T_TOKENS, .inputs = (int32_t *)TOKENS, .targets = targets, .positions = positions,
               .cu_seqlens = (int32_t *)CU, .n_segments = 1};
    return model_upload(e, &b);
}

static Tensor *f_model(Engine *e, Tensor **inputs, void *ctx) {
    (void)inputs;
    ModelInput in = make_input(e);
    return model_forward(ctx, e, &in, false).total;
}

static double loss_of(Engine *e, Model *m) {
    engine_reset(e);
    bool prev = engine_set_grad(e, false);
    ModelInput in = make_input(e);
    double v = tensor_item(e, model_forward(m, e, &in, false).lm);
    engine_set_grad(e, prev);
    return v;
}

/* layer l's bias of q, k or v, by its checkpoint name */
static Tensor *bias_of(Model *m, int l, char which) {
    char name[64];
    snprintf(name, sizeof name, "layers.%d.attn.b%c", l, which);
    return params_find(&m->params, name)->t;
}

TEST(model_qkv_bias_parameters_and_gradients) {
    Engine *e = tc->fixture;
    RunConfig c = bias_config();
    Model m;
    model_build(&m, &c, &cpu_backend, DT_F64, 5);
    const char *names[] = {"layers.0.attn.bq", "layers.0.attn.bk", "layers.0.attn.bv", "layers.1.attn.bq"};
    const int64_t sizes[] = {16, 8, 8, 16};
    for (int i = 0; i < 4; i++) {
        Param *p = params_find(&m.params, names[i]);
        EXPECT(p, "no parameter %s", names[i]);
        EXPECT(p->t->ndim == 1 && p->t->shape[0] == sizes[i], "%s has shape [%lld]", names[i],
               (long long)p->t->shape[0]);
        EXPECT(p->init == INIT_ZEROS && !p->decay, "%s: zeros init and no weight decay expected", names[i]);
        for (int64_t j = 0; j < p->t->numel; j++)
            EXPECT(tensor_get(p->t, j) == 0, "%s is not zero-initialised", names[i]);
    }
    /* zero biases are the bias-free model; set biases change the loss */
    double before = loss_of(e, &m);
    Rng r;
    rng_seed(&r, 77);
    for (int l = 0; l < 2; l++) {
        Tensor *bs[3];
        for (int k = 0; k < 3; k++) bs[k] = bias_of(&m, l, "qkv"[k]);
        for (int k = 0; k < 3; k++)
            for (int64_t j = 0; j < bs[k]->numel; j++) tensor_set(bs[k], j, 0.5 * rng_normal(&r));
    }
    double after = loss_of(e, &m);
    EXPECT(fabs(after - before) > 1e-6, "the biases do not change the loss (%g vs %g)", before, after);
    /* every bias gets the right gradient */
    for (int l = 0; l < 2; l++) {
        Tensor *bs[3];
        for (int k = 0; k < 3; k++) bs[k] = bias_of(&m, l, "qkv"[k]);
        for (int k = 0; k < 3; k++) {
            GradCheckResult g = gradcheck(e, f_model, &bs[k], 1, &m, 0, 200 + 3 * l + k);
            EXPECT(g.max_rel_err < TOL && g.numeric_norm > 0, "%s: rel err %.3e, numeric norm %.3e", bs[k]->name,
                   g.max_rel_err, g.numeric_norm);
        }
    }
    model_free(&m);

    c.model.qkv_bias = false; /* the default model has none */
    model_build(&m, &c, &cpu_backend, DT_F64, 5);
    EXPECT(!params_find(&m.params, "layers.0.attn.bq"), "bias parameters without qkv_bias");
    model_free(&m);
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(grad_bias_add_2d_and_3d);
    RUN(bias_add_forward_matches_naive);
    RUN(model_qkv_bias_parameters_and_gradients);
    engine_free(&eng);
    TEST_END();
}
