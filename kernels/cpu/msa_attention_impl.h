/* Typed bodies of MSA block-sparse attention and the recall metric (instantiated by
 * msa_attention.c; MsaCtx and the support/reverse-map helpers in msa_common.h).
 * q [Nq,Hq,D], k/v [N,Hkv,D], out/dout [Nq,Hq,D], lse [Hq,Nq]. Query head h reads KV head g = h / G
 * over the support of (g, t): the tokens up to query t's of the blocks selected for (g, t). Dot products,
 * softmax sums and gradient sums are accumulated in double; only stored results are rounded to T. */

#include "vec_impl.h"

/* One task per (query, group): the support is gathered once and shared by the G heads of the
 * group; per head an exact two-pass softmax over it (scores kept in a per-thread buffer). */
static void S(msa_attn_fwd)(T *out, T *lse, const T *q, const T *k, const T *v, const MsaCtx *c) {
    const int64_t Nq = c->Nq, Hq = c->Hq, Hkv = c->Hkv, D = c->D, G = c->G;
    const double scale = c->scale;
#pragma omp parallel if (c->work * (double)(Hq * D) > 65536)
    {
        int32_t *keys = xmalloc((size_t)c->max_len * sizeof(int32_t));
        double *p = xmalloc((size_t)c->max_len * sizeof(double));
        double *qd = xmalloc((size_t)D * sizeof(double)), *acc = xmalloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Nq * Hkv; task++) {
            const int64_t t = task / Hkv, g = task % Hkv;
            const int64_t n = msa_support(c, g, t, keys);
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                S(vec_load)(qd, q + (t * Hq + h) * D, D);
                double mx = -INFINITY;
                for (int64_t i = 0; i < n; i++) {
                    p[i] = scale * S(vec_dot)(qd, k + (msa_key_row(c, keys[i]) * Hkv + g) * D, D);
                    if (p[i] > mx) mx = p[i];
                }
                double sum = 0;
                for (int64_t i = 0; i < n; i++) {
                    p[i] = exp(p[i] - mx);
                    sum += p[i];
                }
                memset(acc, 0, (size_t)D * sizeof(double));
                for (int64_t i = 0; i < n; i++) S(vec_axpy)(acc, p[i], v + (msa_key_row(c, keys[i]) * Hkv + g) * D, D);
                const double inv = 1.0 / sum;
                T *o = out + (t * Hq + h) * D;
                for (int64_t d = 0; d < D; d++) o[d] = (T)(acc[d] * inv);
                lse[h * Nq + t] = (T)(mx + log(sum));
            }
        }
        free(keys);
        free(p);
        free(qd);
        free(acc);
    }
}

/* With P[t,j] = exp(scale q_t.k_j - lse_t) on the support, dP = dout_t.v_j, Dsum_t = dout_t.out_t,
 * dS = P (dP - Dsum):  dq_t += scale sum_j dS k_j,  dk_j += scale sum_t dS q_t,  dv_j += sum_t P dout_t.
 * Race-free and independent of the thread count, as the dense kernel (attention_impl.h):
 *   pass 1, one task per (query, group): Dsum of the group's heads, and dq over the support;
 *   pass 2, one task per (key, group): dk, dv over the queries that selected the key's block (the
 *           reverse map, ascending), recomputing P and dS. */
static void S(msa_attn_bwd)(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const T *out,
                            const T *lse, double *dsum, const MsaCtx *c) {
    const int64_t N = c->N, Nq = c->Nq, Hq = c->Hq, Hkv = c->Hkv, D = c->D, G = c->G;
    const double scale = c->scale;
#pragma omp parallel if (c->work * (double)(Hq * D) > 65536)
    {
        int32_t *keys = xmalloc((size_t)c->max_len * sizeof(int32_t));
        double *x = xmalloc((size_t)D * sizeof(double)), *y = xmalloc((size_t)D * sizeof(double));
        double *acc1 = xmalloc((size_t)D * sizeof(double)), *acc2 = xmalloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Nq * Hkv; task++) {
            const int64_t t = task / Hkv, g = task % Hkv;
            const int64_t n = dq ? msa_support(c, g, t, keys) : 0;
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                const int64_t row = (t * Hq + h) * D;
                S(vec_load)(y, dout + row, D);
                const double ds = S(vec_dot)(y, out + row, D);
                dsum[h * Nq + t] = ds;
                if (!dq) continue;
                S(vec_load)(x, q + row, D);
                const double l = (double)lse[h * Nq + t];
                memset(acc1, 0, (size_t)D * sizeof(double));
                for (int64_t i = 0; i < n; i++) {
                    const int64_t kv = (msa_key_row(c, keys[i]) * Hkv + g) * D;
                    const double P = exp(scale * S(vec_dot)(x, k + kv, D) - l);
                    const double dP = S(vec_dot)(y, v + kv, D);
                    S(vec_axpy)(acc1, P * (dP - ds), k + kv, D);
                }
                for (int64_t d = 0; d < D; d++) dq[row + d] += (T)(scale * acc1[d]);
            }
        }
        /* implicit barrier: pass 2 reads every dsum */
        if (dk || dv) {
#pragma omp for schedule(dynamic, 16)
            for (int64_t task = 0; task < N * Hkv; task++) {
                const int64_t j = task / Hkv, g = task % Hkv, row = msa_key_row(c, j);
                const int32_t *list;
                int64_t nq, first;
                msa_key_queries(c, g, j, &list, &nq, &first);
                if (nq == 0 || row < 0) continue; /* a key no query selects (then k, v may not hold it) */
                const int64_t krow = (row * Hkv + g) * D;
                S(vec_load)(x, k + krow, D);
                S(vec_load)(y, v + krow, D);
                memset(acc1, 0, (size_t)D * sizeof(double)); /* dk_j / scale */
                memset(acc2, 0, (size_t)D * sizeof(double)); /* dv_j */
                for (int64_t i = 0; i < nq; i++) {
                    const int64_t t = list ? list[i] : first + i;
                    if (msa_query_token(c, t) < j) continue; /* an earlier query of j's own block: j is in its future */
                    S(attn_key_grad)(acc1, acc2, x, y, q, dout, lse, dsum, t, g * G, (g + 1) * G, Hq, Nq, D, scale,
                                     dk != NULL, dv != NULL);
                }
                for (int64_t d = 0; d < D; d++) {
                    if (dk) dk[krow + d] += (T)(scale * acc1[d]);
                    if (dv) dv[krow + d] += (T)acc2[d];
                }
            }
        }
        free(keys);
        free(x);
        free(y);
        free(acc1);
        free(acc2);
    }
}

/* Recall of the selection against the dense teacher: for each sampled query row rows[i] and group g,
 * the mean over the group's heads of the FULL causal softmax mass (within its document) that falls
 * on keys of the blocks selected for (g, t). One value per sampled (t, g) into vals; the caller sums
 * them in a fixed order. */
static void S(msa_recall_body)(double *vals, const T *q, const T *k, const MsaCtx *c, const int64_t *rows, int64_t ns) {
    const int64_t Nq = c->Nq, Hq = c->Hq, Hkv = c->Hkv, D = c->D, G = c->G, B = c->B, K = c->K;
    const double scale = c->scale;
#pragma omp parallel if (c->work * (double)(Hq * D) * (double)ns / (double)c->N > 65536)
    {
        double *p = xmalloc((size_t)c->max_len * sizeof(double)), *qd = xmalloc((size_t)D * sizeof(double));
        unsigned char *selected = xmalloc((size_t)c->max_blocks);
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < ns * Hkv; task++) {
            const int64_t t = rows[task / Hkv], g = task % Hkv, tok = msa_query_token(c, t);
            const int64_t s = msa_doc_start(c, tok), n = tok - s + 1, nvis = (tok - s) / B + 1;
            memset(selected, c->topk ? 0 : 1, (size_t)nvis);
            if (c->topk) {
                const int32_t *row = c->topk + (g * Nq + t) * K;
                for (int64_t i = 0; i < K && row[i] >= 0; i++) selected[row[i]] = 1;
            }
            double mass = 0;
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                S(vec_load)(qd, q + (t * Hq + h) * D, D);
                double mx = -INFINITY;
                for (int64_t i = 0; i < n; i++) {
                    p[i] = scale * S(vec_dot)(qd, k + ((s + i) * Hkv + g) * D, D);
                    if (p[i] > mx) mx = p[i];
                }
                double sum = 0, in = 0;
                for (int64_t i = 0; i < n; i++) {
                    const double e = exp(p[i] - mx);
                    sum += e;
                    if (selected[i / B]) in += e;
                }
                mass += in / sum;
            }
            vals[task] = mass / (double)G;
        }
        free(p);
        free(qd);
        free(selected);
    }
}
