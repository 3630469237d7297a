/* The decoder-only transformer of DESIGN §3: token embedding; per block RMSNorm -> attention ->
 * residual -> RMSNorm -> feed-forward -> residual; final RMSNorm; LM head (tied or not); fp32
 * cross-entropy. Each block's attention and feed-forward are layers (layers/layer.h) of the variants the
 * config names; the model knows none of them and calls no kernel itself. Parameter names are the
 * checkpoint dataset names. */
#ifndef MSA_MODEL_H
#define MSA_MODEL_H

#include "../autograd/engine.h"
#include "../autograd/params.h"
#include "../data/dataset.h"
#include "../layers/layer.h"
#include "../layers/moe.h"
#include "config.h"

typedef struct Block {
    Tensor *attn_norm, *ffn_norm;
    Layer attention, ffn;
} Block;

typedef struct Model {
    ModelConfig cfg;
    int n_msa_layers;                   /* blocks whose attention has a learned selection (LayerKind) */
    int n_moe_layers;                   /* blocks whose feed-forward is MoE */
    ParamStore params;
    Tensor *wte, *final_norm, *lm_head; /* lm_head == wte when tied */
    Block *layers;
    bool msa_dense;                     /* dense warm-up phase: every visible block selected */
    int64_t loss_chunk_tokens;          /* rows per chunk of the LM head and its loss in model_forward
                                           (train.loss_chunk_tokens; 0 = all rows in one chunk) */
    bool collect_metrics;               /* evaluation: also the statistics that cost extra work (recall) */
    Metrics metrics;                    /* what the layers reported since the caller zeroed it ("kl", "recall";
                                           the statistics a layer leaves on the device arrive with model_collect) */
    /* Context parallelism (dist.cp; NULL or a group of one rank: none). The group's ranks share each
     * micro-batch: every op but attention runs on this rank's 1/cp of its N tokens (model_cp_tokens);
     * heads mode: a contiguous share, and attention on all N tokens for 1/cp of the heads, by all-to-all exchanges
     * around it (autograd/op_cp.c); MSA layers gather the shared index key. The ModelInput stays the
     * whole micro-batch; the logits, the LM loss and the MSA KL and metrics then cover this rank's
     * share only (its tokens; its GQA groups), and the trainer recombines them over the group. The Comm
     * (kernels/comm.h) is the trainer's, made from its Dist group by dist_comm. */
    const Comm *cp;
    /* dist.cp_mode = sequence: the cp ranks split the tokens and keep every head instead. Each holds two
     * chunks of every sequence (model_cp_tokens: the zigzag split), every op runs on its own tokens, and
     * dense attention reads the other ranks' keys by ring attention (autograd/op_cp_sequence.c), MSA the
     * selected blocks of them (autograd/op_cp_blocks.c). The logits, the LM loss and the MSA KL then cover
     * this rank's tokens. */
    bool cp_sequence;
    /* Expert parallelism (dist.ep; NULL: none): the MoE layers' routed experts are split over this group
     * (layers/moe.h), the rest of the model is the same on its ranks. The routed experts' tensors are the
     * store's last ones, params.p[first_expert_param .. params.n) (none without MoE layers). */
    const Comm *ep;
    int first_expert_param;
    /* NULL, or n_layers entries the forward fills: the tape length when block l's forward began. Block l's
     * parameters ("layers.<l>.*") are written by the backward of tape entries [block_tape_start[l],
     * block_tape_start[l + 1]) only, so their gradients are final once the backward has passed
     * block_tape_start[l] (train/grad_buckets.h reduces them then). Set by whoever wants it. */
    int *block_tape_start;
    /* NULL, or called before the forward reads parameters: with layer -1 before the embedding, then with
     * l before block l. The trainer waits there for the all-gather of the updated parameters that block
     * (and everything before it) reads (train/grad_buckets.h), so the gathers of later blocks overlap the
     * forward of earlier ones. */
    void (*before_block)(void *ctx, int layer);
    void *before_block_ctx;
} Model;

/* Device tensors of one micro-batch. */
typedef struct ModelInput {
    Tensor *tokens, *targets, *positions, *cu_seqlens; /* i32 */
    int64_t positions_end; /* 1 + the largest position (the longest document's length): dynamic RoPE scaling
                              reads it (LayerContext); model_upload sets it, 0 = unknown */
    /* dropout (model.dropout > 0): the mask seed of each of the micro-batch's dropout sites, i32
     * [2 * model_dropout_sites] in the backend's memory (model_dropout_seeds writes them; the kernels read
     * them there, so that a step captured in a CUDA graph gets each step's), NULL = no dropout (evaluation;
     * set by the training step), and the batch's first row in the global batch, so that each row's mask
     * does not depend on how the batch is split (kernels/dropout_mask.h) */
    const Tensor *dropout_seeds;
    int64_t row_offset;
    int64_t seq_len;   /* tokens per sequence (row) of the micro-batch; 0: the micro-batch is one sequence */
    Tensor *cp_index;  /* i32: the micro-batch index of each token this rank holds under sequence-split
                          context parallelism (model_forward sets it); NULL otherwise */
} ModelInput;

typedef struct ModelLosses {
    Tensor *total;   /* lm + aux: what backward starts from */
    Tensor *lm;      /* mean token cross-entropy */
    Tensor *aux;     /* the layers' weighted auxiliary losses (MSA KL, MoE balance terms), NULL: none. The
                        terms a backward computes (the MSA KL of the sparse phase, when gradients are
                        recorded) are 0 in its value and in total's: model_collect gives them after the
                        backward. */
} ModelLosses;

/* Declare and initialise the parameters (fp32 master weights, F64 for gradient checks). */
void model_build(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed);
/* The same for one rank of the expert-parallel group ep (NULL or one rank: model_build): this rank's
 * routed experts only, initialised as the single process's rows of them. */
void model_build_ep(Model *m, const RunConfig *cfg, const KernelBackend *be, DType param_dtype, uint64_t seed,
                    const Comm *ep);
void model_free(Model *m);

/* After each optimizer step (update_bias = true) or evaluation (false): every layer's step_end (the MoE
 * selection-bias update from the step's loads, after a step only, on the device) and, if summary is not
 * NULL, the MoE routing balance they report (the worst layer's max/mean expert load, the mean aux and z
 * losses), which copies each MoE layer's statistics to the host: pass a summary only where it is logged.
 * Without one nothing waits for the device. */
void model_moe_step(Model *m, MoeSummary *summary, bool update_bias);

/* What the layers' forwards since the last call (and their backwards) left on the device, read once
 * (a copy per layer that left something): their statistics into into (NULL: dropped), forward by forward in
 * layer order as the forwards made them, and the sum over those forwards of the auxiliary loss terms that
 * only their backwards computed (the MSA KL of the sparse phase), each forward's terms added in layer
 * order in the statistics dtype of e's activations, as the forward adds its own. The step calls it after
 * its last backward and reports loss = lm + aux + this. */
double model_collect(Model *m, const Engine *e, Metrics *into);
/* The same records dropped unread: no copy from the device (a training step whose numbers nobody reads). */
void model_drop_collected(Model *m);

/* A training step captured as a CUDA graph was replayed: each layer's replayed hook (LayerKind) accounts for
 * its forwards micro-batch by micro-batch (forwards of tokens_per_forward tokens), as the captured step's
 * left them. */
void model_replayed(Model *m, int forwards, int64_t tokens_per_forward);

/* Is this parameter part of an MSA index branch? (trained by the KL only) */
bool model_is_index_param(const Tensor *p);
/* Which parameters train: index_only = only the MSA index branches; else all, with the LR of every
 * non-index parameter multiplied by backbone_lr_scale (0 = backbone frozen). */
void model_set_trainable(Model *m, bool index_only, float backbone_lr_scale);

/* The tokens this rank holds of a micro-batch of N tokens in sequences of seq_len (0: one sequence of N)
 * under context parallelism: their indices into the micro-batch, ascending, in index[] (room for N), and
 * their number. All N without context parallelism; heads mode: the contiguous N/cp of rank r, from
 * r*N/cp; sequence mode: of every sequence cut into 2*cp chunks, chunks r and 2*cp-1-r (the zigzag
 * split: a rank's early chunk has few keys to attend to, its late one many, so every rank does the same
 * causal attention work). Stops with a message when the tokens do not split so. */
int64_t model_cp_tokens(const Model *m, int64_t N, int64_t seq_len, int32_t *index);

/* Upload a host batch as device tensors in the engine's arena. The tensors keep pointers to b's arrays
 * (Tensor.host_data: a CUDA kernel reads what it must know of the batch there instead of waiting for a copy
 * back), so b's arrays must stay unchanged while the tensors are in use (the micro-step's forward and
 * backward). */
ModelInput model_upload(Engine *e, const Batch *b);
/* Dropout sites of a forward (the embedding's, and each layer's attention and FFN outputs), and their
 * mask seeds for the micro-batch seed micro_seed as ModelInput.dropout_seeds holds them (words:
 * 2 * model_dropout_sites values). */
int model_dropout_sites(const Model *m);
void model_dropout_seeds(const Model *m, uint64_t micro_seed, int32_t *words);
/* The input of batch b whose tensors already hold its tokens, targets (NULL: none), positions and
 * cu_seqlens (and point their host_data at b's arrays): model_upload's, or fixed buffers the caller filled
 * (a training step captured as a CUDA graph, train/step_graph.h). */
ModelInput model_input_over(const Batch *b, Tensor *tokens, Tensor *targets, Tensor *positions, Tensor *cu_seqlens);
/* Final-norm hidden states -> logits [N, V] (context parallel: this rank's rows of them) */
Tensor *model_logits(Model *m, Engine *e, const ModelInput *in, bool recompute, Tensor **aux_out);
/* Full forward with losses (targets required). */
ModelLosses model_forward(Model *m, Engine *e, const ModelInput *in, bool recompute);

#endif
