/* The one dispatch table between autograd and the kernels.
 *
 * Each backend (kernels/cpu, kernels/cuda) fills a KernelBackend with its functions; autograd calls
 * kernels only through it, so an op's rule is written once for every device. Its entries, their
 * signatures and contracts are declared once, in kernels.def. Conventions:
 *   - "rows" of token-major activations are tokens: x is [N, C] or [N, H, D] with N = all tokens of
 *     the micro-batch (sequences and the documents packed in them laid end to end);
 *   - cu_seqlens (i32, [ndocs+1], cu_seqlens[0] = 0, last = N) marks document starts; attention
 *     never crosses a document boundary, and the batch's sequence boundaries are document
 *     boundaries too;
 *   - saved statistics (rmsnorm's rstd, attention's lse, ...) are F32, or F64 when the activations are
 *     F64 (gradient checks), so that float64 checks are exact;
 *   - every *_backward function ACCUMULATES (+=) into its gradient outputs, and skips a gradient
 *     output passed as NULL (frozen or not needed).
 */
#ifndef MSA_BACKEND_H
#define MSA_BACKEND_H

#include <math.h>

#include "tensor.h"

/* MSA hyper-parameters of one layer (DESIGN §4). Blocks count from each document's first token. */
typedef struct MsaParams {
    int block_size;    /* B: tokens per KV block */
    int topk_blocks;   /* k: selected blocks per (query, group), forced blocks included */
    int init_blocks;   /* leading blocks of the document always selected (inside the budget) */
    int local_blocks;  /* the query's own block and the local_blocks-1 before it, always selected */
    float scale;       /* main-branch softmax scale, 1/sqrt(d) */
    float index_scale; /* index-branch score scale, 1/sqrt(d_idx); the student's temperature */
    /* NULL: the queries are the N tokens (q, qi, topk, lse, idx_lse have the rows of k, v, ki). Else i32 [Nq],
     * ascending: the token of each query row, and the query-side tensors have Nq rows while the key-side
     * ones keep the N tokens (of which a kernel reads only the rows the queries select): context
     * parallelism over the sequence (layers/msa.c), on either backend; no plan (the kernels build their own). */
    const Tensor *query_index;
    /* NULL: k and v have a row per token. Else i32 [N]: the row of k and v that holds each token, -1 for a
     * token they do not hold (the fetched blocks of sequence-split context parallelism, op_cp_fetch_blocks:
     * only the tokens the selection reads need a row); with query_index only. */
    const Tensor *key_rows;
} MsaParams;

/* The tokens of the micro-batch, given k: its rows, or key_rows' count when k holds only some of them. */
static inline int64_t msa_token_count(const Tensor *k, const MsaParams *p) {
    return p && p->key_rows ? p->key_rows->numel : k->shape[0];
}

/* The rotary frequencies of one forward (layers/rope_scaling.c computes them from the config on the host,
 * once, for every backend): pair i of the first rotary_dim dims of a head turns by position * inv_freq[i],
 * and the rotated values are multiplied by attention_scale (transformers' attention_scaling, which
 * multiplies cos and sin: YaRN's attention factor, 1 otherwise); dims past rotary_dim pass unscaled. */
typedef struct RopeTable {
    int rotary_dim;
    double attention_scale;
    const double *inv_freq; /* host memory, rotary_dim / 2 values */
} RopeTable;

/* MoE router score function (train/moe.c): softmax over the experts, or an independent sigmoid per
 * expert (DeepSeek-V3). */
typedef enum { MOE_SCORE_SOFTMAX = 0, MOE_SCORE_SIGMOID = 1 } MoeScoreFunc;

/* One parameter (or the part of one in an optimizer's shard) for adamw_update_many: the tensors of an
 * adamw_update call, its multiple of the step's learning rate and its weight decay. */
typedef struct AdamwPart {
    Tensor param, grad, m, v;
    float lr_scale, weight_decay;
} AdamwPart;

/* The numbers of an AdamW update that change from step to step, which adamw_update_many reads from the
 * backend's memory (an f64 tensor of ADAMW_SCHEDULE values) so that a captured step (a CUDA graph) reads
 * each step's own: the learning rate and the bias corrections 1 - beta^t of step t (1-based). */
enum { ADAMW_LR = 0, ADAMW_BIAS1 = 1, ADAMW_BIAS2 = 2, ADAMW_SCHEDULE = 3 };
static inline double adamw_bias_correction(double beta, int t) { return 1.0 - pow(beta, t); }

/* The device memory a backend sees (device_memory): what the driver counts in use on the device (every
 * context on it, libraries' workspaces included) and its size; of it, what the backend's alloc entry handed
 * out and has not freed (parameters, optimizer state, the activation arena's chunks, ...), and its own
 * scratch buffer. The CPU: all 0. */
typedef struct DeviceMemory {
    int64_t used, total, allocated, scratch;
} DeviceMemory;

typedef struct KernelBackend {
    const char *name;
    Device device;
    /* one function pointer per entry of kernels.def, in its order (the contracts are written there) */
#define KERNEL(group, ret, name, params) ret(*name) params;
#include "kernels.def"
#undef KERNEL
} KernelBackend;

/* Entry groups (the first column of kernels.def). CORE entries every backend has; a backend may lack the
 * MSA, MoE, RING or GRAPH group (its table file says which groups it fills; the CPU fills all but GRAPH,
 * CUDA all of them: a step captured as a graph is a CUDA thing, train.cuda_graph).
 * backend_missing returns the name of the first NULL entry among CORE and the groups asked for, or
 * NULL when the backend has them all: programs check it at start-up to refuse such a configuration
 * with a message. BACKEND_REQUIRE(be, entry) guards a call site (needs kernels/util.h for fatal): a
 * call through a NULL entry must never happen. */
enum { BACKEND_CORE = 0, BACKEND_MSA = 1, BACKEND_MOE = 2, BACKEND_RING = 4, BACKEND_GRAPH = 8 };
static inline const char *backend_missing(const KernelBackend *be, int groups) {
#define KERNEL(group, ret, name, params)                                                            \
    if ((BACKEND_##group == BACKEND_CORE || (groups & BACKEND_##group)) && !be->name) return #name;
#include "kernels.def"
#undef KERNEL
    return 0;
}
#define BACKEND_REQUIRE(be, entry)                                                                  \
    do {                                                                                            \
        if (!(be)->entry)                                                                           \
            fatal("the %s backend has no %s kernel: MSA and MoE layers need a backend that has",    \
                  (be)->name, #entry);                                                              \
    } while (0)

/* elements per group of an MSA plan (see msa_plan in kernels.def) */
static inline int64_t msa_plan_width(int64_t N, int64_t k) { return (N + 1) + N * k + 2 * N; }

extern const KernelBackend cpu_backend;
#ifdef MSA_CUDA
extern const KernelBackend cuda_backend;
#endif

#endif
