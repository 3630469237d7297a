/* The GPU tests' harness, shared by the test files of tests/gpu (make test-gpu).
 *
 * Every CUDA kernel is held to the CPU reference: fresh random inputs for each case, the GPU outputs
 * poisoned with NaN before the call (so an unwritten element fails), the reference run on F32 copies of
 * the very values the GPU holds (BF16-rounded where the GPU tensor is BF16). Accumulating outputs
 * (gradients) start from random values on the GPU and from zero on the CPU, and the increments are
 * compared. Relative error ||gpu - ref|| / ||ref|| must be <= TOL_BF16 when a BF16 tensor takes part,
 * <= TOL_F32 on all-F32 paths; a NaN fails. */
#ifndef MSA_GPU_CHECK_H
#define MSA_GPU_CHECK_H

#include <stdbool.h>
#include <stdint.h>

#include "../../kernels/backend.h"
#include "../../kernels/util.h"
#include "../test.h"

#define TOL_BF16 1e-2
#define TOL_F32 1e-5

/* The harness's one piece of mutable state: the backends, the random stream of the inputs, the
 * pass/fail counters (main sets tc), this program's path (for the checks run in a child process) and
 * the case list (gpu_cases.h). */
typedef struct GpuCheck {
    const KernelBackend *gpu, *cpu;
    Rng rng;
    TestCtx *tc;
    const char *self;
    struct GpuCase *cases;
    int ncases, cap;
} GpuCheck;
extern GpuCheck gpu_check;
#define GB (gpu_check.gpu)
#define CB (gpu_check.cpu)
#define TC (gpu_check.tc)

/* host BF16, round to nearest even as __float2bfloat16_rn */
uint16_t bf16_bits(float f);
float bf16_value(uint16_t h);
float round_to(DType dt, float f); /* f rounded to what dtype dt holds */

/* tensors on either backend; upload/download convert from/to host F32 */
Tensor mk(const KernelBackend *be, DType dt, int ndim, const int64_t *shape);
void upload_f32(Tensor *g, const float *h);
float *download_f32(const Tensor *g);
void poison(Tensor *g); /* all bits set: NaN in F32 and BF16 */
void free_t(Tensor *t);
float *randn(int64_t n, double mean, double std);

/* The same values on both sides: c (CPU, F32, or I32) and g (GPU, dtype gdt); h the host copy. */
typedef struct {
    Tensor c, g;
    float *h;
} Pair;
Pair pair_from(DType gdt, int ndim, const int64_t *shape, const float *vals);
Pair pair_rand(DType gdt, int ndim, const int64_t *shape, double mean, double std);
Pair pair_i32(int64_t n, const int32_t *vals);
Pair pair_out(DType gdt, int ndim, const int64_t *shape); /* GPU side poisoned, CPU side zeroed */
void pair_free(Pair *p);

/* checks: one passed or failed count each */
void record(bool ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
double rel_err_f32(const float *a, const float *b, int64_t n, bool *nan);
double tol_of(DType path);
void check_h(const char *what, const Tensor *g, const float *ref, double tol); /* GPU tensor vs host ref */
void check(const char *what, const Pair *p, double tol);

/* A gradient for an accumulating backward: CPU side from zero (the result is the increment), GPU side
 * from g0, random of the increment's size (grad_arm, after the CPU ran); grad_check compares increments. */
typedef struct {
    Pair p;
    float *g0;
} Grad;
Grad grad_new(DType gdt, int ndim, const int64_t *shape);
void grad_arm(Grad *gr);
void grad_check(const char *what, Grad *gr, double tol);
void grad_free(Grad *gr);

const char *dn(DType dt);

/* An attention case's tensors (dense: test_gpu.c; MSA: test_gpu_msa_attention.c). attn_inputs: random
 * q [N, Hq, D], k and v [N, Hkv, D], and the forward's outputs out [N, Hq, D] and lse [Hq, N]. After the
 * CPU forward, attn_backward_inputs: the backward runs from the reference's out and lse on both sides
 * (o2, l2: those values as the GPU's dtype holds them) with a random dout, into the accumulating
 * gradients dq, dk, dv. */
typedef struct {
    Pair q, k, v, out, lse, o2, l2, dout;
    Grad dq, dk, dv;
} AttnCase;
AttnCase attn_inputs(DType act, int64_t N, int64_t Hq, int64_t Hkv, int64_t D);
void attn_backward_inputs(AttnCase *a, DType act);
void attn_check_forward(const AttnCase *a, const char *label, const char *desc, double tol); /* "<label> fwd out|lse <desc>" */
void attn_arm_grads(AttnCase *a); /* grad_arm of dq, dk, dv, after the CPU backward */
/* grad_check of the gradients selected by grads (bit 0 dq, bit 1 dk, bit 2 dv): "<label> bwd dq <desc>", with
 * " (others NULL)" when not all three were asked for */
void attn_check_grads(AttnCase *a, int grads, const char *label, const char *desc, double tol);
void attn_free(AttnCase *a);

/* --bench helpers: a synchronisation (a copy to the host waits for all queued work) and a GPU tensor of
 * random N(0, std) values */
void gpu_sync(void);
Tensor dev_rand(DType dt, int ndim, const int64_t *shape, double std);
/* The MSA benchmarks' selection: one document of N tokens, block B; each query takes its own block and
 * K-1 distinct random earlier blocks (all of them when it sees at most K), ascending, -1 padded. Makes
 * topk [Hkv, N, K] and cu_seqlens {0, N} on the GPU and allocates (does not build) the plan. Returns the
 * attended (query, key) pairs per group (mean over the groups), for the FLOP counts. */
double msa_bench_selection(Tensor *topk, Tensor *cu, Tensor *plan, int64_t Hkv, int64_t N, int B, int K);

/* --bench parts defined outside test_gpu.c */
void bench_msa_indexer(void);       /* tests/gpu/test_gpu_msa.c */
void bench_msa_attention_gpu(void); /* tests/gpu/test_gpu_msa_attention.c */
void bench_msa_kl_gpu(void);        /* tests/gpu/test_gpu_msa_kl.c: KL forward + backward at N = 8K, 32K */
void bench_moe_grouped(void);       /* tests/gpu/test_gpu_moe.c: the experts' grouped GEMMs, grouped vs per-expert */

#endif
