/* Dropout kernels of the CPU backend (mask: kernels/dropout_mask.h). */
#include "../dropout_mask.h"
#include "cpu.h"

#define CPU_IMPL "dropout_impl.h"
#include "instantiate.h"

static void check_p(const char *kernel, float p) {
    if (!(p >= 0.0f && p < 1.0f)) fatal("cpu %s: dropout probability %g must be in [0, 1)", kernel, (double)p);
}

static uint64_t seed_of(const char *kernel, const Tensor *seed) {
    if (seed->dtype != DT_I32 || seed->numel != 2)
        fatal("cpu %s: the seed must be an i32 [2] tensor (its low and high words)", kernel);
    return dropout_seed_of_words(seed->data);
}

void cpu_dropout_forward(Tensor *y, const Tensor *x, float p, const Tensor *seed_words, int64_t offset) {
    CPU_SAME_DTYPE("dropout_forward", x, y);
    check_p("dropout_forward", p);
    const uint64_t seed = seed_of("dropout_forward", seed_words);
    if (y->numel != x->numel) fatal("cpu dropout_forward: y has %lld elements, x %lld", (long long)y->numel, (long long)x->numel);
    CPU_CALL(x, dropout_fwd, y->data, x->data, x->numel, seed, offset, dropout_threshold(p), 1.0 / (1.0 - (double)p));
}

void cpu_dropout_backward(Tensor *dx, const Tensor *dy, float p, const Tensor *seed_words, int64_t offset) {
    CPU_SAME_DTYPE("dropout_backward", dy, dx);
    check_p("dropout_backward", p);
    const uint64_t seed = seed_of("dropout_backward", seed_words);
    if (dx->numel != dy->numel) fatal("cpu dropout_backward: dx has %lld elements, dy %lld", (long long)dx->numel, (long long)dy->numel);
    CPU_CALL(dy, dropout_bwd, dx->data, dy->data, dy->numel, seed, offset, dropout_threshold(p), 1.0 / (1.0 - (double)p));
}
