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

/* Put a chunk that holds `bytes` at index at (every chunk from there on is empty): the smallest such
 * chunk among them, or a new one. */
static void place_chunk(Arena *a, int at, size_t bytes) {
    int best = -1;
    for (int i = at; i < a->n_chunks; i++)
        if (a->chunks[i].size >= bytes && (best < 0 || a->chunks[i].size < a->chunks[best].size)) best = i;
    if (best < 0) {
        /* None holds it: the empty ones are given back and one chunk at least as large as all of them
         * together replaces them. Otherwise a first step that rewinds and then asks for more than any
         * empty chunk holds keeps them all beside the new one: memory at the step's peak that nothing uses
         * (before this, the ~1.1B model's first step at 64K-128K tokens peaked 5-11 GB above the later
         * steps on the GPU, docs/benchmarks.md). */
        size_t size = bytes > a->chunk_size ? bytes : a->chunk_size, merged = 0;
        for (int i = at; i < a->n_chunks; i++) {
            merged += a->chunks[i].size;
            chunk_free(a, a->chunks[i].base);
        }
        a->n_chunks = at;
        if (merged > size) size = merged;
        if (a->n_chunks == a->cap_chunks) {
            a->cap_chunks = a->cap_chunks ? 2 * a->cap_chunks : 8;
            a->chunks = xrealloc(a->chunks, (size_t)a->cap_chunks * sizeof(ArenaChunk));
        }
        a->chunks[a->n_chunks] = (ArenaChunk){chunk_alloc(a, size), size};
        best = a->n_chunks++;
    }
    const ArenaChunk c = a->chunks[best];
    a->chunks[best] = a->chunks[at];
    a->chunks[at] = c;
}

void *arena_alloc(Arena *a, size_t bytes) {
    const size_t live_before = a->live;
    bytes = (bytes + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
    if (bytes == 0) bytes = ARENA_ALIGN;
    if (a->cur >= a->n_chunks || a->chunks[a->cur].size - a->used < bytes) {
        /* the end of the current chunk is lost until the next rewind; an empty one is just swapped out */
        int next = a->cur;
        if (a->cur < a->n_chunks && a->used > 0) {
            a->live += a->chunks[a->cur].size - a->used;
            next = a->cur + 1;
        }
        place_chunk(a, next, bytes);
        a->cur = next;
        a->used = 0;
    }
    void *p = a->chunks[a->cur].base + a->used;
    a->used += bytes;
    a->live += bytes;
    a->exact += bytes;
    if (a->live > a->high_water) a->high_water = a->live;
    if (a->exact > a->need) a->need = a->exact;
    return allocated(a, live_before, p);
}

ArenaMark arena_mark(const Arena *a) { return (ArenaMark){a->cur, a->used, a->live, a->exact}; }

void arena_rewind(Arena *a, ArenaMark m) {
    const size_t live_before = a->live;
    a->cur = m.cur;
    a->used = m.used;
    a->live = m.live;
    a->exact = m.exact;
    if (a->observe) a->observe(a->observer, live_before, a->live);
}

void arena_reset(Arena *a) { arena_rewind(a, (ArenaMark){0, 0, 0, 0}); }

void arena_compact(Arena *a) {
    if (a->n_chunks <= 1 || a->live) return;
    for (int i = 0; i < a->n_chunks; i++) chunk_free(a, a->chunks[i].base);
    const size_t size = a->need > a->chunk_size ? a->need : a->chunk_size;
    a->chunks[0] = (ArenaChunk){chunk_alloc(a, size), size};
    a->n_chunks = 1;
    a->cur = 0;
    a->used = 0;
}

size_t arena_reserved(const Arena *a) {
    size_t total = 0;
    for (int i = 0; i < a->n_chunks; i++) total += a->chunks[i].size;
    return total;
}
