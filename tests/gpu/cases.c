/* The GPU test cases, one list (gpu_cases.h): every CUDA kernel against the CPU reference, each GPU_CASE
 * line a case family (tests/gpu/test_gpu*.c) with its arguments, in run order. The inputs of all cases
 * come from one random stream, so the order fixes them; a new case goes where its group runs (a group's
 * cases are consecutive: test_gpu --only GROUP selects them). */
#include "gpu_cases.h"

static const DType acts[2] = {DT_F32, DT_BF16};

/* messages first, before this process holds a CUDA context */
static void message_cases(void) {
    GPU_CASE("messages", death_case, DeathCase, "CUDA_VISIBLE_DEVICES=", "nodevice", "no CUDA device found");
    GPU_CASE("messages", death_case, DeathCase, "", "token", "outside the vocabulary");
    GPU_CASE("messages", death_case, DeathCase, "", "target", "outside the vocabulary");
    GPU_CASE("messages", death_case, DeathCase, "", "msa_plan", "cuda msa_plan: topk[0, 6] = {1, ...}: slot 1 holds block 0");
}

static void elementwise_cases(void) {
    GPU_CASE0("elementwise", device_memory_case); /* the backend's count of what it allocated */
    const int64_t sizes[] = {1, 1000, 100003};
    const DType pairs[][2] = {{DT_F32, DT_F32}, {DT_BF16, DT_BF16}, {DT_BF16, DT_F32}, {DT_F32, DT_BF16}}; /* y, x */
    for (int si = 0; si < 3; si++) {
        for (int di = 0; di < 4; di++) GPU_CASE("elementwise", axpy_add_case, AxpyAddCase, sizes[si], pairs[di][0], pairs[di][1]);
        for (int d = 0; d < 2; d++) GPU_CASE("elementwise", sumsq_scale_case, SumsqScaleCase, sizes[si], acts[d]);
        GPU_CASE("elementwise", cast_case, CastCase, sizes[si]);
    }
}

static void matmul_cases(void) {
    const int64_t shapes[][3] = {{1, 1, 1}, {7, 13, 5}, {64, 48, 96}, {257, 129, 67}, {512, 1000, 64}};
    for (int s = 0; s < 5; s++) {
        const int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        for (int t = 0; t < 4; t++) {
            const bool ta = t & 1, tb = t & 2;
            GPU_CASE("matmul", matmul_case, MatmulCase, 1, M, N, K, ta, tb, DT_F32, DT_F32, DT_F32, false, 1.0f, 0.0f);
            GPU_CASE("matmul", matmul_case, MatmulCase, 1, M, N, K, ta, tb, DT_BF16, DT_BF16, DT_BF16, false, 1.0f, 0.0f);
        }
        /* the linear op's three GEMMs with F32 weights: y = x W^T (shadow), dx += dy W, dW += dy^T x (f32 out) */
        GPU_CASE("matmul", matmul_case, MatmulCase, 1, M, N, K, false, true, DT_BF16, DT_F32, DT_BF16, true, 1.0f, 0.0f);
        GPU_CASE("matmul", matmul_case, MatmulCase, 1, M, N, K, false, false, DT_BF16, DT_F32, DT_BF16, true, 1.0f, 1.0f);
        GPU_CASE("matmul", matmul_case, MatmulCase, 1, M, N, K, true, false, DT_BF16, DT_BF16, DT_F32, false, 1.0f, 1.0f);
        /* an F32 operand without a shadow: cast per call */
        GPU_CASE("matmul", matmul_case, MatmulCase, 1, M, N, K, false, true, DT_BF16, DT_F32, DT_BF16, false, 0.5f, 0.0f);
    }
    GPU_CASE("matmul", matmul_case, MatmulCase, 3, 33, 17, 40, false, true, DT_BF16, DT_BF16, DT_BF16, false, 1.0f, 0.0f);
    GPU_CASE("matmul", matmul_case, MatmulCase, 3, 33, 17, 40, true, false, DT_F32, DT_F32, DT_F32, false, 1.0f, 1.0f);
    GPU_CASE("matmul", matmul_case, MatmulCase, 1, 16, 24, 0, false, false, DT_BF16, DT_BF16, DT_F32, false, 1.0f, 0.0f); /* K = 0 */
}

static void norm_rope_cases(void) {
    /* V, C, N */
    GPU_CASE("embedding", embedding_case, EmbeddingCase, 17, 8, 1);
    GPU_CASE("embedding", embedding_case, EmbeddingCase, 65, 33, 100);
    GPU_CASE("embedding", embedding_case, EmbeddingCase, 1000, 256, 1000);
    /* ndim, shape, act, has_w, unit_offset, grads (1 dx, 2 dw) */
    for (int d = 0; d < 2; d++) {
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {1, 3}, acts[d], true, false, 3); /* C = 1 is ill-conditioned: dx ~ eps/x^2 */
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {37, 64}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {300, 1000}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 3, {50, 3, 40}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 3, {29, 2, 128}, acts[d], true, true, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {33, 96}, acts[d], false, false, 1);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {33, 96}, acts[d], true, false, 1);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {33, 96}, acts[d], true, false, 2);
        /* the layouts of kernels/cuda/rmsnorm.cu (BF16 / F32 vectors of 8 / 4): 4 to 32 lanes of a warp a
         * row over more rows than a wave of blocks holds, the last round with teams past the end (also
         * {1, 3} above: one row, 8 teams of 4 lanes); a block a row with 1, 2, 4 and 8 vectors a thread,
         * idle threads in the last ones, more rows than blocks (the dw partial sums of many blocks); C odd
         * (one element a load), with 1 + w and without a gain */
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {20000, 72}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {5001, 32}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {3, 16}, acts[d], true, true, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {4099, 2048}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {300, 4000}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {40, 6000}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {40, 6000}, acts[d], false, false, 1);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {7, acts[d] == DT_BF16 ? 16384 : 8192}, acts[d], true, false, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {65, 1999}, acts[d], true, true, 3);
        GPU_CASE("rmsnorm", rmsnorm_case, RmsnormCase, 2, {65, 1999}, acts[d], true, false, 2);
    }
    /* rows, C, act, has_w, has_dh, grads (1 dx, 2 dr, 4 dw, 8 dr is dx): rmsnorm's layouts (above), each
     * output left out in turn */
    for (int d = 0; d < 2; d++) {
        const int64_t shapes[][2] = {{1, 3},     {37, 64},   {300, 1000}, {20000, 72}, {5001, 32},
                                     {4099, 2048}, {300, 4000}, {40, 6000}, {65, 1999}};
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
            GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, shapes[i][0], shapes[i][1], acts[d], true, true, 7);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 7, acts[d] == DT_BF16 ? 16384 : 8192, acts[d], true, true, 7);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 33, 96, acts[d], false, true, 3);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 33, 96, acts[d], true, false, 7);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 33, 96, acts[d], true, true, 1);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 33, 96, acts[d], true, true, 2);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 33, 96, acts[d], true, true, 4);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 300, 1000, acts[d], true, true, 12);
        GPU_CASE("add_rmsnorm", add_rmsnorm_case, AddRmsnormCase, 65, 1999, acts[d], true, false, 8);
    }
    /* act, N, H, D, rotary dim, theta, positions below */
    for (int d = 0; d < 2; d++) {
        GPU_CASE("rope", rope_case, RopeCase, acts[d], 1, 1, 2, 2, 10000.0f, 10);
        GPU_CASE("rope", rope_case, RopeCase, acts[d], 77, 3, 64, 64, 10000.0f, 4096);
        GPU_CASE("rope", rope_case, RopeCase, acts[d], 50, 4, 40, 24, 1e6f, 200000);
        GPU_CASE("rope", rope_case, RopeCase, acts[d], 33, 2, 128, 64, 5e5f, 131072);
    }
}

static void attention_cases(void) {
    /* our own kernels (the default sends BF16 shapes cuDNN supports to cuDNN, tested by the
     * attention_cudnn group); impl, act, ndocs, lens, Hq, Hkv, D, grads (bit 0 dq, 1 dk, 2 dv) */
    for (int d = 0; d < 2; d++) {
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 1, {1}, 1, 1, 16, 7);
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 4, {5, 37, 1, 90}, 4, 2, 64, 7);
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 2, {200, 57}, 8, 1, 128, 7);
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 3, {33, 0, 64}, 2, 2, 40, 7);
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 2, {70, 29}, 3, 3, 18, 7);
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 1, {300}, 2, 1, 256, 7);
        GPU_CASE("attention", attention_case, AttentionCase, "own", acts[d], 5, {31, 32, 33, 64, 65}, 6, 2, 96, 7);
    }
    GPU_CASE("attention", attention_case, AttentionCase, "own", DT_BF16, 2, {40, 60}, 4, 2, 64, 2); /* dk only */
    GPU_CASE("attention", attention_case, AttentionCase, "own", DT_BF16, 2, {40, 60}, 4, 2, 64, 5); /* dq and dv */

    /* cuDNN's fused SDPA (kernels/cuda/attention_cudnn.cu), BF16 only (the path's dtype): documents of
     * unequal lengths (1, 0, not multiples of 64, more documents than a power of two so that the plan's
     * batch is padded with empty documents), Hq/Hkv = 1, 2, 8, D = 64 and 128, and two shapes in the same
     * plan bucket with different document lengths (the cached plan, new lengths and offsets) */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 1, {1}, 2, 1, 64, 7); /* one token */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 4, {5, 37, 1, 90}, 4, 2, 64, 7); /* plan (b 4, s 128) */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 4, {60, 3, 100, 2}, 4, 2, 64, 7); /* the same plan, new lengths */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 3, {33, 0, 64}, 2, 2, 64, 7); /* an empty document, MHA */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 2, {200, 57}, 8, 1, 128, 7); /* Hq/Hkv = 8 */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 5, {31, 32, 33, 64, 65}, 8, 8, 128, 7); /* Hq/Hkv = 1, D 128 */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 3, {300, 1, 129}, 16, 2, 128, 7); /* Hq/Hkv = 8, 16 heads */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 9, {7, 1, 13, 64, 65, 2, 128, 3, 50}, 4, 1, 64, 7); /* b 16: 7 empty documents */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 1, {1000}, 4, 2, 128, 7); /* one longer document (s 1024) */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 2, {40, 60}, 4, 2, 64, 2); /* dk only */
    GPU_CASE("attention_cudnn", attention_case, AttentionCase, "cudnn", DT_BF16, 2, {40, 60}, 4, 2, 64, 5); /* dq and dv */
}

/* group "swiglu": the pointwise kernels of the feed-forward and the residual stream */
static void pointwise_cases(void) {
    const int64_t sizes[] = {1, 1001, 65536};
    for (int d = 0; d < 2; d++) {
        for (int si = 0; si < 3; si++) GPU_CASE("swiglu", swiglu_case, SwigluCase, acts[d], sizes[si], si == 1); /* dup NULL at 1001 */
        /* p, seed, a nonzero offset */
        for (int si = 0; si < 3; si++) GPU_CASE("swiglu", dropout_case, DropoutCase, acts[d], sizes[si], 0.2f, 42 + (uint64_t)si, 12345);
        GPU_CASE("swiglu", bias_add_case, BiasAddCase, acts[d], 37, 65);
    }
}

static void loss_optimizer_cases(void) {
    /* act, N, V, every how many rows a target is ignore_index (0: none) */
    for (int d = 0; d < 2; d++) {
        GPU_CASE("cross_entropy", cross_entropy_case, CrossEntropyCase, acts[d], 1, 5, 0);
        GPU_CASE("cross_entropy", cross_entropy_case, CrossEntropyCase, acts[d], 37, 65, 4);
        GPU_CASE("cross_entropy", cross_entropy_case, CrossEntropyCase, acts[d], 64, 50257, 3);
        GPU_CASE("cross_entropy", cross_entropy_case, CrossEntropyCase, acts[d], 300, 1000, 0);
    }
    /* the chunked LM head + cross-entropy op through a CUDA engine: N, C, V, chunk rows, ignore every */
    GPU_CASE("lm_head_loss", lm_head_loss_case, LmHeadLossCase, 37, 64, 65, 37, 4);     /* one chunk */
    GPU_CASE("lm_head_loss", lm_head_loss_case, LmHeadLossCase, 300, 96, 1000, 64, 0);  /* a short last chunk */
    GPU_CASE("lm_head_loss", lm_head_loss_case, LmHeadLossCase, 129, 128, 32000, 16, 3);
    /* the chunked SwiGLU feed-forward op through a CUDA engine: N, C, F, chunk rows */
    GPU_CASE("swiglu_ffn", swiglu_ffn_case, SwigluFfnCase, 37, 64, 176, 37);   /* one chunk */
    GPU_CASE("swiglu_ffn", swiglu_ffn_case, SwigluFfnCase, 300, 128, 352, 64); /* a short last chunk */
    GPU_CASE("swiglu_ffn", swiglu_ffn_case, SwigluFfnCase, 1024, 256, 704, 1);
    /* a chain of checkpointed blocks with their inputs offloaded to page-locked host memory: N, C, blocks */
    GPU_CASE("checkpoint_offload", checkpoint_offload_case, CheckpointOffloadCase, 256, 64, 4);
    GPU_CASE("checkpoint_offload", checkpoint_offload_case, CheckpointOffloadCase, 1000, 96, 7);
    for (int si = 0; si < 2; si++)
        for (int with_shadow = 0; with_shadow < 2; with_shadow++)
            GPU_CASE("adamw", adamw_case, AdamwCase, si ? 100003 : 1000, with_shadow);
    /* tensors, largest size, gradient scale (1: no clipping) */
    GPU_CASE("adamw", optimizer_many_case, OptimizerManyCase, 70, 20000, 0.37f);
    GPU_CASE("adamw", optimizer_many_case, OptimizerManyCase, 33, 5000, 1.0f);
}

/* The MSA index side. Documents of unequal lengths incl. 1 and non-multiples of B; B 4/16/64/128 and odd
 * sizes (12: the scan path with blocks across tiles; 24: the n-tile path with blocks across tiles); k
 * above the block count; init 0/1, local 1/2; Hidx 1..4; Di 32/64/128 and 20/40 (padding, scalar
 * copies). */
static void msa_index_cases(void) {
    const float is128 = 0.08838835f, is64 = 0.125f, is32 = 0.17677669f;
    /* ndocs, lens, Hidx, Di, {B, k, init, local, scale, index_scale, no query_index, no key_rows} */
    const IdxSpec specs[] = {
        {5, {1, 37, 200, 5, 64}, 2, 64, {16, 4, 1, 1, 0.125f, is64, NULL, NULL}},
        {2, {300, 129}, 4, 128, {4, 8, 0, 2, 0.125f, is128, NULL, NULL}},
        {1, {1000}, 1, 32, {64, 6, 1, 2, 0.125f, is32, NULL, NULL}},
        {3, {77, 513, 3}, 4, 128, {128, 3, 0, 1, 0.125f, is128, NULL, NULL}},
        {2, {50, 20}, 2, 64, {16, 8, 1, 1, 0.125f, is64, NULL, NULL}},
        {2, {700, 300}, 3, 40, {24, 5, 1, 1, 0.125f, 0.158f, NULL, NULL}},
        {1, {400}, 2, 20, {12, 6, 0, 1, 0.125f, 0.2236f, NULL, NULL}},
        {1, {2500}, 4, 128, {16, 32, 1, 2, 0.125f, is128, NULL, NULL}},
        {1, {4096}, 4, 128, {128, 16, 0, 1, 0.125f, is128, NULL, NULL}},
        {4, {1, 1, 2, 3}, 2, 32, {4, 2, 0, 1, 0.125f, is32, NULL, NULL}},
    };
    for (int si = 0; si < (int)(sizeof specs / sizeof specs[0]); si++)
        GPU_CASE("msa", msa_indexer_plan_case, MsaIndexerPlanCase, specs[si], si % 3 == 0);
    IdxSpec neg = specs[0]; /* a negative index_scale flips the ranking, exactly as on the CPU */
    neg.p.index_scale = -0.3f;
    GPU_CASE("msa", msa_indexer_case, MsaIndexerCase, neg, DT_BF16, true);

    /* Hidx, ndocs, lens, B, k: random valid selections */
    GPU_CASE("msa", msa_plan_random_case, MsaPlanRandomCase, 3, 5, {1, 100, 33, 0, 257}, 8, 5);
    GPU_CASE("msa", msa_plan_random_case, MsaPlanRandomCase, 2, 2, {50, 50}, 1, 3); /* B = 1: every token a block */
    GPU_CASE("msa", msa_plan_random_case, MsaPlanRandomCase, 4, 1, {20000}, 16, 16);
    GPU_CASE("msa", msa_plan_random_case, MsaPlanRandomCase, 1, 3, {7, 0, 9}, 4, 1);

    /* dt, ndocs, lens, Hq, Hkv, D, B, k, query stride, topk NULL */
    for (int d = 0; d < 2; d++) {
        GPU_CASE("msa", msa_recall_case, MsaRecallCase, acts[d], 3, {1, 90, 37}, 4, 2, 64, 16, 3, 1, false);
        GPU_CASE("msa", msa_recall_case, MsaRecallCase, acts[d], 1, {300}, 8, 2, 128, 32, 4, 7, false);
        GPU_CASE("msa", msa_recall_case, MsaRecallCase, acts[d], 2, {64, 200}, 20, 2, 32, 8, 6, 3, false);
        GPU_CASE("msa", msa_recall_case, MsaRecallCase, acts[d], 2, {64, 200}, 4, 4, 48, 8, 2, 1, true);
    }
    GPU_CASE0("msa", msa_opcheck_case);
}

/* MSA attention (tests/gpu/test_gpu_msa_attention.c says what each case covers) */
static void msa_attention_cases(void) {
    /* act, ndocs, lens, Hq, Hkv, D, B, K, init, sel, plan given, grads, chunk, repeat */
    for (int d = 0; d < 2; d++) {
        const DType a = acts[d];
        /* G = 2, documents of 1 and non-multiples of B, k = 3 */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 4, {1, 37, 130, 64}, 2, 1, 64, 16, 3, 0, SEL_INDEXER, 0, 7, 0, 0);
        /* G = 16, D = 128, k = 16 > the 4 blocks of a document */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 2, {200, 57}, 32, 2, 128, 64, 16, 0, SEL_INDEXER, 1, 7, 0, 0);
        /* G = 1, block 4 (75 blocks), k = 16, a sink block */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 1, {300}, 4, 4, 64, 4, 16, 1, SEL_INDEXER, 1, 7, 0, 0);
        /* k = 1 (only the local block), block 128, a one-token document between two others */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 3, {257, 1, 100}, 16, 1, 128, 128, 1, 0, SEL_INDEXER, 0, 7, 0, 0);
        /* every query selects block 0, in chunks of 128 queries */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 2, {700, 300}, 32, 2, 128, 16, 3, 0, SEL_HOT, 0, 7, 128, 0);
        /* block 256: two 128-key segments per block (and 8 on CUDA cores); chunks of 100 */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 2, {513, 96}, 8, 4, 128, 256, 3, 0, SEL_INDEXER, 1, 7, 100, 0);
        /* odd head dim: CUDA cores for BF16 too */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 2, {90, 45}, 6, 2, 40, 16, 3, 0, SEL_INDEXER, 0, 7, 0, 0);
        /* topk NULL: dense causal within documents */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 2, {50, 77}, 4, 2, 64, 16, 2, 0, SEL_DENSE, 0, 7, 0, 0);
        /* many tiles per CTA (the pipelines, segment changes, hot rows over many CTAs), twice */
        GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, a, 1, {4096}, 16, 2, 64, 64, 4, 0, SEL_HOT, 1, 7, 0, 1);
    }
    const DType b = DT_BF16;
    /* D = 128 tensor cores with many tiles per CTA, G = 16, chunked, twice */
    GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, b, 2, {1500, 700}, 32, 2, 128, 128, 4, 0, SEL_HOT, 0, 7, 700, 1);
    GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, b, 1, {2500}, 16, 1, 128, 64, 8, 0, SEL_INDEXER, 1, 7, 0, 0);
    /* subsets of the gradients */
    GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, b, 2, {140, 60}, 32, 2, 64, 32, 3, 0, SEL_INDEXER, 0, 2, 0, 0); /* dk only, G = 16 with D = 64 */
    GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, b, 2, {140, 60}, 8, 2, 128, 32, 3, 0, SEL_INDEXER, 0, 5, 0, 0); /* dq and dv */
    GPU_CASE("msa_attention", msa_attention_case, MsaAttentionCase, b, 2, {140, 60}, 8, 2, 128, 32, 3, 0, SEL_INDEXER, 1, 1, 0, 0); /* dq only */
}

/* MSA KL (tests/gpu/test_gpu_msa_kl.c says what each case covers) */
static void msa_kl_cases(void) {
    /* act, ndocs, lens, Hq, Hkv, D, Di, B, K, init, sel, plan given, grads (1 dqi, 2 dki), window */
    for (int d = 0; d < 2; d++) {
        const DType a = acts[d];
        /* block 4, k = 3, G = 2, a one-token document */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 4, {1, 37, 100, 5}, 4, 2, 64, 32, 4, 3, 0, KL_INDEXER, 0, 3, 0);
        /* G = 1; k = 16 above every document's block count (all selected) */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 3, {200, 57, 1}, 2, 2, 128, 128, 16, 16, 0, KL_INDEXER, 1, 3, 0);
        /* G = 16, block 128, k = 1 (the local block only) */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {300, 129}, 32, 2, 128, 128, 128, 1, 0, KL_INDEXER, 1, 3, 0);
        /* G = 16, k = 16 out of 19 blocks */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {300, 129}, 32, 2, 128, 128, 16, 16, 0, KL_INDEXER, 0, 3, 0);
        /* hot row: block 0 taken by all 700 queries (pieces of 256, split partials), 3 windows */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 1, {700}, 16, 1, 64, 32, 16, 4, 1, KL_INDEXER, 0, 3, 300);
        /* hot rows in two groups, plan given, windows of 128 tokens */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {600, 90}, 8, 2, 128, 64, 32, 3, 1, KL_INDEXER, 1, 3, 128);
        /* a block longer than a key tile (sub-tiles merged), k = 2 */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {450, 30}, 4, 1, 64, 64, 200, 2, 0, KL_INDEXER, 0, 3, 0);
        /* odd head dims (element-wise loads, padding), G = 3 */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 3, {70, 1, 29}, 6, 2, 18, 20, 8, 3, 0, KL_INDEXER, 0, 3, 0);
        /* D = 256 (smaller tiles) */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {40, 33}, 4, 2, 256, 128, 16, 2, 0, KL_INDEXER, 1, 3, 0);
        /* G = 128: two head passes per query */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 1, {40}, 128, 1, 32, 32, 8, 2, 0, KL_INDEXER, 0, 3, 0);
        /* one gradient at a time */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {90, 45}, 4, 2, 64, 64, 16, 3, 0, KL_INDEXER, 0, 1, 0);
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {90, 45}, 4, 2, 64, 64, 16, 3, 1, KL_INDEXER, 0, 2, 64);
        /* dense warm-up KL (topk NULL) */
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 4, {1, 90, 33, 130}, 8, 4, 64, 32, 16, 4, 0, KL_DENSE, 0, 3, 0);
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 2, {150, 20}, 32, 2, 128, 128, 16, 4, 0, KL_DENSE, 0, 3, 0);
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 1, {300}, 1, 1, 128, 32, 16, 4, 0, KL_DENSE, 0, 3, 0);
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 3, {129, 1, 64}, 6, 2, 18, 20, 16, 4, 0, KL_DENSE, 0, 1, 0);
        GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, a, 3, {129, 1, 64}, 4, 2, 256, 64, 16, 4, 0, KL_DENSE, 0, 2, 0);
    }
    /* MiniMax-like heads (G = 16, D = Di = 128), longer documents: many pieces per row (BF16 only) */
    GPU_CASE("msa_kl", msa_kl_case, MsaKlCase, DT_BF16, 2, {1100, 600}, 32, 2, 128, 128, 64, 8, 0, KL_INDEXER, 0, 3, 0);
    for (int d = 0; d < 2; d++) {
        GPU_CASE("msa_kl", msa_kl_zero_case, MsaKlZeroCase, acts[d], false);
        GPU_CASE("msa_kl", msa_kl_zero_case, MsaKlZeroCase, acts[d], true);
    }

    /* the KL folded into the attention backward: act, ndocs, lens, Hq, Hkv, D, Di, B, K, init, grads (bits dq dk dv dqi
     * dki kl), chunk, kl_grad, repeat. BF16 with G = 4..16 on the tensor cores (the fused kernel); F32 and G = 2, 3
     * the separate kernels */
    for (int d = 0; d < 2; d++) {
        const DType a = acts[d];
        /* G = 16, D = Di = 128, several documents (one of 1 token), k = 4 of up to 5 blocks */
        GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, a, 3, {300, 129, 1}, 32, 2, 128, 128, 64, 4, 0, 63, 0, 1, 0);
        /* G = 8, D = 64, Di = 128, hot block 0, chunks of 128 queries */
        GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, a, 2, {700, 90}, 16, 2, 64, 128, 32, 3, 1, 63, 128, 1, 0);
    }
    const DType b = DT_BF16;
    /* G = 8, D = 128, Di = 64, block 16 (segments of 16 keys: most warps idle), k = 6 */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 3, {1, 37, 500}, 32, 4, 128, 64, 16, 6, 0, 63, 0, 1, 0);
    /* G = 16, D = 64, Di = 64, k = 16 above every document's blocks: all selected */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {600, 300}, 64, 4, 64, 64, 128, 16, 0, 63, 0, 0, 0);
    /* G = 4 (8 queries per tile at D = 128), block 256: two key segments per block */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {513, 96}, 8, 2, 128, 128, 256, 3, 1, 63, 100, 1, 0);
    /* G = 2 and 3: the separate kernels */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 1, {200}, 4, 2, 128, 128, 32, 3, 0, 63, 0, 1, 0);
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {90, 45}, 6, 2, 64, 64, 16, 3, 0, 63, 0, 0, 0);
    /* subsets: the KL's gradients and value alone (a frozen backbone); the attention's gradients and the value */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {300, 129}, 32, 2, 128, 128, 64, 4, 1, 56, 0, 1, 0);
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {300, 129}, 16, 2, 64, 128, 64, 4, 0, 39, 0, 0, 0);
    /* MiniMax-like heads, many tiles per CTA, hot rows over many CTAs, twice: deterministic */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {1500, 700}, 32, 2, 128, 128, 128, 8, 1, 63, 0, 1, 1);
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 1, {4096}, 16, 2, 64, 128, 64, 8, 0, 63, 0, 1, 1);
    /* the largest groups the fused kernel takes (its teacher has one form per G): G = 32 at D = 64 (two queries a
     * tile) and D = 128 (one), G = 64 at D = 64 (one) */
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {300, 129}, 64, 2, 64, 128, 64, 4, 0, 63, 0, 1, 0);
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 2, {300, 129}, 32, 1, 128, 64, 64, 4, 0, 63, 0, 1, 0);
    GPU_CASE("msa_kl", msa_attention_kl_case, MsaAttentionKlCase, b, 1, {400}, 64, 1, 64, 64, 64, 4, 1, 63, 0, 1, 0);
}

/* MoE (tests/gpu/test_gpu_moe.c says what the cases cover) */
static void moe_cases(void) {
    /* first: in a child process started by the first of them, these run the bad input */
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "plan", "cuda moe_plan: expert index 9 outside [0, 8) at idx[1, 1]");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "plan_per_expert",
             "cuda moe_plan: expert index 9 outside [0, 8) at idx[1, 1]");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "topk", "cuda moe_topk: router scores of token 1 are not finite numbers");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "combine",
             "cuda moe_combine_weights: expert index -1 at idx element 3 is outside [0, E) of the scores");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "offsets", "cuda grouped_matmul_forward: offsets decrease at expert 1");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "offsets_single",
             "cuda grouped_matmul: offsets[2] = 3 ends expert 1's segment out of order");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "rows",
             "cuda moe_permute/moe_unpermute: rows element 3 = 7 is outside the grouped buffer");
    GPU_CASE("moe", moe_bad_input_case, MoeBadInputCase, "rows_unpermute",
             "cuda moe_permute/moe_unpermute: rows element 4 = -2 is outside the grouped buffer");
    GPU_CASE0("moe", moe_no_wait_case);

    for (int a = 0; a < 2; a++) {
        const DType dt = acts[a];
        const int64_t sc[][2] = {{1, 1}, {37, 5}, {1000, 8}, {129, 64}, {77, 300}}; /* N, E */
        for (int i = 0; i < 5; i++)
            for (int f = 0; f < 2; f++)
                GPU_CASE("moe", moe_scores_case, MoeScoresCase, dt, dt, sc[i][0], sc[i][1], f ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX);

        const struct { int64_t N; int E, k; } tk[] = {{1, 1, 1}, {37, 5, 1}, {37, 5, 2}, {1000, 8, 2},
                                                       {513, 8, 8}, {129, 64, 6}, {77, 300, 4}};
        /* dt, N, E, k, bias, ties, NaN scores */
        for (size_t i = 0; i < sizeof tk / sizeof tk[0]; i++)
            for (int v = 0; v < 4; v++) GPU_CASE("moe", moe_topk_case, MoeTopkCase, dt, tk[i].N, tk[i].E, tk[i].k, v & 1, v & 2, false);
        GPU_CASE("moe", moe_topk_case, MoeTopkCase, dt, 301, 8, 2, true, false, true);
        GPU_CASE("moe", moe_topk_case, MoeTopkCase, dt, 64, 5, 4, false, true, true);

        const struct { int64_t N; int E, k; } cw[] = {{1, 1, 1}, {37, 5, 2}, {1000, 8, 2}, {129, 64, 6}, {50, 8, 8}};
        for (size_t i = 0; i < sizeof cw / sizeof cw[0]; i++)
            for (int r = 0; r < 2; r++)
                GPU_CASE("moe", moe_combine_case, MoeCombineCase, dt, dt, cw[i].N, cw[i].E, cw[i].k, r, r ? 1.0f : 2.5f);

        /* dt, N, E, k, C, grads (1 dys, 2 dw) */
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 1, 1, 1, 1, 3);
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 37, 5, 2, 5, 3);
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 300, 8, 2, 64, 3);
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 1001, 8, 1, 8, 3);
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 129, 5, 2, 1000, 3);
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 45, 8, 2, 33, 1);
        GPU_CASE("moe", moe_permute_case, MoePermuteCase, dt, 45, 8, 2, 33, 2);

        const struct { int64_t N; int E, k; } ax[] = {{1, 1, 1}, {37, 5, 2}, {1000, 8, 2}, {129, 64, 6}};
        /* dt, N, E, k, normalize, no assignments (M = 0) */
        for (size_t i = 0; i < sizeof ax / sizeof ax[0]; i++)
            for (int nz = 0; nz < 2; nz++) GPU_CASE("moe", moe_aux_case, MoeAuxCase, dt, ax[i].N, ax[i].E, ax[i].k, nz, false);
        GPU_CASE("moe", moe_aux_case, MoeAuxCase, dt, 37, 5, 2, true, true);
        GPU_CASE("moe", moe_aux_case, MoeAuxCase, dt, 37, 5, 2, false, true);

        const int64_t zc[][2] = {{1, 1}, {37, 5}, {1000, 8}, {77, 300}}; /* N, E */
        for (int i = 0; i < 4; i++) GPU_CASE("moe", moe_z_case, MoeZCase, dt, zc[i][0], zc[i][1]);
    }
    /* mixed router dtypes (an F32 router over BF16 activations) */
    GPU_CASE("moe", moe_scores_case, MoeScoresCase, DT_BF16, DT_F32, 129, 8, MOE_SCORE_SOFTMAX);
    GPU_CASE("moe", moe_scores_case, MoeScoresCase, DT_F32, DT_BF16, 129, 8, MOE_SCORE_SIGMOID);
    GPU_CASE("moe", moe_combine_case, MoeCombineCase, DT_F32, DT_BF16, 129, 8, 2, true, 1.0f);

    /* the routing statistics' f64 sums and the selection bias's update, bit for bit: N, E, k, the losses' dtype,
     * aux, z (false: NULL) */
    const struct { int64_t N; int E, k; } st[] = {{1, 1, 1}, {37, 5, 2}, {1000, 8, 2}, {129, 64, 6}, {77, 300, 4}};
    for (size_t i = 0; i < sizeof st / sizeof st[0]; i++)
        GPU_CASE("moe", moe_stats_case, MoeStatsCase, st[i].N, st[i].E, st[i].k, DT_F32, true, true);
    GPU_CASE("moe", moe_stats_case, MoeStatsCase, 37, 5, 2, DT_F64, true, true);
    GPU_CASE("moe", moe_stats_case, MoeStatsCase, 37, 5, 2, DT_F32, false, true);
    GPU_CASE("moe", moe_stats_case, MoeStatsCase, 37, 5, 2, DT_F32, true, false);
    GPU_CASE("moe", moe_stats_case, MoeStatsCase, 37, 5, 2, DT_F32, false, false);
    /* E, loads (0 all zero, 1 most at the mean: E a multiple of 8, 2 random), rate */
    GPU_CASE("moe", moe_bias_update_case, MoeBiasUpdateCase, 8, 0, 0.01f);
    GPU_CASE("moe", moe_bias_update_case, MoeBiasUpdateCase, 8, 1, 0.01f);
    GPU_CASE("moe", moe_bias_update_case, MoeBiasUpdateCase, 64, 1, 1e-3f);
    GPU_CASE("moe", moe_bias_update_case, MoeBiasUpdateCase, 5, 2, 0.01f);
    GPU_CASE("moe", moe_bias_update_case, MoeBiasUpdateCase, 300, 2, 1e-3f);

    const struct { int64_t N; int E, k; } pl[] = {{0, 4, 2}, {1, 1, 1}, {37, 5, 1}, {37, 5, 2}, {1000, 8, 2},
                                                   {4099, 8, 1}, {3001, 64, 6}, {20000, 8, 8}};
    for (size_t i = 0; i < sizeof pl / sizeof pl[0]; i++) GPU_CASE("moe", moe_plan_case, MoePlanCase, pl[i].N, pl[i].E, pl[i].k);

    /* BF16 with in and out multiples of 8 run on the single-launch grouped GEMM (kernels/cuda/moe_grouped_gemm.cu),
     * the rest (F32, in = 33 / out = 17) on the per-expert one */
    const struct { int64_t N; int E, k; int64_t in, out; int used; } gm[] = {
        {1, 1, 1, 16, 8, 0},        {37, 5, 2, 24, 40, 0},      {300, 8, 2, 64, 48, 0},   {257, 8, 1, 33, 17, 0},
        {64, 5, 5, 96, 128, 0},     {1000, 64, 6, 256, 128, 0}, {500, 16, 2, 128, 64, 3}, {300, 8, 1, 64, 96, 1},
        {700, 8, 2, 200, 72, 0},    {2048, 8, 2, 512, 1024, 0}, {129, 300, 2, 64, 64, 0}, {3, 32, 1, 1024, 256, 0}};
    /* dt, weights (0 plain F32, 1 F32 parameters with a BF16 shadow), N, E, k, in, out, used */
    for (size_t i = 0; i < sizeof gm / sizeof gm[0]; i++) {
        GPU_CASE("moe", moe_grouped_case, MoeGroupedCase, DT_F32, 0, gm[i].N, gm[i].E, gm[i].k, gm[i].in, gm[i].out, gm[i].used);
        GPU_CASE("moe", moe_grouped_case, MoeGroupedCase, DT_BF16, 0, gm[i].N, gm[i].E, gm[i].k, gm[i].in, gm[i].out, gm[i].used);
        GPU_CASE("moe", moe_grouped_case, MoeGroupedCase, DT_BF16, 1, gm[i].N, gm[i].E, gm[i].k, gm[i].in, gm[i].out, gm[i].used);
    }

    GPU_CASE("moe", moe_e2e_case, MoeE2eCase, 0);
    GPU_CASE("moe", moe_e2e_case, MoeE2eCase, 1);
}

/* the context-parallel block transpose: row sizes for every word width the kernel picks (16-byte rows
 * of BF16 head dims, 12-byte F32 rows, 6-byte BF16 rows, 2-byte rows); dt, a, b, inner */
static void cp_cases(void) {
    GPU_CASE("cp", transpose_case, TransposeCase, DT_BF16, 64, 2, 128);
    GPU_CASE("cp", transpose_case, TransposeCase, DT_BF16, 3, 4, 64);
    GPU_CASE("cp", transpose_case, TransposeCase, DT_F32, 5, 2, 3);
    GPU_CASE("cp", transpose_case, TransposeCase, DT_BF16, 7, 3, 3);
    GPU_CASE("cp", transpose_case, TransposeCase, DT_BF16, 9, 4, 1);
    GPU_CASE("cp", transpose_case, TransposeCase, DT_F32, 2048, 8, 64);
    GPU_CASE("cp", transpose_case, TransposeCase, DT_BF16, 1, 1, 5);
}

/* one rank's ring attention over every rank's block (tests/gpu/test_gpu_cp.c): documents that cross the
 * chunks (and start inside them), so that some queries see none of a block's keys, a query tile (32 rows)
 * wider than a chunk, GQA and MHA, head dims 16 to 256; act, ndocs, lens, ranks, me, Hq, Hkv, D, grads */
static void ring_cases(void) {
    for (int d = 0; d < 2; d++) {
        GPU_CASE("ring", ring_case, RingCase, acts[d], 4, {5, 37, 1, 21}, 2, 0, 4, 2, 64, 7);
        GPU_CASE("ring", ring_case, RingCase, acts[d], 4, {5, 37, 1, 21}, 2, 1, 4, 2, 64, 7);
        GPU_CASE("ring", ring_case, RingCase, acts[d], 4, {70, 29, 1, 28}, 4, 1, 8, 1, 128, 7);
        GPU_CASE("ring", ring_case, RingCase, acts[d], 1, {200}, 2, 0, 2, 2, 40, 7);
        GPU_CASE("ring", ring_case, RingCase, acts[d], 5, {31, 32, 33, 64, 96}, 8, 3, 6, 2, 96, 7);
        GPU_CASE("ring", ring_case, RingCase, acts[d], 6, {1, 1, 60, 2, 3, 5}, 4, 3, 3, 3, 16, 7);
    }
    GPU_CASE("ring", ring_case, RingCase, DT_BF16, 2, {100, 28}, 2, 1, 2, 1, 256, 7);
    GPU_CASE("ring", ring_case, RingCase, DT_BF16, 4, {5, 37, 1, 21}, 2, 1, 4, 2, 64, 2); /* dk only */
    GPU_CASE("ring", ring_case, RingCase, DT_BF16, 4, {5, 37, 1, 21}, 2, 0, 4, 2, 64, 5); /* dq and dv */
}

/* every pointwise activation of kernels.def (its ACTIVATION lines): x ~ N(0, 2) (the saturated tails
 * included), both dtypes, one element, an odd count and a large one */
static void activation_cases(void) {
#define KERNEL(group, ret, name, params)
#define ACTIVATION(group, name)                                                                     \
    for (int d = 0; d < 2; d++)                                                                     \
        for (int si = 0; si < 3; si++)                                                              \
            GPU_CASE("activation", unary_case, UnaryCase, UNARY_KERNEL(name), acts[d], (int64_t[]){1, 1001, 65536}[si], 2.0);
#include "../../kernels/kernels.def"
#undef ACTIVATION
#undef KERNEL
}

/* MSA under sequence-split context parallelism (tests/gpu/test_gpu_msa_cp.c says what each case covers): act,
 * ndocs, lens, Hq, Hkv, D, Di, B, K, init_blocks, cp, rank, fetched (k/v as the fetched blocks' rows, found through
 * key_rows), chunk (queries per attention chunk and KL window; 0: the kernels' own). 512 tokens in two or three
 * documents crossing the ranks' chunks; BF16 on the tensor cores, with the KL folded into the attention backward
 * at G = 8 (8 queries per tile at D = 64, 4 at D = 128) and in separate kernels at G = 4; F32 with G = 3 and odd
 * dims (the CUDA cores and the separate KL kernels). */
static void msa_cp_cases(void) {
    const DType b = DT_BF16, f = DT_F32;
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, b, 2, {300, 212}, 8, 2, 64, 64, 64, 3, 1, 2, 0, 0, 0);
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, b, 2, {300, 212}, 16, 2, 64, 64, 64, 3, 1, 2, 1, 1, 0);
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, b, 2, {300, 212}, 16, 2, 64, 64, 64, 3, 1, 4, 1, 1, 48);
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, b, 2, {300, 212}, 16, 2, 128, 128, 64, 3, 1, 4, 3, 1, 0);
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, b, 3, {100, 1, 411}, 8, 2, 64, 64, 16, 5, 0, 4, 2, 1, 37);
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, f, 2, {300, 212}, 6, 2, 48, 32, 64, 3, 1, 2, 0, 1, 0);
    GPU_CASE("msa_cp", msa_cp_case, MsaCpCase, f, 3, {100, 1, 411}, 6, 2, 48, 32, 16, 5, 0, 4, 2, 1, 37);
}

/* configs/shakespeare_gpu.json's model with MoE feed-forwards in every layer (2 of 8 experts of width 256, so
 * that the expert GEMMs take the grouped kernel: widths that are multiples of 8), its balance and z-losses and
 * the selection bias's update on, on 8 rows a step: the sets of a HostWaitsCase or CudaGraphCase */
#define SHAKESPEARE_GPU_MOE                                                                                        \
    {"model.ffn=moe", "moe.num_experts=8", "moe.experts_per_token=2", "moe.expert_dim=256", "moe.aux_loss_weight=0.01", \
     "moe.z_loss_weight=0.0001", "moe.bias_update_rate=0.001", "train.batch_size=8", NULL}

void gpu_cases(void) {
    message_cases();
    elementwise_cases();
    matmul_cases();
    norm_rope_cases();
    attention_cases();
    pointwise_cases();
    loss_optimizer_cases();
    msa_index_cases();
    msa_attention_cases();
    msa_kl_cases();
    moe_cases();
    cp_cases();
    ring_cases();
    activation_cases();
    msa_cp_cases();
    GPU_CASE0("sync", staged_copies_case);
    /* the shakespeare_gpu model on fewer rows: dense (cuDNN attention, D = 64), then with MSA in layers 1-5
     * in their dense warm-up and past it */
    GPU_CASE("sync", host_waits_case, HostWaitsCase, "tiny.json (cuDNN attention, D = 16)", "configs/tiny.json", {NULL}, 3, 4);
    GPU_CASE("sync", host_waits_case, HostWaitsCase, "shakespeare_gpu dense, 8 x 256 tokens", "configs/shakespeare_gpu.json",
             {"train.batch_size=8", NULL}, 3, 4);
    GPU_CASE("sync", host_waits_case, HostWaitsCase, "shakespeare_gpu MSA dense warm-up, 8 x 256 tokens",
             "configs/shakespeare_gpu.json", {"model.attention=msa", "msa.dense_warmup_steps=100", "train.batch_size=8", NULL},
             3, 4);
    GPU_CASE("sync", host_waits_case, HostWaitsCase, "shakespeare_gpu MSA sparse phase, 8 x 256 tokens",
             "configs/shakespeare_gpu.json", {"model.attention=msa", "msa.dense_warmup_steps=2", "train.batch_size=8", NULL},
             4, 4);
    /* MoE in every layer, 2 of 8 experts of width 256 (the grouped GEMMs), the balance terms and the selection
     * bias's update on: routing statistics and bias stay on the device (layers/moe.h) */
    GPU_CASE("sync", host_waits_case, HostWaitsCase, "shakespeare_gpu MoE 2 of 8, 8 x 256 tokens", "configs/shakespeare_gpu.json",
             SHAKESPEARE_GPU_MOE, 3, 4);
    /* recomputation with the attention outputs kept for the replay (their store sized in the first step) */
    GPU_CASE("sync", host_waits_case, HostWaitsCase, "shakespeare_gpu dense, recompute, kept attention outputs",
             "configs/shakespeare_gpu.json",
             {"train.batch_size=8", "train.recompute=true", "train.keep_attention_outputs=true", NULL}, 3, 4);
    /* the training step as a CUDA graph: tiny.json (cuDNN attention), with 2 micro-batches a step (a step
     * of two forwards and backwards) and recomputation, and the shakespeare_gpu recipe (dropout 0.2: each
     * replay's masks from its own seeds; its warm-up and cosine schedule change the learning rate at every
     * replay) */
    GPU_CASE("graph", cuda_graph_case, CudaGraphCase, "tiny.json", "configs/tiny.json", {NULL}, 20);
    GPU_CASE("graph", cuda_graph_case, CudaGraphCase, "tiny.json, grad_accum 2, recompute", "configs/tiny.json",
             {"train.grad_accum=2", "train.recompute=true", NULL}, 12);
    GPU_CASE("graph", cuda_graph_case, CudaGraphCase, "shakespeare_gpu dense, dropout 0.2, 8 x 256 tokens",
             "configs/shakespeare_gpu.json", {"train.batch_size=8", "optim.warmup_steps=5", NULL}, 20);
    /* the MoE step: its statistics accumulate on the device at every replay and its bias moves there (the
     * biases and the last logged step's MoE line are compared too) */
    GPU_CASE("graph", cuda_graph_case, CudaGraphCase, "shakespeare_gpu MoE 2 of 8, dropout 0.2, 8 x 256 tokens",
             "configs/shakespeare_gpu.json", SHAKESPEARE_GPU_MOE, 20);
    /* MSA in layers 1-5: 4 steps of dense warm-up (the KL from the forward), then sparse (the KL from the
     * backward, read through each layer's KL log, which the host accounts for at every replay: LayerKind.replayed);
     * the phase change drops the graph and captures the step again; and with grad_accum 2 and recompute (the
     * replay store and the kept attention outputs of train.keep_attention_outputs) */
    GPU_CASE("graph", cuda_graph_case, CudaGraphCase, "shakespeare_gpu MSA, 4 warm-up steps, 8 x 256 tokens",
             "configs/shakespeare_gpu.json",
             {"model.attention=msa", "msa.dense_warmup_steps=4", "train.batch_size=8", "optim.warmup_steps=5", NULL}, 20);
    GPU_CASE("graph", cuda_graph_case, CudaGraphCase, "shakespeare_gpu MSA sparse, grad_accum 2, recompute, kept outputs",
             "configs/shakespeare_gpu.json",
             {"model.attention=msa", "msa.dense_warmup_steps=0", "train.batch_size=4", "train.grad_accum=2",
              "train.recompute=true", "train.keep_attention_outputs=true", NULL},
             12);
    /* the weights cast at each GEMM instead of kept as a BF16 copy: dense, and an MoE model (its experts'
     * grouped GEMM reads its own copy of the weights) */
    GPU_CASE("memory", weight_shadow_case, CudaGraphCase, "tiny.json", "configs/tiny.json", {NULL}, 6);
    GPU_CASE("memory", weight_shadow_case, CudaGraphCase, "shakespeare_moe.json, batch 8", "configs/shakespeare_moe.json",
             {"train.batch_size=8", NULL}, 4);
    GPU_CASE0("e2e", e2e_case); /* last: a few training steps of configs/tiny.json on both devices */
}
