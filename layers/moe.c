/* The MoE feed-forward layer: router -> Top-k selection (biased) -> routing plan -> permute ->
 * grouped SwiGLU experts -> weighted unpermute, plus shared experts and the balance terms. */
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/util.h"

void moe_stats_init(MoeStats *s, const KernelBackend *be, int num_experts) {
    memset(s, 0, sizeof(*s));
    s->num_experts = num_experts;
    s->be = be;
    s->load = xcalloc((size_t)num_experts, sizeof(int64_t));
    s->acc = (Tensor){.dtype = DT_F64, .device = be->device, .ndim = 1, .shape = {num_experts + 2},
                      .numel = num_experts + 2};
    s->acc.data = be->alloc(tensor_bytes(&s->acc));
    be->zero(s->acc.data, tensor_bytes(&s->acc));
}

void moe_stats_reset(MoeStats *s) {
    s->be->zero(s->acc.data, tensor_bytes(&s->acc));
    memset(s->load, 0, (size_t)s->num_experts * sizeof(int64_t));
    s->tokens = 0;
    s->aux_loss_sum = s->z_loss_sum = 0;
    s->forwards = 0;
}

void moe_stats_free(MoeStats *s) {
    if (s->acc.data) s->be->free(s->acc.data);
    free(s->load);
    memset(s, 0, sizeof(*s));
}

void moe_stats_read(MoeStats *s) {
    const int E = s->num_experts;
    double *v = xmalloc(tensor_bytes(&s->acc));
    s->be->copy_to_host(v, s->acc.data, tensor_bytes(&s->acc));
    for (int i = 0; i < E; i++) s->load[i] = (int64_t)v[i]; /* sums of counts: exact in double below 2^53 */
    s->aux_loss_sum = v[E];
    s->z_loss_sum = v[E + 1];
    free(v);
}

void moe_stats_count_forwards(MoeStats *s, int forwards, int64_t tokens) {
    s->forwards += forwards;
    s->tokens += tokens;
}

void moe_stats_load(const MoeStats *s, double *max_load, double *mean_load) {
    double mx = 0, sum = 0;
    for (int i = 0; i < s->num_experts; i++) {
        mx = fmax(mx, (double)s->load[i]);
        sum += (double)s->load[i];
    }
    *max_load = mx;
    *mean_load = s->num_experts ? sum / s->num_experts : 0;
}

double moe_stats_aux_loss(const MoeStats *s) { return s->forwards ? s->aux_loss_sum / s->forwards : 0; }
double moe_stats_z_loss(const MoeStats *s) { return s->forwards ? s->z_loss_sum / s->forwards : 0; }

/* The score function of c, or false with the reason in why. */
static bool score_func_of(const MoeConfig *c, MoeScoreFunc *f, char *why, size_t n) {
    if (strcmp(c->score_func, "softmax") == 0) *f = MOE_SCORE_SOFTMAX;
    else if (strcmp(c->score_func, "sigmoid") == 0) *f = MOE_SCORE_SIGMOID;
    else {
        snprintf(why, n, "moe.score_func: \"%s\" is not \"softmax\" or \"sigmoid\"", c->score_func);
        return false;
    }
    return true;
}

MoeScoreFunc moe_score_func(const MoeConfig *c) {
    MoeScoreFunc f;
    char why[128];
    if (!score_func_of(c, &f, why, sizeof why)) fatal("%s", why);
    return f;
}

/* Do the routed experts split evenly over P expert-parallel ranks? Else false with the reason. */
static bool experts_divide(const MoeConfig *c, int P, char *why, size_t n) {
    if (c->num_experts % P == 0) return true;
    snprintf(why, n, "moe.num_experts = %d does not divide over dist.ep = %d expert-parallel ranks (each rank holds "
             "num_experts / ep of them): choose an ep that divides it", c->num_experts, P);
    return false;
}

bool moe_check_config(const MoeConfig *c, char *why, size_t n) {
    if (c->num_experts < 1) snprintf(why, n, "moe.num_experts must be >= 1 (got %d)", c->num_experts);
    else if (c->experts_per_token < 1 || c->experts_per_token > c->num_experts)
        snprintf(why, n, "moe.experts_per_token must be in [1, moe.num_experts = %d] (got %d)", c->num_experts,
                 c->experts_per_token);
    else if (c->expert_dim < 1) snprintf(why, n, "moe.expert_dim must be >= 1 (got %d)", c->expert_dim);
    else if (c->shared_experts < 0 || c->shared_experts > MOE_MAX_SHARED)
        snprintf(why, n, "moe.shared_experts must be in [0, %d] (got %d)", MOE_MAX_SHARED, c->shared_experts);
    else if (c->shared_expert_dim < 0)
        snprintf(why, n, "moe.shared_expert_dim must be >= 0 (got %d)", c->shared_expert_dim);
    /* a zero scale would silently switch the routed experts off */
    else if (!(c->routing_scale > 0))
        snprintf(why, n, "moe.routing_scale must be > 0 (got %g)", (double)c->routing_scale);
    else if (c->aux_loss_weight < 0) snprintf(why, n, "moe.aux_loss_weight must be >= 0");
    else if (c->z_loss_weight < 0) snprintf(why, n, "moe.z_loss_weight must be >= 0");
    else if (c->bias_update_rate < 0) snprintf(why, n, "moe.bias_update_rate must be >= 0");
    else {
        MoeScoreFunc f;
        return score_func_of(c, &f, why, n);
    }
    return false;
}

static Tensor *add_param(ParamStore *ps, const char *name, int ndim, const int64_t *shape, float std) {
    return params_add(ps, name, ndim, shape, INIT_NORMAL, std, true);
}

void moe_declare_router_params(ParamStore *ps, int layer, const ModelConfig *mc, const MoeConfig *c,
                               MoeLayerParams *p) {
    char why[256];
    if (!moe_check_config(c, why, sizeof why)) fatal("layer %d: %s", layer, why);
    memset(p, 0, sizeof(*p));
    int64_t E = c->num_experts, C = mc->d_model;
    int64_t Fs = c->shared_expert_dim ? c->shared_expert_dim : c->expert_dim;
    float std = mc->init_std, out_std = mc->init_std / sqrtf(2.0f * (float)mc->n_layers);
    char name[128];
    p->layer = layer;
    p->num_experts = c->num_experts;
    p->num_local_experts = c->num_experts;
    snprintf(name, sizeof name, "layers.%d.moe.router", layer);
    p->w_router = add_param(ps, name, SHAPE(E, C), std);
    p->n_shared = c->shared_experts;
    for (int i = 0; i < p->n_shared; i++) {
        snprintf(name, sizeof name, "layers.%d.moe.shared.%d.w_gate", layer, i);
        p->shared_gate[i] = add_param(ps, name, SHAPE(Fs, C), std);
        snprintf(name, sizeof name, "layers.%d.moe.shared.%d.w_up", layer, i);
        p->shared_up[i] = add_param(ps, name, SHAPE(Fs, C), std);
        snprintf(name, sizeof name, "layers.%d.moe.shared.%d.w_down", layer, i);
        p->shared_down[i] = add_param(ps, name, SHAPE(C, Fs), out_std);
    }
    p->be = ps->be;
    p->bias = xcalloc(1, sizeof(Tensor));
    *p->bias = (Tensor){.dtype = DT_F32, .device = ps->be->device, .ndim = 1, .shape = {E}, .numel = E};
    p->bias->data = ps->be->alloc(tensor_bytes(p->bias));
    ps->be->zero(p->bias->data, tensor_bytes(p->bias));
}

/* One stacked expert tensor [El, d1, d2] of this rank: rows [first, first + El) of the full [E, d1, d2]. */
static Tensor *add_expert_param(ParamStore *ps, const char *name, const MoeLayerParams *p, int64_t d1, int64_t d2,
                                float std) {
    Tensor *t = add_param(ps, name, SHAPE(p->num_local_experts, d1, d2), std);
    params_find(ps, name)->init_first = (int64_t)p->first_expert * d1 * d2;
    return t;
}

void moe_declare_expert_params(ParamStore *ps, const ModelConfig *mc, const MoeConfig *c, MoeLayerParams *p,
                               const Comm *ep) {
    int64_t C = mc->d_model, F = c->expert_dim;
    float std = mc->init_std, out_std = mc->init_std / sqrtf(2.0f * (float)mc->n_layers);
    int P = ep ? ep->size : 1;
    char why[256];
    if (!experts_divide(c, P, why, sizeof why)) fatal("%s", why);
    p->ep = P > 1 ? ep : NULL;
    p->num_local_experts = c->num_experts / P;
    p->first_expert = (P > 1 ? ep->rank : 0) * p->num_local_experts;
    char name[128];
    snprintf(name, sizeof name, "layers.%d.moe.w_gate", p->layer);
    p->w_gate = add_expert_param(ps, name, p, F, C, std);
    snprintf(name, sizeof name, "layers.%d.moe.w_up", p->layer);
    p->w_up = add_expert_param(ps, name, p, F, C, std);
    snprintf(name, sizeof name, "layers.%d.moe.w_down", p->layer);
    p->w_down = add_expert_param(ps, name, p, C, F, out_std);
}

void moe_declare_params(ParamStore *ps, int layer, const ModelConfig *mc, const MoeConfig *c, MoeLayerParams *p) {
    moe_declare_router_params(ps, layer, mc, c, p);
    moe_declare_expert_params(ps, mc, c, p, NULL);
}

bool moe_is_expert_param(const Tensor *t) {
    const char *s = strstr(t->name, ".moe.w_");
    return s && (!strcmp(s, ".moe.w_gate") || !strcmp(s, ".moe.w_up") || !strcmp(s, ".moe.w_down"));
}

void moe_free_params(MoeLayerParams *p) {
    if (p->bias) {
        p->be->free(p->bias->data);
        free(p->bias);
    }
    p->bias = NULL;
}

void moe_bias_to_host(const MoeLayerParams *p, float *dst) {
    p->be->copy_to_host(dst, p->bias->data, tensor_bytes(p->bias));
}

void moe_bias_from_host(MoeLayerParams *p, const float *src) {
    p->be->copy_from_host(p->bias->data, src, tensor_bytes(p->bias));
}

/* The statistics on the device: the plan's offsets give the load per expert, added with the losses to the
 * accumulator by one kernel (no copy to the host, so the forward never waits for the device); the counts
 * the host knows stay on the host. */
static void record_stats(Engine *e, MoeStats *s, const MoePlan *plan, Tensor *aux_loss, Tensor *z_loss) {
    int E = plan->num_experts;
    if (s->num_experts != E) fatal("moe stats: initialised for %d experts, the layer has %d", s->num_experts, E);
    if (s->be != e->be) fatal("moe stats: accumulating in another backend's memory than the engine's");
    e->be->moe_stats_accumulate(&s->acc, plan->offsets, aux_loss, z_loss);
    s->tokens += plan->idx->shape[0];
    s->forwards++;
}

/* The SwiGLU experts of this rank over rows grouped by its experts (segments offsets [El+1]). */
static Tensor *routed_experts(Engine *e, const MoeLayerParams *p, Tensor *xs, Tensor *offsets) {
    Tensor *g = op_grouped_linear(e, xs, p->w_gate, offsets);
    Tensor *u = op_grouped_linear(e, xs, p->w_up, offsets);
    return op_grouped_linear(e, op_swiglu(e, g, u), p->w_down, offsets);
}

Tensor *moe_forward_routed(Engine *e, MoeLayerParams *p, const MoeConfig *c, Tensor *x, Tensor *idx, MoeStats *stats,
                           Tensor **aux) {
    int E = p->num_experts, k = c->experts_per_token;
    if (c->num_experts != E) fatal("moe_forward: config has %d experts, layer %d was built with %d", c->num_experts, p->layer, E);
    MoeScoreFunc func = moe_score_func(c);
    Tensor *x_in = x;
    int64_t N = tensor_rows(x), C = tensor_dim(x, -1);
    if (x->ndim != 2) x = engine_view(e, x, SHAPE(N, C));

    /* router: logits and scores are differentiable; the selection reads them but records nothing. The
     * logits are F32 when the activations are BF16 (E values a token: nothing to save by rounding), and so
     * are the scores and combine weights that follow them; F32 and F64 (gradient checks) stay as they are */
    Tensor *logits = op_linear_to(e, x, p->w_router, x->dtype == DT_BF16 ? DT_F32 : x->dtype);
    Tensor *scores = op_moe_router_scores(e, logits, func);
    if (!idx) {
        idx = op_moe_topk(e, scores, p->bias, k); /* the bias in the backend's memory: no upload */
    } else {
        check_shape("moe_forward", "idx", idx, SHAPE(N, k));
    }
    MoePlan plan = op_moe_plan(e, idx, E);
    Tensor *w = op_moe_combine_weights(e, scores, idx, c->renormalize, c->routing_scale);

    /* routed experts over the expert-grouped rows; with expert parallelism the rows go to the ranks
     * that hold their experts and the outputs come back (plan over all E experts, GEMMs over ours) */
    Tensor *xs = op_moe_permute(e, x, &plan), *ys;
    if (p->ep) {
        EpDispatch *d = op_ep_dispatch_plan(e, &plan, p->ep);
        ys = op_ep_return(e, routed_experts(e, p, op_ep_dispatch(e, xs, d), d->offsets), d);
    } else {
        ys = routed_experts(e, p, xs, plan.offsets);
    }
    Tensor *out = op_moe_unpermute(e, ys, w, &plan);

    for (int i = 0; i < p->n_shared; i++) {
        Tensor *h = op_swiglu(e, op_linear(e, x, p->shared_gate[i]), op_linear(e, x, p->shared_up[i]));
        out = op_add(e, out, op_linear(e, h, p->shared_down[i]));
    }

    /* balance terms: built with gradients when weighted into the loss, else (metrics only) without */
    bool want_stats = stats && !e->recomputing;
    Tensor *aux_loss = NULL, *z_loss = NULL, *total = NULL;
    /* for sigmoid scores P_e needs per-token normalised scores; softmax scores already sum to 1 */
    bool normalize = func == MOE_SCORE_SIGMOID;
    if (c->aux_loss_weight > 0 || want_stats) {
        bool prev = engine_set_grad(e, e->grad_enabled && c->aux_loss_weight > 0);
        aux_loss = op_moe_aux_loss(e, scores, &plan, normalize);
        engine_set_grad(e, prev);
    }
    if (c->z_loss_weight > 0 || want_stats) {
        bool prev = engine_set_grad(e, e->grad_enabled && c->z_loss_weight > 0);
        z_loss = op_moe_z_loss(e, logits);
        engine_set_grad(e, prev);
    }
    if (c->aux_loss_weight > 0) total = op_scale(e, aux_loss, c->aux_loss_weight);
    if (c->z_loss_weight > 0) {
        Tensor *zt = op_scale(e, z_loss, c->z_loss_weight);
        total = total ? op_add(e, total, zt) : zt;
    }
    if (aux) *aux = total;
    if (want_stats) record_stats(e, stats, &plan, aux_loss, z_loss);

    if (x_in->ndim != 2) out = engine_view(e, out, x_in->ndim, x_in->shape);
    return out;
}

Tensor *moe_forward(Engine *e, MoeLayerParams *p, const MoeConfig *c, Tensor *x, MoeStats *stats, Tensor **aux) {
    return moe_forward_routed(e, p, c, x, NULL, stats, aux);
}

void moe_update_bias(MoeLayerParams *p, const MoeConfig *c, const MoeStats *stats) {
    if (c->bias_update_rate <= 0 || !p->bias) return;
    if (stats->num_experts != p->num_experts || stats->be != p->be)
        fatal("moe_update_bias: layer %d: statistics of %d experts for its %d, or in another backend's memory than "
              "its bias", p->layer, stats->num_experts, p->num_experts);
    p->be->moe_bias_update(p->bias, &stats->acc, c->bias_update_rate);
}

/* ---- the layer -------------------------------------------------------------------------------- */

static bool moe_requires(Device backend, const RunConfig *c, char *why, size_t n) {
    (void)backend;
    return moe_check_config(&c->moe, why, n) && experts_divide(&c->moe, c->dist.ep, why, n);
}

static void moe_layer_declare(void *self, const LayerSetup *s) {
    MoeLayer *L = self;
    L->cfg = s->cfg->moe;
    moe_declare_router_params(s->params, s->layer, &s->cfg->model, &L->cfg, &L->p);
    moe_stats_init(&L->stats, s->params->be, L->cfg.num_experts);
}

static void moe_layer_declare_experts(void *self, const LayerSetup *s) {
    MoeLayer *L = self;
    moe_declare_expert_params(s->params, &s->cfg->model, &L->cfg, &L->p, s->ep);
}

static Tensor *moe_layer_forward(void *self, Engine *e, Tensor *x, const LayerContext *ctx, Tensor **aux) {
    MoeLayer *L = self;
    (void)ctx;
    return moe_forward(e, &L->p, &L->cfg, x, &L->stats, aux);
}

static void moe_layer_step_end(void *self, bool update, Metrics *m) {
    MoeLayer *L = self;
    if (update) moe_update_bias(&L->p, &L->cfg, &L->stats);
    if (m) { /* the one copy of the statistics to the host, on the steps that report them */
        moe_stats_read(&L->stats);
        double mx, mean;
        moe_stats_load(&L->stats, &mx, &mean);
        if (mean > 0) metrics_add(m, "moe_max_over_mean_load", mx / mean);
        metrics_add(m, "moe_aux_loss", moe_stats_aux_loss(&L->stats));
        metrics_add(m, "moe_z_loss", moe_stats_z_loss(&L->stats));
    }
    moe_stats_reset(&L->stats);
}

/* A replayed step's forwards accumulated their loads and losses on the device; the host, which counts the
 * forwards and their tokens, did not see them (a checkpointed block's recompute is not counted). */
static void moe_layer_replayed(void *self, int forwards, int64_t tokens_per_forward) {
    moe_stats_count_forwards(&((MoeLayer *)self)->stats, forwards, forwards * tokens_per_forward);
}

static void moe_layer_free(void *self) {
    MoeLayer *L = self;
    moe_free_params(&L->p);
    moe_stats_free(&L->stats);
}

const LayerKind ffn_moe = {
    .size = sizeof(MoeLayer),
    .requires = moe_requires,
    .declare = moe_layer_declare,
    .declare_late = moe_layer_declare_experts,
    .forward = moe_layer_forward,
    .step_end = moe_layer_step_end,
    .replayed = moe_layer_replayed,
    .free = moe_layer_free,
};

MoeLayer *moe_layer_of(const Layer *L) { return L->kind == &ffn_moe ? L->self : NULL; }

MoeSummary moe_summary(const Metrics *m) {
    return (MoeSummary){.max_over_mean_load = metrics_max(m, "moe_max_over_mean_load"),
                        .aux_loss = metrics_mean(m, "moe_aux_loss"),
                        .z_loss = metrics_mean(m, "moe_z_loss")};
}
