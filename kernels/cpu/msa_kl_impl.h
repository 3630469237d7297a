/* Typed bodies of the MSA KL alignment loss (instantiated by msa_kl.c; MsaCtx in msa_common.h).
 * For (group g, query t) over the support T(g,t) of the selection:
 *   student  z_j = index_scale * <qi[t,g], ki[j]>,  r_j = exp(z_j - idx_lse[g,t]) (softmax over T)
 *   teacher  p_j = (1/G) sum_{h in g} exp(scale * <q[t,h], k[j,g]> - lse[h,t])   (detached)
 *   KL(g,t)  = sum_j p_j (log p_j - log r_j)
 * All in double; only stored results are rounded to T. */

#include "vec_impl.h"

/* The teacher probability of key j for query t of group g, from the saved main-branch lse. */
static inline double S(kl_teacher)(const T *q, const T *k, const T *lse, int64_t j, int64_t g, int64_t t,
                                   const MsaCtx *c) {
    const T *kj = k + (msa_key_row(c, j) * c->Hkv + g) * c->D, *qt = q + (t * c->Hq + g * c->G) * c->D;
    double p = 0;
    for (int64_t i = 0; i < c->G; i++)
        p += exp(c->scale * S(vec_dot_tt)(qt + i * c->D, kj, c->D) - (double)lse[(g * c->G + i) * c->Nq + t]);
    return p / (double)c->G;
}

/* One task per (query, group): the student's log-normaliser idx_lse[g,t] (NULL: not kept) and KL(g,t)
 * into kl_vals[t*Hkv + g] (summed by the caller in a fixed order). */
static void S(msa_kl_fwd)(double *kl_vals, T *idx_lse, const T *q, const T *k, const T *lse, const T *qi,
                          const T *ki, const MsaCtx *c) {
    const int64_t Nq = c->Nq, Hkv = c->Hkv, Di = c->Di;
    const double isc = c->index_scale;
#pragma omp parallel if (c->work * (double)(c->Hq * c->D + Hkv * Di) > 65536)
    {
        int32_t *keys = xmalloc((size_t)c->max_len * sizeof(int32_t));
        double *z = xmalloc((size_t)c->max_len * sizeof(double));
        double *qid = xmalloc((size_t)Di * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Nq * Hkv; task++) {
            const int64_t t = task / Hkv, g = task % Hkv;
            const int64_t n = msa_support(c, g, t, keys);
            for (int64_t d = 0; d < Di; d++) qid[d] = (double)qi[(t * Hkv + g) * Di + d];
            const double l = S(index_lse)(z, qid, ki, keys, n, Di, isc);
            double kl = 0;
            for (int64_t i = 0; i < n; i++) {
                const double p = S(kl_teacher)(q, k, lse, keys[i], g, t, c);
                if (p > 0) kl += p * (log(p) - (z[i] - l)); /* p log p -> 0 as p -> 0 */
            }
            if (idx_lse) idx_lse[g * Nq + t] = (T)l;
            kl_vals[task] = kl;
        }
        free(keys);
        free(z);
        free(qid);
    }
}

/* d KL(g,t) / d z_j = r_j - p_j (the teacher sums to one over the support, as it does when lse is
 * the main branch's lse over that same support), so with cs = coeff * index_scale:
 *   dqi[t,g] += cs * sum_j (r_j - p_j) ki[j]
 *   dki[j]   += cs * sum_{(t,g) reading j} (r_j - p_j) qi[t,g]
 * Race-free and independent of the thread count: dqi by one task per (query, group) over its
 * support, dki by one task per key over the reverse map of every group (groups in order). */
static void S(msa_kl_bwd)(T *dqi, T *dki, const T *q, const T *k, const T *lse, const T *qi, const T *ki,
                          const T *idx_lse, double coeff, const MsaCtx *c) {
    const int64_t N = c->N, Nq = c->Nq, Hkv = c->Hkv, Di = c->Di;
    const double isc = c->index_scale, cs = coeff * c->index_scale;
#pragma omp parallel if (c->work * (double)(c->Hq * c->D + Hkv * Di) > 65536)
    {
        int32_t *keys = xmalloc((size_t)c->max_len * sizeof(int32_t));
        double *vd = xmalloc((size_t)Di * sizeof(double));
        double *acc = xmalloc((size_t)Di * sizeof(double));
        if (dqi) {
#pragma omp for schedule(dynamic, 16)
            for (int64_t task = 0; task < Nq * Hkv; task++) {
                const int64_t t = task / Hkv, g = task % Hkv;
                const int64_t n = msa_support(c, g, t, keys);
                const T *qrow = qi + (t * Hkv + g) * Di;
                for (int64_t d = 0; d < Di; d++) vd[d] = (double)qrow[d];
                const double l = (double)idx_lse[g * Nq + t];
                memset(acc, 0, (size_t)Di * sizeof(double));
                for (int64_t i = 0; i < n; i++) {
                    const T *kj = ki + keys[i] * Di;
                    const double r = exp(isc * S(vec_dot)(vd, kj, Di) - l);
                    const double p = S(kl_teacher)(q, k, lse, keys[i], g, t, c);
#pragma omp simd
                    for (int64_t d = 0; d < Di; d++) acc[d] += (r - p) * (double)kj[d];
                }
                for (int64_t d = 0; d < Di; d++) dqi[(t * Hkv + g) * Di + d] += (T)(cs * acc[d]);
            }
        }
        if (dki) {
#pragma omp for schedule(dynamic, 16)
            for (int64_t j = 0; j < N; j++) {
                for (int64_t d = 0; d < Di; d++) vd[d] = (double)ki[j * Di + d];
                memset(acc, 0, (size_t)Di * sizeof(double));
                for (int64_t g = 0; g < Hkv; g++) {
                    const int32_t *list;
                    int64_t nq, first;
                    msa_key_queries(c, g, j, &list, &nq, &first);
                    for (int64_t i = 0; i < nq; i++) {
                        const int64_t t = list ? list[i] : first + i;
                        if (msa_query_token(c, t) < j) continue; /* an earlier query of j's own block */
                        const T *qrow = qi + (t * Hkv + g) * Di;
                        const double r = exp(isc * S(vec_dot)(vd, qrow, Di) - (double)idx_lse[g * Nq + t]);
                        const double p = S(kl_teacher)(q, k, lse, j, g, t, c);
#pragma omp simd
                        for (int64_t d = 0; d < Di; d++) acc[d] += (r - p) * (double)qrow[d];
                    }
                }
                for (int64_t d = 0; d < Di; d++) dki[j * Di + d] += (T)(cs * acc[d]);
            }
        }
        free(keys);
        free(vd);
        free(acc);
    }
}
