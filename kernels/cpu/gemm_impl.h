/* Typed fallback GEMM (no BLAS): C = alpha * op(A) op(B) + beta * C, double accumulation. */
static __attribute__((unused)) void S(gemm_loops)(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T *A,
                          int64_t lda, const T *B, int64_t ldb, double beta, T *C, int64_t ldc) {
#pragma omp parallel for schedule(static) if (M * N * K > 32768)
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = 0; j < N; j++) {
            double acc = 0.0;
            for (int64_t k = 0; k < K; k++) {
                double a = ta ? A[k * lda + i] : A[i * lda + k];
                double b = tb ? B[j * ldb + k] : B[k * ldb + j];
                acc += a * b;
            }
            double c = beta == 0.0 ? 0.0 : beta * C[i * ldc + j];
            C[i * ldc + j] = (T)(alpha * acc + c);
        }
    }
}
