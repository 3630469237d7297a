/* The CUDA backend's dispatch table (kernels/cuda/cuda.h lists the kernels and their conventions).
 * Built only when nvcc is present (the Makefile then defines MSA_CUDA everywhere).
 *
 * The MSA and MoE entries are NULL for now: their CUDA kernels come next (issue 6, second part).
 * Nothing may call through a NULL entry: the autograd ops that use them check first
 * (BACKEND_REQUIRE in backend.h), and backend_missing() lets a program refuse an MSA or MoE
 * configuration on this backend at start-up with a message instead of failing mid-run. */
#include "cuda.h"

const KernelBackend cuda_backend = {
    .name = "cuda",
    .device = DEV_CUDA,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .copy_to_host = cuda_copy_to_host,
    .copy_from_host = cuda_copy_from_host,
    .copy = cuda_copy,
    .zero = cuda_zero,
    .axpy = cuda_axpy,
    .scale = cuda_scale,
    .add = cuda_add,
    .sumsq = cuda_sumsq,
    .cast = cuda_cast,
    .matmul = cuda_matmul,
    .embedding_forward = cuda_embedding_forward,
    .embedding_backward = cuda_embedding_backward,
    .rmsnorm_forward = cuda_rmsnorm_forward,
    .rmsnorm_backward = cuda_rmsnorm_backward,
    .rope_forward = cuda_rope_forward,
    .rope_backward = cuda_rope_backward,
    .attention_forward = cuda_attention_forward,
    .attention_backward = cuda_attention_backward,
    .dropout_forward = cuda_dropout_forward,
    .dropout_backward = cuda_dropout_backward,
    .swiglu_forward = cuda_swiglu_forward,
    .swiglu_backward = cuda_swiglu_backward,
    .cross_entropy_forward = cuda_cross_entropy_forward,
    .cross_entropy_backward = cuda_cross_entropy_backward,
    .adamw_update = cuda_adamw_update,
    /* MSA (msa_indexer, msa_attention_*, msa_kl_*, msa_recall): NULL until the CUDA kernels land */
    /* MoE (moe_*, grouped_matmul_*): NULL until the CUDA kernels land */
    .bias_add_forward = cuda_bias_add_forward,
    .bias_add_backward = cuda_bias_add_backward,
};
