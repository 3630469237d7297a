/* Context parallelism on the CPU (issue 7; head-parallel, autograd/op_cp.c and train/model.c).
 *   - the block transpose (backend transpose01) against an index-by-index reference and its round trip,
 *     and the seq <-> heads exchange built from it, simulated for P ranks in one process;
 *   - the exchange ops themselves under mpirun (this program in its `--exchange` mode, 2 and 4 ranks):
 *     forward against the index-by-index layout, the round trip, and each backward against its adjoint;
 *   - build/train with dist.cp = 2 equals the single process on the same batch over 10 steps (losses, KL,
 *     gradient norms, eval loss / KL / recall, final parameters and AdamW moments): a dense model (also
 *     with dropout, gradient accumulation and activation recomputation), an MSA model whose selection is
 *     sparse (block 8, top-3 of up to 8 blocks) with and without dense warm-up, and CP-2 x DP-2 on 4 ranks;
 *   - a checkpoint of a CP-2 run resumes on 1 rank and on CP-2 x DP-2;
 *   - a cp that does not divide the KV heads or the tokens of a micro-batch is refused with a message.
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../dist/dist.h"
#include "../kernels/util.h"
#include "dist_harness.h"
#include "gradcheck.h"
#include "test.h"

/* MSA in layer 1 (layer 0 stays dense): block 8 of a 64-token sequence, 3 of up to 8 blocks selected */
#define MSA "--set model.attention=msa --set model.msa_layers=1- --set msa.block_size=8 --set msa.topk_blocks=3 " \
            "--set msa.index_dim=16 --set train.eval_every=5"

#define FX ((DistHarness *)tc->fixture)

/* ---- the block transpose and the exchange layout, in one process --------------------------------- */

static double pattern(int64_t t, int64_t h, int64_t d) { return (double)t * 10000.0 + (double)h * 100.0 + (double)d; }

TEST(transpose01_matches_the_index_reference_and_round_trips) {
    static const int64_t shapes[][3] = {{1, 1, 1}, {3, 2, 5}, {2, 4, 1}, {7, 3, 12}, {4, 4, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int64_t a = shapes[s][0], b = shapes[s][1], c = shapes[s][2];
        for (int dt = 0; dt < 2; dt++) {
            DType type = dt ? DT_F64 : DT_F32;
            Tensor *x = test_randn(type, SHAPE(a, b, c), 1.0, 11 + s), *y = test_tensor(type, SHAPE(b, a, c)),
                   *z = test_tensor(type, SHAPE(a, b, c));
            cpu_backend.transpose01(y, x, a, b);
            for (int64_t i = 0; i < a; i++)
                for (int64_t j = 0; j < b; j++)
                    for (int64_t k = 0; k < c; k++)
                        EXPECT(tensor_get(y, (j * a + i) * c + k) == tensor_get(x, (i * b + j) * c + k),
                               "[%lld, %lld, %lld] %s: dst[%lld, %lld, %lld] is not src[%lld, %lld, %lld]", (long long)a,
                               (long long)b, (long long)c, dtype_name(type), (long long)j, (long long)i, (long long)k,
                               (long long)i, (long long)j, (long long)k);
            cpu_backend.transpose01(z, y, b, a);
            EXPECT(!memcmp(z->data, x->data, tensor_bytes(x)), "[%lld, %lld, %lld]: the round trip differs",
                   (long long)a, (long long)b, (long long)c);
            test_tensor_free(x), test_tensor_free(y), test_tensor_free(z);
        }
    }
}

/* The layout of autograd/op_cp.c for P ranks at once: pack with transpose01, move the blocks as an
 * all-to-all would (block j of rank r's send buffer to block r of rank j's receive buffer), and the
 * inverse; every element lands where the index reference puts it, and the round trip is the identity. */
TEST(seq_heads_exchange_layout_for_P_ranks) {
    for (int P = 1; P <= 4; P++) {
        const int64_t n = 3, N = n * P, Hc = 2, H = Hc * P, D = 5, blk = n * Hc * D;
        Tensor **x = xcalloc((size_t)P, sizeof(Tensor *)), **send = xcalloc((size_t)P, sizeof(Tensor *)),
               **heads = xcalloc((size_t)P, sizeof(Tensor *));
        for (int r = 0; r < P; r++) {
            x[r] = test_tensor(DT_F64, SHAPE(n, H, D));
            for (int64_t t = 0; t < n; t++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t d = 0; d < D; d++) tensor_set(x[r], (t * H + h) * D + d, pattern(r * n + t, h, d));
            send[r] = test_tensor(DT_F64, SHAPE(P, n, Hc, D));
            cpu_backend.transpose01(send[r], x[r], n, P);
        }
        for (int r = 0; r < P; r++) {
            heads[r] = test_tensor(DT_F64, SHAPE(N, Hc, D));
            for (int s = 0; s < P; s++)
                memcpy((double *)heads[r]->data + s * blk, (double *)send[s]->data + r * blk, (size_t)blk * sizeof(double));
            for (int64_t t = 0; t < N; t++)
                for (int64_t h = 0; h < Hc; h++)
                    for (int64_t d = 0; d < D; d++)
                        EXPECT(tensor_get(heads[r], (t * Hc + h) * D + d) == pattern(t, r * Hc + h, d),
                               "P %d rank %d: heads[%lld, %lld, %lld] wrong", P, r, (long long)t, (long long)h, (long long)d);
        }
        for (int r = 0; r < P; r++) { /* heads -> seq: block s of rank s's buffer is rank r's tokens */
            Tensor *recv = test_tensor(DT_F64, SHAPE(P, n, Hc, D)), *back = test_tensor(DT_F64, SHAPE(n, H, D));
            for (int s = 0; s < P; s++)
                memcpy((double *)recv->data + s * blk, (double *)heads[s]->data + r * blk, (size_t)blk * sizeof(double));
            cpu_backend.transpose01(back, recv, P, n);
            EXPECT(!memcmp(back->data, x[r]->data, tensor_bytes(back)), "P %d rank %d: the round trip differs", P, r);
            test_tensor_free(recv), test_tensor_free(back);
        }
        for (int r = 0; r < P; r++) test_tensor_free(x[r]), test_tensor_free(send[r]), test_tensor_free(heads[r]);
        free(x), free(send), free(heads);
    }
}

/* A group of one rank: the ops hand back their input and record nothing. */
TEST(one_rank_group_is_the_identity) {
    Dist d;
    dist_single(&d);
    Comm cp;
    dist_comm(&cp, &d.cp_group);
    Engine e;
    engine_init(&e, &cpu_backend, DT_F32, 1 << 20);
    Tensor *x = engine_zeros(&e, DT_F32, SHAPE(4, 2, 3));
    x->requires_grad = true;
    EXPECT(op_cp_seq_to_heads(&e, x, &cp) == x && op_cp_heads_to_seq(&e, x, &cp) == x &&
               op_cp_all_gather(&e, x, &cp) == x && e.tape_len == 0,
           "a cp group of one rank changed the graph");
    engine_free(&e);
}

/* ---- the exchange ops under mpirun: this program's --exchange mode ------------------------------------ */

static Tensor *filled(Engine *e, DType dt, int64_t rows, int64_t H, int64_t D, double scale,
                      double (*value)(int rank, int64_t t, int64_t h, int64_t d, int64_t n, int64_t Hc), int rank,
                      int64_t n, int64_t Hc) {
    Tensor *t = engine_empty(e, dt, SHAPE(rows, H, D));
    double *host = xmalloc((size_t)t->numel * sizeof(double));
    for (int64_t i = 0; i < rows; i++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < D; d++) host[(i * H + h) * D + d] = scale * value(rank, i, h, d, n, Hc);
    for (int64_t k = 0; k < t->numel; k++) tensor_set(t, k, host[k]);
    free(host);
    return t;
}
/* the sequence split: rank r's row t is token r*n + t, every head */
static double seq_value(int r, int64_t t, int64_t h, int64_t d, int64_t n, int64_t Hc) {
    (void)Hc;
    return pattern(r * n + t, h, d);
}
/* the head split: every token, rank r's head h is head r*Hc + h */
static double head_value(int r, int64_t t, int64_t h, int64_t d, int64_t n, int64_t Hc) {
    (void)n;
    return pattern(t, r * Hc + h, d);
}

static void expect_equal(const Tensor *a, const Tensor *b, const char *what, int rank) {
    CHECK(a->numel == b->numel, "%s: %lld vs %lld elements", what, (long long)a->numel, (long long)b->numel);
    for (int64_t k = 0; k < a->numel; k++)
        CHECK(tensor_get(a, k) == tensor_get(b, k), "rank %d: %s: element %lld is %g, expected %g", rank, what,
              (long long)k, tensor_get(a, k), tensor_get(b, k));
}

/* mpirun -np P build/tests/test_dist_cp --exchange: a cp group of all P ranks. Values are integers
 * below 2^24, so F32 and F64 are exact and every comparison is ==. */
static int exchange_main(int argc, char **argv) {
    Dist dist;
    dist_init(&dist, &argc, &argv);
    dist_setup(&dist, 1, 1, dist.size, 10.0, DEV_CPU, "test_dist_cp");
    Comm cp; /* the ops see the group through its Comm (kernels/comm.h) */
    dist_comm(&cp, &dist.cp_group);
    const Comm *g = &cp;
    const int P = g->size, r = g->rank;
    const int64_t n = 3, N = n * P, Hc = 2, H = Hc * P, D = 5;
    for (int dt = 0; dt < 2; dt++) {
        DType type = dt ? DT_F64 : DT_F32;
        Engine eng, *e = &eng;
        engine_init(e, &cpu_backend, type, 1 << 20);
        /* seq -> heads, and its backward: the adjoint sends a head-split gradient back to the tokens */
        Tensor *x = filled(e, type, n, H, D, 1, seq_value, r, n, Hc);
        x->requires_grad = true;
        Tensor *y = op_cp_seq_to_heads(e, x, g);
        CHECK(y->ndim == 3 && y->shape[0] == N && y->shape[1] == Hc && y->shape[2] == D, "seq_to_heads shape");
        expect_equal(y, filled(e, type, N, Hc, D, 1, head_value, r, n, Hc), "seq_to_heads", r);
        Tensor *z = op_cp_heads_to_seq(e, y, g);
        expect_equal(z, x, "heads_to_seq(seq_to_heads(x))", r);
        engine_backward_from(e, y, filled(e, type, N, Hc, D, 2, head_value, r, n, Hc), 0);
        expect_equal(x->grad, filled(e, type, n, H, D, 2, seq_value, r, n, Hc), "seq_to_heads backward", r);
        engine_reset(e);
        /* heads -> seq, and its backward */
        Tensor *xh = filled(e, type, N, Hc, D, 1, head_value, r, n, Hc);
        xh->requires_grad = true;
        Tensor *zs = op_cp_heads_to_seq(e, xh, g);
        CHECK(zs->shape[0] == n && zs->shape[1] == H, "heads_to_seq shape");
        expect_equal(zs, filled(e, type, n, H, D, 1, seq_value, r, n, Hc), "heads_to_seq", r);
        engine_backward_from(e, zs, filled(e, type, n, H, D, 3, seq_value, r, n, Hc), 0);
        expect_equal(xh->grad, filled(e, type, N, Hc, D, 3, head_value, r, n, Hc), "heads_to_seq backward", r);
        engine_reset(e);
        /* all-gather of [n, 1, D] rows, and its backward: the sum over ranks of their gradients, each rank
         * seeding (rank + 1) times the pattern */
        Tensor *k = filled(e, type, n, 1, D, 1, seq_value, r, n, 1);
        k->requires_grad = true;
        Tensor *kall = op_cp_all_gather(e, k, g);
        expect_equal(kall, filled(e, type, N, 1, D, 1, seq_value, 0, N, 1), "all_gather", r);
        engine_backward_from(e, kall, filled(e, type, N, 1, D, r + 1, seq_value, 0, N, 1), 0);
        expect_equal(k->grad, filled(e, type, n, 1, D, P * (P + 1) / 2.0, seq_value, r, n, 1), "all_gather backward",
                     r);
        engine_free(e);
    }
    printf("rank %d: exchange ok (cp %d)\n", r, P);
    dist_finalize(&dist);
    return 0;
}

TEST(exchange_ops_under_mpirun) {
    EXPECT(FX->have_mpirun, "no mpirun: install openmpi-bin (bash tools/install_deps.sh)");
    for (int np = 2; np <= 4; np += 2) {
        char out[8192];
        EXPECT(harness_run_ranks(tc, np, "build/tests/test_dist_cp --exchange", "exchange ok", out, sizeof out),
               "np %d: %s", np, out);
    }
}

/* ---- build/train on several ranks against one process ----------------------------------------------- */

/* The single process and np ranks with `layout` (e.g. "--set dist.cp=2") on the same config and batch agree
 * within fp32 tolerance: every logged step, the last eval, the final checkpoint. */
static void expect_same_training(TestCtx *tc, const char *name, int np, const char *layout, const char *args) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char name1[128], all[2048];
    snprintf(name1, sizeof name1, "%s_single", name);
    snprintf(all, sizeof all, "%s %s", args, layout);
    RunDiff d;
    EXPECT_OK(harness_run_pair(tc, name1, args, name, np, all, &d));
    printf("    np %d (%s) vs 1 over %d steps: loss %.1e, kl %.1e, grad norm %.1e; eval loss %.1e, kl %.1e, recall "
           "%.1e, dense %.1e; params max |d| %.2e (rel %.2e), AdamW m rel %.2e, v rel %.2e\n",
           np, layout + 6, d.steps.common, d.steps.loss, d.steps.aux, d.steps.grad_norm, d.val_loss, d.val_kl,
           d.val_recall, d.val_dense, d.params.max_abs, d.params.max_rel, d.m.max_rel, d.v.max_rel);
    harness_expect_same_training(tc, &d, HARNESS_CHECK_EVAL);
}

#define CP2 "--set dist.cp=2"

TEST(cp2_dense_equals_single_process) {
    expect_same_training(tc, "dense", 2, CP2, HARNESS_CHECKPOINTS);
}

/* dropout masks by global token (row_offset), two micro-batches per step, every block recomputed in the
 * backward (its exchanges run again) */
TEST(cp2_dense_with_dropout_accum_recompute_equals_single_process) {
    expect_same_training(tc, "dropout", 2, CP2,
                         "--set model.dropout=0.1 --set train.grad_accum=2 --set train.batch_size=4 --set train.recompute=true");
}

/* sparse from the first step (the KL over the selected blocks), with recomputation */
TEST(cp2_msa_sparse_equals_single_process) {
    expect_same_training(tc, "msa_sparse", 2, CP2, MSA " --set msa.dense_warmup_steps=0 --set train.recompute=true");
}

/* 4 steps of dense warm-up (KL over the full causal prefix), then sparse; evals with the dense reference */
TEST(cp2_msa_warmup_equals_single_process) {
    expect_same_training(tc, "msa_warm", 2, CP2,
                         MSA " --set msa.dense_warmup_steps=4 --set train.eval_dense_reference=true");
}

TEST(cp2_dp2_equals_single_process) {
    expect_same_training(tc, "msa_warm", 4, CP2,
                         MSA " --set msa.dense_warmup_steps=4 --set train.eval_dense_reference=true");
}

/* The CP-2 run's step-5 checkpoint (its optimizer shards gathered over dp*cp) resumes on 1 rank and on
 * CP-2 x DP-2 (scattered over 4) and ends where the single-process run ends. */
TEST(cp2_checkpoint_resumes_on_1_and_on_cp2_dp2) {
    EXPECT(FX->have_mpirun, "no mpirun");
    char single[512], two[512];
    EXPECT(harness_run_into(tc, "dense_single", 0, HARNESS_CHECKPOINTS, single, sizeof single) &&
               harness_run_into(tc, "dense_np2", 2, HARNESS_CHECKPOINTS " " CP2, two, sizeof two),
           "the reference runs failed");
    static const int nps[] = {0, 4};
    for (int i = 0; i < 2; i++) {
        char dir[512];
        RunOutcome o = harness_resume(tc, two, nps[i], nps[i] ? CP2 : "", dir, sizeof dir);
        EXPECT(o.status == 0, "resume on %d rank(s) exited with %d: %s", nps[i], o.status, o.err);
        RunDiff d = harness_compare_runs(single, dir, 6);
        printf("    cp 2 -> %s: steps 6-10 loss %.1e, grad norm %.1e; final params max |d| %.2e (rel %.2e), v rel %.2e\n",
               nps[i] ? "cp 2 x dp 2" : "1 rank", d.steps.loss, d.steps.grad_norm, d.params.max_abs, d.params.max_rel,
               d.v.max_rel);
        EXPECT_OK(harness_expect_resumed(tc, &d, false));
    }
}

TEST(cp_that_does_not_divide_is_refused) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 4, NULL, "--set dist.cp=4", "");
    EXPECT(o.status != 0 && strstr(o.err, "dist.cp = 4 does not divide model.n_kv_heads = 2"), "cp 4, 2 KV heads: %s",
           o.err);
    o = harness_train(tc, 2, NULL, CP2 " --set train.batch_size=1 --set train.seq_len=63", "");
    EXPECT(o.status != 0 && strstr(o.err, "dist.cp = 2 does not divide the 63 tokens of a rank's micro-batch"),
           "63 tokens on cp 2: %s", o.err);
}

/* ---- main ----------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--exchange")) return exchange_main(argc, argv);
    HARNESS_TEST_BEGIN("test_dist_cp", "");
    RUN(transpose01_matches_the_index_reference_and_round_trips);
    RUN(seq_heads_exchange_layout_for_P_ranks);
    RUN(one_rank_group_is_the_identity);
    RUN(exchange_ops_under_mpirun);
    RUN(cp2_dense_equals_single_process);
    RUN(cp2_dense_with_dropout_accum_recompute_equals_single_process);
    RUN(cp2_msa_sparse_equals_single_process);
    RUN(cp2_msa_warmup_equals_single_process);
    RUN(cp2_dp2_equals_single_process);
    RUN(cp2_checkpoint_resumes_on_1_and_on_cp2_dp2);
    RUN(cp_that_does_not_divide_is_refused);
    HARNESS_TEST_END();
}
