#include "trainer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../autograd/ops.h"
#include "../kernels/util.h"

static const KernelBackend *select_backend(const char *device) {
    if (strcmp(device, "cpu") == 0) return &cpu_backend;
#ifdef MSA_CUDA
    if (strcmp(device, "cuda") == 0) return &cuda_backend;
#endif
    fatal("train.device = \"%s\": this build has no CUDA backend (build with nvcc present: make)", device);
}

static void fmt_duration(char *buf, size_t n, double s) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static void open_run_dir(Run *r) {
    const char *dir = r->cfg.train.out_dir;
    if (!dir[0]) return;
    if (mkdir(dir, 0755) != 0) {
        struct stat st;
        if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) fatal("train.out_dir \"%s\": cannot create the directory", dir);
    }
    char path[CFG_STR + 32];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) fatal("%s: cannot write", path);
    char *json = config_to_json(&r->cfg);
    fputs(json, f);
    fclose(f);
    free(json);
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    r->metrics = fopen(path, "w");
    if (!r->metrics) fatal("%s: cannot write", path);
}

void run_init(Run *r) {
    RunConfig *c = &r->cfg;
    const char *src = r->config_path ? r->config_path : "config";
    if (!c->data.train_path[0]) fatal("%s: data.train_path is not set", src);
    if (!c->data.val_path[0]) fatal("%s: data.val_path is not set", src);
    dataset_open(&r->train_ds, c->data.train_path);
    dataset_open(&r->val_ds, c->data.val_path);
    if (r->val_ds.vocab_size != r->train_ds.vocab_size)
        fatal("%s has vocab_size %d but %s has %d", c->data.val_path, r->val_ds.vocab_size, c->data.train_path,
              r->train_ds.vocab_size);
    if (c->model.vocab_size == 0) c->model.vocab_size = r->train_ds.vocab_size;
    else if (c->model.vocab_size < r->train_ds.vocab_size)
        fatal("%s: model.vocab_size = %d but %s has vocab_size %d", src, c->model.vocab_size, c->data.train_path,
              r->train_ds.vocab_size);
    config_validate(c);
    int64_t need = (int64_t)c->train.seq_len + 1;
    if (r->train_ds.n_tokens < need || r->val_ds.n_tokens < need)
        fatal("%s: the data files must hold more than train.seq_len = %d tokens", src, c->train.seq_len);

    r->be = select_backend(c->train.device);
    model_build(&r->model, c, r->be, DT_F32, c->train.seed);
    engine_init(&r->engine, r->be, r->be->device == DEV_CPU ? DT_F32 : DT_BF16, (size_t)64 << 20);
    adamw_init(&r->opt, &r->model.params);
    sampler_init(&r->sampler, &r->train_ds, c->train.seed);
    batch_alloc(&r->batch, c->train.batch_size, c->train.seq_len);
    open_run_dir(r);
    r->step = 0;
    r->t_start = r->t_last = wall_seconds();
    r->tokens_since_log = 0;
    if (!r->quiet) {
        printf("msa-train | %s | %s backend | %lld parameters (%d layers, d_model %d, heads %d/%d, %d MSA layers)\n",
               src, r->be->name, (long long)params_count(&r->model.params, false), c->model.n_layers,
               c->model.d_model, c->model.n_heads, c->model.n_kv_heads, r->model.n_msa_layers);
        printf("data: %s (%lld tokens, vocab %d) | val %s (%lld tokens) | %lld tokens per step\n",
               c->data.train_path, (long long)r->train_ds.n_tokens, r->train_ds.vocab_size, c->data.val_path,
               (long long)r->val_ds.n_tokens,
               (long long)c->train.batch_size * c->train.seq_len * c->train.grad_accum);
    }
}

void run_free(Run *r) {
    if (r->metrics) fclose(r->metrics);
    batch_free(&r->batch);
    adamw_free(&r->opt);
    engine_free(&r->engine);
    model_free(&r->model);
    dataset_close(&r->train_ds);
    dataset_close(&r->val_ds);
}

static void log_step(Run *r, const StepResult *s) {
    const RunConfig *c = &r->cfg;
    double now = wall_seconds(), elapsed = now - r->t_start;
    double tps = r->tokens_since_log / (now - r->t_last);
    double eta = elapsed / r->step * (c->train.steps - r->step);
    char el[32], et[32];
    fmt_duration(el, sizeof el, elapsed);
    fmt_duration(et, sizeof et, eta);
    if (!r->quiet) {
        printf("step %5d/%d | loss %.4f", r->step, c->train.steps, s->loss);
        if (r->model.n_msa_layers) printf(" | kl %.4f%s", s->aux, r->model.msa_dense ? " (dense)" : "");
        if (r->model.n_moe_layers)
            printf(" | load max/mean %.2f | aux %.4f | z %.3f", s->moe.max_over_mean_load, s->moe.aux_loss, s->moe.z_loss);
        printf(" | lr %.2e | gnorm %.3f | %.0f tok/s | %s elapsed | ETA %s\n", s->lr, s->grad_norm, tps, el, et);
        fflush(stdout);
    }
    if (r->metrics) {
        fprintf(r->metrics,
                "{\"step\": %d, \"loss\": %.6f, \"aux\": %.6f, \"lr\": %.6e, \"grad_norm\": %.6f, "
                "\"tokens_per_s\": %.1f, \"elapsed_s\": %.2f, \"moe_max_over_mean_load\": %.4f, "
                "\"moe_aux_loss\": %.6f, \"moe_z_loss\": %.6f}\n",
                r->step, s->loss, s->aux, s->lr, s->grad_norm, tps, elapsed, s->moe.max_over_mean_load, s->moe.aux_loss,
                s->moe.z_loss);
        fflush(r->metrics);
    }
    r->t_last = now;
    r->tokens_since_log = 0;
}

StepResult run_step(Run *r) {
    const RunConfig *c = &r->cfg;
    Engine *e = &r->engine;
    StepResult s = {0};
    r->model.msa_dense = r->step < c->msa.dense_warmup_steps;
    params_zero_grad(&r->model.params);
    for (int micro = 0; micro < c->train.grad_accum; micro++) {
        engine_reset(e);
        sampler_next(&r->sampler, &r->batch);
        ModelInput in = model_upload(e, &r->batch);
        ModelLosses L = model_forward(&r->model, e, &in, c->train.recompute);
        s.loss += tensor_item(e, L.lm) / c->train.grad_accum;
        if (L.aux) s.aux += tensor_item(e, L.aux) / c->train.grad_accum;
        /* the mean over micro-batches: each contributes 1/grad_accum of the gradient */
        engine_backward(e, c->train.grad_accum > 1 ? op_scale(e, L.total, 1.0f / c->train.grad_accum) : L.total);
    }
    s.grad_norm = clip_grad_norm(&r->model.params, c->optim.grad_clip);
    s.lr = lr_schedule(&c->optim, r->step, c->train.steps);
    adamw_step(&r->opt, &r->model.params, &c->optim, s.lr);
    model_moe_step(&r->model, &s.moe, true);
    r->step++;
    r->tokens_since_log += (int64_t)c->train.batch_size * c->train.seq_len * c->train.grad_accum;
    if (!isfinite(s.loss)) fatal("step %d: loss is %f (diverged); lower optim.lr or check the data", r->step, s.loss);
    if (r->step % c->train.log_every == 0 || r->step == 1 || r->step == c->train.steps) log_step(r, &s);
    return s;
}

double run_evaluate(Run *r, MsaMetrics *mm) {
    Engine *e = &r->engine;
    Model *m = &r->model;
    bool prev = engine_set_grad(e, false);
    bool prev_dense = m->msa_dense;
    m->collect_metrics = m->n_msa_layers > 0;
    memset(&m->metrics, 0, sizeof(m->metrics));
    double total = 0.0;
    for (int i = 0; i < r->cfg.train.eval_batches; i++) {
        engine_reset(e);
        sampler_sequential(&r->val_ds, i, &r->batch);
        ModelInput in = model_upload(e, &r->batch);
        ModelLosses L = model_forward(m, e, &in, false);
        total += tensor_item(e, L.lm);
    }
    if (mm) *mm = m->metrics;
    model_moe_step(m, NULL, false); /* eval routing must not feed the next step's bias update */
    m->collect_metrics = false;
    m->msa_dense = prev_dense;
    engine_set_grad(e, prev);
    return total / r->cfg.train.eval_batches;
}

static void log_eval(Run *r, double val_loss, const MsaMetrics *mm) {
    double kl = mm->layers ? mm->kl_sum / mm->layers : 0, recall = mm->recall_layers ? mm->recall_sum / mm->recall_layers : 0;
    if (!r->quiet) {
        printf("eval step %d | val loss %.4f", r->step, val_loss);
        if (mm->layers) printf(" | kl %.4f | recall %.4f", kl, recall);
        printf("\n");
        fflush(stdout);
    }
    if (r->metrics) {
        fprintf(r->metrics, "{\"step\": %d, \"val_loss\": %.6f", r->step, val_loss);
        if (mm->layers) fprintf(r->metrics, ", \"kl\": %.6f, \"recall\": %.6f", kl, recall);
        fprintf(r->metrics, "}\n");
        fflush(r->metrics);
    }
}

double run_train(Run *r) {
    const RunConfig *c = &r->cfg;
    double val = NAN;
    while (r->step < c->train.steps) {
        run_step(r);
        if (r->step == c->train.steps || (c->train.eval_every > 0 && r->step % c->train.eval_every == 0)) {
            MsaMetrics mm;
            val = run_evaluate(r, &mm);
            log_eval(r, val, &mm);
            r->t_last = wall_seconds(); /* keep eval time out of the training throughput */
        }
    }
    double total = wall_seconds() - r->t_start;
    char el[32];
    fmt_duration(el, sizeof el, total);
    if (!r->quiet)
        printf("done: %d steps in %s (%.1f s), final val loss %.4f, %.0f tokens/s overall\n", c->train.steps, el,
               total, val, (double)c->train.batch_size * c->train.seq_len * c->train.grad_accum * c->train.steps / total);
    return val;
}

void run_sample(Run *r) {
    const TokenDataset *ds = &r->train_ds;
    int n = r->cfg.train.sample_tokens, T = r->cfg.train.seq_len;
    bool chars = ds->vocab && strcmp(ds->tokenizer, "char") == 0, bytes = strcmp(ds->tokenizer, "byte") == 0;
    if (n <= 0 || (!chars && !bytes)) return;
    Engine *e = &r->engine;
    bool prev = engine_set_grad(e, false);
    int32_t *ctx = xmalloc((size_t)(n + 1) * sizeof(int32_t));
    /* start from a newline, as nanoGPT's sampler does */
    const char *nl = chars ? strchr(ds->vocab, '\n') : NULL;
    ctx[0] = chars ? (nl ? (int32_t)(nl - ds->vocab) : 0) : '\n';
    Rng rng;
    rng_seed(&rng, r->cfg.train.seed + 7);
    int V = r->model.cfg.vocab_size;
    float *logits = xmalloc((size_t)V * sizeof(float));
    double *probs = xmalloc((size_t)V * sizeof(double)), temp = r->cfg.train.sample_temperature;
    Batch b;
    batch_alloc(&b, 1, T);
    printf("---- sample (%d tokens, temperature %.2f) ----\n", n, temp);
    for (int i = 1; i <= n; i++) {
        int len = i < T ? i : T;
        for (int t = 0; t < len; t++) {
            b.inputs[t] = ctx[i - len + t];
            b.positions[t] = t;
        }
        Batch view = b;
        view.T = len;
        view.targets = NULL;
        view.cu_seqlens[0] = 0;
        view.cu_seqlens[1] = len;
        view.n_segments = 1;
        engine_reset(e);
        ModelInput in = model_upload(e, &view);
        Tensor *lg = model_logits(&r->model, e, &in, false, NULL);
        Tensor last = *lg; /* the last row */
        last.ndim = 1;
        last.shape[0] = last.numel = V;
        last.data = (char *)lg->data + (size_t)(len - 1) * V * dtype_size(lg->dtype);
        tensor_to_host(e, logits, &last);
        double mx = -INFINITY, sum = 0.0;
        for (int v = 0; v < V; v++) mx = fmax(mx, logits[v] / temp);
        for (int v = 0; v < V; v++) sum += probs[v] = exp(logits[v] / temp - mx);
        double u = rng_uniform(&rng) * sum, acc = 0.0;
        int next = V - 1;
        for (int v = 0; v < V; v++)
            if (u < (acc += probs[v])) {
                next = v;
                break;
            }
        ctx[i] = next;
        putchar(chars ? ds->vocab[next] : next);
    }
    printf("\n---- end of sample ----\n");
    batch_free(&b);
    free(probs);
    free(logits);
    free(ctx);
    engine_set_grad(e, prev);
}
