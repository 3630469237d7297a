/* Expert parallelism on the CPU (issue 7): the MoE layers' routed experts split over the ranks of an ep
 * group, tokens dispatched to their experts' ranks and back by all-to-all (autograd/op_ep.c).
 *   - the dispatch layout (pure arithmetic) against a simulated group of ranks, in-process;
 *   - one MoE layer under mpirun (this program in its `--layer EP` mode): each rank's outputs, input
 *     gradients, router and shared-expert gradients equal the single-process layer's on that rank's
 *     tokens, and its experts' weight gradients equal the sum over every rank's tokens (float64);
 *   - build/train: EP-2 (2 ranks, dist.ep = 2) and EP-2 x DP-2 (4 ranks) equal the single process with
 *     the same global batch over 10 steps (losses, gradient norms, final parameters and AdamW moments
 *     within fp32 tolerance); EP-4 too;
 *   - EP-2 x CP-2 (4 ranks) equals the single process as well;
 *   - a checkpoint written with ep = 2 (all experts in it) resumes on 1 rank and on ep = 4 and ends where
 *     the uninterrupted run ends; train.init_from under ep = 2 trains as the single process does;
 *   - moe.num_experts not divisible by dist.ep is refused with a message.
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../dist/dist.h"
#include "../kernels/util.h"
#include "../layers/moe.h"
#include "dist_harness.h"
#include "gradcheck.h"
#include "test.h"

/* Every build/train run of this program (the harness adds it): 2 MoE layers of 8 experts, top-2, one
 * shared expert; 8 sequences of 64 tokens per step. The balance loss is off: it is the product of per-rank
 * batch means by design (layers/moe.h), so it is not the global batch's; the z-loss (a mean over tokens)
 * and the selection-bias update (global loads) are on. */
#define MOE                                                                                                    \
    "--set model.ffn=moe --set moe.num_experts=8 --set moe.experts_per_token=2 --set moe.expert_dim=32 "       \
    "--set moe.shared_experts=1 --set moe.aux_loss_weight=0 --set moe.z_loss_weight=0.001 "                     \
    "--set moe.bias_update_rate=0.01"

#define FX ((DistHarness *)tc->fixture)

/* ---- the dispatch layout, in-process ------------------------------------------------------------ */

/* P simulated ranks with random expert loads (some zero): the all-to-allv each rank's layout describes,
 * done by hand, then the permutation, must put every rank's rows for local expert j into segment j,
 * sources in rank order and each source's rows in its order; the inverse gives every row back. */
TEST(dispatch_layout_groups_rows_by_local_expert) {
    enum { P = 3, El = 3, E = P * El };
    Rng rng;
    rng_seed(&rng, 42);
    int32_t off[P][E + 1];
    int64_t send_rows[P][P], send_first[P][P], recv_rows[P][P], recv_first[P][P];
    for (int s = 0; s < P; s++) {
        off[s][0] = 0;
        for (int x = 0; x < E; x++) off[s][x + 1] = off[s][x] + (int32_t)(rng_next(&rng) % 4); /* 0..3 rows */
        ep_send_layout(off[s], P, El, send_rows[s], send_first[s]);
    }
    for (int q = 0; q < P; q++) {
        /* what the count exchange gives rank q: [s][j] = rows rank s has for expert q*El + j */
        int32_t counts[P * El], local_off[El + 1];
        for (int s = 0; s < P; s++)
            for (int j = 0; j < El; j++) counts[s * El + j] = off[s][q * El + j + 1] - off[s][q * El + j];
        int64_t M = ep_recv_layout(counts, P, El, recv_rows[q], recv_first[q], local_off);
        EXPECT(local_off[El] == M, "rank %d: segments end at %d, %lld rows", q, local_off[El], (long long)M);
        /* a row is (source, expert, index in the source's segment); the exchange by hand */
        int32_t *recv = xmalloc((size_t)(M + 1) * 3 * sizeof(int32_t)), *xr = xmalloc((size_t)(M + 1) * 3 * sizeof(int32_t));
        int32_t *order = xmalloc((size_t)(M + 1) * sizeof(int32_t));
        for (int s = 0; s < P; s++) {
            EXPECT(recv_rows[q][s] == send_rows[s][q], "rank %d expects %lld rows from %d, which sends %lld", q,
                   (long long)recv_rows[q][s], s, (long long)send_rows[s][q]);
            for (int64_t i = 0; i < send_rows[s][q]; i++) {
                int64_t row = send_first[s][q] + i; /* row of rank s's expert-grouped buffer */
                int x = 0;
                while (off[s][x + 1] <= row) x++;
                int32_t *dst = recv + 3 * (recv_first[q][s] + i);
                dst[0] = s, dst[1] = x, dst[2] = (int32_t)(row - off[s][x]);
            }
        }
        ep_recv_order(counts, P, El, local_off, order);
        for (int64_t t = 0; t < M; t++) memcpy(xr + 3 * order[t], recv + 3 * t, 3 * sizeof(int32_t));
        int64_t t = 0;
        for (int j = 0; j < El; j++) {
            EXPECT(t == local_off[j], "rank %d: expert %d starts at %d, not %lld", q, j, local_off[j], (long long)t);
            for (int s = 0; s < P; s++)
                for (int i = 0; i < counts[s * El + j]; i++, t++)
                    EXPECT(xr[3 * t] == s && xr[3 * t + 1] == q * El + j && xr[3 * t + 2] == i,
                           "rank %d row %lld: (%d, %d, %d), expected (%d, %d, %d)", q, (long long)t, xr[3 * t],
                           xr[3 * t + 1], xr[3 * t + 2], s, q * El + j, i);
        }
        /* the inverse gather restores the received order */
        for (int64_t u = 0; u < M; u++) EXPECT(!memcmp(xr + 3 * order[u], recv + 3 * u, 3 * sizeof(int32_t)), "inverse");
        free(recv), free(xr), free(order);
    }
}

/* The plan and both exchanges on one rank (a group of one: the all-to-alls are local copies): the
 * dispatched rows are the input's, segment for segment, and return(dispatch(x)) is x, gradients included. */
TEST(dispatch_on_one_rank_is_the_identity) {
    Dist d;
    dist_single(&d);
    Engine e;
    engine_init(&e, &cpu_backend, DT_F64, (size_t)1 << 20);
    const int N = 7, k = 2, E = 4, C = 5;
    int32_t idx_host[14] = {0, 3, 1, 3, 3, 0, 2, 1, 0, 1, 3, 2, 1, 0};
    Tensor *idx = engine_empty(&e, DT_I32, SHAPE(N, k));
    tensor_from_host(&e, idx, idx_host);
    MoePlan plan = op_moe_plan(&e, idx, E);
    Tensor *x = test_randn(DT_F64, SHAPE(N, C), 1.0, 5);
    test_requires_grad(x);
    Tensor *xs = op_moe_permute(&e, x, &plan);
    Comm ep;
    dist_comm(&ep, &d.ep_group);
    EpDispatch *dp = op_ep_dispatch_plan(&e, &plan, &ep);
    EXPECT(dp->rows_in == N * k && dp->rows_out == N * k && !dp->order, "rows %lld -> %lld", (long long)dp->rows_in,
           (long long)dp->rows_out);
    Tensor *xr = op_ep_dispatch(&e, xs, dp);
    int32_t a[E + 1], b[E + 1];
    tensor_to_host(&e, a, plan.offsets);
    tensor_to_host(&e, b, dp->offsets);
    EXPECT(!memcmp(a, b, sizeof a), "local offsets differ from the plan's");
    EXPECT(!memcmp(xr->data, xs->data, tensor_bytes(xs)), "dispatched rows differ");
    Tensor *ys = op_ep_return(&e, xr, dp);
    EXPECT(!memcmp(ys->data, xs->data, tensor_bytes(xs)), "returned rows differ");
    Tensor *R = test_randn(DT_F64, SHAPE(N * k, C), 1.0, 6);
    engine_backward_from(&e, ys, R, 0);
    /* d/dx sum(R * permute(x)) = the rows of R summed per token */
    const int32_t *rows = plan.rows->data;
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++) {
            double want = 0;
            for (int j = 0; j < k; j++) want += tensor_get(R, (int64_t)rows[t * k + j] * C + c);
            EXPECT(fabs(tensor_get(x->grad, t * C + c) - want) < 1e-14, "dx[%d,%d]", t, c);
        }
    test_tensor_free(R);
    test_tensor_free(x);
    engine_free(&e);
}

/* ---- one MoE layer under mpirun: this program's --layer mode -------------------------------------- */

static double rel_diff(const double *a, const double *b, int64_t n) {
    double d2 = 0, b2 = 0;
    for (int64_t i = 0; i < n; i++) {
        d2 += (a[i] - b[i]) * (a[i] - b[i]);
        b2 += b[i] * b[i];
    }
    return b2 > 0 ? sqrt(d2 / b2) : sqrt(d2);
}

static void copy_out(double *dst, const Tensor *t) { memcpy(dst, t->data, (size_t)t->numel * sizeof(double)); }

/* The layer's output and gradients for one rank's tokens: forward, seed the output with R and the
 * auxiliary loss with 1, backward. Fills out [N*C] and dx [N*C]; the parameter gradients stay in ps. */
static void run_layer(Engine *e, ParamStore *ps, MoeLayerParams *p, const MoeConfig *c, Tensor *x, const Tensor *R,
                      double *out, double *dx, double *aux_value) {
    engine_reset(e);
    params_zero_grad(ps);
    memset(x->grad->data, 0, tensor_bytes(x));
    Tensor *aux = NULL;
    Tensor *y = moe_forward(e, p, c, x, NULL, &aux);
    e->be->axpy(engine_grad(e, y), R, 1.0f);
    if (aux) {
        double one = 1.0;
        tensor_from_host(e, engine_grad(e, aux), &one);
        *aux_value = tensor_item(e, aux);
    }
    engine_backward_tape(e, 0);
    copy_out(out, y);
    copy_out(dx, x->grad);
}

/* Rank s of the group holds 3 + 5 s tokens (uneven loads, experts without rows), drawn from seeds that
 * every rank knows, so that each can run the single-process reference of every rank. */
static int layer_tokens(int s) { return 3 + 5 * s; }

/* hot: a large selection bias on experts 0 and 1 sends every token there, so the other ranks of the group
 * receive no rows at all (their experts idle, their collectives still matched) */
static void check_layer(const Dist *d, const char *func, bool renorm, int shared, bool hot, uint64_t seed) {
    Comm ep; /* the layer sees its group through a Comm (kernels/comm.h) */
    dist_comm(&ep, &d->ep_group);
    const Comm *g = &ep;
    const int P = g->size, me = g->rank, E = 8, C = 16, F = 12;
    ModelConfig mc;
    memset(&mc, 0, sizeof mc);
    mc.d_model = C, mc.n_layers = 2, mc.init_std = 0.3f;
    MoeConfig c;
    memset(&c, 0, sizeof c);
    c.num_experts = E, c.experts_per_token = 2, c.expert_dim = F, c.shared_experts = shared;
    snprintf(c.score_func, sizeof c.score_func, "%s", func);
    c.renormalize = renorm, c.routing_scale = 1.5f, c.aux_loss_weight = 0.1f, c.z_loss_weight = 0.01f;

    ParamStore full, part;
    MoeLayerParams pf, pp;
    params_init(&full, &cpu_backend, DT_F64);
    moe_declare_params(&full, 0, &mc, &c, &pf);
    params_allocate(&full, seed);
    params_init(&part, &cpu_backend, DT_F64);
    moe_declare_router_params(&part, 0, &mc, &c, &pp);
    moe_declare_expert_params(&part, &mc, &c, &pp, g);
    params_allocate(&part, seed);
    const int El = E / P;
    CHECK(pp.num_local_experts == El && pp.first_expert == me * El && pp.w_gate->shape[0] == El,
          "%d local experts from %d", pp.num_local_experts, pp.first_expert);
    /* the slice is initialised as the full tensor's rows */
    Tensor *wf[3] = {pf.w_gate, pf.w_up, pf.w_down}, *wp[3] = {pp.w_gate, pp.w_up, pp.w_down};
    for (int i = 0; i < 3; i++)
        CHECK(!memcmp(wp[i]->data, (double *)wf[i]->data + wp[i]->numel * me, tensor_bytes(wp[i])),
              "%s: the slice's initial values are not the full tensor's rows", wp[i]->name);
    for (int x = 0; x < E; x++) /* the bias steers selection (CPU: its data is host memory) */
        ((float *)pf.bias->data)[x] = ((float *)pp.bias->data)[x] = hot ? (x < 2 ? 100.0f : 0.0f) : 0.03f * (float)(x % 3);

    Engine e;
    engine_init(&e, &cpu_backend, DT_F64, (size_t)1 << 22);
    int64_t Nme = layer_tokens(me), n = Nme * C;
    double *out = xmalloc((size_t)n * sizeof(double)), *dx = xmalloc((size_t)n * sizeof(double));
    double *ref_out = xmalloc((size_t)n * sizeof(double)), *ref_dx = xmalloc((size_t)n * sizeof(double));
    double *ep_grads = xmalloc((size_t)part.numel * sizeof(double)), *ref_grads = xmalloc((size_t)full.numel * sizeof(double));
    double *ref_expert = xcalloc(3 * (size_t)wf[0]->numel, sizeof(double)), aux = 0, ref_aux = 0;

    Tensor *x = test_randn(DT_F64, SHAPE(Nme, C), 1.0, seed + 10 + (uint64_t)me);
    Tensor *R = test_randn(DT_F64, SHAPE(Nme, C), 1.0, seed + 20 + (uint64_t)me);
    test_requires_grad(x);
    run_layer(&e, &part, &pp, &c, x, R, out, dx, &aux);
    memcpy(ep_grads, part.grad, (size_t)part.numel * sizeof(double));
    test_tensor_free(x);
    test_tensor_free(R);

    /* the single-process layer on every rank's tokens: this rank's outputs and non-expert gradients, and
     * the expert gradients summed over all the ranks' tokens */
    for (int s = 0; s < P; s++) {
        int64_t Ns = layer_tokens(s);
        Tensor *xs = test_randn(DT_F64, SHAPE(Ns, C), 1.0, seed + 10 + (uint64_t)s);
        Tensor *Rs = test_randn(DT_F64, SHAPE(Ns, C), 1.0, seed + 20 + (uint64_t)s);
        test_requires_grad(xs);
        double *o = xmalloc((size_t)Ns * C * sizeof(double)), *gx = xmalloc((size_t)Ns * C * sizeof(double)), a = 0;
        run_layer(&e, &full, &pf, &c, xs, Rs, o, gx, &a);
        for (int i = 0; i < 3; i++)
            for (int64_t j = 0; j < wf[i]->numel; j++) ref_expert[i * wf[i]->numel + j] += tensor_get(wf[i]->grad, j);
        if (s == me) {
            memcpy(ref_out, o, (size_t)n * sizeof(double));
            memcpy(ref_dx, gx, (size_t)n * sizeof(double));
            memcpy(ref_grads, full.grad, (size_t)full.numel * sizeof(double));
            ref_aux = a;
        }
        free(o), free(gx);
        test_tensor_free(xs);
        test_tensor_free(Rs);
    }
    const double tol = 1e-12;
    CHECK(rel_diff(out, ref_out, n) < tol, "%s: outputs differ by %g", func, rel_diff(out, ref_out, n));
    CHECK(rel_diff(dx, ref_dx, n) < tol, "%s: input gradients differ by %g", func, rel_diff(dx, ref_dx, n));
    CHECK(fabs(aux - ref_aux) <= tol * fabs(ref_aux), "%s: aux loss %.17g vs %.17g", func, aux, ref_aux);
    for (int i = 0; i < part.n; i++) {
        const Param *q = &part.p[i];
        const double *got = ep_grads + q->offset, *want;
        if (moe_is_expert_param(q->t)) {
            int w = q->t == pp.w_gate ? 0 : q->t == pp.w_up ? 1 : 2;
            want = ref_expert + (int64_t)w * wf[0]->numel + q->t->numel * me;
        } else {
            want = ref_grads + params_find(&full, q->t->name)->offset;
        }
        double err = rel_diff(got, want, q->t->numel);
        CHECK(err < tol, "%s: gradient of %s differs by %g", func, q->t->name, err);
    }
    free(out), free(dx), free(ref_out), free(ref_dx), free(ep_grads), free(ref_grads), free(ref_expert);
    engine_free(&e);
    moe_free_params(&pf);
    moe_free_params(&pp);
    params_free(&full);
    params_free(&part);
}

/* mpirun -np N build/tests/test_dist_ep --layer EP: the layer check on every rank (dp = N / EP) */
static int layer_main(int argc, char **argv) {
    Dist d;
    dist_init(&d, &argc, &argv);
    CHECK(argc == 3, "usage: test_dist_ep --layer EP");
    dist_setup(&d, 0, atoi(argv[2]), 1, 30.0, DEV_CPU, "test_dist_ep");
    check_layer(&d, "softmax", true, 1, false, 7);
    check_layer(&d, "sigmoid", false, 0, false, 8);
    check_layer(&d, "softmax", false, 1, true, 9);
    printf("rank %d: layer ok (ep %d of %d)\n", d.rank, d.ep_group.rank, d.ep);
    dist_finalize(&d);
    return 0;
}

TEST(layer_equals_single_process_on_2_and_4_ranks) {
    EXPECT(FX->have_mpirun, "no mpirun: install openmpi-bin (bash tools/install_deps.sh)");
    static const int layouts[][2] = {{2, 2}, {4, 4}, {4, 2}}; /* ranks, ep (the rest dp) */
    for (int i = 0; i < 3; i++) {
        char cmd[512], out[8192];
        snprintf(cmd, sizeof cmd, "build/tests/test_dist_ep --layer %d", layouts[i][1]);
        EXPECT(harness_run_ranks(tc, layouts[i][0], cmd, "layer ok", out, sizeof out), "np %d, ep %d: %s",
               layouts[i][0], layouts[i][1], out);
    }
}

/* ---- build/train ---------------------------------------------------------------------------------- */

/* The np-rank run of `args` equals the single-process run (the same global batch). */
static void expect_same_training(TestCtx *tc, const char *name, int np, const char *args) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunDiff d;
    EXPECT_OK(harness_run_pair(tc, "single", "", name, np, args, &d));
    printf("    %s (np %d) vs 1 process over %d steps: loss %.1e, grad norm %.1e, val loss %.1e; params max |d| %.2e "
           "(rel %.2e), AdamW m rel %.2e, v rel %.2e; MoE biases max |d| %.1e\n",
           args, np, d.steps.common, d.steps.loss, d.steps.grad_norm, fabs(d.a.val_loss - d.b.val_loss),
           d.params.max_abs, d.params.max_rel, d.m.max_rel, d.v.max_rel, d.state.max_abs);
    int64_t dims[4];
    EXPECT(harness_ckpt_dims(d.ckpt_b, "params/layers.1.moe.w_gate", dims, 4) == 3 && dims[0] == 8,
           "the checkpoint of the %d-rank run does not hold all 8 experts", np);
    harness_expect_same_training(tc, &d, HARNESS_CHECK_STATE | HARNESS_CHECK_COUNTER);
}

TEST(ep2_equals_single_process) {
    expect_same_training(tc, "ep2", 2, "--set dist.ep=2");
}

/* ep 2 x dp 2 on 4 ranks, with activation recomputation (the dispatch's collectives run again in the
 * backward of every block) */
TEST(ep2_dp2_equals_single_process) {
    expect_same_training(tc, "ep2dp2", 4, "--set dist.ep=2 --set train.recompute=true");
}

TEST(ep4_equals_single_process) {
    expect_same_training(tc, "ep4", 4, "--set dist.ep=4");
}

/* expert and context parallel together: 4 ranks, ep 2 x cp 2 (each MoE layer dispatches its cp share of
 * the tokens within its ep group) */
TEST(ep2_cp2_equals_single_process) {
    expect_same_training(tc, "ep2cp2", 4, "--set dist.ep=2 --set dist.cp=2");
}

/* A checkpoint of an ep = 2 run at step 5 resumes on 1 rank and on ep = 4 and ends where the
 * uninterrupted single-process run ends. */
TEST(checkpoint_from_ep2_resumes_on_1_rank_and_on_ep4) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char ref[512], two[512];
    EXPECT(harness_run_into(tc, "single", 0, "", ref, sizeof ref), "reference run failed");
    EXPECT(harness_run_into(tc, "resume_ep2", 2, "--set dist.ep=2 " HARNESS_CHECKPOINTS, two, sizeof two),
           "ep 2 run failed");
    static const struct {
        int np;
        const char *args;
    } to[] = {{0, ""}, {4, "--set dist.ep=4"}};
    for (int i = 0; i < 2; i++) {
        char dir[512];
        RunOutcome o = harness_resume(tc, two, to[i].np, to[i].args, dir, sizeof dir);
        EXPECT(o.status == 0, "resume on %d rank(s) exited with %d: %s", to[i].np, o.status, o.err);
        RunDiff d = harness_compare_runs(ref, dir, 6);
        printf("    ep 2 -> %s: steps 6-10 loss %.1e, grad norm %.1e; final params max |d| %.2e (rel %.2e), v rel %.2e\n",
               to[i].np ? "ep 4 (4 ranks)" : "1 process", d.steps.loss, d.steps.grad_norm, d.params.max_abs,
               d.params.max_rel, d.v.max_rel);
        EXPECT_OK(harness_expect_resumed(tc, &d, true));
    }
}

/* train.init_from under expert parallelism: rank 0 reads every expert and hands each ep rank its own; the
 * ep = 2 run from the single process's final checkpoint trains as the single process from it. */
TEST(init_from_a_checkpoint_under_ep2) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char ref[512], a[512], b[512], args[1024];
    EXPECT(harness_run_into(tc, "single", 0, "", ref, sizeof ref), "reference run failed");
    snprintf(args, sizeof args, "--set train.init_from=%s/ckpt_00000010.h5", ref);
    EXPECT(harness_run_into(tc, "init_np1", 0, args, a, sizeof a), "single-process init_from run failed");
    snprintf(args, sizeof args, "--set train.init_from=%s/ckpt_00000010.h5 --set dist.ep=2", ref);
    EXPECT(harness_run_into(tc, "init_ep2", 2, args, b, sizeof b), "ep 2 init_from run failed");
    RunMetrics ma = harness_read_metrics(a), mb = harness_read_metrics(b), fresh = harness_read_metrics(ref);
    StepDiff s = harness_compare_steps(&ma, &mb, 0);
    printf("    init_from, ep 2 vs 1 process over %d steps: loss %.1e, grad norm %.1e (first loss %.4f, the fresh "
           "run's %.4f)\n",
           s.common, s.loss, s.grad_norm, mb.loss[0], fresh.loss[0]);
    EXPECT(s.common == 10 && s.loss <= HARNESS_LOSS_TOL && s.grad_norm <= HARNESS_LOSS_TOL,
           "%d steps, loss %g, grad norm %g", s.common, s.loss, s.grad_norm);
    EXPECT(fabs(mb.loss[0] - fresh.loss[0]) > 0.1, "the ep 2 run did not start from the checkpoint");
}

TEST(experts_that_do_not_divide_over_ep_are_refused) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 2, NULL, "--set dist.ep=2 --set moe.num_experts=5", "");
    EXPECT(o.status != 0 && strstr(o.err, "moe.num_experts = 5 does not divide over dist.ep = 2"), "5 experts, ep 2: %s",
           o.err);
    o = harness_train(tc, 0, NULL, "--set dist.ep=3", "");
    EXPECT(o.status != 0 && strstr(o.err, "moe.num_experts = 8 does not divide over dist.ep = 3"), "8 experts, ep 3: %s",
           o.err);
    o = harness_train(tc, 2, NULL, "--set dist.ep=2 --set train.batch_size=5", "");
    EXPECT(o.status != 0 && strstr(o.err, "train.batch_size = 5 is not divisible by the dist.dp * dist.ep = 1 * 2 ranks"),
           "batch 5 over ep 2: %s", o.err);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--layer")) return layer_main(argc, argv);
    HARNESS_TEST_BEGIN("test_dist_ep", MOE);
    RUN(dispatch_layout_groups_rows_by_local_expert);
    RUN(dispatch_on_one_rank_is_the_identity);
    RUN(layer_equals_single_process_on_2_and_4_ranks);
    RUN(ep2_equals_single_process);
    RUN(ep2_dp2_equals_single_process);
    RUN(ep4_equals_single_process);
    RUN(ep2_cp2_equals_single_process);
    RUN(checkpoint_from_ep2_resumes_on_1_rank_and_on_ep4);
    RUN(init_from_a_checkpoint_under_ep2);
    RUN(experts_that_do_not_divide_over_ep_are_refused);
    HARNESS_TEST_END();
}
