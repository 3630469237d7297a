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
