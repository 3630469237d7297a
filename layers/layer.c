/* The registry of layer variants (layers.def), their making, the config check, and Metrics. */
#include "layer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"

#define LAYER(role, name, kind) extern const LayerKind kind;
#include "layers.def"
#undef LAYER

static const struct {
    LayerRole role;
    const char *name;
    const LayerKind *kind;
} KINDS[] = {
#define LAYER(role, name, kind) {LAYER_##role, #name, &kind},
#include "layers.def"
#undef LAYER
};
#define N_KINDS ((int)(sizeof KINDS / sizeof KINDS[0]))

#define NAME_ATTENTION(name) "|" #name
#define NAME_FFN(name)
#define LAYER(role, name, kind) NAME_##role(name)
const char layer_attention_names[] =
#include "layers.def"
    ;
#undef NAME_ATTENTION
#undef NAME_FFN
#define NAME_ATTENTION(name)
#define NAME_FFN(name) "|" #name
const char layer_ffn_names[] =
#include "layers.def"
    ;
#undef LAYER

const LayerKind *layer_kind(LayerRole role, const char *name) {
    for (int i = 0; i < N_KINDS; i++)
        if (KINDS[i].role == role && !strcmp(KINDS[i].name, name)) return KINDS[i].kind;
    return NULL;
}

const LayerKind *layer_kind_of(const RunConfig *c, LayerRole role, int layer) {
    const bool att = role == LAYER_ATTENTION;
    const char *name = att ? config_layer_attention(c, layer) : config_layer_ffn(c, layer);
    const LayerKind *k = layer_kind(role, name);
    if (!k) fatal("model.%s = \"%s\": no such layer variant (layers/layers.def)", att ? "attention" : "ffn", name);
    return k;
}

void layer_make(Layer *L, LayerRole role, const LayerSetup *s) {
    L->kind = layer_kind_of(s->cfg, role, s->layer);
    L->self = xcalloc(1, L->kind->size);
    L->kind->declare(L->self, s);
}

void layer_free(Layer *L) {
    if (!L->kind) return;
    if (L->kind->free) L->kind->free(L->self);
    free(L->self);
    memset(L, 0, sizeof(*L));
}

void layers_require(const RunConfig *c, const char *src) {
    const Device dev = strcmp(c->train.device, "cuda") == 0 ? DEV_CUDA : DEV_CPU;
    const LayerKind *asked[2 * CFG_MAX_LAYERS];
    int n_asked = 0;
    for (int l = 0; l < c->model.n_layers; l++)
        for (int r = 0; r < 2; r++) {
            const LayerKind *k = layer_kind_of(c, r == 0 ? LAYER_ATTENTION : LAYER_FFN, l);
            bool seen = false;
            for (int i = 0; i < n_asked && !seen; i++) seen = asked[i] == k;
            if (seen) continue;
            asked[n_asked++] = k;
            char why[512];
            if (k->requires && !k->requires(dev, c, why, sizeof why)) fatal("%s: %s", src, why);
        }
}

/* ---- Metrics ---------------------------------------------------------------------------------- */

static int metric_index(const Metrics *m, const char *name) {
    for (int i = 0; i < m->n; i++)
        if (!strcmp(m->name[i], name)) return i;
    return -1;
}

void metrics_add(Metrics *m, const char *name, double value) {
    int i = metric_index(m, name);
    if (i < 0) {
        if (m->n == METRICS_MAX) fatal("metrics: more than %d names (adding %s)", METRICS_MAX, name);
        i = m->n++;
        m->name[i] = name;
        m->sum[i] = m->count[i] = 0;
        m->max[i] = value;
    }
    m->sum[i] += value;
    m->count[i] += 1;
    if (value > m->max[i]) m->max[i] = value;
}

double metrics_mean(const Metrics *m, const char *name) {
    int i = metric_index(m, name);
    return i >= 0 && m->count[i] > 0 ? m->sum[i] / m->count[i] : 0.0;
}

double metrics_max(const Metrics *m, const char *name) {
    int i = metric_index(m, name);
    return i >= 0 ? m->max[i] : 0.0;
}

void *kept_buffer_reserve(KeptBuffer *b, const KernelBackend *be, size_t need) {
    if (need > b->cap || be != b->be) {
        if (b->buf) b->be->free(b->buf);
        b->be = be;
        b->buf = be->alloc(need);
        b->cap = need;
    }
    return b->buf;
}

void kept_buffer_free(KeptBuffer *b) {
    if (b->buf) b->be->free(b->buf);
    *b = (KeptBuffer){0};
}
