/* GPU case family of the MSA kernels under sequence-split context parallelism (MsaParams.query_index and
 * key_rows, backend.h) against the CPU reference (tests/gpu/gpu_check.h; the cases are listed in
 * tests/gpu/cases.c, group "msa_cp").
 *
 * One case is one rank of a cp-way zigzag split of the packed sequence (layers/msa.c's assignment: the
 * sequence in 2 cp chunks, rank r holding chunks r and 2 cp - 1 - r), so its query rows are two runs of
 * tokens with the other ranks' tokens between them, crossing the documents' boundaries. On those rows, on
 * both devices:
 *   - msa_indexer with idx_lse (qi/ki small integers, so that the scores are exact on both sides and the
 *     selections must be equal element for element);
 *   - then, from the CPU's selection: msa_attention_forward and the accumulating msa_attention_backward, the
 *     sparse msa_kl_forward / msa_kl_backward, msa_attention_kl_backward, the dense (warm-up) KL, and
 *     msa_recall over every key.
 * With fetched, k and v hold only the tokens of the blocks some query selected, in a shuffled row order, found
 * through key_rows (op_cp_fetch_blocks' layout), for the attention, the sparse KL and the fused backward; dk
 * and dv then have those rows. chunk > 0 forces that many queries per attention chunk and per KL window
 * (MSA_CUDA_MSA_CHUNK, MSA_CUDA_KL_WINDOW), so that the rows' chunks and the tokens' blocks do not line up. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_cases.h"

/* small integers in [-2, 2]: exact products and sums in fp32 and bf16 */
static Pair pair_small_ints(DType dt, int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    float *v = xmalloc((size_t)n * sizeof(float) + 4);
    for (int64_t i = 0; i < n; i++) v[i] = (float)((int)(rng_uniform(&gpu_check.rng) * 5.0) - 2);
    Pair p = pair_from(dt, ndim, shape, v);
    free(v);
    return p;
}

/* The fetched rows of k or v [N, Hkv, D] (host values of the CPU copy): row i holds token tokens[i] */
static Pair fetched_rows(DType dt, const Pair *x, const int32_t *tokens, int64_t M) {
    const int64_t width = x->c.shape[1] * x->c.shape[2];
    float *v = xmalloc((size_t)(M * width) * sizeof(float) + 4);
    for (int64_t i = 0; i < M; i++)
        memcpy(v + i * width, (const float *)x->c.data + (int64_t)tokens[i] * width, (size_t)width * sizeof(float));
    Pair p = pair_from(dt, 3, (int64_t[]){M, x->c.shape[1], x->c.shape[2]}, v);
    free(v);
    return p;
}

static bool same_i32(const Tensor *c, const Tensor *g) {
    const size_t n = tensor_bytes(c);
    char *h = xmalloc(n + 1);
    GB->copy_to_host(h, g->data, n);
    const bool same = memcmp(h, c->data, n) == 0;
    free(h);
    return same;
}

static void set_env_int(const char *name, int v) {
    if (v > 0) {
        char b[32];
        snprintf(b, sizeof b, "%d", v);
        setenv(name, b, 1);
    } else {
        unsetenv(name);
    }
}

/* the scalar kl on both sides */
static void check_scalar(const char *name, const Pair *kl, double tol) {
    float *got = download_f32(&kl->g);
    const double ref = ((const float *)kl->c.data)[0], e = fabs((double)got[0] - ref) / fmax(fabs(ref), 1e-30);
    record(isfinite(got[0]) && e <= tol, "%-58s rel err %.2e (tol %.0e) %.7g vs %.7g", name, e, tol, got[0], ref);
    free(got);
}

/* The KL's forward (kl, idx_lse) and backward (dqi, dki) on both devices from the same inputs, checked under
 * the name "msa_cp <what> ..."; topk NULL: the dense warm-up's KL over every key. The CPU's idx_lse comes back
 * as a pair for the backwards that read it (the caller frees it). */
static Pair kl_checks(const char *what, const char *desc, double tol, DType act, const Pair *q, const Pair *k,
                      const Pair *lse, const Pair *qi, const Pair *ki, const Tensor *tc, const Tensor *tg, const Pair *cs,
                      const MsaParams *pc, const MsaParams *pg) {
    const int64_t Nq = q->c.shape[0], Hkv = qi->c.shape[1], Di = qi->c.shape[2], N = ki->c.shape[0];
    char name[160];
    Pair kl = pair_out(DT_F32, 1, (int64_t[]){1}), il = pair_out(DT_F32, 2, (int64_t[]){Hkv, Nq});
    CB->msa_kl_forward(&kl.c, &il.c, &q->c, &k->c, &lse->c, &qi->c, &ki->c, tc, NULL, &cs->c, pc);
    GB->msa_kl_forward(&kl.g, &il.g, &q->g, &k->g, &lse->g, &qi->g, &ki->g, tg, NULL, &cs->g, pg);
    snprintf(name, sizeof name, "msa_cp %s fwd kl %s", what, desc);
    check_scalar(name, &kl, tol);
    snprintf(name, sizeof name, "msa_cp %s fwd idx_lse %s", what, desc);
    check(name, &il, tol);
    Pair ilb = pair_from(DT_F32, 2, (int64_t[]){Hkv, Nq}, (const float *)il.c.data);
    Grad dqi = grad_new(act, 3, (int64_t[]){Nq, Hkv, Di}), dki = grad_new(act, 2, (int64_t[]){N, Di});
    CB->msa_kl_backward(&dqi.p.c, &dki.p.c, &q->c, &k->c, &lse->c, &qi->c, &ki->c, &ilb.c, tc, NULL, &cs->c, pc, NULL, 1.0f);
    grad_arm(&dqi);
    grad_arm(&dki);
    GB->msa_kl_backward(&dqi.p.g, &dki.p.g, &q->g, &k->g, &lse->g, &qi->g, &ki->g, &ilb.g, tg, NULL, &cs->g, pg, NULL, 1.0f);
    snprintf(name, sizeof name, "msa_cp %s bwd dqi %s", what, desc);
    grad_check(name, &dqi, tol);
    snprintf(name, sizeof name, "msa_cp %s bwd dki %s", what, desc);
    grad_check(name, &dki, tol);
    pair_free(&kl);
    pair_free(&il);
    grad_free(&dqi);
    grad_free(&dki);
    return ilb;
}

void msa_cp_case(const void *args) {
    const MsaCpCase *c = args;
    const DType act = c->act;
    const double tol = tol_of(act);
    int32_t cu[8];
    cu[0] = 0;
    for (int i = 0; i < c->ndocs; i++) cu[i + 1] = cu[i] + c->lens[i];
    const int64_t N = cu[c->ndocs], Hq = c->Hq, Hkv = c->Hkv, D = c->D, Di = c->Di, K = c->K, B = c->B;
    if (N % (2 * c->cp) != 0) fatal("msa_cp case: %lld tokens do not split into 2 * cp = %d chunks", (long long)N, 2 * c->cp);
    const int64_t chunk_tokens = N / (2 * c->cp), Nq = 2 * chunk_tokens;
    int32_t *qtok = xmalloc((size_t)Nq * sizeof(int32_t));
    for (int64_t i = 0; i < chunk_tokens; i++) {
        qtok[i] = (int32_t)(c->rank * chunk_tokens + i);
        qtok[chunk_tokens + i] = (int32_t)((2 * c->cp - 1 - c->rank) * chunk_tokens + i);
    }
    char desc[200], name[300];
    int o = snprintf(desc, sizeof desc, "%s G=%lld D=%lld Di=%lld B=%lld k=%lld cp=%d rank=%d%s%s docs=", dn(act),
                     (long long)(Hq / Hkv), (long long)D, (long long)Di, (long long)B, (long long)K, c->cp, c->rank,
                     c->fetched ? " fetched" : "", c->chunk ? " chunked" : "");
    for (int i = 0; i < c->ndocs && o < (int)sizeof desc - 8; i++) o += snprintf(desc + o, sizeof desc - (size_t)o, i ? ",%d" : "%d", c->lens[i]);
    set_env_int("MSA_CUDA_MSA_CHUNK", c->chunk);
    set_env_int("MSA_CUDA_KL_WINDOW", c->chunk);

    Pair cs = pair_i32(c->ndocs + 1, cu), qx = pair_i32(Nq, qtok);
    MsaParams pc = {.block_size = c->B, .topk_blocks = c->K, .init_blocks = c->init_blocks, .local_blocks = 1,
                    .scale = 1.0f / sqrtf((float)D), .index_scale = 1.0f / sqrtf((float)Di)};
    MsaParams pg = pc;
    pc.query_index = &qx.c;
    pg.query_index = &qx.g;

    /* the indexer on this rank's rows (every key's index key) */
    Pair qi = pair_small_ints(act, 3, (int64_t[]){Nq, Hkv, Di}), ki = pair_small_ints(act, 2, (int64_t[]){N, Di});
    Tensor tc = mk(CB, DT_I32, 3, (int64_t[]){Hkv, Nq, K}), tg = mk(GB, DT_I32, 3, (int64_t[]){Hkv, Nq, K});
    Pair il = pair_out(DT_F32, 2, (int64_t[]){Hkv, Nq});
    CB->msa_indexer(&tc, &il.c, NULL, &qi.c, &ki.c, &cs.c, &pc);
    GB->msa_indexer(&tg, &il.g, NULL, &qi.g, &ki.g, &cs.g, &pg);
    const bool same_sel = same_i32(&tc, &tg);
    snprintf(name, sizeof name, "msa_cp indexer topk %s", desc);
    record(same_sel, "%-58s %s", name, same_sel ? "identical" : "differs from the CPU's");
    snprintf(name, sizeof name, "msa_cp indexer idx_lse %s", desc);
    check(name, &il, tol);
    GB->copy_from_host(tg.data, tc.data, tensor_bytes(&tc)); /* the rest runs on the CPU's selection */

    /* the fetched rows: the tokens of every block some query selected, in a shuffled order */
    int32_t *key_rows = xmalloc((size_t)N * sizeof(int32_t)), *tokens = xmalloc((size_t)N * sizeof(int32_t));
    int64_t M = 0;
    for (int64_t j = 0; j < N; j++) key_rows[j] = -1;
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t t = 0; t < Nq; t++) {
            int64_t d = 0;
            while (cu[d + 1] <= qtok[t]) d++;
            const int32_t *row = (const int32_t *)tc.data + (g * Nq + t) * K;
            for (int64_t i = 0; i < K && row[i] >= 0; i++)
                for (int64_t j = cu[d] + row[i] * B; j < cu[d] + (row[i] + 1) * B && j < cu[d + 1]; j++)
                    if (key_rows[j] < 0) key_rows[j] = 0, tokens[M++] = (int32_t)j;
        }
    for (int64_t i = M - 1; i > 0; i--) { /* Fisher-Yates */
        const int64_t r = (int64_t)(rng_uniform(&gpu_check.rng) * (double)(i + 1)) % (i + 1);
        const int32_t x = tokens[i];
        tokens[i] = tokens[r];
        tokens[r] = x;
    }
    for (int64_t i = 0; i < M; i++) key_rows[tokens[i]] = (int32_t)i;
    Pair kr = pair_i32(N, key_rows);

    /* attention forward and backward on the rows, reading k/v whole or fetched */
    Pair q = pair_rand(act, 3, (int64_t[]){Nq, Hq, D}, 0, 1), k = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1),
         v = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1);
    Pair kf, vf;
    memset(&kf, 0, sizeof kf);
    memset(&vf, 0, sizeof vf);
    MsaParams fc = pc, fg = pg; /* the attention's params: with key_rows when fetched */
    const Pair *ka = &k, *va = &v;
    if (c->fetched) {
        kf = fetched_rows(act, &k, tokens, M);
        vf = fetched_rows(act, &v, tokens, M);
        fc.key_rows = &kr.c;
        fg.key_rows = &kr.g;
        ka = &kf;
        va = &vf;
    }
    const int64_t Mk = ka->c.shape[0];
    Pair out = pair_out(act, 3, (int64_t[]){Nq, Hq, D}), lse = pair_out(DT_F32, 2, (int64_t[]){Hq, Nq});
    CB->msa_attention_forward(&out.c, &lse.c, &q.c, &ka->c, &va->c, &tc, NULL, &cs.c, &fc);
    GB->msa_attention_forward(&out.g, &lse.g, &q.g, &ka->g, &va->g, &tg, NULL, &cs.g, &fg);
    snprintf(name, sizeof name, "msa_cp attn fwd out %s", desc);
    check(name, &out, tol);
    snprintf(name, sizeof name, "msa_cp attn fwd lse %s", desc);
    check(name, &lse, tol);

    Pair o2 = pair_from(act, 3, (int64_t[]){Nq, Hq, D}, (const float *)out.c.data);
    Pair l2 = pair_from(DT_F32, 2, (int64_t[]){Hq, Nq}, (const float *)lse.c.data);
    Pair dout = pair_rand(act, 3, (int64_t[]){Nq, Hq, D}, 0, 1);
    Grad dq = grad_new(act, 3, (int64_t[]){Nq, Hq, D}), dk = grad_new(act, 3, (int64_t[]){Mk, Hkv, D}),
         dv = grad_new(act, 3, (int64_t[]){Mk, Hkv, D});
    CB->msa_attention_backward(&dq.p.c, &dk.p.c, &dv.p.c, &dout.c, &q.c, &ka->c, &va->c, &o2.c, &l2.c, &tc, NULL, &cs.c, &fc);
    grad_arm(&dq);
    grad_arm(&dk);
    grad_arm(&dv);
    GB->msa_attention_backward(&dq.p.g, &dk.p.g, &dv.p.g, &dout.g, &q.g, &ka->g, &va->g, &o2.g, &l2.g, &tg, NULL, &cs.g, &fg);
    Grad *ag[3] = {&dq, &dk, &dv};
    const char *an[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof name, "msa_cp attn bwd %s %s", an[i], desc);
        grad_check(name, ag[i], tol);
    }

    /* the sparse KL: forward (kl, idx_lse), backward (dqi, dki), with the teacher's lse of the forward above */
    Pair ilb = kl_checks("kl", desc, tol, act, &q, ka, &l2, &qi, &ki, &tc, &tg, &cs, &fc, &fg);

    /* the attention backward with the KL folded in (the sparse phase's backward), from the same inputs */
    Grad fdq = grad_new(act, 3, (int64_t[]){Nq, Hq, D}), fdk = grad_new(act, 3, (int64_t[]){Mk, Hkv, D}),
         fdv = grad_new(act, 3, (int64_t[]){Mk, Hkv, D}), fdqi = grad_new(act, 3, (int64_t[]){Nq, Hkv, Di}),
         fdki = grad_new(act, 2, (int64_t[]){N, Di});
    Pair fkl = pair_out(DT_F32, 1, (int64_t[]){1});
    CB->msa_attention_kl_backward(&fdq.p.c, &fdk.p.c, &fdv.p.c, &fdqi.p.c, &fdki.p.c, &fkl.c, &dout.c, &q.c, &ka->c, &va->c,
                                  &o2.c, &l2.c, &qi.c, &ki.c, &ilb.c, &tc, NULL, &cs.c, &fc, NULL, 0.5f);
    Grad *fg5[5] = {&fdq, &fdk, &fdv, &fdqi, &fdki};
    const char *fn5[5] = {"dq", "dk", "dv", "dqi", "dki"};
    for (int i = 0; i < 5; i++) grad_arm(fg5[i]);
    GB->msa_attention_kl_backward(&fdq.p.g, &fdk.p.g, &fdv.p.g, &fdqi.p.g, &fdki.p.g, &fkl.g, &dout.g, &q.g, &ka->g, &va->g,
                                  &o2.g, &l2.g, &qi.g, &ki.g, &ilb.g, &tg, NULL, &cs.g, &fg, NULL, 0.5f);
    for (int i = 0; i < 5; i++) {
        snprintf(name, sizeof name, "msa_cp attn_kl bwd %s %s", fn5[i], desc);
        grad_check(name, fg5[i], tol);
    }
    snprintf(name, sizeof name, "msa_cp attn_kl bwd kl %s", desc);
    check_scalar(name, &fkl, tol);

    /* the dense warm-up's KL over every key (the teacher's lse: the CPU's dense attention on the rows) */
    Tensor dout_c = mk(CB, DT_F32, 3, (int64_t[]){Nq, Hq, D}), dlse_c = mk(CB, DT_F32, 2, (int64_t[]){Hq, Nq});
    CB->msa_attention_forward(&dout_c, &dlse_c, &q.c, &k.c, &v.c, NULL, NULL, &cs.c, &pc);
    Pair dl = pair_from(DT_F32, 2, (int64_t[]){Hq, Nq}, (const float *)dlse_c.data);
    Pair dilb = kl_checks("dense kl", desc, tol, act, &q, &k, &dl, &qi, &ki, NULL, NULL, &cs, &pc, &pg);

    /* the recall over every key, sampling the rows whose token is a multiple of 3 */
    const double rc = CB->msa_recall(&q.c, &k.c, &tc, &cs.c, &pc, 3), rg = GB->msa_recall(&q.g, &k.g, &tg, &cs.g, &pg, 3);
    const double re = fabs(rg - rc) / fmax(fabs(rc), 1e-30);
    snprintf(name, sizeof name, "msa_cp recall %s", desc);
    record(isfinite(rg) && re <= tol, "%-58s rel err %.2e (tol %.0e) %.7g vs %.7g", name, re, tol, rg, rc);

    set_env_int("MSA_CUDA_MSA_CHUNK", 0);
    set_env_int("MSA_CUDA_KL_WINDOW", 0);
    Pair *pairs[] = {&cs, &qx, &qi, &ki, &il, &kr, &q, &k, &v, &kf, &vf, &out, &lse, &o2, &l2, &dout, &ilb, &fkl, &dl, &dilb};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
        if (pairs[i]->g.data || pairs[i]->c.data) pair_free(pairs[i]);
    Grad *grads[] = {&dq, &dk, &dv, &fdq, &fdk, &fdv, &fdqi, &fdki};
    for (size_t i = 0; i < sizeof grads / sizeof grads[0]; i++) grad_free(grads[i]);
    free_t(&tc);
    free_t(&tg);
    free_t(&dout_c);
    free_t(&dlse_c);
    free(qtok);
    free(key_rows);
    free(tokens);
}
