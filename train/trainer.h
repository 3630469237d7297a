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
    Model model;
    Engine engine;
    AdamW opt;
    Sampler sampler;
    Batch batch;
    FILE *metrics;     /* out_dir/metrics.jsonl or NULL */
    int step;          /* optimizer steps done */
    bool quiet;        /* no progress output (tests) */
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

/* Open data, build model and optimizer from r->cfg (already loaded); exits with a message on bad input. */
void run_init(Run *r);
void run_free(Run *r);
/* One optimizer step (grad_accum micro-batches), with progress output every log_every steps. */
StepResult run_step(Run *r);
/* Mean validation loss over eval_batches fixed batches; MSA metrics when the model has MSA layers. */
double run_evaluate(Run *r, MsaMetrics *mm);
/* The whole loop: steps, evals, final summary, sample. Returns the final validation loss. */
double run_train(Run *r);
/* Sample text from the model (char/byte tokenizers) to stdout. */
void run_sample(Run *r);

#endif
