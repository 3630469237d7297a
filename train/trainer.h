/* The training run: everything one `build/train` invocation holds, and the steps of the loop.
 * train/main.c parses the command line and drives it; integration tests drive it the same way. */
#ifndef MSA_TRAINER_H
#define MSA_TRAINER_H

#include <stdio.h>

#include "../autograd/profile.h"
#include "../data/dataset.h"
#include "../dist/dist.h"
#include "config.h"
#include "grad_buckets.h"
#include "model.h"
#include "optim.h"
#include "step_graph.h"

/* Test hooks of tests/test_dist.c, read from the environment by run_init (all off when unset):
 *   MSA_DIST_TEST_FAIL=<rank>:<step>   that world rank calls fatal() when it starts that step
 *   MSA_DIST_TEST_HANG=<rank>:<step>   that world rank stops there forever (the others must time out)
 *   MSA_DIST_TEST_HANG_IN_BUCKET=<rank>:<step>  that world rank stops forever in that step's backward, right
 *                                      after it has started its first gradient bucket (dist.bucket_mb > 0)
 *   MSA_DIST_TEST_FAIL_IN_BUCKET=<rank>:<step>  ... calls fatal() there instead
 *   MSA_DIST_TEST_SAMPLES=<prefix>     every rank appends the window numbers it reads to <prefix>.<rank> */
typedef struct DistTestHooks {
    int fail_rank, fail_step, hang_rank, hang_step, bucket_hang_rank, bucket_hang_step, bucket_fail_rank,
        bucket_fail_step;
    FILE *samples;
} DistTestHooks;

typedef struct Run {
    RunConfig cfg;
    const char *config_path;
    /* the ranks of the run: main.c passes the one dist_init made; NULL (tests that drive the trainer
     * in-process) = one process without MPI (run_init points it at single_dist) */
    Dist *dist;
    Dist single_dist;
    /* the context- and expert-parallel groups as the model's ops see them (kernels/comm.h): made from
     * dist's cp and ep groups in run_init, pointed at by Model.cp, Model.ep and the MoE layers */
    Comm cp_comm, ep_comm;
    /* ZeRO-1: the parameter store in regions of parameters that the same ranks hold, each with its
     * gradients summed and its optimizer state sharded over those ranks (ZeroRegion). Without expert
     * parallelism one region, the whole store over the dist.dp * dist.cp ranks (Dist.dp_cp_group); with
     * it (dist.ep > 1) every parameter but the routed experts over the world (region 0, r->opt), and the
     * routed experts, the store's last parameters, over the dp * cp ranks that hold the same experts
     * (region 1, r->opt_experts). */
    ZeroRegion zero[2];
    int n_zero;
    /* dist.bucket_mb > 0: the regions' reduce-scatters and all-gathers in buckets that overlap the backward
     * and what follows the update (grad_buckets.h); none (n = 0) otherwise */
    GradBuckets buckets;
    DistTestHooks hooks;
    const KernelBackend *be;
    TokenDataset train_ds, val_ds;
    DataMix train_mix;   /* the data.train_mix files (n = 0: data.train_path alone) */
    Model model;
    Engine engine;
    AdamW opt;         /* the moments of this rank's shard of region 0 (the whole store in one process) */
    AdamW opt_experts; /* ... of region 1 (expert parallelism only) */
    Sampler sampler;
    Batch batch;       /* this rank's part of each micro-batch: train.batch_size / (dp * ep) sequences (the
                          same on the cp ranks of a (dp, ep) index; the model takes its 1/cp of their tokens) */
    FILE *metrics;     /* out_dir/metrics.jsonl or NULL */
    int dir_lock;      /* rank 0 with out_dir set: the descriptor holding out_dir's lock (run_lock.h); else -1 */
    int step;          /* optimizer steps done */
    int start_step;    /* the step this process started from (the checkpoint's step when resumed) */
    bool quiet;        /* no progress output (tests) */
    bool stopped;      /* run_train stopped early on SIGINT/SIGTERM/SIGHUP, after writing a checkpoint */
    bool eval_stopped; /* the last run_evaluate was cut short by a stop signal (its loss: NaN) */
    char checkpoint[CFG_STR + 32]; /* the checkpoint last written or resumed from ("" = none) */
    /* the lowest validation loss of the periodic and final evals so far, NaN before the first: kept in
     * every checkpoint, so a resumed run goes on comparing against it (train.save_best) */
    double best_val_loss;
    /* the run's first validation loss (NaN before it), kept in every checkpoint: the reference of
     * train.diverge_factor, so that a resumed run is held to the same bound */
    double first_val_loss;
    double t_start, t_last;
    int64_t tokens_since_log;
    /* The step's numbers that stay in the backend's memory until the host reads them: the gradients' sum
     * of squares (f64 [1]), the clipping factor the update reads (f32 [1]) and each micro-batch's LM and
     * auxiliary losses ([2 * train.grad_accum], the losses' dtype). run_step reads them (a wait for the
     * device on a GPU) on the steps it logs, and on every step unless defer_step_results is set: run_train
     * sets it, so that a CUDA step waits nowhere; StepResult's loss, aux and grad_norm are NaN on the steps
     * not read, and a non-finite loss is found at the next step that is. */
    Tensor grad_sumsq, clip_scale, micro_losses;
    bool defer_step_results;
    /* model.dropout > 0: the masks' seeds of the step's micro-batches (i32 [grad_accum][2 * model_dropout_sites]),
     * written before the step's work, read by the dropout kernels; data NULL otherwise */
    Tensor dropout_seeds;
    /* train.profile_steps > 0: the step profiler, attached to the engine (Engine.prof) during the
     * profiled steps only (never during evaluation or sampling); NULL otherwise */
    Profiler *prof;
    /* train.cuda_graph: the step captured in a CUDA graph and replayed (step_graph.h); graph.on is false
     * when the run does not (the CPU, train.cuda_graph = off, or a run graph_refusal names) */
    StepGraph graph;
} Run;

typedef struct StepResult {
    double loss;       /* mean LM loss over the step's micro-batches */
    double aux;        /* mean weighted auxiliary loss (MSA KL, MoE balance) */
    double grad_norm;  /* before clipping */
    float lr;
    MoeSummary moe;    /* routing balance of the step (MoE models) */
    Metrics layers;    /* the layers' statistics over the step's forwards, all ranks ("kl": the unweighted
                          mean KL of each MSA layer, whatever msa.kl_weight) */
} StepResult;

/* What an evaluation reports besides the validation loss. */
typedef struct EvalMetrics {
    Metrics layers;      /* the layers' statistics over the validation batches ("kl", "recall") */
    double dense_loss;   /* LM loss with every MSA layer in dense attention (eval_dense_reference) */
    bool has_dense_loss;
} EvalMetrics;

/* Open data, build model and optimizer from r->cfg (already loaded); exits with a message on bad input.
 * With r->dist from dist_init (several ranks): sets up the dist.dp/ep/cp groups, splits every micro-batch
 * over the data- and expert-parallel ranks (and their tokens over the context-parallel ranks, train/model.h),
 * splits the MoE layers' routed experts over the ep ranks (layers/moe.h) and shards the optimizer state
 * (ZeRO-1, Run.zero); rank 0 alone reads checkpoints (and hands the others what they need; every expert is
 * in a checkpoint, whatever dist.ep), writes them, the run directory and the progress output.
 * train.resume: continue from the newest checkpoint in out_dir that verifies (checkpoint_verify; newer ones
 * that do not are skipped with a warning saying why): parameters, optimizer, MoE biases, step, data
 * position, bit-for-bit as if the run had never stopped; train.init_from: take the parameters of
 * a checkpoint (MSA index parameters it lacks keep their fresh initialisation). A fresh run refuses an
 * out_dir that holds checkpoints of an earlier run rather than mixing its checkpoints with them, and rank 0
 * holds out_dir's lock (run_lock.h) until run_free. With several ranks, every rank's effective config and
 * data file headers must equal rank 0's (ranks_agree.h), checked before the first collective without a
 * timeout and before out_dir is touched. */
void run_init(Run *r);
void run_free(Run *r);
/* One optimizer step (grad_accum micro-batches), with progress output every log_every steps. With
 * train.profile_steps = N, the N steps after this process's first are profiled per op (autograd/profile.h),
 * and the last of them ends by printing the table (rank 0) and writing out_dir/profile.md. With data
 * parallelism the step equals a single process's step over the same global batch (up to fp32 rounding):
 * the same windows, the same mean loss, the global gradient norm for clipping. */
StepResult run_step(Run *r);
/* Mean validation loss over eval_batches fixed batches; the layers' statistics into em (NULL: none). */
double run_evaluate(Run *r, EvalMetrics *em);
/* The whole loop: steps, evals, checkpoints (every train.checkpoint_every steps and at the end, when
 * out_dir is set), final summary. With train.save_best, every eval whose loss is below r->best_val_loss
 * also writes out_dir/ckpt_best.h5 (before that step's regular checkpoint, which then records the new
 * best). With out_dir set, SIGINT/SIGTERM/SIGHUP stop it after the current step, or within an eval (before
 * its next batch: the eval is cut short and not logged), with a checkpoint (r->stopped;
 * a second signal kills). A validation loss that is not finite or above train.diverge_factor times the
 * run's first ends the program (exit 1) before anything is written from those weights. Returns the last
 * validation loss (NAN if none). */
double run_train(Run *r);
/* Write out_dir/ckpt_<step>.h5 now (atomically, verified before it takes its name) and only then delete
 * the older ones beyond train.keep_checkpoints (ckpt_best.h5 and checkpoints of later steps are never
 * among them); returns its path (r->checkpoint). Collective: every rank calls it. */
const char *run_checkpoint(Run *r);
/* Sample text from the model (char/byte tokenizers) to stdout: rank 0 prints; call it on every rank (with
 * expert parallelism the ranks of rank 0's ep group compute with it; the others return at once). */
void run_sample(Run *r);
/* The sampler's next-token distribution after ctx[0..len) (the last seq_len tokens of it), at the given
 * temperature: probs[vocab_size], summing to 1. No gradient, no effect on training state. */
void run_next_token_probs(Run *r, const int32_t *ctx, int len, double temperature, double *probs);
/* The model's mean cross-entropy of tokens[1..len) given what precedes each, as one document (the loss
 * path: the check against which the sampler's distribution is tested). 2 <= len <= seq_len + 1. */
double run_text_loss(Run *r, const int32_t *tokens, int len);

#endif
