/* The one dispatch table between autograd and the kernels.
 *
 * Each backend (kernels/cpu, kernels/cuda) fills a KernelBackend with its functions; autograd calls
 * kernels only through it, so an op's rule is written once for every device. Conventions:
 *   - "rows" of token-major activations are tokens: x is [N, C] or [N, H, D] with N = all tokens of
 *     the micro-batch (sequences and the documents packed in them laid end to end);
 *   - cu_seqlens (i32, [ndocs+1], cu_seqlens[0] = 0, last = N) marks document starts; attention
 *     never crosses a document boundary, and the batch's sequence boundaries are document
 *     boundaries too;
 *   - saved statistics (rmsnorm's rstd, attention's lse, ...) are F32, or F64 when the activations are
 *     F64 (gradient checks), so that float64 checks are exact;
 *   - every *_backward function ACCUMULATES (+=) into its gradient outputs, and skips a gradient
 *     output passed as NULL (frozen or not needed).
 */
#ifndef MSA_BACKEND_H
#define MSA_BACKEND_H

#include "tensor.h"

/* MSA hyper-parameters of one layer (DESIGN §4). Blocks count from each document's first token. */
typedef struct MsaParams {
    int block_size;    /* B: tokens per KV block */
    int topk_blocks;   /* k: selected blocks per (query, group), forced blocks included */
    int init_blocks;   /* leading blocks of the document always selected (inside the budget) */
    int local_blocks;  /* the query's own block and the local_blocks-1 before it, always selected */
    float scale;       /* main-branch softmax scale, 1/sqrt(d) */
    float index_scale; /* index-branch score scale, 1/sqrt(d_idx); the student's temperature */
} MsaParams;

/* MoE router score function (train/moe.c): softmax over the experts, or an independent sigmoid per
 * expert (DeepSeek-V3). */
typedef enum { MOE_SCORE_SOFTMAX = 0, MOE_SCORE_SIGMOID = 1 } MoeScoreFunc;

typedef struct KernelBackend {
    const char *name;
    Device device;

    /* memory */
    void *(*alloc)(size_t bytes);             /* aborts with a message on failure */
    void (*free)(void *ptr);
    void (*copy_to_host)(void *dst, const void *src, size_t bytes);
    void (*copy_from_host)(void *dst, const void *src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes);
    void (*zero)(void *dst, size_t bytes);
    /* wait until every kernel and copy issued so far has finished (the CPU's return finished: a no-op);
     * only the step profiler (autograd/profile.h) calls it, to charge asynchronous work to its op */
    void (*synchronize)(void);

    /* elementwise and reductions (float dtypes) */
    void (*axpy)(Tensor *y, const Tensor *x, float alpha);          /* y += alpha * x */
    void (*scale)(Tensor *y, float alpha);                          /* y *= alpha */
    void (*add)(Tensor *out, const Tensor *a, const Tensor *b);     /* out = a + b */
    double (*sumsq)(const Tensor *x);                               /* sum of squares, fp64 accum */
    void (*cast)(Tensor *dst, const Tensor *src);                   /* between float dtypes */

    /* C = alpha * op(A) @ op(B) + beta * C; A, B, C are 2-D or 3-D (batched, same batch), op = transpose
     * when the flag is set. The one GEMM primitive every linear op uses. */
    void (*matmul)(Tensor *c, const Tensor *a, const Tensor *b, bool trans_a, bool trans_b,
                   float alpha, float beta);

    /* embedding: out[n,:] = wte[tokens[n],:] ; backward scatter-adds rows into dwte */
    void (*embedding_forward)(Tensor *out, const Tensor *wte, const Tensor *tokens);
    void (*embedding_backward)(Tensor *dwte, const Tensor *dout, const Tensor *tokens);

    /* RMSNorm over the last dim: y = x * rstd * (w or 1 + w); rstd [rows] saved for backward.
     * unit_offset selects the Gemma form (1 + w), used by MiniMax-M3's index norms. */
    void (*rmsnorm_forward)(Tensor *y, Tensor *rstd, const Tensor *x, const Tensor *w, float eps,
                            bool unit_offset);
    void (*rmsnorm_backward)(Tensor *dx, Tensor *dw, const Tensor *dy, const Tensor *x, const Tensor *w,
                             const Tensor *rstd, bool unit_offset);

    /* RoPE, NeoX/Llama "rotate half" pairing (i, i + rotary_dim/2) on the first rotary_dim dims of
     * each head of x [N, H, D]; dims past rotary_dim pass through. positions: i32 [N]. */
    void (*rope_forward)(Tensor *y, const Tensor *x, const Tensor *positions, int rotary_dim, float theta);
    void (*rope_backward)(Tensor *dx, const Tensor *dy, const Tensor *positions, int rotary_dim, float theta);

    /* causal GQA attention within documents. q [N,Hq,D], k/v [N,Hkv,D], out [N,Hq,D],
     * lse [Hq,N] (natural log of the softmax normaliser including scale). Query head h uses KV
     * head h / (Hq/Hkv). */
    void (*attention_forward)(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                              const Tensor *cu_seqlens, float scale);
    void (*attention_backward)(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                               const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                               const Tensor *cu_seqlens, float scale);

    /* dropout: y = x * keep / (1 - p), keep[i] = dropout_bits(seed, offset + i) >= dropout_threshold(p)
     * (kernels/dropout_mask.h: the same mask on every backend); backward dx += dy * keep / (1 - p) */
    void (*dropout_forward)(Tensor *y, const Tensor *x, float p, uint64_t seed, int64_t offset);
    void (*dropout_backward)(Tensor *dx, const Tensor *dy, float p, uint64_t seed, int64_t offset);

    /* SwiGLU: out = silu(gate) * up */
    void (*swiglu_forward)(Tensor *out, const Tensor *gate, const Tensor *up);
    void (*swiglu_backward)(Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate,
                            const Tensor *up);

    /* cross-entropy, fp32 math: loss (scalar tensor) = mean over rows whose target != ignore_index of
     * lse(logits) - logits[target]; lse [N] saved. Returns the number of counted rows.
     * backward: dlogits += dloss * (softmax - onehot) / n_valid, ignored rows get nothing. */
    int64_t (*cross_entropy_forward)(Tensor *loss, Tensor *lse, const Tensor *logits, const Tensor *targets,
                                     int ignore_index);
    void (*cross_entropy_backward)(Tensor *dlogits, const Tensor *dloss, const Tensor *logits,
                                   const Tensor *lse, const Tensor *targets, int ignore_index,
                                   int64_t n_valid);

    /* AdamW on fp32 master weights, decoupled weight decay:
     * p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p), with bias corrections of step t (1-based). */
    void (*adamw_update)(Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1,
                         float beta2, float eps, float weight_decay, int t);

    /* ---- MSA (DESIGN §4). Shapes: q [N,Hq,D], k/v [N,Hkv,D], qi [N,Hidx,Di] with Hidx = Hkv,
     * ki [N,Di] (one index key shared by all index heads), lse [Hq,N], topk i32 [Hidx,N,k]
     * holding document-relative block ids sorted ascending, -1 in unused slots. A NULL topk means
     * "every visible block" (dense warm-up): attention and KL then run over the full causal prefix.
     *
     * plan: the reverse map of topk (key block -> the queries that selected it), built once per layer
     * and step by msa_plan right after the indexer and shared by the attention forward and backward
     * and the KL forward and backward, whose key-side work runs KV-outer from it. i32 [Hidx, P] with
     * P = msa_plan_width(N, k) = (N+1) + N*k + 2*N; for group g, at plan + g*P:
     *   row_ptr [N+1]  rows are the key blocks of all documents in order (block b of document d is row
     *                  rows_before(d) + b; R = sum over documents of ceil(len/B) <= N rows); the queries
     *                  of row r are q_idx[row_ptr[r] .. row_ptr[r+1]); row_ptr[r] = row_ptr[R] for r > R
     *   q_idx [N*k]    global query token ids, ascending within a row (entries past row_ptr[R] are 0)
     *   row_lo [N]     first global token of row r (r < R; 0 past R, as row_hi)
     *   row_hi [N]     one past the last token of row r (the block's end, cut at the document's end)
     * A NULL plan with a non-NULL topk makes the kernel build a temporary one (tests, opcheck); plan is
     * NULL whenever topk is. The CPU builds exactly the same plan (the GPU tests compare them). */
    void (*msa_indexer)(Tensor *topk, const Tensor *qi, const Tensor *ki, const Tensor *cu_seqlens,
                        const MsaParams *p);
    void (*msa_plan)(Tensor *plan, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p);
    void (*msa_attention_forward)(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k,
                                  const Tensor *v, const Tensor *topk, const Tensor *plan,
                                  const Tensor *cu_seqlens, const MsaParams *p);
    void (*msa_attention_backward)(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout,
                                   const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *out,
                                   const Tensor *lse, const Tensor *topk, const Tensor *plan,
                                   const Tensor *cu_seqlens, const MsaParams *p);
    /* KL(teacher || student) averaged over (token, group): kl is a scalar tensor; idx_lse [Hidx,N]
     * (the student's log-normaliser over the selected tokens) is saved for the backward.
     * Teacher p[g,t,j] = mean over the heads h of group g of exp(q_h.k_j*scale - lse[h,t]). */
    void (*msa_kl_forward)(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                           const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                           const Tensor *cu_seqlens, const MsaParams *p);
    /* dqi, dki += coeff * d(sum over (t,g) of KL)/d(qi, ki); the op passes coeff = dL/dkl / (N*Hidx) */
    void (*msa_kl_backward)(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse,
                            const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                            const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p, float coeff);
    /* recall: mean over sampled (query, group) of the dense teacher mass (group mean of the heads'
     * full causal attention) that falls inside the selected blocks; every query_stride-th query */
    double (*msa_recall)(const Tensor *q, const Tensor *k, const Tensor *topk, const Tensor *cu_seqlens,
                         const MsaParams *p, int query_stride);

    /* ---- MoE (DESIGN §3; train/moe.c). N tokens, E experts, k experts per token, M = N*k
     * assignments (dropless: every token reaches all k of its experts). Router: logits [N,E] ->
     * scores [N,E] -> idx i32 [N,k] (Top-k of scores + bias; bias f32 [E] or NULL; ties -> lower
     * expert; slot j = rank j) -> combine weights [N,k]. Plan: offsets i32 [E+1] (segment of each
     * expert in the expert-grouped buffer, offsets[E] = M) and rows i32 [N,k] (row of assignment
     * (t,j) in that buffer; tokens keep their order inside an expert). ---- */
    void (*moe_scores_forward)(Tensor *scores, const Tensor *logits, MoeScoreFunc func);
    void (*moe_scores_backward)(Tensor *dlogits, const Tensor *dscores, const Tensor *scores, MoeScoreFunc func);
    void (*moe_topk)(Tensor *idx, const Tensor *scores, const Tensor *bias, int k); /* no gradient */
    /* w[t,j] = scale * s[t,idx[t,j]] (/ sum_j' s[t,idx[t,j']] when renormalize) */
    void (*moe_combine_weights_forward)(Tensor *w, const Tensor *scores, const Tensor *idx, bool renormalize,
                                        float scale);
    void (*moe_combine_weights_backward)(Tensor *dscores, const Tensor *dw, const Tensor *scores, const Tensor *idx,
                                         bool renormalize, float scale);
    void (*moe_plan)(Tensor *offsets, Tensor *rows, const Tensor *idx); /* E = offsets numel - 1 */
    /* permute: xs[rows[t,j]] = x[t] (gather); backward dx[t] += sum_j dxs[rows[t,j]] */
    void (*moe_permute_forward)(Tensor *xs, const Tensor *x, const Tensor *rows);
    void (*moe_permute_backward)(Tensor *dx, const Tensor *dxs, const Tensor *rows);
    /* unpermute (combine): out[t] = sum_j w[t,j] * ys[rows[t,j]] */
    void (*moe_unpermute_forward)(Tensor *out, const Tensor *ys, const Tensor *w, const Tensor *rows);
    void (*moe_unpermute_backward)(Tensor *dys, Tensor *dw, const Tensor *dout, const Tensor *ys, const Tensor *w,
                                   const Tensor *rows);
    /* grouped GEMM: ys[offsets[e]:offsets[e+1]] = xs[same rows] @ w[e]^T, xs [M,in], w [E,out,in],
     * ys [M,out]; backward dxs += dys_e @ w[e], dw[e] += dys_e^T @ xs_e */
    void (*grouped_matmul_forward)(Tensor *ys, const Tensor *xs, const Tensor *w, const Tensor *offsets);
    void (*grouped_matmul_backward)(Tensor *dxs, Tensor *dw, const Tensor *dys, const Tensor *xs, const Tensor *w,
                                    const Tensor *offsets);
    /* balance loss (scalar) = E * sum_e f_e * P_e, f_e = (offsets[e+1]-offsets[e]) / M (constant),
     * P_e = mean over tokens of scores[t,e] (divided by sum_e scores[t,e] when normalize) */
    void (*moe_aux_loss_forward)(Tensor *loss, const Tensor *scores, const Tensor *offsets, bool normalize);
    void (*moe_aux_loss_backward)(Tensor *dscores, const Tensor *dloss, const Tensor *scores, const Tensor *offsets,
                                  bool normalize);
    /* router z-loss (scalar) = mean over tokens of logsumexp(logits[t])^2; lse [N] saved */
    void (*moe_z_loss_forward)(Tensor *loss, Tensor *lse, const Tensor *logits);
    void (*moe_z_loss_backward)(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse);

    /* bias over the last dim: y [rows, C] = x [rows, C] + b [C] (b may be F32 master weights while x
     * is BF16 on CUDA); backward db [C] += sum over rows of dy (dx is the op's plain axpy) */
    void (*bias_add_forward)(Tensor *y, const Tensor *x, const Tensor *b);
    void (*bias_add_backward)(Tensor *db, const Tensor *dy);

    /* block transpose for the context-parallel exchanges (autograd/op_cp.c): src seen as [a, b, inner]
     * becomes dst [b, a, inner], dst[j, i, :] = src[i, j, :], inner = numel / (a * b) elements moved
     * whole (any dtype: a pure copy, so BF16 stays bit-exact); src and dst must not overlap */
    void (*transpose01)(Tensor *dst, const Tensor *src, int64_t a, int64_t b);
} KernelBackend;

/* Entry groups a backend may lack (NULL entries; both backends have them all today, a new backend
 * may start without them). backend_missing returns the name of the first NULL entry among the groups asked for, or NULL
 * when the backend has them all: programs check it at start-up to refuse such a configuration with a
 * message. BACKEND_REQUIRE(be, entry) guards a call site (needs kernels/util.h for fatal): a call
 * through a NULL entry must never happen. */
enum { BACKEND_MSA = 1, BACKEND_MOE = 2 };
static inline const char *backend_missing(const KernelBackend *be, int groups) {
#define BACKEND_CHECK_(fn) if (!be->fn) return #fn
    if (groups & BACKEND_MSA) {
        BACKEND_CHECK_(msa_indexer); BACKEND_CHECK_(msa_plan); BACKEND_CHECK_(msa_attention_forward); BACKEND_CHECK_(msa_attention_backward);
        BACKEND_CHECK_(msa_kl_forward); BACKEND_CHECK_(msa_kl_backward); BACKEND_CHECK_(msa_recall);
    }
    if (groups & BACKEND_MOE) {
        BACKEND_CHECK_(moe_scores_forward); BACKEND_CHECK_(moe_scores_backward); BACKEND_CHECK_(moe_topk);
        BACKEND_CHECK_(moe_combine_weights_forward); BACKEND_CHECK_(moe_combine_weights_backward);
        BACKEND_CHECK_(moe_plan); BACKEND_CHECK_(moe_permute_forward); BACKEND_CHECK_(moe_permute_backward);
        BACKEND_CHECK_(moe_unpermute_forward); BACKEND_CHECK_(moe_unpermute_backward);
        BACKEND_CHECK_(grouped_matmul_forward); BACKEND_CHECK_(grouped_matmul_backward);
        BACKEND_CHECK_(moe_aux_loss_forward); BACKEND_CHECK_(moe_aux_loss_backward);
        BACKEND_CHECK_(moe_z_loss_forward); BACKEND_CHECK_(moe_z_loss_backward);
    }
#undef BACKEND_CHECK_
    return 0;
}
#define BACKEND_REQUIRE(be, entry)                                                                  \
    do {                                                                                            \
        if (!(be)->entry)                                                                           \
            fatal("the %s backend has no %s kernel: MSA and MoE layers need a backend that has",    \
                  (be)->name, #entry);                                                              \
    } while (0)

/* elements per group of an MSA plan (see msa_plan above) */
static inline int64_t msa_plan_width(int64_t N, int64_t k) { return (N + 1) + N * k + 2 * N; }

extern const KernelBackend cpu_backend;
#ifdef MSA_CUDA
extern const KernelBackend cuda_backend;
#endif

#endif
