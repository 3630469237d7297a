/* Typed body of the MSA indexer (instantiated by msa_indexer.c; MsaCtx in msa_common.h).
 * qi [Nq,Hidx,Di], ki [N,Di] -> topk i32 [Hidx,Nq,K] and, when idx_lse is non-NULL, the student's
 * log-normaliser over each selection, idx_lse [Hidx,Nq] (vec_impl.h index_lse, as the KL forward). Scores are accumulated in double whatever T is,
 * so f32 and f64 inputs with the same values rank alike up to the rounding of the inputs. */

#include "vec_impl.h"

/* One task per query t. Pass over its visible keys once, scoring every index head against each key
 * (the key row is loaded once for all heads) and keeping the running maximum per (head, block):
 * the "exp-free" ranking needs only raw block maxima. Then, per head, the selection rule of
 * DESIGN §4: forced init and local blocks, the rest by block score (ties: lower block id). */
static void S(msa_index)(int32_t *topk, T *idx_lse, const T *qi, const T *ki, const MsaCtx *c, int64_t init, int64_t local) {
    const int64_t Nq = c->Nq, H = c->Hkv, Di = c->Di, B = c->B, K = c->K, MB = c->max_blocks;
    const double isc = c->index_scale;
#pragma omp parallel if (c->work * (double)(H * Di) > 65536)
    {
        double *bm = xmalloc((size_t)(H * MB) * sizeof(double));
        double *qd = xmalloc((size_t)(H * Di) * sizeof(double));
        double *top_s = xmalloc((size_t)K * sizeof(double));
        int32_t *top_b = xmalloc((size_t)K * sizeof(int32_t)), *sel = xmalloc((size_t)K * sizeof(int32_t));
        int32_t *keys = idx_lse ? xmalloc((size_t)c->max_len * sizeof(int32_t)) : NULL;
        double *z = idx_lse ? xmalloc((size_t)c->max_len * sizeof(double)) : NULL;
        /* cost grows with the query's position: dynamic chunks balance it */
#pragma omp for schedule(dynamic, 16)
        for (int64_t t = 0; t < Nq; t++) {
            const int64_t tok = msa_query_token(c, t), s = msa_doc_start(c, tok), lb = (tok - s) / B, nvis = lb + 1;
            for (int64_t i = 0; i < H * Di; i++) qd[i] = (double)qi[t * H * Di + i];
            for (int64_t g = 0; g < H; g++)
                for (int64_t b = 0; b < nvis; b++) bm[g * MB + b] = -INFINITY;
            if (nvis > K) { /* block scores are only needed when there is a choice to make */
                for (int64_t j = s; j <= tok; j++) {
                    const int64_t b = (j - s) / B;
                    const T *kj = ki + j * Di;
                    for (int64_t g = 0; g < H; g++) {
                        double sc = isc * S(vec_dot)(qd + g * Di, kj, Di);
                        if (sc > bm[g * MB + b]) bm[g * MB + b] = sc; /* NaN never wins: ranks as -inf */
                    }
                }
            }
            for (int64_t g = 0; g < H; g++) {
                int32_t *row = topk + (g * Nq + t) * K;
                int64_t n = 0;
                if (nvis <= K) { /* dense fallback: everything visible fits the budget */
                    for (int64_t b = 0; b < nvis; b++) row[n++] = (int32_t)b;
                } else {
                    /* nvis > K >= init + local, so the init blocks [0, init) and the local blocks
                     * [lb - local + 1, lb] are disjoint and the candidates lie strictly between. */
                    const int64_t loc0 = lb - local + 1, R = K - init - local;
                    int64_t m = 0; /* kept candidates, sorted by (score desc, id asc) */
                    for (int64_t b = init; b < loc0 && R > 0; b++) {
                        const double sc = bm[g * MB + b];
                        if (m == R && !(sc > top_s[R - 1])) continue; /* ties keep the lower id */
                        int64_t pos = m < R ? m++ : R - 1;
                        while (pos > 0 && top_s[pos - 1] < sc) {
                            top_s[pos] = top_s[pos - 1];
                            top_b[pos] = top_b[pos - 1];
                            pos--;
                        }
                        top_s[pos] = sc;
                        top_b[pos] = (int32_t)b;
                    }
                    /* ascending output: init blocks < chosen candidates < local blocks */
                    for (int64_t b = 0; b < init; b++) sel[n++] = (int32_t)b;
                    const int64_t c0 = n;
                    for (int64_t i = 0; i < m; i++) {
                        int64_t pos = c0 + i;
                        while (pos > c0 && sel[pos - 1] > top_b[i]) {
                            sel[pos] = sel[pos - 1];
                            pos--;
                        }
                        sel[pos] = top_b[i];
                    }
                    n += m;
                    for (int64_t b = loc0; b <= lb; b++) sel[n++] = (int32_t)b;
                    memcpy(row, sel, (size_t)n * sizeof(int32_t));
                }
                for (int64_t i = n; i < K; i++) row[i] = -1;
                /* the student's normaliser over the row just chosen (c->topk is topk: msa_support reads it) */
                if (idx_lse)
                    idx_lse[g * Nq + t] = (T)S(index_lse)(z, qd + g * Di, ki, keys, msa_support(c, g, t, keys), Di, isc);
            }
        }
        free(bm);
        free(qd);
        free(top_s);
        free(top_b);
        free(sel);
        free(keys);
        free(z);
    }
}
