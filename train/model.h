/* The decoder-only transformer of DESIGN §3: token embedding; per layer RMSNorm -> attention (dense
 * GQA or MSA) -> residual -> RMSNorm -> SwiGLU FFN -> residual; final RMSNorm; LM head (tied or
 * not); fp32 cross-entropy. Parameter names are the checkpoint dataset names. */
#ifndef MSA_MODEL_H
#define MSA_MODEL_H

#include "../autograd/engine.h"
#include "../autograd/params.h"
#include "../data/dataset.h"
#include "config.h"
#include "moe.h"

/* What an MSA layer's checkpointed forward keeps for the replay of it in the backward (train.recompute):
 * the selection, its plan and the KL forward's results. They are functions of inputs the replay
 * recomputes bit for bit (a checkpointed segment is deterministic), so the replay copies them instead of
 * running the indexer, the plan and the KL forward a second time. Device memory of the engine's backend,
 * grown on demand; valid from a checkpointed forward until its replay. */
typedef struct MsaReplay {
    const KernelBackend *be; /* where buf lives */
    void *buf;               /* topk | plan | idx_lse | loss, each 64-byte aligned */
    size_t cap;
    bool valid, dense;       /* dense: kept in the dense warm-up (no topk, no plan) */
    int64_t n, hkv, topk_bytes, plan_bytes, lse_bytes, loss_bytes;
} MsaReplay;

typedef struct LayerParams {
    Tensor *attn_norm, *wq, *wk, *wv, *wo, *q_norm, *k_norm;
    Tensor *bq, *bk, *bv;                     /* q/k/v projection biases (model.qkv_bias), else NULL */
    Tensor *ffn_norm, *w_gate, *w_up, *w_down; /* dense SwiGLU (NULL in MoE layers) */
    bool moe;                                 /* MoE feed-forward in this layer */
    MoeLayerParams moe_p;
    MoeStats moe_stats;                       /* routing statistics since the last optimizer step */
    bool msa;                              /* MSA attention in this layer */
    Tensor *w_iq, *w_ik, *iq_norm, *ik_norm; /* index branch (MSA layers only) */
    MsaReplay replay;                        /* under train.recompute (MSA layers only) */
} LayerParams;

/* Per-forward MSA statistics, filled when Model.collect_metrics is set. */
typedef struct MsaMetrics {
    double kl_sum;       /* sum over MSA layers of the unweighted mean KL */
    double recall_sum;   /* sum over MSA layers of the recall */
    int layers;          /* MSA layers that contributed */
    int recall_layers;
    double dense_loss;   /* LM loss with every MSA layer in dense attention (eval_dense_reference) */
    bool has_dense_loss;
} MsaMetrics;

typedef struct Model {
    ModelConfig cfg;
    MsaConfig msa_cfg;
    MoeConfig moe_cfg;
    int n_moe_layers;
    int head_dim, rotary_dim, index_rotary_dim, n_msa_layers;
    ParamStore params;
    Tensor *wte, *final_norm, *lm_head; /* lm_head == wte when tied */
    LayerParams *layers;
    MsaParams msa;                      /* kernel parameters of the MSA layers */
    bool msa_dense;                     /* dense warm-up phase: every visible block selected */
    bool collect_metrics;               /* compute KL/recall statistics during forward (eval) */
    MsaMetrics metrics;
    /* Context parallelism (dist.cp; NULL or a group of one rank: none). The group's ranks share each
     * micro-batch: every op but attention runs on this rank's contiguous 1/cp of its N tokens
     * (model_cp_range), and attention on all N tokens for 1/cp of the heads, by all-to-all exchanges
     * around it (autograd/op_cp.c); MSA layers gather the shared index key. The ModelInput stays the
     * whole micro-batch; the logits, the LM loss and the MSA KL and metrics then cover this rank's
     * share only (its tokens; its GQA groups), and the trainer recombines them over the group. The Comm
     * (kernels/comm.h) is the trainer's, made from its Dist group by dist_comm. */
    const Comm *cp;
    /* Expert parallelism (dist.ep; NULL: none): the MoE layers' routed experts are split over this group
     * (train/moe.h), the rest of the model is the same on its ranks. The routed experts' tensors are the
     * store's last ones, params.p[first_expert_param .. params.n) (none without MoE layers). */
    const Comm *ep;
    int first_expert_param;
} Model;

/* Device tensors of one micro-batch. */
typedef struct ModelInput {
    Tensor *tokens, *targets, *positions, *cu_seqlens; /* i32 */
    /* dropout (model.dropout > 0): the micro-batch's mask seed, 0 = no dropout (evaluation; set by the
     * training step), and the batch's first row in the global batch, so that each row's mask does not
     * depend on how the batch is split (kernels/dropout_mask.h) */
    uint64_t dropout_seed;
    int64_t row_offset;
} ModelInput;

typedef struct ModelLosses {
    Tensor *total;   /* lm + aux: what backward starts from */
    Tensor *lm;      /* mean token cross-entropy */
    Tensor *aux;     /* weighted KL (sum over MSA layers), NULL without MSA */
} ModelLosses;

/* Declare and initialise the parameters (fp32 master weights, F64 for gradient checks). */
void model_build(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed);
/* The same for one rank of the expert-parallel group ep (NULL or one rank: model_build): this rank's
 * routed experts only, initialised as the single process's rows of them. */
void model_build_ep(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed,
                    const Comm *ep);
void model_free(Model *m);

/* After each optimizer step (update_bias = true): apply the MoE selection-bias update from the step's
 * loads; after an evaluation (false): leave the bias alone. Either way (if summary is not NULL) report the worst layer's max/mean expert load and the mean aux and z losses;
 * then reset the routing statistics. */
typedef struct MoeSummary {
    double max_over_mean_load; /* worst MoE layer's max/mean tokens per expert (1 = balanced) */
    double aux_loss, z_loss;   /* mean over MoE layers of the unweighted losses */
} MoeSummary;
void model_moe_step(Model *m, MoeSummary *summary, bool update_bias);

/* Is this parameter part of an MSA index branch? (trained by the KL only) */
bool model_is_index_param(const Tensor *p);
/* Which parameters train: index_only = only the MSA index branches; else all, with the LR of every
 * non-index parameter multiplied by backbone_lr_scale (0 = backbone frozen). */
void model_set_trainable(Model *m, bool index_only, float backbone_lr_scale);

/* This rank's tokens [*begin, *end) of a micro-batch of N tokens under context parallelism (all of them
 * without); stops with a message when N does not divide by the group's size. */
void model_cp_range(const Model *m, int64_t N, int64_t *begin, int64_t *end);

/* Upload a host batch as device tensors in the engine's arena. */
ModelInput model_upload(Engine *e, const Batch *b);
/* Final-norm hidden states -> logits [N, V] (context parallel: this rank's rows of them) */
Tensor *model_logits(Model *m, Engine *e, const ModelInput *in, bool recompute, Tensor **aux_out);
/* Full forward with losses (targets required). */
ModelLosses model_forward(Model *m, Engine *e, const ModelInput *in, bool recompute);

#endif
