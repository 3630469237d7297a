/* Typed bodies of token cross-entropy (instantiated by cross_entropy.c). Math in double. */
static int64_t S(ce_fwd)(T *loss, T *lse, const T *logits, const int32_t *targets, int64_t N, int64_t V,
                         int ignore_index) {
    double total = 0.0;
    int64_t n_valid = 0;
#pragma omp parallel for reduction(+ : total, n_valid) schedule(static) if (N * V > 65536)
    for (int64_t n = 0; n < N; n++) {
        const T *row = logits + n * V;
        double mx = -INFINITY, s = 0.0;
        for (int64_t v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
        for (int64_t v = 0; v < V; v++) s += exp((double)row[v] - mx);
        double l = mx + log(s);
        lse[n] = (T)l;
        if (targets[n] == ignore_index) continue;
        total += l - (double)row[targets[n]];
        n_valid++;
    }
    *loss = (T)(n_valid ? total / (double)n_valid : 0.0);
    return n_valid;
}

static void S(ce_bwd)(T *dlogits, double dloss, const T *logits, const T *lse, const int32_t *targets, int64_t N,
                      int64_t V, int ignore_index, int64_t n_valid) {
    if (n_valid == 0) return;
    double sc = dloss / (double)n_valid;
#pragma omp parallel for schedule(static) if (N * V > 65536)
    for (int64_t n = 0; n < N; n++) {
        if (targets[n] == ignore_index) continue;
        const T *row = logits + n * V;
        T *drow = dlogits + n * V;
        for (int64_t v = 0; v < V; v++) {
            double p = exp((double)row[v] - (double)lse[n]);
            drow[v] += (T)(sc * (p - (v == targets[n] ? 1.0 : 0.0)));
        }
    }
}
