/* Context parallelism over the sequence for MSA layers (dist.cp_mode = sequence; layers/msa.c calls these):
 * what a rank's sparse attention reads of the other ranks' tokens.
 *
 * The P ranks of the cp group each hold n tokens of the micro-batch (the zigzag split of model_cp_tokens,
 * named by their global indices, index i32 [n]; every token of the N = P*n on exactly one rank). Two ops:
 *
 *   cp_gather_tokens  x [n, ...] -> [N, ...]: every rank's rows, in micro-batch token order (an all-gather,
 *                     then each rank's rows put at their tokens). The index keys (d_idx per token, small):
 *                     every rank's indexer scores every earlier block of its documents. Backward: the
 *                     gradient's rows taken back into the gathered order and reduce-scattered (sum), so each
 *                     rank receives the sum over all ranks' queries of its own tokens' gradients.
 *
 *   cp_fetch_blocks   k, v [n, Hkv, D] and this rank's selection topk [Hkv, n, topk_blocks] -> kf, vf
 *                     [M, Hkv, D]: the M tokens of every block that any of this rank's (group, query) pairs
 *                     selected, and key_rows i32 [N], the row of each token there (-1: not fetched), which
 *                     the MSA kernels read them through (MsaParams.key_rows). The blocks are the union of
 *                     the selections; each is asked for once, of every rank that holds a token of it
 *                     (blocks need not align with the chunks): one all-to-all of counts, one of block ids (the
 *                     block's first token), then the K rows and the V rows. Backward: the gradients of those rows go back
 *                     the same way reversed and are added on the rank that holds the token, so dK/dV of a
 *                     token sum every rank's queries that read it.
 *
 * The exchanges are collectives of the group's Comm on the tensors' device: every rank runs them in the same
 * order, forward and backward (the tape has the same shape on every rank). The tables (who holds each token,
 * what to send) are built on the host from the gathered indices and the selection (copied to the host when
 * they live on the device: the selection's copy makes the host wait once per fetch); the row moves are the
 * backend's embedding kernels, a gather of rows (embedding_forward) and an ordered scatter-add of rows
 * (embedding_backward), so the ops run on either backend and the CPU's sums are in the order of the host
 * loops they replace. */
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"
#include "ops.h"

/* t's i32 values on the host: its data on the CPU, else the batch's host copy (Tensor.host_data) or a copy
 * made here (host memory in the engine's arena). */
static const int32_t *host_i32(Engine *e, const Tensor *t) {
    if (t->device == DEV_CPU) return t->data;
    if (t->host_data) return t->host_data;
    int32_t *h = arena_alloc(&e->host, (size_t)(t->numel > 0 ? t->numel : 1) * sizeof(int32_t));
    tensor_to_host(e, h, t);
    return h;
}

/* Every rank's token indices, rank s's at s * n (host memory in the engine's arena). */
static int32_t *gathered_index(Engine *e, const Tensor *index, const Comm *g) {
    const int64_t n = index->numel;
    int32_t *all = arena_alloc(&e->host, (size_t)(g->size * n > 0 ? g->size * n : 1) * sizeof(int32_t));
    g->all_gather(g, host_i32(e, index), all, n, DT_I32, DEV_CPU);
    return all;
}

/* The host table rows[n] as an i32 tensor of the engine's device. */
static Tensor *row_table(Engine *e, const int32_t *rows, int64_t n) {
    Tensor *t = engine_empty(e, DT_I32, SHAPE(n));
    if (n > 0) tensor_from_host(e, t, rows);
    return t;
}

/* x [rows, ...] as [rows, the rest] over the same memory: the embedding kernels' 2-D layout */
static Tensor *as_rows(Engine *e, const Tensor *x) {
    Tensor *r = arena_alloc(&e->host, sizeof(Tensor));
    *r = *x;
    r->ndim = 2;
    r->shape[1] = x->shape[0] > 0 ? x->numel / x->shape[0] : 1;
    for (int d = 2; d < TENSOR_MAX_DIMS; d++) r->shape[d] = 0;
    r->grad = NULL;
    return r;
}

/* dst row i = src row rows[i] for every row of dst */
static void take_rows(Engine *e, Tensor *dst, const Tensor *src, const Tensor *rows) {
    e->be->embedding_forward(as_rows(e, dst), as_rows(e, src), rows);
}

/* dst row rows[i] += src row i, in i's order (a row named twice receives its shares in that order) */
static void add_rows(Engine *e, Tensor *dst, const Tensor *src, const Tensor *rows) {
    e->be->embedding_backward(as_rows(e, dst), as_rows(e, src), rows);
}

/* ---- cp_gather_tokens ----------------------------------------------------------------------------- */

typedef struct CpGatherTokensParams {
    const Comm *group;
    Tensor *token_rows; /* i32 [N] (the device's): the gathered row of each token, all_index inverted */
    Tensor *all_index;  /* i32 [N] (the device's): the token of each gathered row */
} CpGatherTokensParams;

Tensor *op_cp_gather_tokens(Engine *e, Tensor *x, Tensor *index, const Comm *g) {
    if (!g) fatal("cp_gather_tokens: no context-parallel group");
    if (x->ndim < 1 || index->dtype != DT_I32 || index->numel != x->shape[0])
        fatal("cp_gather_tokens: index must be i32 [%lld], one token per row of x", (long long)x->shape[0]);
    if (g->size == 1) return x;
    engine_op_begin(e);
    const int64_t n = x->shape[0], N = n * g->size;
    int64_t shape[TENSOR_MAX_DIMS];
    for (int d = 0; d < x->ndim; d++) shape[d] = x->shape[d];
    shape[0] = N;
    int32_t *all_index = gathered_index(e, index, g);
    int32_t *row_of = arena_alloc(&e->host, (size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    for (int64_t i = 0; i < N; i++) row_of[all_index[i]] = (int32_t)i;
    Tensor *token_rows = row_table(e, row_of, N);
    Tensor *gathered = engine_empty(e, x->dtype, x->ndim, shape), *out = engine_empty(e, x->dtype, x->ndim, shape);
    g->all_gather(g, x->data, gathered->data, x->numel, x->dtype, x->device);
    take_rows(e, out, gathered, token_rows);
    if (engine_wants_grad(e, &x, 1)) {
        Node *node = engine_record(e, OP_cp_gather_tokens, &x, 1, &out, 1);
        *NODE_PARAMS(node, CpGatherTokensParams) = (CpGatherTokensParams){g, token_rows, row_table(e, all_index, N)};
    }
    engine_op_end(e, OP_cp_gather_tokens);
    return out;
}

void backward_cp_gather_tokens(Engine *e, Node *node) {
    Tensor *x = node->in[0], *gx = engine_grad(e, x), *gout = node->out[0]->grad;
    const CpGatherTokensParams *p = NODE_PARAMS(node, CpGatherTokensParams);
    Tensor *gathered = engine_empty_like(e, gout), *mine = engine_empty_like(e, x);
    take_rows(e, gathered, gout, p->all_index);
    p->group->reduce_scatter_sum(p->group, gathered->data, mine->data, x->numel, x->dtype, x->device);
    e->be->axpy(gx, mine, 1.0f);
}

/* ---- cp_fetch_blocks ------------------------------------------------------------------------------ */

typedef struct CpFetchParams {
    const Comm *group;
    int64_t n_send, n_recv;   /* rows this rank sends (of its own tokens) and receives */
    int64_t *send_counts;     /* [P] rows to each rank */
    int64_t *recv_counts;     /* [P] rows from each rank */
    int32_t *send_rows;       /* [n_send] this rank's row of each sent token, grouped by destination */
    Tensor *send_table;       /* send_rows as an i32 tensor of the device */
    int32_t *recv_tokens;     /* [n_recv] the token of each received row (row i of kf, vf), grouped by source */
} CpFetchParams;

/* all_to_allv's arguments from per-rank row counts, in elements of rows of `scale`: the displacements of
 * the rows laid end to end by rank, and the counts */
static int64_t *displs(Engine *e, const int64_t *counts, int P, int64_t scale) {
    int64_t *d = arena_alloc(&e->host, (size_t)P * sizeof(int64_t)), at = 0;
    for (int s = 0; s < P; s++) d[s] = at, at += counts[s] * scale;
    return d;
}

static int64_t *scaled(Engine *e, const int64_t *counts, int P, int64_t scale) {
    int64_t *c = arena_alloc(&e->host, (size_t)P * sizeof(int64_t));
    for (int s = 0; s < P; s++) c[s] = counts[s] * scale;
    return c;
}

/* Who holds each token and where each token's document ends, from the gathered indices (host, [N] each). */
typedef struct TokenTables {
    int32_t *owner, *row;  /* the rank that holds token j, and its row there */
    int32_t *doc_first, *doc_end;
} TokenTables;

static TokenTables token_tables(const int32_t *all_index, int64_t n, int64_t N, const int32_t *cu, int64_t ndocs) {
    TokenTables tt;
    int32_t *buf = xmalloc((size_t)(4 * (N > 0 ? N : 1)) * sizeof(int32_t));
    tt.owner = buf, tt.row = buf + N, tt.doc_first = buf + 2 * N, tt.doc_end = buf + 3 * N;
    for (int64_t i = 0; i < N; i++) tt.owner[all_index[i]] = (int32_t)(i / n), tt.row[all_index[i]] = (int32_t)(i % n);
    for (int64_t d = 0; d < ndocs; d++)
        for (int32_t j = cu[d]; j < cu[d + 1]; j++) tt.doc_first[j] = cu[d], tt.doc_end[j] = cu[d + 1];
    return tt;
}

/* one past the last token of the block that starts at token lo */
static int64_t block_end(const TokenTables *tt, int64_t lo, int64_t B) { return lo + B < tt->doc_end[lo] ? lo + B : tt->doc_end[lo]; }

/* The first token of every block that some (group, query) of this rank selected, as a mark per token. */
static unsigned char *selected_blocks(const TokenTables *tt, const int32_t *topk, const int32_t *index, int64_t Hkv,
                                      int64_t n, int64_t K, int64_t B, int64_t N) {
    unsigned char *want = xcalloc((size_t)(N > 0 ? N : 1), 1);
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t t = 0; t < n; t++) {
            const int32_t *row = topk + (g * n + t) * K;
            for (int64_t i = 0; i < K && row[i] >= 0; i++) want[tt->doc_first[index[t]] + row[i] * B] = 1;
        }
    return want;
}

/* The block ids (first tokens) to ask each rank for: every selected block, ascending, of each rank that holds
 * one of its tokens. Returns them grouped by rank (counts[P] each), host memory the caller frees. */
static int32_t *block_asks(const TokenTables *tt, const unsigned char *want, int64_t N, int64_t B, int P, int64_t *counts) {
    memset(counts, 0, (size_t)P * sizeof(int64_t));
    unsigned char *holds = xmalloc((size_t)P);
    int64_t *at = xcalloc((size_t)P + 1, sizeof(int64_t));
    int32_t *asks = NULL;
    for (int fill = 0; fill < 2; fill++) { /* count, then place */
        for (int64_t lo = 0; lo < N; lo++) {
            if (!want[lo]) continue;
            memset(holds, 0, (size_t)P);
            for (int64_t j = lo; j < block_end(tt, lo, B); j++) holds[tt->owner[j]] = 1;
            for (int s = 0; s < P; s++)
                if (holds[s]) {
                    if (fill) asks[at[s]++] = (int32_t)lo;
                    else counts[s]++;
                }
        }
        if (fill) break;
        for (int s = 0; s < P; s++) at[s + 1] = at[s] + counts[s];
        asks = xmalloc((size_t)(at[P] > 0 ? at[P] : 1) * sizeof(int32_t));
    }
    free(holds);
    free(at);
    return asks;
}

/* The tokens of `blocks` (count of them, ascending within each) that rank `holder` holds: written to
 * out[] (as rows of the holder when rows, else as tokens) when out is non-NULL; returns how many. Both
 * sides of the exchange list them so, in the same order. */
static int64_t block_tokens(const TokenTables *tt, const int32_t *blocks, int64_t count, int64_t B, int holder,
                            bool rows, int32_t *out) {
    int64_t m = 0;
    for (int64_t i = 0; i < count; i++)
        for (int64_t j = blocks[i]; j < block_end(tt, blocks[i], B); j++)
            if (tt->owner[j] == holder) {
                if (out) out[m] = rows ? tt->row[j] : (int32_t)j;
                m++;
            }
    return m;
}

/* The tables of one fetch: exchange the block ids (counts, then ids), then list, on both sides, the tokens
 * that move: this rank's rows asked by each rank, and the tokens each rank will send here. */
static CpFetchParams fetch_plan(Engine *e, const int32_t *topk, const Tensor *index, const int32_t *cu, int64_t ndocs,
                                int64_t Hkv, int64_t K, int64_t B, const Comm *g) {
    const int P = g->size, me = g->rank;
    const int64_t n = index->numel, N = n * P;
    TokenTables tt = token_tables(gathered_index(e, index, g), n, N, cu, ndocs);
    unsigned char *want = selected_blocks(&tt, topk, host_i32(e, index), Hkv, n, K, B, N);
    int64_t *ask_counts = arena_alloc(&e->host, (size_t)P * sizeof(int64_t));
    int64_t *asked_counts = arena_alloc(&e->host, (size_t)P * sizeof(int64_t));
    int32_t *asks = block_asks(&tt, want, N, B, P, ask_counts);
    int32_t *c32 = xmalloc((size_t)(2 * P) * sizeof(int32_t)), *r32 = c32 + P;
    for (int s = 0; s < P; s++) c32[s] = (int32_t)ask_counts[s];
    g->all_to_all(g, c32, r32, 1, DT_I32, DEV_CPU);
    int64_t n_asked = 0;
    for (int s = 0; s < P; s++) asked_counts[s] = r32[s], n_asked += r32[s];
    free(c32);
    int32_t *asked = xmalloc((size_t)(n_asked > 0 ? n_asked : 1) * sizeof(int32_t));
    const int64_t *ask_at = displs(e, ask_counts, P, 1), *asked_at = displs(e, asked_counts, P, 1);
    g->all_to_allv(g, asks, ask_counts, ask_at, asked, asked_counts, asked_at, DT_I32, DEV_CPU);
    CpFetchParams f = {.group = g};
    f.send_counts = arena_alloc(&e->host, (size_t)P * sizeof(int64_t));
    f.recv_counts = arena_alloc(&e->host, (size_t)P * sizeof(int64_t));
    for (int s = 0; s < P; s++) {
        f.send_counts[s] = block_tokens(&tt, asked + asked_at[s], asked_counts[s], B, me, true, NULL);
        f.recv_counts[s] = block_tokens(&tt, asks + ask_at[s], ask_counts[s], B, s, false, NULL);
        f.n_send += f.send_counts[s], f.n_recv += f.recv_counts[s];
    }
    f.send_rows = arena_alloc(&e->host, (size_t)(f.n_send > 0 ? f.n_send : 1) * sizeof(int32_t));
    f.recv_tokens = arena_alloc(&e->host, (size_t)(f.n_recv > 0 ? f.n_recv : 1) * sizeof(int32_t));
    for (int64_t s = 0, sent = 0, got = 0; s < P; s++) {
        sent += block_tokens(&tt, asked + asked_at[s], asked_counts[s], B, me, true, f.send_rows + sent);
        got += block_tokens(&tt, asks + ask_at[s], ask_counts[s], B, (int)s, false, f.recv_tokens + got);
    }
    free(asked);
    free(asks);
    free(want);
    free(tt.owner);
    return f;
}

Tensor *op_cp_fetch_blocks(Engine *e, Tensor *k, Tensor *v, Tensor *topk, Tensor *index, Tensor *cu_seqlens,
                           int64_t block_size, const Comm *g, Tensor **v_out, Tensor **key_rows_out) {
    if (!g || g->size < 2) fatal("cp_fetch_blocks: no context-parallel group of several ranks (one rank holds every block)");
    if (k->ndim != 3) fatal("cp_fetch_blocks: k must be [n, Hkv, D], got %d dims", k->ndim);
    const int64_t n = k->shape[0], Hkv = k->shape[1], D = k->shape[2], P = g->size, N = n * P;
    check_shape("cp_fetch_blocks", "v", v, SHAPE(n, Hkv, D));
    check_shape("cp_fetch_blocks", "index", index, SHAPE(n));
    if (topk->dtype != DT_I32 || topk->ndim != 3 || topk->shape[0] != Hkv || topk->shape[1] != n)
        fatal("cp_fetch_blocks: topk must be i32 [Hkv = %lld, %lld, topk_blocks]", (long long)Hkv, (long long)n);
    if (index->dtype != DT_I32 || cu_seqlens->dtype != DT_I32 || cu_seqlens->numel < 2)
        fatal("cp_fetch_blocks: index and cu_seqlens must be i32 (cu_seqlens [ndocs+1])");
    const int32_t *cu = host_i32(e, cu_seqlens);
    if (cu[0] != 0 || cu[cu_seqlens->numel - 1] != N)
        fatal("cp_fetch_blocks: cu_seqlens must run from 0 to the %lld tokens of the %lld ranks, got %d .. %d",
              (long long)N, (long long)P, cu[0], cu[cu_seqlens->numel - 1]);
    if (k->dtype != v->dtype || (k->dtype != DT_F32 && k->dtype != DT_F64 && k->dtype != DT_BF16))
        fatal("cp_fetch_blocks: k and v must have one float dtype (f32, f64 or bf16), got %s and %s",
              dtype_name(k->dtype), dtype_name(v->dtype));
    engine_op_begin(e);
    const int64_t K = topk->shape[2];
    int32_t *selection = NULL; /* the selection on the host: a copy when it lives on the device */
    if (topk->device != DEV_CPU) {
        selection = xmalloc((size_t)(Hkv * n * K > 0 ? Hkv * n * K : 1) * sizeof(int32_t));
        tensor_to_host(e, selection, topk);
    }
    CpFetchParams f = fetch_plan(e, selection ? selection : topk->data, index, cu, cu_seqlens->numel - 1, Hkv, K,
                                 block_size, g);
    free(selection);
    f.send_table = row_table(e, f.send_rows, f.n_send);
    /* K and V go as two exchanges of whole rows: what a rank receives is kf and vf as they are */
    Tensor *kf = engine_empty(e, k->dtype, SHAPE(f.n_recv, Hkv, D)), *vf = engine_empty(e, k->dtype, SHAPE(f.n_recv, Hkv, D));
    Tensor *sent = engine_empty(e, k->dtype, SHAPE(f.n_send, Hkv, D));
    const int64_t width = Hkv * D;
    const int64_t *sc = scaled(e, f.send_counts, (int)P, width), *sd = displs(e, f.send_counts, (int)P, width);
    const int64_t *rc = scaled(e, f.recv_counts, (int)P, width), *rd = displs(e, f.recv_counts, (int)P, width);
    const Tensor *from[2] = {k, v};
    Tensor *to[2] = {kf, vf};
    for (int i = 0; i < 2; i++) {
        take_rows(e, sent, from[i], f.send_table);
        g->all_to_allv(g, sent->data, sc, sd, to[i]->data, rc, rd, k->dtype, k->device);
    }
    int32_t *row_of = arena_alloc(&e->host, (size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    for (int64_t j = 0; j < N; j++) row_of[j] = -1;
    for (int64_t i = 0; i < f.n_recv; i++) row_of[f.recv_tokens[i]] = (int32_t)i;
    Tensor *key_rows = row_table(e, row_of, N);
    Tensor *in[2] = {k, v}, *outs[2] = {kf, vf};
    if (engine_wants_grad(e, in, 2)) {
        Node *node = engine_record(e, OP_cp_fetch_blocks, in, 2, outs, 2);
        *NODE_PARAMS(node, CpFetchParams) = f;
    }
    engine_op_end(e, OP_cp_fetch_blocks);
    *v_out = vf;
    *key_rows_out = key_rows;
    return kf;
}

void backward_cp_fetch_blocks(Engine *e, Node *node) {
    Tensor *k = node->in[0], *v = node->in[1];
    Tensor *grads[2] = {engine_grad(e, k), engine_grad(e, v)};
    const CpFetchParams *f = NODE_PARAMS(node, CpFetchParams);
    const Comm *g = f->group;
    const int P = g->size;
    const int64_t Hkv = k->shape[1], D = k->shape[2], width = Hkv * D;
    const int64_t *sc = scaled(e, f->recv_counts, P, width), *sd = displs(e, f->recv_counts, P, width);
    const int64_t *rc = scaled(e, f->send_counts, P, width), *rd = displs(e, f->send_counts, P, width);
    Tensor *returned = engine_empty(e, k->dtype, SHAPE(f->n_send, Hkv, D));
    for (int i = 0; i < 2; i++) {
        /* a missing output gradient (an output no op read) travels as zeros: every rank runs the exchange */
        Tensor *gout = node->out[i]->grad;
        if (!gout) gout = engine_zeros(e, k->dtype, SHAPE(f->n_recv, Hkv, D));
        g->all_to_allv(g, gout->data, sc, sd, returned->data, rc, rd, k->dtype, k->device);
        if (grads[i]) add_rows(e, grads[i], returned, f->send_table);
    }
}
