/* Dropout kernels of the CUDA backend: the mask of kernels/dropout_mask.h (identical to the CPU's),
 * fp32 arithmetic, grid-stride loops. */
#include "../dropout_mask.h"
#include "primitives.cuh"

using namespace msacuda;

static void check_args(const char *kernel, const Tensor *a, const Tensor *b, float p) {
    if (!(p >= 0.0f && p < 1.0f)) fatal("cuda %s: dropout probability %g must be in [0, 1)", kernel, (double)p);
    if (a->numel != b->numel)
        fatal("cuda %s: %lld vs %lld elements", kernel, (long long)a->numel, (long long)b->numel);
    if (a->dtype != b->dtype) fatal("cuda %s: dtypes differ (%s, %s)", kernel, dt_name(a->dtype), dt_name(b->dtype));
}

/* the scale of a kept element, 1 / (1 - p): computed in double, rounded once to the kernels' fp32 */
static float keep_scale(float p) { return (float)(1.0 / (1.0 - (double)p)); }

template <typename T>
__global__ void dropout_fwd_kernel(T *y, const T *x, int64_t n, uint64_t seed, int64_t offset, uint32_t thr, float inv_keep) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = from_f32<T>(dropout_bits(seed, offset + i) >= thr ? to_f32(x[i]) * inv_keep : 0.0f);
}

template <typename T>
__global__ void dropout_bwd_kernel(T *dx, const T *dy, int64_t n, uint64_t seed, int64_t offset, uint32_t thr, float inv_keep) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        if (dropout_bits(seed, offset + i) >= thr) dx[i] = from_f32<T>(to_f32(dx[i]) + to_f32(dy[i]) * inv_keep);
}

extern "C" void cuda_dropout_forward(Tensor *y, const Tensor *x, float p, uint64_t seed, int64_t offset) {
    init();
    check_args("dropout_forward", y, x, p);
    if (x->numel == 0) return;
    const float inv_keep = keep_scale(p);
    DISPATCH_FLOAT(x->dtype, T, "dropout_forward", {
        dropout_fwd_kernel<T><<<grid_for(x->numel, 256), 256, 0, stream()>>>((T *)y->data, (const T *)x->data, x->numel, seed, offset,
                                                               dropout_threshold(p), inv_keep);
        LAUNCH_CHECK("dropout_forward");
    });
}

extern "C" void cuda_dropout_backward(Tensor *dx, const Tensor *dy, float p, uint64_t seed, int64_t offset) {
    init();
    check_args("dropout_backward", dx, dy, p);
    if (dy->numel == 0) return;
    const float inv_keep = keep_scale(p);
    DISPATCH_FLOAT(dy->dtype, T, "dropout_backward", {
        dropout_bwd_kernel<T><<<grid_for(dy->numel, 256), 256, 0, stream()>>>((T *)dx->data, (const T *)dy->data, dy->numel, seed,
                                                                offset, dropout_threshold(p), inv_keep);
        LAUNCH_CHECK("dropout_backward");
    });
}
