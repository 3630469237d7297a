/* The chunked LM head + cross-entropy (op_lm_head_loss, autograd/op_lm_head_loss.c): float64
 * finite-difference gradients for several chunk sizes (ignored rows, a chunk of one row, a last chunk
 * shorter than the others, 3-D hidden states); in float32 the loss and both gradients equal the unfused
 * op_cross_entropy(op_linear(x, W)) to float rounding, and bit for bit with one chunk; the arena's peak
 * holds one chunk's logits and their gradient, not all rows'. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "gradcheck.h"
#include "test.h"

#define N 11
#define C 6
#define V 13

static const int32_t targets_host[N] = {3, -1, 0, 12, 7, 7, -1, 1, 5, 9, 2};

typedef struct {
    Tensor *targets; /* i32 [N], persistent */
    int64_t chunk_rows;
} HeadCtx;

static Tensor *f_head_loss(Engine *e, Tensor **in, void *ctx) {
    const HeadCtx *h = ctx;
    return op_lm_head_loss(e, in[0], in[1], h->targets, -1, h->chunk_rows);
}

static Tensor *targets_tensor(void) {
    Tensor *t = test_tensor(DT_I32, SHAPE(N));
    memcpy(t->data, targets_host, sizeof targets_host);
    return t;
}

TEST(gradients_match_finite_differences_for_every_chunking) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F64, 1 << 20);
    const int64_t chunks[] = {1, 3, 4, N, 100};
    Tensor *x = test_randn(DT_F64, SHAPE(N, C), 1, 1), *w = test_randn(DT_F64, SHAPE(V, C), 1, 2);
    test_requires_grad(x);
    test_requires_grad(w);
    HeadCtx h = {targets_tensor(), 0};
    for (int i = 0; i < 5; i++) {
        h.chunk_rows = chunks[i];
        Tensor *in[] = {x, w};
        GradCheckResult r = gradcheck(&e, f_head_loss, in, 2, &h, 0, 5 + (uint64_t)i);
        EXPECT(r.max_rel_err < 1e-6 && r.numeric_norm > 0, "chunk %lld rows: rel err %.3e (input %d)",
               (long long)chunks[i], r.max_rel_err, r.worst_input);
    }
    /* hidden states [B, T, C]: rows are the flattened leading dims */
    Tensor *x3 = test_randn(DT_F64, SHAPE(1, N, C), 1, 3);
    test_requires_grad(x3);
    h.chunk_rows = 4;
    Tensor *in3[] = {x3, w};
    GradCheckResult r = gradcheck(&e, f_head_loss, in3, 2, &h, 0, 11);
    EXPECT(r.max_rel_err < 1e-6 && r.numeric_norm > 0, "[1, N, C] input: rel err %.3e", r.max_rel_err);
    test_tensor_free(x3);
    test_tensor_free(x);
    test_tensor_free(w);
    test_tensor_free(h.targets);
    engine_free(&e);
}

typedef struct {
    float loss, dx[N * C], dw[V * C];
    size_t high_water;
} F32Run;

/* loss, dx, dw in float32: the fused op with chunk_rows (0: the unfused linear + cross_entropy) */
static F32Run run_f32(int64_t chunk_rows) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Tensor *x = test_randn(DT_F32, SHAPE(N, C), 1, 21), *w = test_randn(DT_F32, SHAPE(V, C), 1, 22);
    Tensor *t = targets_tensor();
    test_requires_grad(x);
    test_requires_grad(w);
    Tensor *loss = chunk_rows ? op_lm_head_loss(&e, x, w, t, -1, chunk_rows)
                              : op_cross_entropy(&e, op_linear(&e, x, w), t, -1);
    engine_backward(&e, loss);
    F32Run r;
    r.loss = (float)tensor_item(&e, loss);
    memcpy(r.dx, x->grad->data, sizeof r.dx);
    memcpy(r.dw, w->grad->data, sizeof r.dw);
    r.high_water = e.data.high_water;
    test_tensor_free(x);
    test_tensor_free(w);
    test_tensor_free(t);
    engine_free(&e);
    return r;
}

TEST(chunked_equals_unfused_and_one_chunk_is_bit_identical) {
    static F32Run ref, one, chunked[3];
    ref = run_f32(0);
    one = run_f32(N);
    EXPECT(memcmp(&one.loss, &ref.loss, sizeof ref.loss) == 0 && memcmp(one.dx, ref.dx, sizeof ref.dx) == 0 &&
               memcmp(one.dw, ref.dw, sizeof ref.dw) == 0,
           "one chunk differs from linear + cross_entropy: loss %.9g vs %.9g", one.loss, ref.loss);
    const int64_t sizes[3] = {1, 4, 5};
    for (int i = 0; i < 3; i++) {
        chunked[i] = run_f32(sizes[i]);
        const double el = fabs((double)chunked[i].loss - ref.loss) / fabs(ref.loss);
        const double ex = test_rel_err_f32(chunked[i].dx, ref.dx, N * C), ew = test_rel_err_f32(chunked[i].dw, ref.dw, V * C);
        EXPECT(el < 1e-6 && ex < 1e-6 && ew < 1e-6, "chunk %lld rows: rel err loss %.2e, dx %.2e, dw %.2e",
               (long long)sizes[i], el, ex, ew);
    }
    /* the unfused pair keeps [N, V] logits and their gradient; one-row chunks keep [1, V] of each */
    const size_t full = 2 * (size_t)N * V * sizeof(float), row = 2 * (size_t)V * sizeof(float) + 2 * 64;
    EXPECT(chunked[0].high_water + full - row <= ref.high_water,
           "arena peak %zu bytes with 1-row chunks, %zu unfused: the logits are still all kept", chunked[0].high_water,
           ref.high_water);
}

int main(void) {
    TEST_BEGIN();
    RUN(gradients_match_finite_differences_for_every_chunking);
    RUN(chunked_equals_unfused_and_one_chunk_is_bit_identical);
    TEST_END();
}
