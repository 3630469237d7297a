/* Typed bodies of RoPE (instantiated by rope.c). x, y are [N, H, D]; pairs (i, i + half) with
 * half = rotary_dim / 2 are rotated by the angle pos * inv_freq[i] and multiplied by scale. Angles
 * and their cos/sin are computed in double so that f32 and f64 results differ only by the final
 * rounding, even at the large positions (100K+) of long-context runs. */

/* y = scale R(angle) x on every rotated pair; sign = +1 rotates forward, -1 rotates back (the transpose,
 * which is the backward). accumulate: y += instead of y =. y may alias x (pairs are read first). */
static void S(rope_apply)(T *y, const T *x, const int32_t *positions, const double *inv_freq, double scale,
                          int64_t N, int64_t H, int64_t D, int64_t rotary_dim, double sign, bool accumulate) {
    const int64_t half = rotary_dim / 2;
#pragma omp parallel for schedule(static) if (N * H * D > 16384)
    for (int64_t n = 0; n < N; n++) {
        const double pos = (double)positions[n];
        for (int64_t i = 0; i < half; i++) {
            const double angle = pos * inv_freq[i];
            const double c = scale * cos(angle), s = scale * sign * sin(angle);
            for (int64_t h = 0; h < H; h++) {
                const int64_t base = (n * H + h) * D;
                const double a = x[base + i], b = x[base + i + half];
                const double ya = a * c - b * s, yb = b * c + a * s;
                if (accumulate) {
                    y[base + i] += (T)ya;
                    y[base + i + half] += (T)yb;
                } else {
                    y[base + i] = (T)ya;
                    y[base + i + half] = (T)yb;
                }
            }
        }
        /* the tail past rotary_dim passes through unchanged (partial RoPE) */
        if (rotary_dim < D) {
            for (int64_t h = 0; h < H; h++) {
                const int64_t base = (n * H + h) * D;
                for (int64_t d = rotary_dim; d < D; d++) {
                    if (accumulate) y[base + d] += x[base + d];
                    else y[base + d] = x[base + d];
                }
            }
        }
    }
}
