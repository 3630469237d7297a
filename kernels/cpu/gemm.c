/* The CPU GEMM primitive (cpu_gemm_*) and the batched matmul kernel built on it.
 * With MSA_BLAS (the default build when cblas.h is found) it calls OpenBLAS; otherwise it runs the
 * loop nest of gemm_impl.h. */
#include "cpu.h"

#ifdef MSA_BLAS
#include <cblas.h>
#endif

#define CPU_IMPL "gemm_impl.h"
#include "instantiate.h"

void cpu_gemm_f32(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M == 0 || N == 0) return;
#ifdef MSA_BLAS
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N,
                (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
#else
    gemm_loops_f32(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

void cpu_gemm_f64(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double *A, int64_t lda,
                  const double *B, int64_t ldb, double beta, double *C, int64_t ldc) {
    if (M == 0 || N == 0) return;
#ifdef MSA_BLAS
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N,
                (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
#else
    gemm_loops_f64(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

/* c [batch?, M, N] = alpha * op(a) @ op(b) + beta * c with a, b, c of rank 2 or 3 (same batch) */
void cpu_matmul(Tensor *c, const Tensor *a, const Tensor *b, bool ta, bool tb, float alpha, float beta) {
    CPU_SAME_DTYPE("matmul", c, a, b);
    if (a->ndim != b->ndim || a->ndim != c->ndim || a->ndim < 2 || a->ndim > 3)
        fatal("cpu matmul: operands must all be 2-D or all 3-D");
    int64_t batch = a->ndim == 3 ? a->shape[0] : 1;
    int64_t ar = tensor_dim(a, -2), ac = tensor_dim(a, -1), br = tensor_dim(b, -2), bc = tensor_dim(b, -1);
    int64_t M = ta ? ac : ar, K = ta ? ar : ac, Kb = tb ? bc : br, N = tb ? br : bc;
    if (K != Kb || tensor_dim(c, -2) != M || tensor_dim(c, -1) != N || (a->ndim == 3 && (b->shape[0] != batch || c->shape[0] != batch)))
        fatal("cpu matmul: shapes do not agree (M=%lld K=%lld vs %lld N=%lld)", (long long)M, (long long)K,
              (long long)Kb, (long long)N);
    for (int64_t i = 0; i < batch; i++) {
        size_t es = dtype_size(a->dtype);
        const char *pa = (const char *)a->data + (size_t)(i * ar * ac) * es;
        const char *pb = (const char *)b->data + (size_t)(i * br * bc) * es;
        char *pc = (char *)c->data + (size_t)(i * M * N) * es;
        if (a->dtype == DT_F64)
            cpu_gemm_f64(ta, tb, M, N, K, alpha, (const double *)pa, ac, (const double *)pb, bc, beta, (double *)pc, N);
        else
            cpu_gemm_f32(ta, tb, M, N, K, alpha, (const float *)pa, ac, (const float *)pb, bc, beta, (float *)pc, N);
    }
}
