#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/dropout_mask.h"
#include "../kernels/util.h"

#define IGNORE_INDEX (-1)

static Tensor *param(Model *m, const char *fmt, int layer, int ndim, const int64_t *shape, InitKind init, float std,
                     bool decay) {
    char name[128];
    snprintf(name, sizeof name, fmt, layer);
    return params_add(&m->params, name, ndim, shape, init, std, decay);
}

void model_build(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed) {
    model_build_ep(m, cfg, be, param_dtype, seed, NULL);
}

void model_build_ep(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed,
                    const Comm *ep) {
    memset(m, 0, sizeof(*m));
    m->cfg = cfg->model;
    m->msa_cfg = cfg->msa;
    m->moe_cfg = cfg->moe;
    const ModelConfig *c = &m->cfg;
    int64_t C = c->d_model, V = c->vocab_size, Hq = c->n_heads, Hkv = c->n_kv_heads;
    m->head_dim = c->head_dim ? c->head_dim : c->d_model / c->n_heads;
    m->rotary_dim = c->rotary_dim ? c->rotary_dim : m->head_dim;
    int64_t D = m->head_dim, F = c->ffn_dim, Di = cfg->msa.index_dim;
    m->index_rotary_dim = m->rotary_dim < Di ? m->rotary_dim : (int)Di;
    float std = c->init_std, out_std = c->init_std / sqrtf(2.0f * (float)c->n_layers);

    params_init(&m->params, be, param_dtype);
    m->wte = params_add(&m->params, "wte", SHAPE(V, C), INIT_NORMAL, std, cfg->optim.decay_embeddings);
    m->layers = xcalloc((size_t)c->n_layers, sizeof(LayerParams));
    for (int l = 0; l < c->n_layers; l++) {
        LayerParams *L = &m->layers[l];
        L->attn_norm = param(m, "layers.%d.attn_norm", l, SHAPE(C), INIT_ONES, 0, false);
        L->wq = param(m, "layers.%d.attn.wq", l, SHAPE(Hq * D, C), INIT_NORMAL, std, true);
        L->wk = param(m, "layers.%d.attn.wk", l, SHAPE(Hkv * D, C), INIT_NORMAL, std, true);
        L->wv = param(m, "layers.%d.attn.wv", l, SHAPE(Hkv * D, C), INIT_NORMAL, std, true);
        L->wo = param(m, "layers.%d.attn.wo", l, SHAPE(C, Hq * D), INIT_NORMAL, out_std, true);
        if (c->qkv_bias) { /* Qwen2-family checkpoints; zero-initialised, never decayed */
            L->bq = param(m, "layers.%d.attn.bq", l, SHAPE(Hq * D), INIT_ZEROS, 0, false);
            L->bk = param(m, "layers.%d.attn.bk", l, SHAPE(Hkv * D), INIT_ZEROS, 0, false);
            L->bv = param(m, "layers.%d.attn.bv", l, SHAPE(Hkv * D), INIT_ZEROS, 0, false);
        }
        if (c->qk_norm) {
            L->q_norm = param(m, "layers.%d.attn.q_norm", l, SHAPE(D), INIT_ONES, 0, false);
            L->k_norm = param(m, "layers.%d.attn.k_norm", l, SHAPE(D), INIT_ONES, 0, false);
        }
        L->msa = config_layer_is_msa(cfg, l);
        if (L->msa) {
            m->n_msa_layers++;
            /* index branch (DESIGN §4): one index query head per GQA group, one shared index key;
             * Gemma-style norms (gain 1 + w, w zero-initialised) as MiniMax-M3 */
            L->w_iq = param(m, "layers.%d.index.wq", l, SHAPE(Hkv * Di, C), INIT_NORMAL, std, true);
            L->w_ik = param(m, "layers.%d.index.wk", l, SHAPE(Di, C), INIT_NORMAL, std, true);
            L->iq_norm = param(m, "layers.%d.index.q_norm", l, SHAPE(Di), INIT_ZEROS, 0, false);
            L->ik_norm = param(m, "layers.%d.index.k_norm", l, SHAPE(Di), INIT_ZEROS, 0, false);
        }
        L->ffn_norm = param(m, "layers.%d.ffn_norm", l, SHAPE(C), INIT_ONES, 0, false);
        L->moe = config_layer_is_moe(cfg, l);
        if (L->moe) {
            m->n_moe_layers++;
            moe_declare_router_params(&m->params, l, c, &cfg->moe, &L->moe_p);
            moe_stats_init(&L->moe_stats, cfg->moe.num_experts);
        } else {
            L->w_gate = param(m, "layers.%d.ffn.w_gate", l, SHAPE(F, C), INIT_NORMAL, std, true);
            L->w_up = param(m, "layers.%d.ffn.w_up", l, SHAPE(F, C), INIT_NORMAL, std, true);
            L->w_down = param(m, "layers.%d.ffn.w_down", l, SHAPE(C, F), INIT_NORMAL, out_std, true);
        }
    }
    m->final_norm = params_add(&m->params, "final_norm", SHAPE(C), INIT_ONES, 0, false);
    m->lm_head = c->tie_embeddings ? m->wte : params_add(&m->params, "lm_head", SHAPE(V, C), INIT_NORMAL, std, true);
    /* the routed experts last: one contiguous region of the store, which expert parallelism reduces
     * over other ranks than the rest (and whose contents differ between the ranks of an ep group) */
    m->ep = ep && ep->size > 1 ? ep : NULL;
    m->first_expert_param = m->params.n;
    for (int l = 0; l < c->n_layers; l++)
        if (m->layers[l].moe) moe_declare_expert_params(&m->params, c, &cfg->moe, &m->layers[l].moe_p, m->ep);
    params_allocate(&m->params, seed);

    m->msa = (MsaParams){
        .block_size = cfg->msa.block_size,
        .topk_blocks = cfg->msa.topk_blocks,
        .init_blocks = cfg->msa.init_blocks,
        .local_blocks = cfg->msa.local_blocks,
        .scale = 1.0f / sqrtf((float)D),
        .index_scale = 1.0f / sqrtf((float)Di),
    };
}

void model_free(Model *m) {
    for (int l = 0; l < m->cfg.n_layers; l++) {
        if (m->layers[l].moe) {
            moe_free_params(&m->layers[l].moe_p);
            moe_stats_free(&m->layers[l].moe_stats);
        }
        MsaReplay *rp = &m->layers[l].replay;
        if (rp->buf) rp->be->free(rp->buf);
    }
    params_free(&m->params);
    free(m->layers);
    memset(m, 0, sizeof(*m));
}

bool model_is_index_param(const Tensor *p) { return strstr(p->name, ".index.") != NULL; }

void model_set_trainable(Model *m, bool index_only, float backbone_lr_scale) {
    for (int i = 0; i < m->params.n; i++) {
        Param *p = &m->params.p[i];
        bool index = model_is_index_param(p->t);
        p->t->requires_grad = index || (!index_only && backbone_lr_scale > 0);
        p->lr_scale = index ? 1.0f : backbone_lr_scale;
    }
}

static Tensor *upload_i32(Engine *e, const int32_t *host, int64_t n) {
    Tensor *t = engine_empty(e, DT_I32, SHAPE(n));
    tensor_from_host(e, t, host);
    return t;
}

ModelInput model_upload(Engine *e, const Batch *b) {
    int64_t N = (int64_t)b->B * b->T;
    ModelInput in;
    in.tokens = upload_i32(e, b->inputs, N);
    in.targets = b->targets ? upload_i32(e, b->targets, N) : NULL;
    in.positions = upload_i32(e, b->positions, N);
    in.cu_seqlens = upload_i32(e, b->cu_seqlens, b->n_segments + 1);
    in.dropout_seed = 0;
    in.row_offset = 0;
    return in;
}

/* ---- context parallelism ---------------------------------------------------------------------- */

static bool cp_on(const Model *m) { return m->cp && m->cp->size > 1; }

void model_cp_range(const Model *m, int64_t N, int64_t *begin, int64_t *end) {
    if (!cp_on(m)) {
        *begin = 0, *end = N;
        return;
    }
    const int64_t P = m->cp->size;
    if (N % P)
        fatal("context parallelism: a micro-batch of %lld tokens does not split over dist.cp = %lld ranks (each takes "
              "an equal share of the batch_size / dp * seq_len tokens)",
              (long long)N, (long long)P);
    *begin = m->cp->rank * (N / P);
    *end = *begin + N / P;
}

/* Rows [begin, begin + n) of an i32 input tensor: a header in the host arena over the same data. */
static Tensor *input_rows(Engine *e, const Tensor *t, int64_t begin, int64_t n) {
    Tensor *v = arena_alloc(&e->host, sizeof(Tensor));
    *v = *t;
    v->shape[0] = n;
    v->numel = n;
    v->data = (char *)t->data + (size_t)begin * dtype_size(t->dtype);
    v->grad = NULL;
    v->requires_grad = false;
    return v;
}

/* The input this rank's layers see: its share of the tokens, positions and targets (the positions are
 * per token, so RoPE before the exchange is the single-process RoPE), the whole micro-batch's
 * cu_seqlens (attention runs on all tokens after the exchange), and the dropout offset moved to its
 * first token so that every token draws the single-process mask. */
static ModelInput local_input(const Model *m, Engine *e, const ModelInput *in) {
    ModelInput loc = *in;
    if (!cp_on(m)) return loc;
    int64_t begin, end;
    model_cp_range(m, in->tokens->numel, &begin, &end);
    loc.tokens = input_rows(e, in->tokens, begin, end - begin);
    loc.positions = input_rows(e, in->positions, begin, end - begin);
    if (in->targets) loc.targets = input_rows(e, in->targets, begin, end - begin);
    loc.row_offset = in->row_offset + begin;
    return loc;
}

/* What a checkpointed block needs besides its input: lives in the host arena for the micro-step. */
typedef struct BlockClosure {
    Model *m;
    int layer;
    ModelInput in; /* by value: backward may recompute after the caller's ModelInput is gone */
} BlockClosure;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* The parts of a layer's kept forward results: 0 topk, 1 plan, 2 idx_lse, 3 loss */
static void *replay_part(const MsaReplay *rp, int part) {
    size_t off = 0;
    const int64_t bytes[4] = {rp->topk_bytes, rp->plan_bytes, rp->lse_bytes, rp->loss_bytes};
    for (int i = 0; i < part; i++) off += align64((size_t)bytes[i]);
    return (char *)rp->buf + off;
}

/* A checkpointed forward keeps its selection, plan and KL results for the replay (MsaReplay). */
static void replay_keep(const KernelBackend *be, MsaReplay *rp, const Tensor *topk, const Tensor *plan,
                        const Tensor *idx_lse, const Tensor *loss, bool dense) {
    rp->topk_bytes = topk ? (int64_t)tensor_bytes(topk) : 0;
    rp->plan_bytes = plan ? (int64_t)tensor_bytes(plan) : 0;
    rp->lse_bytes = (int64_t)tensor_bytes(idx_lse);
    rp->loss_bytes = (int64_t)tensor_bytes(loss);
    size_t need = align64((size_t)rp->topk_bytes) + align64((size_t)rp->plan_bytes) + align64((size_t)rp->lse_bytes) +
                  align64((size_t)rp->loss_bytes);
    if (need > rp->cap || be != rp->be) {
        if (rp->buf) rp->be->free(rp->buf);
        rp->be = be;
        rp->buf = be->alloc(need);
        rp->cap = need;
    }
    if (topk) be->copy(replay_part(rp, 0), topk->data, (size_t)rp->topk_bytes);
    if (plan) be->copy(replay_part(rp, 1), plan->data, (size_t)rp->plan_bytes);
    be->copy(replay_part(rp, 2), idx_lse->data, (size_t)rp->lse_bytes);
    be->copy(replay_part(rp, 3), loss->data, (size_t)rp->loss_bytes);
    rp->n = idx_lse->shape[1];
    rp->hkv = idx_lse->shape[0];
    rp->dense = dense;
    rp->valid = true;
}

/* The MSA index branch and sparse (or dense warm-up) attention of one layer. h is the attention
 * input; q, k (after norm and RoPE) and v are the main branch's. Returns the attention output and
 * the weighted KL term through *kl. */
static Tensor *msa_attention(Engine *e, Model *m, LayerParams *L, Tensor *h, Tensor *q, Tensor *k, Tensor *v,
                             const ModelInput *in, Tensor **kl) {
    int64_t N = tensor_rows(h), Hkv = m->cfg.n_kv_heads, Di = m->msa_cfg.index_dim;
    float eps = m->cfg.norm_eps;
    /* the indexer reads a detached copy of the hidden state: the KL must never move the backbone */
    Tensor *hd = engine_detach(e, h);
    Tensor *qi = engine_view(e, op_linear(e, hd, L->w_iq), SHAPE(N, Hkv, Di));
    Tensor *ki = engine_view(e, op_linear(e, hd, L->w_ik), SHAPE(N, 1, Di));
    qi = op_rope(e, op_rmsnorm(e, qi, L->iq_norm, eps, true), in->positions, m->index_rotary_dim, m->cfg.rope_theta);
    ki = op_rope(e, op_rmsnorm(e, ki, L->ik_norm, eps, true), in->positions, m->index_rotary_dim, m->cfg.rope_theta);
    ki = engine_view(e, ki, SHAPE(N, Di));
    if (cp_on(m)) {
        /* context parallel (q, k, v arrive head-split): the index heads of this rank's GQA groups over all
         * tokens, and the one index key that every group scores against, gathered whole */
        qi = op_cp_seq_to_heads(e, qi, m->cp);
        ki = op_cp_all_gather(e, ki, m->cp);
        N = qi->shape[0];
        Hkv = qi->shape[1];
    }

    /* the replay of a checkpointed forward (train.recompute) copies what that forward kept instead of
     * running the indexer, the plan and the KL forward again (MsaReplay) */
    MsaReplay *rp = &L->replay;
    const bool reuse = e->recomputing && rp->valid && rp->n == N && rp->hkv == Hkv && rp->dense == m->msa_dense;
    Tensor *topk = NULL, *plan = NULL, *lse = NULL, *out;
    if (m->msa_dense) {
        out = op_attention(e, q, k, v, in->cu_seqlens, m->msa.scale, &lse);
    } else {
        /* no tape ops, but timed as ops of their own when the step profiler is on */
        engine_op_begin(e);
        topk = engine_empty(e, DT_I32, SHAPE(Hkv, N, m->msa.topk_blocks));
        if (reuse) e->be->copy(topk->data, replay_part(rp, 0), tensor_bytes(topk));
        else e->be->msa_indexer(topk, qi, ki, in->cu_seqlens, &m->msa);
        engine_op_end_named(e, "msa_indexer");
        /* the reverse map, built once here and shared by the attention and KL, forward and backward */
        engine_op_begin(e);
        plan = engine_empty(e, DT_I32, SHAPE(Hkv, msa_plan_width(N, m->msa.topk_blocks)));
        if (reuse) e->be->copy(plan->data, replay_part(rp, 1), tensor_bytes(plan));
        else e->be->msa_plan(plan, topk, in->cu_seqlens, &m->msa);
        engine_op_end_named(e, "msa_plan");
        out = op_msa_attention(e, q, k, v, topk, plan, in->cu_seqlens, &m->msa, &lse);
    }
    float w = m->msa_cfg.kl_weight;
    MsaKlForward kf = {0};
    if (reuse) {
        engine_op_begin(e);
        kf.loss = engine_empty(e, stat_dtype(qi->dtype), SHAPE(1));
        kf.idx_lse = engine_empty(e, stat_dtype(qi->dtype), SHAPE(Hkv, N));
        e->be->copy(kf.idx_lse->data, replay_part(rp, 2), tensor_bytes(kf.idx_lse));
        e->be->copy(kf.loss->data, replay_part(rp, 3), tensor_bytes(kf.loss));
        engine_op_end(e, OP_msa_kl);
        rp->valid = false; /* one replay per kept forward */
    }
    *kl = op_msa_kl(e, q, k, lse, qi, ki, topk, plan, in->cu_seqlens, &m->msa, w, &kf);
    if (e->checkpoint_forward) replay_keep(e->be, rp, topk, plan, kf.idx_lse, kf.loss, m->msa_dense);
    if (m->collect_metrics && !e->recomputing) {
        if (w > 0) m->metrics.kl_sum += tensor_item(e, *kl) / w;
        m->metrics.layers++;
        Tensor *sel = topk;
        if (!sel) { /* dense phase: report the recall the sparse selection would have */
            sel = engine_empty(e, DT_I32, SHAPE(Hkv, N, m->msa.topk_blocks));
            e->be->msa_indexer(sel, qi, ki, in->cu_seqlens, &m->msa);
        }
        m->metrics.recall_sum += e->be->msa_recall(q, k, sel, in->cu_seqlens, &m->msa, m->msa_cfg.recall_stride);
        m->metrics.recall_layers++;
    }
    return out;
}

/* Dropout of one site (layer, site) of a [rows, C] activation; a no-op outside training steps. */
static Tensor *model_dropout(Engine *e, const Model *m, const ModelInput *in, Tensor *x, int layer, int site) {
    if (m->cfg.dropout == 0 || in->dropout_seed == 0) return x;
    const int64_t cols = x->numel / tensor_rows(x);
    return op_dropout(e, x, m->cfg.dropout, dropout_seed(in->dropout_seed, 0, (uint64_t)layer, (uint64_t)site),
                      in->row_offset * cols);
}

static Tensor *block_forward(Engine *e, Tensor *x, const void *closure, Tensor **aux) {
    const BlockClosure *bc = closure;
    Model *m = bc->m;
    LayerParams *L = &m->layers[bc->layer];
    const ModelConfig *c = &m->cfg;
    int64_t N = tensor_rows(x), Hq = c->n_heads, Hkv = c->n_kv_heads, D = m->head_dim;
    *aux = NULL;

    Tensor *h = op_rmsnorm(e, x, L->attn_norm, c->norm_eps, false);
    Tensor *q = op_linear(e, h, L->wq), *k = op_linear(e, h, L->wk), *v = op_linear(e, h, L->wv);
    if (L->bq) {
        q = op_bias_add(e, q, L->bq);
        k = op_bias_add(e, k, L->bk);
        v = op_bias_add(e, v, L->bv);
    }
    q = engine_view(e, q, SHAPE(N, Hq, D));
    k = engine_view(e, k, SHAPE(N, Hkv, D));
    v = engine_view(e, v, SHAPE(N, Hkv, D));
    if (c->qk_norm) {
        q = op_rmsnorm(e, q, L->q_norm, c->norm_eps, false);
        k = op_rmsnorm(e, k, L->k_norm, c->norm_eps, false);
    }
    q = op_rope(e, q, bc->in.positions, m->rotary_dim, c->rope_theta);
    k = op_rope(e, k, bc->in.positions, m->rotary_dim, c->rope_theta);
    if (cp_on(m)) { /* this rank's tokens, every head -> every token, this rank's heads (GQA groups whole) */
        q = op_cp_seq_to_heads(e, q, m->cp);
        k = op_cp_seq_to_heads(e, k, m->cp);
        v = op_cp_seq_to_heads(e, v, m->cp);
    }
    Tensor *att = L->msa ? msa_attention(e, m, L, h, q, k, v, &bc->in, aux)
                         : op_attention(e, q, k, v, bc->in.cu_seqlens, m->msa.scale, NULL);
    if (cp_on(m)) att = op_cp_heads_to_seq(e, att, m->cp);
    Tensor *att_out = op_linear(e, engine_view(e, att, SHAPE(N, Hq * D)), L->wo);
    x = op_add(e, x, model_dropout(e, m, &bc->in, att_out, bc->layer, 1));

    Tensor *h2 = op_rmsnorm(e, x, L->ffn_norm, c->norm_eps, false);
    if (L->moe) {
        Tensor *moe_aux = NULL;
        Tensor *f = moe_forward(e, &L->moe_p, &m->moe_cfg, h2, &L->moe_stats, &moe_aux);
        if (moe_aux) *aux = *aux ? op_add(e, *aux, moe_aux) : moe_aux;
        return op_add(e, x, model_dropout(e, m, &bc->in, f, bc->layer, 2));
    }
    Tensor *f = op_swiglu(e, op_linear(e, h2, L->w_gate), op_linear(e, h2, L->w_up));
    return op_add(e, x, model_dropout(e, m, &bc->in, op_linear(e, f, L->w_down), bc->layer, 2));
}

void model_moe_step(Model *m, MoeSummary *summary, bool update_bias) {
    MoeSummary s = {0};
    for (int l = 0; l < m->cfg.n_layers; l++) {
        LayerParams *L = &m->layers[l];
        if (!L->moe) continue;
        if (update_bias) moe_update_bias(&L->moe_p, &m->moe_cfg, &L->moe_stats);
        double mx, mean;
        moe_stats_load(&L->moe_stats, &mx, &mean);
        if (mean > 0 && mx / mean > s.max_over_mean_load) s.max_over_mean_load = mx / mean;
        s.aux_loss += moe_stats_aux_loss(&L->moe_stats) / m->n_moe_layers;
        s.z_loss += moe_stats_z_loss(&L->moe_stats) / m->n_moe_layers;
        moe_stats_reset(&L->moe_stats);
    }
    if (summary) *summary = s;
}

/* The logits of the rows of `in` (already this rank's share under context parallelism). */
static Tensor *logits_of(Model *m, Engine *e, const ModelInput *in, bool recompute, Tensor **aux_out) {
    Tensor *x = model_dropout(e, m, in, op_embedding(e, m->wte, in->tokens), -1, 0);
    Tensor *aux_total = NULL;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        BlockClosure *bc = arena_alloc(&e->host, sizeof(BlockClosure));
        *bc = (BlockClosure){m, l, *in};
        Tensor *aux = NULL;
        /* without gradients every block goes through checkpoint, which releases its intermediates:
         * evaluation and sampling hold one block's activations, not all of them */
        x = recompute || !e->grad_enabled ? op_checkpoint(e, block_forward, bc, x, &aux) : block_forward(e, x, bc, &aux);
        if (aux) aux_total = aux_total ? op_add(e, aux_total, aux) : aux;
    }
    x = op_rmsnorm(e, x, m->final_norm, m->cfg.norm_eps, false);
    if (aux_out) *aux_out = aux_total;
    return op_linear(e, x, m->lm_head);
}

Tensor *model_logits(Model *m, Engine *e, const ModelInput *in, bool recompute, Tensor **aux_out) {
    ModelInput loc = local_input(m, e, in);
    return logits_of(m, e, &loc, recompute, aux_out);
}

ModelLosses model_forward(Model *m, Engine *e, const ModelInput *in, bool recompute) {
    if (!in->targets) fatal("model_forward: the batch has no targets");
    ModelLosses L = {0};
    ModelInput loc = local_input(m, e, in);
    Tensor *logits = logits_of(m, e, &loc, recompute, &L.aux);
    L.lm = op_cross_entropy(e, logits, loc.targets, IGNORE_INDEX);
    L.total = L.aux ? op_add(e, L.lm, L.aux) : L.lm;
    return L;
}
