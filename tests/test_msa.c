/* MiniMax Sparse Attention on the CPU: the indexer against a brute-force selection written here,
 * sparse attention and the KL loss against naive float64 references, float64 finite-difference
 * gradient checks with the selection held fixed, the KL's detached teacher, the recall metric, the
 * hand-worked example of msa_spec.md (c.2 / V-KL §1.2), and run-to-run / thread-count determinism.
 * Every reference below is written from the definitions (DESIGN §4), not from the kernels. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/util.h"
#include "../layers/msa.h"
#include "gradcheck.h"
#include "test.h"

#define GRAD_TOL 1e-6

/* ---- helpers ---- */

static int64_t doc_start_of(const Tensor *cu, int64_t t) {
    const int32_t *c = cu->data;
    int64_t d = 0;
    while (c[d + 1] <= t) d++;
    return c[d];
}

static void zero_grad(Tensor *t) {
    if (t && t->grad) memset(t->grad->data, 0, tensor_bytes(t->grad));
}

static bool grad_ok(GradCheckResult r, const char *what) {
    if (!(r.max_rel_err < GRAD_TOL && r.numeric_norm > 0)) {
        printf("    %s: rel err %.3e (input %d, numeric norm %.3e)\n", what, r.max_rel_err, r.worst_input,
               r.numeric_norm);
        return false;
    }
    return true;
}

static MsaParams params(int B, int K, int init, int local, double scale, double iscale) {
    return (MsaParams){.block_size = B, .topk_blocks = K, .init_blocks = init, .local_blocks = local,
                       .scale = (float)scale, .index_scale = (float)iscale};
}

/* the kernel's topk for (qi, ki) as a persistent tensor */
static Tensor *run_indexer(const Tensor *qi, const Tensor *ki, const Tensor *cu, const MsaParams *p) {
    Tensor *tk = test_tensor(DT_I32, SHAPE(qi->shape[1], qi->shape[0], p->topk_blocks));
    cpu_backend.msa_indexer(tk, NULL, NULL, qi, ki, cu, p);
    return tk;
}

/* ---- brute-force references ---- */

typedef struct {
    double score;
    int block;
} Cand;

static int cand_cmp(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1; /* higher score first */
    return x->block - y->block;                                      /* ties: lower block first */
}

static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

/* Selection from the definition: score every visible token, max-pool into blocks, force the init
 * and local blocks, sort the other candidates by (score desc, block asc), take what fits, sort. */
static void ref_select(int32_t *topk, const Tensor *qi, const Tensor *ki, const Tensor *cu, const MsaParams *p) {
    const int64_t N = qi->shape[0], H = qi->shape[1], Di = qi->shape[2], B = p->block_size, K = p->topk_blocks;
    double *tok = xmalloc(sizeof(double) * N), *bmax = xmalloc(sizeof(double) * N);
    Cand *cand = xmalloc(sizeof(Cand) * N);
    int *sel = xmalloc(sizeof(int) * (N + K));
    for (int64_t g = 0; g < H; g++)
        for (int64_t t = 0; t < N; t++) {
            const int64_t s = doc_start_of(cu, t), nb = (t - s) / B + 1, lb = nb - 1;
            for (int64_t j = s; j <= t; j++) {
                double dot = 0;
                for (int64_t d = 0; d < Di; d++) dot += tensor_get(qi, (t * H + g) * Di + d) * tensor_get(ki, j * Di + d);
                tok[j - s] = (double)p->index_scale * dot;
            }
            for (int64_t b = 0; b < nb; b++) {
                bmax[b] = -INFINITY;
                for (int64_t j = s + b * B; j <= t && j < s + (b + 1) * B; j++) bmax[b] = fmax(bmax[b], tok[j - s]);
            }
            int n = 0, nc = 0;
            for (int64_t b = 0; b < nb; b++) {
                bool forced = b < p->init_blocks || b > lb - p->local_blocks;
                if (nb <= K || forced) sel[n++] = (int)b;
                else cand[nc++] = (Cand){bmax[b], (int)b};
            }
            qsort(cand, (size_t)nc, sizeof(Cand), cand_cmp);
            for (int i = 0; i < nc && n < K; i++) sel[n++] = cand[i].block;
            qsort(sel, (size_t)n, sizeof(int), int_cmp);
            for (int64_t i = 0; i < K; i++) topk[(g * N + t) * K + i] = i < n ? sel[i] : -1;
        }
    free(tok);
    free(bmax);
    free(cand);
    free(sel);
}

/* Is key j in the support of (g, t)? same document, j <= t, and j's block selected (topk NULL: all) */
static bool in_support(const Tensor *topk, const Tensor *cu, const MsaParams *p, int64_t g, int64_t t, int64_t j) {
    const int64_t s = doc_start_of(cu, t);
    if (j < s || j > t) return false;
    if (!topk) return true;
    const int64_t N = topk->shape[1], K = topk->shape[2];
    const int32_t *row = (const int32_t *)topk->data + (g * N + t) * K;
    for (int64_t i = 0; i < K; i++)
        if (row[i] == (j - s) / p->block_size) return true;
    return false;
}

/* Masked dense attention: for each head and query, a softmax over the keys in the support. */
static void ref_attention(const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *topk, const Tensor *cu,
                          const MsaParams *p, double *out, double *lse) {
    const int64_t N = q->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1], G = Hq / Hkv;
    double *w = xmalloc(sizeof(double) * N);
    for (int64_t h = 0; h < Hq; h++)
        for (int64_t t = 0; t < N; t++) {
            const int64_t g = h / G;
            double mx = -INFINITY;
            for (int64_t j = 0; j < N; j++) {
                w[j] = -INFINITY;
                if (!in_support(topk, cu, p, g, t, j)) continue;
                double dot = 0;
                for (int64_t d = 0; d < D; d++) dot += tensor_get(q, (t * Hq + h) * D + d) * tensor_get(k, (j * Hkv + g) * D + d);
                w[j] = (double)p->scale * dot;
                mx = fmax(mx, w[j]);
            }
            double z = 0;
            for (int64_t j = 0; j < N; j++) z += exp(w[j] - mx);
            for (int64_t d = 0; d < D; d++) {
                double o = 0;
                for (int64_t j = 0; j < N; j++) o += exp(w[j] - mx) / z * tensor_get(v, (j * Hkv + g) * D + d);
                out[(t * Hq + h) * D + d] = o;
            }
            lse[h * N + t] = mx + log(z);
        }
    free(w);
}

/* The group-mean teacher over the support with each head's own normaliser (no saved lse), the
 * student softmax over the same support, and KL(teacher || student) per (t, g); returns the mean. */
static double ref_kl(const Tensor *q, const Tensor *k, const Tensor *qi, const Tensor *ki, const Tensor *topk,
                     const Tensor *cu, const MsaParams *p, double *idx_lse) {
    const int64_t N = q->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1], G = Hq / Hkv, Di = qi->shape[2];
    double *pt = xmalloc(sizeof(double) * N), *ph = xmalloc(sizeof(double) * N), *z = xmalloc(sizeof(double) * N);
    double total = 0;
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t t = 0; t < N; t++) {
            for (int64_t j = 0; j < N; j++) pt[j] = 0;
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                double zs = 0;
                for (int64_t j = 0; j < N; j++) {
                    ph[j] = 0;
                    if (!in_support(topk, cu, p, g, t, j)) continue;
                    double dot = 0;
                    for (int64_t d = 0; d < D; d++)
                        dot += tensor_get(q, (t * Hq + h) * D + d) * tensor_get(k, (j * Hkv + g) * D + d);
                    ph[j] = exp((double)p->scale * dot);
                    zs += ph[j];
                }
                for (int64_t j = 0; j < N; j++) pt[j] += ph[j] / zs / (double)G;
            }
            double zsum = 0;
            for (int64_t j = 0; j < N; j++) {
                z[j] = -INFINITY;
                if (!in_support(topk, cu, p, g, t, j)) continue;
                double dot = 0;
                for (int64_t d = 0; d < Di; d++) dot += tensor_get(qi, (t * Hkv + g) * Di + d) * tensor_get(ki, j * Di + d);
                z[j] = (double)p->index_scale * dot;
                zsum += exp(z[j]);
            }
            if (idx_lse) idx_lse[g * N + t] = log(zsum);
            for (int64_t j = 0; j < N; j++)
                if (pt[j] > 0) total += pt[j] * log(pt[j] / (exp(z[j]) / zsum));
        }
    free(pt);
    free(ph);
    free(z);
    return total / (double)(N * Hkv);
}

/* Mean over sampled (t, g) of the dense (full causal prefix) group-mean teacher mass in the
 * selected blocks. */
static double ref_recall(const Tensor *q, const Tensor *k, const Tensor *topk, const Tensor *cu, const MsaParams *p,
                         int stride) {
    const int64_t N = q->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1], G = Hq / Hkv;
    double sum = 0;
    int64_t cnt = 0;
    for (int64_t t = 0; t < N; t += stride)
        for (int64_t g = 0; g < Hkv; g++) {
            double mass = 0;
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                double zs = 0, in = 0;
                for (int64_t j = doc_start_of(cu, t); j <= t; j++) {
                    double dot = 0;
                    for (int64_t d = 0; d < D; d++)
                        dot += tensor_get(q, (t * Hq + h) * D + d) * tensor_get(k, (j * Hkv + g) * D + d);
                    double e = exp((double)p->scale * dot);
                    zs += e;
                    if (in_support(topk, cu, p, g, t, j)) in += e;
                }
                mass += in / zs;
            }
            sum += mass / (double)G;
            cnt++;
        }
    return sum / (double)cnt;
}

/* ---- cases ---- */

typedef struct {
    int ndocs;
    int lens[4];
    int Hq, Hkv, D, Di;
    int B, K, init, local;
} MsaCase;

/* odd N, T not a multiple of B, 1-token documents, GQA ratios 1, 2, 4, sparse selections */
static const MsaCase cases[] = {
    {1, {7}, 2, 2, 4, 3, 2, 2, 0, 1},          /* G = 1 */
    {3, {3, 1, 9}, 4, 2, 5, 4, 2, 3, 1, 1},    /* G = 2, sink block */
    {2, {13, 10}, 4, 1, 3, 5, 3, 2, 0, 2},     /* G = 4, two local blocks, nothing left to rank */
    {2, {11, 6}, 8, 2, 4, 6, 2, 4, 1, 2},      /* G = 4 */
    {4, {5, 1, 14, 3}, 6, 3, 3, 2, 1, 4, 1, 1} /* G = 2, block size 1 */
};
#define N_CASES (int)(sizeof cases / sizeof cases[0])

static int case_tokens(const MsaCase *c) {
    int n = 0;
    for (int d = 0; d < c->ndocs; d++) n += c->lens[d];
    return n;
}

static MsaParams case_params(const MsaCase *c) {
    return params(c->B, c->K, c->init, c->local, 1.0 / sqrt((double)c->D), 1.0 / sqrt((double)c->Di));
}

/* ---- indexer ---- */

/* Structural properties every selection must have, checked on the kernel's output. */
static bool check_selection_props(const int32_t *tk, const Tensor *cu, int64_t H, int64_t N, const MsaParams *p,
                                  char *why, size_t nwhy) {
    const int64_t K = p->topk_blocks, B = p->block_size;
    for (int64_t g = 0; g < H; g++)
        for (int64_t t = 0; t < N; t++) {
            const int32_t *row = tk + (g * N + t) * K;
            const int64_t lb = (t - doc_start_of(cu, t)) / B, nvis = lb + 1, want = nvis < K ? nvis : K;
            int64_t n = 0;
            while (n < K && row[n] >= 0) n++;
            for (int64_t i = n; i < K; i++)
                if (row[i] != -1) return snprintf(why, nwhy, "(%lld,%lld): slot %lld not -1 after padding", (long long)g, (long long)t, (long long)i), false;
            if (n != want) return snprintf(why, nwhy, "(%lld,%lld): %lld blocks, expected %lld", (long long)g, (long long)t, (long long)n, (long long)want), false;
            for (int64_t i = 0; i < n; i++) {
                if (i > 0 && row[i] <= row[i - 1]) return snprintf(why, nwhy, "(%lld,%lld): not ascending", (long long)g, (long long)t), false;
                if (row[i] > lb) return snprintf(why, nwhy, "(%lld,%lld): future block %d (own block %lld)", (long long)g, (long long)t, row[i], (long long)lb), false;
            }
            /* forced blocks present */
            for (int64_t b = 0; b <= lb; b++) {
                bool forced = b < p->init_blocks || b > lb - p->local_blocks;
                bool found = false;
                for (int64_t i = 0; i < n; i++) found |= row[i] == b;
                if (forced && !found) return snprintf(why, nwhy, "(%lld,%lld): forced block %lld missing", (long long)g, (long long)t, (long long)b), false;
            }
        }
    return true;
}

TEST(indexer_matches_bruteforce) {
    /* (block, topk, init, local) on top of the cases' shapes, f64 and f32 inputs */
    const int variants[][4] = {{2, 3, 0, 1}, {3, 2, 1, 1}, {2, 4, 1, 2}, {1, 5, 2, 1}, {4, 2, 0, 2}, {8, 3, 1, 1}, {2, 16, 0, 1}};
    const int nv = (int)(sizeof variants / sizeof variants[0]);
    for (int ci = 0; ci < N_CASES; ci++)
        for (int vi = 0; vi < nv; vi++)
            for (int f32 = 0; f32 < 2; f32++) {
                const MsaCase *c = &cases[ci];
                const int N = case_tokens(c);
                MsaParams p = params(variants[vi][0], variants[vi][1], variants[vi][2], variants[vi][3], 0.5, 1.0 / sqrt(c->Di));
                Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 1000 + ci * 10 + vi);
                Tensor *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 2000 + ci * 10 + vi);
                if (f32) { /* the f32 values, seen exactly by the double reference */
                    Tensor *a = test_copy_as(qi, DT_F32), *b = test_copy_as(ki, DT_F32);
                    test_tensor_free(qi);
                    test_tensor_free(ki);
                    qi = a;
                    ki = b;
                }
                Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
                Tensor *tk = run_indexer(qi, ki, cu, &p);
                int32_t *ref = xmalloc(sizeof(int32_t) * (size_t)tk->numel);
                ref_select(ref, qi, ki, cu, &p);
                bool same = memcmp(ref, tk->data, tensor_bytes(tk)) == 0;
                char why[160] = "";
                bool props = check_selection_props(tk->data, cu, c->Hkv, N, &p, why, sizeof why);
                free(ref);
                test_tensor_free(tk);
                test_tensor_free(cu);
                test_tensor_free(qi);
                test_tensor_free(ki);
                EXPECT(same, "case %d variant %d %s: selection differs from the brute-force reference", ci, vi, f32 ? "f32" : "f64");
                EXPECT(props, "case %d variant %d: %s", ci, vi, why);
            }
}

/* The plan (backend.h msa_plan) from its definition: for every group and every key block of every
 * document, the queries whose selection holds that block, ascending; the rows' token ranges; zeros
 * in the unused tail. */
TEST(plan_matches_definition) {
    for (int ci = 0; ci < N_CASES; ci++) {
        const MsaCase *c = &cases[ci];
        const int N = case_tokens(c);
        MsaParams p = params(3, 3, 1, 1, 0.5, 1.0 / sqrt(c->Di));
        Tensor *qi = test_randn(DT_F32, SHAPE(N, c->Hkv, c->Di), 1.0, 3000 + ci);
        Tensor *ki = test_randn(DT_F32, SHAPE(N, c->Di), 1.0, 4000 + ci);
        Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
        Tensor *tk = run_indexer(qi, ki, cu, &p);
        const int64_t K = p.topk_blocks, P = msa_plan_width(N, K);
        Tensor *plan = test_tensor(DT_I32, SHAPE(c->Hkv, P));
        cpu_backend.msa_plan(plan, tk, cu, &p);
        int32_t *want = xcalloc((size_t)(c->Hkv * P), sizeof(int32_t));
        const int32_t *cs = cu->data, *sel = tk->data;
        for (int64_t g = 0; g < c->Hkv; g++) {
            int32_t *rp = want + g * P, *qs = rp + N + 1, *lo = qs + N * K, *hi = lo + N;
            int64_t r = 0, n = 0;
            for (int d = 0; d < c->ndocs; d++)
                for (int64_t b = 0; b * p.block_size < cs[d + 1] - cs[d]; b++, r++) {
                    lo[r] = cs[d] + (int32_t)(b * p.block_size);
                    hi[r] = lo[r] + p.block_size < cs[d + 1] ? lo[r] + p.block_size : cs[d + 1];
                    rp[r] = (int32_t)n;
                    for (int64_t t = cs[d]; t < cs[d + 1]; t++)
                        for (int64_t i = 0; i < K; i++)
                            if (sel[(g * N + t) * K + i] == b) qs[n++] = (int32_t)t;
                }
            for (int64_t rr = r; rr <= N; rr++) rp[rr] = (int32_t)n;
        }
        bool same = memcmp(want, plan->data, tensor_bytes(plan)) == 0;
        EXPECT(same, "case %d: plan differs from its definition", ci);
        /* the backward passes read the plan instead of rebuilding the map: identical gradients */
        Tensor *q = test_randn(DT_F32, SHAPE(N, c->Hq, c->D), 1.0, 5000 + ci);
        Tensor *k = test_randn(DT_F32, SHAPE(N, c->Hkv, c->D), 1.0, 5100 + ci);
        Tensor *v = test_randn(DT_F32, SHAPE(N, c->Hkv, c->D), 1.0, 5200 + ci);
        Tensor *dout = test_randn(DT_F32, SHAPE(N, c->Hq, c->D), 1.0, 5300 + ci);
        Tensor *out = test_tensor(DT_F32, SHAPE(N, c->Hq, c->D)), *lse = test_tensor(DT_F32, SHAPE(c->Hq, N));
        Tensor *il = test_tensor(DT_F32, SHAPE(c->Hkv, N)), *kl = test_tensor(DT_F32, SHAPE(1));
        cpu_backend.msa_attention_forward(out, lse, q, k, v, tk, NULL, cu, &p);
        cpu_backend.msa_kl_forward(kl, il, q, k, lse, qi, ki, tk, NULL, cu, &p);
        Tensor *g[2][3];
        for (int w = 0; w < 2; w++) {
            g[w][0] = test_tensor(DT_F32, SHAPE(N, c->Hkv, c->D));
            g[w][1] = test_tensor(DT_F32, SHAPE(N, c->Hkv, c->D));
            g[w][2] = test_tensor(DT_F32, SHAPE(N, c->Di));
            cpu_backend.msa_attention_backward(NULL, g[w][0], g[w][1], dout, q, k, v, out, lse, tk, w ? plan : NULL, cu, &p);
            cpu_backend.msa_kl_backward(NULL, g[w][2], q, k, lse, qi, ki, il, tk, w ? plan : NULL, cu, &p, NULL, 0.5f);
        }
        for (int i = 0; i < 3; i++) {
            EXPECT(memcmp(g[0][i]->data, g[1][i]->data, tensor_bytes(g[0][i])) == 0,
                   "case %d: %s with the plan differs from the rebuilt map", ci, i == 0 ? "dk" : i == 1 ? "dv" : "dki");
            test_tensor_free(g[0][i]);
            test_tensor_free(g[1][i]);
        }
        Tensor *tmp[] = {q, k, v, dout, out, lse, il, kl};
        for (int i = 0; i < 8; i++) test_tensor_free(tmp[i]);
        free(want);
        test_tensor_free(plan);
        test_tensor_free(tk);
        test_tensor_free(cu);
        test_tensor_free(qi);
        test_tensor_free(ki);
    }
}

/* Exactly equal block maxima (integer data, exact arithmetic): the lower block id wins, also when a
 * higher score arrives after the tie (pattern 1: an eviction must drop the later tied block); forced
 * blocks stay even when they score worst. */
TEST(indexer_ties_and_forced_blocks) {
    const int N = 12, Di = 2, B = 2; /* one document, 6 blocks, query 11 owns block 5 */
    /* group 0 (qi = (1, 0)) block maxima: pattern 0 [3, 5, 5, 3, 5, -9], pattern 1 [5, 5, 6, 2, 5, -9];
     * group 1 (qi = 0): every score 0, all tied */
    const double vals[2][12] = {{3, 1, 5, 2, 4, 5, 3, 0, 5, 5, -9, -10}, {5, 1, 0, 5, 6, 2, 2, 1, 5, 5, -9, -10}};
    struct {
        int K, init, local;
        int32_t want0[2][6], want1[6]; /* rows of query 11: group 0 per pattern, group 1 */
    } exp_rows[] = {
        {3, 0, 1, {{1, 2, 5}, {0, 2, 5}}, {0, 1, 5}},
        {2, 0, 1, {{1, 5}, {2, 5}}, {0, 5}},
        {4, 0, 1, {{1, 2, 4, 5}, {0, 1, 2, 5}}, {0, 1, 2, 5}},
        {3, 1, 1, {{0, 1, 5}, {0, 2, 5}}, {0, 1, 5}},          /* block 0 forced, then the best of 1..4 */
        {4, 1, 2, {{0, 1, 4, 5}, {0, 2, 4, 5}}, {0, 1, 4, 5}}, /* blocks 0, 4, 5 forced */
        {5, 2, 1, {{0, 1, 2, 4, 5}, {0, 1, 2, 4, 5}}, {0, 1, 2, 3, 5}},
    };
    Tensor *cu = test_cu_seqlens((int[]){12}, 1);
    for (int pat = 0; pat < 2; pat++) {
        Tensor *qi = test_tensor(DT_F64, SHAPE(N, 2, Di)), *ki = test_tensor(DT_F64, SHAPE(N, Di));
        for (int j = 0; j < N; j++) ((double *)ki->data)[j * Di] = vals[pat][j];
        for (int t = 0; t < N; t++) ((double *)qi->data)[(t * 2 + 0) * Di] = 1.0;
        for (int i = 0; i < (int)(sizeof exp_rows / sizeof exp_rows[0]); i++) {
            MsaParams p = params(B, exp_rows[i].K, exp_rows[i].init, exp_rows[i].local, 1.0, 0.5);
            Tensor *tk = run_indexer(qi, ki, cu, &p);
            int32_t r0[6], r1[6]; /* query 11's rows, kept past the tensor's release */
            memcpy(r0, (const int32_t *)tk->data + (0 * N + 11) * p.topk_blocks, sizeof(int32_t) * (size_t)p.topk_blocks);
            memcpy(r1, (const int32_t *)tk->data + (1 * N + 11) * p.topk_blocks, sizeof(int32_t) * (size_t)p.topk_blocks);
            bool ok0 = memcmp(r0, exp_rows[i].want0[pat], sizeof(int32_t) * (size_t)p.topk_blocks) == 0;
            bool ok1 = memcmp(r1, exp_rows[i].want1, sizeof(int32_t) * (size_t)p.topk_blocks) == 0;
            int32_t *ref = xmalloc(tensor_bytes(tk));
            ref_select(ref, qi, ki, cu, &p);
            bool same = memcmp(ref, tk->data, tensor_bytes(tk)) == 0;
            char why[160] = "";
            bool props = check_selection_props(tk->data, cu, 2, N, &p, why, sizeof why);
            free(ref);
            test_tensor_free(tk);
            EXPECT(ok0, "pattern %d variant %d: group 0 row {%d,%d,%d,...} (ties must go to the lower block)", pat, i,
                   r0[0], r0[1], r0[2]);
            EXPECT(ok1, "pattern %d variant %d: group 1 row {%d,%d,%d,...} (all tied: lowest ids)", pat, i, r1[0], r1[1], r1[2]);
            EXPECT(same, "pattern %d variant %d: differs from the brute-force reference", pat, i);
            EXPECT(props, "pattern %d variant %d: %s", pat, i, why);
        }
        test_tensor_free(qi);
        test_tensor_free(ki);
    }
    test_tensor_free(cu);
}

/* A block's score counts only visible tokens and tokens of the query's own document: a huge score
 * on a later token or in another document must not pull anything in. */
TEST(indexer_ignores_future_and_other_documents) {
    const int lens[2] = {9, 8}, N = 17, Di = 3;
    Tensor *cu = test_cu_seqlens(lens, 2);
    Tensor *qi = test_randn(DT_F64, SHAPE(N, 1, Di), 1.0, 31);
    Tensor *ki = test_randn(DT_F64, SHAPE(N, Di), 0.1, 32);
    MsaParams p = params(2, 2, 0, 1, 1.0, 1.0);
    for (int t = 0; t < N; t++)
        for (int d = 0; d < Di; d++) ((double *)qi->data)[t * Di + d] = 1.0;
    Tensor *tk0 = run_indexer(qi, ki, cu, &p);
    /* huge keys: token 3 (block 1 of doc 0) and token 12 (block 1 of doc 1) */
    for (int d = 0; d < Di; d++) {
        ((double *)ki->data)[3 * Di + d] = 100.0;
        ((double *)ki->data)[12 * Di + d] = 100.0;
    }
    Tensor *tk1 = run_indexer(qi, ki, cu, &p);
    const int32_t *a = tk0->data, *b = tk1->data;
    bool ok = true;
    for (int t = 0; t < N; t++) {
        const int32_t *ra = a + t * 2, *rb = b + t * 2;
        const bool sees = (t >= 3 && t < 9) || t >= 12;
        const int lb = t < 9 ? t / 2 : (t - 9) / 2;
        if (!sees) ok &= ra[0] == rb[0] && ra[1] == rb[1]; /* unchanged */
        else if (lb > 1) ok &= rb[0] == 1 && rb[1] == lb;  /* block 1 now wins */
    }
    test_tensor_free(tk0);
    test_tensor_free(tk1);
    test_tensor_free(cu);
    test_tensor_free(qi);
    test_tensor_free(ki);
    EXPECT(ok, "a key outside the query's visible range changed its selection, or a visible one did not");
}

/* ---- attention ---- */

typedef struct {
    Tensor *topk, *cu;
    MsaParams p;
} MsaAttnCtx;

static Tensor *f_msa_attention(Engine *e, Tensor **in, void *ctx) {
    MsaAttnCtx *c = ctx;
    return op_msa_attention(e, in[0], in[1], in[2], c->topk, NULL, c->cu, &c->p, NULL);
}

/* Sparse forward (out, lse) against the masked dense reference, for indexer selections and NULL. */
TEST(msa_attention_matches_masked_reference) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_CASES; ci++)
        for (int dense = 0; dense < 2; dense++) {
            const MsaCase *c = &cases[ci];
            const int N = case_tokens(c);
            MsaParams p = case_params(c);
            Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 100 + ci), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 110 + ci);
            Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 120 + ci);
            Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 130 + ci), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 140 + ci);
            Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
            Tensor *tk = dense ? NULL : run_indexer(qi, ki, cu, &p);
            double *ro = xmalloc(sizeof(double) * (size_t)q->numel), *rl = xmalloc(sizeof(double) * (size_t)(c->Hq * N));
            ref_attention(q, k, v, tk, cu, &p, ro, rl);
            engine_reset(eng);
            Tensor *lse = NULL;
            Tensor *out = op_msa_attention(eng, q, k, v, tk, NULL, cu, &p, &lse);
            bool lse_ok = lse->dtype == DT_F64 && lse->ndim == 2 && lse->shape[0] == c->Hq && lse->shape[1] == N;
            double eo = rel_err(out->data, ro, out->numel), el = rel_err(lse->data, rl, lse->numel);
            free(ro);
            free(rl);
            test_tensor_free(tk);
            test_tensor_free(cu);
            test_tensor_free(q);
            test_tensor_free(k);
            test_tensor_free(v);
            test_tensor_free(qi);
            test_tensor_free(ki);
            EXPECT(lse_ok, "lse must be f64 [Hq, N]");
            EXPECT(eo < 1e-12 && el < 1e-12, "case %d%s: out err %.3e, lse err %.3e", ci, dense ? " (NULL topk)" : "", eo, el);
        }
}

/* With a budget covering every block, sparse attention is dense causal attention: out, lse and the
 * gradients dq, dk, dv (seeded with the same random dout) equal the dense op's, for the indexer's
 * selection and for NULL topk. */
TEST(msa_attention_full_budget_equals_dense) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_CASES; ci++)
        for (int null_topk = 0; null_topk < 2; null_topk++) {
            const MsaCase *c = &cases[ci];
            const int N = case_tokens(c);
            MsaParams p = params(c->B, 64, c->init, c->local, 1.0 / sqrt(c->D), 0.3); /* >= every document's blocks */
            Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 200 + ci), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 210 + ci);
            Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 220 + ci);
            Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 230 + ci), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 240 + ci);
            Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
            Tensor *tk = null_topk ? NULL : run_indexer(qi, ki, cu, &p);
            Tensor *dout = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.0, 250 + ci);
            Tensor *grads[2][3];
            Tensor *outs[2], *lses[2];
            Tensor *in[3] = {q, k, v};
            for (int i = 0; i < 3; i++) test_requires_grad(in[i]);
            for (int run = 0; run < 2; run++) {
                for (int i = 0; i < 3; i++) zero_grad(in[i]);
                engine_reset(eng);
                Tensor *lse = NULL;
                Tensor *out = run == 0 ? op_msa_attention(eng, q, k, v, tk, NULL, cu, &p, &lse)
                                       : op_attention(eng, q, k, v, cu, p.scale, &lse);
                outs[run] = test_copy_as(out, DT_F64);
                lses[run] = test_copy_as(lse, DT_F64);
                engine_backward_from(eng, out, dout, 0);
                for (int i = 0; i < 3; i++) grads[run][i] = test_copy_as(in[i]->grad, DT_F64);
            }
            double eo = rel_err(outs[0]->data, outs[1]->data, outs[0]->numel);
            double el = rel_err(lses[0]->data, lses[1]->data, lses[0]->numel);
            double eg = 0, gn = 0;
            for (int i = 0; i < 3; i++) {
                eg = fmax(eg, rel_err(grads[0][i]->data, grads[1][i]->data, grads[0][i]->numel));
                gn += test_norm(grads[0][i]);
            }
            for (int run = 0; run < 2; run++) {
                test_tensor_free(outs[run]);
                test_tensor_free(lses[run]);
                for (int i = 0; i < 3; i++) test_tensor_free(grads[run][i]);
            }
            test_tensor_free(tk);
            test_tensor_free(cu);
            test_tensor_free(dout);
            for (int i = 0; i < 3; i++) test_tensor_free(in[i]);
            test_tensor_free(qi);
            test_tensor_free(ki);
            EXPECT(eo < 1e-12 && el < 1e-12, "case %d%s: out err %.3e, lse err %.3e vs dense", ci, null_topk ? " NULL" : "", eo, el);
            EXPECT(eg < 1e-12 && gn > 0, "case %d%s: gradients differ from dense by %.3e", ci, null_topk ? " NULL" : "", eg);
        }
}

/* Finite differences, selection fixed (topk computed once outside the checked function). */
TEST(grad_msa_attention_sparse) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_CASES; ci++) {
        const MsaCase *c = &cases[ci];
        const int N = case_tokens(c);
        Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 300 + ci), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 310 + ci);
        Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 320 + ci);
        Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 330 + ci), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 340 + ci);
        MsaAttnCtx ctx = {NULL, test_cu_seqlens(c->lens, c->ndocs), case_params(c)};
        ctx.topk = run_indexer(qi, ki, ctx.cu, &ctx.p);
        Tensor *in[3] = {q, k, v};
        for (int i = 0; i < 3; i++) test_requires_grad(in[i]);
        GradCheckResult r = gradcheck(eng, f_msa_attention, in, 3, &ctx, 0, 350 + ci);
        bool nz = test_norm(q->grad) > 0 && test_norm(k->grad) > 0 && test_norm(v->grad) > 0;
        test_tensor_free(ctx.topk);
        test_tensor_free(ctx.cu);
        for (int i = 0; i < 3; i++) test_tensor_free(in[i]);
        test_tensor_free(qi);
        test_tensor_free(ki);
        EXPECT(grad_ok(r, "msa attention"), "msa attention gradient, case %d", ci);
        EXPECT(nz, "msa attention: an input got an all-zero gradient, case %d", ci);
    }
}

/* Only one of q, k, v trainable: NULL gradient outputs are skipped, the others stay right. */
TEST(grad_msa_attention_partial_inputs) {
    Engine *eng = tc->fixture;
    const MsaCase *c = &cases[3];
    const int N = case_tokens(c);
    for (int which = 0; which < 3; which++) {
        Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 400), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 401);
        Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 402);
        Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 403), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 404);
        MsaAttnCtx ctx = {NULL, test_cu_seqlens(c->lens, c->ndocs), case_params(c)};
        ctx.topk = run_indexer(qi, ki, ctx.cu, &ctx.p);
        Tensor *in[3] = {q, k, v};
        test_requires_grad(in[which]);
        GradCheckResult r = gradcheck(eng, f_msa_attention, in, 3, &ctx, 0, 410 + which);
        test_tensor_free(ctx.topk);
        test_tensor_free(ctx.cu);
        for (int i = 0; i < 3; i++) test_tensor_free(in[i]);
        test_tensor_free(qi);
        test_tensor_free(ki);
        EXPECT(grad_ok(r, "msa attention partial"), "gradient with only input %d trainable", which);
    }
}

/* ---- KL ---- */

typedef struct {
    Tensor *q, *k, *lse, *topk, *cu;
    MsaParams p;
    float weight;
} MsaKlCtx;

static Tensor *f_msa_kl(Engine *e, Tensor **in, void *ctx) {
    MsaKlCtx *c = ctx;
    return op_msa_kl(e, c->q, c->k, c->lse, in[0], in[1], c->topk, NULL, c->cu, &c->p, c->weight, NULL);
}

/* The teacher normaliser the way a layer produces it: the sparse forward's lse for a selection,
 * the dense attention's lse for the warm-up (topk NULL). Persistent (the gradcheck resets the arena). */
static Tensor *teacher_lse(const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *topk, const Tensor *cu,
                           const MsaParams *p) {
    Tensor *out = test_tensor(q->dtype, q->ndim, q->shape);
    Tensor *lse = test_tensor(q->dtype == DT_F64 ? DT_F64 : DT_F32, SHAPE(q->shape[1], q->shape[0]));
    if (topk) cpu_backend.msa_attention_forward(out, lse, q, k, v, topk, NULL, cu, p);
    else cpu_backend.attention_forward(out, lse, q, k, v, cu, p->scale);
    test_tensor_free(out);
    return lse;
}

TEST(grad_msa_kl_index_branch) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_CASES; ci++)
        for (int dense = 0; dense < 2; dense++) {
            const MsaCase *c = &cases[ci];
            const int N = case_tokens(c);
            Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 500 + ci), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 510 + ci);
            Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 520 + ci);
            Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.5, 530 + ci), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 540 + ci);
            MsaKlCtx ctx = {q, k, NULL, NULL, test_cu_seqlens(c->lens, c->ndocs), case_params(c), 0.7f};
            if (!dense) ctx.topk = run_indexer(qi, ki, ctx.cu, &ctx.p);
            ctx.lse = teacher_lse(q, k, v, ctx.topk, ctx.cu, &ctx.p);
            test_requires_grad(qi);
            test_requires_grad(ki);
            Tensor *in[2] = {qi, ki};
            GradCheckResult r = gradcheck(eng, f_msa_kl, in, 2, &ctx, 0, 550 + ci);
            bool nz = test_norm(qi->grad) > 0 && test_norm(ki->grad) > 0;
            test_tensor_free(ctx.topk);
            test_tensor_free(ctx.cu);
            test_tensor_free(ctx.lse);
            test_tensor_free(q);
            test_tensor_free(k);
            test_tensor_free(v);
            test_tensor_free(qi);
            test_tensor_free(ki);
            EXPECT(grad_ok(r, "msa kl"), "KL gradient, case %d%s", ci, dense ? " (dense warm-up)" : "");
            EXPECT(nz, "KL: qi or ki got an all-zero gradient, case %d", ci);
        }
}

/* The teacher is detached: with q, k, v, qi, ki all trainable, the KL adds nothing to q, k, v (their
 * gradients from sum(out * R) + KL equal those from sum(out * R) alone, bit for bit, and backward
 * from the KL alone leaves them exactly zero), while qi and ki do get gradients. */
TEST(msa_kl_gives_no_gradient_to_teacher) {
    Engine *eng = tc->fixture;
    const MsaCase *c = &cases[3];
    const int N = case_tokens(c);
    Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 600), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 601);
    Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 602);
    Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 603), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 604);
    Tensor *R = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.0, 605);
    Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
    MsaParams p = case_params(c);
    Tensor *all[5] = {q, k, v, qi, ki};
    for (int i = 0; i < 5; i++) test_requires_grad(all[i]);
    Tensor *g_main[3] = {0};
    bool zero_from_kl = true, idx_nonzero = false, same = true;
    for (int mode = 0; mode < 3; mode++) { /* 0: out only, 1: out + KL, 2: KL only */
        for (int i = 0; i < 5; i++) zero_grad(all[i]);
        engine_reset(eng);
        const MsaSettings s = {.params = p, .kl_weight = 2.5f};
        MsaAttention a = msa_attend(eng, &s, q, k, v, qi, ki, cu, false, NULL, NULL);
        Tensor *out = a.out, *kl = a.loss;
        if (mode != 2) eng->be->axpy(engine_grad(eng, out), R, 1.0f);
        if (mode != 0) {
            Tensor *one = engine_empty(eng, DT_F64, SHAPE(1));
            ((double *)one->data)[0] = 1.0;
            eng->be->axpy(engine_grad(eng, kl), one, 1.0f);
        }
        engine_backward_tape(eng, 0);
        if (mode == 0)
            for (int i = 0; i < 3; i++) g_main[i] = test_copy_as(all[i]->grad, DT_F64);
        if (mode == 1)
            for (int i = 0; i < 3; i++) same &= memcmp(g_main[i]->data, all[i]->grad->data, tensor_bytes(g_main[i])) == 0;
        if (mode == 2) {
            for (int i = 0; i < 3; i++) zero_from_kl &= test_norm(all[i]->grad) == 0;
            idx_nonzero = test_norm(qi->grad) > 0 && test_norm(ki->grad) > 0;
        }
    }
    for (int i = 0; i < 3; i++) test_tensor_free(g_main[i]);
    for (int i = 0; i < 5; i++) test_tensor_free(all[i]);
    test_tensor_free(R);
    test_tensor_free(cu);
    EXPECT(same, "adding the KL changed the gradients of q, k or v");
    EXPECT(zero_from_kl, "backward from the KL alone reached q, k or v");
    EXPECT(idx_nonzero, "the KL gave qi or ki no gradient");
}

/* The KL value and the student's log-normaliser against the brute-force reference (which builds
 * each head's distribution with its own normaliser rather than the saved lse); KL >= 0; the op's
 * output is weight * KL. */
TEST(msa_kl_matches_reference) {
    Engine *eng = tc->fixture;
    for (int ci = 0; ci < N_CASES; ci++)
        for (int dense = 0; dense < 2; dense++) {
            const MsaCase *c = &cases[ci];
            const int N = case_tokens(c);
            MsaParams p = case_params(c);
            Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 700 + ci), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 710 + ci);
            Tensor *v = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 720 + ci);
            Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.5, 730 + ci), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 740 + ci);
            Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
            Tensor *tk = dense ? NULL : run_indexer(qi, ki, cu, &p);
            Tensor *lse = teacher_lse(q, k, v, tk, cu, &p);
            double *ref_il = xmalloc(sizeof(double) * (size_t)(c->Hkv * N));
            double ref = ref_kl(q, k, qi, ki, tk, cu, &p, ref_il);
            Tensor *kl = test_tensor(DT_F64, SHAPE(1)), *il = test_tensor(DT_F64, SHAPE(c->Hkv, N));
            cpu_backend.msa_kl_forward(kl, il, q, k, lse, qi, ki, tk, NULL, cu, &p);
            double got = tensor_get(kl, 0), eil = rel_err(il->data, ref_il, il->numel);
            engine_reset(eng);
            MsaKlForward kf = {0};
            Tensor *w = op_msa_kl(eng, q, k, lse, qi, ki, tk, NULL, cu, &p, 0.25f, &kf);
            double wv = tensor_item(eng, w), uv = tensor_item(eng, kf.kl);
            free(ref_il);
            test_tensor_free(kl);
            test_tensor_free(il);
            test_tensor_free(tk);
            test_tensor_free(lse);
            test_tensor_free(cu);
            test_tensor_free(q);
            test_tensor_free(k);
            test_tensor_free(v);
            test_tensor_free(qi);
            test_tensor_free(ki);
            EXPECT(ref > 1e-3, "case %d: reference KL %.3e too small to test anything", ci, ref);
            EXPECT(got >= 0 && fabs(got - ref) <= 1e-12 * fmax(1.0, ref), "case %d%s: KL %.15g vs reference %.15g", ci,
                   dense ? " dense" : "", got, ref);
            EXPECT(eil < 1e-12, "case %d: idx_lse differs from the reference by %.3e", ci, eil);
            EXPECT(fabs(wv - 0.25 * got) <= 1e-15 * fmax(1.0, got), "case %d: op output %.15g is not weight * KL (%.15g)", ci, wv, 0.25 * got);
            EXPECT(uv == got, "case %d: the unweighted KL the op hands out is %.15g, the kernel's %.15g", ci, uv, got);
        }
}

/* Student == teacher: one KV head (G = 1, Hq = Hkv = 1), D == Di, index_scale == scale, qi = q,
 * ki = k. Then KL == 0 (to rounding) and its gradient vanishes, sparse and dense. */
TEST(msa_kl_zero_when_student_equals_teacher) {
    Engine *eng = tc->fixture;
    const int lens[3] = {9, 4, 12}, N = 25, D = 6;
    Tensor *cu = test_cu_seqlens(lens, 3);
    Tensor *q = test_randn(DT_F64, SHAPE(N, 1, D), 1.5, 800), *k = test_randn(DT_F64, SHAPE(N, 1, D), 1.0, 801);
    Tensor *v = test_randn(DT_F64, SHAPE(N, 1, D), 1.0, 802);
    Tensor *ki = test_tensor(DT_F64, SHAPE(N, D));
    memcpy(ki->data, k->data, tensor_bytes(ki));
    Tensor *qi = test_copy_as(q, DT_F64);
    test_requires_grad(qi);
    test_requires_grad(ki);
    MsaParams p = params(2, 3, 1, 1, 0.4, 0.4);
    for (int dense = 0; dense < 2; dense++) {
        Tensor *tk = dense ? NULL : run_indexer(qi, ki, cu, &p);
        Tensor *lse = teacher_lse(q, k, v, tk, cu, &p);
        zero_grad(qi);
        zero_grad(ki);
        engine_reset(eng);
        Tensor *kl = op_msa_kl(eng, q, k, lse, qi, ki, tk, NULL, cu, &p, 1.0f, NULL);
        double val = tensor_item(eng, kl);
        engine_backward(eng, kl);
        double gq = test_norm(qi->grad), gk = test_norm(ki->grad);
        test_tensor_free(tk);
        test_tensor_free(lse);
        EXPECT(fabs(val) < 1e-12, "%s: KL %.3e, expected 0", dense ? "dense" : "sparse", val);
        EXPECT(gq < 1e-12 && gk < 1e-12, "%s: gradient norms %.3e %.3e, expected 0", dense ? "dense" : "sparse", gq, gk);
    }
    test_tensor_free(cu);
    test_tensor_free(q);
    test_tensor_free(k);
    test_tensor_free(v);
    test_tensor_free(qi);
    test_tensor_free(ki);
}

/* ---- recall ---- */

TEST(msa_recall_matches_reference) {
    for (int ci = 0; ci < N_CASES; ci++) {
        const MsaCase *c = &cases[ci];
        const int N = case_tokens(c);
        MsaParams p = case_params(c);
        Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 2.0, 900 + ci), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 910 + ci);
        Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 930 + ci), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 940 + ci);
        Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
        Tensor *tk = run_indexer(qi, ki, cu, &p);
        MsaParams pfull = p;
        pfull.topk_blocks = 64;
        Tensor *tk_full = run_indexer(qi, ki, cu, &pfull);
        double r1 = cpu_backend.msa_recall(q, k, tk, cu, &p, 1), r3 = cpu_backend.msa_recall(q, k, tk, cu, &p, 3);
        double ref1 = ref_recall(q, k, tk, cu, &p, 1), ref3 = ref_recall(q, k, tk, cu, &p, 3);
        double full = cpu_backend.msa_recall(q, k, tk_full, cu, &pfull, 2), none = cpu_backend.msa_recall(q, k, NULL, cu, &p, 1);
        test_tensor_free(tk);
        test_tensor_free(tk_full);
        test_tensor_free(cu);
        test_tensor_free(q);
        test_tensor_free(k);
        test_tensor_free(qi);
        test_tensor_free(ki);
        EXPECT(r1 >= 0 && r1 <= 1 && r3 >= 0 && r3 <= 1, "case %d: recall out of [0, 1]: %g %g", ci, r1, r3);
        EXPECT(fabs(r1 - ref1) < 1e-12 && fabs(r3 - ref3) < 1e-12, "case %d: recall %.15g / %.15g vs reference %.15g / %.15g", ci, r1, r3, ref1, ref3);
        EXPECT(r1 < 1 - 1e-6, "case %d: a sparse selection should miss some mass (recall %.15g)", ci, r1);
        EXPECT(fabs(full - 1) < 1e-12 && fabs(none - 1) < 1e-12, "case %d: full selection recall %.15g, NULL %.15g", ci, full, none);
    }
}

/* msa.recall_samples caps the recall's sample: the stride is max(recall_stride, ceil(N / recall_samples)) of a
 * forward's N tokens, so the layer's recall equals the kernel's at that stride */
TEST(msa_recall_samples_cap_the_stride) {
    Engine *eng = tc->fixture;
    const MsaSettings fixed = {.recall_stride = 4}, capped = {.recall_stride = 4, .recall_samples = 100};
    EXPECT(msa_recall_stride(&fixed, 100000) == 4, "no cap: stride %d", msa_recall_stride(&fixed, 100000));
    EXPECT(msa_recall_stride(&capped, 400) == 4 && msa_recall_stride(&capped, 401) == 5 &&
               msa_recall_stride(&capped, 1000) == 10 && msa_recall_stride(&capped, 1001) == 11,
           "cap 100: strides %d %d %d %d", msa_recall_stride(&capped, 400), msa_recall_stride(&capped, 401),
           msa_recall_stride(&capped, 1000), msa_recall_stride(&capped, 1001));
    const MsaCase *c = &cases[N_CASES - 1];
    const int N = case_tokens(c);
    MsaParams p = case_params(c);
    Tensor *q = test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 2.0, 960), *k = test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 961);
    Tensor *qi = test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.0, 962), *ki = test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 963);
    Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
    Tensor *tk = run_indexer(qi, ki, cu, &p);
    const int samples = N / 3; /* a stride of 4 from the cap: the case's 1-stride would sample every token */
    MsaSettings s = {.params = p, .recall_stride = 1, .recall_samples = samples};
    const int stride = msa_recall_stride(&s, N);
    engine_reset(eng);
    const double layer = msa_recall(eng, &s, q, k, tk, qi, ki, cu);
    const double kernel = cpu_backend.msa_recall(q, k, tk, cu, &p, stride), every = cpu_backend.msa_recall(q, k, tk, cu, &p, 1);
    const double ref = ref_recall(q, k, tk, cu, &p, stride);
    EXPECT(stride == (N + samples - 1) / samples && stride > 1, "N %d, %d samples: stride %d", N, samples, stride);
    EXPECT(layer == kernel && fabs(layer - ref) < 1e-12, "capped recall %.15g, kernel at stride %d %.15g, reference %.15g",
           layer, stride, kernel, ref);
    EXPECT(layer != every, "the cap changed nothing: %.15g at stride %d and at 1", layer, stride);
    test_tensor_free(tk);
    test_tensor_free(cu);
    test_tensor_free(q);
    test_tensor_free(k);
    test_tensor_free(qi);
    test_tensor_free(ki);
}

/* ---- the hand-worked example (msa_spec.md c.2, from V-KL §1.2) ----
 * N = 8, B = 2, H_q = 4, H_kv = 2. Query 7, group 0 (heads 0, 1): given per-head teacher rows and
 * student scores, dense-support KL = 0.0564 and, over blocks {1, 2}, sparse KL = 0.0600; captured
 * teacher mass of blocks {1, 2} = 0.695. Realised with one-hot keys (k_j = e_j, ki_j = e_j),
 * scale = index_scale = 1, q_h[7] = log P_h, qi[7, 0] = S_idx; every other (query, group) has
 * q = qi = 0, so its teacher equals its student and adds 0 to the mean. The example picks its two
 * blocks by plain top-2 ({1, 2}); our rule forces the query's own block, so the indexer gives {2, 3}. */
TEST(msa_hand_example) {
    Engine *eng = tc->fixture;
    const int N = 8, Hq = 4, Hkv = 2, D = 8;
    const double P0[8] = {0.02, 0.03, 0.10, 0.05, 0.30, 0.20, 0.15, 0.15};
    const double P1[8] = {0.04, 0.02, 0.04, 0.02, 0.40, 0.28, 0.10, 0.10};
    const double Sidx[8] = {-1.2, -0.8, 1.4, -0.3, 2.1, 1.5, 0.9, 1.1};
    Tensor *cu = test_cu_seqlens((int[]){8}, 1);
    Tensor *q = test_tensor(DT_F64, SHAPE(N, Hq, D)), *k = test_tensor(DT_F64, SHAPE(N, Hkv, D));
    Tensor *v = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1);
    Tensor *qi = test_tensor(DT_F64, SHAPE(N, Hkv, D)), *ki = test_tensor(DT_F64, SHAPE(N, D));
    for (int j = 0; j < N; j++) {
        for (int g = 0; g < Hkv; g++) ((double *)k->data)[(j * Hkv + g) * D + j] = 1.0;
        ((double *)ki->data)[j * D + j] = 1.0;
    }
    for (int j = 0; j < N; j++) {
        ((double *)q->data)[(7 * Hq + 0) * D + j] = log(P0[j]);
        ((double *)q->data)[(7 * Hq + 1) * D + j] = log(P1[j]);
        ((double *)qi->data)[(7 * Hkv + 0) * D + j] = Sidx[j];
    }
    MsaParams p = params(2, 2, 0, 1, 1.0, 1.0);
    /* selection by our rule: own block 3 forced, then the best block score of 0..2: block 2 (2.1) */
    Tensor *tk = run_indexer(qi, ki, cu, &p);
    const int32_t *row = (const int32_t *)tk->data + 7 * 2;
    EXPECT(row[0] == 2 && row[1] == 3, "query 7 group 0 selects {%d, %d}, expected {2, 3}", row[0], row[1]);
    /* the example's selection {1, 2} for (query 7, group 0) */
    ((int32_t *)tk->data)[7 * 2 + 0] = 1;
    ((int32_t *)tk->data)[7 * 2 + 1] = 2;
    Tensor *kl = test_tensor(DT_F64, SHAPE(1)), *il = test_tensor(DT_F64, SHAPE(Hkv, N));
    double kls[2];
    for (int sparse = 0; sparse < 2; sparse++) {
        Tensor *sel = sparse ? tk : NULL;
        Tensor *lse = teacher_lse(q, k, v, sel, cu, &p);
        cpu_backend.msa_kl_forward(kl, il, q, k, lse, qi, ki, sel, NULL, cu, &p);
        kls[sparse] = tensor_get(kl, 0) * N * Hkv; /* only (7, 0) contributes */
        test_tensor_free(lse);
    }
    /* the gradient sign: dKL/dS_idx = student - teacher, read off dqi[7, 0] (one-hot keys) with
     * weight 1 and upstream 1 (coeff = 1 / (N Hkv), so scale by N Hkv) */
    test_requires_grad(qi);
    test_requires_grad(ki);
    engine_reset(eng);
    Tensor *lse = NULL;
    op_msa_attention(eng, q, k, v, NULL, NULL, cu, &p, &lse);
    engine_backward(eng, op_msa_kl(eng, q, k, lse, qi, ki, NULL, NULL, cu, &p, 1.0f, NULL));
    double zs = 0, gerr = 0;
    for (int j = 0; j < N; j++) zs += exp(Sidx[j]);
    for (int j = 0; j < N; j++) {
        double want = exp(Sidx[j]) / zs - 0.5 * (P0[j] + P1[j]);
        gerr = fmax(gerr, fabs(((double *)qi->grad->data)[(7 * Hkv + 0) * D + j] * N * Hkv - want));
    }
    double rec = cpu_backend.msa_recall(q, k, tk, cu, &p, 7);
    test_tensor_free(kl);
    test_tensor_free(il);
    test_tensor_free(tk);
    test_tensor_free(cu);
    test_tensor_free(q);
    test_tensor_free(k);
    test_tensor_free(v);
    test_tensor_free(qi);
    test_tensor_free(ki);
    EXPECT(fabs(kls[0] - 0.0564) < 5e-4, "dense-support KL %.5f, the example says 0.0564", kls[0]);
    EXPECT(fabs(kls[1] - 0.0600) < 5e-4, "sparse-support KL %.5f, the example says 0.0600", kls[1]);
    EXPECT(gerr < 1e-12, "dKL/dS_idx differs from student - teacher by %.3e", gerr);
    /* sampled queries 0 and 7: (0, g) see only block 0 (recall 1); (7, 0) captures 0.695;
     * (7, 1) is uniform over 8 tokens with blocks {2, 3} selected by the tie rule: 0.5 */
    EXPECT(fabs(rec - (1 + 1 + 0.695 + 0.5) / 4) < 1e-12, "recall %.15g, expected %.15g", rec, (1 + 1 + 0.695 + 0.5) / 4);
}

/* ---- the sparse phase: idx_lse from the indexer, the KL in the attention backward ---- */

/* The indexer's idx_lse is the KL forward's student normaliser, bit for bit (f64 and f32), and the
 * brute-force reference's; the plan it writes when asked is msa_plan's of its selection. */
TEST(indexer_idx_lse_is_the_kl_forwards) {
    for (int ci = 0; ci < N_CASES; ci++)
        for (int prec = 0; prec < 2; prec++) {
            const MsaCase *c = &cases[ci];
            const int N = case_tokens(c);
            const DType dt = prec ? DT_F64 : DT_F32;
            MsaParams p = case_params(c);
            Tensor *q = test_randn(dt, SHAPE(N, c->Hq, c->D), 1.5, 1200 + ci), *k = test_randn(dt, SHAPE(N, c->Hkv, c->D), 1.0, 1210 + ci);
            Tensor *v = test_randn(dt, SHAPE(N, c->Hkv, c->D), 1.0, 1220 + ci);
            Tensor *qi = test_randn(dt, SHAPE(N, c->Hkv, c->Di), 1.5, 1230 + ci), *ki = test_randn(dt, SHAPE(N, c->Di), 1.0, 1240 + ci);
            Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
            Tensor *tk = test_tensor(DT_I32, SHAPE(c->Hkv, N, c->K)), *il = test_tensor(dt, SHAPE(c->Hkv, N));
            Tensor *plan = test_tensor(DT_I32, SHAPE(c->Hkv, msa_plan_width(N, c->K)));
            Tensor *plan0 = test_tensor(DT_I32, SHAPE(c->Hkv, msa_plan_width(N, c->K)));
            memset(plan->data, 0xa5, tensor_bytes(plan)); /* every element must be written */
            cpu_backend.msa_indexer(tk, il, plan, qi, ki, cu, &p);
            cpu_backend.msa_plan(plan0, tk, cu, &p);
            const bool same_plan = memcmp(plan->data, plan0->data, tensor_bytes(plan)) == 0;
            Tensor *tk0 = run_indexer(qi, ki, cu, &p);
            Tensor *lse = teacher_lse(q, k, v, tk, cu, &p);
            Tensor *kl = test_tensor(dt, SHAPE(1)), *il_kl = test_tensor(dt, SHAPE(c->Hkv, N));
            cpu_backend.msa_kl_forward(kl, il_kl, q, k, lse, qi, ki, tk, NULL, cu, &p);
            Tensor *q64 = test_copy_as(q, DT_F64), *k64 = test_copy_as(k, DT_F64), *qi64 = test_copy_as(qi, DT_F64),
                   *ki64 = test_copy_as(ki, DT_F64);
            double *ref_il = xmalloc(sizeof(double) * (size_t)(c->Hkv * N));
            ref_kl(q64, k64, qi64, ki64, tk, cu, &p, ref_il);
            Tensor *il64 = test_copy_as(il, DT_F64);
            const double e = rel_err(il64->data, ref_il, il64->numel);
            const bool same_sel = memcmp(tk->data, tk0->data, tensor_bytes(tk)) == 0;
            const bool same = memcmp(il->data, il_kl->data, tensor_bytes(il)) == 0;
            free(ref_il);
            Tensor *all[] = {q, k, v, qi, ki, cu, tk, il, tk0, lse, kl, il_kl, q64, k64, qi64, ki64, il64, plan, plan0};
            for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) test_tensor_free(all[i]);
            EXPECT(same_plan, "case %d %s: the indexer's plan is not msa_plan's", ci, dtype_name(dt));
            EXPECT(same_sel, "case %d %s: asking for idx_lse changed the selection", ci, dtype_name(dt));
            EXPECT(same, "case %d %s: the indexer's idx_lse differs from the KL forward's", ci, dtype_name(dt));
            EXPECT(e < (prec ? 1e-12 : 1e-6), "case %d %s: idx_lse differs from the reference by %.3e", ci, dtype_name(dt), e);
        }
}

/* The CPU's msa_attention_kl_backward is the separate kernels, bit for bit: the attention backward, the KL
 * backward with the coefficient the KL op used (kl_weight * upstream gradient / (N * Hidx)) and the KL
 * forward's value; every subset of gradients, an upstream gradient or none, f32 and f64. */
TEST(fused_backward_equals_the_separate_kernels) {
    const int picks[2] = {1, 3};
    for (int pi = 0; pi < 2; pi++)
        for (int prec = 0; prec < 2; prec++)
            for (int variant = 0; variant < 3; variant++) {
                const MsaCase *c = &cases[picks[pi]];
                const int N = case_tokens(c);
                const DType dt = prec ? DT_F64 : DT_F32;
                MsaParams p = case_params(c);
                const uint64_t sd = 1300 + 10 * (uint64_t)pi;
                Tensor *q = test_randn(dt, SHAPE(N, c->Hq, c->D), 1.5, sd), *k = test_randn(dt, SHAPE(N, c->Hkv, c->D), 1.0, sd + 1);
                Tensor *v = test_randn(dt, SHAPE(N, c->Hkv, c->D), 1.0, sd + 2), *dout = test_randn(dt, SHAPE(N, c->Hq, c->D), 1.0, sd + 3);
                Tensor *qi = test_randn(dt, SHAPE(N, c->Hkv, c->Di), 1.5, sd + 4), *ki = test_randn(dt, SHAPE(N, c->Di), 1.0, sd + 5);
                Tensor *cu = test_cu_seqlens(c->lens, c->ndocs);
                Tensor *tk = test_tensor(DT_I32, SHAPE(c->Hkv, N, c->K)), *il = test_tensor(dt, SHAPE(c->Hkv, N));
                cpu_backend.msa_indexer(tk, il, NULL, qi, ki, cu, &p);
                Tensor *out = test_tensor(dt, SHAPE(N, c->Hq, c->D)), *lse = test_tensor(dt, SHAPE(c->Hq, N));
                cpu_backend.msa_attention_forward(out, lse, q, k, v, tk, NULL, cu, &p);
                Tensor *kg = test_tensor(dt, SHAPE(1));
                tensor_set(kg, 0, 0.37);
                const bool with_grad = variant != 1;
                const float w = 2.5f;
                /* variant 0: everything; 1: no upstream gradient; 2: the KL's alone (a frozen backbone) */
                const bool main = variant != 2;
                Tensor *r[2][6]; /* dq dk dv dqi dki kl: [0] fused, [1] separate */
                for (int f = 0; f < 2; f++) {
                    r[f][0] = main ? test_tensor(dt, SHAPE(N, c->Hq, c->D)) : NULL;
                    r[f][1] = main ? test_tensor(dt, SHAPE(N, c->Hkv, c->D)) : NULL;
                    r[f][2] = main ? test_tensor(dt, SHAPE(N, c->Hkv, c->D)) : NULL;
                    r[f][3] = test_tensor(dt, SHAPE(N, c->Hkv, c->Di));
                    r[f][4] = test_tensor(dt, SHAPE(N, c->Di));
                    r[f][5] = test_tensor(dt, SHAPE(1));
                }
                cpu_backend.msa_attention_kl_backward(r[0][0], r[0][1], r[0][2], r[0][3], r[0][4], r[0][5], main ? dout : NULL, q,
                                                      k, v, out, lse, qi, ki, il, tk, NULL, cu, &p, with_grad ? kg : NULL, w);
                if (main) cpu_backend.msa_attention_backward(r[1][0], r[1][1], r[1][2], dout, q, k, v, out, lse, tk, NULL, cu, &p);
                cpu_backend.msa_kl_backward(r[1][3], r[1][4], q, k, lse, qi, ki, il, tk, NULL, cu, &p, with_grad ? kg : NULL, w);
                Tensor *il2 = test_tensor(dt, SHAPE(c->Hkv, N));
                cpu_backend.msa_kl_forward(r[1][5], il2, q, k, lse, qi, ki, tk, NULL, cu, &p);
                bool same = true;
                int first = -1;
                for (int i = 0; i < 6; i++)
                    if (r[0][i] && memcmp(r[0][i]->data, r[1][i]->data, tensor_bytes(r[0][i])) != 0) {
                        same = false;
                        if (first < 0) first = i;
                    }
                const bool moved = test_norm(r[0][3]) > 0 && test_norm(r[0][4]) > 0 && tensor_get(r[0][5], 0) > 0;
                for (int f = 0; f < 2; f++)
                    for (int i = 0; i < 6; i++) test_tensor_free(r[f][i]);
                Tensor *all[] = {q, k, v, dout, qi, ki, cu, tk, il, out, lse, kg, il2};
                for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) test_tensor_free(all[i]);
                EXPECT(same, "case %d %s variant %d: result %d of the fused entry differs from the separate kernels'",
                       picks[pi], dtype_name(dt), variant, first);
                EXPECT(moved, "case %d %s variant %d: no KL gradient or value", picks[pi], dtype_name(dt), variant);
            }
}

/* Finite differences through the MSA chain as a layer runs it (msa_attend: selection, plan, attention,
 * KL) of L = cross-entropy(out) + kl_weight * mean KL: the analytic gradients come from the recording
 * forward and its one backward (attention and KL together, no KL forward), the numeric ones from forwards
 * without gradients (where the KL forward gives the loss). The teacher is detached, so the KL's value
 * moves with q and k while its gradient does not: q, k, v are checked with kl_weight 0 (the attention's
 * gradients through the joint node), qi and ki with kl_weight 0.7 (the KL's). */
typedef struct {
    Tensor *cu, *targets, *x[5];
    MsaSettings s;
    bool deferred, forward_kl;
} AttendCtx;

static Tensor *f_msa_attend(Engine *e, Tensor **in, void *ctx) {
    (void)in; /* the checked inputs are among c->x */
    AttendCtx *c = ctx;
    Tensor **x = c->x;
    MsaAttention a = msa_attend(e, &c->s, x[0], x[1], x[2], x[3], x[4], c->cu, false, NULL, NULL);
    c->deferred |= a.deferred;
    c->forward_kl |= !a.deferred;
    const int64_t rows = x[0]->shape[0] * x[0]->shape[1];
    Tensor *ce = op_cross_entropy(e, engine_view(e, a.out, SHAPE(rows, x[0]->shape[2])), c->targets, -1);
    return op_add(e, ce, a.loss);
}

TEST(grad_msa_attend_kl_in_the_backward) {
    Engine *eng = tc->fixture;
    for (int ci = 1; ci < N_CASES; ci++) {
        const MsaCase *c = &cases[ci];
        const int N = case_tokens(c);
        AttendCtx ctx = {test_cu_seqlens(c->lens, c->ndocs), test_tensor(DT_I32, SHAPE((int64_t)N * c->Hq)),
                         {test_randn(DT_F64, SHAPE(N, c->Hq, c->D), 1.5, 1400 + ci), test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 1410 + ci),
                          test_randn(DT_F64, SHAPE(N, c->Hkv, c->D), 1.0, 1420 + ci),
                          test_randn(DT_F64, SHAPE(N, c->Hkv, c->Di), 1.5, 1430 + ci), test_randn(DT_F64, SHAPE(N, c->Di), 1.0, 1440 + ci)},
                         {.params = case_params(c)}, false, false};
        for (int64_t i = 0; i < ctx.targets->numel; i++) ((int32_t *)ctx.targets->data)[i] = (int32_t)((i * 7 + 3) % c->D);
        for (int i = 0; i < 5; i++) test_requires_grad(ctx.x[i]);
        ctx.s.kl_weight = 0.0f;
        GradCheckResult rm = gradcheck(eng, f_msa_attend, ctx.x, 3, &ctx, 24, 1450 + ci);
        ctx.s.kl_weight = 0.7f;
        GradCheckResult ri = gradcheck(eng, f_msa_attend, ctx.x + 3, 2, &ctx, 24, 1460 + ci);
        bool nz = true;
        for (int i = 0; i < 5; i++) nz &= test_norm(ctx.x[i]->grad) > 0;
        for (int i = 0; i < 5; i++) test_tensor_free(ctx.x[i]);
        test_tensor_free(ctx.cu);
        test_tensor_free(ctx.targets);
        EXPECT(grad_ok(rm, "msa_attend q, k, v"), "case %d: gradient of cross-entropy(out) through msa_attend", ci);
        EXPECT(grad_ok(ri, "msa_attend qi, ki"), "case %d: gradient of cross-entropy(out) + KL through msa_attend", ci);
        EXPECT(nz, "case %d: an input got an all-zero gradient", ci);
        EXPECT(ctx.deferred && ctx.forward_kl, "case %d: the recording forward deferred the KL: %d, the others ran it: %d", ci,
               ctx.deferred, ctx.forward_kl);
    }
}

/* ---- precision and determinism ---- */

/* f32 kernels against f64 on the same values (same selection), and bit-identical results across
 * repeated runs and thread counts (1 thread vs the default team). Sizes large enough to thread. */
TEST(msa_f32_matches_f64_and_deterministic) {
    const int lens[3] = {300, 77, 223}, N = 600, Hq = 4, Hkv = 2, D = 16, Di = 16;
    Tensor *cu = test_cu_seqlens(lens, 3);
    MsaParams p = params(16, 4, 1, 1, 0.25, 0.25);
    Tensor *q64 = test_randn(DT_F64, SHAPE(N, Hq, D), 1.0, 1100), *k64 = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1101);
    Tensor *v64 = test_randn(DT_F64, SHAPE(N, Hkv, D), 1.0, 1102), *do64 = test_randn(DT_F64, SHAPE(N, Hq, D), 1.0, 1103);
    Tensor *qi64 = test_randn(DT_F64, SHAPE(N, Hkv, Di), 1.0, 1104), *ki64 = test_randn(DT_F64, SHAPE(N, Di), 1.0, 1105);
    /* round the inputs to f32 first so that both precisions see the same values */
    Tensor *in64[6] = {q64, k64, v64, do64, qi64, ki64}, *in32[6];
    for (int i = 0; i < 6; i++) {
        in32[i] = test_copy_as(in64[i], DT_F32);
        test_tensor_free(in64[i]);
        in64[i] = test_copy_as(in32[i], DT_F64);
    }
    /* results[prec][run]: out, lse, dq, dk, dv, kl, idx_lse, dqi, dki */
    enum { R_OUT, R_LSE, R_DQ, R_DK, R_DV, R_KL, R_IL, R_DQI, R_DKI, R_N };
    Tensor *res[2][3][R_N];
    Tensor *tks[2][3];
    const int max_threads = omp_get_max_threads();
    for (int prec = 0; prec < 2; prec++)
        for (int run = 0; run < 3; run++) {
            Tensor **x = prec ? in64 : in32;
            const DType dt = prec ? DT_F64 : DT_F32;
            omp_set_num_threads(run == 2 ? 1 : max_threads);
            Tensor **r = res[prec][run];
            Tensor *tk = run_indexer(x[4], x[5], cu, &p);
            r[R_OUT] = test_tensor(dt, SHAPE(N, Hq, D));
            r[R_LSE] = test_tensor(dt, SHAPE(Hq, N));
            r[R_DQ] = test_tensor(dt, SHAPE(N, Hq, D));
            r[R_DK] = test_tensor(dt, SHAPE(N, Hkv, D));
            r[R_DV] = test_tensor(dt, SHAPE(N, Hkv, D));
            r[R_KL] = test_tensor(dt, SHAPE(1));
            r[R_IL] = test_tensor(dt, SHAPE(Hkv, N));
            r[R_DQI] = test_tensor(dt, SHAPE(N, Hkv, Di));
            r[R_DKI] = test_tensor(dt, SHAPE(N, Di));
            cpu_backend.msa_attention_forward(r[R_OUT], r[R_LSE], x[0], x[1], x[2], tk, NULL, cu, &p);
            cpu_backend.msa_attention_backward(r[R_DQ], r[R_DK], r[R_DV], x[3], x[0], x[1], x[2], r[R_OUT], r[R_LSE], tk, NULL, cu, &p);
            cpu_backend.msa_kl_forward(r[R_KL], r[R_IL], x[0], x[1], r[R_LSE], x[4], x[5], tk, NULL, cu, &p);
            cpu_backend.msa_kl_backward(r[R_DQI], r[R_DKI], x[0], x[1], r[R_LSE], x[4], x[5], r[R_IL], tk, NULL, cu, &p, NULL, 0.01f);
            tks[prec][run] = tk;
        }
    omp_set_num_threads(max_threads);
    bool det = true, sel_same = true;
    double worst = 0;
    int worst_i = -1;
    for (int prec = 0; prec < 2; prec++)
        for (int run = 1; run < 3; run++) {
            sel_same &= memcmp(tks[prec][0]->data, tks[prec][run]->data, tensor_bytes(tks[prec][0])) == 0;
            for (int i = 0; i < R_N; i++)
                det &= memcmp(res[prec][0][i]->data, res[prec][run][i]->data, tensor_bytes(res[prec][0][i])) == 0;
        }
    sel_same &= memcmp(tks[0][0]->data, tks[1][0]->data, tensor_bytes(tks[0][0])) == 0;
    for (int i = 0; i < R_N; i++) {
        double num = 0, den = 0;
        for (int64_t e = 0; e < res[1][0][i]->numel; e++) {
            double a = tensor_get(res[0][0][i], e), b = tensor_get(res[1][0][i], e);
            num += (a - b) * (a - b);
            den += b * b;
        }
        double err = sqrt(num / (den > 0 ? den : 1));
        if (err > worst) {
            worst = err;
            worst_i = i;
        }
    }
    for (int prec = 0; prec < 2; prec++)
        for (int run = 0; run < 3; run++) {
            test_tensor_free(tks[prec][run]);
            for (int i = 0; i < R_N; i++) test_tensor_free(res[prec][run][i]);
        }
    for (int i = 0; i < 6; i++) {
        test_tensor_free(in32[i]);
        test_tensor_free(in64[i]);
    }
    test_tensor_free(cu);
    EXPECT(sel_same, "the selection changed between runs, thread counts or precisions");
    EXPECT(det, "results changed between runs or thread counts (max threads %d)", max_threads);
    EXPECT(worst < 1e-5, "f32 differs from f64 by %.3e (result %d)", worst, worst_i);
}

int main(void) {
    TEST_BEGIN();
    Engine eng;
    engine_init(&eng, &cpu_backend, DT_F64, 1 << 20);
    tc->fixture = &eng;
    RUN(indexer_matches_bruteforce);
    RUN(indexer_ties_and_forced_blocks);
    RUN(indexer_ignores_future_and_other_documents);
    RUN(plan_matches_definition);
    RUN(msa_attention_matches_masked_reference);
    RUN(msa_attention_full_budget_equals_dense);
    RUN(grad_msa_attention_sparse);
    RUN(grad_msa_attention_partial_inputs);
    RUN(grad_msa_kl_index_branch);
    RUN(msa_kl_gives_no_gradient_to_teacher);
    RUN(msa_kl_matches_reference);
    RUN(msa_kl_zero_when_student_equals_teacher);
    RUN(msa_recall_matches_reference);
    RUN(msa_recall_samples_cap_the_stride);
    RUN(msa_hand_example);
    RUN(msa_f32_matches_f64_and_deterministic);
    RUN(indexer_idx_lse_is_the_kl_forwards);
    RUN(fused_backward_equals_the_separate_kernels);
    RUN(grad_msa_attend_kl_in_the_backward);
    engine_free(&eng);
    TEST_END();
}
