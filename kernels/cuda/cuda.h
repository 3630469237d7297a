/* Internal header of the CUDA backend: the entry points each .cu file of kernels/cuda exports with C
 * linkage, gathered into `cuda_backend` by backend_cuda.c (plain C, like the CPU table).
 *
 * Numerics (DESIGN §5): activations BF16 (F32 also accepted, for tests and fp32 checks), parameters,
 * their gradients and the optimizer state F32; every kernel accumulates in fp32 (fp64 for sumsq and the
 * fp64 elementwise paths); saved statistics (rmsnorm rstd, attention lse, cross-entropy lse) F32.
 * F64 tensors are accepted only by the elementwise kernels (axpy, scale, add, sumsq, cast).
 *
 * Execution: one device (the current one, device 0 unless the caller chose another with
 * cudaSetDevice before the first call), one stream of the backend's (cuda_stream(); every launch, copy,
 * memset and library call of kernels/cuda goes there, but for the asynchronous host copies' own
 * stream, below), so kernels run in call order, copies to the host
 * see everything before them, and a CUDA graph can capture a whole training step from it (graph.cu).
 * Host calls must come from one thread. Every CUDA,
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

/* The entry points cuda_<entry>, one per line of kernels.def. Where they live and what the CUDA
 * kernels add to the contracts there:
 *   graph.cu          graph_begin/end/launch/free: stream capture of the backend's stream
 *   runtime.cu        memory and copies; cuda_synchronize is cudaDeviceSynchronize, so a failed kernel
 *                     is reported there, naming that call. copy_from_host of up to 4 MiB is staged
 *                     through page-locked memory and does not wait; host_waits counts every call site
 *                     of the backend that does (copies to the host, synchronize, free, scratch growth);
 *                     copy_{to,from}_host_async run on a second stream (a copy engine) ordered against
 *                     the backend's by events, and never make the host wait
 *   elementwise.cu    axpy, scale, add, sumsq, cast, swiglu, bias_add, adamw_update, and sumsq_many,
 *                     clip_scale and adamw_update_many: the list goes to the kernel as a parameter, 32
 *                     tensors a launch (no copy), the sum and the clipping factor stay on the device
 *   dropout.cu, gemm.cu (matmul), embedding.cu, rmsnorm.cu, rope.cu, cross_entropy.cu, transpose.cu
 *                     (the context-parallel block transpose: a copy in the widest word the layout allows)
 *   attention.cu      dense attention (attention_cudnn.cu: the cuDNN path it hands BF16 shapes to; it
 *                     takes the longest document from cu_seqlens->host_data, else copies cu_seqlens to
 *                     the host); its own kernels read the visible pairs as row ranges (attention.cuh)
 *   attention_ring.cu one step of ring attention (sequence-split context parallelism): attention.cu's
 *                     kernels on the rows its index lists name, merging into the running (out, lse)
 *   cross_entropy.cu  the counted rows from targets->host_data, else a copy to the host
 *   msa_plan.cu       validates topk on the device (a bad selection is reported at the next wait); it
 *                     does not use scratch(), so a kernel may build a temporary plan while holding its own
 *                     scratch region
 *   msa_indexer.cu    BF16 (tensor cores) or F32 qi/ki; topk_blocks <= 32, Di <= 128; idx_lse by a second,
 *                     student-only pass of msa_kl.cu over the selection (a temporary plan)
 *   msa_attention.cu  KV-outer block-sparse attention from the plan (built here when NULL); BF16 with
 *                     D = 64 or 128 on tensor cores (msa_attention_tc.cu), F32 and other head dims
 *                     (<= 256) on CUDA cores (msa_attention_cc.cu); topk NULL runs the dense kernel. Uses
 *                     scratch(); deterministic (no atomics).
 *                     msa_attention_kl_backward: the KL folded into the tensor-core backward for BF16, D
 *                     and Di 64 or 128, G a power of two, >= 4 at D = 128 and >= 8 at D = 64 (<= 8 queries
 *                     per tile); other shapes run msa_attention_backward and msa_kl.cu's kernels in
 *                     sequence
 *   msa_kl.cu         KL alignment loss, sparse KV-outer from the plan (built here when NULL) or dense
 *                     flash-style when topk is NULL; BF16 on tensor cores, F32 on CUDA cores; D, Di <= 256.
 *                     Uses scratch(); deterministic (no atomics). MSA_CUDA_KL_WINDOW=<tokens> forces
 *                     smaller query windows (tests)
 *   msa_recall.cu     the recall metric
 *   gelu.cu           the GELU activation (fp32 math)
 *   moe.cu            router, plan, permutes, grouped GEMM, balance losses. moe_plan and the grouped GEMMs
 *                     synchronise once per call (the plan to report bad input, the GEMMs to read the
 *                     offsets); they report what any MoE kernel flagged */
#define KERNEL(group, ret, name, params) ret cuda_##name params;
#include "../kernels.def"
#undef KERNEL

/* where the host last waited for the device (cuda_host_waits counts them): a call site's name */
const char *cuda_last_host_wait(void);
/* The backend's stream (cudaStream_t), for work outside kernels/cuda that must be ordered with the kernels
 * (dist/nccl.c's collectives wait for an event recorded on it). */
struct CUstream_st *cuda_stream(void);

#ifdef __cplusplus
}
#endif

#endif
