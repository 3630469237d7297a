/* Small typed vector helpers shared by the attention, MSA indexer and KL kernel bodies. Included at
 * the top of an <op>_impl.h, so it is instantiated with that op for float and double (no include
 * guard on purpose: each kernel file instantiates exactly one _impl.h). Sums accumulate in double;
 * the simd reduction order is fixed at compile time, so results do not depend on the thread count. */

/* <a, b> with a already in double */
static inline double S(vec_dot)(const double *a, const T *b, int64_t n) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; d++) s += a[d] * (double)b[d];
    return s;
}

/* <a, b> of two T rows */
static inline __attribute__((unused)) double S(vec_dot_tt)(const T *a, const T *b, int64_t n) {
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; d++) s += (double)a[d] * (double)b[d];
    return s;
}

static inline __attribute__((unused)) void S(vec_load)(double *dst, const T *src, int64_t n) {
    for (int64_t d = 0; d < n; d++) dst[d] = (double)src[d];
}

/* acc += alpha * x */
static inline __attribute__((unused)) void S(vec_axpy)(double *acc, double alpha, const T *x, int64_t n) {
#pragma omp simd
    for (int64_t d = 0; d < n; d++) acc[d] += alpha * (double)x[d];
}

/* The student's log-normaliser over a support (the MSA KL forward and the indexer's idx_lse, one
 * definition so that both give the same bits): z[i] = index_scale <qi, ki[keys[i]]> (qi in double) and
 * log sum_i exp z[i], the sum in key order. */
static inline __attribute__((unused)) double S(index_lse)(double *z, const double *qi, const T *ki, const int32_t *keys,
                                                          int64_t n, int64_t Di, double index_scale) {
    double mz = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        z[i] = index_scale * S(vec_dot)(qi, ki + keys[i] * Di, Di);
        if (z[i] > mz) mz = z[i];
    }
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += exp(z[i] - mz);
    return mz + log(sum);
}

/* Attention backward, key side: add query t's contribution through heads [h0, h1) to dk_j (acc1) and
 * dv_j (acc2) of one key j whose k and v rows are kj and vj (in double). P is recomputed from the saved
 * lse [Hq, N]; dsum [Hq, N] holds <dout, out> per (head, query). Shared by dense and MSA attention. */
static inline __attribute__((unused)) void S(attn_key_grad)(double *acc1, double *acc2, const double *kj,
                                                          const double *vj, const T *q, const T *dout,
                                                          const T *lse, const double *dsum, int64_t t, int64_t h0,
                                                          int64_t h1, int64_t Hq, int64_t N, int64_t D,
                                                          double scale, bool want_dk, bool want_dv) {
    for (int64_t h = h0; h < h1; h++) {
        const int64_t row = (t * Hq + h) * D;
        const double P = exp(scale * S(vec_dot)(kj, q + row, D) - (double)lse[h * N + t]);
        if (want_dk) {
            const double dP = S(vec_dot)(vj, dout + row, D);
            S(vec_axpy)(acc1, P * (dP - dsum[h * N + t]), q + row, D);
        }
        if (want_dv) S(vec_axpy)(acc2, P, dout + row, D);
    }
}
