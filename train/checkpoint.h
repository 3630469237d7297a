/* Checkpoints in HDF5 (DESIGN §7).
 *
 * File layout (format "msa-train-checkpoint", version 1):
 *   /params/<name>          f32, the parameter's shape; <name> is the model's parameter name
 *                           ("wte", "layers.3.attn.wq", "layers.5.index.wk", ...)
 *   /optimizer/m/<name>     f32, AdamW first moment (absent in an imported checkpoint)
 *   /optimizer/v/<name>     f32, AdamW second moment
 *   /state/<name>           other training state that is not a parameter, e.g. the MoE selection
 *                           bias "layers.<l>.moe.bias" f32 [E]
 *   root attributes:        format (string), version (int), step (int64, optimizer steps done),
 *                           adam_t (int), data_counter (uint64, the sampler's windows drawn),
 *                           seed (uint64), config (string: the run's config as JSON),
 *                           best_val_loss (float64: the lowest validation loss of the run up to
 *                           this step, which train.save_best compares against; NaN = none yet.
 *                           Optional: a file without it, written before it existed or imported,
 *                           reads as none, so it needs no new version)
 * Written to <path>.tmp and renamed over <path>, so a crash mid-write never destroys the last good
 * checkpoint. Every read validates and stops with "error: <file>: <problem>" (not a checkpoint,
 * truncated, missing tensor, shape mismatch) without touching any file. */
#ifndef MSA_CHECKPOINT_H
#define MSA_CHECKPOINT_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "optim.h"

typedef struct TrainState {
    int64_t step;           /* optimizer steps done */
    uint64_t data_counter;  /* Sampler.counter */
    uint64_t seed;
    double best_val_loss;   /* lowest validation loss so far (train.save_best); NaN = none yet */
} TrainState;

/* Write a full checkpoint (parameters, optimizer state, MoE biases, train state, config). opt NULL
 * writes no /optimizer group (an imported checkpoint); st NULL writes step 0 and best_val_loss NaN;
 * config_json NULL, no config. opt must hold the moments of the whole store, in the memory of opt->be
 * (which may differ from the model's: a data-parallel run gathers the shards of its ranks into host
 * memory and passes them with the CPU backend). Test hook: MSA_CKPT_TEST_KILL_AFTER_PARAMS=<step> (checkpoint.c). */
void checkpoint_write(const char *path, const Model *m, const AdamW *opt, const TrainState *st, const char *config_json);

/* Load parameters by name into an already built model. A parameter the file lacks is an error unless
 * it belongs to an MSA index branch and allow_missing_index is set (it keeps its fresh
 * initialisation: that is how a dense checkpoint becomes an MSA model). A tensor in the file that
 * the model lacks, or a shape mismatch, is an error. The MoE selection biases the file holds in /state
 * are loaded too (they decide which experts run; a file without them leaves them as they are). Returns
 * the number of parameters loaded. */
int checkpoint_read_params(const char *path, Model *m, bool allow_missing_index);

/* Load optimizer moments, MoE biases and the train state (for --resume); opt->t gets adam_t; a file
 * without best_val_loss gives NaN there. A file without optimizer state (an imported checkpoint) is an
 * error. opt holds the whole store's moments, in the memory of opt->be (a data-parallel run reads into
 * host memory, then scatters the shards). */
void checkpoint_read_state(const char *path, Model *m, AdamW *opt, TrainState *st);

/* The config JSON stored in a checkpoint (malloc'd), or NULL if it has none. */
char *checkpoint_read_config(const char *path);

#endif
