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

void profiler_init(Profiler *p, const KernelBackend *be) {
    memset(p, 0, sizeof(*p));
    /* a backend without the entry would time launches, not work: refuse rather than mislead */
    if (!be->synchronize) fatal("the %s backend has no synchronize entry, which the step profiler needs", be->name);
    p->be = be;
}

/* The time after everything issued so far has finished. */
static double sync_now(const Profiler *p) {
    p->be->synchronize();
    return wall_seconds();
}

void profiler_begin(Profiler *p) {
    double now = sync_now(p);
    if (p->depth == PROF_MAX_DEPTH) fatal("profiler: op brackets nested deeper than %d", PROF_MAX_DEPTH);
    if (p->depth == 0) p->other += now - p->mark;
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
}

void profiler_backward_end(Profiler *p) {
    if (p->depth != 0) fatal("profiler: the backward ended inside an op bracket (unbalanced engine_op_begin/end)");
    profiler_begin(p); /* the optimizer phase: one bracket, so that "other" stops here */
}

void profiler_step_end(Profiler *p) {
    if (p->depth != 1) fatal("profiler: the step ended inside an op bracket (unbalanced engine_op_begin/end)");
    p->optimizer += close_bracket(p);
    p->wall += p->mark - p->step_start;
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
    fprintf(f, "| op | calls/step | forward ms/step | recompute ms/step | backward ms/step | total ms/step | %% of step |\n");
    fprintf(f, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int i = 0; i < nr; i++) {
        const int k = rows[i].kind;
        fprintf(f, "| %s | %g | %.3f | %.3f | %.3f | %.3f | %.1f |\n", profiler_kind_name(p, k),
                (double)p->calls[k][PROF_FORWARD] / n, p->self[k][PROF_FORWARD] * ms, p->self[k][PROF_RECOMPUTE] * ms,
                p->self[k][PROF_BACKWARD] * ms, rows[i].total * ms, 100.0 * rows[i].total / wall);
    }
    fprintf(f, "| optimizer (gradient collectives, norm and clip, AdamW) | | | | | %.3f | %.1f |\n", p->optimizer * ms,
            100.0 * p->optimizer / wall);
    fprintf(f, "| other (outside every op: batch sampling and upload, loss reads, zeroing gradients) | | | | | %.3f | %.1f |\n", p->other * ms,
            100.0 * p->other / wall);
    fprintf(f, "| step wall time (profiled: synchronised around every op) | | | | | %.3f | 100.0 |\n", p->wall * ms);
}
