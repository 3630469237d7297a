/* Typed bodies of dropout (instantiated by dropout.c): y = x * keep / (1 - p). */
static void S(dropout_fwd)(T *y, const T *x, int64_t n, uint64_t seed, int64_t offset, uint32_t thr, double inv_keep) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] = dropout_bits(seed, offset + i) >= thr ? (T)(x[i] * inv_keep) : (T)0;
}

static void S(dropout_bwd)(T *dx, const T *dy, int64_t n, uint64_t seed, int64_t offset, uint32_t thr, double inv_keep) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        if (dropout_bits(seed, offset + i) >= thr) dx[i] += (T)(dy[i] * inv_keep);
}
