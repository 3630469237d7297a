/* Elementwise kernels and reductions of the CPU backend. */
#include "cpu.h"

#include <math.h>

#include "../grad_clip.h"

#define CPU_IMPL "elementwise_impl.h"
#include "instantiate.h"

void cpu_axpy(Tensor *y, const Tensor *x, float alpha) {
    if (y->numel != x->numel) fatal("cpu axpy: %lld vs %lld elements", (long long)y->numel, (long long)x->numel);
    CPU_SAME_DTYPE("axpy", y, x);
    CPU_CALL(y, axpy, y->data, x->data, y->numel, alpha);
}

void cpu_scale(Tensor *y, float alpha) { CPU_CALL(y, scale, y->data, y->numel, alpha); }

void cpu_add(Tensor *out, const Tensor *a, const Tensor *b) {
    if (a->numel != b->numel || out->numel != a->numel) fatal("cpu add: element counts differ");
    CPU_SAME_DTYPE("add", out, a, b);
    CPU_CALL(out, add, out->data, a->data, b->data, out->numel);
}

double cpu_sumsq(const Tensor *x) {
    if (x->dtype == DT_F64) return sumsq_f64(x->data, x->numel);
    if (x->dtype == DT_F32) return sumsq_f32(x->data, x->numel);
    fatal("cpu sumsq: dtype %s", dtype_name(x->dtype));
}

void cpu_sumsq_many(Tensor *sum, const Tensor *const *xs, int n) {
    if (sum->dtype != DT_F64 || sum->numel != 1) fatal("cpu sumsq_many: the sum must be an f64 scalar");
    double s = 0.0;
    for (int i = 0; i < n; i++) s += cpu_sumsq(xs[i]);
    *(double *)sum->data += s;
}

void cpu_clip_scale(Tensor *scale, const Tensor *sumsq, float max_norm) {
    if (scale->dtype != DT_F32 || scale->numel != 1 || sumsq->dtype != DT_F64 || sumsq->numel != 1)
        fatal("cpu clip_scale: the scale must be an f32 scalar and the sum of squares an f64 scalar");
    *(float *)scale->data = clip_factor(sqrt(*(const double *)sumsq->data), max_norm);
}

void cpu_cast(Tensor *dst, const Tensor *src) {
    if (dst->numel != src->numel) fatal("cpu cast: element counts differ");
    for (int64_t i = 0; i < src->numel; i++) tensor_set(dst, i, tensor_get(src, i));
}
