/* Typed bodies of bias_add (instantiated by bias_add.c): y[r, c] = x[r, c] + b[c]. */
static void S(bias_add_fwd)(T *y, const T *x, const T *b, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) y[r * cols + c] = x[r * cols + c] + b[c];
}

/* db[c] += sum_r dy[r, c], accumulated in double: a bias gradient sums over every token of the batch */
static void S(bias_add_bwd)(T *db, const T *dy, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t c = 0; c < cols; c++) {
        double s = 0.0;
        for (int64_t r = 0; r < rows; r++) s += dy[r * cols + c];
        db[c] += (T)s;
    }
}
