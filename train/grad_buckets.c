#include "grad_buckets.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"

/* The block a parameter belongs to ("layers.<l>.*"), -1 for one outside the blocks. */
static int block_of(const Param *p) {
    int l = -1;
    if (!p->t->name || sscanf(p->t->name, "layers.%d.", &l) != 1) return -1;
    return l;
}

/* The lowest block of the parameters in [begin, end): -1 when one is outside the blocks, n_layers when
 * none is there (padding). Both ends of a bucket's life: the backward finishes its gradients after that
 * block's (GradBucket.last_block), and the forward first reads it there (GradBucket.first_block). */
static int lowest_block(const ParamStore *ps, int64_t begin, int64_t end, int n_layers) {
    int lowest = n_layers;
    for (int i = 0; i < ps->n; i++) {
        const Param *p = &ps->p[i];
        if (p->offset >= end || p->offset + p->t->numel <= begin) continue;
        int l = block_of(p);
        if (l < 0) return -1;
        if (l < lowest) lowest = l;
    }
    return lowest;
}

/* The order every rank starts the buckets in: those the backward finishes first (higher last_block;
 * -1, the end of the backward, last), then from the store's end. */
static int start_order(const void *a, const void *b) {
    const GradBucket *x = a, *y = b;
    if (x->last_block != y->last_block) return x->last_block > y->last_block ? -1 : 1;
    return (x->begin < y->begin) - (x->begin > y->begin);
}

void grad_buckets_init(GradBuckets *gb, ParamStore *ps, const ZeroRegion *zero, int n_zero, int n_layers,
                       double bucket_mb) {
    memset(gb, 0, sizeof *gb);
    gb->ps = ps;
    gb->zero = zero;
    gb->n_layers = n_layers;
    gb->block_tape_start = xcalloc((size_t)(n_layers > 0 ? n_layers : 1), sizeof(int));
    if (bucket_mb <= 0) return;
    int64_t elems = (int64_t)(bucket_mb * (1 << 20) / (double)dtype_size(ps->dtype));
    if (elems < 64) elems = 64;
    int cap = 0;
    for (int z = 0; z < n_zero; z++) {
        const ZeroRegion *r = &zero[z];
        const int size = r->group->size;
        if (size == 1) continue; /* nothing to reduce */
        const int64_t end = r->begin + (int64_t)size * r->shard;
        for (int64_t a = r->begin; a < end; a += elems) {
            if (gb->n == cap) {
                cap = cap ? 2 * cap : 64;
                gb->b = xrealloc(gb->b, (size_t)cap * sizeof *gb->b);
            }
            GradBucket *b = &gb->b[gb->n++];
            memset(b, 0, sizeof *b);
            b->region = z;
            b->begin = a;
            b->end = a + elems < end ? a + elems : end;
            b->last_block = b->first_block = lowest_block(ps, b->begin, b->end, n_layers);
            b->counts = xmalloc((size_t)size * sizeof(int64_t));
            for (int k = 0; k < size; k++) {
                int64_t lo = r->begin + k * r->shard, hi = lo + r->shard;
                lo = lo > b->begin ? lo : b->begin;
                hi = hi < b->end ? hi : b->end;
                b->counts[k] = hi > lo ? hi - lo : 0;
            }
        }
    }
    if (gb->n > 1) qsort(gb->b, (size_t)gb->n, sizeof *gb->b, start_order); /* b is NULL when there are none */
}

void grad_buckets_free(GradBuckets *gb) {
    for (int i = 0; i < gb->n; i++) {
        dist_finish(&gb->b[i].pending);
        free(gb->b[i].counts);
    }
    free(gb->b);
    free(gb->block_tape_start);
    memset(gb, 0, sizeof *gb);
}

static void *grad_at(const GradBuckets *gb, int64_t element) {
    return (char *)gb->ps->grad + (size_t)element * dtype_size(gb->ps->dtype);
}

static void start_reduce(GradBuckets *gb) {
    GradBucket *b = &gb->b[gb->started++];
    dist_start_reduce_scatter_parts(gb->zero[b->region].group, grad_at(gb, b->begin), b->counts, DIST_F32, DIST_SUM,
                                    gb->ps->be->device, "the reduce-scatter of a gradient bucket", &b->pending);
}

void grad_buckets_backward_progress(void *ctx, int tape_index) {
    GradBuckets *gb = ctx;
    /* the blocks whose tape entries all lie at or after tape_index are done: first_done .. n_layers - 1 */
    int first_done = gb->n_layers;
    while (first_done > 0 && gb->block_tape_start[first_done - 1] >= tape_index) first_done--;
    while (gb->started < gb->n && gb->b[gb->started].last_block >= first_done) start_reduce(gb);
    /* MPI moves a started collective only inside MPI calls: test them here, between the backward's ops */
    for (int i = 0; i < gb->started; i++) dist_test(&gb->b[i].pending);
}

void grad_buckets_reduce_rest(GradBuckets *gb) {
    while (gb->started < gb->n) start_reduce(gb);
}

void grad_buckets_reduce_finish(GradBuckets *gb) {
    grad_buckets_reduce_rest(gb);
    for (int i = 0; i < gb->n; i++) dist_finish(&gb->b[i].pending);
    gb->started = 0;
}

void grad_buckets_gather_start(GradBuckets *gb, int region) {
    /* the reverse of the start order: the first blocks' parameters first, as the next forward reads them */
    for (int i = gb->n - 1; i >= 0; i--) {
        GradBucket *b = &gb->b[i];
        if (b->region != region) continue;
        void *data = (char *)gb->ps->data + (size_t)b->begin * dtype_size(gb->ps->dtype);
        dist_start_all_gather_parts(gb->zero[region].group, data, b->counts, DIST_F32, gb->ps->be->device,
                                    "the all-gather of a bucket of updated parameters", &b->pending);
        b->gathering = gb->gathering = true;
    }
}

void grad_buckets_gather_wait(GradBuckets *gb, int layer) {
    if (!gb->gathering) return;
    bool more = false;
    for (int i = gb->n - 1; i >= 0; i--) {
        GradBucket *b = &gb->b[i];
        if (!b->gathering) continue;
        if (b->first_block > layer) {
            dist_test(&b->pending); /* progress (MPI) */
            more = true;
            continue;
        }
        dist_finish(&b->pending);
        params_sync_shadow_range(gb->ps, b->begin, b->end); /* the other ranks' parts (CUDA) */
        b->gathering = false;
    }
    gb->gathering = more;
}

void grad_buckets_before_block(void *ctx, int layer) { grad_buckets_gather_wait(ctx, layer); }

void grad_buckets_gather_finish(GradBuckets *gb) { grad_buckets_gather_wait(gb, gb->n_layers); }
