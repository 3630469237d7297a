/* GPU case families of the MSA index side against the CPU reference (tests/gpu/gpu_check.h; the cases
 * are listed in tests/gpu/cases.c): the indexer, the plan (block -> queries map, bit for bit), the recall
 * metric, and build/opcheck msa on both devices.
 * Also the indexer timing of `test_gpu --bench` (bench_msa_indexer).
 *
 * Indexer ties: the CPU ranks block maxima computed in double, the GPU in fp32 (tensor cores for BF16)
 * in another order, so two blocks whose scores differ by a few ulps may be ranked either way. A GPU row
 * that differs from the CPU's is accepted only if it has the exact structure (forced init and local
 * blocks, ascending ids, padding, the dense fallback unchanged) and every block it selected scores at
 * least every candidate it left out, minus twice the worst-case fp32 rounding of a dot product
 * (recomputed in double on the host); inputs of small integers (exact scores, many exact ties) must
 * match the CPU exactly. */
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../gradcheck.h" /* test_h5_*: the opcheck files */
#include "gpu_cases.h"

/* ---------- helpers ---------- */

static int32_t *cu_of(int ndocs, const int32_t *lens) {
    int32_t *cu = xmalloc((size_t)(ndocs + 1) * sizeof(int32_t));
    cu[0] = 0;
    for (int i = 0; i < ndocs; i++) cu[i + 1] = cu[i] + lens[i];
    return cu;
}

static void docs_str(char *buf, size_t n, int ndocs, const int32_t *lens) {
    int o = snprintf(buf, n, "docs=");
    for (int i = 0; i < ndocs && o < (int)n - 12; i++) o += snprintf(buf + o, n - (size_t)o, i ? ",%d" : "%d", lens[i]);
}

/* i32 tensors go through memcpy-style copies (download_f32 passes through float: exact only < 2^24) */
static Tensor dev_i32(int ndim, const int64_t *shape, const int32_t *vals) {
    Tensor t = mk(GB, DT_I32, ndim, shape);
    if (vals) GB->copy_from_host(t.data, vals, tensor_bytes(&t));
    else { /* poison: a large positive id, neither a block nor the padding */
        int32_t *junk = xmalloc(tensor_bytes(&t) + 4);
        for (int64_t i = 0; i < t.numel; i++) junk[i] = 0x7b7b7b7b;
        GB->copy_from_host(t.data, junk, tensor_bytes(&t));
        free(junk);
    }
    return t;
}

static int32_t *host_i32(const Tensor *g) {
    int32_t *h = xmalloc(tensor_bytes(g) + 4);
    GB->copy_to_host(h, g->data, tensor_bytes(g));
    return h;
}

static int64_t doc_start(const int32_t *cu, int ndocs, int64_t t) {
    int d = 0;
    while (d + 1 < ndocs && cu[d + 1] <= t) d++;
    return cu[d];
}

/* A random valid selection: per (g, t) 1 .. min(K, visible) distinct visible blocks, ascending, -1 pad. */
static int32_t *random_topk(int64_t H, int64_t N, int64_t K, int64_t B, const int32_t *cu, int ndocs) {
    int32_t *tk = xmalloc((size_t)(H * N * K) * sizeof(int32_t) + 4);
    int64_t maxv = 1;
    for (int d = 0; d < ndocs; d++) maxv = (cu[d + 1] - cu[d]) / B + 1 > maxv ? (cu[d + 1] - cu[d]) / B + 1 : maxv;
    unsigned char *used = xcalloc((size_t)maxv, 1);
    for (int64_t g = 0; g < H; g++)
        for (int64_t t = 0; t < N; t++) {
            const int64_t nvis = (t - doc_start(cu, ndocs, t)) / B + 1;
            const int64_t lim = nvis < K ? nvis : K;
            const int64_t n = 1 + (int64_t)(rng_uniform(&gpu_check.rng) * (double)lim) % lim;
            memset(used, 0, (size_t)nvis);
            for (int64_t c = 0; c < n;) {
                const int64_t b = (int64_t)(rng_uniform(&gpu_check.rng) * (double)nvis) % nvis;
                if (!used[b]) {
                    used[b] = 1;
                    c++;
                }
            }
            int32_t *row = tk + (g * N + t) * K;
            int64_t c = 0;
            for (int64_t b = 0; b < nvis; b++)
                if (used[b]) row[c++] = (int32_t)b;
            for (; c < K; c++) row[c] = -1;
        }
    free(used);
    return tk;
}

/* ---------- indexer ---------- */

/* block maxima of (g, t) over its document's visible keys, the CPU's rule in double */
static void block_scores(double *S, const float *qi, const float *ki, int64_t H, int64_t Di, int64_t g, int64_t t, int64_t s,
                         int64_t B, double isc) {
    const int64_t lb = (t - s) / B;
    for (int64_t b = 0; b <= lb; b++) S[b] = -INFINITY;
    for (int64_t j = s; j <= t; j++) {
        double dot = 0;
        for (int64_t d = 0; d < Di; d++) dot += (double)qi[(t * H + g) * Di + d] * (double)ki[j * Di + d];
        const double sc = isc * dot;
        if (sc > S[(j - s) / B]) S[(j - s) / B] = sc;
    }
}

/* Is the GPU row gr an acceptable selection where it differs from the CPU row cr (file comment)? */
static bool row_acceptable(const int32_t *gr, const int32_t *cr, const double *S, double tol, int64_t K, int64_t init,
                           int64_t local, int64_t lb, char *why, size_t nwhy) {
    if (lb + 1 <= K) {
        snprintf(why, nwhy, "dense-fallback row differs");
        return memcmp(gr, cr, (size_t)K * sizeof(int32_t)) == 0;
    }
    const int64_t loc0 = lb - local + 1, R = K - init - local;
    for (int64_t i = 0; i < init; i++)
        if (gr[i] != i) {
            snprintf(why, nwhy, "init block %lld missing", (long long)i);
            return false;
        }
    for (int64_t i = 0; i < local; i++)
        if (gr[init + R + i] != loc0 + i) {
            snprintf(why, nwhy, "local block %lld missing", (long long)(loc0 + i));
            return false;
        }
    double min_sel = INFINITY;
    unsigned char *sel = xcalloc((size_t)(lb + 1), 1);
    for (int64_t i = 0; i < R; i++) {
        const int32_t b = gr[init + i];
        if (b < init || b >= loc0 || (i > 0 && b <= gr[init + i - 1])) {
            snprintf(why, nwhy, "slot %lld holds %d: not an ascending candidate", (long long)(init + i), b);
            free(sel);
            return false;
        }
        sel[b] = 1;
        if (S[b] < min_sel) min_sel = S[b];
    }
    double max_uns = -INFINITY;
    for (int64_t b = init; b < loc0; b++)
        if (!sel[b] && S[b] > max_uns) max_uns = S[b];
    free(sel);
    snprintf(why, nwhy, "weakest selected block scores %.9g, best left out %.9g (tolerance %.2g)", min_sel, max_uns, tol);
    return min_sel >= max_uns - tol;
}

/* CPU vs GPU indexer on one input; integer = qi, ki small integers (exact scores: equality required).
 * Returns the CPU's topk (host, caller frees) for the plan checks when keep is set. */
static int32_t *indexer_case(DType dt, const IdxSpec *sp, bool integer, bool keep) {
    int32_t *cu = cu_of(sp->ndocs, sp->lens);
    const int64_t N = cu[sp->ndocs], H = sp->H, Di = sp->Di, K = sp->p.topk_blocks, B = sp->p.block_size;
    Pair cs = pair_i32(sp->ndocs + 1, cu);
    Pair qi, ki;
    if (integer) {
        float *vq = xmalloc((size_t)(N * H * Di) * sizeof(float) + 4), *vk = xmalloc((size_t)(N * Di) * sizeof(float) + 4);
        for (int64_t i = 0; i < N * H * Di; i++) vq[i] = (float)((int)(rng_uniform(&gpu_check.rng) * 5) - 2);
        for (int64_t i = 0; i < N * Di; i++) vk[i] = (float)((int)(rng_uniform(&gpu_check.rng) * 5) - 2);
        qi = pair_from(dt, 3, (int64_t[]){N, H, Di}, vq);
        ki = pair_from(dt, 2, (int64_t[]){N, Di}, vk);
        free(vq);
        free(vk);
    } else {
        qi = pair_rand(dt, 3, (int64_t[]){N, H, Di}, 0, 1);
        ki = pair_rand(dt, 2, (int64_t[]){N, Di}, 0, 1);
    }
    Tensor tc = mk(CB, DT_I32, 3, (int64_t[]){H, N, K});
    Tensor tg = dev_i32(3, (int64_t[]){H, N, K}, NULL);
    Pair il = pair_out(DT_F32, 2, (int64_t[]){H, N});
    /* the GPU's idx_lse walks the plan its indexer writes (the layer's call), which must be msa_plan's */
    const int64_t P = msa_plan_width(N, K);
    Tensor pg = dev_i32(2, (int64_t[]){H, P}, NULL), pref = dev_i32(2, (int64_t[]){H, P}, NULL);
    CB->msa_indexer(&tc, &il.c, NULL, &qi.c, &ki.c, &cs.c, &sp->p);
    GB->msa_indexer(&tg, &il.g, &pg, &qi.g, &ki.g, &cs.g, &sp->p);
    GB->msa_plan(&pref, &tg, &cs.g, &sp->p);
    int32_t *hp = host_i32(&pg), *hr = host_i32(&pref);
    record(!memcmp(hp, hr, (size_t)(H * P) * sizeof(int32_t)), "msa_indexer %s plan H=%d B=%d k=%d: msa_plan's, bit for bit",
           dn(dt), sp->H, sp->p.block_size, sp->p.topk_blocks);
    free(hp);
    free(hr);
    free_t(&pg);
    free_t(&pref);
    int32_t *gt = host_i32(&tg);
    const int32_t *ct = tc.data;

    /* worst-case fp32 rounding of one dot product, per query head row: (Di+2) u sum_d |q_d| max_j |k_jd| */
    double *kmax = xcalloc((size_t)Di, sizeof(double));
    for (int64_t j = 0; j < N; j++)
        for (int64_t d = 0; d < Di; d++) kmax[d] = fabs(ki.h[j * Di + d]) > kmax[d] ? fabs(ki.h[j * Di + d]) : kmax[d];
    double *S = xmalloc((size_t)(N / B + 2) * sizeof(double));
    int64_t differ = 0, bad = 0;
    char why[320] = "";
    for (int64_t g = 0; g < H; g++)
        for (int64_t t = 0; t < N; t++) {
            const int32_t *gr = gt + (g * N + t) * K, *cr = ct + (g * N + t) * K;
            if (!memcmp(gr, cr, (size_t)K * sizeof(int32_t))) continue;
            differ++;
            if (integer) {
                if (!bad++) snprintf(why, sizeof why, "row (%lld, %lld): gpu {%d, %d, ...} cpu {%d, %d, ...}", (long long)g,
                                     (long long)t, gr[0], K > 1 ? gr[1] : 0, cr[0], K > 1 ? cr[1] : 0);
                continue;
            }
            const int64_t s = doc_start(cu, sp->ndocs, t), lb = (t - s) / B;
            double qabs = 0;
            for (int64_t d = 0; d < Di; d++) qabs += fabs(qi.h[(t * H + g) * Di + d]) * kmax[d];
            const double tol = 2.0 * (double)(Di + 2) * ldexp(1.0, -24) * fabs(sp->p.index_scale) * qabs;
            block_scores(S, qi.h, ki.h, H, Di, g, t, s, B, sp->p.index_scale);
            char w[200];
            if (!row_acceptable(gr, cr, S, tol, K, sp->p.init_blocks, sp->p.local_blocks, lb, w, sizeof w) && !bad++)
                snprintf(why, sizeof why, "row (%lld, %lld): %s", (long long)g, (long long)t, w);
        }
    char docs[64];
    docs_str(docs, sizeof docs, sp->ndocs, sp->lens);
    record(bad == 0, "msa_indexer %s %s H=%d Di=%d B=%d k=%d init=%d local=%d %s: %lld/%lld rows differ%s%s",
           dn(dt), integer ? "int" : "randn", sp->H, sp->Di, sp->p.block_size, sp->p.topk_blocks, sp->p.init_blocks,
           sp->p.local_blocks, docs, (long long)differ, (long long)(H * N),
           integer ? " (must be 0)" : " (near-ties allowed)", bad ? why : "");
    /* idx_lse, the student's normaliser over the selection, on the rows both selected alike */
    float *ilg = download_f32(&il.g), *ga = xmalloc((size_t)(H * N) * sizeof(float) + 4),
          *ca = xmalloc((size_t)(H * N) * sizeof(float) + 4);
    int64_t same = 0;
    for (int64_t r = 0; r < H * N; r++)
        if (!memcmp(gt + r * K, ct + r * K, (size_t)K * sizeof(int32_t))) {
            ga[same] = ilg[r];
            ca[same++] = ((const float *)il.c.data)[r];
        }
    bool nan;
    const double e = rel_err_f32(ga, ca, same, &nan), tol = tol_of(dt);
    record(same > 0 && !nan && e <= tol, "msa_indexer idx_lse %s %s H=%d Di=%d B=%d k=%d %s: rel err %.2e (tol %.0e) on %lld/%lld rows",
           dn(dt), integer ? "int" : "randn", sp->H, sp->Di, sp->p.block_size, sp->p.topk_blocks, docs, e, tol, (long long)same,
           (long long)(H * N));
    free(ilg);
    free(ga);
    free(ca);
    pair_free(&il);
    int32_t *ret = NULL;
    if (keep) {
        ret = xmalloc(tensor_bytes(&tc) + 4);
        memcpy(ret, ct, tensor_bytes(&tc));
    }
    free(S);
    free(kmax);
    free(gt);
    free_t(&tc);
    free_t(&tg);
    pair_free(&qi);
    pair_free(&ki);
    pair_free(&cs);
    free(cu);
    return ret;
}

/* ---------- plan ---------- */

static void plan_case(const char *what, const int32_t *topk, int64_t H, int ndocs, const int32_t *lens, const MsaParams *p) {
    int32_t *cu = cu_of(ndocs, lens);
    const int64_t N = cu[ndocs], K = p->topk_blocks, P = msa_plan_width(N, K);
    Tensor tkc = mk(CB, DT_I32, 3, (int64_t[]){H, N, K}), cuc = mk(CB, DT_I32, 1, (int64_t[]){ndocs + 1});
    memcpy(tkc.data, topk, tensor_bytes(&tkc));
    memcpy(cuc.data, cu, tensor_bytes(&cuc));
    Tensor tkg = dev_i32(3, (int64_t[]){H, N, K}, topk), cug = dev_i32(1, (int64_t[]){ndocs + 1}, cu);
    Tensor pc = mk(CB, DT_I32, 2, (int64_t[]){H, P}), pg = dev_i32(2, (int64_t[]){H, P}, NULL);
    CB->msa_plan(&pc, &tkc, &cuc, p);
    GB->msa_plan(&pg, &tkg, &cug, p);
    int32_t *hg = host_i32(&pg);
    const int32_t *hc = pc.data;
    int64_t first = -1;
    for (int64_t i = 0; i < H * P && first < 0; i++)
        if (hg[i] != hc[i]) first = i;
    char docs[64], where[160] = "";
    docs_str(docs, sizeof docs, ndocs, lens);
    if (first >= 0) {
        const int64_t g = first / P, o = first % P;
        const char *part = o <= N ? "row_ptr" : o < N + 1 + N * K ? "q_idx" : o < N + 1 + N * K + N ? "row_lo" : "row_hi";
        snprintf(where, sizeof where, ": first difference group %lld %s (element %lld): gpu %d cpu %d", (long long)g, part,
                 (long long)o, hg[first], hc[first]);
    }
    record(first < 0, "msa_plan %s H=%lld B=%d k=%d %s bit-exact%s", what, (long long)H, p->block_size, p->topk_blocks, docs,
           where);
    free(hg);
    free_t(&tkc);
    free_t(&cuc);
    free_t(&tkg);
    free_t(&cug);
    free_t(&pc);
    free_t(&pg);
    free(cu);
}

static void plan_random_case(int64_t H, int ndocs, const int32_t *lens, int B, int K) {
    int32_t *cu = cu_of(ndocs, lens);
    MsaParams p = {.block_size = B, .topk_blocks = K, .init_blocks = 0, .local_blocks = 1, .scale = 0.125f, .index_scale = 0.125f};
    int32_t *tk = random_topk(H, cu[ndocs], K, B, cu, ndocs);
    plan_case("random topk", tk, H, ndocs, lens, &p);
    free(tk);
    free(cu);
}

/* ---------- recall ---------- */

static void recall_case(DType dt, int ndocs, const int32_t *lens, int64_t Hq, int64_t Hkv, int64_t D, int B, int K, int stride,
                        bool null_topk) {
    int32_t *cu = cu_of(ndocs, lens);
    const int64_t N = cu[ndocs];
    MsaParams p = {.block_size = B, .topk_blocks = K, .init_blocks = 0, .local_blocks = 1,
                   .scale = 1.0f / sqrtf((float)D), .index_scale = 0.125f};
    Pair cs = pair_i32(ndocs + 1, cu);
    /* std 2: peaked enough that the selection matters */
    Pair q = pair_rand(dt, 3, (int64_t[]){N, Hq, D}, 0, 2), k = pair_rand(dt, 3, (int64_t[]){N, Hkv, D}, 0, 2);
    int32_t *tk = random_topk(Hkv, N, K, B, cu, ndocs);
    Tensor tkc = mk(CB, DT_I32, 3, (int64_t[]){Hkv, N, K});
    memcpy(tkc.data, tk, tensor_bytes(&tkc));
    Tensor tkg = dev_i32(3, (int64_t[]){Hkv, N, K}, tk);
    const double rc = CB->msa_recall(&q.c, &k.c, null_topk ? NULL : &tkc, &cs.c, &p, stride);
    const double rg = GB->msa_recall(&q.g, &k.g, null_topk ? NULL : &tkg, &cs.g, &p, stride);
    const double tol = dt == DT_BF16 ? 1e-3 : 1e-4, e = fabs(rg - rc) / fmax(fabs(rc), 1e-12);
    char docs[64];
    docs_str(docs, sizeof docs, ndocs, lens);
    record(e <= tol && isfinite(rg), "msa_recall %s Hq=%lld Hkv=%lld D=%lld B=%d k=%d stride=%d%s %s: gpu %.6f cpu %.6f rel %.1e",
           dn(dt), (long long)Hq, (long long)Hkv, (long long)D, B, K, stride, null_topk ? " topk=NULL" : "", docs, rg, rc, e);
    free(tk);
    free_t(&tkc);
    free_t(&tkg);
    pair_free(&q);
    pair_free(&k);
    pair_free(&cs);
    free(cu);
}

/* ---------- build/opcheck msa on both devices ---------- */

/* The whole MSA op chain (indexer, plan, attention, KL, backward) through build/opcheck on the CPU and
 * on CUDA, on inputs the BF16 activations hold exactly (so both devices see the same numbers) and with
 * small-integer qi, ki (so both select exactly the same blocks): topk must match exactly, every other
 * output to the BF16 tolerance. Needs the CUDA attention and KL kernels too. */
static void opcheck_case(void) {
    const char *opcheck = "build/opcheck";
    if (access(opcheck, X_OK) != 0) {
        record(false, "opcheck msa cpu vs cuda: %s not found (run from the repository root after make)", opcheck);
        return;
    }
    char dir[] = "/tmp/msa_gpu_opcheck_XXXXXX";
    if (!mkdtemp(dir)) {
        record(false, "opcheck msa cpu vs cuda: cannot create a scratch directory");
        return;
    }
    const int ndocs = 3, lens[3] = {150, 37, 300}, Hq = 8, Hkv = 2, d = 64, didx = 32;
    const MsaParams p = {.block_size = 16, .topk_blocks = 4, .init_blocks = 1, .local_blocks = 1, .scale = 0.125f,
                         .index_scale = 0.17677669f};
    const double kl_weight = 0.5;
    const int64_t T = lens[0] + lens[1] + lens[2];
    float *q = randn(T * Hq * d, 0, 1), *k = randn(T * Hkv * d, 0, 1), *v = randn(T * Hkv * d, 0, 1),
          *dout = randn(T * Hq * d, 0, 1);
    float *all[] = {q, k, v, dout};
    const int64_t sizes[] = {T * Hq * d, T * Hkv * d, T * Hkv * d, T * Hq * d};
    for (int i = 0; i < 4; i++)
        for (int64_t j = 0; j < sizes[i]; j++) all[i][j] = round_to(DT_BF16, all[i][j]);
    float *qi = xmalloc((size_t)(T * Hkv * didx) * sizeof(float)), *ki = xmalloc((size_t)(T * didx) * sizeof(float));
    for (int64_t j = 0; j < T * Hkv * didx; j++) qi[j] = (float)((int)(rng_uniform(&gpu_check.rng) * 5) - 2);
    for (int64_t j = 0; j < T * didx; j++) ki[j] = (float)((int)(rng_uniform(&gpu_check.rng) * 5) - 2);
    int32_t cu[4] = {0, lens[0], lens[0] + lens[1], (int32_t)T};

    char in[128], outc[128], outg[128], errp[128], cmd[1024], err[1024];
    snprintf(in, sizeof in, "%s/in.h5", dir);
    snprintf(outc, sizeof outc, "%s/out_cpu.h5", dir);
    snprintf(outg, sizeof outg, "%s/out_cuda.h5", dir);
    snprintf(errp, sizeof errp, "%s/stderr.txt", dir);
    hid_t f = H5Fcreate(in, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    test_h5_write(f, "q", 3, (hsize_t[]){T, Hq, d}, q, false);
    test_h5_write(f, "k", 3, (hsize_t[]){T, Hkv, d}, k, false);
    test_h5_write(f, "v", 3, (hsize_t[]){T, Hkv, d}, v, false);
    test_h5_write(f, "qi", 3, (hsize_t[]){T, Hkv, didx}, qi, false);
    test_h5_write(f, "ki", 2, (hsize_t[]){T, didx}, ki, false);
    test_h5_write(f, "cu_seqlens", 1, (hsize_t[]){ndocs + 1}, cu, true);
    test_h5_write(f, "dout", 3, (hsize_t[]){T, Hq, d}, dout, false);
    test_h5_attr(f, "block_size", p.block_size, true);
    test_h5_attr(f, "topk_blocks", p.topk_blocks, true);
    test_h5_attr(f, "init_blocks", p.init_blocks, true);
    test_h5_attr(f, "local_blocks", p.local_blocks, true);
    test_h5_attr(f, "scale", p.scale, false);
    test_h5_attr(f, "index_scale", p.index_scale, false);
    test_h5_attr(f, "kl_weight", kl_weight, false);
    H5Fclose(f);

    bool ok = true;
    const char *devs[2] = {"cpu", "cuda"}, *outs[2] = {outc, outg};
    for (int i = 0; i < 2 && ok; i++) {
        snprintf(cmd, sizeof cmd, "%s msa %s %s --device %s >/dev/null 2>%s", opcheck, in, outs[i], devs[i], errp);
        int rc = test_system(cmd, errp, err, sizeof err, true);
        if (rc != 0) {
            record(false, "opcheck msa --device %s exited with %d: %s", devs[i], rc, err);
            ok = false;
        }
    }
    if (ok) {
        const int64_t ntk = (int64_t)Hkv * T * p.topk_blocks;
        int32_t *tc = test_h5_read(outc, "topk", ntk, true), *tg = test_h5_read(outg, "topk", ntk, true);
        record(tc && tg && !memcmp(tc, tg, (size_t)ntk * 4), "opcheck msa cpu vs cuda: topk identical (integer index inputs)");
        free(tc);
        free(tg);
        const struct {
            const char *name;
            int64_t n;
        } ds[] = {{"out", T * Hq * d}, {"lse", Hq * T},         {"dq", T * Hq * d},       {"dk", T * Hkv * d},
                  {"dv", T * Hkv * d}, {"dqi", T * Hkv * didx}, {"dki", T * didx},        {"kl", 1},
                  {"kl_unweighted", 1}};
        for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++) {
            float *a = test_h5_read(outg, ds[i].name, ds[i].n, false), *b = test_h5_read(outc, ds[i].name, ds[i].n, false);
            bool nan = false;
            double e = a && b ? rel_err_f32(a, b, ds[i].n, &nan) : INFINITY;
            record(a && b && !nan && e <= TOL_BF16, "opcheck msa cpu vs cuda: %-14s rel err %.2e (tol %.0e)%s", ds[i].name, e,
                   TOL_BF16, a && b ? "" : " (missing)");
            free(a);
            free(b);
        }
    }
    const char *files[] = {in, outc, outg, errp};
    for (size_t i = 0; i < 4; i++) unlink(files[i]);
    rmdir(dir);
    free(q);
    free(k);
    free(v);
    free(dout);
    free(qi);
    free(ki);
}

/* ---------- the families ---------- */

void msa_indexer_plan_case(const void *args) {
    const MsaIndexerPlanCase *c = args;
    const IdxSpec *sp = &c->spec;
    int32_t *tk = indexer_case(DT_BF16, sp, false, true);
    indexer_case(DT_BF16, sp, true, false);
    indexer_case(DT_F32, sp, false, false);
    if (c->f32_integer) indexer_case(DT_F32, sp, true, false);
    plan_case("cpu-indexer topk", tk, sp->H, sp->ndocs, sp->lens, &sp->p);
    free(tk);
}

void msa_indexer_case(const void *args) {
    const MsaIndexerCase *c = args;
    indexer_case(c->dt, &c->spec, c->integer, false);
}

void msa_plan_random_case(const void *args) {
    const MsaPlanRandomCase *c = args;
    plan_random_case(c->H, c->ndocs, c->lens, c->B, c->K);
}

void msa_recall_case(const void *args) {
    const MsaRecallCase *c = args;
    recall_case(c->dt, c->ndocs, c->lens, c->Hq, c->Hkv, c->D, c->B, c->K, c->stride, c->null_topk);
}

void msa_opcheck_case(const void *args) {
    (void)args;
    opcheck_case();
}

/* ---------- --bench ---------- */

/* Indexer at the production shape: one document of N tokens, Hidx 4, Di 128, B 128, k 16. TFLOP/s by
 * the spec's convention (msa_spec.md e.1): 2 * Di * Hidx * causal pairs. The plan of the same topk is
 * timed too. */
void bench_msa_indexer(void) {
    const int64_t Ns[3] = {8192, 32768, 131072}, H = 4, Di = 128;
    const MsaParams p = {.block_size = 128, .topk_blocks = 16, .init_blocks = 0, .local_blocks = 1, .scale = 0.08838835f,
                         .index_scale = 0.08838835f};
    for (int ni = 0; ni < 3; ni++) {
        const int64_t N = Ns[ni];
        Tensor qi = mk(GB, DT_BF16, 3, (int64_t[]){N, H, Di}), ki = mk(GB, DT_BF16, 2, (int64_t[]){N, Di});
        Tensor *ts[2] = {&qi, &ki};
        for (int i = 0; i < 2; i++) {
            float *v = xmalloc((size_t)ts[i]->numel * sizeof(float));
            for (int64_t j = 0; j < ts[i]->numel; j++) v[j] = (float)(2.0 * rng_uniform(&gpu_check.rng) - 1.0);
            upload_f32(ts[i], v);
            free(v);
        }
        Tensor cu = dev_i32(1, (int64_t[]){2}, (int32_t[]){0, (int32_t)N});
        Tensor tk = mk(GB, DT_I32, 3, (int64_t[]){H, N, p.topk_blocks});
        Tensor plan = mk(GB, DT_I32, 2, (int64_t[]){H, msa_plan_width(N, p.topk_blocks)});
        int32_t x;
        GB->msa_indexer(&tk, NULL, NULL, &qi, &ki, &cu, &p); /* warm-up */
        GB->copy_to_host(&x, tk.data, 4);
        const int reps = N >= 131072 ? 3 : 10;
        double t0 = wall_seconds();
        for (int i = 0; i < reps; i++) GB->msa_indexer(&tk, NULL, NULL, &qi, &ki, &cu, &p);
        GB->copy_to_host(&x, tk.data, 4);
        const double ti = (wall_seconds() - t0) / reps;
        GB->msa_plan(&plan, &tk, &cu, &p); /* warm-up (synchronises) */
        t0 = wall_seconds();
        for (int i = 0; i < reps; i++) GB->msa_plan(&plan, &tk, &cu, &p);
        const double tp = (wall_seconds() - t0) / reps;
        const double flops = 2.0 * (double)Di * (double)H * (double)N * (double)(N + 1) / 2;
        printf("  msa indexer bf16 N=%lld Hidx=%lld Di=%lld B=%d k=%d: %.3f ms (%.1f TFLOP/s); plan %.3f ms\n", (long long)N,
               (long long)H, (long long)Di, p.block_size, p.topk_blocks, ti * 1e3, flops / ti * 1e-12, tp * 1e3);
        Tensor *fr[] = {&qi, &ki, &cu, &tk, &plan};
        for (size_t i = 0; i < sizeof fr / sizeof fr[0]; i++) free_t(fr[i]);
    }
}
