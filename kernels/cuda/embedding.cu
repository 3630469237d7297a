/* Token embedding on the GPU. Forward: out[n,:] = wte[tokens[n],:] (wte F32 master weights or BF16,
 * out the activation dtype). Backward: dwte[v,:] += sum of dout[n,:] over the positions n holding
 * token v, deterministic: the tokens are sorted by value on the host (one small copy of the i32 ids,
 * a synchronisation once per backward) and each (token, channel) sums its rows in position order,
 * so an F32 gradient is bit-identical to the CPU reference's. */
#include <stdlib.h>
#include <string.h>

#include "primitives.cuh"

using namespace msacuda;

template <typename To, typename Tw>
__global__ void embedding_fwd_kernel(To *out, const Tw *wte, const int32_t *tokens, int64_t N, int64_t C, int64_t V, int *err) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * C; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = i / C, c = i % C;
        const int32_t tok = tokens[n];
        if (tok < 0 || tok >= V) {
            if (c == 0) report_error(err, ERR_TOKEN, (int)n, tok);
            out[i] = from_f32<To>(0.0f);
            continue;
        }
        out[i] = from_f32<To>(to_f32(wte[(int64_t)tok * C + c]));
    }
}

extern "C" void cuda_embedding_forward(Tensor *out, const Tensor *wte, const Tensor *tokens) {
    init();
    if (tokens->dtype != DT_I32) fatal("cuda embedding: tokens must be i32");
    if (wte->ndim != 2 || out->numel != tokens->numel * wte->shape[1])
        fatal("cuda embedding: out must be [%lld, %lld]", (long long)tokens->numel, (long long)wte->shape[1]);
    const int64_t N = tokens->numel, C = wte->shape[1];
    if (N * C == 0) return;
    DISPATCH_FLOAT(out->dtype, To, "embedding_forward", DISPATCH_FLOAT(wte->dtype, Tw, "embedding_forward", {
        embedding_fwd_kernel<To, Tw><<<grid_for(N * C, 256), 256>>>((To *)out->data, (const Tw *)wte->data,
                                                                    (const int32_t *)tokens->data, N, C, wte->shape[0], errbuf());
        LAUNCH_CHECK("embedding_forward");
    }));
}

/* one block row per distinct token (blockIdx.x), channels across threads and blockIdx.y */
template <typename Tw, typename To>
__global__ void embedding_bwd_kernel(Tw *dwte, const To *dout, const int32_t *uniq, const int32_t *offs,
                                     const int32_t *perm, int64_t C) {
    const int64_t c = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int64_t v = uniq[blockIdx.x];
    float acc = to_f32(dwte[v * C + c]);
    for (int32_t k = offs[blockIdx.x]; k < offs[blockIdx.x + 1]; k++) acc += to_f32(dout[(int64_t)perm[k] * C + c]);
    dwte[v * C + c] = from_f32<Tw>(acc);
}

extern "C" void cuda_embedding_backward(Tensor *dwte, const Tensor *dout, const Tensor *tokens) {
    init();
    if (!dwte) return;
    if (tokens->dtype != DT_I32) fatal("cuda embedding: tokens must be i32");
    const int64_t N = tokens->numel, V = dwte->shape[0], C = dwte->shape[1];
    if (dwte->ndim != 2 || dout->numel != N * C)
        fatal("cuda embedding backward: dout must be [%lld, %lld]", (long long)N, (long long)C);
    if (N == 0 || C == 0) return;
    if (N > INT32_MAX) fatal("cuda embedding backward: more than 2^31 tokens");
    int32_t *tok = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    int32_t *count = (int32_t *)calloc((size_t)V + 1, sizeof(int32_t));
    if (!tok || !count) fatal("out of host memory in cuda embedding backward");
    CUDA_CHECK(cudaMemcpy(tok, tokens->data, (size_t)N * sizeof(int32_t), cudaMemcpyDeviceToHost));
    for (int64_t n = 0; n < N; n++) {
        if (tok[n] < 0 || tok[n] >= V)
            fatal("embedding: token %d at position %lld outside the vocabulary [0, %lld)", tok[n], (long long)n, (long long)V);
        count[tok[n]]++;
    }
    /* host layout: perm [N] | uniq [U] | offs [U+1], uploaded in one copy */
    int32_t *host = (int32_t *)malloc((size_t)(3 * N + 1) * sizeof(int32_t));
    if (!host) fatal("out of host memory in cuda embedding backward");
    int32_t U = 0;
    for (int64_t v = 0; v < V; v++) U += count[v] > 0;
    int32_t *perm = host, *uniq = host + N, *offs = host + N + U;
    int32_t pos = 0, u = 0;
    for (int64_t v = 0; v < V; v++) { /* count[v] becomes the token's first slot in perm */
        const int32_t c = count[v];
        count[v] = pos;
        if (c) {
            uniq[u] = (int32_t)v;
            offs[u++] = pos;
        }
        pos += c;
    }
    offs[U] = pos;
    for (int64_t n = 0; n < N; n++) perm[count[tok[n]]++] = (int32_t)n; /* stable: position order */
    const size_t words = (size_t)N + 2 * (size_t)U + 1;
    int32_t *dev = (int32_t *)scratch(words * sizeof(int32_t));
    CUDA_CHECK(cudaMemcpy(dev, host, words * sizeof(int32_t), cudaMemcpyHostToDevice));
    free(tok);
    free(count);
    free(host);
    const dim3 grid((unsigned)U, (unsigned)((C + 127) / 128));
    DISPATCH_FLOAT(dwte->dtype, Tw, "embedding_backward", DISPATCH_FLOAT(dout->dtype, To, "embedding_backward", {
        embedding_bwd_kernel<Tw, To><<<grid, 128>>>((Tw *)dwte->data, (const To *)dout->data, dev + N, dev + N + U, dev, C);
        LAUNCH_CHECK("embedding_backward");
    }));
}
