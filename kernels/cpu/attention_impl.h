/* Typed bodies of causal GQA attention within documents (instantiated by attention.c; AttnDims is
 * defined there). q/out/dout [Nq,Hq,D], k/v [Nk,Hkv,D], lse [Hq,Nq]. Query t sees the key rows
 * key_lo[t] .. key_hi[t]-1 and key j is seen by the query rows query_lo[j] .. query_hi[j]-1: for the
 * whole micro-batch (attention_forward) query t of document [s,e) sees keys s..t; for one ring step
 * (attention_ring_forward) the rows are tokens of the micro-batch named by index, and the ranges those of
 * the same rule on the indices. Query head h reads KV head h / (Hq/Hkv). All dot products, softmax sums
 * and gradient sums are accumulated in double; only the stored results are rounded to T. */

#include "vec_impl.h"

/* One task per (head, query): a two-pass softmax over the visible keys with the scores kept in a
 * per-thread row buffer (the longest key range), so memory stays O(threads * T). A ring step merges the
 * block's softmax into the running (out, lse) by the log-sum-exp rule
 *   L = logaddexp(L_run, L_blk),  out = out_run exp(L_run - L) + out_blk exp(L_blk - L),
 * which after the last block is the softmax over every visible key (Milakov & Gimelshein 2018). */
static void S(attn_fwd)(T *out, T *lse, const T *q, const T *k, const T *v, const AttnDims *a) {
    const int64_t Nq = a->Nq, Hq = a->Hq, Hkv = a->Hkv, D = a->D, group = a->Hq / a->Hkv;
#pragma omp parallel if (a->work > 65536)
    {
        double *p = xmalloc((size_t)a->max_keys * sizeof(double));
        double *qd = xmalloc((size_t)D * sizeof(double)), *acc = xmalloc((size_t)D * sizeof(double));
        /* cost grows with the query's position in its document: dynamic chunks balance it */
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Hq * Nq; task++) {
            const int64_t h = task / Nq, t = task % Nq, hk = h / group, lo = a->key_lo[t], hi = a->key_hi[t];
            if (lo >= hi) continue; /* no key of this block is visible: nothing to merge */
            S(vec_load)(qd, q + (t * Hq + h) * D, D);
            double mx = -INFINITY;
            for (int64_t j = lo; j < hi; j++) {
                const double sc = a->scale * S(vec_dot)(qd, k + (j * Hkv + hk) * D, D);
                p[j - lo] = sc;
                if (sc > mx) mx = sc;
            }
            double sum = 0;
            memset(acc, 0, (size_t)D * sizeof(double));
            for (int64_t j = lo; j < hi; j++) {
                const double w = exp(p[j - lo] - mx);
                sum += w;
                S(vec_axpy)(acc, w, v + (j * Hkv + hk) * D, D);
            }
            T *o = out + (t * Hq + h) * D;
            const double blk = mx + log(sum);
            if (!a->merge) {
                const double inv = 1.0 / sum;
                for (int64_t d = 0; d < D; d++) o[d] = (T)(acc[d] * inv);
                lse[h * Nq + t] = (T)blk;
                continue;
            }
            const double run = (double)lse[h * Nq + t], top = run > blk ? run : blk;
            const double merged = top + log(exp(run - top) + exp(blk - top));
            const double keep = exp(run - merged), add = exp(blk - merged) / sum;
            for (int64_t d = 0; d < D; d++) o[d] = (T)((double)o[d] * keep + acc[d] * add);
            lse[h * Nq + t] = (T)merged;
        }
        free(p);
        free(qd);
        free(acc);
    }
}

/* With P[t,j] = exp(scale q_t.k_j - lse_t), dP = dout_t.v_j, Dsum_t = dout_t.out_t and
 * dS = P (dP - Dsum):  dq_t += scale sum_j dS k_j,  dk_j += scale sum_t dS q_t,  dv_j += sum_t P dout_t,
 * over the visible pairs. With the final out and lse of a ring, each block's share; the shares add up to
 * the gradient of the whole softmax. Two race-free passes instead of atomics or per-thread copies of
 * dk/dv, so the result does not depend on the thread count or schedule:
 *   pass 1, one task per (query head, query): Dsum (into dsum[Hq*Nq]) and dq;
 *   pass 2, one task per (KV head, key): dk and dv over the queries that see it, of the group's heads,
 *           recomputing P and dS (about 1.75x the arithmetic of a fused pass; no O(T^2) storage). */
static void S(attn_bwd)(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const T *out,
                        const T *lse, double *dsum, const AttnDims *a) {
    const int64_t Nq = a->Nq, Nk = a->Nk, Hq = a->Hq, Hkv = a->Hkv, D = a->D, group = a->Hq / a->Hkv;
    const double scale = a->scale;
#pragma omp parallel if (a->work > 65536)
    {
        double *x = xmalloc((size_t)D * sizeof(double)), *y = xmalloc((size_t)D * sizeof(double));
        double *acc1 = xmalloc((size_t)D * sizeof(double)), *acc2 = xmalloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Hq * Nq; task++) {
            const int64_t h = task / Nq, t = task % Nq, hk = h / group, row = (t * Hq + h) * D;
            S(vec_load)(y, dout + row, D); /* y = dout_t */
            const double ds = S(vec_dot)(y, out + row, D);
            dsum[h * Nq + t] = ds;
            if (!dq) continue;
            S(vec_load)(x, q + row, D); /* x = q_t */
            const double l = (double)lse[h * Nq + t];
            memset(acc1, 0, (size_t)D * sizeof(double));
            for (int64_t j = a->key_lo[t]; j < a->key_hi[t]; j++) {
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
            for (int64_t task = 0; task < Hkv * Nk; task++) {
                const int64_t hk = task / Nk, j = task % Nk, krow = (j * Hkv + hk) * D;
                S(vec_load)(x, k + krow, D); /* x = k_j */
                S(vec_load)(y, v + krow, D); /* y = v_j */
                memset(acc1, 0, (size_t)D * sizeof(double)); /* dk_j / scale */
                memset(acc2, 0, (size_t)D * sizeof(double)); /* dv_j */
                for (int64_t t = a->query_lo[j]; t < a->query_hi[j]; t++)
                    S(attn_key_grad)(acc1, acc2, x, y, q, dout, lse, dsum, t, hk * group, (hk + 1) * group, Hq, Nq, D,
                                     scale, dk != NULL, dv != NULL);
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
