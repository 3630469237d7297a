/* MiniMax Sparse Attention as a layer (DESIGN §4, msa_spec.md): the GQA frame (attention.h) plus the
 * Index Branch (index projections w_iq [Hkv*Di, C], w_ik [Di, C], Gemma-style norms, RoPE) and the whole
 * chain in one place: block Top-k selection (the indexer), its plan, the block-sparse attention, the KL
 * alignment loss, the recall metric, and the reuse of a checkpointed forward's results by its replay.
 *
 * msa_attend is the chain from given main and index projections; the layer's forward, tools/opcheck.c,
 * tools/bench.c and the tests all run it. */
#ifndef MSA_LAYER_MSA_H
#define MSA_LAYER_MSA_H

#include "attention.h"

/* One MSA layer's settings, from the config (msa.*). */
typedef struct MsaSettings {
    MsaParams params;   /* the kernels' (backend.h) */
    float kl_weight;    /* the auxiliary loss is kl_weight * mean KL */
    int recall_stride;  /* the recall samples every recall_stride-th query, */
    int recall_samples; /* or every ceil(N / recall_samples)-th of N when that is more (0: no cap) */
    int index_dim;      /* Di */
    /* context parallelism over the sequence (dist.cp_mode = sequence), set by the layer per forward: the
     * group (NULL or one rank: the whole micro-batch is here) and this rank's tokens, i32 [n] */
    const Comm *cp;
    Tensor *cp_index;
    /* the layer's kept attention outputs (train.keep_attention_outputs), set by the layer per forward; NULL:
     * none */
    KeptAttention *kept;
} MsaSettings;

MsaSettings msa_settings(const RunConfig *c);
/* The rules a selection's parameters obey (block_size >= 1, topk_blocks >= 1, init_blocks >= 0,
 * local_blocks >= 1, init_blocks + local_blocks <= topk_blocks: the forced blocks stay inside the
 * budget), checked here and nowhere else on the host; false with the reason in why, the names prefixed
 * with key_prefix ("msa." for the config's keys). */
bool msa_check(const MsaParams *p, const char *key_prefix, char *why, size_t n);

/* What a checkpointed forward keeps for its replay in the backward (train.recompute): the selection and the
 * student's normaliser (the indexer's, or with the KL forward's loss in the dense warm-up). They are
 * functions of inputs the replay recomputes bit for bit (a checkpointed segment is deterministic), so the
 * replay copies them instead of running the indexer and the KL forward a second time; the plan, a cheap
 * function of the selection and larger than it, is rebuilt. Device memory of the engine's backend, per token
 * and MSA layer Hkv x (4 topk_blocks + the statistic's size) bytes, grown on demand; valid from a
 * checkpointed forward until its replay. It is kept for the next step rather than freed after the replay:
 * every layer's store is live when the backward starts (the step's peak), so freeing it later lowers no
 * peak, and on CUDA each free makes the host wait for the device (kernels.def host_waits). */
typedef struct MsaReplay {
    KeptBuffer mem;          /* topk | idx_lse | loss (none when the backward computes the KL), each 64-byte
                                aligned */
    bool valid, dense;       /* dense: kept in the dense warm-up (no topk) */
    int64_t n, hkv, topk_bytes, lse_bytes, loss_bytes;
} MsaReplay;

void msa_replay_free(MsaReplay *rp);

/* The result of msa_attend. */
typedef struct MsaAttention {
    Tensor *out;   /* [N, Hq, D] */
    Tensor *lse;   /* [Hq, N] */
    Tensor *topk;  /* [Hkv, N, topk_blocks]: the selection; NULL when dense */
    Tensor *plan;  /* its reverse map (backend.h msa_plan); NULL when dense */
    Tensor *loss;  /* kl_weight * mean KL, recorded (gradient to qi and ki only); when deferred, 0 until the
                      backward, which computes the KL (the loss still takes the gradient) */
    bool deferred; /* the sparse phase with a backward to come: no KL forward ran, the backward computes it */
} MsaAttention;

/* The MSA attention of q [N, Hq, D], k, v [N, Hkv, D] with the index projections qi [N, Hkv, Di] and ki
 * [N, Di]: the indexer's Top-k selection and its plan (dense: every visible block, the dense warm-up),
 * the sparse attention and the KL loss. Under sequence-split context parallelism (s->cp of several ranks)
 * q, k, v and qi are this rank's n tokens (s->cp_index) and ki every token's [N, Di] (op_cp_gather_tokens):
 * the selection is this rank's queries' over every earlier block, the K/V rows of the selected blocks are
 * fetched from the ranks that hold them (op_cp_fetch_blocks; the dense warm-up: ring attention, and every
 * key gathered for the KL's teacher), out, lse, topk and the KL are this rank's queries' (no plan). kl (a scalar of lse's dtype on the engine's device; NULL: not
 * kept) gets the unweighted mean KL: at once when the forward computes it (the dense warm-up, the sparse
 * phase without a backward), else from the backward (deferred: one node for attention and KL, the KL
 * computed there with the indexer's idx_lse, msa_spec.md c.4). replay (NULL: none) is the layer's store
 * for train.recompute: a checkpointed forward fills it, its replay consumes it. */
MsaAttention msa_attend(Engine *e, const MsaSettings *s, Tensor *q, Tensor *k, Tensor *v, Tensor *qi, Tensor *ki,
                        Tensor *cu_seqlens, bool dense, Tensor *kl, MsaReplay *replay);
/* The indexer's selection alone: i32 [Hkv, N, topk_blocks]. */
Tensor *msa_select(Engine *e, const MsaParams *p, Tensor *qi, Tensor *ki, Tensor *cu_seqlens);
/* The recall of a selection (NULL: the one the indexer makes of qi, ki): the share of the dense teacher's
 * attention mass inside the selected blocks, every query whose token is a multiple of the stride (msa_recall_stride).
 * Under sequence-split context parallelism (q, k, qi, topk of this rank's tokens, ki of all) the value
 * over every rank's sampled queries, the same on each rank. */
double msa_recall(Engine *e, const MsaSettings *s, Tensor *q, Tensor *k, Tensor *topk, Tensor *qi, Tensor *ki,
                  Tensor *cu_seqlens);
/* The recall's stride over a sequence of n tokens (all ranks' under context parallelism):
 * max(recall_stride, ceil(n / recall_samples)); the metric scores each sampled query against every earlier key,
 * so a fixed stride made its cost grow as n^2, the cap as n (an evaluation of a 0.1B model at 128K with stride 4
 * took 27 s after a 3 s training step: by its FLOPs, ~3.5e13 on CUDA cores, most of it this metric's). */
int msa_recall_stride(const MsaSettings *s, int64_t n);

/* The layer's KL values, one per forward (not replay) since the last collect: device memory of the
 * engine's backend in the statistics dtype, each written by its forward or, deferred, by its backward, and
 * read in one copy by the layer's collect (LayerKind.collect) instead of once per forward. */
typedef struct MsaKlLog {
    const KernelBackend *be;
    void *buf;
    DType dtype;
    int n, cap;
    bool *deferred;    /* [cap] forward i's loss term is computed by its backward */
    double *recall;    /* [cap] forward i's recall (an evaluation's), NaN: none */
    LayerForward *out; /* [cap] collect's records */
    bool step_deferred; /* the last training forward's deferred: a replayed step's (LayerKind.replayed) */
} MsaKlLog;

/* The layer's state (LayerKind attention_msa): the frame first, as in every attention variant. */
typedef struct MsaLayer {
    AttentionFrame frame;
    Tensor *w_iq, *w_ik, *iq_norm, *ik_norm;
    int index_rotary_dim;
    MsaSettings settings;
    MsaReplay replay;
    MsaKlLog kl_log;
} MsaLayer;

#endif
