/* Context parallelism on the CPU: head-parallel (issue 7; autograd/op_cp.c and train/model.c) and over the
 * sequence (issue 17; autograd/op_cp_sequence.c, the zigzag split of model_cp_tokens).
 *   - the block transpose (backend transpose01) against an index-by-index reference and its round trip,
 *     and the seq <-> heads exchange built from it, simulated for P ranks in one process;
 *   - the exchange ops themselves under mpirun (this program in its `--exchange` mode, 2 and 4 ranks):
 *     forward against the index-by-index layout, the round trip, and each backward against its adjoint;
 *   - build/train with dist.cp = 2 equals the single process on the same batch over 10 steps (losses, KL,
 *     gradient norms, eval loss / KL / recall, final parameters and AdamW moments): a dense model (also
 *     with dropout, gradient accumulation and activation recomputation), an MSA model whose selection is
 *     sparse (block 8, top-3 of up to 8 blocks) with and without dense warm-up, and CP-2 x DP-2 on 4 ranks;
 *   - a checkpoint of a CP-2 run resumes on 1 rank and on CP-2 x DP-2;
 *   - a cp that does not divide the KV heads (dist.cp_mode = heads) or the tokens of a micro-batch is refused
 *     with a message;
 *   - sequence mode: the zigzag split partitions every sequence with equal causal work per rank; the ring
 *     kernels merge interleaved key blocks in any order into attention's output and gradients; the ring
 *     attention op under mpirun (`--ring`, 2, 4 and 8 ranks) equals single-process attention in output, dq,
 *     dk and dv on documents that cross the chunks; a rank that hangs mid-ring ends the job within
 *     dist.timeout (`--ring-hang`); MSA over the sequence under mpirun (`--msa`, 2, 4 and 8 ranks): the chain
 *     of this rank's rows (index keys gathered, selected K/V blocks fetched) equals the single process's in
 *     output, lse, selection, KL, recall and dq, dk, dv, dqi, dki, dense warm-up and sparse; build/train at
 *     cp 2, 4, 8 (2 KV heads), cp 4 x dp 2 and cp 2 x ep 2 (MoE), with a dense and an MSA layer (and at cp 8
 *     a sliding-window layer), equals the single process on a file of short documents; what sequence mode
 *     does not cover is refused.
 * On a GPU (CUDA builds; not part of make test): `mpirun -np P build/tests/test_dist_cp --cuda` runs the ring
 * attention, the index-key gather, the block fetch and the MSA attention of the rank's queries over the fetched
 * blocks on device tensors against the same ops on the CPU
 * (tools/device_check.sh cp-one-gpu: P ranks sharing one GPU, the staged collectives).
 * Run from the repository root after `make data` (make test does both). Needs mpirun (openmpi-bin). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>

#include "../autograd/ops.h"
#include "../dist/dist.h"
#include "../kernels/util.h"
#include "../layers/msa.h"
#include "../train/model.h"
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

/* ---- sequence-split context parallelism: the zigzag split and the ring ----------------------------- */

/* model_cp_tokens in sequence mode for P ranks at once: every token of every sequence on exactly one rank,
 * rank r holding chunks r and 2P-1-r of each, in ascending order; and the causal work (keys a token can
 * see within its sequence, pos + 1) is the same on every rank, which is what the zigzag is for. */
TEST(zigzag_split_partitions_each_sequence_with_equal_causal_work) {
    const int64_t rows = 3, T = 48, N = rows * T;
    for (int P = 1; P <= 8; P++) {
        if (T % (2 * P)) continue;
        const int64_t chunk = T / (2 * P);
        int *owner = xcalloc((size_t)N, sizeof(int));
        int32_t *index = xmalloc((size_t)N * sizeof(int32_t));
        int64_t work0 = -1;
        for (int r = 0; r < P; r++) {
            Comm g = {.name = "cp", .rank = r, .size = P};
            Model m = {.cp = &g, .cp_sequence = true};
            const int64_t n = model_cp_tokens(&m, N, T, index);
            EXPECT(n == N / P, "P %d rank %d: %lld tokens, expected %lld", P, r, (long long)n, (long long)(N / P));
            int64_t work = 0;
            for (int64_t i = 0; i < n; i++) {
                const int64_t t = index[i], c = (t % T) / chunk;
                EXPECT(i == 0 || index[i] > index[i - 1], "P %d rank %d: indices not ascending at %lld", P, r, (long long)i);
                EXPECT(c == r || c == 2 * P - 1 - r, "P %d rank %d holds token %lld of chunk %lld", P, r, (long long)t,
                       (long long)c);
                owner[t]++;
                work += t % T + 1;
            }
            if (work0 < 0) work0 = work;
            EXPECT(work == work0, "P %d: rank %d's causal work %lld differs from rank 0's %lld", P, r, (long long)work,
                   (long long)work0);
        }
        for (int64_t t = 0; t < N; t++) EXPECT(owner[t] == 1, "P %d: token %lld held %d times", P, (long long)t, owner[t]);
        free(owner), free(index);
    }
}

/* A micro-batch of 2 sequences of 32 tokens in 7 documents: boundaries at 5, 19, 20 (a 1-token document),
 * 32 (the row), 45 and 51, so that at 2, 4 and 8 ranks (chunks of 8, 4 and 2 tokens) documents start and
 * end inside chunks and span the chunks of several ranks. */
static const int32_t RING_CU[] = {0, 5, 19, 20, 32, 45, 51, 64};
#define RING_T 32
#define RING_N 64

/* rows index[0..n) of x [N, ...] as a fresh test tensor */
static Tensor *take_rows(const Tensor *x, const int32_t *index, int64_t n) {
    const int64_t row = x->numel / x->shape[0];
    int64_t shape[TENSOR_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[0] = n;
    Tensor *t = test_tensor(x->dtype, x->ndim, shape);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < row; j++) tensor_set(t, i * row + j, tensor_get(x, (int64_t)index[i] * row + j));
    return t;
}

/* max |a - rows of b| / max |rows of b| */
static double rows_rel_diff(const Tensor *a, const Tensor *b, const int32_t *index, int64_t n) {
    const int64_t row = b->numel / b->shape[0];
    double diff = 0, ref = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < row; j++) {
            const double x = tensor_get(a, i * row + j), y = tensor_get(b, (int64_t)index[i] * row + j);
            if (fabs(x - y) > diff) diff = fabs(x - y);
            if (fabs(y) > ref) ref = fabs(y);
        }
    return diff / (ref > 0 ? ref : 1);
}

/* index [n] as a host i32 tensor */
static Tensor *index_tensor(const int32_t *index, int64_t n) {
    Tensor *t = test_tensor(DT_I32, SHAPE(n));
    memcpy(t->data, index, (size_t)n * sizeof(int32_t));
    return t;
}

/* The ring kernels in one process, without the ring: the queries of one zigzag share (rank 1 of 4), the keys
 * of the whole micro-batch cut into 3 interleaved blocks (token t in block t % 3) and merged in the order
 * 2, 0, 1, give the rows of attention_forward; the blocks' backward shares, each scattered back to its
 * keys' rows, add up to attention_backward's dk, dv (from a dout that is zero outside the share), and dq to
 * its rows. F64, 1e-12 relative. */
TEST(ring_kernels_merge_interleaved_blocks_in_any_order) {
    const int64_t Hq = 4, Hkv = 2, D = 8, n_cu = (int64_t)(sizeof RING_CU / sizeof RING_CU[0]);
    const double scale = 0.35;
    Comm g = {.name = "cp", .rank = 1, .size = 4};
    Model m = {.cp = &g, .cp_sequence = true};
    int32_t qidx[RING_N], kidx[3][RING_N];
    const int64_t nq = model_cp_tokens(&m, RING_N, RING_T, qidx);
    int64_t nk[3] = {0, 0, 0};
    for (int32_t t = 0; t < RING_N; t++) kidx[t % 3][nk[t % 3]++] = t;
    Tensor *cu = index_tensor(RING_CU, n_cu), *qi = index_tensor(qidx, nq);
    Tensor *q = test_randn(DT_F64, SHAPE(RING_N, Hq, D), 1.0, 201), *k = test_randn(DT_F64, SHAPE(RING_N, Hkv, D), 1.0, 202),
           *v = test_randn(DT_F64, SHAPE(RING_N, Hkv, D), 1.0, 203), *dout = test_randn(DT_F64, SHAPE(RING_N, Hq, D), 1.0, 204);
    for (int64_t t = 0, i = 0; t < RING_N; t++) { /* the reference's dout: zero outside the share */
        if (i < nq && qidx[i] == t) {
            i++;
            continue;
        }
        for (int64_t j = 0; j < Hq * D; j++) tensor_set(dout, t * Hq * D + j, 0.0);
    }
    Tensor *ref = test_tensor(DT_F64, SHAPE(RING_N, Hq, D)), *ref_lse = test_tensor(DT_F64, SHAPE(Hq, RING_N));
    Tensor *dq = test_tensor(DT_F64, SHAPE(RING_N, Hq, D)), *dk = test_tensor(DT_F64, SHAPE(RING_N, Hkv, D)),
           *dv = test_tensor(DT_F64, SHAPE(RING_N, Hkv, D));
    cpu_backend.attention_forward(ref, ref_lse, q, k, v, cu, (float)scale);
    cpu_backend.attention_backward(dq, dk, dv, dout, q, k, v, ref, ref_lse, cu, (float)scale);
    Tensor *ql = take_rows(q, qidx, nq), *doutl = take_rows(dout, qidx, nq), *out = test_tensor(DT_F64, SHAPE(nq, Hq, D)),
           *lse = test_tensor(DT_F64, SHAPE(Hq, nq)), *dql = test_tensor(DT_F64, SHAPE(nq, Hq, D)),
           *dk_all = test_tensor(DT_F64, SHAPE(RING_N, Hkv, D)), *dv_all = test_tensor(DT_F64, SHAPE(RING_N, Hkv, D));
    for (int64_t i = 0; i < lse->numel; i++) tensor_set(lse, i, -INFINITY);
    static const int order[3] = {2, 0, 1};
    Tensor *kb[3], *vb[3], *ki[3];
    for (int b = 0; b < 3; b++) {
        kb[b] = take_rows(k, kidx[b], nk[b]), vb[b] = take_rows(v, kidx[b], nk[b]), ki[b] = index_tensor(kidx[b], nk[b]);
    }
    for (int o = 0; o < 3; o++) {
        const int b = order[o];
        cpu_backend.attention_ring_forward(out, lse, ql, kb[b], vb[b], qi, ki[b], cu, (float)scale);
    }
    for (int b = 0; b < 3; b++) {
        Tensor *dkb = test_tensor(DT_F64, SHAPE(nk[b], Hkv, D)), *dvb = test_tensor(DT_F64, SHAPE(nk[b], Hkv, D));
        cpu_backend.attention_ring_backward(dql, dkb, dvb, doutl, ql, kb[b], vb[b], out, lse, qi, ki[b], cu, (float)scale);
        for (int64_t i = 0; i < nk[b]; i++)
            for (int64_t j = 0; j < Hkv * D; j++) {
                tensor_set(dk_all, kidx[b][i] * Hkv * D + j, tensor_get(dkb, i * Hkv * D + j));
                tensor_set(dv_all, kidx[b][i] * Hkv * D + j, tensor_get(dvb, i * Hkv * D + j));
            }
        test_tensor_free(dkb), test_tensor_free(dvb);
    }
    int32_t every[RING_N];
    for (int32_t t = 0; t < RING_N; t++) every[t] = t;
    const double rel[4] = {rows_rel_diff(out, ref, qidx, nq), rows_rel_diff(dql, dq, qidx, nq),
                           rows_rel_diff(dk_all, dk, every, RING_N), rows_rel_diff(dv_all, dv, every, RING_N)};
    static const char *const what[4] = {"out", "dq", "dk", "dv"};
    for (int c = 0; c < 4; c++) EXPECT(rel[c] <= 1e-12, "%s differs from attention by %.3g relative", what[c], rel[c]);
    Tensor *all[] = {cu, qi, q, k, v, dout, ref, ref_lse, dq, dk, dv, ql, doutl, out, lse, dql, dk_all, dv_all};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) test_tensor_free(all[i]);
    for (int b = 0; b < 3; b++) test_tensor_free(kb[b]), test_tensor_free(vb[b]), test_tensor_free(ki[b]);
}

/* An mpirun mode's start: every rank in one cp group (into *cp) with its tensors on dev, and this rank's zigzag
 * share of the RING_N tokens into index; returns its count. */
static int64_t zigzag_group(Dist *dist, int *argc, char ***argv, Device dev, Comm *cp, int32_t *index) {
    dist_init(dist, argc, argv);
    dist_setup(dist, 1, 1, dist->size, 10.0, dev, "test_dist_cp");
    dist_comm(cp, &dist->cp_group);
    Model m = {.cp = cp, .cp_sequence = true};
    return model_cp_tokens(&m, RING_N, RING_T, index);
}

/* mpirun -np P build/tests/test_dist_cp --ring: op_cp_ring_attention on this rank's zigzag rows of q, k, v
 * equals the single-process op_attention over the whole micro-batch (computed here too, from the same
 * seeds): the output rows, and after a backward from the same seed gradient dq, dk and dv of this rank's
 * rows (dk, dv summed over every rank's queries). F64: 1e-12, F32: 1e-5 relative. */
static int ring_main(int argc, char **argv) {
    Dist dist;
    Comm cp;
    int32_t index[RING_N];
    const int64_t n = zigzag_group(&dist, &argc, &argv, DEV_CPU, &cp, index), Hq = 4, Hkv = 2, D = 8;
    const float scale = 0.35f;
    for (int dt = 0; dt < 2; dt++) {
        const DType type = dt ? DT_F32 : DT_F64;
        const double tol = dt ? 1e-5 : 1e-12;
        Engine eng, *e = &eng;
        engine_init(e, &cpu_backend, type, 1 << 20);
        Tensor *cu = engine_empty(e, DT_I32, SHAPE((int64_t)(sizeof RING_CU / sizeof RING_CU[0])));
        tensor_from_host(e, cu, RING_CU);
        Tensor *idx = engine_empty(e, DT_I32, SHAPE(n));
        tensor_from_host(e, idx, index);
        Tensor *q = test_randn(type, SHAPE(RING_N, Hq, D), 1.0, 101), *k = test_randn(type, SHAPE(RING_N, Hkv, D), 1.0, 102),
               *v = test_randn(type, SHAPE(RING_N, Hkv, D), 1.0, 103), *dout = test_randn(type, SHAPE(RING_N, Hq, D), 1.0, 104);
        Tensor *ql = take_rows(q, index, n), *kl = take_rows(k, index, n), *vl = take_rows(v, index, n),
               *doutl = take_rows(dout, index, n);
        q->requires_grad = k->requires_grad = v->requires_grad = true;
        ql->requires_grad = kl->requires_grad = vl->requires_grad = true;
        Tensor *ref = op_attention(e, q, k, v, cu, scale, NULL);
        engine_backward_from(e, ref, dout, 0);
        const int from = e->tape_len;
        Tensor *out = op_cp_ring_attention(e, ql, kl, vl, cu, idx, scale, &cp, NULL);
        engine_backward_from(e, out, doutl, from);
        const struct { const char *what; const Tensor *a, *b; } cmp[] = {
            {"out", out, ref}, {"dq", ql->grad, q->grad}, {"dk", kl->grad, k->grad}, {"dv", vl->grad, v->grad}};
        for (int c = 0; c < 4; c++) {
            const double rel = rows_rel_diff(cmp[c].a, cmp[c].b, index, n);
            CHECK(rel <= tol, "rank %d of %d, %s: %s differs from the single process by %.3g relative (tolerance %g)",
                  cp.rank, cp.size, dtype_name(type), cmp[c].what, rel, tol);
        }
        engine_free(e);
        Tensor *all[] = {q, k, v, dout, ql, kl, vl, doutl};
        for (int i = 0; i < 8; i++) {
            all[i]->grad = NULL; /* the engine's arena held it */
            test_tensor_free(all[i]);
        }
    }
    printf("rank %d: ring ok (cp %d)\n", cp.rank, cp.size);
    dist_finalize(&dist);
    return 0;
}

/* this program in one of its mpirun modes (--ring, --msa) at 2, 4 and 8 ranks, each saying "<mode> ok" */
static void run_mode_at_2_4_8_ranks(TestCtx *tc, const char *mode) {
    EXPECT(FX->have_mpirun, "no mpirun: install openmpi-bin (bash tools/install_deps.sh)");
    char cmd[128], ok[32];
    snprintf(cmd, sizeof cmd, "build/tests/test_dist_cp --%s", mode);
    snprintf(ok, sizeof ok, "%s ok", mode);
    for (int np = 2; np <= 8; np *= 2) {
        char out[8192];
        EXPECT(harness_run_ranks(tc, np, cmd, ok, out, sizeof out), "np %d: %s", np, out);
    }
}

TEST(ring_attention_equals_single_process_attention_at_2_4_8_ranks) { run_mode_at_2_4_8_ranks(tc, "ring"); }

/* ---- MSA over the sequence under mpirun: this program's --msa mode --------------------------------------- */

/* The MSA chain (layers/msa.h msa_attend) of this rank's zigzag rows, its index keys gathered (op_cp_gather_tokens)
 * and the selected K/V blocks fetched (op_cp_fetch_blocks), against the chain of the whole micro-batch in one
 * engine of this process. Returns the largest relative difference over: out and lse rows, the selection rows
 * (exact), the fetched rows (exactly the tokens of the selected blocks, each with its K and V), the KL (the mean
 * of the ranks' means), the recall, and, where grads, dq, dk, dv, dqi, dki of this
 * rank's rows after a backward of sum(out * R) + loss (single process) and sum(out rows * R rows) + loss / P
 * (each rank: the trainer's 1 / ranks for an auxiliary term), which add up to the same function. */
static double msa_split_diff(DType type, bool dense, bool grads, const int32_t *index, int64_t n, const Comm *cp,
                             char *worst, size_t worst_n) {
    const int64_t Hq = 4, Hkv = 2, D = 8, Di = 6, N = RING_N;
    MsaSettings s = {.params = {.block_size = 3, .topk_blocks = 3, .init_blocks = 1, .local_blocks = 1, .scale = 0.35f,
                                .index_scale = 0.4f},
                     .kl_weight = 0.7f, .recall_stride = 3, .index_dim = (int)Di};
    Tensor *x[5] = {test_randn(type, SHAPE(N, Hq, D), 1.0, 301), test_randn(type, SHAPE(N, Hkv, D), 1.0, 302),
                    test_randn(type, SHAPE(N, Hkv, D), 1.0, 303), test_randn(type, SHAPE(N, Hkv, Di), 1.5, 304),
                    test_randn(type, SHAPE(N, Di), 1.5, 305)};
    Tensor *R = test_randn(type, SHAPE(1, N * Hq * D), 1.0, 306), *Rl = test_tensor(type, SHAPE(1, n * Hq * D)), *xl[5];
    for (int64_t i = 0; i < n; i++) /* this rank's rows of R, as the rows of out it weighs */
        for (int64_t j = 0; j < Hq * D; j++) tensor_set(Rl, i * Hq * D + j, tensor_get(R, index[i] * Hq * D + j));
    for (int i = 0; i < 5; i++) {
        xl[i] = take_rows(x[i], index, n);
        x[i]->requires_grad = xl[i]->requires_grad = grads;
    }
    Engine one, split;
    engine_init(&one, &cpu_backend, type, 1 << 20);
    engine_init(&split, &cpu_backend, type, 1 << 20);
    engine_set_grad(&one, grads);
    engine_set_grad(&split, grads);
    Tensor *cu = engine_empty(&one, DT_I32, SHAPE((int64_t)(sizeof RING_CU / sizeof RING_CU[0]))), *idx = engine_empty(&split, DT_I32, SHAPE(n));
    tensor_from_host(&one, cu, RING_CU);
    tensor_from_host(&split, idx, index);
    /* the single process */
    Tensor *kl1 = engine_zeros(&one, type, SHAPE(1));
    MsaAttention a1 = msa_attend(&one, &s, x[0], x[1], x[2], x[3], x[4], cu, dense, kl1, NULL);
    const double recall1 = msa_recall(&one, &s, x[0], x[1], a1.topk, x[3], x[4], cu);
    if (grads)
        engine_backward(&one, op_add(&one, engine_view(&one, op_linear(&one, engine_view(&one, a1.out, SHAPE(1, N * Hq * D)), R), SHAPE(1)), a1.loss));
    /* this rank's share */
    MsaSettings sp = s;
    sp.cp = cp, sp.cp_index = idx;
    Tensor *kl = engine_zeros(&split, type, SHAPE(1)), *ki = op_cp_gather_tokens(&split, xl[4], idx, cp);
    MsaAttention a = msa_attend(&split, &sp, xl[0], xl[1], xl[2], xl[3], ki, cu, dense, kl, NULL);
    const double recall = msa_recall(&split, &sp, xl[0], xl[1], a.topk, xl[3], ki, cu);
    if (grads) {
        Tensor *part = engine_view(&split, op_linear(&split, engine_view(&split, a.out, SHAPE(1, n * Hq * D)), Rl), SHAPE(1));
        engine_backward(&split, op_add(&split, part, op_scale(&split, a.loss, 1.0f / (float)cp->size)));
    }
    double kls[8], kl_mean = 0, mine = tensor_get(kl, 0);
    cp->all_gather(cp, &mine, kls, 1, DT_F64, DEV_CPU);
    for (int r = 0; r < cp->size; r++) kl_mean += kls[r] / cp->size;
    double worst_rel = 0;
    const struct { const char *what; double rel; } scalars[] = {
        {"kl", fabs(kl_mean - tensor_get(kl1, 0)) / fabs(tensor_get(kl1, 0))},
        {"recall", fabs(recall - recall1) / fabs(recall1)},
        {"out", rows_rel_diff(a.out, a1.out, index, n)}};
    for (size_t c = 0; c < sizeof scalars / sizeof scalars[0]; c++)
        if (!(scalars[c].rel <= worst_rel)) worst_rel = scalars[c].rel, snprintf(worst, worst_n, "%s", scalars[c].what);
    for (int64_t h = 0; h < Hq; h++) /* lse [Hq, n] rows of [Hq, N] */
        for (int64_t i = 0; i < n; i++) {
            const double ref = tensor_get(a1.lse, h * N + index[i]), rel = fabs(tensor_get(a.lse, h * n + i) - ref) / fabs(ref);
            if (!(rel <= worst_rel)) worst_rel = rel, snprintf(worst, worst_n, "lse[%lld, %d]", (long long)h, index[i]);
        }
    const int64_t K = s.params.topk_blocks;
    for (int64_t g = 0; !dense && g < Hkv; g++)
        for (int64_t i = 0; i < n; i++)
            if (memcmp((int32_t *)a.topk->data + (g * n + i) * K, (int32_t *)a1.topk->data + (g * N + index[i]) * K,
                       (size_t)K * sizeof(int32_t)))
                worst_rel = INFINITY, snprintf(worst, worst_n, "topk[%lld, %d]", (long long)g, index[i]);
    if (!dense) { /* the fetch holds the tokens of the blocks this rank's queries selected, and only those */
        Tensor *vf, *rows, *kf = op_cp_fetch_blocks(&split, xl[1], xl[2], a.topk, idx, cu, s.params.block_size, cp, &vf, &rows);
        const int64_t B = s.params.block_size, n_cu = (int64_t)(sizeof RING_CU / sizeof RING_CU[0]);
        unsigned char want[RING_N] = {0};
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t i = 0; i < n; i++) {
                int64_t d = 0;
                while (RING_CU[d + 1] <= index[i]) d++;
                for (int64_t slot = 0, b; slot < K && (b = ((int32_t *)a.topk->data)[(g * n + i) * K + slot]) >= 0; slot++)
                    for (int64_t j = RING_CU[d] + b * B; j < RING_CU[d] + (b + 1) * B && j < RING_CU[d + 1]; j++) want[j] = 1;
            }
        const int32_t *row = rows->data;
        for (int64_t j = 0; j < N && j < RING_CU[n_cu - 1]; j++) {
            bool same = (row[j] >= 0) == want[j];
            for (int64_t c = 0; same && row[j] >= 0 && c < Hkv * D; c++)
                same = tensor_get(kf, row[j] * Hkv * D + c) == tensor_get(x[1], j * Hkv * D + c) &&
                       tensor_get(vf, row[j] * Hkv * D + c) == tensor_get(x[2], j * Hkv * D + c);
            if (!same) worst_rel = INFINITY, snprintf(worst, worst_n, "the fetched row of token %lld", (long long)j);
        }
    }
    static const char *const what[5] = {"dq", "dk", "dv", "dqi", "dki"};
    for (int i = 0; grads && i < 5; i++) {
        const double rel = xl[i]->grad && x[i]->grad ? rows_rel_diff(xl[i]->grad, x[i]->grad, index, n) : INFINITY;
        if (!(rel <= worst_rel)) worst_rel = rel, snprintf(worst, worst_n, "%s", what[i]);
    }
    engine_free(&one);
    engine_free(&split);
    for (int i = 0; i < 5; i++) {
        x[i]->grad = xl[i]->grad = NULL; /* the engines' arenas held them */
        test_tensor_free(x[i]), test_tensor_free(xl[i]);
    }
    test_tensor_free(R), test_tensor_free(Rl);
    return worst_rel;
}

/* mpirun -np P build/tests/test_dist_cp --msa: msa_split_diff in the dense warm-up and the sparse phase with a
 * backward (the KL in the attention's backward), and the sparse phase without (eval: the KL forward, no
 * plan), F64 within 1e-10 and F32 within 1e-5 relative. */
static int msa_main(int argc, char **argv) {
    Dist dist;
    Comm cp;
    int32_t index[RING_N];
    const int64_t n = zigzag_group(&dist, &argc, &argv, DEV_CPU, &cp, index);
    static const struct { bool dense, grads; const char *phase; } cases[] = {
        {true, true, "dense warm-up"}, {false, true, "sparse, KL in the backward"}, {false, false, "sparse, no gradient"}};
    for (int dt = 0; dt < 2; dt++)
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            const DType type = dt ? DT_F32 : DT_F64;
            const double tol = dt ? 1e-5 : 1e-10;
            char worst[64] = "";
            const double rel = msa_split_diff(type, cases[c].dense, cases[c].grads, index, n, &cp, worst, sizeof worst);
            CHECK(rel <= tol, "rank %d of %d, %s, %s: %s differs from the single process by %.3g relative (tolerance %g)",
                  cp.rank, cp.size, dtype_name(type), cases[c].phase, worst, rel, tol);
            if (cp.rank == 0)
                printf("cp %d, %s, %s: largest difference %.2e (%s)\n", cp.size, dtype_name(type), cases[c].phase, rel,
                       worst);
        }
    printf("rank %d: msa ok (cp %d)\n", cp.rank, cp.size);
    dist_finalize(&dist);
    return 0;
}

#ifdef MSA_CUDA
/* ---- the device paths under mpirun: this program's --cuda mode (CUDA builds, on a GPU) ------------------ */

/* engine tensor of host tensor h (its dtype and shape), requiring grad when asked */
static Tensor *upload(Engine *e, const Tensor *h, bool grad) {
    Tensor *t = engine_empty(e, h->dtype, h->ndim, h->shape);
    tensor_from_host(e, t, h->data);
    t->requires_grad = grad;
    return t;
}

/* a host copy of engine tensor t */
static Tensor *download(Engine *e, const Tensor *t) {
    Tensor *h = test_tensor(t->dtype, t->ndim, t->shape);
    tensor_to_host(e, h->data, t);
    return h;
}

enum { OUT_RING, OUT_RING_DQ, OUT_RING_DK, OUT_RING_DV, OUT_GATHERED, OUT_GATHER_DX, OUT_KF, OUT_VF, OUT_KEY_ROWS,
       OUT_FETCH_DK, OUT_FETCH_DV, OUT_MSA, OUT_MSA_DQ, OUT_MSA_DK, OUT_MSA_DV, OUT_COUNT };
static const char *const OUT_NAMES[OUT_COUNT] = {"ring out", "ring dq", "ring dk", "ring dv", "gathered keys",
                                                 "gathered keys' dx", "fetched k", "fetched v", "key_rows",
                                                 "fetch dk", "fetch dv", "msa out", "msa dq", "msa dk", "msa dv"};
/* the outputs our CUDA kernels compute (the rest are moves and ordered sums, identical): 1e-5 relative */
static bool out_computed(int c) { return c <= OUT_RING_DV || c >= OUT_MSA; }

/* This rank's sequence-split ops on backend be (F32 engine), from the host inputs in (q, k, v, dout, index keys,
 * their seed gradient [N, Di], topk): the ring attention and its backward from dout; the index keys gathered and
 * their backward from the seed; the selected blocks fetched and their backward from seeds made of the fetched
 * rows (0.5 x + 0.25: the same on either backend when the rows are); the MSA attention of this rank's queries
 * (query_index) over the fetched blocks (key_rows), as layers/msa.c runs it, and its backward from dout through
 * the fetch to the blocks' owners. Host copies of the results into out. */
static void split_ops(const KernelBackend *be, Tensor *const *in, const int32_t *index, int64_t n, const Comm *cp,
                      Tensor **out) {
    Engine eng, *e = &eng;
    engine_init(e, be, DT_F32, 1 << 20);
    Tensor *cu_h = index_tensor(RING_CU, (int64_t)(sizeof RING_CU / sizeof RING_CU[0])), *idx_h = index_tensor(index, n);
    Tensor *cu = upload(e, cu_h, false), *idx = upload(e, idx_h, false);
    Tensor *q = upload(e, in[0], true), *k = upload(e, in[1], true), *v = upload(e, in[2], true);
    Tensor *o = op_cp_ring_attention(e, q, k, v, cu, idx, 0.35f, cp, NULL);
    engine_backward_from(e, o, upload(e, in[3], false), 0);
    out[OUT_RING] = download(e, o), out[OUT_RING_DQ] = download(e, q->grad);
    out[OUT_RING_DK] = download(e, k->grad), out[OUT_RING_DV] = download(e, v->grad);
    int from = e->tape_len;
    Tensor *ki = upload(e, in[4], true), *gathered = op_cp_gather_tokens(e, ki, idx, cp);
    engine_backward_from(e, gathered, upload(e, in[5], false), from);
    out[OUT_GATHERED] = download(e, gathered), out[OUT_GATHER_DX] = download(e, ki->grad);
    from = e->tape_len;
    Tensor *k2 = upload(e, in[1], true), *v2 = upload(e, in[2], true), *vf, *rows;
    Tensor *kf = op_cp_fetch_blocks(e, k2, v2, upload(e, in[6], false), idx, cu, 3, cp, &vf, &rows);
    out[OUT_KF] = download(e, kf), out[OUT_VF] = download(e, vf), out[OUT_KEY_ROWS] = download(e, rows);
    for (int i = 0; i < 2; i++) {
        Tensor *seed = download(e, i ? vf : kf);
        for (int64_t j = 0; j < seed->numel; j++) tensor_set(seed, j, 0.5 * tensor_get(seed, j) + 0.25);
        tensor_from_host(e, engine_grad(e, i ? vf : kf), seed->data);
        test_tensor_free(seed);
    }
    engine_backward_tape(e, from);
    out[OUT_FETCH_DK] = download(e, k2->grad), out[OUT_FETCH_DV] = download(e, v2->grad);
    from = e->tape_len;
    Tensor *q3 = upload(e, in[0], true), *k3 = upload(e, in[1], true), *v3 = upload(e, in[2], true), *vf3, *rows3;
    Tensor *topk = upload(e, in[6], false);
    Tensor *kf3 = op_cp_fetch_blocks(e, k3, v3, topk, idx, cu, 3, cp, &vf3, &rows3);
    const MsaParams p = {.block_size = 3, .topk_blocks = (int)topk->shape[2], .init_blocks = 0, .local_blocks = 1,
                         .scale = 0.35f, .index_scale = 1.0f, .query_index = idx, .key_rows = rows3};
    Tensor *o3 = op_msa_attention(e, q3, kf3, vf3, topk, NULL, cu, &p, NULL);
    engine_backward_from(e, o3, upload(e, in[3], false), from);
    out[OUT_MSA] = download(e, o3), out[OUT_MSA_DQ] = download(e, q3->grad);
    out[OUT_MSA_DK] = download(e, k3->grad), out[OUT_MSA_DV] = download(e, v3->grad);
    engine_free(e);
    test_tensor_free(cu_h), test_tensor_free(idx_h);
}

/* mpirun -np P build/tests/test_dist_cp --cuda (a CUDA build on a GPU; ranks sharing one GPU use the staged
 * collectives): the ops of sequence-split context parallelism on device tensors against the same ops on the
 * CPU, F32, from the same inputs: the ring attention and the MSA attention over the fetched blocks (our CUDA
 * kernels against the CPU's: 1e-5 relative), the index keys gathered and the selected K/V blocks fetched,
 * forward and backward (pure moves and ordered sums: identical). */
static int cuda_main(int argc, char **argv) {
    Dist dist;
    Comm cp;
    int32_t index[RING_N];
    const int64_t n = zigzag_group(&dist, &argc, &argv, DEV_CUDA, &cp, index), Hq = 4, Hkv = 2, D = 8, Di = 6, K = 3,
                  B = 3;
    Tensor *whole[6] = {test_randn(DT_F32, SHAPE(RING_N, Hq, D), 1.0, 401), test_randn(DT_F32, SHAPE(RING_N, Hkv, D), 1.0, 402),
                        test_randn(DT_F32, SHAPE(RING_N, Hkv, D), 1.0, 403), test_randn(DT_F32, SHAPE(RING_N, Hq, D), 1.0, 404),
                        test_randn(DT_F32, SHAPE(RING_N, Di), 1.0, 405), test_randn(DT_F32, SHAPE(RING_N, Di), 1.0, 406)};
    Tensor *in[7];
    for (int i = 0; i < 5; i++) in[i] = take_rows(whole[i], index, n);
    in[5] = whole[5]; /* the gathered keys' seed covers every token */
    /* each query selects its document's first block and its own (group 1 also the one before): ascending, -1 padded */
    in[6] = test_tensor(DT_I32, SHAPE(Hkv, n, K));
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t i = 0; i < n; i++) {
            int64_t d = 0;
            while (RING_CU[d + 1] <= index[i]) d++;
            const int32_t own = (int32_t)((index[i] - RING_CU[d]) / B);
            int32_t *row = (int32_t *)in[6]->data + (g * n + i) * K, m = 0;
            row[m++] = 0;
            if (g == 1 && own >= 2) row[m++] = own - 1;
            if (own >= 1) row[m++] = own;
            while (m < K) row[m++] = -1;
        }
    Tensor *ref[OUT_COUNT], *got[OUT_COUNT];
    split_ops(&cpu_backend, in, index, n, &cp, ref);
    split_ops(&cuda_backend, in, index, n, &cp, got);
    for (int c = 0; c < OUT_COUNT; c++) {
        const double tol = out_computed(c) ? 1e-5 : 0;
        double diff = 0, scale = 0;
        CHECK(got[c]->numel == ref[c]->numel, "rank %d: %s has %lld elements on the GPU and %lld on the CPU", cp.rank,
              OUT_NAMES[c], (long long)got[c]->numel, (long long)ref[c]->numel);
        for (int64_t j = 0; j < ref[c]->numel; j++) {
            if (ref[c]->dtype == DT_I32) { /* key_rows: the same rows, exactly */
                diff = fmax(diff, ((int32_t *)got[c]->data)[j] == ((int32_t *)ref[c]->data)[j] ? 0 : INFINITY);
                continue;
            }
            const double a = tensor_get(got[c], j), b = tensor_get(ref[c], j);
            if (!(fabs(a - b) <= diff)) diff = fabs(a - b);
            if (fabs(b) > scale) scale = fabs(b);
        }
        const double rel = diff / (scale > 0 ? scale : 1);
        CHECK(rel <= tol, "rank %d of %d: %s on the GPU differs from the CPU by %.3g relative (tolerance %g)", cp.rank,
              cp.size, OUT_NAMES[c], rel, tol);
        if (cp.rank == 0) printf("cp %d: %-18s GPU vs CPU %.2e\n", cp.size, OUT_NAMES[c], rel);
        test_tensor_free(ref[c]), test_tensor_free(got[c]);
    }
    for (int i = 0; i < 7; i++) test_tensor_free(in[i]);
    for (int i = 0; i < 5; i++) test_tensor_free(whole[i]);
    printf("rank %d: cuda ok (cp %d)\n", cp.rank, cp.size);
    dist_finalize(&dist);
    return 0;
}
#endif

/* 2, 4 and 8 ranks over 2 KV heads, chunks of 16, 8 and 4 tokens, blocks of 3: documents and blocks cross
 * the chunks, and a block's tokens sit on two ranks */
TEST(msa_over_the_sequence_equals_single_process_at_2_4_8_ranks) { run_mode_at_2_4_8_ranks(tc, "msa"); }

/* The cp group's all_to_allv (the ring's shift), except that the last rank stops for good before its second
 * shift: it has passed its first block on and hangs in the middle of the ring. */
static Comm hang_base;
static void all_to_allv_then_hang(const Comm *c, const void *send, const int64_t *sc, const int64_t *sd, void *recv,
                                  const int64_t *rc, const int64_t *rd, DType t, Device dev) {
    static int shifts;
    if (c->rank == c->size - 1 && ++shifts == 2)
        for (;;) pause(); /* until the others time out and mpirun ends the job */
    hang_base.all_to_allv(c, send, sc, sd, recv, rc, rd, t, dev);
}

/* mpirun -np 4 build/tests/test_dist_cp --ring-hang: the ring forward with dist.timeout = 2 s and a rank
 * that hangs after its first shift; the others must end the job with the timeout's message. */
static int ring_hang_main(int argc, char **argv) {
    Dist dist;
    dist_init(&dist, &argc, &argv);
    dist_setup(&dist, 1, 1, dist.size, 2.0, DEV_CPU, "test_dist_cp");
    dist_comm(&hang_base, &dist.cp_group);
    Comm cp = hang_base;
    cp.all_to_allv = all_to_allv_then_hang;
    Model m = {.cp = &cp, .cp_sequence = true};
    int32_t index[RING_N];
    const int64_t n = model_cp_tokens(&m, RING_N, RING_T, index);
    Engine eng, *e = &eng;
    engine_init(e, &cpu_backend, DT_F32, 1 << 20);
    Tensor *cu = engine_empty(e, DT_I32, SHAPE((int64_t)(sizeof RING_CU / sizeof RING_CU[0])));
    tensor_from_host(e, cu, RING_CU);
    Tensor *idx = engine_empty(e, DT_I32, SHAPE(n));
    tensor_from_host(e, idx, index);
    Tensor *q = engine_zeros(e, DT_F32, SHAPE(n, 2, 4)), *k = engine_zeros(e, DT_F32, SHAPE(n, 1, 4));
    op_cp_ring_attention(e, q, k, k, cu, idx, 0.5f, &cp, NULL);
    printf("rank %d: the ring completed although a rank hung\n", cp.rank);
    dist_finalize(&dist);
    return 0;
}

TEST(a_rank_that_hangs_mid_ring_ends_the_job_within_the_timeout) {
    EXPECT(FX->have_mpirun, "no mpirun");
    const char *cmds[4];
    for (int i = 0; i < 4; i++) cmds[i] = "build/tests/test_dist_cp --ring-hang";
    RunOutcome o = harness_train_ranks(tc, 4, cmds, 60);
    printf("    a rank hung mid-ring (dist.timeout = 2 s): the job ended after %.1f s with status %d\n", o.seconds,
           o.status);
    EXPECT(o.status != 0 && o.status != 124 && o.status != 137, "status %d (124/137: killed by the test's timeout): %s",
           o.status, o.err);
    EXPECT(strstr(o.err, "did not complete within dist.timeout = 2 s") && strstr(o.err, "cp group"),
           "stderr lacks the timeout message: %s", o.err);
    EXPECT(o.seconds < 30, "the job took %.1f s to end", o.seconds);
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

/* ---- sequence-split context parallelism in build/train ---------------------------------------------- */

/* Settings that train on Shakespeare cut into documents of 1 to 53 characters (build/prepare_text, "|"
 * between them), made once in the harness directory: each 64-token sequence holds several documents, whose
 * boundaries fall inside the zigzag chunks (32, 16, 8, 4 tokens at cp 1, 2, 4, 8) and whose tokens span
 * the chunks of several ranks. NULL when the files cannot be made. */
static const char *documents_data(TestCtx *tc) {
    static char args[1200];
    if (args[0]) return args;
    char dir[512], path[600], cmd[1400];
    harness_path(tc, "documents", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/input.txt", dir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    FILE *in = system(cmd) == 0 ? fopen("data/shakespeare/input.txt", "rb") : NULL, *out = in ? fopen(path, "wb") : NULL;
    if (!out) {
        if (in) fclose(in);
        return NULL;
    }
    int c, left = 1, doc = 0;
    for (long i = 0; i < 120000 && (c = fgetc(in)) != EOF; i++) {
        fputc(c, out);
        if (--left == 0) { /* lengths 1, 14, 27, ..., 53, 13, ...: every offset modulo the chunk sizes */
            fputc('|', out);
            left = 1 + (13 * ++doc) % 53;
        }
    }
    fclose(in);
    fclose(out);
    snprintf(cmd, sizeof cmd, "build/prepare_text --tokenizer char --val-fraction 0.1 --doc-separator '|' %s %s >/dev/null",
             path, dir);
    if (system(cmd) != 0) return NULL;
    snprintf(args, sizeof args, "--set data.train_path=%s/train.h5 --set data.val_path=%s/val.h5", dir, dir);
    return args;
}

/* expect_same_training on the documents data: the single process and np ranks with `layout` */
static void expect_same_on_documents(TestCtx *tc, const char *name, int np, const char *layout, const char *args) {
    const char *docs = documents_data(tc);
    EXPECT(docs, "could not make the documents data with build/prepare_text");
    char all[2048];
    snprintf(all, sizeof all, "%s %s", docs, args);
    expect_same_training(tc, name, np, layout, all);
}

#define SEQ "--set dist.cp_mode=sequence "

/* cp 2 with 2 KV heads: auto would split the heads, so the mode is asked for; two micro-batches per step,
 * every block recomputed in the backward (its ring runs again) */
TEST(sequence_cp2_equals_single_process) {
    expect_same_on_documents(tc, "seq_cp2", 2, SEQ "--set dist.cp=2",
                             "--set train.grad_accum=2 --set train.batch_size=4 --set train.recompute=true");
}

/* Layer 1 MSA (blocks of 8: at cp 4 and 8 a block spans the chunks of 2 and 3 ranks): 4 steps of dense
 * warm-up (ring attention, the KL's teacher over every key gathered), then sparse (the selected blocks
 * fetched, the KL in the backward); the evals at steps 5 and 10 compare the KL and the recall too */
#define SEQ_MSA MSA " --set msa.dense_warmup_steps=4"

/* the MSA model at cp 2, two micro-batches per step, every block recomputed in the backward (its fetches
 * and gathers run again, the selection replayed) */
TEST(sequence_msa_cp2_accum_recompute_equals_single_process) {
    expect_same_on_documents(tc, "seq_msa_cp2", 2, SEQ "--set dist.cp=2",
                             SEQ_MSA " --set train.grad_accum=2 --set train.batch_size=4 --set train.recompute=true");
}

/* cp 4 and 8 exceed the 2 KV heads: auto splits the sequence (cp 4 MSA: the evals add the dense reference,
 * the MSA layer's ring attention without a gradient) */
TEST(sequence_cp4_cp8_beyond_the_kv_heads_equal_single_process) {
    expect_same_on_documents(tc, "docs", 4, "--set dist.cp=4", "");
    expect_same_on_documents(tc, "docs_msa_ref", 4, "--set dist.cp=4", SEQ_MSA " --set train.eval_dense_reference=true");
    expect_same_on_documents(tc, "docs_msa", 8, "--set dist.cp=8", SEQ_MSA);
}

/* layer 1 a sliding window (2 blocks of 8 and a sink block): the blocks of each rank's windows fetched */
TEST(sequence_window_cp8_equals_single_process) {
    expect_same_on_documents(tc, "docs_window", 8, "--set dist.cp=8",
                             "--set model.attention=window --set model.msa_layers=1- --set msa.block_size=8 "
                             "--set msa.local_blocks=2 --set msa.init_blocks=1");
}

TEST(sequence_cp4_dp2_equals_single_process) {
    expect_same_on_documents(tc, "docs_msa", 8, "--set dist.cp=4 --set dist.dp=2", SEQ_MSA);
}

/* with MoE layers whose experts are split over ep 2 (the MoE settings of test_dist_ep.c) and the MSA layer */
TEST(sequence_cp2_ep2_moe_equals_single_process) {
    expect_same_on_documents(tc, "docs_moe", 4, SEQ "--set dist.cp=2 --set dist.ep=2",
                             SEQ_MSA " --set model.ffn=moe --set moe.num_experts=8 --set moe.experts_per_token=2 "
                             "--set moe.expert_dim=32 --set moe.shared_experts=1 --set moe.aux_loss_weight=0 "
                             "--set moe.z_loss_weight=0.001 --set moe.bias_update_rate=0.01");
}

/* What sequence mode does not cover is refused at start-up with the key and what to use instead. */
TEST(sequence_mode_refuses_what_it_does_not_cover) {
    EXPECT(FX->have_mpirun, "no mpirun");
    static const struct { const char *args, *expect; } cases[] = {
        {"--set model.dropout=0.1", "dist.cp_mode = sequence (dist.cp = 4) does not take model.dropout = 0.1"},
        {"--set train.seq_len=36", "train.seq_len = 36 is not a multiple of 2 * dist.cp = 8"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char args[512];
        snprintf(args, sizeof args, "--set dist.cp=4 %s", cases[i].args);
        RunOutcome o = harness_train(tc, 4, NULL, args, "");
        EXPECT(o.status != 0 && strstr(o.err, cases[i].expect), "%s: status %d: %s", cases[i].args, o.status, o.err);
    }
}

TEST(cp_that_does_not_divide_is_refused) {
    EXPECT(FX->have_mpirun, "no mpirun");
    RunOutcome o = harness_train(tc, 4, NULL, "--set dist.cp=4 --set dist.cp_mode=heads", "");
    EXPECT(o.status != 0 && strstr(o.err, "dist.cp = 4 does not divide model.n_kv_heads = 2"), "cp 4, 2 KV heads: %s",
           o.err);
    o = harness_train(tc, 2, NULL, CP2 " --set train.batch_size=1 --set train.seq_len=63", "");
    EXPECT(o.status != 0 && strstr(o.err, "dist.cp = 2 does not divide the 63 tokens of a rank's micro-batch"),
           "63 tokens on cp 2: %s", o.err);
}

/* ---- main ----------------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--exchange")) return exchange_main(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "--ring")) return ring_main(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "--ring-hang")) return ring_hang_main(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "--msa")) return msa_main(argc, argv);
#ifdef MSA_CUDA
    if (argc > 1 && !strcmp(argv[1], "--cuda")) return cuda_main(argc, argv);
#endif
    HARNESS_TEST_BEGIN("test_dist_cp", "");
    RUN(transpose01_matches_the_index_reference_and_round_trips);
    RUN(seq_heads_exchange_layout_for_P_ranks);
    RUN(one_rank_group_is_the_identity);
    RUN(exchange_ops_under_mpirun);
    RUN(zigzag_split_partitions_each_sequence_with_equal_causal_work);
    RUN(ring_kernels_merge_interleaved_blocks_in_any_order);
    RUN(ring_attention_equals_single_process_attention_at_2_4_8_ranks);
    RUN(a_rank_that_hangs_mid_ring_ends_the_job_within_the_timeout);
    RUN(msa_over_the_sequence_equals_single_process_at_2_4_8_ranks);
    RUN(cp2_dense_equals_single_process);
    RUN(cp2_dense_with_dropout_accum_recompute_equals_single_process);
    RUN(cp2_msa_sparse_equals_single_process);
    RUN(cp2_msa_warmup_equals_single_process);
    RUN(cp2_dp2_equals_single_process);
    RUN(cp2_checkpoint_resumes_on_1_and_on_cp2_dp2);
    RUN(sequence_cp2_equals_single_process);
    RUN(sequence_msa_cp2_accum_recompute_equals_single_process);
    RUN(sequence_cp4_cp8_beyond_the_kv_heads_equal_single_process);
    RUN(sequence_window_cp8_equals_single_process);
    RUN(sequence_cp4_dp2_equals_single_process);
    RUN(sequence_cp2_ep2_moe_equals_single_process);
    RUN(sequence_mode_refuses_what_it_does_not_cover);
    RUN(cp_that_does_not_divide_is_refused);
    HARNESS_TEST_END();
}
