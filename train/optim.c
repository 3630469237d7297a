#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/grad_clip.h"
#include "../kernels/util.h"

void adamw_init_range(AdamW *opt, const ParamStore *ps, int64_t begin, int64_t end) {
    memset(opt, 0, sizeof(*opt));
    if (begin < 0 || end < begin) fatal("adamw_init_range: bad range [%lld, %lld)", (long long)begin, (long long)end);
    opt->be = ps->be;
    opt->numel = ps->numel;
    opt->begin = begin;
    opt->end = end;
    size_t bytes = (size_t)(end - begin) * dtype_size(ps->dtype);
    opt->m = ps->be->alloc(bytes);
    opt->v = ps->be->alloc(bytes);
    ps->be->zero(opt->m, bytes);
    ps->be->zero(opt->v, bytes);
    opt->schedule = (Tensor){.dtype = DT_F64, .device = ps->be->device, .ndim = 1, .shape = {ADAMW_SCHEDULE},
                             .numel = ADAMW_SCHEDULE};
    opt->schedule.data = ps->be->alloc(ADAMW_SCHEDULE * sizeof(double));
}

void adamw_init(AdamW *opt, const ParamStore *ps) { adamw_init_range(opt, ps, 0, ps->numel); }

void adamw_free(AdamW *opt) {
    if (opt->m) opt->be->free(opt->m);
    if (opt->v) opt->be->free(opt->v);
    if (opt->schedule.data) opt->be->free(opt->schedule.data);
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

/* The part of parameter p inside the store elements [begin, end): *lo and *hi as element indices into
 * the parameter; false when none of it is. */
static bool param_part(const Param *p, int64_t begin, int64_t end, int64_t *lo, int64_t *hi) {
    int64_t a = p->offset > begin ? p->offset : begin, b = p->offset + p->t->numel < end ? p->offset + p->t->numel : end;
    if (a >= b) return false;
    *lo = a - p->offset;
    *hi = b - p->offset;
    return true;
}

/* Elements [lo, hi) of t as a tensor: t itself when that is all of it (so that the unsharded path calls
 * the kernels exactly as before), else a 1-D view (the kernels used on it are elementwise). */
static Tensor part_view(const Tensor *t, int64_t lo, int64_t hi, DType dt) {
    Tensor v = *t;
    v.grad = NULL;
    v.name = NULL;
    if (lo == 0 && hi == t->numel) return v;
    v.ndim = 1;
    v.shape[0] = v.numel = hi - lo;
    v.shape[1] = v.shape[2] = v.shape[3] = 0;
    v.data = (char *)t->data + (size_t)lo * dtype_size(dt);
    if (t->shadow) v.shadow = (char *)t->shadow + (size_t)lo * dtype_size(DT_BF16);
    return v;
}

void grad_sumsq_range(const ParamStore *ps, int64_t begin, int64_t end, Tensor *sum) {
    Tensor *views = xmalloc((size_t)(ps->n ? ps->n : 1) * sizeof(Tensor));
    const Tensor **list = xmalloc((size_t)(ps->n ? ps->n : 1) * sizeof(Tensor *));
    int n = 0;
    int64_t lo, hi;
    for (int i = 0; i < ps->n; i++) {
        const Param *p = &ps->p[i];
        if (!p->t->requires_grad || !param_part(p, begin, end, &lo, &hi)) continue;
        views[n] = part_view(p->t->grad, lo, hi, ps->dtype);
        list[n] = &views[n];
        n++;
    }
    ps->be->sumsq_many(sum, list, n);
    free(list);
    free(views);
}

/* A scalar of dtype dt in the backend's memory, as a tensor header (freed with step_scalar_free). */
Tensor step_scalar(const KernelBackend *be, DType dt) {
    Tensor t = {.dtype = dt, .device = be->device, .ndim = 1, .shape = {1}, .numel = 1};
    t.data = be->alloc(dtype_size(dt));
    be->zero(t.data, dtype_size(dt));
    return t;
}

void step_scalar_free(const KernelBackend *be, Tensor *t) {
    if (t->data) be->free(t->data);
    t->data = NULL;
}

double step_scalar_read(const KernelBackend *be, const Tensor *t) {
    if (t->dtype == DT_F64) {
        double v;
        be->copy_to_host(&v, t->data, sizeof v);
        return v;
    }
    float v;
    be->copy_to_host(&v, t->data, sizeof v);
    return v;
}

double grad_global_norm(const ParamStore *ps) {
    Tensor sum = step_scalar(ps->be, DT_F64);
    grad_sumsq_range(ps, 0, ps->numel, &sum);
    const double norm = sqrt(step_scalar_read(ps->be, &sum));
    step_scalar_free(ps->be, &sum);
    return norm;
}

void grad_scale_range(ParamStore *ps, int64_t begin, int64_t end, float sc) {
    int64_t lo, hi;
    for (int i = 0; i < ps->n; i++) {
        Param *p = &ps->p[i];
        if (!p->t->requires_grad || !param_part(p, begin, end, &lo, &hi)) continue;
        Tensor g = part_view(p->t->grad, lo, hi, ps->dtype);
        ps->be->scale(&g, sc);
    }
}

double clip_grad_norm(ParamStore *ps, float max_norm) {
    double norm = grad_global_norm(ps);
    float sc = clip_factor(norm, max_norm);
    if (sc != 1.0f) grad_scale_range(ps, 0, ps->numel, sc);
    return norm;
}

void adamw_begin_step(AdamW *opt, const OptimConfig *oc, float lr) {
    opt->t++;
    double s[ADAMW_SCHEDULE];
    s[ADAMW_LR] = lr;
    s[ADAMW_BIAS1] = adamw_bias_correction(oc->beta1, opt->t);
    s[ADAMW_BIAS2] = adamw_bias_correction(oc->beta2, opt->t);
    opt->be->copy_from_host(opt->schedule.data, s, sizeof s);
}

void adamw_step(AdamW *opt, ParamStore *ps, const OptimConfig *oc, float lr, const Tensor *grad_scale) {
    adamw_begin_step(opt, oc, lr);
    adamw_update(opt, ps, oc, grad_scale);
}

void adamw_update(AdamW *opt, ParamStore *ps, const OptimConfig *oc, const Tensor *grad_scale) {
    size_t es = dtype_size(ps->dtype);
    AdamwPart *parts = xmalloc((size_t)(ps->n ? ps->n : 1) * sizeof(AdamwPart));
    int n = 0;
    int64_t lo, hi;
    for (int i = 0; i < ps->n; i++) {
        Param *p = &ps->p[i];
        if (!p->t->requires_grad || !param_part(p, opt->begin, opt->end, &lo, &hi)) continue;
        AdamwPart *q = &parts[n++];
        q->param = part_view(p->t, lo, hi, ps->dtype);
        q->grad = part_view(p->t->grad, lo, hi, ps->dtype);
        /* the moments of these elements, at their place in the optimizer's range */
        q->m = q->v = q->param;
        q->m.shadow = q->v.shadow = NULL;
        q->m.data = (char *)opt->m + (size_t)(p->offset + lo - opt->begin) * es;
        q->v.data = (char *)opt->v + (size_t)(p->offset + lo - opt->begin) * es;
        q->lr_scale = p->lr_scale;
        q->weight_decay = p->decay ? oc->weight_decay : 0.0f;
    }
    ps->be->adamw_update_many(parts, n, grad_scale, &opt->schedule, oc->beta1, oc->beta2, oc->eps);
    free(parts);
}
