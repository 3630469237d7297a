#include "trainer.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "../autograd/ops.h"
#include "../kernels/dropout_mask.h"
#include "../kernels/util.h"
#include "checkpoint.h"
#include "inference.h"
#include "ranks_agree.h"
#include "run_lock.h"

/* The trainer's one global. A signal handler receives only the signal number, so it cannot reach the
 * Run; it sets this flag (the signal number) and nothing else, which is all a handler may safely do,
 * and run_train polls it after every step and before every eval batch to write a checkpoint and stop. */
static volatile sig_atomic_t stop_requested;

static void request_stop(int sig) { stop_requested = sig; }

/* The signals that stop a run with a checkpoint: Ctrl-C, a scheduler's preemption, and a closed terminal
 * or ssh session (SIGHUP, whose default action would end the run without one). */
static const int STOP_SIGNALS[] = {SIGINT, SIGTERM, SIGHUP};
#define N_STOP_SIGNALS ((int)(sizeof STOP_SIGNALS / sizeof STOP_SIGNALS[0]))

static const char *signal_name(int sig) { return sig == SIGINT ? "SIGINT" : sig == SIGHUP ? "SIGHUP" : "SIGTERM"; }

/* The stop signals set stop_requested; SA_RESETHAND gives a second signal its default action (the
 * process dies at once), SA_RESTART keeps a checkpoint write from failing with EINTR. A signal the run was
 * started ignoring stays ignored: `nohup` (SIGHUP) and a shell's background jobs (SIGINT) ask for that. */
static void install_stop_handlers(struct sigaction *old) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = request_stop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | SA_RESTART;
    stop_requested = 0;
    for (int i = 0; i < N_STOP_SIGNALS; i++) {
        sigaction(STOP_SIGNALS[i], NULL, &old[i]);
        if (old[i].sa_handler != SIG_IGN) sigaction(STOP_SIGNALS[i], &sa, NULL);
    }
}

static void restore_stop_handlers(const struct sigaction *old) {
    for (int i = 0; i < N_STOP_SIGNALS; i++) sigaction(STOP_SIGNALS[i], &old[i], NULL);
    stop_requested = 0; /* a later run_evaluate outside run_train must not see this run's stop */
}

/* The signal that stops the run now (0: none). The ranks must stop at the same point (the checkpoint and
 * the eval's collectives are collective): any rank's signal stops all. Collective with several ranks. */
static int agreed_stop_signal(Run *r) {
    int sig = stop_requested;
    if (r->dist->size > 1) dist_all_reduce(&r->dist->world, &sig, 1, DIST_I32, DIST_MAX, DEV_CPU);
    return sig;
}

static void fmt_duration(char *buf, size_t n, double s) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

/* ---- checkpoints in the run directory: out_dir/ckpt_<step>.h5 ------------------------------------ */

/* train.save_best's checkpoint. Its name has no step digits, so list_checkpoints never counts it:
 * keep_checkpoints never deletes it and --resume never picks it (the best weights are rarely the newest
 * state, and resuming from them would repeat steps with another data position). */
#define BEST_CHECKPOINT "ckpt_best.h5"

static void checkpoint_file(char *buf, size_t n, const char *dir, int step) {
    snprintf(buf, n, "%s/ckpt_%08d.h5", dir, step);
}

static void best_checkpoint_file(char *buf, size_t n, const char *dir) { snprintf(buf, n, "%s/" BEST_CHECKPOINT, dir); }

static bool best_checkpoint_exists(const char *dir) {
    char path[CFG_STR + 32];
    best_checkpoint_file(path, sizeof path, dir);
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* The step of a file name "ckpt_<digits>.h5" (suffix "" ) or "ckpt_<digits>.h5.tmp" (suffix ".tmp"); -1
 * for any other name. */
static long checkpoint_step_of(const char *name, const char *suffix) {
    if (strncmp(name, "ckpt_", 5) != 0) return -1;
    size_t digits = strspn(name + 5, "0123456789");
    if (digits == 0 || digits > 9 || strncmp(name + 5 + digits, ".h5", 3) != 0 || strcmp(name + 8 + digits, suffix) != 0)
        return -1;
    return strtol(name + 5, NULL, 10);
}

static int compare_int(const void *a, const void *b) {
    return (*(const int *)a > *(const int *)b) - (*(const int *)a < *(const int *)b);
}

/* Steps of the complete checkpoints in dir, ascending (malloc'd; *n of them). Half-written files
 * (ckpt_<step>.h5.tmp, left by a crash mid-write) are never counted: only a finished write is renamed
 * to ckpt_<step>.h5. Nor is ckpt_best.h5 (no step in its name). */
static int *list_checkpoints(const char *dir, int *n) {
    *n = 0;
    int cap = 16, *steps = xmalloc((size_t)cap * sizeof(int));
    DIR *d = opendir(dir);
    if (!d) return steps;
    for (struct dirent *e; (e = readdir(d));) {
        long step = checkpoint_step_of(e->d_name, "");
        if (step < 0 || step > INT_MAX) continue;
        if (*n == cap) steps = xrealloc(steps, (size_t)(cap *= 2) * sizeof(int));
        steps[(*n)++] = (int)step;
    }
    closedir(d);
    qsort(steps, (size_t)*n, sizeof(int), compare_int);
    return steps;
}

/* After the checkpoint of this step was written and verified (checkpoint_write): keep it and the newest
 * keep_checkpoints - 1 before it (0 = all), and drop the debris of crashed writes. Checkpoints of later
 * steps are ones --resume skipped because they do not verify: they count for nothing, so they never
 * push a good one out, and are left for the run to overwrite when it gets there (or the user to look at). */
static void prune_checkpoints(const Run *r) {
    const char *dir = r->cfg.train.out_dir;
    char path[CFG_STR + 300]; /* the directory and a d_name of up to 255 bytes */
    int n, *steps = list_checkpoints(dir, &n), keep = r->cfg.train.keep_checkpoints, older = 0;
    while (older < n && steps[older] < r->step) older++;
    for (int i = 0; keep > 0 && i < older - (keep - 1); i++) {
        checkpoint_file(path, sizeof path, dir, steps[i]);
        if (unlink(path) != 0 && errno != ENOENT)
            fprintf(stderr, "warning: %s: cannot delete (%s)\n", path, strerror(errno));
    }
    free(steps);
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));)
        if (checkpoint_step_of(e->d_name, ".tmp") >= 0 || !strcmp(e->d_name, BEST_CHECKPOINT ".tmp")) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
    if (d) closedir(d);
}

/* ---- data parallel with ZeRO-1 ------------------------------------------------------------------ */

/* The ranks that hold the same parameters, data and context parallel (dp * cp; context parallelism
 * splits tokens, not weights): ZeRO-1 shards the optimizer state over them and sums their gradients.
 * With expert parallelism: the ranks that hold the same routed experts (init_optimizer). */
static const DistGroup *zero_group(const Run *r) { return &r->dist->dp_cp_group; }
/* Every rank computes a share of the global batch (dp and ep: rows, cp: the tokens of those rows), so the
 * losses and statistics of a step are recombined over all of them. */
static const DistGroup *batch_group(const Run *r) { return &r->dist->world; }
/* Every rank as a group whose collectives may run on the backend's memory: the world has a device
 * communicator of its own only under expert parallelism (dist/nccl.c); without it the dp * cp group is
 * every rank, rank 0 first. */
static const DistGroup *world_in_memory(const Run *r) { return r->dist->ep > 1 ? &r->dist->world : &r->dist->dp_cp_group; }
static bool is_rank0(const Run *r) { return r->dist->rank == 0; }
/* The dp * ep ranks of a cp index take different sequences (rows) of every micro-batch (expert-parallel
 * ranks are data parallel for everything but the routed experts), in the order (dp index, ep index), so
 * that their rows tile the single process's batch in order. */
static int row_rank(const Run *r) { return r->dist->dp_group.rank * r->dist->ep + r->dist->ep_group.rank; }
static AdamW *region_opt(Run *r, int i) { return i == 0 ? &r->opt : &r->opt_experts; }
/* Rank 0 of its ZeRO regions' groups: rank 0, and with expert parallelism the other ranks of rank 0's ep
 * group (dp and cp index 0), where the moments of their ep index's experts gather for a checkpoint. */
static bool store_root(const Run *r) { return r->dist->dp_group.rank == 0 && r->dist->cp_group.rank == 0; }

/* The parameters are every rank's updated ones: the all-gathers of the last update's buckets are done (the
 * next forward, an evaluation, a checkpoint or sampling reads them). */
static void params_current(Run *r) { grad_buckets_gather_finish(&r->buckets); }

/* A whole-store optimizer in host memory (the CPU backend's), for rank 0 to write or read a checkpoint
 * of a sharded run: moments laid out as the store, padding included, so that the ranks' shards gather
 * into it and scatter out of it as they are. */
static AdamW host_optimizer(const Run *r, float *m, float *v) {
    const ParamStore *ps = &r->model.params;
    return (AdamW){.be = &cpu_backend, .m = m, .v = v, .numel = ps->numel, .begin = 0, .end = ps->numel, .t = r->opt.t};
}

/* The moment shards of region i (device or host) into one host buffer laid out as the store, on rank 0 of
 * the region's group (full is NULL on the others). */
static void gather_moment(Run *r, int i, const void *shard, float *full) {
    const ZeroRegion *z = &r->zero[i];
    float *host = xmalloc((size_t)z->shard * sizeof(float));
    region_opt(r, i)->be->copy_to_host(host, shard, (size_t)z->shard * sizeof(float));
    dist_gather_host(z->group, host, full ? full + z->begin : NULL, z->shard, DIST_F32, 0);
    free(host);
}

/* Inverse of gather_moment: each rank's shard of region i of the root's whole-store host buffer. */
static void scatter_moment(Run *r, int i, const float *full, void *shard) {
    const ZeroRegion *z = &r->zero[i];
    float *host = xmalloc((size_t)z->shard * sizeof(float));
    dist_scatter_host(z->group, full ? full + z->begin : NULL, host, z->shard, DIST_F32, 0);
    region_opt(r, i)->be->copy_from_host(shard, host, (size_t)z->shard * sizeof(float));
    free(host);
}

/* ---- expert parallelism: checkpoints hold every expert -------------------------------------------
 * A checkpoint holds all E experts of every MoE layer, whatever dist.ep wrote it, so that it loads under
 * any other. With dist.ep > 1 the ranks of rank 0's ep group (the store roots) hold every expert
 * between them: rank 0 builds the whole model in host memory, in the single-process layout (the
 * image), they gather their slices of each expert tensor into it (rank i's El experts are rows
 * [i * El, (i + 1) * El), so the gather's rank order is the tensor's) or are scattered theirs from it,
 * and rank 0 writes or reads the image with the ordinary checkpoint functions. The image costs rank 0
 * host memory for the whole model and its moments, as the gathered moments of ZeRO-1 already do. */

typedef struct Image {
    Model model;  /* host, f32, every expert */
    float *m, *v; /* its AdamW moments, laid out as its store (NULL: parameters only) */
    AdamW opt;
} Image;

static void image_init(const Run *r, Image *im, bool moments) {
    memset(im, 0, sizeof(*im));
    model_build(&im->model, &r->cfg, &cpu_backend, DT_F32, r->cfg.train.seed);
    const ParamStore *ps = &im->model.params;
    if (moments) {
        im->m = xcalloc((size_t)ps->numel, sizeof(float));
        im->v = xcalloc((size_t)ps->numel, sizeof(float));
    }
    im->opt = (AdamW){.be = &cpu_backend, .m = im->m, .v = im->v, .numel = ps->numel, .begin = 0, .end = ps->numel,
                      .t = r->opt.t};
}

static void image_free(Image *im) {
    model_free(&im->model);
    free(im->m);
    free(im->v);
}

static int64_t max_param_numel(const ParamStore *ps) {
    int64_t mx = 1;
    for (int i = 0; i < ps->n; i++) mx = ps->p[i].t->numel > mx ? ps->p[i].t->numel : mx;
    return mx;
}

/* Store roots: this rank's parameters (and with m set, the whole-store host moments m, v of its ep index)
 * into rank 0's image im (NULL on the others): the tensors every rank holds from rank 0, the expert slices
 * from every rank of the ep group. */
static void to_image(Run *r, Image *im, const float *m, const float *v) {
    const ParamStore *ps = &r->model.params;
    const DistGroup *ep = &r->dist->ep_group;
    float *buf = xmalloc((size_t)max_param_numel(ps) * sizeof(float));
    for (int i = 0; i < ps->n; i++) {
        const Param *p = &ps->p[i], *q = im ? &im->model.params.p[i] : NULL;
        if (q && strcmp(p->t->name, q->t->name)) fatal("checkpoint image: %s vs %s", p->t->name, q->t->name);
        const bool expert = i >= r->model.first_expert_param;
        const size_t bytes = (size_t)p->t->numel * sizeof(float);
        for (int k = 0; k < (m ? 3 : 1); k++) { /* the values, then the two moments */
            const float *src = k == 0 ? buf : (k == 1 ? m : v) + p->offset;
            float *dst = !q ? NULL : k == 0 ? q->t->data : (k == 1 ? im->m : im->v) + q->offset;
            if (k == 0) ps->be->copy_to_host(buf, p->t->data, bytes);
            if (expert) dist_gather_host(ep, src, dst, p->t->numel, DIST_F32, 0);
            else if (dst) memcpy(dst, src, bytes);
        }
    }
    free(buf);
    for (int l = 0; im && l < r->model.cfg.n_layers; l++) { /* the biases are the same on every rank */
        const MoeLayer *from = moe_layer_of(&r->model.layers[l].ffn);
        if (from) /* the image is host memory (a CPU model): its bias's data too */
            moe_bias_to_host(&from->p, moe_layer_of(&im->model.layers[l].ffn)->p.bias->data);
    }
}

/* Inverse of to_image: rank 0 takes every tensor of the image but the experts, each store root its
 * experts' slices (and with m set, their moments into the whole-store host buffers m, v). The other ranks
 * get theirs from sync_from_rank0 and the moment scatter. */
static void from_image(Run *r, const Image *im, float *m, float *v) {
    ParamStore *ps = &r->model.params;
    const DistGroup *ep = &r->dist->ep_group;
    float *buf = xmalloc((size_t)max_param_numel(ps) * sizeof(float));
    for (int i = 0; i < ps->n; i++) {
        const Param *p = &ps->p[i], *q = im ? &im->model.params.p[i] : NULL;
        if (q && strcmp(p->t->name, q->t->name)) fatal("checkpoint image: %s vs %s", p->t->name, q->t->name);
        const bool expert = i >= r->model.first_expert_param;
        const size_t bytes = (size_t)p->t->numel * sizeof(float);
        for (int k = 0; k < (m ? 3 : 1); k++) {
            const float *src = !q ? NULL : k == 0 ? q->t->data : (k == 1 ? im->m : im->v) + q->offset;
            float *dst = k == 0 ? buf : (k == 1 ? m : v) + p->offset;
            if (expert) dist_scatter_host(ep, src, dst, p->t->numel, DIST_F32, 0);
            else if (src) memcpy(dst, src, bytes);
            else continue;
            if (k == 0) ps->be->copy_from_host(p->t->data, buf, bytes);
        }
    }
    free(buf);
    params_sync_shadow(ps);
    for (int l = 0; im && l < r->model.cfg.n_layers; l++) {
        MoeLayer *to = moe_layer_of(&r->model.layers[l].ffn);
        if (to) moe_bias_from_host(&to->p, moe_layer_of(&im->model.layers[l].ffn)->p.bias->data);
    }
}

/* The run's whole state now into the checkpoint file `path` (atomically, checkpoint_write), whatever its
 * name: ckpt_<step>.h5 and ckpt_best.h5 alike. Collective: every rank calls it, rank 0 writes. */
static void write_checkpoint(Run *r, const char *path) {
    params_current(r);
    TrainState st = {.step = r->step, .data_counter = r->sampler.counter, .seed = r->sampler.seed,
                     .best_val_loss = r->best_val_loss, .first_val_loss = r->first_val_loss};
    const ParamStore *ps = &r->model.params;
    /* a sharded optimizer: the moments of each region gather, unsharded, on rank 0 of its group (rank 0,
     * and for the experts of each ep index the store root of that index) and are written whole, so the
     * checkpoint loads on any number of ranks; the parameters are whole on every rank already (but for
     * the experts, which the image gathers) */
    bool sharded = r->dist->size > 1;
    float *m = NULL, *v = NULL;
    if (sharded && store_root(r)) {
        m = xcalloc((size_t)ps->capacity, sizeof(float));
        v = xcalloc((size_t)ps->capacity, sizeof(float));
    }
    for (int i = 0; sharded && i < r->n_zero; i++) {
        gather_moment(r, i, region_opt(r, i)->m, m);
        gather_moment(r, i, region_opt(r, i)->v, v);
    }
    char *json = is_rank0(r) ? config_to_json(&r->cfg) : NULL;
    if (r->model.ep) {
        Image im;
        if (is_rank0(r)) image_init(r, &im, true);
        if (store_root(r)) to_image(r, is_rank0(r) ? &im : NULL, m, v);
        if (is_rank0(r)) {
            checkpoint_write(path, &im.model, &im.opt, &st, json);
            image_free(&im);
        }
    } else if (is_rank0(r)) {
        AdamW full = sharded ? host_optimizer(r, m, v) : r->opt;
        checkpoint_write(path, &r->model, &full, &st, json);
    }
    free(json);
    free(m);
    free(v);
}

const char *run_checkpoint(Run *r) {
    const char *dir = r->cfg.train.out_dir;
    if (!dir[0]) fatal("cannot write a checkpoint: train.out_dir is not set (the directory checkpoints go to)");
    checkpoint_file(r->checkpoint, sizeof r->checkpoint, dir, r->step);
    write_checkpoint(r, r->checkpoint);
    if (is_rank0(r)) prune_checkpoints(r);
    return r->checkpoint;
}

/* train.save_best, after an eval of loss val: a new lowest loss of the run becomes r->best_val_loss and
 * out_dir/ckpt_best.h5 (the file records it too). Collective: every rank calls it. Rank 0 decides for
 * all (its loss is the one logged, its best the one checkpoints record), since the ranks must agree on
 * whether to enter the collective write. */
static void save_if_best(Run *r, double val) {
    double best = r->best_val_loss;
    double decision[2] = {isnan(best) ? !isnan(val) : val < best, val}; /* NaN best: none yet */
    if (r->dist->size > 1) dist_broadcast(&r->dist->world, decision, 2, DIST_F64, 0, DEV_CPU);
    if (decision[0] == 0) return;
    r->best_val_loss = val = decision[1];
    char path[CFG_STR + 32];
    best_checkpoint_file(path, sizeof path, r->cfg.train.out_dir);
    write_checkpoint(r, path);
    if (!r->quiet) {
        printf("best val loss %.4f at step %d: checkpoint %s\n", val, r->step, path);
        fflush(stdout);
    }
}

/* Keys whose change alters the parameters' shapes or set: a checkpoint cannot resume under them. */
static const char *const SHAPE_KEYS[] = {
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim",
    "model.ffn_dim", "model.qk_norm", "model.qkv_bias", "model.tie_embeddings", "model.attention",
    "model.msa_layers", "model.ffn", "model.moe_layers", "msa.index_heads", "msa.index_dim", "moe.num_experts",
    "moe.expert_dim", "moe.shared_experts", "moe.shared_expert_dim",
};

static json_t *config_value(json_t *root, const char *dotted) {
    char section[32];
    const char *dot = strchr(dotted, '.');
    snprintf(section, sizeof section, "%.*s", (int)(dot - dotted), dotted);
    return json_object_get(json_object_get(root, section), dot + 1);
}

/* Stop, naming the key, when the checkpoint was made under a config of another shape. */
static void check_resume_config(const Run *r, const char *path) {
    char *stored = checkpoint_read_config(path);
    if (!stored) return; /* an imported checkpoint: the tensor shapes are still checked one by one */
    char *current = config_to_json(&r->cfg);
    json_error_t je;
    json_t *old = json_loads(stored, 0, &je);
    if (!old)
        fatal("%s: the checkpoint's stored config (attribute \"config\") is not valid JSON: line %d, column %d: %s", path,
              je.line, je.column, je.text);
    json_t *cur = json_loads(current, 0, &je);
    if (!cur) fatal("this run's config as JSON does not parse: line %d, column %d: %s", je.line, je.column, je.text);
    for (size_t i = 0; i < sizeof SHAPE_KEYS / sizeof SHAPE_KEYS[0]; i++) {
        json_t *a = config_value(old, SHAPE_KEYS[i]), *b = config_value(cur, SHAPE_KEYS[i]);
        if (!a || !b || json_equal(a, b)) continue;
        char *sa = json_dumps(a, JSON_ENCODE_ANY), *sb = json_dumps(b, JSON_ENCODE_ANY);
        fatal("%s: %s = %s in the checkpoint but %s in this run's config; a resumed run keeps the model's shape "
              "(to start a new run from these parameters use train.init_from)",
              path, SHAPE_KEYS[i], sa, sb);
    }
    json_decref(old);
    json_decref(cur);
    free(current);
    free(stored);
}

/* Ends the run when writes to f failed (a full disk, a file system gone read-only), checked at each flush
 * or close: the error comes where it happened (at start-up for config.json), not after the whole run. */
static void check_written(FILE *f, const char *path, bool closing) {
    bool failed = ferror(f) != 0;
    int err = errno;
    if (closing ? fclose(f) != 0 : fflush(f) != 0) {
        failed = true;
        err = errno;
    }
    if (failed) fatal("%s: cannot write (%s; is the disk full?)", path, strerror(err));
}

static void flush_metrics(const Run *r) {
    char path[CFG_STR + 32];
    snprintf(path, sizeof path, "%s/metrics.jsonl", r->cfg.train.out_dir);
    check_written(r->metrics, path, false);
}

/* Drop the records of steps after `step` from metrics.jsonl: a run that crashed after its last
 * checkpoint logged steps that the resumed run does again. */
static void trim_metrics(const char *dir, int step) {
    char path[CFG_STR + 32], tmp[CFG_STR + 40];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *in = fopen(path, "r");
    if (!in) return;
    FILE *out = fopen(tmp, "w");
    if (!out) fatal("%s: cannot write (%s)", tmp, strerror(errno));
    char line[4096];
    bool dropped = false;
    while (fgets(line, sizeof line, in)) {
        const char *k = strstr(line, "\"step\": ");
        if (k && strtol(k + 8, NULL, 10) > step) dropped = true;
        else fputs(line, out);
    }
    fclose(in);
    check_written(out, tmp, true);
    if (dropped ? rename(tmp, path) != 0 : unlink(tmp) != 0) fatal("%s: cannot replace", path);
}

/* The newest checkpoint in out_dir that verifies (checkpoint_verify) into r->checkpoint; each newer one
 * that does not is skipped with a message that says why (a flipped bit, a truncated file). */
static void pick_checkpoint_to_resume(Run *r) {
    const char *dir = r->cfg.train.out_dir;
    int n, *steps = list_checkpoints(dir, &n);
    if (n == 0)
        fatal("train.resume: no checkpoint (ckpt_<step>.h5) in train.out_dir \"%s\" to resume from%s", dir,
              best_checkpoint_exists(dir) ? " (" BEST_CHECKPOINT " holds the best weights, not a place to resume "
                                            "from: start a new run from it with train.init_from)"
                                          : "");
    int i = n - 1;
    for (char why[1024]; i >= 0; i--) {
        checkpoint_file(r->checkpoint, sizeof r->checkpoint, dir, steps[i]);
        if (checkpoint_verify(r->checkpoint, why, sizeof why)) break;
        fprintf(stderr, "warning: --resume skips a checkpoint that does not verify: %s\n", why); /* why names it */
    }
    free(steps);
    if (i < 0)
        fatal("train.resume: none of the %d checkpoint%s in train.out_dir \"%s\" verifies (the reasons are above); "
              "nothing to resume from",
              n, n == 1 ? "" : "s", dir);
}

/* Rank 0 reads every checkpoint (the run directory need not be visible to the other nodes); the others
 * get what they need from it: sync_from_rank0 broadcasts parameters and MoE biases, resume scatters
 * the optimizer shards and broadcasts the train state. With expert parallelism rank 0 reads into the
 * image and the store roots take their experts from it (from_image). */
static void resume(Run *r) {
    const char *dir = r->cfg.train.out_dir;
    const ParamStore *ps = &r->model.params;
    bool sharded = r->dist->size > 1;
    TrainState st = {0};
    float *m = NULL, *v = NULL;
    Image im;
    if (sharded && store_root(r)) {
        /* the checkpoint holds the whole moments (written by any number of ranks): read them into host
         * memory, then hand each rank its shard of this run's sharding */
        m = xcalloc((size_t)ps->capacity, sizeof(float));
        v = xcalloc((size_t)ps->capacity, sizeof(float));
    }
    if (is_rank0(r)) {
        pick_checkpoint_to_resume(r);
        const char *path = r->checkpoint;
        check_resume_config(r, path);
        if (r->model.ep) {
            image_init(r, &im, true);
            checkpoint_read_params(path, &im.model, false);
            checkpoint_read_state(path, &im.model, &im.opt, &st);
            r->opt.t = im.opt.t;
        } else {
            checkpoint_read_params(path, &r->model, false);
            AdamW full = sharded ? host_optimizer(r, m, v) : r->opt;
            checkpoint_read_state(path, &r->model, &full, &st);
            r->opt.t = full.t;
        }
    }
    if (r->model.ep && store_root(r)) from_image(r, is_rank0(r) ? &im : NULL, m, v);
    if (r->model.ep && is_rank0(r)) image_free(&im);
    if (sharded) {
        for (int i = 0; i < r->n_zero; i++) {
            scatter_moment(r, i, m, region_opt(r, i)->m);
            scatter_moment(r, i, v, region_opt(r, i)->v);
        }
        free(m);
        free(v);
        uint64_t state[6] = {(uint64_t)st.step, st.data_counter, st.seed, (uint64_t)r->opt.t, 0, 0};
        memcpy(&state[4], &st.best_val_loss, sizeof(double)); /* their bits, NaN included */
        memcpy(&state[5], &st.first_val_loss, sizeof(double));
        dist_broadcast(&r->dist->world, state, 6, DIST_U64, 0, DEV_CPU);
        st.step = (int64_t)state[0];
        st.data_counter = state[1];
        st.seed = state[2];
        r->opt.t = r->opt_experts.t = (int)state[3];
        memcpy(&st.best_val_loss, &state[4], sizeof(double));
        memcpy(&st.first_val_loss, &state[5], sizeof(double));
        dist_broadcast(&r->dist->world, r->checkpoint, (int64_t)sizeof r->checkpoint, DIST_U8, 0, DEV_CPU);
    }
    const char *path = r->checkpoint;
    r->step = r->start_step = (int)st.step;
    r->sampler.counter = st.data_counter;
    r->best_val_loss = st.best_val_loss;
    r->first_val_loss = st.first_val_loss;
    if (st.seed != r->sampler.seed && !r->quiet)
        printf("note: train.seed = %llu, but the checkpoint's data stream was seeded with %llu; it continues that "
               "stream\n", (unsigned long long)r->sampler.seed, (unsigned long long)st.seed);
    r->sampler.seed = st.seed;
    if (is_rank0(r)) trim_metrics(dir, r->step);
    if (!r->quiet) printf("resumed from %s at step %d\n", path, r->step);
}

/* Rank 0 reads the checkpoint; its parameters reach the others through sync_from_rank0 (with expert
 * parallelism the experts go through the image to the store roots first: every rank calls this). */
static void init_from_checkpoint(Run *r) {
    const char *path = r->cfg.train.init_from;
    int loaded = 0;
    if (r->model.ep) {
        Image im;
        if (is_rank0(r)) {
            image_init(r, &im, false);
            loaded = checkpoint_read_params(path, &im.model, true);
        }
        if (store_root(r)) from_image(r, is_rank0(r) ? &im : NULL, NULL, NULL);
        if (is_rank0(r)) image_free(&im);
    } else if (is_rank0(r)) {
        loaded = checkpoint_read_params(path, &r->model, true);
    }
    if (!r->quiet)
        printf("initialised %d of %d parameter tensors from %s%s\n", loaded, r->model.params.n, path,
               loaded < r->model.params.n ? " (the others, MSA index parameters, freshly initialised)" : "");
}

/* A fresh run must not write its checkpoints among an earlier run's: keep_checkpoints would delete the
 * wrong ones and a later --resume would pick the earlier run's newest. */
static void refuse_earlier_checkpoints(const Run *r) {
    const char *dir = r->cfg.train.out_dir;
    int n, *steps = list_checkpoints(dir, &n);
    char path[CFG_STR + 32];
    if (n > 0) {
        checkpoint_file(path, sizeof path, dir, steps[n - 1]);
        fatal("train.out_dir \"%s\" already holds checkpoints of an earlier run (newest %s): continue it with "
              "--resume (raise train.steps to train further), or delete them or choose another train.out_dir to "
              "start over",
              dir, path);
    }
    free(steps);
    /* an earlier run's ckpt_best.h5 alone (its other checkpoints deleted, or it stopped before the first):
     * this run would overwrite it, or leave it lying among its own checkpoints as if it were theirs */
    if (best_checkpoint_exists(dir)) {
        best_checkpoint_file(path, sizeof path, dir);
        fatal("train.out_dir \"%s\" already holds the best checkpoint of an earlier run (%s), and nothing to resume: "
              "delete it or choose another train.out_dir to start over (train.init_from starts a new run from its "
              "weights)",
              dir, path);
    }
}

/* rank 0 only: the one writer of the run directory */
static void open_run_dir(Run *r) {
    const char *dir = r->cfg.train.out_dir;
    if (!dir[0]) return;
    char path[CFG_STR + 32];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) fatal("%s: cannot write (%s)", path, strerror(errno));
    char *json = config_to_json(&r->cfg);
    fputs(json, f);
    free(json);
    check_written(f, path, true);
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    r->metrics = fopen(path, r->cfg.train.resume ? "a" : "w"); /* a resumed run continues the record */
    if (!r->metrics) fatal("%s: cannot write (%s)", path, strerror(errno));
}

/* Parse "<rank>:<step>" of a test hook variable (-1 = off). */
static void parse_hook(const char *name, int *rank, int *step) {
    const char *v = getenv(name);
    *rank = *step = -1;
    if (v && *v && sscanf(v, "%d:%d", rank, step) != 2) fatal("%s = \"%s\": expected <rank>:<step>", name, v);
}

static void init_test_hooks(Run *r) {
    DistTestHooks *h = &r->hooks;
    parse_hook("MSA_DIST_TEST_FAIL", &h->fail_rank, &h->fail_step);
    parse_hook("MSA_DIST_TEST_HANG", &h->hang_rank, &h->hang_step);
    parse_hook("MSA_DIST_TEST_HANG_IN_BUCKET", &h->bucket_hang_rank, &h->bucket_hang_step);
    parse_hook("MSA_DIST_TEST_FAIL_IN_BUCKET", &h->bucket_fail_rank, &h->bucket_fail_step);
    const char *prefix = getenv("MSA_DIST_TEST_SAMPLES");
    h->samples = NULL;
    if (prefix && *prefix) {
        char path[CFG_STR + 32];
        snprintf(path, sizeof path, "%s.%d", prefix, r->dist->rank);
        if (!(h->samples = fopen(path, "a"))) fatal("MSA_DIST_TEST_SAMPLES: cannot write %s", path);
    }
}

static void run_test_hooks(Run *r, int step) {
    const DistTestHooks *h = &r->hooks;
    if (h->fail_rank == r->dist->rank && h->fail_step == step)
        fatal("test hook MSA_DIST_TEST_FAIL: rank %d fails at step %d", r->dist->rank, step);
    if (h->hang_rank == r->dist->rank && h->hang_step == step)
        for (;;) pause(); /* until the job's other ranks time out and mpirun kills this one */
}

/* Engine.backward_progress of a step's last backward: the gradient buckets that are final start their
 * reduce-scatter (the *_IN_BUCKET test hooks: a rank stops or fails with one of them in flight). */
static void backward_progress(void *ctx, int tape_index) {
    Run *r = ctx;
    grad_buckets_backward_progress(&r->buckets, tape_index);
    const DistTestHooks *h = &r->hooks;
    if (r->buckets.started == 0) return;
    if (h->bucket_fail_rank == r->dist->rank && h->bucket_fail_step == r->step + 1)
        fatal("test hook MSA_DIST_TEST_FAIL_IN_BUCKET: rank %d fails at step %d with a gradient bucket in flight",
              r->dist->rank, r->step + 1);
    if (h->bucket_hang_rank == r->dist->rank && h->bucket_hang_step == r->step + 1)
        for (;;) pause();
}

/* The groups, and this rank's share of the data and of the optimizer; checks that the config fits the
 * number of ranks. */
static void init_dist(Run *r, const char *src) {
    const RunConfig *c = &r->cfg;
    Device dev = strcmp(c->train.device, "cuda") == 0 ? DEV_CUDA : DEV_CPU;
    dist_setup(r->dist, c->dist.dp, c->dist.ep, c->dist.cp, c->dist.timeout, dev, src);
    int dp = r->dist->dp, ep = r->dist->ep, cp = r->dist->cp;
    if (c->train.batch_size % dp)
        fatal("%s: train.batch_size = %d is not divisible by the %d data-parallel ranks (dist.dp): each rank takes "
              "batch_size / dp sequences of every micro-batch; use a multiple of %d",
              src, c->train.batch_size, dp, dp);
    /* expert parallelism (layers/moe.h): the ranks of an ep group take different sequences too */
    if (c->train.batch_size % (dp * ep))
        fatal("%s: train.batch_size = %d is not divisible by the dist.dp * dist.ep = %d * %d ranks that take its "
              "sequences (expert-parallel ranks route different tokens): each takes batch_size / (dp * ep) of every "
              "micro-batch; use a multiple of %d",
              src, c->train.batch_size, dp, ep, dp * ep);
    const int rows = dp * ep; /* the ranks that split the rows */
    /* context parallelism (train/model.c): every op but attention on an equal share of the micro-batch's
     * tokens; attention head-parallel, whole GQA groups per rank, or over the sequence by ring (the limits
     * of that mode: config_validate) */
    if (!config_cp_sequence(c) && c->model.n_kv_heads % cp)
        fatal("%s: dist.cp = %d does not divide model.n_kv_heads = %d: context parallelism with dist.cp_mode = heads "
              "gives each cp rank whole GQA groups (n_kv_heads / cp of them, and their query heads), so cp can be at "
              "most n_kv_heads; dist.cp_mode = sequence (or auto) splits the sequence instead",
              src, cp, c->model.n_kv_heads);
    int64_t tokens = (int64_t)(c->train.batch_size / rows) * c->train.seq_len;
    if (tokens % cp)
        fatal("%s: dist.cp = %d does not divide the %lld tokens of a rank's micro-batch (train.batch_size / (dist.dp * "
              "dist.ep) * train.seq_len = %d * %d): each cp rank takes an equal share of them",
              src, cp, (long long)tokens, c->train.batch_size / rows, c->train.seq_len);
}

/* Elements per rank of a region of n elements sharded over `ranks`: a multiple of 64 elements (256 bytes:
 * aligned for NCCL and the vector kernels), or all n for one rank. */
static int64_t shard_of(int64_t n, int ranks) {
    if (ranks == 1) return n;
    const int64_t align = 64, per_rank = (n + ranks - 1) / ranks;
    return (per_rank + align - 1) / align * align;
}

/* Shard the parameter store over the ranks that hold the same parameters (ZeRO-1): per region (Run.zero)
 * equal contiguous ranges of the flat store, the region padded to its group's size of them; each rank
 * keeps AdamW moments for its ranges only. Without expert parallelism one region: the whole store over
 * the dp * cp ranks. With it, region 0 is every parameter but the routed experts, the same on every rank,
 * over the world; region 1 the routed experts (the store's last parameters, moved past region 0's
 * padding), over the dp * cp ranks of this rank's ep index, which hold the same experts. */
static void init_optimizer(Run *r) {
    ParamStore *ps = &r->model.params;
    const Model *m = &r->model;
    memset(&r->opt_experts, 0, sizeof r->opt_experts);
    const bool experts = m->ep && m->first_expert_param < ps->n;
    /* expert-parallel ranks share every other parameter with the whole world (a dense model under dist.ep
     * > 1 has no experts: its ep ranks are plain data-parallel ranks) */
    const DistGroup *g0 = m->ep ? &r->dist->world : zero_group(r);
    r->n_zero = 1;
    if (g0->size == 1) {
        r->zero[0] = (ZeroRegion){g0, 0, ps->numel};
        adamw_init(&r->opt, ps);
        return;
    }
    if (ps->dtype != DT_F32) fatal("data parallelism needs f32 master weights");
    const int64_t end0 = experts ? ps->p[m->first_expert_param].offset : ps->numel;
    r->zero[0] = (ZeroRegion){g0, 0, shard_of(end0, g0->size)};
    if (experts) {
        params_move_from(ps, m->first_expert_param, g0->size * r->zero[0].shard);
        const DistGroup *g1 = zero_group(r);
        const int64_t begin1 = ps->p[m->first_expert_param].offset;
        r->zero[1] = (ZeroRegion){g1, begin1, shard_of(ps->numel - begin1, g1->size)};
        r->n_zero = 2;
    }
    const ZeroRegion *last = &r->zero[r->n_zero - 1];
    params_reserve(ps, last->begin + last->group->size * last->shard);
    for (int i = 0; i < r->n_zero; i++) {
        const ZeroRegion *z = &r->zero[i];
        const int64_t first = z->begin + z->group->rank * z->shard;
        adamw_init_range(region_opt(r, i), ps, first, first + z->shard);
    }
}

/* Every rank starts from rank 0's parameters and MoE selection biases: rank 0 alone reads checkpoints,
 * and even a fresh initialisation (the same seed everywhere) is not left to chance. Each region goes out
 * from rank 0 of its group: the experts from the store root of their ep index, which holds them. */
static void sync_from_rank0(Run *r) {
    if (r->dist->size == 1) return;
    ParamStore *ps = &r->model.params;
    const Device dev = ps->be->device;
    const size_t es = dtype_size(ps->dtype);
    for (int i = 0; i < r->n_zero; i++) {
        const ZeroRegion *z = &r->zero[i];
        dist_broadcast(z->group, (char *)ps->data + (size_t)z->begin * es, z->group->size * z->shard, DIST_F32, 0,
                       ps->be->device);
    }
    params_sync_shadow(ps);
    for (int l = 0; l < r->model.cfg.n_layers; l++) {
        MoeLayer *ml = moe_layer_of(&r->model.layers[l].ffn);
        if (ml && ml->p.bias) dist_broadcast(world_in_memory(r), ml->p.bias->data, ml->p.num_experts, DIST_F32, 0, dev);
    }
}

/* A token is a target only inside its document (the next token of a document's last belongs to another),
 * so a file whose documents are all 1 token long has nothing to train on or measure: its loss would read
 * 0. */
static void require_targets(const TokenDataset *ds, const char *key) {
    for (int64_t d = 0; d < ds->n_docs; d++)
        if (ds->doc_offsets[d + 1] - ds->doc_offsets[d] >= 2) return;
    fatal("%s (%s): each of its %lld documents is 1 token long, so no token has a next token of its document to "
          "predict: there is nothing to train on or measure (join the documents, or tokenise with a coarser "
          "--doc-separator)",
          ds->path, key, (long long)ds->n_docs);
}

/* Every rank runs rank 0's effective config on data files with the same headers (ranks_agree.h). */
static void agree_with_rank0(const Run *r, const char *src) {
    const int n = r->train_mix.n ? r->train_mix.n + 1 : 2;
    AgreedFile *files = xmalloc((size_t)n * sizeof *files);
    char (*keys)[32] = xmalloc((size_t)n * sizeof *keys);
    for (int i = 0; i < r->train_mix.n; i++) {
        snprintf(keys[i], sizeof keys[i], "data.train_mix[%d]", i);
        files[i] = (AgreedFile){keys[i], &r->train_mix.ds[i]};
    }
    if (!r->train_mix.n) files[0] = (AgreedFile){"data.train_path", &r->train_ds};
    files[n - 1] = (AgreedFile){"data.val_path", &r->val_ds};
    ranks_agree(r->dist, &r->cfg, files, n, src);
    free(keys);
    free(files);
}

/* Whether the MoE layers' expert GEMMs take the per-expert path of the CUDA backend, which copies the
 * plan's offsets to the host at every GEMM, instead of the grouped GEMM, which reads them on the device:
 * kernels/cuda/moe.cu single_launch takes the BF16 rows of training whose widths (in and out of each of the
 * three GEMMs: d_model and expert_dim) are multiples of 8, unless MSA_MOE_GEMM=per_expert forces the
 * other path (its other conditions, 16-byte aligned tensors, hold for the arena's and the parameter
 * store's). */
static bool moe_gemms_per_expert(const RunConfig *c) {
    const char *force = getenv("MSA_MOE_GEMM");
    return c->model.d_model % 8 != 0 || c->moe.expert_dim % 8 != 0 || (force && !strcmp(force, "per_expert"));
}

/* Why this run cannot capture its training step in a CUDA graph (step_graph.h), NULL when it can. */
static const char *graph_refusal(const Run *r) {
    const RunConfig *c = &r->cfg;
    if (r->be->device != DEV_CUDA) return "the run is not on CUDA";
    if (strcmp(c->model.attention, "dense") != 0 && strcmp(c->model.attention, "msa") != 0)
        return "model.attention is neither dense nor msa: window attention's selection goes through the host";
    if (r->model.n_moe_layers && moe_gemms_per_expert(c))
        return "MoE layers on the per-expert GEMMs (MSA_MOE_GEMM=per_expert, or model.d_model or moe.expert_dim not a "
               "multiple of 8), which copy the routing to the host";
    if (r->dist->size > 1) return "more than one rank: the collectives wait on the host";
    if (r->engine.offload_block_inputs) return "train.offload_block_inputs: its copies overlap the blocks on a second stream, which a capture of the step would serialise";
    if (strcmp(c->data.sample, "windows") != 0) return "data.sample = documents: every batch has other documents";
    return NULL;
}

/* train.cuda_graph: on when asked for and the run allows it, with one line saying which and why. */
static void init_step_graph(Run *r, const char *src) {
    const char *want = r->cfg.train.cuda_graph;
    memset(&r->graph, 0, sizeof r->graph);
    if (!strcmp(want, "off")) return;
    const char *why = graph_refusal(r);
    if (why && !strcmp(want, "on")) fatal("%s: train.cuda_graph = on, but this run cannot capture its step: %s", src, why);
    if (why) {
        if (!r->quiet && r->be->device == DEV_CUDA) printf("cuda graph: off (%s)\n", why);
        return;
    }
    step_graph_init(&r->graph, r->be, r->cfg.train.grad_accum, r->batch.B, r->cfg.train.seq_len);
    if (!r->quiet) printf("cuda graph: on (the training step is captured after its first eager steps, then replayed)\n");
}

void run_init(Run *r) {
    RunConfig *c = &r->cfg;
    const char *src = r->config_path ? r->config_path : "config";
    if (!r->dist) {
        dist_single(&r->single_dist);
        r->dist = &r->single_dist;
    }
    if (!is_rank0(r)) r->quiet = true; /* rank 0 speaks for the run */
    r->dir_lock = -1;
    if (!c->data.train_path[0] && !c->data.train_mix[0]) fatal("%s: data.train_path is not set", src);
    if (c->data.train_path[0] && c->data.train_mix[0])
        fatal("%s: data.train_path and data.train_mix are both set; use one (a mix lists every file)", src);
    if (!c->data.val_path[0]) fatal("%s: data.val_path is not set", src);
    /* with data.train_mix, train_ds is the mix's first file: the vocabulary checks and sampling use it */
    if (c->data.train_mix[0]) datamix_open(&r->train_mix, c->data.train_mix, src);
    dataset_open(&r->train_ds, c->data.train_mix[0] ? r->train_mix.ds[0].path : c->data.train_path);
    dataset_open(&r->val_ds, c->data.val_path);
    if (r->val_ds.vocab_size != r->train_ds.vocab_size)
        fatal("%s has vocab_size %d but %s has %d", c->data.val_path, r->val_ds.vocab_size, r->train_ds.path,
              r->train_ds.vocab_size);
    for (int i = 0; i < r->train_mix.n; i++) require_targets(&r->train_mix.ds[i], "data.train_mix");
    if (!r->train_mix.n) require_targets(&r->train_ds, "data.train_path");
    require_targets(&r->val_ds, "data.val_path");
    if (c->model.vocab_size == 0) c->model.vocab_size = r->train_ds.vocab_size;
    else if (c->model.vocab_size < r->train_ds.vocab_size)
        fatal("%s: model.vocab_size = %d but %s has vocab_size %d", src, c->model.vocab_size, r->train_ds.path,
              r->train_ds.vocab_size);
    config_validate(c);
    /* before rank 0 touches out_dir and before the first collective without a timeout (dist_setup) */
    dist_set_timeout(r->dist, c->dist.timeout);
    agree_with_rank0(r, src);
    int64_t need = (int64_t)c->train.seq_len + 1;
    if (r->train_ds.n_tokens < need || r->val_ds.n_tokens < need)
        fatal("%s: the data files must hold more than train.seq_len = %d tokens", src, c->train.seq_len);

    if (c->train.checkpoint_every > 0 && !c->train.out_dir[0])
        fatal("%s: train.checkpoint_every = %d needs train.out_dir (the directory checkpoints go to)", src,
              c->train.checkpoint_every);
    if (c->train.resume && !c->train.out_dir[0])
        fatal("%s: train.resume needs train.out_dir (the directory whose newest checkpoint to resume)", src);
    if (c->train.save_best && !c->train.out_dir[0])
        fatal("%s: train.save_best needs train.out_dir (the directory ckpt_best.h5 goes to)", src);
    if (c->train.out_dir[0] && is_rank0(r)) {
        char failed[CFG_STR];
        int err = make_dirs(c->train.out_dir, failed, sizeof failed);
        if (err) fatal("train.out_dir \"%s\": cannot create the directory %s (%s)", c->train.out_dir, failed, strerror(err));
    }
    /* before anything reads or writes the directory's files: one run per directory (run_lock.h) */
    if (c->train.out_dir[0] && is_rank0(r)) r->dir_lock = run_dir_lock(c->train.out_dir);

    r->be = backend_for_device(c->train.device);
    init_dist(r, src); /* before the model: it picks this rank's GPU */
    /* expert parallel when the ep group has more than one rank: this rank's experts only */
    dist_comm(&r->ep_comm, &r->dist->ep_group);
    dist_comm(&r->cp_comm, &r->dist->cp_group);
    model_build_ep(&r->model, c, r->be, DT_F32, c->train.seed, &r->ep_comm);
    r->model.cp = &r->cp_comm; /* context parallel when it has more than one rank */
    r->model.cp_sequence = config_cp_sequence(c);
    const char *missing = backend_missing(r->be, (r->model.n_msa_layers ? BACKEND_MSA : 0) |
                                                     (r->model.n_moe_layers ? BACKEND_MOE : 0) |
                                                     (r->model.cp_sequence && r->dist->cp > 1 ? BACKEND_RING : 0));
    if (missing)
        fatal("%s: the %s backend has no %s kernel, which this model's MSA/MoE layers or dist.cp_mode = sequence "
              "need", src, r->be->name, missing);
    /* small chunks: a tensor larger than a chunk gets one of its own size, and each small allocation
     * after it opens a chunk whose end is lost until the next rewind (the first micro-step's; the arena
     * is one chunk from the second on, autograd/arena.h) */
    engine_init(&r->engine, r->be, r->be->device == DEV_CPU ? DT_F32 : DT_BF16, (size_t)2 << 20);
    r->engine.offload_block_inputs = c->train.recompute && c->train.offload_block_inputs;
    r->prof = NULL;
    if (c->train.profile_steps > 0) {
        if (!r->be->synchronize)
            fatal("%s: train.profile_steps = %d needs the %s backend's synchronize entry, which it lacks", src,
                  c->train.profile_steps, r->be->name);
        r->prof = xmalloc(sizeof *r->prof);
        profiler_init(r->prof, r->be);
    }
    init_optimizer(r);
    r->grad_sumsq = step_scalar(r->be, DT_F64);
    r->clip_scale = step_scalar(r->be, DT_F32);
    r->micro_losses = (Tensor){.dtype = stat_dtype(r->engine.act_dtype), .device = r->be->device, .ndim = 1,
                               .shape = {2 * c->train.grad_accum}, .numel = 2 * c->train.grad_accum};
    r->micro_losses.data = r->be->alloc(tensor_bytes(&r->micro_losses));
    memset(&r->dropout_seeds, 0, sizeof r->dropout_seeds);
    if (c->model.dropout > 0) {
        const int64_t words = 2 * (int64_t)c->train.grad_accum * model_dropout_sites(&r->model);
        r->dropout_seeds = (Tensor){.dtype = DT_I32, .device = r->be->device, .ndim = 1, .shape = {words}, .numel = words};
        r->dropout_seeds.data = r->be->alloc(tensor_bytes(&r->dropout_seeds));
    }
    grad_buckets_init(&r->buckets, &r->model.params, r->zero, r->n_zero, c->model.n_layers, c->dist.bucket_mb);
    r->model.block_tape_start = r->buckets.n ? r->buckets.block_tape_start : NULL;
    if (r->train_mix.n) sampler_init_mix(&r->sampler, &r->train_mix, c->train.seed);
    else sampler_init(&r->sampler, &r->train_ds, c->train.seed);
    if (!strcmp(c->data.sample, "documents")) sampler_documents(&r->sampler, c->train.seq_len);
    batch_alloc(&r->batch, c->train.batch_size / (r->dist->dp * r->dist->ep), c->train.seq_len);
    init_test_hooks(r);
    if (!r->quiet) {
        printf("msa-train | %s | %s backend | %lld parameters (%d layers, d_model %d, heads %d/%d, %d MSA layers)\n",
               src, r->be->name, (long long)params_count(&r->model.params, false), c->model.n_layers,
               c->model.d_model, c->model.n_heads, c->model.n_kv_heads, r->model.n_msa_layers);
        printf("data: %s (%lld tokens, vocab %d) | val %s (%lld tokens) | %lld tokens per step\n",
               c->data.train_mix[0] ? c->data.train_mix : c->data.train_path, (long long)r->train_ds.n_tokens,
               r->train_ds.vocab_size, c->data.val_path,
               (long long)r->val_ds.n_tokens,
               (long long)c->train.batch_size * c->train.seq_len * c->train.grad_accum);
        const Dist *d = r->dist;
        if (d->size > 1) {
            printf("distributed: %d ranks (dp %d, ep %d, cp %d) | collectives: MPI%s | %d sequences per dp%s rank per "
                   "micro-batch%s | ZeRO-1: optimizer state in %d shards of %lld elements",
                   d->size, d->dp, d->ep, d->cp, r->be->device == DEV_CUDA ? " (host), NCCL (device)" : "",
                   r->batch.B, d->ep > 1 ? "*ep" : "",
                   d->cp <= 1             ? ""
                   : r->model.cp_sequence ? ", 1/cp of their tokens per cp rank (zigzag chunks; attention: ring)"
                                          : ", 1/cp of their tokens per cp rank (attention: 1/cp of the heads)",
                   r->zero[0].group->size, (long long)r->zero[0].shard);
            if (r->n_zero > 1)
                printf(" (the routed experts: %d of %d per rank, in %d shards of %lld)", c->moe.num_experts / d->ep,
                       c->moe.num_experts, r->zero[1].group->size, (long long)r->zero[1].shard);
            printf("\n");
        }
        fflush(stdout); /* before the first step, which may take long (a graph's capture, a big model's first GEMMs) */
    }
    init_step_graph(r, src);
    r->step = r->start_step = 0;
    r->checkpoint[0] = 0;
    r->best_val_loss = r->first_val_loss = NAN; /* resume() restores the checkpoint's */
    /* load (and so validate) any checkpoint before open_run_dir rewrites config.json and metrics.jsonl */
    if (c->train.resume) {
        if (c->train.init_from[0] && !r->quiet)
            printf("note: resuming, so train.init_from (%s) is not used\n", c->train.init_from);
        resume(r);
    } else {
        if (is_rank0(r) && c->train.out_dir[0]) refuse_earlier_checkpoints(r);
        if (c->train.init_from[0]) init_from_checkpoint(r);
    }
    sync_from_rank0(r);
    if (is_rank0(r)) open_run_dir(r);
    r->t_start = r->t_last = wall_seconds();
    r->tokens_since_log = 0;
}

void run_free(Run *r) {
    if (r->prof) profiler_free(r->prof);
    grad_buckets_free(&r->buckets); /* after the collectives in flight */
    free(r->prof);
    r->prof = NULL;
    if (r->metrics) fclose(r->metrics);
    if (r->hooks.samples) fclose(r->hooks.samples);
    batch_free(&r->batch);
    step_graph_free(&r->graph);
    adamw_free(&r->opt);
    adamw_free(&r->opt_experts);
    step_scalar_free(r->be, &r->grad_sumsq);
    step_scalar_free(r->be, &r->clip_scale);
    step_scalar_free(r->be, &r->micro_losses);
    step_scalar_free(r->be, &r->dropout_seeds);
    engine_free(&r->engine);
    model_free(&r->model);
    dataset_close(&r->train_ds);
    dataset_close(&r->val_ds);
    sampler_free(&r->sampler);
    datamix_close(&r->train_mix);
    run_dir_unlock(r->dir_lock); /* last: the directory's files are closed */
    r->dir_lock = -1;
}

/* The layers' statistics of a step or an evaluation, summed over the ranks of group g (every rank's
 * layers report the same names in the same order). */
static void reduce_metrics(const DistGroup *g, Metrics *m) {
    if (g->size == 1 || m->n == 0) return;
    double sums[2 * METRICS_MAX];
    for (int i = 0; i < m->n; i++) sums[i] = m->sum[i], sums[m->n + i] = m->count[i];
    dist_all_reduce(g, sums, 2 * m->n, DIST_F64, DIST_SUM, DEV_CPU);
    dist_all_reduce(g, m->max, m->n, DIST_F64, DIST_MAX, DEV_CPU);
    for (int i = 0; i < m->n; i++) m->sum[i] = sums[i], m->count[i] = sums[m->n + i];
}

/* `, "name": mean` for each statistic of m */
/* `, "key": value` of a metrics.jsonl record; JSON has no NaN or infinity (printf's "nan" would make the line
 * unreadable to every JSON reader, tools/plot_run.py included), so a non-finite value is written as null. */
static void json_number(FILE *f, const char *key, double v, const char *fmt) {
    fprintf(f, ", \"%s\": ", key);
    if (isfinite(v)) fprintf(f, fmt, v);
    else fputs("null", f);
}

static void print_metrics_json(FILE *f, const Metrics *m) {
    for (int i = 0; i < m->n; i++) json_number(f, m->name[i], m->sum[i] / m->count[i], "%.6f");
}

static void log_step(Run *r, const StepResult *s) {
    const RunConfig *c = &r->cfg;
    double now = wall_seconds(), elapsed = now - r->t_start;
    double tps = r->tokens_since_log / (now - r->t_last);
    double eta = elapsed / (r->step - r->start_step) * (c->train.steps - r->step);
    char el[32], et[32];
    fmt_duration(el, sizeof el, elapsed);
    fmt_duration(et, sizeof et, eta);
    if (!r->quiet) {
        printf("step %5d/%d | loss %.4f", r->step, c->train.steps, s->loss);
        for (int i = 0; i < s->layers.n; i++) printf(" | %s %.4f", s->layers.name[i], s->layers.sum[i] / s->layers.count[i]);
        if (r->model.n_msa_layers && r->model.msa_dense) printf(" (dense)");
        if (r->model.n_moe_layers)
            printf(" | load max/mean %.2f | aux %.4f | z %.3f", s->moe.max_over_mean_load, s->moe.aux_loss, s->moe.z_loss);
        printf(" | lr %.2e | gnorm %.3f | %.0f tok/s | %s elapsed | ETA %s\n", s->lr, s->grad_norm, tps, el, et);
        fflush(stdout);
    }
    if (r->metrics) {
        FILE *f = r->metrics;
        fprintf(f, "{\"step\": %d", r->step);
        json_number(f, "loss", s->loss, "%.6f");
        json_number(f, "aux", s->aux, "%.6f");
        json_number(f, "lr", s->lr, "%.6e");
        json_number(f, "grad_norm", s->grad_norm, "%.6f");
        json_number(f, "tokens_per_s", tps, "%.1f");
        json_number(f, "elapsed_s", elapsed, "%.2f");
        json_number(f, "moe_max_over_mean_load", s->moe.max_over_mean_load, "%.4f");
        json_number(f, "moe_aux_loss", s->moe.aux_loss, "%.6f");
        json_number(f, "moe_z_loss", s->moe.z_loss, "%.6f");
        print_metrics_json(r->metrics, &s->layers);
        fprintf(r->metrics, "}\n");
        flush_metrics(r);
    }
    r->t_last = now;
    r->tokens_since_log = 0;
}

/* Targets that count in the mean LM loss (not ignore_index) among the tokens of r->batch that this rank
 * computes: all of them, or its share under context parallelism. */
static int64_t counted_targets(const Run *r) {
    const int64_t N = (int64_t)r->batch.B * r->batch.T;
    int32_t *index = xmalloc((size_t)N * sizeof(int32_t));
    int64_t n = 0, mine = model_cp_tokens(&r->model, N, r->batch.T, index);
    for (int64_t i = 0; i < mine; i++) n += r->batch.targets[index[i]] >= 0;
    free(index);
    return n;
}

/* The routing statistics of the step summed over every rank's tokens, so that every rank applies the
 * same MoE selection-bias update and logs the loads of the whole batch: the accumulators where they are
 * (the backend's memory; the loads are integers, exact in the f64 sum whatever its order), the host's
 * counts on the host. Nothing for one rank. */
static void reduce_moe_stats(Run *r) {
    if (r->dist->size == 1) return;
    const DistGroup *g = batch_group(r);
    for (int l = 0; l < r->model.cfg.n_layers; l++) {
        MoeLayer *ml = moe_layer_of(&r->model.layers[l].ffn);
        if (!ml) continue;
        MoeStats *st = &ml->stats;
        int64_t counts[2] = {st->tokens, st->forwards};
        dist_all_reduce(world_in_memory(r), st->acc.data, st->acc.numel, DIST_F64, DIST_SUM, st->be->device);
        dist_all_reduce(g, counts, 2, DIST_I64, DIST_SUM, DEV_CPU);
        st->tokens = counts[0];
        st->forwards = (int)counts[1];
    }
}

/* ZeRO-1 update, region by region over the ranks that hold its parameters (Run.zero): reduce-scatter the
 * gradients (each rank gets the sum over the group of its shard; the losses were weighted so that this
 * sum is the single-process gradient of the global batch), clip by the global norm, AdamW on the shards,
 * all-gather the updated parameters. The norm's sums of squares add up over the world: every gradient
 * element of region 0 lies in one rank's shard, and the experts of each ep index (region 1) in one shard
 * of one of its dp * cp ranks, so each expert counts once. Without data parallelism every collective is
 * a no-op and this is the plain clip + AdamW over the whole store. With gradient buckets (Run.buckets)
 * the reduce-scatter has happened bucket by bucket during the backward (run_step), and the all-gather is
 * only started here. The norm and the clipping factor stay on the device (Run.grad_sumsq, Run.clip_scale);
 * returns the norm before clipping when read is set (a wait for the device on a GPU), else NaN. The step's
 * learning rate and bias corrections were uploaded at its start (adamw_begin_step in run_step). */
static double optimizer_step(Run *r, bool read) {
    ParamStore *ps = &r->model.params;
    const size_t es = dtype_size(ps->dtype);
    Device dev = ps->be->device;
    GradBuckets *gb = &r->buckets; /* with buckets, run_step has reduced the gradients */
    r->be->zero(r->grad_sumsq.data, sizeof(double));
    for (int i = 0; i < r->n_zero; i++) {
        const ZeroRegion *z = &r->zero[i];
        const AdamW *o = region_opt(r, i);
        if (!gb->n)
            dist_reduce_scatter(z->group, (char *)ps->grad + (size_t)z->begin * es,
                                (char *)ps->grad + (size_t)o->begin * es, z->shard, DIST_F32, DIST_SUM, dev);
        grad_sumsq_range(ps, o->begin, o->end, &r->grad_sumsq);
    }
    dist_all_reduce(world_in_memory(r), r->grad_sumsq.data, 1, DIST_F64, DIST_SUM, dev);
    r->be->clip_scale(&r->clip_scale, &r->grad_sumsq, r->cfg.optim.grad_clip);
    bool gathered = false;
    for (int i = 0; i < r->n_zero; i++) {
        const ZeroRegion *z = &r->zero[i];
        AdamW *o = region_opt(r, i);
        adamw_update(o, ps, &r->cfg.optim, &r->clip_scale); /* begun by run_step at lr */
        if (gb->n) grad_buckets_gather_start(gb, i); /* waited for before the parameters' next use */
        else if (z->group->size > 1) {
            dist_all_gather(z->group, (char *)ps->data + (size_t)o->begin * es, (char *)ps->data + (size_t)z->begin * es,
                            z->shard, DIST_F32, dev);
            gathered = true;
        }
    }
    if (gathered) params_sync_shadow(ps); /* the BF16 copy of the other ranks' shards (CUDA) */
    return read ? sqrt(step_scalar_read(r->be, &r->grad_sumsq)) : NAN;
}

/* Micro-batch `micro`'s LM loss and auxiliary loss (0 without one) into Run.micro_losses: copies on the
 * device, read by read_losses when the step is read. */
static void keep_losses(Run *r, int micro, const ModelLosses *L) {
    const size_t es = dtype_size(r->micro_losses.dtype);
    char *slot = (char *)r->micro_losses.data + (size_t)(2 * micro) * es;
    if (L->lm->dtype != r->micro_losses.dtype || (L->aux && L->aux->dtype != r->micro_losses.dtype))
        fatal("run_step: the losses are %s, not %s", dtype_name(L->lm->dtype), dtype_name(r->micro_losses.dtype));
    r->be->copy(slot, L->lm->data, es);
    if (L->aux) r->be->copy(slot + es, L->aux->data, es);
    else r->be->zero(slot + es, es);
}

/* The step's mean losses from Run.micro_losses (one copy to the host): each micro-batch's LM loss times its
 * weight w[micro] (NULL: 1) and its auxiliary loss divided by aux_ranks, summed in micro-batch order. */
static void read_losses(Run *r, const double *w, int aux_ranks, StepResult *s) {
    const int n = 2 * r->cfg.train.grad_accum;
    double *v = xmalloc((size_t)n * sizeof(double));
    if (r->micro_losses.dtype == DT_F64) r->be->copy_to_host(v, r->micro_losses.data, (size_t)n * sizeof(double));
    else {
        float *f = xmalloc((size_t)n * sizeof(float));
        r->be->copy_to_host(f, r->micro_losses.data, (size_t)n * sizeof(float));
        for (int i = 0; i < n; i++) v[i] = f[i];
        free(f);
    }
    const int ga = r->cfg.train.grad_accum;
    for (int m = 0; m < ga; m++) {
        s->loss += (w ? v[2 * m] * w[m] : v[2 * m]) / ga;
        s->aux += v[2 * m + 1] / aux_ranks / ga;
    }
    free(v);
}

/* Where the device's memory is after the profiled steps (a device backend only: "" on the CPU): the driver's
 * count in use, and of it the parameters (values, gradients, BF16 shadow), the AdamW moments, the activation
 * arena's chunks, the offloaded block inputs' two device slots, the backend's scratch, whatever else the
 * backend's alloc handed out, and the rest (the CUDA context, the libraries' and the backend's workspaces). */
static void device_memory_line(Run *r, char *out, size_t cap) {
    out[0] = 0;
    DeviceMemory m;
    r->be->device_memory(&m);
    if (m.total <= 0) return;
    const ParamStore *ps = &r->model.params;
    const double gib = 1.0 / (1024.0 * 1024.0 * 1024.0);
    const int64_t params = ps->capacity * (int64_t)dtype_size(ps->dtype) * 2 + (ps->shadow ? ps->capacity * 2 : 0);
    int64_t moments = 0;
    const AdamW *opts[2] = {&r->opt, &r->opt_experts};
    for (int i = 0; i < 2; i++)
        if (opts[i]->m) moments += (opts[i]->end - opts[i]->begin) * (int64_t)dtype_size(ps->dtype) * 2;
    const int64_t arena = (int64_t)arena_reserved(&r->engine.data);
    const int64_t slots = 2 * (int64_t)r->engine.offload_slot_bytes;
    const int64_t ours = params + moments + arena + slots;
    snprintf(out, cap,
             "Device memory after the profiled steps: %.2f of %.2f GiB in use (the driver's count): parameters, their "
             "gradients and BF16 shadow %.2f, AdamW moments %.2f, activation arena %.2f (its chunks), offloaded "
             "block slots %.2f, the backend's scratch %.2f, other allocations %.2f, the rest %.2f (CUDA context, "
             "libraries' and the backend's workspaces).\n",
             m.used * gib, m.total * gib, params * gib, moments * gib, arena * gib, slots * gib, m.scratch * gib,
             (m.allocated - ours) * gib, (m.used - m.allocated - m.scratch) * gib);
}

/* The per-op table of the profiled steps: stdout on rank 0 (unless quiet), and out_dir/profile.md. The
 * profiled steps are consecutive and end with the current one. */
static void report_profile(Run *r) {
    const Profiler *p = r->prof;
    const RunConfig *c = &r->cfg;
    char title[2048], ranks[64] = "";
    if (r->dist->size > 1) snprintf(ranks, sizeof ranks, ", rank 0 of %d", r->dist->size);
    snprintf(title, sizeof title,
             "## Step profile: steps %d-%d of %s (%s backend%s), ms per step, mean of %d steps%s\n\n"
             "Self time per op kind (time in ops nested inside another counts once, for the inner op). A device "
             "synchronisation before and after every forward and backward makes a profiled step slower than an "
             "unprofiled one on a GPU. recompute: the forward replayed in a checkpointed block's backward "
             "(train.recompute); calls/step: forward calls.",
             r->step - p->steps + 1, r->step, r->config_path ? r->config_path : "the config", r->be->name, ranks,
             p->steps, p->steps < c->train.profile_steps ? " (the run ended before train.profile_steps)" : "");
    char memory[1024];
    device_memory_line(r, memory, sizeof memory);
    if (!r->quiet) {
        printf("\n");
        profiler_write_table(p, stdout, title);
        printf("%s\n", memory);
        fflush(stdout);
    }
    if (is_rank0(r) && c->train.out_dir[0]) {
        char path[CFG_STR + 32];
        snprintf(path, sizeof path, "%s/profile.md", c->train.out_dir);
        FILE *f = fopen(path, "w");
        if (!f) fatal("%s: cannot write", path);
        profiler_write_table(p, f, title);
        fputs(memory, f);
        if (fclose(f) != 0) fatal("%s: cannot write", path);
        if (!r->quiet) printf("profile written to %s\n", path);
    }
}

/* The step's loss is not finite: say why. Weights that are not finite make it so whatever the data: name
 * the first such tensor, and where the weights came from (the run's starting weights, or the previous
 * step's update). Finite weights and a non-finite loss: the training diverged. */
static noreturn void stop_on_bad_loss(Run *r, double loss) {
    const ParamStore *ps = &r->model.params;
    const int step = r->step + 1;
    float *buf = xmalloc((size_t)max_param_numel(ps) * sizeof(float));
    for (int i = 0; i < ps->n; i++) {
        const Tensor *t = ps->p[i].t;
        ps->be->copy_to_host(buf, t->data, (size_t)t->numel * sizeof(float));
        int64_t bad = 0, first = -1;
        for (int64_t k = 0; k < t->numel; k++)
            if (!isfinite(buf[k]) && bad++ == 0) first = k;
        if (!bad) continue;
        char origin[CFG_STR + 64];
        if (r->step > r->start_step)
            snprintf(origin, sizeof origin, "the update of step %d made them so: the training diverged (lower optim.lr)",
                     r->step);
        else if (r->cfg.train.resume) snprintf(origin, sizeof origin, "they came from the checkpoint %s", r->checkpoint);
        else if (r->cfg.train.init_from[0])
            snprintf(origin, sizeof origin, "they came from train.init_from = %s", r->cfg.train.init_from);
        else snprintf(origin, sizeof origin, "they are the run's initial weights");
        fatal("step %d: the loss is %g because parameter tensor %s holds %lld non-finite values of %lld (element "
              "%lld is %g): the weights are not finite; %s",
              step, loss, t->name, (long long)bad, (long long)t->numel, (long long)first, (double)buf[first], origin);
    }
    free(buf);
    fatal("step %d: the loss is %g with finite weights (diverged); lower optim.lr or check the data", step, loss);
}

/* The step's micro-batches and work on the device: forward, backward and update (the tape). mode: eager,
 * or recorded into a CUDA graph (STEP_CAPTURE: nothing may wait for the device, so the losses and the norm
 * are read after the graph's launch, run_step). With read, s gets the losses and norm. */
static void step_work(Run *r, StepMode mode, bool read, Profiler *prof, StepResult *s) {
    const RunConfig *c = &r->cfg;
    Engine *e = &r->engine;
    const DistGroup *bg = batch_group(r);
    const int ranks = bg->size, first_row = row_rank(r) * r->batch.B;
    const bool graphed = r->graph.on;
    if (mode == STEP_CAPTURE) read = false;
    params_zero_grad(&r->model.params);
    double *loss_w = ranks > 1 ? xmalloc((size_t)c->train.grad_accum * sizeof(double)) : NULL;
    for (int micro = 0; micro < c->train.grad_accum; micro++) {
        /* the last backward completes the gradients: their buckets start as it finishes them */
        const bool last = micro == c->train.grad_accum - 1;
        engine_reset(e);
        ModelInput in;
        if (graphed) in = step_graph_input(&r->graph, micro); /* sampled and uploaded by run_step */
        else {
            uint64_t first_window = r->sampler.counter + (uint64_t)first_row;
            /* this rank's rows of the global micro-batch: exactly the windows a single process would put there */
            sampler_next_part(&r->sampler, &r->batch, first_row, c->train.batch_size);
            if (r->hooks.samples)
                for (int i = 0; i < r->batch.B; i++)
                    fprintf(r->hooks.samples, "%llu\n", (unsigned long long)(first_window + (uint64_t)i));
            in = model_upload(e, &r->batch);
        }
        if (r->dropout_seeds.data) { /* this micro-batch's seeds (upload_dropout_seeds) */
            const int64_t words = 2 * (int64_t)model_dropout_sites(&r->model);
            Tensor *seeds = arena_alloc(&e->host, sizeof(Tensor));
            *seeds = r->dropout_seeds;
            seeds->shape[0] = seeds->numel = words;
            seeds->data = (int32_t *)r->dropout_seeds.data + micro * words;
            in.dropout_seeds = seeds;
        }
        in.row_offset = (int64_t)first_row * r->batch.T; /* activation rows are tokens; keeps the masks
                                                               independent of the number of ranks */
        /* the first forward waits for the previous update's all-gathers block by block */
        if (micro == 0 && r->buckets.n) {
            r->model.before_block = grad_buckets_before_block;
            r->model.before_block_ctx = &r->buckets;
        }
        ModelLosses L = model_forward(&r->model, e, &in, c->train.recompute);
        r->model.before_block = NULL;
        if (micro == 0) params_current(r); /* padding-only buckets: no block waits for them */
        keep_losses(r, micro, &L);
        if (ranks == 1) {
            /* the mean over micro-batches: each contributes 1/grad_accum of the gradient */
            /* nothing to differentiate when every parameter on the loss's path is frozen */
            if (L.total->requires_grad)
                engine_backward(e, c->train.grad_accum > 1 ? op_scale(e, L.total, 1.0f / c->train.grad_accum) : L.total);
            continue;
        }
        /* Data and context parallel: the global micro-batch's LM loss is the mean over all its counted
         * targets, so this rank's mean (over its rows, or its share of their tokens) enters with weight
         * (its targets) / (all ranks' targets); the auxiliary terms are means over equal shares on every
         * rank (MoE balance: equally many tokens; MSA KL: equally many GQA groups over the same tokens
         * under head-parallel cp, equally many tokens under sequence-split cp) and enter with 1/ranks.
         * The gradient sum over the ranks (the reduce-scatter, and under cp the backward of the
         * exchanges) is then the single-process gradient. */
        int64_t counted[2] = {counted_targets(r), 0};
        counted[1] = counted[0];
        dist_all_reduce(bg, &counted[1], 1, DIST_I64, DIST_SUM, DEV_CPU);
        double w = counted[1] > 0 ? (double)counted[0] / (double)counted[1] : 0.0;
        loss_w[micro] = w;
        if (L.total->requires_grad) {
            Tensor *loss = op_scale(e, L.lm, (float)(w / c->train.grad_accum));
            if (L.aux) loss = op_add(e, loss, op_scale(e, L.aux, 1.0f / (float)(ranks * c->train.grad_accum)));
            if (last && r->buckets.n) {
                e->backward_progress = backward_progress;
                e->backward_progress_ctx = r;
            }
            engine_backward(e, loss);
            e->backward_progress = NULL;
        }
    }
    /* the gradient buckets, started as the last backward finished them: waited for before any other
     * collective, so that a rank lost with one in flight is named as such */
    if (r->buckets.n) grad_buckets_reduce_finish(&r->buckets);
    /* the loss terms the backwards computed (the MSA KL of the sparse phase) and the layers' statistics,
     * read once for the whole step: the reported loss is assembled here, where they are known; each
     * micro-batch's terms enter as its forward's do */
    double late_aux = 0;
    if (read) late_aux = model_collect(&r->model, e, &r->model.metrics);
    else if (mode != STEP_CAPTURE) model_drop_collected(&r->model); /* a capture's: read after its launch */
    if (prof) profiler_backward_end(prof); /* the optimizer phase starts */
    if (read) {
        read_losses(r, loss_w, ranks, s);
        s->aux += late_aux / ranks / c->train.grad_accum;
    }
    free(loss_w);
    if (ranks > 1 && read) {
        double sums[2] = {s->loss, s->aux};
        dist_all_reduce(bg, sums, 2, DIST_F64, DIST_SUM, DEV_CPU);
        s->loss = sums[0];
        s->aux = sums[1];
    }
    /* before the update, so that the weights checked are the ones that gave this loss */
    if (read && !isfinite(s->loss)) stop_on_bad_loss(r, s->loss);
    reduce_metrics(bg, &r->model.metrics);
    s->grad_norm = optimizer_step(r, read);
}

/* The dropout masks' seeds of every micro-batch of the step into Run.dropout_seeds, before the step's work
 * (a captured step reads them there): a fresh mask per (step, micro-batch, site); resume replays it
 * exactly. */
static void upload_dropout_seeds(Run *r) {
    const RunConfig *c = &r->cfg;
    if (!r->dropout_seeds.data) return;
    const int64_t words = 2 * (int64_t)model_dropout_sites(&r->model);
    int32_t *w = xmalloc((size_t)(c->train.grad_accum * words) * sizeof(int32_t));
    /* | 1: the micro-batch seeds as they were when 0 meant no dropout, so that the masks are unchanged */
    for (int micro = 0; micro < c->train.grad_accum; micro++)
        model_dropout_seeds(&r->model, dropout_seed(c->train.seed, (uint64_t)r->step, (uint64_t)micro, 0) | 1,
                            w + micro * words);
    r->be->copy_from_host(r->dropout_seeds.data, w, (size_t)(c->train.grad_accum * words) * sizeof(int32_t));
    free(w);
}

StepResult run_step(Run *r) {
    const RunConfig *c = &r->cfg;
    Engine *e = &r->engine;
    StepResult s = {0};
    run_test_hooks(r, r->step + 1);
    /* profiled: the profile_steps steps after this process's first, which pays for first-use work (arena
     * chunks, GEMM plans, workspaces) that later steps do not repeat */
    Profiler *prof = r->prof && r->step > r->start_step && r->prof->steps < c->train.profile_steps ? r->prof : NULL;
    if (prof) {
        profiler_step_begin(prof);
        engine_set_profiler(e, prof);
    }
    /* stage 1 (dense warm-up): every visible block selected, optionally only the index branch
     * trains; stage 2 (sparse): the backbone trains at backbone_lr_scale times the LR (0 = frozen) */
    bool warm = r->step < c->msa.dense_warmup_steps;
    r->model.msa_dense = warm;
    model_set_trainable(&r->model, warm && strcmp(c->optim.warmup_trainable, "index") == 0,
                        warm ? 1.0f : c->optim.backbone_lr_scale);
    memset(&r->model.metrics, 0, sizeof r->model.metrics);
    model_drop_collected(&r->model); /* whatever forwards outside a step left (sampling) */
    /* the step's losses and norm come to the host on the steps it logs (or on every step without
     * defer_step_results) */
    const int step = r->step + 1;
    const bool logs = step % c->train.log_every == 0 || step == r->start_step + 1 || step == c->train.steps;
    const bool read = logs || !r->defer_step_results;
    /* the update's numbers and the dropout seeds, uploaded before any of the step's work (a captured step
     * reads them there) */
    s.lr = lr_schedule(&c->optim, r->step, c->train.steps);
    for (int i = 0; i < r->n_zero; i++) adamw_begin_step(region_opt(r, i), &c->optim, s.lr);
    upload_dropout_seeds(r);
    StepMode mode = STEP_EAGER;
    if (r->graph.on) {
        /* every micro-batch of the step on the host first: whether the captured graph fits them decides
         * how the step runs (one process: this rank's rows are the whole micro-batch) */
        for (int micro = 0; micro < c->train.grad_accum; micro++)
            sampler_next_part(&r->sampler, &r->graph.host[micro], 0, c->train.batch_size);
        /* a profiled step runs its ops one by one */
        mode = step_graph_mode(&r->graph, warm, prof != NULL);
        for (int micro = 0; micro < c->train.grad_accum; micro++) step_graph_upload(&r->graph, micro);
    }
    if (mode == STEP_REPLAY) {
        r->be->graph_launch(r->graph.graph);
        model_replayed(&r->model, c->train.grad_accum, (int64_t)r->batch.B * r->batch.T);
    } else {
        if (mode == STEP_CAPTURE) r->be->graph_begin();
        step_work(r, mode, read, prof, &s);
        if (mode == STEP_CAPTURE) {
            step_graph_captured(&r->graph, warm);
            r->be->graph_launch(r->graph.graph);
            if (!r->quiet)
                printf("cuda graph: step %d captured (%lld kernels, copies and memsets), replayed as one launch from "
                       "here on\n",
                       step, (long long)r->graph.nodes);
        }
    }
    if (read && mode != STEP_EAGER) {
        /* what step_work reads before the update, after it here: a non-finite loss is reported with the
         * updated weights */
        read_losses(r, NULL, 1, &s);
        /* and the terms the backwards computed (the MSA KL of the sparse phase), as step_work adds them */
        s.aux += model_collect(&r->model, e, &r->model.metrics) / c->train.grad_accum;
        s.grad_norm = sqrt(step_scalar_read(r->be, &r->grad_sumsq));
        if (!isfinite(s.loss)) stop_on_bad_loss(r, s.loss);
    }
    /* a graphed step's records nobody reads go as an eager step's do (step_work), so that the next step, graphed
     * or not, starts with an empty log */
    if (!read && mode != STEP_EAGER) model_drop_collected(&r->model);
    if (!read) s.loss = s.aux = s.grad_norm = NAN;
    s.layers = r->model.metrics;
    reduce_moe_stats(r);
    /* the bias update on the device; the statistics come to the host only for the log line */
    model_moe_step(&r->model, logs ? &s.moe : NULL, true);
    if (prof) {
        profiler_step_end(prof);
        engine_set_profiler(e, NULL);
    }
    r->step++;
    r->tokens_since_log += (int64_t)c->train.batch_size * c->train.seq_len * c->train.grad_accum;
    if (logs) log_step(r, &s);
    if (prof && prof->steps == c->train.profile_steps) report_profile(r);
    return s;
}

/* The mean LM loss over eval_batches validation batches; with data parallelism each rank takes its rows
 * of every batch (and with context parallelism its share of their tokens) and the batch losses are
 * recombined, weighted by their counted targets, into exactly the single-process means. */
static double eval_loss(Run *r) {
    Engine *e = &r->engine;
    Model *m = &r->model;
    const DistGroup *bg = batch_group(r);
    const int nb = r->cfg.train.eval_batches;
    double *parts = xcalloc(2 * (size_t)nb, sizeof(double));
    for (int i = 0; i < nb; i++) {
        /* a long eval must not hold off a stop signal (a scheduler kills after a grace period) */
        if (agreed_stop_signal(r)) {
            free(parts);
            r->eval_stopped = true;
            return NAN;
        }
        engine_reset(e);
        (strcmp(r->cfg.data.sample, "documents") ? sampler_sequential_part : sampler_documents_part)(
            &r->val_ds, i, &r->batch, row_rank(r) * r->batch.B, r->cfg.train.batch_size);
        ModelInput in = model_upload(e, &r->batch);
        double lm = tensor_item(e, model_forward(m, e, &in, false).lm), n = (double)counted_targets(r);
        parts[2 * i] = lm * n; /* exact in double: lm is a float, n < 2^29 */
        parts[2 * i + 1] = n;
    }
    dist_all_reduce(bg, parts, 2 * nb, DIST_F64, DIST_SUM, DEV_CPU);
    /* the mean over the batches that have targets: a batch of nothing but document ends measures nothing,
     * and counting it as a loss of 0 would flatter the model */
    double total = 0.0;
    int measured = 0;
    for (int i = 0; i < nb; i++)
        if (parts[2 * i + 1] > 0) {
            total += parts[2 * i] / parts[2 * i + 1];
            measured++;
        }
    free(parts);
    if (!measured)
        fatal("%s: the %d validation batches (train.eval_batches) hold no targets: every token in them ends a document, "
              "so there is no next token to predict and no loss to measure (documents of 1 token?); raise "
              "train.eval_batches or use a validation file of longer documents",
              r->val_ds.path, nb);
    return total / measured;
}

double run_evaluate(Run *r, EvalMetrics *em) {
    params_current(r);
    Engine *e = &r->engine;
    Model *m = &r->model;
    bool prev = engine_set_grad(e, false);
    bool prev_dense = m->msa_dense;
    m->collect_metrics = true;
    memset(&m->metrics, 0, sizeof(m->metrics));
    r->eval_stopped = false;
    model_collect(m, e, NULL); /* whatever forwards outside an evaluation left */
    double loss = eval_loss(r);
    model_collect(m, e, &m->metrics);
    /* per-layer means over every rank's rows (under cp: its GQA groups, equally many per rank): add up
     * the sums and the counts */
    if (!r->eval_stopped) reduce_metrics(batch_group(r), &m->metrics);
    if (em) *em = (EvalMetrics){.layers = m->metrics};
    if (em && r->cfg.train.eval_dense_reference && m->n_msa_layers && !r->eval_stopped) {
        /* the same weights with every MSA layer in dense attention: with a frozen backbone this is
         * exactly the dense model's loss, the reference the sparse loss is held to */
        m->collect_metrics = false;
        m->msa_dense = true;
        em->dense_loss = eval_loss(r);
        em->has_dense_loss = true;
        if (r->eval_stopped) loss = NAN;
        model_collect(m, e, NULL);
    }
    model_moe_step(m, NULL, false); /* eval routing must not feed the next step's bias update */
    m->collect_metrics = false;
    m->msa_dense = prev_dense;
    engine_set_grad(e, prev);
    return loss;
}

static void log_eval(Run *r, double val_loss, const EvalMetrics *em) {
    const Metrics *lm = &em->layers;
    if (!r->quiet) {
        printf("eval step %d | val loss %.4f", r->step, val_loss);
        for (int i = 0; i < lm->n; i++) printf(" | %s %.4f", lm->name[i], lm->sum[i] / lm->count[i]);
        if (em->has_dense_loss) printf(" | dense-attention loss %.4f", em->dense_loss);
        printf("\n");
        fflush(stdout);
    }
    if (r->metrics) {
        fprintf(r->metrics, "{\"step\": %d", r->step);
        json_number(r->metrics, "val_loss", val_loss, "%.6f");
        print_metrics_json(r->metrics, lm);
        if (em->has_dense_loss) json_number(r->metrics, "dense_attention_val_loss", em->dense_loss, "%.6f");
        fprintf(r->metrics, "}\n");
        flush_metrics(r);
    }
}

/* A validation loss that is not finite, or above train.diverge_factor times the run's first (the
 * reference every checkpoint keeps), ends the run before anything is written from the diverged weights
 * (ckpt_best.h5, this step's checkpoint): the newest checkpoint stays one from before. The ranks agree,
 * as every rank holds the same all-reduced loss. */
static void stop_if_diverged(Run *r, double val) {
    const double factor = r->cfg.train.diverge_factor, first = r->first_val_loss;
    const char *ckpt = r->checkpoint[0] ? r->checkpoint : NULL;
    if (isfinite(val) && isnan(first)) r->first_val_loss = val;
    if (isfinite(val) && (factor == 0 || isnan(first) || val <= factor * first)) return;
    char why[160];
    if (!isfinite(val)) snprintf(why, sizeof why, "validation loss is %g", val);
    else
        snprintf(why, sizeof why, "validation loss %.4f is above train.diverge_factor = %g times the run's first, %.4f",
                 val, factor, first);
    fatal("step %d: %s (diverged); %s%s: lower optim.lr and --resume, or check the data", r->step, why,
          ckpt ? "the newest checkpoint is from before the divergence, " : "no checkpoint was written",
          ckpt ? ckpt : "");
}

/* An eval in run_train: logged, checked for divergence, and with train.save_best kept when it is the best
 * so far; nothing of an eval cut short by a stop signal (r->eval_stopped). Returns its loss, or `last` (the
 * previous eval's). */
static double train_eval(Run *r, double last, bool save_best) {
    EvalMetrics em;
    double val = run_evaluate(r, &em);
    if (r->eval_stopped) return last;
    log_eval(r, val, &em);
    stop_if_diverged(r, val);
    if (save_best) save_if_best(r, val);
    return val;
}

double run_train(Run *r) {
    const RunConfig *c = &r->cfg;
    double val = NAN;
    r->stopped = false;
    /* on a GPU, reading the loss and norm of every step would make the host wait for the device every
     * step; the CPU computes them on the host anyway, and keeps its check of every step's loss */
    r->defer_step_results = r->be->device != DEV_CPU;
    if (r->step >= c->train.steps) {
        if (!r->quiet)
            printf("nothing to train: the run is at step %d and train.steps = %d (raise train.steps to go on)\n",
                   r->step, c->train.steps);
        return val;
    }
    /* without a run directory there is nowhere to save, so a signal keeps its default action */
    bool saving = c->train.out_dir[0] != 0;
    struct sigaction old[N_STOP_SIGNALS];
    if (saving) install_stop_handlers(old);
    int sig = 0;
    if (r->step == 0 && c->train.eval_dense_reference && r->model.n_msa_layers) {
        /* before any step: the loss of the starting weights (the imported dense model); not a best (it
         * measures the starting weights, not this run's training) */
        val = train_eval(r, val, false);
        if (r->eval_stopped) {
            sig = agreed_stop_signal(r);
            run_checkpoint(r);
        }
        r->t_last = wall_seconds();
    }
    while (!sig && r->step < c->train.steps) {
        run_step(r);
        double pause_start = wall_seconds();
        bool last = r->step == c->train.steps;
        /* before this step's regular checkpoint, so that it records a new best */
        if (last || (c->train.eval_every > 0 && r->step % c->train.eval_every == 0))
            val = train_eval(r, val, c->train.save_best);
        sig = agreed_stop_signal(r);
        if (saving && (last || sig || (c->train.checkpoint_every > 0 && r->step % c->train.checkpoint_every == 0))) {
            run_checkpoint(r);
            if (!r->quiet && !sig) printf("checkpoint %s\n", r->checkpoint);
        }
        /* keep eval and checkpoint time out of the training throughput: shift the start of the
         * current logging window by the length of the pause */
        r->t_last += wall_seconds() - pause_start;
    }
    if (saving) restore_stop_handlers(old);
    if (sig) {
        r->stopped = true;
        if (!r->quiet) {
            printf("stopped by %s at step %d/%d%s; checkpoint %s; continue with --resume\n", signal_name(sig), r->step,
                   c->train.steps, r->eval_stopped ? " (during its eval, which was cut short and not logged)" : "",
                   r->checkpoint);
            fflush(stdout);
        }
    }
    if (r->prof && r->prof->steps > 0 && r->prof->steps < c->train.profile_steps) report_profile(r); /* ended early */
    if (r->prof && r->prof->steps == 0 && !r->quiet)
        printf("train.profile_steps: no step profiled (this run made %d step(s); its first is never profiled)\n",
               r->step - r->start_step);
    if (r->stopped) return val;
    double total = wall_seconds() - r->t_start;
    int steps = c->train.steps - r->start_step;
    char el[32];
    fmt_duration(el, sizeof el, total);
    if (!r->quiet)
        printf("done: %d steps in %s (%.1f s), final val loss %.4f, %.0f tokens/s overall\n", steps, el, total, val,
               (double)c->train.batch_size * c->train.seq_len * c->train.grad_accum * steps / total);
    if (!r->quiet && r->graph.on)
        printf("cuda graph: %lld steps replayed, %lld captured, %lld eager\n", (long long)r->graph.replays,
               (long long)r->graph.captures, (long long)r->graph.eager);
    return val;
}

/* One document of len tokens as a micro-batch of one row (targets: the next tokens, or NULL), uploaded
 * with gradients off; the caller frees *b and restores the grad mode it returns. */
static bool upload_document(Run *r, Batch *b, ModelInput *in, const int32_t *tokens, const int32_t *targets, int len) {
    Engine *e = &r->engine;
    bool prev = engine_set_grad(e, false);
    batch_alloc(b, 1, len);
    for (int t = 0; t < len; t++) {
        b->inputs[t] = tokens[t];
        b->positions[t] = t;
        if (targets) b->targets[t] = targets[t];
    }
    b->cu_seqlens[0] = 0;
    b->cu_seqlens[1] = len;
    b->n_segments = 1;
    Batch view = *b; /* b keeps its buffers for batch_free */
    if (!targets) view.targets = NULL;
    engine_reset(e);
    *in = model_upload(e, &view);
    return prev;
}

void run_next_token_probs(Run *r, const int32_t *ctx, int len, double temperature, double *probs) {
    params_current(r);
    const int T = r->cfg.train.seq_len, V = r->model.cfg.vocab_size;
    if (len > T) { /* the model sees the last seq_len tokens */
        ctx += len - T;
        len = T;
    }
    Engine *e = &r->engine;
    Batch b;
    ModelInput in;
    bool prev = upload_document(r, &b, &in, ctx, NULL, len);
    Tensor *lg = model_logits(&r->model, e, &in, false, NULL);
    Tensor last = *lg; /* the last row */
    last.ndim = 1;
    last.shape[0] = last.numel = V;
    last.data = (char *)lg->data + (size_t)(len - 1) * V * dtype_size(lg->dtype);
    float *logits = xmalloc((size_t)V * sizeof(float));
    tensor_to_host_f32(e, logits, &last); /* bf16 on CUDA */
    double mx = -INFINITY, sum = 0.0;
    for (int v = 0; v < V; v++) mx = fmax(mx, logits[v] / temperature);
    for (int v = 0; v < V; v++) sum += probs[v] = exp(logits[v] / temperature - mx);
    for (int v = 0; v < V; v++) probs[v] /= sum;
    free(logits);
    batch_free(&b);
    engine_set_grad(e, prev);
}

double run_text_loss(Run *r, const int32_t *tokens, int len) {
    params_current(r);
    if (len < 2 || len - 1 > r->cfg.train.seq_len) fatal("run_text_loss: %d tokens (2 to seq_len + 1)", len);
    Engine *e = &r->engine;
    Batch b;
    ModelInput in;
    bool prev = upload_document(r, &b, &in, tokens, tokens + 1, len - 1);
    double loss = tensor_item(e, model_forward(&r->model, e, &in, false).lm);
    batch_free(&b);
    engine_set_grad(e, prev);
    return loss;
}

/* The text of a sampled token id: its character (char tokenizer) or byte (byte tokenizer), or a visible
 * placeholder "<id N>" for an id the data's vocabulary has no text for. model.vocab_size may exceed the
 * data's (e.g. rounded up for faster matrix sizes); the extra ids never occur in the data but an
 * undertrained model can still sample them. Returns its length in bytes (a char vocabulary may hold NUL). */
static int token_text(const TokenDataset *ds, int id, char *buf, size_t n) {
    const bool chars = ds->vocab && strcmp(ds->tokenizer, "char") == 0;
    if (id >= 0 && id < (chars ? ds->vocab_size : 256)) return snprintf(buf, n, "%c", chars ? ds->vocab[id] : id);
    return snprintf(buf, n, "<id %d>", id);
}

void run_sample(Run *r) {
    params_current(r); /* on every rank: the all-gathers are collectives */
    const TokenDataset *ds = &r->train_ds;
    int n = r->cfg.train.sample_tokens;
    bool chars = ds->vocab && strcmp(ds->tokenizer, "char") == 0, bytes = strcmp(ds->tokenizer, "byte") == 0;
    if (n <= 0 || (!chars && !bytes)) return;
    /* rank 0 samples; with expert parallelism the other ranks of its ep group, which hold the other
     * experts, run the same forwards with it (silently; rank 0's token is theirs too) */
    const bool speak = is_rank0(r), ep = r->model.ep != NULL;
    if (!speak && !(ep && store_root(r))) return;
    /* rank 0 samples alone (a context that grows one token at a time): no context-parallel exchanges */
    const Comm *cp = r->model.cp;
    r->model.cp = NULL;
    int32_t *ctx = xmalloc((size_t)(n + 1) * sizeof(int32_t));
    /* start from a newline, as nanoGPT's sampler does */
    const char *nl = chars ? strchr(ds->vocab, '\n') : NULL;
    ctx[0] = chars ? (nl ? (int32_t)(nl - ds->vocab) : 0) : '\n';
    Rng rng;
    rng_seed(&rng, r->cfg.train.seed + 7);
    int V = r->model.cfg.vocab_size;
    double *probs = xmalloc((size_t)V * sizeof(double)), temp = r->cfg.train.sample_temperature;
    if (speak) printf("---- sample (%d tokens, temperature %.2f) ----\n", n, temp);
    for (int i = 1; i <= n; i++) {
        run_next_token_probs(r, ctx, i, temp, probs);
        double u = rng_uniform(&rng), acc = 0.0;
        int next = V - 1;
        for (int v = 0; v < V; v++)
            if (u < (acc += probs[v])) {
                next = v;
                break;
            }
        if (ep) dist_broadcast(&r->dist->ep_group, &next, 1, DIST_I32, 0, DEV_CPU);
        ctx[i] = next;
        if (speak) {
            char text[32];
            fwrite(text, 1, (size_t)token_text(ds, next, text, sizeof text), stdout);
        }
    }
    if (speak) printf("\n---- end of sample ----\n");
    free(probs);
    free(ctx);
    r->model.cp = cp;
}
