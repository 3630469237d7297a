/* Tests of the step profiler (train.profile_steps, autograd/profile.h) on the CPU backend with
 * configs/tiny.json: profiling leaves the losses bit-identical; the table has the model's ops with the
 * exact call counts and times forward and backward; op self times + optimizer + other add up to the
 * profiled step wall time (measured apart, so a wrongly nested bracket shows); under train.recompute the
 * replayed forward is charged to its ops as recompute time, not to checkpoint; MSA and MoE runs time
 * their untaped work (indexer, plans, Top-k); build/train prints the table, writes out_dir/profile.md and
 * rejects bad values naming the key. The memory columns: bytes charged per op kind and phase on a tiny graph
 * equal the sizes computed by hand, and on the model runs they sum to the arena's peak. Run from the repository root after `make data` (make test does). */
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../kernels/util.h"
#include "../autograd/ops.h"
#include "../train/trainer.h"
#include "gradcheck.h"
#include "test.h"

#define TINY "configs/tiny.json"
#define STEPS 5   /* steps per run */
#define PROFILED 3 /* profiled steps: 2-4 (the first is never profiled) */

typedef struct Result {
    double losses[STEPS];
    Profiler prof;  /* a copy of the run's profiler (zero when not profiling) */
    double outer;   /* wall time of the profiled run_step calls, measured around them */
    bool detached;  /* the engine had no profiler attached after the run */
    size_t high_water; /* the activation arena's high-water mark over the whole run */
} Result;

typedef struct Fixture {
    Result plain, profiled, recompute, recompute_profiled, msa_moe;
    char dir[64]; /* out_dir of the MSA/MoE run */
} Fixture;

#define FX ((Fixture *)tc->fixture)

/* STEPS steps of the tiny config (with `sets`, "section.key=value" strings, NULL-terminated) */
static void train(Result *res, int profile_steps, bool recompute, const char *const *sets) {
    Run r;
    memset(&r, 0, sizeof r);
    memset(res, 0, sizeof *res);
    r.quiet = true;
    config_defaults(&r.cfg);
    config_load(&r.cfg, TINY);
    r.cfg.train.steps = STEPS;
    r.cfg.train.recompute = recompute;
    r.cfg.train.profile_steps = profile_steps;
    for (int i = 0; sets && sets[i]; i++) config_set(&r.cfg, sets[i]);
    r.config_path = TINY;
    run_init(&r);
    for (int s = 0; s < STEPS; s++) {
        int before = r.prof ? r.prof->steps : 0;
        double t = wall_seconds();
        res->losses[s] = run_step(&r).loss;
        if (r.prof && r.prof->steps > before) res->outer += wall_seconds() - t;
    }
    if (r.prof) res->prof = *r.prof;
    res->detached = r.engine.prof == NULL;
    res->high_water = r.engine.data.high_water;
    run_free(&r);
}

static double phase_sum(const Profiler *p, ProfPhase ph) {
    double t = 0.0;
    for (int k = 0; k < PROF_KIND_MAX; k++) t += p->self[k][ph];
    return t;
}

/* every self time >= 0, other >= 0, and self + optimizer + other = wall (up to rounding) */
static bool adds_up(const Profiler *p, char *why, size_t n) {
    double sum = 0.0;
    for (int k = 0; k < PROF_KIND_MAX; k++)
        for (int ph = 0; ph < PROF_PHASES; ph++) {
            if (p->self[k][ph] < 0) {
                snprintf(why, n, "%s phase %d: self time %g s < 0", profiler_kind_name(p, k), ph, p->self[k][ph]);
                return false;
            }
            sum += p->self[k][ph];
        }
    if (p->other < 0 || p->optimizer <= 0 || p->wall <= 0) {
        snprintf(why, n, "other %g s, optimizer %g s, wall %g s", p->other, p->optimizer, p->wall);
        return false;
    }
    double total = sum + p->optimizer + p->other;
    if (fabs(total - p->wall) > 1e-6 + 1e-6 * p->wall) {
        snprintf(why, n, "ops %.6f + optimizer %.6f + other %.6f = %.6f s, but the wall time is %.6f s", sum,
                 p->optimizer, p->other, total, p->wall);
        return false;
    }
    return true;
}

TEST(profiling_leaves_losses_bit_identical) {
    EXPECT(FX->profiled.prof.steps == PROFILED && FX->recompute_profiled.prof.steps == PROFILED,
           "profiled %d and %d steps, expected %d", FX->profiled.prof.steps, FX->recompute_profiled.prof.steps,
           PROFILED);
    EXPECT(FX->profiled.detached && FX->recompute_profiled.detached, "the engine still has the profiler attached");
    EXPECT(memcmp(FX->plain.losses, FX->profiled.losses, sizeof FX->plain.losses) == 0,
           "profiling changed the losses (step 3: %.9f vs %.9f)", FX->plain.losses[2], FX->profiled.losses[2]);
    EXPECT(memcmp(FX->recompute.losses, FX->recompute_profiled.losses, sizeof FX->plain.losses) == 0,
           "profiling changed the losses under recomputation");
    EXPECT(memcmp(FX->plain.losses, FX->recompute_profiled.losses, sizeof FX->plain.losses) == 0,
           "profiled recomputation differs from the plain run");
}

/* configs/tiny.json: 2 layers, each 7 linears (q, k, v, o, gate, up, down), one attention; the LM head
 * and its cross-entropy are one lm_head_loss; the residual adds go into the norms after them
 * (add_rmsnorm): only the first block's attention norm has none before it */
TEST(rows_for_linear_attention_lm_head_loss) {
    const Profiler *p = &FX->profiled.prof;
    const struct {
        int kind;
        int per_step;
    } want[] = {{OP_linear, 14}, {OP_attention, 2}, {OP_lm_head_loss, 1}, {OP_rmsnorm, 1}, {OP_add_rmsnorm, 4},
                 {OP_embedding, 1}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const int k = want[i].kind;
        const char *name = profiler_kind_name(p, k);
        EXPECT(p->calls[k][PROF_FORWARD] == (int64_t)want[i].per_step * PROFILED, "%s: %lld forward calls, expected %d",
               name, (long long)p->calls[k][PROF_FORWARD], want[i].per_step * PROFILED);
        EXPECT(p->calls[k][PROF_BACKWARD] == p->calls[k][PROF_FORWARD], "%s: %lld backward calls for %lld forward",
               name, (long long)p->calls[k][PROF_BACKWARD], (long long)p->calls[k][PROF_FORWARD]);
        EXPECT(p->self[k][PROF_FORWARD] > 0 && p->self[k][PROF_BACKWARD] > 0, "%s: forward %g s, backward %g s", name,
               p->self[k][PROF_FORWARD], p->self[k][PROF_BACKWARD]);
        EXPECT(p->calls[k][PROF_RECOMPUTE] == 0 && p->self[k][PROF_RECOMPUTE] == 0, "%s: recompute without recompute",
               name);
    }
    EXPECT(p->calls[OP_checkpoint][PROF_FORWARD] == 0, "checkpoint called without train.recompute");
    EXPECT(strcmp(profiler_kind_name(p, OP_linear), "linear") == 0 && profiler_kind(p, "linear") == OP_linear,
           "kind names: %s, %d", profiler_kind_name(p, OP_linear), profiler_kind(p, "linear"));
    EXPECT(p->n_named == 0 && profiler_kind(p, "msa_indexer") == -1, "a dense model timed %d names of untaped work",
           p->n_named);
}

TEST(times_add_up_to_the_step_wall_time) {
    const Result *runs[] = {&FX->profiled, &FX->recompute_profiled, &FX->msa_moe};
    const char *names[] = {"plain", "recompute", "msa+moe"};
    char why[256];
    for (int i = 0; i < 3; i++) {
        const Profiler *p = &runs[i]->prof;
        EXPECT(adds_up(p, why, sizeof why), "%s run: %s", names[i], why);
        /* the profiler's wall time lies inside the run_step calls, and is most of them */
        EXPECT(p->wall <= runs[i]->outer + 1e-6 && p->wall >= 0.5 * runs[i]->outer,
               "%s run: profiled wall %.6f s, run_step calls %.6f s", names[i], p->wall, runs[i]->outer);
        printf("    %s: %.2f ms/step profiled (ops %.2f, optimizer %.2f, other %.2f)\n", names[i], 1e3 * p->wall / p->steps,
               1e3 * (phase_sum(p, PROF_FORWARD) + phase_sum(p, PROF_RECOMPUTE) + phase_sum(p, PROF_BACKWARD)) / p->steps,
               1e3 * p->optimizer / p->steps, 1e3 * p->other / p->steps);
    }
}

/* With train.recompute every block's forward runs twice: once without recording inside checkpoint's
 * forward (counted as the ops' forward, as without recompute) and once replayed in checkpoint's backward
 * (the ops' recompute). checkpoint itself keeps only its copies. A checkpointed block adds its FFN output
 * itself (one tensor leaves it), where a block on the tape leaves that add to the next norm: per block one
 * add and one rmsnorm more, one add_rmsnorm fewer. */
TEST(recompute_not_double_counted) {
    const Profiler *p = &FX->profiled.prof, *q = &FX->recompute_profiled.prof;
    const int ck = OP_checkpoint, layers = 2;
    EXPECT(q->n_named == p->n_named, "%d names of untaped work with recompute, %d without", q->n_named, p->n_named);
    for (int k = 0; k < OP_COUNT + q->n_named; k++) {
        const int kp = profiler_kind(p, profiler_kind_name(q, k)); /* the same op or name in the other run */
        if (k == ck) continue;
        const int64_t more = (k == OP_add || k == OP_rmsnorm ? 1 : k == OP_add_rmsnorm ? -1 : 0) * layers * PROFILED;
        EXPECT(kp >= 0 && q->calls[k][PROF_FORWARD] == p->calls[kp][PROF_FORWARD] + more &&
                   q->calls[k][PROF_BACKWARD] == p->calls[kp][PROF_BACKWARD] + more,
               "%s: forward/backward calls %lld/%lld with recompute, %lld/%lld without", profiler_kind_name(q, k),
               (long long)q->calls[k][PROF_FORWARD], (long long)q->calls[k][PROF_BACKWARD],
               kp >= 0 ? (long long)p->calls[kp][PROF_FORWARD] : -1LL, kp >= 0 ? (long long)p->calls[kp][PROF_BACKWARD] : -1LL);
    }
    EXPECT(q->calls[ck][PROF_FORWARD] == layers * PROFILED && q->calls[ck][PROF_BACKWARD] == layers * PROFILED,
           "checkpoint: %lld forward, %lld backward calls", (long long)q->calls[ck][PROF_FORWARD],
           (long long)q->calls[ck][PROF_BACKWARD]);
    /* the replay: the blocks' ops, not the embedding, final norm, LM head or loss */
    const struct {
        int kind, per_step;
    } replay[] = {{OP_linear, 14}, {OP_attention, 2}, {OP_rmsnorm, 2}, {OP_add_rmsnorm, 2}, {OP_add, 2},
                   {OP_cross_entropy, 0}, {OP_embedding, 0}};
    for (size_t i = 0; i < sizeof replay / sizeof replay[0]; i++) {
        const int k = replay[i].kind;
        EXPECT(q->calls[k][PROF_RECOMPUTE] == (int64_t)replay[i].per_step * PROFILED, "%s: %lld recompute calls, expected %d",
               profiler_kind_name(q, k), (long long)q->calls[k][PROF_RECOMPUTE], replay[i].per_step * PROFILED);
        EXPECT((q->self[k][PROF_RECOMPUTE] > 0) == (replay[i].per_step > 0), "%s: recompute time %g s",
               profiler_kind_name(q, k), q->self[k][PROF_RECOMPUTE]);
    }
    EXPECT(q->self[ck][PROF_RECOMPUTE] == 0, "checkpoint charged recompute time");
    /* checkpoint's own time is its copies: small against the forward it replays; charged inclusively it
     * would exceed the whole recompute plus the blocks' backward */
    const double ck_self = profiler_kind_total(q, ck), replayed = phase_sum(q, PROF_RECOMPUTE);
    EXPECT(ck_self < 0.2 * replayed, "checkpoint self time %.3f ms vs %.3f ms of recomputed ops", 1e3 * ck_self,
           1e3 * replayed);
}

static bool contains(const char *path, const char *what) {
    FILE *f = fopen(path, "r");
    if (!f) return false;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    return strstr(buf, what) != NULL;
}

/* MSA attention and MoE FFNs, recomputed: the untaped work has rows of its own, forward and recompute only;
 * the sparse phase's MSA is one op (attention and KL, the KL computed by its backward): no KL forward. Its first
 * forward's plan is written by the indexer (with idx_lse, timed as msa_indexer); the replay rebuilds it from the
 * kept selection (msa_plan, recompute only) */
TEST(msa_moe_untaped_work_and_profile_file) {
    const Profiler *p = &FX->msa_moe.prof;
    EXPECT(p->steps == 2, "profiled %d steps, expected 2", p->steps);
    const int taped[] = {OP_msa_attention_kl, OP_grouped_linear, OP_moe_router_scores, OP_moe_permute,
                         OP_moe_unpermute, OP_moe_combine_weights};
    for (size_t i = 0; i < sizeof taped / sizeof taped[0]; i++) {
        const int k = taped[i];
        EXPECT(p->calls[k][PROF_FORWARD] > 0 && p->calls[k][PROF_RECOMPUTE] > 0 && p->calls[k][PROF_BACKWARD] > 0 &&
                   p->self[k][PROF_FORWARD] > 0 && p->self[k][PROF_BACKWARD] > 0,
               "%s: calls %lld/%lld/%lld", profiler_kind_name(p, k), (long long)p->calls[k][PROF_FORWARD],
               (long long)p->calls[k][PROF_RECOMPUTE], (long long)p->calls[k][PROF_BACKWARD]);
    }
    EXPECT(p->calls[OP_msa_kl][PROF_FORWARD] == 0 && p->calls[OP_msa_attention][PROF_FORWARD] == 0,
           "the sparse phase ran %lld KL forwards and %lld separate attention ops", (long long)p->calls[OP_msa_kl][PROF_FORWARD],
           (long long)p->calls[OP_msa_attention][PROF_FORWARD]);
    const char *untaped[] = {"msa_indexer", "msa_plan", "moe_topk", "moe_plan"};
    for (size_t i = 0; i < sizeof untaped / sizeof untaped[0]; i++) {
        const int k = profiler_kind(p, untaped[i]);
        EXPECT(k >= OP_COUNT, "%s: no row of its own (kind %d)", untaped[i], k);
        const bool plan = !strcmp(untaped[i], "msa_plan");
        EXPECT(p->calls[k][PROF_FORWARD] == (plan ? 0 : 2 * 2) && p->calls[k][PROF_RECOMPUTE] == 2 * 2 &&
                   p->calls[k][PROF_BACKWARD] == 0 && p->self[k][plan ? PROF_RECOMPUTE : PROF_FORWARD] > 0,
               "%s: calls %lld/%lld/%lld (2 layers, 2 steps)", profiler_kind_name(p, k), (long long)p->calls[k][PROF_FORWARD],
               (long long)p->calls[k][PROF_RECOMPUTE], (long long)p->calls[k][PROF_BACKWARD]);
    }
    char path[128];
    snprintf(path, sizeof path, "%s/profile.md", FX->dir);
    EXPECT(contains(path, "## Step profile: steps 2-3 of configs/tiny.json (cpu backend), ms per step, mean of 2 steps"),
           "%s: no heading", path);
    EXPECT(contains(path, "| op | calls/step | forward ms/step | recompute ms/step | backward ms/step | total ms/step | % of step |"),
           "%s: no table header", path);
    EXPECT(contains(path, "| msa_indexer | 2 |") && contains(path, "| msa_attention_kl | 2 |") && contains(path, "| optimizer") &&
               contains(path, "| other") && contains(path, "| step wall time (profiled"),
           "%s: rows missing", path);
}

/* build/train with args: stdout into out, stderr into err; the exit status */
static int train_cli(const char *args, char *out, size_t on, char *err, size_t en) {
    char cmd[1024], outpath[64], errpath[64];
    snprintf(outpath, sizeof outpath, "/tmp/msa_profile_out_%d.txt", (int)getpid());
    snprintf(errpath, sizeof errpath, "/tmp/msa_profile_err_%d.txt", (int)getpid());
    snprintf(cmd, sizeof cmd, "build/train %s >%s 2>%s", args, outpath, errpath);
    int st = test_system(cmd, errpath, err, en, false);
    FILE *f = fopen(outpath, "r");
    size_t n = f ? fread(out, 1, on - 1, f) : 0;
    out[n] = 0;
    if (f) fclose(f);
    remove(outpath);
    remove(errpath);
    return st;
}

TEST(cli_prints_the_table_and_rejects_bad_values) {
    static char out[1 << 16], err[4096];
    const char *base = TINY " --set train.steps=3 --set train.eval_every=0 --set train.eval_batches=1";
    char args[512];
    snprintf(args, sizeof args, "%s --set train.profile_steps=1", base);
    EXPECT(train_cli(args, out, sizeof out, err, sizeof err) == 0, "exit status != 0: %s", err);
    EXPECT(strstr(out, "## Step profile: steps 2-2 of configs/tiny.json (cpu backend)") && strstr(out, "| linear | 14 |") &&
               strstr(out, "| attention | 2 |") && strstr(out, "| lm_head_loss | 1 |") && strstr(out, "| step wall time"),
           "no table in the output:\n%s", out);
    EXPECT(!strstr(out, "| checkpoint |"), "a checkpoint row without recompute");
    snprintf(args, sizeof args, "%s --set train.profile_steps=5", base);
    EXPECT(train_cli(args, out, sizeof out, err, sizeof err) == 0, "exit status != 0: %s", err);
    EXPECT(strstr(out, "## Step profile: steps 2-3 of configs/tiny.json (cpu backend), ms per step, mean of 2 steps "
                       "(the run ended before train.profile_steps)"),
           "no partial table:\n%s", out);
    snprintf(args, sizeof args, "%s --set train.steps=1 --set train.profile_steps=2", base);
    EXPECT(train_cli(args, out, sizeof out, err, sizeof err) == 0 && strstr(out, "no step profiled") &&
               !strstr(out, "## Step profile"),
           "one step, profile_steps 2:\n%s", out);
    EXPECT(train_cli(TINY " --set train.profile_steps=-1", out, sizeof out, err, sizeof err) == 1 &&
               strstr(err, "train.profile_steps"),
           "negative value: %s", err);
    EXPECT(train_cli(TINY " --set train.profile_steps=two", out, sizeof out, err, sizeof err) == 1 &&
               strstr(err, "train.profile_steps"),
           "not a number: %s", err);
    EXPECT(train_cli(TINY " --set train.profile_step=2", out, sizeof out, err, sizeof err) == 1 &&
               strstr(err, "profile_steps"),
           "misspelt key (should suggest train.profile_steps): %s", err);
}

/* Bytes an arena allocation of n bytes takes (ARENA_ALIGN, autograd/arena.c). */
static size_t aligned(size_t n) { return (n + 63) / 64 * 64; }

/* A graph small enough to count by hand: x [3,5] and w [7,5] made outside every op (other), y = x w^T
 * (linear forward: y), the cross-entropy of y (forward: loss and lse), backward: the seed's gradient and
 * ones (other), dy (cross_entropy backward), dx and dw (linear backward). Nothing is released, so the
 * peak is their sum. Then a checkpointed segment (linear, scale) whose backward's replay frees what it
 * made: the peak falls inside open brackets, and the columns still sum to it. */
TEST(memory_columns_count_each_allocation) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Profiler p;
    profiler_init(&p, &cpu_backend);
    engine_set_profiler(&e, &p);
    profiler_step_begin(&p);
    Tensor *x = engine_zeros(&e, DT_F32, SHAPE(3, 5)), *w = engine_zeros(&e, DT_F32, SHAPE(7, 5));
    Tensor *targets = engine_zeros(&e, DT_I32, SHAPE(3));
    x->requires_grad = w->requires_grad = true;
    Tensor *loss = op_cross_entropy(&e, op_linear(&e, x, w), targets, -1);
    engine_backward(&e, loss);
    profiler_backward_end(&p);
    profiler_step_end(&p);
    const size_t other = aligned(60) + aligned(140) + aligned(12) + 2 * aligned(4);
    const size_t linear_fwd = aligned(84), linear_bwd = aligned(60) + aligned(140);
    const size_t ce_fwd = aligned(4) + aligned(12), ce_bwd = aligned(84);
    EXPECT(profiler_peak_bytes(&p, PROF_OTHER) == other, "other: %zu bytes, expected %zu",
           profiler_peak_bytes(&p, PROF_OTHER), other);
    EXPECT(profiler_peak_forward_bytes(&p, OP_linear) == linear_fwd &&
               profiler_peak_bytes(&p, OP_linear) == linear_fwd + linear_bwd,
           "linear: %zu bytes (%zu forward), expected %zu (%zu)", profiler_peak_bytes(&p, OP_linear),
           profiler_peak_forward_bytes(&p, OP_linear), linear_fwd + linear_bwd, linear_fwd);
    EXPECT(profiler_peak_forward_bytes(&p, OP_cross_entropy) == ce_fwd &&
               profiler_peak_bytes(&p, OP_cross_entropy) == ce_fwd + ce_bwd,
           "cross_entropy: %zu bytes (%zu forward), expected %zu (%zu)", profiler_peak_bytes(&p, OP_cross_entropy),
           profiler_peak_forward_bytes(&p, OP_cross_entropy), ce_fwd + ce_bwd, ce_fwd);
    const size_t total = other + linear_fwd + linear_bwd + ce_fwd + ce_bwd;
    EXPECT(p.peak == total && e.data.high_water == total, "peak %zu, arena high water %zu, expected %zu", p.peak,
           e.data.high_water, total);
    engine_set_profiler(&e, NULL);
    EXPECT(e.data.observe == NULL, "the arena is still watched after detaching");
    profiler_free(&p);
    engine_free(&e);
}

static Tensor *linear_scale_segment(Engine *e, Tensor *x, const void *closure, Tensor **aux) {
    *aux = NULL;
    return op_scale(e, op_linear(e, x, (Tensor *)closure), 0.5f);
}

static size_t columns_sum(const Profiler *p) {
    size_t sum = 0;
    for (int k = 0; k <= PROF_OTHER; k++) sum += profiler_peak_bytes(p, k);
    return sum;
}

TEST(memory_columns_sum_to_the_peak_under_checkpointing) {
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Profiler p;
    profiler_init(&p, &cpu_backend);
    engine_set_profiler(&e, &p);
    profiler_step_begin(&p);
    Tensor *x = engine_zeros(&e, DT_F32, SHAPE(4, 6)), *w = engine_zeros(&e, DT_F32, SHAPE(6, 6));
    x->requires_grad = w->requires_grad = true;
    Tensor *y = op_checkpoint(&e, linear_scale_segment, w, x, NULL);
    Tensor *seed = engine_zeros(&e, DT_F32, SHAPE(4, 6));
    engine_backward_from(&e, y, seed, 0);
    profiler_backward_end(&p);
    profiler_step_end(&p);
    /* the replay's linear and scale outputs and the scale's dx are released by checkpoint's backward:
     * they count at the peak (inside its bracket) as recompute and backward of their ops */
    const size_t act = aligned(4 * 6 * 4);
    EXPECT(p.peak == e.data.high_water && columns_sum(&p) == p.peak, "columns sum %zu, peak %zu, arena high water %zu",
           columns_sum(&p), p.peak, e.data.high_water);
    EXPECT(p.peak_bytes[OP_linear][PROF_RECOMPUTE] == act && p.peak_bytes[OP_scale][PROF_RECOMPUTE] == act,
           "recompute bytes at the peak: linear %zu, scale %zu, expected %zu each", p.peak_bytes[OP_linear][PROF_RECOMPUTE],
           p.peak_bytes[OP_scale][PROF_RECOMPUTE], act);
    EXPECT(p.live_bytes[OP_linear][PROF_RECOMPUTE] == 0 && p.n_allocs > 0,
           "after the backward %zu bytes of the replay are still charged as live", p.live_bytes[OP_linear][PROF_RECOMPUTE]);
    engine_set_profiler(&e, NULL);
    profiler_free(&p);
    engine_free(&e);
}

TEST(memory_columns_of_the_model_runs) {
    const Result *runs[] = {&FX->profiled, &FX->recompute_profiled, &FX->msa_moe};
    for (int i = 0; i < 3; i++) {
        const Profiler *p = &runs[i]->prof;
        EXPECT(p->peak > 0 && columns_sum(p) == p->peak && p->peak <= runs[i]->high_water,
               "run %d: columns sum %zu, peak %zu, arena high water %zu", i, columns_sum(p), p->peak, runs[i]->high_water);
    }
    /* recomputation holds less at the peak than keeping every block's activations */
    EXPECT(FX->recompute_profiled.prof.peak < FX->profiled.prof.peak, "peak %zu with recompute, %zu without",
           FX->recompute_profiled.prof.peak, FX->profiled.prof.peak);
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

int main(void) {
    TEST_BEGIN();
    static Fixture fx;
    tc->fixture = &fx;
    train(&fx.plain, 0, false, NULL);
    train(&fx.profiled, PROFILED, false, NULL);
    train(&fx.recompute, 0, true, NULL);
    train(&fx.recompute_profiled, PROFILED, true, NULL);
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_profile_test_XXXXXX");
    if (!mkdtemp(fx.dir)) {
        perror("mkdtemp");
        return 1;
    }
    char out_dir[96];
    snprintf(out_dir, sizeof out_dir, "train.out_dir=%s", fx.dir);
    const char *msa_moe[] = {"model.attention=msa", "msa.block_size=16", "msa.topk_blocks=2", "msa.index_dim=16",
                             "model.ffn=moe", "moe.num_experts=4", "moe.expert_dim=32", out_dir, NULL};
    train(&fx.msa_moe, 2, true, msa_moe);
    RUN(profiling_leaves_losses_bit_identical);
    RUN(rows_for_linear_attention_lm_head_loss);
    RUN(times_add_up_to_the_step_wall_time);
    RUN(recompute_not_double_counted);
    RUN(msa_moe_untaped_work_and_profile_file);
    RUN(cli_prints_the_table_and_rejects_bad_values);
    RUN(memory_columns_count_each_allocation);
    RUN(memory_columns_sum_to_the_peak_under_checkpointing);
    RUN(memory_columns_of_the_model_runs);
    nftw(fx.dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    TEST_END();
}
