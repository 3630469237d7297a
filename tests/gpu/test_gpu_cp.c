/* GPU test of the context-parallel block transpose (kernels/cuda/transpose.cu) against the CPU kernel:
 * a pure copy, so the results must be identical (tolerance 0); the row sizes of the cases (cases.c) cover
 * every word width the kernel picks. The exchanges themselves (NCCL all-to-all, all-gather,
 * reduce-scatter) run in the multi-GPU training comparison (tests/test_dist_cp.c's configurations with
 * train.device = "cuda"). */
#include <stdio.h>

#include "gpu_cases.h"

/* src [a, b, inner] -> [b, a, inner] against the CPU, then back again on the GPU alone */
void transpose_case(const void *args) {
    const TransposeCase *c = args;
    const int64_t a = c->a, b = c->b, n = c->inner;
    Pair x = pair_rand(c->dt, 3, (int64_t[]){a, b, n}, 0, 1);
    Pair y = pair_out(c->dt, 3, (int64_t[]){b, a, n}), z = pair_out(c->dt, 3, (int64_t[]){a, b, n});
    CB->transpose01(&y.c, &x.c, a, b);
    GB->transpose01(&y.g, &x.g, a, b);
    char name[160];
    snprintf(name, sizeof name, "transpose01 %s [%lld, %lld, %lld]", dn(c->dt), (long long)a, (long long)b, (long long)n);
    check(name, &y, 0.0);
    GB->transpose01(&z.g, &y.g, b, a);
    snprintf(name, sizeof name, "transpose01 %s [%lld, %lld, %lld] round trip", dn(c->dt), (long long)a, (long long)b,
             (long long)n);
    check_h(name, &z.g, x.h, 0.0);
    pair_free(&x), pair_free(&y), pair_free(&z);
}
