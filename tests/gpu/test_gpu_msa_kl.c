/* GPU case families of the MSA KL alignment loss (kernels/cuda/msa_kl.cu, and folded into the attention
 * backward: msa_attention_kl_case below) against the CPU reference (tests/gpu/gpu_check.h; the cases are
 * listed in tests/gpu/cases.c), and its --bench timing (bench_msa_kl_gpu, called by test_gpu.c).
 *
 * Each case: random q/k/v and qi/ki, a selection (the CPU indexer on qi/ki, optionally with a forced
 * first block so that block 0 is a hot row, or NULL = the dense warm-up KL), the teacher's lse from
 * the CPU's MSA attention over that same selection (so the teacher is a real distribution), then the
 * forward (kl, idx_lse; run twice: bit-identical) and the accumulating backward (dqi, dki) from the
 * CPU's idx_lse on both sides. The cases cover what the GPU organises differently from the CPU:
 * documents of unequal lengths (length 1, non-multiples of the block), block sizes 4..200 (key
 * sub-tiles of a block longer than a tile), k = 1 up to more blocks than a document has, G = 1, 2, 3,
 * 16, 128 (several head passes), D/Di = 18..256 (padding, element-wise loads), a plan given or built
 * inside, hot rows split into several pieces, several query windows (MSA_CUDA_KL_WINDOW). Then KL == 0
 * and a zero gradient when the student equals the teacher. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_cases.h"

static MsaParams case_params(const MsaKlCase *c) {
    return (MsaParams){.block_size = c->B, .topk_blocks = c->K, .init_blocks = c->init_blocks, .local_blocks = 1,
                       .scale = 1.0f / sqrtf((float)c->D), .index_scale = 1.0f / sqrtf((float)c->Di)};
}

/* the CPU's topk (indexer on the CPU copies) and plan, and their GPU copies */
typedef struct {
    Tensor tc, tg, pc, pg;
} Sel;

static Sel make_sel(const Pair *qi, const Pair *ki, const Pair *cs, const MsaParams *p, int64_t Hkv, int64_t N, bool plan) {
    Sel s;
    memset(&s, 0, sizeof s);
    s.tc = mk(CB, DT_I32, 3, (int64_t[]){Hkv, N, p->topk_blocks});
    CB->msa_indexer(&s.tc, NULL, NULL, &qi->c, &ki->c, &cs->c, p);
    s.tg = mk(GB, DT_I32, 3, (int64_t[]){Hkv, N, p->topk_blocks});
    GB->copy_from_host(s.tg.data, s.tc.data, tensor_bytes(&s.tc));
    if (plan) {
        s.pc = mk(CB, DT_I32, 2, (int64_t[]){Hkv, msa_plan_width(N, p->topk_blocks)});
        CB->msa_plan(&s.pc, &s.tc, &cs->c, p);
        s.pg = mk(GB, DT_I32, 2, (int64_t[]){Hkv, msa_plan_width(N, p->topk_blocks)});
        GB->copy_from_host(s.pg.data, s.pc.data, tensor_bytes(&s.pc));
    }
    return s;
}

static void free_sel(Sel *s) {
    free_t(&s->tc);
    free_t(&s->tg);
    free_t(&s->pc);
    free_t(&s->pg);
}

/* the teacher's lse [Hq, N]: the CPU's MSA attention over the selection (NULL: dense) */
static Pair teacher_lse(const Pair *q, const Pair *k, const Pair *v, const Tensor *topk, const Pair *cs, const MsaParams *p) {
    const int64_t N = q->c.shape[0], Hq = q->c.shape[1], D = q->c.shape[2];
    Tensor out = mk(CB, DT_F32, 3, (int64_t[]){N, Hq, D}), lse = mk(CB, DT_F32, 2, (int64_t[]){Hq, N});
    CB->msa_attention_forward(&out, &lse, &q->c, &k->c, &v->c, topk, NULL, &cs->c, p);
    Pair l = pair_from(DT_F32, 2, (int64_t[]){Hq, N}, (const float *)lse.data);
    free_t(&out);
    free_t(&lse);
    return l;
}

static void set_window(int tokens) {
    if (tokens > 0) {
        char b[32];
        snprintf(b, sizeof b, "%d", tokens);
        setenv("MSA_CUDA_KL_WINDOW", b, 1);
    } else {
        unsetenv("MSA_CUDA_KL_WINDOW");
    }
}

static bool same_bits(const Tensor *a, const Tensor *b) {
    const size_t n = tensor_bytes(a);
    char *x = xmalloc(n + 1), *y = xmalloc(n + 1);
    GB->copy_to_host(x, a->data, n);
    GB->copy_to_host(y, b->data, n);
    const bool same = memcmp(x, y, n) == 0;
    free(x);
    free(y);
    return same;
}

void msa_kl_case(const void *args) {
    const MsaKlCase *c = args;
    const DType act = c->act;
    int32_t cu[8];
    cu[0] = 0;
    for (int i = 0; i < c->ndocs; i++) cu[i + 1] = cu[i] + c->lens[i];
    const int64_t N = cu[c->ndocs], Hq = c->Hq, Hkv = c->Hkv, D = c->D, Di = c->Di;
    const MsaParams p = case_params(c);
    const bool dense = c->sel == KL_DENSE;
    const double tol = tol_of(act);
    char desc[200], name[260];
    int o = snprintf(desc, sizeof desc, "%s G=%lld Hkv=%lld D=%lld Di=%lld ", dn(act), (long long)(Hq / Hkv), (long long)Hkv,
                     (long long)D, (long long)Di);
    if (dense) o += snprintf(desc + o, sizeof desc - (size_t)o, "dense");
    else
        o += snprintf(desc + o, sizeof desc - (size_t)o, "B=%d k=%d%s%s", c->B, c->K, c->init_blocks ? " hot" : "",
                      c->plan_given ? " plan" : "");
    if (c->window) o += snprintf(desc + o, sizeof desc - (size_t)o, " win=%d", c->window);
    o += snprintf(desc + o, sizeof desc - (size_t)o, " docs=");
    for (int i = 0; i < c->ndocs && o < (int)sizeof desc - 8; i++)
        o += snprintf(desc + o, sizeof desc - (size_t)o, i ? ",%d" : "%d", c->lens[i]);

    Pair cs = pair_i32(c->ndocs + 1, cu);
    Pair q = pair_rand(act, 3, (int64_t[]){N, Hq, D}, 0, 1), k = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1),
         v = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1);
    Pair qi = pair_rand(act, 3, (int64_t[]){N, Hkv, Di}, 0, 1), ki = pair_rand(act, 2, (int64_t[]){N, Di}, 0, 1);
    Sel sel;
    memset(&sel, 0, sizeof sel);
    if (!dense) sel = make_sel(&qi, &ki, &cs, &p, Hkv, N, c->plan_given);
    const Tensor *tkc = dense ? NULL : &sel.tc, *tkg = dense ? NULL : &sel.tg, *plg = c->plan_given ? &sel.pg : NULL;
    Pair lse = teacher_lse(&q, &k, &v, tkc, &cs, &p);
    set_window(c->window);

    /* forward */
    Pair kl = pair_out(DT_F32, 1, (int64_t[]){1}), il = pair_out(DT_F32, 2, (int64_t[]){Hkv, N});
    CB->msa_kl_forward(&kl.c, &il.c, &q.c, &k.c, &lse.c, &qi.c, &ki.c, tkc, NULL, &cs.c, &p);
    GB->msa_kl_forward(&kl.g, &il.g, &q.g, &k.g, &lse.g, &qi.g, &ki.g, tkg, plg, &cs.g, &p);
    float *got = download_f32(&kl.g);
    const double ref = ((const float *)kl.c.data)[0], e = fabs((double)got[0] - ref) / fmax(fabs(ref), 1e-30);
    snprintf(name, sizeof name, "msa_kl fwd kl %s", desc);
    record(isfinite(got[0]) && got[0] >= 0.0f && e <= tol, "%-58s rel err %.2e (tol %.0e) kl %.7g vs %.7g", name, e, tol,
           got[0], ref);
    free(got);
    snprintf(name, sizeof name, "msa_kl fwd idx_lse %s", desc);
    check(name, &il, tol);
    Tensor kl2 = mk(GB, DT_F32, 1, (int64_t[]){1}), il2 = mk(GB, DT_F32, 2, (int64_t[]){Hkv, N});
    GB->msa_kl_forward(&kl2, &il2, &q.g, &k.g, &lse.g, &qi.g, &ki.g, tkg, plg, &cs.g, &p);
    const bool rep = same_bits(&kl2, &kl.g) && same_bits(&il2, &il.g);
    snprintf(name, sizeof name, "msa_kl fwd repeat %s", desc);
    record(rep, "%-58s %s", name, rep ? "bit-identical" : "differs");
    free_t(&kl2);
    free_t(&il2);

    /* backward from the CPU's idx_lse on both sides */
    Pair ilr = pair_from(DT_F32, 2, (int64_t[]){Hkv, N}, (const float *)il.c.data);
    Grad dqi = grad_new(act, 3, (int64_t[]){N, Hkv, Di}), dki = grad_new(act, 2, (int64_t[]){N, Di});
    /* the upstream gradient read on the device (the op's way), the CPU's on the host */
    const float weight = 0.8f;
    Pair kl_grad = pair_from(DT_F32, 1, (int64_t[]){1}, (const float[]){1.25f});
    CB->msa_kl_backward(c->grads & 1 ? &dqi.p.c : NULL, c->grads & 2 ? &dki.p.c : NULL, &q.c, &k.c, &lse.c, &qi.c, &ki.c,
                        &ilr.c, tkc, NULL, &cs.c, &p, &kl_grad.c, weight);
    grad_arm(&dqi);
    grad_arm(&dki);
    GB->msa_kl_backward(c->grads & 1 ? &dqi.p.g : NULL, c->grads & 2 ? &dki.p.g : NULL, &q.g, &k.g, &lse.g, &qi.g, &ki.g,
                        &ilr.g, tkg, plg, &cs.g, &p, &kl_grad.g, weight);
    const char *others = c->grads == 3 ? "" : " (other NULL)";
    if (c->grads & 1) {
        snprintf(name, sizeof name, "msa_kl bwd dqi %s%s", desc, others);
        grad_check(name, &dqi, tol);
    }
    if (c->grads & 2) {
        snprintf(name, sizeof name, "msa_kl bwd dki %s%s", desc, others);
        grad_check(name, &dki, tol);
    }
    set_window(0);

    grad_free(&dqi);
    grad_free(&dki);
    pair_free(&kl_grad);
    pair_free(&ilr);
    pair_free(&kl);
    pair_free(&il);
    pair_free(&lse);
    free_sel(&sel);
    pair_free(&q);
    pair_free(&k);
    pair_free(&v);
    pair_free(&qi);
    pair_free(&ki);
    pair_free(&cs);
}

/* Student == teacher: G = 1 (Hq = Hkv = 2), D == Di, index_scale == scale, qi = q and every group's k
 * equal to the shared ki. The teacher's lse is the CPU's; the GPU's own idx_lse feeds its backward.
 * KL must vanish (to 1e-6) and so must the gradient (rms of the increments <= 1e-6). */
void msa_kl_zero_case(const void *args) {
    const DType act = ((const MsaKlZeroCase *)args)->act;
    const bool dense = ((const MsaKlZeroCase *)args)->dense;
    const int32_t lens[4] = {9, 40, 1, 77};
    int32_t cu[5] = {0};
    for (int i = 0; i < 4; i++) cu[i + 1] = cu[i] + lens[i];
    const int64_t N = cu[4], H = 2, D = 64;
    const MsaParams p = {.block_size = 8, .topk_blocks = 3, .init_blocks = 0, .local_blocks = 1, .scale = 0.125f,
                         .index_scale = 0.125f};
    float *kiv = randn(N * D, 0, 1), *qv = randn(N * H * D, 0, 1), *kv = xmalloc((size_t)(N * H * D) * sizeof(float));
    for (int64_t t = 0; t < N; t++)
        for (int64_t g = 0; g < H; g++) memcpy(kv + (t * H + g) * D, kiv + t * D, (size_t)D * sizeof(float));
    Pair cs = pair_i32(5, cu);
    Pair q = pair_from(act, 3, (int64_t[]){N, H, D}, qv), qi = pair_from(act, 3, (int64_t[]){N, H, D}, qv);
    Pair k = pair_from(act, 3, (int64_t[]){N, H, D}, kv), ki = pair_from(act, 2, (int64_t[]){N, D}, kiv);
    Pair v = pair_rand(act, 3, (int64_t[]){N, H, D}, 0, 1);
    Sel sel;
    memset(&sel, 0, sizeof sel);
    if (!dense) sel = make_sel(&qi, &ki, &cs, &p, H, N, false);
    const Tensor *tkg = dense ? NULL : &sel.tg;
    Pair lse = teacher_lse(&q, &k, &v, dense ? NULL : &sel.tc, &cs, &p);
    Tensor kl = mk(GB, DT_F32, 1, (int64_t[]){1}), il = mk(GB, DT_F32, 2, (int64_t[]){H, N});
    GB->msa_kl_forward(&kl, &il, &q.g, &k.g, &lse.g, &qi.g, &ki.g, tkg, NULL, &cs.g, &p);
    float *klv = download_f32(&kl);
    char name[160];
    snprintf(name, sizeof name, "msa_kl student == teacher: kl %s %s", dn(act), dense ? "dense" : "sparse");
    record(isfinite(klv[0]) && fabsf(klv[0]) <= 1e-6f, "%-58s kl %.3e (|kl| <= 1e-6)", name, klv[0]);
    free(klv);
    Tensor dqi = mk(GB, act, 3, (int64_t[]){N, H, D}), dki = mk(GB, act, 2, (int64_t[]){N, D});
    float *zeros = xcalloc((size_t)(N * H * D), sizeof(float));
    upload_f32(&dqi, zeros);
    upload_f32(&dki, zeros);
    free(zeros);
    GB->msa_kl_backward(&dqi, &dki, &q.g, &k.g, &lse.g, &qi.g, &ki.g, &il, tkg, NULL, &cs.g, &p, NULL, 1.0f * N * H);
    double rms[2];
    const Tensor *gs[2] = {&dqi, &dki};
    bool finite = true;
    for (int i = 0; i < 2; i++) {
        float *h = download_f32(gs[i]);
        double ss = 0;
        for (int64_t j = 0; j < gs[i]->numel; j++) {
            finite &= isfinite(h[j]);
            ss += (double)h[j] * h[j];
        }
        rms[i] = sqrt(ss / (double)gs[i]->numel);
        free(h);
    }
    snprintf(name, sizeof name, "msa_kl student == teacher: grads %s %s", dn(act), dense ? "dense" : "sparse");
    record(finite && rms[0] <= 1e-6 && rms[1] <= 1e-6, "%-58s rms dqi %.2e dki %.2e (<= 1e-6)", name, rms[0], rms[1]);
    free_t(&dqi);
    free_t(&dki);
    free_t(&kl);
    free_t(&il);
    pair_free(&lse);
    free_sel(&sel);
    pair_free(&q);
    pair_free(&qi);
    pair_free(&k);
    pair_free(&ki);
    pair_free(&v);
    pair_free(&cs);
    free(kiv);
    free(qv);
    free(kv);
}

/* ---------- the attention backward with the KL folded in (msa_attention_kl_backward) ---------- */

/* The sparse phase's one backward: random q/k/v/qi/ki, the CPU indexer's selection and idx_lse (forced
 * first block: block 0 hot), the CPU's forward out/lse, then the backward from those on both sides into
 * accumulating dq, dk, dv, dqi, dki (the subset of grads) and the KL value, with an upstream gradient of
 * the loss term on the device (or none: 1) and a KL weight. Also the GPU indexer's own idx_lse against
 * the CPU's on the rows where their selections agree (BF16 near-ties may pick other blocks). BF16 with a
 * power-of-two G of at most 8 queries per tensor-core tile is the fused kernel; the rest (F32, other G)
 * the separate kernels in sequence. */
void msa_attention_kl_case(const void *args) {
    const MsaAttentionKlCase *c = args;
    const DType act = c->act;
    int32_t cu[8];
    cu[0] = 0;
    for (int i = 0; i < c->ndocs; i++) cu[i + 1] = cu[i] + c->lens[i];
    const int64_t N = cu[c->ndocs], Hq = c->Hq, Hkv = c->Hkv, D = c->D, Di = c->Di, K = c->K;
    const MsaParams p = {.block_size = c->B, .topk_blocks = c->K, .init_blocks = c->init_blocks, .local_blocks = 1,
                         .scale = 1.0f / sqrtf((float)D), .index_scale = 1.0f / sqrtf((float)Di)};
    const double tol = tol_of(act);
    char desc[200], name[300];
    int o = snprintf(desc, sizeof desc, "%s G=%lld D=%lld Di=%lld B=%d k=%d%s%s%s docs=", dn(act), (long long)(Hq / Hkv),
                     (long long)D, (long long)Di, c->B, c->K, c->init_blocks ? " hot" : "", c->chunk ? " chunked" : "",
                     c->kl_grad ? " grad" : "");
    for (int i = 0; i < c->ndocs && o < (int)sizeof desc - 8; i++)
        o += snprintf(desc + o, sizeof desc - (size_t)o, i ? ",%d" : "%d", c->lens[i]);

    Pair cs = pair_i32(c->ndocs + 1, cu);
    AttnCase a = attn_inputs(act, N, Hq, Hkv, D);
    Pair qi = pair_rand(act, 3, (int64_t[]){N, Hkv, Di}, 0, 1), ki = pair_rand(act, 2, (int64_t[]){N, Di}, 0, 1);

    /* the selection and the student's normaliser: the CPU indexer's, on both sides */
    Tensor tkc = mk(CB, DT_I32, 3, (int64_t[]){Hkv, N, K});
    Pair il = pair_out(DT_F32, 2, (int64_t[]){Hkv, N});
    CB->msa_indexer(&tkc, &il.c, NULL, &qi.c, &ki.c, &cs.c, &p);
    Tensor tkg = mk(GB, DT_I32, 3, (int64_t[]){Hkv, N, K});
    GB->copy_from_host(tkg.data, tkc.data, tensor_bytes(&tkc));
    /* the GPU indexer's idx_lse where its selection is the CPU's */
    Tensor tkg2 = mk(GB, DT_I32, 3, (int64_t[]){Hkv, N, K});
    GB->msa_indexer(&tkg2, &il.g, NULL, &qi.g, &ki.g, &cs.g, &p);
    {
        int32_t *g2 = xmalloc(tensor_bytes(&tkg2) + 4);
        GB->copy_to_host(g2, tkg2.data, tensor_bytes(&tkg2));
        float *ilg = download_f32(&il.g), *a1 = xmalloc((size_t)(Hkv * N) * sizeof(float) + 4),
              *b1 = xmalloc((size_t)(Hkv * N) * sizeof(float) + 4);
        int64_t same = 0;
        for (int64_t r = 0; r < Hkv * N; r++)
            if (!memcmp(g2 + r * K, (const int32_t *)tkc.data + r * K, (size_t)K * sizeof(int32_t))) {
                a1[same] = ilg[r];
                b1[same++] = ((const float *)il.c.data)[r];
            }
        bool nan;
        const double e = rel_err_f32(a1, b1, same, &nan);
        snprintf(name, sizeof name, "msa_indexer idx_lse %s", desc);
        record(same > Hkv * N / 2 && !nan && e <= tol, "%-58s rel err %.2e (tol %.0e) on %lld/%lld rows of equal selection",
               name, e, tol, (long long)same, (long long)(Hkv * N));
        free(g2);
        free(ilg);
        free(a1);
        free(b1);
    }
    upload_f32(&il.g, (const float *)il.c.data);

    CB->msa_attention_forward(&a.out.c, &a.lse.c, &a.q.c, &a.k.c, &a.v.c, &tkc, NULL, &cs.c, &p);
    attn_backward_inputs(&a, act);
    Grad dqi = grad_new(act, 3, (int64_t[]){N, Hkv, Di}), dki = grad_new(act, 2, (int64_t[]){N, Di});
    Pair kl = pair_out(DT_F32, 1, (int64_t[]){1});
    const float grad_v = 0.6f, weight = 2.5f;
    Pair kg = pair_from(DT_F32, 1, (int64_t[]){1}, &grad_v);
    const int gm = c->grads;
    if (c->chunk > 0) {
        char b[32];
        snprintf(b, sizeof b, "%d", c->chunk);
        setenv("MSA_CUDA_MSA_CHUNK", b, 1);
    }
#define KL_BWD(S, be)                                                                                                   \
    be->msa_attention_kl_backward(gm & 1 ? &a.dq.p.S : NULL, gm & 2 ? &a.dk.p.S : NULL, gm & 4 ? &a.dv.p.S : NULL,      \
                                  gm & 8 ? &dqi.p.S : NULL, gm & 16 ? &dki.p.S : NULL, gm & 32 ? &kl.S : NULL,          \
                                  &a.dout.S, &a.q.S, &a.k.S, &a.v.S, &a.o2.S, &a.l2.S, &qi.S, &ki.S,                    \
                                  &il.S, &tk##S, NULL, &cs.S, &p, c->kl_grad ? &kg.S : NULL, weight)
    KL_BWD(c, CB);
    attn_arm_grads(&a);
    grad_arm(&dqi);
    grad_arm(&dki);
    KL_BWD(g, GB);
    attn_check_grads(&a, gm & 7, "msa_attention_kl", desc, tol);
    const char *others = (gm & 31) == 31 ? "" : " (others NULL)";
    if (gm & 8) {
        snprintf(name, sizeof name, "msa_attention_kl bwd dqi %s%s", desc, others);
        grad_check(name, &dqi, tol);
    }
    if (gm & 16) {
        snprintf(name, sizeof name, "msa_attention_kl bwd dki %s%s", desc, others);
        grad_check(name, &dki, tol);
    }
    if (gm & 32) {
        float *got = download_f32(&kl.g);
        const double ref = ((const float *)kl.c.data)[0], e = fabs((double)got[0] - ref) / fmax(fabs(ref), 1e-30);
        snprintf(name, sizeof name, "msa_attention_kl bwd kl %s", desc);
        record(isfinite(got[0]) && ref > 0 && e <= tol, "%-58s rel err %.2e (tol %.0e) kl %.7g vs %.7g", name, e, tol, got[0], ref);
        free(got);
    }
    if (c->repeat) { /* again from the same starting gradients: bit-identical (no atomics) */
        Grad *gs[5] = {&a.dq, &a.dk, &a.dv, &dqi, &dki};
        float *first[5] = {NULL}, *klf = download_f32(&kl.g);
        for (int i = 0; i < 5; i++)
            if (gm & (1 << i)) {
                first[i] = download_f32(&gs[i]->p.g);
                upload_f32(&gs[i]->p.g, gs[i]->g0);
            }
        KL_BWD(g, GB);
        bool same = true;
        for (int i = 0; i < 5; i++) {
            if (!first[i]) continue;
            float *again = download_f32(&gs[i]->p.g);
            same &= memcmp(first[i], again, (size_t)gs[i]->p.g.numel * sizeof(float)) == 0;
            free(again);
            free(first[i]);
        }
        float *kl2 = download_f32(&kl.g);
        same &= !(gm & 32) || kl2[0] == klf[0];
        free(kl2);
        free(klf);
        snprintf(name, sizeof name, "msa_attention_kl bwd deterministic %s", desc);
        record(same, "%-58s %s", name, same ? "bit-identical" : "differs between two runs");
    }
#undef KL_BWD
    if (c->chunk > 0) unsetenv("MSA_CUDA_MSA_CHUNK");
    grad_free(&dqi);
    grad_free(&dki);
    pair_free(&kl);
    pair_free(&kg);
    pair_free(&il);
    free_t(&tkc);
    free_t(&tkg);
    free_t(&tkg2);
    pair_free(&qi);
    pair_free(&ki);
    attn_free(&a);
    pair_free(&cs);
}

/* ---------- --bench ---------- */

/* One document of N tokens, MiniMax-M3 heads (Hq 64, Hkv 4, D = Di = 128), block 128, k = 16: each
 * query takes its own block and 15 distinct random earlier blocks (all when it sees at most 16). The
 * teacher's lse comes from the GPU's MSA attention when it exists (else a constant). FLOPs as the
 * release's benchmark: KL 2 (D Hq + 3 Di Hkv) * pairs (its backward-only kernel), pairs = attended
 * (query, key) pairs per group (mean over groups); the forward alone is counted 2 (D Hq + Di Hkv). */
static void kl_bench_one(int64_t N) {
    const int64_t Hq = 64, Hkv = 4, D = 128, Di = 128;
    const int B = 128, K = 16;
    Tensor topk, cu, plan;
    const double pairs = msa_bench_selection(&topk, &cu, &plan, Hkv, N, B, K);
    const MsaParams p = {.block_size = B, .topk_blocks = K, .init_blocks = 0, .local_blocks = 1,
                         .scale = 1.0f / sqrtf((float)D), .index_scale = 1.0f / sqrtf((float)Di)};
    GB->msa_plan(&plan, &topk, &cu, &p);
    Tensor q = dev_rand(DT_BF16, 3, (int64_t[]){N, Hq, D}, 1), k = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, D}, 1);
    Tensor qi = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, Di}, 1), ki = dev_rand(DT_BF16, 2, (int64_t[]){N, Di}, 1);
    Tensor lse = mk(GB, DT_F32, 2, (int64_t[]){Hq, N});
    const bool real_lse = GB->msa_attention_forward != NULL;
    if (real_lse) {
        Tensor v = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, D}, 1), out = mk(GB, DT_BF16, 3, (int64_t[]){N, Hq, D});
        GB->msa_attention_forward(&out, &lse, &q, &k, &v, &topk, &plan, &cu, &p);
        free_t(&v);
        free_t(&out);
    } else {
        float *l = xmalloc((size_t)(Hq * N) * sizeof(float));
        for (int64_t i = 0; i < Hq * N; i++) l[i] = 8.0f; /* ~ log(2048) + 0.5 */
        upload_f32(&lse, l);
        free(l);
    }
    Tensor kl = mk(GB, DT_F32, 1, (int64_t[]){1}), il = mk(GB, DT_F32, 2, (int64_t[]){Hkv, N});
    Tensor dqi = dev_rand(DT_BF16, 3, (int64_t[]){N, Hkv, Di}, 0), dki = dev_rand(DT_BF16, 2, (int64_t[]){N, Di}, 0);
    GB->msa_kl_forward(&kl, &il, &q, &k, &lse, &qi, &ki, &topk, &plan, &cu, &p); /* warm-up */
    GB->msa_kl_backward(&dqi, &dki, &q, &k, &lse, &qi, &ki, &il, &topk, &plan, &cu, &p, NULL, 1e-3f);
    const int reps = 3;
    gpu_sync();
    double t0 = wall_seconds();
    for (int i = 0; i < reps; i++) GB->msa_kl_forward(&kl, &il, &q, &k, &lse, &qi, &ki, &topk, &plan, &cu, &p);
    gpu_sync();
    const double tf = (wall_seconds() - t0) / reps;
    t0 = wall_seconds();
    for (int i = 0; i < reps; i++) GB->msa_kl_backward(&dqi, &dki, &q, &k, &lse, &qi, &ki, &il, &topk, &plan, &cu, &p, NULL, 1e-3f);
    gpu_sync();
    const double tb = (wall_seconds() - t0) / reps;
    float klv = 0;
    GB->copy_to_host(&klv, kl.data, 4);
    const double ff = 2.0 * (double)(D * Hq + Di * Hkv) * pairs, fb = 2.0 * (double)(D * Hq + 3 * Di * Hkv) * pairs;
    printf("  msa kl bf16 N=%lld Hq=%lld Hkv=%lld D=%lld Di=%lld B=%d k=%d (%.0f keys/query, %s lse, kl %.4g): fwd %.2f ms "
           "(%.1f TFLOP/s), bwd %.2f ms (%.1f TFLOP/s), fwd+bwd %.2f ms (%.1f TFLOP/s at the release's KL count)\n",
           (long long)N, (long long)Hq, (long long)Hkv, (long long)D, (long long)Di, B, K, pairs / (double)N,
           real_lse ? "attention" : "constant", klv, tf * 1e3, ff / tf * 1e-12, tb * 1e3, fb / tb * 1e-12, (tf + tb) * 1e3,
           fb / (tf + tb) * 1e-12);
    fflush(stdout);
    Tensor *all[] = {&topk, &cu, &plan, &q, &k, &qi, &ki, &lse, &kl, &il, &dqi, &dki};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free_t(all[i]);
}

void bench_msa_kl_gpu(void) {
    if (!GB->msa_kl_forward || !GB->msa_kl_backward || !GB->msa_plan) {
        printf("  msa kl: the CUDA backend lacks msa_kl or msa_plan\n");
        return;
    }
    kl_bench_one(8192);
    kl_bench_one(32768);
}
