/* RoPE on the GPU: NeoX/Llama "rotate half" pairing (i, i + rotary_dim/2) on the first rotary_dim dims of
 * every head of x [N, H, D]; the rest pass through. As in the CPU reference, the angle pos * inv_freq
 * and its cos/sin are computed in fp64 (one thread per token and pair, shared by all heads), so large
 * positions (100K+) lose nothing to fp32 angle rounding; the rotation itself is fp64 too. The backward
 * is the rotation by -angle, accumulated into dx. */
#include <math.h>

#include "primitives.cuh"

using namespace msacuda;

template <typename T>
__global__ void rope_kernel(T *y, const T *x, const int32_t *positions, int64_t N, int64_t H, int64_t D, int rot,
                            double theta, double sign, bool accumulate) {
    const int64_t half = rot / 2, W = half + (D - rot);
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < N * W; idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = idx / W, i = idx % W;
        if (i < half) {
            const double angle = (double)positions[n] * pow(theta, -2.0 * (double)i / (double)rot);
            double s, c;
            sincos(angle, &s, &c);
            s *= sign;
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

static void rope_call(const char *what, Tensor *y, const Tensor *x, const Tensor *positions, int rotary_dim, float theta,
                      double sign, bool accumulate) {
    init();
    if (x->ndim != 3) fatal("cuda %s: x must be [N, H, D], got %d dims", what, x->ndim);
    if (y->numel != x->numel || y->dtype != x->dtype) fatal("cuda %s: input and output differ in size or dtype", what);
    const int64_t N = x->shape[0], H = x->shape[1], D = x->shape[2];
    if (positions->dtype != DT_I32 || positions->numel != N)
        fatal("cuda %s: positions must be i32 [%lld]", what, (long long)N);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        fatal("cuda %s: rotary_dim %d must be even and in [2, head dim %lld]", what, rotary_dim, (long long)D);
    if (!(theta > 1.0f)) fatal("cuda %s: theta %g must be > 1", what, (double)theta);
    const int64_t work = N * (rotary_dim / 2 + (D - rotary_dim));
    if (work == 0 || H == 0) return;
    DISPATCH_FLOAT(x->dtype, T, what, {
        rope_kernel<T><<<grid_for(work, 256), 256>>>((T *)y->data, (const T *)x->data, (const int32_t *)positions->data,
                                                     N, H, D, rotary_dim, (double)theta, sign, accumulate);
        LAUNCH_CHECK(what);
    });
}

extern "C" void cuda_rope_forward(Tensor *y, const Tensor *x, const Tensor *positions, int rotary_dim, float theta) {
    rope_call("rope_forward", y, x, positions, rotary_dim, theta, 1.0, false);
}

extern "C" void cuda_rope_backward(Tensor *dx, const Tensor *dy, const Tensor *positions, int rotary_dim, float theta) {
    if (!dx) return;
    rope_call("rope_backward", dx, dy, positions, rotary_dim, theta, -1.0, true);
}
