/* RMSNorm over the last dim on the GPU (also per head on [N, H, D]): one warp per row, fp32
 * arithmetic, rstd saved F32. x/y/dy/dx share the activation dtype (BF16 or F32); the gain w and its
 * gradient dw may be F32 master weights. dw is summed over rows in two deterministic passes (row
 * chunks, then the chunks in order). */
#include <math.h>

#include "primitives.cuh"

using namespace msacuda;

template <typename Tw> __device__ __forceinline__ float gain(const Tw *w, int64_t c, bool unit_offset) {
    return w ? (unit_offset ? 1.0f + to_f32(w[c]) : to_f32(w[c])) : 1.0f;
}

template <typename Tx, typename Tw>
__global__ void rmsnorm_fwd_kernel(Tx *y, float *rstd, const Tx *x, const Tw *w, int64_t rows, int64_t C, float eps,
                                   bool unit_offset) {
    const int lane = threadIdx.x & 31;
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const Tx *xr = x + r * C;
    float ss = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
        const float v = to_f32(xr[c]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    const float rs = 1.0f / sqrtf(ss / (float)C + eps);
    if (lane == 0) rstd[r] = rs;
    for (int64_t c = lane; c < C; c += 32) y[r * C + c] = from_f32<Tx>(to_f32(xr[c]) * rs * gain(w, c, unit_offset));
}

template <typename Tx, typename Tw>
__global__ void rmsnorm_bwd_dx_kernel(Tx *dx, const Tx *dy, const Tx *x, const Tw *w, const float *rstd, int64_t rows,
                                      int64_t C, bool unit_offset) {
    const int lane = threadIdx.x & 31;
    const int64_t r = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const Tx *xr = x + r * C, *dyr = dy + r * C;
    float dot = 0.0f;
    for (int64_t c = lane; c < C; c += 32) dot += to_f32(xr[c]) * gain(w, c, unit_offset) * to_f32(dyr[c]);
    dot = warp_sum(dot);
    const float rs = rstd[r], k = rs * rs * rs / (float)C * dot;
    for (int64_t c = lane; c < C; c += 32)
        dx[r * C + c] = from_f32<Tx>(to_f32(dx[r * C + c]) + rs * gain(w, c, unit_offset) * to_f32(dyr[c]) - k * to_f32(xr[c]));
}

template <typename Tx>
__global__ void rmsnorm_bwd_dw_partial_kernel(float *partial, const Tx *dy, const Tx *x, const float *rstd, int64_t rows,
                                              int64_t C, int64_t rows_per_chunk) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float s = 0.0f;
    for (int64_t r = r0; r < r1; r++) s += to_f32(dy[r * C + c]) * to_f32(x[r * C + c]) * rstd[r];
    partial[blockIdx.y * C + c] = s;
}

template <typename Tw> __global__ void rmsnorm_bwd_dw_finish_kernel(Tw *dw, const float *partial, int64_t C, int chunks) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(int64_t)k * C + c];
    dw[c] = from_f32<Tw>(to_f32(dw[c]) + s);
}

static void check_args(const char *what, const Tensor *x, const Tensor *w, const Tensor *rstd) {
    const int64_t C = tensor_dim(x, -1);
    if (w && w->numel != C) fatal("cuda %s: gain has %lld elements, rows have %lld", what, (long long)w->numel, (long long)C);
    if (rstd->numel != tensor_rows(x)) fatal("cuda %s: rstd must have one entry per row", what);
    if (rstd->dtype != DT_F32) fatal("cuda %s: rstd must be f32, got %s", what, dtype_name(rstd->dtype));
}

static void same_act(const char *what, const Tensor *x, const Tensor *t) {
    if (t && (t->dtype != x->dtype || t->numel != x->numel))
        fatal("cuda %s: activations and their gradients must share x's dtype (%s) and size", what, dtype_name(x->dtype));
}

extern "C" void cuda_rmsnorm_forward(Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *w, float eps, bool unit_offset) {
    init();
    check_args("rmsnorm_forward", x, w, rstd);
    same_act("rmsnorm_forward", x, y);
    const int64_t rows = tensor_rows(x), C = tensor_dim(x, -1);
    if (rows == 0) return;
    const unsigned blocks = (unsigned)((rows + 7) / 8);
    DISPATCH_FLOAT(x->dtype, Tx, "rmsnorm_forward", DISPATCH_FLOAT(w ? w->dtype : DT_F32, Tw, "rmsnorm_forward", {
        rmsnorm_fwd_kernel<Tx, Tw><<<blocks, 256>>>((Tx *)y->data, (float *)rstd->data, (const Tx *)x->data,
                                                    w ? (const Tw *)w->data : nullptr, rows, C, eps, unit_offset);
        LAUNCH_CHECK("rmsnorm_forward");
    }));
}

extern "C" void cuda_rmsnorm_backward(Tensor *dx, Tensor *dw, const Tensor *dy, const Tensor *x, const Tensor *w,
                                      const Tensor *rstd, bool unit_offset) {
    init();
    if (!dx && !dw) return;
    check_args("rmsnorm_backward", x, w, rstd);
    same_act("rmsnorm_backward", x, dy);
    same_act("rmsnorm_backward", x, dx);
    if (dw && (!w || dw->numel != w->numel)) fatal("cuda rmsnorm_backward: dw without a gain of its size");
    const int64_t rows = tensor_rows(x), C = tensor_dim(x, -1);
    if (rows == 0) return;
    if (dx) {
        const unsigned blocks = (unsigned)((rows + 7) / 8);
        DISPATCH_FLOAT(x->dtype, Tx, "rmsnorm_backward", DISPATCH_FLOAT(w ? w->dtype : DT_F32, Tw, "rmsnorm_backward", {
            rmsnorm_bwd_dx_kernel<Tx, Tw><<<blocks, 256>>>((Tx *)dx->data, (const Tx *)dy->data, (const Tx *)x->data,
                                                           w ? (const Tw *)w->data : nullptr, (const float *)rstd->data,
                                                           rows, C, unit_offset);
            LAUNCH_CHECK("rmsnorm_backward dx");
        }));
    }
    if (dw) {
        const int64_t rows_per_chunk = rows > 64 * 4096 ? (rows + 4095) / 4096 : 64; /* at most 4096 chunks */
        const int chunks = (int)((rows + rows_per_chunk - 1) / rows_per_chunk);
        float *partial = (float *)scratch((size_t)chunks * (size_t)C * sizeof(float));
        const dim3 grid((unsigned)((C + 127) / 128), (unsigned)chunks);
        DISPATCH_FLOAT(x->dtype, Tx, "rmsnorm_backward", {
            rmsnorm_bwd_dw_partial_kernel<Tx><<<grid, 128>>>(partial, (const Tx *)dy->data, (const Tx *)x->data,
                                                             (const float *)rstd->data, rows, C, rows_per_chunk);
            LAUNCH_CHECK("rmsnorm_backward dw partial");
        });
        DISPATCH_FLOAT(dw->dtype, Tw, "rmsnorm_backward", {
            rmsnorm_bwd_dw_finish_kernel<Tw><<<(unsigned)((C + 127) / 128), 128>>>((Tw *)dw->data, partial, C, chunks);
            LAUNCH_CHECK("rmsnorm_backward dw finish");
        });
    }
}
