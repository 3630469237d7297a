/* Distributed training on the CPU (DESIGN §6, issue 7): build/train under `mpirun --oversubscribe -np N`
 * against the same config in one plain process.
 *   - every collective of dist/ on the world and on dp/ep/cp groups of several layouts, and the layout
 *     itself (this program under mpirun, in its `--collectives DP EP CP` mode);
 *   - the sampler's per-rank parts tile the single-process batch (in-process, no MPI);
 *   - DP-2 and DP-4 equal single-process training with the same global batch: losses, gradient norms and
 *     the final parameters and AdamW moments within fp32 tolerance over 10 steps (also with gradient
 *     accumulation and dropout, for an MoE model with the selection-bias update, and for MSA);
 *   - mpirun -np 1 is bit-for-bit the plain process;
 *   - a checkpoint written by 2 ranks resumes on 1 and on 4 and ends where the uninterrupted run ends;
 *   - no two ranks read the same window, and together they read exactly the single process's windows;
 *   - a rank that fails ends the job with its message, a rank that hangs makes the others time out;
 *   - rank counts that do not fit the config are refused with a message.
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hdf5.h>

#include "../data/dataset.h"
#include "../dist/dist.h"
#include "../kernels/util.h"
#include "test.h"

#define TINY "configs/tiny.json"
#define TRAIN_DATA "data/shakespeare/train.h5"
/* 10 logged steps, a 2-batch eval at the end, no sample text */
#define COMMON "--set train.steps=10 --set train.log_every=1 --set train.eval_batches=2 --set train.sample_tokens=0"
#define MAX_STEPS 16

/* fp32 tolerances: metrics.jsonl prints losses with 6 decimals; parameters after 10 AdamW steps differ by
 * the rounding of sums taken in another order (measured ~1e-6) */
#define LOSS_TOL 2e-5
#define PARAM_ABS_TOL 1e-5
#define PARAM_REL_TOL 1e-5
#define MOMENT_REL_TOL 1e-4

typedef struct Fixture {
    char dir[256];
    bool have_mpirun;
} Fixture;
#define FX ((Fixture *)tc->fixture)

/* ---- running build/train ------------------------------------------------------------------------ */

typedef struct Outcome {
    int status;       /* exit status, -1 when killed */
    double seconds;
    char err[8192];   /* stderr */
    char out[8192];   /* the end of stdout */
} Outcome;

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

/* np = 0: a plain process; else mpirun -np np. env: extra "NAME=value ..." for the command (or ""). */
static Outcome train(TestCtx *tc, int np, const char *out_dir, const char *args, const char *env) {
    char cmd[4096], launcher[128] = "", o[512], e[512];
    if (np > 0) snprintf(launcher, sizeof launcher, "mpirun --oversubscribe -np %d ", np);
    snprintf(o, sizeof o, "%s/stdout.txt", FX->dir);
    snprintf(e, sizeof e, "%s/stderr.txt", FX->dir);
    snprintf(cmd, sizeof cmd, "env %s %sbuild/train " TINY " " COMMON " %s%s %s >%s 2>%s", env, launcher,
             out_dir ? "--set train.out_dir=" : "", out_dir ? out_dir : "", args, o, e);
    Outcome r;
    double t0 = wall_seconds();
    int st = system(cmd);
    r.seconds = wall_seconds() - t0;
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    read_tail(e, r.err, sizeof r.err);
    read_tail(o, r.out, sizeof r.out);
    return r;
}

static void path_in(char *buf, size_t n, TestCtx *tc, const char *name) { snprintf(buf, n, "%s/%s", FX->dir, name); }

/* ---- what a run leaves: metrics.jsonl and the checkpoint ---------------------------------------- */

typedef struct Metrics {
    int n;                        /* training records */
    int step[MAX_STEPS];
    double loss[MAX_STEPS], grad_norm[MAX_STEPS];
    double val_loss;              /* the last eval record's (NAN if none) */
} Metrics;

static double number_after(const char *line, const char *key) {
    const char *p = strstr(line, key);
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

static Metrics read_metrics(const char *run_dir) {
    Metrics m = {.n = 0, .val_loss = NAN};
    char path[512], line[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    FILE *f = fopen(path, "r");
    if (!f) return m;
    while (fgets(line, sizeof line, f)) {
        if (strstr(line, "\"val_loss\"")) m.val_loss = number_after(line, "\"val_loss\": ");
        else if (strstr(line, "\"loss\"") && m.n < MAX_STEPS) {
            m.step[m.n] = (int)number_after(line, "\"step\": ");
            m.loss[m.n] = number_after(line, "\"loss\": ");
            m.grad_norm[m.n] = number_after(line, "\"grad_norm\": ");
            m.n++;
        }
    }
    fclose(f);
    return m;
}

/* Largest |a - b| of the loss and of the gradient norm over the steps both logged (steps from `from`). */
static void compare_metrics(const Metrics *a, const Metrics *b, int from, double *loss_diff, double *gnorm_diff,
                            int *common) {
    *loss_diff = *gnorm_diff = 0;
    *common = 0;
    for (int i = 0; i < a->n; i++)
        for (int j = 0; j < b->n; j++)
            if (a->step[i] == b->step[j] && a->step[i] >= from) {
                *loss_diff = fmax(*loss_diff, fabs(a->loss[i] - b->loss[j]));
                *gnorm_diff = fmax(*gnorm_diff, fabs(a->grad_norm[i] - b->grad_norm[j]));
                (*common)++;
            }
}

typedef struct Diff {
    double max_abs, max_rel; /* over tensors: max |a - b|, max ||a - b|| / ||a|| */
    int tensors;
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
    Diff df = {0, 0, 0, false};
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
                df.tensors++;
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

static long long ckpt_attr(const char *file, const char *name) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    long long v = -1;
    hid_t f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return -1;
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    if (a >= 0) {
        H5Aread(a, H5T_NATIVE_LLONG, &v);
        H5Aclose(a);
    }
    H5Fclose(f);
    return v;
}

/* A finished run of `args` on np ranks (0 = plain process) into <tmp>/<name>; its directory in dir. A run
 * that finished there already (the single-process reference of several tests) is reused. */
static bool run_into(TestCtx *tc, const char *name, int np, const char *args, const char *env, char *dir, size_t n) {
    path_in(dir, n, tc, name);
    char done[600];
    snprintf(done, sizeof done, "%s/ckpt_00000010.h5", dir);
    if (access(done, F_OK) == 0) return true;
    Outcome o = train(tc, np, dir, args, env);
    if (o.status != 0) printf("    %s (np %d) exited with %d:\n%s\n", name, np, o.status, o.err);
    return o.status == 0;
}

/* The single-process run and the np-rank run of the same config agree within fp32 tolerance. */
static void expect_same_training(TestCtx *tc, const char *name, int np, const char *args) {
    char single[512], multi[512], name1[128], name2[128], ca[600], cb[600];
    snprintf(name1, sizeof name1, "%s_single", name);
    snprintf(name2, sizeof name2, "%s_np%d", name, np);
    EXPECT(run_into(tc, name1, 0, args, "", single, sizeof single), "single-process run failed");
    EXPECT(run_into(tc, name2, np, args, "", multi, sizeof multi), "%d-rank run failed", np);
    Metrics a = read_metrics(single), b = read_metrics(multi);
    double dl, dg;
    int common;
    compare_metrics(&a, &b, 0, &dl, &dg, &common);
    snprintf(ca, sizeof ca, "%s/ckpt_00000010.h5", single);
    snprintf(cb, sizeof cb, "%s/ckpt_00000010.h5", multi);
    Diff p = compare_group(ca, cb, "params"), m = compare_group(ca, cb, "optimizer/m"),
         v = compare_group(ca, cb, "optimizer/v");
    printf("    np %d vs 1 over %d steps: loss %.1e, grad norm %.1e, val loss %.1e; params max |d| %.2e (rel %.2e), "
           "AdamW m rel %.2e, v rel %.2e\n",
           np, common, dl, dg, fabs(a.val_loss - b.val_loss), p.max_abs, p.max_rel, m.max_rel, v.max_rel);
    EXPECT(a.n == 10 && common == 10, "logged steps: %d single, %d common", a.n, common);
    EXPECT(dl <= LOSS_TOL && dg <= LOSS_TOL, "losses differ by %g, gradient norms by %g", dl, dg);
    EXPECT(fabs(a.val_loss - b.val_loss) <= LOSS_TOL, "val loss %.6f vs %.6f", a.val_loss, b.val_loss);
    EXPECT(p.ok && m.ok && v.ok, "cannot compare the checkpoints %s and %s", ca, cb);
    EXPECT(p.max_abs <= PARAM_ABS_TOL && p.max_rel <= PARAM_REL_TOL, "parameters differ: max %g, rel %g", p.max_abs,
           p.max_rel);
    EXPECT(m.max_rel <= MOMENT_REL_TOL && v.max_rel <= MOMENT_REL_TOL, "moments differ: m %g, v %g", m.max_rel, v.max_rel);
    EXPECT(ckpt_attr(ca, "data_counter") == ckpt_attr(cb, "data_counter"), "data counters differ");
}

/* ---- tests -------------------------------------------------------------------------------------- */

/* In-process: rank r's part of every micro-batch is rows [r * B/dp, (r + 1) * B/dp) of the single
 * process's batch, and the counters stay in step. */
TEST(sampler_parts_tile_the_global_batch) {
    TokenDataset ds;
    dataset_open(&ds, TRAIN_DATA);
    const int B = 8, T = 32;
    Batch whole, part;
    batch_alloc(&whole, B, T);
    for (int dp = 1; dp <= 4; dp *= 2) {
        int Bl = B / dp;
        batch_alloc(&part, Bl, T);
        Sampler s1, sr[4];
        sampler_init(&s1, &ds, 99);
        for (int r = 0; r < dp; r++) sampler_init(&sr[r], &ds, 99);
        for (int step = 0; step < 3; step++) {
            sampler_next(&s1, &whole);
            for (int r = 0; r < dp; r++) {
                sampler_next_part(&sr[r], &part, r * Bl, B);
                size_t off = (size_t)r * Bl * T, n = (size_t)Bl * T * sizeof(int32_t);
                EXPECT(!memcmp(part.inputs, whole.inputs + off, n) && !memcmp(part.targets, whole.targets + off, n) &&
                           !memcmp(part.positions, whole.positions + off, n),
                       "dp %d rank %d step %d: rows differ from the single-process batch", dp, r, step);
                EXPECT(sr[r].counter == s1.counter, "dp %d rank %d: counter %llu, single %llu", dp, r,
                       (unsigned long long)sr[r].counter, (unsigned long long)s1.counter);
            }
            for (int r = 0; r < dp; r++) {
                sampler_sequential(&ds, step, &whole);
                sampler_sequential_part(&ds, step, &part, r * Bl, B);
                EXPECT(!memcmp(part.inputs, whole.inputs + (size_t)r * Bl * T, (size_t)Bl * T * sizeof(int32_t)),
                       "dp %d rank %d: validation rows differ", dp, r);
            }
        }
        batch_free(&part);
    }
    batch_free(&whole);
    dataset_close(&ds);
}

TEST(mpirun_is_available) { EXPECT(FX->have_mpirun, "mpirun not found: install openmpi-bin (bash tools/install_deps.sh)"); }

/* mpirun -np 1 is the plain process, bit for bit */
TEST(one_rank_is_the_plain_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char a[512], b[512], ca[600], cb[600];
    EXPECT(run_into(tc, "plain", 0, "", "", a, sizeof a) && run_into(tc, "np1", 1, "", "", b, sizeof b), "run failed");
    Metrics ma = read_metrics(a), mb = read_metrics(b);
    double dl, dg;
    int common;
    compare_metrics(&ma, &mb, 0, &dl, &dg, &common);
    snprintf(ca, sizeof ca, "%s/ckpt_00000010.h5", a);
    snprintf(cb, sizeof cb, "%s/ckpt_00000010.h5", b);
    Diff p = compare_group(ca, cb, "params"), m = compare_group(ca, cb, "optimizer/v");
    EXPECT(common == 10 && dl == 0 && dg == 0 && p.ok && p.max_abs == 0 && m.ok && m.max_abs == 0,
           "mpirun -np 1 differs from the plain process: loss %g, params %g, v %g", dl, p.max_abs, m.max_abs);
}

TEST(dp2_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "dense", 2, "");
}

TEST(dp4_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "dense", 4, "");
}

/* gradient accumulation (each micro-batch split over the ranks) and dropout (masks by global row) */
TEST(dp2_with_grad_accum_and_dropout_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "accum", 2, "--set train.grad_accum=2 --set train.batch_size=4 --set model.dropout=0.1");
}

/* MoE: the expert loads are summed over the ranks before the selection-bias update (the load-balancing aux
 * loss is off: it is a product of batch means, per rank by design, so it differs from the global batch's) */
TEST(dp2_moe_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "moe", 2,
                         "--set model.ffn=moe --set moe.num_experts=4 --set moe.expert_dim=32 --set moe.shared_experts=1 "
                         "--set moe.aux_loss_weight=0 --set moe.z_loss_weight=0.001 --set moe.bias_update_rate=0.01");
}

/* MSA: the KL term (a mean over equally many tokens per rank) enters each rank's loss with 1/dp; the run
 * crosses the switch from dense warm-up to sparse selection, and the evals (KL, recall, dense reference)
 * are recombined over the ranks */
TEST(dp2_msa_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    expect_same_training(tc, "msa", 2,
                         "--set model.attention=msa --set msa.block_size=8 --set msa.topk_blocks=3 --set msa.index_dim=16 "
                         "--set msa.dense_warmup_steps=4 --set train.eval_every=5 --set train.eval_dense_reference=true");
}

/* A checkpoint of a 2-rank run at step 5 resumes on 1 and on 4 ranks and ends where the uninterrupted
 * single-process run ends. */
TEST(checkpoint_from_2_ranks_resumes_on_1_and_4) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char ref[512], two[512], ck5[600];
    EXPECT(run_into(tc, "resume_ref", 0, "", "", ref, sizeof ref), "reference run failed");
    EXPECT(run_into(tc, "resume_np2", 2, "--set train.checkpoint_every=5 --set train.keep_checkpoints=0", "", two,
                    sizeof two),
           "2-rank run failed");
    snprintf(ck5, sizeof ck5, "%s/ckpt_00000005.h5", two);
    Metrics mr = read_metrics(ref);
    for (int np = 1; np <= 4; np *= 4) {
        char dir[512], cmd[2048], ca[600], cb[600];
        snprintf(dir, sizeof dir, "%s/resume_on_%d", FX->dir, np);
        snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s %s/", dir, ck5, dir);
        EXPECT(system(cmd) == 0, "%s failed", cmd);
        Outcome o = train(tc, np == 1 ? 0 : np, dir, "--resume", "");
        EXPECT(o.status == 0, "resume on %d rank(s) exited with %d: %s", np, o.status, o.err);
        EXPECT(strstr(o.out, "resumed from") || strstr(o.out, "done:"), "no progress output: %s", o.out);
        Metrics m = read_metrics(dir);
        double dl, dg;
        int common;
        compare_metrics(&mr, &m, 6, &dl, &dg, &common);
        snprintf(ca, sizeof ca, "%s/ckpt_00000010.h5", ref);
        snprintf(cb, sizeof cb, "%s/ckpt_00000010.h5", dir);
        Diff p = compare_group(ca, cb, "params"), v = compare_group(ca, cb, "optimizer/v");
        printf("    2 ranks -> %d: steps 6-10 loss %.1e, grad norm %.1e; final params max |d| %.2e (rel %.2e), v rel "
               "%.2e\n",
               np, dl, dg, p.max_abs, p.max_rel, v.max_rel);
        EXPECT(common == 5 && dl <= LOSS_TOL && dg <= LOSS_TOL, "steps 6-10 after resuming on %d: %d steps, loss %g",
               np, common, dl);
        EXPECT(p.ok && p.max_abs <= PARAM_ABS_TOL && p.max_rel <= PARAM_REL_TOL, "parameters: %g (rel %g)", p.max_abs,
               p.max_rel);
        EXPECT(v.ok && v.max_rel <= MOMENT_REL_TOL, "second moments: rel %g", v.max_rel);
        EXPECT(ckpt_attr(cb, "data_counter") == ckpt_attr(ca, "data_counter") && ckpt_attr(cb, "adam_t") == 10,
               "train state after resuming on %d: counter %lld vs %lld, adam_t %lld", np, ckpt_attr(cb, "data_counter"),
               ckpt_attr(ca, "data_counter"), ckpt_attr(cb, "adam_t"));
    }
}

/* Every window (sampler counter) of 3 steps of 2 micro-batches of 8 is read by exactly one of 4 ranks. */
TEST(no_two_ranks_read_the_same_sample) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char prefix[512], env[600];
    path_in(prefix, sizeof prefix, tc, "samples");
    snprintf(env, sizeof env, "MSA_DIST_TEST_SAMPLES=%s", prefix);
    Outcome o = train(tc, 4, NULL, "--set train.steps=3 --set train.grad_accum=2", env);
    EXPECT(o.status == 0, "4-rank run exited with %d: %s", o.status, o.err);
    enum { WINDOWS = 3 * 2 * 8 };
    int seen[WINDOWS] = {0}, per_rank[4] = {0}, stray = 0;
    for (int r = 0; r < 4; r++) {
        char path[600];
        snprintf(path, sizeof path, "%s.%d", prefix, r);
        FILE *f = fopen(path, "r");
        EXPECT(f, "rank %d wrote no %s", r, path);
        unsigned long long w;
        while (fscanf(f, "%llu", &w) == 1) {
            if (w < WINDOWS) seen[w]++;
            else stray++;
            per_rank[r]++;
        }
        fclose(f);
    }
    int once = 0;
    for (int w = 0; w < WINDOWS; w++) once += seen[w] == 1;
    printf("    windows read per rank: %d %d %d %d; read exactly once: %d of %d\n", per_rank[0], per_rank[1], per_rank[2],
           per_rank[3], once, WINDOWS);
    EXPECT(once == WINDOWS && stray == 0, "%d of %d windows read exactly once, %d outside the batch", once, WINDOWS, stray);
    for (int r = 0; r < 4; r++) EXPECT(per_rank[r] == WINDOWS / 4, "rank %d read %d windows", r, per_rank[r]);
}

/* A rank that fails ends the whole job at once, with its own message. */
TEST(failing_rank_ends_the_job_with_its_message) {
    EXPECT(FX->have_mpirun, "no mpirun");
    Outcome o = train(tc, 2, NULL, "", "MSA_DIST_TEST_FAIL=1:3");
    printf("    exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0, "mpirun exited 0");
    EXPECT(strstr(o.err, "error: rank 1: test hook MSA_DIST_TEST_FAIL"), "stderr lacks rank 1's message: %s", o.err);
    EXPECT(o.seconds < 20, "the job took %.1f s to end", o.seconds);
}

/* A rank that hangs: the others give up after dist.timeout and end the job with a message. */
TEST(hanging_rank_makes_the_others_time_out) {
    EXPECT(FX->have_mpirun, "no mpirun");
    Outcome o = train(tc, 2, NULL, "--set dist.timeout=2", "MSA_DIST_TEST_HANG=1:3");
    printf("    exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0, "mpirun exited 0");
    EXPECT(strstr(o.err, "error: rank 0:") && strstr(o.err, "did not complete within dist.timeout = 2 s"),
           "stderr lacks rank 0's timeout message: %s", o.err);
    EXPECT(o.seconds < 30, "the job took %.1f s to end", o.seconds);
}

TEST(rank_counts_that_do_not_fit_are_refused) {
    EXPECT(FX->have_mpirun, "no mpirun");
    Outcome o = train(tc, 4, NULL, "--set train.batch_size=6", "");
    EXPECT(o.status != 0 && strstr(o.err, "train.batch_size = 6 is not divisible by the 4 data-parallel ranks"),
           "batch 6 on 4 ranks: %s", o.err);
    o = train(tc, 2, NULL, "--set dist.dp=3", "");
    EXPECT(o.status != 0 && strstr(o.err, "dist.dp * dist.ep * dist.cp = 3 * 1 * 1 = 3, but the job has 2 ranks"),
           "dp 3 on 2 ranks: %s", o.err);
    o = train(tc, 0, NULL, "--set dist.dp=2", "");
    EXPECT(o.status == 1 && strstr(o.err, "but the job has 1 rank"), "dp 2 without mpirun: %s", o.err);
    o = train(tc, 2, NULL, "--set dist.ep=2 --set train.batch_size=5", "");
    EXPECT(o.status != 0 && strstr(o.err, "train.batch_size = 5 is not divisible by the dist.dp * dist.ep = 1 * 2"),
           "batch 5 over ep 2: %s", o.err);
}

/* ---- the collectives themselves: this program under mpirun, in its --collectives mode ------------------ */

#define CHECK(cond, ...)                                                                                    \
    do {                                                                                                    \
        if (!(cond)) fatal(__VA_ARGS__);                                                                    \
    } while (0)

/* The group layout and every host collective on the world and on each group, checked on every rank; a
 * wrong result ends the job through fatal (MPI_Abort) with the rank's message. */
static void check_group_collectives(const DistGroup *g, int world_rank) {
    const int n = g->size, me = g->rank, C = 3;
    /* all_reduce: sum and max of (rank + 1) */
    double x[2] = {me + 1, me + 1};
    dist_all_reduce(g, x, 1, DIST_F64, DIST_SUM, DEV_CPU);
    dist_all_reduce(g, x + 1, 1, DIST_F64, DIST_MAX, DEV_CPU);
    CHECK(x[0] == n * (n + 1) / 2.0 && x[1] == n, "%s all_reduce: %g %g", g->name, x[0], x[1]);
    /* reduce_scatter, out of place and in place: element k of rank r's input is r * 1000 + k */
    float *in = xmalloc((size_t)n * C * sizeof(float)), out[3];
    for (int k = 0; k < n * C; k++) in[k] = (float)(me * 1000 + k);
    dist_reduce_scatter(g, in, out, C, DIST_F32, DIST_SUM, DEV_CPU);
    for (int j = 0; j < C; j++)
        CHECK(out[j] == (float)(1000 * n * (n - 1) / 2 + n * (me * C + j)), "%s reduce_scatter", g->name);
    dist_reduce_scatter(g, in, in + me * C, C, DIST_F32, DIST_SUM, DEV_CPU);
    CHECK(!memcmp(in + me * C, out, sizeof out), "%s reduce_scatter in place", g->name);
    /* all_gather, out of place and in place */
    int32_t mine[3] = {me, 10 * me, world_rank}, *all = xmalloc((size_t)n * C * sizeof(int32_t));
    dist_all_gather(g, mine, all, C, DIST_I32, DEV_CPU);
    for (int r = 0; r < n; r++) CHECK(all[r * C] == r && all[r * C + 1] == 10 * r, "%s all_gather", g->name);
    memset(all, 0xff, (size_t)n * C * sizeof(int32_t));
    memcpy(all + me * C, mine, sizeof mine);
    dist_all_gather(g, all + me * C, all, C, DIST_I32, DEV_CPU);
    for (int r = 0; r < n; r++) CHECK(all[r * C] == r && all[r * C + 1] == 10 * r, "%s all_gather in place", g->name);
    /* all_to_all: block r of the input goes to rank r */
    int64_t *a2a = xmalloc(2 * (size_t)n * sizeof(int64_t)), *got = a2a + n;
    for (int r = 0; r < n; r++) a2a[r] = 100 * me + r;
    dist_all_to_all(g, a2a, got, 1, DIST_I64, DEV_CPU);
    for (int r = 0; r < n; r++) CHECK(got[r] == 100 * r + me, "%s all_to_all", g->name);
    /* all_to_allv: rank me sends r + 1 copies of (me, r) to rank r, so it receives me + 1 from each */
    int64_t *sc = xmalloc(4 * (size_t)n * sizeof(int64_t)), *sd = sc + n, *rc = sc + 2 * n, *rd = sc + 3 * n, ns = 0, nr = 0;
    for (int r = 0; r < n; r++) {
        sc[r] = r + 1, sd[r] = ns, ns += sc[r];
        rc[r] = me + 1, rd[r] = nr, nr += rc[r];
    }
    int32_t *sv = xmalloc((size_t)(ns + nr) * sizeof(int32_t)), *rv = sv + ns;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < sc[r]; k++) sv[sd[r] + k] = 100 * me + r;
    dist_all_to_allv(g, sv, sc, sd, rv, rc, rd, DIST_I32, DEV_CPU);
    for (int r = 0; r < n; r++)
        for (int k = 0; k < rc[r]; k++) CHECK(rv[rd[r] + k] == 100 * r + me, "%s all_to_allv", g->name);
    /* broadcast from the last rank; gather to and scatter from it */
    uint64_t b[2] = {(uint64_t)me, 7};
    dist_broadcast(g, b, 2, DIST_U64, n - 1, DEV_CPU);
    CHECK(b[0] == (uint64_t)(n - 1) && b[1] == 7, "%s broadcast", g->name);
    float v = (float)me, *gathered = xmalloc((size_t)n * sizeof(float)), back = -1;
    dist_gather_host(g, &v, gathered, 1, DIST_F32, n - 1);
    if (me == n - 1)
        for (int r = 0; r < n; r++) CHECK(gathered[r] == (float)r, "%s gather", g->name);
    dist_scatter_host(g, gathered, &back, 1, DIST_F32, n - 1);
    CHECK(back == (float)me, "%s scatter", g->name);
    dist_barrier(g);
    free(in), free(all), free(a2a), free(sc), free(sv), free(gathered);
}

/* mpirun -np 4 build/tests/test_dist --collectives DP EP CP: groups of those sizes, every collective */
static int collectives_main(int argc, char **argv) {
    Dist d;
    dist_init(&d, &argc, &argv);
    CHECK(argc == 5, "usage: test_dist --collectives DP EP CP");
    int dp = atoi(argv[2]), ep = atoi(argv[3]), cp = atoi(argv[4]);
    dist_setup(&d, dp, ep, cp, 10.0, DEV_CPU, "test_dist");
    /* the grid: world rank = (dp_index * ep + ep_index) * cp + cp_index, and each group varies one index */
    int dp_i = d.rank / (d.ep * d.cp), ep_i = (d.rank / d.cp) % d.ep, cp_i = d.rank % d.cp;
    CHECK(d.dp_group.size == d.dp && d.dp_group.rank == dp_i, "dp group: rank %d of %d", d.dp_group.rank, d.dp_group.size);
    CHECK(d.ep_group.size == d.ep && d.ep_group.rank == ep_i, "ep group: rank %d of %d", d.ep_group.rank, d.ep_group.size);
    CHECK(d.cp_group.size == d.cp && d.cp_group.rank == cp_i, "cp group: rank %d of %d", d.cp_group.rank, d.cp_group.size);
    /* the world ranks of this rank's dp group are the ones that share its ep and cp indices */
    int32_t w = d.rank, *members = xmalloc((size_t)d.dp * sizeof(int32_t));
    dist_all_gather(&d.dp_group, &w, members, 1, DIST_I32, DEV_CPU);
    for (int r = 0; r < d.dp; r++) CHECK(members[r] == (r * d.ep + ep_i) * d.cp + cp_i, "dp group member %d", r);
    free(members);
    /* the dp*cp group: the ranks that share this rank's ep index, in the order (dp index, cp index) */
    CHECK(d.dp_cp_group.size == d.dp * d.cp && d.dp_cp_group.rank == dp_i * d.cp + cp_i, "dp*cp group: rank %d of %d",
          d.dp_cp_group.rank, d.dp_cp_group.size);
    members = xmalloc((size_t)d.dp * d.cp * sizeof(int32_t));
    dist_all_gather(&d.dp_cp_group, &w, members, 1, DIST_I32, DEV_CPU);
    for (int r = 0; r < d.dp * d.cp; r++)
        CHECK(members[r] == ((r / d.cp) * d.ep + ep_i) * d.cp + r % d.cp, "dp*cp group member %d", r);
    free(members);
    const DistGroup *groups[] = {&d.world, &d.dp_group, &d.ep_group, &d.cp_group, &d.dp_cp_group};
    for (int i = 0; i < 5; i++) check_group_collectives(groups[i], d.rank);
    printf("rank %d: collectives ok (dp %d of %d, ep %d of %d, cp %d of %d)\n", d.rank, dp_i, d.dp, ep_i, d.ep, cp_i,
           d.cp);
    dist_finalize(&d);
    return 0;
}

TEST(collectives_on_every_group) {
    EXPECT(FX->have_mpirun, "no mpirun");
    static const int layouts[][4] = {{2, 0, 1, 1}, {4, 0, 1, 1}, {4, 2, 1, 2}, {4, 1, 2, 2}, {4, 1, 4, 1}};
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        const int *l = layouts[i];
        char cmd[512], o[300], out[8192];
        snprintf(o, sizeof o, "%s/collectives.txt", FX->dir);
        snprintf(cmd, sizeof cmd, "mpirun --oversubscribe -np %d build/tests/test_dist --collectives %d %d %d >%s 2>&1",
                 l[0], l[1], l[2], l[3], o);
        int st = system(cmd);
        read_tail(o, out, sizeof out);
        int ok = 0;
        for (const char *p = out; (p = strstr(p, "collectives ok")); p++) ok++;
        EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0 && ok == l[0], "np %d, dp %d ep %d cp %d: %s", l[0], l[1], l[2],
               l[3], out);
    }
}

/* ---- main ----------------------------------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--collectives")) return collectives_main(argc, argv);
    TEST_BEGIN();
    Fixture fx;
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_test_dist_XXXXXX");
    if (!mkdtemp(fx.dir)) {
        perror("mkdtemp");
        return 1;
    }
    fx.have_mpirun = system("command -v mpirun >/dev/null 2>&1") == 0;
    /* the same arithmetic in every process (one thread each: ranks share the cores), and what mpirun needs
     * here: CI runs as root; containers often forbid the cross-process memory copy of the shared-memory
     * transport (CMA) */
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
    tc->fixture = &fx;
    RUN(sampler_parts_tile_the_global_batch);
    RUN(mpirun_is_available);
    RUN(collectives_on_every_group);
    RUN(one_rank_is_the_plain_process);
    RUN(dp2_equals_single_process);
    RUN(dp4_equals_single_process);
    RUN(dp2_with_grad_accum_and_dropout_equals_single_process);
    RUN(dp2_moe_equals_single_process);
    RUN(dp2_msa_equals_single_process);
    RUN(checkpoint_from_2_ranks_resumes_on_1_and_4);
    RUN(no_two_ranks_read_the_same_sample);
    RUN(failing_rank_ends_the_job_with_its_message);
    RUN(hanging_rank_makes_the_others_time_out);
    RUN(rank_counts_that_do_not_fit_are_refused);
    nftw(fx.dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    TEST_END();
}
