/* MSA KL alignment loss on the CPU (DESIGN §4, msa_spec.md c): KL(teacher || student) per (query,
 * group) over the selected tokens, averaged over the N * Hidx pairs; the teacher (group mean of the
 * main branch's attention probabilities, from q, k and the saved lse) is detached, so the backward
 * produces only dqi and dki. A NULL topk is the dense warm-up: the support is the full causal prefix
 * of the query's document. The reference the CUDA kernels are held to. */
#include <stdlib.h>

#include "msa_common.h"

#define CPU_IMPL "msa_kl_impl.h"
#include "instantiate.h"

static MsaCtx kl_ctx(const char *kernel, const Tensor *q, const Tensor *k, const Tensor *lse, const Tensor *qi,
                     const Tensor *ki, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p) {
    if (q->ndim != 3) fatal("cpu %s: q must be [N, Hq, D], got %d dims", kernel, q->ndim);
    MsaCtx c = msa_ctx_init(kernel, msa_token_count(k, p), q->shape[0], cu_seqlens, p);
    msa_check_qkv(kernel, &c, q, k, NULL);
    msa_check_index(kernel, &c, qi, ki);
    msa_check_topk(kernel, &c, topk);
    if (lse->numel != c.Hq * c.Nq)
        fatal("cpu %s: lse must be [Hq, Nq] = [%lld, %lld]", kernel, (long long)c.Hq, (long long)c.Nq);
    return c;
}

/* The mean KL over the Nq * Hidx (query, group) pairs into kl (written), and the student's normaliser into
 * idx_lse when non-NULL: the KL forward, and the value the sparse phase's fused backward hands out. */
static void kl_value(const char *kernel, Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                     const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *cu_seqlens, const MsaParams *p) {
    CPU_SAME_DTYPE(kernel, q, kl, idx_lse, k, lse, qi, ki);
    MsaCtx c = kl_ctx(kernel, q, k, lse, qi, ki, topk, cu_seqlens, p);
    if (kl->numel != 1) fatal("cpu %s: kl must be a scalar tensor", kernel);
    if (idx_lse && idx_lse->numel != c.Hkv * c.Nq) fatal("cpu %s: idx_lse must be [Hidx, Nq]", kernel);
    double *vals = xmalloc((size_t)(c.Nq * c.Hkv > 0 ? c.Nq * c.Hkv : 1) * sizeof(double));
    CPU_CALL(q, msa_kl_fwd, vals, idx_lse ? idx_lse->data : NULL, q->data, k->data, lse->data, qi->data, ki->data, &c);
    double sum = 0; /* fixed order: the loss does not depend on the thread count */
    for (int64_t i = 0; i < c.Nq * c.Hkv; i++) sum += vals[i];
    free(vals);
    tensor_set(kl, 0, c.Nq * c.Hkv > 0 ? sum / (double)(c.Nq * c.Hkv) : 0.0);
    msa_ctx_free(&c);
}

void cpu_msa_kl_forward(Tensor *kl, Tensor *idx_lse, const Tensor *q, const Tensor *k, const Tensor *lse,
                        const Tensor *qi, const Tensor *ki, const Tensor *topk, const Tensor *plan,
                        const Tensor *cu_seqlens, const MsaParams *p) {
    (void)plan; /* the forward walks each query's own selection: no reverse map */
    if (!idx_lse) fatal("cpu msa_kl_forward: idx_lse is required");
    kl_value("msa_kl_forward", kl, idx_lse, q, k, lse, qi, ki, topk, cu_seqlens, p);
}

/* dqi, dki += coeff * d(sum over (t,g) of KL)/d(qi, ki) */
static void kl_backward_coeff(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse,
                              const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                              const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p, float coeff) {
    if (!dqi && !dki) return;
    CPU_SAME_DTYPE("msa_kl_backward", q, dqi, dki, k, lse, qi, ki, idx_lse);
    MsaCtx c = kl_ctx("msa_kl_backward", q, k, lse, qi, ki, topk, cu_seqlens, p);
    if (idx_lse->numel != c.Hkv * c.Nq) fatal("cpu msa_kl_backward: idx_lse must be [Hidx, Nq]");
    if ((dqi && dqi->numel != qi->numel) || (dki && dki->numel != ki->numel))
        fatal("cpu msa_kl_backward: gradients must have their inputs' shapes");
    if (dki) msa_build_key_queries(&c, plan);
    CPU_CALL(q, msa_kl_bwd, dqi ? dqi->data : NULL, dki ? dki->data : NULL, q->data, k->data, lse->data, qi->data,
             ki->data, idx_lse->data, (double)coeff, &c);
    msa_ctx_free(&c);
}

/* the coefficient of kernels.def, rounded to float as the kernel takes it */
static float kl_coeff(const char *what, const Tensor *qi, const Tensor *kl_grad, float kl_weight) {
    if (kl_grad && kl_grad->numel != 1) fatal("cpu %s: kl_grad must be a scalar tensor", what);
    const int64_t pairs = qi->shape[0] * qi->shape[1];
    return (float)((double)kl_weight * (kl_grad ? tensor_get(kl_grad, 0) : 1.0) / (double)pairs);
}

void cpu_msa_kl_backward(Tensor *dqi, Tensor *dki, const Tensor *q, const Tensor *k, const Tensor *lse,
                         const Tensor *qi, const Tensor *ki, const Tensor *idx_lse, const Tensor *topk,
                         const Tensor *plan, const Tensor *cu_seqlens, const MsaParams *p, const Tensor *kl_grad,
                         float kl_weight) {
    kl_backward_coeff(dqi, dki, q, k, lse, qi, ki, idx_lse, topk, plan, cu_seqlens, p,
                      kl_coeff("msa_kl_backward", qi, kl_grad, kl_weight));
}

/* The CPU reference of the fused entry is the separate kernels in sequence, so that its results are those
 * bits: the attention backward, the KL backward with the coefficient the KL op computed before the
 * fusion, and the KL value of the forward (recomputing the student's normaliser unrounded, as the forward
 * did; the given idx_lse, the indexer's, has the same value rounded to lse's dtype). */
void cpu_msa_attention_kl_backward(Tensor *dq, Tensor *dk, Tensor *dv, Tensor *dqi, Tensor *dki, Tensor *kl,
                                   const Tensor *dout, const Tensor *q, const Tensor *k, const Tensor *v,
                                   const Tensor *out, const Tensor *lse, const Tensor *qi, const Tensor *ki,
                                   const Tensor *idx_lse, const Tensor *topk, const Tensor *plan,
                                   const Tensor *cu_seqlens, const MsaParams *p, const Tensor *kl_grad, float kl_weight) {
    if (!topk) fatal("cpu msa_attention_kl_backward: topk is required (the dense warm-up has msa_kl_backward)");
    if (dq || dk || dv) {
        if (!dout) fatal("cpu msa_attention_kl_backward: dout is required for dq, dk or dv");
        cpu_msa_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, topk, plan, cu_seqlens, p);
    }
    if (dqi || dki) {
        if (!idx_lse) fatal("cpu msa_attention_kl_backward: idx_lse (the indexer's) is required for dqi or dki");
        kl_backward_coeff(dqi, dki, q, k, lse, qi, ki, idx_lse, topk, plan, cu_seqlens, p,
                          kl_coeff("msa_attention_kl_backward", qi, kl_grad, kl_weight));
    }
    if (kl) kl_value("msa_attention_kl_backward", kl, NULL, q, k, lse, qi, ki, topk, cu_seqlens, p);
}
