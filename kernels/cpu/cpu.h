/* Internal header of the CPU reference backend.
 *
 * Every CPU kernel body is written once, in terms of a real type T, in kernels/cpu/<op>_impl.h, and
 * instantiated for float (training) and double (float64 gradient checks) by
 *     #define CPU_IMPL "<op>_impl.h"
 *     #include "instantiate.h"
 * which defines S(name) as name_f32 / name_f64. A small kernel may keep its typed bodies in its own .c
 * file instead, below `#ifdef S` (the file names itself as CPU_IMPL: instantiate.h includes it again
 * once per type, with S defined). The public cpu_<op>_* functions dispatch on dtype
 * with CPU_CALL. Accumulations that matter (norms, softmax sums, dot products of attention) are done
 * in double whatever T is. */
#ifndef MSA_CPU_H
#define MSA_CPU_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "../backend.h"
#include "../util.h"

/* Call name_f32 or name_f64 by the dtype of tensor t (F32 or F64 only). */
#define CPU_CALL(t, name, ...)                                                                      \
    do {                                                                                            \
        if ((t)->dtype == DT_F64) name##_f64(__VA_ARGS__);                                          \
        else if ((t)->dtype == DT_F32) name##_f32(__VA_ARGS__);                                     \
        else fatal("cpu backend: %s does not support dtype %s", #name, dtype_name((t)->dtype));     \
    } while (0)

/* Abort unless all float tensors passed share t's dtype (a mixed call is a programming error). */
void cpu_check_dtypes(const char *kernel, const Tensor *t, const Tensor *const *others, int n);
#define CPU_SAME_DTYPE(kernel, t, ...)                                                              \
    cpu_check_dtypes(kernel, t, (const Tensor *const[]){__VA_ARGS__},                               \
                     (int)(sizeof((const Tensor *const[]){__VA_ARGS__}) / sizeof(const Tensor *)))

/* Row-major GEMM: C[M,N] = alpha * op(A) @ op(B) + beta * C, op(A) [M,K], op(B) [K,N].
 * BLAS (OpenBLAS) when built with it, else an OpenMP loop nest with double accumulation. */
void cpu_gemm_f32(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
void cpu_gemm_f64(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double *A, int64_t lda,
                  const double *B, int64_t ldb, double beta, double *C, int64_t ldc);

/* Each kernel file's public entry points cpu_<entry>, one per line of kernels.def, gathered in
 * backend_cpu.c. */
#define KERNEL(group, ret, name, params) ret cpu_##name params;
#include "../kernels.def"
#undef KERNEL

#endif
