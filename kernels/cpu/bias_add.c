/* bias_add kernels of the CPU backend: x and y are [rows, cols], b [cols]. */
#include "cpu.h"

#define CPU_IMPL "bias_add_impl.h"
#include "instantiate.h"

void cpu_bias_add_forward(Tensor *y, const Tensor *x, const Tensor *b) {
    CPU_SAME_DTYPE("bias_add_forward", x, y, b);
    int64_t cols = tensor_dim(x, -1);
    if (b->numel != cols || y->numel != x->numel)
        fatal("cpu bias_add: bias of %lld for rows of %lld", (long long)b->numel, (long long)cols);
    CPU_CALL(x, bias_add_fwd, y->data, x->data, b->data, tensor_rows(x), cols);
}

void cpu_bias_add_backward(Tensor *db, const Tensor *dy) {
    CPU_SAME_DTYPE("bias_add_backward", dy, db);
    int64_t cols = tensor_dim(dy, -1);
    if (db->numel != cols)
        fatal("cpu bias_add backward: bias of %lld for rows of %lld", (long long)db->numel, (long long)cols);
    CPU_CALL(dy, bias_add_bwd, db->data, dy->data, tensor_rows(dy), cols);
}
