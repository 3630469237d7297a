/* Typed bodies of causal GQA attention within documents (instantiated by attention.c; AttnDims is
 * defined there). q [N,Hq,D], k/v [N,Hkv,D], out/dout [N,Hq,D], lse [Hq,N]. Query t of document
 * [s,e) sees keys s..t; query head h reads KV head h / (Hq/Hkv). All dot products, softmax sums and
 * gradient sums are accumulated in double; only the stored results are rounded to T. */

#include "vec_impl.h"

/* One task per (head, query): a two-pass softmax over the visible keys with the scores kept in a
 * per-thread row buffer (the longest document's length), so memory stays O(threads * T). */
static void S(attn_fwd)(T *out, T *lse, const T *q, const T *k, const T *v, const AttnDims *a) {
    const int64_t N = a->N, Hq = a->Hq, Hkv = a->Hkv, D = a->D, group = a->Hq / a->Hkv;
#pragma omp parallel if (a->work > 65536)
    {
        double *p = xmalloc((size_t)a->max_len * sizeof(double));
        double *qd = xmalloc((size_t)D * sizeof(double)), *acc = xmalloc((size_t)D * sizeof(double));
        /* cost grows with the query's position in its document: dynamic chunks balance it */
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Hq * N; task++) {
            const int64_t h = task / N, t = task % N, hk = h / group, s = a->doc_start[t];
            S(vec_load)(qd, q + (t * Hq + h) * D, D);
            double mx = -INFINITY;
            for (int64_t j = s; j <= t; j++) {
                const double sc = a->scale * S(vec_dot)(qd, k + (j * Hkv + hk) * D, D);
                p[j - s] = sc;
                if (sc > mx) mx = sc;
            }
            double sum = 0;
            for (int64_t j = s; j <= t; j++) {
                p[j - s] = exp(p[j - s] - mx);
                sum += p[j - s];
            }
            memset(acc, 0, (size_t)D * sizeof(double));
            for (int64_t j = s; j <= t; j++) S(vec_axpy)(acc, p[j - s], v + (j * Hkv + hk) * D, D);
            const double inv = 1.0 / sum;
            T *o = out + (t * Hq + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = (T)(acc[d] * inv);
            lse[h * N + t] = (T)(mx + log(sum));
        }
        free(p);
        free(qd);
        free(acc);
    }
}

/* With P[t,j] = exp(scale q_t.k_j - lse_t), dP = dout_t.v_j, Dsum_t = dout_t.out_t and
 * dS = P (dP - Dsum):  dq_t += scale sum_j dS k_j,  dk_j += scale sum_t dS q_t,  dv_j += sum_t P dout_t.
 * Two race-free passes instead of atomics or per-thread copies of dk/dv, so the result does not
 * depend on the thread count or schedule:
 *   pass 1, one task per (query head, query): Dsum (into dsum[Hq*N]) and dq;
 *   pass 2, one task per (KV head, key): dk and dv over the later queries of the group's heads,
 *           recomputing P and dS (about 1.75x the arithmetic of a fused pass; no O(T^2) storage). */
static void S(attn_bwd)(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const T *out,
                        const T *lse, double *dsum, const AttnDims *a) {
    const int64_t N = a->N, Hq = a->Hq, Hkv = a->Hkv, D = a->D, group = a->Hq / a->Hkv;
    const double scale = a->scale;
#pragma omp parallel if (a->work > 65536)
    {
        double *x = xmalloc((size_t)D * sizeof(double)), *y = xmalloc((size_t)D * sizeof(double));
        double *acc1 = xmalloc((size_t)D * sizeof(double)), *acc2 = xmalloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Hq * N; task++) {
            const int64_t h = task / N, t = task % N, hk = h / group, s = a->doc_start[t];
            const int64_t row = (t * Hq + h) * D;
            S(vec_load)(y, dout + row, D); /* y = dout_t */
            const double ds = S(vec_dot)(y, out + row, D);
            dsum[h * N + t] = ds;
            if (!dq) continue;
            S(vec_load)(x, q + row, D); /* x = q_t */
            const double l = (double)lse[h * N + t];
            memset(acc1, 0, (size_t)D * sizeof(double));
            for (int64_t j = s; j <= t; j++) {
                const T *kj = k + (j * Hkv + hk) * D;
                const double P = exp(scale * S(vec_dot)(x, kj, D) - l);
                const double dP = S(vec_dot)(y, v + (j * Hkv + hk) * D, D);
                S(vec_axpy)(acc1, P * (dP - ds), kj, D);
            }
            for (int64_t d = 0; d < D; d++) dq[row + d] += (T)(scale * acc1[d]);
        }
        /* implicit barrier: pass 2 reads every dsum */
        if (dk || dv) {
#pragma omp for schedule(dynamic, 16)
            for (int64_t task = 0; task < Hkv * N; task++) {
                const int64_t hk = task / N, j = task % N, e = a->doc_end[j];
                const int64_t krow = (j * Hkv + hk) * D;
                S(vec_load)(x, k + krow, D); /* x = k_j */
                S(vec_load)(y, v + krow, D); /* y = v_j */
                memset(acc1, 0, (size_t)D * sizeof(double)); /* dk_j / scale */
                memset(acc2, 0, (size_t)D * sizeof(double)); /* dv_j */
                for (int64_t t = j; t < e; t++) {
                    S(attn_key_grad)(acc1, acc2, x, y, q, dout, lse, dsum, t, hk * group, (hk + 1) * group, Hq, N, D,
                                     scale, dk != NULL, dv != NULL);
                }
                for (int64_t d = 0; d < D; d++) {
                    if (dk) dk[krow + d] += (T)(scale * acc1[d]);
                    if (dv) dv[krow + d] += (T)acc2[d];
                }
            }
        }
        free(x);
        free(y);
        free(acc1);
        free(acc2);
    }
}
