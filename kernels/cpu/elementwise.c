/* Elementwise kernels and reductions of the CPU backend. */
#include "cpu.h"

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

double cpu_sumsq_many(const Tensor *const *xs, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += cpu_sumsq(xs[i]);
    return s;
}

void cpu_cast(Tensor *dst, const Tensor *src) {
    if (dst->numel != src->numel) fatal("cpu cast: element counts differ");
    for (int64_t i = 0; i < src->numel; i++) tensor_set(dst, i, tensor_get(src, i));
}
