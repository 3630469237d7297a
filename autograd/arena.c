#include "arena.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"

#define ARENA_ALIGN 64

void arena_init(Arena *a, const KernelBackend *be, size_t chunk_size) {
    memset(a, 0, sizeof(*a));
    a->be = be;
    a->chunk_size = chunk_size;
}

static void *chunk_alloc(Arena *a, size_t bytes) {
    if (a->be && a->host) return a->be->host_alloc(bytes);
    if (a->be) return a->be->alloc(bytes);
    return xmalloc(bytes);
}

static void chunk_free(Arena *a, void *p) {
    if (a->be && a->host) a->be->host_free(p);
    else if (a->be) a->be->free(p);
    else free(p);
}

void arena_free(Arena *a) {
    for (int i = 0; i < a->n_chunks; i++) chunk_free(a, a->chunks[i].base);
    free(a->chunks);
    memset(a, 0, sizeof(*a));
}

static void *allocated(Arena *a, size_t live_before, void *p) {
    if (a->observe) a->observe(a->observer, live_before, a->live);
    return p;
}

void *arena_alloc(Arena *a, size_t bytes) {
    const size_t live_before = a->live;
    bytes = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    if (bytes == 0) bytes = ARENA_ALIGN;
    /* find a chunk (the current one or a later, already allocated one) with room */
    while (a->cur < a->n_chunks) {
        ArenaChunk *c = &a->chunks[a->cur];
        if (c->size - a->used >= bytes) {
            void *p = c->base + a->used;
            a->used += bytes;
            a->live += bytes;
            if (a->live > a->high_water) a->high_water = a->live;
            return allocated(a, live_before, p);
        }
        /* the tail of this chunk is wasted until the next rewind; move on */
        a->live += c->size - a->used;
        a->cur++;
        a->used = 0;
    }
    if (a->n_chunks == a->cap_chunks) {
        a->cap_chunks = a->cap_chunks ? 2 * a->cap_chunks : 8;
        a->chunks = xrealloc(a->chunks, (size_t)a->cap_chunks * sizeof(ArenaChunk));
    }
    size_t size = bytes > a->chunk_size ? bytes : a->chunk_size;
    ArenaChunk *c = &a->chunks[a->n_chunks++];
    c->base = chunk_alloc(a, size);
    c->size = size;
    a->cur = a->n_chunks - 1;
    a->used = bytes;
    a->live += bytes;
    if (a->live > a->high_water) a->high_water = a->live;
    return allocated(a, live_before, c->base);
}

ArenaMark arena_mark(const Arena *a) { return (ArenaMark){a->cur, a->used, a->live}; }

void arena_rewind(Arena *a, ArenaMark m) {
    const size_t live_before = a->live;
    a->cur = m.cur;
    a->used = m.used;
    a->live = m.live;
    if (a->observe) a->observe(a->observer, live_before, a->live);
}

void arena_reset(Arena *a) { arena_rewind(a, (ArenaMark){0, 0, 0}); }
