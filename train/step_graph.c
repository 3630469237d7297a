/* A training step captured as a CUDA graph and replayed: the bookkeeping (step_graph.h); the step itself is
 * train/trainer.c's run_step. */
#include "step_graph.h"

#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"

/* A fixed i32 device buffer of n elements as a tensor header. */
static Tensor fixed_i32(const KernelBackend *be, int64_t n) {
    Tensor t = {.dtype = DT_I32, .device = be->device, .ndim = 1, .shape = {n}, .numel = n};
    t.data = be->alloc((size_t)n * sizeof(int32_t));
    return t;
}

void step_graph_init(StepGraph *g, const KernelBackend *be, int grad_accum, int B, int T) {
    memset(g, 0, sizeof *g);
    const char *missing = backend_missing(be, BACKEND_GRAPH);
    if (missing) fatal("train.cuda_graph: the %s backend has no %s entry", be->name, missing);
    g->on = true;
    g->be = be;
    g->grad_accum = grad_accum;
    const int64_t N = (int64_t)B * T;
    g->host = xcalloc((size_t)grad_accum, sizeof(Batch));
    g->key = xcalloc((size_t)grad_accum, sizeof(Batch));
    g->tokens = xcalloc((size_t)grad_accum, sizeof(Tensor));
    g->targets = xcalloc((size_t)grad_accum, sizeof(Tensor));
    g->positions = xcalloc((size_t)grad_accum, sizeof(Tensor));
    g->cu_seqlens = xcalloc((size_t)grad_accum, sizeof(Tensor));
    for (int m = 0; m < grad_accum; m++) {
        batch_alloc(&g->host[m], B, T);
        batch_alloc(&g->key[m], B, T);
        g->tokens[m] = fixed_i32(be, N);
        g->targets[m] = fixed_i32(be, N);
        g->positions[m] = fixed_i32(be, N);
        g->cu_seqlens[m] = fixed_i32(be, N + 1); /* at most a document per token (batch_alloc) */
    }
}

void step_graph_free(StepGraph *g) {
    if (!g->on) return;
    if (g->graph) g->be->graph_free(g->graph);
    for (int m = 0; m < g->grad_accum; m++) {
        batch_free(&g->host[m]);
        batch_free(&g->key[m]);
        Tensor *all[4] = {&g->tokens[m], &g->targets[m], &g->positions[m], &g->cu_seqlens[m]};
        for (int k = 0; k < 4; k++) g->be->free(all[k]->data);
    }
    free(g->host), free(g->key), free(g->tokens), free(g->targets), free(g->positions), free(g->cu_seqlens);
    memset(g, 0, sizeof *g);
}

/* Whether micro-batch b matches the captured one in everything the capture took from the host. */
static bool same_layout(const Batch *b, const Batch *key) {
    const size_t N = (size_t)b->B * b->T;
    if (b->n_segments != key->n_segments) return false;
    if (memcmp(b->cu_seqlens, key->cu_seqlens, ((size_t)b->n_segments + 1) * sizeof(int32_t))) return false;
    return !memcmp(b->positions, key->positions, N * sizeof(int32_t));
}

/* Every target counted (none is ignore_index), so that each chunk's count of the cross-entropy is its
 * row count whatever the batch. */
static bool all_counted(const Batch *b) {
    const int64_t N = (int64_t)b->B * b->T;
    for (int64_t i = 0; i < N; i++)
        if (b->targets[i] < 0) return false;
    return true;
}

static void drop_graph(StepGraph *g) {
    g->be->graph_free(g->graph);
    g->graph = NULL;
}

StepMode step_graph_mode(StepGraph *g, bool phase, bool eager_only) {
    const int64_t releases = g->be->memory_releases();
    if (g->graph && (releases != g->releases || phase != g->phase)) drop_graph(g);
    bool fits = true;
    for (int m = 0; m < g->grad_accum && fits; m++) fits = all_counted(&g->host[m]);
    if (g->graph)
        for (int m = 0; m < g->grad_accum && fits; m++) fits = same_layout(&g->host[m], &g->key[m]);
    StepMode mode = STEP_EAGER;
    if (eager_only) mode = STEP_EAGER;
    else if (g->graph && fits) mode = STEP_REPLAY;
    /* a capture freezes the addresses of scratch, plan and arena memory: only once an eager step has run
     * without freeing any (they have their final sizes), and never over a graph that may still fit the
     * next step */
    else if (!g->graph && fits && g->eager_before && releases == g->eager_releases) mode = STEP_CAPTURE;
    g->eager_before = mode == STEP_EAGER;
    g->eager_releases = releases;
    if (mode == STEP_REPLAY) g->replays++;
    else if (mode == STEP_CAPTURE) g->captures++;
    else g->eager++;
    return mode;
}

void step_graph_upload(StepGraph *g, int micro) {
    const Batch *b = &g->host[micro];
    const int64_t N = (int64_t)b->B * b->T;
    Tensor *cu = &g->cu_seqlens[micro];
    cu->shape[0] = cu->numel = b->n_segments + 1;
    g->be->copy_from_host(g->tokens[micro].data, b->inputs, (size_t)N * sizeof(int32_t));
    g->be->copy_from_host(g->targets[micro].data, b->targets, (size_t)N * sizeof(int32_t));
    g->be->copy_from_host(g->positions[micro].data, b->positions, (size_t)N * sizeof(int32_t));
    g->be->copy_from_host(cu->data, b->cu_seqlens, (size_t)cu->numel * sizeof(int32_t));
    g->tokens[micro].host_data = b->inputs;
    g->targets[micro].host_data = b->targets;
    g->positions[micro].host_data = b->positions;
    cu->host_data = b->cu_seqlens;
}

ModelInput step_graph_input(StepGraph *g, int micro) {
    return model_input_over(&g->host[micro], &g->tokens[micro], &g->targets[micro], &g->positions[micro],
                            &g->cu_seqlens[micro]);
}

void step_graph_captured(StepGraph *g, bool phase) {
    g->graph = g->be->graph_end(&g->nodes);
    g->releases = g->be->memory_releases();
    g->phase = phase;
    for (int m = 0; m < g->grad_accum; m++) {
        const Batch *b = &g->host[m];
        Batch *k = &g->key[m];
        const size_t N = (size_t)b->B * b->T;
        k->n_segments = b->n_segments;
        memcpy(k->cu_seqlens, b->cu_seqlens, ((size_t)b->n_segments + 1) * sizeof(int32_t));
        memcpy(k->positions, b->positions, N * sizeof(int32_t));
    }
}
