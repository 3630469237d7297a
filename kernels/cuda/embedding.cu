/* Token embedding on the GPU. Forward: out[n,:] = wte[tokens[n],:] (wte F32 master weights or BF16,
 * out the activation dtype). Backward: dwte[v,:] += sum of dout[n,:] over the positions n holding
 * token v, deterministic: the token ids are radix-sorted on the device (stable, so each token's positions stay in
 * order; no copy to the host) and each (token, channel) sums its rows in position order, so an F32
 * gradient is bit-identical to the CPU reference's. */
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
        embedding_fwd_kernel<To, Tw><<<grid_for(N * C, 256), 256, 0, stream()>>>((To *)out->data, (const Tw *)wte->data,
                                                                    (const int32_t *)tokens->data, N, C, wte->shape[0], errbuf());
        LAUNCH_CHECK("embedding_forward");
    }));
}

/* Sort keys for the backward: the token id (V for an id outside the vocabulary, which the forward has
 * already reported, so it sorts last and is skipped) with its position as the value. */
__global__ void embedding_sort_keys_kernel(uint32_t *keys, int32_t *pos, const int32_t *tokens, int64_t N, int64_t V,
                                           int *err) {
    for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < N; n += (int64_t)gridDim.x * blockDim.x) {
        const int32_t tok = tokens[n];
        const bool bad = tok < 0 || tok >= V;
        if (bad) report_error(err, ERR_TOKEN, (int)n, tok);
        keys[n] = bad ? (uint32_t)V : (uint32_t)tok;
        pos[n] = (int32_t)n;
    }
}

/* Thread block (i, y) per sorted position i and 128 channels: the blocks at the first position of each
 * run of one token sum that token's rows in position order (the sort is stable) into its gradient row;
 * every other block exits at once. */
template <typename Tw, typename To>
__global__ void embedding_bwd_kernel(Tw *dwte, const To *dout, const uint32_t *keys, const int32_t *pos, int64_t N,
                                     int64_t C, int64_t V) {
    const int64_t i = blockIdx.x;
    const uint32_t v = keys[i];
    if (v >= (uint32_t)V || (i > 0 && keys[i - 1] == v)) return;
    int64_t end = i + 1;
    while (end < N && keys[end] == v) end++;
    const int64_t c = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = to_f32(dwte[(int64_t)v * C + c]);
    for (int64_t k = i; k < end; k++) acc += to_f32(dout[(int64_t)pos[k] * C + c]);
    dwte[(int64_t)v * C + c] = from_f32<Tw>(acc);
}

extern "C" void cuda_embedding_backward(Tensor *dwte, const Tensor *dout, const Tensor *tokens) {
    init();
    if (!dwte) return;
    if (tokens->dtype != DT_I32) fatal("cuda embedding: tokens must be i32");
    const int64_t N = tokens->numel, V = dwte->shape[0], C = dwte->shape[1];
    if (dwte->ndim != 2 || dout->numel != N * C)
        fatal("cuda embedding backward: dout must be [%lld, %lld]", (long long)N, (long long)C);
    if (N == 0 || C == 0) return;
    if (N > INT32_MAX || V >= INT32_MAX) fatal("cuda embedding backward: more than 2^31 tokens or vocabulary entries");
    /* scratch: keys_in, keys_out [N] u32 | pos_in, pos_out [N] i32 | radix-sort temp */
    const size_t temp_bytes = sort_pairs_temp_bytes(N, (uint32_t)V);
    const size_t a = align256((size_t)N * 4);
    char *ws = (char *)scratch(4 * a + temp_bytes);
    uint32_t *keys_in = (uint32_t *)ws, *keys = (uint32_t *)(ws + a);
    int32_t *pos_in = (int32_t *)(ws + 2 * a), *pos = (int32_t *)(ws + 3 * a);
    embedding_sort_keys_kernel<<<grid_for(N, 256), 256, 0, stream()>>>(keys_in, pos_in, (const int32_t *)tokens->data, N, V, errbuf());
    LAUNCH_CHECK("embedding_backward keys");
    sort_pairs(ws + 4 * a, temp_bytes, keys_in, keys, pos_in, pos, N, (uint32_t)V);
    DISPATCH_FLOAT(dwte->dtype, Tw, "embedding_backward", DISPATCH_FLOAT(dout->dtype, To, "embedding_backward", {
        embedding_bwd_kernel<Tw, To><<<dim3((unsigned)N, (unsigned)((C + 127) / 128)), 128, 0, stream()>>>((Tw *)dwte->data, (const To *)dout->data, keys, pos, N, C, V);
        LAUNCH_CHECK("embedding_backward");
    }));
}
