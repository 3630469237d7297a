/* checkpoint: activation recomputation for one segment (a transformer block).
 *
 * Forward runs the segment without recording and keeps only its output (and auxiliary loss); every
 * activation inside is released at once. Backward runs the segment again with recording, seeds the
 * recomputed outputs with the upstream gradients, walks that sub-tape, and releases it. Peak
 * activation memory is then one block's activations plus the block outputs, which is what lets
 * 32K-128K-token sequences fit. A segment maps x to a tensor of x's shape and must be deterministic.
 *
 * Offloading (Engine.offload_block_inputs, train.offload_block_inputs): a recorded checkpoint's output is
 * written to one of two device slots outside the arena, which the next checkpoint does not use, and copied
 * to host memory; the backward that reads it as its input needs it back in its slot. The device then holds
 * two block inputs instead of one per block. It assumes what the model does: a checkpoint output is read
 * by the next checkpoint (and, the last one, by the ops after the blocks) and by nothing after the second
 * checkpoint that follows it.
 * The copies overlap the blocks' compute (the backend's asynchronous copies, one lane per slot): the copy of
 * output k to the host runs under blocks k+1 and k+2, whose output waits for it before taking the slot;
 * the backward of block k, which reads output k-1 from one slot, starts the copy of output k-2 back into the
 * other (which holds output k, dead by then: every op that read it has had its backward), and the backward
 * of block k-1 waits for that copy. The host does not wait for the device at any point of it.
 *
 * After its backward, a checkpoint's output has no gradient (y->grad is NULL): the buffer holds the
 * gradient of its input, which a chain of blocks then passes down from block to block.
 *
 * Without gradients (evaluation, sampling) the forward is the same minus the recording: the segment's
 * intermediates are released as soon as its output is copied out, so a no-grad forward holds one
 * block's activations at a time. Otherwise an arena that frees nothing until the step ends would hold
 * every block's, and evaluation would run out of memory where the training step with recompute fits. */
#include <stdlib.h>

#include "../kernels/util.h"
#include "ops.h"

/* ---- offloading the outputs (the next blocks' inputs) to the host (Engine.offload_block_inputs) ---- */

typedef struct Offloaded {
    Tensor *t;  /* on the device in one of the engine's two slots */
    void *host; /* its copy in offload_host */
} Offloaded;

static int slot_of(const Engine *e, const Tensor *t) { return t->data == e->offload_slot[0] ? 0 : 1; }

/* A tensor like x whose data is the slot the next checkpoint output takes: not x's own (x is the previous
 * output, in the other slot, when the checkpoints form a chain). The slots grow at a micro-step's first
 * checkpoint, when neither holds anything. */
static Tensor *slot_output(Engine *e, Tensor *x) {
    const size_t bytes = tensor_bytes(x);
    if (bytes > e->offload_slot_bytes) {
        if (e->n_offloaded)
            fatal("checkpoint: an offloaded block output of %zu bytes after ones of %zu in the same micro-step "
                  "(train.offload_block_inputs needs blocks of one shape)", bytes, e->offload_slot_bytes);
        for (int i = 0; i < 2; i++) {
            if (e->offload_slot[i]) e->be->free(e->offload_slot[i]);
            e->offload_slot[i] = e->be->alloc(bytes);
            e->offload_slot_holds[i] = NULL;
        }
        e->offload_slot_bytes = bytes;
    }
    if (e->offload_slot[e->offload_next] == x->data) e->offload_next ^= 1;
    Tensor *y = engine_detach(e, x);
    y->data = e->offload_slot[e->offload_next];
    e->offload_slot_holds[e->offload_next] = y;
    e->offload_next ^= 1;
    return y;
}

/* y's copy on the host, for the backward of the block that reads it; it runs while the next blocks compute
 * (the slot's next output waits for it: op_checkpoint). */
static void offload(Engine *e, Tensor *y) {
    if (e->n_offloaded == e->cap_offloaded) {
        e->cap_offloaded = e->cap_offloaded ? 2 * e->cap_offloaded : 64;
        e->offloaded = xrealloc(e->offloaded, (size_t)e->cap_offloaded * sizeof *e->offloaded);
    }
    void *host = arena_alloc(&e->offload_host, tensor_bytes(y));
    e->be->copy_to_host_async(host, y->data, tensor_bytes(y), slot_of(e, y));
    e->offloaded[e->n_offloaded++] = (Offloaded){y, host};
}

/* Start copying offloaded output o back into its slot unless the slot holds it already. */
static void fetch(Engine *e, const Offloaded *o) {
    const int lane = slot_of(e, o->t);
    if (e->offload_slot_holds[lane] == o->t) return;
    e->be->copy_from_host_async(o->t->data, o->host, tensor_bytes(o->t), lane);
    e->offload_slot_holds[lane] = o->t;
}

/* Before the backward of the block that reads x: x back in its slot when it was offloaded (the slot may hold
 * a later block's output by now, which is dead), and the output before x, the next backward's input, on its
 * way into the other slot. */
static void restore(Engine *e, Tensor *x) {
    for (int i = e->n_offloaded - 1; i >= 0; i--)
        if (e->offloaded[i].t == x) {
            fetch(e, &e->offloaded[i]); /* issued one backward ahead, unless x is the chain's first restore */
            e->be->copy_lane_wait(slot_of(e, x));
            if (i > 0 && slot_of(e, e->offloaded[i - 1].t) != slot_of(e, x)) fetch(e, &e->offloaded[i - 1]);
            return;
        }
}

typedef struct CheckpointParams {
    SegmentFn fn;
    const void *closure;
} CheckpointParams;

Tensor *op_checkpoint(Engine *e, SegmentFn fn, const void *closure, Tensor *x, Tensor **aux_out) {
    const bool record = e->grad_enabled;
    /* profiled, the block's ops open brackets of their own inside this one: checkpoint's self time is
     * the copies and bookkeeping here, the ops' forward time is theirs (no-grad forwards: not timed) */
    if (record) engine_op_begin(e);
    const bool offloading = record && e->offload_block_inputs;
    /* Without gradients (evaluation, sampling) nothing reads a block's output after the next block has
     * consumed it, so the outputs take turns in the two slots instead of piling up in the arena below each
     * block's mark: an evaluation holds two block outputs, not one per block (22 x tokens x d_model for the
     * 1.1B model, 5.5 GiB at 64K tokens: the peak of a long-context run came from its evaluation). The slots
     * can grow only while x is not in one (a block of another shape after a chain: its input is not a slot). */
    const bool slotted = offloading || (!record && (tensor_bytes(x) <= e->offload_slot_bytes ||
                                                    (x->data != e->offload_slot[0] && x->data != e->offload_slot[1])));
    Tensor *y = slotted ? slot_output(e, x) : engine_empty_like(e, x);
    Tensor *aux = engine_empty(e, stat_dtype(x->dtype), SHAPE(1));
    e->be->zero(aux->data, tensor_bytes(aux));
    bool has_aux = false;

    ArenaMark md = arena_mark(&e->data), mh = arena_mark(&e->host);
    engine_set_grad(e, false);
    e->checkpoint_forward = record; /* the backward replays it: no-grad forwards are never replayed */
    Tensor *seg_aux = NULL;
    Tensor *seg_y = fn(e, x, closure, &seg_aux);
    e->checkpoint_forward = false;
    engine_set_grad(e, record);
    check_same_shape("checkpoint (segment output vs input)", x, seg_y);
    if (slotted) e->be->copy_lane_wait(slot_of(e, y)); /* the copy of the slot's last output is done */
    e->be->copy(y->data, seg_y->data, tensor_bytes(y));
    if (seg_aux) {
        if (seg_aux->numel != 1 || seg_aux->dtype != aux->dtype) fatal("checkpoint: auxiliary loss must be a scalar");
        e->be->copy(aux->data, seg_aux->data, tensor_bytes(aux));
        has_aux = true;
    }
    arena_rewind(&e->data, md);
    arena_rewind(&e->host, mh);
    if (offloading) offload(e, y);
    if (aux_out) *aux_out = has_aux ? aux : NULL;
    if (!record) return y;

    Tensor *outs[2] = {y, has_aux ? aux : NULL};
    Node *n = engine_record(e, OP_checkpoint, &x, 1, outs, 2);
    *NODE_PARAMS(n, CheckpointParams) = (CheckpointParams){fn, closure};
    engine_op_end(e, OP_checkpoint);
    return y;
}

void backward_checkpoint(Engine *e, Node *n) {
    const CheckpointParams *cp = NODE_PARAMS(n, CheckpointParams);
    SegmentFn fn = cp->fn;
    const void *closure = cp->closure;
    Tensor *x = n->in[0], *y_out = n->out[0], *gy = y_out->grad, *gaux = n->out[1] ? n->out[1]->grad : NULL;
    /* x's gradient, outside the region released below; made here when nothing downstream made it yet
     * (the input of a chain of blocks: the previous block's output) */
    const bool fresh = x->requires_grad && !x->grad;
    restore(e, x);
    const ArenaMark before_gx = arena_mark(&e->data);
    engine_grad(e, x);

    ArenaMark md = arena_mark(&e->data), mh = arena_mark(&e->host);
    int tape_mark = e->tape_len;
    bool prev = e->recomputing;
    e->recomputing = true;
    Tensor *aux = NULL;
    Tensor *y = fn(e, x, closure, &aux);
    e->recomputing = prev;

    /* the walk releases each intermediate's gradient once the rule of the op that made it has run; the
     * pool's buffers are all in the region rewound below */
    GradPool pool = {0}, *outer_pool = e->grad_pool;
    e->grad_pool = &pool;
    /* the replayed output's gradient is the upstream one: its buffer, which nothing reads after this walk
     * (the hand-down below overwrites it), rather than a copy (a view shares its base's gradient instead) */
    if (gy && y->requires_grad && !y->grad && !y->view_of && gy->dtype == y->dtype && gy->numel == y->numel)
        y->grad = engine_empty_header(e, y->dtype, y->ndim, y->shape, gy->data);
    else if (gy && y->requires_grad) e->be->axpy(engine_grad(e, y), gy, 1.0f);
    if (gaux && aux && aux->requires_grad) e->be->axpy(engine_grad(e, aux), gaux, 1.0f);
    engine_backward_tape(e, tape_mark);
    e->grad_pool = outer_pool;
    free(pool.free);

    e->tape_len = tape_mark;
    arena_rewind(&e->data, md);
    arena_rewind(&e->host, mh);
    /* y's gradient is dead now: every op that read y was recorded after this node, so its backward rule
     * has run. x's gradient moves into that buffer (y has x's shape and dtype) and its own is released, so
     * that a chain of checkpointed blocks holds two block-sized gradients, not one per block (22 x tokens
     * x d_model for the 1.1B model). y keeps no gradient. */
    if (fresh && gy && gy->dtype == x->grad->dtype && gy->numel == x->grad->numel) {
        e->be->copy(gy->data, x->grad->data, tensor_bytes(gy));
        x->grad->data = gy->data;
        y_out->grad = NULL;
        arena_rewind(&e->data, before_gx);
    }
}
