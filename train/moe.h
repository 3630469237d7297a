/* The Mixture-of-Experts feed-forward layer (DESIGN §3): a router (softmax or sigmoid scores, top-k
 * experts per token, optional renormalisation and routing scale), E routed SwiGLU experts run as
 * grouped GEMMs over the expert-grouped tokens (dropless), optional shared SwiGLU experts every
 * token passes through, and the load-balancing machinery: auxiliary balance loss, router z-loss,
 * and the auxiliary-loss-free per-expert selection bias (DeepSeek-V3).
 *
 * Use from the model, per MoE layer l:
 *   build:     moe_declare_params(&ps, l, &cfg.model, &cfg.moe, &P[l]); moe_stats_init(&S[l], E);
 *   forward:   f = moe_forward(e, &P[l], &cfg.moe, ffn_norm_out, &S[l], &aux);   (aux may be NULL)
 *   per step:  after the optimizer step moe_update_bias(&P[l], &cfg.moe, &S[l]); log from S[l];
 *              then moe_stats_reset(&S[l]).
 *   teardown:  moe_free_params(&P[l]); moe_stats_free(&S[l]). */
#ifndef MSA_MOE_H
#define MSA_MOE_H

#include "../autograd/engine.h"
#include "../autograd/params.h"
#include "config.h"

#define MOE_MAX_SHARED 8

typedef struct MoeLayerParams {
    int layer, num_experts;
    Tensor *w_router;                 /* [E, C] */
    Tensor *w_gate, *w_up;            /* [E, F, C] stacked experts */
    Tensor *w_down;                   /* [E, C, F] */
    int n_shared;
    Tensor *shared_gate[MOE_MAX_SHARED], *shared_up[MOE_MAX_SHARED]; /* [Fs, C] */
    Tensor *shared_down[MOE_MAX_SHARED];                             /* [C, Fs] */
    /* Auxiliary-loss-free balancing bias, host memory owned by the layer (zero-initialised). Not a
     * parameter: no gradient, no optimizer; it only shifts which experts are selected, never the
     * combine weights. It is training state: a checkpoint must save and restore it
     * (suggested dataset name "layers.<l>.moe.bias", f32 [E]). */
    float *bias;
} MoeLayerParams;

/* Routing statistics of one layer, accumulated over forwards until moe_stats_reset. Updated only
 * when the engine is not recomputing (a checkpointed block runs its forward twice). */
typedef struct MoeStats {
    int num_experts;
    int64_t *load;        /* [E] token-expert assignments routed to each expert */
    int64_t tokens;       /* tokens routed */
    double aux_loss_sum;  /* unweighted balance loss, summed over forwards */
    double z_loss_sum;    /* unweighted router z-loss, summed over forwards */
    int forwards;         /* forwards accumulated */
} MoeStats;

void moe_stats_init(MoeStats *s, int num_experts);
void moe_stats_reset(MoeStats *s);
void moe_stats_free(MoeStats *s);
/* Max and mean over experts of the load (assignments per expert); max/mean = 1 is perfect balance. */
void moe_stats_load(const MoeStats *s, double *max_load, double *mean_load);
/* Mean unweighted aux loss / z-loss over the accumulated forwards (0 when none). */
double moe_stats_aux_loss(const MoeStats *s);
double moe_stats_z_loss(const MoeStats *s);

/* The score function named by c->score_func ("softmax" or "sigmoid"); fatal otherwise. */
MoeScoreFunc moe_score_func(const MoeConfig *c);
/* Check the MoE keys against the model (k <= E, dims > 0, ...); fatal with the key's name. */
void moe_validate_config(const MoeConfig *c);

/* Declare layer `layer`'s parameters in ps (before params_allocate): "layers.<l>.moe.router",
 * ".w_gate", ".w_up", ".w_down", ".shared.<i>.w_gate|w_up|w_down"; all decay; normal init with
 * std mc->init_std, down projections mc->init_std / sqrt(2 n_layers) like the dense model's output
 * projections. Allocates the host bias (free with moe_free_params). */
void moe_declare_params(ParamStore *ps, int layer, const ModelConfig *mc, const MoeConfig *c, MoeLayerParams *p);
void moe_free_params(MoeLayerParams *p);

/* The MoE FFN output [N, C] for the normed input x [N, C] (any leading dims). *aux gets
 * aux_loss_weight * balance loss + z_loss_weight * z-loss as one scalar (stat dtype), or NULL when
 * both weights are 0. stats (NULL = none) accumulates load and the unweighted losses. */
Tensor *moe_forward(Engine *e, MoeLayerParams *p, const MoeConfig *c, Tensor *x, MoeStats *stats, Tensor **aux);
/* The same with the selection given: idx i32 [N, k] (NULL = select from scores + bias as usual).
 * For tests that hold routing fixed while perturbing the router weights. */
Tensor *moe_forward_routed(Engine *e, MoeLayerParams *p, const MoeConfig *c, Tensor *x, Tensor *idx, MoeStats *stats,
                           Tensor **aux);

/* Auxiliary-loss-free balancing, once per optimizer step (after it) from the loads accumulated in
 * stats over the step's micro-batches: bias_e += rate * sign(mean_load - load_e). No-op when
 * c->bias_update_rate == 0 or nothing was routed. With data parallelism the loads must be summed
 * over ranks first so that every rank applies the same update. */
void moe_update_bias(MoeLayerParams *p, const MoeConfig *c, const MoeStats *stats);

#endif
