/* Internal header of the CUDA backend: the entry points each .cu file of kernels/cuda exports with C
 * linkage, gathered into `cuda_backend` by backend_cuda.c (plain C, like the CPU table).
 *
 * Numerics (DESIGN §5): activations BF16 (F32 also accepted, for tests and fp32 checks), parameters,
 * their gradients and the optimizer state F32; every kernel accumulates in fp32 (fp64 for sumsq and the
 * fp64 elementwise paths); saved statistics (rmsnorm rstd, attention lse, cross-entropy lse) F32.
 * F64 tensors are accepted only by the elementwise kernels (axpy, scale, add, sumsq, cast).
 *
 * Execution: one device (the current one, device 0 unless the caller chose another with
 * cudaSetDevice before the first call), the legacy default stream, so kernels run in call order and
 * copies to the host see everything before them. Host calls must come from one thread. Every CUDA,
 * cuBLAS and cuBLASLt return code is checked; a failure prints the call, file and line and exits(1).
 * The first call of any entry point initialises the device ("no CUDA device found" when there is
 * none), so a CUDA-enabled binary runs on a machine without a GPU as long as it never calls one.
 * Set MSA_CUDA_SYNC=1 to synchronise after every kernel launch (errors then name the kernel). */
#ifndef MSA_CUDA_H
#define MSA_CUDA_H

#include "../backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* runtime.cu */
void *cuda_alloc(size_t bytes);
void cuda_free(void *p);
void cuda_copy_to_host(void *dst, const void *src, size_t bytes);
void cuda_copy_from_host(void *dst, const void *src, size_t bytes);
void cuda_copy(void *dst, const void *src, size_t bytes);
void cuda_zero(void *dst, size_t bytes);
void cuda_synchronize(void); /* cudaDeviceSynchronize: a failed kernel is reported here, naming this call */

/* elementwise.cu */
void cuda_axpy(Tensor *y, const Tensor *x, float alpha);
void cuda_scale(Tensor *y, float alpha);
void cuda_add(Tensor *out, const Tensor *a, const Tensor *b);
double cuda_sumsq(const Tensor *x);
void cuda_cast(Tensor *dst, const Tensor *src);
void cuda_swiglu_forward(Tensor *out, const Tensor *gate, const Tensor *up);
void cuda_swiglu_backward(Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate, const Tensor *up);
void cuda_bias_add_forward(Tensor *y, const Tensor *x, const Tensor *b);
void cuda_bias_add_backward(Tensor *db, const Tensor *dy);
void cuda_adamw_update(Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1, float beta2,
                       float eps, float weight_decay, int t);

/* dropout.cu */
void cuda_dropout_forward(Tensor *y, const Tensor *x, float p, uint64_t seed, int64_t offset);
void cuda_dropout_backward(Tensor *dx, const Tensor *dy, float p, uint64_t seed, int64_t offset);

/* gemm.cu */
void cuda_matmul(Tensor *c, const Tensor *a, const Tensor *b, bool ta, bool tb, float alpha, float beta);

/* embedding.cu */
void cuda_embedding_forward(Tensor *out, const Tensor *wte, const Tensor *tokens);
void cuda_embedding_backward(Tensor *dwte, const Tensor *dout, const Tensor *tokens);

/* rmsnorm.cu */
void cuda_rmsnorm_forward(Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *w, float eps, bool unit_offset);
void cuda_rmsnorm_backward(Tensor *dx, Tensor *dw, const Tensor *dy, const Tensor *x, const Tensor *w,
                           const Tensor *rstd, bool unit_offset);

/* rope.cu */
void cuda_rope_forward(Tensor *y, const Tensor *x, const Tensor *positions, int rotary_dim, float theta);
void cuda_rope_backward(Tensor *dx, const Tensor *dy, const Tensor *positions, int rotary_dim, float theta);

/* attention.cu */
void cuda_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                            const Tensor *cu_seqlens, float scale);
void cuda_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                             const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                             const Tensor *cu_seqlens, float scale);

/* cross_entropy.cu */
int64_t cuda_cross_entropy_forward(Tensor *loss, Tensor *lse, const Tensor *logits, const Tensor *targets,
                                   int ignore_index);
void cuda_cross_entropy_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse,
                                 const Tensor *targets, int ignore_index, int64_t n_valid);

/* msa_*.cu */
/* msa_plan.cu: validates topk on the device and reports a bad selection before it returns (one
 * synchronisation); it does not use scratch(), so a kernel may build a temporary plan while holding its
 * own scratch region. */
void cuda_msa_plan(Tensor *plan, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p);
/* msa_indexer.cu: BF16 (tensor cores) or F32 qi/ki; topk_blocks <= 32, Di <= 128 */
void cuda_msa_indexer(Tensor *topk, const Tensor *qi, const Tensor *ki, const Tensor *cu_seqlens, const MsaParams *p);
/* msa_attention.cu: KV-outer block-sparse attention from the plan (built here when NULL); BF16 with
 * D = 64 or 128 on tensor cores, F32 and other head dims (<= 256) on CUDA cores; topk NULL runs the
 * dense kernel. Uses scratch(); deterministic (no atomics). */
void cuda_msa_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p);
void cuda_msa_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                 const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                 const Tensor *topk, const Tensor *plan, const Tensor *cu_seqlens,
                                 const MsaParams *p);
/* msa_kl.cu: KL alignment loss, sparse KV-outer from the plan (built here when NULL) or dense
 * flash-style when topk is NULL; BF16 on tensor cores, F32 on CUDA cores; D, Di <= 256. Uses scratch();
 * deterministic (no atomics). MSA_CUDA_KL_WINDOW=<tokens> forces smaller query windows (tests). */
void cuda_msa_kl_forward(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                         const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                         const Tensor *cu_seqlens, const MsaParams *p);
void cuda_msa_kl_backward(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse,
                          const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                          const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p, float coeff);
/* msa_recall.cu */
double cuda_msa_recall(const Tensor *q, const Tensor *k, const Tensor *topk, const Tensor *cu_seqlens,
                       const MsaParams *p, int query_stride);

/* moe.cu: router, plan, permutes, grouped GEMM, balance losses. moe_plan and the grouped GEMMs synchronise
 * once per call (the plan to report bad input, the GEMMs to read the offsets); they report what any MoE
 * kernel flagged. */
void cuda_moe_scores_forward(Tensor *scores, const Tensor *logits, MoeScoreFunc func);
void cuda_moe_scores_backward(Tensor *dlogits, const Tensor *dscores, const Tensor *scores, MoeScoreFunc func);
void cuda_moe_topk(Tensor *idx, const Tensor *scores, const Tensor *bias, int k);
void cuda_moe_combine_weights_forward(Tensor *w, const Tensor *scores, const Tensor *idx, bool renormalize, float scale);
void cuda_moe_combine_weights_backward(Tensor *dscores, const Tensor *dw, const Tensor *scores, const Tensor *idx,
                                       bool renormalize, float scale);
void cuda_moe_plan(Tensor *offsets, Tensor *rows, const Tensor *idx);
void cuda_moe_permute_forward(Tensor *xs, const Tensor *x, const Tensor *rows);
void cuda_moe_permute_backward(Tensor *dx, const Tensor *dxs, const Tensor *rows);
void cuda_moe_unpermute_forward(Tensor *out, const Tensor *ys, const Tensor *w, const Tensor *rows);
void cuda_moe_unpermute_backward(Tensor *dys, Tensor *dw, const Tensor *dout, const Tensor *ys, const Tensor *w,
                                 const Tensor *rows);
void cuda_grouped_matmul_forward(Tensor *ys, const Tensor *xs, const Tensor *w, const Tensor *offsets);
void cuda_grouped_matmul_backward(Tensor *dxs, Tensor *dw, const Tensor *dys, const Tensor *xs, const Tensor *w,
                                  const Tensor *offsets);
void cuda_moe_aux_loss_forward(Tensor *loss, const Tensor *scores, const Tensor *offsets, bool normalize);
void cuda_moe_aux_loss_backward(Tensor *dscores, const Tensor *dloss, const Tensor *scores, const Tensor *offsets,
                                bool normalize);
void cuda_moe_z_loss_forward(Tensor *loss, Tensor *lse, const Tensor *logits);
void cuda_moe_z_loss_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse);

/* transpose.cu: the context-parallel block transpose (a copy in the widest word the layout allows) */
void cuda_transpose01(Tensor *dst, const Tensor *src, int64_t a, int64_t b);

#ifdef __cplusplus
}
#endif

#endif
