/* The block transpose of the context-parallel exchanges (autograd/op_cp.c): src [a, b, inner] ->
 * dst [b, a, inner]. A pure copy of whole rows of inner elements, so it serves every dtype. */
#include "cpu.h"

void cpu_transpose01(Tensor *dst, const Tensor *src, int64_t a, int64_t b) {
    if (a <= 0 || b <= 0 || src->numel % (a * b) != 0)
        fatal("cpu transpose01: %lld elements are not [%lld, %lld, inner]", (long long)src->numel, (long long)a,
              (long long)b);
    if (dst->numel != src->numel || dst->dtype != src->dtype)
        fatal("cpu transpose01: dst (%lld %s) differs from src (%lld %s)", (long long)dst->numel,
              dtype_name(dst->dtype), (long long)src->numel, dtype_name(src->dtype));
    const size_t row = (size_t)(src->numel / (a * b)) * dtype_size(src->dtype);
    const char *s = src->data;
    char *d = dst->data;
#pragma omp parallel for schedule(static) if (a * b * (int64_t)row > (1 << 20))
    for (int64_t i = 0; i < a; i++)
        for (int64_t j = 0; j < b; j++) memcpy(d + ((size_t)j * a + i) * row, s + ((size_t)i * b + j) * row, row);
}
