/* Typed bodies of the MoE router kernels: scores, Top-k selection, combine weights, balance and
 * z-losses (instantiated by moe_router.c). Sums run in double whatever T is. */

static void S(moe_scores_fwd)(T *s, const T *lg, int64_t N, int64_t E, MoeScoreFunc func) {
#pragma omp parallel for schedule(static) if (N * E > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *l = lg + t * E;
        T *o = s + t * E;
        if (func == MOE_SCORE_SIGMOID) {
            for (int64_t e = 0; e < E; e++) o[e] = (T)(1.0 / (1.0 + exp(-(double)l[e])));
        } else {
            double mx = -INFINITY, sum = 0;
            for (int64_t e = 0; e < E; e++) mx = fmax(mx, (double)l[e]);
            for (int64_t e = 0; e < E; e++) sum += exp((double)l[e] - mx);
            for (int64_t e = 0; e < E; e++) o[e] = (T)(exp((double)l[e] - mx) / sum);
        }
    }
}

/* sigmoid: ds/dl = s (1 - s); softmax: dl = s * (ds - <ds, s>) */
static void S(moe_scores_bwd)(T *dl, const T *ds, const T *s, int64_t N, int64_t E, MoeScoreFunc func) {
#pragma omp parallel for schedule(static) if (N * E > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *g = ds + t * E, *p = s + t * E;
        T *d = dl + t * E;
        if (func == MOE_SCORE_SIGMOID) {
            for (int64_t e = 0; e < E; e++) d[e] += (T)((double)g[e] * p[e] * (1.0 - p[e]));
        } else {
            double dot = 0;
            for (int64_t e = 0; e < E; e++) dot += (double)g[e] * p[e];
            for (int64_t e = 0; e < E; e++) d[e] += (T)(p[e] * ((double)g[e] - dot));
        }
    }
}

/* Top-k of scores + bias per token, slot j holding the j-th best. Order: value descending, then
 * expert index ascending (so ties go to the lower expert); the j-th pick is the best element that
 * comes strictly after the (j-1)-th in that order, which needs no per-token scratch. Returns the
 * first token whose scores could not be ranked (NaN), or -1. */
static int64_t S(moe_topk)(int32_t *idx, const T *s, const float *bias, int64_t N, int64_t E, int k) {
    int64_t bad = -1;
#pragma omp parallel for schedule(static) if (N * E * k > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *p = s + t * E;
        double prev_v = INFINITY;
        int64_t prev_e = -1;
        for (int j = 0; j < k; j++) {
            int64_t best = -1;
            double bv = 0;
            for (int64_t e = 0; e < E; e++) {
                double v = (double)p[e] + (bias ? (double)bias[e] : 0.0);
                bool after_prev = v < prev_v || (v == prev_v && e > prev_e);
                if (after_prev && (best < 0 || v > bv)) {
                    best = e;
                    bv = v;
                }
            }
            if (best < 0) {
#pragma omp critical(moe_topk_bad)
                if (bad < 0 || t < bad) bad = t;
                best = 0;
            }
            idx[t * k + j] = (int32_t)best;
            prev_v = bv;
            prev_e = best;
        }
    }
    return bad;
}

static void S(moe_cw_fwd)(T *w, const T *s, const int32_t *idx, int64_t N, int64_t E, int k, bool renorm,
                          double scale) {
#pragma omp parallel for schedule(static) if (N * k > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *p = s + t * E;
        const int32_t *id = idx + t * k;
        double z = 0;
        for (int j = 0; j < k; j++) z += p[id[j]];
        if (!renorm) z = 1;
        for (int j = 0; j < k; j++) w[t * k + j] = (T)(scale * p[id[j]] / z);
    }
}

/* w_j = scale s_j / z with z = sum_i s_i: dw/ds_i = scale (dw_i - <dw, s>/z) / z; without
 * renormalisation z = 1 and the correction term vanishes. Each token writes only its own row. */
static void S(moe_cw_bwd)(T *ds, const T *dw, const T *s, const int32_t *idx, int64_t N, int64_t E, int k,
                          bool renorm, double scale) {
#pragma omp parallel for schedule(static) if (N * k > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *p = s + t * E, *g = dw + t * k;
        const int32_t *id = idx + t * k;
        T *d = ds + t * E;
        if (!renorm) {
            for (int j = 0; j < k; j++) d[id[j]] += (T)(scale * g[j]);
            continue;
        }
        double z = 0, gs = 0;
        for (int j = 0; j < k; j++) {
            z += p[id[j]];
            gs += (double)g[j] * p[id[j]];
        }
        for (int j = 0; j < k; j++) d[id[j]] += (T)(scale * ((double)g[j] - gs / z) / z);
    }
}

/* a_t = sum_e f_e s[t,e] (/ S_t), loss = E / N * sum_t a_t */
static void S(moe_aux_fwd)(T *loss, const T *s, const int32_t *off, int64_t N, int64_t E, bool norm) {
    double M = off[E], acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc) if (N * E > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *p = s + t * E;
        double a = 0, st = 0;
        for (int64_t e = 0; e < E; e++) {
            a += (off[e + 1] - off[e]) / M * p[e];
            st += p[e];
        }
        acc += norm ? a / st : a;
    }
    loss[0] = (T)(N > 0 && M > 0 ? (double)E * acc / (double)N : 0.0);
}

/* d a_t / d s[t,e] = (f_e - a_t) / S_t when normalised, f_e otherwise */
static void S(moe_aux_bwd)(T *ds, double dloss, const T *s, const int32_t *off, int64_t N, int64_t E, bool norm) {
    double M = off[E];
    if (N == 0 || M == 0) return;
    double g = dloss * (double)E / (double)N;
#pragma omp parallel for schedule(static) if (N * E > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *p = s + t * E;
        T *d = ds + t * E;
        double a = 0, st = 1;
        if (norm) {
            st = 0;
            for (int64_t e = 0; e < E; e++) {
                a += (off[e + 1] - off[e]) / M * p[e];
                st += p[e];
            }
            a /= st;
        }
        for (int64_t e = 0; e < E; e++) d[e] += (T)(g * ((off[e + 1] - off[e]) / M - a) / st);
    }
}

static void S(moe_z_fwd)(T *loss, T *lse, const T *lg, int64_t N, int64_t E) {
    double acc = 0;
#pragma omp parallel for schedule(static) reduction(+ : acc) if (N * E > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *l = lg + t * E;
        double mx = -INFINITY, sum = 0;
        for (int64_t e = 0; e < E; e++) mx = fmax(mx, (double)l[e]);
        for (int64_t e = 0; e < E; e++) sum += exp((double)l[e] - mx);
        double z = mx + log(sum);
        lse[t] = (T)z;
        acc += z * z;
    }
    loss[0] = (T)(N > 0 ? acc / (double)N : 0.0);
}

/* d/dl[t,e] of lse_t^2 / N = 2 lse_t softmax(l_t)_e / N */
static void S(moe_z_bwd)(T *dl, double dloss, const T *lg, const T *lse, int64_t N, int64_t E) {
    if (N == 0) return;
    double g = 2.0 * dloss / (double)N;
#pragma omp parallel for schedule(static) if (N * E > 65536)
    for (int64_t t = 0; t < N; t++) {
        const T *l = lg + t * E;
        double z = lse[t];
        for (int64_t e = 0; e < E; e++) dl[t * E + e] += (T)(g * z * exp((double)l[e] - z));
    }
}
