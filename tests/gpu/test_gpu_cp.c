/* GPU tests of context parallelism's kernels against the CPU's: the ring attention step of sequence-split
 * context parallelism (kernels/cuda/attention_ring.cu; ring_case), and the block transpose of the head mode
 * (kernels/cuda/transpose.cu) against the CPU kernel:
 * a pure copy, so the results must be identical (tolerance 0); the row sizes of the cases (cases.c) cover
 * every word width the kernel picks. The exchanges themselves (NCCL all-to-all, all-gather,
 * reduce-scatter) run in the multi-GPU training comparison (tests/test_dist_cp.c's configurations with
 * train.device = "cuda"). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

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

/* The tokens of rank r of P in the zigzag split of N tokens (chunks r and 2P-1-r of 2P), ascending. */
static int32_t *zigzag_tokens(int64_t N, int P, int r) {
    const int64_t chunk = N / (2 * P);
    int32_t *t = xmalloc((size_t)(2 * chunk) * sizeof(int32_t));
    for (int64_t i = 0; i < chunk; i++) {
        t[i] = (int32_t)(r * chunk + i);
        t[chunk + i] = (int32_t)((2 * P - 1 - r) * chunk + i);
    }
    return t;
}

/* Rank me's queries over every rank's K/V block, as op_cp_ring_attention runs them (the same ring order),
 * on both backends from the same start (out 0, lse -inf): the merged out and lse, then the backward from
 * the reference's final out and lse: dq summed over the blocks, and each block's dk, dv. */
void ring_case(const void *args) {
    const RingCase *c = args;
    const DType act = c->act;
    const int P = c->ranks;
    int32_t cu[7] = {0};
    for (int i = 0; i < c->ndocs; i++) cu[i + 1] = cu[i] + c->lens[i];
    const int64_t N = cu[c->ndocs], n = N / P, Hq = c->Hq, Hkv = c->Hkv, D = c->D;
    const float scale = 1.0f / sqrtf((float)D);
    Pair cs = pair_i32(c->ndocs + 1, cu);
    int32_t *mine = zigzag_tokens(N, P, c->me);
    Pair qi = pair_i32(n, mine);
    Pair q = pair_rand(act, 3, (int64_t[]){n, Hq, D}, 0, 1);
    Pair *ki = xmalloc((size_t)P * sizeof(Pair)), *k = xmalloc((size_t)P * sizeof(Pair)), *v = xmalloc((size_t)P * sizeof(Pair));
    for (int b = 0; b < P; b++) {
        int32_t *tokens = zigzag_tokens(N, P, b);
        ki[b] = pair_i32(n, tokens);
        free(tokens);
        k[b] = pair_rand(act, 3, (int64_t[]){n, Hkv, D}, 0, 1);
        v[b] = pair_rand(act, 3, (int64_t[]){n, Hkv, D}, 0, 1);
    }
    float *start = xmalloc((size_t)(n * Hq * D) * sizeof(float));
    for (int64_t i = 0; i < n * Hq * D; i++) start[i] = 0.0f;
    Pair out = pair_from(act, 3, (int64_t[]){n, Hq, D}, start);
    for (int64_t i = 0; i < Hq * n; i++) start[i] = -INFINITY;
    Pair lse = pair_from(DT_F32, 2, (int64_t[]){Hq, n}, start);
    for (int step = 0; step < P; step++) {
        const int b = (c->me - step + P) % P;
        CB->attention_ring_forward(&out.c, &lse.c, &q.c, &k[b].c, &v[b].c, &qi.c, &ki[b].c, &cs.c, scale);
        GB->attention_ring_forward(&out.g, &lse.g, &q.g, &k[b].g, &v[b].g, &qi.g, &ki[b].g, &cs.g, scale);
    }
    char desc[160];
    int o = snprintf(desc, sizeof desc, "%s %d ranks, rank %d, Hq=%lld Hkv=%lld D=%lld docs=", dn(act), P, c->me,
                     (long long)Hq, (long long)Hkv, (long long)D);
    for (int i = 0; i < c->ndocs && o < (int)sizeof desc - 8; i++)
        o += snprintf(desc + o, sizeof desc - (size_t)o, i ? ",%d" : "%d", c->lens[i]);
    char name[320];
    snprintf(name, sizeof name, "ring fwd out %s", desc);
    check(name, &out, tol_of(act));
    snprintf(name, sizeof name, "ring fwd lse %s", desc);
    check(name, &lse, tol_of(act));

    /* backward from the reference's final out and lse, as the GPU's dtype holds them */
    Pair o2 = pair_from(act, 3, (int64_t[]){n, Hq, D}, (const float *)out.c.data);
    Pair l2 = pair_from(DT_F32, 2, (int64_t[]){Hq, n}, (const float *)lse.c.data);
    Pair dout = pair_rand(act, 3, (int64_t[]){n, Hq, D}, 0, 1);
    Grad dq = grad_new(act, 3, (int64_t[]){n, Hq, D});
    Grad *dk = xmalloc((size_t)P * sizeof(Grad)), *dv = xmalloc((size_t)P * sizeof(Grad));
    for (int b = 0; b < P; b++) {
        dk[b] = grad_new(act, 3, (int64_t[]){n, Hkv, D});
        dv[b] = grad_new(act, 3, (int64_t[]){n, Hkv, D});
    }
    const bool want_dq = c->grads & 1, want_dk = c->grads & 2, want_dv = c->grads & 4;
    for (int b = 0; b < P; b++)
        CB->attention_ring_backward(want_dq ? &dq.p.c : NULL, want_dk ? &dk[b].p.c : NULL, want_dv ? &dv[b].p.c : NULL,
                                    &dout.c, &q.c, &k[b].c, &v[b].c, &o2.c, &l2.c, &qi.c, &ki[b].c, &cs.c, scale);
    grad_arm(&dq);
    for (int b = 0; b < P; b++) grad_arm(&dk[b]), grad_arm(&dv[b]);
    for (int b = 0; b < P; b++)
        GB->attention_ring_backward(want_dq ? &dq.p.g : NULL, want_dk ? &dk[b].p.g : NULL, want_dv ? &dv[b].p.g : NULL,
                                    &dout.g, &q.g, &k[b].g, &v[b].g, &o2.g, &l2.g, &qi.g, &ki[b].g, &cs.g, scale);
    const char *others = c->grads == 7 ? "" : " (others NULL)";
    if (want_dq) {
        snprintf(name, sizeof name, "ring bwd dq %s%s", desc, others);
        grad_check(name, &dq, tol_of(act));
    }
    for (int b = 0; b < P; b++) {
        if (want_dk) {
            snprintf(name, sizeof name, "ring bwd dk of rank %d's block %s%s", b, desc, others);
            grad_check(name, &dk[b], tol_of(act));
        }
        if (want_dv) {
            snprintf(name, sizeof name, "ring bwd dv of rank %d's block %s%s", b, desc, others);
            grad_check(name, &dv[b], tol_of(act));
        }
    }
    grad_free(&dq);
    for (int b = 0; b < P; b++) {
        grad_free(&dk[b]), grad_free(&dv[b]);
        pair_free(&ki[b]), pair_free(&k[b]), pair_free(&v[b]);
    }
    free(dk), free(dv), free(ki), free(k), free(v);
    Pair *ps[] = {&cs, &qi, &q, &out, &lse, &o2, &l2, &dout};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) pair_free(ps[i]);
    free(start);
    free(mine);
}
