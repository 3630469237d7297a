/* What every attention variant shares (DESIGN §3): the GQA projections q, k, v (optional biases, optional
 * per-head RMSNorm on q and k), RoPE, the context-parallel exchanges around the attention proper, and
 * the output projection. A variant declares the frame's parameters and then its own, and its forward is
 *   attention_project(...) -> its attention of q, k, v -> attention_output(...).
 * The dense variant (attention.c) is exactly that with softmax attention over every visible key. */
#ifndef MSA_ATTENTION_H
#define MSA_ATTENTION_H

#include "../autograd/ops.h"
#include "layer.h"

/* What a layer's checkpointed forward keeps of its attention for the replay in the backward
 * (train.keep_attention_outputs with train.recompute): the output and its log-sum-exp (AttentionKept), so that
 * the replay runs no attention forward (the largest part of a long-context block's recomputation: the
 * attention's cost grows with the context, the rest of the block's with the tokens alone). Memory of the
 * engine's backend, N x Hq x D activations + Hq x N statistics per layer, grown on demand and valid from a
 * checkpointed forward until its replay; kept for the next step rather than freed, as MSA's replay store
 * (layers/msa.h MsaReplay: every layer's is live when the backward starts, and on CUDA each free waits for the
 * device). */
typedef struct KeptAttention {
    bool enabled;            /* train.keep_attention_outputs */
    KeptBuffer mem;          /* out | lse, 64-byte aligned */
    bool valid;
    int64_t out_bytes, lse_bytes;
} KeptAttention;

/* Keep out and lse of a checkpointed segment's first forward (Engine.checkpoint_forward), when enabled. */
void kept_attention_keep(KeptAttention *ka, Engine *e, const Tensor *out, const Tensor *lse);
/* In a replay (Engine.recomputing): the kept results of an output [N, Hq, D] and its lse into *into, consumed
 * (one replay per kept forward), or NULL when there are none of that size (run the forward). */
const AttentionKept *kept_attention_take(KeptAttention *ka, const Engine *e, const Tensor *q, AttentionKept *into);
void kept_attention_free(KeptAttention *ka);

typedef struct AttentionFrame {
    Tensor *wq, *wk, *wv, *wo;
    Tensor *bq, *bk, *bv;   /* q/k/v projection biases (model.qkv_bias), else NULL */
    Tensor *q_norm, *k_norm; /* per-head norms (model.qk_norm), else NULL */
    int n_heads, n_kv_heads, head_dim, rotary_dim;
    float norm_eps;
    ModelConfig rope;       /* the model keys: RoPE's theta and scaling (layers/rope_scaling.h) */
    float scale;            /* 1/sqrt(head_dim) */
    KeptAttention kept;     /* train.keep_attention_outputs */
} AttentionFrame;

/* The head dimension and rotary dimension cfg gives (model.head_dim, model.rotary_dim: 0 = the default). */
int attention_head_dim(const ModelConfig *c);
int attention_rotary_dim(const ModelConfig *c);

/* Declare "layers.<l>.attn.wq, wk, wv, wo" (then bq, bk, bv; q_norm, k_norm when configured). */
void attention_declare(AttentionFrame *f, const LayerSetup *s);
/* h [N, C] -> q [N, Hq, D], k, v [N, Hkv, D] after biases, norms and RoPE; under head-parallel context
 * parallelism every token of this rank's heads (GQA groups whole); under sequence-split context
 * parallelism (ctx->cp_index) this rank's tokens, every head, as without it. */
void attention_project(const AttentionFrame *f, Engine *e, Tensor *h, const LayerContext *ctx, Tensor **q, Tensor **k,
                       Tensor **v);
/* Does context parallelism split the heads here (an exchange around attention)? */
bool attention_cp_heads(const LayerContext *ctx);
/* o [N, Hq, D] (as attention_project left it) -> [N, C] of this rank's tokens. */
Tensor *attention_output(const AttentionFrame *f, Engine *e, Tensor *o, const LayerContext *ctx);

/* The CUDA attention kernels' limits on the frame's shapes (head dim, query heads). */
bool attention_requires(Device backend, const RunConfig *c, char *why, size_t n);

#endif
