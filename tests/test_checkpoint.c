/* Checkpoints and resuming: a resumed run continues bit-for-bit (dense, MoE with its selection bias,
 * gradient accumulation, MSA across the dense warm-up boundary); a crash mid-write leaves the previous
 * checkpoint and nothing half-written taken for one; keep_checkpoints; bad files stop with a message
 * naming the file and the tensor and change no file; init_from turns a dense checkpoint into an MSA
 * model; SIGTERM stops a run with a checkpoint that resumes; train.save_best keeps the weights of the
 * lowest eval in ckpt_best.h5, across --resume, never pruned and never resumed from.
 * Run from the repository root after `make data` (make test does both); it runs build/train too. */
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hdf5.h>

#include "../data/crc32.h"
#include "../data/h5read.h"
#include "../train/checkpoint.h"
#include "../train/trainer.h"
#include "gradcheck.h"
#include "test.h"

#define TINY "configs/tiny.json"
/* small batches: these tests are about state, not learning */
#define TINY_SET "--set train.batch_size=4 --set train.eval_batches=2 --set train.log_every=1"

typedef enum { DENSE, MOE, ACCUM, MSA } Variant;
static const char *const VARIANT_NAME[] = {"dense", "moe", "grad_accum 2", "msa"};

static void tiny_config(RunConfig *c, const char *out_dir, Variant v, int steps) {
    config_defaults(c);
    config_load(c, TINY);
    c->train.batch_size = 4;
    c->train.eval_batches = 2;
    c->train.steps = steps;
    snprintf(c->train.out_dir, sizeof c->train.out_dir, "%s", out_dir ? out_dir : "");
    if (v == MOE) {
        snprintf(c->model.ffn, sizeof c->model.ffn, "moe");
        c->moe.num_experts = 4;
        c->moe.experts_per_token = 2;
        c->moe.expert_dim = 32;
        c->moe.shared_experts = 1;
        c->moe.bias_update_rate = 0.01f; /* so the selection bias moves and must be restored */
    }
    if (v == ACCUM) c->train.grad_accum = 2;
    if (v == MSA) {
        snprintf(c->model.attention, sizeof c->model.attention, "msa");
        c->msa.block_size = 8;
        c->msa.topk_blocks = 3;
        c->msa.index_dim = 16;
        c->msa.dense_warmup_steps = 13; /* the switch to sparse selection happens after the resume */
    }
}

static void start(Run *r, const RunConfig *c) {
    memset(r, 0, sizeof *r);
    r->quiet = true;
    r->cfg = *c;
    r->config_path = TINY;
    run_init(r);
}

/* ---- files and processes ---------------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void make_temp_dir(char *dir, size_t n) {
    snprintf(dir, n, "/tmp/msa_ckpt_test_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
}

static void remove_tree(const char *dir) { nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, n, f);
    fclose(f);
}

static void copy_file(const char *from, const char *to, double fraction) {
    size_t n;
    char *buf = test_read_file(from, &n);
    write_bytes(to, buf, (size_t)(n * fraction));
    free(buf);
}

static bool same_bytes(const char *a, const char *b) {
    size_t na, nb;
    char *x = test_read_file(a, &na), *y = test_read_file(b, &nb);
    bool same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Names of the entries of dir that start with "ckpt_", sorted, joined by spaces. */
static void list_ckpt_files(const char *dir, char *out, size_t n) {
    struct dirent **names;
    int k = scandir(dir, &names, NULL, alphasort);
    out[0] = 0;
    for (int i = 0; i < k; i++) {
        if (!strncmp(names[i]->d_name, "ckpt_", 5))
            snprintf(out + strlen(out), n - strlen(out), "%s%s", out[0] ? " " : "", names[i]->d_name);
        free(names[i]);
    }
    if (k >= 0) free(names);
}

static int wait_for(pid_t pid) {
    int st;
    waitpid(pid, &st, 0);
    return st;
}

/* Run build/train to the end; its exit status (-signal when killed); its output in out. */
static int train_cli(const char *args, const char *env_kv, char *out, size_t n) {
    char log[64];
    snprintf(log, sizeof log, "/tmp/msa_ckpt_test_out_%d.txt", (int)getpid());
    int st = wait_for(test_spawn_train(args, env_kv, log));
    size_t len;
    char *text = test_read_file(log, &len);
    snprintf(out, n, "%s", text ? text : "");
    free(text);
    unlink(log);
    return WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? -WTERMSIG(st) : -1000;
}

/* Run fn(arg) in a forked child (a fatal error exits it, not the test); its exit status and stderr. */
typedef void (*ChildFn)(void *arg);
static int in_child(ChildFn fn, void *arg, char *err, size_t n) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        fn(arg);
        exit(0);
    }
    close(fds[1]);
    size_t k = 0;
    ssize_t got;
    char sink[256];
    for (;;) { /* keep what fits, drain the rest so the child never blocks on a full pipe */
        bool room = k + 1 < n;
        got = read(fds[0], room ? err + k : sink, room ? n - 1 - k : sizeof sink);
        if (got <= 0) break;
        if (room) k += (size_t)got;
    }
    err[k] = 0;
    close(fds[0]);
    int st = wait_for(pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ---- snapshots of a run's state --------------------------------------------------------------- */

typedef struct Snapshot {
    size_t bytes;
    char *params, *m, *v;
    float *bias; /* all MoE layers' biases laid end to end */
    int n_bias, adam_t;
} Snapshot;

static Snapshot snapshot(const Run *r) {
    const ParamStore *ps = &r->model.params;
    Snapshot s = {.bytes = (size_t)ps->numel * dtype_size(ps->dtype), .adam_t = r->opt.t};
    s.params = malloc(s.bytes);
    s.m = malloc(s.bytes);
    s.v = malloc(s.bytes);
    ps->be->copy_to_host(s.params, ps->data, s.bytes);
    ps->be->copy_to_host(s.m, r->opt.m, s.bytes);
    ps->be->copy_to_host(s.v, r->opt.v, s.bytes);
    s.bias = malloc(sizeof(float) * 1024);
    for (int l = 0; l < r->model.cfg.n_layers; l++) {
        const MoeLayer *ml = moe_layer_of(&r->model.layers[l].ffn);
        if (!ml) continue;
        moe_bias_to_host(&ml->p, s.bias + s.n_bias);
        s.n_bias += ml->p.num_experts;
    }
    return s;
}

static void snapshot_free(Snapshot *s) {
    free(s->params);
    free(s->m);
    free(s->v);
    free(s->bias);
}

/* ---- tests ------------------------------------------------------------------------------------ */

/* 20 steps straight vs 10 steps, checkpoint, a fresh process-like Run resuming, 10 more. */
static void resume_is_bit_for_bit(TestCtx *tc, Variant v) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    double straight[20], resumed[20];
    Run r;

    tiny_config(&c, NULL, v, 20);
    start(&r, &c);
    for (int s = 0; s < 20; s++) straight[s] = run_step(&r).loss;
    Snapshot want = snapshot(&r);
    run_free(&r);

    tiny_config(&c, dir, v, 20);
    start(&r, &c);
    for (int s = 0; s < 10; s++) resumed[s] = run_step(&r).loss;
    run_checkpoint(&r);
    run_free(&r);

    c.train.resume = true;
    start(&r, &c);
    int at = r.step;
    for (int s = 10; s < 20; s++) resumed[s] = run_step(&r).loss;
    Snapshot got = snapshot(&r);
    run_free(&r);
    remove_tree(dir);

    bool bias_moved = false;
    for (int i = 0; i < want.n_bias; i++) bias_moved = bias_moved || want.bias[i] != 0.0f;
    bool losses_same = memcmp(straight, resumed, sizeof straight) == 0,
         params_same = !memcmp(want.params, got.params, want.bytes),
         moments_same = !memcmp(want.m, got.m, want.bytes) && !memcmp(want.v, got.v, want.bytes),
         bias_same = want.n_bias == got.n_bias && !memcmp(want.bias, got.bias, sizeof(float) * (size_t)want.n_bias),
         adam_same = want.adam_t == got.adam_t;
    int first_diff = -1;
    for (int s = 0; s < 20 && first_diff < 0; s++)
        if (straight[s] != resumed[s]) first_diff = s;
    snapshot_free(&want);
    snapshot_free(&got);
    printf("    %s: resumed at step %d, losses 11..20 %s\n", VARIANT_NAME[v], at, losses_same ? "identical" : "differ");
    EXPECT(at == 10, "%s: the resumed run starts at step %d, not 10", VARIANT_NAME[v], at);
    EXPECT(losses_same, "%s: losses differ from step %d on (%.9g vs %.9g)", VARIANT_NAME[v], first_diff + 1,
           straight[first_diff], resumed[first_diff]);
    EXPECT(params_same, "%s: final parameters differ", VARIANT_NAME[v]);
    EXPECT(moments_same && adam_same, "%s: optimizer state differs", VARIANT_NAME[v]);
    EXPECT(bias_same, "%s: MoE selection biases differ", VARIANT_NAME[v]);
    EXPECT(v != MOE || bias_moved, "moe: the selection bias never moved, so the test proves nothing about it");
}

TEST(resume_dense_bit_for_bit) { resume_is_bit_for_bit(tc, DENSE); }
TEST(resume_moe_bit_for_bit) { resume_is_bit_for_bit(tc, MOE); }
TEST(resume_grad_accum_bit_for_bit) { resume_is_bit_for_bit(tc, ACCUM); }
TEST(resume_msa_bit_for_bit) { resume_is_bit_for_bit(tc, MSA); }

/* Loads a checkpoint into a model built from c; returns the parameter values (malloc'd). */
static char *load_params(const RunConfig *c, const char *path, size_t *bytes) {
    RunConfig cc = *c;
    cc.model.vocab_size = 65;
    Model m;
    model_build(&m, &cc, &cpu_backend, DT_F32, cc.train.seed);
    checkpoint_read_params(path, &m, false);
    *bytes = (size_t)m.params.numel * sizeof(float);
    char *out = malloc(*bytes);
    memcpy(out, m.params.data, *bytes);
    model_free(&m);
    return out;
}

TEST(crash_during_write_keeps_previous_checkpoint) {
    char ref[64], dir[64], args[1024], out[8192], path[256], tmp[256];
    make_temp_dir(ref, sizeof ref);
    make_temp_dir(dir, sizeof dir);
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=20 --set train.checkpoint_every=10 --set train.out_dir=%s", ref);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "reference run: status %d: %s", rc, out);

    /* the test hook kills the process (SIGKILL) in the middle of writing ckpt_20 */
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=20 --set train.checkpoint_every=10 --set train.out_dir=%s", dir);
    rc = train_cli(args, "MSA_CKPT_TEST_KILL_AFTER_PARAMS=20", out, sizeof out);
    EXPECT(rc == -SIGKILL, "the run with the crash hook ended with status %d, not killed: %s", rc, out);
    snprintf(path, sizeof path, "%s/ckpt_00000020.h5", dir);
    snprintf(tmp, sizeof tmp, "%s/ckpt_00000020.h5.tmp", dir);
    EXPECT(!file_exists(path), "a checkpoint appeared although its write was killed");
    EXPECT(file_exists(tmp), "no half-written %s: the hook did not fire where expected", tmp);
    snprintf(path, sizeof path, "%s/ckpt_00000010.h5", dir);
    EXPECT(file_exists(path), "the previous checkpoint is gone");

    /* --resume ignores the .tmp and continues from ckpt_10, ending where the uninterrupted run ended */
    snprintf(args + strlen(args), sizeof args - strlen(args), " --resume");
    rc = train_cli(args, NULL, out, sizeof out);
    snprintf(path, sizeof path, "resumed from %s/ckpt_00000010.h5 at step 10", dir);
    EXPECT(rc == 0 && strstr(out, path), "resume after the crash: status %d: %s", rc, out);
    EXPECT(!file_exists(tmp), "the half-written file was not cleaned up");
    RunConfig c;
    tiny_config(&c, NULL, DENSE, 20);
    size_t na, nb;
    snprintf(path, sizeof path, "%s/ckpt_00000020.h5", ref);
    char *a = load_params(&c, path, &na);
    snprintf(path, sizeof path, "%s/ckpt_00000020.h5", dir);
    char *b = load_params(&c, path, &nb);
    bool same = na == nb && !memcmp(a, b, na);
    free(a);
    free(b);
    remove_tree(ref);
    remove_tree(dir);
    EXPECT(same, "crash + resume ended with other parameters than the uninterrupted run");
}

TEST(keep_checkpoints_keeps_the_newest) {
    char dir[64], list[1024];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    tiny_config(&c, dir, DENSE, 10);
    c.train.checkpoint_every = 2;
    c.train.keep_checkpoints = 3;
    Run r;
    start(&r, &c);
    run_train(&r);
    run_free(&r);
    list_ckpt_files(dir, list, sizeof list);
    remove_tree(dir);
    EXPECT(!strcmp(list, "ckpt_00000006.h5 ckpt_00000008.h5 ckpt_00000010.h5"), "out_dir holds: %s", list);

    make_temp_dir(dir, sizeof dir);
    tiny_config(&c, dir, DENSE, 6);
    c.train.checkpoint_every = 2;
    c.train.keep_checkpoints = 0; /* all */
    start(&r, &c);
    run_train(&r);
    run_free(&r);
    list_ckpt_files(dir, list, sizeof list);
    remove_tree(dir);
    EXPECT(!strcmp(list, "ckpt_00000002.h5 ckpt_00000004.h5 ckpt_00000006.h5"), "keep_checkpoints 0: %s", list);
}

/* ---- bad files -------------------------------------------------------------------------------- */

/* HDF5 surgery on a copy of a good checkpoint. */
static void replace_dataset(const char *path, const char *name, int ndim, const hsize_t *dims) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (H5Lexists(f, name, H5P_DEFAULT) > 0) H5Ldelete(f, name, H5P_DEFAULT);
    if (ndim > 0) {
        hid_t space = H5Screate_simple(ndim, dims, NULL);
        hid_t d = H5Dcreate2(f, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5Dclose(d);
        H5Sclose(space);
    }
    H5Fclose(f);
}

typedef struct ReadJob {
    const char *path;
    Model *model;
    AdamW *opt;
    bool state; /* checkpoint_read_state instead of _params */
    bool allow_missing_index;
} ReadJob;

static void read_job(void *arg) {
    ReadJob *j = arg;
    if (j->state) {
        TrainState st;
        checkpoint_read_state(j->path, j->model, j->opt, &st);
    } else checkpoint_read_params(j->path, j->model, j->allow_missing_index);
}

/* Expect the read of path to exit 1 with a message naming the file and every word of `words`. */
static bool read_fails(TestCtx *tc, Model *m, AdamW *opt, bool state, const char *path, const char *w1, const char *w2) {
    char err[2048];
    ReadJob job = {.path = path, .model = m, .opt = opt, .state = state};
    int rc = in_child(read_job, &job, err, sizeof err);
    if (rc != 1 || !strstr(err, path) || !strstr(err, "error: ") || (w1 && !strstr(err, w1)) ||
        (w2 && !strstr(err, w2))) {
        printf("    FAIL reading %s: status %d, message: %s\n", path, rc, err);
        tc->current_failed = 1;
        return false;
    }
    printf("    %s\n", strchr(err, '\n') ? (*strchr(err, '\n') = 0, err) : err);
    return true;
}

TEST(bad_checkpoints_stop_with_a_message_and_change_nothing) {
    char dir[64], good[256];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    tiny_config(&c, dir, DENSE, 2);
    Run r;
    start(&r, &c);
    run_step(&r);
    run_step(&r);
    snprintf(good, sizeof good, "%s", run_checkpoint(&r));
    Model *m = &r.model;
    AdamW *opt = &r.opt;

    size_t gn;
    char *good_bytes = test_read_file(good, &gn);
    const char *names[] = {"truncated", "garbage", "shape", "missing", "extra", "no_moment", "not_ours", "soft_link"};
    char paths[8][256];
    for (int i = 0; i < 8; i++) snprintf(paths[i], sizeof paths[i], "%s/%s.h5", dir, names[i]);
    copy_file(good, paths[0], 0.6);
    write_bytes(paths[1], "this is not a checkpoint\n", 25);
    copy_file(good, paths[2], 1.0);
    replace_dataset(paths[2], "params/layers.0.attn.wq", 2, (hsize_t[]){32, 64});
    copy_file(good, paths[3], 1.0);
    replace_dataset(paths[3], "params/layers.1.ffn.w_up", 0, NULL);
    copy_file(good, paths[4], 1.0);
    replace_dataset(paths[4], "params/layers.7.attn.wq", 1, (hsize_t[]){4});
    copy_file(good, paths[5], 1.0);
    replace_dataset(paths[5], "optimizer/v/final_norm", 0, NULL);
    copy_file(c.data.val_path, paths[6], 1.0);
    copy_file(good, paths[7], 1.0); /* a tensor that is a soft link to another tensor of the same shape */
    hid_t f = H5Fopen(paths[7], H5F_ACC_RDWR, H5P_DEFAULT);
    H5Ldelete(f, "params/layers.1.attn.wq", H5P_DEFAULT);
    H5Lcreate_soft("/params/layers.0.attn.wq", f, "params/layers.1.attn.wq", H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
    size_t sizes[8];
    char *before[8];
    for (int i = 0; i < 8; i++) before[i] = test_read_file(paths[i], &sizes[i]);

    read_fails(tc, m, opt, false, paths[0], "truncated", NULL);
    read_fails(tc, m, opt, false, paths[1], "not an HDF5 file", NULL);
    if (read_fails(tc, m, opt, false, paths[2], "params/layers.0.attn.wq", "[32, 64]"))
        read_fails(tc, m, opt, false, paths[2], "[64, 64]", "shape mismatch");
    read_fails(tc, m, opt, false, paths[3], "missing tensor params/layers.1.ffn.w_up", "[160, 64]");
    read_fails(tc, m, opt, false, paths[4], "unexpected tensor params/layers.7.attn.wq", NULL);
    read_fails(tc, m, opt, true, paths[5], "missing tensor optimizer/v/final_norm", NULL);
    read_fails(tc, m, opt, false, paths[6], "not an msa-train checkpoint", NULL);
    read_fails(tc, m, opt, false, paths[7], "params/layers.1.attn.wq", "soft or external link");
    run_free(&r);

    bool untouched = true;
    for (int i = 0; i < 8; i++) {
        size_t n;
        char *now = test_read_file(paths[i], &n);
        if (!now || n != sizes[i] || memcmp(now, before[i], n)) {
            printf("    %s changed\n", paths[i]);
            untouched = false;
        }
        free(now);
        free(before[i]);
    }
    size_t n;
    char *now = test_read_file(good, &n);
    untouched = untouched && n == gn && !memcmp(now, good_bytes, n);
    free(now);
    free(good_bytes);
    EXPECT(untouched, "a failed read changed a file");
    remove_tree(dir);
}

/* The program: when no checkpoint in out_dir verifies, --resume stops naming each one and why and changes
 * no file; a fresh run refuses an out_dir with checkpoints; a shape key change stops the resume naming
 * the key; init_from a damaged checkpoint stops naming it. */
TEST(train_program_refuses_bad_checkpoints_without_touching_files) {
    char dir[64], args[1024], out[8192], p10[256], p20[256], metrics[256], cfg[256];
    make_temp_dir(dir, sizeof dir);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=10 --set train.out_dir=%s", dir);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "first run: status %d: %s", rc, out);
    snprintf(p10, sizeof p10, "%s/ckpt_00000010.h5", dir);
    snprintf(p20, sizeof p20, "%s/ckpt_00000020.h5", dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    copy_file(p10, p20, 0.5); /* a newest checkpoint damaged on disk */
    char keep[4][256];
    const char *files[4] = {p10, p20, metrics, cfg};
    for (int i = 0; i < 4; i++) {
        snprintf(keep[i], sizeof keep[i], "%s.orig", files[i]);
        copy_file(files[i], keep[i], 1.0);
    }

    /* the damaged one alone: nothing verifies (with ckpt_10 there, --resume takes it: the next test) */
    unlink(p10);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=30 --set train.out_dir=%s --resume", dir);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, p20) && strstr(out, "truncated") && strstr(out, "none of the 1 checkpoint"),
           "resume from a damaged checkpoint: status %d: %s", rc, out);
    copy_file(keep[0], p10, 1.0);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.out_dir=%s", dir);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "train.out_dir") && strstr(out, "--resume"),
           "fresh run into a run directory: status %d: %s", rc, out);
    unlink(p20);
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=30 --set model.ffn_dim=96 --set train.out_dir=%s --resume", dir);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "model.ffn_dim") && strstr(out, p10), "resume with another shape: status %d: %s", rc,
           out);
    copy_file(keep[1], p20, 1.0);
    for (int i = 0; i < 4; i++) EXPECT(same_bytes(files[i], keep[i]), "%s changed", files[i]);

    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.init_from=%s", p20);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, p20), "init_from a damaged checkpoint: status %d: %s", rc, out);
    rc = train_cli(TINY " --set train.checkpoint_every=5", NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "train.out_dir"), "checkpoint_every without out_dir: status %d: %s", rc, out);
    rc = train_cli(TINY " --resume", NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "train.out_dir"), "--resume without out_dir: status %d: %s", rc, out);
    remove_tree(dir);
}

/* ---- verification: checksums, finite values, checked attributes ------------------------------- */

/* Run the program prog with the words of args (single spaces), its stdout and stderr into out, under a
 * file size limit of fsize_limit bytes (0 = none). Its exit status, or -N when signal N killed it. */
static int run_program(const char *prog, const char *args, long fsize_limit, char *out, size_t n) {
    char buf[2048], *argv[64];
    int argc = 0;
    snprintf(buf, sizeof buf, "%s", args);
    argv[argc++] = (char *)prog;
    for (char *w = strtok(buf, " "); w && argc < 63; w = strtok(NULL, " ")) argv[argc++] = w;
    argv[argc] = NULL;
    return test_run_program(argv, fsize_limit, out, n);
}

/* Flip the bits `mask` of byte `byte` of dataset name's data in the file itself, as a bad sector or a
 * bad write would: our writer's datasets are contiguous, at the offset HDF5 reports. */
static bool flip_byte(const char *path, const char *name, long byte, unsigned char mask) {
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = f >= 0 ? H5Dopen2(f, name, H5P_DEFAULT) : -1;
    haddr_t at = d >= 0 ? H5Dget_offset(d) : HADDR_UNDEF;
    if (d >= 0) H5Dclose(d);
    if (f >= 0) H5Fclose(f);
    int fd = open(path, O_RDWR);
    unsigned char b;
    bool ok = at != HADDR_UNDEF && fd >= 0 && pread(fd, &b, 1, (off_t)(at + byte)) == 1;
    b ^= mask;
    ok = ok && pwrite(fd, &b, 1, (off_t)(at + byte)) == 1;
    if (fd >= 0) close(fd);
    return ok;
}

/* Set element i of the float dataset name to v and its crc32 to match the new values: a file whose
 * checksums hold but whose values are not finite, as a run that had diverged would write it. */
static bool set_value(const char *path, const char *name, int64_t i, float v) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t d = f >= 0 ? H5Dopen2(f, name, H5P_DEFAULT) : -1, sp = d >= 0 ? H5Dget_space(d) : -1;
    int64_t n = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : 0;
    float *x = calloc((size_t)n + 1, sizeof(float));
    bool ok = n > i && H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x) >= 0;
    x[i] = v;
    uint32_t crc = crc32_update(0, x, (size_t)n * sizeof(float));
    ok = ok && H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x) >= 0;
    hid_t a = ok ? H5Aopen(d, "crc32", H5P_DEFAULT) : -1;
    ok = a >= 0 && H5Awrite(a, H5T_NATIVE_UINT32, &crc) >= 0;
    if (a >= 0) H5Aclose(a);
    free(x);
    if (sp >= 0) H5Sclose(sp);
    if (d >= 0) H5Dclose(d);
    if (f >= 0) H5Fclose(f);
    return ok;
}

/* Replace the root attribute name with an array of n elements of type (an integer or a float type): what
 * a broken or hostile writer may leave where a scalar belongs. HDF5 writes all n into the reader's
 * buffer, so before the checked reader n = 2 overwrote a neighbour on the stack and n = 1000 crashed. */
static bool array_attr(const char *path, const char *name, hid_t type, int n) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (f < 0) return false;
    if (H5Aexists(f, name) > 0) H5Adelete(f, name);
    hsize_t dims[1] = {(hsize_t)n};
    hid_t sp = H5Screate_simple(1, dims, NULL), a = H5Acreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    double *v = calloc((size_t)n, sizeof(double)); /* zeros of any 8-byte type */
    bool ok = a >= 0 && H5Awrite(a, H5Tget_class(type) == H5T_FLOAT ? H5T_NATIVE_DOUBLE : H5T_NATIVE_INT64, v) >= 0;
    free(v);
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return H5Fclose(f) >= 0 && ok;
}

/* One flipped bit in a moment of the newest checkpoint: --resume says it skips that file naming the
 * tensor and the checksum, resumes from the one before, and keep_checkpoints = 1 never counts the bad
 * file as the one to keep (it deleted the good ones before); going on to the bad file's step replaces it
 * with the parameters of the uninterrupted run. The LR is constant after the warm-up (min_lr = lr), so
 * that runs of different train.steps train alike. */
TEST(resume_skips_a_checkpoint_that_does_not_verify) {
    char ref[64], dir[64], args[1024], p10[256], p14[256], p20[256], want[300], list[1024], why[1024];
    static char out[65536];
    const char *tensor = "optimizer/m/layers.1.ffn.w_up", *common = TINY " " TINY_SET " --set optim.min_lr=0.004";
    make_temp_dir(ref, sizeof ref);
    make_temp_dir(dir, sizeof dir);
    snprintf(args, sizeof args, "%s --set train.steps=20 --set train.checkpoint_every=10 --set train.out_dir=%s",
             common, ref);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "reference run: status %d: %s", rc, out);
    snprintf(args, sizeof args, "%s --set train.steps=20 --set train.checkpoint_every=10 --set train.out_dir=%s",
             common, dir);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "first run: status %d: %s", rc, out);
    snprintf(p10, sizeof p10, "%s/ckpt_00000010.h5", dir);
    snprintf(p14, sizeof p14, "%s/ckpt_00000014.h5", dir);
    snprintf(p20, sizeof p20, "%s/ckpt_00000020.h5", dir);
    EXPECT(checkpoint_verify(p20, why, sizeof why), "a fresh checkpoint does not verify: %s", why);
    /* the lowest exponent bit of the third value: it halves or doubles, a finite number still */
    EXPECT(flip_byte(p20, tensor, 10, 0x80), "cannot damage %s", p20);
    EXPECT(!checkpoint_verify(p20, why, sizeof why) && strstr(why, tensor) && strstr(why, "checksum"),
           "checkpoint_verify of the damaged file: %s", why[0] ? why : "(verifies)");
    printf("    %s\n", why);

    snprintf(args, sizeof args,
             "%s --set train.steps=14 --set train.checkpoint_every=2 --set train.keep_checkpoints=1 "
             "--set train.out_dir=%s --resume",
             common, dir);
    rc = train_cli(args, NULL, out, sizeof out);
    snprintf(want, sizeof want, "resumed from %s at step 10", p10);
    EXPECT(rc == 0 && strstr(out, "warning: --resume skips") && strstr(out, p20) && strstr(out, tensor) &&
               strstr(out, want),
           "resume past a damaged checkpoint: status %d: %s", rc, out);
    list_ckpt_files(dir, list, sizeof list);
    EXPECT(!strcmp(list, "ckpt_00000014.h5 ckpt_00000020.h5"), "keep_checkpoints 1 left: %s", list);

    snprintf(args, sizeof args, "%s --set train.steps=20 --set train.checkpoint_every=10 --set train.out_dir=%s --resume",
             common, dir);
    rc = train_cli(args, NULL, out, sizeof out);
    snprintf(want, sizeof want, "resumed from %s at step 14", p14);
    EXPECT(rc == 0 && strstr(out, want), "resume to 20: status %d: %s", rc, out);
    EXPECT(checkpoint_verify(p20, why, sizeof why), "the run's own ckpt_20 does not verify: %s", why);
    RunConfig c;
    tiny_config(&c, NULL, DENSE, 20);
    size_t na, nb;
    snprintf(want, sizeof want, "%s/ckpt_00000020.h5", ref);
    char *a = load_params(&c, want, &na), *b = load_params(&c, p20, &nb);
    bool same = na == nb && !memcmp(a, b, na);
    free(a);
    free(b);
    remove_tree(ref);
    remove_tree(dir);
    EXPECT(same, "skip + resume ended with other parameters than the uninterrupted run");
}

/* A checkpoint that comes out wrong (the test hook flips a bit after the write, before the read-back)
 * never takes its final name and never lets keep_checkpoints delete the one before. */
TEST(a_checkpoint_that_does_not_verify_is_never_published) {
    char dir[64], args[1024], list[1024], want[300];
    static char out[32768];
    make_temp_dir(dir, sizeof dir);
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=10 --set train.checkpoint_every=5 --set train.keep_checkpoints=1 "
                  "--set train.out_dir=%s",
             dir);
    int rc = train_cli(args, "MSA_CKPT_TEST_CORRUPT=10", out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "ckpt_00000010.h5") && strstr(out, "does not verify") && strstr(out, "checksum"),
           "a damaged write: status %d: %s", rc, out);
    list_ckpt_files(dir, list, sizeof list);
    EXPECT(!strcmp(list, "ckpt_00000005.h5 ckpt_00000010.h5.tmp"), "after the damaged write: %s", list);
    snprintf(args + strlen(args), sizeof args - strlen(args), " --resume");
    rc = train_cli(args, NULL, out, sizeof out);
    snprintf(want, sizeof want, "resumed from %s/ckpt_00000005.h5 at step 5", dir);
    EXPECT(rc == 0 && strstr(out, want), "resume: status %d: %s", rc, out);
    list_ckpt_files(dir, list, sizeof list);
    remove_tree(dir);
    EXPECT(!strcmp(list, "ckpt_00000010.h5"), "after the resumed run: %s", list);
}

/* NaN or infinity in a moment or a weight, with a checksum that holds (a diverged run wrote it): every
 * load refuses it naming the tensor, and checkpoint_verify does too. */
TEST(non_finite_values_are_refused_naming_the_tensor) {
    char dir[64], nan_m[256], inf_p[256], why[1024];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    tiny_config(&c, dir, DENSE, 2);
    Run r;
    start(&r, &c);
    run_step(&r);
    const char *good = run_checkpoint(&r);
    snprintf(nan_m, sizeof nan_m, "%s/nan_moment.h5", dir);
    snprintf(inf_p, sizeof inf_p, "%s/inf_param.h5", dir);
    copy_file(good, nan_m, 1.0);
    copy_file(good, inf_p, 1.0);
    bool made = set_value(nan_m, "optimizer/m/final_norm", 3, NAN) && set_value(inf_p, "params/wte", 0, INFINITY);
    if (made) {
        read_fails(tc, &r.model, &r.opt, true, nan_m, "optimizer/m/final_norm", "nan");
        read_fails(tc, &r.model, &r.opt, false, inf_p, "params/wte", "inf");
    }
    bool refused = !checkpoint_verify(nan_m, why, sizeof why) && strstr(why, "optimizer/m/final_norm");
    run_free(&r);
    remove_tree(dir);
    EXPECT(made, "could not write the non-finite values");
    EXPECT(refused, "checkpoint_verify of a NaN moment: %s", why[0] ? why : "(verifies)");
}

/* Arrays where the checkpoint's scalars belong, and hostile token files for build/forward: each program
 * ends with status 1 and a message naming the object and what was expected, never a crash (before the
 * checked reader the 1000-element arrays died with SIGSEGV). */
TEST(hostile_attributes_end_with_a_message_not_a_crash) {
    char dir[64], good[256], path[400], sub[300], tokens[300], logits[300], args[2048];
    static char out[32768];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    tiny_config(&c, dir, DENSE, 2);
    Run r;
    start(&r, &c);
    run_step(&r);
    snprintf(good, sizeof good, "%s", run_checkpoint(&r));
    run_free(&r);

    /* build/forward's token file: 8 ids as the program wants them, and a 2-D one */
    snprintf(tokens, sizeof tokens, "%s/tokens.h5", dir);
    snprintf(logits, sizeof logits, "%s/logits.h5", dir);
    const int32_t ids[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    hid_t f = H5Fcreate(tokens, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    test_h5_write(f, "tokens", 1, (hsize_t[]){8}, ids, true);
    test_h5_write(f, "grid", 2, (hsize_t[]){2, 4}, ids, true);
    H5Fclose(f);
    const char *forward = TINY " %s %s %s --set model.vocab_size=65";
    snprintf(args, sizeof args, forward, good, tokens, logits);
    int rc = run_program("build/forward", args, 0, out, sizeof out);
    EXPECT(rc == 0, "build/forward on a good checkpoint: status %d: %s", rc, out);

    struct {
        const char *attr;
        hid_t type;
    } cases[] = {{"version", H5T_STD_I64LE}, {"step", H5T_STD_I64LE}, {"adam_t", H5T_STD_I32LE},
                 {"seed", H5T_STD_U64LE}, {"best_val_loss", H5T_IEEE_F64LE}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int n = 2; n <= 1000; n += 998) {
            snprintf(sub, sizeof sub, "%s/%s_%d", dir, cases[i].attr, n);
            mkdir(sub, 0755);
            snprintf(path, sizeof path, "%s/ckpt_00000001.h5", sub);
            copy_file(good, path, 1.0);
            EXPECT(array_attr(path, cases[i].attr, cases[i].type, n), "cannot write %s", path);
            char attr[64];
            snprintf(attr, sizeof attr, "attribute \"%s\"", cases[i].attr);
            /* --resume: the one checkpoint does not verify */
            snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=3 --set train.out_dir=%s --resume", sub);
            rc = run_program("build/train", args, 0, out, sizeof out);
            EXPECT(rc == 1 && strstr(out, attr) && strstr(out, "expected a scalar") && strstr(out, path),
                   "--resume with %s of %d elements: status %d: %s", cases[i].attr, n, rc, out);
            if (strcmp(cases[i].attr, "version") != 0) continue;
            /* the version is read by every load: init_from and build/forward too */
            snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=1 --set train.init_from=%s", path);
            rc = run_program("build/train", args, 0, out, sizeof out);
            EXPECT(rc == 1 && strstr(out, attr) && strstr(out, path), "init_from with %d versions: status %d: %s", n,
                   rc, out);
            snprintf(args, sizeof args, forward, path, tokens, logits);
            rc = run_program("build/forward", args, 0, out, sizeof out);
            EXPECT(rc == 1 && strstr(out, attr) && strstr(out, path), "build/forward with %d versions: status %d: %s",
                   n, rc, out);
        }
    printf("    %s", out);

    /* build/forward's own input: "tokens" must be 1-D integers */
    f = H5Fopen(tokens, H5F_ACC_RDWR, H5P_DEFAULT);
    H5Ldelete(f, "tokens", H5P_DEFAULT);
    H5Lmove(f, "grid", f, "tokens", H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(f);
    snprintf(args, sizeof args, forward, good, tokens, logits);
    rc = run_program("build/forward", args, 0, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "dataset \"tokens\"") && strstr(out, "shape mismatch") && strstr(out, tokens),
           "build/forward with 2-D tokens: status %d: %s", rc, out);
    remove_tree(dir);
}

/* ---- failed writes ---------------------------------------------------------------------------- */

/* A disk that fills while a checkpoint is written (a file size limit makes the writes fail as ENOSPC
 * does), in a dataset and in the final H5Fclose: status 1 with the message, never SIGSEGV at exit
 * (HDF5's clean-up after a failed close), and the previous checkpoint as it was. */
TEST(checkpoint_write_on_a_full_disk_exits_cleanly) {
    char dir[64], args[1024], p4[256], p8[256], tmp[300], keep[256];
    static char out[32768];
    make_temp_dir(dir, sizeof dir);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=4 --set train.out_dir=%s", dir);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "first run: status %d: %s", rc, out);
    snprintf(p4, sizeof p4, "%s/ckpt_00000004.h5", dir);
    snprintf(p8, sizeof p8, "%s/ckpt_00000008.h5", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", p8);
    snprintf(keep, sizeof keep, "%s/kept.h5", dir);
    copy_file(p4, keep, 1.0);
    struct stat sb;
    stat(p4, &sb);
    /* well inside the tensors, and the last KiB: the metadata H5Fclose writes */
    const long limits[2] = {200 * 1024, (long)sb.st_size - 1024};
    const char *where[2] = {"writing", "closing"};
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=8 --set train.out_dir=%s --resume", dir);
    for (int i = 0; i < 2; i++) {
        rc = run_program("build/train", args, limits[i], out, sizeof out);
        printf("    limit %ld bytes: status %d, %s", limits[i], rc, strstr(out, "error: ") ? strstr(out, "error: ") : out);
        EXPECT(rc == 1 && strstr(out, p8) && strstr(out, "cannot write the checkpoint") && strstr(out, where[i]),
               "limit %ld: status %d (negative: killed by that signal): %s", limits[i], rc, out);
        EXPECT(same_bytes(p4, keep) && !file_exists(p8) && !file_exists(tmp),
               "limit %ld: the previous checkpoint changed, or a new one or its .tmp remained", limits[i]);
    }
    remove_tree(dir);
}

/* config.json and metrics.jsonl on a full disk (/dev/full): status 1 naming the file, config.json at
 * start-up before any step, metrics.jsonl at its first record, not after the whole run. */
TEST(run_directory_writes_on_a_full_disk_stop_the_run) {
    char dir[64], args[1024], link_path[256], list[1024];
    static char out[32768];
    const char *files[2] = {"config.json", "metrics.jsonl"};
    for (int i = 0; i < 2; i++) {
        make_temp_dir(dir, sizeof dir);
        snprintf(link_path, sizeof link_path, "%s/%s", dir, files[i]);
        EXPECT(symlink("/dev/full", link_path) == 0, "cannot link %s to /dev/full", link_path);
        snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=20 --set train.out_dir=%s", dir);
        int rc = run_program("build/train", args, 0, out, sizeof out);
        printf("    %s", strstr(out, "error: ") ? strstr(out, "error: ") : out);
        EXPECT(rc == 1 && strstr(out, link_path) && strstr(out, "No space left"), "%s on a full disk: status %d: %s",
               files[i], rc, out);
        /* config.json: before the first step; metrics.jsonl: at the first step's record */
        EXPECT(i == 1 ? !strstr(out, "step     2/") : !strstr(out, "loss"), "%s: the run went on: %s", files[i], out);
        list_ckpt_files(dir, list, sizeof list);
        remove_tree(dir);
        EXPECT(!list[0], "%s: checkpoints written: %s", files[i], list);
    }
}

/* ---- init_from: dense checkpoint -> MSA model ------------------------------------------------- */

TEST(init_from_dense_checkpoint_into_msa_model) {
    char dir[64], path[256];
    make_temp_dir(dir, sizeof dir);
    RunConfig dense;
    tiny_config(&dense, dir, DENSE, 3);
    Run r;
    start(&r, &dense);
    for (int s = 0; s < 3; s++) run_step(&r);
    snprintf(path, sizeof path, "%s", run_checkpoint(&r));
    Model *dm = &r.model;

    RunConfig msa;
    tiny_config(&msa, NULL, MSA, 3);
    snprintf(msa.train.init_from, sizeof msa.train.init_from, "%s", path);
    Run s;
    start(&s, &msa);
    RunConfig fresh_cfg = msa;
    fresh_cfg.train.init_from[0] = 0;
    Run fresh;
    start(&fresh, &fresh_cfg);

    int backbone = 0, index = 0, wrong = 0;
    for (int i = 0; i < s.model.params.n; i++) {
        const Tensor *t = s.model.params.p[i].t;
        bool is_index = strstr(t->name, ".index.") != NULL;
        Param *ref = is_index ? params_find(&fresh.model.params, t->name) : params_find(&dm->params, t->name);
        if (!ref || ref->t->numel != t->numel || memcmp(ref->t->data, t->data, (size_t)t->numel * sizeof(float))) {
            printf("    %s differs from the %s\n", t->name, is_index ? "fresh initialisation" : "checkpoint");
            wrong++;
        }
        is_index ? index++ : backbone++;
    }
    printf("    %d backbone tensors from the checkpoint, %d index tensors fresh\n", backbone, index);
    EXPECT(wrong == 0 && index == 8 && backbone == dm->params.n, "%d tensors wrong (%d index, %d backbone)", wrong,
           index, backbone);

    /* without allow_missing_index the index parameters are missing tensors */
    char err[2048];
    ReadJob job = {.path = path, .model = &fresh.model, .allow_missing_index = false};
    int rc = in_child(read_job, &job, err, sizeof err);
    run_free(&fresh);
    run_free(&s);
    run_free(&r);
    remove_tree(dir);
    EXPECT(rc == 1 && strstr(err, path) && strstr(err, "missing tensor params/layers.0.index.wq"), "status %d: %s", rc,
           err);
}

/* ---- signals ---------------------------------------------------------------------------------- */

static int count_lines(const char *path) {
    size_t n;
    char *text = test_read_file(path, &n);
    int lines = 0;
    for (size_t i = 0; text && i < n; i++) lines += text[i] == '\n';
    free(text);
    return lines;
}

TEST(sigterm_stops_with_a_checkpoint_that_resumes) {
    char dir[64], args[1024], out[8192], metrics[256], log[256], list[1024];
    make_temp_dir(dir, sizeof dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
    snprintf(log, sizeof log, "%s/train.log", dir);
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=1000000 --set train.eval_every=0 --set train.out_dir=%s", dir);
    pid_t pid = test_spawn_train(args, NULL, log);
    /* wait until it is training (three steps logged), then ask it to stop */
    struct timespec nap = {0, 20 * 1000 * 1000};
    for (int i = 0; i < 3000 && count_lines(metrics) < 3; i++) nanosleep(&nap, NULL);
    kill(pid, SIGTERM);
    int st = wait_for(pid);
    size_t n;
    char *text = test_read_file(log, &n);
    snprintf(out, sizeof out, "%s", text ? text : "");
    free(text);
    EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0, "after SIGTERM: %s %d: %s", WIFEXITED(st) ? "status" : "signal",
           WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st), out);
    EXPECT(strstr(out, "stopped by SIGTERM"), "no stop message: %s", out);
    list_ckpt_files(dir, list, sizeof list);
    int step = 0;
    EXPECT(sscanf(list, "ckpt_%d.h5", &step) == 1 && step >= 3 && !strchr(list, ' '), "checkpoints after SIGTERM: %s",
           list);

    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=%d --set train.out_dir=%s --resume", step + 2, dir);
    int rc = train_cli(args, NULL, out, sizeof out);
    char want[64];
    snprintf(want, sizeof want, "at step %d", step);
    EXPECT(rc == 0 && strstr(out, want), "resume after SIGTERM: status %d: %s", rc, out);
    text = test_read_file(metrics, &n);
    snprintf(want, sizeof want, "{\"step\": %d, \"loss\"", step + 2);
    bool logged = text && strstr(text, want);
    snprintf(want, sizeof want, "{\"step\": 1, \"loss\"");
    bool kept = text && strstr(text, want);
    free(text);
    remove_tree(dir);
    EXPECT(logged && kept, "metrics.jsonl should hold step 1 (before the stop) and step %d (after)", step + 2);
}

/* ---- train.save_best: out_dir/ckpt_best.h5 ------------------------------------------------------ */

/* A root attribute of a checkpoint as a double (NaN when absent or unreadable). */
static double ckpt_attr(const char *path, const char *name) {
    H5Reader rd;
    double v = NAN;
    if (!h5r_open(&rd, path, "checkpoint", NULL, false)) return v;
    if (h5r_attr_float(&rd, rd.file, name, true, true, &v) != 1) v = NAN;
    h5r_close(&rd);
    return v;
}

/* The eval records of dir/metrics.jsonl ({"step": N, "val_loss": X, ...}) in order; returns how many. */
static int read_evals(const char *dir, int *steps, double *losses, int max) {
    char path[256], line[1024];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "r");
    int n = 0;
    while (f && n < max && fgets(line, sizeof line, f))
        if (sscanf(line, "{\"step\": %d, \"val_loss\": %lf", &steps[n], &losses[n]) == 2) n++;
    if (f) fclose(f);
    return n;
}

/* The index of the lowest of n losses (the first of equals, as a strict "lower than" keeps it). */
static int lowest(const double *losses, int n) {
    int k = 0;
    for (int i = 1; i < n; i++)
        if (losses[i] < losses[k]) k = i;
    return k;
}

/* The program, 20 steps with an eval every 2: ckpt_best.h5 holds the lowest of the ten logged evals (its
 * step and loss, as printed), and the model loaded from it through train.init_from evaluates to it. */
TEST(save_best_keeps_the_lowest_eval) {
    char dir[64], args[1024], path[256], want[512];
    static char out[32768];
    make_temp_dir(dir, sizeof dir);
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=20 --set train.eval_every=2 --set train.save_best=true "
                  "--set train.out_dir=%s",
             dir);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "status %d: %s", rc, out);
    int steps[32];
    double losses[32];
    int n = read_evals(dir, steps, losses, 32), k = lowest(losses, n);
    EXPECT(n == 10, "metrics.jsonl holds %d evals, not 10", n);
    printf("    evals at steps 2..20, the lowest %.6f at step %d (the last %.6f)\n", losses[k], steps[k],
           losses[n - 1]);
    EXPECT(k < n - 1, "the lowest eval is the last, so the test cannot tell the best from the newest");
    snprintf(path, sizeof path, "%s/ckpt_best.h5", dir);
    EXPECT(file_exists(path), "no %s", path);
    double best = ckpt_attr(path, "best_val_loss"), step = ckpt_attr(path, "step");
    EXPECT(step == steps[k], "ckpt_best.h5 is of step %g, the lowest eval of step %d", step, steps[k]);
    /* metrics.jsonl prints 6 decimals */
    EXPECT(fabs(best - losses[k]) <= 1e-6, "ckpt_best.h5 has best_val_loss %.9f, the lowest eval %.6f", best,
           losses[k]);
    /* the last line of its kind names the lowest eval */
    snprintf(want, sizeof want, "best val loss %.4f at step %d: checkpoint %s\n", best, steps[k], path);
    const char *last = NULL;
    for (const char *p = out; (p = strstr(p, "best val loss")); p++) last = p;
    EXPECT(last && !strncmp(last, want, strlen(want)), "expected the last best line \"%.*s\" in: %s",
           (int)strlen(want) - 1, want, out);
    /* the regular checkpoint at the end records the best too */
    snprintf(path, sizeof path, "%s/ckpt_00000020.h5", dir);
    EXPECT(ckpt_attr(path, "best_val_loss") == best, "ckpt_00000020.h5 has best_val_loss %.9f, not %.9f",
           ckpt_attr(path, "best_val_loss"), best);

    /* a new run from its weights evaluates to the best loss (the same batches: the same eval settings) */
    RunConfig c;
    tiny_config(&c, NULL, DENSE, 20);
    snprintf(c.train.init_from, sizeof c.train.init_from, "%s/ckpt_best.h5", dir);
    Run r;
    start(&r, &c);
    double val = run_evaluate(&r, NULL);
    run_free(&r);
    remove_tree(dir);
    printf("    the model of ckpt_best.h5 evaluates to %.9f (best_val_loss %.9f)\n", val, best);
    EXPECT(fabs(val - best) <= 1e-6 * best, "evaluated %.9f, best_val_loss %.9f", val, best);
}

/* Resuming carries the best loss on: 12 steps, then --resume to 18, ends with the ckpt_best.h5 of the
 * uninterrupted 18-step run, and the resumed steps, whose evals are all worse than the best before the
 * resume, leave the file as it was. A resumed run that forgot the best would take its first eval for
 * one. The LR is constant after the warm-up (min_lr = lr), so that the 12-step run trains as the first 12
 * steps of the 18-step one (the cosine schedule depends on train.steps). */
TEST(save_best_survives_resume) {
    char a[64], b[64], best_a[256], best_b[256], kept[256];
    make_temp_dir(a, sizeof a);
    make_temp_dir(b, sizeof b);
    RunConfig c;
    Run r;
    tiny_config(&c, a, DENSE, 18);
    c.train.eval_every = 2;
    c.train.save_best = true;
    c.optim.min_lr = c.optim.lr;
    start(&r, &c);
    run_train(&r);
    run_free(&r);

    snprintf(c.train.out_dir, sizeof c.train.out_dir, "%s", b);
    c.train.steps = 12;
    start(&r, &c);
    run_train(&r);
    run_free(&r);
    snprintf(best_a, sizeof best_a, "%s/ckpt_best.h5", a);
    snprintf(best_b, sizeof best_b, "%s/ckpt_best.h5", b);
    snprintf(kept, sizeof kept, "%s/before_resume.h5", b);
    copy_file(best_b, kept, 1.0);
    double best_before = ckpt_attr(best_b, "best_val_loss");
    c.train.steps = 18;
    c.train.resume = true;
    start(&r, &c);
    double resumed_best = r.best_val_loss;
    run_train(&r);
    run_free(&r);

    int steps[32];
    double losses[32];
    int n = read_evals(b, steps, losses, 32), later = 0, worse = 0;
    for (int i = 0; i < n; i++)
        if (steps[i] > 12) {
            later++;
            worse += losses[i] > best_before;
        }
    double step_a = ckpt_attr(best_a, "step"), step_b = ckpt_attr(best_b, "step");
    double loss_a = ckpt_attr(best_a, "best_val_loss"), loss_b = ckpt_attr(best_b, "best_val_loss");
    size_t na, nb;
    char *pa = load_params(&c, best_a, &na), *pb = load_params(&c, best_b, &nb);
    bool same_params = na == nb && !memcmp(pa, pb, na), untouched = same_bytes(best_b, kept);
    free(pa);
    free(pb);
    remove_tree(a);
    remove_tree(b);
    printf("    uninterrupted: best %.6f at step %g; 12 + resumed 6: best %.6f at step %g; %d of the %d resumed evals "
           "worse than %.6f\n",
           loss_a, step_a, loss_b, step_b, worse, later, best_before);
    EXPECT(resumed_best == best_before, "the resumed run starts from best %.9f, the checkpoint's is %.9f", resumed_best,
           best_before);
    EXPECT(step_a == step_b && loss_a == loss_b && same_params,
           "ckpt_best.h5 differs: step %g vs %g, loss %.9f vs %.9f, parameters %s", step_a, step_b, loss_a, loss_b,
           same_params ? "equal" : "differ");
    EXPECT(later == 3 && worse == later, "the test needs 3 resumed evals all worse than the best before (%d of %d)",
           worse, later);
    EXPECT(untouched, "the resumed run rewrote ckpt_best.h5 although no eval beat it");
}

/* keep_checkpoints = 1 never deletes ckpt_best.h5 (and drops a half-written ckpt_best.h5.tmp); --resume
 * continues from the newest ckpt_<step>.h5, never from ckpt_best.h5, and with none left refuses rather
 * than take it; a fresh run refuses the directory of an earlier run's ckpt_best.h5. */
TEST(save_best_is_never_pruned_or_resumed_from) {
    char dir[64], list[1024], best[256], kept[256], want[300], args[1024], out[16384], from[300];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    Run r;
    tiny_config(&c, dir, DENSE, 20);
    c.train.eval_every = 2;
    c.train.checkpoint_every = 2;
    c.train.keep_checkpoints = 1;
    c.train.save_best = true;
    start(&r, &c);
    run_train(&r);
    run_free(&r);
    list_ckpt_files(dir, list, sizeof list);
    EXPECT(!strcmp(list, "ckpt_00000020.h5 ckpt_best.h5"), "keep_checkpoints 1 left: %s", list);
    snprintf(best, sizeof best, "%s/ckpt_best.h5", dir);
    double best_step = ckpt_attr(best, "step");
    EXPECT(best_step < 20, "the best is of step %g, so resuming from it would look the same as from step 20",
           best_step);
    snprintf(kept, sizeof kept, "%s/best_copy.h5", dir);
    copy_file(best, kept, 1.0);
    snprintf(want, sizeof want, "%s.tmp", best);
    write_bytes(want, "half-written", 12); /* the debris of a crash mid-write */

    c.train.steps = 22;
    c.train.resume = true;
    start(&r, &c);
    int at = r.step;
    snprintf(from, sizeof from, "%s", r.checkpoint);
    run_train(&r);
    run_free(&r);
    snprintf(want, sizeof want, "%s/ckpt_00000020.h5", dir);
    EXPECT(at == 20 && !strcmp(from, want), "--resume started at step %d from %s, not from %s", at, from, want);
    list_ckpt_files(dir, list, sizeof list);
    EXPECT(!strcmp(list, "ckpt_00000022.h5 ckpt_best.h5"), "after the resumed run: %s", list);

    /* only ckpt_best.h5 left: nothing to resume from, and not a directory to start afresh in */
    snprintf(want, sizeof want, "%s/ckpt_00000022.h5", dir);
    unlink(want);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=30 --set train.out_dir=%s --resume", dir);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "no checkpoint") && strstr(out, "ckpt_best.h5") && strstr(out, "train.init_from"),
           "--resume with only ckpt_best.h5: status %d: %s", rc, out);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.save_best=true --set train.out_dir=%s", dir);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, best) && strstr(out, "earlier run"), "fresh run over ckpt_best.h5: status %d: %s", rc,
           out);
    /* the resumed run's evals at 22 did not beat the best of step best_step */
    EXPECT(ckpt_attr(best, "step") == best_step && same_bytes(best, kept), "ckpt_best.h5 changed");
    remove_tree(dir);
}

/* best_val_loss round-trips through checkpoint_read_state, and a checkpoint without it (written before
 * it existed) reads as none (NaN) rather than failing. */
TEST(best_val_loss_round_trips_and_is_optional) {
    char dir[64], path[256], old[256];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    tiny_config(&c, dir, DENSE, 2);
    Run r;
    start(&r, &c);
    run_step(&r);
    r.best_val_loss = 2.75;
    snprintf(path, sizeof path, "%s", run_checkpoint(&r));
    snprintf(old, sizeof old, "%s/older.h5", dir);
    copy_file(path, old, 1.0);
    hid_t f = H5Fopen(old, H5F_ACC_RDWR, H5P_DEFAULT);
    bool deleted = f >= 0 && H5Adelete(f, "best_val_loss") >= 0;
    if (f >= 0) H5Fclose(f);
    TrainState now = {0}, before = {0};
    checkpoint_read_state(path, &r.model, &r.opt, &now);
    checkpoint_read_state(old, &r.model, &r.opt, &before);
    run_free(&r);
    remove_tree(dir);
    EXPECT(deleted, "could not delete the attribute from %s", old);
    EXPECT(now.best_val_loss == 2.75 && now.step == 1, "read back best %g at step %lld", now.best_val_loss,
           (long long)now.step);
    EXPECT(isnan(before.best_val_loss) && before.step == 1, "a checkpoint without best_val_loss read %g",
           before.best_val_loss);
}

/* A version 1 file (written before checksums: no crc32 attributes) still resumes, bit for bit, with one
 * warning that its tensors cannot be verified; a version from the future is refused. */
static void drop_crc(hid_t file, const char *gname) {
    hid_t g = H5Lexists(file, gname, H5P_DEFAULT) > 0 ? H5Gopen2(file, gname, H5P_DEFAULT) : -1;
    H5G_info_t info;
    for (hsize_t i = 0; g >= 0 && H5Gget_info(g, &info) >= 0 && i < info.nlinks; i++) {
        char name[256];
        H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
        H5Adelete_by_name(g, name, "crc32", H5P_DEFAULT);
    }
    if (g >= 0) H5Gclose(g);
}

static bool set_version(const char *path, int version, bool drop_checksums) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t a = f >= 0 ? H5Aopen(f, "version", H5P_DEFAULT) : -1;
    bool ok = a >= 0 && H5Awrite(a, H5T_NATIVE_INT, &version) >= 0;
    if (a >= 0) H5Aclose(a);
    const char *groups[] = {"params", "optimizer/m", "optimizer/v", "state"};
    for (int i = 0; ok && drop_checksums && i < 4; i++) drop_crc(f, groups[i]);
    return f >= 0 && H5Fclose(f) >= 0 && ok;
}

static void resume_job(const void *arg) {
    RunConfig c = *(const RunConfig *)arg;
    c.train.resume = true;
    Run r;
    start(&r, &c);
    run_free(&r);
}

TEST(version_1_checkpoints_load_with_a_warning) {
    char dir[64], path[256], future[256], err[4096];
    make_temp_dir(dir, sizeof dir);
    RunConfig c;
    tiny_config(&c, dir, DENSE, 4);
    Run r;
    start(&r, &c);
    run_step(&r);
    run_step(&r);
    snprintf(path, sizeof path, "%s", run_checkpoint(&r));
    Snapshot want = snapshot(&r);
    run_free(&r);
    snprintf(future, sizeof future, "%s/future.h5", dir);
    copy_file(path, future, 1.0);
    bool made = set_version(path, 1, true) && set_version(future, 3, false);
    int rc = test_run_child(resume_job, &c, err, sizeof err);
    c.train.resume = true;
    start(&r, &c); /* in this process too, to compare the state */
    Snapshot got = snapshot(&r);
    bool same = !memcmp(want.params, got.params, want.bytes) && !memcmp(want.m, got.m, want.bytes) &&
                !memcmp(want.v, got.v, want.bytes) && r.step == 2;
    snapshot_free(&want);
    snapshot_free(&got);
    char why[1024];
    bool refused = !checkpoint_verify(future, why, sizeof why) && strstr(why, "version 3");
    run_free(&r);
    remove_tree(dir);
    EXPECT(made, "could not rewrite the version");
    printf("    %s", err);
    EXPECT(rc == 0 && strstr(err, "version 1") && strstr(err, "unverified") && strstr(err, path),
           "resume from a version 1 file: status %d: %s", rc, err);
    EXPECT(same, "a version 1 file resumed to another state");
    EXPECT(refused, "a version 3 file: %s", why[0] ? why : "(verifies)");
}

TEST(save_best_needs_out_dir) {
    char out[8192];
    int rc = train_cli(TINY " --set train.save_best=true", NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "train.save_best") && strstr(out, "train.out_dir"),
           "save_best without out_dir: status %d: %s", rc, out);
    printf("    %s", strstr(out, "error: ") ? strstr(out, "error: ") : out);
}

/* ---- divergence: train.diverge_factor --------------------------------------------------------- */

/* A run's first eval is kept in its checkpoints (first_val_loss); resumed with a learning rate 750 times
 * too high, its evals come out in the hundreds and the first one above diverge_factor times that stops
 * the run: status 1, no checkpoint of the diverged weights. diverge_factor 0 lets the same run go on;
 * a factor in (0, 1) is refused. */
TEST(divergence_bound_stops_the_run) {
    char dir[64], args[1024], p4[256], list[1024], want[512];
    static char out[65536];
    make_temp_dir(dir, sizeof dir);
    const char *common = TINY " " TINY_SET " --set train.eval_every=2 --set train.checkpoint_every=2";
    snprintf(args, sizeof args, "%s --set train.steps=4 --set train.out_dir=%s", common, dir);
    int rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0, "first run: status %d: %s", rc, out);
    int steps[8];
    double losses[8];
    int n = read_evals(dir, steps, losses, 8);
    snprintf(p4, sizeof p4, "%s/ckpt_00000004.h5", dir);
    double first = ckpt_attr(p4, "first_val_loss");
    EXPECT(n == 2 && steps[0] == 2 && fabs(first - losses[0]) <= 1e-6, "first_val_loss %.9f, the first eval %.6f",
           first, n ? losses[0] : NAN);

    const char *steep = "--set optim.lr=3 --set optim.min_lr=3 --set train.steps=10";
    snprintf(args, sizeof args, "%s %s --set train.diverge_factor=10 --set train.out_dir=%s --resume", common, steep,
             dir);
    rc = train_cli(args, NULL, out, sizeof out);
    snprintf(want, sizeof want, "above train.diverge_factor = 10 times the run's first, %.4f (diverged)", first);
    printf("    %s", strstr(out, "error: ") ? strstr(out, "error: ") : out);
    EXPECT(rc == 1 && strstr(out, "step 6: validation loss") && strstr(out, want) && strstr(out, p4),
           "diverging run: status %d: %s", rc, out);
    list_ckpt_files(dir, list, sizeof list);
    EXPECT(!strcmp(list, "ckpt_00000002.h5 ckpt_00000004.h5"), "a checkpoint of the diverged run was written: %s",
           list);

    snprintf(args, sizeof args, "%s %s --set train.diverge_factor=0 --set train.out_dir=%s --resume", common, steep,
             dir);
    rc = train_cli(args, NULL, out, sizeof out);
    EXPECT(rc == 0 && strstr(out, "done:"), "diverge_factor 0: status %d: %s", rc, out);
    rc = train_cli(TINY " --set train.diverge_factor=0.5", NULL, out, sizeof out);
    EXPECT(rc == 1 && strstr(out, "train.diverge_factor"), "diverge_factor 0.5: status %d: %s", rc, out);
    remove_tree(dir);
}

int main(void) {
    TEST_BEGIN();
    RUN(resume_dense_bit_for_bit);
    RUN(resume_moe_bit_for_bit);
    RUN(resume_grad_accum_bit_for_bit);
    RUN(resume_msa_bit_for_bit);
    RUN(crash_during_write_keeps_previous_checkpoint);
    RUN(keep_checkpoints_keeps_the_newest);
    RUN(bad_checkpoints_stop_with_a_message_and_change_nothing);
    RUN(train_program_refuses_bad_checkpoints_without_touching_files);
    RUN(resume_skips_a_checkpoint_that_does_not_verify);
    RUN(a_checkpoint_that_does_not_verify_is_never_published);
    RUN(non_finite_values_are_refused_naming_the_tensor);
    RUN(hostile_attributes_end_with_a_message_not_a_crash);
    RUN(checkpoint_write_on_a_full_disk_exits_cleanly);
    RUN(run_directory_writes_on_a_full_disk_stop_the_run);
    RUN(divergence_bound_stops_the_run);
    RUN(init_from_dense_checkpoint_into_msa_model);
    RUN(sigterm_stops_with_a_checkpoint_that_resumes);
    RUN(save_best_keeps_the_lowest_eval);
    RUN(save_best_survives_resume);
    RUN(save_best_is_never_pruned_or_resumed_from);
    RUN(best_val_loss_round_trips_and_is_optional);
    RUN(save_best_needs_out_dir);
    RUN(version_1_checkpoints_load_with_a_warning);
    TEST_END();
}
