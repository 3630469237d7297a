/* MoE dispatch kernels of the CPU backend: the routing plan (expert-grouped order of the N*k
 * token-expert assignments), permute / unpermute, and the grouped expert GEMM. */
#include <stdlib.h>

#include "cpu.h"

#define CPU_IMPL "moe_dispatch_impl.h"
#include "instantiate.h"

/* Counting sort of the assignments by expert. The scan goes token by token, slot by slot, so the
 * tokens of one expert stay in token order (stable): the grouped buffer is then deterministic and
 * independent of thread count, which keeps checkpoint recomputation bit-identical. */
void cpu_moe_plan(Tensor *offsets, Tensor *rows, const Tensor *idx) {
    if (offsets->dtype != DT_I32 || rows->dtype != DT_I32 || idx->dtype != DT_I32 || rows->numel != idx->numel)
        fatal("cpu moe_plan: offsets, rows and idx must be i32, rows the shape of idx");
    int64_t E = offsets->numel - 1, M = idx->numel;
    if (M > INT32_MAX) fatal("cpu moe_plan: %lld assignments overflow i32 rows", (long long)M);
    const int32_t *id = idx->data;
    int32_t *off = offsets->data, *r = rows->data;
    memset(off, 0, (size_t)(E + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < M; i++) {
        if (id[i] < 0 || id[i] >= E) fatal("cpu moe_plan: expert index %d outside [0, %lld)", id[i], (long long)E);
        off[id[i] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) off[e + 1] += off[e];
    int32_t *cursor = xmalloc((size_t)E * sizeof(int32_t));
    memcpy(cursor, off, (size_t)E * sizeof(int32_t));
    for (int64_t i = 0; i < M; i++) r[i] = cursor[id[i]]++;
    free(cursor);
}

static void check_rows(const char *kernel, const Tensor *rows, int64_t N, int64_t M) {
    if (rows->dtype != DT_I32 || rows->ndim != 2 || rows->shape[0] != N || rows->numel != M)
        fatal("cpu %s: rows must be i32 [%lld, k] with N*k = %lld rows in the grouped buffer", kernel, (long long)N,
              (long long)M);
}

void cpu_moe_permute_forward(Tensor *xs, const Tensor *x, const Tensor *rows) {
    CPU_SAME_DTYPE("moe_permute_forward", x, xs);
    int64_t N = tensor_rows(x), C = tensor_dim(x, -1);
    check_rows("moe_permute_forward", rows, N, tensor_rows(xs));
    CPU_CALL(x, moe_perm_fwd, xs->data, x->data, rows->data, N, (int)rows->shape[1], C);
}

void cpu_moe_permute_backward(Tensor *dx, const Tensor *dxs, const Tensor *rows) {
    CPU_SAME_DTYPE("moe_permute_backward", dx, dxs);
    int64_t N = tensor_rows(dx), C = tensor_dim(dx, -1);
    check_rows("moe_permute_backward", rows, N, tensor_rows(dxs));
    CPU_CALL(dx, moe_perm_bwd, dx->data, dxs->data, rows->data, N, (int)rows->shape[1], C);
}

void cpu_moe_unpermute_forward(Tensor *out, const Tensor *ys, const Tensor *w, const Tensor *rows) {
    CPU_SAME_DTYPE("moe_unpermute_forward", ys, out, w);
    int64_t N = tensor_rows(out), C = tensor_dim(out, -1);
    check_rows("moe_unpermute_forward", rows, N, tensor_rows(ys));
    if (w->numel != rows->numel) fatal("cpu moe_unpermute_forward: weights must be [N, k]");
    CPU_CALL(ys, moe_unperm_fwd, out->data, ys->data, w->data, rows->data, N, (int)rows->shape[1], C);
}

void cpu_moe_unpermute_backward(Tensor *dys, Tensor *dw, const Tensor *dout, const Tensor *ys, const Tensor *w,
                                const Tensor *rows) {
    CPU_SAME_DTYPE("moe_unpermute_backward", ys, dys, dw, dout, w);
    int64_t N = tensor_rows(dout), C = tensor_dim(dout, -1);
    check_rows("moe_unpermute_backward", rows, N, tensor_rows(ys));
    CPU_CALL(ys, moe_unperm_bwd, dys ? dys->data : NULL, dw ? dw->data : NULL, dout->data, ys->data, w->data,
             rows->data, N, (int)rows->shape[1], C);
}

static void check_grouped(const char *kernel, const Tensor *xs, const Tensor *w, const Tensor *offsets,
                          const Tensor *ys) {
    if (w->ndim != 3 || offsets->dtype != DT_I32 || offsets->numel != w->shape[0] + 1)
        fatal("cpu %s: w must be [E, out, in] and offsets i32 [E+1]", kernel);
    if (xs->ndim != 2 || xs->shape[1] != w->shape[2] || ys->ndim != 2 || ys->shape[1] != w->shape[1] ||
        ys->shape[0] != xs->shape[0])
        fatal("cpu %s: xs [M, in] and ys [M, out] do not match w [E, out, in]", kernel);
    const int32_t *off = offsets->data;
    int64_t E = w->shape[0];
    if (off[0] != 0 || off[E] != xs->shape[0])
        fatal("cpu %s: offsets span [%d, %d), the grouped buffer has %lld rows", kernel, off[0], off[E],
              (long long)xs->shape[0]);
    for (int64_t e = 0; e < E; e++)
        if (off[e + 1] < off[e]) fatal("cpu %s: offsets decrease at expert %lld", kernel, (long long)e);
}

void cpu_grouped_matmul_forward(Tensor *ys, const Tensor *xs, const Tensor *w, const Tensor *offsets) {
    CPU_SAME_DTYPE("grouped_matmul_forward", xs, w, ys);
    check_grouped("grouped_matmul_forward", xs, w, offsets, ys);
    CPU_CALL(xs, grouped_mm_fwd, ys->data, xs->data, w->data, offsets->data, w->shape[0], w->shape[2], w->shape[1]);
}

void cpu_grouped_matmul_backward(Tensor *dxs, Tensor *dw, const Tensor *dys, const Tensor *xs, const Tensor *w,
                                 const Tensor *offsets) {
    CPU_SAME_DTYPE("grouped_matmul_backward", xs, w, dys, dxs, dw);
    check_grouped("grouped_matmul_backward", xs, w, offsets, dys);
    CPU_CALL(xs, grouped_mm_bwd, dxs ? dxs->data : NULL, dw ? dw->data : NULL, dys->data, xs->data, w->data,
             offsets->data, w->shape[0], w->shape[2], w->shape[1]);
}
