/* The layers floor (DESIGN §1, between autograd/ and train/): each attention and feed-forward variant
 * is one module behind one interface, LayerKind, listed once in layers/layers.def. The model
 * (train/model.c) is a stack of blocks, RMSNorm -> attention -> residual -> RMSNorm -> feed-forward ->
 * residual, whose two layers it picks by the config's names (model.attention where model.msa_layers
 * selects the block, model.ffn where model.moe_layers does; "dense" elsewhere) and calls only through
 * this interface: it knows no variant and makes no backend call.
 *
 * A variant provides:
 *   requires      can this backend run it as the config describes? Checked at config validation, before
 *                 anything is allocated (the config's own rules for the variant's keys, and the kernels'
 *                 limits, kernels/cuda/limits.h), so that a bad config stops with the key and the limit
 *                 named instead of at the first launch;
 *   declare       its parameters, "layers.<l>.<...>" in the checkpoint (and declare_late: those that
 *                 must come after every block's and the head's, the MoE routed experts);
 *   forward       output, its weighted auxiliary loss (NULL: none) and its statistics (Metrics);
 *   collect       what its forwards and their backwards left on the device: statistics and the part of the
 *                 auxiliary loss only a backward computes (MSA's sparse phase: the KL), read once per step;
 *   step_end      what it does once per optimizer step or evaluation with what its forwards gathered
 *                 (the MoE selection-bias update) and the statistics it reports then;
 *   replayed      the host's accounts of the forwards of a training step replayed as a CUDA graph;
 *   its own names for the profiler (engine_op_end_named) for work that is no tape op.
 * A new variant is a file here, a line in layers.def and its test. */
#ifndef MSA_LAYER_H
#define MSA_LAYER_H

#include "../autograd/engine.h"
#include "../autograd/params.h"
#include "../kernels/comm.h"
#include "../train/config.h"

typedef enum { LAYER_ATTENTION, LAYER_FFN } LayerRole;

/* ---- statistics ------------------------------------------------------------------------------- */

#define METRICS_MAX 8

/* Statistics the layers report by name ("kl", "recall", ...): the sum, the number of values and the
 * largest value since the last reset (zero the struct). The trainer logs the means; counts are doubles
 * so that sums and counts of every rank add up in one reduction. */
typedef struct Metrics {
    int n;
    const char *name[METRICS_MAX]; /* string literals, in the order they were first added */
    double sum[METRICS_MAX], count[METRICS_MAX], max[METRICS_MAX];
} Metrics;

void metrics_add(Metrics *m, const char *name, double value);
/* The mean / the largest of the values added under name; 0 when there were none. */
double metrics_mean(const Metrics *m, const char *name);
double metrics_max(const Metrics *m, const char *name);

/* One forward's statistics and late loss term, as a variant's collect hands them out. */
#define LAYER_FORWARD_STATS 2
typedef struct LayerForward {
    int n;                                    /* statistics */
    const char *name[LAYER_FORWARD_STATS];    /* string literals */
    double value[LAYER_FORWARD_STATS];
    double late_aux; /* the part of the forward's weighted auxiliary loss that its backward computed (0: none) */
} LayerForward;

/* ---- what a layer keeps across steps ---------------------------------------------------------- */

/* A buffer in a backend's memory that a layer keeps from a checkpointed forward to its replay and across
 * steps (MSA's replay store, the kept attention outputs), grown on demand and never shrunk: on CUDA every
 * free makes the host wait for the device, and the next step needs the same size. */
typedef struct KeptBuffer {
    const KernelBackend *be; /* where buf lives */
    void *buf;
    size_t cap;
} KeptBuffer;

/* n rounded up to 64 bytes: the parts laid one after another in a kept buffer start aligned */
static inline size_t kept_align64(size_t n) { return (n + 63) & ~(size_t)63; }
/* At least need bytes in be's memory (the contents are lost when it grows or moves to another backend). */
void *kept_buffer_reserve(KeptBuffer *b, const KernelBackend *be, size_t need);
void kept_buffer_free(KeptBuffer *b);

/* ---- the interface ---------------------------------------------------------------------------- */

/* What a variant's declare reads: the run's config, the store to declare into, its block. */
typedef struct LayerSetup {
    const RunConfig *cfg;
    ParamStore *params;
    int layer;       /* its block l: parameter names "layers.<l>. ..." */
    const Comm *ep;  /* expert-parallel group (MoE layers); NULL or one rank: none */
} LayerSetup;

/* What a forward reads besides its input. */
typedef struct LayerContext {
    Tensor *positions;  /* i32 [N]: the position of each of this rank's tokens in its document */
    int64_t positions_end; /* 1 + the largest position of the whole micro-batch (every rank's tokens): dynamic
                              RoPE scaling's sequence length; 0 = unknown */
    Tensor *cu_seqlens; /* i32 [ndocs+1]: the documents of the whole micro-batch */
    const Comm *cp;     /* context-parallel group; NULL or one rank: none (autograd/ops.h) */
    Tensor *cp_index;   /* i32 [N]: under sequence-split context parallelism (dist.cp_mode = sequence), the
                           micro-batch index of each of this rank's tokens; NULL: cp splits the heads */
    bool dense;         /* attention with a learned selection reads every visible block instead
                           (MSA's dense warm-up and the dense-attention reference, Model.msa_dense) */
    bool collect;       /* evaluation: also the statistics that cost extra work (MSA recall) */
    Metrics *metrics;   /* where statistics go; NULL: none. Replays (Engine.recomputing) add none */
} LayerContext;

/* A variant; its name (the config's value of model.attention or model.ffn) and its role are its line in
 * layers.def. */
typedef struct LayerKind {
    size_t size;      /* bytes of the variant's state, zeroed before declare */
    /* true when `backend` can run this variant as cfg describes; else false with the reason in why (the
     * config key, its value and the limit it breaks). NULL: no condition. */
    bool (*requires)(Device backend, const RunConfig *cfg, char *why, size_t n);
    void (*declare)(void *self, const LayerSetup *s);
    void (*declare_late)(void *self, const LayerSetup *s); /* NULL: nothing late */
    /* x [N, C] (the block's normed hidden state, this rank's tokens) -> [N, C]; *aux gets the weighted
     * auxiliary loss (a scalar of the statistics dtype) or NULL. Deterministic (it may be replayed by
     * activation recomputation, Engine.recomputing). */
    Tensor *(*forward)(void *self, Engine *e, Tensor *x, const LayerContext *ctx, Tensor **aux);
    /* After each optimizer step (update = true) or evaluation (false): apply what the forwards since the
     * last call gathered, report it into m (NULL: do not report; reporting may copy from the device, so the
     * trainer passes m only on the steps it logs), and start gathering anew. NULL: none. */
    void (*step_end)(void *self, bool update, Metrics *m);
    /* What the forwards since the last call (not replays), and their backwards, left on the device, read
     * in one copy: *out gets one record per forward, in order, valid until the next call; returns their
     * number. The model interleaves every layer's records forward by forward (model_collect), so that the
     * statistics add up in the order the forwards made them. out NULL: drop the records unread (no copy
     * from the device; model_drop_collected). NULL: nothing left on the device. */
    int (*collect)(void *self, const LayerForward **out);
    /* A training step captured in a CUDA graph was replayed (train/step_graph.h): its `forwards` forwards of
     * tokens_per_forward tokens each ran on the device without the host, which keeps their accounts (the MoE
     * counts, the MSA KL log's records): make them as the captured step's forwards left them. NULL: nothing
     * to account. */
    void (*replayed)(void *self, int forwards, int64_t tokens_per_forward);
    void (*free)(void *self); /* NULL: nothing to free beyond the state */
    /* an attention whose blocks a learned index branch selects, trained by a KL term, with a dense
     * warm-up (ctx->dense): the trainer's MSA recipe (msa.dense_warmup_steps, optim.warmup_trainable,
     * train.eval_dense_reference) applies to it */
    bool learned_selection;
} LayerKind;

/* One layer of the model: its variant and that variant's state. */
typedef struct Layer {
    const LayerKind *kind;
    void *self;
} Layer;

/* The variant of `role` named `name`, or NULL when layers.def has none. */
const LayerKind *layer_kind(LayerRole role, const char *name);
/* The variant block l of cfg uses in role. Stops with a message naming the key if there is none. */
const LayerKind *layer_kind_of(const RunConfig *c, LayerRole role, int layer);
/* "|dense|msa" and "|dense|moe": the names layers.def lists for each role, for the config's choices
 * (after the leading '|'). */
extern const char layer_attention_names[], layer_ffn_names[];

/* Make block l's layer of `role` from the config and declare its parameters. */
void layer_make(Layer *L, LayerRole role, const LayerSetup *s);
void layer_free(Layer *L);

/* Ask every variant cfg uses whether the backend train.device names can run it; stop with
 * "src: <the reason>" at the first that cannot. Part of config validation. */
void layers_require(const RunConfig *c, const char *src);

#endif
