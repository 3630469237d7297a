/* Token embedding kernels of the CPU backend. */
#include "cpu.h"

#define CPU_IMPL "embedding_impl.h"
#include "instantiate.h"

static void check_tokens(const Tensor *wte, const Tensor *tokens) {
    const int32_t *tk = tokens->data;
    int64_t V = wte->shape[0];
    for (int64_t n = 0; n < tokens->numel; n++)
        if (tk[n] < 0 || tk[n] >= V) fatal("embedding: token %d at position %lld outside the vocabulary [0, %lld)", tk[n], (long long)n, (long long)V);
}

void cpu_embedding_forward(Tensor *out, const Tensor *wte, const Tensor *tokens) {
    CPU_SAME_DTYPE("embedding_forward", wte, out);
    check_tokens(wte, tokens);
    CPU_CALL(wte, embedding_fwd, out->data, wte->data, tokens->data, tokens->numel, wte->shape[1]);
}

void cpu_embedding_backward(Tensor *dwte, const Tensor *dout, const Tensor *tokens) {
    CPU_SAME_DTYPE("embedding_backward", dwte, dout);
    CPU_CALL(dwte, embedding_bwd, dwte->data, dout->data, tokens->data, tokens->numel, dwte->shape[1]);
}
