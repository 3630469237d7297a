/* The harness of the multi-rank tests (tests/test_dist.c, test_dist_ep.c, test_dist_cp.c). Each of them
 * runs build/train on several ranks under mpirun and in one plain process, reads what the runs leave
 * (metrics.jsonl, the checkpoints) and checks that they agree within fp32 tolerance; and each runs itself
 * under mpirun in a mode of its own (collectives, an MoE layer, the cp exchanges). Launching, reading and
 * comparing live here, so that the three programs do them the same way with the same tolerances.
 *
 * A test program makes one DistHarness in main and sets tc->fixture to it; the functions that take a
 * TestCtx find it there. Commands name build/train and build/tests/..., so run from the repository root. */
#ifndef MSA_DIST_HARNESS_H
#define MSA_DIST_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../kernels/util.h"
#include "test.h"

/* Every run: configs/tiny.json, 10 logged steps, a 2-batch eval at the end, no sample text */
#define HARNESS_TRAIN                                                                                       \
    "build/train configs/tiny.json --set train.steps=10 --set train.log_every=1 "                           \
    "--set train.eval_batches=2 --set train.sample_tokens=0"
/* The settings of a run whose step-5 checkpoint the resume tests start from (harness_resume) */
#define HARNESS_CHECKPOINTS "--set train.checkpoint_every=5 --set train.keep_checkpoints=0"
#define HARNESS_MAX_STEPS 16

/* fp32 tolerances: metrics.jsonl prints losses with 6 decimals; parameters after 10 AdamW steps differ by
 * the rounding of sums taken in another order (measured ~1e-6) */
#define HARNESS_LOSS_TOL 2e-5
#define HARNESS_PARAM_ABS_TOL 1e-5
#define HARNESS_PARAM_REL_TOL 1e-5
#define HARNESS_MOMENT_REL_TOL 1e-4

/* In a rank mode (the program under mpirun): a failed check ends the whole job through fatal, which
 * calls MPI_Abort, with this rank's message; the test that launched the job shows it. */
#define CHECK(cond, ...)                                                                                    \
    do {                                                                                                    \
        if (!(cond)) fatal(__VA_ARGS__);                                                                    \
    } while (0)

/* Calls a harness check (which EXPECTs into tc) and ends the calling test when that check failed, as a
 * failed EXPECT of its own would. */
#define EXPECT_OK(call)                                                                                     \
    do {                                                                                                    \
        call;                                                                                               \
        if (tc->current_failed) return;                                                                     \
    } while (0)

typedef struct DistHarness {
    char dir[256];    /* the runs' temporary directory, removed by harness_free */
    bool have_mpirun;
    const char *args; /* settings every run of this program adds after HARNESS_TRAIN ("" for none) */
} DistHarness;

/* A temporary directory /tmp/msa_<program>_XXXXXX, whether mpirun is on PATH, and the environment every
 * launch needs. False (after perror) when the directory cannot be made. */
bool harness_init(DistHarness *h, const char *program, const char *args);
void harness_free(DistHarness *h);

/* main's opening and closing in a multi-rank test program, in place of TEST_BEGIN and TEST_END: the
 * harness made and put in tc->fixture (main returns 1 when it cannot be), its directory removed at the
 * end. */
#define HARNESS_TEST_BEGIN(program, args)                                                                   \
    TEST_BEGIN();                                                                                           \
    DistHarness harness_storage;                                                                            \
    if (!harness_init(&harness_storage, program, args)) return 1;                                           \
    tc->fixture = &harness_storage

#define HARNESS_TEST_END()                                                                                  \
    do {                                                                                                    \
        harness_free(&harness_storage);                                                                     \
        TEST_END();                                                                                         \
    } while (0)

/* buf = <the temporary directory>/<name> */
void harness_path(TestCtx *tc, const char *name, char *buf, size_t n);

/* ---- launching ---------------------------------------------------------------------------------- */

typedef struct RunOutcome {
    int status;     /* exit status, -1 when killed */
    double seconds;
    char err[8192]; /* the end of stderr */
    char out[8192]; /* the end of stdout */
} RunOutcome;

/* HARNESS_TRAIN, the harness's settings, train.out_dir = out_dir (unless NULL), then args. np = 0: a
 * plain process, else mpirun -np np; env: extra "NAME=value ..." for the command, or "". */
RunOutcome harness_train(TestCtx *tc, int np, const char *out_dir, const char *args, const char *env);
/* One job of several programs (MPMD: `mpirun -np 1 A : -np 1 B ...`), one rank per entry of rank_cmds, each
 * a command line for its rank (mpirun options such as -wdir first, then the program and its arguments);
 * so that ranks can be given different arguments. Killed after timeout_s (status 124 or 137), so that a
 * job that hangs fails the test rather than stopping the suite. */
RunOutcome harness_train_ranks(TestCtx *tc, int n, const char *const *rank_cmds, double timeout_s);
/* A finished run of args on np ranks (0 = plain process) into <tmp>/<name>, its directory in dir. A run
 * that finished there already (the single-process reference of several tests) is reused. False, after
 * printing the run's stderr, when it fails. */
bool harness_run_into(TestCtx *tc, const char *name, int np, const char *args, char *dir, size_t n);
/* A copy of the step-5 checkpoint of the run in from_dir (run with HARNESS_CHECKPOINTS), resumed in the
 * fresh directory <tmp>/resume_on_<np> (into dir) on np ranks with "--resume <args>". A failed copy reads
 * as status -1 with the command in err. */
RunOutcome harness_resume(TestCtx *tc, const char *from_dir, int np, const char *args, char *dir, size_t n);
/* mpirun -np np <cmd> (the test program in one of its rank modes), stdout and stderr together; out gets
 * their end. True when mpirun exited 0 and each of the np ranks printed ok_word. */
bool harness_run_ranks(TestCtx *tc, int np, const char *cmd, const char *ok_word, char *out, size_t n);

/* ---- what a run leaves: metrics.jsonl and the checkpoints --------------------------------------- */

typedef struct RunMetrics {
    int n; /* training records */
    int step[HARNESS_MAX_STEPS];
    double loss[HARNESS_MAX_STEPS], aux[HARNESS_MAX_STEPS], grad_norm[HARNESS_MAX_STEPS];
    double val_loss, val_kl, val_recall, val_dense; /* the last eval record's (NAN if absent) */
} RunMetrics;
RunMetrics harness_read_metrics(const char *run_dir);

typedef struct StepDiff {
    double loss, aux, grad_norm; /* largest |a - b| over the steps both logged from `from` on */
    int common;                  /* how many such steps */
} StepDiff;
StepDiff harness_compare_steps(const RunMetrics *a, const RunMetrics *b, int from);

typedef struct TensorDiff {
    double max_abs, max_rel; /* over tensors: max |a - b|, max ||a - b|| / ||a|| */
    int tensors;
    bool ok;                 /* both files readable with the same tensors */
} TensorDiff;
/* Group gname ("params", "optimizer/m", "state", ...) of two checkpoints, tensor by tensor: the same
 * names and sizes (so every expert is there), and the largest differences. */
TensorDiff harness_compare_group(const char *file_a, const char *file_b, const char *gname);
/* An integer attribute of a checkpoint ("data_counter", "adam_t"), -1 if absent */
long long harness_ckpt_attr(const char *file, const char *name);
/* The shape of dataset `name` (up to max_dims of it into dims), or 0 dims if absent */
int harness_ckpt_dims(const char *file, const char *name, int64_t *dims, int max_dims);

/* Two finished runs side by side: their metrics, the steps both logged from `from` on, the last evals and
 * the groups of their final checkpoints (ckpt_00000010.h5). */
typedef struct RunDiff {
    RunMetrics a, b;
    StepDiff steps;
    double val_loss, val_kl, val_recall, val_dense; /* |a - b| of the last evals', 0 where both lack it */
    char ckpt_a[600], ckpt_b[600];
    TensorDiff params, m, v, state; /* groups params, optimizer/m, optimizer/v, state */
} RunDiff;
RunDiff harness_compare_runs(const char *a_dir, const char *b_dir, int from);

/* ---- checks (EXPECTs into tc: follow with EXPECT_OK where more checks come) ---------------------- */

/* Runs (or reuses, as harness_run_into) the single-process run ref_name of ref_args and the np-rank run
 * <name>_np<np> of args, and compares them into d. */
void harness_run_pair(TestCtx *tc, const char *ref_name, const char *ref_args, const char *name, int np,
                      const char *args, RunDiff *d);

enum {
    HARNESS_CHECK_EVAL = 1,    /* the per-step aux term (the MSA KL), the eval's KL, recall and dense loss */
    HARNESS_CHECK_STATE = 2,   /* the checkpoints' state group (the MoE selection biases) equal */
    HARNESS_CHECK_COUNTER = 4, /* the checkpoints' data counters equal */
};
/* The two runs of d are the same training within fp32 tolerance: 10 common steps, the losses and
 * gradient norms, the last eval, the final parameters and AdamW moments (and what `checks` adds). */
void harness_expect_same_training(TestCtx *tc, const RunDiff *d, unsigned checks);
/* The run resumed from the step-5 checkpoint (b of d) ends as the uninterrupted run (a): steps 6-10, the
 * final parameters and second moments; with train_state its data counter and AdamW step too. */
void harness_expect_resumed(TestCtx *tc, const RunDiff *d, bool train_state);

#endif
