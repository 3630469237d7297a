/* AdamW optimizer kernel of the CPU backend (fp32 master weights and moments). */
#include "cpu.h"

#define CPU_IMPL "adamw_impl.h"
#include "instantiate.h"

void cpu_adamw_update(Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1, float beta2,
                      float eps, float weight_decay, int t) {
    CPU_SAME_DTYPE("adamw_update", param, grad, m, v);
    CPU_CALL(param, adamw, param->data, grad->data, m->data, v->data, param->numel, lr, beta1, beta2,
             adamw_bias_correction(beta1, t), adamw_bias_correction(beta2, t), eps, weight_decay);
}

void cpu_adamw_update_many(AdamwPart *parts, int n, const Tensor *scale, const Tensor *schedule, float beta1,
                           float beta2, float eps) {
    if (schedule->dtype != DT_F64 || schedule->numel != ADAMW_SCHEDULE)
        fatal("adamw_update_many: the schedule must be f64 [%d] (backend.h ADAMW_SCHEDULE)", ADAMW_SCHEDULE);
    const double *s = schedule->data;
    const float grad_scale = scale ? *(const float *)scale->data : 1.0f, lr = (float)s[ADAMW_LR];
    for (int i = 0; i < n; i++) {
        AdamwPart *q = &parts[i];
        if (grad_scale != 1.0f) cpu_scale(&q->grad, grad_scale);
        CPU_SAME_DTYPE("adamw_update_many", &q->param, &q->grad, &q->m, &q->v);
        CPU_CALL(&q->param, adamw, q->param.data, q->grad.data, q->m.data, q->v.data, q->param.numel, lr * q->lr_scale,
                 beta1, beta2, s[ADAMW_BIAS1], s[ADAMW_BIAS2], eps, q->weight_decay);
    }
}
