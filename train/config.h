/* Run configuration: what a JSON file in configs/ describes. Parsed by config.c with jansson against
 * one table of keys (section, key, type, default, documentation); an unknown section or key, a value
 * of the wrong type or out of range is an error that names it. configs/README.md documents every key
 * (generated from the same table by `build/train --help-config`). */
#ifndef MSA_CONFIG_H
#define MSA_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#define CFG_STR 256
#define CFG_MAX_LAYERS 256

typedef struct ModelConfig {
    int vocab_size;        /* 0 = take it from the training data file */
    int d_model;
    int n_layers;
    int n_heads;           /* H_q */
    int n_kv_heads;        /* H_kv (GQA groups); must divide n_heads */
    int head_dim;          /* 0 = d_model / n_heads */
    int ffn_dim;           /* SwiGLU hidden size */
    float rope_theta;
    /* RoPE scaling for context extension (layers/rope_scaling.h), as Hugging Face transformers'
     * rope_scaling: "none", "linear", "dynamic" (NTK), "yarn", "llama3" */
    char rope_scaling[16];
    float rope_factor;             /* context extension factor s */
    int rope_original_max_position; /* the context the model was trained at (dynamic, yarn, llama3) */
    float rope_low_freq_factor, rope_high_freq_factor; /* llama3's band edges */
    float rope_beta_fast, rope_beta_slow;              /* yarn's ramp, in rotations */
    float rope_mscale, rope_mscale_all_dim;            /* yarn's attention factor terms (0 = unset) */
    float rope_attention_factor;   /* yarn: explicit attention factor (0 = from factor and mscale) */
    bool rope_truncate;            /* yarn: round the ramp's ends to whole dims */
    int rotary_dim;        /* 0 = head_dim (full rotary); else partial, even, <= head_dim */
    bool qk_norm;          /* per-head RMSNorm on q and k (Qwen3 / MiniMax-M3) */
    bool qkv_bias;         /* biases on the q, k and v projections (Qwen2) */
    bool tie_embeddings;   /* LM head shares the token embedding */
    float norm_eps;
    float init_std;        /* std of the normal init of matrices (output projections scaled by 1/sqrt(2L)) */
    float dropout;         /* embedding and residual-branch dropout in training steps (0 = off) */
    /* attention per layer */
    char attention[16];    /* "dense", "msa" (layers/layers.def): the attention of layers chosen by msa_layers */
    char msa_layers[64];   /* layer selector: "all", "none", "3-" (from 3 on), "0,2,5", "1-4" */
    /* feed-forward per layer */
    char ffn[16];          /* "dense", "moe" (layers/layers.def): the FFN of layers chosen by moe_layers */
    char moe_layers[64];   /* layer selector as msa_layers (MiniMax-M3: "3-", first 3 dense) */
} ModelConfig;

typedef struct MoeConfig {
    int num_experts;       /* routed experts E */
    int experts_per_token; /* top-k experts per token */
    int expert_dim;        /* SwiGLU hidden size of each routed expert */
    int shared_experts;    /* SwiGLU experts every token passes through (0..n) */
    int shared_expert_dim; /* hidden size of each shared expert (0 = expert_dim) */
    char score_func[16];   /* router scores: "softmax" or "sigmoid" */
    bool renormalize;      /* renormalise the top-k weights to sum to 1 */
    float routing_scale;   /* multiplies the combine weights */
    float aux_loss_weight; /* load-balancing auxiliary loss weight (0 = off) */
    float bias_update_rate;/* auxiliary-loss-free balancing: per-expert bias step (0 = off); the bias
                              only affects which experts are selected, never the weights */
    float z_loss_weight;   /* router z-loss weight (0 = off) */
} MoeConfig;

typedef struct MsaConfig {
    int block_size;        /* 128 */
    int topk_blocks;       /* 16, forced blocks included */
    int init_blocks;       /* 0 (MiniMax-M3's final recipe; DESIGN §4 supersedes the 1) */
    int local_blocks;      /* 1 */
    int index_heads;       /* 0 = n_kv_heads (must equal it) */
    int index_dim;         /* 128 */
    float kl_weight;       /* lambda: total KL term = kl_weight * sum over MSA layers of mean KL */
    int dense_warmup_steps;/* steps with every visible block selected (dense teacher), then sparse */
    int recall_stride;     /* recall metric samples every n-th query at eval */
    int recall_samples;    /* ... and at most ~this many a forward: the stride grows with N (0: no cap) */
} MsaConfig;

typedef struct OptimConfig {
    float lr;              /* peak learning rate */
    float min_lr;          /* floor of the cosine decay */
    int warmup_steps;      /* linear warm-up from 0 */
    float weight_decay;    /* decoupled, on matrices only (not norms, not embeddings by default) */
    bool decay_embeddings;
    float beta1, beta2, eps;
    float grad_clip;       /* global L2 norm; 0 = off */
    char warmup_trainable[8]; /* "all" or "index": what trains during msa.dense_warmup_steps (stage 1
                                 of indexer fine-tuning: "index" = only the MSA index branch) */
    float backbone_lr_scale;  /* LR multiplier of every non-index parameter after the warm-up
                                 (stage 2); 0 = backbone frozen */
} OptimConfig;

typedef struct TrainConfig {
    int steps;             /* optimizer steps */
    int batch_size;        /* sequences per micro-batch, over all data-parallel ranks */
    int seq_len;           /* tokens per sequence */
    int grad_accum;        /* micro-batches per optimizer step */
    int eval_every;        /* steps between validation passes (0 = only at the end) */
    int eval_batches;      /* micro-batches per validation pass */
    int log_every;         /* steps between progress lines */
    uint64_t seed;
    bool recompute;        /* activation checkpointing per transformer block */
    bool eval_dense_reference; /* MSA models: also evaluate with every MSA layer in dense attention
                                  (same weights) and before the first step */
    char device[8];        /* "cpu" or "cuda" */
    int sample_tokens;     /* tokens of text sampled at the end (char/byte data); 0 = none */
    float sample_temperature;
    char out_dir[CFG_STR]; /* run directory: config.json, metrics.jsonl, checkpoints; "" = none */
    int checkpoint_every;  /* steps between checkpoints (0 = only at the end and on SIGINT/SIGTERM) */
    int keep_checkpoints;  /* newest checkpoints kept in out_dir (0 = all) */
    bool save_best;        /* after each eval with the run's lowest val loss so far, write out_dir/ckpt_best.h5 */
    float diverge_factor;  /* a val loss above this times the run's first one stops the run (0 = no bound) */
    char init_from[CFG_STR]; /* checkpoint whose parameters initialise the model; "" = none */
    bool resume;           /* continue from the newest checkpoint in out_dir */
    char cuda_graph[8];    /* "auto", "on" or "off": the training step captured in a CUDA graph (step_graph.h) */
    int profile_steps;     /* steps profiled per op after the first step of the run (0 = off) */
    int loss_chunk_tokens; /* rows per chunk of the LM head and cross-entropy (op_lm_head_loss); 0 = one chunk */
    int ffn_chunk_tokens;  /* rows per chunk of the dense SwiGLU feed-forward (op_swiglu_ffn); 0 = unchunked */
    bool weight_shadow;        /* CUDA: a BF16 copy of the F32 weights for the GEMMs (else cast at each use) */
    bool offload_block_inputs; /* with recompute: saved block inputs on the host between forward and backward */
    bool keep_attention_outputs; /* with recompute: each block's attention output and lse kept for its replay */
} TrainConfig;

typedef struct DataConfig {
    char train_path[CFG_STR];  /* HDF5 token file (tools/prepare_text) */
    char val_path[CFG_STR];    /* HDF5 token file for validation */
    char train_mix[1024];      /* "path1:w1,path2:w2": several training files sampled by weight; "" = train_path */
    char sample[16];           /* "windows" (anywhere) or "documents" (each window inside one long enough document) */
} DataConfig;

/* Distributed runs (dist/, `mpirun -np N build/train CONFIG`): the world of N ranks is dp * ep * cp. */
typedef struct DistConfig {
    int dp;                /* data-parallel ranks; 0 = N / (ep * cp) */
    int ep;                /* expert-parallel ranks (1 until expert parallelism lands) */
    int cp;                /* context-parallel ranks */
    char cp_mode[16];      /* "auto", "heads" or "sequence": what context parallelism splits (config_cp_sequence) */
    float bucket_mb;       /* MiB of gradients per overlapped bucket; 0 = one per ZeRO region, after the backward */
    float timeout;         /* seconds a collective waits for the other ranks; 0 = forever */
} DistConfig;

/* At least the number of keys in config.c's table (checked there). */
#define CFG_MAX_KEYS 192

typedef struct RunConfig {
    ModelConfig model;
    MsaConfig msa;
    MoeConfig moe;
    OptimConfig optim;
    TrainConfig train;
    DataConfig data;
    DistConfig dist;
    char source[CFG_STR];      /* the file it was read from ("a.json + b.json" for layered files) */
    bool given[CFG_MAX_KEYS];  /* by key (config.c's table order): a file or --set gave it */
} RunConfig;

/* Defaults for every key (the values documented in configs/README.md). */
void config_defaults(RunConfig *c);
/* Read a JSON config over the defaults. On any problem prints "error: <file>: <what>" and exits 1. */
void config_load(RunConfig *c, const char *path);
/* The model keys of a checkpoint's stored config (stored_json, the text checkpoint_read_config gives;
 * checkpoint names the file) for every model key no file or --set gave: a recipe run with train.init_from
 * needs no model section. A given key that contradicts the stored one stops with both values named;
 * only the keys a run started from a checkpoint may change differ: model.attention and model.msa_layers
 * (a dense checkpoint becomes an MSA model), model.rope_theta and model.rope_* (a context extension),
 * model.dropout and model.init_std (the init of parameters the checkpoint lacks); and model.vocab_size = 0
 * ("from the data") takes the stored size. */
void config_take_model(RunConfig *c, const char *stored_json, const char *checkpoint);
/* Apply one "section.key=value" override (command line --set). Exits with a message on error. */
void config_set(RunConfig *c, const char *assignment);
/* Cross-key checks (heads divide, dims even, ...); exits with a message naming the keys. */
void config_validate(const RunConfig *c);
/* Does context parallelism split the sequence (dist.cp_mode = sequence, or auto with a dist.cp that does not
 * divide model.n_kv_heads) rather than the heads? */
bool config_cp_sequence(const RunConfig *c);
/* The config as JSON text (malloc'd), for the run directory and later checkpoints. */
char *config_to_json(const RunConfig *c);
/* Print the documentation of every key (section, key, type, default, meaning) as Markdown. */
void config_print_help(void);
/* The attention variant of layer l: model.attention where model.msa_layers selects l, else "dense". */
const char *config_layer_attention(const RunConfig *c, int layer);
/* The feed-forward variant of layer l: model.ffn where model.moe_layers selects l, else "dense". */
const char *config_layer_ffn(const RunConfig *c, int layer);

#endif
