/* A training step captured as a CUDA graph and replayed (train.cuda_graph, issue 16): a small model's
 * step is hundreds of short kernels, and issuing them from the host costs more than running them. The
 * trainer runs the first steps eagerly (plans, workspaces and arena chunks reach their final sizes), then
 * captures one whole step (forward, backward, optimizer: kernels.def's graph_begin / graph_end) and from
 * then on launches the graph instead of running the tape: one launch per step, the same kernels with the
 * same arguments in the same order, so the same bits as the eager step.
 *
 * What a replay cannot see, and how it gets it instead:
 *   - the batch: each micro-batch is sampled into a host batch of its own (StepGraph.host) before the
 *     step's work and copied into fixed device buffers (StepGraph.tokens, ...) that the captured step
 *     reads, never into the step's arena;
 *   - the optimizer's learning rate and bias corrections, and the dropout masks' seeds: uploaded before
 *     the launch (adamw_begin_step, Run.dropout_seeds), read by the kernels from device memory;
 *   - what the host knew of the batch when it captured (the cross-entropy's counted rows, the documents
 *     that cuDNN's attention plan and the grids follow, the longest position): a step whose micro-batches
 *     differ there from the captured ones (or whose targets are not all counted) runs eagerly;
 *   - memory the graph uses: a graph stays valid while the backend has freed nothing (memory_releases);
 *     after a free it is dropped, and captured again after an eager step that freed nothing;
 *   - the training phase (optim.warmup_trainable, the parameters' learning-rate scales): a step of another
 *     phase drops the graph.
 * MoE layers keep their routing statistics and selection bias in the backend's memory (layers/moe.h), so a
 * replay accumulates the statistics as the eager step does; MSA layers' KL values land in their KL logs on the
 * device. What the host keeps of a replay's forwards (the MoE counts, the KL log's records) each layer makes
 * as the captured step's forwards left it (LayerKind.replayed, model_replayed); records nobody reads are
 * dropped after the launch, as an eager step's. Runs the capture cannot serve
 * (window attention: its selection goes through the host; MoE layers whose expert GEMMs take the per-expert
 * path, which copies the routing to the host; several ranks; offloaded block inputs; document-sampled
 * batches) are refused by the trainer before the first step (train/trainer.c graph_refusal). */
#ifndef MSA_STEP_GRAPH_H
#define MSA_STEP_GRAPH_H

#include <stdbool.h>
#include <stdint.h>

#include "../data/dataset.h"
#include "model.h"

typedef enum { STEP_EAGER = 0, STEP_CAPTURE, STEP_REPLAY } StepMode;

typedef struct StepGraph {
    bool on;                 /* the run captures its steps (step_graph_init); all else is unused when off */
    const KernelBackend *be;
    int grad_accum;
    Batch *host;             /* [grad_accum]: the step's micro-batches, sampled before its work */
    Tensor *tokens, *targets, *positions, *cu_seqlens; /* [grad_accum] each: fixed device buffers */
    void *graph;             /* the captured step; NULL: none */
    int64_t nodes;           /* its kernels, copies and memsets */
    int64_t releases;        /* the backend's memory_releases when graph was captured */
    bool phase;              /* the training phase it was captured in */
    Batch *key;              /* [grad_accum]: the captured step's micro-batches (their documents) */
    bool eager_before;       /* the previous step ran eagerly in this mode ... */
    int64_t eager_releases;  /* ... and began at this memory_releases */
    int64_t captures, replays, eager; /* steps of each kind so far */
} StepGraph;

/* Buffers for grad_accum micro-batches of B x T tokens on be (which must have the GRAPH entries). */
void step_graph_init(StepGraph *g, const KernelBackend *be, int grad_accum, int B, int T);
void step_graph_free(StepGraph *g);
/* How this step runs, its micro-batches sampled into g->host and `phase` the step's training phase:
 * STEP_REPLAY when the graph fits them, else STEP_CAPTURE when the previous step ran eagerly and freed no
 * memory, else STEP_EAGER (a graph that no longer fits is dropped first); STEP_EAGER whatever the graph
 * when eager_only (a profiled step). */
StepMode step_graph_mode(StepGraph *g, bool phase, bool eager_only);
/* Copy micro-batch `micro` (g->host[micro]) into the fixed buffers (before a capture: a copy from the host
 * inside one would be frozen). */
void step_graph_upload(StepGraph *g, int micro);
/* The input the model reads from the fixed buffers of micro-batch `micro` (uploaded). */
ModelInput step_graph_input(StepGraph *g, int micro);
/* After the capture (between be->graph_begin and here the step's work was recorded): keep the graph
 * and what it froze. */
void step_graph_captured(StepGraph *g, bool phase);

#endif
