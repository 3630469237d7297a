/* GELU kernels of the CUDA backend (GPT-2's tanh approximation, kernels.def): fp32 arithmetic on F32
 * or BF16 tensors, grid-stride loops. */
#include "primitives.cuh"

using namespace msacuda;

/* sqrt(2/pi) and the cubic coefficient of the approximation */
constexpr float GELU_C = 0.7978845608028654f, GELU_A = 0.044715f;

/* (1 + tanh(u)) / 2 as the logistic of 2u: in fp32, 1 + tanhf(u) cancels for u << 0 (an x below about -3
 * lost most of its digits: 1.8e-4 relative error against the CPU's double at one such x) */
__device__ __forceinline__ float gelu_half_one_plus_tanh(float v) {
    return 1.0f / (1.0f + expf(-2.0f * GELU_C * (v + GELU_A * v * v * v)));
}

template <typename T> __global__ void gelu_fwd_kernel(T *y, const T *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>(v * gelu_half_one_plus_tanh(v));
    }
}

/* dx += dy f'(x), f'(x) = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3a x^2), t = tanh(sqrt(2/pi) (x + a x^3));
 * with s = (1 + t)/2, 1 - t^2 = 4 s (1 - s) */
template <typename T> __global__ void gelu_bwd_kernel(T *dx, const T *dy, const T *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]), s = gelu_half_one_plus_tanh(v);
        const float d = s + 2.0f * v * s * (1.0f - s) * GELU_C * (1.0f + 3.0f * GELU_A * v * v);
        dx[i] = from_f32<T>(to_f32(dx[i]) + to_f32(dy[i]) * d);
    }
}

static void check_args(const char *kernel, const Tensor *a, const Tensor *b) {
    if (a->numel != b->numel) fatal("cuda %s: %lld vs %lld elements", kernel, (long long)a->numel, (long long)b->numel);
    if (a->dtype != b->dtype) fatal("cuda %s: dtypes differ (%s, %s)", kernel, dt_name(a->dtype), dt_name(b->dtype));
}

extern "C" void cuda_gelu_forward(Tensor *y, const Tensor *x) {
    init();
    check_args("gelu_forward", y, x);
    if (x->numel == 0) return;
    DISPATCH_FLOAT(x->dtype, T, "gelu_forward", {
        gelu_fwd_kernel<T><<<grid_for(x->numel, 256), 256, 0, stream()>>>((T *)y->data, (const T *)x->data, x->numel);
        LAUNCH_CHECK("gelu_forward");
    });
}

extern "C" void cuda_gelu_backward(Tensor *dx, const Tensor *dy, const Tensor *x) {
    init();
    if (!dx) return;
    check_args("gelu_backward", dx, x);
    check_args("gelu_backward", dy, x);
    if (x->numel == 0) return;
    DISPATCH_FLOAT(x->dtype, T, "gelu_backward", {
        gelu_bwd_kernel<T><<<grid_for(x->numel, 256), 256, 0, stream()>>>((T *)dx->data, (const T *)dy->data, (const T *)x->data,
                                                            x->numel);
        LAUNCH_CHECK("gelu_backward");
    });
}
