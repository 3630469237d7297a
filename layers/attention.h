/* What every attention variant shares (DESIGN §3): the GQA projections q, k, v (optional biases, optional
 * per-head RMSNorm on q and k), RoPE, the context-parallel exchanges around the attention proper, and
 * the output projection. A variant declares the frame's parameters and then its own, and its forward is
 *   attention_project(...) -> its attention of q, k, v -> attention_output(...).
 * The dense variant (attention.c) is exactly that with softmax attention over every visible key. */
#ifndef MSA_ATTENTION_H
#define MSA_ATTENTION_H

#include "layer.h"

typedef struct AttentionFrame {
    Tensor *wq, *wk, *wv, *wo;
    Tensor *bq, *bk, *bv;   /* q/k/v projection biases (model.qkv_bias), else NULL */
    Tensor *q_norm, *k_norm; /* per-head norms (model.qk_norm), else NULL */
    int n_heads, n_kv_heads, head_dim, rotary_dim;
    float norm_eps;
    ModelConfig rope;       /* the model keys: RoPE's theta and scaling (layers/rope_scaling.h) */
    float scale;            /* 1/sqrt(head_dim) */
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
