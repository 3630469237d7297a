/* build/bench: the GPU benchmark table of docs/benchmarks.md (issue 6). Run on a machine with a CUDA
 * device, from the repository root after `make data`:
 *
 *   build/bench [--only train|attention] [--sizes 8192,32768,131072] [--heads 64/4/128,32/4/64] [--models dense,moe]
 *               [--contexts 4096,32768]
 *
 * (a) training throughput of a ~1B-parameter dense GQA model (TinyLlama-1.1B shape: d_model 2048,
 *     22 layers, 32 query / 4 KV heads of 64, SwiGLU 5632, vocabulary 32000) and of an MoE model of the
 *     same active size (16 routed experts of 704, 4 per token, plus one shared expert of 2816: the same
 *     5632 active FFN width), at 4K and 32K context, with BF16 activations and F32 master weights:
 *     tokens/s and model FLOPs utilisation against the H100 SXM's dense BF16 peak (989 TFLOP/s). 16384 tokens a
 *     step at 4K (the MoE model's as two micro-batches without recomputation), one sequence at 32K (recomputed).
 *     Model FLOPs per token = 6 * (active matmul parameters, LM head included) + 6 * n_layers * H_q *
 *     head_dim * context (causal attention, forward + backward: 12 * L * H * D * T / 2).
 *     The shipped Shakespeare tokens are the data (ids < 65 are valid ids of a 32000 vocabulary; the
 *     token values do not change the work). Each run: 2 warm-up steps, then the mean of the timed steps.
 * (b) one attention layer, forward + backward, at 8K, 32K and 128K tokens in one document, for each head
 *     shape of --heads (H_q/H_kv/d: 64/4/128, the shape issue 14 states its targets at, and 32/4/64, the
 *     ~1.1B model's attention): dense causal attention (the backend's dense path: cuDNN's fused attention unless
 *     MSA_ATTENTION=own) against MSA with block 128, top-k 16, d_idx 128 (indexer + plan + sparse
 *     attention forward and backward + KL forward and backward: everything an MSA layer adds or
 *     replaces), and the ratio. Both run through the engine as an attention layer does (op_attention; the
 *     MSA layer's chain, layers/msa.h msa_attend, whose sparse phase computes the KL in the attention's
 *     backward), the MSA selection is the indexer's own on random index queries/keys, and the parts come
 *     from the step profiler (synchronised around every op). A second MSA row runs the chain as it was
 *     before issue 14 in the same process: a KL forward (which also computes the student's normaliser)
 *     and a separate KL backward as ops of their own beside the sparse attention.
 *
 * Times are wall clock around the work with a synchronising copy at both ends (every kernel runs on
 * one stream). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../autograd/params.h"
#include "../autograd/profile.h"
#include "../kernels/util.h"
#include "../layers/msa.h"
#include "../train/trainer.h"

#ifndef MSA_CUDA
int main(void) {
    fprintf(stderr, "build/bench: this build has no CUDA backend (build with nvcc on PATH)\n");
    return 1;
}
#else

#define PEAK_BF16_FLOPS 989e12 /* H100 SXM dense BF16 tensor-core peak */

static const KernelBackend *be = &cuda_backend;

static void sync_device(void) { /* a copy to the host waits for all queued work */
    static void *dev;
    char host[16];
    if (!dev) dev = be->alloc(16);
    be->copy_to_host(host, dev, 16);
}

/* ---------- (a) training throughput ---------- */

typedef struct {
    const char *name;
    bool moe;
} ModelKind;

static void bench_train(const ModelKind *mk, int context, int64_t tokens_per_step) {
    Run r;
    memset(&r, 0, sizeof r);
    r.quiet = true;
    config_defaults(&r.cfg);
    r.config_path = "configs/shakespeare_char.json";
    config_load(&r.cfg, r.config_path);
    ModelConfig *m = &r.cfg.model;
    m->vocab_size = 32000;
    m->d_model = 2048;
    m->n_layers = 22;
    m->n_heads = 32;
    m->n_kv_heads = 4;
    m->head_dim = 64;
    m->ffn_dim = 5632;
    m->tie_embeddings = false;
    if (mk->moe) {
        snprintf(m->ffn, sizeof m->ffn, "moe");
        snprintf(m->moe_layers, sizeof m->moe_layers, "all");
        r.cfg.moe.num_experts = 16;
        r.cfg.moe.experts_per_token = 4;
        r.cfg.moe.expert_dim = 704;
        r.cfg.moe.shared_experts = 1;
        r.cfg.moe.shared_expert_dim = 2816;
    }
    r.cfg.train.seq_len = context;
    /* activations of 22 layers do not fit in 80 GB otherwise: the dense model's at 32K tokens. The MoE's (4 routed
     * copies of every token, its 2.2B parameters' F32 state beside them) do not at 4K x 4 either, but they do as two
     * micro-batches of 4K x 2 without recomputation, which is faster than one batch recomputed (1.20-1.23x on an
     * H100, docs/benchmarks.md, fifteenth session): the same tokens a step */
    r.cfg.train.recompute = context > 8192;
    r.cfg.train.grad_accum = mk->moe && !r.cfg.train.recompute ? 2 : 1;
    r.cfg.train.batch_size = (int)(tokens_per_step / context / r.cfg.train.grad_accum);
    const int warm = 2, timed = 4;
    r.cfg.train.steps = warm + timed;
    r.cfg.train.eval_every = 0;
    r.cfg.train.out_dir[0] = 0;
    snprintf(r.cfg.train.device, sizeof r.cfg.train.device, "cuda");
    run_init(&r);

    /* active matmul parameters: everything but the embedding table, minus the routed experts a token
     * does not visit */
    const ParamStore *ps = &r.model.params;
    int64_t total = params_count(ps, false), active = total - (int64_t)m->vocab_size * m->d_model;
    if (mk->moe) {
        const int64_t per_expert = 3LL * m->d_model * r.cfg.moe.expert_dim;
        active -= (int64_t)m->n_layers * (r.cfg.moe.num_experts - r.cfg.moe.experts_per_token) * per_expert;
    }
    const double flops_per_token = 6.0 * (double)active + 6.0 * m->n_layers * m->n_heads * m->head_dim * (double)context;

    double t0 = 0, loss = 0;
    for (int s = 0; s < warm + timed; s++) {
        if (s == warm) t0 = wall_seconds(); /* each step ends with a synchronising loss read */
        loss = run_step(&r).loss;
    }
    const double t = (wall_seconds() - t0) / timed, tps = (double)tokens_per_step / t;
    printf("| %-5s | %6.2fB / %5.2fB | %6d | %7lld | %d x %d | %s | %8.0f | %7.1f | %5.1f%% | %.3f |\n", mk->name,
           total / 1e9, (active + (int64_t)m->vocab_size * m->d_model) / 1e9, context, (long long)tokens_per_step,
           r.cfg.train.grad_accum, r.cfg.train.batch_size, r.cfg.train.recompute ? "yes" : "no ", t * 1e3, tps / 1e3,
           100.0 * tps * flops_per_token / PEAK_BF16_FLOPS, loss);
    fflush(stdout);
    run_free(&r);
}

/* ---------- (b) one attention layer ---------- */

static Tensor dev_tensor(DType dt, int ndim, const int64_t *shape) {
    Tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dt;
    t.device = DEV_CUDA;
    t.ndim = ndim;
    t.numel = 1;
    for (int i = 0; i < ndim; i++) t.numel *= (t.shape[i] = shape[i]);
    t.data = be->alloc(tensor_bytes(&t) + 16);
    return t;
}

/* random N(0, std) BF16 (or F32) values, generated on the host in F32 and cast on the device */
static Tensor dev_randn(Rng *rng, DType dt, int ndim, const int64_t *shape, double std) {
    Tensor f = dev_tensor(DT_F32, ndim, shape), t = dev_tensor(dt, ndim, shape);
    float *h = xmalloc((size_t)f.numel * sizeof(float));
    for (int64_t i = 0; i < f.numel; i++) h[i] = (float)(std * rng_normal(rng));
    be->copy_from_host(f.data, h, tensor_bytes(&f));
    be->cast(&t, &f);
    free(h);
    be->free(f.data);
    return t;
}

static void dev_free(Tensor *t) {
    if (t->data) be->free(t->data);
    t->data = NULL;
}

typedef struct {
    double fwd, bwd;
} Times;

/* A leaf activation of the benchmark: persistent data and gradient, outside the engine's arena. */
static Tensor *leaf(Tensor *t, Tensor *grad) {
    t->requires_grad = true;
    t->grad = grad;
    be->zero(grad->data, tensor_bytes(grad));
    return t;
}

/* One layer's attention forward and backward through the engine, as the model runs it: dense softmax
 * attention (the dense layer's), or MSA's chain (layers/msa.h msa_attend: indexer, plan, sparse attention
 * and KL, the KL's value into kl) with the backward seeded by dout and the KL's gradient 1, or that chain
 * with the KL as separate forward and backward ops (separate_kl: before issue 14). Adds the forward and
 * backward wall times. */
typedef struct AttentionRun {
    Engine *e;
    const MsaSettings *msa; /* NULL: dense */
    bool separate_kl;
    Tensor *q, *k, *v, *qi, *ki, *cu, *dout, *one, *kl;
} AttentionRun;

/* The MSA chain with the KL as its own ops: the indexer without the student's normaliser, the plan, the
 * sparse attention, then the KL forward (normaliser and value) and, in the backward, its own node. */
static Tensor *msa_separate_kl(const AttentionRun *a, Tensor **loss) {
    Engine *e = a->e;
    const MsaParams *p = &a->msa->params;
    Tensor *topk = msa_select(e, p, a->qi, a->ki, a->cu);
    const int64_t Hkv = topk->shape[0], N = topk->shape[1];
    engine_op_begin(e);
    Tensor *plan = engine_empty(e, DT_I32, SHAPE(Hkv, msa_plan_width(N, p->topk_blocks)));
    be->msa_plan(plan, topk, a->cu, p);
    engine_op_end_named(e, "msa_plan");
    Tensor *lse;
    Tensor *out = op_msa_attention(e, a->q, a->k, a->v, topk, plan, a->cu, p, &lse);
    *loss = op_msa_kl(e, a->q, a->k, lse, a->qi, a->ki, topk, plan, a->cu, p, a->msa->kl_weight, NULL);
    return out;
}

static void attention_pass(const AttentionRun *a, Times *t) {
    engine_reset(a->e);
    sync_device();
    const double t0 = wall_seconds();
    Tensor *out, *loss = NULL;
    if (a->msa && a->separate_kl) {
        out = msa_separate_kl(a, &loss);
    } else if (a->msa) {
        MsaAttention m = msa_attend(a->e, a->msa, a->q, a->k, a->v, a->qi, a->ki, a->cu, false, a->kl, NULL);
        out = m.out, loss = m.loss;
    } else {
        out = op_attention(a->e, a->q, a->k, a->v, a->cu, 1.0f / sqrtf((float)a->q->shape[2]), NULL);
    }
    sync_device();
    const double t1 = wall_seconds();
    be->axpy(engine_grad(a->e, out), a->dout, 1.0f);
    if (loss) be->axpy(engine_grad(a->e, loss), a->one, 1.0f);
    engine_backward_tape(a->e, 0);
    sync_device();
    t->fwd += t1 - t0;
    t->bwd += wall_seconds() - t1;
}

static Times time_attention(const AttentionRun *a, int reps) {
    Times warm = {0}, t = {0};
    attention_pass(a, &warm); /* plans, workspaces, arena chunks */
    for (int r = 0; r < reps; r++) attention_pass(a, &t);
    return (Times){t.fwd / reps, t.bwd / reps};
}

/* ms per pass of one kind the profiler timed, in one phase */
static double part_ms(const Profiler *p, const char *kind, ProfPhase phase) {
    const int k = profiler_kind(p, kind);
    return k < 0 ? 0.0 : p->self[k][phase] * 1e3 / p->steps;
}

/* one attention shape: query heads, KV heads, head dim */
typedef struct {
    int64_t hq, hkv, d;
} HeadShape;

static void bench_attention(int64_t N, HeadShape shape) {
    const int64_t Hq = shape.hq, Hkv = shape.hkv, D = shape.d, Di = 128;
    const int reps = N >= 65536 ? 2 : 5;
    Rng rng;
    rng_seed(&rng, 7);
    Tensor q = dev_randn(&rng, DT_BF16, 3, (int64_t[]){N, Hq, D}, 1.0);
    Tensor k = dev_randn(&rng, DT_BF16, 3, (int64_t[]){N, Hkv, D}, 1.0);
    Tensor v = dev_randn(&rng, DT_BF16, 3, (int64_t[]){N, Hkv, D}, 1.0);
    Tensor dout = dev_randn(&rng, DT_BF16, 3, (int64_t[]){N, Hq, D}, 1.0);
    Tensor qi = dev_randn(&rng, DT_BF16, 3, (int64_t[]){N, Hkv, Di}, 1.0);
    Tensor ki = dev_randn(&rng, DT_BF16, 2, (int64_t[]){N, Di}, 1.0);
    Tensor dq = dev_tensor(DT_BF16, 3, (int64_t[]){N, Hq, D}), dk = dev_tensor(DT_BF16, 3, (int64_t[]){N, Hkv, D}),
           dv = dev_tensor(DT_BF16, 3, (int64_t[]){N, Hkv, D});
    Tensor dqi = dev_tensor(DT_BF16, 3, (int64_t[]){N, Hkv, Di}), dki = dev_tensor(DT_BF16, 2, (int64_t[]){N, Di});
    Tensor cu = dev_tensor(DT_I32, 1, (int64_t[]){2}), one = dev_tensor(DT_F32, 1, (int64_t[]){1}),
           kl = dev_tensor(DT_F32, 1, (int64_t[]){1});
    int32_t hcu[2] = {0, (int32_t)N};
    be->copy_from_host(cu.data, hcu, sizeof hcu);
    be->copy_from_host(one.data, &(float){1.0f}, sizeof(float));
    Engine e;
    engine_init(&e, be, DT_BF16, (size_t)256 << 20);
    AttentionRun run = {&e, NULL, false, leaf(&q, &dq), leaf(&k, &dk), leaf(&v, &dv), leaf(&qi, &dqi), leaf(&ki, &dki), &cu,
                        &dout, &one, &kl};

    /* dense */
    const Times dense = time_attention(&run, reps);

    /* MSA */
    Tensor *all[] = {&q, &k, &v, &dout, &qi, &ki, &dq, &dk, &dv, &dqi, &dki, &cu, &one, &kl};
    const char *missing = backend_missing(be, BACKEND_MSA);
    if (missing) {
        printf("| %lld/%lld/%lld | %6lld | %9.2f | %9.2f | %9.2f | (the CUDA backend has no %s kernel) |\n", (long long)Hq,
               (long long)Hkv, (long long)D, (long long)N, dense.fwd * 1e3,
               dense.bwd * 1e3, (dense.fwd + dense.bwd) * 1e3, missing);
        engine_free(&e);
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) dev_free(all[i]);
        return;
    }
    const MsaSettings settings = {
        .params = {.block_size = 128, .topk_blocks = 16, .init_blocks = 0, .local_blocks = 1,
                   .scale = 1.0f / sqrtf((float)D), .index_scale = 1.0f / sqrtf((float)Di)},
        .kl_weight = 1.0f,
    };
    const MsaParams *p = &settings.params;
    run.msa = &settings;
    Times msa[2];
    Profiler prof[2];
    for (int sep = 0; sep < 2; sep++) { /* the chain, then the chain before issue 14 */
        run.separate_kl = sep;
        msa[sep] = time_attention(&run, reps);
        /* the parts, for "where the time goes": the same passes under the step profiler */
        profiler_init(&prof[sep], be);
        e.prof = &prof[sep];
        for (int r = 0; r < reps; r++) {
            Times ignored = {0};
            profiler_step_begin(&prof[sep]);
            attention_pass(&run, &ignored);
            profiler_backward_end(&prof[sep]);
            profiler_step_end(&prof[sep]);
        }
        e.prof = NULL;
    }

    /* FLOPs by the spec's conventions (msa_spec.md e.1): dense causal pairs N(N+1)/2; sparse pairs at
     * most N * k * B minus the local block's causal cut, counted here as the exact support size */
    const int64_t K = p->topk_blocks;
    const double causal = (double)N * (double)(N + 1) / 2;
    const double B = p->block_size;
    double sparse = 0; /* query at position t reads min(t/B + 1, k) blocks: full ones and its partial own */
    for (int64_t t = 0; t < N; t++) {
        const int64_t own = t / p->block_size, nblk = own + 1 < K ? own + 1 : K;
        sparse += (double)(nblk - 1) * B + (double)(t - own * p->block_size + 1);
    }
    const double dense_flops = 4.0 * (double)Hq * D * causal * 3.5; /* fwd 4·H·D per pair, bwd 2.5x */
    const double dense_ms = (dense.fwd + dense.bwd) * 1e3;
    float klv = 0;
    be->copy_to_host(&klv, kl.data, sizeof klv);
    for (int sep = 0; sep < 2; sep++) {
        const Times *m = &msa[sep];
        const Profiler *pr = &prof[sep];
        printf("| %lld/%lld/%lld | %6lld | %s | %9.2f | %9.2f | %9.2f | %8.2f | %8.2f | %8.2f | %6.1fx | %5.0f |\n",
               (long long)Hq, (long long)Hkv, (long long)D, (long long)N,
               sep ? "MSA, KL ops apart (before)" : "MSA, KL in the attention bwd", dense.fwd * 1e3, dense.bwd * 1e3, dense_ms,
               m->fwd * 1e3, m->bwd * 1e3, (m->fwd + m->bwd) * 1e3, (dense.fwd + dense.bwd) / (m->fwd + m->bwd),
               dense_flops / (dense.fwd + dense.bwd) / 1e12);
        if (sep)
            printf("|        |  parts (ms, profiled): indexer %.2f, plan %.2f, attention fwd %.2f / bwd %.2f, KL fwd %.2f / bwd "
                   "%.2f |\n",
                   part_ms(pr, "msa_indexer", PROF_FORWARD), part_ms(pr, "msa_plan", PROF_FORWARD),
                   part_ms(pr, "msa_attention", PROF_FORWARD), part_ms(pr, "msa_attention", PROF_BACKWARD),
                   part_ms(pr, "msa_kl", PROF_FORWARD), part_ms(pr, "msa_kl", PROF_BACKWARD));
        else {
            /* the sparse attention's rate on the pairs it computes, by the dense row's convention (the
             * backward's KL work is not counted: the rate is a lower bound for the attention alone) */
            const double fwd = part_ms(pr, "msa_attention_kl", PROF_FORWARD), bwd = part_ms(pr, "msa_attention_kl", PROF_BACKWARD);
            printf("|        |  parts (ms, profiled): indexer (with idx_lse) %.2f, plan %.2f, attention fwd %.2f, attention + KL "
                   "bwd %.2f; KL %.5g; sparse pairs %.3g (%.1f%% of causal), sparse attention %.0f TFLOP/s on them |\n",
                   part_ms(pr, "msa_indexer", PROF_FORWARD), part_ms(pr, "msa_plan", PROF_FORWARD), fwd, bwd, klv, sparse,
                   100.0 * sparse / causal, 4.0 * (double)Hq * D * sparse * 3.5 / ((fwd + bwd) * 1e-3) / 1e12);
        }
    }
    fflush(stdout);
    engine_free(&e);
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) dev_free(all[i]);
}

/* comma-separated integers into out (at most max); returns the count */
static int parse_list(const char *s, int64_t *out, int max) {
    int n = 0;
    for (const char *p = s; *p && n < max;) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v <= 0) fatal("bench: bad number list '%s'", s);
        out[n++] = v;
        p = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* comma-separated HQ/HKV/D triples into out (at most max); returns the count */
static int parse_shapes(const char *s, HeadShape *out, int max) {
    int n = 0;
    for (const char *p = s; *p && n < max;) {
        long long hq, hkv, d;
        int used = 0;
        if (sscanf(p, "%lld/%lld/%lld%n", &hq, &hkv, &d, &used) != 3 || hq <= 0 || hkv <= 0 || d <= 0 || hq % hkv)
            fatal("bench: bad head shape list '%s' (HQ/HKV/D,..., HKV dividing HQ)", s);
        out[n++] = (HeadShape){hq, hkv, d};
        p += used;
        if (*p == ',') p++;
    }
    return n;
}

int main(int argc, char **argv) {
    const char *only = NULL, *models = "dense,moe";
    int64_t sizes[8] = {8192, 32768, 131072}, contexts[8] = {4096, 32768};
    int nsizes = 3, ncontexts = 2;
    /* the issue-14 shape, then the ~1.1B model's attention */
    HeadShape shapes[8] = {{64, 4, 128}, {32, 4, 64}};
    int nshapes = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--sizes") && i + 1 < argc) nsizes = parse_list(argv[++i], sizes, 8);
        else if (!strcmp(argv[i], "--contexts") && i + 1 < argc) ncontexts = parse_list(argv[++i], contexts, 8);
        else if (!strcmp(argv[i], "--models") && i + 1 < argc) models = argv[++i];
        else if (!strcmp(argv[i], "--heads") && i + 1 < argc) nshapes = parse_shapes(argv[++i], shapes, 8);
        else {
            fprintf(stderr,
                    "usage: %s [--only train|attention] [--sizes N,...] [--heads HQ/HKV/D,...] [--contexts T,...] "
                    "[--models dense,moe]\n",
                    argv[0]);
            return 2;
        }
    }
    const char *attn = getenv("MSA_ATTENTION");
    printf("dense attention path: %s\n\n", attn && *attn ? attn : "default (cuDNN where supported)");
    if (!only || !strcmp(only, "train")) {
        printf("(a) training throughput, BF16 activations, F32 master weights and AdamW, 1 GPU\n\n");
        printf("| model | params total / active | context | tokens/step | micro-batches x batch | recompute | ms/step | Ktok/s | MFU "
               "| loss |\n");
        printf("|---|---|---|---|---|---|---|---|---|---|\n");
        static const ModelKind kinds[] = {{"dense", false}, {"moe", true}};
        for (int mi = 0; mi < 2; mi++) {
            if (!strstr(models, kinds[mi].name)) continue;
            if (kinds[mi].moe && backend_missing(be, BACKEND_MOE)) {
                printf("| moe | (the CUDA backend has no %s kernel) |\n", backend_missing(be, BACKEND_MOE));
                continue;
            }
            for (int ci = 0; ci < ncontexts; ci++) {
                const int64_t ctx = contexts[ci];
                bench_train(&kinds[mi], (int)ctx, ctx >= 16384 ? ctx : 16384);
            }
        }
        printf("\n");
    }
    if (!only || !strcmp(only, "attention")) {
        printf("(b) one attention layer, forward + backward, heads H_q/H_kv/d, one document; MSA: block 128, "
               "top-k 16, d_idx 128 (indexer + plan + sparse attention + KL)\n\n");
        printf("| heads | tokens | MSA chain | dense fwd ms | dense bwd ms | dense total | MSA fwd | MSA bwd | MSA total | speed-up | "
               "dense TFLOP/s |\n");
        printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (int h = 0; h < nshapes; h++)
            for (int i = 0; i < nsizes; i++) bench_attention(sizes[i], shapes[h]);
    }
    return 0;
}
#endif
