/* Arena: a bump allocator for per-micro-step memory (activations, their gradients, tensor headers).
 * Grows by chunks, never moves what it handed out, and rewinds to a mark in O(chunks).
 *
 * Chunks after the current one hold nothing, so their order is free: an allocation that does not fit
 * the current chunk takes the smallest later chunk that holds it (a new one only when none does),
 * instead of stepping over every smaller one; when none does, the empty chunks are merged into one new
 * chunk of at least their total size, so the chunks never hold more than the live bytes and the request.
 * What is left at the end of the chunk it leaves is lost
 * until a rewind; with tensors larger than a chunk (each in a chunk of its own size) that happens at
 * every small allocation after a large one. arena_compact, between micro-steps, replaces the chunks by
 * one that holds the most bytes ever live at once without those losses (`need`), so from the second
 * micro-step on nothing is lost. */
#ifndef MSA_ARENA_H
#define MSA_ARENA_H

#include <stdbool.h>
#include <stddef.h>

#include "../kernels/backend.h"

typedef struct ArenaChunk {
    char *base;
    size_t size;
} ArenaChunk;

typedef struct Arena {
    const KernelBackend *be; /* where chunks live; NULL = host malloc */
    bool host;               /* chunks from be->host_alloc (host memory the device copies at full speed) */
    ArenaChunk *chunks;
    int n_chunks, cap_chunks;
    int cur;                 /* chunk being filled */
    size_t used;             /* bytes used in chunk cur */
    size_t chunk_size;       /* default size of a new chunk */
    size_t high_water;       /* most bytes ever live at once */
    size_t live;             /* bytes live now (sum of used over chunks 0..cur, chunk ends lost included) */
    size_t exact;            /* bytes handed out and live now (live without the lost chunk ends) */
    size_t need;             /* most bytes ever handed out and live at once (the high water of exact) */
    /* Who watches live (the step profiler's memory column, engine_set_profiler): called after every
     * change of live, by an allocation (live grows) or a rewind (live shrinks); NULL = nobody. */
    void (*observe)(void *observer, size_t live_before, size_t live_after);
    void *observer;
} Arena;

typedef struct ArenaMark {
    int cur;
    size_t used, live, exact;
} ArenaMark;

void arena_init(Arena *a, const KernelBackend *be, size_t chunk_size);
void arena_free(Arena *a);
void *arena_alloc(Arena *a, size_t bytes); /* 64-byte aligned, never NULL (aborts with a message) */
ArenaMark arena_mark(const Arena *a);
void arena_rewind(Arena *a, ArenaMark m);
void arena_reset(Arena *a);
/* With nothing live and more than one chunk: one chunk of `need` bytes (or chunk_size) instead. */
void arena_compact(Arena *a);
/* the bytes of all its chunks (what it holds of the device or host, used or not) */
size_t arena_reserved(const Arena *a);

#endif
