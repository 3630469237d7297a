/* Token cross-entropy on the GPU: fp32 math on BF16 (or F32) logits, one block per row with an online
 * max/sum; lse [N] F32 saved; the loss (F32 scalar) is the mean over counted rows, summed in fp64 in a
 * fixed order (deterministic). The forward returns the counted rows (the CPU kernel's return value),
 * counted on the host's copy of the targets when they have one (Tensor.host_data: no wait), else copied
 * from the device (a wait); targets outside [0, V) other than ignore_index stop the program at the next
 * wait. The backward reads dloss on the device (no synchronisation); its dlogits may be BF16 where the
 * logits are F32 (the chunked LM head keeps its logits in F32, its GEMMs read BF16). */
#include <math.h>

#include "primitives.cuh"

using namespace msacuda;

static const int CE_THREADS = 256;

__device__ __forceinline__ void lse_combine(float &m, float &s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

template <typename T>
__global__ void ce_fwd_kernel(float *lse, float *row_loss, int *row_valid, const T *logits, const int32_t *targets,
                              int64_t V, int ignore_index, int *err) {
    __shared__ float sh_m[32], sh_s[32];
    const int64_t n = blockIdx.x;
    const T *row = logits + n * V;
    float m = -INFINITY, s = 0.0f;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const float x = to_f32(row[v]);
        if (x > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - x)) + 1.0f;
            m = x;
        } else if (x != -INFINITY) s += expf(x - m);
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_combine(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sh_m[warp] = m;
        sh_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sh_m[lane] : -INFINITY;
        s = lane < nw ? sh_s[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_combine(m, s, m2, s2);
        }
        if (lane == 0) {
            const float l = m + logf(s);
            lse[n] = l;
            const int32_t t = targets[n];
            int valid = t != ignore_index;
            if (valid && (t < 0 || t >= V)) {
                report_error(err, ERR_TARGET, (int)n, t);
                valid = 0;
            }
            row_loss[n] = valid ? l - to_f32(row[t]) : 0.0f;
            row_valid[n] = valid;
        }
    }
}

/* one block: loss = sum(row_loss) / n_valid (fp64, fixed order), count -> *n_valid */
__global__ void ce_finish_kernel(float *loss, int *n_valid, const float *row_loss, const int *row_valid, int64_t N) {
    __shared__ double sh[32];
    __shared__ double shc[32];
    double s = 0.0, c = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        s += row_loss[i];
        c += row_valid[i];
    }
    s = block_sum(s, sh);
    c = block_sum(c, shc);
    if (threadIdx.x == 0) {
        *loss = c > 0 ? (float)(s / c) : 0.0f;
        *n_valid = (int)c;
    }
}

template <typename Td, typename T>
__global__ void ce_bwd_kernel(Td *dlogits, const float *dloss, const T *logits, const float *lse, const int32_t *targets,
                              int64_t V, int ignore_index, double inv_n_valid) {
    const int64_t n = blockIdx.x;
    const int32_t t = targets[n];
    if (t == ignore_index || t < 0 || t >= V) return;
    const float sc = (float)((double)dloss[0] * inv_n_valid), l = lse[n];
    const T *row = logits + n * V;
    Td *drow = dlogits + n * V;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const float p = expf(to_f32(row[v]) - l);
        drow[v] = from_f32<Td>(to_f32(drow[v]) + sc * (p - (v == t ? 1.0f : 0.0f)));
    }
}

extern "C" int64_t cuda_cross_entropy_forward(Tensor *loss, Tensor *lse, const Tensor *logits, const Tensor *targets,
                                              int ignore_index) {
    init();
    const int64_t N = tensor_rows(logits), V = tensor_dim(logits, -1);
    if (targets->dtype != DT_I32 || targets->numel != N) fatal("cuda cross_entropy: targets must be i32 [%lld]", (long long)N);
    if (loss->dtype != DT_F32 || lse->dtype != DT_F32 || lse->numel != N || loss->numel != 1)
        fatal("cuda cross_entropy: loss must be an f32 scalar and lse f32 [%lld]", (long long)N);
    if (N == 0) {
        CUDA_CHECK(cudaMemsetAsync(loss->data, 0, sizeof(float), stream()));
        return 0;
    }
    /* scratch: row_loss f32 [N] | row_valid i32 [N] | n_valid i32 */
    char *ws = (char *)scratch((size_t)N * 8 + 16);
    float *row_loss = (float *)ws;
    int *row_valid = (int *)(ws + (size_t)N * 4), *n_valid = (int *)(ws + (size_t)N * 8);
    DISPATCH_FLOAT(logits->dtype, T, "cross_entropy_forward", {
        ce_fwd_kernel<T><<<(unsigned)N, CE_THREADS, 0, stream()>>>((float *)lse->data, row_loss, row_valid, (const T *)logits->data,
                                                      (const int32_t *)targets->data, V, ignore_index, errbuf());
        LAUNCH_CHECK("cross_entropy_forward");
    });
    ce_finish_kernel<<<1, 1024, 0, stream()>>>((float *)loss->data, n_valid, row_loss, row_valid, N);
    LAUNCH_CHECK("cross_entropy_finish");
    /* the count from the host's copy of the targets when there is one: no wait for the device (a target
     * outside the vocabulary is then reported at the next wait) */
    if (targets->host_data) {
        int64_t nv = 0;
        for (int64_t i = 0; i < N; i++) nv += ((const int32_t *)targets->host_data)[i] != ignore_index;
        return nv;
    }
    int nv = 0;
    copy_to_host_at(&nv, n_valid, sizeof nv, "cross_entropy counted rows");
    check_device_errors();
    return nv;
}

extern "C" void cuda_cross_entropy_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse,
                                            const Tensor *targets, int ignore_index, int64_t n_valid) {
    init();
    if (!dlogits || n_valid == 0) return;
    const int64_t N = tensor_rows(logits), V = tensor_dim(logits, -1);
    if (dlogits->numel != logits->numel)
        fatal("cuda cross_entropy_backward: dlogits has %lld elements, the logits %lld", (long long)dlogits->numel,
              (long long)logits->numel);
    if (dloss->dtype != DT_F32 || lse->dtype != DT_F32) fatal("cuda cross_entropy_backward: dloss and lse must be f32");
    if (N == 0) return;
    DISPATCH_FLOAT(dlogits->dtype, Td, "cross_entropy_backward", DISPATCH_FLOAT(logits->dtype, T, "cross_entropy_backward", {
        ce_bwd_kernel<Td, T><<<(unsigned)N, CE_THREADS, 0, stream()>>>((Td *)dlogits->data, (const float *)dloss->data,
                                                          (const T *)logits->data, (const float *)lse->data,
                                                          (const int32_t *)targets->data, V, ignore_index,
                                                          1.0 / (double)n_valid);
        LAUNCH_CHECK("cross_entropy_backward");
    }));
}
