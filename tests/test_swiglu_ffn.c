/* The chunked SwiGLU feed-forward (op_swiglu_ffn, autograd/op_swiglu_ffn.c): float64 finite-difference
 * gradients of x and the three weights for several chunk sizes (a chunk of one row, a last chunk shorter
 * than the others, 3-D input); in float32 the output and every gradient equal the unfused
 * op_linear / op_swiglu chain to float rounding, and bit for bit with one chunk; the backward's arena peak
 * holds one chunk's [rows, F] intermediates, not all rows'; a forward without gradients keeps only y. */
#include <math.h>
#include <string.h>

#include "../autograd/ops.h"
#include "gradcheck.h"
#include "test.h"

#define N 11
#define C 6
#define F 16

static Tensor *f_ffn(Engine *e, Tensor **in, void *ctx) {
    return op_swiglu_ffn(e, in[0], in[1], in[2], in[3], *(const int64_t *)ctx);
}

TEST(gradients_match_finite_differences_for_every_chunking) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F64, 1 << 20);
    const int64_t chunks[] = {1, 3, 4, N, 100};
    Tensor *x = test_randn(DT_F64, SHAPE(N, C), 1, 1), *wg = test_randn(DT_F64, SHAPE(F, C), 0.5f, 2);
    Tensor *wu = test_randn(DT_F64, SHAPE(F, C), 0.5f, 3), *wd = test_randn(DT_F64, SHAPE(C, F), 0.5f, 4);
    Tensor *in[] = {x, wg, wu, wd};
    for (int i = 0; i < 4; i++) test_requires_grad(in[i]);
    for (int i = 0; i < 5; i++) {
        int64_t chunk = chunks[i];
        GradCheckResult r = gradcheck(&e, f_ffn, in, 4, &chunk, 0, 5 + (uint64_t)i);
        EXPECT(r.max_rel_err < 1e-6 && r.numeric_norm > 0, "chunk %lld rows: rel err %.3e (input %d)",
               (long long)chunk, r.max_rel_err, r.worst_input);
    }
    /* [B, T, C]: rows are the flattened leading dims */
    Tensor *x3 = test_randn(DT_F64, SHAPE(1, N, C), 1, 6);
    test_requires_grad(x3);
    Tensor *in3[] = {x3, wg, wu, wd};
    int64_t chunk = 4;
    GradCheckResult r = gradcheck(&e, f_ffn, in3, 4, &chunk, 0, 11);
    EXPECT(r.max_rel_err < 1e-6 && r.numeric_norm > 0, "[1, N, C] input: rel err %.3e", r.max_rel_err);
    test_tensor_free(x3);
    for (int i = 0; i < 4; i++) test_tensor_free(in[i]);
    engine_free(&e);
}

typedef struct {
    float y[N * C], dx[N * C], dwg[F * C], dwu[F * C], dwd[C * F];
    size_t backward_peak; /* the arena's high-water mark over the backward alone */
} F32Run;

/* output and gradients in float32 of sum(y * r) (r fixed): the op with chunk_rows (0: the unfused chain) */
static F32Run run_f32(int64_t chunk_rows) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Tensor *x = test_randn(DT_F32, SHAPE(N, C), 1, 21), *wg = test_randn(DT_F32, SHAPE(F, C), 0.5f, 22);
    Tensor *wu = test_randn(DT_F32, SHAPE(F, C), 0.5f, 23), *wd = test_randn(DT_F32, SHAPE(C, F), 0.5f, 24);
    Tensor *seed = test_randn(DT_F32, SHAPE(N, C), 1, 25);
    Tensor *in[] = {x, wg, wu, wd};
    for (int i = 0; i < 4; i++) test_requires_grad(in[i]);
    Tensor *y = chunk_rows ? op_swiglu_ffn(&e, x, wg, wu, wd, chunk_rows)
                           : op_linear(&e, op_swiglu(&e, op_linear(&e, x, wg), op_linear(&e, x, wu)), wd);
    F32Run r;
    memcpy(r.y, y->data, sizeof r.y);
    const size_t before = e.data.high_water;
    e.data.high_water = e.data.live;
    engine_backward_from(&e, y, seed, 0);
    r.backward_peak = e.data.high_water;
    e.data.high_water = before > e.data.high_water ? before : e.data.high_water;
    memcpy(r.dx, x->grad->data, sizeof r.dx);
    memcpy(r.dwg, wg->grad->data, sizeof r.dwg);
    memcpy(r.dwu, wu->grad->data, sizeof r.dwu);
    memcpy(r.dwd, wd->grad->data, sizeof r.dwd);
    for (int i = 0; i < 4; i++) test_tensor_free(in[i]);
    test_tensor_free(seed);
    engine_free(&e);
    return r;
}

TEST(chunked_equals_unfused_and_one_chunk_is_bit_identical) {
    static F32Run ref, one, chunked[3];
    ref = run_f32(0);
    one = run_f32(N);
    EXPECT(memcmp(one.y, ref.y, sizeof ref.y) == 0 && memcmp(one.dx, ref.dx, sizeof ref.dx) == 0 &&
               memcmp(one.dwg, ref.dwg, sizeof ref.dwg) == 0 && memcmp(one.dwu, ref.dwu, sizeof ref.dwu) == 0 &&
               memcmp(one.dwd, ref.dwd, sizeof ref.dwd) == 0,
           "one chunk differs from the unfused linear / swiglu chain");
    const int64_t sizes[3] = {1, 4, 5};
    for (int i = 0; i < 3; i++) {
        chunked[i] = run_f32(sizes[i]);
        const double ey = test_rel_err_f32(chunked[i].y, ref.y, N * C), ex = test_rel_err_f32(chunked[i].dx, ref.dx, N * C);
        const double eg = test_rel_err_f32(chunked[i].dwg, ref.dwg, F * C), eu = test_rel_err_f32(chunked[i].dwu, ref.dwu, F * C);
        const double ed = test_rel_err_f32(chunked[i].dwd, ref.dwd, C * F);
        EXPECT(ey < 1e-6 && ex < 1e-6 && eg < 1e-6 && eu < 1e-6 && ed < 1e-6,
               "chunk %lld rows: rel err y %.2e, dx %.2e, dWg %.2e, dWu %.2e, dWd %.2e", (long long)sizes[i], ey, ex,
               eg, eu, ed);
    }
    /* the unfused chain's backward holds gate, up, h and their three gradients over all N rows; one-row
     * chunks hold six rows of F at most (each buffer rounded up to the arena's 64 bytes) */
    const size_t full = 6 * (size_t)N * F * sizeof(float), row = 6 * ((size_t)F * sizeof(float) + 64);
    EXPECT(chunked[0].backward_peak + full - row <= ref.backward_peak,
           "backward arena peak %zu bytes with 1-row chunks, %zu unfused: the [N, F] tensors are still all kept",
           chunked[0].backward_peak, ref.backward_peak);
}

/* Without a backward to come (evaluation) even a single chunk's [N, F] intermediates are released when the
 * op returns: the arena keeps y alone, and y is the recording forward's. */
TEST(a_forward_without_gradients_keeps_only_its_output) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Tensor *x = test_randn(DT_F32, SHAPE(N, C), 1, 31), *wg = test_randn(DT_F32, SHAPE(F, C), 0.5f, 32);
    Tensor *wu = test_randn(DT_F32, SHAPE(F, C), 0.5f, 33), *wd = test_randn(DT_F32, SHAPE(C, F), 0.5f, 34);
    test_requires_grad(x);
    Tensor *with = op_swiglu_ffn(&e, x, wg, wu, wd, N);
    const bool was = engine_set_grad(&e, false);
    const size_t live = e.data.live;
    Tensor *without = op_swiglu_ffn(&e, x, wg, wu, wd, N);
    const size_t kept = e.data.live - live, y_bytes = ((size_t)N * C * sizeof(float) + 63) / 64 * 64;
    engine_set_grad(&e, was);
    EXPECT(kept == y_bytes, "a forward without gradients keeps %zu arena bytes, its output is %zu", kept, y_bytes);
    EXPECT(memcmp(with->data, without->data, (size_t)N * C * sizeof(float)) == 0, "y differs without gradients");
    test_tensor_free(x), test_tensor_free(wg), test_tensor_free(wu), test_tensor_free(wd);
    engine_free(&e);
}

int main(void) {
    TEST_BEGIN();
    RUN(gradients_match_finite_differences_for_every_chunking);
    RUN(chunked_equals_unfused_and_one_chunk_is_bit_identical);
    RUN(a_forward_without_gradients_keeps_only_its_output);
    TEST_END();
}
