/* MoE router kernels of the CPU backend: scores (softmax / sigmoid), Top-k selection with the
 * balancing bias, combine weights, auxiliary balance loss and router z-loss, and the routing statistics
 * with the balancing bias's update. */
#include "cpu.h"

#define CPU_IMPL "moe_router_impl.h"
#include "instantiate.h"

static void check_router(const char *kernel, const Tensor *scores, const Tensor *idx) {
    if (scores->ndim != 2) fatal("cpu %s: scores must be [N, E]", kernel);
    if (idx && (idx->dtype != DT_I32 || idx->ndim != 2 || idx->shape[0] != scores->shape[0]))
        fatal("cpu %s: idx must be i32 [N, k] with N = %lld", kernel, (long long)scores->shape[0]);
    if (idx) {
        const int32_t *id = idx->data;
        for (int64_t i = 0; i < idx->numel; i++)
            if (id[i] < 0 || id[i] >= scores->shape[1])
                fatal("cpu %s: expert index %d outside [0, %lld)", kernel, id[i], (long long)scores->shape[1]);
    }
}

void cpu_moe_scores_forward(Tensor *scores, const Tensor *logits, MoeScoreFunc func) {
    CPU_SAME_DTYPE("moe_scores_forward", logits, scores);
    CPU_CALL(logits, moe_scores_fwd, scores->data, logits->data, tensor_rows(logits), tensor_dim(logits, -1), func);
}

void cpu_moe_scores_backward(Tensor *dlogits, const Tensor *dscores, const Tensor *scores, MoeScoreFunc func) {
    CPU_SAME_DTYPE("moe_scores_backward", scores, dlogits, dscores);
    CPU_CALL(scores, moe_scores_bwd, dlogits->data, dscores->data, scores->data, tensor_rows(scores),
             tensor_dim(scores, -1), func);
}

void cpu_moe_topk(Tensor *idx, const Tensor *scores, const Tensor *bias, int k) {
    check_router("moe_topk", scores, NULL);
    int64_t N = scores->shape[0], E = scores->shape[1];
    if (k < 1 || k > E) fatal("cpu moe_topk: k = %d outside [1, %lld]", k, (long long)E);
    if (idx->dtype != DT_I32 || idx->numel != N * k) fatal("cpu moe_topk: idx must be i32 [%lld, %d]", (long long)N, k);
    if (bias && (bias->dtype != DT_F32 || bias->numel != E)) fatal("cpu moe_topk: bias must be f32 [%lld]", (long long)E);
    const float *b = bias ? bias->data : NULL;
    int64_t bad;
    if (scores->dtype == DT_F64) bad = moe_topk_f64(idx->data, scores->data, b, N, E, k);
    else if (scores->dtype == DT_F32) bad = moe_topk_f32(idx->data, scores->data, b, N, E, k);
    else fatal("cpu moe_topk: dtype %s", dtype_name(scores->dtype));
    if (bad >= 0) fatal("cpu moe_topk: router scores of token %lld are not finite numbers", (long long)bad);
}

void cpu_moe_combine_weights_forward(Tensor *w, const Tensor *scores, const Tensor *idx, bool renormalize, float scale) {
    CPU_SAME_DTYPE("moe_combine_weights_forward", scores, w);
    check_router("moe_combine_weights_forward", scores, idx);
    CPU_CALL(scores, moe_cw_fwd, w->data, scores->data, idx->data, scores->shape[0], scores->shape[1],
             (int)idx->shape[1], renormalize, scale);
}

void cpu_moe_combine_weights_backward(Tensor *dscores, const Tensor *dw, const Tensor *scores, const Tensor *idx,
                                      bool renormalize, float scale) {
    CPU_SAME_DTYPE("moe_combine_weights_backward", scores, dscores, dw);
    check_router("moe_combine_weights_backward", scores, idx);
    CPU_CALL(scores, moe_cw_bwd, dscores->data, dw->data, scores->data, idx->data, scores->shape[0], scores->shape[1],
             (int)idx->shape[1], renormalize, scale);
}

static void check_offsets(const char *kernel, const Tensor *scores, const Tensor *offsets) {
    if (offsets->dtype != DT_I32 || offsets->numel != tensor_dim(scores, -1) + 1)
        fatal("cpu %s: offsets must be i32 [E+1] with E = %lld", kernel, (long long)tensor_dim(scores, -1));
}

void cpu_moe_aux_loss_forward(Tensor *loss, const Tensor *scores, const Tensor *offsets, bool normalize) {
    CPU_SAME_DTYPE("moe_aux_loss_forward", scores, loss);
    check_offsets("moe_aux_loss_forward", scores, offsets);
    CPU_CALL(scores, moe_aux_fwd, loss->data, scores->data, offsets->data, tensor_rows(scores),
             tensor_dim(scores, -1), normalize);
}

void cpu_moe_aux_loss_backward(Tensor *dscores, const Tensor *dloss, const Tensor *scores, const Tensor *offsets,
                               bool normalize) {
    CPU_SAME_DTYPE("moe_aux_loss_backward", scores, dscores, dloss);
    check_offsets("moe_aux_loss_backward", scores, offsets);
    CPU_CALL(scores, moe_aux_bwd, dscores->data, tensor_get(dloss, 0), scores->data, offsets->data,
             tensor_rows(scores), tensor_dim(scores, -1), normalize);
}

void cpu_moe_z_loss_forward(Tensor *loss, Tensor *lse, const Tensor *logits) {
    CPU_SAME_DTYPE("moe_z_loss_forward", logits, loss, lse);
    CPU_CALL(logits, moe_z_fwd, loss->data, lse->data, logits->data, tensor_rows(logits), tensor_dim(logits, -1));
}

void cpu_moe_z_loss_backward(Tensor *dlogits, const Tensor *dloss, const Tensor *logits, const Tensor *lse) {
    CPU_SAME_DTYPE("moe_z_loss_backward", logits, dlogits, dloss, lse);
    CPU_CALL(logits, moe_z_bwd, dlogits->data, tensor_get(dloss, 0), logits->data, lse->data, tensor_rows(logits),
             tensor_dim(logits, -1));
}

/* a loss scalar of f32 or f64 (stat dtype), or NULL */
static double loss_value(const char *what, const Tensor *loss) {
    if (!loss) return 0.0;
    if ((loss->dtype != DT_F32 && loss->dtype != DT_F64) || loss->numel != 1)
        fatal("cpu moe_stats_accumulate: %s must be an f32 or f64 scalar, got %s with %lld elements", what,
              dtype_name(loss->dtype), (long long)loss->numel);
    return tensor_get(loss, 0);
}

void cpu_moe_stats_accumulate(Tensor *acc, const Tensor *offsets, const Tensor *aux_loss, const Tensor *z_loss) {
    const int64_t E = acc->numel - 2;
    if (acc->dtype != DT_F64 || E < 1) fatal("cpu moe_stats_accumulate: acc must be f64 [E+2] with E >= 1");
    if (offsets->dtype != DT_I32 || offsets->numel != E + 1)
        fatal("cpu moe_stats_accumulate: offsets must be i32 [E+1] with E = %lld", (long long)E);
    double *a = acc->data;
    const int32_t *off = offsets->data;
    for (int64_t e = 0; e < E; e++) a[e] += (double)(off[e + 1] - off[e]);
    a[E] += loss_value("aux_loss", aux_loss);
    a[E + 1] += loss_value("z_loss", z_loss);
}

void cpu_moe_bias_update(Tensor *bias, const Tensor *acc, float rate) {
    const int64_t E = bias->numel;
    if (bias->dtype != DT_F32) fatal("cpu moe_bias_update: bias must be f32 [E], got %s", dtype_name(bias->dtype));
    if (acc->dtype != DT_F64 || acc->numel < E)
        fatal("cpu moe_bias_update: acc must be f64 with at least E = %lld loads", (long long)E);
    const double *load = acc->data;
    double sum = 0.0;
    bool any = false;
    for (int64_t e = 0; e < E; e++) {
        sum += load[e];
        any |= load[e] != 0.0;
    }
    if (!any) return; /* nothing routed: no signal to balance */
    const double mean = sum / (double)E;
    float *b = bias->data;
    for (int64_t e = 0; e < E; e++) {
        const double d = mean - load[e];
        b[e] += rate * (float)((d > 0) - (d < 0));
    }
}
