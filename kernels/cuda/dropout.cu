/* Dropout kernels of the CUDA backend: the mask of kernels/dropout_mask.h (identical to the CPU's),
 * fp32 arithmetic, grid-stride loops. */
#include "../dropout_mask.h"
#include "primitives.cuh"

using namespace msacuda;

static void check_args(const char *kernel, const Tensor *a, const Tensor *b, float p, const Tensor *seed) {
    if (!(p >= 0.0f && p < 1.0f)) fatal("cuda %s: dropout probability %g must be in [0, 1)", kernel, (double)p);
    if (seed->dtype != DT_I32 || seed->numel != 2)
        fatal("cuda %s: the seed must be an i32 [2] tensor (its low and high words)", kernel);
    if (a->numel != b->numel)
        fatal("cuda %s: %lld vs %lld elements", kernel, (long long)a->numel, (long long)b->numel);
    if (a->dtype != b->dtype) fatal("cuda %s: dtypes differ (%s, %s)", kernel, dt_name(a->dtype), dt_name(b->dtype));
}

/* the scale of a kept element, 1 / (1 - p): computed in double, rounded once to the kernels' fp32 */
static float keep_scale(float p) { return (float)(1.0 / (1.0 - (double)p)); }

/* the seed comes from device memory: a captured launch reads each replay's (kernels.def) */
template <typename T>
__global__ void dropout_fwd_kernel(T *y, const T *x, int64_t n, const int32_t *seed_words, int64_t offset, uint32_t thr,
                                   float inv_keep) {
    const uint64_t seed = dropout_seed_of_words(seed_words);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = from_f32<T>(dropout_bits(seed, offset + i) >= thr ? to_f32(x[i]) * inv_keep : 0.0f);
}

template <typename T>
__global__ void dropout_bwd_kernel(T *dx, const T *dy, int64_t n, const int32_t *seed_words, int64_t offset, uint32_t thr,
                                   float inv_keep) {
    const uint64_t seed = dropout_seed_of_words(seed_words);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        if (dropout_bits(seed, offset + i) >= thr) dx[i] = from_f32<T>(to_f32(dx[i]) + to_f32(dy[i]) * inv_keep);
}

extern "C" void cuda_dropout_forward(Tensor *y, const Tensor *x, float p, const Tensor *seed, int64_t offset) {
    init();
    check_args("dropout_forward", y, x, p, seed);
    if (x->numel == 0) return;
    const float inv_keep = keep_scale(p);
    DISPATCH_FLOAT(x->dtype, T, "dropout_forward", {
        dropout_fwd_kernel<T><<<grid_for(x->numel, 256), 256, 0, stream()>>>(
            (T *)y->data, (const T *)x->data, x->numel, (const int32_t *)seed->data, offset, dropout_threshold(p), inv_keep);
        LAUNCH_CHECK("dropout_forward");
    });
}

extern "C" void cuda_dropout_backward(Tensor *dx, const Tensor *dy, float p, const Tensor *seed, int64_t offset) {
    init();
    check_args("dropout_backward", dx, dy, p, seed);
    if (dy->numel == 0) return;
    const float inv_keep = keep_scale(p);
    DISPATCH_FLOAT(dy->dtype, T, "dropout_backward", {
        dropout_bwd_kernel<T><<<grid_for(dy->numel, 256), 256, 0, stream()>>>(
            (T *)dx->data, (const T *)dy->data, dy->numel, (const int32_t *)seed->data, offset, dropout_threshold(p), inv_keep);
        LAUNCH_CHECK("dropout_backward");
    });
}
