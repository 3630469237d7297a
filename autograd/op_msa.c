/* MSA ops (DESIGN §4): the Main Branch's block-sparse attention and the Index Branch's KL alignment
 * loss. The Top-k selection itself (KernelBackend.msa_indexer) is not differentiable and records
 * nothing; both ops take its output, held fixed through their backward.
 *
 * MsaParams travel in the node's scalars: i[0..3] = block_size, topk_blocks, init_blocks,
 * local_blocks; f[0..1] = scale, index_scale (floats, exact through double). */
#include "../kernels/util.h"
#include "ops.h"

static void store_params(Node *n, const MsaParams *p) {
    n->i[0] = p->block_size;
    n->i[1] = p->topk_blocks;
    n->i[2] = p->init_blocks;
    n->i[3] = p->local_blocks;
    n->f[0] = p->scale;
    n->f[1] = p->index_scale;
}

static MsaParams load_params(const Node *n) {
    return (MsaParams){.block_size = (int)n->i[0],
                       .topk_blocks = (int)n->i[1],
                       .init_blocks = (int)n->i[2],
                       .local_blocks = (int)n->i[3],
                       .scale = (float)n->f[0],
                       .index_scale = (float)n->f[1]};
}

/* Checks both ops share: q [N,Hq,D], k [N,Hkv,D] (v too when given), cu_seqlens i32 from 0 to N,
 * topk NULL or i32 [Hkv,N,topk_blocks]. Contents of topk are checked by the kernels. */
static void check_main(const char *op, Tensor *q, Tensor *k, Tensor *v, Tensor *topk, Tensor *cu_seqlens,
                       const MsaParams *p) {
    if (!p) fatal("%s: MsaParams is NULL", op);
    if (q->ndim != 3) fatal("%s: q must be [N, Hq, D], got %d dims", op, q->ndim);
    if (k->ndim != 3) fatal("%s: k must be [N, Hkv, D], got %d dims", op, k->ndim);
    const int64_t N = q->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k->shape[1];
    check_shape(op, "k", k, SHAPE(N, Hkv, D));
    if (v) check_shape(op, "v", v, SHAPE(N, Hkv, D));
    if (Hkv <= 0 || Hq % Hkv != 0)
        fatal("%s: %lld query heads are not a multiple of %lld KV heads", op, (long long)Hq, (long long)Hkv);
    if (q->dtype != k->dtype || (v && q->dtype != v->dtype)) fatal("%s: q, k, v dtypes differ", op);
    if (cu_seqlens->dtype != DT_I32) fatal("%s: cu_seqlens must be i32, got %s", op, dtype_name(cu_seqlens->dtype));
    if (cu_seqlens->ndim != 1 || cu_seqlens->numel < 2) fatal("%s: cu_seqlens must be [ndocs+1] with ndocs >= 1", op);
    if (cu_seqlens->device == DEV_CPU) { /* free on the host; CUDA kernels check on the device */
        const int32_t *cu = cu_seqlens->data;
        if (cu[0] != 0 || cu[cu_seqlens->numel - 1] != N)
            fatal("%s: cu_seqlens must run from 0 to N = %lld tokens, got %d .. %d", op, (long long)N, cu[0],
                  cu[cu_seqlens->numel - 1]);
    }
    if (topk) {
        if (topk->dtype != DT_I32) fatal("%s: topk must be i32, got %s", op, dtype_name(topk->dtype));
        check_shape(op, "topk", topk, SHAPE(Hkv, N, p->topk_blocks));
    }
}

Tensor *op_msa_attention(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *topk, Tensor *plan, Tensor *cu_seqlens,
                         const MsaParams *p, Tensor **lse_out) {
    check_main("msa_attention", q, k, v, topk, cu_seqlens, p);
    const int64_t N = q->shape[0], Hq = q->shape[1];
    engine_op_begin(e);
    Tensor *out = engine_empty_like(e, q);
    Tensor *lse = engine_empty(e, stat_dtype(q->dtype), SHAPE(Hq, N));
    BACKEND_REQUIRE(e->be, msa_attention_forward);
    e->be->msa_attention_forward(out, lse, q, k, v, topk, plan, cu_seqlens, p);
    Tensor *in[3] = {q, k, v};
    if (engine_wants_grad(e, in, 3)) {
        Node *n = engine_record(e, OP_msa_attention, in, 3, &out, 1);
        n->saved[0] = lse;
        n->saved[1] = topk; /* NULL: dense (every visible block) */
        n->saved[2] = cu_seqlens;
        n->ptr[0] = plan;
        store_params(n, p);
    }
    engine_op_end(e, OP_msa_attention);
    if (lse_out) *lse_out = lse;
    return out;
}

void backward_msa_attention(Engine *e, Node *n) {
    Tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    Tensor *gq = engine_grad(e, q), *gk = engine_grad(e, k), *gv = engine_grad(e, v);
    if (!gq && !gk && !gv) return;
    MsaParams p = load_params(n);
    BACKEND_REQUIRE(e->be, msa_attention_backward);
    e->be->msa_attention_backward(gq, gk, gv, n->out[0]->grad, q, k, v, n->out[0], n->saved[0], n->saved[1],
                                  n->ptr[0], n->saved[2], &p);
}

/* The node's inputs are qi and ki only: q, k and lse (the teacher) are saved tensors that the
 * backward reads but never differentiates, which is the detach of the paper's Eq. 10. topk and
 * cu_seqlens (and the plan) ride in the node's pointers (saved[] holds the four float tensors). */
void op_msa_kl_outputs(Engine *e, Tensor *q, Tensor *k, Tensor *lse, Tensor *qi, Tensor *ki, Tensor *topk,
                       Tensor *plan, Tensor *cu_seqlens, const MsaParams *p, float weight, Tensor **loss,
                       Tensor **idx_lse) {
    check_main("msa_kl", q, k, NULL, topk, cu_seqlens, p);
    const int64_t N = q->shape[0], Hq = q->shape[1], Hkv = k->shape[1];
    if (qi->ndim != 3) fatal("msa_kl: qi must be [N, Hidx, Di], got %d dims", qi->ndim);
    const int64_t Di = qi->shape[2];
    if (qi->shape[1] != Hkv)
        fatal("msa_kl: qi has %lld index heads, must equal Hkv = %lld", (long long)qi->shape[1], (long long)Hkv);
    check_shape("msa_kl", "qi", qi, SHAPE(N, Hkv, Di));
    check_shape("msa_kl", "ki", ki, SHAPE(N, Di));
    check_shape("msa_kl", "lse", lse, SHAPE(Hq, N));
    if (qi->dtype != ki->dtype) fatal("msa_kl: qi and ki dtypes differ (%s, %s)", dtype_name(qi->dtype), dtype_name(ki->dtype));
    engine_op_begin(e);
    DType sd = stat_dtype(qi->dtype);
    *loss = engine_empty(e, sd, SHAPE(1));
    *idx_lse = engine_empty(e, sd, SHAPE(Hkv, N));
    BACKEND_REQUIRE(e->be, msa_kl_forward);
    e->be->msa_kl_forward(*loss, *idx_lse, q, k, lse, qi, ki, topk, plan, cu_seqlens, p);
    if (weight != 1.0f) e->be->scale(*loss, weight);
    engine_op_end(e, OP_msa_kl);
}

Tensor *op_msa_kl_given(Engine *e, Tensor *q, Tensor *k, Tensor *lse, Tensor *qi, Tensor *ki, Tensor *topk,
                        Tensor *plan, Tensor *cu_seqlens, const MsaParams *p, float weight, Tensor *loss,
                        Tensor *idx_lse) {
    check_shape("msa_kl", "idx_lse", idx_lse, SHAPE(k->shape[1], q->shape[0]));
    Tensor *in[2] = {qi, ki};
    if (engine_wants_grad(e, in, 2)) {
        Node *n = engine_record(e, OP_msa_kl, in, 2, &loss, 1);
        n->saved[0] = q;
        n->saved[1] = k;
        n->saved[2] = lse;
        n->saved[3] = idx_lse;
        n->ptr[0] = topk;
        n->ptr[1] = cu_seqlens;
        n->ptr[2] = plan;
        n->f[2] = weight;
        store_params(n, p);
    }
    return loss;
}

Tensor *op_msa_kl(Engine *e, Tensor *q, Tensor *k, Tensor *lse, Tensor *qi, Tensor *ki, Tensor *topk,
                  Tensor *plan, Tensor *cu_seqlens, const MsaParams *p, float weight) {
    Tensor *loss, *idx_lse;
    op_msa_kl_outputs(e, q, k, lse, qi, ki, topk, plan, cu_seqlens, p, weight, &loss, &idx_lse);
    return op_msa_kl_given(e, q, k, lse, qi, ki, topk, plan, cu_seqlens, p, weight, loss, idx_lse);
}

void backward_msa_kl(Engine *e, Node *n) {
    Tensor *qi = n->in[0], *ki = n->in[1];
    Tensor *gqi = engine_grad(e, qi), *gki = engine_grad(e, ki);
    if (!gqi && !gki) return;
    MsaParams p = load_params(n);
    const Tensor *q = n->saved[0];
    const int64_t N = q->shape[0], Hidx = qi->shape[1];
    /* loss = weight * sum_{t,g} KL / (N * Hidx): the kernel takes the factor on sum_{t,g} KL */
    const double coeff = n->f[2] * tensor_item(e, n->out[0]->grad) / (double)(N * Hidx);
    BACKEND_REQUIRE(e->be, msa_kl_backward);
    e->be->msa_kl_backward(gqi, gki, q, n->saved[1], n->saved[2], qi, ki, n->saved[3], n->ptr[0], n->ptr[2], n->ptr[1],
                           &p, (float)coeff);
}
