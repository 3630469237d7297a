/* Arena: a bump allocator for per-micro-step memory (activations, their gradients, tensor headers).
 * Grows by chunks, never moves what it handed out, and rewinds to a mark in O(chunks). */
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
    size_t live;             /* bytes live now (sum of used over chunks 0..cur) */
    /* Who watches live (the step profiler's memory column, engine_set_profiler): called after every
     * change of live, by an allocation (live grows) or a rewind (live shrinks); NULL = nobody. */
    void (*observe)(void *observer, size_t live_before, size_t live_after);
    void *observer;
} Arena;

typedef struct ArenaMark {
    int cur;
    size_t used, live;
} ArenaMark;

void arena_init(Arena *a, const KernelBackend *be, size_t chunk_size);
void arena_free(Arena *a);
void *arena_alloc(Arena *a, size_t bytes); /* 64-byte aligned, never NULL (aborts with a message) */
ArenaMark arena_mark(const Arena *a);
void arena_rewind(Arena *a, ArenaMark m);
void arena_reset(Arena *a);

#endif
