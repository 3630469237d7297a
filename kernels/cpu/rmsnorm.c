/* RMSNorm kernels of the CPU backend (row-wise over the last dim; also per-head on [N, H, D]). */
#include "cpu.h"

#define CPU_IMPL "rmsnorm_impl.h"
#include "instantiate.h"

static void check_args(const Tensor *x, const Tensor *w, const Tensor *rstd) {
    int64_t C = tensor_dim(x, -1);
    if (w && w->numel != C) fatal("cpu rmsnorm: gain has %lld elements, rows have %lld", (long long)w->numel, (long long)C);
    if (rstd->numel != tensor_rows(x)) fatal("cpu rmsnorm: rstd must have one entry per row");
}

void cpu_rmsnorm_forward(Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *w, float eps, bool unit_offset) {
    CPU_SAME_DTYPE("rmsnorm_forward", x, y, w, rstd);
    check_args(x, w, rstd);
    CPU_CALL(x, rmsnorm_fwd, y->data, rstd->data, x->data, w ? w->data : NULL, tensor_rows(x), tensor_dim(x, -1),
             eps, unit_offset);
}

void cpu_rmsnorm_backward(Tensor *dx, Tensor *dw, const Tensor *dy, const Tensor *x, const Tensor *w,
                          const Tensor *rstd, bool unit_offset) {
    CPU_SAME_DTYPE("rmsnorm_backward", x, dx, dw, dy, w, rstd);
    check_args(x, w, rstd);
    CPU_CALL(x, rmsnorm_bwd, dx ? dx->data : NULL, dw ? dw->data : NULL, dy->data, x->data, w ? w->data : NULL,
             rstd->data, tensor_rows(x), tensor_dim(x, -1), unit_offset);
}
