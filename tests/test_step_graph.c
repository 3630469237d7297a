/* train/step_graph.c's decisions, on the CPU with a backend whose GRAPH entries only count their calls (the
 * capture and replay themselves need a GPU: build/tests/gpu/test_gpu --only graph): when a step runs eagerly,
 * is captured or replays the graph, when the graph is dropped, and the fixed input buffers. */
#include <stdlib.h>
#include <string.h>

#include "../train/step_graph.h"
#include "test.h"

static int64_t releases, begins, launches, frees;

static void fake_graph_begin(void) { begins++; }
static void *fake_graph_end(int64_t *nodes) {
    *nodes = 42;
    return malloc(1);
}
static void fake_graph_launch(void *graph) {
    (void)graph;
    launches++;
}
static void fake_graph_free(void *graph) {
    free(graph);
    frees++;
}
static int64_t fake_memory_releases(void) { return releases; }

static KernelBackend graph_backend(void) {
    KernelBackend be = cpu_backend;
    be.graph_begin = fake_graph_begin;
    be.graph_end = fake_graph_end;
    be.graph_launch = fake_graph_launch;
    be.graph_free = fake_graph_free;
    be.memory_releases = fake_memory_releases;
    return be;
}

/* two documents of 4 tokens in a batch of 2 x 4, every target counted */
static void fill_batch(Batch *b, int first_token) {
    b->n_segments = 2;
    b->cu_seqlens[0] = 0, b->cu_seqlens[1] = 4, b->cu_seqlens[2] = 8;
    for (int i = 0; i < 8; i++) {
        b->inputs[i] = first_token + i;
        b->targets[i] = first_token + i + 1;
        b->positions[i] = i % 4;
    }
}

/* What a run does around a mode: capture when asked (the trainer's run_step) */
static StepMode next(StepGraph *g, bool phase, bool eager_only) {
    StepMode m = step_graph_mode(g, phase, eager_only);
    if (m == STEP_CAPTURE) {
        g->be->graph_begin();
        step_graph_captured(g, phase);
    }
    return m;
}

TEST(eager_until_a_step_frees_nothing_then_capture_then_replay) {
    KernelBackend be = graph_backend();
    StepGraph g;
    step_graph_init(&g, &be, 1, 2, 4);
    releases = begins = frees = 0;
    fill_batch(&g.host[0], 10);
    EXPECT(next(&g, false, false) == STEP_EAGER, "the first step runs eagerly");
    releases++; /* the first step freed memory (arena compaction, scratch growth) */
    EXPECT(next(&g, false, false) == STEP_EAGER, "the step after one that freed memory runs eagerly");
    EXPECT(next(&g, false, false) == STEP_CAPTURE, "a step after an eager one that freed nothing is captured");
    EXPECT(begins == 1 && g.graph && g.nodes == 42, "one capture, graph kept (%lld begins)", (long long)begins);
    fill_batch(&g.host[0], 20); /* other tokens, the same documents */
    EXPECT(next(&g, false, false) == STEP_REPLAY, "a batch with the captured documents replays");
    EXPECT(next(&g, false, true) == STEP_EAGER && g.graph, "a profiled step runs eagerly and keeps the graph");
    EXPECT(next(&g, false, false) == STEP_REPLAY, "then replays again");
    EXPECT(g.captures == 1 && g.replays == 2 && g.eager == 3, "counts: %lld captures, %lld replays, %lld eager",
           (long long)g.captures, (long long)g.replays, (long long)g.eager);
    EXPECT(frees == 0, "no graph dropped");
    step_graph_free(&g);
    EXPECT(frees == 1, "step_graph_free drops the graph");
}

TEST(other_documents_or_an_ignored_target_run_eagerly_and_keep_the_graph) {
    KernelBackend be = graph_backend();
    StepGraph g;
    step_graph_init(&g, &be, 2, 2, 4);
    releases = frees = 0;
    fill_batch(&g.host[0], 0), fill_batch(&g.host[1], 8);
    next(&g, false, false);
    EXPECT(next(&g, false, false) == STEP_CAPTURE, "captured after one eager step that freed nothing");
    g.host[1].cu_seqlens[1] = 3; /* micro-batch 1's first document one token shorter */
    g.host[1].positions[3] = 0;
    EXPECT(next(&g, false, false) == STEP_EAGER && g.graph && frees == 0, "other documents: eager, graph kept");
    fill_batch(&g.host[1], 8);
    EXPECT(next(&g, false, false) == STEP_REPLAY, "the captured documents again: replay");
    g.host[0].targets[5] = -1;
    EXPECT(next(&g, false, false) == STEP_EAGER && g.graph, "an ignored target: eager, graph kept");
    g.host[0].targets[5] = 6;
    g.host[0].positions[2] = 7; /* the same cu_seqlens, other positions (the longest position is frozen) */
    EXPECT(next(&g, false, false) == STEP_EAGER, "other positions: eager");
    step_graph_free(&g);
}

TEST(a_free_or_a_phase_change_drops_the_graph) {
    KernelBackend be = graph_backend();
    StepGraph g;
    step_graph_init(&g, &be, 1, 2, 4);
    releases = frees = 0;
    fill_batch(&g.host[0], 0);
    next(&g, false, false);
    EXPECT(next(&g, false, false) == STEP_CAPTURE, "captured");
    releases++; /* an eval between steps freed memory the graph may use */
    EXPECT(next(&g, false, false) == STEP_EAGER && !g.graph && frees == 1, "a free drops the graph");
    EXPECT(next(&g, false, false) == STEP_CAPTURE, "captured again after an eager step that freed nothing");
    EXPECT(next(&g, true, false) == STEP_EAGER && !g.graph && frees == 2, "a phase change drops the graph");
    EXPECT(next(&g, true, false) == STEP_CAPTURE && g.phase, "captured in the new phase");
    EXPECT(next(&g, true, false) == STEP_REPLAY, "and replayed");
    step_graph_free(&g);
}

TEST(upload_fills_the_fixed_buffers_and_the_input_reads_them) {
    KernelBackend be = graph_backend();
    StepGraph g;
    step_graph_init(&g, &be, 1, 2, 4);
    Batch *b = &g.host[0];
    fill_batch(b, 30);
    b->n_segments = 1; /* one document of 8 tokens */
    b->cu_seqlens[1] = 8;
    for (int i = 0; i < 8; i++) b->positions[i] = i;
    step_graph_upload(&g, 0);
    ModelInput in = step_graph_input(&g, 0);
    EXPECT(in.tokens->data == g.tokens[0].data && in.cu_seqlens->data == g.cu_seqlens[0].data,
           "the input points at the fixed buffers");
    EXPECT(!memcmp(in.tokens->data, b->inputs, 8 * sizeof(int32_t)) &&
               !memcmp(in.targets->data, b->targets, 8 * sizeof(int32_t)) &&
               !memcmp(in.positions->data, b->positions, 8 * sizeof(int32_t)),
           "tokens, targets and positions copied");
    EXPECT(in.cu_seqlens->numel == 2 && ((const int32_t *)in.cu_seqlens->data)[1] == 8, "cu_seqlens of one document");
    EXPECT(in.targets->host_data == b->targets && in.cu_seqlens->host_data == b->cu_seqlens,
           "the kernels' host copies are the sampled batch");
    EXPECT(in.positions_end == 8 && in.dropout_seeds == NULL, "positions_end %lld", (long long)in.positions_end);
    step_graph_free(&g);
}

int main(void) {
    TEST_BEGIN();
    RUN(eager_until_a_step_frees_nothing_then_capture_then_replay);
    RUN(other_documents_or_an_ignored_target_run_eagerly_and_keep_the_graph);
    RUN(a_free_or_a_phase_change_drops_the_graph);
    RUN(upload_fills_the_fixed_buffers_and_the_input_reads_them);
    TEST_END();
}
