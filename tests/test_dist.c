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
 *   - train.save_best on 2 ranks (and resumed on 2) writes the single process's ckpt_best.h5;
 *   - no two ranks read the same window, and together they read exactly the single process's windows;
 *   - a rank that fails ends the job with its message, a rank that hangs makes the others time out;
 *   - rank counts that do not fit the config are refused with a message;
 *   - ranks given different settings or data files stop the job naming the key; a rank stuck opening a
 *     file (a FIFO) makes the others stop within dist.timeout.
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../data/h5read.h"

#include "../data/dataset.h"
#include "../dist/dist.h"
#include "../kernels/util.h"
#include "dist_harness.h"
#include "test.h"

#define TRAIN_DATA "data/shakespeare/train.h5"

#define FX ((DistHarness *)tc->fixture)

/* The single-process run and the np-rank run of the same config agree within fp32 tolerance. */
static void expect_same_training(TestCtx *tc, const char *name, int np, const char *args) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char name1[128];
    snprintf(name1, sizeof name1, "%s_single", name);
    RunDiff d;
    EXPECT_OK(harness_run_pair(tc, name1, args, name, np, args, &d));
    printf("    np %d vs 1 over %d steps: loss %.1e, grad norm %.1e, val loss %.1e; params max |d| %.2e (rel %.2e), "
           "AdamW m rel %.2e, v rel %.2e\n",
           np, d.steps.common, d.steps.loss, d.steps.grad_norm, fabs(d.a.val_loss - d.b.val_loss), d.params.max_abs,
           d.params.max_rel, d.m.max_rel, d.v.max_rel);
    harness_expect_same_training(tc, &d, HARNESS_CHECK_COUNTER);
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
    char a[512], b[512];
    EXPECT(harness_run_into(tc, "plain", 0, "", a, sizeof a) && harness_run_into(tc, "np1", 1, "", b, sizeof b),
           "run failed");
    RunDiff d = harness_compare_runs(a, b, 0);
    EXPECT(d.steps.common == 10 && d.steps.loss == 0 && d.steps.grad_norm == 0 && d.params.ok &&
               d.params.max_abs == 0 && d.v.ok && d.v.max_abs == 0,
           "mpirun -np 1 differs from the plain process: loss %g, params %g, v %g", d.steps.loss, d.params.max_abs,
           d.v.max_abs);
}

TEST(dp2_equals_single_process) {
    expect_same_training(tc, "dense", 2, "");
}

TEST(dp4_equals_single_process) {
    expect_same_training(tc, "dense", 4, "");
}

/* gradient accumulation (each micro-batch split over the ranks) and dropout (masks by global row) */
TEST(dp2_with_grad_accum_and_dropout_equals_single_process) {
    expect_same_training(tc, "accum", 2, "--set train.grad_accum=2 --set train.batch_size=4 --set model.dropout=0.1");
}

/* MoE: the expert loads are summed over the ranks before the selection-bias update (the load-balancing aux
 * loss is off: it is a product of batch means, per rank by design, so it differs from the global batch's) */
TEST(dp2_moe_equals_single_process) {
    expect_same_training(tc, "moe", 2,
                         "--set model.ffn=moe --set moe.num_experts=4 --set moe.expert_dim=32 --set moe.shared_experts=1 "
                         "--set moe.aux_loss_weight=0 --set moe.z_loss_weight=0.001 --set moe.bias_update_rate=0.01");
}

/* MSA: the KL term (a mean over equally many tokens per rank) enters each rank's loss with 1/dp; the run
 * crosses the switch from dense warm-up to sparse selection, and the evals (KL, recall, dense reference)
 * are recombined over the ranks */
TEST(dp2_msa_equals_single_process) {
    expect_same_training(tc, "msa", 2,
                         "--set model.attention=msa --set msa.block_size=8 --set msa.topk_blocks=3 --set msa.index_dim=16 "
                         "--set msa.dense_warmup_steps=4 --set train.eval_every=5 --set train.eval_dense_reference=true");
}

/* A checkpoint of a 2-rank run at step 5 resumes on 1 and on 4 ranks and ends where the uninterrupted
 * single-process run ends. */
TEST(checkpoint_from_2_ranks_resumes_on_1_and_4) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char ref[512], two[512];
    EXPECT(harness_run_into(tc, "resume_ref", 0, "", ref, sizeof ref), "reference run failed");
    EXPECT(harness_run_into(tc, "resume_np2", 2, HARNESS_CHECKPOINTS, two, sizeof two), "2-rank run failed");
    for (int np = 1; np <= 4; np *= 4) {
        char dir[512];
        RunOutcome o = harness_resume(tc, two, np == 1 ? 0 : np, "", dir, sizeof dir);
        EXPECT(o.status == 0, "resume on %d rank(s) exited with %d: %s", np, o.status, o.err);
        EXPECT(strstr(o.out, "resumed from") || strstr(o.out, "done:"), "no progress output: %s", o.out);
        RunDiff d = harness_compare_runs(ref, dir, 6);
        printf("    2 ranks -> %d: steps 6-10 loss %.1e, grad norm %.1e; final params max |d| %.2e (rel %.2e), v rel "
               "%.2e\n",
               np, d.steps.loss, d.steps.grad_norm, d.params.max_abs, d.params.max_rel, d.v.max_rel);
        EXPECT_OK(harness_expect_resumed(tc, &d, true));
    }
}

/* The float attribute best_val_loss of a checkpoint (NaN if absent). */
static double best_val_loss_of(const char *file) {
    H5Reader rd;
    double v = NAN;
    if (!h5r_open(&rd, file, "checkpoint", NULL, false)) return v;
    if (h5r_attr_float(&rd, rd.file, "best_val_loss", true, false, &v) != 1) v = NAN;
    h5r_close(&rd);
    return v;
}

/* train.save_best is collective (rank 0 writes, the moment shards gather into its file): on 2 ranks, and
 * resumed on 2 from their step-5 checkpoint, ckpt_best.h5 is the single process's, of the same step, best
 * loss, parameters and moments. The LR makes the evals fall to step 8, then rise, so the best file is not
 * the final state. */
TEST(save_best_on_2_ranks_equals_single_process) {
    EXPECT(FX->have_mpirun, "no mpirun");
    const char *args = "--set train.eval_every=2 --set train.save_best=true --set optim.lr=0.01 " HARNESS_CHECKPOINTS;
    char one[512], two[512], dirs[3][600];
    EXPECT(harness_run_into(tc, "best_single", 0, args, one, sizeof one), "single-process run failed");
    EXPECT(harness_run_into(tc, "best_np2", 2, args, two, sizeof two), "2-rank run failed");
    RunOutcome o = harness_resume(tc, two, 2, args, dirs[2], sizeof dirs[2]);
    EXPECT(o.status == 0, "resume on 2 ranks exited with %d: %s", o.status, o.err);
    snprintf(dirs[0], sizeof dirs[0], "%s", one);
    snprintf(dirs[1], sizeof dirs[1], "%s", two);
    char ref[700];
    snprintf(ref, sizeof ref, "%s/ckpt_best.h5", one);
    const long long ref_step = harness_ckpt_attr(ref, "step");
    const double ref_loss = best_val_loss_of(ref);
    EXPECT(ref_step > 0 && ref_step < 10, "the single process's best is of step %lld: the test needs one before the "
           "last step", ref_step);
    for (int i = 1; i < 3; i++) {
        char file[700];
        snprintf(file, sizeof file, "%s/ckpt_best.h5", dirs[i]);
        const long long step = harness_ckpt_attr(file, "step");
        const double loss = best_val_loss_of(file);
        TensorDiff p = harness_compare_group(ref, file, "params"), m = harness_compare_group(ref, file, "optimizer/m"),
                   v = harness_compare_group(ref, file, "optimizer/v");
        printf("    %s: best %.6f at step %lld (single process %.6f at %lld); params max |d| %.2e (rel %.2e), m "
               "rel %.2e, v rel %.2e\n",
               i == 1 ? "2 ranks" : "2 ranks resumed at 5", loss, step, ref_loss, ref_step, p.max_abs, p.max_rel,
               m.max_rel, v.max_rel);
        EXPECT(step == ref_step && fabs(loss - ref_loss) <= HARNESS_LOSS_TOL, "best of step %lld, loss %.9f", step,
               loss);
        EXPECT(p.ok && p.max_abs <= HARNESS_PARAM_ABS_TOL && p.max_rel <= HARNESS_PARAM_REL_TOL,
               "parameters: %g (rel %g)", p.max_abs, p.max_rel);
        EXPECT(m.ok && v.ok && m.max_rel <= HARNESS_MOMENT_REL_TOL && v.max_rel <= HARNESS_MOMENT_REL_TOL,
               "moments: m rel %g, v rel %g", m.max_rel, v.max_rel);
    }
}

/* Every window (sampler counter) of 3 steps of 2 micro-batches of 8 is read by exactly one of 4 ranks. */
TEST(no_two_ranks_read_the_same_sample) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char prefix[512], env[600];
    harness_path(tc, "samples", prefix, sizeof prefix);
    snprintf(env, sizeof env, "MSA_DIST_TEST_SAMPLES=%s", prefix);
    RunOutcome o = harness_train(tc, 4, NULL, "--set train.steps=3 --set train.grad_accum=2", env);
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
    RunOutcome o = harness_train(tc, 2, NULL, "", "MSA_DIST_TEST_FAIL=1:3");
    printf("    exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0, "mpirun exited 0");
    EXPECT(strstr(o.err, "error: rank 1: test hook MSA_DIST_TEST_FAIL"), "stderr lacks rank 1's message: %s", o.err);
    EXPECT(o.seconds < 20, "the job took %.1f s to end", o.seconds);
}

/* A rank that hangs: the others give up after dist.timeout and end the job with a message. */
TEST(hanging_rank_makes_the_others_time_out) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 2, NULL, "--set dist.timeout=2", "MSA_DIST_TEST_HANG=1:3");
    printf("    exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0, "mpirun exited 0");
    EXPECT(strstr(o.err, "error: rank 0:") && strstr(o.err, "did not complete within dist.timeout = 2 s"),
           "stderr lacks rank 0's timeout message: %s", o.err);
    EXPECT(o.seconds < 30, "the job took %.1f s to end", o.seconds);
}

TEST(rank_counts_that_do_not_fit_are_refused) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 4, NULL, "--set train.batch_size=6", "");
    EXPECT(o.status != 0 && strstr(o.err, "train.batch_size = 6 is not divisible by the 4 data-parallel ranks"),
           "batch 6 on 4 ranks: %s", o.err);
    o = harness_train(tc, 2, NULL, "--set dist.dp=3", "");
    EXPECT(o.status != 0 && strstr(o.err, "dist.dp * dist.ep * dist.cp = 3 * 1 * 1 = 3, but the job has 2 ranks"),
           "dp 3 on 2 ranks: %s", o.err);
    o = harness_train(tc, 0, NULL, "--set dist.dp=2", "");
    EXPECT(o.status == 1 && strstr(o.err, "but the job has 1 rank"), "dp 2 without mpirun: %s", o.err);
    o = harness_train(tc, 2, NULL, "--set dist.ep=2 --set train.batch_size=5", "");
    EXPECT(o.status != 0 && strstr(o.err, "train.batch_size = 5 is not divisible by the dist.dp * dist.ep = 1 * 2"),
           "batch 5 over ep 2: %s", o.err);
}

/* ---- ranks agree or stop ------------------------------------------------------------------------- */

/* Rank 1 given one more --set than rank 0 (an MPMD job): the job stops before any training with rank 1's
 * message naming the key and both values. Once a different optim.lr, seed, batch or sequence length
 * trained on silently (exit 0) and a different d_model or n_layers died with "MPI Error in NBC
 * subrequest". */
TEST(ranks_with_different_settings_stop_naming_the_key) {
    EXPECT(FX->have_mpirun, "no mpirun");
    static const char *const cases[][2] = {
        {"optim.lr=0.002", "optim.lr = 0.002 here but 0.004 on rank 0"},
        {"train.seed=7", "train.seed = 7 here but 1337 on rank 0"},
        {"train.batch_size=4", "train.batch_size = 4 here but 8 on rank 0"},
        {"train.seq_len=32", "train.seq_len = 32 here but 64 on rank 0"},
        {"model.d_model=32", "model.d_model = 32 here but 64 on rank 0"},
        {"model.n_layers=3", "model.n_layers = 3 here but 2 on rank 0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char rank1[1024];
        snprintf(rank1, sizeof rank1, HARNESS_TRAIN " --set %s", cases[i][0]);
        const char *cmds[2] = {HARNESS_TRAIN, rank1};
        RunOutcome o = harness_train_ranks(tc, 2, cmds, 120);
        printf("    rank 1 with --set %s: exit %d after %.1f s\n", cases[i][0], o.status, o.seconds);
        EXPECT(o.status != 0 && strstr(o.err, "error: rank 1: ") && strstr(o.err, cases[i][1]) &&
                   !strstr(o.out, "step "),
               "rank 1 with --set %s: exit %d, want \"%s\" before any step: %s%s", cases[i][0], o.status, cases[i][1],
               o.out, o.err);
    }
}

/* The check compares what the ranks run, not how they were told: rank 1 reading a copy of the config file
 * from another path trains as rank 0 does. */
TEST(ranks_with_the_same_config_from_other_files_train) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char copy[600], cmd[2048], rank1[2048];
    harness_path(tc, "tiny_copy.json", copy, sizeof copy);
    snprintf(cmd, sizeof cmd, "cp configs/tiny.json %s", copy);
    EXPECT(system(cmd) == 0, "%s", cmd);
    const char *rest = strstr(HARNESS_TRAIN, " --set"); /* HARNESS_TRAIN with the copy as its config */
    snprintf(rank1, sizeof rank1, "build/train %s%s", copy, rest);
    const char *cmds[2] = {HARNESS_TRAIN, rank1};
    RunOutcome o = harness_train_ranks(tc, 2, cmds, 300);
    EXPECT(o.status == 0 && strstr(o.out, "done: 10 steps"), "exit %d: %s%s", o.status, o.out, o.err);
}

/* Per rank: a directory (the rank's working directory, -wdir) holding val.h5, a link to `target` or a FIFO
 * (target NULL); and its command line, with absolute paths but data.val_path = val.h5, so that the ranks
 * run the same config and each opens its own directory's file. */
static void rank_in_dir(TestCtx *tc, const char *name, const char *target, const char *args, char *cmd, size_t n) {
    char cwd[512], dir[512], link[600];
    if (!getcwd(cwd, sizeof cwd)) cwd[0] = 0;
    harness_path(tc, name, dir, sizeof dir);
    snprintf(link, sizeof link, "%s/val.h5", dir);
    mkdir(dir, 0755);
    unlink(link);
    char full[700];
    snprintf(full, sizeof full, "%s/%s", cwd, target ? target : "");
    if (target ? symlink(full, link) != 0 : mkfifo(link, 0644) != 0) perror(link);
    snprintf(cmd, n,
             "-wdir %s %s/build/train %s/configs/tiny.json --set train.steps=2 --set train.eval_batches=1 --set "
             "train.sample_tokens=0 --set data.train_path=%s/" TRAIN_DATA " --set data.val_path=val.h5 %s",
             dir, cwd, cwd, cwd, args);
}

/* The same config, but rank 1's val.h5 is another file (the training file): the headers differ, and rank 1
 * names the file's key and the header field. */
TEST(ranks_with_different_data_files_stop_naming_the_file) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char a[2048], b[2048];
    rank_in_dir(tc, "same_val", "data/shakespeare/val.h5", "", a, sizeof a);
    rank_in_dir(tc, "other_val", TRAIN_DATA, "", b, sizeof b);
    const char *cmds[2] = {a, b};
    RunOutcome o = harness_train_ranks(tc, 2, cmds, 120);
    EXPECT(o.status != 0 && strstr(o.err, "error: rank 1: ") &&
               strstr(o.err, "the data file header data.val_path: tokens = 1003854 here but 111540 on rank 0"),
           "exit %d: %s", o.status, o.err);
}

/* A rank that cannot finish opening a file (a FIFO no one writes: a stuck file system) makes the others
 * stop within dist.timeout, naming what they waited for; it once left them in MPI_Comm_split forever.
 * Rank 1's data file, and then its config file, is the FIFO. The token reader refuses a data file that is
 * not a regular file before it opens it (data/h5read.h), so that rank stops the job itself, at once; the
 * config file is opened as it is, so there the others' timeout must end the job. */
TEST(a_rank_stuck_opening_a_file_stops_the_job_within_the_timeout) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char a[2048], b[2048];
    rank_in_dir(tc, "fifo_ok", "data/shakespeare/val.h5", "--set dist.timeout=3", a, sizeof a);
    rank_in_dir(tc, "fifo_val", NULL, "--set dist.timeout=3", b, sizeof b);
    const char *cmds[2] = {a, b};
    RunOutcome o = harness_train_ranks(tc, 2, cmds, 60);
    printf("    rank 1's val.h5 a FIFO: exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0 && o.status != 124 && o.status != 137 && strstr(o.err, "error: rank 1: ") &&
               strstr(o.err, "val.h5: is not a regular file"),
           "exit %d after %.1f s: %s", o.status, o.seconds, o.err);
    EXPECT(o.seconds < 30, "the job took %.1f s to end", o.seconds);
    /* the config file: rank 1's is the FIFO (its directory's val.h5), rank 0's the real one */
    char fifo_config[600], config_fifo_cmd[2048];
    harness_path(tc, "fifo_val/val.h5", fifo_config, sizeof fifo_config);
    snprintf(config_fifo_cmd, sizeof config_fifo_cmd, "build/train %s --set dist.timeout=3", fifo_config);
    const char *cmds2[2] = {HARNESS_TRAIN " --set dist.timeout=3", config_fifo_cmd};
    o = harness_train_ranks(tc, 2, cmds2, 60);
    printf("    rank 1's config file a FIFO: exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0 && o.status != 124 && o.status != 137 && strstr(o.err, "error: rank 0: ") &&
               strstr(o.err, "did not complete within dist.timeout = 3 s"),
           "exit %d after %.1f s: %s", o.status, o.seconds, o.err);
    EXPECT(o.seconds < 30, "the job took %.1f s to end", o.seconds);
}

/* ---- the collectives themselves: this program under mpirun, in its --collectives mode ------------------ */

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
        char cmd[512], out[8192];
        snprintf(cmd, sizeof cmd, "build/tests/test_dist --collectives %d %d %d", l[1], l[2], l[3]);
        EXPECT(harness_run_ranks(tc, l[0], cmd, "collectives ok", out, sizeof out), "np %d, dp %d ep %d cp %d: %s",
               l[0], l[1], l[2], l[3], out);
    }
}

/* ---- main ----------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--collectives")) return collectives_main(argc, argv);
    HARNESS_TEST_BEGIN("test_dist", "");
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
    RUN(save_best_on_2_ranks_equals_single_process);
    RUN(no_two_ranks_read_the_same_sample);
    RUN(failing_rank_ends_the_job_with_its_message);
    RUN(hanging_rank_makes_the_others_time_out);
    RUN(rank_counts_that_do_not_fit_are_refused);
    RUN(ranks_with_different_settings_stop_naming_the_key);
    RUN(ranks_with_the_same_config_from_other_files_train);
    RUN(ranks_with_different_data_files_stop_naming_the_file);
    RUN(a_rank_stuck_opening_a_file_stops_the_job_within_the_timeout);
    HARNESS_TEST_END();
}
