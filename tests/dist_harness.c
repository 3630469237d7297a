/* The harness of the multi-rank tests: see dist_harness.h. */
#include "dist_harness.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../data/h5read.h"

#define HARNESS ((const DistHarness *)tc->fixture)
/* the launcher of np ranks: --oversubscribe, since the tests start more ranks than this machine may
 * have cores (2 in CI) */
#define MPIRUN "mpirun --oversubscribe -np %d "

bool harness_init(DistHarness *h, const char *program, const char *args) {
    snprintf(h->dir, sizeof h->dir, "/tmp/msa_%s_XXXXXX", program);
    if (!mkdtemp(h->dir)) {
        perror("mkdtemp");
        return false;
    }
    h->have_mpirun = system("command -v mpirun >/dev/null 2>&1") == 0;
    h->args = args;
    /* the same arithmetic in every process (one thread each: ranks share the cores), and what mpirun needs
     * here: CI runs as root; containers often forbid the cross-process memory copy of the shared-memory
     * transport (CMA) */
    setenv("OMP_NUM_THREADS", "1", 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
    return true;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

void harness_free(DistHarness *h) { nftw(h->dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

void harness_path(TestCtx *tc, const char *name, char *buf, size_t n) { snprintf(buf, n, "%s/%s", HARNESS->dir, name); }

/* ---- launching ---------------------------------------------------------------------------------- */

/* The last n - 1 bytes of a file (all of a short one), "" without the file: what a failed run printed
 * last is what says why. */
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

RunOutcome harness_train(TestCtx *tc, int np, const char *out_dir, const char *args, const char *env) {
    char cmd[4096], launcher[128] = "", o[512], e[512];
    if (np > 0) snprintf(launcher, sizeof launcher, MPIRUN, np);
    harness_path(tc, "stdout.txt", o, sizeof o);
    harness_path(tc, "stderr.txt", e, sizeof e);
    snprintf(cmd, sizeof cmd, "env %s %s" HARNESS_TRAIN " %s %s%s %s >%s 2>%s", env, launcher, HARNESS->args,
             out_dir ? "--set train.out_dir=" : "", out_dir ? out_dir : "", args, o, e);
    RunOutcome r;
    double t0 = wall_seconds();
    int st = system(cmd);
    r.seconds = wall_seconds() - t0;
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    read_tail(e, r.err, sizeof r.err);
    read_tail(o, r.out, sizeof r.out);
    return r;
}

RunOutcome harness_train_ranks(TestCtx *tc, int n, const char *const *rank_cmds, double timeout_s) {
    char cmd[8192], o[512], e[512];
    harness_path(tc, "stdout.txt", o, sizeof o);
    harness_path(tc, "stderr.txt", e, sizeof e);
    /* TERM first: mpirun passes it on to the ranks it started, and is killed 5 s later if it is stuck too */
    int len = snprintf(cmd, sizeof cmd, "timeout -k 5 %g mpirun --oversubscribe", timeout_s);
    for (int i = 0; i < n; i++) len += snprintf(cmd + len, sizeof cmd - (size_t)len, "%s -np 1 %s", i ? " :" : "", rank_cmds[i]);
    snprintf(cmd + len, sizeof cmd - (size_t)len, " >%s 2>%s", o, e);
    RunOutcome r;
    double t0 = wall_seconds();
    int st = system(cmd);
    r.seconds = wall_seconds() - t0;
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    read_tail(e, r.err, sizeof r.err);
    read_tail(o, r.out, sizeof r.out);
    return r;
}

bool harness_run_into(TestCtx *tc, const char *name, int np, const char *args, char *dir, size_t n) {
    harness_path(tc, name, dir, n);
    char done[600];
    snprintf(done, sizeof done, "%s/ckpt_00000010.h5", dir);
    if (access(done, F_OK) == 0) return true;
    RunOutcome o = harness_train(tc, np, dir, args, "");
    if (o.status != 0) printf("    %s (np %d) exited with %d:\n%s\n", name, np, o.status, o.err);
    return o.status == 0;
}

RunOutcome harness_resume(TestCtx *tc, const char *from_dir, int np, const char *args, char *dir, size_t n) {
    char name[64], cmd[2048], resume[1024];
    snprintf(name, sizeof name, "resume_on_%d", np);
    harness_path(tc, name, dir, n);
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s/ckpt_00000005.h5 %s/", dir, from_dir, dir);
    if (system(cmd) != 0) {
        RunOutcome r = {.status = -1};
        snprintf(r.err, sizeof r.err, "%s failed", cmd);
        return r;
    }
    snprintf(resume, sizeof resume, "--resume %s", args);
    return harness_train(tc, np, dir, resume, "");
}

bool harness_run_ranks(TestCtx *tc, int np, const char *cmd, const char *ok_word, char *out, size_t n) {
    char line[1024], o[300];
    harness_path(tc, "ranks.txt", o, sizeof o);
    snprintf(line, sizeof line, MPIRUN "%s >%s 2>&1", np, cmd, o);
    int st = system(line);
    read_tail(o, out, n);
    int ok = 0;
    for (const char *p = out; (p = strstr(p, ok_word)); p++) ok++;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 && ok == np;
}

/* ---- what a run leaves: metrics.jsonl and the checkpoints --------------------------------------- */

static double number_after(const char *line, const char *key) {
    const char *p = strstr(line, key);
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

RunMetrics harness_read_metrics(const char *run_dir) {
    RunMetrics m = {.n = 0, .val_loss = NAN, .val_kl = NAN, .val_recall = NAN, .val_dense = NAN};
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
        } else if (strstr(line, "\"loss\"") && m.n < HARNESS_MAX_STEPS) {
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

StepDiff harness_compare_steps(const RunMetrics *a, const RunMetrics *b, int from) {
    StepDiff d = {0, 0, 0, 0};
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

/* A float dataset of any shape (NULL when absent or not one). */
static float *read_dataset(H5Reader *rd, hid_t g, const char *name, int64_t *n) {
    const H5DatasetSpec spec = {.mem_type = H5T_NATIVE_FLOAT, .ndim = -1};
    H5Shape shape;
    void *buf = NULL;
    if (h5r_dataset_read(rd, g, name, &spec, true, &shape, &buf) != 1) return NULL;
    *n = shape.numel;
    return buf;
}

TensorDiff harness_compare_group(const char *file_a, const char *file_b, const char *gname) {
    TensorDiff df = {0, 0, 0, false};
    H5Reader ra, rb; /* without exit_on_error: an absent group or file is an answer (ok = false) */
    bool open_a = h5r_open(&ra, file_a, "checkpoint", NULL, false), open_b = h5r_open(&rb, file_b, "checkpoint", NULL, false);
    hid_t ga = open_a ? H5Gopen2(ra.file, gname, H5P_DEFAULT) : -1, gb = open_b ? H5Gopen2(rb.file, gname, H5P_DEFAULT) : -1;
    H5G_info_t ia, ib;
    if (ga >= 0 && gb >= 0 && H5Gget_info(ga, &ia) >= 0 && H5Gget_info(gb, &ib) >= 0 && ia.nlinks == ib.nlinks &&
        ia.nlinks > 0) {
        df.ok = true;
        for (hsize_t i = 0; i < ia.nlinks && df.ok; i++) {
            char name[256];
            H5Lget_name_by_idx(ga, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
            int64_t na = 0, nb = 0;
            float *a = read_dataset(&ra, ga, name, &na), *b = read_dataset(&rb, gb, name, &nb);
            if (!a || !b || na != nb) df.ok = false;
            else {
                double d2 = 0, a2 = 0;
                for (int64_t k = 0; k < na; k++) {
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
    h5r_close(&ra);
    h5r_close(&rb);
    return df;
}

long long harness_ckpt_attr(const char *file, const char *name) {
    H5Reader rd;
    int64_t v = -1;
    if (!h5r_open(&rd, file, "checkpoint", NULL, false)) return -1;
    if (h5r_attr_int(&rd, rd.file, name, true, INT64_MIN, INT64_MAX, &v) != 1) v = -1;
    h5r_close(&rd);
    return v;
}

int harness_ckpt_dims(const char *file, const char *name, int64_t *dims, int max_dims) {
    H5Reader rd;
    if (!h5r_open(&rd, file, "checkpoint", NULL, false)) return 0;
    const H5DatasetSpec spec = {.mem_type = H5T_NATIVE_FLOAT, .ndim = -1};
    H5Shape shape = {0};
    hid_t d;
    if (h5r_dataset_open(&rd, rd.file, name, &spec, true, H5P_DEFAULT, &d, &shape) == 1) H5Dclose(d);
    h5r_close(&rd);
    for (int i = 0; i < shape.ndim && i < max_dims; i++) dims[i] = shape.dims[i];
    return shape.ndim;
}

/* |a - b|, 0 when both are absent (NAN): a run without MSA logs no KL or recall */
static double diff_or_0(double a, double b) { return isnan(a) && isnan(b) ? 0.0 : fabs(a - b); }

RunDiff harness_compare_runs(const char *a_dir, const char *b_dir, int from) {
    RunDiff d;
    d.a = harness_read_metrics(a_dir);
    d.b = harness_read_metrics(b_dir);
    d.steps = harness_compare_steps(&d.a, &d.b, from);
    d.val_loss = diff_or_0(d.a.val_loss, d.b.val_loss);
    d.val_kl = diff_or_0(d.a.val_kl, d.b.val_kl);
    d.val_recall = diff_or_0(d.a.val_recall, d.b.val_recall);
    d.val_dense = diff_or_0(d.a.val_dense, d.b.val_dense);
    snprintf(d.ckpt_a, sizeof d.ckpt_a, "%s/ckpt_00000010.h5", a_dir);
    snprintf(d.ckpt_b, sizeof d.ckpt_b, "%s/ckpt_00000010.h5", b_dir);
    d.params = harness_compare_group(d.ckpt_a, d.ckpt_b, "params");
    d.m = harness_compare_group(d.ckpt_a, d.ckpt_b, "optimizer/m");
    d.v = harness_compare_group(d.ckpt_a, d.ckpt_b, "optimizer/v");
    d.state = harness_compare_group(d.ckpt_a, d.ckpt_b, "state");
    return d;
}

/* ---- checks ------------------------------------------------------------------------------------- */

void harness_run_pair(TestCtx *tc, const char *ref_name, const char *ref_args, const char *name, int np,
                      const char *args, RunDiff *d) {
    char single[512], multi[512], name2[128];
    snprintf(name2, sizeof name2, "%s_np%d", name, np);
    EXPECT(harness_run_into(tc, ref_name, 0, ref_args, single, sizeof single), "single-process run failed");
    EXPECT(harness_run_into(tc, name2, np, args, multi, sizeof multi), "%d-rank run failed", np);
    *d = harness_compare_runs(single, multi, 0);
}

void harness_expect_same_training(TestCtx *tc, const RunDiff *d, unsigned checks) {
    const StepDiff *s = &d->steps;
    const TensorDiff *p = &d->params, *m = &d->m, *v = &d->v;
    EXPECT(d->a.n == 10 && s->common == 10, "logged steps: %d single, %d common", d->a.n, s->common);
    if (checks & HARNESS_CHECK_EVAL) {
        EXPECT(s->loss <= HARNESS_LOSS_TOL && s->aux <= HARNESS_LOSS_TOL && s->grad_norm <= HARNESS_LOSS_TOL,
               "losses differ by %g, KL by %g, gradient norms by %g", s->loss, s->aux, s->grad_norm);
        EXPECT(!isnan(d->a.val_loss) && d->val_loss <= HARNESS_LOSS_TOL && d->val_kl <= HARNESS_LOSS_TOL &&
                   d->val_recall <= HARNESS_LOSS_TOL && d->val_dense <= HARNESS_LOSS_TOL,
               "eval: loss %.6f vs %.6f, kl by %g, recall by %g, dense loss by %g", d->a.val_loss, d->b.val_loss,
               d->val_kl, d->val_recall, d->val_dense);
    } else {
        EXPECT(s->loss <= HARNESS_LOSS_TOL && s->grad_norm <= HARNESS_LOSS_TOL,
               "losses differ by %g, gradient norms by %g", s->loss, s->grad_norm);
        EXPECT(fabs(d->a.val_loss - d->b.val_loss) <= HARNESS_LOSS_TOL, "val loss %.6f vs %.6f", d->a.val_loss,
               d->b.val_loss);
    }
    bool state = checks & HARNESS_CHECK_STATE;
    EXPECT(p->ok && m->ok && v->ok && (!state || d->state.ok), "cannot compare the checkpoints %s and %s", d->ckpt_a,
           d->ckpt_b);
    EXPECT(p->max_abs <= HARNESS_PARAM_ABS_TOL && p->max_rel <= HARNESS_PARAM_REL_TOL,
           "parameters differ: max %g, rel %g", p->max_abs, p->max_rel);
    EXPECT(m->max_rel <= HARNESS_MOMENT_REL_TOL && v->max_rel <= HARNESS_MOMENT_REL_TOL, "moments differ: m %g, v %g",
           m->max_rel, v->max_rel);
    /* the biases move by sign steps of the summed loads (layers/moe.h): equal loads, equal biases */
    if (state) EXPECT(d->state.max_abs == 0, "MoE selection biases differ by %g", d->state.max_abs);
    if (checks & HARNESS_CHECK_COUNTER)
        EXPECT(harness_ckpt_attr(d->ckpt_a, "data_counter") == harness_ckpt_attr(d->ckpt_b, "data_counter"),
               "data counters differ");
}

void harness_expect_resumed(TestCtx *tc, const RunDiff *d, bool train_state) {
    const StepDiff *s = &d->steps;
    const TensorDiff *p = &d->params, *v = &d->v;
    EXPECT(s->common == 5 && s->loss <= HARNESS_LOSS_TOL && s->grad_norm <= HARNESS_LOSS_TOL,
           "steps 6-10: %d steps, loss %g, grad norm %g", s->common, s->loss, s->grad_norm);
    EXPECT(p->ok && p->max_abs <= HARNESS_PARAM_ABS_TOL && p->max_rel <= HARNESS_PARAM_REL_TOL,
           "parameters: %g (rel %g)", p->max_abs, p->max_rel);
    EXPECT(v->ok && v->max_rel <= HARNESS_MOMENT_REL_TOL, "second moments: rel %g", v->max_rel);
    if (train_state)
        EXPECT(harness_ckpt_attr(d->ckpt_b, "data_counter") == harness_ckpt_attr(d->ckpt_a, "data_counter") &&
                   harness_ckpt_attr(d->ckpt_b, "adam_t") == 10,
               "train state: counter %lld vs %lld, adam_t %lld", harness_ckpt_attr(d->ckpt_b, "data_counter"),
               harness_ckpt_attr(d->ckpt_a, "data_counter"), harness_ckpt_attr(d->ckpt_b, "adam_t"));
}
