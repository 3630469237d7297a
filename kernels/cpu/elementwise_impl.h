/* Typed bodies of the elementwise kernels (instantiated by elementwise.c). */
static void S(axpy)(T *y, const T *x, int64_t n, double alpha) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] += (T)(alpha * x[i]);
}

static void S(scale)(T *y, int64_t n, double alpha) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] = (T)(alpha * y[i]);
}

static void S(add)(T *out, const T *a, const T *b, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static double S(sumsq)(const T *x, int64_t n) {
    double s = 0.0;
#pragma omp parallel for reduction(+ : s) schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}
