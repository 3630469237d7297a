/* The CUDA kernels' limits on their arguments, named once. The kernels refuse larger arguments at launch
 * (fatal); layers/ checks a config against the same numbers at config validation (LayerKind.requires),
 * so that such a config stops before anything is allocated, with the limit named. Plain C: included by
 * the host code and the .cu files alike.
 *
 * Limits on the token count of a micro-batch (2^30 for the indexer and the recall, INT32_MAX / 2 for the
 * attention kernels, N * topk_blocks < INT32_MAX for the plan) are left to the kernels: no micro-batch
 * that fits in a device's memory reaches them. */
#ifndef MSA_CUDA_LIMITS_H
#define MSA_CUDA_LIMITS_H

/* attention.cu, msa_attention.cu, msa_kl.cu (and its index dim), msa_recall.cu: the head dimension of q, k
 * and v (primitives.cuh dpl_of: at most 8 elements a lane of a warp) */
#define CUDA_HEAD_DIM_MAX 256
/* attention.cu, msa_attention.cu: query heads (one grid dimension); msa_kl.cu: KV heads, the same */
#define CUDA_HEADS_MAX 65535
/* msa_indexer.cu: the blocks one query selects, forced blocks included (its selection lists' shared memory) */
#define CUDA_MSA_TOPK_MAX 32
/* msa_indexer.cu: the index head dimension (msa_kl.cu alone would take CUDA_HEAD_DIM_MAX) */
#define CUDA_MSA_INDEX_DIM_MAX 128
/* msa_indexer.cu: index heads, one per GQA group (= KV heads) */
#define CUDA_MSA_INDEX_HEADS_MAX 128
/* rmsnorm.cu: the elements of a normalised row (model.d_model; the per-head norms' head dims are far
 * below). A block of at most 256 threads holds a row in registers, 8 vectors a thread: 16-byte vectors
 * in rows of a multiple of 8 elements with a 16-byte aligned start (F32: 8192; BF16 takes 16384),
 * single elements otherwise. */
#define CUDA_NORM_DIM_MAX 8192
#define CUDA_NORM_DIM_MAX_UNALIGNED 2048

#endif
