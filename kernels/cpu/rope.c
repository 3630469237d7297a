/* Rotary position embedding kernels of the CPU backend: NeoX/Llama "rotate half" pairing
 * (dim i with dim i + rotary_dim/2) by the frequencies of a RopeTable (layers/rope_scaling.c) on the
 * first rotary_dim dims of every head, times its attention scale; the rest pass through. The backward
 * is the scaled rotation by -angle. */
#include "cpu.h"

#define CPU_IMPL "rope_impl.h"
#include "instantiate.h"

static void rope_check(const char *kernel, const Tensor *x, const Tensor *y, const Tensor *positions,
                       const RopeTable *rope) {
    if (x->ndim != 3) fatal("cpu %s: x must be [N, H, D], got %d dims", kernel, x->ndim);
    if (y->numel != x->numel) fatal("cpu %s: input and output sizes differ", kernel);
    const int64_t N = x->shape[0], D = x->shape[2];
    if (positions->dtype != DT_I32 || positions->numel != N)
        fatal("cpu %s: positions must be i32 [%lld], got %s with %lld elements", kernel, (long long)N,
              dtype_name(positions->dtype), (long long)positions->numel);
    if (rope->rotary_dim <= 0 || rope->rotary_dim % 2 != 0 || rope->rotary_dim > D)
        fatal("cpu %s: rotary_dim %d must be even and in [2, head dim %lld]", kernel, rope->rotary_dim, (long long)D);
}

void cpu_rope_forward(Tensor *y, const Tensor *x, const Tensor *positions, const RopeTable *rope) {
    CPU_SAME_DTYPE("rope_forward", x, y);
    rope_check("rope_forward", x, y, positions, rope);
    CPU_CALL(x, rope_apply, y->data, x->data, positions->data, rope->inv_freq, rope->attention_scale, x->shape[0],
             x->shape[1], x->shape[2], rope->rotary_dim, 1.0, false);
}

void cpu_rope_backward(Tensor *dx, const Tensor *dy, const Tensor *positions, const RopeTable *rope) {
    if (!dx) return;
    CPU_SAME_DTYPE("rope_backward", dy, dx);
    rope_check("rope_backward", dy, dx, positions, rope);
    CPU_CALL(dy, rope_apply, dx->data, dy->data, positions->data, rope->inv_freq, rope->attention_scale,
             dy->shape[0], dy->shape[1], dy->shape[2], rope->rotary_dim, -1.0, true);
}
