/* The GPU test cases: one list (tests/gpu/cases.c) of every CUDA-vs-CPU check, each entry a case family
 * (a function of tests/gpu/test_gpu*.c) with its arguments, run in list order by test_gpu's main.
 *
 * A family runs one kernel (or a forward/backward pair) on the CPU and on the GPU from the same inputs
 * and records each comparison through the harness (gpu_check.h): the forward's outputs ("eval") and the
 * accumulating backward's gradient increments ("gradient", against the CPU's backward, which
 * tests/gradcheck.c holds to float64 finite differences). A new kernel whose entries have the shape of an
 * existing family is one GPU_CASE line in cases.c; UNARY_KERNEL below is the family of pointwise
 * activations. */
#ifndef MSA_GPU_CASES_H
#define MSA_GPU_CASES_H

#include <stddef.h>

#include "gpu_check.h"

/* ---- the list ---- */

/* A family: runs the case its argument struct describes. */
typedef void (*GpuCaseFn)(const void *args);
typedef struct GpuCase {
    const char *group; /* test_gpu --only GROUP selects by it; a group's entries are consecutive */
    GpuCaseFn run;
    void *args;        /* a copy of the family's argument struct, owned by the list (NULL: none) */
} GpuCase;

void gpu_case_add(const char *group, GpuCaseFn run, const void *args, size_t bytes);
/* GPU_CASE(group, family, ArgType, initialisers of ArgType...): one case of family in group */
#define GPU_CASE(group, family, Type, ...) gpu_case_add(group, family, &(Type){__VA_ARGS__}, sizeof(Type))
/* a family without arguments */
#define GPU_CASE0(group, family) gpu_case_add(group, family, NULL, 0)

/* Fill the list (cases.c), then read it back: *n entries in run order. */
void gpu_cases(void);
const GpuCase *gpu_case_list(int *n);
void gpu_case_list_free(void);

/* ---- families of tests/gpu/test_gpu.c: the engine's kernels ---- */

typedef struct { int64_t n; DType ydt, xdt; } AxpyAddCase;  /* axpy y += -0.75 x, then add out = y + x */
void axpy_add_case(const void *args);
typedef struct { int64_t n; DType dt; } SumsqScaleCase;     /* sumsq (fp64 sums), then scale by 0.37 */
void sumsq_scale_case(const void *args);
typedef struct { int64_t n; } CastCase;                     /* f32 -> bf16 -> f32, bit-exact */
void cast_case(const void *args);
/* c = alpha op(a) op(b) + beta c. b_param: b is an F32 parameter of a CUDA ParamStore (read through its
 * BF16 shadow); the reference keeps its F32 values. */
typedef struct {
    int64_t batch, M, N, K;
    bool ta, tb;
    DType adt, bdt, cdt;
    bool b_param;
    float alpha, beta;
} MatmulCase;
void matmul_case(const void *args);
typedef struct { int64_t V, C, N; } EmbeddingCase;          /* F32 and BF16 activations, repeated tokens */
void embedding_case(const void *args);
/* grads: 1 = dx, 2 = dw, 3 = both */
typedef struct { int ndim; int64_t shape[3]; DType act; bool has_w, unit_offset; int grads; } RmsnormCase;
void rmsnorm_case(const void *args);
/* x [rows, C] + r, then the norm (gain F32 or none); the backward with a gradient reaching h (has_dh) or
 * none; grads: 1 dx, 2 dr, 4 dw, 8 dr and dx one tensor */
typedef struct { int64_t rows, C; DType act; bool has_w, has_dh; int grads; } AddRmsnormCase;
void add_rmsnorm_case(const void *args);
typedef struct { DType act; int64_t N, H, D; int rot; float theta; int32_t maxpos; } RopeCase;
void rope_case(const void *args);
/* Dense attention through MSA_ATTENTION = impl ("own": our kernels, "cudnn": cuDNN's, forced); grads:
 * bit 0 dq, bit 1 dk, bit 2 dv. */
typedef struct {
    const char *impl;
    DType act;
    int ndocs;
    int32_t lens[9];
    int64_t Hq, Hkv, D;
    int grads;
} AttentionCase;
void attention_case(const void *args);
typedef struct { DType act; int64_t n; bool dup_null; } SwigluCase;
void swiglu_case(const void *args);
typedef struct { DType act; int64_t n; float p; uint64_t seed; int64_t offset; } DropoutCase;
void dropout_case(const void *args);
typedef struct { DType act; int64_t rows, C; } BiasAddCase; /* x of act plus an F32 bias */
void bias_add_case(const void *args);
typedef struct { DType act; int64_t N, V; int ignore_every; } CrossEntropyCase;
void cross_entropy_case(const void *args);
typedef struct { int64_t N, C, V, chunk_rows; int ignore_every; } LmHeadLossCase; /* BF16 x, F32 W */
void lm_head_loss_case(const void *args);
void device_memory_case(const void *args);
typedef struct { int64_t N, C, F, chunk_rows; } SwigluFfnCase; /* BF16 x, F32 weights */
void swiglu_ffn_case(const void *args);
typedef struct { int64_t N, C; int blocks; } CheckpointOffloadCase; /* BF16 x, F32 weights */
void checkpoint_offload_case(const void *args);
typedef struct { int64_t n; bool with_shadow; } AdamwCase;
void adamw_case(const void *args);
/* sumsq_many and adamw_update_many over count tensors of up to max_n elements */
typedef struct { int count; int64_t max_n; float grad_scale; } OptimizerManyCase;
void optimizer_many_case(const void *args);

/* A pointwise activation: entries X_forward(y, x) and X_backward(dx, dy, x) of KernelBackend, named by
 * their byte offsets in it (UNARY_KERNEL checks their types at compile time). */
typedef void (*UnaryForwardFn)(Tensor *y, const Tensor *x);
typedef void (*UnaryBackwardFn)(Tensor *dx, const Tensor *dy, const Tensor *x);
typedef struct {
    const char *name;
    size_t forward, backward;
} UnaryKernel;
#define BACKEND_ENTRY_(field, Type) (offsetof(KernelBackend, field) + 0 * sizeof(_Generic(((KernelBackend *)0)->field, Type: 1)))
#define UNARY_KERNEL(X) ((UnaryKernel){#X, BACKEND_ENTRY_(X##_forward, UnaryForwardFn), BACKEND_ENTRY_(X##_backward, UnaryBackwardFn)})
/* x ~ N(0, std) of n elements */
typedef struct { UnaryKernel kernel; DType act; int64_t n; double std; } UnaryCase;
void unary_case(const void *args);

/* The messages: the program run again in a child (test_gpu --die what, env before it) must exit 1 with
 * message on stderr. */
typedef struct { const char *env, *what, *message; } DeathCase;
void death_case(const void *args);
void e2e_case(const void *args); /* a few steps of configs/tiny.json on both devices, and the sampler */

/* ---- tests/gpu/test_gpu_msa.c: indexer, plan, recall, opcheck ---- */

typedef struct {
    int ndocs;
    int32_t lens[6];
    int H, Di;
    MsaParams p;
} IdxSpec;
/* The indexer on one input set: BF16 randn (its topk kept for a plan check), BF16 small integers, F32
 * randn, F32 small integers when f32_integer; then msa_plan of the CPU's selection. */
typedef struct { IdxSpec spec; bool f32_integer; } MsaIndexerPlanCase;
void msa_indexer_plan_case(const void *args);
typedef struct { IdxSpec spec; DType dt; bool integer; } MsaIndexerCase;
void msa_indexer_case(const void *args);
typedef struct { int64_t H; int ndocs; int32_t lens[6]; int B, K; } MsaPlanRandomCase;
void msa_plan_random_case(const void *args);
typedef struct {
    DType dt;
    int ndocs;
    int32_t lens[6];
    int64_t Hq, Hkv, D;
    int B, K, stride;
    bool null_topk;
} MsaRecallCase;
void msa_recall_case(const void *args);
void msa_opcheck_case(const void *args); /* build/opcheck msa on both devices */

/* ---- tests/gpu/test_gpu_msa_attention.c ---- */

enum { SEL_INDEXER = 0, SEL_HOT = 1, SEL_DENSE = 2 };
typedef struct {
    DType act;
    int ndocs;
    int32_t lens[6];
    int Hq, Hkv, D, B, K, init_blocks;
    int sel;        /* SEL_* */
    int plan_given; /* the CPU's plan uploaded (else the kernel builds one) */
    int grads;      /* bit 0 dq, bit 1 dk, bit 2 dv */
    int chunk;      /* queries per chunk (MSA_CUDA_MSA_CHUNK); 0: the kernel's own choice */
    int repeat;     /* run the backward twice and require bit-identical gradients */
} MsaAttentionCase;
void msa_attention_case(const void *args);

/* ---- tests/gpu/test_gpu_msa_kl.c ---- */

enum { KL_INDEXER = 0, KL_DENSE = 1 };
typedef struct {
    DType act;
    int ndocs;
    int32_t lens[6];
    int Hq, Hkv, D, Di, B, K, init_blocks;
    int sel;        /* KL_INDEXER (init_blocks 1: block 0 is selected by every query) or KL_DENSE */
    int plan_given; /* the CPU's plan uploaded (else the kernel builds one) */
    int grads;      /* bit 0 dqi, bit 1 dki */
    int window;     /* query window in tokens (MSA_CUDA_KL_WINDOW); 0: the kernel's own */
} MsaKlCase;
void msa_kl_case(const void *args);
typedef struct { DType act; bool dense; } MsaKlZeroCase; /* student == teacher: KL and gradient 0 */
void msa_kl_zero_case(const void *args);
/* msa_attention_kl_backward (the KL folded into the attention backward) against the CPU's separate kernels */
typedef struct {
    DType act;
    int ndocs;
    int32_t lens[6];
    int Hq, Hkv, D, Di, B, K, init_blocks; /* init_blocks 1: block 0 selected by every query (hot) */
    int grads;   /* bit 0 dq, 1 dk, 2 dv, 3 dqi, 4 dki, 5 the KL value */
    int chunk;   /* queries per chunk (MSA_CUDA_MSA_CHUNK); 0: the kernel's own choice */
    int kl_grad; /* the loss term's upstream gradient on the device (0.6); 0: none (1) */
    int repeat;  /* run the GPU backward twice and require bit-identical results */
} MsaAttentionKlCase;
void msa_attention_kl_case(const void *args);

/* ---- tests/gpu/test_gpu_msa_cp.c: MSA under sequence-split context parallelism ---- */

/* one rank of a cp-way zigzag split: every MSA entry on its query rows (query_index), k/v whole or as the fetched
 * blocks' rows (key_rows) */
typedef struct {
    DType act;
    int ndocs;
    int32_t lens[6];
    int Hq, Hkv, D, Di, B, K, init_blocks;
    int cp, rank;
    int fetched; /* k and v hold only the selected blocks' tokens, shuffled, found through key_rows */
    int chunk;   /* queries per attention chunk and per KL window (MSA_CUDA_MSA_CHUNK, MSA_CUDA_KL_WINDOW); 0: own */
} MsaCpCase;
void msa_cp_case(const void *args);

/* ---- tests/gpu/test_gpu_moe.c ---- */

typedef struct { DType ldt, sdt; int64_t N, E; MoeScoreFunc func; } MoeScoresCase;
void moe_scores_case(const void *args);
typedef struct { DType dt; int64_t N; int E, k; bool bias, ties, nans; } MoeTopkCase;
void moe_topk_case(const void *args);
typedef struct { DType sdt, wdt; int64_t N; int E, k; bool renorm; float scale; } MoeCombineCase;
void moe_combine_case(const void *args);
typedef struct { int64_t N; int E, k; } MoePlanCase;
void moe_plan_case(const void *args);
typedef struct { DType dt; int64_t N; int E, k; int64_t C; int grads; } MoePermuteCase;
void moe_permute_case(const void *args);
/* wmode 0: w a plain F32 tensor (BF16 activations: cast per call); 1: an F32 parameter of a CUDA
 * ParamStore, read through its BF16 shadow */
/* used: the tokens pick among experts 0 .. used-1 only (the rest get none); 0: all but the last (when E > k) */
typedef struct { DType dt; int wmode; int64_t N; int E, k; int64_t in, out; int used; } MoeGroupedCase;
void moe_grouped_case(const void *args);
typedef struct { DType dt; int64_t N; int E, k; bool normalize, no_assignments; } MoeAuxCase;
void moe_aux_case(const void *args);
typedef struct { DType dt; int64_t N, E; } MoeZCase;
void moe_z_case(const void *args);
/* moe_stats_accumulate, three calls: the losses of loss_dt (F32 or F64), aux / z false: NULL */
typedef struct { int64_t N; int E, k; DType loss_dt; bool aux, z; } MoeStatsCase;
void moe_stats_case(const void *args);
/* moe_bias_update, three times: loads 0 all zero, 1 most at the mean, 2 random */
typedef struct { int E; int loads; float rate; } MoeBiasUpdateCase;
void moe_bias_update_case(const void *args);
typedef struct { const char *what, *message; } MoeBadInputCase; /* in a child process */
void moe_bad_input_case(const void *args);
typedef struct { int variant; } MoeE2eCase; /* a small MoE model trained a few steps on both devices */
void moe_e2e_case(const void *args);
void moe_no_wait_case(const void *args); /* a whole MoE layer's kernels make the host wait nowhere */

/* ---- tests/gpu/test_gpu_cp.c ---- */

typedef struct { DType dt; int64_t a, b, inner; } TransposeCase;
void transpose_case(const void *args);
/* One rank's ring attention (attention_ring_forward / _backward): the micro-batch of documents lens is cut
 * into 2 * ranks zigzag chunks; rank `me`'s queries merge every rank's K/V block in ring order (me, me-1,
 * ...), then take the backward's share of each block; grads as AttentionCase's. */
typedef struct {
    DType act;
    int ndocs;
    int32_t lens[6];
    int ranks, me;
    int64_t Hq, Hkv, D;
    int grads;
} RingCase;
void ring_case(const void *args);

/* ---- families of tests/gpu/test_gpu_sync.c: a training step without host waits ---- */

/* warm_steps steps, then measured_steps steps that must not make the host wait (and leave their loss
 * unread), then one logged step; sets: config assignments (NULL-terminated, up to 8) on config */
typedef struct { const char *label, *config; const char *sets[9]; int warm_steps, measured_steps; } HostWaitsCase;
void host_waits_case(const void *args);
void staged_copies_case(const void *args); /* copy_from_host through the staging ring: every byte lands */
/* steps steps with train.cuda_graph off and on: the same bits (sets as in HostWaitsCase) */
typedef struct { const char *label, *config; const char *sets[9]; int steps; } CudaGraphCase;
void cuda_graph_case(const void *args);
/* steps steps with train.weight_shadow true and false: the same bits */
void weight_shadow_case(const void *args);

#endif
