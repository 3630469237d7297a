/* Context parallelism on the CPU (issue 7; head-parallel, autograd/op_cp.c and train/model.c).
 *   - the block transpose (backend transpose01) against an index-by-index reference and its round trip,
 *     and the seq <-> heads exchange built from it, simulated for P ranks in one process;
 *   - the exchange ops themselves under mpirun (this program in its `--exchange` mode, 2 and 4 ranks):
 *     forward against the index-by-index layout, the round trip, and each backward against its adjoint;
 *   - build/train with dist.cp = 2 equals the single process on the same batch over 10 steps (losses, KL,
 *     gradient norms, eval loss / KL / recall, final parameters and AdamW moments): a dense model (also
 *     with dropout, gradient accumulation and activation recomputation), an MSA model whose selection is
 *     sparse (block 8, top-3 of up to 8 blocks) with and without dense warm-up, and CP-2 x DP-2 on 4 ranks;
 *   - a checkpoint of a CP-2 run resumes on 1 rank and on CP-2 x DP-2;
 *   - a cp that does not divide the KV heads or the tokens of a micro-batch is refused with a message.
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hdf5.h>

#include "../autograd/ops.h"
#include "../dist/dist.h"
#include "../kernels/util.h"
#include "gradcheck.h"
#include "test.h"

#define TINY "configs/tiny.json"
/* 10 logged steps, a 2-batch eval at the end, no sample text */
#define COMMON "--set train.steps=10 --set train.log_every=1 --set train.eval_batches=2 --set train.sample_tokens=0"
/* MSA in layer 1 (layer 0 stays dense): block 8 of a 64-token sequence, 3 of up to 8 blocks selected */
#define MSA "--set model.attention=msa --set model.msa_layers=1- --set msa.block_size=8 --set msa.topk_blocks=3 " \
            "--set msa.index_dim=16 --set train.eval_every=5"
#define MAX_STEPS 16

/* fp32 tolerances (those of tests/test_dist.c): metrics.jsonl prints 6 decimals; parameters after 10
 * AdamW steps differ by the rounding of sums taken in another order */
#define LOSS_TOL 2e-5
#define PARAM_ABS_TOL 1e-5
#define PARAM_REL_TOL 1e-5
#define MOMENT_REL_TOL 1e-4

typedef struct Fixture {
    char dir[256];
    bool have_mpirun;
} Fixture;
#define FX ((Fixture *)tc->fixture)

/* ---- the block transpose and the exchange layout, in one process --------------------------------- */

static double pattern(int64_t t, int64_t h, int64_t d) { return (double)t * 10000.0 + (double)h * 100.0 + (double)d; }

TEST(transpose01_matches_the_index_reference_and_round_trips) {
    static const int64_t shapes[][3] = {{1, 1, 1}, {3, 2, 5}, {2, 4, 1}, {7, 3, 12}, {4, 4, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int64_t a = shapes[s][0], b = shapes[s][1], c = shapes[s][2];
        for (int dt = 0; dt < 2; dt++) {
            DType type = dt ? DT_F64 : DT_F32;
            Tensor *x = test_randn(type, SHAPE(a, b, c), 1.0, 11 + s), *y = test_tensor(type, SHAPE(b, a, c)),
                   *z = test_tensor(type, SHAPE(a, b, c));
            cpu_backend.transpose01(y, x, a, b);
            for (int64_t i = 0; i < a; i++)
                for (int64_t j = 0; j < b; j++)
                    for (int64_t k = 0; k < c; k++)
                        EXPECT(tensor_get(y, (j * a + i) * c + k) == tensor_get(x, (i * b + j) * c + k),
                               "[%lld, %lld, %lld] %s: dst[%lld, %lld, %lld] is not src[%lld, %lld, %lld]", (long long)a,
                               (long long)b, (long long)c, dtype_name(type), (long long)j, (long long)i, (long long)k,
                               (long long)i, (long long)j, (long long)k);
            cpu_backend.transpose01(z, y, b, a);
            EXPECT(!memcmp(z->data, x->data, tensor_bytes(x)), "[%lld, %lld, %lld]: the round trip differs",
                   (long long)a, (long long)b, (long long)c);
            test_tensor_free(x), test_tensor_free(y), test_tensor_free(z);
        }
    }
}

/* The layout of autograd/op_cp.c for P ranks at once: pack with transpose01, move the blocks as an
 * all-to-all would (block j of rank r's send buffer to block r of rank j's receive buffer), and the
 * inverse; every element lands where the index reference puts it, and the round trip is the identity. */
TEST(seq_heads_exchange_layout_for_P_ranks) {
    for (int P = 1; P <= 4; P++) {
        const int64_t n = 3, N = n * P, Hc = 2, H = Hc * P, D = 5, blk = n * Hc * D;
        Tensor **x = xcalloc((size_t)P, sizeof(Tensor *)), **send = xcalloc((size_t)P, sizeof(Tensor *)),
               **heads = xcalloc((size_t)P, sizeof(Tensor *));
        for (int r = 0; r < P; r++) {
            x[r] = test_tensor(DT_F64, SHAPE(n, H, D));
            for (int64_t t = 0; t < n; t++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t d = 0; d < D; d++) tensor_set(x[r], (t * H + h) * D + d, pattern(r * n + t, h, d));
            send[r] = test_tensor(DT_F64, SHAPE(P, n, Hc, D));
            cpu_backend.transpose01(send[r], x[r], n, P);
        }
        for (int r = 0; r < P; r++) {
            heads[r] = test_tensor(DT_F64, SHAPE(N, Hc, D));
            for (int s = 0; s < P; s++)
                memcpy((double *)heads[r]->data + s * blk, (double *)send[s]->data + r * blk, (size_t)blk * sizeof(double));
            for (int64_t t = 0; t < N; t++)
                for (int64_t h = 0; h < Hc; h++)
                    for (int64_t d = 0; d < D; d++)
                        EXPECT(tensor_get(heads[r], (t * Hc + h) * D + d) == pattern(t, r * Hc + h, d),
                               "P %d rank %d: heads[%lld, %lld, %lld] wrong", P, r, (long long)t, (long long)h, (long long)d);
        }
        for (int r = 0; r < P; r++) { /* heads -> seq: block s of rank s's buffer is rank r's tokens */
            Tensor *recv = test_tensor(DT_F64, SHAPE(P, n, Hc, D)), *back = test_tensor(DT_F64, SHAPE(n, H, D));
            for (int s = 0; s < P; s++)
                memcpy((double *)recv->data + s * blk, (double *)heads[s]->data + r * blk, (size_t)blk * sizeof(double));
            cpu_backend.transpose01(back, recv, P, n);
            EXPECT(!memcmp(back->data, x[r]->data, tensor_bytes(back)), "P %d rank %d: the round trip differs", P, r);
            test_tensor_free(recv), test_tensor_free(back);
        }
        for (int r = 0; r < P; r++) test_tensor_free(x[r]), test_tensor_free(send[r]), test_tensor_free(heads[r]);
        free(x), free(send), free(heads);
    }
}

/* A group of one rank: the ops hand back their input and record nothing. */
TEST(one_rank_group_is_the_identity) {
    Dist d;
    dist_single(&d);
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Tensor *x = engine_zeros(&e, DT_F32, SHAPE(4, 2, 3));
    x->requires_grad = true;
    EXPECT(op_cp_seq_to_heads(&e, x, &d.cp_group) == x && op_cp_heads_to_seq(&e, x, &d.cp_group) == x &&
               op_cp_all_gather(&e, x, &d.cp_group) == x && e.tape_len == 0,
           "a cp group of one rank changed the graph");
    engine_free(&e);
}

/* ---- the exchange ops under mpirun: this program's --exchange mode ------------------------------------ */

#define CHECK(cond, ...)                                                                                    \
    do {                                                                                                    \
        if (!(cond)) fatal(__VA_ARGS__);                                                                    \
    } while (0)

static Tensor *filled(Engine *e, DType dt, int64_t rows, int64_t H, int64_t D, double scale,
                      double (*value)(int rank, int64_t t, int64_t h, int64_t d, int64_t n, int64_t Hc), int rank,
                      int64_t n, int64_t Hc) {
    Tensor *t = engine_empty(e, dt, SHAPE(rows, H, D));
    double *host = xmalloc((size_t)t->numel * sizeof(double));
    for (int64_t i = 0; i < rows; i++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < D; d++) host[(i * H + h) * D + d] = scale * value(rank, i, h, d, n, Hc);
    for (int64_t k = 0; k < t->numel; k++) tensor_set(t, k, host[k]);
    free(host);
    return t;
}
/* the sequence split: rank r's row t is token r*n + t, every head */
static double seq_value(int r, int64_t t, int64_t h, int64_t d, int64_t n, int64_t Hc) {
    (void)Hc;
    return pattern(r * n + t, h, d);
}
/* the head split: every token, rank r's head h is head r*Hc + h */
static double head_value(int r, int64_t t, int64_t h, int64_t d, int64_t n, int64_t Hc) {
    (void)n;
    return pattern(t, r * Hc + h, d);
}

static void expect_equal(const Tensor *a, const Tensor *b, const char *what, int rank) {
    CHECK(a->numel == b->numel, "%s: %lld vs %lld elements", what, (long long)a->numel, (long long)b->numel);
    for (int64_t k = 0; k < a->numel; k++)
        CHECK(tensor_get(a, k) == tensor_get(b, k), "rank %d: %s: element %lld is %g, expected %g", rank, what,
              (long long)k, tensor_get(a, k), tensor_get(b, k));
}

/* mpirun -np P build/tests/test_dist_cp --exchange: a cp group of all P ranks. Values are integers
 * below 2^24, so F32 and F64 are exact and every comparison is ==. */
static int exchange_main(int argc, char **argv) {
    Dist dist;
    dist_init(&dist, &argc, &argv);
    dist_setup(&dist, 1, 1, dist.size, 10.0, DEV_CPU, "test_dist_cp");
    const DistGroup *g = &dist.cp_group;
    const int P = g->size, r = g->rank;
    const int64_t n = 3, N = n * P, Hc = 2, H = Hc * P, D = 5;
    for (int dt = 0; dt < 2; dt++) {
        DType type = dt ? DT_F64 : DT_F32;
        Engine eng, *e = &eng;
        engine_init(e, &cpu_backend, type, 1 << 20);
        /* seq -> heads, and its backward: the adjoint sends a head-split gradient back to the tokens */
        Tensor *x = filled(e, type, n, H, D, 1, seq_value, r, n, Hc);
        x->requires_grad = true;
        Tensor *y = op_cp_seq_to_heads(e, x, g);
        CHECK(y->ndim == 3 && y->shape[0] == N && y->shape[1] == Hc && y->shape[2] == D, "seq_to_heads shape");
        expect_equal(y, filled(e, type, N, Hc, D, 1, head_value, r, n, Hc), "seq_to_heads", r);
        Tensor *z = op_cp_heads_to_seq(e, y, g);
        expect_equal(z, x, "heads_to_seq(seq_to_heads(x))", r);
        engine_backward_from(e, y, filled(e, type, N, Hc, D, 2, head_value, r, n, Hc), 0);
        expect_equal(x->grad, filled(e, type, n, H, D, 2, seq_value, r, n, Hc), "seq_to_heads backward", r);
        engine_reset(e);
        /* heads -> seq, and its backward */
        Tensor *xh = filled(e, type, N, Hc, D, 1, head_value, r, n, Hc);
        xh->requires_grad = true;
        Tensor *zs = op_cp_heads_to_seq(e, xh, g);
        CHECK(zs->shape[0] == n && zs->shape[1] == H, "heads_to_seq shape");
        expect_equal(zs, filled(e, type, n, H, D, 1, seq_value, r, n, Hc), "heads_to_seq", r);
        engine_backward_from(e, zs, filled(e, type, n, H, D, 3, seq_value, r, n, Hc), 0);
        expect_equal(xh->grad, filled(e, type, N, Hc, D, 3, head_value, r, n, Hc), "heads_to_seq backward", r);
        engine_reset(e);
        /* all-gather of [n, 1, D] rows, and its backward: the sum over ranks of their gradients, each rank
         * seeding (rank + 1) times the pattern */
        Tensor *k = filled(e, type, n, 1, D, 1, seq_value, r, n, 1);
        k->requires_grad = true;
        Tensor *kall = op_cp_all_gather(e, k, g);
        expect_equal(kall, filled(e, type, N, 1, D, 1, seq_value, 0, N, 1), "all_gather", r);
        engine_backward_from(e, kall, filled(e, type, N, 1, D, r + 1, seq_value, 0, N, 1), 0);
        expect_equal(k->grad, filled(e, type, n, 1, D, P * (P + 1) / 2.0, seq_value, r, n, 1), "all_gather backward",
                     r);
        engine_free(e);
    }
    printf("rank %d: exchange ok (cp %d)\n", r, P);
    dist_finalize(&dist);
    return 0;
}

static void read_tail(const char *path, char *buf, size_t n) {
    buf[0] = 0;
    FILE *f = fopen(path, "r");
    if (!f) return;
    fseek(f, 0, SEEK_END);
    long size = ftell(f), from = size > (long)n - 1 ? size - (long)n + 1 : 0;
    fseek(f, from, SEEK_SET);
    size_t k = fread(buf, 1, n - 1, f);
    buf[k] = 0;
    fclose(f);
}

TEST(exchange_ops_under_mpirun) {
    EXPECT(FX->have_mpirun, "no mpirun: install openmpi-bin (bash tools/install_deps.sh)");
    for (int np = 2; np <= 4; np += 2) {
        char cmd[512], o[300], out[8192];
        snprintf(o, sizeof o, "%s/exchange.txt", FX->dir);
        snprintf(cmd, sizeof cmd, "mpirun --oversubscribe -np %d build/tests/test_dist_cp --exchange >%s 2>&1", np, o);
        int st = system(cmd);
        read_tail(o, out, sizeof out);
        int ok = 0;
        for (const char *p = out; (p = strstr(p, "exchange ok")); p++) ok++;
        EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0 && ok == np, "np %d: %s", np, out);
    }
}

/* ---- build/train on several ranks against one process ----------------------------------------------- */

typedef struct Outcome {
    int status; /* exit status, -1 when killed */
    char err[8192];
} Outcome;

/* np = 0: a plain process; else mpirun -np np */
static Outcome train(TestCtx *tc, int np, const char *out_dir, const char *args) {
    char cmd[4096], launcher[128] = "", o[512], e[512];
    if (np > 0) snprintf(launcher, sizeof launcher, "mpirun --oversubscribe -np %d ", np);
    snprintf(o, sizeof o, "%s/stdout.txt", FX->dir);
    snprintf(e, sizeof e, "%s/stderr.txt", FX->dir);
    snprintf(cmd, sizeof cmd, "%sbuild/train " TINY " " COMMON " %s%s %s >%s 2>%s", launcher,
             out_dir ? "--set train.out_dir=" : "", out_dir ? out_dir : "", args, o, e);
    Outcome r;
    int st = system(cmd);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    read_tail(e, r.err, sizeof r.err);
    return r;
}

typedef struct Metrics {
    int n; /* training records */
    int step[MAX_STEPS];
    double loss[MAX_STEPS], aux[MAX_STEPS], grad_norm[MAX_STEPS];
    double val_loss, val_kl, val_recall, val_dense; /* the last eval record's (NAN if absent) */
} Metrics;

static double number_after(const char *line, const char *key) {
    const char *p = strstr(line, key);
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

static Metrics read_metrics(const char *run_dir) {
    Metrics m = {.n = 0, .val_loss = NAN, .val_kl = NAN, .val_recall = NAN, .val_dense = NAN};
    char path[512], line[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    FILE *f = fopen(path, "r");
    if (!f) return m;
    while (fgets(line, sizeof line, f)) {
        if (strstr(line, "\"val_loss\"")) {
            m.val_loss = number_after(line, "\"val_loss\": ");
            m.val_kl = number_after(line, "\"kl\": ");
            m.val_recall = number_after(line, "\"recall\": ");
            m.val_dense = number_after(line, "\"dense_attention_val_loss\": ");
        } else if (strstr(line, "\"loss\"") && m.n < MAX_STEPS) {
            m.step[m.n] = (int)number_after(line, "\"step\": ");
            m.loss[m.n] = number_after(line, "\"loss\": ");
            m.aux[m.n] = number_after(line, "\"aux\": ");
            m.grad_norm[m.n] = number_after(line, "\"grad_norm\": ");
            m.n++;
        }
    }
    fclose(f);
    return m;
}

/* |a - b|, 0 when both are absent (NAN) */
static double diff_or_0(double a, double b) { return isnan(a) && isnan(b) ? 0.0 : fabs(a - b); }

typedef struct MetricDiff {
    double loss, aux, grad_norm; /* largest |a - b| over the common steps from `from` */
    int common;
} MetricDiff;

static MetricDiff compare_metrics(const Metrics *a, const Metrics *b, int from) {
    MetricDiff d = {0, 0, 0, 0};
    for (int i = 0; i < a->n; i++)
        for (int j = 0; j < b->n; j++)
            if (a->step[i] == b->step[j] && a->step[i] >= from) {
                d.loss = fmax(d.loss, fabs(a->loss[i] - b->loss[j]));
                d.aux = fmax(d.aux, fabs(a->aux[i] - b->aux[j]));
                d.grad_norm = fmax(d.grad_norm, fabs(a->grad_norm[i] - b->grad_norm[j]));
                d.common++;
            }
    return d;
}

typedef struct Diff {
    double max_abs, max_rel; /* over tensors: max |a - b|, max ||a - b|| / ||a|| */
    bool ok;                 /* both files readable with the same tensors */
} Diff;

static float *read_dataset(hid_t g, const char *name, hssize_t *n) {
    hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
    if (d < 0) return NULL;
    hid_t sp = H5Dget_space(d);
    *n = H5Sget_simple_extent_npoints(sp);
    float *buf = xmalloc((size_t)(*n > 0 ? *n : 1) * sizeof(float));
    herr_t st = H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
    H5Sclose(sp);
    H5Dclose(d);
    if (st < 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* Compare group gname ("params", "optimizer/m", ...) of two checkpoints tensor by tensor. */
static Diff compare_group(const char *file_a, const char *file_b, const char *gname) {
    Diff df = {0, 0, false};
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fa = H5Fopen(file_a, H5F_ACC_RDONLY, H5P_DEFAULT), fb = H5Fopen(file_b, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ga = fa >= 0 ? H5Gopen2(fa, gname, H5P_DEFAULT) : -1, gb = fb >= 0 ? H5Gopen2(fb, gname, H5P_DEFAULT) : -1;
    H5G_info_t ia, ib;
    if (ga >= 0 && gb >= 0 && H5Gget_info(ga, &ia) >= 0 && H5Gget_info(gb, &ib) >= 0 && ia.nlinks == ib.nlinks &&
        ia.nlinks > 0) {
        df.ok = true;
        for (hsize_t i = 0; i < ia.nlinks && df.ok; i++) {
            char name[256];
            H5Lget_name_by_idx(ga, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
            hssize_t na = 0, nb = 0;
            float *a = read_dataset(ga, name, &na), *b = read_dataset(gb, name, &nb);
            if (!a || !b || na != nb) df.ok = false;
            else {
                double d2 = 0, a2 = 0;
                for (hssize_t k = 0; k < na; k++) {
                    double d = (double)a[k] - (double)b[k];
                    df.max_abs = fmax(df.max_abs, fabs(d));
                    d2 += d * d;
                    a2 += (double)a[k] * a[k];
                }
                df.max_rel = fmax(df.max_rel, a2 > 0 ? sqrt(d2 / a2) : sqrt(d2));
            }
            free(a);
            free(b);
        }
    }
    if (ga >= 0) H5Gclose(ga);
    if (gb >= 0) H5Gclose(gb);
    if (fa >= 0) H5Fclose(fa);
    if (fb >= 0) H5Fclose(fb);
    return df;
}

/* A finished run of `args` on np ranks (0 = plain process) into <tmp>/<name>; reused when it is there. */
static bool run_into(TestCtx *tc, const char *name, int np, const char *args, char *dir, size_t n) {
    snprintf(dir, n, "%s/%s", FX->dir, name);
    char done[600];
    snprintf(done, sizeof done, "%s/ckpt_00000010.h5", dir);
    if (access(done, F_OK) == 0) return true;
    Outcome o = train(tc, np, dir, args);
    if (o.status != 0) printf("    %s (np %d) exited with %d:\n%s\n", name, np, o.status, o.err);
    return o.status == 0;
}

/* The two finished runs agree within fp32 tolerance: every logged step, the last eval, the final checkpoint. */
static void expect_same_runs(TestCtx *tc, const char *a_dir, const char *b_dir, const char *what) {
    char ca[600], cb[600];
    Metrics a = read_metrics(a_dir), b = read_metrics(b_dir);
    MetricDiff md = compare_metrics(&a, &b, 0);
    double dv = diff_or_0(a.val_loss, b.val_loss), dk = diff_or_0(a.val_kl, b.val_kl),
           dr = diff_or_0(a.val_recall, b.val_recall), dd = diff_or_0(a.val_dense, b.val_dense);
    snprintf(ca, sizeof ca, "%s/ckpt_00000010.h5", a_dir);
    snprintf(cb, sizeof cb, "%s/ckpt_00000010.h5", b_dir);
    Diff p = compare_group(ca, cb, "params"), m = compare_group(ca, cb, "optimizer/m"),
         v = compare_group(ca, cb, "optimizer/v");
    printf("    %s over %d steps: loss %.1e, kl %.1e, grad norm %.1e; eval loss %.1e, kl %.1e, recall %.1e, dense "
           "%.1e; params max |d| %.2e (rel %.2e), AdamW m rel %.2e, v rel %.2e\n",
           what, md.common, md.loss, md.aux, md.grad_norm, dv, dk, dr, dd, p.max_abs, p.max_rel, m.max_rel, v.max_rel);
    EXPECT(a.n == 10 && md.common == 10, "logged steps: %d single, %d common", a.n, md.common);
    EXPECT(md.loss <= LOSS_TOL && md.aux <= LOSS_TOL && md.grad_norm <= LOSS_TOL,
           "losses differ by %g, KL by %g, gradient norms by %g", md.loss, md.aux, md.grad_norm);
    EXPECT(!isnan(a.val_loss) && dv <= LOSS_TOL && dk <= LOSS_TOL && dr <= LOSS_TOL && dd <= LOSS_TOL,
           "eval: loss %.6f vs %.6f, kl by %g, recall by %g, dense loss by %g", a.val_loss, b.val_loss, dk, dr, dd);
    EXPECT(p.ok && m.ok && v.ok, "cannot compare the checkpoints %s and %s", ca, cb);
    EXPECT(p.max_abs <= PARAM_ABS_TOL && p.max_rel <= PARAM_REL_TOL, "parameters differ: max %g, rel %g", p.max_abs,
           p.max_rel);
    EXPECT(m.max_rel <= MOMENT_REL_TOL && v.max_rel <= MOMENT_REL_TOL, "moments differ: m %g, v %g", m.max_rel, v.max_rel);
}

/* The single process and np ranks with `layout` (e.g. "--set dist.cp=2") on the same config and batch. */
static void expect_same_training(TestCtx *tc, const char *name, int np, const char *layout, const char *args) {
    char single[512], multi[512], name1[128], name2[128], all[2048], what[64];
    snprintf(name1, sizeof name1, "%s_single", name);
    snprintf(name2, sizeof name2, "%s_np%d", name, np);
    snprintf(all, sizeof all, "%s %s", args, layout);
    EXPECT(run_into(tc, name1, 0, args, single, sizeof single), "single-process run failed");
    EXPECT(run_into(tc, name2, np, all, multi, sizeof multi), "%d-rank run failed", np);
    snprintf(what, sizeof what, "np %d (%s) vs 1", np, layout + 6);
    expect_same_runs(tc, single, multi, what);
}

#define CP2 "--set dist.cp=2"
#define CHECKPOINTS "--set train.checkpoint_every=5 --set train.keep_checkpoints=0"

TEST(cp2_dense_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "dense", 2, CP2, CHECKPOINTS);
}

/* dropout masks by global token (row_offset), two micro-batches per step, every block recomputed in the
 * backward (its exchanges run again) */
TEST(cp2_dense_with_dropout_accum_recompute_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "dropout", 2, CP2,
                         "--set model.dropout=0.1 --set train.grad_accum=2 --set train.batch_size=4 --set train.recompute=true");
}

/* sparse from the first step (the KL over the selected blocks), with recomputation */
TEST(cp2_msa_sparse_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "msa_sparse", 2, CP2, MSA " --set msa.dense_warmup_steps=0 --set train.recompute=true");
}

/* 4 steps of dense warm-up (KL over the full causal prefix), then sparse; evals with the dense reference */
TEST(cp2_msa_warmup_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "msa_warm", 2, CP2,
                         MSA " --set msa.dense_warmup_steps=4 --set train.eval_dense_reference=true");
}

TEST(cp2_dp2_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "msa_warm", 4, CP2,
                         MSA " --set msa.dense_warmup_steps=4 --set train.eval_dense_reference=true");
}

/* The CP-2 run's step-5 checkpoint (its optimizer shards gathered over dp*cp) resumes on 1 rank and on
 * CP-2 x DP-2 (scattered over 4) and ends where the single-process run ends. */
TEST(cp2_checkpoint_resumes_on_1_and_on_cp2_dp2) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char single[512], two[512];
    EXPECT(run_into(tc, "dense_single", 0, CHECKPOINTS, single, sizeof single) &&
               run_into(tc, "dense_np2", 2, CHECKPOINTS " " CP2, two, sizeof two),
           "the reference runs failed");
    static const int nps[] = {0, 4};
    for (int i = 0; i < 2; i++) {
        char dir[512], cmd[2048];
        snprintf(dir, sizeof dir, "%s/resume_%d", FX->dir, nps[i]);
        snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s/ckpt_00000005.h5 %s/", dir, two, dir);
        EXPECT(system(cmd) == 0, "%s failed", cmd);
        Outcome o = train(tc, nps[i], dir, nps[i] ? "--resume " CP2 : "--resume");
        EXPECT(o.status == 0, "resume on %d rank(s) exited with %d: %s", nps[i], o.status, o.err);
        Metrics a = read_metrics(single), b = read_metrics(dir);
        MetricDiff md = compare_metrics(&a, &b, 6);
        char ca[600], cb[600];
        snprintf(ca, sizeof ca, "%s/ckpt_00000010.h5", single);
        snprintf(cb, sizeof cb, "%s/ckpt_00000010.h5", dir);
        Diff p = compare_group(ca, cb, "params"), v = compare_group(ca, cb, "optimizer/v");
        printf("    cp 2 -> %s: steps 6-10 loss %.1e, grad norm %.1e; final params max |d| %.2e (rel %.2e), v rel %.2e\n",
               nps[i] ? "cp 2 x dp 2" : "1 rank", md.loss, md.grad_norm, p.max_abs, p.max_rel, v.max_rel);
        EXPECT(md.common == 5 && md.loss <= LOSS_TOL && md.grad_norm <= LOSS_TOL, "steps 6-10: %d steps, loss %g",
               md.common, md.loss);
        EXPECT(p.ok && p.max_abs <= PARAM_ABS_TOL && p.max_rel <= PARAM_REL_TOL, "parameters: %g (rel %g)", p.max_abs,
               p.max_rel);
        EXPECT(v.ok && v.max_rel <= MOMENT_REL_TOL, "second moments: rel %g", v.max_rel);
    }
}

TEST(cp_that_does_not_divide_is_refused) {
    EXPECT(FX->have_mpirun, "no mpirun");
    Outcome o = train(tc, 4, NULL, "--set dist.cp=4");
    EXPECT(o.status != 0 && strstr(o.err, "dist.cp = 4 does not divide model.n_kv_heads = 2"), "cp 4, 2 KV heads: %s",
           o.err);
    o = train(tc, 2, NULL, CP2 " --set train.batch_size=1 --set train.seq_len=63");
    EXPECT(o.status != 0 && strstr(o.err, "dist.cp = 2 does not divide the 63 tokens of a rank's micro-batch"),
           "63 tokens on cp 2: %s", o.err);
}

/* ---- main ----------------------------------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--exchange")) return exchange_main(argc, argv);
    TEST_BEGIN();
    Fixture fx;
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_test_dist_cp_XXXXXX");
    if (!mkdtemp(fx.dir)) {
        perror("mkdtemp");
        return 1;
    }
    fx.have_mpirun = system("command -v mpirun >/dev/null 2>&1") == 0;
    /* as tests/test_dist.c: one thread per process (ranks share the cores), root in CI, no CMA */
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
    tc->fixture = &fx;
    RUN(transpose01_matches_the_index_reference_and_round_trips);
    RUN(seq_heads_exchange_layout_for_P_ranks);
    RUN(one_rank_group_is_the_identity);
    RUN(exchange_ops_under_mpirun);
    RUN(cp2_dense_equals_single_process);
    RUN(cp2_dense_with_dropout_accum_recompute_equals_single_process);
    RUN(cp2_msa_sparse_equals_single_process);
    RUN(cp2_msa_warmup_equals_single_process);
    RUN(cp2_dp2_equals_single_process);
    RUN(cp2_checkpoint_resumes_on_1_and_on_cp2_dp2);
    RUN(cp_that_does_not_divide_is_refused);
    nftw(fx.dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    TEST_END();
}
