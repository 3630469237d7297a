/* build/opcheck, the MSA op harness: writes a random input file with the HDF5 C API, runs the program
 * through system(), and compares its output file with direct calls of the CPU kernels on the same
 * data (indexer -> attention forward/backward -> KL forward/backward). Also checks that bad input
 * (a missing dataset or attribute, a shape mismatch, an unavailable device) exits with status 1 and
 * a message naming the item. */
#include <hdf5.h>
#include <libgen.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../kernels/cpu/cpu.h"
#include "gradcheck.h"
#include "test.h"

typedef struct {
    char opcheck[4096]; /* path of the program under test */
    char dir[64];       /* scratch directory */
} Fixture;

/* ---- input ---- */

typedef struct {
    int ndocs, lens[4];
    int Hq, Hkv, d, didx;
    MsaParams p;
    float kl_weight;
    const char *skip;    /* dataset or attribute left out */
    const char *bad_k;   /* non-NULL: k written with head dim d + 1 */
} InputSpec;

static int spec_tokens(const InputSpec *s) {
    int n = 0;
    for (int i = 0; i < s->ndocs; i++) n += s->lens[i];
    return n;
}

/* The inputs as f32 test tensors (also what the direct kernel calls use). */
typedef struct {
    Tensor *q, *k, *v, *qi, *ki, *cu, *dout;
} Inputs;

static Inputs make_inputs(const InputSpec *s, uint64_t seed) {
    const int T = spec_tokens(s);
    Inputs in;
    in.q = test_randn(DT_F32, SHAPE(T, s->Hq, s->d), 1.5, seed);
    in.k = test_randn(DT_F32, SHAPE(T, s->Hkv, s->d), 1.0, seed + 1);
    in.v = test_randn(DT_F32, SHAPE(T, s->Hkv, s->d), 1.0, seed + 2);
    in.qi = test_randn(DT_F32, SHAPE(T, s->Hkv, s->didx), 1.0, seed + 3);
    in.ki = test_randn(DT_F32, SHAPE(T, s->didx), 1.0, seed + 4);
    in.dout = test_randn(DT_F32, SHAPE(T, s->Hq, s->d), 1.0, seed + 5);
    in.cu = test_tensor(DT_I32, SHAPE(s->ndocs + 1));
    int32_t *c = in.cu->data;
    c[0] = 0;
    for (int i = 0; i < s->ndocs; i++) c[i + 1] = c[i] + s->lens[i];
    return in;
}

static void free_inputs(Inputs *in) {
    Tensor *all[] = {in->q, in->k, in->v, in->qi, in->ki, in->cu, in->dout};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) test_tensor_free(all[i]);
}

static void write_input(const char *path, const InputSpec *s, const Inputs *in) {
    const hsize_t T = (hsize_t)spec_tokens(s);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    struct {
        const char *name;
        const Tensor *t;
    } ds[] = {{"q", in->q}, {"k", in->k}, {"v", in->v}, {"qi", in->qi}, {"ki", in->ki}, {"cu_seqlens", in->cu}, {"dout", in->dout}};
    for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++) {
        if (s->skip && strcmp(s->skip, ds[i].name) == 0) continue;
        hsize_t dims[4];
        for (int j = 0; j < ds[i].t->ndim; j++) dims[j] = (hsize_t)ds[i].t->shape[j];
        if (s->bad_k && strcmp(ds[i].name, "k") == 0) {
            dims[2] += 1;
            float *junk = calloc(T * (hsize_t)s->Hkv * dims[2], sizeof(float));
            test_h5_write(f, "k", 3, dims, junk, false);
            free(junk);
            continue;
        }
        test_h5_write(f, ds[i].name, ds[i].t->ndim, dims, ds[i].t->data, ds[i].t->dtype == DT_I32);
    }
    struct {
        const char *name;
        double v;
        bool is_int;
    } at[] = {{"block_size", s->p.block_size, true},   {"topk_blocks", s->p.topk_blocks, true},
              {"init_blocks", s->p.init_blocks, true}, {"local_blocks", s->p.local_blocks, true},
              {"scale", s->p.scale, false},            {"index_scale", s->p.index_scale, false},
              {"kl_weight", s->kl_weight, false}};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++)
        if (!(s->skip && strcmp(s->skip, at[i].name) == 0)) test_h5_attr(f, at[i].name, at[i].v, at[i].is_int);
    H5Fclose(f);
}

/* ---- running the program ---- */

/* Run opcheck; returns its exit status, stderr in err. */
static int run_opcheck(const Fixture *fx, const char *in, const char *out, const char *extra, char *err, size_t nerr) {
    char cmd[8192], errpath[128];
    snprintf(errpath, sizeof errpath, "%s/stderr.txt", fx->dir);
    snprintf(cmd, sizeof cmd, "'%s' msa '%s' '%s' %s >/dev/null 2>'%s'", fx->opcheck, in, out, extra ? extra : "", errpath);
    return test_system(cmd, errpath, err, nerr, false);
}

static const InputSpec base_spec = {
    .ndocs = 3, .lens = {37, 5, 22}, .Hq = 4, .Hkv = 2, .d = 8, .didx = 6,
    .p = {.block_size = 4, .topk_blocks = 3, .init_blocks = 1, .local_blocks = 1, .scale = 0.35355339f, .index_scale = 0.40824829f},
    .kl_weight = 0.3f,
};

/* ---- tests ---- */

static bool compare_with_kernels(const char *out_path, const InputSpec *s, const Inputs *in, char *why, size_t nwhy) {
    const int64_t T = spec_tokens(s), K = s->p.topk_blocks;
    const MsaParams *p = &s->p;
    Tensor *topk = test_tensor(DT_I32, SHAPE(s->Hkv, T, K));
    Tensor *out = test_tensor(DT_F32, SHAPE(T, s->Hq, s->d)), *lse = test_tensor(DT_F32, SHAPE(s->Hq, T));
    Tensor *dq = test_tensor(DT_F32, SHAPE(T, s->Hq, s->d)), *dk = test_tensor(DT_F32, SHAPE(T, s->Hkv, s->d));
    Tensor *dv = test_tensor(DT_F32, SHAPE(T, s->Hkv, s->d));
    Tensor *dqi = test_tensor(DT_F32, SHAPE(T, s->Hkv, s->didx)), *dki = test_tensor(DT_F32, SHAPE(T, s->didx));
    Tensor *kl = test_tensor(DT_F32, SHAPE(1)), *il = test_tensor(DT_F32, SHAPE(s->Hkv, T));
    cpu_msa_indexer(topk, NULL, NULL, in->qi, in->ki, in->cu, p);
    cpu_msa_attention_forward(out, lse, in->q, in->k, in->v, topk, NULL, in->cu, p);
    cpu_msa_attention_backward(dq, dk, dv, in->dout, in->q, in->k, in->v, out, lse, topk, NULL, in->cu, p);
    cpu_msa_kl_forward(kl, il, in->q, in->k, lse, in->qi, in->ki, topk, NULL, in->cu, p);
    cpu_msa_kl_backward(dqi, dki, in->q, in->k, lse, in->qi, in->ki, il, topk, NULL, in->cu, p, NULL, s->kl_weight);
    const double klv = tensor_get(kl, 0);
    bool ok = true;
    int32_t *gtk = test_h5_read(out_path, "topk", topk->numel, true);
    if (!gtk || memcmp(gtk, topk->data, tensor_bytes(topk)) != 0) {
        snprintf(why, nwhy, "topk missing or different");
        ok = false;
    }
    free(gtk);
    struct {
        const char *name;
        Tensor *t;
    } cmp[] = {{"out", out}, {"lse", lse}, {"dq", dq}, {"dk", dk}, {"dv", dv}, {"dqi", dqi}, {"dki", dki}};
    for (size_t i = 0; ok && i < sizeof cmp / sizeof cmp[0]; i++) {
        float *g = test_h5_read(out_path, cmp[i].name, cmp[i].t->numel, false);
        double e = g ? test_rel_err_f32(g, cmp[i].t->data, cmp[i].t->numel) : INFINITY;
        double nrm = 0;
        for (int64_t j = 0; j < cmp[i].t->numel; j++) nrm += fabs(tensor_get(cmp[i].t, j));
        if (!(e < 1e-6) || (nrm == 0 && strcmp(cmp[i].name, "dqi") && strcmp(cmp[i].name, "dki")) ||
            (s->kl_weight != 0 && nrm == 0)) {
            snprintf(why, nwhy, "%s: rel err %.3e (reference norm %.3e)%s", cmp[i].name, e, nrm, g ? "" : ", missing");
            ok = false;
        }
        free(g);
    }
    float *gkl = test_h5_read(out_path, "kl", 1, false), *gku = test_h5_read(out_path, "kl_unweighted", 1, false);
    if (ok && (!gkl || !gku || fabs(*gkl - s->kl_weight * klv) > 1e-6 * fmax(1, klv) || fabs(*gku - klv) > 1e-6 * fmax(1, klv) || !(klv > 0))) {
        snprintf(why, nwhy, "kl %g / unweighted %g, expected %g / %g", gkl ? *gkl : NAN, gku ? *gku : NAN,
                 s->kl_weight * klv, klv);
        ok = false;
    }
    free(gkl);
    free(gku);
    Tensor *all[] = {topk, out, lse, dq, dk, dv, dqi, dki, kl, il};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) test_tensor_free(all[i]);
    return ok;
}

TEST(opcheck_matches_cpu_kernels) {
    Fixture *fx = tc->fixture;
    InputSpec specs[3] = {base_spec, base_spec, base_spec};
    specs[1].Hq = 8; /* G = 4, one document, weight 1, two local blocks */
    specs[1].Hkv = 2;
    specs[1].ndocs = 1;
    specs[1].lens[0] = 45;
    specs[1].p.local_blocks = 2;
    specs[1].kl_weight = 1.0f;
    specs[2].kl_weight = 0.0f; /* the KL still reported, its gradients zero */
    for (int si = 0; si < 3; si++) {
        char in_path[128], out_path[128], err[4096], why[256] = "";
        snprintf(in_path, sizeof in_path, "%s/in%d.h5", fx->dir, si);
        snprintf(out_path, sizeof out_path, "%s/out%d.h5", fx->dir, si);
        Inputs in = make_inputs(&specs[si], 100 + 10 * (uint64_t)si);
        write_input(in_path, &specs[si], &in);
        int rc = run_opcheck(fx, in_path, out_path, si == 1 ? "--device cpu" : NULL, err, sizeof err);
        bool ok = rc == 0 && compare_with_kernels(out_path, &specs[si], &in, why, sizeof why);
        free_inputs(&in);
        EXPECT(rc == 0, "spec %d: opcheck exited with %d: %s", si, rc, err);
        EXPECT(ok, "spec %d: %s", si, why);
    }
}

/* Each required item left out in turn: exit status 1, a message naming the item and the file. */
TEST(opcheck_reports_missing_items) {
    Fixture *fx = tc->fixture;
    const char *items[] = {"ki", "q", "cu_seqlens", "dout", "topk_blocks", "kl_weight", "scale"};
    for (size_t i = 0; i < sizeof items / sizeof items[0]; i++) {
        InputSpec s = base_spec;
        s.skip = items[i];
        char in_path[128], out_path[128], err[4096];
        snprintf(in_path, sizeof in_path, "%s/missing.h5", fx->dir);
        snprintf(out_path, sizeof out_path, "%s/missing_out.h5", fx->dir);
        Inputs in = make_inputs(&s, 7);
        write_input(in_path, &s, &in);
        free_inputs(&in);
        int rc = run_opcheck(fx, in_path, out_path, NULL, err, sizeof err);
        char quoted[64];
        snprintf(quoted, sizeof quoted, "\"%s\"", items[i]);
        EXPECT(rc == 1, "without %s: exit status %d, expected 1", items[i], rc);
        EXPECT(strstr(err, quoted) && strstr(err, in_path), "without %s: message does not name it and the file: %s", items[i], err);
    }
}

TEST(opcheck_reports_bad_shapes_and_devices) {
    Fixture *fx = tc->fixture;
    char in_path[128], out_path[128], err[4096];
    snprintf(in_path, sizeof in_path, "%s/bad.h5", fx->dir);
    snprintf(out_path, sizeof out_path, "%s/bad_out.h5", fx->dir);
    InputSpec s = base_spec;
    s.bad_k = "k";
    Inputs in = make_inputs(&s, 9);
    write_input(in_path, &s, &in);
    int rc = run_opcheck(fx, in_path, out_path, NULL, err, sizeof err);
    EXPECT(rc == 1 && strstr(err, "\"k\"") && strstr(err, "shape"), "k of the wrong head dim: status %d, %s", rc, err);
    s.bad_k = NULL;
    /* the forced blocks beyond the budget: the rule the config's keys obey (layers/msa.h msa_check) */
    s.p.local_blocks = s.p.topk_blocks;
    write_input(in_path, &s, &in);
    rc = run_opcheck(fx, in_path, out_path, NULL, err, sizeof err);
    EXPECT(rc == 1 && strstr(err, in_path) && strstr(err, "topk_blocks = 3") && strstr(err, "init_blocks + "),
           "init 1 + local 3 > top-k 3: status %d, %s", rc, err);
    s.p = base_spec.p;
    write_input(in_path, &s, &in);
    free_inputs(&in);
#ifndef MSA_CUDA
    rc = run_opcheck(fx, in_path, out_path, "--device cuda", err, sizeof err);
    EXPECT(rc == 1 && strstr(err, "CUDA backend not built"), "--device cuda without CUDA: status %d, %s", rc, err);
#endif
    rc = run_opcheck(fx, in_path, out_path, "--device tpu", err, sizeof err);
    EXPECT(rc == 1 && strstr(err, "tpu"), "unknown device: status %d, %s", rc, err);
    rc = run_opcheck(fx, "/nonexistent/in.h5", out_path, NULL, err, sizeof err);
    EXPECT(rc == 1 && strstr(err, "/nonexistent/in.h5"), "missing input file: status %d, %s", rc, err);
}

int main(int argc, char **argv) {
    (void)argc;
    TEST_BEGIN();
    Fixture fx;
    /* the program sits beside the tests directory: build/tests/test_opcheck -> build/opcheck */
    char self[4096];
    snprintf(self, sizeof self, "%s", argv[0]);
    snprintf(fx.opcheck, sizeof fx.opcheck, "%s/../opcheck", dirname(self));
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_opcheck_XXXXXX");
    if (!mkdtemp(fx.dir)) {
        printf("cannot create a scratch directory\n");
        return 1;
    }
    if (access(fx.opcheck, X_OK) != 0) {
        printf("  FAIL %s not found (build it: make build/opcheck)\n", fx.opcheck);
        tc->failed++;
        TEST_END();
    }
    tc->fixture = &fx;
    RUN(opcheck_matches_cpu_kernels);
    RUN(opcheck_reports_missing_items);
    RUN(opcheck_reports_bad_shapes_and_devices);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx.dir);
    /* MSA_KEEP_SCRATCH=1 keeps the input and output files for inspection */
    if (getenv("MSA_KEEP_SCRATCH")) printf("  scratch kept in %s\n", fx.dir);
    else if (system(cmd) != 0) printf("  (could not remove %s)\n", fx.dir);
    TEST_END();
}
