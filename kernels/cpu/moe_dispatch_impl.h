/* Typed bodies of the MoE dispatch kernels: token permutation into the expert-grouped order, its
 * weighted inverse (combine), and the grouped expert GEMM (instantiated by moe_dispatch.c).
 * Every loop is over tokens t, and rows[t, :] are distinct rows of the grouped buffer, so each
 * thread writes its own rows and nothing needs atomics. */

static void S(moe_perm_fwd)(T *xs, const T *x, const int32_t *rows, int64_t N, int k, int64_t C) {
#pragma omp parallel for schedule(static) if (N * k * C > 65536)
    for (int64_t t = 0; t < N; t++)
        for (int j = 0; j < k; j++) memcpy(xs + (int64_t)rows[t * k + j] * C, x + t * C, (size_t)C * sizeof(T));
}

static void S(moe_perm_bwd)(T *dx, const T *dxs, const int32_t *rows, int64_t N, int k, int64_t C) {
#pragma omp parallel for schedule(static) if (N * k * C > 65536)
    for (int64_t t = 0; t < N; t++)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0;
            for (int j = 0; j < k; j++) acc += dxs[(int64_t)rows[t * k + j] * C + c];
            dx[t * C + c] += (T)acc;
        }
}

static void S(moe_unperm_fwd)(T *out, const T *ys, const T *w, const int32_t *rows, int64_t N, int k, int64_t C) {
#pragma omp parallel for schedule(static) if (N * k * C > 65536)
    for (int64_t t = 0; t < N; t++)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0;
            for (int j = 0; j < k; j++) acc += (double)w[t * k + j] * ys[(int64_t)rows[t * k + j] * C + c];
            out[t * C + c] = (T)acc;
        }
}

static void S(moe_unperm_bwd)(T *dys, T *dw, const T *dout, const T *ys, const T *w, const int32_t *rows, int64_t N,
                              int k, int64_t C) {
#pragma omp parallel for schedule(static) if (N * k * C > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *g = dout + t * C;
        for (int j = 0; j < k; j++) {
            int64_t r = rows[t * k + j];
            if (dys) {
                double wj = w[t * k + j];
                for (int64_t c = 0; c < C; c++) dys[r * C + c] += (T)(wj * g[c]);
            }
            if (dw) {
                double acc = 0;
                for (int64_t c = 0; c < C; c++) acc += (double)g[c] * ys[r * C + c];
                dw[t * k + j] += (T)acc;
            }
        }
    }
}

/* One GEMM per expert segment (each itself parallel). Empty segments are skipped: an expert that
 * got no token has no work and, in backward, no weight gradient. */
static void S(grouped_mm_fwd)(T *ys, const T *xs, const T *w, const int32_t *off, int64_t E, int64_t in, int64_t out) {
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = off[e], m = off[e + 1] - off[e];
        if (m == 0) continue;
        S(cpu_gemm)(false, true, m, out, in, 1, xs + r0 * in, in, w + e * out * in, in, 0, ys + r0 * out, out);
    }
}

static void S(grouped_mm_bwd)(T *dxs, T *dw, const T *dys, const T *xs, const T *w, const int32_t *off, int64_t E,
                              int64_t in, int64_t out) {
    for (int64_t e = 0; e < E; e++) {
        int64_t r0 = off[e], m = off[e + 1] - off[e];
        if (m == 0) continue;
        if (dxs) /* dxs_e += dys_e @ W_e */
            S(cpu_gemm)(false, false, m, in, out, 1, dys + r0 * out, out, w + e * out * in, in, 1, dxs + r0 * in, in);
        if (dw) /* dW_e += dys_e^T @ xs_e */
            S(cpu_gemm)(true, false, out, in, m, 1, dys + r0 * out, out, xs + r0 * in, in, 1, dw + e * out * in, in);
    }
}
