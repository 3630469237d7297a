/* MSA plan on the GPU: the reverse map key block -> queries of a Top-k selection, in the i32 layout
 * backend.h defines (msa_plan), bit-identical to the CPU's (kernels/cpu/msa_plan.c).
 *
 * Per group g it is a stable counting sort of the (query, slot) pairs by their global block row:
 *   1. doc_blocks + a CUB exclusive scan: blk_base[d] = first global row of document d;
 *   2. keys: one thread per query validates its topk row (ids ascending, visible, -1 only after them,
 *      at least one) and writes key = row of each selected block (a sentinel past every row for -1),
 *      value = the query, in (query, slot) order;
 *   3. sort_pairs (primitives.cuh: CUB's radix sort, stable, so each row keeps its queries ascending,
 *      as the CPU's scatter in query order does; no atomics decide any position, so the plan is
 *      deterministic), the values landing straight in the plan's q_idx;
 *   4. rows: row_ptr[r] = first sorted position with key >= r (a binary search per row), q_idx past
 *      the last selection zeroed, row_lo/row_hi from the document table.
 * Cost ~ a 2-3 pass radix sort of N*k pairs per group (N = 128K, k = 16: 2M pairs, ~11 key bits).
 * With a query_index (sequence-split context parallelism; the kernels' own temporary plans only) the queries
 * are the Nq rows: step 2 takes each row's document and visible blocks from its token, the values are rows,
 * and the plan is msa_plan_width_rows(N, Nq, k) wide (rows over the N tokens' blocks, lists of Nq * k), the
 * map the CPU's kernels build for themselves (msa_build_key_queries).
 *
 * Bad input is found on the device and recorded in the error word (common.cuh) with what the CPU's
 * messages name; the host reports it at its next copy to the host (at the latest a logged step's loss read),
 * so building a plan costs no round trip. Until then the plan of a bad selection stays memory-safe
 * (keys clamped to valid rows or the sentinel): the attention kernels that trust it read only valid
 * blocks, and the run stops at that read (a step read every step, as the tests do, stops before its
 * update; run_train on a GPU reads on logged steps only, so updates until the next one use it).
 * Workspace: a private buffer (not scratch(), so that a kernel holding its scratch region may build a
 * temporary plan in the middle of its own call). */
#include <limits.h>

#include <cub/device/device_scan.cuh>

#include "msa_plan.cuh"

namespace msacuda {

int64_t msa_check_params(const char *kernel, const MsaParams *p, const Tensor *cu_seqlens) {
    if (!p) fatal("cuda %s: MsaParams is NULL", kernel);
    if (p->block_size < 1) fatal("cuda %s: block_size must be >= 1, got %d", kernel, p->block_size);
    if (p->topk_blocks < 1) fatal("cuda %s: topk_blocks must be >= 1, got %d", kernel, p->topk_blocks);
    if (p->init_blocks < 0) fatal("cuda %s: init_blocks must be >= 0, got %d", kernel, p->init_blocks);
    if (p->local_blocks < 1)
        fatal("cuda %s: local_blocks must be >= 1 (the query's own block is always selected), got %d", kernel,
              p->local_blocks);
    if (p->init_blocks + p->local_blocks > p->topk_blocks)
        fatal("cuda %s: init_blocks (%d) + local_blocks (%d) exceed the budget topk_blocks (%d)", kernel, p->init_blocks,
              p->local_blocks, p->topk_blocks);
    if (!cu_seqlens) fatal("cuda %s: cu_seqlens is NULL", kernel);
    if (cu_seqlens->dtype != DT_I32 || cu_seqlens->ndim != 1 || cu_seqlens->numel < 2)
        fatal("cuda %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1 (got %s with %lld elements)", kernel,
              dtype_name(cu_seqlens->dtype), (long long)cu_seqlens->numel);
    if (cu_seqlens->numel > INT32_MAX / 2) fatal("cuda %s: too many documents", kernel);
    return cu_seqlens->numel - 1;
}

const int32_t *msa_query_tokens(const char *kernel, const MsaParams *p, int64_t Nq, int64_t N) {
    if (p->key_rows) {
        if (!p->query_index) fatal("cuda %s: key_rows come with a query_index (sequence-split context parallelism)", kernel);
        if (p->key_rows->dtype != DT_I32 || p->key_rows->numel != N || p->key_rows->device != DEV_CUDA)
            fatal("cuda %s: key_rows must be i32 [N = %lld] on the CUDA device, got %s with %lld elements", kernel,
                  (long long)N, dtype_name(p->key_rows->dtype), (long long)p->key_rows->numel);
    }
    if (!p->query_index) {
        if (Nq != N)
            fatal("cuda %s: %lld query rows and %lld tokens, but no query_index names the queries' tokens", kernel,
                  (long long)Nq, (long long)N);
        return nullptr;
    }
    const Tensor *qx = p->query_index;
    if (qx->dtype != DT_I32 || qx->numel != Nq || qx->device != DEV_CUDA)
        fatal("cuda %s: query_index must be i32 [Nq = %lld] on the CUDA device, got %s with %lld elements", kernel,
              (long long)Nq, dtype_name(qx->dtype), (long long)qx->numel);
    return (const int32_t *)qx->data;
}

}  // namespace msacuda

using namespace msacuda;

namespace {

constexpr int THREADS = 256;

/* A grow-only device buffer (an alloc and free per call would make the host wait at every free); growing
 * waits for the device, so no earlier call still reads the old one. */
void *grow_only(void *&buf, size_t &cap, size_t bytes) {
    if (bytes > cap) {
        cuda_free(buf);
        cap = bytes + bytes / 4 + 4096;
        buf = cuda_alloc(cap);
    }
    return buf;
}

/* Token j's row of the fetched rows (key_rows[j], -1: zeros), in 2-byte units (f32 and bf16 rows alike); a
 * key_rows entry outside [-1, M) goes to the error word and reads as -1. */
__global__ void keys_by_token_kernel(uint16_t *dst, const uint16_t *src, const int32_t *key_rows, int64_t N, int M,
                                     int64_t units, int *err) {
    const int64_t total = N * units;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = i / units, u = i - j * units;
        int r = key_rows[j];
        if (r < -1 || r >= M) {
            if (u == 0) report_error(err, ERR_MSA_ROWS, 0, (int)j, r, M);
            r = -1;
        }
        dst[i] = r >= 0 ? src[(int64_t)r * units + u] : (uint16_t)0;
    }
}

}  // namespace

namespace msacuda {

Tensor msa_keys_by_token(const char *kernel, const Tensor *src, const MsaParams *p, int slot) {
    Tensor t = *src;
    if (!p->key_rows) return t;
    if (src->ndim != 3 || (dtype_size(src->dtype) % 2) != 0)
        fatal("cuda %s: k and v must be [rows, Hkv, D] of f32 or bf16 with key_rows", kernel);
    static void *buf[2] = {nullptr, nullptr};
    static size_t cap[2] = {0, 0};
    const int64_t N = p->key_rows->numel, M = src->shape[0];
    const int64_t units = src->shape[1] * src->shape[2] * (int64_t)dtype_size(src->dtype) / 2;
    t.shape[0] = N;
    t.numel = N * src->shape[1] * src->shape[2];
    t.data = grow_only(buf[slot], cap[slot], (size_t)(N * units) * 2);
    if (N * units > 0) {
        keys_by_token_kernel<<<grid_for(N * units, THREADS), THREADS, 0, stream()>>>(
            (uint16_t *)t.data, (const uint16_t *)src->data, (const int32_t *)p->key_rows->data, N, (int)M, units, errbuf());
        LAUNCH_CHECK("msa key rows by token");
    }
    return t;
}

}  // namespace msacuda

namespace {
/* Grow-only device workspace of the plan (see the file comment for why not scratch()). */
void *plan_workspace(size_t bytes) {
    static void *buf = nullptr;
    static size_t cap = 0;
    if (bytes > cap) {
        release(buf, "msa_plan workspace growth"); /* synchronises: no earlier plan still uses it */
        buf = nullptr;
        const size_t want = bytes + bytes / 4 + 4096;
        CUDA_CHECK(cudaMalloc(&buf, want));
        cap = want;
    }
    return buf;
}

/* nb[d] = blocks of document d (nb[ndocs] = 0, so that the exclusive scan's last entry is R); a bad
 * cu_seqlens entry goes to the error word. */
__global__ void doc_blocks_kernel(int64_t *nb, int *err, const int32_t *cu, int ndocs, int64_t N, int B) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i <= ndocs; i += (int64_t)gridDim.x * blockDim.x) {
        const bool bad = (i == 0 && cu[0] != 0) || (i == ndocs && cu[ndocs] != N) || (i > 0 && cu[i] < cu[i - 1]);
        if (bad) report_error(err, ERR_CU_SEQLENS, (int)i, cu[i]);
        int64_t len = i < ndocs ? (int64_t)cu[i + 1] - cu[i] : 0;
        len = len < 0 ? 0 : len > N ? N : len; /* memory safety only: bad input is reported anyway */
        nb[i] = (len + B - 1) / B;
    }
}

/* One thread per query row t of group g (token q_token[t], or t): validate its row of topk (a bad row goes to
 * the error word: the message of the CPU's msa_check_topk, read at the host's next synchronisation) and emit its
 * (key, value = t) pairs; the keys of a bad row are clamped so the plan stays memory-safe. Group 0 also checks
 * the query tokens (ascending within [0, N)). */
__global__ void block_keys_kernel(uint32_t *keys, int32_t *vals, int *err, const int32_t *topk_g, const int32_t *q_token,
                                 const int32_t *cu, const int64_t *blk_base, int ndocs, int64_t N, int64_t Nq, int K, int B,
                                 uint32_t sentinel, int g) {
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < Nq; t += (int64_t)gridDim.x * blockDim.x) {
        if (q_token && g == 0 && (q_token[t] < 0 || q_token[t] >= N || (t > 0 && q_token[t] <= q_token[t - 1])))
            report_error(err, ERR_MSA_ROWS, 1, (int)t, q_token[t], (int)N);
        const int64_t tok = msa_row_token(q_token, (int)t, (int)N);
        const int d = msa_doc_of(cu, ndocs, tok);
        const int64_t s = min(max((int64_t)cu[d], (int64_t)0), tok);
        const int64_t local = (tok - s) / B, base = blk_base[d];
        const int32_t *row = topk_g + t * K;
        uint32_t *kr = keys + t * K;
        int32_t *vr = vals + t * K;
        /* the first fault of the row: kind 0 = a bad id, 1 = no id, 2 = an id after the padding */
        int kind = -1, slot = 0, id = 0;
        int64_t prev = -1;
        int i = 0;
        for (; i < K; i++) {
            const int32_t b = row[i];
            if (b < 0) break;
            if (kind < 0 && (b <= prev || b > local)) kind = 0, slot = i, id = b;
            prev = b;
            const int64_t key = base + b;
            kr[i] = key < 0 || key > (int64_t)sentinel ? sentinel : (uint32_t)key;
            vr[i] = (int32_t)t;
        }
        if (i == 0 && kind < 0) kind = 1;
        for (; i < K; i++) {
            if (row[i] != -1 && kind < 0) kind = 2, slot = i, id = row[i];
            kr[i] = sentinel;
            vr[i] = (int32_t)t;
        }
        if (kind >= 0) report_error(err, ERR_MSA_TOPK, g, (int)t, row[0], kind, slot, id);
    }
}

/* row_ptr, the zero tail of q_idx, row_lo and row_hi of group g's plan (q_idx already holds the
 * sorted queries). */
__global__ void plan_rows_kernel(int32_t *plan_g, const uint32_t *sorted_keys, const int32_t *cu, const int64_t *blk_base,
                                   int ndocs, int64_t N, int64_t NK, int B) {
    const int64_t R = min(max(blk_base[ndocs], (int64_t)0), N);
    int32_t *row_ptr = plan_g, *q_idx = plan_g + (N + 1), *row_lo = q_idx + NK, *row_hi = row_lo + N;
    const int64_t n = max(N + 1, NK);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if (i <= N) row_ptr[i] = (int32_t)lower_bound(sorted_keys, NK, (uint32_t)(i < R ? i : R));
        if (i < NK && sorted_keys[i] >= (uint32_t)R) q_idx[i] = 0;
        if (i < N) {
            int64_t lo = 0, hi = 0;
            if (i < R) {
                int a = 0, b = ndocs; /* the document owning row i: last d with blk_base[d] <= i */
                while (b - a > 1) {
                    const int mid = (a + b) >> 1;
                    if (blk_base[mid] <= i) a = mid;
                    else b = mid;
                }
                lo = (int64_t)cu[a] + (i - blk_base[a]) * B;
                hi = min(lo + B, (int64_t)cu[a + 1]);
            }
            row_lo[i] = (int32_t)lo;
            row_hi[i] = (int32_t)hi;
        }
    }
}

}  // namespace

namespace {

/* The plan of topk (i32 [H, Nq, K], rows' tokens q_token or NULL) over N tokens into plan (i32 [H,
 * msa_plan_width_rows(N, Nq, K)]); the four steps of the file comment. */
void build_plan(int32_t *plan, const int32_t *topk, const int32_t *q_token, const int32_t *cu, int64_t ndocs, int64_t H,
                int64_t N, int64_t Nq, int64_t K, int B) {
    const int64_t P = msa_plan_width_rows(N, Nq, K);
    if (H == 0) return;
    if (N == 0 || Nq == 0) { /* no selections: every row_ptr is 0, and so is the rest */
        CUDA_CHECK(cudaMemsetAsync(plan, 0, (size_t)(H * P) * sizeof(int32_t), stream()));
        if (N == 0) return;
    }
    const int64_t NK = Nq * K;
    /* sentinel key: past every block row (R <= min(N, N/B + ndocs) for valid input) */
    const int64_t rmax = N < N / B + ndocs ? N : N / B + ndocs;
    const uint32_t sentinel = (uint32_t)rmax;

    const size_t sort_bytes = sort_pairs_temp_bytes(NK, sentinel);
    size_t scan_bytes = 0;
    CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, (const int64_t *)nullptr, (int64_t *)nullptr,
                                             (int)(ndocs + 1)));
    const size_t temp_bytes = sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
    /* workspace: nb [ndocs+1] | blk_base [ndocs+1] | keys_in, keys_out, vals_in [NK] | CUB temp */
    const size_t o_nb = 0, o_base = o_nb + align256((size_t)(ndocs + 1) * 8), o_kin = o_base + align256((size_t)(ndocs + 1) * 8);
    const size_t o_kout = o_kin + align256((size_t)NK * 4), o_vin = o_kout + align256((size_t)NK * 4);
    const size_t o_temp = o_vin + align256((size_t)NK * 4);
    char *ws = (char *)plan_workspace(o_temp + temp_bytes);
    int *err = errbuf();
    int64_t *nb = (int64_t *)(ws + o_nb), *blk_base = (int64_t *)(ws + o_base);
    uint32_t *keys_in = (uint32_t *)(ws + o_kin), *keys_out = (uint32_t *)(ws + o_kout);
    int32_t *vals_in = (int32_t *)(ws + o_vin);
    void *temp = ws + o_temp;

    doc_blocks_kernel<<<grid_for(ndocs + 1, THREADS), THREADS, 0, stream()>>>(nb, err, cu, (int)ndocs, N, B);
    LAUNCH_CHECK("msa_plan doc_blocks");
    size_t tb = temp_bytes;
    CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, tb, nb, blk_base, (int)(ndocs + 1), stream()));
    for (int64_t g = 0; g < H; g++) {
        int32_t *plan_g = plan + g * P;
        if (NK > 0) {
            block_keys_kernel<<<grid_for(Nq, THREADS), THREADS, 0, stream()>>>(keys_in, vals_in, err, topk + g * NK, q_token, cu,
                                                                  blk_base, (int)ndocs, N, Nq, (int)K, B, sentinel, (int)g);
            LAUNCH_CHECK("msa_plan keys");
            sort_pairs(temp, temp_bytes, keys_in, keys_out, vals_in, plan_g + (N + 1), NK, sentinel);
        }
        plan_rows_kernel<<<grid_for((N + 1 > NK ? N + 1 : NK), THREADS), THREADS, 0, stream()>>>(plan_g, keys_out, cu, blk_base,
                                                                                    (int)ndocs, N, NK, B);
        LAUNCH_CHECK("msa_plan finish");
    }
}

}  // namespace

namespace msacuda {

int32_t *msa_temporary_plan(const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p, int64_t N) {
    const int64_t ndocs = msa_check_params("msa_plan", p, cu_seqlens);
    const int64_t H = topk->shape[0], Nq = topk->shape[1], K = topk->shape[2];
    const int32_t *q_token = msa_query_tokens("msa_plan", p, Nq, N);
    if (Nq * K >= INT32_MAX) fatal("cuda msa_plan: Nq * topk_blocks = %lld does not fit the i32 plan", (long long)(Nq * K));
    static void *buf = nullptr;
    static size_t cap = 0;
    int32_t *plan = (int32_t *)grow_only(buf, cap, (size_t)(H * msa_plan_width_rows(N, Nq, K)) * sizeof(int32_t));
    build_plan(plan, (const int32_t *)topk->data, q_token, (const int32_t *)cu_seqlens->data, ndocs, H, N, Nq, K,
               p->block_size);
    return plan;
}

}  // namespace msacuda

extern "C" void cuda_msa_plan(Tensor *plan, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p) {
    init();
    const int64_t ndocs = msa_check_params("msa_plan", p, cu_seqlens);
    if (p->query_index || p->key_rows)
        fatal("cuda msa_plan: a query_index (sequence-split context parallelism) takes no plan: the kernels build their "
              "own over the tokens' blocks");
    if (!topk) fatal("cuda msa_plan: topk is NULL (dense selection has no plan)");
    if (topk->dtype != DT_I32 || topk->ndim != 3)
        fatal("cuda msa_plan: topk must be i32 [Hidx, N, topk_blocks], got %s with %d dims", dtype_name(topk->dtype),
              topk->ndim);
    const int64_t H = topk->shape[0], N = topk->shape[1], K = topk->shape[2];
    if (K != p->topk_blocks)
        fatal("cuda msa_plan: topk must be [Hidx, N, topk_blocks = %d], got %lld slots", p->topk_blocks, (long long)K);
    const int64_t P = msa_plan_width(N, K);
    if (!plan || plan->dtype != DT_I32 || plan->numel != H * P)
        fatal("cuda msa_plan: plan must be i32 [Hidx, msa_plan_width(N, k)] = [%lld, %lld], got %s with %lld elements",
              (long long)H, (long long)P, plan ? dtype_name(plan->dtype) : "NULL", plan ? (long long)plan->numel : 0LL);
    if (N * K >= INT32_MAX) fatal("cuda msa_plan: N * topk_blocks = %lld does not fit the i32 plan", (long long)(N * K));
    build_plan((int32_t *)plan->data, (const int32_t *)topk->data, nullptr, (const int32_t *)cu_seqlens->data, ndocs, H, N,
               N, K, p->block_size);
}
