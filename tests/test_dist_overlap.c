/* Gradient buckets overlapped with the backward (dist.bucket_mb, train/grad_buckets.h) on the CPU, under
 * `mpirun --oversubscribe`:
 *   - the collectives of unequal per-rank parts (this program in its `--parts` mode, 3 and 4 ranks): a
 *     region reduce-scattered bucket by bucket, for several bucket sizes, gives each rank exactly the bits
 *     of the whole region's dist_reduce_scatter, and the all-gather of the parts gives every shard back;
 *   - build/train with buckets smaller than the largest tensor, larger, and larger than the model trains
 *     bit for bit as dist.bucket_mb = 0 (one reduce-scatter and one all-gather after the backward):
 *     every logged loss and gradient norm, the eval, the final parameters and AdamW moments; on DP-2, DP-4
 *     with ZeRO-1, gradient accumulation and recomputation, an MSA model, EP-2 x DP-2 and DP-2 x CP-2;
 *   - a rank that hangs with a bucket in flight makes the others stop within dist.timeout with a message
 *     naming the bucket's reduce-scatter, and one that fails there ends the job with its own message (the
 *     hooks fire only once a bucket has started inside the backward, so these runs also show that the
 *     buckets do start before the backward ends).
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../dist/dist.h"
#include "../kernels/util.h"
#include "dist_harness.h"
#include "test.h"

#define FX ((DistHarness *)tc->fixture)

/* ---- the per-rank-parts collectives: this program under mpirun, in its --parts mode ------------------ */

/* Values of many magnitudes, so that a sum taken in another order would differ in its last bits. */
static float spread_value(Rng *rng) {
    return (float)((rng_uniform(rng) - 0.5) * pow(10.0, (double)(rng_next(rng) % 9) - 4.0));
}

static int parts_main(int argc, char **argv) {
    Dist d;
    dist_init(&d, &argc, &argv);
    dist_setup(&d, 0, 1, 1, 20.0, DEV_CPU, "test_dist_overlap");
    const DistGroup *g = &d.world;
    const int n = g->size, me = g->rank;
    const int64_t shard = 1000, total = shard * n;
    float *grad = xmalloc((size_t)total * sizeof(float)), *whole = xmalloc((size_t)total * sizeof(float));
    Rng rng;
    rng_seed(&rng, 1000 + (uint64_t)me);
    for (int64_t i = 0; i < total; i++) grad[i] = spread_value(&rng);
    memcpy(whole, grad, (size_t)total * sizeof(float));
    dist_reduce_scatter(g, whole, whole + me * shard, shard, DIST_F32, DIST_SUM, DEV_CPU);
    const int64_t sizes[] = {37, 640, 999, 1000, 1777, 4096};
    int64_t *counts = xmalloc((size_t)n * sizeof(int64_t));
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        const int64_t bucket = sizes[s], nb = (total + bucket - 1) / bucket;
        float *buf = xmalloc((size_t)total * sizeof(float));
        memcpy(buf, grad, (size_t)total * sizeof(float));
        DistPending *p = xcalloc((size_t)nb, sizeof *p);
        /* every bucket in flight at once, from the region's end (as the backward starts them) */
        for (int64_t b = nb - 1; b >= 0; b--) {
            int64_t lo = b * bucket, hi = lo + bucket < total ? lo + bucket : total;
            for (int r = 0; r < n; r++) {
                int64_t a = r * shard > lo ? r * shard : lo, z = (r + 1) * shard < hi ? (r + 1) * shard : hi;
                counts[r] = z > a ? z - a : 0;
            }
            dist_start_reduce_scatter_parts(g, buf + lo, counts, DIST_F32, DIST_SUM, DEV_CPU, "test bucket", &p[b]);
            dist_test(&p[b]);
        }
        for (int64_t b = 0; b < nb; b++) dist_finish(&p[b]);
        CHECK(!memcmp(buf + me * shard, whole + me * shard, (size_t)shard * sizeof(float)),
              "rank %d: buckets of %lld elements reduce to other bits than the whole region", me, (long long)bucket);
        /* the all-gather of the parts: every rank's reduced shard everywhere */
        for (int64_t b = 0; b < nb; b++) {
            int64_t lo = b * bucket, hi = lo + bucket < total ? lo + bucket : total;
            for (int r = 0; r < n; r++) {
                int64_t a = r * shard > lo ? r * shard : lo, z = (r + 1) * shard < hi ? (r + 1) * shard : hi;
                counts[r] = z > a ? z - a : 0;
            }
            dist_start_all_gather_parts(g, buf + lo, counts, DIST_F32, DEV_CPU, "test gather", &p[b]);
        }
        for (int64_t b = 0; b < nb; b++) dist_finish(&p[b]);
        float *all = xmalloc((size_t)total * sizeof(float));
        dist_all_gather(g, whole + me * shard, all, shard, DIST_F32, DEV_CPU);
        CHECK(!memcmp(buf, all, (size_t)total * sizeof(float)), "rank %d: the all-gather of buckets of %lld elements",
              me, (long long)bucket);
        free(all), free(p), free(buf);
    }
    printf("rank %d: parts ok\n", me);
    free(grad), free(whole), free(counts);
    dist_finalize(&d);
    return 0;
}

TEST(bucketed_collectives_equal_the_whole_region) {
    EXPECT(FX->have_mpirun, "no mpirun");
    for (int np = 3; np <= 4; np++) {
        char out[8192];
        EXPECT(harness_run_ranks(tc, np, "build/tests/test_dist_overlap --parts", "parts ok", out, sizeof out),
               "np %d: %s", np, out);
    }
}

/* ---- build/train: buckets against one reduce-scatter per region ------------------------------------- */

/* The tiny model's largest tensors are its feed-forward matrices, 64 x 160 floats = 0.039 MiB. */
static const char *const BUCKETS[] = {"0.01", "0.03", "1"};

/* Runs `args` on np ranks with dist.bucket_mb = 0 and with each bucket size, and expects every bucketed
 * run to be the unbucketed one bit for bit. */
static void expect_bucketed_identical(TestCtx *tc, const char *name, int np, const char *args, int n_buckets) {
    EXPECT_OK(EXPECT(FX->have_mpirun, "no mpirun"));
    char ref[512], run[512], dname[128], full[1024];
    snprintf(dname, sizeof dname, "%s_whole", name);
    snprintf(full, sizeof full, "%s --set dist.bucket_mb=0", args);
    EXPECT_OK(EXPECT(harness_run_into(tc, dname, np, full, ref, sizeof ref), "%s: the run without buckets failed",
                     name));
    for (int i = 0; i < n_buckets; i++) {
        snprintf(dname, sizeof dname, "%s_bucket_%s", name, BUCKETS[i]);
        snprintf(full, sizeof full, "%s --set dist.bucket_mb=%s", args, BUCKETS[i]);
        EXPECT_OK(EXPECT(harness_run_into(tc, dname, np, full, run, sizeof run),
                         "%s: the run with buckets of %s MiB failed", name, BUCKETS[i]));
        RunDiff d = harness_compare_runs(ref, run, 0);
        printf("    %s, np %d, buckets of %s MiB: %d steps, loss |d| %g, grad norm |d| %g, val |d| %g, params |d| %g, "
               "m |d| %g, v |d| %g\n",
               name, np, BUCKETS[i], d.steps.common, d.steps.loss, d.steps.grad_norm, d.val_loss, d.params.max_abs,
               d.m.max_abs, d.v.max_abs);
        EXPECT(d.steps.common == 10 && d.steps.loss == 0 && d.steps.grad_norm == 0 && d.steps.aux == 0 &&
                   d.val_loss == 0,
               "%s, buckets of %s MiB: the logged steps differ from one bucket (loss %g, grad norm %g, aux %g, val %g "
               "over %d steps)",
               name, BUCKETS[i], d.steps.loss, d.steps.grad_norm, d.steps.aux, d.val_loss, d.steps.common);
        EXPECT(d.params.ok && d.m.ok && d.v.ok && d.params.max_abs == 0 && d.m.max_abs == 0 && d.v.max_abs == 0,
               "%s, buckets of %s MiB: the final parameters or moments differ from one bucket (%g, %g, %g)", name,
               BUCKETS[i], d.params.max_abs, d.m.max_abs, d.v.max_abs);
    }
}

TEST(dp2_buckets_train_as_one_bucket) { expect_bucketed_identical(tc, "dp2", 2, "", 3); }

/* ZeRO-1 over 4 ranks; the buckets complete only in the last micro-batch's backward; recomputation puts
 * each block's backward inside one checkpoint node (whose sub-tape must not start buckets) */
TEST(dp4_accum_recompute_buckets_train_as_one_bucket) {
    expect_bucketed_identical(tc, "dp4_accum", 4,
                              "--set train.grad_accum=2 --set train.batch_size=4 --set train.recompute=true", 1);
}

/* MSA: the index branch's gradients and the KL the backward computes */
TEST(dp2_msa_buckets_train_as_one_bucket) {
    expect_bucketed_identical(tc, "msa", 2,
                              "--set model.attention=msa --set msa.block_size=8 --set msa.topk_blocks=3 "
                              "--set msa.index_dim=16 --set msa.dense_warmup_steps=4",
                              1);
}

/* EP-2 x DP-2: two ZeRO regions (the world's and the routed experts' over dp), the experts' buckets
 * started while the backward's all-to-alls run */
TEST(ep2_dp2_buckets_train_as_one_bucket) {
    expect_bucketed_identical(tc, "ep2", 4,
                              "--set model.ffn=moe --set moe.num_experts=8 --set moe.experts_per_token=2 "
                              "--set moe.expert_dim=32 --set moe.shared_experts=1 --set moe.aux_loss_weight=0 "
                              "--set moe.z_loss_weight=0.001 --set moe.bias_update_rate=0.01 --set dist.ep=2",
                              2);
}

/* DP-2 x CP-2: the buckets over the dp*cp group while the backward's context-parallel exchanges run */
TEST(dp2_cp2_buckets_train_as_one_bucket) { expect_bucketed_identical(tc, "cp2", 4, "--set dist.cp=2", 1); }

/* ---- a rank lost with a bucket in flight --------------------------------------------------------- */

TEST(rank_hanging_with_a_bucket_in_flight_times_out) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 2, NULL, "--set dist.bucket_mb=0.01 --set dist.timeout=2",
                                 "MSA_DIST_TEST_HANG_IN_BUCKET=1:3");
    printf("    exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0, "mpirun exited 0 (did the hook fire? it needs a bucket started inside the backward)");
    EXPECT(strstr(o.err, "error: rank 0:") && strstr(o.err, "the reduce-scatter of a gradient bucket") &&
               strstr(o.err, "did not complete within dist.timeout = 2 s"),
           "stderr lacks rank 0's timeout message naming the bucket: %s", o.err);
    EXPECT(o.seconds < 30, "the job took %.1f s to end", o.seconds);
}

TEST(rank_failing_with_a_bucket_in_flight_ends_the_job) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 2, NULL, "--set dist.bucket_mb=0.01", "MSA_DIST_TEST_FAIL_IN_BUCKET=1:3");
    printf("    exit %d after %.1f s\n", o.status, o.seconds);
    EXPECT(o.status != 0, "mpirun exited 0");
    EXPECT(strstr(o.err, "error: rank 1: test hook MSA_DIST_TEST_FAIL_IN_BUCKET"), "stderr lacks rank 1's message: %s",
           o.err);
    EXPECT(o.seconds < 20, "the job took %.1f s to end", o.seconds);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--parts")) return parts_main(argc, argv);
    HARNESS_TEST_BEGIN("test_dist_overlap", "");
    RUN(bucketed_collectives_equal_the_whole_region);
    RUN(dp2_buckets_train_as_one_bucket);
    RUN(dp4_accum_recompute_buckets_train_as_one_bucket);
    RUN(dp2_msa_buckets_train_as_one_bucket);
    RUN(ep2_dp2_buckets_train_as_one_bucket);
    RUN(dp2_cp2_buckets_train_as_one_bucket);
    RUN(rank_hanging_with_a_bucket_in_flight_times_out);
    RUN(rank_failing_with_a_bucket_in_flight_ends_the_job);
    HARNESS_TEST_END();
}
