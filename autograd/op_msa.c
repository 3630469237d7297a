/* MSA ops (DESIGN §4): the Main Branch's block-sparse attention, the Index Branch's KL alignment loss,
 * and the two in one node whose backward computes the KL (the sparse phase: no KL forward). The Top-k
 * selection itself (KernelBackend.msa_indexer) is not differentiable and records nothing; the ops take
 * its output, held fixed through their backward. */
#include "../kernels/util.h"
#include "ops.h"

typedef struct MsaAttentionParams {
    MsaParams msa;
    Tensor *lse;        /* [Hq, N] */
    Tensor *topk;       /* NULL: dense (every visible block) */
    Tensor *plan;       /* NULL: the kernels build their own */
    Tensor *cu_seqlens;
} MsaAttentionParams;

/* The KL node's inputs are qi and ki only: q, k and lse (the teacher) are here, read by the backward but
 * never differentiated, which is the detach of the paper's Eq. 10. */
typedef struct MsaKlParams {
    MsaParams msa;
    float weight;       /* the loss is weight * mean KL */
    Tensor *q, *k, *lse;
    Tensor *idx_lse;    /* [Hkv, N]: the student's log-normaliser */
    Tensor *topk, *plan, *cu_seqlens;
} MsaKlParams;

/* Checks both ops share: q [Nq,Hq,D], k [N,Hkv,D] (v too when given; [M,Hkv,D] with p->key_rows i32 [N]),
 * cu_seqlens i32 from 0 to N, topk NULL or i32 [Hkv,Nq,topk_blocks]; Nq = N unless p->query_index names the
 * queries' tokens (i32 [Nq]). Contents of topk, query_index and key_rows are checked by the kernels. */
static void check_main(const char *op, Tensor *q, Tensor *k, Tensor *v, Tensor *topk, Tensor *cu_seqlens,
                       const MsaParams *p) {
    if (!p) fatal("%s: MsaParams is NULL", op);
    if (q->ndim != 3) fatal("%s: q must be [Nq, Hq, D], got %d dims", op, q->ndim);
    if (k->ndim != 3) fatal("%s: k must be [N, Hkv, D], got %d dims", op, k->ndim);
    const int64_t Nq = q->shape[0], Hq = q->shape[1], D = q->shape[2], N = msa_token_count(k, p), Hkv = k->shape[1];
    if (p->key_rows && !p->query_index) fatal("%s: key_rows come with a query_index (sequence-split CP)", op);
    if (p->query_index) check_shape(op, "query_index", p->query_index, SHAPE(Nq));
    else if (N != Nq) fatal("%s: q has %lld rows and the tokens %lld, and no query_index names the queries' tokens", op,
                            (long long)Nq, (long long)N);
    check_shape(op, "k", k, SHAPE(k->shape[0], Hkv, D));
    if (v) check_shape(op, "v", v, SHAPE(k->shape[0], Hkv, D));
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
        check_shape(op, "topk", topk, SHAPE(Hkv, Nq, p->topk_blocks));
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
        *NODE_PARAMS(n, MsaAttentionParams) = (MsaAttentionParams){*p, lse, topk, plan, cu_seqlens};
    }
    engine_op_end(e, OP_msa_attention);
    if (lse_out) *lse_out = lse;
    return out;
}

void backward_msa_attention(Engine *e, Node *n) {
    Tensor *q = n->in[0], *k = n->in[1], *v = n->in[2];
    Tensor *gq = engine_grad(e, q), *gk = engine_grad(e, k), *gv = engine_grad(e, v);
    if (!gq && !gk && !gv) return;
    const MsaAttentionParams *ap = NODE_PARAMS(n, MsaAttentionParams);
    BACKEND_REQUIRE(e->be, msa_attention_backward);
    e->be->msa_attention_backward(gq, gk, gv, n->out[0]->grad, q, k, v, n->out[0], ap->lse, ap->topk, ap->plan,
                                  ap->cu_seqlens, &ap->msa);
}

Tensor *op_msa_kl(Engine *e, Tensor *q, Tensor *k, Tensor *lse, Tensor *qi, Tensor *ki, Tensor *topk, Tensor *plan,
                  Tensor *cu_seqlens, const MsaParams *p, float weight, MsaKlForward *fwd) {
    check_main("msa_kl", q, k, NULL, topk, cu_seqlens, p);
    const int64_t N = q->shape[0], Hq = q->shape[1], Hkv = k->shape[1];
    if (qi->ndim != 3) fatal("msa_kl: qi must be [N, Hidx, Di], got %d dims", qi->ndim);
    const int64_t Di = qi->shape[2];
    if (qi->shape[1] != Hkv)
        fatal("msa_kl: qi has %lld index heads, must equal Hkv = %lld", (long long)qi->shape[1], (long long)Hkv);
    check_shape("msa_kl", "qi", qi, SHAPE(N, Hkv, Di));
    check_shape("msa_kl", "ki", ki, SHAPE(msa_token_count(k, p), Di));
    check_shape("msa_kl", "lse", lse, SHAPE(Hq, N));
    if (qi->dtype != ki->dtype) fatal("msa_kl: qi and ki dtypes differ (%s, %s)", dtype_name(qi->dtype), dtype_name(ki->dtype));
    MsaKlForward mine = {0}, *f = fwd ? fwd : &mine;
    if (f->loss && f->idx_lse) {
        check_shape("msa_kl", "the given loss", f->loss, SHAPE(1));
        check_shape("msa_kl", "the given idx_lse", f->idx_lse, SHAPE(Hkv, N));
        f->kl = NULL;
    } else {
        engine_op_begin(e);
        DType sd = stat_dtype(qi->dtype);
        f->kl = engine_empty(e, sd, SHAPE(1));
        f->idx_lse = engine_empty(e, sd, SHAPE(Hkv, N));
        BACKEND_REQUIRE(e->be, msa_kl_forward);
        e->be->msa_kl_forward(f->kl, f->idx_lse, q, k, lse, qi, ki, topk, plan, cu_seqlens, p);
        f->loss = f->kl;
        if (weight != 1.0f) {
            f->loss = engine_empty(e, sd, SHAPE(1));
            e->be->copy(f->loss->data, f->kl->data, tensor_bytes(f->kl));
            e->be->scale(f->loss, weight);
        }
        engine_op_end(e, OP_msa_kl);
    }
    Tensor *in[2] = {qi, ki};
    if (engine_wants_grad(e, in, 2)) {
        Node *n = engine_record(e, OP_msa_kl, in, 2, &f->loss, 1);
        *NODE_PARAMS(n, MsaKlParams) = (MsaKlParams){*p, weight, q, k, lse, f->idx_lse, topk, plan, cu_seqlens};
    }
    return f->loss;
}

void backward_msa_kl(Engine *e, Node *n) {
    Tensor *qi = n->in[0], *ki = n->in[1];
    Tensor *gqi = engine_grad(e, qi), *gki = engine_grad(e, ki);
    if (!gqi && !gki) return;
    const MsaKlParams *kp = NODE_PARAMS(n, MsaKlParams);
    /* loss = weight * sum_{t,g} KL / (N * Hidx); the kernel reads the upstream gradient on the device */
    BACKEND_REQUIRE(e->be, msa_kl_backward);
    e->be->msa_kl_backward(gqi, gki, kp->q, kp->k, kp->lse, qi, ki, kp->idx_lse, kp->topk, kp->plan, kp->cu_seqlens,
                           &kp->msa, n->out[0]->grad, kp->weight);
}

typedef struct MsaAttentionKlParams {
    MsaParams msa;
    float weight;       /* the loss term is weight * mean KL */
    Tensor *lse, *idx_lse, *topk, *plan, *cu_seqlens;
    Tensor *kl;         /* where the backward writes the mean KL (NULL: nowhere) */
} MsaAttentionKlParams;

Tensor *op_msa_attention_kl(Engine *e, Tensor *q, Tensor *k, Tensor *v, Tensor *qi, Tensor *ki, Tensor *topk, Tensor *plan,
                            Tensor *idx_lse, Tensor *cu_seqlens, const MsaParams *p, float weight, Tensor *kl,
                            const AttentionKept *kept, Tensor **lse_out, Tensor **loss_out) {
    check_main("msa_attention_kl", q, k, v, topk, cu_seqlens, p);
    if (!topk) fatal("msa_attention_kl: topk is required (the dense warm-up has op_msa_kl)");
    const int64_t N = q->shape[0], Hkv = k->shape[1];
    if (qi->ndim != 3 || qi->shape[1] != Hkv)
        fatal("msa_attention_kl: qi must be [N, Hidx = Hkv = %lld, Di]", (long long)Hkv);
    check_shape("msa_attention_kl", "qi", qi, SHAPE(N, Hkv, qi->shape[2]));
    check_shape("msa_attention_kl", "ki", ki, SHAPE(msa_token_count(k, p), qi->shape[2]));
    check_shape("msa_attention_kl", "idx_lse", idx_lse, SHAPE(Hkv, N));
    if (kl) check_shape("msa_attention_kl", "kl", kl, SHAPE(1));
    engine_op_begin(e);
    Tensor *out, *lse;
    Tensor *loss = engine_zeros(e, stat_dtype(q->dtype), SHAPE(1));
    BACKEND_REQUIRE(e->be, msa_attention_forward);
    BACKEND_REQUIRE(e->be, msa_attention_kl_backward);
    if (!attention_results(e, q, kept, &out, &lse)) e->be->msa_attention_forward(out, lse, q, k, v, topk, plan, cu_seqlens, p);
    Tensor *in[5] = {q, k, v, qi, ki};
    if (engine_wants_grad(e, in, 5)) {
        Tensor *outs[2] = {out, loss};
        Node *n = engine_record(e, OP_msa_attention_kl, in, 5, outs, 2);
        *NODE_PARAMS(n, MsaAttentionKlParams) = (MsaAttentionKlParams){*p, weight, lse, idx_lse, topk, plan, cu_seqlens, kl};
    } else if (kl && !e->checkpoint_forward) {
        /* no backward comes (a replay whose inputs want no gradient): the value now */
        e->be->msa_attention_kl_backward(NULL, NULL, NULL, NULL, NULL, kl, NULL, q, k, v, out, lse, qi, ki, idx_lse, topk,
                                         plan, cu_seqlens, p, NULL, weight);
    }
    engine_op_end(e, OP_msa_attention_kl);
    if (lse_out) *lse_out = lse;
    *loss_out = loss;
    return out;
}

void backward_msa_attention_kl(Engine *e, Node *n) {
    Tensor *q = n->in[0], *k = n->in[1], *v = n->in[2], *qi = n->in[3], *ki = n->in[4];
    Tensor *out = n->out[0], *dout = out->grad, *dloss = n->out[1]->grad;
    const MsaAttentionKlParams *kp = NODE_PARAMS(n, MsaAttentionKlParams);
    /* the attention's gradients need the output's, the KL's the loss term's; the value is computed anyway */
    Tensor *gq = dout ? engine_grad(e, q) : NULL, *gk = dout ? engine_grad(e, k) : NULL, *gv = dout ? engine_grad(e, v) : NULL;
    Tensor *gqi = dloss ? engine_grad(e, qi) : NULL, *gki = dloss ? engine_grad(e, ki) : NULL;
    e->be->msa_attention_kl_backward(gq, gk, gv, gqi, gki, kp->kl, dout, q, k, v, out, kp->lse, qi, ki, kp->idx_lse, kp->topk,
                                     kp->plan, kp->cu_seqlens, &kp->msa, dloss, kp->weight);
}
