/* Typed body of the AdamW update (instantiated by adamw.c). */
static void S(adamw)(T *p, const T *g, T *m, T *v, int64_t n, double lr, double b1, double b2, double c1, double c2,
                     double eps, double wd) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        double mi = b1 * m[i] + (1.0 - b1) * g[i];
        double vi = b2 * v[i] + (1.0 - b2) * (double)g[i] * g[i];
        m[i] = (T)mi;
        v[i] = (T)vi;
        double mhat = mi / c1, vhat = vi / c2;
        p[i] = (T)(p[i] - lr * (mhat / (sqrt(vhat) + eps) + wd * p[i]));
    }
}
