/* AdamW optimizer kernel of the CPU backend (fp32 master weights and moments). */
#include "cpu.h"

#define CPU_IMPL "adamw_impl.h"
#include "instantiate.h"

void cpu_adamw_update(Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1, float beta2,
                      float eps, float weight_decay, int t) {
    CPU_SAME_DTYPE("adamw_update", param, grad, m, v);
    CPU_CALL(param, adamw, param->data, grad->data, m->data, v->data, param->numel, lr, beta1, beta2, eps,
             weight_decay, t);
}

void cpu_adamw_update_many(AdamwPart *parts, int n, const Tensor *scale, float beta1, float beta2, float eps, int t) {
    const float grad_scale = scale ? *(const float *)scale->data : 1.0f;
    for (int i = 0; i < n; i++) {
        AdamwPart *q = &parts[i];
        if (grad_scale != 1.0f) cpu_scale(&q->grad, grad_scale);
        cpu_adamw_update(&q->param, &q->grad, &q->m, &q->v, q->lr, beta1, beta2, eps, q->weight_decay, t);
    }
}
