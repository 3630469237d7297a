/* A checkpoint's model for the programs that only run forwards (build/forward, build/eval): the model a
 * config describes, the checkpoint's parameters, an engine without gradients, and the logits of one token
 * sequence read as one document. */
#ifndef MSA_INFERENCE_H
#define MSA_INFERENCE_H

#include "model.h"

typedef struct Inference {
    const KernelBackend *be;
    Model model;
    Engine engine;
} Inference;

/* The backend train.device names; stops with a message when this build lacks it. */
const KernelBackend *backend_for_device(const char *device);

/* Builds cfg's model (cfg validated here; model.vocab_size must be set, `where` names the config in that
 * message) and loads the checkpoint's parameters (MSA index parameters it lacks keep their fresh
 * initialisation, as train.init_from does). */
void inference_open(Inference *inf, const RunConfig *cfg, const char *where, const char *checkpoint);
void inference_close(Inference *inf);

/* The logits (float32 [T, V], malloc'd) of tokens [T] as one document, positions 0..T-1. A token outside
 * the vocabulary stops with a message naming `source`. metrics (NULL: none) gets the statistics the
 * layers report of this forward, those that cost extra work included (MSA: "recall"). */
float *inference_logits(Inference *inf, const int32_t *tokens, int64_t T, const char *source, Metrics *metrics);

#endif
