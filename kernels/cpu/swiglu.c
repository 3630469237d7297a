/* SwiGLU activation kernels of the CPU backend. */
#include "cpu.h"

#define CPU_IMPL "swiglu_impl.h"
#include "instantiate.h"

void cpu_swiglu_forward(Tensor *out, const Tensor *gate, const Tensor *up) {
    CPU_SAME_DTYPE("swiglu_forward", gate, up, out);
    CPU_CALL(gate, swiglu_fwd, out->data, gate->data, up->data, gate->numel);
}

void cpu_swiglu_backward(Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate, const Tensor *up) {
    CPU_SAME_DTYPE("swiglu_backward", gate, up, dout, dgate, dup);
    CPU_CALL(gate, swiglu_bwd, dgate ? dgate->data : NULL, dup ? dup->data : NULL, dout->data, gate->data, up->data,
             gate->numel);
}
