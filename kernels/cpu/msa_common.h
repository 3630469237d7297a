/* Shared, type-independent plumbing of the CPU MSA kernels (msa_indexer.c, msa_attention.c,
 * msa_kl.c): argument validation, per-token document bounds, the token support of a (group, query)
 * selection, and the reverse map key block -> queries that selected it.
 *
 * Conventions (DESIGN §4, backend.h): N tokens, documents from cu_seqlens; blocks of B tokens count
 * from each document's first token, so query t (position p = t - start in its document) sees blocks
 * 0 .. p/B ("visible"); block p/B is its own (local) block, visible only up to t. topk [Hidx, N, K]
 * holds document-relative block ids sorted ascending, -1 in unused slots; NULL = every visible block.
 *
 * Why a reverse map: the backward passes compute dk, dv and dki with one task per key (no atomics,
 * no per-thread copies), so each key must find, in a fixed order, the queries that read it.
 *
 * Query rows and tokens: the N tokens are the keys (k, v, ki have N rows). The queries (q, qi, topk, lse,
 * idx_lse) are either the same N tokens (row t is token t) or, under context parallelism over the sequence
 * (MsaParams.query_index), the Nq tokens one rank holds, row t being token q_token[t]. k and v hold either
 * a row per token or (MsaParams.key_rows) only the tokens the selection reads, found through key_row; ki
 * always has a row per token. */
#ifndef MSA_CPU_MSA_COMMON_H
#define MSA_CPU_MSA_COMMON_H

#include "cpu.h"

typedef struct MsaCtx {
    int64_t N, Hq, Hkv, D;   /* N tokens (key rows); main branch (D = 0 where the kernel has no q/k) */
    int64_t Nq;              /* query rows: N, or the query_index's count */
    const int32_t *q_token;  /* [Nq] the token of each query row (MsaParams.query_index), NULL: row t is token t */
    const int32_t *key_row;  /* [N] the row of k, v holding each token, -1: none (MsaParams.key_rows), NULL: row j */
    int64_t G;               /* query heads per group, Hq / Hkv */
    int64_t Di;              /* index head dim (0 where the kernel has no qi/ki) */
    int64_t B, K;            /* block size, selection slots */
    int64_t max_len;         /* longest document (>= 1): per-thread buffers */
    int64_t max_blocks;      /* blocks of the longest document */
    double scale, index_scale;
    double work;             /* ~ causal (query, key) pairs: decides whether to thread */
    const int32_t *cu;       /* [ndocs+1] */
    int64_t ndocs;
    int32_t *doc_of;         /* [N] document of each token */
    const int32_t *topk;     /* [Hkv, N, K] or NULL (every visible block) */
    /* reverse map (msa_build_key_queries): for group g and global block row r (= blk_base[doc] +
     * document-relative block), the queries selecting it are q_idx[g*q_stride + row_ptr[g*row_stride+r]
     * .. row_ptr[g*row_stride+r+1]), ascending. Either built here (owns_map) or read from the layer's
     * plan (backend.h msa_plan, the same map in its i32 layout). Absent (NULL) when topk is NULL: then
     * every later query of the document reads every key. */
    int64_t *blk_base;       /* [ndocs+1] first global block row of each document, R = blk_base[ndocs] */
    const int32_t *row_ptr;
    const int32_t *q_idx;
    int64_t row_stride, q_stride;
    bool owns_map;
} MsaCtx;

/* Validate the parameters (block_size >= 1, topk_blocks >= 1, init_blocks >= 0, local_blocks >= 1,
 * init_blocks + local_blocks <= topk_blocks: forced blocks stay inside the budget), cu_seqlens
 * (i32 [ndocs+1], 0 .. N, non-decreasing) and the query rows (Nq == N without p->query_index, else its
 * i32 [Nq] tokens, each in [0, N)); fill the document tables. Aborts naming `kernel`. */
MsaCtx msa_ctx_init(const char *kernel, int64_t N, int64_t Nq, const Tensor *cu_seqlens, const MsaParams *p);
void msa_ctx_free(MsaCtx *c);

/* Check q [Nq,Hq,D] and k (and v when non-NULL) [N,Hkv,D] (with key_rows, [M,Hkv,D] with every row of
 * key_rows in [-1, M)); sets Hq, Hkv, D, G. */
void msa_check_qkv(const char *kernel, MsaCtx *c, const Tensor *q, const Tensor *k, const Tensor *v);
/* Check qi [Nq,Hidx,Di] with Hidx == Hkv (already set) and ki [N,Di]; sets Di. */
void msa_check_index(const char *kernel, MsaCtx *c, const Tensor *qi, const Tensor *ki);
/* Check topk (i32 [Hkv, Nq, topk_blocks] or NULL) and every row's contents: ids strictly ascending,
 * each a visible block of the query, -1 only after them, at least one id. Sets c->topk. */
void msa_check_topk(const char *kernel, MsaCtx *c, const Tensor *topk);
/* The reverse map of c->topk (no-op when NULL): plan's when given (the layer's msa_plan of the same
 * topk, checked for shape), else built here. */
void msa_build_key_queries(MsaCtx *c, const Tensor *plan);

/* the first token of token j's document */
static inline int64_t msa_doc_start(const MsaCtx *c, int64_t j) { return c->cu[c->doc_of[j]]; }
/* the token of query row t */
static inline int64_t msa_query_token(const MsaCtx *c, int64_t t) { return c->q_token ? c->q_token[t] : t; }
/* the row of k and v that holds token j (-1: none; a selected token always has one) */
static inline int64_t msa_key_row(const MsaCtx *c, int64_t j) { return c->key_row ? c->key_row[j] : j; }

/* The token support of (group g, query row t), ascending, into keys (room for max_len): the tokens of
 * the selected blocks that are <= the query's token. Returns the count, >= 1 for a checked topk
 * (msa_check_topk: every row selects at least one visible block, and every visible block has a token
 * <= the query's). */
static inline int64_t msa_support(const MsaCtx *c, int64_t g, int64_t t, int32_t *keys) {
    const int64_t tok = msa_query_token(c, t), s = msa_doc_start(c, tok);
    int64_t n = 0;
    if (!c->topk) {
        for (int64_t j = s; j <= tok; j++) keys[n++] = (int32_t)j;
        return n;
    }
    const int32_t *row = c->topk + (g * c->Nq + t) * c->K;
    for (int64_t i = 0; i < c->K && row[i] >= 0; i++) {
        const int64_t lo = s + row[i] * c->B, hi = lo + c->B - 1 < tok ? lo + c->B - 1 : tok;
        for (int64_t j = lo; j <= hi; j++) keys[n++] = (int32_t)j;
    }
    return n;
}

/* The query rows of group g that read key j: either the list *list[0 .. *n) (ascending; rows whose token
 * is < j, from j's own block, must be skipped by the caller) or, when *list is NULL, the rows
 * first .. first + *n - 1. */
static inline void msa_key_queries(const MsaCtx *c, int64_t g, int64_t j, const int32_t **list, int64_t *n,
                                   int64_t *first);

/* The first query row whose token is >= j (q_token ascending, msa_ctx_init checks it). */
static inline int64_t msa_first_query_from(const MsaCtx *c, int64_t j) {
    if (!c->q_token) return j;
    int64_t lo = 0, hi = c->Nq;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (c->q_token[mid] < j) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static inline void msa_key_queries(const MsaCtx *c, int64_t g, int64_t j, const int32_t **list, int64_t *n,
                                   int64_t *first) {
    const int64_t d = c->doc_of[j];
    if (!c->topk) { /* every later query of the document: a run of rows, the rows being ascending tokens */
        *list = NULL;
        *first = msa_first_query_from(c, j);
        *n = msa_first_query_from(c, c->cu[d + 1]) - *first;
        return;
    }
    const int64_t r = c->blk_base[d] + (j - c->cu[d]) / c->B;
    const int32_t *rp = c->row_ptr + g * c->row_stride;
    *list = c->q_idx + g * c->q_stride + rp[r];
    *n = rp[r + 1] - rp[r];
    *first = 0;
}

#endif
