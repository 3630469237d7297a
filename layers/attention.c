/* The GQA attention frame every attention variant shares, and the dense variant: causal softmax
 * attention over every visible key of the document (DESIGN §3). */
#include "attention.h"

#include <math.h>
#include <stdio.h>

#include "../autograd/ops.h"
#include "../kernels/cuda/limits.h"
#include "rope_scaling.h"

bool attention_cp_heads(const LayerContext *ctx) { return ctx->cp && ctx->cp->size > 1 && !ctx->cp_index; }

int attention_head_dim(const ModelConfig *c) { return c->head_dim ? c->head_dim : c->d_model / c->n_heads; }

int attention_rotary_dim(const ModelConfig *c) { return c->rotary_dim ? c->rotary_dim : attention_head_dim(c); }

static Tensor *param(const LayerSetup *s, const char *what, int ndim, const int64_t *shape, InitKind init, float std,
                     bool decay) {
    char name[128];
    snprintf(name, sizeof name, "layers.%d.attn.%s", s->layer, what);
    return params_add(s->params, name, ndim, shape, init, std, decay);
}

void attention_declare(AttentionFrame *f, const LayerSetup *s) {
    const ModelConfig *c = &s->cfg->model;
    f->n_heads = c->n_heads;
    f->n_kv_heads = c->n_kv_heads;
    f->head_dim = attention_head_dim(c);
    f->rotary_dim = attention_rotary_dim(c);
    f->rope = *c;
    f->norm_eps = c->norm_eps;
    f->scale = 1.0f / sqrtf((float)f->head_dim);
    f->kept = (KeptAttention){.enabled = s->cfg->train.keep_attention_outputs};
    const int64_t C = c->d_model, Hq = c->n_heads, Hkv = c->n_kv_heads, D = f->head_dim;
    const float std = c->init_std, out_std = c->init_std / sqrtf(2.0f * (float)c->n_layers);
    f->wq = param(s, "wq", SHAPE(Hq * D, C), INIT_NORMAL, std, true);
    f->wk = param(s, "wk", SHAPE(Hkv * D, C), INIT_NORMAL, std, true);
    f->wv = param(s, "wv", SHAPE(Hkv * D, C), INIT_NORMAL, std, true);
    f->wo = param(s, "wo", SHAPE(C, Hq * D), INIT_NORMAL, out_std, true);
    if (c->qkv_bias) { /* Qwen2-family checkpoints; zero-initialised, never decayed */
        f->bq = param(s, "bq", SHAPE(Hq * D), INIT_ZEROS, 0, false);
        f->bk = param(s, "bk", SHAPE(Hkv * D), INIT_ZEROS, 0, false);
        f->bv = param(s, "bv", SHAPE(Hkv * D), INIT_ZEROS, 0, false);
    }
    if (c->qk_norm) {
        f->q_norm = param(s, "q_norm", SHAPE(D), INIT_ONES, 0, false);
        f->k_norm = param(s, "k_norm", SHAPE(D), INIT_ONES, 0, false);
    }
}

void attention_project(const AttentionFrame *f, Engine *e, Tensor *h, const LayerContext *ctx, Tensor **q_out,
                       Tensor **k_out, Tensor **v_out) {
    const int64_t N = tensor_rows(h), Hq = f->n_heads, Hkv = f->n_kv_heads, D = f->head_dim;
    Tensor *q = op_linear(e, h, f->wq), *k = op_linear(e, h, f->wk), *v = op_linear(e, h, f->wv);
    if (f->bq) {
        q = op_bias_add(e, q, f->bq);
        k = op_bias_add(e, k, f->bk);
        v = op_bias_add(e, v, f->bv);
    }
    q = engine_view(e, q, SHAPE(N, Hq, D));
    k = engine_view(e, k, SHAPE(N, Hkv, D));
    v = engine_view(e, v, SHAPE(N, Hkv, D));
    if (f->q_norm) {
        q = op_rmsnorm(e, q, f->q_norm, f->norm_eps, false);
        k = op_rmsnorm(e, k, f->k_norm, f->norm_eps, false);
    }
    const RopeTable *rope = rope_table_in(e, &f->rope, f->rotary_dim, ctx->positions_end);
    q = op_rope(e, q, ctx->positions, rope);
    k = op_rope(e, k, ctx->positions, rope);
    if (attention_cp_heads(ctx)) { /* this rank's tokens, every head -> every token, this rank's heads */
        q = op_cp_seq_to_heads(e, q, ctx->cp);
        k = op_cp_seq_to_heads(e, k, ctx->cp);
        v = op_cp_seq_to_heads(e, v, ctx->cp);
    }
    *q_out = q, *k_out = k, *v_out = v;
}

Tensor *attention_output(const AttentionFrame *f, Engine *e, Tensor *o, const LayerContext *ctx) {
    if (attention_cp_heads(ctx)) o = op_cp_heads_to_seq(e, o, ctx->cp);
    return op_linear(e, engine_view(e, o, SHAPE(o->shape[0], (int64_t)f->n_heads * f->head_dim)), f->wo);
}

bool attention_requires(Device backend, const RunConfig *c, char *why, size_t n) {
    if (backend != DEV_CUDA) return true;
    const int D = attention_head_dim(&c->model);
    if (D > CUDA_HEAD_DIM_MAX) {
        snprintf(why, n, "the head dimension %d (model.head_dim, or model.d_model / model.n_heads) is above %d, the "
                 "most the CUDA attention kernels take (kernels/cuda/limits.h CUDA_HEAD_DIM_MAX)", D, CUDA_HEAD_DIM_MAX);
        return false;
    }
    if (c->model.n_heads > CUDA_HEADS_MAX) {
        snprintf(why, n, "model.n_heads = %d is above %d, the most the CUDA attention kernels take "
                 "(kernels/cuda/limits.h CUDA_HEADS_MAX)", c->model.n_heads, CUDA_HEADS_MAX);
        return false;
    }
    return true;
}

/* ---- the kept outputs of a checkpointed forward ------------------------------------------------ */

void kept_attention_keep(KeptAttention *ka, Engine *e, const Tensor *out, const Tensor *lse) {
    if (!ka->enabled || !e->checkpoint_forward) return;
    ka->out_bytes = (int64_t)tensor_bytes(out);
    ka->lse_bytes = (int64_t)tensor_bytes(lse);
    char *buf = kept_buffer_reserve(&ka->mem, e->be, kept_align64((size_t)ka->out_bytes) + (size_t)ka->lse_bytes);
    e->be->copy(buf, out->data, (size_t)ka->out_bytes);
    e->be->copy(buf + kept_align64((size_t)ka->out_bytes), lse->data, (size_t)ka->lse_bytes);
    ka->valid = true;
}

const AttentionKept *kept_attention_take(KeptAttention *ka, const Engine *e, const Tensor *q, AttentionKept *into) {
    if (!ka->enabled || !e->recomputing || !ka->valid || ka->mem.be != e->be) return NULL;
    const int64_t N = q->shape[0], Hq = q->shape[1];
    if (ka->out_bytes != (int64_t)tensor_bytes(q) ||
        ka->lse_bytes != Hq * N * (int64_t)dtype_size(stat_dtype(q->dtype)))
        return NULL;
    ka->valid = false; /* one replay per kept forward */
    *into = (AttentionKept){ka->mem.buf, (char *)ka->mem.buf + kept_align64((size_t)ka->out_bytes)};
    return into;
}

void kept_attention_free(KeptAttention *ka) {
    kept_buffer_free(&ka->mem);
    *ka = (KeptAttention){.enabled = ka->enabled};
}

/* ---- the dense variant ------------------------------------------------------------------------ */

static void dense_declare(void *self, const LayerSetup *s) { attention_declare(self, s); }

static Tensor *dense_forward(void *self, Engine *e, Tensor *x, const LayerContext *ctx, Tensor **aux) {
    AttentionFrame *f = self;
    Tensor *q, *k, *v;
    attention_project(f, e, x, ctx, &q, &k, &v);
    *aux = NULL;
    Tensor *o;
    if (ctx->cp_index && ctx->cp->size > 1) {
        o = op_cp_ring_attention(e, q, k, v, ctx->cu_seqlens, ctx->cp_index, f->scale, ctx->cp, NULL);
    } else {
        AttentionKept kept;
        Tensor *lse;
        o = op_attention_kept(e, q, k, v, ctx->cu_seqlens, f->scale, kept_attention_take(&f->kept, e, q, &kept), &lse);
        kept_attention_keep(&f->kept, e, o, lse);
    }
    return attention_output(f, e, o, ctx);
}

static void dense_free(void *self) { kept_attention_free(&((AttentionFrame *)self)->kept); }

const LayerKind attention_dense = {
    .size = sizeof(AttentionFrame),
    .requires = attention_requires,
    .declare = dense_declare,
    .forward = dense_forward,
    .free = dense_free,
};
