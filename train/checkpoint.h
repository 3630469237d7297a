/* Checkpoints in HDF5 (DESIGN §7).
 *
 * File layout (format "msa-train-checkpoint", version 2):
 *   /params/<name>          f32, the parameter's shape; <name> is the model's parameter name
 *                           ("wte", "layers.3.attn.wq", "layers.5.index.wk", ...)
 *   /optimizer/m/<name>     f32, AdamW first moment (absent in an imported checkpoint)
 *   /optimizer/v/<name>     f32, AdamW second moment
 *   /state/<name>           other training state that is not a parameter, e.g. the MoE selection
 *                           bias "layers.<l>.moe.bias" f32 [E]
 *   every tensor above:     attribute crc32 (uint32): the CRC-32 of its values as little-endian f32
 *                           bytes in row-major order (data/crc32.h; the same as Python's zlib.crc32)
 *   root attributes:        format (string), version (int), step (int64, optimizer steps done),
 *                           adam_t (int), data_counter (uint64, the sampler's windows drawn),
 *                           seed (uint64), config (string: the run's config as JSON),
 *                           best_val_loss (float64: the lowest validation loss of the run up to
 *                           this step, which train.save_best compares against; NaN = none yet),
 *                           first_val_loss (float64: the run's first validation loss, the reference of
 *                           train.diverge_factor; NaN = none yet). Both optional: a file without them,
 *                           written before they existed or imported, reads as none.
 * Version 1 is version 2 without the crc32 attributes (files written before checksums existed): it
 * still loads, with a warning that its tensors cannot be verified.
 *
 * Nothing in a checkpoint is trusted before it is checked: every attribute and tensor goes through
 * the checked reader (data/h5read.h), every tensor read is compared with its crc32 and refused when it
 * holds a NaN or an infinity, naming the tensor. checkpoint_write reads back and verifies what it wrote
 * before giving it the final name: written to <path>.tmp and renamed over <path> only then, so neither a
 * crash mid-write nor a bad write ever replaces the last good checkpoint. Every read validates and stops
 * with "error: <file>: <problem>" (not a checkpoint, truncated, missing tensor, shape mismatch, checksum
 * mismatch, a non-finite value) without touching any file; checkpoint_verify returns the problem
 * instead, so that --resume can fall back to an older checkpoint. */
#ifndef MSA_CHECKPOINT_H
#define MSA_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "optim.h"

typedef struct TrainState {
    int64_t step;           /* optimizer steps done */
    uint64_t data_counter;  /* Sampler.counter */
    uint64_t seed;
    double best_val_loss;   /* lowest validation loss so far (train.save_best); NaN = none yet */
    double first_val_loss;  /* the run's first validation loss (train.diverge_factor); NaN = none yet */
} TrainState;

/* Write a full checkpoint (parameters, optimizer state, MoE biases, train state, config), then read it
 * back and verify it (checkpoint_verify) before renaming it into place: when this returns, <path> is a
 * good checkpoint; any failure ends the program with the previous <path> untouched. opt NULL
 * writes no /optimizer group (an imported checkpoint); st NULL writes step 0 and NaN losses;
 * config_json NULL, no config. opt must hold the moments of the whole store, in the memory of opt->be
 * (which may differ from the model's: a data-parallel run gathers the shards of its ranks into host
 * memory and passes them with the CPU backend). Test hooks: MSA_CKPT_TEST_KILL_AFTER_PARAMS=<step>,
 * MSA_CKPT_TEST_CORRUPT=<step> (checkpoint.c). */
void checkpoint_write(const char *path, const Model *m, const AdamW *opt, const TrainState *st, const char *config_json);

/* Load parameters by name into an already built model. A parameter the file lacks is an error unless
 * it belongs to an MSA index branch and allow_missing_index is set (it keeps its fresh
 * initialisation: that is how a dense checkpoint becomes an MSA model). A tensor in the file that
 * the model lacks, or a shape mismatch, is an error. The MoE selection biases the file holds in /state
 * are loaded too (they decide which experts run; a file without them leaves them as they are). Returns
 * the number of parameters loaded. */
int checkpoint_read_params(const char *path, Model *m, bool allow_missing_index);

/* Load optimizer moments, MoE biases and the train state (for --resume); opt->t gets adam_t; a file
 * without best_val_loss or first_val_loss gives NaN there. A file without optimizer state (an imported checkpoint) is an
 * error. opt holds the whole store's moments, in the memory of opt->be (a data-parallel run reads into
 * host memory, then scatters the shards). */
void checkpoint_read_state(const char *path, Model *m, AdamW *opt, TrainState *st);

/* The config JSON stored in a checkpoint (malloc'd), or NULL if it has none. */
char *checkpoint_read_config(const char *path);

/* Checks the file on its own, without a model: one of our checkpoints, of a version this build reads,
 * every tensor in /params, /optimizer/m, /optimizer/v and /state a floating-point dataset whose values
 * are all finite and match its crc32, and the train-state attributes it has readable. Returns true, or
 * false with the first problem, "<file>: <object>: <problem>", in why; never ends the program. */
bool checkpoint_verify(const char *path, char *why, size_t why_len);

#endif
