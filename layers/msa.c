/* The MSA attention layer: the GQA frame, the Index Branch, and the chain selection -> plan -> sparse
 * attention -> KL (msa.h). */
#include "msa.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../kernels/cuda/limits.h"
#include "../kernels/util.h"
#include "rope_scaling.h"

MsaSettings msa_settings(const RunConfig *c) {
    const int D = attention_head_dim(&c->model), Di = c->msa.index_dim;
    return (MsaSettings){
        .params = {.block_size = c->msa.block_size,
                   .topk_blocks = c->msa.topk_blocks,
                   .init_blocks = c->msa.init_blocks,
                   .local_blocks = c->msa.local_blocks,
                   .scale = 1.0f / sqrtf((float)D),
                   .index_scale = 1.0f / sqrtf((float)Di)},
        .kl_weight = c->msa.kl_weight,
        .recall_stride = c->msa.recall_stride,
        .recall_samples = c->msa.recall_samples,
        .index_dim = Di,
    };
}

bool msa_check(const MsaParams *p, const char *kp, char *why, size_t n) {
    if (p->block_size < 1) snprintf(why, n, "%sblock_size = %d must be >= 1", kp, p->block_size);
    else if (p->topk_blocks < 1) snprintf(why, n, "%stopk_blocks = %d must be >= 1", kp, p->topk_blocks);
    else if (p->init_blocks < 0) snprintf(why, n, "%sinit_blocks = %d must be >= 0", kp, p->init_blocks);
    else if (p->local_blocks < 1)
        snprintf(why, n, "%slocal_blocks = %d must be >= 1 (the query's own block is always selected)", kp,
                 p->local_blocks);
    else if (p->topk_blocks < p->init_blocks + p->local_blocks)
        snprintf(why, n, "%stopk_blocks = %d must be >= %sinit_blocks + %slocal_blocks = %d (the forced blocks are part of "
                 "the budget)", kp, p->topk_blocks, kp, kp, p->init_blocks + p->local_blocks);
    else return true;
    return false;
}

/* ---- the replay store ------------------------------------------------------------------------- */

enum { KEPT_TOPK, KEPT_IDX_LSE, KEPT_LOSS };

static void *kept(const MsaReplay *rp, int part) {
    size_t off = 0;
    const int64_t bytes[3] = {rp->topk_bytes, rp->lse_bytes, rp->loss_bytes};
    for (int i = 0; i < part; i++) off += kept_align64((size_t)bytes[i]);
    return (char *)rp->mem.buf + off;
}

/* loss: the KL forward's (NULL when the backward computes the KL: nothing to keep) */
static void keep(const KernelBackend *be, MsaReplay *rp, const MsaAttention *a, const Tensor *idx_lse, const Tensor *loss,
                 bool dense) {
    rp->topk_bytes = a->topk ? (int64_t)tensor_bytes(a->topk) : 0;
    rp->lse_bytes = (int64_t)tensor_bytes(idx_lse);
    rp->loss_bytes = loss ? (int64_t)tensor_bytes(loss) : 0;
    kept_buffer_reserve(&rp->mem, be, kept_align64((size_t)rp->topk_bytes) + kept_align64((size_t)rp->lse_bytes) +
                                          kept_align64((size_t)rp->loss_bytes));
    if (a->topk) be->copy(kept(rp, KEPT_TOPK), a->topk->data, (size_t)rp->topk_bytes);
    be->copy(kept(rp, KEPT_IDX_LSE), idx_lse->data, (size_t)rp->lse_bytes);
    if (loss) be->copy(kept(rp, KEPT_LOSS), loss->data, (size_t)rp->loss_bytes);
    rp->n = idx_lse->shape[1];
    rp->hkv = idx_lse->shape[0];
    rp->dense = dense;
    rp->valid = true;
}

void msa_replay_free(MsaReplay *rp) {
    kept_buffer_free(&rp->mem);
    *rp = (MsaReplay){0};
}

/* ---- the chain -------------------------------------------------------------------------------- */

/* The reverse map of the selection, shared by the attention and the KL, forward and backward; a replay
 * rebuilds it from the kept selection (one pass over the selection, deterministic on both backends) rather
 * than keeping it: it is larger than the selection itself */
static Tensor *plan_of(Engine *e, const MsaParams *p, Tensor *topk, Tensor *cu_seqlens) {
    const int64_t Hkv = topk->shape[0], N = topk->shape[1];
    engine_op_begin(e);
    Tensor *plan = engine_empty(e, DT_I32, SHAPE(Hkv, msa_plan_width(N, p->topk_blocks)));
    BACKEND_REQUIRE(e->be, msa_plan);
    e->be->msa_plan(plan, topk, cu_seqlens, p);
    engine_op_end_named(e, "msa_plan");
    return plan;
}

/* The Top-k selection; when idx_lse is non-NULL the student's normaliser over it into *idx_lse (from a replay's
 * store when it is given); when plan is non-NULL its plan into *plan (none under a split). No tape op, timed under
 * its own name. A fresh selection with idx_lse builds its plan inside the indexer, whose idx_lse pass walks it
 * on the GPU: one plan a layer, not two */
static Tensor *select_blocks(Engine *e, const MsaParams *p, Tensor *qi, Tensor *ki, Tensor *cu_seqlens,
                             const MsaReplay *from, Tensor **idx_lse, Tensor **plan) {
    const int64_t N = qi->shape[0], Hkv = qi->shape[1];
    engine_op_begin(e);
    Tensor *topk = engine_empty(e, DT_I32, SHAPE(Hkv, N, p->topk_blocks)), *built = NULL;
    if (idx_lse) *idx_lse = engine_empty(e, stat_dtype(qi->dtype), SHAPE(Hkv, N));
    if (from) {
        e->be->copy(topk->data, kept(from, KEPT_TOPK), tensor_bytes(topk));
        if (idx_lse) e->be->copy((*idx_lse)->data, kept(from, KEPT_IDX_LSE), tensor_bytes(*idx_lse));
    } else {
        if (plan && idx_lse) built = engine_empty(e, DT_I32, SHAPE(Hkv, msa_plan_width(N, p->topk_blocks)));
        BACKEND_REQUIRE(e->be, msa_indexer);
        e->be->msa_indexer(topk, idx_lse ? *idx_lse : NULL, built, qi, ki, cu_seqlens, p);
    }
    engine_op_end_named(e, "msa_indexer");
    if (plan) *plan = built ? built : plan_of(e, p, topk, cu_seqlens);
    return topk;
}

Tensor *msa_select(Engine *e, const MsaParams *p, Tensor *qi, Tensor *ki, Tensor *cu_seqlens) {
    return select_blocks(e, p, qi, ki, cu_seqlens, NULL, NULL, NULL);
}

/* Is this forward split over the sequence (s->cp of several ranks)? */
static bool split(const MsaSettings *s) { return s->cp && s->cp->size > 1; }

/* The kernels' parameters of this forward: under a split, the queries are this rank's tokens. */
static MsaParams forward_params(const MsaSettings *s) {
    MsaParams p = s->params;
    if (split(s)) p.query_index = s->cp_index;
    return p;
}

/* Every token's keys [N, Hkv, D], detached: the dense teacher of this rank's queries (the KL in the dense
 * warm-up, the recall) reads every earlier key of their documents. */
static Tensor *every_key(Engine *e, const MsaSettings *s, Tensor *k) {
    return op_cp_gather_tokens(e, engine_detach(e, k), s->cp_index, s->cp);
}

/* What the main branch (and the KL's teacher) reads of the selection: k, v themselves, or under a split the
 * K/V rows of the selected blocks fetched from the ranks that hold them, found through p->key_rows (set here) */
static Tensor *fetched(Engine *e, const MsaSettings *s, MsaParams *p, Tensor *k, Tensor *v, Tensor *topk,
                       Tensor *cu_seqlens, Tensor **v_read) {
    if (!split(s)) {
        *v_read = v;
        return k;
    }
    Tensor *key_rows;
    Tensor *k_read = op_cp_fetch_blocks(e, k, v, topk, s->cp_index, cu_seqlens, p->block_size, s->cp, v_read, &key_rows);
    p->key_rows = key_rows;
    return k_read;
}

/* MSA_DUMP_SELECTION=PREFIX, a kernel developer's diagnostic (kernels/cuda/NOTES.md): each inference forward's
 * block selection is written to PREFIX_<n>.bin (n counting from 0 in the process; one process: a file that
 * exists is never overwritten, the run stops naming it), the int64 shape
 * [index heads, queries, topk_blocks] and then the int32 block ids (ascending, -1 padding), for
 * tools/selection_union.py: how many blocks the selections of adjacent queries share decides whether a kernel
 * walking query tiles over the union of their blocks could beat the block-major one. */
static void dump_selection(Engine *e, const Tensor *topk) {
    const char *prefix = getenv("MSA_DUMP_SELECTION");
    if (!prefix || !*prefix) return;
    static int count = 0;
    char path[4096];
    snprintf(path, sizeof path, "%s_%d.bin", prefix, count++);
    int32_t *ids = xmalloc((size_t)(topk->numel > 0 ? topk->numel : 1) * sizeof(int32_t));
    tensor_to_host(e, ids, topk);
    FILE *f = fopen(path, "wbx"); /* exclusive: an earlier run's (or another rank's) file stays as it was */
    if (!f && errno == EEXIST) fatal("MSA_DUMP_SELECTION: %s exists; give a prefix of no earlier dump", path);
    if (!f) fatal("MSA_DUMP_SELECTION: cannot write %s: %s", path, strerror(errno));
    const int64_t shape[3] = {topk->shape[0], topk->shape[1], topk->shape[2]};
    const bool ok = fwrite(shape, sizeof shape, 1, f) == 1 &&
                    fwrite(ids, sizeof(int32_t), (size_t)topk->numel, f) == (size_t)topk->numel;
    if (fclose(f) != 0 || !ok) fatal("MSA_DUMP_SELECTION: writing %s failed", path);
    free(ids);
}

MsaAttention msa_attend(Engine *e, const MsaSettings *s, Tensor *q, Tensor *k, Tensor *v, Tensor *qi, Tensor *ki,
                        Tensor *cu_seqlens, bool dense, Tensor *kl, MsaReplay *rp) {
    const int64_t N = qi->shape[0], Hkv = qi->shape[1];
    MsaParams params = forward_params(s), *p = &params;
    const MsaReplay *from =
        rp && e->recomputing && rp->valid && rp->n == N && rp->hkv == Hkv && rp->dense == dense ? rp : NULL;
    MsaAttention a = {0};
    /* the sparse phase with a backward to come computes the KL there: a checkpointed segment's first
     * forward (its replay records), or a recording forward */
    Tensor *in[5] = {q, k, v, qi, ki};
    a.deferred = !dense && (e->grad_enabled ? engine_wants_grad(e, in, 5) || e->recomputing : e->checkpoint_forward);
    Tensor *teacher_k = k, *v_read;
    if (dense) {
        if (split(s)) {
            a.out = op_cp_ring_attention(e, q, k, v, cu_seqlens, s->cp_index, p->scale, s->cp, &a.lse);
            teacher_k = every_key(e, s, k);
        } else {
            AttentionKept kept;
            a.out = op_attention_kept(e, q, k, v, cu_seqlens, p->scale,
                                      s->kept ? kept_attention_take(s->kept, e, q, &kept) : NULL, &a.lse);
            if (s->kept) kept_attention_keep(s->kept, e, a.out, a.lse);
        }
    } else if (a.deferred) {
        Tensor *idx_lse;
        a.topk = select_blocks(e, p, qi, ki, cu_seqlens, from, &idx_lse, split(s) ? NULL : &a.plan);
        Tensor *k_read = fetched(e, s, p, k, v, a.topk, cu_seqlens, &v_read);
        AttentionKept kept;
        a.out = op_msa_attention_kl(e, q, k_read, v_read, qi, ki, a.topk, a.plan, idx_lse, cu_seqlens, p, s->kl_weight,
                                    kl, s->kept ? kept_attention_take(s->kept, e, q, &kept) : NULL, &a.lse, &a.loss);
        if (s->kept) kept_attention_keep(s->kept, e, a.out, a.lse);
        if (from) rp->valid = false; /* one replay per kept forward */
        if (rp && e->checkpoint_forward) keep(e->be, rp, &a, idx_lse, NULL, dense);
        return a;
    } else {
        a.topk = select_blocks(e, p, qi, ki, cu_seqlens, from, NULL, split(s) ? NULL : &a.plan);
        dump_selection(e, a.topk);
        teacher_k = fetched(e, s, p, k, v, a.topk, cu_seqlens, &v_read);
        a.out = op_msa_attention(e, q, teacher_k, v_read, a.topk, a.plan, cu_seqlens, p, &a.lse);
    }
    MsaKlForward kf = {0};
    if (from) {
        engine_op_begin(e);
        kf.loss = engine_empty(e, stat_dtype(qi->dtype), SHAPE(1));
        kf.idx_lse = engine_empty(e, stat_dtype(qi->dtype), SHAPE(Hkv, N));
        e->be->copy(kf.idx_lse->data, kept(from, KEPT_IDX_LSE), tensor_bytes(kf.idx_lse));
        e->be->copy(kf.loss->data, kept(from, KEPT_LOSS), tensor_bytes(kf.loss));
        engine_op_end(e, OP_msa_kl);
        rp->valid = false; /* one replay per kept forward */
    }
    a.loss = op_msa_kl(e, q, teacher_k, a.lse, qi, ki, a.topk, a.plan, cu_seqlens, p, s->kl_weight, &kf);
    if (kl && kf.kl) e->be->copy(kl->data, kf.kl->data, tensor_bytes(kl));
    if (rp && e->checkpoint_forward) keep(e->be, rp, &a, kf.idx_lse, a.loss, dense);
    return a;
}

int msa_recall_stride(const MsaSettings *s, int64_t n) {
    const int64_t capped = s->recall_samples > 0 ? (n + s->recall_samples - 1) / s->recall_samples : 0;
    const int64_t stride = capped > s->recall_stride ? capped : s->recall_stride;
    return (int)(stride < INT32_MAX ? stride : INT32_MAX);
}

double msa_recall(Engine *e, const MsaSettings *s, Tensor *q, Tensor *k, Tensor *topk, Tensor *qi, Tensor *ki,
                  Tensor *cu_seqlens) {
    const MsaParams p = forward_params(s);
    if (!topk) topk = msa_select(e, &p, qi, ki, cu_seqlens);
    BACKEND_REQUIRE(e->be, msa_recall);
    if (!split(s)) return e->be->msa_recall(q, k, topk, cu_seqlens, &p, msa_recall_stride(s, k->shape[0]));
    Tensor *keys = every_key(e, s, k);
    const int stride = msa_recall_stride(s, keys->shape[0]); /* the whole sequence's: the same on every rank */
    const double mean = e->be->msa_recall(q, keys, topk, cu_seqlens, &p, stride);
    /* the mean over every rank's sampled queries: each rank's sum and count, added up. The tokens live on the
     * engine's device: a host copy (the metric's value has just made the host wait anyway) */
    int32_t *token = xmalloc((size_t)(s->cp_index->numel > 0 ? s->cp_index->numel : 1) * sizeof(int32_t));
    tensor_to_host(e, token, s->cp_index);
    double mine[2] = {0, 0}, *all = xmalloc((size_t)(2 * s->cp->size) * sizeof(double)), sum = 0, count = 0;
    for (int64_t t = 0; t < s->cp_index->numel; t++) mine[1] += token[t] % stride == 0;
    free(token);
    mine[0] = mean * mine[1];
    s->cp->all_gather(s->cp, mine, all, 2, DT_F64, DEV_CPU);
    for (int r = 0; r < s->cp->size; r++) sum += all[2 * r], count += all[2 * r + 1];
    free(all);
    return count > 0 ? sum / count : 1.0;
}

/* ---- the layer -------------------------------------------------------------------------------- */

static Tensor *param(const LayerSetup *s, const char *what, int ndim, const int64_t *shape, InitKind init, float std,
                     bool decay) {
    char name[128];
    snprintf(name, sizeof name, "layers.%d.index.%s", s->layer, what);
    return params_add(s->params, name, ndim, shape, init, std, decay);
}

/* ---- the KL log (msa.h MsaKlLog) --------------------------------------------------------------- */

/* The scalar where forward i's KL goes, as a tensor header in the engine's host arena over the log's
 * device memory. */
static Tensor *kl_slot(const MsaKlLog *log, Engine *e, int i) {
    Tensor *t = arena_alloc(&e->host, sizeof *t);
    memset(t, 0, sizeof *t);
    t->dtype = log->dtype;
    t->device = e->device;
    t->ndim = 1;
    t->shape[0] = t->numel = 1;
    t->data = (char *)log->buf + (size_t)i * dtype_size(log->dtype);
    return t;
}

static void kl_log_free(MsaKlLog *log) {
    if (log->buf) log->be->free(log->buf);
    free(log->deferred);
    free(log->recall);
    free(log->out);
    memset(log, 0, sizeof *log);
}

/* A new forward's slot, zeroed (a value its backward will write stays 0 until then). */
static Tensor *kl_log_add(MsaKlLog *log, Engine *e, DType dt) {
    if (log->be != e->be || log->dtype != dt) {
        kl_log_free(log);
        log->be = e->be;
        log->dtype = dt;
    }
    if (log->n == log->cap) {
        const int cap = log->cap ? 2 * log->cap : 16;
        void *buf = e->be->alloc((size_t)cap * dtype_size(dt));
        if (log->buf) {
            e->be->copy(buf, log->buf, (size_t)log->n * dtype_size(dt));
            e->be->free(log->buf);
        }
        log->buf = buf;
        log->deferred = xrealloc(log->deferred, (size_t)cap * sizeof *log->deferred);
        log->recall = xrealloc(log->recall, (size_t)cap * sizeof *log->recall);
        log->out = xrealloc(log->out, (size_t)cap * sizeof *log->out);
        log->cap = cap;
    }
    const int i = log->n++;
    log->deferred[i] = false;
    log->recall[i] = NAN;
    Tensor *t = kl_slot(log, e, i);
    e->be->zero(t->data, dtype_size(dt));
    return t;
}

static int msa_collect(void *self, const LayerForward **out) {
    MsaLayer *L = self;
    MsaKlLog *log = &L->kl_log;
    const int n = log->n;
    log->n = 0;
    if (!out) return n;
    *out = log->out;
    if (n == 0) return 0;
    const size_t es = dtype_size(log->dtype);
    void *host = xmalloc((size_t)n * es);
    log->be->copy_to_host(host, log->buf, (size_t)n * es);
    const float w = L->settings.kl_weight;
    for (int i = 0; i < n; i++) {
        const bool f64 = log->dtype == DT_F64;
        const double kl = f64 ? ((const double *)host)[i] : (double)((const float *)host)[i];
        LayerForward *r = &log->out[i];
        r->n = 0;
        r->name[r->n] = "kl", r->value[r->n++] = kl;
        if (!isnan(log->recall[i])) r->name[r->n] = "recall", r->value[r->n++] = log->recall[i];
        /* weight * KL as the KL op forms its loss: in the statistics dtype, no product for weight 1 */
        const double wkl = w == 1.0f ? kl : f64 ? (double)w * kl : (double)((float)kl * w);
        r->late_aux = log->deferred[i] ? wkl : 0.0;
    }
    free(host);
    return n;
}

static void msa_declare(void *self, const LayerSetup *s) {
    MsaLayer *L = self;
    attention_declare(&L->frame, s);
    L->settings = msa_settings(s->cfg);
    char why[256];
    if (!msa_check(&L->settings.params, "msa.", why, sizeof why)) fatal("layer %d: %s", s->layer, why);
    const int64_t C = s->cfg->model.d_model, Hkv = L->frame.n_kv_heads, Di = L->settings.index_dim;
    const float std = s->cfg->model.init_std;
    L->index_rotary_dim = L->frame.rotary_dim < Di ? L->frame.rotary_dim : (int)Di;
    /* one index query head per GQA group, one shared index key; Gemma-style norms (gain 1 + w, w
     * zero-initialised) as MiniMax-M3 */
    L->w_iq = param(s, "wq", SHAPE(Hkv * Di, C), INIT_NORMAL, std, true);
    L->w_ik = param(s, "wk", SHAPE(Di, C), INIT_NORMAL, std, true);
    L->iq_norm = param(s, "q_norm", SHAPE(Di), INIT_ZEROS, 0, false);
    L->ik_norm = param(s, "k_norm", SHAPE(Di), INIT_ZEROS, 0, false);
}

/* The index projections of h: qi [N, Hkv, Di], ki [N, Di]; under head-parallel context parallelism the
 * index heads of this rank's GQA groups over every token, and the one index key every group scores
 * against, whole; over the sequence, this rank's queries and every token's index key */
static void index_project(const MsaLayer *L, Engine *e, Tensor *h, const LayerContext *ctx, Tensor **qi_out,
                          Tensor **ki_out) {
    const int64_t N = tensor_rows(h), Hkv = L->frame.n_kv_heads, Di = L->settings.index_dim;
    const float eps = L->frame.norm_eps;
    /* the index branch's RoPE is the model's, scaled the same way, at the index branch's rotary dims */
    const RopeTable *rope = rope_table_in(e, &L->frame.rope, L->index_rotary_dim, ctx->positions_end);
    /* the indexer reads a detached copy of the hidden state: the KL must never move the backbone */
    Tensor *hd = engine_detach(e, h);
    Tensor *qi = engine_view(e, op_linear(e, hd, L->w_iq), SHAPE(N, Hkv, Di));
    Tensor *ki = engine_view(e, op_linear(e, hd, L->w_ik), SHAPE(N, 1, Di));
    qi = op_rope(e, op_rmsnorm(e, qi, L->iq_norm, eps, true), ctx->positions, rope);
    ki = op_rope(e, op_rmsnorm(e, ki, L->ik_norm, eps, true), ctx->positions, rope);
    ki = engine_view(e, ki, SHAPE(N, Di));
    if (attention_cp_heads(ctx)) {
        qi = op_cp_seq_to_heads(e, qi, ctx->cp);
        ki = op_cp_all_gather(e, ki, ctx->cp);
    } else if (ctx->cp_index && ctx->cp->size > 1) { /* over the sequence: this rank's queries, every key */
        ki = op_cp_gather_tokens(e, ki, ctx->cp_index, ctx->cp);
    }
    *qi_out = qi, *ki_out = ki;
}

static Tensor *msa_forward(void *self, Engine *e, Tensor *h, const LayerContext *ctx, Tensor **aux) {
    MsaLayer *L = self;
    Tensor *q, *k, *v, *qi, *ki;
    attention_project(&L->frame, e, h, ctx, &q, &k, &v);
    index_project(L, e, h, ctx, &qi, &ki);
    /* a forward's KL goes to a new slot of the log, its replay's (a checkpointed segment's backward, before
     * the next forward) to the same one */
    MsaKlLog *log = &L->kl_log;
    Tensor *kl = !e->recomputing ? kl_log_add(log, e, stat_dtype(qi->dtype)) : log->n > 0 ? kl_slot(log, e, log->n - 1) : NULL;
    MsaSettings s = L->settings;
    if (ctx->cp_index) s.cp = ctx->cp, s.cp_index = ctx->cp_index;
    s.kept = &L->frame.kept;
    MsaAttention a = msa_attend(e, &s, q, k, v, qi, ki, ctx->cu_seqlens, ctx->dense, kl, &L->replay);
    *aux = a.loss;
    if (!e->recomputing) {
        log->deferred[log->n - 1] = a.deferred;
        if (e->grad_enabled) log->step_deferred = a.deferred;
        if (ctx->metrics && ctx->collect) /* the dense warm-up: the recall the sparse selection would have */
            log->recall[log->n - 1] = msa_recall(e, &s, q, k, a.topk, qi, ki, ctx->cu_seqlens);
    }
    return attention_output(&L->frame, e, a.out, ctx);
}

static bool msa_requires(Device backend, const RunConfig *c, char *why, size_t n) {
    const MsaConfig *a = &c->msa;
    if (a->index_heads != 0 && a->index_heads != c->model.n_kv_heads) {
        snprintf(why, n, "msa.index_heads = %d must be 0 or model.n_kv_heads = %d (one index head per GQA group)",
                 a->index_heads, c->model.n_kv_heads);
        return false;
    }
    if (a->index_dim % 2) {
        snprintf(why, n, "msa.index_dim = %d must be even (RoPE)", a->index_dim);
        return false;
    }
    const MsaSettings s = msa_settings(c);
    if (!msa_check(&s.params, "msa.", why, n) || !attention_requires(backend, c, why, n)) return false;
    if (backend != DEV_CUDA) return true;
    if (a->topk_blocks > CUDA_MSA_TOPK_MAX)
        snprintf(why, n, "msa.topk_blocks = %d is above %d, the most the CUDA indexer selects "
                 "(kernels/cuda/limits.h CUDA_MSA_TOPK_MAX)", a->topk_blocks, CUDA_MSA_TOPK_MAX);
    else if (a->index_dim > CUDA_MSA_INDEX_DIM_MAX)
        snprintf(why, n, "msa.index_dim = %d is above %d, the most the CUDA indexer takes "
                 "(kernels/cuda/limits.h CUDA_MSA_INDEX_DIM_MAX)", a->index_dim, CUDA_MSA_INDEX_DIM_MAX);
    else if (c->model.n_kv_heads > CUDA_MSA_INDEX_HEADS_MAX)
        snprintf(why, n, "model.n_kv_heads = %d (one index head each) is above %d, the most the CUDA indexer takes "
                 "(kernels/cuda/limits.h CUDA_MSA_INDEX_HEADS_MAX)", c->model.n_kv_heads, CUDA_MSA_INDEX_HEADS_MAX);
    else return true;
    return false;
}

/* A training step replayed as a CUDA graph: its forwards wrote their KL values into the first slots of the log
 * on the device, as the captured step's did (a step starts with an empty log, model_drop_collected); the
 * host's records of them are made as those forwards made theirs (deferred as a training forward's, no
 * recall: that is an evaluation's). */
static void msa_replayed(void *self, int forwards, int64_t tokens_per_forward) {
    MsaKlLog *log = &((MsaLayer *)self)->kl_log;
    (void)tokens_per_forward;
    if (forwards > log->cap) fatal("msa: a replayed step of %d forwards, but the KL log holds %d", forwards, log->cap);
    for (int i = 0; i < forwards; i++) {
        log->deferred[i] = log->step_deferred;
        log->recall[i] = NAN;
    }
    log->n = forwards;
}

static void msa_free(void *self) {
    msa_replay_free(&((MsaLayer *)self)->replay);
    kept_attention_free(&((MsaLayer *)self)->frame.kept);
    kl_log_free(&((MsaLayer *)self)->kl_log);
}

const LayerKind attention_msa = {
    .size = sizeof(MsaLayer),
    .requires = msa_requires,
    .declare = msa_declare,
    .forward = msa_forward,
    .collect = msa_collect,
    .replayed = msa_replayed,
    .free = msa_free,
    .learned_selection = true,
};
