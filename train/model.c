#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/dropout_mask.h"
#include "../kernels/util.h"

#define IGNORE_INDEX (-1)

static Tensor *block_norm(Model *m, const char *what, int layer, int64_t C) {
    char name[128];
    snprintf(name, sizeof name, "layers.%d.%s", layer, what);
    return params_add(&m->params, name, SHAPE(C), INIT_ONES, 0, false);
}

void model_build(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed) {
    model_build_ep(m, cfg, be, param_dtype, seed, NULL);
}

void model_build_ep(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed,
                    const Comm *ep) {
    memset(m, 0, sizeof(*m));
    m->cfg = cfg->model;
    m->loss_chunk_tokens = cfg->train.loss_chunk_tokens;
    const ModelConfig *c = &m->cfg;
    const int64_t C = c->d_model, V = c->vocab_size;
    const float std = c->init_std;
    m->ep = ep && ep->size > 1 ? ep : NULL;

    params_init(&m->params, be, param_dtype);
    m->params.no_shadow = !cfg->train.weight_shadow;
    m->wte = params_add(&m->params, "wte", SHAPE(V, C), INIT_NORMAL, std, cfg->optim.decay_embeddings);
    m->layers = xcalloc((size_t)c->n_layers, sizeof(Block));
    for (int l = 0; l < c->n_layers; l++) {
        Block *B = &m->layers[l];
        const LayerSetup s = {.cfg = cfg, .params = &m->params, .layer = l, .ep = m->ep};
        B->attn_norm = block_norm(m, "attn_norm", l, C);
        layer_make(&B->attention, LAYER_ATTENTION, &s);
        B->ffn_norm = block_norm(m, "ffn_norm", l, C);
        layer_make(&B->ffn, LAYER_FFN, &s);
        m->n_msa_layers += B->attention.kind->learned_selection;
        m->n_moe_layers += moe_layer_of(&B->ffn) != NULL;
    }
    m->final_norm = params_add(&m->params, "final_norm", SHAPE(C), INIT_ONES, 0, false);
    m->lm_head = c->tie_embeddings ? m->wte : params_add(&m->params, "lm_head", SHAPE(V, C), INIT_NORMAL, std, true);
    /* the parameters declared late (the routed experts) last: one contiguous region of the store, which
     * expert parallelism reduces over other ranks than the rest (and whose contents differ between the
     * ranks of an ep group) */
    m->first_expert_param = m->params.n;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerSetup s = {.cfg = cfg, .params = &m->params, .layer = l, .ep = m->ep};
        Layer *sub[2] = {&m->layers[l].attention, &m->layers[l].ffn};
        for (int i = 0; i < 2; i++)
            if (sub[i]->kind->declare_late) sub[i]->kind->declare_late(sub[i]->self, &s);
    }
    params_allocate(&m->params, seed);
}

void model_free(Model *m) {
    for (int l = 0; l < m->cfg.n_layers; l++) {
        layer_free(&m->layers[l].attention);
        layer_free(&m->layers[l].ffn);
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
    t->host_data = host; /* the batch outlives the micro-step's tensors */
    return t;
}

ModelInput model_upload(Engine *e, const Batch *b) {
    int64_t N = (int64_t)b->B * b->T;
    /* in this order (the arena's layout): a function's arguments are evaluated in no fixed order */
    Tensor *tokens = upload_i32(e, b->inputs, N);
    Tensor *targets = b->targets ? upload_i32(e, b->targets, N) : NULL;
    Tensor *positions = upload_i32(e, b->positions, N);
    return model_input_over(b, tokens, targets, positions, upload_i32(e, b->cu_seqlens, b->n_segments + 1));
}

ModelInput model_input_over(const Batch *b, Tensor *tokens, Tensor *targets, Tensor *positions, Tensor *cu_seqlens) {
    int64_t N = (int64_t)b->B * b->T;
    ModelInput in;
    in.tokens = tokens;
    in.targets = targets;
    in.positions = positions;
    in.positions_end = 0;
    for (int64_t i = 0; i < N; i++)
        if (b->positions[i] + 1 > in.positions_end) in.positions_end = b->positions[i] + 1;
    in.cu_seqlens = cu_seqlens;
    in.dropout_seeds = NULL;
    in.row_offset = 0;
    in.seq_len = b->T;
    in.cp_index = NULL;
    return in;
}

/* ---- context parallelism ---------------------------------------------------------------------- */

static bool cp_on(const Model *m) { return m->cp && m->cp->size > 1; }

int64_t model_cp_tokens(const Model *m, int64_t N, int64_t seq_len, int32_t *index) {
    const int64_t P = cp_on(m) ? m->cp->size : 1, r = cp_on(m) ? m->cp->rank : 0;
    int64_t n = 0;
    if (!m->cp_sequence || P == 1) {
        if (N % P)
            fatal("context parallelism: a micro-batch of %lld tokens does not split over dist.cp = %lld ranks (each "
                  "takes an equal share of the batch_size / dp * seq_len tokens)",
                  (long long)N, (long long)P);
        for (int64_t i = r * (N / P); i < (r + 1) * (N / P); i++) index[n++] = (int32_t)i;
        return n;
    }
    const int64_t T = seq_len ? seq_len : N, chunk = T / (2 * P);
    if (N % T || T % (2 * P))
        fatal("context parallelism over the sequence: sequences of %lld tokens do not cut into 2 * dist.cp = %lld "
              "equal chunks (each rank takes two of them)",
              (long long)T, (long long)(2 * P));
    for (int64_t row = 0; row < N; row += T) {
        const int64_t chunks[2] = {r, 2 * P - 1 - r};
        for (int c = 0; c < 2; c++)
            for (int64_t i = 0; i < chunk; i++) index[n++] = (int32_t)(row + chunks[c] * chunk + i);
    }
    return n;
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
    if (t->host_data) v->host_data = (const char *)t->host_data + (size_t)begin * dtype_size(t->dtype);
    return v;
}

/* The rows index[0..n) of an i32 input tensor, copied run by run (the zigzag split has two runs per
 * sequence). */
static Tensor *gather_rows(Engine *e, const Tensor *t, const int32_t *index, int64_t n) {
    Tensor *out = engine_empty(e, t->dtype, SHAPE(n));
    const size_t es = dtype_size(t->dtype);
    for (int64_t i = 0, run; i < n; i += run) {
        for (run = 1; i + run < n && index[i + run] == index[i] + run;) run++;
        e->be->copy((char *)out->data + (size_t)i * es, (const char *)t->data + (size_t)index[i] * es, (size_t)run * es);
    }
    return out;
}

/* The input this rank's layers see: its share of the tokens, positions and targets (the positions are
 * per token, so RoPE on this rank is the single-process RoPE), the whole micro-batch's cu_seqlens
 * (attention runs on all tokens after the head exchange, or names them by index in the ring). Heads
 * mode: a contiguous share, and the dropout offset moved to its first token so that every token draws
 * the single-process mask; sequence mode: the zigzag share and its indices (no dropout: the trainer
 * refuses it, one offset cannot place two chunks). */
static ModelInput local_input(const Model *m, Engine *e, const ModelInput *in) {
    ModelInput loc = *in;
    if (!cp_on(m)) return loc;
    const int64_t N = in->tokens->numel;
    int32_t *index = xmalloc((size_t)N * sizeof(int32_t));
    const int64_t n = model_cp_tokens(m, N, in->seq_len, index);
    if (m->cp_sequence) {
        loc.tokens = gather_rows(e, in->tokens, index, n);
        loc.positions = gather_rows(e, in->positions, index, n);
        if (in->targets) loc.targets = gather_rows(e, in->targets, index, n);
        /* kept in the host arena: host_data must outlive the micro-step's tensors, as the batch's does */
        int32_t *kept = arena_alloc(&e->host, (size_t)(n > 0 ? n : 1) * sizeof(int32_t));
        memcpy(kept, index, (size_t)n * sizeof(int32_t));
        loc.cp_index = upload_i32(e, kept, n);
    } else {
        loc.tokens = input_rows(e, in->tokens, index[0], n);
        loc.positions = input_rows(e, in->positions, index[0], n);
        if (in->targets) loc.targets = input_rows(e, in->targets, index[0], n);
        loc.row_offset = in->row_offset + index[0];
    }
    free(index);
    return loc;
}

/* What a checkpointed block needs besides its input: lives in the host arena for the micro-step. */
typedef struct BlockClosure {
    Model *m;
    int layer;
    ModelInput in; /* by value: backward may recompute after the caller's ModelInput is gone */
} BlockClosure;

/* Site (layer, site) of model_dropout as an index into ModelInput.dropout_seeds: the embedding's (-1, 0)
 * first, then each layer's attention (1) and FFN (2) outputs. */
static int dropout_site(int layer, int site) { return layer < 0 ? 0 : 1 + 2 * layer + (site - 1); }

int model_dropout_sites(const Model *m) { return 1 + 2 * m->cfg.n_layers; }

void model_dropout_seeds(const Model *m, uint64_t micro_seed, int32_t *words) {
    for (int layer = -1; layer < m->cfg.n_layers; layer++)
        for (int site = layer < 0 ? 0 : 1; site <= (layer < 0 ? 0 : 2); site++)
            dropout_seed_words(dropout_seed(micro_seed, 0, (uint64_t)layer, (uint64_t)site),
                               words + 2 * dropout_site(layer, site));
}

/* Dropout of one site (layer, site) of a [rows, C] activation; a no-op outside training steps. */
static Tensor *model_dropout(Engine *e, const Model *m, const ModelInput *in, Tensor *x, int layer, int site) {
    if (m->cfg.dropout == 0 || !in->dropout_seeds) return x;
    const int64_t cols = x->numel / tensor_rows(x);
    /* this site's two words, a header in the host arena (the backward reads it within the micro-step) */
    Tensor *seed = arena_alloc(&e->host, sizeof(Tensor));
    *seed = *in->dropout_seeds;
    seed->shape[0] = seed->numel = 2;
    seed->data = (int32_t *)in->dropout_seeds->data + 2 * dropout_site(layer, site);
    seed->host_data = NULL;
    return op_dropout(e, x, m->cfg.dropout, seed, in->row_offset * cols);
}

/* The residual stream between the sublayers: x, plus the branch output not yet added to it (NULL: none),
 * which the next norm adds in the same pass (op_add_rmsnorm: the stream is read once for both). */
typedef struct Residual {
    Tensor *x, *branch;
} Residual;

/* The RMSNorm of the stream (gain w), which takes in the pending branch. */
static Tensor *residual_norm(Engine *e, Residual *s, Tensor *w, float eps) {
    if (!s->branch) return op_rmsnorm(e, s->x, w, eps, false);
    Tensor *y = op_add_rmsnorm(e, s->x, s->branch, w, eps, &s->x);
    s->branch = NULL;
    return y;
}

static Tensor *residual_sum(Engine *e, Residual s) { return s.branch ? op_add(e, s.x, s.branch) : s.x; }

/* Block bc->layer on the stream s, whose FFN output it leaves pending in s: the next block's or the
 * final norm adds it. */
static void block_step(Engine *e, const BlockClosure *bc, Residual *s, Tensor **aux) {
    Model *m = bc->m;
    Block *B = &m->layers[bc->layer];
    const float eps = m->cfg.norm_eps;
    const LayerContext ctx = {.positions = bc->in.positions,
                              .positions_end = bc->in.positions_end,
                              .cu_seqlens = bc->in.cu_seqlens,
                              .cp = m->cp,
                              .cp_index = bc->in.cp_index,
                              .dense = m->msa_dense,
                              .collect = m->collect_metrics,
                              .metrics = &m->metrics};
    Tensor *att_aux = NULL, *ffn_aux = NULL;
    Tensor *att = B->attention.kind->forward(B->attention.self, e, residual_norm(e, s, B->attn_norm, eps), &ctx, &att_aux);
    s->branch = model_dropout(e, m, &bc->in, att, bc->layer, 1);
    Tensor *f = B->ffn.kind->forward(B->ffn.self, e, residual_norm(e, s, B->ffn_norm, eps), &ctx, &ffn_aux);
    s->branch = model_dropout(e, m, &bc->in, f, bc->layer, 2);
    *aux = att_aux && ffn_aux ? op_add(e, att_aux, ffn_aux) : att_aux ? att_aux : ffn_aux;
}

/* A checkpointed block (SegmentFn): one tensor in and out, so its FFN output is added here. */
static Tensor *block_forward(Engine *e, Tensor *x, const void *closure, Tensor **aux) {
    Residual s = {x, NULL};
    block_step(e, closure, &s, aux);
    return residual_sum(e, s);
}

void model_moe_step(Model *m, MoeSummary *summary, bool update_bias) {
    Metrics reported = {0};
    for (int l = 0; l < m->cfg.n_layers; l++) {
        Layer *sub[2] = {&m->layers[l].attention, &m->layers[l].ffn};
        for (int i = 0; i < 2; i++)
            if (sub[i]->kind->step_end) sub[i]->kind->step_end(sub[i]->self, update_bias, summary ? &reported : NULL);
    }
    if (summary) *summary = moe_summary(&reported);
}

double model_collect(Model *m, const Engine *e, Metrics *into) {
    const bool f32 = stat_dtype(e->act_dtype) == DT_F32;
    const int nl = 2 * m->cfg.n_layers;
    const LayerForward **rec = xcalloc((size_t)nl, sizeof *rec);
    int *cnt = xcalloc((size_t)nl, sizeof *cnt), most = 0;
    for (int i = 0; i < nl; i++) {
        Layer *L = i % 2 ? &m->layers[i / 2].ffn : &m->layers[i / 2].attention;
        if (L->kind->collect) cnt[i] = L->kind->collect(L->self, &rec[i]);
        if (cnt[i] > most) most = cnt[i];
    }
    double late = 0;
    for (int f = 0; f < most; f++) {
        double sum = 0; /* this forward's terms, as op_add sums the blocks' losses */
        for (int i = 0; i < nl; i++) {
            if (f >= cnt[i]) continue;
            const LayerForward *r = &rec[i][f];
            if (into)
                for (int s = 0; s < r->n; s++) metrics_add(into, r->name[s], r->value[s]);
            sum = f32 ? (double)(float)(sum + r->late_aux) : sum + r->late_aux;
        }
        late += sum;
    }
    free(rec);
    free(cnt);
    return late;
}

void model_replayed(Model *m, int forwards, int64_t tokens_per_forward) {
    for (int i = 0; i < 2 * m->cfg.n_layers; i++) {
        Layer *L = i % 2 ? &m->layers[i / 2].ffn : &m->layers[i / 2].attention;
        if (L->kind->replayed) L->kind->replayed(L->self, forwards, tokens_per_forward);
    }
}

void model_drop_collected(Model *m) {
    for (int i = 0; i < 2 * m->cfg.n_layers; i++) {
        Layer *L = i % 2 ? &m->layers[i / 2].ffn : &m->layers[i / 2].attention;
        if (L->kind->collect) L->kind->collect(L->self, NULL);
    }
}

/* The final hidden states (after the final norm) of the rows of `in` (already this rank's share under
 * context parallelism). */
static Tensor *hidden_of(Model *m, Engine *e, const ModelInput *in, bool recompute, Tensor **aux_out) {
    if (m->before_block) m->before_block(m->before_block_ctx, -1);
    Residual s = {model_dropout(e, m, in, op_embedding(e, m->wte, in->tokens), -1, 0), NULL};
    Tensor *aux_total = NULL;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        BlockClosure *bc = arena_alloc(&e->host, sizeof(BlockClosure));
        *bc = (BlockClosure){m, l, *in};
        Tensor *aux = NULL;
        if (m->block_tape_start) m->block_tape_start[l] = e->tape_len;
        if (m->before_block) m->before_block(m->before_block_ctx, l);
        /* without gradients every block goes through checkpoint, which releases its intermediates:
         * evaluation and sampling hold one block's activations, not all of them. A block left to the tape
         * leaves its FFN output to the next norm (the add of the previous block's, recorded from here on,
         * writes no gradient of block l - 1's parameters, as Model.block_tape_start asks). */
        if (recompute || !e->grad_enabled) s = (Residual){op_checkpoint(e, block_forward, bc, residual_sum(e, s), &aux), NULL};
        else block_step(e, bc, &s, &aux);
        if (aux) aux_total = aux_total ? op_add(e, aux_total, aux) : aux;
    }
    if (aux_out) *aux_out = aux_total;
    return residual_norm(e, &s, m->final_norm, m->cfg.norm_eps);
}

Tensor *model_logits(Model *m, Engine *e, const ModelInput *in, bool recompute, Tensor **aux_out) {
    ModelInput loc = local_input(m, e, in);
    return op_linear(e, hidden_of(m, e, &loc, recompute, aux_out), m->lm_head);
}

ModelLosses model_forward(Model *m, Engine *e, const ModelInput *in, bool recompute) {
    if (!in->targets) fatal("model_forward: the batch has no targets");
    ModelLosses L = {0};
    ModelInput loc = local_input(m, e, in);
    Tensor *x = hidden_of(m, e, &loc, recompute, &L.aux);
    /* the head and the loss in chunks: the [tokens, vocabulary] logits are never all kept */
    const int64_t chunk = m->loss_chunk_tokens > 0 ? m->loss_chunk_tokens : tensor_rows(x);
    L.lm = op_lm_head_loss(e, x, m->lm_head, loc.targets, IGNORE_INDEX, chunk);
    L.total = L.aux ? op_add(e, L.lm, L.aux) : L.lm;
    return L;
}
