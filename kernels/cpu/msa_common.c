/* Validation, document tables and the key -> queries reverse map shared by the CPU MSA kernels
 * (see msa_common.h). */
#include <stdlib.h>

#include "msa_common.h"

MsaCtx msa_ctx_init(const char *kernel, int64_t N, int64_t Nq, const Tensor *cu_seqlens, const MsaParams *p) {
    MsaCtx c;
    memset(&c, 0, sizeof c);
    if (!p) fatal("cpu %s: MsaParams is NULL", kernel);
    if (p->block_size < 1) fatal("cpu %s: block_size must be >= 1, got %d", kernel, p->block_size);
    if (p->topk_blocks < 1) fatal("cpu %s: topk_blocks must be >= 1, got %d", kernel, p->topk_blocks);
    if (p->init_blocks < 0) fatal("cpu %s: init_blocks must be >= 0, got %d", kernel, p->init_blocks);
    if (p->local_blocks < 1)
        fatal("cpu %s: local_blocks must be >= 1 (the query's own block is always selected), got %d", kernel,
              p->local_blocks);
    if (p->init_blocks + p->local_blocks > p->topk_blocks)
        fatal("cpu %s: init_blocks (%d) + local_blocks (%d) exceed the budget topk_blocks (%d)", kernel, p->init_blocks,
              p->local_blocks, p->topk_blocks);
    if (!cu_seqlens) fatal("cpu %s: cu_seqlens is NULL", kernel);
    if (cu_seqlens->dtype != DT_I32 || cu_seqlens->ndim != 1 || cu_seqlens->numel < 2)
        fatal("cpu %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1 (got %s with %lld elements)", kernel,
              dtype_name(cu_seqlens->dtype), (long long)cu_seqlens->numel);
    c.N = N;
    c.B = p->block_size;
    c.K = p->topk_blocks;
    c.scale = p->scale;
    c.index_scale = p->index_scale;
    c.cu = cu_seqlens->data;
    c.ndocs = cu_seqlens->numel - 1;
    if (c.cu[0] != 0 || c.cu[c.ndocs] != N)
        fatal("cpu %s: cu_seqlens must run from 0 to N = %lld tokens, got %d .. %d", kernel, (long long)N, c.cu[0],
              c.cu[c.ndocs]);
    c.doc_of = xmalloc((size_t)(N > 0 ? N : 1) * sizeof(int32_t));
    c.blk_base = xmalloc((size_t)(c.ndocs + 1) * sizeof(int64_t));
    c.blk_base[0] = 0;
    for (int64_t d = 0; d < c.ndocs; d++) {
        if (c.cu[d + 1] < c.cu[d]) fatal("cpu %s: cu_seqlens decreases at document %lld", kernel, (long long)d);
        const int64_t len = c.cu[d + 1] - c.cu[d];
        if (len > c.max_len) c.max_len = len;
        c.work += 0.5 * (double)len * (double)(len + 1);
        c.blk_base[d + 1] = c.blk_base[d] + (len + c.B - 1) / c.B;
        for (int32_t t = c.cu[d]; t < c.cu[d + 1]; t++) c.doc_of[t] = (int32_t)d;
    }
    if (c.max_len == 0) c.max_len = 1;
    c.max_blocks = (c.max_len + c.B - 1) / c.B;
    c.Nq = Nq;
    if (p->key_rows) {
        if (!p->query_index) fatal("cpu %s: key_rows come with a query_index (sequence-split context parallelism)", kernel);
        if (p->key_rows->dtype != DT_I32 || p->key_rows->numel != N)
            fatal("cpu %s: key_rows must be i32 [N = %lld], got %s with %lld elements", kernel, (long long)N,
                  dtype_name(p->key_rows->dtype), (long long)p->key_rows->numel);
        c.key_row = p->key_rows->data;
    }
    if (!p->query_index) {
        if (Nq != N)
            fatal("cpu %s: %lld query rows and %lld key rows, but no query_index names the queries' tokens", kernel,
                  (long long)Nq, (long long)N);
        return c;
    }
    const Tensor *qx = p->query_index;
    if (qx->dtype != DT_I32 || qx->numel != Nq)
        fatal("cpu %s: query_index must be i32 [Nq = %lld], got %s with %lld elements", kernel, (long long)Nq,
              dtype_name(qx->dtype), (long long)qx->numel);
    c.q_token = qx->data;
    for (int64_t t = 0; t < Nq; t++)
        if (c.q_token[t] < 0 || c.q_token[t] >= N || (t > 0 && c.q_token[t] <= c.q_token[t - 1]))
            fatal("cpu %s: query_index[%lld] = %d: the query tokens must ascend within [0, N = %lld)", kernel,
                  (long long)t, c.q_token[t], (long long)N);
    return c;
}

void msa_ctx_free(MsaCtx *c) {
    free(c->doc_of);
    free(c->blk_base);
    if (c->owns_map) {
        free((void *)c->row_ptr);
        free((void *)c->q_idx);
    }
    memset(c, 0, sizeof *c);
}

void msa_check_qkv(const char *kernel, MsaCtx *c, const Tensor *q, const Tensor *k, const Tensor *v) {
    if (q->ndim != 3) fatal("cpu %s: q must be [N, Hq, D], got %d dims", kernel, q->ndim);
    if (k->ndim != 3) fatal("cpu %s: k must be [N, Hkv, D], got %d dims", kernel, k->ndim);
    c->Hq = q->shape[1];
    c->Hkv = k->shape[1];
    c->D = q->shape[2];
    const int64_t M = k->shape[0]; /* key rows: N, or the rows key_rows names */
    if (q->shape[0] != c->Nq || (!c->key_row && M != c->N))
        fatal("cpu %s: q must have %lld rows and k N = %lld (got %lld and %lld)", kernel, (long long)c->Nq,
              (long long)c->N, (long long)q->shape[0], (long long)M);
    for (int64_t j = 0; c->key_row && j < c->N; j++)
        if (c->key_row[j] < -1 || c->key_row[j] >= M)
            fatal("cpu %s: key_rows[%lld] = %d is not a row of k's %lld (or -1)", kernel, (long long)j, c->key_row[j],
                  (long long)M);
    if (k->shape[2] != c->D)
        fatal("cpu %s: q head dim %lld differs from k head dim %lld", kernel, (long long)c->D, (long long)k->shape[2]);
    if (v && (v->ndim != 3 || v->shape[0] != M || v->shape[1] != c->Hkv || v->shape[2] != c->D))
        fatal("cpu %s: v must be [%lld, %lld, %lld] like k", kernel, (long long)M, (long long)c->Hkv, (long long)c->D);
    if (c->Hkv <= 0 || c->Hq % c->Hkv != 0)
        fatal("cpu %s: %lld query heads are not a multiple of %lld KV heads", kernel, (long long)c->Hq, (long long)c->Hkv);
    c->G = c->Hq / c->Hkv;
}

void msa_check_index(const char *kernel, MsaCtx *c, const Tensor *qi, const Tensor *ki) {
    if (qi->ndim != 3 || qi->shape[0] != c->Nq)
        fatal("cpu %s: qi must be [%lld, Hidx, Di], got %d dims with %lld rows", kernel, (long long)c->Nq, qi->ndim,
              (long long)qi->shape[0]);
    if (qi->shape[1] != c->Hkv)
        fatal("cpu %s: qi has %lld index heads, must equal Hkv = %lld (one index head per GQA group)", kernel,
              (long long)qi->shape[1], (long long)c->Hkv);
    c->Di = qi->shape[2];
    if (ki->ndim != 2 || ki->shape[0] != c->N || ki->shape[1] != c->Di)
        fatal("cpu %s: ki must be [N = %lld, Di = %lld] (one key shared by all index heads)", kernel, (long long)c->N,
              (long long)c->Di);
}

void msa_check_topk(const char *kernel, MsaCtx *c, const Tensor *topk) {
    c->topk = NULL;
    if (!topk) return;
    if (topk->dtype != DT_I32) fatal("cpu %s: topk must be i32, got %s", kernel, dtype_name(topk->dtype));
    if (topk->ndim != 3 || topk->shape[0] != c->Hkv || topk->shape[1] != c->Nq || topk->shape[2] != c->K)
        fatal("cpu %s: topk must be [Hidx = %lld, %lld, topk_blocks = %lld]", kernel, (long long)c->Hkv,
              (long long)c->Nq, (long long)c->K);
    const int32_t *tk = topk->data;
    for (int64_t g = 0; g < c->Hkv; g++)
        for (int64_t t = 0; t < c->Nq; t++) {
            const int32_t *row = tk + (g * c->Nq + t) * c->K;
            const int64_t tok = msa_query_token(c, t), local = (tok - msa_doc_start(c, tok)) / c->B;
            int64_t prev = -1, i = 0;
            for (; i < c->K && row[i] >= 0; i++) {
                if (row[i] <= prev || row[i] > local)
                    fatal("cpu %s: topk[%lld, %lld] = {%d, ...}: slot %lld holds block %d; ids must be ascending "
                          "visible blocks (0 .. %lld)",
                          kernel, (long long)g, (long long)t, row[0], (long long)i, row[i], (long long)local);
                prev = row[i];
            }
            if (i == 0) fatal("cpu %s: topk[%lld, %lld] selects no block", kernel, (long long)g, (long long)t);
            for (; i < c->K; i++)
                if (row[i] != -1)
                    fatal("cpu %s: topk[%lld, %lld] slot %lld holds %d after the padding began (-1 expected)", kernel,
                          (long long)g, (long long)t, (long long)i, row[i]);
        }
    c->topk = tk;
}

/* Counting sort per group: histogram of (block row) over the selections, prefix sum, then a scatter
 * in ascending query order, so every row lists its queries ascending. One task per group. With a
 * plan, its map is used as it is (it was built from the same topk by msa_plan). */
void msa_build_key_queries(MsaCtx *c, const Tensor *plan) {
    if (!c->topk) return;
    const int64_t R = c->blk_base[c->ndocs], Nq = c->Nq, K = c->K;
    if (plan && c->q_token) fatal("cpu msa kernels: a plan with a query_index (the plan's rows are the tokens)");
    if (plan) {
        const int64_t P = msa_plan_width(Nq, K);
        if (plan->dtype != DT_I32 || plan->numel != c->Hkv * P)
            fatal("cpu msa kernels: plan must be i32 [Hidx, msa_plan_width(N, k)] = [%lld, %lld], got %s with %lld "
                  "elements", (long long)c->Hkv, (long long)P, dtype_name(plan->dtype), (long long)plan->numel);
        c->row_ptr = plan->data;
        c->q_idx = (const int32_t *)plan->data + (Nq + 1);
        c->row_stride = c->q_stride = P;
        c->owns_map = false;
        return;
    }
    if (Nq * K >= INT32_MAX) fatal("cpu msa kernels: Nq * topk_blocks = %lld does not fit an i32 map", (long long)(Nq * K));
    int32_t *row_ptr = xcalloc((size_t)(c->Hkv * (R + 1)), sizeof(int32_t));
    int32_t *q_idx = xmalloc((size_t)(c->Hkv * Nq * K > 0 ? c->Hkv * Nq * K : 1) * sizeof(int32_t));
#pragma omp parallel for schedule(static) if (c->Hkv > 1 && Nq * K > 65536)
    for (int64_t g = 0; g < c->Hkv; g++) {
        int32_t *rp = row_ptr + g * (R + 1);
        int32_t *qi = q_idx + g * Nq * K;
        for (int64_t t = 0; t < Nq; t++) {
            const int32_t *row = c->topk + (g * Nq + t) * K;
            const int64_t base = c->blk_base[c->doc_of[msa_query_token(c, t)]];
            for (int64_t i = 0; i < K && row[i] >= 0; i++) rp[base + row[i] + 1]++;
        }
        for (int64_t r = 0; r < R; r++) rp[r + 1] += rp[r];
        int32_t *fill = xmalloc((size_t)(R > 0 ? R : 1) * sizeof(int32_t));
        memcpy(fill, rp, (size_t)R * sizeof(int32_t));
        for (int64_t t = 0; t < Nq; t++) {
            const int32_t *row = c->topk + (g * Nq + t) * K;
            const int64_t base = c->blk_base[c->doc_of[msa_query_token(c, t)]];
            for (int64_t i = 0; i < K && row[i] >= 0; i++) qi[fill[base + row[i]]++] = (int32_t)t;
        }
        free(fill);
    }
    c->row_ptr = row_ptr;
    c->q_idx = q_idx;
    c->row_stride = R + 1;
    c->q_stride = Nq * K;
    c->owns_map = true;
}
