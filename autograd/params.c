#include "params.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../kernels/util.h"

void params_init(ParamStore *ps, const KernelBackend *be, DType dtype) {
    memset(ps, 0, sizeof(*ps));
    ps->be = be;
    ps->dtype = dtype;
}

void params_free(ParamStore *ps) {
    for (int i = 0; i < ps->n; i++) {
        free((void *)ps->p[i].t->name);
        free(ps->p[i].t->grad);
        free(ps->p[i].t);
    }
    if (ps->data) ps->be->free(ps->data);
    if (ps->grad) ps->be->free(ps->grad);
    if (ps->shadow) ps->be->free(ps->shadow);
    free(ps->p);
    memset(ps, 0, sizeof(*ps));
}

Param *params_find(ParamStore *ps, const char *name) {
    for (int i = 0; i < ps->n; i++)
        if (strcmp(ps->p[i].t->name, name) == 0) return &ps->p[i];
    return NULL;
}

Tensor *params_add(ParamStore *ps, const char *name, int ndim, const int64_t *shape, InitKind init, float std,
                   bool decay) {
    if (ps->allocated) fatal("parameter %s declared after the store was allocated", name);
    if (params_find(ps, name)) fatal("parameter %s declared twice", name);
    if (ps->n == ps->cap) {
        ps->cap = ps->cap ? 2 * ps->cap : 64;
        ps->p = xrealloc(ps->p, (size_t)ps->cap * sizeof(Param));
    }
    Tensor *t = xcalloc(1, sizeof(Tensor));
    t->dtype = ps->dtype;
    t->device = ps->be->device;
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    t->requires_grad = true;
    t->is_param = true;
    t->name = xstrdup(name);
    /* On the GPU each parameter starts on a 64-element boundary (256 bytes of F32, 128 of its BF16
     * shadow), so GEMMs get their aligned kernels; the gaps are never read. The CPU store stays dense. */
    const int64_t align = ps->be->device == DEV_CUDA ? 64 : 1, offset = (ps->numel + align - 1) / align * align;
    Param *p = &ps->p[ps->n++];
    *p = (Param){.t = t, .init = init, .init_std = std, .decay = decay, .lr_scale = 1.0f, .offset = offset};
    ps->numel = offset + t->numel;
    return t;
}

/* FNV-1a of a parameter's name, the seed of its values. The offset basis is one digit short of the published
 * 14695981039346656037: a slip, kept, since every model initialised here has its values from it (tests/test_params.c) */
static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ULL;
    return h;
}

/* The initial values of parameters [first, end) into new host buffers host[i], in the store's dtype. Each tensor
 * has a generator of its own, seeded by its name, so the tensors are filled in parallel, a tensor at a time per
 * thread, with the same values for any thread count: drawn one after another, a 3B model's 3e9 normals took
 * ~1.5 minutes before its first step. Plain threads, started and joined here: an OpenMP pool would outlive the
 * call, and a child forked after it (the tests' fatal-error checks) hangs in its first parallel region. */
typedef struct {
    const ParamStore *ps;
    uint64_t seed;
    void **host;
    int end;
    atomic_int next;
} InitWork;

static void fill_one(const Param *p, uint64_t seed, void **host) {
    Tensor h = *p->t;
    h.data = *host = xmalloc(tensor_bytes(p->t));
    Rng rng;
    rng_seed(&rng, seed ^ fnv1a(p->t->name));
    /* skip the elements before the slice: two draws per normal value (rng_normal) */
    for (int64_t j = 0; p->init == INIT_NORMAL && j < 2 * p->init_first; j++) rng_next(&rng);
    for (int64_t j = 0; j < h.numel; j++) {
        double v = p->init == INIT_ONES ? 1.0 : p->init == INIT_ZEROS ? 0.0 : p->init_std * rng_normal(&rng);
        tensor_set(&h, j, v);
    }
}

static void *fill_worker(void *arg) {
    InitWork *w = arg;
    for (int i; (i = atomic_fetch_add(&w->next, 1)) < w->end;) fill_one(&w->ps->p[i], w->seed, &w->host[i]);
    return NULL;
}

static void fill_initial(const ParamStore *ps, uint64_t seed, void **host, int first, int end) {
    enum { MAX_INIT_THREADS = 64 };
    long cpus = ps->init_threads > 0 ? ps->init_threads : sysconf(_SC_NPROCESSORS_ONLN);
    int n = (int)(cpus < 1 ? 1 : cpus > MAX_INIT_THREADS ? MAX_INIT_THREADS : cpus);
    if (n > end - first) n = end - first;
    InitWork w = {.ps = ps, .seed = seed, .host = host, .end = end};
    atomic_init(&w.next, first);
    pthread_t tid[MAX_INIT_THREADS];
    int started = 0;
    for (; started < n - 1; started++) /* this thread is the n-th */
        if (pthread_create(&tid[started], NULL, fill_worker, &w) != 0) break;
    fill_worker(&w);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
}

void params_allocate(ParamStore *ps, uint64_t seed) {
    size_t es = dtype_size(ps->dtype);
    ps->capacity = ps->numel;
    ps->data = ps->be->alloc((size_t)ps->numel * es);
    ps->grad = ps->be->alloc((size_t)ps->numel * es);
    ps->be->zero(ps->grad, (size_t)ps->numel * es);
    /* GPU GEMMs take BF16 inputs: keep a BF16 copy of the F32 master weights next to them, unless told not
     * to (then kernels/cuda/gemm.cu casts a weight into scratch at each use) */
    if (ps->be->device == DEV_CUDA && ps->dtype == DT_F32 && !ps->no_shadow) ps->shadow = ps->be->alloc((size_t)ps->numel * dtype_size(DT_BF16));
    ps->allocated = true;
    for (int i = 0; i < ps->n; i++) {
        Param *p = &ps->p[i];
        Tensor *t = p->t;
        t->data = (char *)ps->data + (size_t)p->offset * es;
        Tensor *g = xcalloc(1, sizeof(Tensor));
        *g = *t;
        g->data = (char *)ps->grad + (size_t)p->offset * es;
        g->requires_grad = false;
        g->grad = NULL;
        g->name = NULL;
        g->shadow = NULL;
        t->grad = g;
        if (ps->shadow) t->shadow = (char *)ps->shadow + (size_t)p->offset * dtype_size(DT_BF16);
    }
    /* The initial values, made on the host in the store's dtype and copied to the device: see fill_initial */
    const size_t INIT_BATCH_BYTES = (size_t)1 << 30;
    void **host = xmalloc((size_t)(ps->n ? ps->n : 1) * sizeof *host);
    for (int first = 0; first < ps->n;) {
        int end = first;
        size_t bytes = 0;
        while (end < ps->n && (end == first || bytes + tensor_bytes(ps->p[end].t) <= INIT_BATCH_BYTES))
            bytes += tensor_bytes(ps->p[end++].t);
        fill_initial(ps, seed, host, first, end);
        for (int i = first; i < end; i++) {
            ps->be->copy_from_host(ps->p[i].t->data, host[i], tensor_bytes(ps->p[i].t));
            free(host[i]);
        }
        first = end;
    }
    free(host);
    params_sync_shadow(ps);
}

void params_sync_shadow_range(ParamStore *ps, int64_t begin, int64_t end) {
    if (end > ps->numel) end = ps->numel;
    if (!ps->shadow || end <= begin) return;
    Tensor src = {.dtype = ps->dtype, .device = ps->be->device, .ndim = 1, .shape = {end - begin},
                  .numel = end - begin, .data = (char *)ps->data + (size_t)begin * dtype_size(ps->dtype)};
    Tensor dst = src;
    dst.dtype = DT_BF16;
    dst.data = (char *)ps->shadow + (size_t)begin * dtype_size(DT_BF16);
    ps->be->cast(&dst, &src);
}

void params_sync_shadow(ParamStore *ps) { params_sync_shadow_range(ps, 0, ps->numel); }

void params_zero_grad(ParamStore *ps) {
    /* the padding tail too: a sharded reduce-scatter writes results over it */
    if (ps->allocated) ps->be->zero(ps->grad, (size_t)ps->capacity * dtype_size(ps->dtype));
}

/* A buffer of `capacity` elements of size es holding the first `keep` elements of old (then zeros). */
static void *regrow(const KernelBackend *be, void *old, int64_t keep, int64_t capacity, size_t es) {
    void *p = be->alloc((size_t)capacity * es);
    be->zero(p, (size_t)capacity * es);
    be->copy(p, old, (size_t)keep * es);
    be->free(old);
    return p;
}

/* Every parameter's value, gradient and shadow pointers from its offset (after the buffers moved). */
static void repoint(ParamStore *ps) {
    size_t es = dtype_size(ps->dtype);
    for (int i = 0; i < ps->n; i++) {
        Param *p = &ps->p[i];
        p->t->data = (char *)ps->data + (size_t)p->offset * es;
        p->t->grad->data = (char *)ps->grad + (size_t)p->offset * es;
        if (ps->shadow) p->t->shadow = (char *)ps->shadow + (size_t)p->offset * dtype_size(DT_BF16);
    }
}

void params_reserve(ParamStore *ps, int64_t capacity) {
    if (!ps->allocated) fatal("params_reserve: the store is not allocated yet");
    if (capacity <= ps->capacity) return;
    size_t es = dtype_size(ps->dtype);
    ps->data = regrow(ps->be, ps->data, ps->numel, capacity, es);
    ps->grad = regrow(ps->be, ps->grad, ps->numel, capacity, es);
    if (ps->shadow) ps->shadow = regrow(ps->be, ps->shadow, ps->numel, capacity, dtype_size(DT_BF16));
    ps->capacity = capacity;
    repoint(ps);
}

/* `old` (numel elements of size es) with the elements from `at` on moved up by delta, the gap zero. */
static void *open_gap(const KernelBackend *be, void *old, int64_t at, int64_t delta, int64_t numel, int64_t capacity,
                      size_t es) {
    char *p = be->alloc((size_t)capacity * es);
    be->zero(p, (size_t)capacity * es);
    be->copy(p, old, (size_t)at * es);
    be->copy(p + (size_t)(at + delta) * es, (const char *)old + (size_t)at * es, (size_t)(numel - at) * es);
    be->free(old);
    return p;
}

void params_move_from(ParamStore *ps, int first, int64_t offset) {
    if (!ps->allocated) fatal("params_move_from: the store is not allocated yet");
    if (first >= ps->n) return;
    const int64_t at = ps->p[first].offset, delta = offset - at;
    if (delta < 0) fatal("params_move_from: parameters can only move up (%lld -> %lld)", (long long)at, (long long)offset);
    if (delta == 0) return;
    size_t es = dtype_size(ps->dtype);
    int64_t capacity = ps->capacity + delta;
    ps->data = open_gap(ps->be, ps->data, at, delta, ps->numel, capacity, es);
    ps->grad = open_gap(ps->be, ps->grad, at, delta, ps->numel, capacity, es);
    if (ps->shadow) ps->shadow = open_gap(ps->be, ps->shadow, at, delta, ps->numel, capacity, dtype_size(DT_BF16));
    for (int i = first; i < ps->n; i++) ps->p[i].offset += delta;
    ps->numel += delta;
    ps->capacity = capacity;
    repoint(ps);
}

int params_set_trainable(ParamStore *ps, const char *substring, bool trainable) {
    int count = 0;
    for (int i = 0; i < ps->n; i++)
        if (!substring || strstr(ps->p[i].t->name, substring)) {
            ps->p[i].t->requires_grad = trainable;
            count++;
        }
    return count;
}

int64_t params_count(const ParamStore *ps, bool trainable_only) {
    int64_t c = 0;
    for (int i = 0; i < ps->n; i++)
        if (!trainable_only || ps->p[i].t->requires_grad) c += ps->p[i].t->numel;
    return c;
}
