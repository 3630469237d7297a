/* RMSNorm kernels of the CPU backend (row-wise over the last dim; also per-head on [N, H, D]), and the
 * residual add + RMSNorm of kernels.def. */
#include <stdlib.h>

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

/* The CPU is the oracle of the fused kernel: it runs the unfused ops' kernels (add, rmsnorm; the
 * rmsnorm backward into the gradient reaching h, then the add's two axpy), so that a model using the
 * fused op computes what it computed with the unfused ones, bit for bit (tests/test_ops.c). */
void cpu_add_rmsnorm_forward(Tensor *h, Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *r, const Tensor *w,
                             float eps) {
    cpu_add(h, x, r);
    cpu_rmsnorm_forward(y, rstd, h, w, eps, false);
}

void cpu_add_rmsnorm_backward(Tensor *dx, Tensor *dr, Tensor *dw, const Tensor *dy, const Tensor *dh, const Tensor *h,
                              const Tensor *w, const Tensor *rstd) {
    CPU_SAME_DTYPE("add_rmsnorm_backward", h, dx, dr, dh);
    if (dh && dh->numel != h->numel)
        fatal("cpu add_rmsnorm_backward: dh has %lld elements, h %lld", (long long)dh->numel, (long long)h->numel);
    if (!dx && !dr) {
        cpu_rmsnorm_backward(NULL, dw, dy, h, w, rstd, false);
        return;
    }
    Tensor dh_total = tensor_as_rows(h);
    dh_total.data = xmalloc(tensor_bytes(h));
    if (dh) memcpy(dh_total.data, dh->data, tensor_bytes(h));
    else memset(dh_total.data, 0, tensor_bytes(h));
    cpu_rmsnorm_backward(&dh_total, dw, dy, h, w, rstd, false);
    if (dx) cpu_axpy(dx, &dh_total, 1.0f);
    if (dr) cpu_axpy(dr, &dh_total, 1.0f);
    free(dh_total.data);
}
