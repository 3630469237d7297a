/* The FlashAttention-2-style kernels of attention.cu over rows given as ranges, shared by the whole
 * micro-batch's attention (attention.cu) and one step of ring attention (attention_ring.cu). */
#ifndef MSA_CUDA_ATTENTION_CUH
#define MSA_CUDA_ATTENTION_CUH

#include "primitives.cuh"

namespace msacuda {

/* The visible (query, key) pairs of one call, as device arrays of row numbers: query row t sees the key
 * rows key_lo[t] .. key_hi[t]-1 ([Nq] each), key row j is seen by the query rows query_lo[j] ..
 * query_hi[j]-1 ([Nk] each). All four are non-decreasing (the kernels walk a block's rows from the first
 * row's lo to the last row's hi) and describe the same pairs. */
struct AttnRows {
    int *key_lo, *key_hi, *query_lo, *query_hi;
    int Nq, Nk, Hq, Hkv, D;
};

/* Softmax attention of q [Nq,Hq,D] over k, v [Nk,Hkv,D] on the pairs of r (query head h reads KV head
 * h / (Hq/Hkv)), into out [Nq,Hq,D] and lse f32 [Hq,Nq]. merge: combine with the running (out, lse) by the
 * log-sum-exp rule (a query that sees no key is left as it was); else write them (every query must see a
 * key). Dtypes F32 or BF16 (q's), fp32 arithmetic. */
void attention_rows_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                            const AttnRows &r, float scale, bool merge, const char *what);

/* dq, dk, dv += the pairs' share of the gradient, given the final out and lse (NULL gradient: skipped).
 * dsum: device scratch of Hq*Nq floats. Deterministic: no atomics. */
void attention_rows_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k,
                             const Tensor *v, const Tensor *out, const Tensor *lse, const AttnRows &r, float *dsum,
                             float scale, const char *what);

}  // namespace msacuda

#endif
