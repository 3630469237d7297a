#include "optim.h"

#include <math.h>
#include <string.h>

#include "../kernels/util.h"

void adamw_init(AdamW *opt, const ParamStore *ps) {
    memset(opt, 0, sizeof(*opt));
    opt->be = ps->be;
    opt->numel = ps->numel;
    size_t bytes = (size_t)ps->numel * dtype_size(ps->dtype);
    opt->m = ps->be->alloc(bytes);
    opt->v = ps->be->alloc(bytes);
    ps->be->zero(opt->m, bytes);
    ps->be->zero(opt->v, bytes);
}

void adamw_free(AdamW *opt) {
    if (opt->m) opt->be->free(opt->m);
    if (opt->v) opt->be->free(opt->v);
    memset(opt, 0, sizeof(*opt));
}

float lr_schedule(const OptimConfig *oc, int step, int total) {
    if (step < oc->warmup_steps) return oc->lr * (float)(step + 1) / (float)oc->warmup_steps;
    int decay_steps = total - oc->warmup_steps;
    if (decay_steps <= 1) return oc->lr;
    double progress = (double)(step - oc->warmup_steps) / (double)(decay_steps - 1);
    if (progress > 1.0) progress = 1.0;
    double cosine = 0.5 * (1.0 + cos(M_PI * progress));
    return (float)(oc->min_lr + (oc->lr - oc->min_lr) * cosine);
}

double grad_global_norm(const ParamStore *ps) {
    double s = 0.0;
    for (int i = 0; i < ps->n; i++)
        if (ps->p[i].t->requires_grad) s += ps->be->sumsq(ps->p[i].t->grad);
    return sqrt(s);
}

double clip_grad_norm(ParamStore *ps, float max_norm) {
    double norm = grad_global_norm(ps);
    if (max_norm > 0 && norm > max_norm) {
        float sc = (float)(max_norm / (norm + 1e-6));
        for (int i = 0; i < ps->n; i++)
            if (ps->p[i].t->requires_grad) ps->be->scale(ps->p[i].t->grad, sc);
    }
    return norm;
}

/* a moment buffer's slice for parameter p, as a tensor of p's shape */
static Tensor moment_view(const ParamStore *ps, const Param *p, void *base) {
    Tensor t = *p->t;
    t.data = (char *)base + (size_t)p->offset * dtype_size(ps->dtype);
    t.grad = NULL;
    t.name = NULL;
    return t;
}

void adamw_step(AdamW *opt, ParamStore *ps, const OptimConfig *oc, float lr) {
    opt->t++;
    for (int i = 0; i < ps->n; i++) {
        Param *p = &ps->p[i];
        if (!p->t->requires_grad) continue;
        Tensor m = moment_view(ps, p, opt->m), v = moment_view(ps, p, opt->v);
        float wd = p->decay ? oc->weight_decay : 0.0f;
        ps->be->adamw_update(p->t, p->t->grad, &m, &v, lr * p->lr_scale, oc->beta1, oc->beta2, oc->eps, wd, opt->t);
    }
}
