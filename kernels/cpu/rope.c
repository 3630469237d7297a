/* Rotary position embedding kernels of the CPU backend: NeoX/Llama "rotate half" pairing
 * (dim i with dim i + rotary_dim/2), inv_freq_i = theta^(-2i/rotary_dim), on the first rotary_dim
 * dims of every head; the rest pass through. The backward is the rotation by -angle. */
#include <stdlib.h>

#include "cpu.h"

#define CPU_IMPL "rope_impl.h"
#include "instantiate.h"

/* Validate the call and return the rotary_dim/2 inverse frequencies (caller frees). */
static double *rope_prepare(const char *kernel, const Tensor *x, const Tensor *y, const Tensor *positions,
                            int rotary_dim, float theta) {
    if (x->ndim != 3) fatal("cpu %s: x must be [N, H, D], got %d dims", kernel, x->ndim);
    if (y->numel != x->numel) fatal("cpu %s: input and output sizes differ", kernel);
    const int64_t N = x->shape[0], D = x->shape[2];
    if (positions->dtype != DT_I32 || positions->numel != N)
        fatal("cpu %s: positions must be i32 [%lld], got %s with %lld elements", kernel, (long long)N,
              dtype_name(positions->dtype), (long long)positions->numel);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        fatal("cpu %s: rotary_dim %d must be even and in [2, head dim %lld]", kernel, rotary_dim, (long long)D);
    if (!(theta > 1.0f)) fatal("cpu %s: theta %g must be > 1", kernel, (double)theta);
    const int half = rotary_dim / 2;
    double *inv_freq = xmalloc((size_t)half * sizeof(double));
    for (int i = 0; i < half; i++) inv_freq[i] = pow((double)theta, -2.0 * i / (double)rotary_dim);
    return inv_freq;
}

void cpu_rope_forward(Tensor *y, const Tensor *x, const Tensor *positions, int rotary_dim, float theta) {
    CPU_SAME_DTYPE("rope_forward", x, y);
    double *inv_freq = rope_prepare("rope_forward", x, y, positions, rotary_dim, theta);
    CPU_CALL(x, rope_apply, y->data, x->data, positions->data, inv_freq, x->shape[0], x->shape[1], x->shape[2],
             rotary_dim, 1.0, false);
    free(inv_freq);
}

void cpu_rope_backward(Tensor *dx, const Tensor *dy, const Tensor *positions, int rotary_dim, float theta) {
    if (!dx) return;
    CPU_SAME_DTYPE("rope_backward", dy, dx);
    double *inv_freq = rope_prepare("rope_backward", dy, dx, positions, rotary_dim, theta);
    CPU_CALL(dy, rope_apply, dx->data, dy->data, positions->data, inv_freq, dy->shape[0], dy->shape[1],
             dy->shape[2], rotary_dim, -1.0, true);
    free(inv_freq);
}
