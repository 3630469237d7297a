/* The training run: everything one `build/train` invocation holds, and the steps of the loop.
 * train/main.c parses the command line and drives it; integration tests drive it the same way. */
#ifndef MSA_TRAINER_H
#define MSA_TRAINER_H

#include <stdio.h>

#include "../data/dataset.h"
#include "config.h"
#include "model.h"
#include "optim.h"

typedef struct Run {
    RunConfig cfg;
    const char *config_path;
    const KernelBackend *be;
    TokenDataset train_ds, val_ds;
    DataMix train_mix;   /* the data.train_mix files (n = 0: data.train_path alone) */
    Model model;
    Engine engine;
    AdamW opt;
    Sampler sampler;
    Batch batch;
    FILE *metrics;     /* out_dir/metrics.jsonl or NULL */
    int step;          /* optimizer steps done */
    int start_step;    /* the step this process started from (the checkpoint's step when resumed) */
    bool quiet;        /* no progress output (tests) */
    bool stopped;      /* run_train stopped early on SIGINT/SIGTERM, after writing a checkpoint */
    char checkpoint[CFG_STR + 32]; /* the checkpoint last written or resumed from ("" = none) */
    double t_start, t_last;
    int64_t tokens_since_log;
} Run;

typedef struct StepResult {
    double loss;       /* mean LM loss over the step's micro-batches */
    double aux;        /* mean weighted auxiliary loss (MSA KL, MoE balance) */
    double grad_norm;  /* before clipping */
    float lr;
    MoeSummary moe;    /* routing balance of the step (MoE models) */
} StepResult;

/* Open data, build model and optimizer from r->cfg (already loaded); exits with a message on bad input.
 * train.resume: continue from the newest checkpoint in out_dir (parameters, optimizer, MoE biases, step,
 * data position), bit-for-bit as if the run had never stopped; train.init_from: take the parameters of
 * a checkpoint (MSA index parameters it lacks keep their fresh initialisation). A fresh run refuses an
 * out_dir that holds checkpoints of an earlier run rather than mixing its checkpoints with them. */
void run_init(Run *r);
void run_free(Run *r);
/* One optimizer step (grad_accum micro-batches), with progress output every log_every steps. */
StepResult run_step(Run *r);
/* Mean validation loss over eval_batches fixed batches; MSA metrics when the model has MSA layers. */
double run_evaluate(Run *r, MsaMetrics *mm);
/* The whole loop: steps, evals, checkpoints (every train.checkpoint_every steps and at the end, when
 * out_dir is set), final summary. With out_dir set, SIGINT/SIGTERM stop it after the current step with
 * a checkpoint (r->stopped; a second signal kills). Returns the last validation loss (NAN if none). */
double run_train(Run *r);
/* Write out_dir/ckpt_<step>.h5 now (atomically) and delete all but the newest train.keep_checkpoints;
 * returns its path (r->checkpoint). */
const char *run_checkpoint(Run *r);
/* Sample text from the model (char/byte tokenizers) to stdout. */
void run_sample(Run *r);

#endif
