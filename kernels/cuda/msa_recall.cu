/* MSA recall metric on the GPU: for every query_stride-th query t and group g, the mean over the
 * group's heads of the FULL causal softmax mass (within t's document) that falls on the keys of the
 * blocks selected for (g, t); the mean over the sampled (t, g). Same definition as the CPU reference
 * (cpu_msa_recall, kernels/cpu/msa_attention_impl.h), fp32 arithmetic, one double back.
 *
 * A thread block = one sampled query x one group x up to 8 of its heads (q pre-scaled in shared memory):
 * each thread walks a stride of the document's keys t's document start .. t, scores each key against
 * the block's heads (the key row is read once for all of them) and keeps per head an online softmax
 * (running max, total mass, mass inside the selected blocks); a fixed-order block reduction merges them
 * and the block writes in/total per head. A single-block kernel then sums those ratios in double in a
 * fixed order, so the metric is deterministic. The sampled rows of topk are validated (as the CPU
 * validates every row) and a bad one is reported with a message before returning.
 *
 * With a query_index (sequence-split context parallelism: this rank's Nq query rows) the sample is the rows whose
 * token is a multiple of the stride, as on the CPU, so that every rank samples the same tokens: a thread block
 * per row, those of other tokens writing 0 and leaving at once; the count of sampled rows is taken on the device
 * beside the sum (the metric's one copy to the host brings both). */
#include <math.h>
#include <stdio.h>

#include "limits.h"
#include "msa_plan.cuh"

using namespace msacuda;

namespace {

constexpr int THREADS = 128, HC = 8; /* heads per thread block */
constexpr unsigned long long NO_ERROR = ~0ull;

struct RecallArgs {
    const int32_t *topk, *cu;
    const int32_t *q_token;     /* [Nq] the token of each query row, NULL: row t is token t (query_index) */
    float *vals;                /* [ns, Hq]: in/total per (sampled query, head) */
    unsigned long long *bad;    /* first bad topk row g*Nq + row */
    int64_t N, Nq;
    int ndocs, Hq, Hkv, D, G, B, K, stride, ns, nchunk;
    float scale;
};

/* max over the block (THREADS threads); every thread gets it; sh needs 32 floats */
__device__ __forceinline__ float block_max(float v, float *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    return warp_max(lane < nw ? sh[lane] : -INFINITY);
}

template <typename T> __global__ void __launch_bounds__(THREADS) recall_kernel(const T *q, const T *k, const RecallArgs a) {
    __shared__ float qs[HC][CUDA_HEAD_DIM_MAX];
    extern __shared__ int ids[]; /* [K] */
    __shared__ float red[32];
    __shared__ int nsel_s;
    const int64_t item = (int64_t)gridDim.x - 1 - blockIdx.x; /* later queries (longer rows) first */
    const int chunk = (int)(item % a.nchunk);
    const int g = (int)(item / a.nchunk % a.Hkv);
    const int64_t i = item / a.nchunk / a.Hkv, row = a.q_token ? i : i * a.stride;
    const int64_t t = msa_row_token(a.q_token, (int)row, (int)a.N);
    const int h0 = g * a.G + chunk * HC, nh = min(HC, a.G - chunk * HC);
    if (a.q_token && t % a.stride != 0) { /* not in the sample (the whole block leaves together) */
        if (threadIdx.x < nh) a.vals[i * a.Hq + h0 + threadIdx.x] = 0.0f;
        return;
    }
    const int d = msa_doc_of(a.cu, a.ndocs, t);
    const int64_t s = min(max((int64_t)a.cu[d], (int64_t)0), t);
    const int64_t n = t - s + 1, local = (t - s) / a.B;

    for (int idx = threadIdx.x; idx < HC * a.D; idx += blockDim.x) {
        const int hh = idx / a.D, dd = idx - hh * a.D;
        qs[hh][dd] = hh < nh ? to_f32(q[(row * a.Hq + h0 + hh) * a.D + dd]) * a.scale : 0.0f;
    }
    if (threadIdx.x == 0) { /* the selection of (g, t), checked as msa_check_topk does */
        const int32_t *sel = a.topk + ((int64_t)g * a.Nq + row) * a.K;
        int64_t prev = -1;
        int c = 0;
        bool bad = false;
        for (; c < a.K && sel[c] >= 0; c++) {
            if (sel[c] <= prev || sel[c] > local) bad = true;
            prev = sel[c];
            ids[c] = sel[c];
        }
        if (c == 0) bad = true;
        nsel_s = c;
        for (int r = c; r < a.K; r++)
            if (sel[r] != -1) bad = true;
        if (bad && chunk == 0) atomicMin(a.bad, (unsigned long long)g * (unsigned long long)a.Nq + (unsigned long long)row);
    }
    __syncthreads();
    const int nsel = nsel_s;

    float m[HC], l[HC], in[HC];
#pragma unroll
    for (int hh = 0; hh < HC; hh++) {
        m[hh] = -INFINITY;
        l[hh] = 0.0f;
        in[hh] = 0.0f;
    }
    const T *kg = k + (s * a.Hkv + g) * (int64_t)a.D;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const T *kr = kg + j * a.Hkv * (int64_t)a.D;
        float acc[HC];
#pragma unroll
        for (int hh = 0; hh < HC; hh++) acc[hh] = 0.0f;
        for (int dd = 0; dd < a.D; dd++) {
            const float kv = to_f32(kr[dd]);
#pragma unroll
            for (int hh = 0; hh < HC; hh++) acc[hh] += qs[hh][dd] * kv;
        }
        const int b = (int)(j / a.B);
        bool sel = false;
        for (int c = 0; c < nsel; c++) sel |= ids[c] == b;
#pragma unroll
        for (int hh = 0; hh < HC; hh++) {
            const float sc = acc[hh];
            if (sc > m[hh]) { /* rescale the running sums to the new maximum */
                const float r = expf(m[hh] - sc);
                l[hh] *= r;
                in[hh] *= r;
                m[hh] = sc;
            }
            const float e = expf(sc - m[hh]);
            l[hh] += e;
            if (sel) in[hh] += e;
        }
    }
    for (int hh = 0; hh < nh; hh++) {
        const float M = block_max(m[hh], red);
        const float f = m[hh] == -INFINITY ? 0.0f : expf(m[hh] - M);
        const float tot = block_sum(l[hh] * f, red);
        const float sel = block_sum(in[hh] * f, red);
        if (threadIdx.x == 0) a.vals[i * a.Hq + h0 + hh] = tot > 0.0f ? sel / tot : 0.0f;
    }
}

/* out[0] = sum of v[0 .. n) in double, fixed order (one block of 1024 threads); with q_token, out[1] = the
 * sampled rows (tokens that are multiples of the stride among q_token[0 .. Nq)) */
__global__ void __launch_bounds__(1024) sum_kernel(double *out, const float *v, int64_t n, const int32_t *q_token, int64_t Nq,
                                                   int stride) {
    __shared__ double sh[32];
    double acc = 0, cnt = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += (double)v[i];
    for (int64_t i = threadIdx.x; q_token && i < Nq; i += blockDim.x) cnt += q_token[i] % stride == 0 ? 1.0 : 0.0;
    acc = block_sum(acc, sh);
    cnt = block_sum(cnt, sh);
    if (threadIdx.x == 0) out[0] = acc, out[1] = cnt;
}

}  // namespace

extern "C" double cuda_msa_recall(const Tensor *q, const Tensor *k, const Tensor *topk, const Tensor *cu_seqlens,
                                  const MsaParams *p, int query_stride) {
    init();
    const int64_t ndocs = msa_check_params("msa_recall", p, cu_seqlens);
    if (query_stride < 1) fatal("cuda msa_recall: query_stride must be >= 1, got %d", query_stride);
    if (p->key_rows) fatal("cuda msa_recall: key_rows given, but the dense teacher reads every key of the prefix");
    if (q->ndim != 3 || k->ndim != 3) fatal("cuda msa_recall: q must be [Nq, Hq, D] and k [N, Hkv, D]");
    const int64_t Nq = q->shape[0], N = k->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1], K = p->topk_blocks;
    const int32_t *q_token = msa_query_tokens("msa_recall", p, Nq, N);
    if (k->shape[2] != D) fatal("cuda msa_recall: k must be [%lld, Hkv, %lld] like q", (long long)N, (long long)D);
    if (Hkv < 1 || Hq % Hkv != 0)
        fatal("cuda msa_recall: %lld query heads are not a multiple of %lld KV heads", (long long)Hq, (long long)Hkv);
    if (q->dtype != k->dtype) fatal("cuda msa_recall: q and k dtypes differ (%s, %s)", dtype_name(q->dtype), dtype_name(k->dtype));
    if (D < 1 || D > CUDA_HEAD_DIM_MAX)
        fatal("cuda msa_recall: head dim %lld not supported (1..%d)", (long long)D, CUDA_HEAD_DIM_MAX);
    if (N >= (int64_t)1 << 30) fatal("cuda msa_recall: %lld tokens: too many (< 2^30)", (long long)N);
    if (topk && (topk->dtype != DT_I32 || topk->ndim != 3 || topk->shape[0] != Hkv || topk->shape[1] != Nq || topk->shape[2] != K))
        fatal("cuda msa_recall: topk must be i32 [Hidx = %lld, Nq = %lld, topk_blocks = %lld]", (long long)Hkv, (long long)Nq,
              (long long)K);
    /* the sampled queries: every stride-th token, or (query_index) every row, those off the stride left out */
    const int64_t ns = q_token ? Nq : (N + query_stride - 1) / query_stride;
    if (!topk || ns == 0) return 1.0; /* every visible block selected: all the mass (the CPU's value exactly) */
    RecallArgs a;
    a.G = (int)(Hq / Hkv);
    a.nchunk = (a.G + HC - 1) / HC;
    const int64_t items = ns * Hkv * a.nchunk;
    if (items >= INT32_MAX) fatal("cuda msa_recall: %lld work items: use a larger query_stride", (long long)items);
    /* scratch: result double [2] | bad row | vals [ns, Hq] */
    char *ws = (char *)scratch(256 + (size_t)(ns * Hq) * sizeof(float));
    double *result = (double *)ws;
    a.bad = (unsigned long long *)(ws + 16);
    a.vals = (float *)(ws + 256);
    a.topk = (const int32_t *)topk->data;
    a.cu = (const int32_t *)cu_seqlens->data;
    a.q_token = q_token;
    a.N = N;
    a.Nq = Nq;
    a.ndocs = (int)ndocs;
    a.Hq = (int)Hq;
    a.Hkv = (int)Hkv;
    a.D = (int)D;
    a.B = p->block_size;
    a.K = (int)K;
    a.stride = query_stride;
    a.ns = (int)ns;
    a.scale = p->scale;
    CUDA_CHECK(cudaMemsetAsync(a.bad, 0xff, sizeof(unsigned long long), stream()));
    DISPATCH_FLOAT(q->dtype, T, "msa_recall", {
        recall_kernel<T><<<(unsigned)items, THREADS, (size_t)K * sizeof(int), stream()>>>((const T *)q->data, (const T *)k->data, a);
        LAUNCH_CHECK("msa_recall");
    });
    sum_kernel<<<1, 1024, 0, stream()>>>(result, a.vals, ns * Hq, q_token, Nq, query_stride);
    LAUNCH_CHECK("msa_recall sum");
    double sum[2] = {0, 0};
    unsigned long long bad = 0;
    copy_to_host_at(sum, result, sizeof sum, "msa_recall");
    copy_to_host_at(&bad, a.bad, sizeof bad, "msa_recall");
    check_device_errors();
    if (bad != NO_ERROR) {
        const int64_t g = (int64_t)(bad / (unsigned long long)Nq), t = (int64_t)(bad % (unsigned long long)Nq);
        int32_t row[8];
        const int64_t nr = K < 8 ? K : 8;
        copy_to_host_at(row, (const int32_t *)topk->data + (g * Nq + t) * K, (size_t)nr * sizeof(int32_t), "msa_recall");
        char buf[128];
        int o = 0;
        for (int64_t c = 0; c < nr && o < (int)sizeof buf - 16; c++) o += snprintf(buf + o, sizeof buf - o, c ? ", %d" : "%d", row[c]);
        fatal("cuda msa_recall: topk[%lld, %lld] = {%s%s} is not a selection: ids must be ascending visible blocks, "
              "-1 only after them, at least one",
              (long long)g, (long long)t, buf, K > 8 ? ", ..." : "");
    }
    const double sampled = q_token ? sum[1] : (double)ns;
    return sampled > 0 ? sum[0] / (sampled * (double)Hq) : 1.0;
}
