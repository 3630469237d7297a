#include "profile.h"

#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"

static const char *const op_names[OP_COUNT] = {
#define OP(name) [OP_##name] = #name,
#include "ops.def"
#undef OP
};

const char *profiler_kind_name(const Profiler *p, int kind) {
    if (kind >= 0 && kind < OP_COUNT) return op_names[kind];
    return kind >= OP_COUNT && kind < OP_COUNT + p->n_named ? p->named[kind - OP_COUNT] : "?";
}

int profiler_kind(const Profiler *p, const char *name) {
    for (int k = 0; k < OP_COUNT + p->n_named; k++)
        if (!strcmp(profiler_kind_name(p, k), name)) return k;
    return -1;
}

void profiler_free(Profiler *p) {
    free(p->allocs);
    p->allocs = NULL;
    p->n_allocs = p->cap_allocs = 0;
}

void profiler_init(Profiler *p, const KernelBackend *be) {
    memset(p, 0, sizeof(*p));
    /* a backend without the entry would time launches, not work: refuse rather than mislead */
    if (!be->synchronize) fatal("the %s backend has no synchronize entry, which the step profiler needs", be->name);
    p->be = be;
}

/* The time after everything issued so far has finished. */
static double sync_now(Profiler *p) {
    const int64_t before = p->be->host_waits();
    p->be->synchronize();
    p->own_waits += p->be->host_waits() - before;
    return wall_seconds();
}

/* ---- memory ---- */

static void push_alloc(Profiler *p, size_t end, size_t bytes) {
    if (p->n_allocs == p->cap_allocs) {
        p->cap_allocs = p->cap_allocs ? 2 * p->cap_allocs : 1024;
        p->allocs = xrealloc(p->allocs, (size_t)p->cap_allocs * sizeof *p->allocs);
    }
    /* outside every bracket the owner is known at once: "other" */
    const int level = p->depth;
    p->allocs[p->n_allocs++] = (ProfAlloc){end, bytes, level ? -1 : PROF_OTHER, PROF_FORWARD, level};
    if (level) p->open_bytes[level] += bytes;
    else p->live_bytes[PROF_OTHER][PROF_FORWARD] += bytes;
}

/* Take bytes off an allocation's owner (a rewind released them). */
static void release(Profiler *p, const ProfAlloc *a, size_t bytes) {
    if (a->kind < 0) p->open_bytes[a->level] -= bytes;
    else p->live_bytes[a->kind][a->phase] -= bytes;
}

void profiler_observe(void *profiler, size_t live_before, size_t live_after) {
    Profiler *p = profiler;
    const size_t recorded = p->n_allocs ? p->allocs[p->n_allocs - 1].end : 0;
    /* what was live before the profiler watched: "other" */
    if (live_before > recorded) {
        const int depth = p->depth;
        p->depth = 0;
        push_alloc(p, live_before, live_before - recorded);
        p->depth = depth;
    }
    if (live_after > live_before) {
        push_alloc(p, live_after, live_after - live_before);
        if (live_after > p->peak) {
            p->peak = live_after;
            memcpy(p->peak_bytes, p->live_bytes, sizeof p->peak_bytes);
            memcpy(p->peak_open_bytes, p->open_bytes, sizeof p->peak_open_bytes);
        }
        return;
    }
    while (p->n_allocs && p->allocs[p->n_allocs - 1].end > live_after) {
        ProfAlloc *a = &p->allocs[p->n_allocs - 1];
        const size_t start = a->end - a->bytes;
        if (start >= live_after) {
            release(p, a, a->bytes);
            p->n_allocs--;
        } else { /* a rewind into an allocation (never to a mark, but keep the sums right) */
            release(p, a, a->end - live_after);
            a->bytes = live_after - start;
            a->end = live_after;
        }
    }
}

/* The bracket at depth `level` closed as (kind, phase): what it allocated, and still holds, is kind's. */
static void charge_open_allocs(Profiler *p, int level, int kind, ProfPhase phase) {
    int from = p->alloc_start[level - 1] < p->n_allocs ? p->alloc_start[level - 1] : p->n_allocs;
    for (int i = from; i < p->n_allocs; i++) {
        ProfAlloc *a = &p->allocs[i];
        if (a->kind >= 0) continue;
        a->kind = kind;
        a->phase = phase;
        p->live_bytes[kind][phase] += a->bytes;
    }
    p->open_bytes[level] = 0;
    p->peak_bytes[kind][phase] += p->peak_open_bytes[level];
    p->peak_open_bytes[level] = 0;
}

size_t profiler_peak_forward_bytes(const Profiler *p, int kind) {
    return p->peak_bytes[kind][PROF_FORWARD] + p->peak_bytes[kind][PROF_RECOMPUTE];
}

size_t profiler_peak_bytes(const Profiler *p, int kind) {
    return profiler_peak_forward_bytes(p, kind) + p->peak_bytes[kind][PROF_BACKWARD];
}

/* ---- time ---- */

void profiler_begin(Profiler *p) {
    double now = sync_now(p);
    if (p->depth == PROF_MAX_DEPTH) fatal("profiler: op brackets nested deeper than %d", PROF_MAX_DEPTH);
    if (p->depth == 0) p->other += now - p->mark;
    p->alloc_start[p->depth] = p->n_allocs;
    p->start[p->depth] = now;
    p->nested[p->depth] = 0.0;
    p->depth++;
}

/* Close the innermost bracket; returns its self time and hands its whole time to the enclosing one. */
static double close_bracket(Profiler *p) {
    double now = sync_now(p);
    if (p->depth == 0) fatal("profiler: an op ended that never began (unbalanced engine_op_begin/end)");
    p->depth--;
    double whole = now - p->start[p->depth];
    if (p->depth > 0) p->nested[p->depth - 1] += whole;
    else p->mark = now;
    return whole - p->nested[p->depth];
}

void profiler_end(Profiler *p, int kind, ProfPhase phase) {
    if (kind < 0 || kind >= PROF_KIND_MAX) fatal("profiler: op kind %d out of range", kind);
    p->self[kind][phase] += close_bracket(p);
    p->calls[kind][phase]++;
    charge_open_allocs(p, p->depth + 1, kind, phase);
}

void profiler_end_named(Profiler *p, const char *name, ProfPhase phase) {
    int kind = -1;
    for (int i = 0; i < p->n_named && kind < 0; i++)
        if (!strcmp(p->named[i], name)) kind = OP_COUNT + i;
    if (kind < 0) {
        if (p->n_named == PROF_MAX_NAMED) fatal("profiler: more than %d names of untaped work (%s)", PROF_MAX_NAMED, name);
        p->named[p->n_named] = name;
        kind = OP_COUNT + p->n_named++;
    }
    profiler_end(p, kind, phase);
}

void profiler_step_begin(Profiler *p) {
    if (p->depth != 0) fatal("profiler: a step began inside an op bracket");
    p->step_start = p->mark = sync_now(p);
    p->waits_at_step_start = p->be->host_waits();
    p->own_at_step_start = p->own_waits;
}

void profiler_backward_end(Profiler *p) {
    if (p->depth != 0) fatal("profiler: the backward ended inside an op bracket (unbalanced engine_op_begin/end)");
    profiler_begin(p); /* the optimizer phase: one bracket, so that "other" stops here */
}

void profiler_step_end(Profiler *p) {
    if (p->depth != 1) fatal("profiler: the step ended inside an op bracket (unbalanced engine_op_begin/end)");
    p->optimizer += close_bracket(p);
    charge_open_allocs(p, 1, PROF_OTHER, PROF_FORWARD); /* the optimizer's temporaries, if any */
    p->wall += p->mark - p->step_start;
    p->host_waits += p->be->host_waits() - p->waits_at_step_start - (p->own_waits - p->own_at_step_start);
    p->steps++;
}

double profiler_kind_total(const Profiler *p, int kind) {
    double t = 0.0;
    for (int ph = 0; ph < PROF_PHASES; ph++) t += p->self[kind][ph];
    return t;
}

typedef struct Row {
    int kind;
    double total;
} Row;

static int by_total_desc(const void *a, const void *b) {
    const Row *x = a, *y = b;
    if (x->total != y->total) return x->total < y->total ? 1 : -1;
    return x->kind - y->kind; /* a stable order for equal times */
}

/* The memory cells of a row: MiB live at the peak, of which held by forwards (empty when not watched). */
static void memory_cells(const Profiler *p, FILE *f, size_t bytes, size_t forward_bytes) {
    const double mib = 1.0 / (1 << 20);
    if (p->peak) fprintf(f, " %.2f | %.2f |\n", (double)bytes * mib, (double)forward_bytes * mib);
    else fprintf(f, " | |\n");
}

void profiler_write_table(const Profiler *p, FILE *f, const char *title) {
    const double n = p->steps > 0 ? p->steps : 1, ms = 1e3 / n, wall = p->wall > 0 ? p->wall : 1.0;
    Row rows[PROF_KIND_MAX];
    int nr = 0;
    for (int k = 0; k < PROF_KIND_MAX; k++) {
        int64_t calls = 0;
        for (int ph = 0; ph < PROF_PHASES; ph++) calls += p->calls[k][ph];
        if (calls) rows[nr++] = (Row){k, profiler_kind_total(p, k)};
    }
    qsort(rows, (size_t)nr, sizeof(Row), by_total_desc);
    fprintf(f, "%s\n\n", title);
    fprintf(f, "| op | calls/step | forward ms/step | recompute ms/step | backward ms/step | total ms/step | %% of step "
               "| MiB live at the arena's peak | of which made by forwards and recompute |\n");
    fprintf(f, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < nr; i++) {
        const int k = rows[i].kind;
        fprintf(f, "| %s | %g | %.3f | %.3f | %.3f | %.3f | %.1f |", profiler_kind_name(p, k),
                (double)p->calls[k][PROF_FORWARD] / n, p->self[k][PROF_FORWARD] * ms, p->self[k][PROF_RECOMPUTE] * ms,
                p->self[k][PROF_BACKWARD] * ms, rows[i].total * ms, 100.0 * rows[i].total / wall);
        memory_cells(p, f, profiler_peak_bytes(p, k), profiler_peak_forward_bytes(p, k));
    }
    fprintf(f, "| optimizer (gradient collectives, norm and clip, AdamW) | | | | | %.3f | %.1f | | |\n", p->optimizer * ms,
            100.0 * p->optimizer / wall);
    fprintf(f, "| other (outside every op: batch sampling and upload, loss reads, zeroing gradients) | | | | | %.3f | %.1f |",
            p->other * ms, 100.0 * p->other / wall);
    if (p->peak) fprintf(f, " %.2f | |\n", (double)profiler_peak_bytes(p, PROF_OTHER) / (1 << 20));
    else fprintf(f, " | |\n");
    size_t forward_bytes = 0;
    for (int k = 0; k < PROF_OTHER; k++) forward_bytes += profiler_peak_forward_bytes(p, k);
    fprintf(f, "| step wall time (profiled: synchronised around every op); memory: the activation arena's peak | | | | | %.3f | 100.0 |",
            p->wall * ms);
    memory_cells(p, f, p->peak, forward_bytes);
    fprintf(f, "\nHost waits for the device per step, besides the profiler's own synchronisations: %.1f (copies to "
               "the host, synchronisations and frees; a logged step reads its loss and norm)\n",
            (double)p->host_waits / n);
}
