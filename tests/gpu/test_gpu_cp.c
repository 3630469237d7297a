/* GPU test of the context-parallel block transpose (kernels/cuda/transpose.cu) against the CPU kernel:
 * a pure copy, so the results must be identical (tolerance 0). Row sizes cover every word width the
 * kernel picks (16-byte rows of BF16 head dims, 12-byte F32 rows, 6-byte BF16 rows, 2-byte rows). The
 * exchanges themselves (NCCL all-to-all, all-gather, reduce-scatter) run in the multi-GPU training
 * comparison (tests/test_dist_cp.c's configurations with train.device = "cuda"). */
#include <stdio.h>

#include "gpu_check.h"

void test_cp_gpu(void) {
    static const struct {
        DType dt;
        int64_t a, b, inner;
    } cases[] = {{DT_BF16, 64, 2, 128}, {DT_BF16, 3, 4, 64}, {DT_F32, 5, 2, 3}, {DT_BF16, 7, 3, 3},
                 {DT_BF16, 9, 4, 1},    {DT_F32, 2048, 8, 64}, {DT_BF16, 1, 1, 5}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int64_t a = cases[i].a, b = cases[i].b, c = cases[i].inner;
        Pair x = pair_rand(cases[i].dt, 3, (int64_t[]){a, b, c}, 0, 1);
        Pair y = pair_out(cases[i].dt, 3, (int64_t[]){b, a, c}), z = pair_out(cases[i].dt, 3, (int64_t[]){a, b, c});
        CB->transpose01(&y.c, &x.c, a, b);
        GB->transpose01(&y.g, &x.g, a, b);
        char name[160];
        snprintf(name, sizeof name, "transpose01 %s [%lld, %lld, %lld]", dn(cases[i].dt), (long long)a, (long long)b,
                 (long long)c);
        check(name, &y, 0.0);
        GB->transpose01(&z.g, &y.g, b, a);
        snprintf(name, sizeof name, "transpose01 %s [%lld, %lld, %lld] round trip", dn(cases[i].dt), (long long)a,
                 (long long)b, (long long)c);
        check_h(name, &z.g, x.h, 0.0);
        pair_free(&x), pair_free(&y), pair_free(&z);
    }
}
