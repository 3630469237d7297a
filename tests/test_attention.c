/* RoPE and causal GQA attention within documents: float64 finite-difference gradient checks, forward
 * values against naive float64 references written here (independent of the kernels), document
 * isolation and causality bit-for-bit, RoPE's relative-position property, float32 against float64,
 * and run-to-run determinism of the multithreaded kernels. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/util.h"
#include "../layers/rope_scaling.h"
#include "gradcheck.h"
#include "test.h"

#define GRAD_TOL 1e-6

/* ---- helpers ---- */

static Tensor *make_positions(const int32_t *pos, int64_t n) {
    Tensor *p = test_tensor(DT_I32, SHAPE(n));
    memcpy(p->data, pos, (size_t)n * sizeof(int32_t));
    return p;
}

/* positions restart at 0 in each document (as the data loader produces them) */
static Tensor *doc_positions(const Tensor *cu) {
    const int32_t *c = cu->data;
    int64_t ndocs = cu->numel - 1, N = c[ndocs];
    Tensor *p = test_tensor(DT_I32, SHAPE(N));
    for (int64_t d = 0; d < ndocs; d++)
        for (int32_t t = c[d]; t < c[d + 1]; t++) ((int32_t *)p->data)[t] = t - c[d];
    return p;
}

/* Naive float64 attention: for every document, head and query, softmax over the document's keys up to
 * the query, query head h reading KV head h / (Hq / Hkv). lse may be NULL. */
static void ref_attention(const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *cu, double scale,
                          double *out, double *lse) {
    const int64_t N = q->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1];
    const int32_t *c = cu->data;
    double *w = xmalloc((size_t)N * sizeof(double));
    for (int64_t doc = 0; doc + 1 < cu->numel; doc++) {
        for (int64_t h = 0; h < Hq; h++) {
            const int64_t kh = h / (Hq / Hkv);
            for (int64_t t = c[doc]; t < c[doc + 1]; t++) {
                double mx = -INFINITY;
                for (int64_t j = c[doc]; j <= t; j++) {
                    double dot = 0;
                    for (int64_t d = 0; d < D; d++)
                        dot += tensor_get(q, (t * Hq + h) * D + d) * tensor_get(k, (j * Hkv + kh) * D + d);
                    w[j] = scale * dot;
                    mx = fmax(mx, w[j]);
                }
                double z = 0;
                for (int64_t j = c[doc]; j <= t; j++) z += exp(w[j] - mx);
                for (int64_t d = 0; d < D; d++) {
                    double o = 0;
                    for (int64_t j = c[doc]; j <= t; j++) o += exp(w[j] - mx) / z * tensor_get(v, (j * Hkv + kh) * D + d);
                    out[(t * Hq + h) * D + d] = o;
                }
                if (lse) lse[h * N + t] = mx + log(z);
            }
        }
    }
    free(w);
}

/* Naive RoPE of one head vector x [D] at position pos (rotate-half pairing). */
static void ref_rope(double *y, const double *x, int64_t D, int rd, double pos, double theta) {
    for (int64_t d = 0; d < D; d++) y[d] = x[d];
    for (int i = 0; i < rd / 2; i++) {
        double ang = pos / pow(theta, 2.0 * i / rd);
        y[i] = x[i] * cos(ang) - x[i + rd / 2] * sin(ang);
        y[i + rd / 2] = x[i + rd / 2] * cos(ang) + x[i] * sin(ang);
    }
}

static bool grad_ok(GradCheckResult r, const char *what) {
    if (!(r.max_rel_err < GRAD_TOL && r.numeric_norm > 0)) {
        printf("    %s: rel err %.3e (input %d, numeric norm %.3e)\n", what, r.max_rel_err, r.worst_input,
               r.numeric_norm);
        return false;
    }
    return true;
}

/* ---- functions under gradient check ---- */

typedef struct {
    Tensor *positions;
    RopeTable table;
    double inv_freq[32];
} RopeCtx;

/* The unscaled table of rotary_dim dims and base theta (model.rope_scaling = none) in c. */
static void rope_ctx(RopeCtx *c, Tensor *positions, int rotary_dim, float theta) {
    ModelConfig m;
    RunConfig defaults;
    config_defaults(&defaults);
    m = defaults.model;
    m.rope_theta = theta;
    c->positions = positions;
    c->table = rope_table(&m, rotary_dim, 0, c->inv_freq);
}

static Tensor *f_rope(Engine *e, Tensor **in, void *ctx) {
    RopeCtx *c = ctx;
    return op_rope(e, in[0], c->positions, &c->table);
}

typedef struct {
    Tensor *cu;
    float scale;
    RopeCtx *rope; /* non-NULL: rope q and k first (the layer's real chain) */
} AttnCtx;

static Tensor *f_attention(Engine *e, Tensor **in, void *ctx) {
    AttnCtx *c = ctx;
    Tensor *q = in[0], *k = in[1];
    if (c->rope) {
        q = op_rope(e, q, c->rope->positions, &c->rope->table);
        k = op_rope(e, k, c->rope->positions, &c->rope->table);
    }
    return op_attention(e, q, k, in[2], c->cu, c->scale, NULL);
}

/* ---- RoPE ---- */

TEST(grad_rope_full_and_partial) {
    Engine *eng = tc->fixture;
    /* {N, H, D, rotary_dim}: full, partial, minimal, odd N and odd tail */
    int cases[][4] = {{7, 3, 8, 8}, {13, 2, 10, 6}, {5, 1, 6, 2}, {1, 4, 12, 4}};
    for (int ci = 0; ci < 4; ci++) {
        int N = cases[ci][0], H = cases[ci][1], D = cases[ci][2], rd = cases[ci][3];
        Tensor *x = test_randn(DT_F64, SHAPE(N, H, D), 1.0, 100 + ci);
        int32_t pos[13];
        for (int t = 0; t < N; t++) pos[t] = (t * 37 + ci * 1000) % 4099; /* unordered, some large */
        RopeCtx rc;
        rope_ctx(&rc, make_positions(pos, N), rd, ci == 1 ? 500000.0f : 10000.0f);
        if (ci == 2) rc.table.attention_scale = 1.25; /* YaRN's cos/sin scale goes through the backward too */
        test_requires_grad(x);
        Tensor *in[] = {x};
        EXPECT(grad_ok(gradcheck(eng, f_rope, in, 1, &rc, 0, 200 + ci), "rope"), "rope gradient, case %d", ci);
        EXPECT(test_norm(x->grad) > 0, "rope: zero gradient, case %d", ci);
        test_tensor_free(rc.positions);
        test_tensor_free(x);
    }
}

TEST(rope_matches_reference_and_tail_untouched) {
    Engine *eng = tc->fixture;
    const int N = 9, H = 3, D = 14, rd = 8;
    const float theta = 10000.0f;
    Tensor *x = test_randn(DT_F64, SHAPE(N, H, D), 1.0, 300);
    int32_t pos[9] = {0, 1, 2, 3, 100, 7, 65535, 131071, 42};
    Tensor *p = make_positions(pos, N);
    RopeCtx rc;
    rope_ctx(&rc, p, rd, theta);
    engine_reset(eng);
    Tensor *y = op_rope(eng, x, p, &rc.table);
    double max_err = 0, ref[14];
    bool tail_same = true, pos0_identity = true;
    for (int t = 0; t < N; t++)
        for (int h = 0; h < H; h++) {
            const double *xr = (const double *)x->data + (t * H + h) * D, *yr = (const double *)y->data + (t * H + h) * D;
            ref_rope(ref, xr, D, rd, pos[t], theta);
            for (int d = 0; d < D; d++) max_err = fmax(max_err, fabs(yr[d] - ref[d]));
            for (int d = rd; d < D; d++) tail_same &= yr[d] == xr[d];
            if (pos[t] == 0)
                for (int d = 0; d < D; d++) pos0_identity &= yr[d] == xr[d];
        }
    EXPECT(max_err < 1e-10, "rope forward error %.3e against the reference", max_err);
    EXPECT(tail_same, "rope changed dims past rotary_dim");
    EXPECT(pos0_identity, "rope at position 0 is not the identity");
    /* float32 kernel against the float64 reference (angles in double: large positions stay accurate) */
    Tensor *x32 = test_copy_as(x, DT_F32);
    engine_reset(eng);
    Tensor *y32 = op_rope(eng, x32, p, &rc.table);
    double e32 = 0;
    for (int64_t i = 0; i < y->numel; i++) e32 = fmax(e32, fabs(tensor_get(y32, i) - tensor_get(y, i)));
    EXPECT(e32 < 1e-5, "float32 rope differs from float64 by %.3e", e32);
    /* a cos/sin scale (YaRN's attention factor) multiplies the rotated dims and leaves the tail */
    rc.table.attention_scale = 1.5;
    Tensor *ys = op_rope(eng, x, p, &rc.table);
    double es = 0;
    for (int t = 0; t < N; t++)
        for (int h = 0; h < H; h++) {
            const double *xr = (const double *)x->data + (t * H + h) * D, *yr = (const double *)ys->data + (t * H + h) * D;
            ref_rope(ref, xr, D, rd, pos[t], theta);
            for (int d = 0; d < D; d++) es = fmax(es, fabs(yr[d] - (d < rd ? 1.5 * ref[d] : xr[d])));
        }
    EXPECT(es < 1e-10, "scaled rope differs from 1.5 x the rotation by %.3e", es);
    test_tensor_free(x32);
    test_tensor_free(p);
    test_tensor_free(x);
}

/* <rope(q, m), rope(k, n)> depends on m - n only: shift both positions, the per-head dot products
 * stay; change m - n and they move (so the check can fail). */
TEST(rope_relative_position) {
    Engine *eng = tc->fixture;
    const int N = 6, H = 2, D = 16;
    int rds[2] = {16, 10};
    for (int r = 0; r < 2; r++) {
        Tensor *q = test_randn(DT_F64, SHAPE(N, H, D), 1.0, 400 + r), *k = test_randn(DT_F64, SHAPE(N, H, D), 1.0, 410 + r);
        int32_t m[6] = {0, 5, 17, 300, 2, 4000}, n[6] = {0, 3, 20, 1, 299, 4095};
        int32_t shifts[3] = {1, 77, 12345};
        double base[12];
        engine_reset(eng);
        Tensor *pm = make_positions(m, N), *pn = make_positions(n, N);
        RopeCtx rc;
        rope_ctx(&rc, NULL, rds[r], 10000.0f);
        Tensor *qr = op_rope(eng, q, pm, &rc.table), *kr = op_rope(eng, k, pn, &rc.table);
        for (int i = 0; i < N * H; i++) {
            base[i] = 0;
            for (int d = 0; d < D; d++) base[i] += tensor_get(qr, i * D + d) * tensor_get(kr, i * D + d);
        }
        test_tensor_free(pm);
        test_tensor_free(pn);
        for (int s = 0; s < 4; s++) {
            /* s < 3: shift both by shifts[s]; s == 3: shift only m by 1, which must change the dots */
            int32_t m2[6], n2[6];
            for (int i = 0; i < N; i++) {
                m2[i] = m[i] + (s < 3 ? shifts[s] : 1);
                n2[i] = n[i] + (s < 3 ? shifts[s] : 0);
            }
            engine_reset(eng);
            pm = make_positions(m2, N);
            pn = make_positions(n2, N);
            qr = op_rope(eng, q, pm, &rc.table);
            kr = op_rope(eng, k, pn, &rc.table);
            double max_diff = 0;
            for (int i = 0; i < N * H; i++) {
                double dot = 0;
                for (int d = 0; d < D; d++) dot += tensor_get(qr, i * D + d) * tensor_get(kr, i * D + d);
                max_diff = fmax(max_diff, fabs(dot - base[i]));
            }
            test_tensor_free(pm);
            test_tensor_free(pn);
            if (s < 3) EXPECT(max_diff < 1e-10, "rotary_dim %d: shift %d changes q.k by %.3e", rds[r], shifts[s], max_diff);
            else EXPECT(max_diff > 1e-3, "rotary_dim %d: changing m - n left q.k unchanged (%.3e)", rds[r], max_diff);
        }
        test_tensor_free(q);
        test_tensor_free(k);
    }
}

/* ---- attention ---- */

typedef struct {
    int ndocs;
    int doc_lens[4];
    int Hq, Hkv, D;
} AttnCase;

/* odd sizes everywhere; H_q/H_kv = 1, 2, 4; one to four documents, including a 1-token document */
static const AttnCase attn_cases[] = {
    {1, {7}, 2, 2, 4},
    {3, {3, 1, 9}, 4, 2, 5},
    {2, {13, 16}, 4, 1, 3},
    {4, {5, 2, 11, 11}, 3, 3, 6},
    {1, {29}, 8, 2, 8},
};
#define N_ATTN_CASES (int)(sizeof attn_cases / sizeof attn_cases[0])

static int case_tokens(const AttnCase *c) {
    int n = 0;
    for (int d = 0; d < c->ndocs; d++) n += c->doc_lens[d];
    return n;
}

TEST(grad_attention_gqa_documents) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_ATTN_CASES; ci++) {
        const AttnCase *c = &attn_cases[ci];
        int N = case_tokens(c);
        /* std 1.5 on q makes the softmax far from uniform, so gradients are not trivially small */
        Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 500 + ci);
        Tensor *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 520 + ci);
        Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 540 + ci);
        AttnCtx ac = {test_cu_seqlens(c->doc_lens, c->ndocs), 1.0f / sqrtf((float)c->D), NULL};
        test_requires_grad(q);
        test_requires_grad(k);
        test_requires_grad(v);
        Tensor *in[] = {q, k, v};
        EXPECT(grad_ok(gradcheck(eng, f_attention, in, 3, &ac, 300, 600 + ci), "attention"),
               "attention gradient, case %d", ci);
        EXPECT(test_norm(q->grad) > 0 && test_norm(k->grad) > 0 && test_norm(v->grad) > 0,
               "attention: an input got an all-zero gradient, case %d", ci);
        test_tensor_free(ac.cu);
        test_tensor_free(q);
        test_tensor_free(k);
        test_tensor_free(v);
    }
}

/* Only some inputs require grad: the backward skips the NULL gradients and the others stay right. */
TEST(grad_attention_partial_inputs) {
    Engine *eng = tc->fixture;
    const AttnCase *c = &attn_cases[1];
    int N = case_tokens(c);
    AttnCtx ac = {test_cu_seqlens(c->doc_lens, c->ndocs), 0.4f, NULL};
    for (int which = 0; which < 3; which++) {
        Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 700);
        Tensor *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 701);
        Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 702);
        Tensor *in[] = {q, k, v};
        test_requires_grad(in[which]);
        EXPECT(grad_ok(gradcheck(eng, f_attention, in, 3, &ac, 0, 710 + which), "attention partial"),
               "attention gradient with only input %d trainable", which);
        for (int i = 0; i < 3; i++) test_tensor_free(in[i]);
    }
    test_tensor_free(ac.cu);
}

/* The layer's chain rope -> attention, partial rotary dim, positions restarting per document. */
TEST(grad_rope_then_attention) {
    Engine *eng = tc->fixture;
    int lens[3] = {6, 9, 4};
    int N = 19, Hq = 4, Hkv = 2, D = 6;
    Tensor *cu = test_cu_seqlens(lens, 3);
    RopeCtx rc;
    rope_ctx(&rc, doc_positions(cu), 4, 10000.0f);
    AttnCtx ac = {cu, 1.0f / sqrtf((float)D), &rc};
    Tensor *q = test_randn(DT_F64, SHAPE(N, Hq, D), 1.5, 800);
    Tensor *k = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 801);
    Tensor *v = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 802);
    test_requires_grad(q);
    test_requires_grad(k);
    test_requires_grad(v);
    Tensor *in[] = {q, k, v};
    EXPECT(grad_ok(gradcheck(eng, f_attention, in, 3, &ac, 0, 810), "rope+attention"), "rope -> attention gradient");
    test_tensor_free(rc.positions);
    test_tensor_free(cu);
    test_tensor_free(q);
    test_tensor_free(k);
    test_tensor_free(v);
}

/* Forward output and lse against the naive reference; GQA equals MHA with the KV heads repeated. */
TEST(attention_matches_reference_and_gqa_equals_repeated_mha) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_ATTN_CASES; ci++) {
        const AttnCase *c = &attn_cases[ci];
        int N = case_tokens(c), Hq = c->Hq, Hkv = c->Hkv, D = c->D, group = Hq / Hkv;
        Tensor *q = test_randn(DT_F64, SHAPE(N, Hq, D), 2.0, 900 + ci);
        Tensor *k = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 920 + ci);
        Tensor *v = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 940 + ci);
        Tensor *cu = test_cu_seqlens(c->doc_lens, c->ndocs);
        double scale = 1.0 / sqrt((double)D);
        double *ref_out = xmalloc(sizeof(double) * N * Hq * D), *ref_lse = xmalloc(sizeof(double) * Hq * N);
        ref_attention(q, k, v, cu, (float)scale, ref_out, ref_lse);
        engine_reset(eng);
        Tensor *lse = NULL;
        Tensor *out = op_attention(eng, q, k, v, cu, (float)scale, &lse);
        EXPECT(lse && lse->dtype == DT_F64 && lse->ndim == 2 && lse->shape[0] == Hq && lse->shape[1] == N,
               "lse must be f64 [Hq, N] for f64 inputs");
        double eo = rel_err(out->data, ref_out, out->numel), el = rel_err(lse->data, ref_lse, lse->numel);
        EXPECT(eo < 1e-12, "case %d: output differs from the reference by %.3e", ci, eo);
        EXPECT(el < 1e-12, "case %d: lse differs from the reference by %.3e", ci, el);
        /* MHA on KV heads repeated group times: bit-for-bit the GQA output (same arithmetic per head) */
        Tensor *kr = test_tensor(DT_F64, SHAPE(N, Hq, D)), *vr = test_tensor(DT_F64, SHAPE(N, Hq, D));
        for (int t = 0; t < N; t++)
            for (int h = 0; h < Hq; h++)
                for (int d = 0; d < D; d++) {
                    ((double *)kr->data)[(t * Hq + h) * D + d] = tensor_get(k, (t * Hkv + h / group) * D + d);
                    ((double *)vr->data)[(t * Hq + h) * D + d] = tensor_get(v, (t * Hkv + h / group) * D + d);
                }
        Tensor *out_mha = op_attention(eng, q, kr, vr, cu, (float)scale, NULL);
        EXPECT(memcmp(out_mha->data, out->data, tensor_bytes(out)) == 0, "case %d: GQA differs from repeated-KV MHA", ci);
        double em = rel_err(out_mha->data, ref_out, out->numel);
        EXPECT(em < 1e-12, "case %d: MHA differs from the reference by %.3e", ci, em);
        free(ref_out);
        free(ref_lse);
        test_tensor_free(kr);
        test_tensor_free(vr);
        test_tensor_free(cu);
        test_tensor_free(q);
        test_tensor_free(k);
        test_tensor_free(v);
    }
}

/* Changing token p of the middle document leaves the other documents and the earlier tokens of its
 * own document unchanged bit-for-bit (and does change the later ones); a gradient seeded only on the
 * last document reaches nothing outside it. */
TEST(attention_document_isolation_and_causality) {
    Engine *eng = tc->fixture;
    int lens[3] = {5, 9, 7};
    const int N = 21, Hq = 4, Hkv = 2, D = 8, doc1 = 5, doc2 = 14, changed = doc1 + 4;
    Tensor *cu = test_cu_seqlens(lens, 3);
    Tensor *q = test_randn(DT_F64, SHAPE(N, Hq, D), 1.0, 1000), *k = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1001);
    Tensor *v = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1002);
    engine_reset(eng);
    Tensor *lse_a = NULL, *lse_b = NULL;
    Tensor *out_a = op_attention(eng, q, k, v, cu, 0.35f, &lse_a);
    for (int h = 0; h < Hq; h++)
        for (int d = 0; d < D; d++) ((double *)q->data)[(changed * Hq + h) * D + d] += 1.0;
    for (int h = 0; h < Hkv; h++)
        for (int d = 0; d < D; d++) {
            ((double *)k->data)[(changed * Hkv + h) * D + d] -= 0.7;
            ((double *)v->data)[(changed * Hkv + h) * D + d] *= -2.0;
        }
    Tensor *out_b = op_attention(eng, q, k, v, cu, 0.35f, &lse_b);
    const size_t row = (size_t)Hq * D * sizeof(double);
    const double *a = out_a->data, *b = out_b->data;
    EXPECT(memcmp(a, b, doc1 * row) == 0, "document 0 changed");
    EXPECT(memcmp(a + doc2 * Hq * D, b + doc2 * Hq * D, (N - doc2) * row) == 0, "document 2 changed");
    EXPECT(memcmp(a + doc1 * Hq * D, b + doc1 * Hq * D, (changed - doc1) * row) == 0,
           "tokens before the change in document 1 changed (causality)");
    bool all_later_changed = true;
    for (int t = changed; t < doc2; t++) all_later_changed &= memcmp(a + t * Hq * D, b + t * Hq * D, row) != 0;
    EXPECT(all_later_changed, "tokens at or after the change in document 1 did not change");
    for (int h = 0; h < Hq; h++) {
        for (int t = 0; t < N; t++) {
            bool same = tensor_get(lse_a, h * N + t) == tensor_get(lse_b, h * N + t);
            EXPECT(same == (t < changed || t >= doc2), "lse of head %d token %d: wrong (in)dependence", h, t);
        }
    }
    /* gradient from document 2 only */
    test_requires_grad(q);
    test_requires_grad(k);
    test_requires_grad(v);
    engine_reset(eng);
    Tensor *out = op_attention(eng, q, k, v, cu, 0.35f, NULL);
    Tensor *seed = test_tensor(DT_F64, SHAPE(N, Hq, D));
    Rng rng;
    rng_seed(&rng, 1003);
    for (int64_t i = doc2 * Hq * D; i < seed->numel; i++) ((double *)seed->data)[i] = rng_normal(&rng);
    engine_backward_from(eng, out, seed, 0);
    double outside = 0, inside = 0;
    Tensor *grads[3] = {q->grad, k->grad, v->grad};
    for (int g = 0; g < 3; g++) {
        int64_t per_tok = grads[g]->numel / N;
        for (int64_t i = 0; i < grads[g]->numel; i++) {
            double x = fabs(tensor_get(grads[g], i));
            if (i / per_tok < doc2) outside += x;
            else inside += x;
        }
    }
    EXPECT(outside == 0.0 && inside > 0, "gradient leaked across documents: outside %.3e inside %.3e", outside, inside);
    test_tensor_free(seed);
    test_tensor_free(cu);
    test_tensor_free(q);
    test_tensor_free(k);
    test_tensor_free(v);
}

/* Float32 kernels (what CPU training runs) against the float64 ones: forward, lse, gradients. */
TEST(attention_f32_matches_f64) {
    Engine *eng = tc->fixture;
    int lens[3] = {37, 64, 27};
    const int N = 128, Hq = 4, Hkv = 2, D = 16;
    Tensor *cu = test_cu_seqlens(lens, 3);
    Tensor *in64[3] = {test_randn(DT_F64, SHAPE(N, Hq, D), 1.0, 1100), test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1101),
                       test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1102)};
    Tensor *seed64 = test_randn(DT_F64, SHAPE(N, Hq, D), 1.0, 1103);
    Tensor *in32[3], *seed32 = test_copy_as(seed64, DT_F32);
    for (int i = 0; i < 3; i++) {
        in32[i] = test_copy_as(in64[i], DT_F32);
        test_requires_grad(in64[i]);
        test_requires_grad(in32[i]);
    }
    engine_reset(eng);
    Tensor *lse64 = NULL, *lse32 = NULL;
    Tensor *o64 = op_attention(eng, in64[0], in64[1], in64[2], cu, 0.25f, &lse64);
    const int mark = eng->tape_len;
    Tensor *o32 = op_attention(eng, in32[0], in32[1], in32[2], cu, 0.25f, &lse32);
    EXPECT(lse32->dtype == DT_F32, "lse of f32 attention must be f32");
    /* the first backward walks both nodes but skips o32's (no gradient yet); the second walks only
     * o32's node, so neither gradient is accumulated twice */
    engine_backward_from(eng, o64, seed64, 0);
    engine_backward_from(eng, o32, seed32, mark);
    Tensor *pairs[5][2] = {{o32, o64}, {lse32, lse64}, {in32[0]->grad, in64[0]->grad}, {in32[1]->grad, in64[1]->grad},
                           {in32[2]->grad, in64[2]->grad}};
    const char *names[5] = {"out", "lse", "dq", "dk", "dv"};
    for (int p = 0; p < 5; p++) {
        int64_t n = pairs[p][0]->numel;
        double *a = xmalloc(sizeof(double) * n);
        for (int64_t i = 0; i < n; i++) a[i] = tensor_get(pairs[p][0], i);
        double err = rel_err(a, pairs[p][1]->data, n);
        free(a);
        EXPECT(err < 1e-5, "f32 %s differs from f64 by %.3e", names[p], err);
    }
    for (int i = 0; i < 3; i++) {
        test_tensor_free(in64[i]);
        test_tensor_free(in32[i]);
    }
    test_tensor_free(seed64);
    test_tensor_free(seed32);
    test_tensor_free(cu);
}

/* Training-sized f32 call (documents of 512 and 300 tokens, head dim 64): two runs give identical
 * bits, and the timings are printed to keep an eye on CPU training speed. */
TEST(attention_deterministic_and_timed) {
    Engine *eng = tc->fixture;
    int lens[3] = {512, 300, 212};
    const int N = 1024, Hq = 8, Hkv = 2, D = 64;
    Tensor *cu = test_cu_seqlens(lens, 3);
    Tensor *q = test_randn(DT_F32, SHAPE(N, Hq, D), 1.0, 1200), *k = test_randn(DT_F32, SHAPE(N, Hkv, D), 1.0, 1201);
    Tensor *v = test_randn(DT_F32, SHAPE(N, Hkv, D), 1.0, 1202), *seed = test_randn(DT_F32, SHAPE(N, Hq, D), 1.0, 1203);
    test_requires_grad(q);
    test_requires_grad(k);
    test_requires_grad(v);
    Tensor *ins[3] = {q, k, v};
    void *first[4] = {0};
    double t_fwd = 0, t_bwd = 0;
    bool same = true;
    for (int run = 0; run < 2; run++) {
        for (int i = 0; i < 3; i++) memset(ins[i]->grad->data, 0, tensor_bytes(ins[i]->grad));
        engine_reset(eng);
        double t0 = wall_seconds();
        Tensor *out = op_attention(eng, q, k, v, cu, 0.125f, NULL);
        double t1 = wall_seconds();
        engine_backward_from(eng, out, seed, 0);
        double t2 = wall_seconds();
        t_fwd = t1 - t0;
        t_bwd = t2 - t1;
        const Tensor *res[4] = {out, q->grad, k->grad, v->grad};
        for (int i = 0; i < 4; i++) {
            if (run == 0) {
                first[i] = xmalloc(tensor_bytes(res[i]));
                memcpy(first[i], res[i]->data, tensor_bytes(res[i]));
            } else {
                same &= memcmp(first[i], res[i]->data, tensor_bytes(res[i])) == 0;
                free(first[i]);
            }
        }
    }
    printf("    N=%d Hq=%d Hkv=%d D=%d docs {512,300,212}: forward %.1f ms, backward %.1f ms\n", N, Hq, Hkv, D,
           1e3 * t_fwd, 1e3 * t_bwd);
    EXPECT(same, "two runs of attention forward/backward differ");
    test_tensor_free(seed);
    test_tensor_free(cu);
    test_tensor_free(q);
    test_tensor_free(k);
    test_tensor_free(v);
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(grad_rope_full_and_partial);
    RUN(rope_matches_reference_and_tail_untouched);
    RUN(rope_relative_position);
    RUN(grad_attention_gqa_documents);
    RUN(grad_attention_partial_inputs);
    RUN(grad_rope_then_attention);
    RUN(attention_matches_reference_and_gqa_equals_repeated_mha);
    RUN(attention_document_isolation_and_causality);
    RUN(attention_f32_matches_f64);
    RUN(attention_deterministic_and_timed);
    engine_free(&eng);
    TEST_END();
}
