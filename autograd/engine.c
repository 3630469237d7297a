#include "engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"
#include "ops.h"

typedef void (*BackwardRule)(Engine *e, Node *n);

static const BackwardRule backward_rules[OP_COUNT] = {
#define OP(name) [OP_##name] = backward_##name,
#include "ops.def"
#undef OP
};

static const char *const op_names[OP_COUNT] = {
#define OP(name) [OP_##name] = #name,
#include "ops.def"
#undef OP
};

void engine_init(Engine *e, const KernelBackend *be, DType act_dtype, size_t arena_chunk_bytes) {
    memset(e, 0, sizeof(*e));
    e->be = be;
    e->device = be->device;
    e->act_dtype = act_dtype;
    arena_init(&e->data, be, arena_chunk_bytes);
    arena_init(&e->host, NULL, 1 << 20);
    arena_init(&e->offload_host, be, arena_chunk_bytes);
    e->offload_host.host = true;
    e->grad_enabled = true;
}

void engine_free(Engine *e) {
    arena_free(&e->data);
    arena_free(&e->host);
    arena_free(&e->offload_host);
    for (int i = 0; i < 2; i++)
        if (e->offload_slot[i]) e->be->free(e->offload_slot[i]);
    free(e->offloaded);
    free(e->tape);
    memset(e, 0, sizeof(*e));
}

void engine_reset(Engine *e) {
    arena_reset(&e->data);
    arena_compact(&e->data);
    arena_reset(&e->host);
    arena_reset(&e->offload_host);
    e->n_offloaded = 0;
    e->offload_slot_holds[0] = e->offload_slot_holds[1] = NULL; /* the headers were in the host arena */
    e->tape_len = 0;
}

static Tensor *new_header(Engine *e, DType dt, int ndim, const int64_t *shape) {
    if (ndim < 1 || ndim > TENSOR_MAX_DIMS) fatal("tensor rank %d not supported (1..%d)", ndim, TENSOR_MAX_DIMS);
    Tensor *t = arena_alloc(&e->host, sizeof(Tensor));
    memset(t, 0, sizeof(*t));
    t->dtype = dt;
    t->device = e->device;
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) fatal("negative tensor dimension %lld", (long long)shape[i]);
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    return t;
}

Tensor *engine_empty_header(Engine *e, DType dt, int ndim, const int64_t *shape, void *data) {
    Tensor *t = new_header(e, dt, ndim, shape);
    t->data = data;
    return t;
}

Tensor *engine_empty(Engine *e, DType dt, int ndim, const int64_t *shape) {
    Tensor *t = new_header(e, dt, ndim, shape);
    t->data = arena_alloc(&e->data, tensor_bytes(t));
    return t;
}

Tensor *engine_zeros(Engine *e, DType dt, int ndim, const int64_t *shape) {
    Tensor *t = engine_empty(e, dt, ndim, shape);
    e->be->zero(t->data, tensor_bytes(t));
    return t;
}

Tensor *engine_empty_like(Engine *e, const Tensor *t) { return engine_empty(e, t->dtype, t->ndim, t->shape); }

Tensor *engine_view(Engine *e, Tensor *t, int ndim, const int64_t *shape) {
    Tensor *v = new_header(e, t->dtype, ndim, shape);
    if (v->numel != t->numel)
        fatal("view: cannot view %lld elements as %lld", (long long)t->numel, (long long)v->numel);
    v->data = t->data;
    v->requires_grad = t->requires_grad && e->grad_enabled;
    v->is_param = t->is_param;
    v->name = t->name;
    v->shadow = t->shadow; /* a view of a parameter reads the same BF16 copy */
    /* what flows into the view reaches the base: engine_grad shares the base's gradient buffer (made then,
     * not now: a replayed block's views would otherwise hold their gradients from the start of its
     * backward, beside the activations at their peak) */
    if (v->requires_grad) v->view_of = t;
    return v;
}

Tensor *engine_detach(Engine *e, Tensor *t) {
    Tensor *d = new_header(e, t->dtype, t->ndim, t->shape);
    d->data = t->data;
    return d;
}

/* A released gradient buffer of exactly `bytes`, taken out of the pool; NULL when there is none. */
static void *pool_take(GradPool *p, size_t bytes) {
    for (int i = p->n - 1; i >= 0; i--)
        if (p->free[i].bytes == bytes) {
            void *data = p->free[i].data;
            p->free[i] = p->free[--p->n];
            return data;
        }
    return NULL;
}

Tensor *engine_grad(Engine *e, Tensor *t) {
    if (!t || !t->requires_grad) return NULL;
    if (!t->grad && t->view_of) {
        Tensor *g = engine_grad(e, t->view_of);
        t->grad = engine_empty_header(e, g->dtype, t->ndim, t->shape, g->data);
    }
    if (!t->grad) {
        void *reuse = e->grad_pool ? pool_take(e->grad_pool, tensor_bytes(t)) : NULL;
        if (reuse) {
            t->grad = engine_empty_header(e, t->dtype, t->ndim, t->shape, reuse);
            e->be->zero(reuse, tensor_bytes(t));
        } else t->grad = engine_zeros(e, t->dtype, t->ndim, t->shape);
    }
    return t->grad;
}

/* Whether the gradient buffer g is also that of one of n's inputs (an output sharing its input's). */
static bool shared_with_input(const Node *n, const Tensor *g) {
    for (int i = 0; i < n->n_in; i++)
        if (n->in[i] && n->in[i]->grad && n->in[i]->grad->data == g->data) return true;
    return false;
}

/* After the rule of node n has run inside a checkpoint's backward: its outputs' gradients are dead
 * (every op that read an output was recorded after n, so its rule ran before n's, and only n's own
 * rule reads them), and their buffers go to the pool; not a view's, nor one an input shares. */
static void release_output_grads(Engine *e, const Node *n) {
    GradPool *p = e->grad_pool;
    for (int k = 0; k < n->n_out; k++) {
        Tensor *o = n->out[k];
        if (!o || !o->grad || o->is_param || o->view_of || shared_with_input(n, o->grad)) continue;
        if (p->n == p->cap) {
            p->cap = p->cap ? 2 * p->cap : 64;
            p->free = xrealloc(p->free, (size_t)p->cap * sizeof *p->free);
        }
        p->free[p->n++] = (PooledGrad){o->grad->data, tensor_bytes(o->grad)};
        o->grad = NULL;
    }
}

bool engine_wants_grad(const Engine *e, Tensor *const *inputs, int n) {
    if (!e->grad_enabled) return false;
    for (int i = 0; i < n; i++)
        if (inputs[i] && inputs[i]->requires_grad) return true;
    return false;
}

Node *engine_record(Engine *e, OpKind op, Tensor *const *inputs, int n_in, Tensor *const *outputs, int n_out) {
    if (n_in > NODE_MAX_IN || n_out > NODE_MAX_OUT) fatal("op %s: too many inputs or outputs", op_names[op]);
    if (e->tape_len == e->tape_cap) {
        e->tape_cap = e->tape_cap ? 2 * e->tape_cap : 256;
        e->tape = xrealloc(e->tape, (size_t)e->tape_cap * sizeof(Node));
    }
    Node *n = &e->tape[e->tape_len++];
    memset(n, 0, sizeof(*n));
    n->op = op;
    n->n_in = n_in;
    n->n_out = n_out;
    for (int i = 0; i < n_in; i++) n->in[i] = inputs[i];
    for (int i = 0; i < n_out; i++) {
        n->out[i] = outputs[i];
        if (outputs[i]) outputs[i]->requires_grad = true;
    }
    return n;
}

static void seed_ones(Engine *e, Tensor *g) {
    size_t es = dtype_size(g->dtype);
    char *host = xmalloc(tensor_bytes(g));
    for (int64_t i = 0; i < g->numel; i++) {
        if (g->dtype == DT_F64) ((double *)host)[i] = 1.0;
        else if (g->dtype == DT_F32) ((float *)host)[i] = 1.0f;
        else if (g->dtype == DT_BF16) ((uint16_t *)host)[i] = 0x3f80; /* 1.0 in bf16 */
        else fatal("backward: integer tensor cannot be a loss");
    }
    (void)es;
    Tensor *tmp = engine_empty_like(e, g);
    tensor_from_host(e, tmp, host);
    e->be->axpy(g, tmp, 1.0f);
    free(host);
}

void engine_backward_from(Engine *e, Tensor *out, const Tensor *seed, int from) {
    if (!out->requires_grad) fatal("backward: the output does not depend on anything that requires grad");
    Tensor *g = engine_grad(e, out);
    if (seed) e->be->axpy(g, seed, 1.0f);
    else {
        if (out->numel != 1) fatal("backward: a non-scalar output needs a seed gradient");
        seed_ones(e, g);
    }
    engine_backward_tape(e, from);
}

void engine_backward_tape(Engine *e, int from) {
    const bool outermost = e->backward_depth++ == 0;
    for (int i = e->tape_len - 1; i >= from; i--) {
        /* re-read the node each time: a rule (checkpoint) may grow and move the tape */
        Node n = e->tape[i];
        bool any = false;
        for (int k = 0; k < n.n_out; k++) any |= n.out[k] && n.out[k]->grad;
        if (any) {
            /* the profiler's bracket: a checkpoint's replayed forward and its sub-tape's rules open
             * brackets of their own inside this one, so checkpoint is charged only its glue */
            if (e->prof) profiler_begin(e->prof);
            backward_rules[n.op](e, &n);
            if (e->prof) profiler_end(e->prof, n.op, PROF_BACKWARD);
            if (e->grad_pool) release_output_grads(e, &n);
        }
        if (outermost && e->backward_progress) e->backward_progress(e->backward_progress_ctx, i);
    }
    e->backward_depth--;
}

void engine_set_profiler(Engine *e, struct Profiler *p) {
    e->prof = p;
    e->data.observe = p ? profiler_observe : NULL;
    e->data.observer = p;
}

void tensor_to_host(const Engine *e, void *dst, const Tensor *t) { e->be->copy_to_host(dst, t->data, tensor_bytes(t)); }

void tensor_from_host(const Engine *e, Tensor *t, const void *src) {
    e->be->copy_from_host(t->data, src, tensor_bytes(t));
}

void tensor_to_host_f32(Engine *e, float *dst, const Tensor *t) {
    if (t->dtype == DT_F32) {
        tensor_to_host(e, dst, t);
        return;
    }
    if (t->dtype != DT_BF16 && t->dtype != DT_F64) fatal("tensor_to_host_f32: not a float tensor");
    Tensor *f32 = engine_empty(e, DT_F32, t->ndim, t->shape);
    e->be->cast(f32, t);
    tensor_to_host(e, dst, f32);
}

double tensor_item(const Engine *e, const Tensor *t) {
    union {
        float f;
        double d;
        uint16_t h;
        uint32_t u;
    } v = {0};
    e->be->copy_to_host(&v, t->data, dtype_size(t->dtype));
    switch (t->dtype) {
    case DT_F32: return v.f;
    case DT_F64: return v.d;
    case DT_BF16: {
        uint32_t bits = (uint32_t)v.h << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    default: fatal("tensor_item: not a float tensor");
    }
}

static void shape_str(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++) o += (size_t)snprintf(buf + o, n - o, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

void check_shape(const char *op, const char *what, const Tensor *t, int ndim, const int64_t *shape) {
    bool ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = shape[i] < 0 || t->shape[i] == shape[i]; /* -1 = any */
    if (!ok) {
        char want[128], got[128];
        shape_str(want, sizeof want, ndim, shape);
        shape_str(got, sizeof got, t->ndim, t->shape);
        fatal("%s: %s has shape %s, expected %s (-1 = any)", op, what, got, want);
    }
}

void check_same_shape(const char *op, const Tensor *a, const Tensor *b) { check_shape(op, "operand", b, a->ndim, a->shape); }
