/* GELU kernels of the CPU backend (GPT-2's tanh approximation, kernels.def), in double whatever T is.
 * The typed bodies are at the end of this file (instantiate.h includes it again once per type). */
#ifndef S
#include "cpu.h"

/* sqrt(2/pi) and the cubic coefficient of the approximation */
static const double gelu_c = 0.7978845608028654, gelu_a = 0.044715;

#define CPU_IMPL "gelu.c"
#include "instantiate.h"

void cpu_gelu_forward(Tensor *y, const Tensor *x) {
    CPU_SAME_DTYPE("gelu_forward", x, y);
    if (y->numel != x->numel) fatal("cpu gelu_forward: y has %lld elements, x %lld", (long long)y->numel, (long long)x->numel);
    CPU_CALL(x, gelu_fwd, y->data, x->data, x->numel);
}

void cpu_gelu_backward(Tensor *dx, const Tensor *dy, const Tensor *x) {
    if (!dx) return;
    CPU_SAME_DTYPE("gelu_backward", x, dy, dx);
    if (dx->numel != x->numel || dy->numel != x->numel)
        fatal("cpu gelu_backward: dx, dy and x have %lld, %lld and %lld elements", (long long)dx->numel,
              (long long)dy->numel, (long long)x->numel);
    CPU_CALL(x, gelu_bwd, dx->data, dy->data, x->data, x->numel);
}

#else

static void S(gelu_fwd)(T *y, const T *x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const double v = x[i];
        y[i] = (T)(0.5 * v * (1.0 + tanh(gelu_c * (v + gelu_a * v * v * v))));
    }
}

/* f'(x) = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3a x^2), t = tanh(sqrt(2/pi) (x + a x^3)) */
static void S(gelu_bwd)(T *dx, const T *dy, const T *x, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        const double v = x[i], t = tanh(gelu_c * (v + gelu_a * v * v * v));
        const double d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * gelu_c * (1.0 + 3.0 * gelu_a * v * v);
        dx[i] += (T)(dy[i] * d);
    }
}
#endif
