/* The MoE ops: router scores, Top-k selection and the routing plan (not differentiable), combine
 * weights, permute / unpermute between token order and the expert-grouped order, the grouped
 * expert linear, and the balance and z-losses. layers/moe.c composes them into the MoE layer.
 *
 * Dropless routing: each of the N*k token-expert assignments gets its own row of the grouped
 * buffer, so experts process segments of variable length (offsets) and nothing is truncated. */
#include "../kernels/util.h"
#include "ops.h"

typedef struct RouterScoresParams {
    MoeScoreFunc func;
} RouterScoresParams;

Tensor *op_moe_router_scores(Engine *e, Tensor *logits, MoeScoreFunc func) {
    if (logits->ndim != 2) fatal("moe_router_scores: logits must be [N, E]");
    engine_op_begin(e);
    Tensor *scores = engine_empty_like(e, logits);
    BACKEND_REQUIRE(e->be, moe_scores_forward);
    e->be->moe_scores_forward(scores, logits, func);
    if (engine_wants_grad(e, &logits, 1)) {
        Node *n = engine_record(e, OP_moe_router_scores, &logits, 1, &scores, 1);
        NODE_PARAMS(n, RouterScoresParams)->func = func;
    }
    engine_op_end(e, OP_moe_router_scores);
    return scores;
}

void backward_moe_router_scores(Engine *e, Node *n) {
    Tensor *gl = engine_grad(e, n->in[0]);
    BACKEND_REQUIRE(e->be, moe_scores_backward);
    if (gl) e->be->moe_scores_backward(gl, n->out[0]->grad, n->out[0], NODE_PARAMS(n, RouterScoresParams)->func);
}

Tensor *op_moe_topk(Engine *e, Tensor *scores, Tensor *bias, int k) {
    if (scores->ndim != 2) fatal("moe_topk: scores must be [N, E]");
    engine_op_begin(e);
    Tensor *idx = engine_empty(e, DT_I32, SHAPE(scores->shape[0], k));
    BACKEND_REQUIRE(e->be, moe_topk);
    e->be->moe_topk(idx, scores, bias, k);
    engine_op_end_named(e, "moe_topk");
    return idx;
}

MoePlan op_moe_plan(Engine *e, Tensor *idx, int num_experts) {
    if (idx->dtype != DT_I32 || idx->ndim != 2) fatal("moe_plan: idx must be i32 [N, k]");
    engine_op_begin(e);
    MoePlan p = {.idx = idx, .num_experts = num_experts, .k = (int)idx->shape[1]};
    p.offsets = engine_empty(e, DT_I32, SHAPE(num_experts + 1));
    p.rows = engine_empty(e, DT_I32, SHAPE(idx->shape[0], idx->shape[1]));
    BACKEND_REQUIRE(e->be, moe_plan);
    e->be->moe_plan(p.offsets, p.rows, idx);
    engine_op_end_named(e, "moe_plan");
    return p;
}

typedef struct CombineWeightsParams {
    bool renormalize;
    float scale;
} CombineWeightsParams;

Tensor *op_moe_combine_weights(Engine *e, Tensor *scores, Tensor *idx, bool renormalize, float scale) {
    if (scores->ndim != 2) fatal("moe_combine_weights: scores must be [N, E]");
    check_shape("moe_combine_weights", "idx", idx, SHAPE(scores->shape[0], -1));
    engine_op_begin(e);
    Tensor *w = engine_empty(e, scores->dtype, SHAPE(idx->shape[0], idx->shape[1]));
    BACKEND_REQUIRE(e->be, moe_combine_weights_forward);
    e->be->moe_combine_weights_forward(w, scores, idx, renormalize, scale);
    if (engine_wants_grad(e, &scores, 1)) {
        Tensor *in[2] = {scores, idx};
        Node *n = engine_record(e, OP_moe_combine_weights, in, 2, &w, 1);
        *NODE_PARAMS(n, CombineWeightsParams) = (CombineWeightsParams){renormalize, scale};
    }
    engine_op_end(e, OP_moe_combine_weights);
    return w;
}

void backward_moe_combine_weights(Engine *e, Node *n) {
    Tensor *gs = engine_grad(e, n->in[0]);
    BACKEND_REQUIRE(e->be, moe_combine_weights_backward);
    const CombineWeightsParams *cp = NODE_PARAMS(n, CombineWeightsParams);
    if (gs) e->be->moe_combine_weights_backward(gs, n->out[0]->grad, n->in[0], n->in[1], cp->renormalize, cp->scale);
}

Tensor *op_moe_permute(Engine *e, Tensor *x, const MoePlan *plan) {
    int64_t N = plan->rows->shape[0], C = tensor_dim(x, -1);
    check_shape("moe_permute", "x", x, SHAPE(N, C));
    engine_op_begin(e);
    Tensor *xs = engine_empty(e, x->dtype, SHAPE(N * plan->k, C));
    BACKEND_REQUIRE(e->be, moe_permute_forward);
    e->be->moe_permute_forward(xs, x, plan->rows);
    if (engine_wants_grad(e, &x, 1)) {
        Tensor *in[2] = {x, plan->rows};
        engine_record(e, OP_moe_permute, in, 2, &xs, 1);
    }
    engine_op_end(e, OP_moe_permute);
    return xs;
}

void backward_moe_permute(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]);
    BACKEND_REQUIRE(e->be, moe_permute_backward);
    if (gx) e->be->moe_permute_backward(gx, n->out[0]->grad, n->in[1]);
}

Tensor *op_moe_unpermute(Engine *e, Tensor *ys, Tensor *weights, const MoePlan *plan) {
    int64_t N = plan->rows->shape[0], C = tensor_dim(ys, -1);
    check_shape("moe_unpermute", "ys", ys, SHAPE(N * plan->k, C));
    check_shape("moe_unpermute", "weights", weights, SHAPE(N, plan->k));
    engine_op_begin(e);
    Tensor *out = engine_empty(e, ys->dtype, SHAPE(N, C));
    BACKEND_REQUIRE(e->be, moe_unpermute_forward);
    e->be->moe_unpermute_forward(out, ys, weights, plan->rows);
    Tensor *in[3] = {ys, weights, plan->rows};
    if (engine_wants_grad(e, in, 2)) engine_record(e, OP_moe_unpermute, in, 3, &out, 1);
    engine_op_end(e, OP_moe_unpermute);
    return out;
}

void backward_moe_unpermute(Engine *e, Node *n) {
    Tensor *gy = engine_grad(e, n->in[0]), *gw = engine_grad(e, n->in[1]);
    BACKEND_REQUIRE(e->be, moe_unpermute_backward);
    if (gy || gw) e->be->moe_unpermute_backward(gy, gw, n->out[0]->grad, n->in[0], n->in[1], n->in[2]);
}

Tensor *op_grouped_linear(Engine *e, Tensor *xs, Tensor *w, Tensor *offsets) {
    if (w->ndim != 3) fatal("grouped_linear: weight must be [E, out, in]");
    check_shape("grouped_linear", "input", xs, SHAPE(-1, w->shape[2]));
    check_shape("grouped_linear", "offsets", offsets, SHAPE(w->shape[0] + 1));
    engine_op_begin(e);
    Tensor *ys = engine_empty(e, xs->dtype, SHAPE(xs->shape[0], w->shape[1]));
    BACKEND_REQUIRE(e->be, grouped_matmul_forward);
    e->be->grouped_matmul_forward(ys, xs, w, offsets);
    Tensor *in[3] = {xs, w, offsets};
    if (engine_wants_grad(e, in, 2)) engine_record(e, OP_grouped_linear, in, 3, &ys, 1);
    engine_op_end(e, OP_grouped_linear);
    return ys;
}

void backward_grouped_linear(Engine *e, Node *n) {
    Tensor *gx = engine_grad(e, n->in[0]), *gw = engine_grad(e, n->in[1]);
    BACKEND_REQUIRE(e->be, grouped_matmul_backward);
    if (gx || gw) e->be->grouped_matmul_backward(gx, gw, n->out[0]->grad, n->in[0], n->in[1], n->in[2]);
}

typedef struct AuxLossParams {
    bool normalize; /* P_e of per-token normalised scores */
} AuxLossParams;

Tensor *op_moe_aux_loss(Engine *e, Tensor *scores, const MoePlan *plan, bool normalize) {
    check_shape("moe_aux_loss", "scores", scores, SHAPE(plan->rows->shape[0], plan->num_experts));
    engine_op_begin(e);
    Tensor *loss = engine_empty(e, stat_dtype(scores->dtype), SHAPE(1));
    BACKEND_REQUIRE(e->be, moe_aux_loss_forward);
    e->be->moe_aux_loss_forward(loss, scores, plan->offsets, normalize);
    if (engine_wants_grad(e, &scores, 1)) {
        Tensor *in[2] = {scores, plan->offsets};
        Node *n = engine_record(e, OP_moe_aux_loss, in, 2, &loss, 1);
        NODE_PARAMS(n, AuxLossParams)->normalize = normalize;
    }
    engine_op_end(e, OP_moe_aux_loss);
    return loss;
}

void backward_moe_aux_loss(Engine *e, Node *n) {
    Tensor *gs = engine_grad(e, n->in[0]);
    BACKEND_REQUIRE(e->be, moe_aux_loss_backward);
    if (gs) e->be->moe_aux_loss_backward(gs, n->out[0]->grad, n->in[0], n->in[1], NODE_PARAMS(n, AuxLossParams)->normalize);
}

typedef struct ZLossParams {
    Tensor *lse; /* [N] */
} ZLossParams;

Tensor *op_moe_z_loss(Engine *e, Tensor *logits) {
    if (logits->ndim != 2) fatal("moe_z_loss: logits must be [N, E]");
    engine_op_begin(e);
    DType sd = stat_dtype(logits->dtype);
    Tensor *loss = engine_empty(e, sd, SHAPE(1));
    Tensor *lse = engine_empty(e, sd, SHAPE(logits->shape[0]));
    BACKEND_REQUIRE(e->be, moe_z_loss_forward);
    e->be->moe_z_loss_forward(loss, lse, logits);
    if (engine_wants_grad(e, &logits, 1)) {
        Node *n = engine_record(e, OP_moe_z_loss, &logits, 1, &loss, 1);
        NODE_PARAMS(n, ZLossParams)->lse = lse;
    }
    engine_op_end(e, OP_moe_z_loss);
    return loss;
}

void backward_moe_z_loss(Engine *e, Node *n) {
    Tensor *gl = engine_grad(e, n->in[0]);
    BACKEND_REQUIRE(e->be, moe_z_loss_backward);
    if (gl) e->be->moe_z_loss_backward(gl, n->out[0]->grad, n->in[0], NODE_PARAMS(n, ZLossParams)->lse);
}
