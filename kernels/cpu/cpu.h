/* Internal header of the CPU reference backend.
 *
 * Every CPU kernel body is written once, in terms of a real type T, in kernels/cpu/<op>_impl.h, and
 * instantiated for float (training) and double (float64 gradient checks) by
 *     #define CPU_IMPL "<op>_impl.h"
 *     #include "instantiate.h"
 * which defines S(name) as name_f32 / name_f64. The public cpu_<op>_* functions dispatch on dtype
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

/* Each kernel file's public entry points, gathered in backend_cpu.c. */
void *cpu_alloc(size_t bytes);
void cpu_free(void *p);
void cpu_copy(void *dst, const void *src, size_t bytes);
void cpu_zero(void *dst, size_t bytes);
void cpu_axpy(Tensor *y, const Tensor *x, float alpha);
void cpu_scale(Tensor *y, float alpha);
void cpu_add(Tensor *out, const Tensor *a, const Tensor *b);
double cpu_sumsq(const Tensor *x);
void cpu_cast(Tensor *dst, const Tensor *src);
void cpu_matmul(Tensor *c, const Tensor *a, const Tensor *b, bool ta, bool tb, float alpha, float beta);
void cpu_embedding_forward(Tensor *out, const Tensor *wte, const Tensor *tokens);
void cpu_embedding_backward(Tensor *dwte, const Tensor *dout, const Tensor *tokens);
void cpu_rmsnorm_forward(Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *w, float eps, bool unit_offset);
void cpu_rmsnorm_backward(Tensor *dx, Tensor *dw, const Tensor *dy, const Tensor *x, const Tensor *w,
                          const Tensor *rstd, bool unit_offset);
void cpu_rope_forward(Tensor *y, const Tensor *x, const Tensor *positions, int rotary_dim, float theta);
void cpu_rope_backward(Tensor *dx, const Tensor *dy, const Tensor *positions, int rotary_dim, float theta);
void cpu_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                           const Tensor *cu_seqlens, float scale);
void cpu_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                            const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                            const Tensor *cu_seqlens, float scale);
void cpu_swiglu_forward(Tensor *out, const Tensor *gate, const Tensor *up);
void cpu_swiglu_backward(Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate, const Tensor *up);
int64_t cpu_cross_entropy_forward(Tensor *loss, Tensor *lse, const Tensor *logits, const Tensor *targets,
                                  int ignore_index);
void cpu_cross_entropy_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse,
                                const Tensor *targets, int ignore_index, int64_t n_valid);
void cpu_adamw_update(Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1,
                      float beta2, float eps, float weight_decay, int t);
void cpu_dropout_forward(Tensor *y, const Tensor *x, float p, uint64_t seed, int64_t offset);
void cpu_dropout_backward(Tensor *dx, const Tensor *dy, float p, uint64_t seed, int64_t offset);
void cpu_msa_indexer(Tensor *topk, const Tensor *qi, const Tensor *ki, const Tensor *cu_seqlens, const MsaParams *p);
void cpu_msa_plan(Tensor *plan, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p);
void cpu_msa_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                               const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p);
void cpu_msa_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p);
void cpu_msa_kl_forward(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                        const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                        const Tensor *cu_seqlens, const MsaParams *p);
void cpu_msa_kl_backward(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse,
                         const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                         const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p, float coeff);
double cpu_msa_recall(const Tensor *q, const Tensor *k, const Tensor *topk, const Tensor *cu_seqlens,
                      const MsaParams *p, int query_stride);
/* MoE (moe_router.c, moe_dispatch.c) */
void cpu_moe_scores_forward(Tensor *scores, const Tensor *logits, MoeScoreFunc func);
void cpu_moe_scores_backward(Tensor *dlogits, const Tensor *dscores, const Tensor *scores, MoeScoreFunc func);
void cpu_moe_topk(Tensor *idx, const Tensor *scores, const Tensor *bias, int k);
void cpu_moe_combine_weights_forward(Tensor *w, const Tensor *scores, const Tensor *idx, bool renormalize, float scale);
void cpu_moe_combine_weights_backward(Tensor *dscores, const Tensor *dw, const Tensor *scores, const Tensor *idx,
                                      bool renormalize, float scale);
void cpu_moe_plan(Tensor *offsets, Tensor *rows, const Tensor *idx);
void cpu_moe_permute_forward(Tensor *xs, const Tensor *x, const Tensor *rows);
void cpu_moe_permute_backward(Tensor *dx, const Tensor *dxs, const Tensor *rows);
void cpu_moe_unpermute_forward(Tensor *out, const Tensor *ys, const Tensor *w, const Tensor *rows);
void cpu_moe_unpermute_backward(Tensor *dys, Tensor *dw, const Tensor *dout, const Tensor *ys, const Tensor *w,
                                const Tensor *rows);
void cpu_grouped_matmul_forward(Tensor *ys, const Tensor *xs, const Tensor *w, const Tensor *offsets);
void cpu_grouped_matmul_backward(Tensor *dxs, Tensor *dw, const Tensor *dys, const Tensor *xs, const Tensor *w,
                                 const Tensor *offsets);
void cpu_moe_aux_loss_forward(Tensor *loss, const Tensor *scores, const Tensor *offsets, bool normalize);
void cpu_moe_aux_loss_backward(Tensor *dscores, const Tensor *dloss, const Tensor *scores, const Tensor *offsets,
                               bool normalize);
void cpu_moe_z_loss_forward(Tensor *loss, Tensor *lse, const Tensor *logits);
void cpu_moe_z_loss_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse);
/* bias_add.c */
void cpu_bias_add_forward(Tensor *y, const Tensor *x, const Tensor *b);
void cpu_bias_add_backward(Tensor *db, const Tensor *dy);
/* transpose.c */
void cpu_transpose01(Tensor *dst, const Tensor *src, int64_t a, int64_t b);

#endif
