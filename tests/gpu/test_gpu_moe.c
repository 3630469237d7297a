/* GPU case families of the MoE kernels (kernels/cuda/moe.cu) against the CPU reference
 * (tests/gpu/gpu_check.h; the cases are listed in tests/gpu/cases.c), then a few training steps of a small
 * MoE model on both devices.
 *
 * Every entry of the MoE section of the backend, on fresh random inputs with the GPU outputs poisoned:
 * BF16 and F32 activations, softmax and sigmoid scores, renormalisation and the selection bias on and
 * off, E = 1, 5, 8, 64, 300, k = 1, 2, 6, 8 and k = E, token counts that are multiples of nothing, an
 * expert that gets no token; the grouped GEMMs also with skewed routing (all tokens on 1 or 3 experts, the
 * rest empty), on both of their paths (BF16 with widths that are multiples of 8: the single-launch CUTLASS
 * grouped GEMM; F32 and odd widths: one cuBLASLt GEMM per expert), and bad offsets on each path; each kind of
 * bad input must stop the program with its message (the device error word, read at the next copy to the
 * host), and a whole layer's kernels must not make the host wait. The routing statistics' accumulation and
 * the selection bias's update must give the CPU's bits. The integer outputs (idx, offsets, rows)
 * must equal the CPU's exactly, also with ties (scores quantised so that many are equal: the lower expert
 * wins on both) and with NaN scores the selection must skip; the permutation must copy bit for bit; the
 * float outputs are held to the harness's tolerances. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../autograd/params.h"
#include "../../kernels/cuda/cuda.h"
#include "../../train/trainer.h"
#include "gpu_cases.h"

/* ---------- helpers ---------- */

/* k distinct experts per token, never expert `empty` (-1: any); empty < 0 needs k <= E, else k < E */
static int32_t *rand_idx(int64_t N, int k, int E, int empty) {
    int32_t *id = xmalloc((size_t)(N * k + 1) * sizeof(int32_t));
    for (int64_t t = 0; t < N; t++)
        for (int j = 0; j < k; j++) {
            int32_t e;
            bool bad;
            do {
                e = (int32_t)(rng_next(&gpu_check.rng) % (uint64_t)E);
                bad = e == empty;
                for (int i = 0; i < j; i++) bad |= id[t * k + i] == e;
            } while (bad);
            id[t * k + j] = e;
        }
    return id;
}

/* an i32 tensor of the given shape on both sides */
static Pair i32_pair(int ndim, const int64_t *shape, const int32_t *v) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    float *f = xmalloc((size_t)(n + 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = (float)v[i]; /* exact: |v| < 2^24 */
    Pair p = pair_from(DT_I32, ndim, shape, f);
    free(f);
    return p;
}

/* an i32 GPU tensor against the CPU's values, element for element */
static void check_i32(const char *what, const Tensor *g, const int32_t *ref) {
    float *a = download_f32(g);
    int64_t bad = -1;
    for (int64_t i = 0; i < g->numel && bad < 0; i++)
        if (a[i] != (float)ref[i]) bad = i;
    if (bad < 0) record(true, "%-58s exact (%lld values)", what, (long long)g->numel);
    else record(false, "%-58s first difference at %lld: gpu %d cpu %d", what, (long long)bad, (int)a[bad], ref[bad]);
    free(a);
}

/* positive scores (softmax- or sigmoid-like), so that renormalisation never divides by ~0 */
static Pair pos_scores(DType dt, int64_t N, int64_t E) {
    float *v = randn(N * E, 0, 1);
    for (int64_t i = 0; i < N * E; i++) v[i] = 0.05f + 0.5f * fabsf(v[i]) / (float)(E > 1 ? E / 2 : 1);
    Pair p = pair_from(dt, 2, (int64_t[]){N, E}, v);
    free(v);
    return p;
}

/* the CPU's plan of idx: offsets [E+1] and rows [N, k] (caller frees) */
static void cpu_plan(int64_t N, int k, int E, const int32_t *idx, int32_t **off, int32_t **rows) {
    Tensor ti = mk(CB, DT_I32, 2, (int64_t[]){N, k}), to = mk(CB, DT_I32, 1, (int64_t[]){E + 1}),
           tr = mk(CB, DT_I32, 2, (int64_t[]){N, k});
    memcpy(ti.data, idx, (size_t)(N * k) * sizeof(int32_t));
    CB->moe_plan(&to, &tr, &ti);
    *off = xmalloc((size_t)(E + 1) * sizeof(int32_t));
    *rows = xmalloc((size_t)(N * k + 1) * sizeof(int32_t));
    memcpy(*off, to.data, (size_t)(E + 1) * sizeof(int32_t));
    memcpy(*rows, tr.data, (size_t)(N * k) * sizeof(int32_t));
    free_t(&ti);
    free_t(&to);
    free_t(&tr);
}

static const char *fn_name(MoeScoreFunc f) { return f == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax"; }

/* ---------- router scores ---------- */

void moe_scores_case(const void *args) {
    const MoeScoresCase *c = args;
    const DType ldt = c->ldt, sdt = c->sdt;
    const int64_t N = c->N, E = c->E;
    const MoeScoreFunc f = c->func;
    char name[320], desc[120];
    snprintf(desc, sizeof desc, "%s logits %s scores %s N=%lld E=%lld", fn_name(f), dn(ldt), dn(sdt), (long long)N,
             (long long)E);
    const double tol = ldt == DT_BF16 || sdt == DT_BF16 ? TOL_BF16 : TOL_F32;
    Pair lg = pair_rand(ldt, 2, (int64_t[]){N, E}, 0, 2), s = pair_out(sdt, 2, (int64_t[]){N, E});
    CB->moe_scores_forward(&s.c, &lg.c, f);
    GB->moe_scores_forward(&s.g, &lg.g, f);
    snprintf(name, sizeof name, "moe_scores fwd %s", desc);
    check(name, &s, tol);
    /* backward from the reference scores as the GPU would hold them */
    Pair sv = pair_from(sdt, 2, (int64_t[]){N, E}, (const float *)s.c.data);
    Pair ds = pair_rand(sdt, 2, (int64_t[]){N, E}, 0, 1);
    Grad dl = grad_new(ldt, 2, (int64_t[]){N, E});
    CB->moe_scores_backward(&dl.p.c, &ds.c, &sv.c, f);
    grad_arm(&dl);
    GB->moe_scores_backward(&dl.p.g, &ds.g, &sv.g, f);
    snprintf(name, sizeof name, "moe_scores bwd %s", desc);
    grad_check(name, &dl, tol);
    grad_free(&dl);
    pair_free(&ds);
    pair_free(&sv);
    pair_free(&s);
    pair_free(&lg);
}

/* ---------- Top-k (and the plan of its selection) ---------- */

void moe_topk_case(const void *args) {
    const MoeTopkCase *c = args;
    const DType dt = c->dt;
    const int64_t N = c->N;
    const int E = c->E, k = c->k;
    const bool with_bias = c->bias, ties = c->ties, nans = c->nans;
    char name[320], desc[120];
    snprintf(desc, sizeof desc, "%s N=%lld E=%d k=%d%s%s%s", dn(dt), (long long)N, E, k, with_bias ? " bias" : "",
             ties ? " ties" : "", nans ? " NaNs" : "");
    float *v = randn(N * E, 0.1, 0.05);
    for (int64_t i = 0; i < N * E; i++) {
        if (ties) v[i] = roundf(v[i] * 32.0f) / 32.0f; /* few distinct values: many exact ties */
        if (nans && E > k && i % E == (i / E) % E && (i / E) % 3 == 0) v[i] = NAN; /* one per third row */
    }
    Pair s = pair_from(dt, 2, (int64_t[]){N, E}, v);
    free(v);
    Pair b;
    memset(&b, 0, sizeof b);
    if (with_bias) {
        float *bv = randn(E, 0, 0.05);
        if (ties)
            for (int e = 0; e < E; e++) bv[e] = roundf(bv[e] * 32.0f) / 32.0f;
        b = pair_from(DT_F32, 1, (int64_t[]){E}, bv);
        free(bv);
    }
    Tensor ic = mk(CB, DT_I32, 2, (int64_t[]){N, k}), ig = mk(GB, DT_I32, 2, (int64_t[]){N, k});
    poison(&ig);
    CB->moe_topk(&ic, &s.c, with_bias ? &b.c : NULL, k);
    GB->moe_topk(&ig, &s.g, with_bias ? &b.g : NULL, k);
    snprintf(name, sizeof name, "moe_topk idx %s", desc);
    check_i32(name, &ig, ic.data);

    /* the plan of the GPU's selection (the CPU plans its own; they must agree) */
    Tensor oc = mk(CB, DT_I32, 1, (int64_t[]){E + 1}), rc = mk(CB, DT_I32, 2, (int64_t[]){N, k});
    Tensor og = mk(GB, DT_I32, 1, (int64_t[]){E + 1}), rg = mk(GB, DT_I32, 2, (int64_t[]){N, k});
    poison(&og);
    poison(&rg);
    CB->moe_plan(&oc, &rc, &ic);
    GB->moe_plan(&og, &rg, &ig);
    snprintf(name, sizeof name, "moe_plan of the selection: offsets %s", desc);
    check_i32(name, &og, oc.data);
    snprintf(name, sizeof name, "moe_plan of the selection: rows %s", desc);
    check_i32(name, &rg, rc.data);
    Tensor *ts[] = {&ic, &ig, &oc, &rc, &og, &rg};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) free_t(ts[i]);
    if (with_bias) pair_free(&b);
    pair_free(&s);
}

/* ---------- combine weights ---------- */

void moe_combine_case(const void *args) {
    const MoeCombineCase *c = args;
    const DType sdt = c->sdt, wdt = c->wdt;
    const int64_t N = c->N;
    const int E = c->E, k = c->k;
    const bool renorm = c->renorm;
    const float scale = c->scale;
    char name[320], desc[120];
    snprintf(desc, sizeof desc, "scores %s w %s N=%lld E=%d k=%d%s scale %g", dn(sdt), dn(wdt), (long long)N, E, k,
             renorm ? " renorm" : "", scale);
    const double tol = sdt == DT_BF16 || wdt == DT_BF16 ? TOL_BF16 : TOL_F32;
    Pair s = pos_scores(sdt, N, E);
    int32_t *id = rand_idx(N, k, E, -1);
    Pair idx = i32_pair(2, (int64_t[]){N, k}, id);
    Pair w = pair_out(wdt, 2, (int64_t[]){N, k});
    CB->moe_combine_weights_forward(&w.c, &s.c, &idx.c, renorm, scale);
    GB->moe_combine_weights_forward(&w.g, &s.g, &idx.g, renorm, scale);
    snprintf(name, sizeof name, "moe_combine_weights fwd %s", desc);
    check(name, &w, tol);
    Pair dw = pair_rand(wdt, 2, (int64_t[]){N, k}, 0, 1);
    Grad ds = grad_new(sdt, 2, (int64_t[]){N, E});
    CB->moe_combine_weights_backward(&ds.p.c, &dw.c, &s.c, &idx.c, renorm, scale);
    grad_arm(&ds);
    GB->moe_combine_weights_backward(&ds.p.g, &dw.g, &s.g, &idx.g, renorm, scale);
    snprintf(name, sizeof name, "moe_combine_weights bwd %s", desc);
    grad_check(name, &ds, tol);
    grad_free(&ds);
    pair_free(&dw);
    pair_free(&w);
    pair_free(&idx);
    pair_free(&s);
    free(id);
}

/* ---------- plan on random routings (an expert with no token where E > k) ---------- */

void moe_plan_case(const void *args) {
    const MoePlanCase *c = args;
    const int64_t N = c->N;
    const int E = c->E, k = c->k;
    char name[320], desc[120];
    const int empty = E > k ? (int)(rng_next(&gpu_check.rng) % (uint64_t)E) : -1;
    snprintf(desc, sizeof desc, "N=%lld E=%d k=%d empty expert %d", (long long)N, E, k, empty);
    int32_t *id = rand_idx(N, k, E, empty), *off, *rows;
    cpu_plan(N, k, E, id, &off, &rows);
    Pair idx = i32_pair(2, (int64_t[]){N, k}, id);
    Tensor og = mk(GB, DT_I32, 1, (int64_t[]){E + 1}), rg = mk(GB, DT_I32, 2, (int64_t[]){N, k});
    poison(&og);
    poison(&rg);
    GB->moe_plan(&og, &rg, &idx.g);
    snprintf(name, sizeof name, "moe_plan offsets %s", desc);
    check_i32(name, &og, off);
    snprintf(name, sizeof name, "moe_plan rows %s", desc);
    check_i32(name, &rg, rows);
    free_t(&og);
    free_t(&rg);
    pair_free(&idx);
    free(id);
    free(off);
    free(rows);
}

/* ---------- permute / unpermute ---------- */

void moe_permute_case(const void *args) {
    const MoePermuteCase *c = args;
    const DType dt = c->dt;
    const int64_t N = c->N, C = c->C;
    const int E = c->E, k = c->k, grads = c->grads;
    char name[320], desc[120];
    const int empty = E > k ? 0 : -1;
    const int64_t M = N * k;
    snprintf(desc, sizeof desc, "%s N=%lld E=%d k=%d C=%lld", dn(dt), (long long)N, E, k, (long long)C);
    int32_t *id = rand_idx(N, k, E, empty), *off, *rows;
    cpu_plan(N, k, E, id, &off, &rows);
    Pair r = i32_pair(2, (int64_t[]){N, k}, rows);

    /* permute: a copy, so bit-exact */
    Pair x = pair_rand(dt, 2, (int64_t[]){N, C}, 0, 1), xs = pair_out(dt, 2, (int64_t[]){M, C});
    CB->moe_permute_forward(&xs.c, &x.c, &r.c);
    GB->moe_permute_forward(&xs.g, &x.g, &r.g);
    snprintf(name, sizeof name, "moe_permute fwd (bit-exact) %s", desc);
    check(name, &xs, 0.0);
    Pair dxs = pair_rand(dt, 2, (int64_t[]){M, C}, 0, 1);
    Grad dx = grad_new(dt, 2, (int64_t[]){N, C});
    CB->moe_permute_backward(&dx.p.c, &dxs.c, &r.c);
    grad_arm(&dx);
    GB->moe_permute_backward(&dx.p.g, &dxs.g, &r.g);
    snprintf(name, sizeof name, "moe_permute bwd %s", desc);
    grad_check(name, &dx, tol_of(dt));

    /* unpermute */
    Pair ys = pair_rand(dt, 2, (int64_t[]){M, C}, 0, 1), w = pair_rand(dt, 2, (int64_t[]){N, k}, 0.5, 0.3);
    Pair out = pair_out(dt, 2, (int64_t[]){N, C});
    CB->moe_unpermute_forward(&out.c, &ys.c, &w.c, &r.c);
    GB->moe_unpermute_forward(&out.g, &ys.g, &w.g, &r.g);
    snprintf(name, sizeof name, "moe_unpermute fwd %s", desc);
    check(name, &out, tol_of(dt));
    Pair dout = pair_rand(dt, 2, (int64_t[]){N, C}, 0, 1);
    Grad dys = grad_new(dt, 2, (int64_t[]){M, C}), dw = grad_new(dt, 2, (int64_t[]){N, k});
    CB->moe_unpermute_backward(grads & 1 ? &dys.p.c : NULL, grads & 2 ? &dw.p.c : NULL, &dout.c, &ys.c, &w.c, &r.c);
    grad_arm(&dys);
    grad_arm(&dw);
    GB->moe_unpermute_backward(grads & 1 ? &dys.p.g : NULL, grads & 2 ? &dw.p.g : NULL, &dout.g, &ys.g, &w.g, &r.g);
    const char *others = grads == 3 ? "" : " (other NULL)";
    if (grads & 1) {
        snprintf(name, sizeof name, "moe_unpermute bwd dys %s%s", desc, others);
        grad_check(name, &dys, tol_of(dt));
    }
    if (grads & 2) {
        snprintf(name, sizeof name, "moe_unpermute bwd dw %s%s", desc, others);
        grad_check(name, &dw, tol_of(dt));
    }
    grad_free(&dys);
    grad_free(&dw);
    grad_free(&dx);
    Pair *ps[] = {&dout, &out, &ys, &w, &dxs, &xs, &x, &r};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) pair_free(ps[i]);
    free(id);
    free(off);
    free(rows);
}

/* ---------- grouped GEMM ---------- */

/* The reference keeps the F32 weights, as in training. */
void moe_grouped_case(const void *args) {
    const MoeGroupedCase *c = args;
    const DType dt = c->dt;
    const int wmode = c->wmode, E = c->E, k = c->k;
    const int64_t N = c->N, in = c->in, out = c->out;
    char name[320], desc[200];
    const int64_t M = N * k;
    snprintf(desc, sizeof desc, "%s w f32%s N=%lld E=%d k=%d in=%lld out=%lld%s", dn(dt), wmode ? "(shadow)" : "",
             (long long)N, E, k, (long long)in, (long long)out, c->used ? " skewed" : "");
    if (c->used) snprintf(desc + strlen(desc), sizeof desc - strlen(desc), " (experts %d.. empty)", c->used);
    int32_t *id = c->used ? rand_idx(N, k, c->used, -1) : rand_idx(N, k, E, E > k ? E - 1 : -1), *off, *rows;
    cpu_plan(N, k, E, id, &off, &rows);
    Pair o = i32_pair(1, (int64_t[]){E + 1}, off);
    const int64_t ws[3] = {E, out, in};
    Pair w;
    ParamStore ps;
    float *wv = randn((int64_t)E * out * in, 0, 1.0 / sqrt((double)in));
    if (wmode) {
        params_init(&ps, GB, DT_F32);
        Tensor *wp = params_add(&ps, "experts", 3, ws, INIT_NORMAL, 1.0f, true);
        params_allocate(&ps, 1);
        w.g = *wp;
        w.c = mk(CB, DT_F32, 3, ws);
        w.h = NULL;
        memcpy(w.c.data, wv, (size_t)w.c.numel * sizeof(float));
        GB->copy_from_host(w.g.data, wv, (size_t)w.g.numel * sizeof(float));
        params_sync_shadow(&ps); /* after writing parameter values directly */
    } else w = pair_from(DT_F32, 3, ws, wv);
    free(wv);

    Pair xs = pair_rand(dt, 2, (int64_t[]){M, in}, 0, 1), ys = pair_out(dt, 2, (int64_t[]){M, out});
    CB->grouped_matmul_forward(&ys.c, &xs.c, &w.c, &o.c);
    GB->grouped_matmul_forward(&ys.g, &xs.g, &w.g, &o.g);
    snprintf(name, sizeof name, "grouped_matmul fwd %s", desc);
    check(name, &ys, tol_of(dt));

    Pair dys = pair_rand(dt, 2, (int64_t[]){M, out}, 0, 1);
    Grad dxs = grad_new(dt, 2, (int64_t[]){M, in}), dw = grad_new(DT_F32, 3, ws);
    CB->grouped_matmul_backward(&dxs.p.c, &dw.p.c, &dys.c, &xs.c, &w.c, &o.c);
    grad_arm(&dxs);
    grad_arm(&dw);
    GB->grouped_matmul_backward(&dxs.p.g, &dw.p.g, &dys.g, &xs.g, &w.g, &o.g);
    snprintf(name, sizeof name, "grouped_matmul bwd dxs %s", desc);
    grad_check(name, &dxs, tol_of(dt));
    int n_empty = 0;
    for (int e = 0; e < E; e++) n_empty += off[e] == off[e + 1];
    if (n_empty) { /* the experts without tokens: their gradients untouched, bit for bit */
        float *a = download_f32(&dw.p.g);
        const int64_t n = out * in;
        bool same = true;
        for (int e = 0; e < E; e++)
            if (off[e] == off[e + 1])
                for (int64_t i = (int64_t)e * n; i < (int64_t)(e + 1) * n; i++) same &= a[i] == dw.g0[i];
        snprintf(name, sizeof name, "grouped_matmul bwd dw of the %d empty experts %s", n_empty, desc);
        record(same, "%-58s %s", name, same ? "untouched" : "written");
        free(a);
    }
    snprintf(name, sizeof name, "grouped_matmul bwd dw (f32) %s", desc);
    grad_check(name, &dw, tol_of(dt));

    /* dxs alone and dw alone (the other NULL) */
    Grad dxs2 = grad_new(dt, 2, (int64_t[]){M, in}), dw2 = grad_new(DT_F32, 3, ws);
    CB->grouped_matmul_backward(&dxs2.p.c, NULL, &dys.c, &xs.c, &w.c, &o.c);
    CB->grouped_matmul_backward(NULL, &dw2.p.c, &dys.c, &xs.c, &w.c, &o.c);
    grad_arm(&dxs2);
    grad_arm(&dw2);
    GB->grouped_matmul_backward(&dxs2.p.g, NULL, &dys.g, &xs.g, &w.g, &o.g);
    GB->grouped_matmul_backward(NULL, &dw2.p.g, &dys.g, &xs.g, &w.g, &o.g);
    snprintf(name, sizeof name, "grouped_matmul bwd dxs (dw NULL) %s", desc);
    grad_check(name, &dxs2, tol_of(dt));
    snprintf(name, sizeof name, "grouped_matmul bwd dw (dxs NULL) %s", desc);
    grad_check(name, &dw2, tol_of(dt));

    grad_free(&dxs);
    grad_free(&dw);
    grad_free(&dxs2);
    grad_free(&dw2);
    pair_free(&dys);
    pair_free(&ys);
    pair_free(&xs);
    if (wmode) {
        free_t(&w.c);
        params_free(&ps);
    } else pair_free(&w);
    pair_free(&o);
    free(id);
    free(off);
    free(rows);
}

/* ---------- balance loss and z-loss ---------- */

/* no_assignments: offsets all zero (M = 0): the loss is 0 and the backward adds nothing */
void moe_aux_case(const void *args) {
    const MoeAuxCase *c = args;
    const DType dt = c->dt;
    const int64_t N = c->N;
    const int E = c->E, k = c->k;
    const bool normalize = c->normalize, no_assignments = c->no_assignments;
    char name[320], desc[120];
    snprintf(desc, sizeof desc, "%s N=%lld E=%d k=%d%s%s", dn(dt), (long long)N, E, k, normalize ? " normalized" : "",
             no_assignments ? " M=0" : "");
    int32_t *id = rand_idx(N, k, E, E > k ? 1 % E : -1), *off, *rows;
    cpu_plan(N, k, E, id, &off, &rows);
    if (no_assignments) memset(off, 0, (size_t)(E + 1) * sizeof(int32_t));
    Pair o = i32_pair(1, (int64_t[]){E + 1}, off);
    Pair s = pos_scores(dt, N, E), loss = pair_out(DT_F32, 1, (int64_t[]){1});
    CB->moe_aux_loss_forward(&loss.c, &s.c, &o.c, normalize);
    GB->moe_aux_loss_forward(&loss.g, &s.g, &o.g, normalize);
    snprintf(name, sizeof name, "moe_aux_loss fwd %s", desc);
    check(name, &loss, tol_of(dt));
    Pair dl = pair_from(DT_F32, 1, (int64_t[]){1}, (float[]){1.3f});
    Grad ds = grad_new(dt, 2, (int64_t[]){N, E});
    CB->moe_aux_loss_backward(&ds.p.c, &dl.c, &s.c, &o.c, normalize);
    grad_arm(&ds);
    GB->moe_aux_loss_backward(&ds.p.g, &dl.g, &s.g, &o.g, normalize);
    snprintf(name, sizeof name, "moe_aux_loss bwd %s", desc);
    grad_check(name, &ds, tol_of(dt));
    grad_free(&ds);
    pair_free(&dl);
    pair_free(&loss);
    pair_free(&s);
    pair_free(&o);
    free(id);
    free(off);
    free(rows);
}

void moe_z_case(const void *args) {
    const MoeZCase *c = args;
    const DType dt = c->dt;
    const int64_t N = c->N, E = c->E;
    char name[320], desc[120];
    snprintf(desc, sizeof desc, "%s N=%lld E=%lld", dn(dt), (long long)N, (long long)E);
    Pair lg = pair_rand(dt, 2, (int64_t[]){N, E}, 0, 3);
    Pair loss = pair_out(DT_F32, 1, (int64_t[]){1}), lse = pair_out(DT_F32, 1, (int64_t[]){N});
    CB->moe_z_loss_forward(&loss.c, &lse.c, &lg.c);
    GB->moe_z_loss_forward(&loss.g, &lse.g, &lg.g);
    snprintf(name, sizeof name, "moe_z_loss fwd loss %s", desc);
    check(name, &loss, tol_of(dt));
    snprintf(name, sizeof name, "moe_z_loss fwd lse %s", desc);
    check(name, &lse, tol_of(dt));
    Pair dl = pair_from(DT_F32, 1, (int64_t[]){1}, (float[]){0.7f});
    Pair l2 = pair_from(DT_F32, 1, (int64_t[]){N}, (const float *)lse.c.data);
    Grad dlg = grad_new(dt, 2, (int64_t[]){N, E});
    CB->moe_z_loss_backward(&dlg.p.c, &dl.c, &lg.c, &l2.c);
    grad_arm(&dlg);
    GB->moe_z_loss_backward(&dlg.p.g, &dl.g, &lg.g, &l2.g);
    snprintf(name, sizeof name, "moe_z_loss bwd %s", desc);
    grad_check(name, &dlg, tol_of(dt));
    grad_free(&dlg);
    pair_free(&l2);
    pair_free(&dl);
    pair_free(&lse);
    pair_free(&loss);
    pair_free(&lg);
}

/* ---------- routing statistics and the selection bias's update ---------- */

/* a tensor of n doubles on backend be holding v (host) */
static Tensor f64_tensor(const KernelBackend *be, int64_t n, const double *v) {
    Tensor t = mk(be, DT_F64, 1, (int64_t[]){n});
    be->copy_from_host(t.data, v, (size_t)n * sizeof(double));
    return t;
}

/* a loss scalar of dtype dt (F32 or F64) on backend be */
static Tensor loss_scalar(const KernelBackend *be, DType dt, double v) {
    Tensor t = mk(be, dt, 1, (int64_t[]){1});
    const float f = (float)v;
    be->copy_from_host(t.data, dt == DT_F64 ? (const void *)&v : (const void *)&f, dtype_size(dt));
    return t;
}

/* The first of n doubles (or floats, f32) where the GPU tensor g differs in a bit from the CPU's host values
 * ref, -1 when none; *got gets the GPU's values (caller frees). */
static int64_t first_bit_difference(const Tensor *g, const void *ref, int64_t n, bool f32, void **got) {
    const size_t es = f32 ? sizeof(float) : sizeof(double);
    *got = xmalloc((size_t)n * es + 8);
    GB->copy_to_host(*got, g->data, (size_t)n * es);
    for (int64_t i = 0; i < n; i++)
        if (memcmp((char *)*got + i * es, (const char *)ref + i * es, es)) return i;
    return -1;
}

/* moe_stats_accumulate three times into an accumulator that starts from random values (the plans of two
 * random routings, the losses of loss_dt or NULL as the case says): the GPU's f64 sums must be the CPU's
 * bit for bit (both add in the same order). */
void moe_stats_case(const void *args) {
    const MoeStatsCase *c = args;
    const int64_t N = c->N;
    const int E = c->E, k = c->k;
    char name[320];
    snprintf(name, sizeof name, "moe_stats_accumulate N=%lld E=%d k=%d %s%s%s", (long long)N, E, k, dn(c->loss_dt),
             c->aux ? " aux" : "", c->z ? " z" : "");
    double *start = xmalloc((size_t)(E + 2) * sizeof(double));
    for (int i = 0; i < E + 2; i++) start[i] = (double)(rng_next(&gpu_check.rng) % 1000) + (i >= E ? 0.3 * i : 0);
    Tensor ac = f64_tensor(CB, E + 2, start), ag = f64_tensor(GB, E + 2, start);
    for (int call = 0; call < 3; call++) {
        int32_t *id = rand_idx(N, k, E, call == 1 && E > k ? E - 1 : -1), *off, *rows;
        cpu_plan(N, k, E, id, &off, &rows);
        Pair o = i32_pair(1, (int64_t[]){E + 1}, off);
        const double aux = 0.5 + (double)(rng_next(&gpu_check.rng) % 4096) / 3000.0, z = 3.0 + call / 7.0;
        Tensor auxc = loss_scalar(CB, c->loss_dt, aux), auxg = loss_scalar(GB, c->loss_dt, aux);
        Tensor zc = loss_scalar(CB, c->loss_dt, z), zg = loss_scalar(GB, c->loss_dt, z);
        const bool with_aux = c->aux && call != 2, with_z = c->z; /* the third call without the aux loss */
        CB->moe_stats_accumulate(&ac, &o.c, with_aux ? &auxc : NULL, with_z ? &zc : NULL);
        GB->moe_stats_accumulate(&ag, &o.g, with_aux ? &auxg : NULL, with_z ? &zg : NULL);
        free_t(&auxc), free_t(&auxg), free_t(&zc), free_t(&zg);
        pair_free(&o);
        free(id), free(off), free(rows);
    }
    void *got;
    const int64_t bad = first_bit_difference(&ag, ac.data, E + 2, false, &got);
    const double *g = got, *r = ac.data;
    if (bad < 0) record(true, "%-58s bit-exact (%d values)", name, E + 2);
    else record(false, "%-58s first difference at %lld: gpu %.17g cpu %.17g", name, (long long)bad, g[bad], r[bad]);
    free(got);
    free(start);
    free_t(&ac);
    free_t(&ag);
}

/* moe_bias_update from the same accumulator and bias on both devices: bit-identical biases. loads 0: every
 * load 0 (the bias must not move); 1: most experts at the mean (they must not move); 2: random counts. */
void moe_bias_update_case(const void *args) {
    const MoeBiasUpdateCase *c = args;
    const int E = c->E;
    char name[320];
    static const char *kinds[] = {"all loads 0", "most loads at the mean", "random loads"};
    snprintf(name, sizeof name, "moe_bias_update E=%d rate %g, %s", E, (double)c->rate, kinds[c->loads]);
    double *acc = xmalloc((size_t)(E + 2) * sizeof(double));
    for (int e = 0; e < E; e++)
        acc[e] = c->loads == 0 ? 0 : c->loads == 1 ? (e % 4 ? 100 : e % 8 ? 60 : 140) : (double)(rng_next(&gpu_check.rng) % 5000);
    acc[E] = 1.25, acc[E + 1] = 7.5; /* the losses' sums: not loads */
    float *b = randn(E, 0, 0.1);
    Tensor accc = f64_tensor(CB, E + 2, acc), accg = f64_tensor(GB, E + 2, acc);
    Tensor bc = mk(CB, DT_F32, 1, (int64_t[]){E}), bg = mk(GB, DT_F32, 1, (int64_t[]){E});
    memcpy(bc.data, b, (size_t)E * sizeof(float));
    GB->copy_from_host(bg.data, b, (size_t)E * sizeof(float));
    for (int step = 0; step < 3; step++) { /* a few updates, as over a few optimizer steps */
        CB->moe_bias_update(&bc, &accc, c->rate);
        GB->moe_bias_update(&bg, &accg, c->rate);
    }
    void *got;
    const int64_t bad = first_bit_difference(&bg, bc.data, E, true, &got);
    const float *g = got, *r = bc.data;
    int moved = 0;
    for (int e = 0; e < E; e++) moved += r[e] != b[e];
    const bool moved_ok = c->loads == 0 ? moved == 0 : c->loads == 1 ? moved > 0 && moved < E : moved > 0;
    if (bad < 0) record(moved_ok, "%-58s bit-exact; %d of %d biases moved", name, moved, E);
    else record(false, "%-58s first difference at %lld: gpu %.9g cpu %.9g", name, (long long)bad, g[bad], r[bad]);
    free(got);
    free(acc);
    free(b);
    free_t(&accc), free_t(&accg), free_t(&bc), free_t(&bg);
}

/* ---------- end to end: a small MoE model trained a few steps on both devices ---------- */

#define MOE_CONFIG "configs/shakespeare_moe.json"

/* variant 0: the config's router (softmax, k = 2 of 8, renormalised, shared expert, aux and z-losses,
 * selection bias updates); variant 1: sigmoid scores, k = 3 of 5, no shared expert, a larger bias step */
static double train_moe(const char *device, int variant, int steps, bool recompute, double *losses, double *aux) {
    static const char *common[] = {"model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                                   "model.ffn_dim=160", "model.moe_layers=all", "moe.expert_dim=40",
                                   "moe.shared_expert_dim=80", "train.batch_size=8", "train.seq_len=64",
                                   "train.eval_batches=4", "optim.lr=0.004", "optim.min_lr=0.0004",
                                   "optim.warmup_steps=10"};
    static const char *sigmoid[] = {"moe.score_func=sigmoid", "moe.num_experts=5", "moe.experts_per_token=3",
                                    "moe.shared_experts=0", "moe.bias_update_rate=0.01", "moe.routing_scale=2.5"};
    Run r;
    memset(&r, 0, sizeof r);
    r.quiet = true;
    config_defaults(&r.cfg);
    config_load(&r.cfg, MOE_CONFIG);
    for (size_t i = 0; i < sizeof common / sizeof common[0]; i++) config_set(&r.cfg, common[i]);
    if (variant == 1)
        for (size_t i = 0; i < sizeof sigmoid / sizeof sigmoid[0]; i++)
            config_set(&r.cfg, sigmoid[i]);
    r.cfg.train.out_dir[0] = 0; /* nothing written */
    r.cfg.train.steps = steps;
    r.cfg.train.recompute = recompute;
    snprintf(r.cfg.train.device, sizeof r.cfg.train.device, "%s", device);
    r.config_path = MOE_CONFIG;
    run_init(&r);
    for (int s = 0; s < steps; s++) {
        StepResult res = run_step(&r);
        losses[s] = res.loss;
        aux[s] = res.aux;
    }
    double val = run_evaluate(&r, NULL);
    run_free(&r);
    return val;
}

/* Tolerances. The CUDA run keeps activations in BF16, the router's logits and scores included, while
 * the CPU reference is F32, from the same initial weights and batches. Besides the rounding the dense
 * model sees (tiny.json: <= 6e-5 over 12 steps, tests/gpu/test_gpu.c), the BF16 scores make a few
 * percent of the tokens pick a different expert than the reference does (near-equal scores round to
 * the same BF16 value and the tie goes to the lower expert), so the runs differ by a discrete routing
 * noise as well. Required: 1e-3 at step 1 (the MoE output is small at initialisation) and 5e-3 for
 * steps 2-12 and validation; the exact checks are on CUDA alone: two runs and a run with activation
 * recomputation give identical losses. The weighted balance terms (StepResult.aux) are printed, not
 * checked: they depend on the routed counts directly. */
void moe_e2e_case(const void *args) {
    const int variant = ((const MoeE2eCase *)args)->variant;
    enum { STEPS = 12 };
    double lc[STEPS], lg[STEPS], ac[STEPS], ag[STEPS], lg2[STEPS], ag2[STEPS];
    const char *what = variant ? "sigmoid k=3 of 5" : "softmax k=2 of 8, shared";
    double vc = train_moe("cpu", variant, STEPS, false, lc, ac);
    double vg = train_moe("cuda", variant, STEPS, false, lg, ag);
    printf("    moe %s\n    step   cpu loss   cuda loss   rel diff   cpu aux    cuda aux\n", what);
    double worst = 0;
    bool nan = false;
    for (int s = 0; s < STEPS; s++) {
        double d = fabs(lg[s] - lc[s]) / lc[s];
        if (!isfinite(lg[s]) || !isfinite(ag[s])) nan = true;
        if (s > 0 && d > worst) worst = d;
        printf("    %4d   %8.5f   %9.5f   %.2e   %.6f   %.6f\n", s + 1, lc[s], lg[s], d, ac[s], ag[s]);
    }
    printf("    val    %8.5f   %9.5f   %.2e\n", vc, vg, fabs(vg - vc) / vc);
    char name[160];
    double d0 = fabs(lg[0] - lc[0]) / lc[0];
    snprintf(name, sizeof name, "moe e2e (%s) step 1 loss, cuda vs cpu", what);
    record(!nan && d0 <= 1e-3, "%-58s rel diff %.2e (tol 1e-3)", name, d0);
    snprintf(name, sizeof name, "moe e2e (%s) steps 2-12, cuda vs cpu", what);
    record(!nan && worst <= 5e-3, "%-58s max rel diff %.2e (tol 5e-3)", name, worst);
    snprintf(name, sizeof name, "moe e2e (%s) validation loss, cuda vs cpu", what);
    record(isfinite(vg) && fabs(vg - vc) / vc <= 5e-3, "%-58s rel diff %.2e (tol 5e-3)", name, fabs(vg - vc) / vc);
    snprintf(name, sizeof name, "moe e2e (%s) on cuda: the loss falls", what);
    record(lg[STEPS - 1] < lg[0] - 0.1, "%-58s %.4f -> %.4f", name, lg[0], lg[STEPS - 1]);
    if (variant != 0) return;
    train_moe("cuda", variant, STEPS, false, lg2, ag2);
    record(memcmp(lg, lg2, sizeof lg) == 0 && memcmp(ag, ag2, sizeof ag) == 0, "%-58s",
           "moe e2e: cuda runs are deterministic (same losses)");
    train_moe("cuda", variant, STEPS, true, lg2, ag2);
    record(memcmp(lg, lg2, sizeof lg) == 0 && memcmp(ag, ag2, sizeof ag) == 0, "%-58s",
           "moe e2e: cuda activation recomputation changes nothing");
}

/* ---------- bad input: the messages, in child processes ---------- */

/* In the child (test_gpu --only moe with MSA_TEST_MOE_DIE set, whose first case is a bad-input case):
 * feed one kernel bad input; the program must stop with the message. Returning means it did not. The
 * kernels record bad input in the device error word, reported at the next copy to the host (gpu_sync),
 * or at once by the per-expert grouped GEMMs, which copy the offsets to the host anyway. */
static void die_scenario(const char *what) {
    const int64_t N = 3, k = 2, E = 8, M = N * k;
    if (!strcmp(what, "plan") || !strcmp(what, "plan_per_expert")) {
        /* idx[1, 1] = 9 with E = 8, and idx[2900, 0] = -3 in another block: the lower position is reported,
         * whichever block runs first */
        const int64_t n = 3000;
        int32_t *v = xmalloc((size_t)(n * k) * sizeof(int32_t));
        for (int64_t i = 0; i < n * k; i++) v[i] = (int32_t)(i % E);
        v[1 * k + 1] = 9;
        v[2900 * k + 0] = -3;
        Pair idx = i32_pair(2, (int64_t[]){n, k}, v);
        free(v);
        Tensor o = mk(GB, DT_I32, 1, (int64_t[]){E + 1}), r = mk(GB, DT_I32, 2, (int64_t[]){n, k});
        GB->moe_plan(&o, &r, &idx.g);
        if (!strcmp(what, "plan_per_expert")) { /* an F32 GEMM on the spoilt offsets: the plan's error, not theirs */
            Pair xs = pair_rand(DT_F32, 2, (int64_t[]){n * k, 8}, 0, 1), w = pair_rand(DT_F32, 3, (int64_t[]){E, 4, 8}, 0, 1);
            Tensor ys = mk(GB, DT_F32, 2, (int64_t[]){n * k, 4});
            GB->grouped_matmul_forward(&ys, &xs.g, &w.g, &o);
        }
        gpu_sync();
    } else if (!strcmp(what, "topk")) { /* token 1's scores all NaN: nothing to rank */
        Pair s = pair_from(DT_BF16, 2, (int64_t[]){N, E},
                           (float[]){1, 2, 3, 4, 5, 6, 7, 8, NAN, NAN, NAN, NAN, NAN, NAN, NAN, NAN, 8, 7, 6, 5, 4, 3, 2, 1});
        Tensor idx = mk(GB, DT_I32, 2, (int64_t[]){N, k}), o = mk(GB, DT_I32, 1, (int64_t[]){E + 1}),
               r = mk(GB, DT_I32, 2, (int64_t[]){N, k});
        GB->moe_topk(&idx, &s.g, NULL, (int)k);
        GB->moe_plan(&o, &r, &idx);
        gpu_sync();
    } else if (!strcmp(what, "combine")) { /* idx[1, 1] = -1 */
        Pair s = pair_rand(DT_F32, 2, (int64_t[]){N, E}, 0.5, 0.1);
        Pair idx = i32_pair(2, (int64_t[]){N, k}, (int32_t[]){0, 1, 2, -1, 3, 4});
        Tensor w = mk(GB, DT_F32, 2, (int64_t[]){N, k});
        GB->moe_combine_weights_forward(&w, &s.g, &idx.g, true, 1.0f);
        gpu_sync();
    } else if (!strcmp(what, "offsets")) { /* segments that go backwards */
        Pair o = i32_pair(1, (int64_t[]){4}, (int32_t[]){0, 5, 3, 6});
        Pair xs = pair_rand(DT_BF16, 2, (int64_t[]){M, 8}, 0, 1), w = pair_rand(DT_F32, 3, (int64_t[]){3, 4, 8}, 0, 1);
        Tensor ys = mk(GB, DT_BF16, 2, (int64_t[]){M, 4});
        GB->grouped_matmul_forward(&ys, &xs.g, &w.g, &o.g);
    } else if (!strcmp(what, "offsets_single")) { /* the same on the single-launch path */
        Pair o = i32_pair(1, (int64_t[]){4}, (int32_t[]){0, 5, 3, 6});
        Pair xs = pair_rand(DT_BF16, 2, (int64_t[]){M, 8}, 0, 1), w = pair_rand(DT_F32, 3, (int64_t[]){3, 8, 8}, 0, 1);
        Tensor ys = mk(GB, DT_BF16, 2, (int64_t[]){M, 8});
        GB->grouped_matmul_forward(&ys, &xs.g, &w.g, &o.g);
        gpu_sync();
    } else if (!strcmp(what, "rows")) { /* a row past the grouped buffer; reported by the next (per-expert) grouped GEMM */
        Pair r = i32_pair(2, (int64_t[]){N, k}, (int32_t[]){0, 1, 2, 7, 4, 5});
        Pair x = pair_rand(DT_BF16, 2, (int64_t[]){N, 8}, 0, 1);
        Pair o = i32_pair(1, (int64_t[]){3}, (int32_t[]){0, 2, 6});
        Pair w = pair_rand(DT_F32, 3, (int64_t[]){2, 4, 8}, 0, 1);
        Tensor xs = mk(GB, DT_BF16, 2, (int64_t[]){M, 8}), ys = mk(GB, DT_BF16, 2, (int64_t[]){M, 4});
        GB->moe_permute_forward(&xs, &x.g, &r.g);
        GB->grouped_matmul_forward(&ys, &xs, &w.g, &o.g);
    } else if (!strcmp(what, "rows_unpermute")) { /* rows[2, 0] = -2 in the unpermute, read at the next copy */
        Pair r = i32_pair(2, (int64_t[]){N, k}, (int32_t[]){0, 1, 2, 3, -2, 5});
        Pair ys = pair_rand(DT_BF16, 2, (int64_t[]){M, 8}, 0, 1), w = pair_rand(DT_F32, 2, (int64_t[]){N, k}, 0.5, 0.1);
        Tensor out = mk(GB, DT_BF16, 2, (int64_t[]){N, 8});
        GB->moe_unpermute_forward(&out, &ys.g, &w.g, &r.g);
        gpu_sync();
    }
}

void moe_bad_input_case(const void *args) {
    const char *die = getenv("MSA_TEST_MOE_DIE");
    if (die) {
        die_scenario(die);
        exit(3); /* the scenario did not stop the program */
    }
    const char *what = ((const MoeBadInputCase *)args)->what, *message = ((const MoeBadInputCase *)args)->message;
    char self[4096], cmd[8192], errf[64], err[2048] = "";
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        record(false, "%-58s cannot find this program (/proc/self/exe)", what);
        return;
    }
    self[n] = 0;
    snprintf(errf, sizeof errf, "/tmp/msa_test_gpu_moe_%d.txt", (int)getpid());
    snprintf(cmd, sizeof cmd, "MSA_TEST_MOE_DIE=%s '%s' --only moe >/dev/null 2>%s", what, self, errf);
    int st = system(cmd);
    FILE *f = fopen(errf, "r");
    if (f) {
        size_t m = fread(err, 1, sizeof err - 1, f);
        err[m] = 0;
        fclose(f);
    }
    remove(errf);
    char *nl = strchr(err, '\n');
    if (nl) *nl = 0;
    char name[320];
    snprintf(name, sizeof name, "moe bad input: %s", what);
    bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 1 && strstr(err, message);
    record(ok, "%-58s exit %d: %s", name, WIFEXITED(st) ? WEXITSTATUS(st) : -1, err);
}

/* ---------- no host wait ---------- */

/* One MoE layer's kernels, forward and backward, in the order layers/moe.c calls them: BF16 rows with widths
 * that are multiples of 8 (the single-launch grouped GEMMs, as in training) */
static void moe_layer_kernels(Tensor *t) {
    enum { SCORES, IDX, OFF, ROWS, W, X, XS, YS, WT, OUT, DOUT, DYS, DW, DWT, DXS, DX, DSCORES };
    GB->moe_topk(&t[IDX], &t[SCORES], NULL, (int)t[IDX].shape[1]);
    GB->moe_plan(&t[OFF], &t[ROWS], &t[IDX]);
    GB->moe_combine_weights_forward(&t[W], &t[SCORES], &t[IDX], false, 1.0f);
    GB->moe_permute_forward(&t[XS], &t[X], &t[ROWS]);
    GB->grouped_matmul_forward(&t[YS], &t[XS], &t[WT], &t[OFF]);
    GB->moe_unpermute_forward(&t[OUT], &t[YS], &t[W], &t[ROWS]);
    GB->moe_unpermute_backward(&t[DYS], &t[DW], &t[DOUT], &t[YS], &t[W], &t[ROWS]);
    GB->grouped_matmul_backward(&t[DXS], &t[DWT], &t[DYS], &t[XS], &t[WT], &t[OFF]);
    GB->moe_permute_backward(&t[DX], &t[DXS], &t[ROWS]);
    GB->moe_combine_weights_backward(&t[DSCORES], &t[DW], &t[SCORES], &t[IDX], false, 1.0f);
}

/* Issue 16's "no host synchronisation per call": once a first call of each has sized the scratch buffer, a
 * whole MoE layer's kernels (Top-k, plan, combine weights, permute, the grouped GEMMs, unpermute, and their
 * backward) must not make the host wait (the backend's count, cuda_host_waits); bad input waits for the next
 * copy to the host (the bad-input cases above). moe_plan used to copy a status word to the host per call. */
void moe_no_wait_case(const void *args) {
    (void)args;
    const char *each = getenv("MSA_CUDA_SYNC");
    if (each && each[0] && strcmp(each, "0") != 0) {
        printf("    moe layer host waits: not checked (MSA_CUDA_SYNC waits after every launch)\n");
        return;
    }
    const int64_t N = 300, C = 64, H = 32;
    const int E = 8, k = 2;
    const int64_t M = N * k;
    Tensor t[] = {
        dev_rand(DT_F32, 2, (int64_t[]){N, E}, 1),       /* scores */
        mk(GB, DT_I32, 2, (int64_t[]){N, k}),            /* idx */
        mk(GB, DT_I32, 1, (int64_t[]){E + 1}),           /* offsets */
        mk(GB, DT_I32, 2, (int64_t[]){N, k}),            /* rows */
        mk(GB, DT_F32, 2, (int64_t[]){N, k}),            /* combine weights */
        dev_rand(DT_BF16, 2, (int64_t[]){N, C}, 1),      /* x */
        mk(GB, DT_BF16, 2, (int64_t[]){M, C}),           /* xs */
        mk(GB, DT_BF16, 2, (int64_t[]){M, H}),           /* ys */
        dev_rand(DT_F32, 3, (int64_t[]){E, H, C}, 0.1),  /* expert weights */
        mk(GB, DT_BF16, 2, (int64_t[]){N, H}),           /* out */
        dev_rand(DT_BF16, 2, (int64_t[]){N, H}, 1),      /* dout */
        dev_rand(DT_BF16, 2, (int64_t[]){M, H}, 0),      /* dys */
        dev_rand(DT_F32, 2, (int64_t[]){N, k}, 0),       /* dw (combine weights) */
        dev_rand(DT_F32, 3, (int64_t[]){E, H, C}, 0),    /* d expert weights */
        dev_rand(DT_BF16, 2, (int64_t[]){M, C}, 0),      /* dxs */
        dev_rand(DT_BF16, 2, (int64_t[]){N, C}, 0),      /* dx */
        dev_rand(DT_F32, 2, (int64_t[]){N, E}, 0),       /* dscores */
    };
    moe_layer_kernels(t);
    gpu_sync();
    const int64_t before = GB->host_waits();
    moe_layer_kernels(t);
    const int64_t waits = GB->host_waits() - before;
    const char *site = waits ? cuda_last_host_wait() : "none";
    gpu_sync(); /* no bad input was met */
    record(waits == 0, "%-58s %lld (last at %s)", "moe layer forward and backward: host waits", (long long)waits, site);
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) free_t(&t[i]);
}

/* ---------- --bench moe: the experts' grouped GEMMs ---------- */

typedef struct {
    Tensor xs, ys, dys, dxs, offsets;
    Tensor *w;
    int backward;
} GroupedBench;

static double time_grouped(GroupedBench *b, int reps) {
    double t0 = 0;
    for (int i = 0; i < reps + 2; i++) { /* two warm-up calls */
        if (i == 2) {
            gpu_sync();
            t0 = wall_seconds();
        }
        if (b->backward) GB->grouped_matmul_backward(&b->dxs, b->w->grad, &b->dys, &b->xs, b->w, &b->offsets);
        else GB->grouped_matmul_forward(&b->ys, &b->xs, b->w, &b->offsets);
    }
    gpu_sync();
    return (wall_seconds() - t0) / reps;
}

/* One grouped linear layer of N tokens routed top-k of E experts (uniformly at random), w [E, out, in] F32
 * parameters read through their BF16 shadow, BF16 rows: forward ys = xs w_e^T, backward dxs and dw
 * together. The single-launch grouped GEMM against the per-expert cuBLASLt path (MSA_MOE_GEMM=per_expert),
 * TFLOP/s of 2 M in out per product. */
static void bench_grouped_layer(int64_t N, int E, int k, int64_t in, int64_t out) {
    const int64_t M = N * k;
    int32_t *id = rand_idx(N, k, E, -1), *off, *rows;
    cpu_plan(N, k, E, id, &off, &rows);
    GroupedBench b;
    b.offsets = mk(GB, DT_I32, 1, (int64_t[]){E + 1});
    GB->copy_from_host(b.offsets.data, off, (size_t)(E + 1) * sizeof(int32_t));
    ParamStore ps;
    params_init(&ps, GB, DT_F32);
    b.w = params_add(&ps, "experts", 3, (int64_t[]){E, out, in}, INIT_NORMAL, 0.02f, true);
    params_allocate(&ps, 3);
    b.xs = dev_rand(DT_BF16, 2, (int64_t[]){M, in}, 1), b.ys = mk(GB, DT_BF16, 2, (int64_t[]){M, out});
    b.dys = dev_rand(DT_BF16, 2, (int64_t[]){M, out}, 1), b.dxs = dev_rand(DT_BF16, 2, (int64_t[]){M, in}, 0);
    const char *prev = getenv("MSA_MOE_GEMM");
    char saved[64] = "";
    if (prev) snprintf(saved, sizeof saved, "%s", prev);
    static const char *paths[2] = {"grouped", "per_expert"};
    double t[2][2];
    const double flops = 2.0 * (double)M * (double)in * (double)out;
    for (int p = 0; p < 2; p++) {
        setenv("MSA_MOE_GEMM", paths[p], 1);
        for (b.backward = 0; b.backward < 2; b.backward++) t[p][b.backward] = time_grouped(&b, 10);
        printf("  moe grouped_linear N=%lld k=%d E=%d in=%lld out=%lld %-10s: fwd %.3f ms (%.0f TFLOP/s), bwd dx+dw %.3f ms "
               "(%.0f TFLOP/s)\n",
               (long long)N, k, E, (long long)in, (long long)out, paths[p], t[p][0] * 1e3, flops / t[p][0] * 1e-12,
               t[p][1] * 1e3, 2 * flops / t[p][1] * 1e-12);
    }
    printf("  moe grouped_linear in=%lld out=%lld: grouped vs per_expert: fwd %.2fx, bwd %.2fx faster\n", (long long)in,
           (long long)out, t[1][0] / t[0][0], t[1][1] / t[0][1]);
    if (prev) setenv("MSA_MOE_GEMM", saved, 1);
    else unsetenv("MSA_MOE_GEMM");
    Tensor *all[] = {&b.xs, &b.ys, &b.dys, &b.dxs, &b.offsets};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free_t(all[i]);
    params_free(&ps);
    free(id);
    free(off);
    free(rows);
}

void bench_moe_grouped(void) {
    /* docs/benchmarks.md's MoE: 4 x 4K tokens, 16 experts of 704, top-4, d_model 2048 (gate/up, then down) */
    bench_grouped_layer(16384, 16, 4, 2048, 704);
    bench_grouped_layer(16384, 16, 4, 704, 2048);
    /* finer experts: 64 of 352, top-8 */
    bench_grouped_layer(16384, 64, 8, 2048, 352);
    bench_grouped_layer(16384, 64, 8, 352, 2048);
}
