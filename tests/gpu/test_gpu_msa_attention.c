/* GPU case family of the MSA attention kernels (kernels/cuda/msa_attention*.cu) against the CPU reference
 * (tests/gpu/gpu_check.h; the cases are listed in tests/gpu/cases.c), and their --bench timing (bench_msa_attention_gpu, called by test_gpu.c).
 *
 * Each case: random q/k/v, a selection (the CPU indexer on random index q/k, a "hot" selection where
 * every query takes block 0, or NULL = dense), forward out/lse, then the accumulating backward from the
 * same out/lse on both sides. The cases cover what the GPU kernels organise differently from the CPU:
 * documents of unequal lengths (length 1, non-multiples of the block), block sizes 4..128 (and the
 * key segments of a block larger than a tensor-core tile), k from 1 to more blocks than a document
 * has, G = 1, 2, 16, D = 64 and 128 (tensor cores for BF16) and odd D (CUDA cores), a plan given or
 * built inside, query chunks (MSA_CUDA_MSA_CHUNK), hot rows split over many CTAs, and inputs large
 * enough that each CTA runs a pipeline of many tiles. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_cases.h"

static double uniform(void) { return rng_uniform(&gpu_check.rng); }

/* A valid selection where every query takes block 0 (and its own block when k >= 2), the rest of
 * the budget random earlier blocks; ascending, -1 padded. */
static void hot_topk(float *out, const int32_t *cu, int ndocs, int Hkv, int64_t N, int K, int B) {
    int32_t *sel = xmalloc((size_t)K * sizeof(int32_t));
    for (int g = 0; g < Hkv; g++)
        for (int d = 0; d < ndocs; d++)
            for (int64_t t = cu[d]; t < cu[d + 1]; t++) {
                const int local = (int)((t - cu[d]) / B);
                int n = 0;
                sel[n++] = 0;
                if (K >= 2 && local > 0) sel[n++] = local;
                for (int tries = 0; n < K && n < local + 1 && tries < 64; tries++) {
                    const int b = (int)(uniform() * local);
                    bool dup = false;
                    for (int i = 0; i < n; i++) dup |= sel[i] == b;
                    if (!dup) sel[n++] = b;
                }
                for (int i = 1; i < n; i++) /* insertion sort */
                    for (int j = i; j > 0 && sel[j - 1] > sel[j]; j--) {
                        const int32_t x = sel[j];
                        sel[j] = sel[j - 1];
                        sel[j - 1] = x;
                    }
                float *row = out + ((int64_t)g * N + t) * K;
                for (int i = 0; i < K; i++) row[i] = i < n ? (float)sel[i] : -1.0f;
            }
    free(sel);
}

void msa_attention_case(const void *args) {
    const MsaAttentionCase *c = args;
    const DType act = c->act;
    const int ndocs = c->ndocs;
    int32_t cu[8];
    cu[0] = 0;
    for (int i = 0; i < ndocs; i++) cu[i + 1] = cu[i] + c->lens[i];
    const int64_t N = cu[ndocs], Hq = c->Hq, Hkv = c->Hkv, D = c->D, K = c->K;
    const MsaParams p = {.block_size = c->B, .topk_blocks = c->K, .init_blocks = c->init_blocks, .local_blocks = 1,
                         .scale = 1.0f / sqrtf((float)D), .index_scale = 0.25f};
    Pair cs = pair_i32(ndocs + 1, cu);

    /* the selection, on both devices (and the CPU's plan when the case gives one) */
    Pair topk;
    memset(&topk, 0, sizeof topk);
    Tensor plan_g;
    memset(&plan_g, 0, sizeof plan_g);
    const int64_t tshape[3] = {Hkv, N, K};
    if (c->sel != SEL_DENSE) {
        float *tv = xmalloc((size_t)(Hkv * N * K) * sizeof(float) + 4);
        if (c->sel == SEL_HOT) {
            hot_topk(tv, cu, ndocs, (int)Hkv, N, (int)K, c->B);
        } else {
            const int64_t Di = 16;
            Tensor qi = mk(CB, DT_F32, 3, (int64_t[]){N, Hkv, Di}), ki = mk(CB, DT_F32, 2, (int64_t[]){N, Di});
            Tensor tk = mk(CB, DT_I32, 3, tshape);
            float *r1 = randn(qi.numel, 0, 1), *r2 = randn(ki.numel, 0, 1);
            memcpy(qi.data, r1, (size_t)qi.numel * sizeof(float));
            memcpy(ki.data, r2, (size_t)ki.numel * sizeof(float));
            CB->msa_indexer(&tk, NULL, NULL, &qi, &ki, &cs.c, &p);
            for (int64_t i = 0; i < tk.numel; i++) tv[i] = (float)((const int32_t *)tk.data)[i];
            free(r1);
            free(r2);
            free_t(&qi);
            free_t(&ki);
            free_t(&tk);
        }
        topk = pair_from(DT_I32, 3, tshape, tv);
        free(tv);
        if (c->plan_given) {
            const int64_t pshape[2] = {Hkv, msa_plan_width(N, K)};
            Tensor pc = mk(CB, DT_I32, 2, pshape);
            CB->msa_plan(&pc, &topk.c, &cs.c, &p);
            plan_g = mk(GB, DT_I32, 2, pshape);
            GB->copy_from_host(plan_g.data, pc.data, tensor_bytes(&pc));
            free_t(&pc);
        }
    }
    const Tensor *tk_c = c->sel == SEL_DENSE ? NULL : &topk.c, *tk_g = c->sel == SEL_DENSE ? NULL : &topk.g;
    const Tensor *pl_g = plan_g.data ? &plan_g : NULL;

    char chunk_s[32];
    if (c->chunk > 0) {
        snprintf(chunk_s, sizeof chunk_s, "%d", c->chunk);
        setenv("MSA_CUDA_MSA_CHUNK", chunk_s, 1);
    }
    char desc[200], name[260];
    int o = snprintf(desc, sizeof desc, "%s G=%lld D=%lld B=%d k=%d %s%s%s docs=", dn(act), (long long)(Hq / Hkv), (long long)D,
                     c->B, c->K, c->sel == SEL_HOT ? "hot" : c->sel == SEL_DENSE ? "dense" : "indexer",
                     c->sel == SEL_DENSE ? "" : c->plan_given ? " plan" : " noplan", c->chunk ? " chunked" : "");
    for (int i = 0; i < ndocs && o < (int)sizeof desc - 8; i++) o += snprintf(desc + o, sizeof desc - (size_t)o, i ? ",%d" : "%d", c->lens[i]);

    AttnCase a = attn_inputs(act, N, Hq, Hkv, D);
    CB->msa_attention_forward(&a.out.c, &a.lse.c, &a.q.c, &a.k.c, &a.v.c, tk_c, NULL, &cs.c, &p);
    GB->msa_attention_forward(&a.out.g, &a.lse.g, &a.q.g, &a.k.g, &a.v.g, tk_g, pl_g, &cs.g, &p);
    attn_check_forward(&a, "msa", desc, tol_of(act));

    /* backward from the same out and lse on both sides */
    attn_backward_inputs(&a, act);
    const int gm = c->grads;
    CB->msa_attention_backward(gm & 1 ? &a.dq.p.c : NULL, gm & 2 ? &a.dk.p.c : NULL, gm & 4 ? &a.dv.p.c : NULL, &a.dout.c,
                               &a.q.c, &a.k.c, &a.v.c, &a.o2.c, &a.l2.c, tk_c, NULL, &cs.c, &p);
    attn_arm_grads(&a);
    GB->msa_attention_backward(gm & 1 ? &a.dq.p.g : NULL, gm & 2 ? &a.dk.p.g : NULL, gm & 4 ? &a.dv.p.g : NULL, &a.dout.g,
                               &a.q.g, &a.k.g, &a.v.g, &a.o2.g, &a.l2.g, tk_g, pl_g, &cs.g, &p);
    Grad *gs[3] = {&a.dq, &a.dk, &a.dv};
    float *first[3] = {NULL, NULL, NULL};
    for (int i = 0; i < 3; i++)
        if (c->repeat && (gm & (1 << i))) first[i] = download_f32(&gs[i]->p.g);
    attn_check_grads(&a, gm, "msa", desc, tol_of(act));
    if (c->repeat) { /* again from the same starting gradients: bit-identical (no atomics) */
        for (int i = 0; i < 3; i++)
            if (gm & (1 << i)) upload_f32(&gs[i]->p.g, gs[i]->g0);
        GB->msa_attention_backward(gm & 1 ? &a.dq.p.g : NULL, gm & 2 ? &a.dk.p.g : NULL, gm & 4 ? &a.dv.p.g : NULL, &a.dout.g,
                                   &a.q.g, &a.k.g, &a.v.g, &a.o2.g, &a.l2.g, tk_g, pl_g, &cs.g, &p);
        bool same = true;
        for (int i = 0; i < 3; i++) {
            if (!first[i]) continue;
            float *again = download_f32(&gs[i]->p.g);
            same &= memcmp(first[i], again, (size_t)gs[i]->p.g.numel * sizeof(float)) == 0;
            free(again);
            free(first[i]);
        }
        snprintf(name, sizeof name, "msa bwd deterministic %s", desc);
        record(same, "%-58s %s", name, same ? "bit-identical" : "differs between two runs");
    }
    if (c->chunk > 0) unsetenv("MSA_CUDA_MSA_CHUNK");
    attn_free(&a);
    if (c->sel != SEL_DENSE) pair_free(&topk);
    free_t(&plan_g);
    pair_free(&cs);
}

/* ---------- --bench ---------- */

/* One document of N tokens, Hq/Hkv/D, block B, top-k K: each query takes its own block and K-1 distinct
 * random earlier blocks (all of them when it sees at most K). Times the plan, the forward and the
 * backward (dq, dk, dv), and dense causal attention on the same q/k/v for comparison. FLOPs as the
 * release's benchmark: FWD 2(d_qk + d_v) Hq * pairs, BWD 2(3 d_qk + 2 d_v) Hq * pairs, pairs = attended
 * (query, key) pairs per head (mean over groups). */
static void bench_msa_one(int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int B, int K, bool *dense_ok) {
    Tensor topk, cu, plan;
    const double pairs = msa_bench_selection(&topk, &cu, &plan, Hkv, N, B, K);
    const MsaParams p = {.block_size = B, .topk_blocks = K, .init_blocks = 0, .local_blocks = 1,
                         .scale = 1.0f / sqrtf((float)D), .index_scale = 1.0f / sqrtf(128.0f)};
    Tensor q = dev_rand(DT_BF16, 3, (int64_t[]){N, Hq, D}, 1), k = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, D}, 1),
           v = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, D}, 1), dout = dev_rand(DT_BF16, 3, (int64_t[]){N, Hq, D}, 1);
    Tensor out = mk(GB, DT_BF16, 3, (int64_t[]){N, Hq, D}), lse = mk(GB, DT_F32, 2, (int64_t[]){Hq, N});
    Tensor dq = dev_rand(DT_BF16, 3, (int64_t[]){N, Hq, D}, 0), dk = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, D}, 0),
           dv = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, D}, 0);
    GB->msa_plan(&plan, &topk, &cu, &p); /* warm-up */
    GB->msa_attention_forward(&out, &lse, &q, &k, &v, &topk, &plan, &cu, &p);
    GB->msa_attention_backward(&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse, &topk, &plan, &cu, &p);
    const int reps = N >= 65536 ? 2 : 5;
    gpu_sync();
    double t0 = wall_seconds();
    for (int i = 0; i < reps; i++) GB->msa_plan(&plan, &topk, &cu, &p);
    gpu_sync();
    const double tp = (wall_seconds() - t0) / reps;
    t0 = wall_seconds();
    for (int i = 0; i < reps; i++) GB->msa_attention_forward(&out, &lse, &q, &k, &v, &topk, &plan, &cu, &p);
    gpu_sync();
    const double tf = (wall_seconds() - t0) / reps;
    t0 = wall_seconds();
    for (int i = 0; i < reps; i++)
        GB->msa_attention_backward(&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse, &topk, &plan, &cu, &p);
    gpu_sync();
    const double tb = (wall_seconds() - t0) / reps;
    const double ff = 2.0 * (double)(D + D) * (double)Hq * pairs, fb = 2.0 * (double)(3 * D + 2 * D) * (double)Hq * pairs;
    printf("  msa attention bf16 N=%lld Hq=%lld Hkv=%lld D=%lld B=%d k=%d (%.0f keys/query): plan %.2f ms, fwd %.2f ms "
           "(%.1f TFLOP/s), bwd %.2f ms (%.1f TFLOP/s)\n",
           (long long)N, (long long)Hq, (long long)Hkv, (long long)D, B, K, pairs / (double)N, tp * 1e3, tf * 1e3,
           ff / tf * 1e-12, tb * 1e3, fb / tb * 1e-12);
    fflush(stdout);
    /* dense causal attention on the same tensors, while it stays affordable (the first size decides) */
    if (*dense_ok) {
        const int dreps = N >= 65536 ? 1 : 3;
        GB->attention_forward(&out, &lse, &q, &k, &v, &cu, p.scale);
        GB->attention_backward(&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse, &cu, p.scale);
        gpu_sync();
        t0 = wall_seconds();
        for (int i = 0; i < dreps; i++) GB->attention_forward(&out, &lse, &q, &k, &v, &cu, p.scale);
        gpu_sync();
        const double df = (wall_seconds() - t0) / dreps;
        t0 = wall_seconds();
        for (int i = 0; i < dreps; i++) GB->attention_backward(&dq, &dk, &dv, &dout, &q, &k, &v, &out, &lse, &cu, p.scale);
        gpu_sync();
        const double db = (wall_seconds() - t0) / dreps;
        const double dflops = 4.0 * (double)Hq * (double)D * (double)N * (double)(N + 1) / 2;
        printf("    dense causal on the same shapes: fwd %.2f ms (%.1f TFLOP/s), bwd %.2f ms; MSA speed-up fwd %.1fx, "
               "bwd %.1fx, fwd+bwd %.1fx (plan included)\n",
               df * 1e3, dflops / df * 1e-12, db * 1e3, df / tf, db / tb, (df + db) / (tp + tf + tb));
        if (df + db > 1.0) *dense_ok = false; /* the next size would take ~16x as long */
    }
    Tensor *all[] = {&topk, &cu, &plan, &q, &k, &v, &dout, &out, &lse, &dq, &dk, &dv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free_t(all[i]);
}

void bench_msa_attention_gpu(void) {
    if (!GB->msa_attention_forward || !GB->msa_plan) {
        printf("  msa attention: the CUDA backend lacks msa_plan or msa_attention; skipped\n");
        return;
    }
    bool dense_ok = true;
    bench_msa_one(8192, 64, 4, 128, 128, 16, &dense_ok);
    bench_msa_one(32768, 64, 4, 128, 128, 16, &dense_ok);
    bench_msa_one(131072, 64, 4, 128, 128, 16, &dense_ok);
}
