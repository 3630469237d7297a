/* Typed bodies of one ring step of causal GQA attention (instantiated by attention_ring.c; RingDims is
 * defined there): this rank's queries against one block of keys, every token named by its global index
 * in the micro-batch. q/out/dout [Nq,Hq,D], k/v [Nk,Hkv,D], lse [Hq,Nq]. Query t sees key j iff
 * doc_start[t] <= k_index[j] <= q_index[t]. Sums in double, as attention_impl.h. */

#include "vec_impl.h"

static inline bool S(ring_visible)(const RingDims *a, int64_t t, int64_t j) {
    const int32_t key = a->k_index[j];
    return key >= a->doc_start[t] && key <= a->q_index[t];
}

/* One task per (head, query): the block's softmax over its visible keys (two passes, as attn_fwd),
 * merged into the running (out, lse) by the log-sum-exp rule
 *   L = logaddexp(L_run, L_blk),  out = out_run exp(L_run - L) + out_blk exp(L_blk - L),
 * which after the last block is the softmax over every visible key (Milakov & Gimelshein 2018). */
static void S(ring_fwd)(T *out, T *lse, const T *q, const T *k, const T *v, const RingDims *a) {
    const int64_t Nq = a->Nq, Nk = a->Nk, Hq = a->Hq, Hkv = a->Hkv, D = a->D, group = a->Hq / a->Hkv;
#pragma omp parallel if (a->work > 65536)
    {
        double *p = xmalloc((size_t)(Nk > 0 ? Nk : 1) * sizeof(double));
        double *qd = xmalloc((size_t)D * sizeof(double)), *acc = xmalloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Hq * Nq; task++) {
            const int64_t h = task / Nq, t = task % Nq, hk = h / group;
            S(vec_load)(qd, q + (t * Hq + h) * D, D);
            double mx = -INFINITY;
            for (int64_t j = 0; j < Nk; j++) {
                if (!S(ring_visible)(a, t, j)) continue;
                p[j] = a->scale * S(vec_dot)(qd, k + (j * Hkv + hk) * D, D);
                if (p[j] > mx) mx = p[j];
            }
            if (mx == -INFINITY) continue; /* no key of this block is visible: nothing to merge */
            double sum = 0;
            memset(acc, 0, (size_t)D * sizeof(double));
            for (int64_t j = 0; j < Nk; j++) {
                if (!S(ring_visible)(a, t, j)) continue;
                const double w = exp(p[j] - mx);
                sum += w;
                S(vec_axpy)(acc, w, v + (j * Hkv + hk) * D, D);
            }
            const double blk = mx + log(sum), run = (double)lse[h * Nq + t];
            const double top = run > blk ? run : blk;
            const double merged = top + log(exp(run - top) + exp(blk - top));
            const double keep = exp(run - merged), add = exp(blk - merged) / sum;
            T *o = out + (t * Hq + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = (T)((double)o[d] * keep + acc[d] * add);
            lse[h * Nq + t] = (T)merged;
        }
        free(p);
        free(qd);
        free(acc);
    }
}

/* The block's share of the attention gradient, with P[t,j] = exp(scale q_t.k_j - lse_t) from the final
 * lse and Dsum_t = dout_t.out_t from the final out, so that the blocks' shares add up to the gradient
 * of the whole softmax (the formulas of attn_bwd, restricted to the visible pairs of this block).
 * The same two race-free passes: (query head, query) for Dsum and dq, then (KV head, key) for dk, dv. */
static void S(ring_bwd)(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v, const T *out,
                        const T *lse, double *dsum, const RingDims *a) {
    const int64_t Nq = a->Nq, Nk = a->Nk, Hq = a->Hq, Hkv = a->Hkv, D = a->D, group = a->Hq / a->Hkv;
    const double scale = a->scale;
#pragma omp parallel if (a->work > 65536)
    {
        double *x = xmalloc((size_t)D * sizeof(double)), *y = xmalloc((size_t)D * sizeof(double));
        double *acc1 = xmalloc((size_t)D * sizeof(double)), *acc2 = xmalloc((size_t)D * sizeof(double));
#pragma omp for schedule(dynamic, 16)
        for (int64_t task = 0; task < Hq * Nq; task++) {
            const int64_t h = task / Nq, t = task % Nq, hk = h / group, row = (t * Hq + h) * D;
            S(vec_load)(y, dout + row, D);
            const double ds = S(vec_dot)(y, out + row, D);
            dsum[h * Nq + t] = ds;
            if (!dq) continue;
            S(vec_load)(x, q + row, D);
            const double l = (double)lse[h * Nq + t];
            memset(acc1, 0, (size_t)D * sizeof(double));
            for (int64_t j = 0; j < Nk; j++) {
                if (!S(ring_visible)(a, t, j)) continue;
                const T *kj = k + (j * Hkv + hk) * D;
                const double P = exp(scale * S(vec_dot)(x, kj, D) - l);
                const double dP = S(vec_dot)(y, v + (j * Hkv + hk) * D, D);
                S(vec_axpy)(acc1, P * (dP - ds), kj, D);
            }
            for (int64_t d = 0; d < D; d++) dq[row + d] += (T)(scale * acc1[d]);
        }
        if (dk || dv) {
#pragma omp for schedule(dynamic, 16)
            for (int64_t task = 0; task < Hkv * Nk; task++) {
                const int64_t hk = task / Nk, j = task % Nk, krow = (j * Hkv + hk) * D;
                S(vec_load)(x, k + krow, D);
                S(vec_load)(y, v + krow, D);
                memset(acc1, 0, (size_t)D * sizeof(double));
                memset(acc2, 0, (size_t)D * sizeof(double));
                for (int64_t t = 0; t < Nq; t++)
                    if (S(ring_visible)(a, t, j))
                        S(attn_key_grad)(acc1, acc2, x, y, q, dout, lse, dsum, t, hk * group, (hk + 1) * group, Hq,
                                         Nq, D, scale, dk != NULL, dv != NULL);
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
