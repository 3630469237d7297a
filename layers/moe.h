/* The Mixture-of-Experts feed-forward layer (DESIGN §3): a router (softmax or sigmoid scores, top-k
 * experts per token, optional renormalisation and routing scale), E routed SwiGLU experts run as
 * grouped GEMMs over the expert-grouped tokens (dropless), optional shared SwiGLU experts every
 * token passes through, and the load-balancing machinery: auxiliary balance loss, router z-loss,
 * and the auxiliary-loss-free per-expert selection bias (DeepSeek-V3).
 *
 * The model uses it as the feed-forward variant "moe" (LayerKind ffn_moe, layers/layers.def: its state
 * is a MoeLayer); the functions below are the same layer in parts, for tests and tools:
 *   build:     moe_declare_params(&ps, l, &cfg.model, &cfg.moe, &P[l]); moe_stats_init(&S[l], ps.be, E);
 *              (or moe_declare_router_params now and moe_declare_expert_params later: the model
 *              declares every layer's routed experts last, so that they form one contiguous region of
 *              the parameter store, the one expert parallelism reduces over other ranks)
 *   forward:   f = moe_forward(e, &P[l], &cfg.moe, ffn_norm_out, &S[l], &aux);   (aux may be NULL)
 *   per step:  after the optimizer step moe_update_bias(&P[l], &cfg.moe, &S[l]); to log, moe_stats_read(&S[l])
 *              and read S[l]; then moe_stats_reset(&S[l]). Nothing of this makes the host wait for the
 *              device but moe_stats_read: the bias and the statistics live in the backend's memory.
 *   teardown:  moe_free_params(&P[l]); moe_stats_free(&S[l]). */
#ifndef MSA_MOE_H
#define MSA_MOE_H

#include "../autograd/engine.h"
#include "../autograd/params.h"
#include "../kernels/comm.h"
#include "layer.h"

#define MOE_MAX_SHARED 8

/* Expert parallelism (dist.ep = P ranks in the layer's group `ep`, a Comm that dist_comm made): the
 * ranks of the group route different tokens, and each holds El = E / P of the routed experts, rank r
 * the experts [r*El, (r+1)*El) (first_expert, num_local_experts). The router, the shared experts and
 * the bias cover all E experts and are the same on every rank. The routed experts' rows travel to their
 * owners and back by all-to-all (autograd/op_ep.c); everything else is unchanged. Without it (ep NULL or of
 * one rank) first_expert = 0 and num_local_experts = E. */
typedef struct MoeLayerParams {
    int layer, num_experts;
    const Comm *ep;                   /* expert-parallel group, or NULL */
    int first_expert, num_local_experts;
    Tensor *w_router;                 /* [E, C] */
    Tensor *w_gate, *w_up;            /* [El, F, C] stacked experts: this rank's */
    Tensor *w_down;                   /* [El, C, F] */
    int n_shared;
    Tensor *shared_gate[MOE_MAX_SHARED], *shared_up[MOE_MAX_SHARED]; /* [Fs, C] */
    Tensor *shared_down[MOE_MAX_SHARED];                             /* [C, Fs] */
    /* Auxiliary-loss-free balancing bias, f32 [E] in the memory of backend `be` (the parameter store's),
     * owned by the layer (zero-initialised): the forward's Top-k reads it and moe_update_bias writes it
     * there, so neither makes the host wait. Not a parameter: no gradient, no optimizer, not in the
     * store's buffers; it only shifts which experts are selected, never the combine weights. It is
     * training state: a checkpoint saves and restores it (dataset "layers.<l>.moe.bias", f32 [E] in
     * /state) through moe_bias_to_host / moe_bias_from_host. On the CPU backend its data is host memory. */
    Tensor *bias;
    const KernelBackend *be;
} MoeLayerParams;

/* Routing statistics of one layer, accumulated over forwards until moe_stats_reset. Updated only
 * when the engine is not recomputing (a checkpointed block runs its forward twice). The loads and the
 * losses accumulate in the backend's memory (acc, moe_stats_accumulate: no host read per forward, so a
 * step captured in a CUDA graph accumulates them at every replay); the host fields load, aux_loss_sum and
 * z_loss_sum are acc's values as of the last moe_stats_read. tokens and forwards are counted on the host,
 * which knows them (a replayed step's: moe_stats_count_forwards). */
typedef struct MoeStats {
    int num_experts;
    const KernelBackend *be;
    Tensor acc;           /* f64 [E+2] in be's memory: the loads, the aux-loss sum, the z-loss sum */
    int64_t *load;        /* [E] token-expert assignments routed to each expert (moe_stats_read) */
    int64_t tokens;       /* tokens routed */
    double aux_loss_sum;  /* unweighted balance loss, summed over forwards (moe_stats_read) */
    double z_loss_sum;    /* unweighted router z-loss, summed over forwards (moe_stats_read) */
    int forwards;         /* forwards accumulated */
} MoeStats;

/* Statistics of num_experts experts accumulating in be's memory (the layer's backend). */
void moe_stats_init(MoeStats *s, const KernelBackend *be, int num_experts);
/* Zero everything: the accumulator on the device (no wait), the host fields and counts. */
void moe_stats_reset(MoeStats *s);
void moe_stats_free(MoeStats *s);
/* Copy the accumulator to the host fields load, aux_loss_sum, z_loss_sum: one copy, a wait on a GPU. */
void moe_stats_read(MoeStats *s);
/* Count forwards that ran without the host: a replayed CUDA graph step ran `forwards` forwards of `tokens`
 * tokens in all, which accumulated on the device but were not counted on the host. */
void moe_stats_count_forwards(MoeStats *s, int forwards, int64_t tokens);
/* Max and mean over experts of the load (assignments per expert); max/mean = 1 is perfect balance.
 * These three read the host fields: moe_stats_read first. */
void moe_stats_load(const MoeStats *s, double *max_load, double *mean_load);
/* Mean unweighted aux loss / z-loss over the accumulated forwards (0 when none). */
double moe_stats_aux_loss(const MoeStats *s);
double moe_stats_z_loss(const MoeStats *s);

/* The score function named by c->score_func ("softmax" or "sigmoid"); fatal otherwise. */
MoeScoreFunc moe_score_func(const MoeConfig *c);
/* The rules of the MoE keys (k <= E, dims > 0, ...); false with the reason, naming the key, in why. */
bool moe_check_config(const MoeConfig *c, char *why, size_t n);

/* Declare layer `layer`'s parameters in ps (before params_allocate): "layers.<l>.moe.router",
 * ".w_gate", ".w_up", ".w_down", ".shared.<i>.w_gate|w_up|w_down"; all decay; normal init with
 * std mc->init_std, down projections mc->init_std / sqrt(2 n_layers) like the dense model's output
 * projections. Allocates the selection bias in ps's backend (free with moe_free_params). */
void moe_declare_params(ParamStore *ps, int layer, const ModelConfig *mc, const MoeConfig *c, MoeLayerParams *p);
/* The same in two parts (moe_declare_params = both, without expert parallelism): the router, shared
 * experts and the selection bias first; the routed experts ".w_gate", ".w_up", ".w_down" later, those of this
 * rank of the expert-parallel group ep (NULL: all E). A slice [El, ...] is initialised with exactly the
 * values the full [E, ...] tensor has in those rows (params.h: init_first), so a fresh expert-parallel
 * run starts from the single process's weights. Stops with a message when E does not divide by the
 * group's size. */
void moe_declare_router_params(ParamStore *ps, int layer, const ModelConfig *mc, const MoeConfig *c,
                               MoeLayerParams *p);
void moe_declare_expert_params(ParamStore *ps, const ModelConfig *mc, const MoeConfig *c, MoeLayerParams *p,
                               const Comm *ep);
/* Is this parameter one of the routed experts' weights (held per expert-parallel rank)? */
bool moe_is_expert_param(const Tensor *t);
void moe_free_params(MoeLayerParams *p);
/* The selection bias to and from host memory (f32 [E]; a copy, which on a GPU waits for the device): for
 * checkpoints and for copies between models on different backends. */
void moe_bias_to_host(const MoeLayerParams *p, float *dst);
void moe_bias_from_host(MoeLayerParams *p, const float *src);

/* The MoE FFN output [N, C] for the normed input x [N, C] (any leading dims). *aux gets
 * aux_loss_weight * balance loss + z_loss_weight * z-loss as one scalar (stat dtype), or NULL when
 * both weights are 0. stats (NULL = none) accumulates load and the unweighted losses.
 * With expert parallelism this is a collective of the layer's ep group (every rank calls it, in the same
 * order, with its own tokens). The balance loss stays that of this rank's tokens (f and P of its own
 * N tokens, as a single process computes it for its micro-batch): the all-to-all already moves the rows,
 * and a global f would add a blocking all-reduce to every MoE layer's forward for a term that is a
 * regulariser, not the objective; the stats (loads) are this rank's and the trainer sums them over the
 * ranks before the bias update. */
Tensor *moe_forward(Engine *e, MoeLayerParams *p, const MoeConfig *c, Tensor *x, MoeStats *stats, Tensor **aux);
/* The same with the selection given: idx i32 [N, k] (NULL = select from scores + bias as usual).
 * For tests that hold routing fixed while perturbing the router weights. */
Tensor *moe_forward_routed(Engine *e, MoeLayerParams *p, const MoeConfig *c, Tensor *x, Tensor *idx, MoeStats *stats,
                           Tensor **aux);

/* Auxiliary-loss-free balancing, once per optimizer step (after it) from the loads accumulated in
 * stats over the step's micro-batches: bias_e += rate * sign(mean_load - load_e) (moe_bias_update, on the
 * device from the device accumulator: no host read). No-op when c->bias_update_rate == 0 or nothing was
 * routed. With data parallelism the accumulators must be summed over ranks first so that every rank
 * applies the same update. */
void moe_update_bias(MoeLayerParams *p, const MoeConfig *c, const MoeStats *stats);

/* ---- the layer -------------------------------------------------------------------------------- */

/* The state of an MoE layer (LayerKind ffn_moe). Its step_end applies the bias update (after an
 * optimizer step), reports "moe_max_over_mean_load", "moe_aux_loss" and "moe_z_loss" (the unweighted
 * losses) when given metrics (the one copy of the statistics to the host: pass metrics only on the steps
 * that log them), then resets the statistics. */
typedef struct MoeLayer {
    MoeLayerParams p;
    MoeStats stats; /* since the last step_end; with several ranks the trainer sums them first */
    MoeConfig cfg;
} MoeLayer;

/* L's MoE state, or NULL when L is no MoE layer. */
MoeLayer *moe_layer_of(const Layer *L);

/* The routing balance the MoE layers reported (step_end) into m. */
typedef struct MoeSummary {
    double max_over_mean_load; /* worst MoE layer's max/mean tokens per expert (1 = balanced) */
    double aux_loss, z_loss;   /* mean over MoE layers of the unweighted losses */
} MoeSummary;
MoeSummary moe_summary(const Metrics *m);

#endif
