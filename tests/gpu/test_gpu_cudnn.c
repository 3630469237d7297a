/* GPU tests of dense attention through cuDNN's fused SDPA engines (kernels/cuda/attention_cudnn.cu)
 * against the CPU reference (tests/gpu/gpu_check.h). The group forces the cuDNN path with
 * MSA_ATTENTION=cudnn, so a graph cuDNN refuses stops the run with the graph and cuDNN's reason on
 * stderr instead of passing on our own kernel. BF16 only (the cuDNN path's dtype); documents of unequal
 * lengths (1, 0, not multiples of 64, more documents than a power of two so that the plan's batch is
 * padded with empty documents), Hq/Hkv = 1, 2, 8, D = 64 and 128, and two shapes in the same plan
 * bucket with different document lengths (the cached plan, new lengths and offsets). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_check.h"

static void cudnn_case(int ndocs, const int32_t *lens, int64_t Hq, int64_t Hkv, int64_t D, int grads) {
    const DType act = DT_BF16;
    int32_t *cu = xmalloc((size_t)(ndocs + 1) * sizeof(int32_t));
    cu[0] = 0;
    for (int i = 0; i < ndocs; i++) cu[i + 1] = cu[i] + lens[i];
    const int64_t N = cu[ndocs];
    const float scale = 1.0f / sqrtf((float)D);
    Pair cs = pair_i32(ndocs + 1, cu);
    Pair q = pair_rand(act, 3, (int64_t[]){N, Hq, D}, 0, 1), k = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1),
         v = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1);
    Pair out = pair_out(act, 3, (int64_t[]){N, Hq, D}), lse = pair_out(DT_F32, 2, (int64_t[]){Hq, N});
    CB->attention_forward(&out.c, &lse.c, &q.c, &k.c, &v.c, &cs.c, scale);
    GB->attention_forward(&out.g, &lse.g, &q.g, &k.g, &v.g, &cs.g, scale);
    char name[200], desc[140];
    int o = snprintf(desc, sizeof desc, "Hq=%lld Hkv=%lld D=%lld docs=", (long long)Hq, (long long)Hkv, (long long)D);
    for (int i = 0; i < ndocs && o < (int)sizeof desc - 8; i++) o += snprintf(desc + o, sizeof desc - (size_t)o, i ? ",%d" : "%d", lens[i]);
    snprintf(name, sizeof name, "cudnn attention fwd out %s", desc);
    check(name, &out, tol_of(act));
    snprintf(name, sizeof name, "cudnn attention fwd lse %s", desc);
    check(name, &lse, tol_of(act));

    /* backward from the same out and lse on both sides (the reference's, rounded as the GPU holds out) */
    Pair o2 = pair_from(act, 3, (int64_t[]){N, Hq, D}, (const float *)out.c.data);
    Pair l2 = pair_from(DT_F32, 2, (int64_t[]){Hq, N}, (const float *)lse.c.data);
    Pair dout = pair_rand(act, 3, (int64_t[]){N, Hq, D}, 0, 1);
    Grad dq = grad_new(act, 3, (int64_t[]){N, Hq, D}), dk = grad_new(act, 3, (int64_t[]){N, Hkv, D}),
         dv = grad_new(act, 3, (int64_t[]){N, Hkv, D});
    CB->attention_backward(grads & 1 ? &dq.p.c : NULL, grads & 2 ? &dk.p.c : NULL, grads & 4 ? &dv.p.c : NULL, &dout.c, &q.c,
                           &k.c, &v.c, &o2.c, &l2.c, &cs.c, scale);
    grad_arm(&dq);
    grad_arm(&dk);
    grad_arm(&dv);
    GB->attention_backward(grads & 1 ? &dq.p.g : NULL, grads & 2 ? &dk.p.g : NULL, grads & 4 ? &dv.p.g : NULL, &dout.g, &q.g,
                           &k.g, &v.g, &o2.g, &l2.g, &cs.g, scale);
    Grad *gs[3] = {&dq, &dk, &dv};
    const char *gn[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        if (!(grads & (1 << i))) continue;
        snprintf(name, sizeof name, "cudnn attention bwd %s %s%s", gn[i], desc, grads == 7 ? "" : " (others NULL)");
        grad_check(name, gs[i], tol_of(act));
    }
    for (int i = 0; i < 3; i++) grad_free(gs[i]);
    Pair *ps[] = {&dout, &o2, &l2, &out, &lse, &q, &k, &v, &cs};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) pair_free(ps[i]);
    free(cu);
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
