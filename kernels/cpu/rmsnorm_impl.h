/* Typed bodies of RMSNorm (instantiated by rmsnorm.c). x is rows x C; rstd = 1/sqrt(mean(x^2) + eps)
 * per row, saved in the activation's own precision (T). Gain g = w, or 1 + w (unit_offset). */
static inline double S(rms_gain)(const T *w, int64_t c, bool unit_offset) {
    return w ? (unit_offset ? 1.0 + (double)w[c] : (double)w[c]) : 1.0;
}

static void S(rmsnorm_fwd)(T *y, T *rstd, const T *x, const T *w, int64_t rows, int64_t C, double eps,
                           bool unit_offset) {
#pragma omp parallel for schedule(static) if (rows * C > 16384)
    for (int64_t r = 0; r < rows; r++) {
        const T *xr = x + r * C;
        double ss = 0.0;
        for (int64_t c = 0; c < C; c++) ss += (double)xr[c] * xr[c];
        double rs = 1.0 / sqrt(ss / (double)C + eps);
        rstd[r] = (T)rs;
        for (int64_t c = 0; c < C; c++) y[r * C + c] = (T)(xr[c] * rs * S(rms_gain)(w, c, unit_offset));
    }
}

/* dx += rs * g * dy - rs^3 / C * x * sum_c(x * g * dy) ;  dw += sum_rows dy * x * rs */
static void S(rmsnorm_bwd)(T *dx, T *dw, const T *dy, const T *x, const T *w, const T *rstd, int64_t rows,
                           int64_t C, bool unit_offset) {
    if (dx) {
#pragma omp parallel for schedule(static) if (rows * C > 16384)
        for (int64_t r = 0; r < rows; r++) {
            const T *xr = x + r * C, *dyr = dy + r * C;
            double rs = rstd[r], dot = 0.0;
            for (int64_t c = 0; c < C; c++) dot += (double)xr[c] * S(rms_gain)(w, c, unit_offset) * dyr[c];
            for (int64_t c = 0; c < C; c++)
                dx[r * C + c] += (T)(rs * S(rms_gain)(w, c, unit_offset) * dyr[c] - rs * rs * rs / (double)C * xr[c] * dot);
        }
    }
    if (dw) {
        /* parallel over channels, sequential over rows: deterministic */
#pragma omp parallel for schedule(static) if (rows * C > 16384)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0.0;
            for (int64_t r = 0; r < rows; r++) acc += (double)dy[r * C + c] * x[r * C + c] * rstd[r];
            dw[c] += (T)acc;
        }
    }
}
