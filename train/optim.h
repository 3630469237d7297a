/* AdamW with decoupled weight decay over a ParamStore, global-norm gradient clipping, and the
 * linear warm-up + cosine decay schedule. Moments are fp32 buffers laid out like the store.
 *
 * Sharding (ZeRO-1, train/trainer.c): an optimizer may own only the elements [begin, end) of the
 * store's flat buffers, its moments then hold just those elements, and the *_range functions work on
 * the parts of the parameters that fall in the range (a parameter may be cut at a shard boundary).
 * Over the whole store, [0, numel), they compute exactly what the unsharded functions compute. */
#ifndef MSA_OPTIM_H
#define MSA_OPTIM_H

#include "../autograd/params.h"
#include "../kernels/grad_clip.h"
#include "config.h"

typedef struct AdamW {
    const KernelBackend *be; /* where m and v live */
    void *m, *v;   /* first and second moments of the store elements [begin, end), one allocation each */
    int64_t numel; /* elements of the store (ParamStore.numel) */
    int64_t begin, end; /* the shard this optimizer updates; [0, numel) unsharded */
    int t;         /* update steps begun (adamw_begin_step) */
    /* the current step's learning rate and bias corrections in the backend's memory (f64 [ADAMW_SCHEDULE],
     * kernels/backend.h), written by adamw_begin_step and read by the update's kernels */
    Tensor schedule;
} AdamW;

/* Moments for the whole store. */
void adamw_init(AdamW *opt, const ParamStore *ps);
/* Moments for the store elements [begin, end) only (end may pass numel: the padding tail has no
 * parameter and is never updated). */
void adamw_init_range(AdamW *opt, const ParamStore *ps, int64_t begin, int64_t end);
void adamw_free(AdamW *opt);
/* Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over warmup_steps,
 * then cosine decay from lr to min_lr at the last step. */
float lr_schedule(const OptimConfig *oc, int step, int total);
/* L2 norm of the gradients of all trainable parameters. */
double grad_global_norm(const ParamStore *ps);
/* Scale gradients so that their global norm is at most max_norm (0 = off). Returns the norm before. */
double clip_grad_norm(ParamStore *ps, float max_norm);
/* sum (an f64 scalar in the store's backend memory, step_scalar) += the sum of squares of the trainable
 * parameters' gradient elements in [begin, end) (a sharded norm is the square root of these sums added
 * over the shards). The host does not wait for the device: it reads sum when it needs the number. */
void grad_sumsq_range(const ParamStore *ps, int64_t begin, int64_t end, Tensor *sum);
/* A zeroed scalar of dtype dt in be's memory (the step's numbers that stay on the device: the gradients'
 * sum of squares, the clipping factor); step_scalar_read copies one to the host (a wait on a GPU). */
Tensor step_scalar(const KernelBackend *be, DType dt);
void step_scalar_free(const KernelBackend *be, Tensor *t);
double step_scalar_read(const KernelBackend *be, const Tensor *t);
/* Multiply the trainable parameters' gradient elements in [begin, end) by sc. */
void grad_scale_range(ParamStore *ps, int64_t begin, int64_t end, float sc);
/* One AdamW update, with learning rate lr * param.lr_scale, of every trainable parameter element in the
 * optimizer's range, after multiplying their gradients by grad_scale (an f32 scalar in the backend's
 * memory: the clipping factor, backend clip_scale; NULL: as they are). One backend call for all of them
 * (adamw_update_many). It is adamw_begin_step, then adamw_update. */
void adamw_step(AdamW *opt, ParamStore *ps, const OptimConfig *oc, float lr, const Tensor *grad_scale);
/* The numbers of the next update (step t + 1, learning rate lr) into opt->schedule: one copy from the host,
 * queued before the step's kernels. Apart from adamw_update so that a training step captured in a CUDA
 * graph, which replays adamw_update's kernels without the host, gets each step's numbers. */
void adamw_begin_step(AdamW *opt, const OptimConfig *oc, float lr);
/* The update of the step begun last (adamw_begin_step), as adamw_step. */
void adamw_update(AdamW *opt, ParamStore *ps, const OptimConfig *oc, const Tensor *grad_scale);

#endif
