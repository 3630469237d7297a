/* Step profiler: where the time of a training step goes, per op kind, forward and backward.
 *
 * The trainer attaches a Profiler to the engine (Engine.prof) for the steps it profiles
 * (train.profile_steps) and detaches it afterwards; with none attached every hook below is one NULL
 * test. While attached:
 *   - every op_* function brackets its work with engine_op_begin / engine_op_end (engine.h), and
 *     engine_backward_tape brackets each backward rule it calls; both ends synchronise the device
 *     (KernelBackend.synchronize), so asynchronous CUDA work is charged to the op that launched it and
 *     not to whichever later op happens to wait for it. A forward bracket spans the op's output
 *     allocation, kernels and tape record (its host-side argument checks come before it); it is the
 *     same whether the op records a node or not (no-grad mode, frozen inputs), so a forward is timed
 *     however it runs. Bracketing explicitly, rather than timing from one engine_record to the next,
 *     keeps untaped forwards, views and the model code between ops out of the ops' times. An op that
 *     does nothing (dropout with p = 0, a context-parallel exchange over one rank, checkpoint in no-grad
 *     mode, which just calls the block) opens no bracket and counts no call;
 *   - the brackets nest, and each op is charged its SELF time: the time of its bracket minus the
 *     brackets opened inside it. This matters for activation checkpointing (op_checkpoint): its forward
 *     runs the block's ops without recording and its backward replays them (then runs their backward
 *     rules) inside its own bracket, so those ops are charged to themselves (the replay as "recompute"
 *     time, apart from their forward time) and checkpoint keeps only its glue (the output copy, the
 *     gradient seeds);
 *   - non-differentiable work that is no tape op (the MSA Top-k indexer and plan, the MoE Top-k and
 *     plan, the expert-parallel dispatch plan) is timed under the name its caller gives
 *     (engine_op_end_named), forward only: a kind numbered after the ops when the name first occurs;
 *   - everything else of the forward and backward (sampling and uploading the batch, the loss reads,
 *     arena resets, zeroing gradients, the gradient buffer the first view of a tensor that requires grad
 *     allocates, the backward's seed) is "other": the time outside every bracket from
 *     the start of the step to the end of its last backward, measured, not derived. The optimizer
 *     phase (collectives, gradient norm and clipping, AdamW, MoE bias update) is one more bracket from
 *     the end of the backward to the end of the step. Op self times + other + optimizer = the step's
 *     wall time, up to rounding, which tests/test_profile.c checks.
 *
 * Memory (attached with engine_set_profiler, which makes it watch the engine's activation arena): every
 * allocation from the arena is charged to the op whose bracket is innermost when it is made, under the
 * phase that bracket closes with (so a checkpoint's replay charges the block's ops as "recompute", and
 * the gradient buffers a backward rule allocates are charged to that op's backward), or to "other"
 * outside every bracket. At the arena's high-water mark (the most bytes live at once over the profiled
 * steps, rewinds included) the profiler keeps a snapshot of the bytes live per kind and phase: the table's
 * memory columns. They include the 64-byte alignment and the tail of an arena chunk that an allocation
 * skipped, so they sum to the high-water mark exactly. Parameters, their gradients and the optimizer
 * state live outside the arena and are not in them.
 *
 * Synchronising around every op makes a profiled step slower than an unprofiled one on CUDA (no
 * overlap of launches with host work); the numbers it computes are unchanged. */
#ifndef MSA_PROFILE_H
#define MSA_PROFILE_H

#include <stdio.h>

#include "engine.h"

#define PROF_MAX_DEPTH 16
#define PROF_MAX_NAMED 16                          /* names of untaped work (engine_op_end_named) */
#define PROF_KIND_MAX (OP_COUNT + PROF_MAX_NAMED)  /* kinds: the ops, then the names */

/* One allocation from the watched arena: it ends at arena live offset `end`; kind -1 while the bracket
 * that made it is open (level: the bracket depth when it was made, 0 = outside every bracket). */
typedef struct ProfAlloc {
    size_t end, bytes;
    int kind, phase, level;
} ProfAlloc;

#define PROF_OTHER PROF_KIND_MAX /* the memory charged to no op: allocations outside every bracket */

typedef struct Profiler {
    const KernelBackend *be;                       /* whose synchronize brackets the ops */
    double self[PROF_KIND_MAX][PROF_PHASES];       /* seconds of self time, summed over the profiled steps */
    int64_t calls[PROF_KIND_MAX][PROF_PHASES];
    const char *named[PROF_MAX_NAMED];             /* kind OP_COUNT + i is named[i] */
    int n_named;
    double other;     /* seconds outside every op bracket, from step start to the end of the backward */
    double optimizer; /* seconds from the end of the backward to the end of the step, less any op inside */
    double wall;      /* seconds from step start to step end, synchronised at both ends */
    int steps;        /* profiled steps so far */
    /* the backend's host waits (KernelBackend.host_waits) in the profiled steps besides the profiler's own
     * synchronisations: what the step would wait for unprofiled (0 on CUDA after warm-up, except where
     * it reads its loss) */
    int64_t host_waits;
    int64_t own_waits, waits_at_step_start, own_at_step_start;
    /* the open brackets: start time and time spent in brackets nested inside */
    double start[PROF_MAX_DEPTH], nested[PROF_MAX_DEPTH];
    int depth;
    double mark;       /* when the current stretch outside every bracket began */
    double step_start; /* when the current step began */
    /* memory: the allocations live now, oldest first; bytes live per kind (PROF_OTHER last) and phase;
     * bytes made by still-open brackets per level; the same at the high-water mark (peak) */
    ProfAlloc *allocs;
    int n_allocs, cap_allocs;
    int alloc_start[PROF_MAX_DEPTH]; /* n_allocs when each open bracket began */
    size_t live_bytes[PROF_KIND_MAX + 1][PROF_PHASES], open_bytes[PROF_MAX_DEPTH + 1];
    size_t peak, peak_bytes[PROF_KIND_MAX + 1][PROF_PHASES], peak_open_bytes[PROF_MAX_DEPTH + 1];
} Profiler;

void profiler_init(Profiler *p, const KernelBackend *be);
void profiler_free(Profiler *p);
/* Bytes of kind k (PROF_OTHER: outside every op) live at the high-water mark, all phases / phases
 * forward and recompute only. */
size_t profiler_peak_bytes(const Profiler *p, int kind);
size_t profiler_peak_forward_bytes(const Profiler *p, int kind);
/* The phases of one profiled step, in this order: begin (synchronises), the forward and backward of
 * every micro-batch, backward_end (the optimizer phase starts), step_end (synchronises). */
void profiler_step_begin(Profiler *p);
void profiler_backward_end(Profiler *p);
void profiler_step_end(Profiler *p);

/* The name of a kind: the op's name in ops.def, or the name untaped work was timed under. */
const char *profiler_kind_name(const Profiler *p, int kind);
/* The kind of an op or a name of untaped work ("msa_indexer"), or -1 when that name never occurred. */
int profiler_kind(const Profiler *p, const char *name);
/* Self seconds of one kind over every phase. */
double profiler_kind_total(const Profiler *p, int kind);

/* The table, ms per profiled step, kinds sorted by total self time (kinds never called left out):
 *   | op | calls/step | forward ms/step | recompute ms/step | backward ms/step | total ms/step | % of step |
 *   | MiB at peak | of which forward |
 * (the memory columns empty when memory was not watched) then rows for the optimizer phase, other, and the profiled step wall time. calls/step counts
 * forward calls (a replay under recomputation is not one). title is the heading line. */
void profiler_write_table(const Profiler *p, FILE *f, const char *title);

#endif
