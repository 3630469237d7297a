/* Activation memory of a training step with train.recompute on the CPU backend (issue 15): the arena's
 * peak, per token, of a small model with the 1.1B bench model's proportions (8/1 query/KV heads, SwiGLU
 * of 2.75 x d_model) is held to what recomputation has to keep, counted from the model's shape:
 *
 *   - the saved block inputs: the embedding output and every block's output, (L + 1) rows of d_model;
 *   - the head: the final norm's output and the gradient of it, 2 rows of d_model (+ its statistics);
 *   - one block's working set in its backward: the replayed forward's activations (each op's output,
 *     counted below op by op) and the gradients in flight, at most the SwiGLU backward's three rows of
 *     ffn_dim (its output's gradient and those of gate and up) and eight rows of d_model.
 *
 * Before the gradients of a block's intermediates were released as its backward went (autograd/
 * engine.h, grad_pool) and views made their gradients when first needed, every intermediate kept its
 * gradient until the block's backward ended: 11.59 MiB at 6 layers and 512 tokens (23737 bytes per token)
 * against this bound's 21488; 9.84 MiB after. Also checked: the arena's chunk ends are not
 * lost from the second step on (arena_compact), so the peak of a step equals the exact bytes live. Run from
 * the repository root after `make data` (make test does). */
#include <stdio.h>
#include <string.h>

#include "../train/trainer.h"
#include "test.h"

#define TINY "configs/tiny.json"

typedef struct Shape {
    int64_t d, layers, heads, kv_heads, head_dim, ffn, tokens;
    int64_t ffn_chunk; /* train.ffn_chunk_tokens (0: unchunked) */
} Shape;

/* per token, the feed-forward's rows of ffn_dim in one block's backward: gate, up and the SwiGLU output of
 * the replay and the three gradients of the SwiGLU backward; chunked (autograd/op_swiglu_ffn.c), the six
 * exist for one chunk of rows at a time */
static double ffn_values(const Shape *s) {
    const double rows = s->ffn_chunk > 0 && s->ffn_chunk < s->tokens ? (double)s->ffn_chunk / (double)s->tokens : 1.0;
    return 6.0 * (double)s->ffn * rows;
}

/* values per token that the bound allows (F32 activations: 4 bytes each) */
static double allowed_values(const Shape *s) {
    const int64_t d = s->d, q = s->heads * s->head_dim, kv = s->kv_heads * s->head_dim;
    const int64_t saved = (s->layers + 1) * d;
    const int64_t head = 2 * d + 2; /* final norm output and its gradient; its rstd and the head's lse */
    /* the replayed block: norm (+ rstd), q, k, v, RoPE of q and k, attention output (+ lse per head), output
     * projection, residual add, norm (+ rstd), gate, up, SwiGLU, down projection, residual add */
    const int64_t replay = (d + 1) + (q + 2 * kv) + (q + kv) + (q + s->heads) + d + d + (d + 1) + d + d;
    /* gradients: eight model rows (the two a chain of blocks hands down, the replayed output's seed, the
     * residual adds', the head's, and the pool's idle ones), and the feed-forward's */
    const int64_t in_flight = 8 * d;
    return (double)(saved + head + replay + in_flight) + ffn_values(s);
}

/* r, quiet, started on configs/tiny.json with the n settings ("key=value") */
static void tiny_run(Run *r, char (*sets)[64], int n) {
    memset(r, 0, sizeof *r);
    r->quiet = true;
    config_defaults(&r->cfg);
    config_load(&r->cfg, TINY);
    for (int i = 0; i < n; i++) config_set(&r->cfg, sets[i]);
    r->config_path = TINY;
    run_init(r);
}

/* The activation arena's peak in the second of two training steps (the profiled one: the first step's
 * chunk ends are lost, see below); *run_peak: the run's high-water mark. */
static size_t peak_of(const Shape *s, size_t *run_peak) {
    char sets[16][64];
    int n = 0;
    snprintf(sets[n++], 64, "model.d_model=%lld", (long long)s->d);
    snprintf(sets[n++], 64, "model.n_layers=%lld", (long long)s->layers);
    snprintf(sets[n++], 64, "model.n_heads=%lld", (long long)s->heads);
    snprintf(sets[n++], 64, "model.n_kv_heads=%lld", (long long)s->kv_heads);
    snprintf(sets[n++], 64, "model.head_dim=%lld", (long long)s->head_dim);
    snprintf(sets[n++], 64, "model.ffn_dim=%lld", (long long)s->ffn);
    snprintf(sets[n++], 64, "model.vocab_size=%d", 512);
    snprintf(sets[n++], 64, "model.tie_embeddings=false");
    snprintf(sets[n++], 64, "train.seq_len=%lld", (long long)s->tokens);
    snprintf(sets[n++], 64, "train.batch_size=1");
    snprintf(sets[n++], 64, "train.recompute=true");
    snprintf(sets[n++], 64, "train.profile_steps=1");
    snprintf(sets[n++], 64, "train.eval_every=0");
    snprintf(sets[n++], 64, "train.ffn_chunk_tokens=%lld", (long long)s->ffn_chunk);
    Run r;
    tiny_run(&r, sets, n);
    for (int step = 0; step < 2; step++) run_step(&r);
    const size_t peak = r.prof ? r.prof->peak : 0;
    *run_peak = r.engine.data.high_water;
    run_free(&r);
    return peak;
}

TEST(peak_per_token_is_the_saved_inputs_and_one_block) {
    const Shape shapes[] = {
        {128, 6, 8, 1, 16, 352, 512, 0},
        {128, 3, 8, 1, 16, 352, 256, 0},
        {128, 6, 8, 1, 16, 352, 512, 64},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
        const Shape *s = &shapes[i];
        size_t run_peak = 0;
        const size_t peak = peak_of(s, &run_peak);
        const double per_token = (double)peak / (double)s->tokens, bound = 4.0 * allowed_values(s);
        EXPECT(per_token <= bound, "%lld layers, d_model %lld, %lld tokens, ffn chunk %lld: arena peak %.0f bytes per token, over the %.0f "
               "that the saved block inputs and one block's working set need", (long long)s->layers, (long long)s->d,
               (long long)s->tokens, (long long)s->ffn_chunk, per_token, bound);
        EXPECT(peak > 0 && peak <= run_peak, "%lld layers: step 2's peak %zu bytes, the run's %zu", (long long)s->layers, peak,
               run_peak);
    }
}

/* The arena's high-water mark over one evaluation (a forward without gradients over one validation batch)
 * of the tiny model with `layers` blocks, d_model 128, `tokens` tokens; *slot_bytes: the block output slots
 * outside the arena (Engine.offload_slot), which an evaluation's block outputs take turns in. */
static size_t eval_peak(int64_t layers, int64_t tokens, size_t *slot_bytes) {
    char sets[8][64];
    int n = 0;
    snprintf(sets[n++], 64, "model.d_model=128");
    snprintf(sets[n++], 64, "model.n_layers=%lld", (long long)layers);
    snprintf(sets[n++], 64, "train.seq_len=%lld", (long long)tokens);
    snprintf(sets[n++], 64, "train.batch_size=1");
    snprintf(sets[n++], 64, "train.eval_batches=1");
    Run r;
    tiny_run(&r, sets, n);
    engine_reset(&r.engine);
    r.engine.data.high_water = r.engine.data.live;
    run_evaluate(&r, NULL);
    const size_t peak = r.engine.data.high_water;
    *slot_bytes = 2 * r.engine.offload_slot_bytes;
    run_free(&r);
    return peak;
}

/* An evaluation holds two block outputs (in the slots), not one per block: its arena peak does not grow
 * with the depth. Before, each no-grad checkpoint left its output below the block's mark, 6 x 512 x 128 F32
 * values (1.5 MiB) more at 8 blocks than at 2. */
TEST(evaluation_holds_two_block_outputs_not_one_per_block) {
    const int64_t tokens = 512, block_output = tokens * 128 * 4;
    size_t slots2 = 0, slots8 = 0;
    const size_t p2 = eval_peak(2, tokens, &slots2), p8 = eval_peak(8, tokens, &slots8);
    EXPECT(p8 < p2 + (size_t)block_output, "arena peak of an evaluation: %zu bytes at 8 blocks, %zu at 2 (a block output is "
           "%lld bytes): it grows with the depth", p8, p2, (long long)block_output);
    EXPECT(slots8 == 2 * (size_t)block_output && slots2 == slots8, "block output slots: %zu and %zu bytes, two outputs of %lld "
           "expected", slots2, slots8, (long long)block_output);
}

/* Tensors larger than the arena's chunks get chunks of their own; each small allocation after one opens
 * a chunk whose end is lost until the next rewind. From the second micro-step on the arena is one chunk of
 * the first step's exact need, so the live bytes at the peak are the bytes handed out. */
TEST(arena_loses_no_chunk_ends_after_the_first_step) {
    Arena a;
    arena_init(&a, NULL, 4096);
    size_t first = 0, second = 0;
    for (int step = 0; step < 2; step++) {
        arena_reset(&a);
        arena_compact(&a);
        a.high_water = 0;
        for (int block = 0; block < 6; block++) {
            arena_alloc(&a, 10000); /* larger than a chunk: its own */
            arena_alloc(&a, 64);    /* a scalar after it: a fresh chunk */
        }
        (step ? &second : &first)[0] = a.high_water;
    }
    const size_t exact = 6 * (10048 + 64);
    EXPECT(first > exact, "the first step lost no chunk end (%zu bytes at the peak, %zu handed out)", first, exact);
    EXPECT(second == exact && a.n_chunks == 1, "second step: %zu bytes at the peak in %d chunks, expected %zu in one",
           second, a.n_chunks, exact);
    arena_free(&a);
}

/* After a rewind, an allocation takes the smallest empty chunk that holds it instead of stepping over the
 * smaller ones (whose room counted as live until the next rewind). */
TEST(arena_takes_the_smallest_empty_chunk_that_fits) {
    Arena a;
    arena_init(&a, NULL, 1024);
    const ArenaMark m = arena_mark(&a);
    arena_alloc(&a, 1024);
    arena_alloc(&a, 1024);
    arena_alloc(&a, 8192);
    arena_rewind(&a, m);
    arena_alloc(&a, 8192);
    EXPECT(a.live == 8192 && a.n_chunks == 3, "an 8 KiB allocation after the rewind: %zu bytes live in %d chunks, expected "
           "8192 in 3 (the two 1 KiB chunks skipped, not counted)", a.live, a.n_chunks);
    arena_free(&a);
}

/* An allocation that no empty chunk holds after a rewind: the empty chunks are merged into the new one, so
 * the arena never holds more than what is live and the request (before, the 1 KiB chunks stayed beside it). */
TEST(arena_merges_the_empty_chunks_when_it_grows) {
    Arena a;
    arena_init(&a, NULL, 1024);
    const ArenaMark m = arena_mark(&a);
    arena_alloc(&a, 4096);
    arena_alloc(&a, 1024);
    arena_alloc(&a, 1024);
    arena_rewind(&a, m);
    arena_alloc(&a, 8192);
    EXPECT(a.n_chunks == 1 && arena_reserved(&a) == 8192 && a.live == 8192,
           "an 8 KiB allocation after the rewind: %d chunks, %zu bytes reserved, %zu live, expected one chunk of 8192",
           a.n_chunks, arena_reserved(&a), a.live);
    /* a request smaller than the empty chunks' total takes it all, in one chunk */
    arena_reset(&a);
    arena_alloc(&a, 512);
    const ArenaMark m2 = arena_mark(&a);
    for (int i = 0; i < 3; i++) arena_alloc(&a, 8192 + 64 * (i + 1));
    arena_rewind(&a, m2);
    const size_t before = arena_reserved(&a);
    arena_alloc(&a, 8192 + 1024);
    EXPECT(arena_reserved(&a) == before, "growth after a rewind: %zu bytes reserved, %zu before (the empty chunks "
           "merged, nothing more)", arena_reserved(&a), before);
    arena_free(&a);
}

int main(void) {
    TEST_BEGIN();
    RUN(peak_per_token_is_the_saved_inputs_and_one_block);
    RUN(arena_loses_no_chunk_ends_after_the_first_step);
    RUN(arena_takes_the_smallest_empty_chunk_that_fits);
    RUN(arena_merges_the_empty_chunks_when_it_grows);
    RUN(evaluation_holds_two_block_outputs_not_one_per_block);
    TEST_END();
}
