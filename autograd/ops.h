/* The op API: forward functions that compute and (in grad mode) record a tape node.
 * One op = this declaration + its forward and backward rule in autograd/op_<name>.c + a line in
 * ops.def + kernels in kernels/cpu and kernels/cuda + a gradient test. */
#ifndef MSA_OPS_H
#define MSA_OPS_H

#include "../kernels/comm.h"
#include "engine.h"

#define OP_BACKWARD_DECL(name) void backward_##name(Engine *e, Node *n);
#define OP(name) OP_BACKWARD_DECL(name)
#include "ops.def"
#undef OP

Tensor *op_add(Engine *e, Tensor *a, Tensor *b);
Tensor *op_scale(Engine *e, Tensor *x, float alpha);

/* y[..., out] = x[..., in] @ W^T with W [out, in] (PyTorch nn.Linear layout, no bias) */
Tensor *op_linear(Engine *e, Tensor *x, Tensor *w);
/* the same op with y in dtype `out` (fp32 accumulation either way): the MoE router's F32 logits from
 * BF16 activations, so that near-ties route as on the CPU and the softmax sees unrounded logits */
Tensor *op_linear_to(Engine *e, Tensor *x, Tensor *w, DType out);

/* out [N, C] from W [V, C] and i32 tokens [N] */
Tensor *op_embedding(Engine *e, Tensor *w, Tensor *tokens);

/* RMSNorm over the last dim of x; w has that dim's size (NULL = no gain). unit_offset: gain 1 + w. */
Tensor *op_rmsnorm(Engine *e, Tensor *x, Tensor *w, float eps, bool unit_offset);
/* The residual add and the RMSNorm of its sum in one op (one pass over the rows on CUDA): returns
 * op_rmsnorm(h, w, eps, false) with h = x + r, the new residual stream, in *h_out. Both, and the
 * gradients, are op_add's and op_rmsnorm's bit for bit (on CUDA where the rows are 16-byte aligned). */
Tensor *op_add_rmsnorm(Engine *e, Tensor *x, Tensor *r, Tensor *w, float eps, Tensor **h_out);

/* x [N, H, D], positions i32 [N]; rope (and its inv_freq) must live until the backward has run
 * (layers/rope_scaling.h rope_table_in puts it in the engine's host arena) */
Tensor *op_rope(Engine *e, Tensor *x, Tensor *positions, const RopeTable *rope);

/* An attention's forward results kept from a checkpointed segment's first forward for the segment's replay
 * in the backward (train.keep_attention_outputs, layers/attention.h): out [N, Hq, D] in the activations'
 * dtype and lse [Hq, N] in the statistics', in memory of the engine's backend that outlives the step's arena.
 * The replay recomputes q, k and v bit for bit (a checkpointed segment is deterministic), so these are the
 * results the forward kernel would give again: an op handed them records its node over them and runs no
 * forward kernel. */
typedef struct AttentionKept {
    void *out, *lse;
} AttentionKept;

/* q [N,Hq,D], k/v [N,Hkv,D], cu_seqlens i32 [ndocs+1] -> out [N,Hq,D]; *lse_out (optional) gets the
 * [Hq,N] f32 log-sum-exp the MSA KL uses as its teacher normaliser. */
Tensor *op_attention(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens, float scale,
                     Tensor **lse_out);
/* The same, with the forward's results taken from kept (NULL: computed) */
Tensor *op_attention_kept(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens, float scale,
                          const AttentionKept *kept, Tensor **lse_out);
/* An attention op's out [N, Hq, D] (q's shape and dtype) and lse [Hq, N]: headers over kept's memory (returns
 * true: nothing to compute), or fresh arena tensors for the forward kernel (kept NULL: false). */
bool attention_results(Engine *e, const Tensor *q, const AttentionKept *kept, Tensor **out, Tensor **lse);

/* dropout with probability p (0 returns x itself); the mask depends only on (seed, offset + element
 * index), kernels/dropout_mask.h, so a recomputed forward and the backward see the same mask */
Tensor *op_dropout(Engine *e, Tensor *x, float p, const Tensor *seed, int64_t offset);

Tensor *op_swiglu(Engine *e, Tensor *gate, Tensor *up);

/* GELU, GPT-2's tanh approximation: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
Tensor *op_gelu(Engine *e, Tensor *x);

/* scalar mean cross-entropy over rows whose target != ignore_index */
Tensor *op_cross_entropy(Engine *e, Tensor *logits, Tensor *targets, int ignore_index);

/* The mean cross-entropy of the logits x W^T (x [..., C], W [V, C], targets i32, one per row of x),
 * computed chunk_rows rows at a time, forward and backward (autograd/op_lm_head_loss.c): the [N, V]
 * logits never exist at once. One chunk is op_cross_entropy(op_linear(x, W)) bit for bit. */
Tensor *op_lm_head_loss(Engine *e, Tensor *x, Tensor *w, Tensor *targets, int ignore_index, int64_t chunk_rows);

/* The SwiGLU feed-forward (silu(x Wg^T) * (x Wu^T)) Wd^T, Wg/Wu [F, C], Wd [C, F], computed chunk_rows rows
 * at a time, forward and backward (autograd/op_swiglu_ffn.c): its [N, F] intermediates exist for one chunk,
 * recomputed in the backward. One chunk is op_linear(op_swiglu(op_linear(x, Wg), op_linear(x, Wu)), Wd)
 * bit for bit. */
Tensor *op_swiglu_ffn(Engine *e, Tensor *x, Tensor *wg, Tensor *wu, Tensor *wd, int64_t chunk_rows);

/* Activation checkpointing: y = fn(x) recomputed in backward. fn may also return an auxiliary scalar
 * loss (e.g. the MSA KL of the block) through *aux (NULL if none); its gradient is seeded with the
 * upstream gradient of the returned aux tensor. fn must be deterministic. */
typedef Tensor *(*SegmentFn)(Engine *e, Tensor *x, const void *closure, Tensor **aux);
Tensor *op_checkpoint(Engine *e, SegmentFn fn, const void *closure, Tensor *x, Tensor **aux_out);

/* MSA main branch: exact attention over the selected blocks (topk from the indexer; NULL = all
 * visible blocks; plan = msa_plan of topk, or NULL to let the kernels build their own). Outputs
 * out [N,Hq,D] and, optionally, lse [Hq,N]. */
Tensor *op_msa_attention(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *topk, Tensor *plan, Tensor *cu_seqlens,
                         const MsaParams *p, Tensor **lse_out);

/* What the MSA KL forward computes: loss = weight * kl (recorded: its gradient goes to qi and ki), kl the
 * unweighted mean KL (the metric; not recorded), idx_lse [Hkv, N] the student's log-normaliser over the
 * selected tokens (saved for the backward). loss is kl itself when weight is 1. */
typedef struct MsaKlForward {
    Tensor *loss, *kl, *idx_lse;
} MsaKlForward;

/* MSA KL alignment: the scalar weight * mean_{t,g} KL(teacher || student); teacher from q, k, lse
 * (detached: no gradient to them); gradient only to qi and ki. fwd (NULL: not wanted) gets what the
 * forward computed; given loss and idx_lse of an earlier forward over the same inputs (a checkpointed
 * block's replay, layers/msa.c), it records the op with them instead of running the kernel again, and
 * sets kl to NULL. */
Tensor *op_msa_kl(Engine *e, Tensor *q, Tensor *k, Tensor *lse, Tensor *qi, Tensor *ki, Tensor *topk,
                  Tensor *plan, Tensor *cu_seqlens, const MsaParams *p, float weight, MsaKlForward *fwd);

/* The sparse phase's MSA attention and KL in one node (KernelBackend.msa_attention_kl_backward): out (and
 * lse) as op_msa_attention over topk, and *loss_out, the loss term weight * mean KL whose gradient goes to
 * qi and ki only, as op_msa_kl's, but whose value the backward computes: the forward leaves it 0 (it still
 * takes the gradient the backward reads, on the device) and the backward writes the mean KL into kl
 * (a scalar of lse's dtype; NULL: nowhere). idx_lse [Hkv, N] is the indexer's. Without a recording the
 * value is computed at once, unless a checkpointed segment's replay will record it (checkpoint_forward). With
 * kept (NULL: none) out and lse are those of a checkpointed forward (AttentionKept): no forward kernel runs. */
Tensor *op_msa_attention_kl(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *qi, Tensor *ki, Tensor *topk, Tensor *plan,
                            Tensor *idx_lse, Tensor *cu_seqlens, const MsaParams *p, float weight, Tensor *kl,
                            const AttentionKept *kept, Tensor **lse_out, Tensor **loss_out);

/* ---- MoE feed-forward (layers/moe.c). N tokens, E experts, k experts per token. ---- */

/* The routing of one MoE layer's tokens, built once per forward and shared by its ops:
 * idx i32 [N,k] the chosen experts (slot j = rank j), offsets i32 [E+1] the expert segments of the
 * expert-grouped buffer (offsets[E] = N*k), rows i32 [N,k] the grouped row of assignment (t,j). */
typedef struct MoePlan {
    Tensor *idx, *offsets, *rows;
    int num_experts, k;
} MoePlan;

/* scores [N,E] = softmax over experts or sigmoid of the router logits [N,E] */
Tensor *op_moe_router_scores(Engine *e, Tensor *logits, MoeScoreFunc func);
/* Not differentiable (records nothing): i32 idx [N,k], Top-k of scores + bias (f32 [E] or NULL;
 * the bias only steers selection), ties to the lower expert. */
Tensor *op_moe_topk(Engine *e, Tensor *scores, Tensor *bias, int k);
/* Not differentiable: the expert-grouped order of the assignments in idx. */
MoePlan op_moe_plan(Engine *e, Tensor *idx, int num_experts);
/* combine weights [N,k]: scale * scores[t, idx[t,j]], divided by their sum over j if renormalize */
Tensor *op_moe_combine_weights(Engine *e, Tensor *scores, Tensor *idx, bool renormalize, float scale);
/* x [N,C] -> xs [N*k, C], xs[rows[t,j]] = x[t] */
Tensor *op_moe_permute(Engine *e, Tensor *x, const MoePlan *plan);
/* ys [N*k, C], weights [N,k] -> out [N,C] = sum_j weights[t,j] * ys[rows[t,j]] */
Tensor *op_moe_unpermute(Engine *e, Tensor *ys, Tensor *weights, const MoePlan *plan);
/* xs [M, in], w [E, out, in], offsets i32 [E+1] -> ys [M, out]: rows of segment e times w[e]^T */
Tensor *op_grouped_linear(Engine *e, Tensor *xs, Tensor *w, Tensor *offsets);
/* scalar balance loss E * sum_e f_e P_e (f_e: share of the assignments routed to e, a constant;
 * P_e: mean score of e, scores normalised per token to sum 1 first when normalize) */
Tensor *op_moe_aux_loss(Engine *e, Tensor *scores, const MoePlan *plan, bool normalize);
/* scalar router z-loss: mean over tokens of logsumexp(logits)^2 */
Tensor *op_moe_z_loss(Engine *e, Tensor *logits);

/* y = x + b, b [last dim of x] added to every row (the q/k/v biases of Qwen2-family models) */
Tensor *op_bias_add(Engine *e, Tensor *x, Tensor *b);

/* ---- context parallelism, head-parallel (autograd/op_cp.c; layers/attention.c, layers/msa.c). The P ranks of the group g
 * (a Comm, kernels/comm.h) share a micro-batch of N tokens, rank r holding tokens [r*N/P, (r+1)*N/P). A
 * group of one rank returns x itself. ---- */
/* x [N/P, H, D] (this rank's tokens, every head) -> [N, H/P, D] (every token, heads [r*H/P, (r+1)*H/P)) */
Tensor *op_cp_seq_to_heads(Engine *e, Tensor *x, const Comm *g);
/* the inverse: x [N, H/P, D] -> [N/P, H, D] */
Tensor *op_cp_heads_to_seq(Engine *e, Tensor *x, const Comm *g);
/* x [n, ...] -> [P*n, ...]: every rank's rows in rank order; backward: the gradient reduce-scattered (sum) */
Tensor *op_cp_all_gather(Engine *e, Tensor *x, const Comm *g);

/* ---- context parallelism over the sequence (autograd/op_cp_sequence.c; layers/attention.c). Each rank of
 * g holds n tokens of the micro-batch, not necessarily contiguous, named by their global indices
 * (index, i32 [n]); cu_seqlens [ndocs+1] covers the whole micro-batch. ---- */
/* causal GQA attention within documents of this rank's q [n, Hq, D] over every rank's k, v [n, Hkv, D]
 * (ring attention): out [n, Hq, D], the single-process attention's rows of this rank's tokens, and into
 * *lse_out (when non-NULL) their log-sum-exp [Hq, n]. Backward: dq here, dk/dv summed over every rank's
 * queries on the rank that holds those keys. */
Tensor *op_cp_ring_attention(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *cu_seqlens, Tensor *index,
                             float scale, const Comm *g, Tensor **lse_out);
/* MSA layers (autograd/op_cp_blocks.c, on the CPU): x [n, ...] -> [N = P*n, ...], every rank's rows at their
 * tokens (the index keys); backward: each rank's rows of the gradient, summed over the ranks. */
Tensor *op_cp_gather_tokens(Engine *e, Tensor *x, Tensor *index, const Comm *g);
/* g of two or more ranks; k, v [n, Hkv, D] -> kf (returned), *v_out: [M, Hkv, D], the M tokens of every
 * block that this rank's selection topk [Hkv, n, topk_blocks] (document-relative block ids of block_size
 * tokens) names, fetched from the ranks that hold them, and *key_rows_out i32 [N]: the row of each token in
 * kf, vf (-1: not fetched; MsaParams.key_rows). Backward: the rows' gradients added on the ranks that hold
 * the tokens. */
Tensor *op_cp_fetch_blocks(Engine *e, Tensor *k, Tensor *v, Tensor *topk, Tensor *index, Tensor *cu_seqlens,
                           int64_t block_size, const Comm *g, Tensor **v_out, Tensor **key_rows_out);

/* ---- expert parallelism (autograd/op_ep.c; layers/moe.c). The P ranks of the expert-parallel group g
 * (a Comm, kernels/comm.h) route different tokens; rank r holds the routed experts [r*El, (r+1)*El),
 * E = P*El. A group of one rank needs no Comm implementation (comm_single). ---- */
typedef struct EpDispatch {
    const Comm *g;
    int ranks, local_experts;         /* P, El */
    int64_t rows_in, rows_out;        /* rows this rank sends (N*k) and receives (M) */
    int64_t *send_rows, *send_first;  /* [P]: rows of xs for rank r, and where they start (host) */
    int64_t *recv_rows, *recv_first;  /* [P]: rows from rank s, and where they land in the [s][j] buffer */
    int32_t *recv_counts;             /* [P*El]: rows rank s routed to local expert j (host) */
    Tensor *order;                    /* i32 [M,1]: row of the received [s][j] buffer -> row of the [j][s]
                                         (dispatched) order; NULL when they coincide (P = 1 or El = 1) */
    Tensor *offsets;                  /* i32 [El+1]: local expert segments of the dispatched rows */
} EpDispatch;
/* Not differentiable: exchanges the per-expert row counts of plan (over all E experts) with the group and
 * builds the dispatch (in the engine's host arena, valid until engine_reset). A collective. */
EpDispatch *op_ep_dispatch_plan(Engine *e, const MoePlan *plan, const Comm *g);
/* xs [N*k, C] (grouped by global expert) -> [M, C]: every rank's rows for this rank's experts, grouped
 * by local expert (segments d->offsets), within an expert by source rank. A collective. */
Tensor *op_ep_dispatch(Engine *e, Tensor *xs, const EpDispatch *d);
/* the inverse: yr [M, C'] (the local experts' outputs) -> [N*k, C'] in xs's order. A collective. */
Tensor *op_ep_return(Engine *e, Tensor *yr, const EpDispatch *d);
/* The pure layout arithmetic behind the plan. Send: the rows for rank r are the segments of its experts,
 * offsets [E+1] -> send_rows/send_first [P]. Receive: from recv_counts [P][El], recv_rows/recv_first [P]
 * and local_offsets [El+1]; returns M. Order: order [M] as in EpDispatch.order. */
void ep_send_layout(const int32_t *offsets, int P, int El, int64_t *send_rows, int64_t *send_first);
int64_t ep_recv_layout(const int32_t *recv_counts, int P, int El, int64_t *recv_rows, int64_t *recv_first,
                       int32_t *local_offsets);
void ep_recv_order(const int32_t *recv_counts, int P, int El, const int32_t *local_offsets, int32_t *order);

#endif
