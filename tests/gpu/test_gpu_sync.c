/* A training step on CUDA without the host waiting for the device (issue 16, issue 14's "no host round
 * trips in an MSA step"): after the first steps have sized every buffer (scratch, plans, arenas, cuDNN
 * and cuBLAS plans), the backend's count of host waits (kernels.def host_waits: copies to the host,
 * synchronisations, frees) must not move over a step that is not logged. A dense model (the cuDNN
 * attention path, which once copied cu_seqlens to the host at every layer), an MSA model in its dense
 * warm-up (whose KL backward once read its upstream gradient on the host) and its sparse phase, and an MoE
 * model (whose routing statistics were read and selection bias uploaded at every forward). A failure
 * names the call site of the last wait (cuda_last_host_wait). With train.cuda_graph = auto (the default) the
 * dense and MoE cases' measured steps are replays of the captured step (train/step_graph.h), which must not
 * wait either.
 * Last, group graph: the captured step against the eager one, bit for bit (cuda_graph_case), and group
 * memory: a run without the BF16 copy of the weights against one with it (weight_shadow_case). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/cuda/cuda.h"
#include "../../train/trainer.h"
#include "gpu_cases.h"

/* r, zeroed and quiet, with the config file and its settings (up to 8, NULL-ended) loaded */
static void quiet_run_config(Run *r, const char *config, const char *const *sets) {
    memset(r, 0, sizeof *r);
    r->quiet = true;
    config_defaults(&r->cfg);
    config_load(&r->cfg, config);
    for (int i = 0; i < 8 && sets[i]; i++) config_set(&r->cfg, sets[i]);
}

void host_waits_case(const void *args) {
    const HostWaitsCase *c = args;
    const char *each = getenv("MSA_CUDA_SYNC");
    if (each && each[0] && strcmp(each, "0") != 0) {
        printf("    host waits per step, %s: not checked (MSA_CUDA_SYNC waits after every launch)\n", c->label);
        return;
    }
    Run r;
    quiet_run_config(&r, c->config, c->sets);
    /* no step logged but the first and the last (train.steps) */
    config_set(&r.cfg, "train.log_every=1000000");
    r.cfg.train.steps = c->warm_steps + c->measured_steps + 1;
    snprintf(r.cfg.train.device, sizeof r.cfg.train.device, "cuda");
    r.config_path = c->config;
    run_init(&r);
    r.defer_step_results = true; /* as run_train on a GPU */
    for (int s = 0; s < c->warm_steps; s++) run_step(&r);
    int64_t worst = 0;
    const char *site = "none";
    bool read = false; /* a step not logged must leave its loss on the device */
    for (int s = 0; s < c->measured_steps; s++) {
        const int64_t before = GB->host_waits();
        StepResult res = run_step(&r);
        const int64_t waits = GB->host_waits() - before;
        if (waits > worst) worst = waits, site = cuda_last_host_wait();
        read |= !isnan(res.loss);
    }
    /* the last step is logged: its loss and norm come to the host, finite */
    StepResult last = run_step(&r);
    char name[160];
    snprintf(name, sizeof name, "host waits per step, %s", c->label);
    record(worst == 0 && !read && isfinite(last.loss) && isfinite(last.grad_norm),
           "%-58s %lld in the worst of %d steps (last at %s)%s; logged step loss %.4f, gnorm %.4f", name,
           (long long)worst, c->measured_steps, site, read ? ", an unlogged step read its loss" : "", last.loss,
           last.grad_norm);
    run_free(&r);
}

/* copy_from_host stages copies of up to 4 MiB through a ring of page-locked memory and returns before the
 * device has them (kernels/cuda/runtime.cu): many copies of mixed sizes, from one host buffer that is
 * overwritten right after each call, around the ring several times (it reuses a region only after the
 * copy that read it has passed), plus one past the ring's limit, must each land as their bytes were at
 * the call. */
void staged_copies_case(const void *args) {
    (void)args;
    enum { COPIES = 300 };
    const size_t big = (size_t)5 << 20;
    size_t size[COPIES + 1], at[COPIES + 2], total = 0;
    for (int i = 0; i <= COPIES; i++) {
        size[i] = i == COPIES ? big : 1 + (size_t)(rng_next(&gpu_check.rng) % (i % 7 == 0 ? 300000 : 5000));
        at[i] = total;
        total += size[i];
    }
    unsigned char *src = xmalloc(big), *want = xmalloc(total), *got = xmalloc(total);
    char *dev = GB->alloc(total);
    const int64_t waits = GB->host_waits();
    for (int i = 0; i <= COPIES; i++) {
        for (size_t b = 0; b < size[i]; b++) src[b] = (unsigned char)(rng_next(&gpu_check.rng) >> 24);
        memcpy(want + at[i], src, size[i]);
        GB->copy_from_host(dev + at[i], src, size[i]);
        memset(src, 0xAB, size[i]); /* the staged copy must not read the caller's buffer after the call */
    }
    const int64_t staged_waits = GB->host_waits() - waits;
    GB->copy_to_host(got, dev, total);
    size_t bad = 0;
    for (size_t b = 0; b < total; b++) bad += got[b] != want[b];
    record(bad == 0, "%-58s %zu of %zu bytes differ; %lld host waits (the %zu-byte copy blocks)",
           "staged copy_from_host, 301 copies around the ring", bad, total, (long long)staged_waits, big);
    GB->free(dev);
    free(src), free(want), free(got);
}

/* train.cuda_graph (train/step_graph.h): the same run with every step eager and with its step captured in
 * a CUDA graph and replayed must give the same losses and gradient norms at every step and the same
 * parameters, AdamW moments and MoE selection biases at the end, and the same MoE line on the last (logged)
 * step, bit for bit (the replay runs the eager step's kernels with the
 * same arguments in the same order; the learning rate and bias corrections, which change every step, come
 * from device memory, as do the dropout seeds). Every step is read (a replayed step reads after its launch).
 * The first steps run eagerly until one frees no memory (arena compaction, scratch growth), so at least half
 * of the steps must be replays. */
enum { MAX_STEPS = 64 };

/* One CUDA run of steps steps of config with sets and setting: its losses and norms, then the parameters and
 * the moments m and v of the whole store (F32) followed by the MoE layers' selection biases (n_state values
 * in all), the MoE line of its last step (logged), and its CUDA graph counts. */
typedef struct {
    double loss[MAX_STEPS], norm[MAX_STEPS];
    float *state;
    int64_t numel, n_state, nodes, replays, captures;
    MoeSummary moe_last;
} TrainOutcome;

static void train_cuda(TrainOutcome *o, const char *config, const char *const *sets, const char *setting, int steps) {
    if (steps > MAX_STEPS) fatal("train_cuda: at most %d steps", MAX_STEPS);
    /* bit for bit needs our own attention kernels: cuDNN's backward sums dQ with atomics (NOTES.md) */
    const char *prev = getenv("MSA_ATTENTION");
    char saved[64] = "";
    if (prev) snprintf(saved, sizeof saved, "%s", prev);
    setenv("MSA_ATTENTION", "own", 1);
    Run r;
    quiet_run_config(&r, config, sets);
    config_set(&r.cfg, setting);
    r.cfg.train.steps = steps;
    snprintf(r.cfg.train.device, sizeof r.cfg.train.device, "cuda");
    r.config_path = config;
    run_init(&r);
    r.defer_step_results = false;
    for (int s = 0; s < steps; s++) {
        StepResult res = run_step(&r);
        o->loss[s] = res.loss;
        o->norm[s] = res.grad_norm;
        o->moe_last = res.moe; /* the last step is logged (train.steps): its MoE line read from the device */
    }
    o->numel = r.model.params.numel;
    int64_t biases = 0;
    for (int l = 0; l < r.model.cfg.n_layers; l++)
        if (moe_layer_of(&r.model.layers[l].ffn)) biases += moe_layer_of(&r.model.layers[l].ffn)->p.num_experts;
    o->n_state = 3 * o->numel + biases;
    o->state = xmalloc((size_t)(o->n_state + 1) * sizeof(float));
    GB->copy_to_host(o->state, r.model.params.data, (size_t)o->numel * sizeof(float));
    GB->copy_to_host(o->state + o->numel, r.opt.m, (size_t)o->numel * sizeof(float));
    GB->copy_to_host(o->state + 2 * o->numel, r.opt.v, (size_t)o->numel * sizeof(float));
    float *bias = o->state + 3 * o->numel;
    for (int l = 0; l < r.model.cfg.n_layers; l++) {
        const MoeLayer *ml = moe_layer_of(&r.model.layers[l].ffn);
        if (!ml) continue;
        moe_bias_to_host(&ml->p, bias);
        bias += ml->p.num_experts;
    }
    o->nodes = r.graph.nodes, o->replays = r.graph.replays, o->captures = r.graph.captures;
    run_free(&r);
    if (prev) setenv("MSA_ATTENTION", saved, 1);
    else unsetenv("MSA_ATTENTION");
}

/* The first step whose loss or norm differ in a bit (-1: none; the last step when only its MoE line differs),
 * and how many state values differ. */
static int first_difference(const TrainOutcome *a, const TrainOutcome *b, int steps, int64_t *bad_state) {
    int first_bad = -1;
    for (int s = 0; s < steps && first_bad < 0; s++)
        if (memcmp(&a->loss[s], &b->loss[s], sizeof(double)) || memcmp(&a->norm[s], &b->norm[s], sizeof(double)))
            first_bad = s;
    if (first_bad < 0 && memcmp(&a->moe_last, &b->moe_last, sizeof a->moe_last)) {
        printf("    the last step's MoE line differs: load max/mean %.17g vs %.17g, aux %.17g vs %.17g, z %.17g vs %.17g\n",
               a->moe_last.max_over_mean_load, b->moe_last.max_over_mean_load, a->moe_last.aux_loss, b->moe_last.aux_loss,
               a->moe_last.z_loss, b->moe_last.z_loss);
        first_bad = steps - 1;
    }
    *bad_state = 0;
    for (int64_t i = 0; i < a->n_state; i++) *bad_state += memcmp(&a->state[i], &b->state[i], sizeof(float)) != 0;
    if (first_bad >= 0)
        printf("    first difference at step %d: loss %.17g vs %.17g, norm %.17g vs %.17g\n", first_bad + 1,
               a->loss[first_bad], b->loss[first_bad], a->norm[first_bad], b->norm[first_bad]);
    return first_bad;
}

void cuda_graph_case(const void *args) {
    const CudaGraphCase *c = args;
    TrainOutcome o[2];
    train_cuda(&o[0], c->config, c->sets, "train.cuda_graph=off", c->steps);
    train_cuda(&o[1], c->config, c->sets, "train.cuda_graph=on", c->steps);
    int64_t bad_state;
    const int first_bad = first_difference(&o[0], &o[1], c->steps, &bad_state);
    char name[160];
    snprintf(name, sizeof name, "cuda graph = eager, %s, %d steps", c->label, c->steps);
    record(first_bad < 0 && bad_state == 0 && o[1].captures >= 1 && 2 * o[1].replays >= c->steps &&
               isfinite(o[1].loss[c->steps - 1]),
           "%-58s %s; %lld of %lld parameter/moment values differ; %lld captures, %lld replays of %lld kernels, copies "
           "and memsets each (1 launch); last loss %.6f vs %.6f",
           name, first_bad < 0 ? "losses and norms bit-exact" : "losses or norms differ", (long long)bad_state,
           (long long)o[0].n_state, (long long)o[1].captures, (long long)o[1].replays, (long long)o[1].nodes,
           o[0].loss[c->steps - 1], o[1].loss[c->steps - 1]);
    free(o[0].state);
    free(o[1].state);
}

/* train.weight_shadow = false: the GEMMs cast each F32 weight into scratch where they read the BF16 copy, the
 * same round-to-nearest-even values as the copy AdamW writes, so the runs agree bit for bit */
void weight_shadow_case(const void *args) {
    const CudaGraphCase *c = args;
    TrainOutcome o[2];
    train_cuda(&o[0], c->config, c->sets, "train.weight_shadow=true", c->steps);
    train_cuda(&o[1], c->config, c->sets, "train.weight_shadow=false", c->steps);
    int64_t bad_state;
    const int first_bad = first_difference(&o[0], &o[1], c->steps, &bad_state);
    char name[160];
    snprintf(name, sizeof name, "no BF16 weight copy = copy, %s, %d steps", c->label, c->steps);
    record(first_bad < 0 && bad_state == 0 && isfinite(o[1].loss[c->steps - 1]),
           "%-58s %s; %lld of %lld parameter/moment values differ; last loss %.6f vs %.6f", name,
           first_bad < 0 ? "losses and norms bit-exact" : "losses or norms differ", (long long)bad_state,
           (long long)o[0].n_state, o[0].loss[c->steps - 1], o[1].loss[c->steps - 1]);
    free(o[0].state);
    free(o[1].state);
}
