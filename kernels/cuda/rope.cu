/* RoPE on the GPU: NeoX/Llama "rotate half" pairing (i, i + rotary_dim/2) on the first rotary_dim dims of
 * every head of x [N, H, D], by the frequencies and cos/sin scale of a RopeTable (computed on the host from
 * the config, layers/rope_scaling.c, and passed by value as a kernel argument: no upload, nothing to
 * synchronise); the rest pass through. As in the CPU reference, the angle pos * inv_freq and its cos/sin
 * are computed in fp64 (one thread per token and pair, shared by all heads), so large positions (100K+)
 * lose nothing to fp32 angle rounding; the rotation itself is fp64 too. The backward is the scaled
 * rotation by -angle, accumulated into dx. */
#include <math.h>

#include "limits.h"
#include "primitives.cuh"

using namespace msacuda;

/* a head's frequencies, at most CUDA_HEAD_DIM_MAX / 2 pairs (attention_requires checks the head dim) */
struct RopeFreqs {
    double inv_freq[CUDA_HEAD_DIM_MAX / 2];
};

template <typename T>
__global__ void rope_kernel(T *y, const T *x, const int32_t *positions, int64_t N, int64_t H, int64_t D, int rot,
                            RopeFreqs freqs, double scale, double sign, bool accumulate) {
    const int64_t half = rot / 2, W = half + (D - rot);
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < N * W; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = idx / W, i = idx % W;
        if (i < half) {
            const double angle = (double)positions[n] * freqs.inv_freq[i];
            double s, c;
            sincos(angle, &s, &c);
            c *= scale;
            s *= sign * scale;
            for (int64_t h = 0; h < H; h++) {
                const int64_t base = (n * H + h) * D;
                const double a = to_f64(x[base + i]), b = to_f64(x[base + i + half]);
                const double ya = a * c - b * s, yb = b * c + a * s;
                if (accumulate) {
                    y[base + i] = from_f64<T>(to_f64(y[base + i]) + (double)(float)ya);
                    y[base + i + half] = from_f64<T>(to_f64(y[base + i + half]) + (double)(float)yb);
                } else {
                    y[base + i] = from_f64<T>(ya);
                    y[base + i + half] = from_f64<T>(yb);
                }
            }
        } else { /* partial RoPE: dims past rotary_dim pass through */
            const int64_t d = rot + (i - half);
            for (int64_t h = 0; h < H; h++) {
                const int64_t at = (n * H + h) * D + d;
                y[at] = accumulate ? from_f32<T>(to_f32(y[at]) + to_f32(x[at])) : x[at];
            }
        }
    }
}

static void rope_call(const char *what, Tensor *y, const Tensor *x, const Tensor *positions, const RopeTable *rope,
                      double sign, bool accumulate) {
    init();
    if (x->ndim != 3) fatal("cuda %s: x must be [N, H, D], got %d dims", what, x->ndim);
    if (y->numel != x->numel || y->dtype != x->dtype) fatal("cuda %s: input and output differ in size or dtype", what);
    const int64_t N = x->shape[0], H = x->shape[1], D = x->shape[2];
    const int rotary_dim = rope->rotary_dim;
    if (positions->dtype != DT_I32 || positions->numel != N)
        fatal("cuda %s: positions must be i32 [%lld]", what, (long long)N);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        fatal("cuda %s: rotary_dim %d must be even and in [2, head dim %lld]", what, rotary_dim, (long long)D);
    if (rotary_dim > CUDA_HEAD_DIM_MAX)
        fatal("cuda %s: rotary_dim %d is above %d (kernels/cuda/limits.h CUDA_HEAD_DIM_MAX)", what, rotary_dim,
              CUDA_HEAD_DIM_MAX);
    RopeFreqs freqs;
    for (int i = 0; i < rotary_dim / 2; i++) freqs.inv_freq[i] = rope->inv_freq[i];
    const int64_t work = N * (rotary_dim / 2 + (D - rotary_dim));
    if (work == 0 || H == 0) return;
    DISPATCH_FLOAT(x->dtype, T, what, {
        rope_kernel<T><<<grid_for(work, 256), 256, 0, stream()>>>((T *)y->data, (const T *)x->data, (const int32_t *)positions->data,
                                                     N, H, D, rotary_dim, freqs, rope->attention_scale, sign, accumulate);
        LAUNCH_CHECK(what);
    });
}

extern "C" void cuda_rope_forward(Tensor *y, const Tensor *x, const Tensor *positions, const RopeTable *rope) {
    rope_call("rope_forward", y, x, positions, rope, 1.0, false);
}

extern "C" void cuda_rope_backward(Tensor *dx, const Tensor *dy, const Tensor *positions, const RopeTable *rope) {
    if (!dx) return;
    rope_call("rope_backward", dx, dy, positions, rope, -1.0, true);
}
