/* The dense feed-forward variant: SwiGLU, down(silu(gate(x)) * up(x)) (DESIGN §3). */
#include <math.h>
#include <stdio.h>

#include "../autograd/ops.h"
#include "layer.h"

typedef struct DenseFfn {
    Tensor *w_gate, *w_up; /* [F, C] */
    Tensor *w_down;        /* [C, F] */
    int64_t chunk_tokens;  /* train.ffn_chunk_tokens: 0 = the unfused ops over every row */
} DenseFfn;

static Tensor *param(const LayerSetup *s, const char *what, int64_t rows, int64_t cols, float std) {
    char name[128];
    snprintf(name, sizeof name, "layers.%d.ffn.%s", s->layer, what);
    return params_add(s->params, name, SHAPE(rows, cols), INIT_NORMAL, std, true);
}

static void ffn_declare(void *self, const LayerSetup *s) {
    DenseFfn *f = self;
    const ModelConfig *c = &s->cfg->model;
    const int64_t C = c->d_model, F = c->ffn_dim;
    const float std = c->init_std, out_std = c->init_std / sqrtf(2.0f * (float)c->n_layers);
    f->w_gate = param(s, "w_gate", F, C, std);
    f->w_up = param(s, "w_up", F, C, std);
    f->w_down = param(s, "w_down", C, F, out_std);
    f->chunk_tokens = s->cfg->train.ffn_chunk_tokens;
}

static Tensor *ffn_forward(void *self, Engine *e, Tensor *x, const LayerContext *ctx, Tensor **aux) {
    const DenseFfn *f = self;
    (void)ctx;
    *aux = NULL;
    if (f->chunk_tokens > 0) return op_swiglu_ffn(e, x, f->w_gate, f->w_up, f->w_down, f->chunk_tokens);
    return op_linear(e, op_swiglu(e, op_linear(e, x, f->w_gate), op_linear(e, x, f->w_up)), f->w_down);
}

const LayerKind ffn_dense = {
    .size = sizeof(DenseFfn),
    .declare = ffn_declare,
    .forward = ffn_forward,
};
