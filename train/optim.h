/* AdamW with decoupled weight decay over a ParamStore, global-norm gradient clipping, and the
 * linear warm-up + cosine decay schedule. Moments are fp32 buffers shaped like the store. */
#ifndef MSA_OPTIM_H
#define MSA_OPTIM_H

#include "../autograd/params.h"
#include "config.h"

typedef struct AdamW {
    const KernelBackend *be;
    void *m, *v;   /* first and second moments, one allocation each, parameter offsets as the store */
    int64_t numel;
    int t;         /* completed update steps */
} AdamW;

void adamw_init(AdamW *opt, const ParamStore *ps);
void adamw_free(AdamW *opt);
/* Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over warmup_steps,
 * then cosine decay from lr to min_lr at the last step. */
float lr_schedule(const OptimConfig *oc, int step, int total);
/* L2 norm of the gradients of all trainable parameters. */
double grad_global_norm(const ParamStore *ps);
/* Scale gradients so that their global norm is at most max_norm (0 = off). Returns the norm before. */
double clip_grad_norm(ParamStore *ps, float max_norm);
/* One AdamW update of every trainable parameter with learning rate lr * param.lr_scale. */
void adamw_step(AdamW *opt, ParamStore *ps, const OptimConfig *oc, float lr);

#endif
