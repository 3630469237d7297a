/* GPU tests of dense attention through cuDNN's fused SDPA engines (kernels/cuda/attention_cudnn.cu)
 * against the CPU reference (tests/gpu/gpu_check.h). The group forces the cuDNN path with
 * MSA_ATTENTION=cudnn, so a graph cuDNN refuses stops the run with the graph and cuDNN's reason on
 * stderr instead of passing on our own kernel. BF16 only (the cuDNN path's dtype); documents of unequal
 * lengths (1, 0, not multiples of 64, more documents than a power of two so that the plan's batch is
 * padded with empty documents), Hq/Hkv = 1, 2, 8, D = 64 and 128, and two shapes in the same plan
 * bucket with different document lengths (the cached plan, new lengths and offsets). */
#include <stdio.h>
#include <stdlib.h>

#include "gpu_check.h"

/* BF16 only (the cuDNN path's dtype): the dense attention case of tests/gpu/test_gpu.c, through cuDNN here */
static void cudnn_case(int ndocs, const int32_t *lens, int64_t Hq, int64_t Hkv, int64_t D, int grads) {
    attention_case("cudnn attention", DT_BF16, ndocs, lens, Hq, Hkv, D, grads);
}

void test_attention_cudnn_gpu(void) {
    const char *prev = getenv("MSA_ATTENTION");
    char saved[64] = "";
    if (prev) snprintf(saved, sizeof saved, "%s", prev);
    setenv("MSA_ATTENTION", "cudnn", 1);

    cudnn_case(1, (int32_t[]){1}, 2, 1, 64, 7);                              /* one token */
    cudnn_case(4, (int32_t[]){5, 37, 1, 90}, 4, 2, 64, 7);                   /* plan (b 4, s 128) */
    cudnn_case(4, (int32_t[]){60, 3, 100, 2}, 4, 2, 64, 7);                  /* the same plan, new lengths */
    cudnn_case(3, (int32_t[]){33, 0, 64}, 2, 2, 64, 7);                      /* an empty document, MHA */
    cudnn_case(2, (int32_t[]){200, 57}, 8, 1, 128, 7);                       /* Hq/Hkv = 8 */
    cudnn_case(5, (int32_t[]){31, 32, 33, 64, 65}, 8, 8, 128, 7);            /* Hq/Hkv = 1, D 128 */
    cudnn_case(3, (int32_t[]){300, 1, 129}, 16, 2, 128, 7);                  /* Hq/Hkv = 8, 16 heads */
    cudnn_case(9, (int32_t[]){7, 1, 13, 64, 65, 2, 128, 3, 50}, 4, 1, 64, 7); /* b 16: 7 empty documents */
    cudnn_case(1, (int32_t[]){1000}, 4, 2, 128, 7);                          /* one longer document (s 1024) */
    cudnn_case(2, (int32_t[]){40, 60}, 4, 2, 64, 2);                         /* dk only */
    cudnn_case(2, (int32_t[]){40, 60}, 4, 2, 64, 5);                         /* dq and dv */

    if (prev) setenv("MSA_ATTENTION", saved, 1);
    else unsetenv("MSA_ATTENTION");
}
