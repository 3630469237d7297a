/* Cross-entropy loss kernels of the CPU backend. */
#include "cpu.h"

#define CPU_IMPL "cross_entropy_impl.h"
#include "instantiate.h"

static void check_targets(const Tensor *logits, const Tensor *targets, int ignore_index) {
    const int32_t *tg = targets->data;
    int64_t V = tensor_dim(logits, -1);
    for (int64_t n = 0; n < targets->numel; n++)
        if (tg[n] != ignore_index && (tg[n] < 0 || tg[n] >= V))
            fatal("cross_entropy: target %d at row %lld outside [0, %lld)", tg[n], (long long)n, (long long)V);
}

int64_t cpu_cross_entropy_forward(Tensor *loss, Tensor *lse, const Tensor *logits, const Tensor *targets,
                                  int ignore_index) {
    CPU_SAME_DTYPE("cross_entropy_forward", logits, loss, lse);
    check_targets(logits, targets, ignore_index);
    int64_t N = tensor_rows(logits), V = tensor_dim(logits, -1);
    if (logits->dtype == DT_F64) return ce_fwd_f64(loss->data, lse->data, logits->data, targets->data, N, V, ignore_index);
    if (logits->dtype == DT_F32) return ce_fwd_f32(loss->data, lse->data, logits->data, targets->data, N, V, ignore_index);
    fatal("cpu cross_entropy: dtype %s", dtype_name(logits->dtype));
}

void cpu_cross_entropy_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse,
                                const Tensor *targets, int ignore_index, int64_t n_valid) {
    CPU_SAME_DTYPE("cross_entropy_backward", logits, dlogits, dloss, lse);
    double g = tensor_get(dloss, 0);
    CPU_CALL(logits, ce_bwd, dlogits->data, g, logits->data, lse->data, targets->data, tensor_rows(logits),
             tensor_dim(logits, -1), ignore_index, n_valid);
}
