/* A checkpoint's model for forward-only programs (inference.h). */
#include "inference.h"

#include <string.h>

#include "../kernels/util.h"
#include "checkpoint.h"

const KernelBackend *backend_for_device(const char *device) {
    if (!strcmp(device, "cpu")) return &cpu_backend;
#ifdef MSA_CUDA
    if (!strcmp(device, "cuda")) return &cuda_backend;
#endif
    fatal("train.device = \"%s\": this build has no CUDA backend (build with nvcc present: make)", device);
}

void inference_open(Inference *inf, const RunConfig *cfg, const char *where, const char *checkpoint) {
    if (cfg->model.vocab_size <= 0)
        fatal("%s: model.vocab_size must be set (there is no training data file to take it from)", where);
    config_validate(cfg);
    inf->be = backend_for_device(cfg->train.device);
    model_build(&inf->model, cfg, inf->be, DT_F32, cfg->train.seed);
    checkpoint_read_params(checkpoint, &inf->model, true);
    engine_init(&inf->engine, inf->be, inf->be->device == DEV_CPU ? DT_F32 : DT_BF16, (size_t)64 << 20);
    engine_set_grad(&inf->engine, false);
}

void inference_close(Inference *inf) {
    engine_free(&inf->engine);
    model_free(&inf->model);
}

float *inference_logits(Inference *inf, const int32_t *tokens, int64_t T, const char *source, Metrics *metrics) {
    const int V = inf->model.cfg.vocab_size;
    if (T < 1 || T > 0x7fffffff) fatal("%s: %lld tokens (1 to 2^31 - 1 make a document)", source, (long long)T);
    for (int64_t t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= V)
            fatal("%s: token %lld is %d, outside the vocabulary [0, %d)", source, (long long)t, tokens[t], V);
    Model *m = &inf->model;
    Engine *e = &inf->engine;
    engine_reset(e);
    Batch b;
    batch_alloc(&b, 1, (int)T);
    memcpy(b.inputs, tokens, (size_t)T * sizeof(int32_t));
    for (int64_t t = 0; t < T; t++) b.positions[t] = (int32_t)t;
    b.cu_seqlens[0] = 0;
    b.cu_seqlens[1] = (int32_t)T;
    b.n_segments = 1;
    Batch view = b;
    view.targets = NULL;
    m->collect_metrics = metrics != NULL;
    memset(&m->metrics, 0, sizeof m->metrics);
    ModelInput in = model_upload(e, &view);
    Tensor *logits = model_logits(m, e, &in, false, NULL);
    float *host = xmalloc((size_t)T * (size_t)V * sizeof(float));
    tensor_to_host_f32(e, host, logits); /* bf16 activations on CUDA */
    /* the layers add some statistics during the forward, the rest arrive with model_collect */
    model_collect(m, e, &m->metrics);
    if (metrics) *metrics = m->metrics;
    m->collect_metrics = false;
    model_moe_step(m, NULL, false); /* nothing of a forward may carry over to the next one */
    batch_free(&b);
    return host;
}
