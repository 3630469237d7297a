/* The GEMM primitive of the CUDA backend: C = alpha * op(A) @ op(B) + beta * C through cuBLASLt, with
 * fp32 accumulation (CUBLAS_COMPUTE_32F) always.
 *
 * Operand dtypes:
 *   - A, B and C all F32: a true fp32 GEMM (no TF32), the path the fp32 tests check at 1e-5;
 *   - otherwise the inputs are BF16: a BF16 operand is used as it is; an F32 operand is read from its
 *     parameter's BF16 shadow (Tensor.shadow, kept by the ParamStore: no cost per call) or, lacking
 *     one, cast into scratch memory on every call (6 bytes of traffic per element: a few percent of a
 *     GEMM at training shapes, but it is paid on every call). C may be BF16 (activations, dx += dy W)
 *     or F32 (a parameter's gradient, dW += dy^T x with beta = 1).
 * Row-major C[M,N] is column-major C^T[N,M] = op(B)^T op(A)^T, so cuBLASLt's "A" is our B and its "B"
 * our A, each with its stored layout. Descriptors and the heuristic's algorithm are cached per
 * (shape, transposes, dtypes, pointer alignment). If cuBLASLt offers no algorithm (e.g. a leading
 * dimension its kernels cannot take) the call goes to cublasGemmStridedBatchedEx instead. Split-K
 * reductions are restricted to fp32 partial sums in the workspace: deterministic, and a BF16 output is
 * rounded once. */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <string.h>

#include "common.cuh"

using namespace msacuda;

#define CUBLAS_CHECK(call)                                                                             \
    do {                                                                                               \
        cublasStatus_t st_ = (call);                                                                   \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                              \
            msacuda::fail(#call, cublasLtGetStatusName(st_), cublasLtGetStatusString(st_), __FILE__, __LINE__); \
    } while (0)

static cublasLtHandle_t g_lt = nullptr;
static cublasHandle_t g_blas = nullptr;
static void *g_lt_ws = nullptr;
static const size_t LT_WS_BYTES = (size_t)32 << 20;

struct GemmKey {
    int ta, tb, at, bt, ct, align_a, align_b, align_c;
    int64_t M, N, K, batch;
};

struct GemmPlan {
    GemmKey key;
    bool used, lt_ok;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
};

enum { PLAN_CACHE = 128 };
static GemmPlan g_plans[PLAN_CACHE];
static int g_next_plan = 0;

static void gemm_init() {
    if (g_lt) return;
    CUBLAS_CHECK(cublasLtCreate(&g_lt));
    CUBLAS_CHECK(cublasCreate(&g_blas));
    CUBLAS_CHECK(cublasSetStream(g_blas, stream()));
    CUDA_CHECK(cudaMalloc(&g_lt_ws, LT_WS_BYTES));
}

static cudaDataType_t cuda_type(DType dt) {
    switch (dt) {
    case DT_F32: return CUDA_R_32F;
    case DT_BF16: return CUDA_R_16BF;
    default: fatal("cuda matmul: dtype %s not supported (f32 or bf16)", dtype_name(dt));
    }
}

/* largest power of two dividing the address of every batch's operand, capped at 16 bytes (what the
 * vectorised and TMA kernels need): activations anywhere in the arena then share one plan, so a
 * recomputed segment runs the same algorithm as its forward and gives the same bits */
static int alignment(const void *p, int64_t batch_stride_bytes, int64_t batch) {
    uint64_t x = (uint64_t)(uintptr_t)p | 16u;
    if (batch > 1) x |= (uint64_t)batch_stride_bytes;
    return (int)(x & (~x + 1));
}

static void destroy_plan(GemmPlan *p) {
    if (!p->used) return;
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(p->desc));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->la));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->lb));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(p->lc));
    p->used = false;
}

static cublasLtMatrixLayout_t make_layout(cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld, int64_t batch) {
    cublasLtMatrixLayout_t l;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, t, (uint64_t)rows, (uint64_t)cols, ld));
    if (batch > 1) {
        int32_t b = (int32_t)batch;
        int64_t stride = rows * cols;
        CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof b));
        CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
    }
    return l;
}

/* In cuBLASLt terms (column-major): D[N,M] = opA(LtA) opB(LtB), LtA = our B stored [br, bc] row-major,
 * i.e. a bc x br column-major matrix, transposed when tb; LtB = our A likewise. */
static GemmPlan *get_plan(const GemmKey *k) {
    for (int i = 0; i < PLAN_CACHE; i++)
        if (g_plans[i].used && memcmp(&g_plans[i].key, k, sizeof *k) == 0) return &g_plans[i];
    GemmPlan *p = &g_plans[g_next_plan];
    g_next_plan = (g_next_plan + 1) % PLAN_CACHE;
    destroy_plan(p);
    memset(p, 0, sizeof *p);
    p->key = *k;
    const int64_t ar = k->ta ? k->K : k->M, ac = k->ta ? k->M : k->K; /* our A stored [ar, ac] */
    const int64_t br = k->tb ? k->N : k->K, bc = k->tb ? k->K : k->N; /* our B stored [br, bc] */
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opa = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    p->la = make_layout((cudaDataType_t)k->bt, bc, br, bc, k->batch);
    p->lb = make_layout((cudaDataType_t)k->at, ac, ar, ac, k->batch);
    p->lc = make_layout((cudaDataType_t)k->ct, k->N, k->M, k->N, k->batch);
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = LT_WS_BYTES;
    uint32_t aa = (uint32_t)k->align_b, ab = (uint32_t)k->align_a, acn = (uint32_t)k->align_c;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    /* split-K partial sums only in fp32 (the in-place and output-type schemes would round them to a BF16 C) */
    uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof reduction));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &acn, sizeof acn));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &acn, sizeof acn));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(g_lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, 1, &res, &found);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    p->lt_ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
    if (p->lt_ok) p->algo = res.algo;
    p->used = true;
    return p;
}

/* An input operand as the dtype the GEMM reads: itself, its parameter's BF16 shadow, or a BF16 copy in
 * scratch (dst, numel elements, the caller sized it). */
static const void *as_input(const Tensor *t, bool want_bf16, bf16 *dst) {
    if (!want_bf16 || t->dtype == DT_BF16) return t->data;
    if (t->dtype != DT_F32) fatal("cuda matmul: dtype %s not supported (f32 or bf16)", dtype_name(t->dtype));
    if (t->shadow) return t->shadow;
    Tensor d = *t;
    d.dtype = DT_BF16;
    d.data = dst;
    d.shadow = nullptr;
    cuda_cast(&d, t);
    return dst;
}

extern "C" void cuda_matmul(Tensor *c, const Tensor *a, const Tensor *b, bool ta, bool tb, float alpha, float beta) {
    init();
    gemm_init();
    if (a->ndim != b->ndim || a->ndim != c->ndim || a->ndim < 2 || a->ndim > 3)
        fatal("cuda matmul: operands must all be 2-D or all 3-D");
    const int64_t batch = a->ndim == 3 ? a->shape[0] : 1;
    const int64_t ar = tensor_dim(a, -2), ac = tensor_dim(a, -1), br = tensor_dim(b, -2), bc = tensor_dim(b, -1);
    const int64_t M = ta ? ac : ar, K = ta ? ar : ac, Kb = tb ? bc : br, N = tb ? br : bc;
    if (K != Kb || tensor_dim(c, -2) != M || tensor_dim(c, -1) != N ||
        (a->ndim == 3 && (b->shape[0] != batch || c->shape[0] != batch)))
        fatal("cuda matmul: shapes do not agree (M=%lld K=%lld vs %lld N=%lld)", (long long)M, (long long)K,
              (long long)Kb, (long long)N);
    if (M == 0 || N == 0 || batch == 0) return;
    if (K == 0) { /* C = beta * C */
        if (beta == 0.0f) cuda_zero(c->data, tensor_bytes(c));
        else cuda_scale(c, beta);
        return;
    }
    (void)cuda_type(c->dtype);
    const bool bf16_inputs = !(a->dtype == DT_F32 && b->dtype == DT_F32 && c->dtype == DT_F32);
    /* scratch for the operands that need a per-call cast (16-byte aligned regions) */
    size_t need_a = bf16_inputs && a->dtype == DT_F32 && !a->shadow ? ((size_t)a->numel * 2 + 15) / 16 * 16 : 0;
    size_t need_b = bf16_inputs && b->dtype == DT_F32 && !b->shadow ? ((size_t)b->numel * 2 + 15) / 16 * 16 : 0;
    char *ws = need_a + need_b ? (char *)scratch(need_a + need_b) : nullptr;
    const void *pa = as_input(a, bf16_inputs, (bf16 *)ws);
    const void *pb = as_input(b, bf16_inputs, (bf16 *)(ws + need_a));
    const DType in_dt = bf16_inputs ? DT_BF16 : DT_F32;
    const int64_t es_in = (int64_t)dtype_size(in_dt), es_c = (int64_t)dtype_size(c->dtype);

    GemmKey key;
    memset(&key, 0, sizeof key);
    key.ta = ta;
    key.tb = tb;
    key.at = (int)cuda_type(in_dt);
    key.bt = (int)cuda_type(in_dt);
    key.ct = (int)cuda_type(c->dtype);
    key.M = M;
    key.N = N;
    key.K = K;
    key.batch = batch;
    key.align_a = alignment(pa, ar * ac * es_in, batch);
    key.align_b = alignment(pb, br * bc * es_in, batch);
    key.align_c = alignment(c->data, M * N * es_c, batch);
    GemmPlan *p = get_plan(&key);
    if (p->lt_ok) {
        CUBLAS_CHECK(cublasLtMatmul(g_lt, p->desc, &alpha, pb, p->la, pa, p->lb, &beta, c->data, p->lc, c->data, p->lc,
                                    &p->algo, g_lt_ws, LT_WS_BYTES, stream()));
        return;
    }
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || batch > INT32_MAX)
        fatal("cuda matmul: no cuBLASLt algorithm and dimensions too large for cublasGemmStridedBatchedEx");
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(g_blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N,
                                            (int)M, (int)K, &alpha, pb, cuda_type(in_dt), (int)bc, br * bc, pa,
                                            cuda_type(in_dt), (int)ac, ar * ac, &beta, c->data, cuda_type(c->dtype),
                                            (int)N, M * N, (int)batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
