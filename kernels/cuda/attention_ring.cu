/* One step of ring attention on the GPU (dist.cp_mode = sequence, autograd/op_cp_sequence.c): this rank's
 * queries against one block of keys, each row named by its token in the micro-batch (kernels.def states
 * the contract; kernels/cpu/attention.c is the reference).
 *
 * Both index lists ascend, so what a query sees is a run of key rows and what a key is seen by a run of
 * query rows (the CPU's ring_dims): a first kernel finds the four ranges by binary search (a thread per
 * row), then attention.cu's kernels run on them (attention.cuh), the forward merging into the running
 * (out, lse). The same kernels and arithmetic as dense attention: fp32 in registers, BF16 or F32 data,
 * head dims up to 256, deterministic (dk/dv KV-outer and dq Q-outer, no atomics). The scores use CUDA
 * cores, as attention.cu's own kernels do.
 *
 * Bad indices (outside cu_seqlens' tokens, or not ascending) are reported through the error word at the
 * next wait of the host; the ranges stay inside the rows meanwhile. */
#include "attention.cuh"
#include "limits.h"

using namespace msacuda;

namespace {

/* The ring step's rows: query t sees the keys whose tokens lie in [start of q_index[t]'s document,
 * q_index[t]]; key j is seen by the queries whose tokens lie in [k_index[j], end of its document). */
__global__ void ring_rows_kernel(AttnRows r, const int *q_index, const int *k_index, const int *cu, int ndocs, int *err) {
    const int Nq = r.Nq, Nk = r.Nk;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < Nq + Nk; i += gridDim.x * blockDim.x) {
        const bool is_query = i < Nq;
        const int row = is_query ? i : i - Nq;
        const int *index = is_query ? q_index : k_index;
        const int token = index[row];
        if (token < cu[0] || token >= cu[ndocs] || (row > 0 && index[row - 1] >= token))
            report_error(err, ERR_RING_INDEX, is_query, row, token);
        const int d = max(upper_bound(cu, ndocs, token) - 1, 0); /* the last document starting at or before it */
        if (is_query) {
            r.key_lo[row] = lower_bound(k_index, Nk, cu[d]);
            r.key_hi[row] = max(r.key_lo[row], lower_bound(k_index, Nk, token + 1));
        } else {
            r.query_lo[row] = lower_bound(q_index, Nq, token);
            r.query_hi[row] = max(r.query_lo[row], lower_bound(q_index, Nq, cu[d + 1]));
        }
    }
}

/* Shapes and dtypes of a ring step; its rows in scratch, then extra_per_query_head bytes per (query head, query)
 * for the caller at *extra. */
AttnRows ring_rows(const char *what, const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *q_index,
                   const Tensor *k_index, const Tensor *cu, size_t extra_per_query_head, void **extra) {
    if (q->ndim != 3 || k->ndim != 3 || v->ndim != 3) fatal("cuda %s: q, k, v must be [N, H, D]", what);
    const int64_t Nq = q->shape[0], Nk = k->shape[0], Hq = q->shape[1], Hkv = k->shape[1], D = q->shape[2];
    if (k->shape[2] != D || v->shape[0] != Nk || v->shape[1] != Hkv || v->shape[2] != D)
        fatal("cuda %s: k and v must be [%lld, Hkv, %lld] like each other", what, (long long)Nk, (long long)D);
    if (Hkv <= 0 || Hq % Hkv != 0)
        fatal("cuda %s: %lld query heads are not a multiple of %lld KV heads", what, (long long)Hq, (long long)Hkv);
    if (D < 1 || D > CUDA_HEAD_DIM_MAX)
        fatal("cuda %s: head dim %lld not supported (1..%d)", what, (long long)D, CUDA_HEAD_DIM_MAX);
    if (Nq >= INT32_MAX / 4 || Nk >= INT32_MAX / 4 || Hq > CUDA_HEADS_MAX) fatal("cuda %s: too many tokens or heads", what);
    if (q->dtype != k->dtype || q->dtype != v->dtype) fatal("cuda %s: q, k, v dtypes differ", what);
    if (cu->dtype != DT_I32 || cu->numel < 2) fatal("cuda %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1", what);
    if (q_index->dtype != DT_I32 || q_index->numel != Nq)
        fatal("cuda %s: q_index must be i32 [%lld], one token per query row", what, (long long)Nq);
    if (k_index->dtype != DT_I32 || k_index->numel != Nk)
        fatal("cuda %s: k_index must be i32 [%lld], one token per key row", what, (long long)Nk);
    if (q_index->device != DEV_CUDA || k_index->device != DEV_CUDA || cu->device != DEV_CUDA)
        fatal("cuda %s: q_index, k_index and cu_seqlens must be on the device", what);
    const size_t rows_bytes = align256((size_t)(2 * Nq + 2 * Nk) * sizeof(int));
    char *ws = (char *)scratch(rows_bytes + (size_t)(Hq * Nq) * extra_per_query_head);
    int *x = (int *)ws;
    const AttnRows r{x, x + Nq, x + 2 * Nq, x + 2 * Nq + Nk, (int)Nq, (int)Nk, (int)Hq, (int)Hkv, (int)D};
    if (Nq + Nk > 0) {
        ring_rows_kernel<<<grid_for(Nq + Nk, 256), 256, 0, stream()>>>(r, (const int *)q_index->data, (const int *)k_index->data,
                                                          (const int *)cu->data, (int)(cu->numel - 1), errbuf());
        LAUNCH_CHECK("attention_ring rows");
    }
    if (extra) *extra = ws + rows_bytes;
    return r;
}

}  // namespace

extern "C" void cuda_attention_ring_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                            const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens,
                                            float scale) {
    init();
    const AttnRows r = ring_rows("attention_ring_forward", q, k, v, q_index, k_index, cu_seqlens, 0, nullptr);
    if (out->numel != q->numel || out->dtype != q->dtype)
        fatal("cuda attention_ring_forward: out must have q's shape and dtype");
    if (lse->numel != (int64_t)r.Hq * r.Nq || lse->dtype != DT_F32)
        fatal("cuda attention_ring_forward: lse must be f32 [Hq, Nq]");
    attention_rows_forward(out, lse, q, k, v, r, scale, true, "attention_ring_forward");
}

extern "C" void cuda_attention_ring_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                             const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                             const Tensor *q_index, const Tensor *k_index, const Tensor *cu_seqlens,
                                             float scale) {
    init();
    if (!dq && !dk && !dv) return;
    void *dsum = nullptr;
    const AttnRows r = ring_rows("attention_ring_backward", q, k, v, q_index, k_index, cu_seqlens, sizeof(float), &dsum);
    if (dout->numel != q->numel || out->numel != q->numel || dout->dtype != q->dtype || out->dtype != q->dtype)
        fatal("cuda attention_ring_backward: dout and out must have q's shape and dtype");
    if (lse->numel != (int64_t)r.Hq * r.Nq || lse->dtype != DT_F32)
        fatal("cuda attention_ring_backward: lse must be f32 [Hq, Nq]");
    const Tensor *grads[3] = {dq, dk, dv}, *like[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (grads[i] && (grads[i]->numel != like[i]->numel || grads[i]->dtype != q->dtype))
            fatal("cuda attention_ring_backward: gradients must have their inputs' shapes and dtype");
    attention_rows_backward(dq, dk, dv, dout, q, k, v, out, lse, r, (float *)dsum, scale, "attention_ring_backward");
}
