/* The autograd engine: a tape (Wengert list) of op nodes, replayed backward.
 *
 * An op called while gradients are enabled and with at least one input that requires grad appends a
 * Node (its kind, inputs, outputs, saved tensors and scalars). engine_backward() walks the tape in
 * reverse and calls each node's backward rule (the op table, ops.def), which accumulates into the
 * inputs' gradients. Non-differentiable ops (Top-k, integer index ops) record nothing.
 *
 * Memory: activations, their gradients and tensor headers come from the engine's arenas and live
 * until engine_reset() (once per micro-step). Parameters live in a ParamStore (params.h). */
#ifndef MSA_ENGINE_H
#define MSA_ENGINE_H

#include "../kernels/backend.h"
#include "arena.h"

typedef enum {
#define OP(name) OP_##name,
#include "ops.def"
#undef OP
    OP_COUNT
} OpKind;

/* When an op's time was spent: its forward, its forward replayed by a checkpointed segment's backward
 * (Engine.recomputing), or its backward rule. */
typedef enum { PROF_FORWARD, PROF_RECOMPUTE, PROF_BACKWARD, PROF_PHASES } ProfPhase;

#define NODE_MAX_IN 8
#define NODE_MAX_OUT 2
#define NODE_PARAMS_BYTES 112 /* the largest, op_msa.c MsaKlParams */

/* One recorded op. Everything its backward rule needs besides inputs and outputs (scalars, saved
 * tensors such as rstd or lse, pointers such as a checkpoint's function) is the op's own params struct,
 * declared in its autograd/op_<name>.c and reached by name through NODE_PARAMS. */
typedef struct Node {
    OpKind op;
    int n_in, n_out;
    Tensor *in[NODE_MAX_IN];       /* NULL entries allowed (optional inputs) */
    Tensor *out[NODE_MAX_OUT];
    union {
        unsigned char bytes[NODE_PARAMS_BYTES];
        double align_double;
        void *align_pointer;
    } params;
} Node;

/* The params of node n as the op's struct T (zeroed by engine_record); a T larger than the node's room
 * does not compile. */
#define NODE_PARAMS(n, T) ((T *)(void *)((n)->params.bytes + 0 * sizeof(char[sizeof(T) <= NODE_PARAMS_BYTES ? 1 : -1])))

/* Gradient buffers whose tensors' gradients are dead, for the next gradient of the same size (inside a
 * checkpoint's backward: Engine.grad_pool). */
typedef struct PooledGrad {
    void *data;
    size_t bytes;
} PooledGrad;
typedef struct GradPool {
    PooledGrad *free;
    int n, cap;
} GradPool;

typedef struct Engine {
    const KernelBackend *be;
    Device device;
    DType act_dtype;   /* activation dtype: F32 on CPU, F64 in gradient checks, BF16 on CUDA */
    Arena data;        /* device memory: activations and activation gradients */
    Arena host;        /* host memory: Tensor headers */
    Node *tape;
    int tape_len, tape_cap;
    bool grad_enabled; /* false = no_grad mode: ops record nothing */
    bool recomputing;  /* inside a checkpointed segment's backward recompute: skip side effects
                          such as metrics, which the forward already collected */
    bool checkpoint_forward; /* inside a checkpointed segment's first forward, which its backward will
                                replay: a segment may keep what the replay can reuse (layers/msa.c) */
    struct Profiler *prof; /* the step profiler while the trainer profiles a step, else NULL */
    /* Offloading (train.offload_block_inputs): the output of a recorded checkpoint (the next block's
     * input) lives on the device in one of two slots outside the arena, which the checkpoints after it
     * take in turn, and between its forward and the backward that needs it in offload_host (the
     * backend's host_alloc memory, reset with the arena); autograd/op_checkpoint.c. */
    bool offload_block_inputs;
    Arena offload_host;
    void *offload_slot[2];
    size_t offload_slot_bytes;
    int offload_next;                   /* the slot the next output takes */
    /* the output each slot holds, or will once its lane's copies are waited for (a copy back from the
     * host issued ahead of the backward that reads it); NULL: nothing the offload can reuse */
    Tensor *offload_slot_holds[2];
    struct Offloaded *offloaded;        /* the outputs on the host this micro-step */
    int n_offloaded, cap_offloaded;
    /* Called after the outermost backward walk has passed tape entry i (run its rule, or skipped it):
     * every entry from i on is done, so gradients that only those entries write are final. The trainer
     * starts the reduction of finished gradient buckets here (train/grad_buckets.h); NULL: none. The
     * walks that a rule runs inside itself (a checkpoint's sub-tape) do not call it. */
    /* Set by a checkpoint's backward for its sub-tape's walk (autograd/op_checkpoint.c): after each rule,
     * the gradients of that node's outputs go to this pool and engine_grad takes from it, so that a
     * block's backward holds the gradients in flight rather than one per intermediate; NULL otherwise. */
    GradPool *grad_pool;
    void (*backward_progress)(void *ctx, int tape_index);
    void *backward_progress_ctx;
    int backward_depth; /* walks in progress (engine_backward_tape nests inside a checkpoint's rule) */
} Engine;

void engine_init(Engine *e, const KernelBackend *be, DType act_dtype, size_t arena_chunk_bytes);
void engine_free(Engine *e);
/* Drop the tape and every activation: call at the start of each micro-step. */
void engine_reset(Engine *e);

/* SHAPE(a, b, c) expands to "ndim, shape-array" for engine_empty and friends. */
#define SHAPE(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}

/* A fresh activation tensor in the arena (contents undefined) / zero-filled. */
Tensor *engine_empty(Engine *e, DType dt, int ndim, const int64_t *shape);
Tensor *engine_zeros(Engine *e, DType dt, int ndim, const int64_t *shape);
/* A tensor header over memory the caller owns (data), from the engine's header arena. */
Tensor *engine_empty_header(Engine *e, DType dt, int ndim, const int64_t *shape, void *data);
Tensor *engine_empty_like(Engine *e, const Tensor *t);
/* A view of t with another shape (same numel, shares data; no node: gradients flow through the
 * shared grad tensor, which the view creates on first use). */
Tensor *engine_view(Engine *e, Tensor *t, int ndim, const int64_t *shape);
/* The same data, cut off from the graph (stop-gradient). */
Tensor *engine_detach(Engine *e, Tensor *t);

/* dtype of saved statistics (rstd, lse) for activations of dtype dt: F64 for F64, else F32 */
static inline DType stat_dtype(DType dt) { return dt == DT_F64 ? DT_F64 : DT_F32; }

/* Gradient of t, allocated and zeroed on first use; NULL when t does not require grad. */
Tensor *engine_grad(Engine *e, Tensor *t);

/* Should an op with these inputs record a node? (grad enabled and some input requires grad) */
bool engine_wants_grad(const Engine *e, Tensor *const *inputs, int n);
/* Append a node to the tape (outputs then require grad); returns it for the op to fill. */
Node *engine_record(Engine *e, OpKind op, Tensor *const *inputs, int n_in, Tensor *const *outputs, int n_out);

/* Backward from a scalar (seed = NULL means d/d(out) = 1) or from out with the given seed gradient.
 * Walks the tape entries recorded after tape position `from` (0 = all). */
void engine_backward_from(Engine *e, Tensor *out, const Tensor *seed, int from);
static inline void engine_backward(Engine *e, Tensor *loss) { engine_backward_from(e, loss, NULL, 0); }
/* Run the backward rules of tape entries [from, tape_len) in reverse (gradients already seeded). */
void engine_backward_tape(Engine *e, int from);

/* Step profiler hooks (autograd/profile.h). Every op_* function calls engine_op_begin before its work
 * and engine_op_end(e, its kind) after it (untaped work: engine_op_end_named); the engine brackets
 * each backward rule itself. With no profiler attached they cost one NULL test. */
void profiler_begin(struct Profiler *p);
void profiler_end(struct Profiler *p, int kind, ProfPhase phase);
static inline void engine_op_begin(Engine *e) {
    if (e->prof) profiler_begin(e->prof);
}
static inline void engine_op_end(Engine *e, int kind) {
    if (e->prof) profiler_end(e->prof, kind, e->recomputing ? PROF_RECOMPUTE : PROF_FORWARD);
}
/* The same for profiled work that is no tape op (no node, no backward rule: the MSA and MoE selections
 * and plans, the expert-parallel dispatch plan), timed under a name of its own: a string that lives as
 * long as the program (a literal). The profiler numbers such names after the ops as they first occur. */
void profiler_end_named(struct Profiler *p, const char *name, ProfPhase phase);
static inline void engine_op_end_named(Engine *e, const char *name) {
    if (e->prof) profiler_end_named(e->prof, name, e->recomputing ? PROF_RECOMPUTE : PROF_FORWARD);
}

/* Attach the step profiler (NULL: detach): its time brackets, and its memory columns, which watch the
 * activation arena (e->data) while attached. */
void engine_set_profiler(Engine *e, struct Profiler *p);
/* the arena observer (Arena.observe) of the memory columns, autograd/profile.c */
void profiler_observe(void *profiler, size_t live_before, size_t live_after);

/* Switch gradient recording; returns the previous state (to restore). */
static inline bool engine_set_grad(Engine *e, bool on) {
    bool prev = e->grad_enabled;
    e->grad_enabled = on;
    return prev;
}

/* Host <-> tensor copies for any device (dtype must match the host buffer's). */
void tensor_to_host(const Engine *e, void *dst, const Tensor *t);
void tensor_from_host(const Engine *e, Tensor *t, const void *src);
/* Any float tensor (F32, BF16 activations on CUDA, F64) to a host float buffer of numel entries: other
 * dtypes are cast on the device first (a temporary in the engine's arena), so callers never read raw
 * bf16 bits as floats. */
void tensor_to_host_f32(Engine *e, float *dst, const Tensor *t);
/* Read a scalar (F32, F64 or BF16) tensor's value to the host. */
double tensor_item(const Engine *e, const Tensor *t);

/* Shape checks used by ops: abort with a message naming the op and the mismatch. */
void check_shape(const char *op, const char *what, const Tensor *t, int ndim, const int64_t *shape);
void check_same_shape(const char *op, const Tensor *a, const Tensor *b);

#endif
