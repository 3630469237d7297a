/* Run configuration: one static table of keys drives the defaults, the JSON reader, `--set`, the
 * range checks, the JSON writer and the documentation, so the five can never disagree. */
#include "config.h"

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../kernels/cuda/limits.h"

#include <jansson.h>

#include "../kernels/util.h"
#include "../layers/layer.h"
#include "../layers/moe.h"
#include "../layers/rope_scaling.h"

typedef enum KeyType { K_INT, K_FLOAT, K_BOOL, K_STRING, K_U64 } KeyType;

/* What a string key may hold beyond its length limit. */
typedef enum StrCheck { S_ANY, S_CHOICES, S_SELECTOR } StrCheck;

typedef struct KeyDef {
    const char *section, *key;
    KeyType type;
    size_t offset;         /* into RunConfig */
    size_t size;           /* bytes of the field (the buffer size for strings) */
    double def;            /* default of numeric and bool keys */
    const char *def_str;   /* default of string keys */
    double lo, hi;         /* allowed range of numeric keys, inclusive ... */
    bool lo_open;          /* ... except lo itself when set ("must be > lo") */
    StrCheck check;
    const char *choices;   /* "a|b|c" for S_CHOICES */
    const char *doc;
} KeyDef;

/* The key's type comes from the field's C type, so the table cannot disagree with config.h. */
#define FIELD(sec, f) (((RunConfig *)0)->sec.f)
#define TYPE_OF(sec, f)                                                                                     \
    _Generic(FIELD(sec, f), int: K_INT, float: K_FLOAT, bool: K_BOOL, uint64_t: K_U64, char *: K_STRING)
#define BASE(sec, f) #sec, #f, TYPE_OF(sec, f), offsetof(RunConfig, sec.f), sizeof(FIELD(sec, f))

#define NUM(sec, f, d, l, h, doc) {BASE(sec, f), (d), NULL, (l), (h), false, S_ANY, NULL, doc}
/* numeric key that must be strictly greater than l */
#define POS(sec, f, d, l, h, doc) {BASE(sec, f), (d), NULL, (l), (h), true, S_ANY, NULL, doc}
#define BOOL(sec, f, d, doc) {BASE(sec, f), (d), NULL, 0, 1, false, S_ANY, NULL, doc}
#define STR(sec, f, d, doc) {BASE(sec, f), 0, (d), 0, 0, false, S_ANY, NULL, doc}
#define CHOICE(sec, f, d, ch, doc) {BASE(sec, f), 0, (d), 0, 0, false, S_CHOICES, ch, doc}
#define SELECT(sec, f, d, doc) {BASE(sec, f), 0, (d), 0, 0, false, S_SELECTOR, NULL, doc}

#define IMAX ((double)INT_MAX)
#define FMAX ((double)FLT_MAX)
#define U64MAX 18446744073709551615.0

static const char *const SECTIONS[] = {"model", "msa", "moe", "optim", "train", "data", "dist"};
#define N_SECTIONS ((int)(sizeof SECTIONS / sizeof SECTIONS[0]))

static const KeyDef KEYS[] = {
    NUM(model, vocab_size, 0, 0, IMAX, "vocabulary size; 0 = take it from the training data file"),
    NUM(model, d_model, 128, 1, 1 << 16, "hidden size"),
    NUM(model, n_layers, 4, 1, CFG_MAX_LAYERS, "transformer blocks"),
    NUM(model, n_heads, 4, 1, 4096, "query heads H_q"),
    NUM(model, n_kv_heads, 2, 1, 4096, "key/value heads H_kv (GQA groups); must divide n_heads"),
    NUM(model, head_dim, 0, 0, 4096, "per-head dimension; 0 = d_model / n_heads; must be even"),
    NUM(model, ffn_dim, 384, 1, 1 << 20, "SwiGLU hidden size of the dense FFN"),
    POS(model, rope_theta, 10000, 0, FMAX, "RoPE base frequency"),
    CHOICE(model, rope_scaling, "none", "none|linear|dynamic|yarn|llama3", "RoPE scaling for a longer context, as Hugging Face transformers' rope_scaling rope_type: linear (positions / rope_factor), dynamic (NTK: rope_theta grown with each forward's longest sequence past rope_original_max_position), yarn (per-frequency interpolation, cos and sin times the attention factor), llama3 (Llama 3.1's frequency bands)"),
    NUM(model, rope_factor, 1, 1, FMAX, "RoPE scaling factor (transformers' factor): the context extension"),
    NUM(model, rope_original_max_position, 0, 0, IMAX, "context the model was trained at (transformers' original_max_position_embeddings; for dynamic its max_position_embeddings); needed by dynamic, yarn, llama3"),
    POS(model, rope_low_freq_factor, 1, 0, FMAX, "llama3: wavelengths above rope_original_max_position / this are divided by rope_factor"),
    POS(model, rope_high_freq_factor, 4, 0, FMAX, "llama3: wavelengths below rope_original_max_position / this are kept; > rope_low_freq_factor"),
    POS(model, rope_beta_fast, 32, 0, FMAX, "yarn: frequencies with more rotations than this over rope_original_max_position are kept"),
    POS(model, rope_beta_slow, 1, 0, FMAX, "yarn: frequencies with fewer rotations than this are divided by rope_factor"),
    NUM(model, rope_mscale, 0, 0, FMAX, "yarn: transformers' mscale; with rope_mscale_all_dim the attention factor is (0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1); 0 = unset"),
    NUM(model, rope_mscale_all_dim, 0, 0, FMAX, "yarn: transformers' mscale_all_dim (see rope_mscale); 0 = unset"),
    NUM(model, rope_attention_factor, 0, 0, FMAX, "yarn: cos and sin are multiplied by this; 0 = 0.1 ln(rope_factor) + 1 (or the mscale ratio)"),
    BOOL(model, rope_truncate, 1, "yarn: round the ends of the interpolation ramp to whole dimensions (transformers' truncate)"),
    NUM(model, rotary_dim, 0, 0, 4096, "rotary dims per head; 0 = head_dim (full); else even and <= head_dim"),
    BOOL(model, qk_norm, 0, "per-head RMSNorm on q and k (Qwen3 / MiniMax-M3)"),
    BOOL(model, qkv_bias, 0, "biases on the q, k and v projections (Qwen2; tools/hf_import.py sets it)"),
    BOOL(model, tie_embeddings, 1, "the LM head shares the token embedding"),
    POS(model, norm_eps, 1e-5, 0, 1, "RMSNorm epsilon"),
    NUM(model, init_std, 0.02, 0, 10, "std of the normal init of matrices (output projections / sqrt(2 n_layers))"),
    NUM(model, dropout, 0, 0, 0.9, "dropout on the embedding output and on each attention and FFN output before its residual add, training steps only (nanoGPT's resid/embd dropout)"),
    /* the choices: the variants layers/layers.def lists (after the names' leading '|') */
    CHOICE(model, attention, "dense", layer_attention_names + 1, "attention of the layers msa_layers selects (the others are dense)"),
    SELECT(model, msa_layers, "all", "layers with MSA when attention = msa: all, none, 3- (3 on), 1-4, 0,2,5, 0,3-5"),
    CHOICE(model, ffn, "dense", layer_ffn_names + 1, "feed-forward of the layers moe_layers selects (the others are dense)"),
    SELECT(model, moe_layers, "all", "layers with MoE when ffn = moe (selector as msa_layers; MiniMax-M3: 3-)"),

    NUM(msa, block_size, 128, 1, 1 << 20, "tokens per KV block B"),
    NUM(msa, topk_blocks, 16, 1, 1 << 20, "blocks each query reads k, forced (init + local) blocks included"),
    NUM(msa, init_blocks, 0, 0, 1 << 20, "leading sink blocks always selected (MiniMax-M3 final recipe: 0)"),
    NUM(msa, local_blocks, 1, 1, 1 << 20, "most recent blocks always selected (the query's own block first)"),
    NUM(msa, index_heads, 0, 0, 4096, "index query heads; 0 = n_kv_heads (must equal it)"),
    NUM(msa, index_dim, 128, 2, 4096, "index query/key dimension d_idx; even (RoPE)"),
    NUM(msa, kl_weight, 1.0, 0, FMAX, "lambda: KL term = kl_weight * sum over MSA layers of the mean KL"),
    NUM(msa, dense_warmup_steps, 0, 0, IMAX, "first steps with every visible block selected (dense teacher)"),
    NUM(msa, recall_stride, 8, 1, IMAX, "the recall metric samples every n-th query at eval"),
    NUM(msa, recall_samples, 2048, 0, IMAX, "at most ~this many recall samples a forward (the stride grows); 0 = no cap"),

    NUM(moe, num_experts, 8, 1, 1 << 16, "routed experts E"),
    NUM(moe, experts_per_token, 2, 1, 1 << 16, "experts per token (top-k); <= num_experts"),
    NUM(moe, expert_dim, 128, 1, 1 << 20, "SwiGLU hidden size of each routed expert"),
    NUM(moe, shared_experts, 0, 0, MOE_MAX_SHARED, "shared SwiGLU experts every token passes through"),
    NUM(moe, shared_expert_dim, 0, 0, 1 << 20, "hidden size of each shared expert; 0 = expert_dim"),
    CHOICE(moe, score_func, "softmax", "softmax|sigmoid", "router score function"),
    BOOL(moe, renormalize, 1, "renormalise the top-k routing weights to sum to 1"),
    POS(moe, routing_scale, 1.0, 0, FMAX, "multiplies the combine weights"),
    NUM(moe, aux_loss_weight, 0.01, 0, FMAX, "load-balancing auxiliary loss weight; 0 = off"),
    NUM(moe, bias_update_rate, 0, 0, FMAX, "aux-loss-free balancing: per-expert selection bias step; 0 = off"),
    NUM(moe, z_loss_weight, 0, 0, FMAX, "router z-loss weight; 0 = off"),

    NUM(optim, lr, 1e-3, 0, FMAX, "peak learning rate"),
    NUM(optim, min_lr, 1e-4, 0, FMAX, "floor of the cosine decay; <= lr"),
    NUM(optim, warmup_steps, 100, 0, IMAX, "linear warm-up steps from 0"),
    NUM(optim, weight_decay, 0.1, 0, FMAX, "decoupled weight decay on matrices (not norms)"),
    BOOL(optim, decay_embeddings, 0, "apply weight decay to the token embedding too"),
    NUM(optim, beta1, 0.9, 0, 0.999999, "AdamW first-moment decay"),
    NUM(optim, beta2, 0.95, 0, 0.999999, "AdamW second-moment decay"),
    POS(optim, eps, 1e-8, 0, 1, "AdamW epsilon"),
    NUM(optim, grad_clip, 1.0, 0, FMAX, "clip the global gradient L2 norm to this; 0 = off"),
    CHOICE(optim, warmup_trainable, "all", "all|index", "what trains during msa.dense_warmup_steps: all, or only the MSA index branch (indexer fine-tuning stage 1)"),
    NUM(optim, backbone_lr_scale, 1.0, 0, FMAX, "LR multiplier of every non-index parameter after the dense warm-up; 0 = backbone frozen"),

    NUM(train, steps, 1000, 1, IMAX, "optimizer steps"),
    NUM(train, batch_size, 16, 1, IMAX, "sequences per micro-batch, over all data-parallel ranks (each takes batch_size / (dist.dp * dist.ep) of them)"),
    NUM(train, seq_len, 128, 1, IMAX, "tokens per sequence"),
    NUM(train, grad_accum, 1, 1, IMAX, "micro-batches per optimizer step"),
    NUM(train, eval_every, 100, 0, IMAX, "steps between validation passes; 0 = only at the end"),
    NUM(train, eval_batches, 8, 1, IMAX, "micro-batches per validation pass"),
    NUM(train, log_every, 10, 1, IMAX, "steps between progress lines"),
    NUM(train, seed, 1337, 0, U64MAX, "seed of the initialisation and the data sampler"),
    BOOL(train, recompute, 0, "activation checkpointing per transformer block"),
    BOOL(train, eval_dense_reference, 0, "MSA models: at each eval (and before step 1) also report the LM loss with every MSA layer in dense attention"),
    CHOICE(train, device, "cpu", "cpu|cuda", "backend"),
    NUM(train, sample_tokens, 0, 0, IMAX, "tokens of text sampled after training (char/byte data); 0 = none"),
    POS(train, sample_temperature, 1.0, 0, FMAX, "sampling temperature"),
    STR(train, out_dir, "", "run directory (config.json, metrics.jsonl, checkpoints ckpt_STEP.h5); \"\" = none"),
    NUM(train, checkpoint_every, 0, 0, IMAX, "steps between checkpoints in out_dir; 0 = only at the end and on SIGINT/SIGTERM"),
    NUM(train, keep_checkpoints, 3, 0, IMAX, "newest checkpoints kept in out_dir (older ones are deleted); 0 = all"),
    BOOL(train, save_best, 0, "after every evaluation whose validation loss is the lowest of the run so far (across --resume), write a full checkpoint to out_dir/ckpt_best.h5 (never pruned, never resumed from; start a run from it with init_from); needs out_dir"),
    NUM(train, diverge_factor, 100, 0, FMAX, "stop the run as diverged (exit 1, no checkpoint of the diverged weights) when a validation loss is above diverge_factor times the run's first one (kept across --resume); 0 = no bound; >= 1 otherwise. A loss that is not finite always stops it"),
    STR(train, init_from, "", "checkpoint whose parameters initialise the model (MSA index parameters it lacks start fresh); \"\" = none"),
    BOOL(train, resume, 0, "continue bit-for-bit from the newest checkpoint in out_dir (as --resume)"),
    NUM(train, loss_chunk_tokens, 4096, 0, IMAX, "tokens per chunk of the LM head and its cross-entropy (their logits and the logits' gradient exist for one chunk at a time: chunk x vocabulary values); 0 = all tokens of a micro-batch in one chunk"),
    NUM(train, ffn_chunk_tokens, 0, 0, IMAX, "tokens per chunk of the dense SwiGLU feed-forward (autograd/op_swiglu_ffn.c): its gate, up and product, and their gradients, exist for one chunk at a time, recomputed in the backward (two GEMMs more per layer); for long contexts with train.recompute, where they are most of a block's working set; 0 = unchunked"),
    BOOL(train, weight_shadow, 1, "CUDA: keep a BF16 copy of every F32 weight on the device (2 bytes a parameter, written by AdamW), which the GEMMs read; false: no copy, each GEMM casts the weight it reads into scratch at every use, as FSDP's per-layer mixed precision does (2 bytes a parameter less, a cast per use: the same BF16 values, the same results bit for bit)"),
    BOOL(train, keep_attention_outputs, 0, "with recompute: each block's checkpointed forward also keeps its attention's output and log-sum-exp (tokens x n_heads x head_dim activations and n_heads statistics per token and layer, 4.1 KB per token and layer at d_model 2048 in BF16), and the block's replay in the backward takes them instead of running the attention forward again (dense and MSA layers; not the ring attention of dist.cp_mode = sequence): the same results bit for bit, one attention forward per layer and step fewer"),
    BOOL(train, offload_block_inputs, 0, "with recompute: keep the saved block inputs in page-locked host memory between the forward and the backward (two on the device instead of one per block; ~2 x tokens x d_model x 2 bytes per block and step over PCIe on a GPU, copied on a copy stream while the blocks compute)"),
    CHOICE(train, cuda_graph, "auto", "auto|on|off", "CUDA: capture a whole training step (forward, backward, optimizer) in a CUDA graph after its first eager steps and replay it, one launch per step and the same bits as the eager step (train/step_graph.h); auto: when the run allows it (dense or MSA attention, MoE layers only on the grouped expert GEMMs: model.d_model and moe.expert_dim multiples of 8, one rank, windows sampling, no offloaded block inputs), else one log line says why not; on: as auto, but a run that does not allow it is an error; off: every step eager"),
    NUM(train, profile_steps, 0, 0, IMAX, "time every op's forward and backward (self time, device synchronised around each) over this many steps after the first, then print a table of where a step's time goes (and write it to out_dir/profile.md); the losses are unchanged; 0 = off"),

    STR(data, train_path, "", "HDF5 token file for training (build/prepare_text)"),
    STR(data, val_path, "", "HDF5 token file for validation"),
    STR(data, train_mix, "", "several training files, each window from one picked by weight: \"a.h5:0.7,b.h5:0.3\"; \"\" = train_path alone"),
    CHOICE(data, sample, "windows", "windows|documents", "windows: training windows start anywhere (documents inside one are separated by cu_seqlens) and validation windows are the file cut every seq_len tokens; documents: each training window lies inside one document of at least seq_len + 1 tokens (drawn uniformly, the window uniformly inside it) and validation window w is the first seq_len + 1 tokens of the w-th such document, so a long-context run trains and evaluates on whole long documents (build/prepare_text --min-doc-tokens writes such files)"),

    NUM(dist, dp, 0, 0, 1 << 20, "data-parallel ranks (ZeRO-1: optimizer state sharded over them); 0 = every rank that ep and cp leave; dp * ep * cp = ranks of mpirun -np"),
    NUM(dist, ep, 1, 1, 1 << 20, "expert-parallel ranks: each holds num_experts / ep of the routed experts (must divide moe.num_experts) and takes its own sequences; tokens reach their experts by all-to-all"),
    NUM(dist, cp, 1, 1, 1 << 20, "context-parallel ranks: each micro-batch's tokens split over them (cp_mode says how attention reads the others' tokens)"),
    CHOICE(dist, cp_mode, "auto", "auto|heads|sequence", "heads: attention head-parallel by all-to-all (cp must divide n_kv_heads); sequence: each rank keeps two zigzag chunks of every sequence and every head, dense attention by ring, MSA and window layers with every index key gathered and the selected K/V blocks fetched (seq_len a multiple of 2 cp; no dropout); auto: heads when cp divides n_kv_heads, else sequence"),
    NUM(dist, bucket_mb, 25, 0, FMAX, "MiB of gradients per bucket: each bucket is reduce-scattered as soon as the backward has finished it, overlapping the backward of the earlier layers, and its updated parameters all-gathered during the next forward, each before the first block that reads it; 0 = one reduce-scatter and one all-gather per ZeRO region after the backward"),
    NUM(dist, timeout, 1800, 0, FMAX, "seconds a collective waits for the other ranks before the job ends with a message (a rank failed or hangs); 0 = forever"),
};
#define N_KEYS ((int)(sizeof KEYS / sizeof KEYS[0]))
_Static_assert(sizeof KEYS / sizeof KEYS[0] <= CFG_MAX_KEYS, "raise CFG_MAX_KEYS (config.h) to the number of keys");

/* ---- helpers ---------------------------------------------------------------------------------- */

static void *field(RunConfig *c, const KeyDef *k) { return (char *)c + k->offset; }
static const void *cfield(const RunConfig *c, const KeyDef *k) { return (const char *)c + k->offset; }

static const char *type_name(KeyType t) {
    switch (t) {
    case K_INT: return "int";
    case K_FLOAT: return "float";
    case K_BOOL: return "bool";
    case K_STRING: return "string";
    case K_U64: return "uint64";
    }
    return "?";
}

static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64) return 1000; /* keys are short; a long name is no near miss */
    int row[65];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int sub = diag + (a[i - 1] != b[j - 1]);
            int best = up + 1 < row[j - 1] + 1 ? up + 1 : row[j - 1] + 1;
            row[j] = sub < best ? sub : best;
            diag = up;
        }
    }
    return (int)row[lb];
}

static bool is_section(const char *s) {
    for (int i = 0; i < N_SECTIONS; i++)
        if (!strcmp(SECTIONS[i], s)) return true;
    return false;
}

static const KeyDef *find_key(const char *section, const char *key) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].section, section) && !strcmp(KEYS[i].key, key)) return &KEYS[i];
    return NULL;
}

static noreturn void unknown_section(const char *where, const char *section) {
    int best = 0, bd = INT_MAX;
    for (int i = 0; i < N_SECTIONS; i++) {
        int d = edit_distance(section, SECTIONS[i]);
        if (d < bd) bd = d, best = i;
    }
    fatal("%s: unknown section \"%s\" (did you mean \"%s\"? sections: model, msa, moe, optim, train, data, dist)", where,
          section, SECTIONS[best]);
}

/* The suggestion prefers the same section (a typo) but finds a key put in the wrong section too. */
static noreturn void unknown_key(const char *where, const char *section, const char *key) {
    const KeyDef *best = NULL;
    int bd = INT_MAX;
    for (int i = 0; i < N_KEYS; i++) {
        int d = edit_distance(key, KEYS[i].key) + (strcmp(KEYS[i].section, section) ? 2 : 0);
        if (d < bd) bd = d, best = &KEYS[i];
    }
    fatal("%s: unknown key \"%s.%s\" (did you mean \"%s.%s\"? build/train --help-config lists every key)", where,
          section, key, best->section, best->key);
}

static const KeyDef *lookup(const char *where, const char *section, const char *key) {
    if (!is_section(section)) unknown_section(where, section);
    const KeyDef *k = find_key(section, key);
    if (!k) unknown_key(where, section, key);
    return k;
}

/* Shortest decimal that reads back as the same float, so JSON and help show 0.001, not 0.0010000000475. */
static void format_float(char *buf, size_t n, float v) {
    for (int p = 6; p <= 9; p++) {
        snprintf(buf, n, "%.*g", p, (double)v);
        if (strtof(buf, NULL) == v) return;
    }
}

static void format_range(char *buf, size_t n, const KeyDef *k) {
    char lo[32], hi[32];
    if (k->type == K_FLOAT) {
        format_float(lo, sizeof lo, (float)k->lo);
        format_float(hi, sizeof hi, (float)k->hi);
    } else {
        snprintf(lo, sizeof lo, "%.0f", k->lo);
        snprintf(hi, sizeof hi, "%.0f", k->hi);
    }
    bool no_hi = (k->type == K_FLOAT && k->hi >= FMAX) || (k->type == K_INT && k->hi >= IMAX) ||
                 (k->type == K_U64 && k->hi >= U64MAX);
    /* a float key without a bound of its own is still a float: 1e300 is out of range for that reason */
    if (no_hi && k->type == K_FLOAT) snprintf(buf, n, "%s %s and at most %g, the float range", k->lo_open ? ">" : ">=", lo, (double)FLT_MAX);
    else if (no_hi) snprintf(buf, n, "%s %s", k->lo_open ? ">" : ">=", lo);
    else snprintf(buf, n, "%s%s, %s]", k->lo_open ? "(" : "[", lo, hi);
}

static bool in_range(const KeyDef *k, double v) {
    return (k->lo_open ? v > k->lo : v >= k->lo) && v <= k->hi;
}

static noreturn void out_of_range(const char *where, const KeyDef *k, const char *value) {
    char r[96];
    format_range(r, sizeof r, k);
    fatal("%s: %s.%s = %s is out of range (must be %s%s)", where, k->section, k->key, value,
          r[0] == '>' ? "" : "in ", r);
}

/* "a|b" -> "a, b" for messages */
static void choice_list(char *buf, size_t n, const char *choices) {
    size_t j = 0;
    for (const char *p = choices; *p && j + 3 < n; p++) {
        if (*p == '|') {
            buf[j++] = ',';
            buf[j++] = ' ';
        } else buf[j++] = *p;
    }
    buf[j] = 0;
}

static bool choice_ok(const char *choices, const char *v) {
    size_t n = strlen(v);
    for (const char *p = choices; *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && !strncmp(p, v, n)) return true;
        if (!bar) break;
        p = bar + 1;
    }
    return false;
}

/* ---- layer selectors -------------------------------------------------------------------------- */

/* Parses "all" | "none" | items separated by commas, each "N", "N-" (N and every later layer) or
 * "N-M" (inclusive). With n_layers > 0 it marks sel[0..n_layers) and rejects layers past the end. */
static bool parse_selector(const char *s, int n_layers, bool *sel, char *err, size_t errn) {
    if (sel)
        for (int l = 0; l < n_layers; l++) sel[l] = false;
    if (!strcmp(s, "all")) {
        if (sel)
            for (int l = 0; l < n_layers; l++) sel[l] = true;
        return true;
    }
    if (!strcmp(s, "none")) return true;
    if (!*s) {
        snprintf(err, errn, "is empty (use \"none\" for no layer)");
        return false;
    }
    const char *p = s;
    for (;;) {
        while (*p == ' ') p++;
        if (*p < '0' || *p > '9') {
            snprintf(err, errn, "\"%s\" is not a layer selector (all, none, 3-, 1-4, 0,2,5, 0,3-5)", s);
            return false;
        }
        char *end;
        long a = strtol(p, &end, 10), b = a;
        bool open = false;
        p = end;
        if (*p == '-') {
            p++;
            if (*p >= '0' && *p <= '9') {
                b = strtol(p, &end, 10);
                p = end;
            } else open = true;
        }
        while (*p == ' ') p++;
        if ((*p != ',' && *p) || a > CFG_MAX_LAYERS || b > CFG_MAX_LAYERS) {
            snprintf(err, errn, "\"%s\" is not a layer selector (all, none, 3-, 1-4, 0,2,5, 0,3-5)", s);
            return false;
        }
        if (b < a) {
            snprintf(err, errn, "\"%s\": range %ld-%ld is reversed", s, a, b);
            return false;
        }
        if (n_layers > 0 && (a >= n_layers || (!open && b >= n_layers))) {
            snprintf(err, errn, "\"%s\": layer %ld does not exist (model.n_layers = %d, layers 0-%d)", s,
                     !open && b >= n_layers ? b : a, n_layers, n_layers - 1);
            return false;
        }
        if (sel) {
            long hi = open ? n_layers - 1 : b;
            for (long l = a; l <= hi && l < n_layers; l++) sel[l] = true;
        }
        if (!*p) return true;
        p++; /* past the comma */
    }
}

static bool layer_selected(const char *selector, int n_layers, int layer) {
    bool sel[CFG_MAX_LAYERS];
    char err[256];
    if (layer < 0 || layer >= n_layers || n_layers > CFG_MAX_LAYERS) return false;
    if (!parse_selector(selector, n_layers, sel, err, sizeof err)) fatal("layer selector %s", err);
    return sel[layer];
}

const char *config_layer_attention(const RunConfig *c, int layer) {
    return layer_selected(c->model.msa_layers, c->model.n_layers, layer) ? c->model.attention : "dense";
}

const char *config_layer_ffn(const RunConfig *c, int layer) {
    return layer_selected(c->model.moe_layers, c->model.n_layers, layer) ? c->model.ffn : "dense";
}

/* ---- setting one key (every path checks the same way) ----------------------------------------- */

static void set_int(RunConfig *c, const KeyDef *k, long long v, const char *where) {
    char s[32];
    snprintf(s, sizeof s, "%lld", v);
    if (!in_range(k, (double)v)) out_of_range(where, k, s);
    *(int *)field(c, k) = (int)v;
}

static void set_u64(RunConfig *c, const KeyDef *k, uint64_t v) { *(uint64_t *)field(c, k) = v; }

static void set_float(RunConfig *c, const KeyDef *k, double v, const char *where) {
    char s[40];
    snprintf(s, sizeof s, "%g", v);
    if (!isfinite(v) || !in_range(k, v)) out_of_range(where, k, s);
    *(float *)field(c, k) = (float)v;
}

/* The run's config.json and checkpoints store every value as JSON text, which is UTF-8: a value that is
 * not would be dropped from them (jansson's check, the one config_to_json meets). */
static bool is_utf8(const char *v) {
    json_t *s = json_string(v);
    json_decref(s);
    return s != NULL;
}

static noreturn void not_utf8(const char *where, const KeyDef *k) {
    fatal("%s: %s.%s is not UTF-8 text (the run's config.json and checkpoints store it as JSON, which is)", where,
          k->section, k->key);
}

static void set_string(RunConfig *c, const KeyDef *k, const char *v, const char *where) {
    size_t n = strlen(v);
    if (n >= k->size)
        fatal("%s: %s.%s is too long (%zu characters, at most %zu)", where, k->section, k->key, n, k->size - 1);
    if (!is_utf8(v)) not_utf8(where, k);
    if (k->check == S_CHOICES && !choice_ok(k->choices, v)) {
        char list[64];
        choice_list(list, sizeof list, k->choices);
        fatal("%s: %s.%s = \"%s\" is not one of: %s", where, k->section, k->key, v, list);
    }
    if (k->check == S_SELECTOR) {
        char err[256];
        if (!parse_selector(v, 0, NULL, err, sizeof err)) fatal("%s: %s.%s %s", where, k->section, k->key, err);
    }
    char *dst = field(c, k);
    memset(dst, 0, k->size); /* zero the tail so configs compare and serialise the same */
    memcpy(dst, v, n);
}

/* Decimal, or hexadecimal after 0x; never octal (a seed of 010 is ten, not eight). */
static bool parse_u64(const char *s, uint64_t *out) {
    bool hex = s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
    const char *digits = hex ? s + 2 : s;
    if (!*digits || strchr(s, '-') || strchr(s, '+') || strchr(s, ' ')) return false;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(digits, &end, hex ? 16 : 10);
    if (*end || errno) return false;
    *out = x;
    return true;
}

/* ---- public ----------------------------------------------------------------------------------- */

void config_defaults(RunConfig *c) {
    memset(c, 0, sizeof(*c));
    for (int i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &KEYS[i];
        switch (k->type) {
        case K_INT: *(int *)field(c, k) = (int)k->def; break;
        case K_FLOAT: *(float *)field(c, k) = (float)k->def; break;
        case K_BOOL: *(bool *)field(c, k) = k->def != 0; break;
        case K_U64: *(uint64_t *)field(c, k) = (uint64_t)k->def; break;
        case K_STRING: snprintf(field(c, k), k->size, "%s", k->def_str); break;
        }
    }
}

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number with a fraction";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

static noreturn void wrong_type(const char *where, const KeyDef *k, const char *got) {
    static const char *const want[] = {"an integer", "a number", "true or false", "a string",
                                       "a non-negative integer"};
    fatal("%s: %s.%s must be %s (%s), got %s", where, k->section, k->key, want[k->type], type_name(k->type), got);
}

static void set_from_json(RunConfig *c, const KeyDef *k, const json_t *v, const char *where) {
    c->given[k - KEYS] = true;
    switch (k->type) {
    case K_INT:
        if (json_is_integer(v)) set_int(c, k, json_integer_value(v), where);
        /* 1e5 parses as a real; accept reals with no fraction as integers */
        else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
                 fabs(json_real_value(v)) < 1e15)
            set_int(c, k, (long long)json_real_value(v), where);
        else wrong_type(where, k, json_type_name(v));
        break;
    case K_FLOAT:
        if (!json_is_number(v)) wrong_type(where, k, json_type_name(v));
        set_float(c, k, json_number_value(v), where);
        break;
    case K_BOOL:
        if (!json_is_boolean(v)) wrong_type(where, k, json_type_name(v));
        *(bool *)field(c, k) = json_is_true(v);
        break;
    case K_STRING:
        if (!json_is_string(v)) wrong_type(where, k, json_type_name(v));
        if (strlen(json_string_value(v)) != json_string_length(v))
            fatal("%s: %s.%s contains a NUL character", where, k->section, k->key);
        set_string(c, k, json_string_value(v), where);
        break;
    case K_U64:
        /* JSON integers stop at 2^63 - 1 in jansson; larger seeds are written as decimal strings */
        if (json_is_integer(v)) {
            json_int_t x = json_integer_value(v);
            if (x < 0) {
                char s[32];
                snprintf(s, sizeof s, "%lld", (long long)x);
                out_of_range(where, k, s);
            }
            set_u64(c, k, (uint64_t)x);
        } else if (json_is_string(v)) {
            uint64_t x;
            if (!parse_u64(json_string_value(v), &x)) wrong_type(where, k, "a string that is not one");
            set_u64(c, k, x);
        } else wrong_type(where, k, json_type_name(v));
        break;
    }
}

/* Every key of the JSON object root over c (path names it in messages). */
static void load_root(RunConfig *c, json_t *root, const char *path) {
    if (!json_is_object(root)) fatal("%s: the top level must be a JSON object of sections, got %s", path,
                                     json_type_name(root));
    const char *section;
    json_t *obj;
    json_object_foreach(root, section, obj) {
        if (!is_section(section)) unknown_section(path, section);
        if (!json_is_object(obj))
            fatal("%s: section \"%s\" must be an object of keys, got %s", path, section, json_type_name(obj));
        const char *key;
        json_t *v;
        json_object_foreach(obj, key, v) set_from_json(c, lookup(path, section, key), v, path);
    }
}

void config_load(RunConfig *c, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) fatal("%s: cannot read the config file (%s)", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) fatal("%s: is a directory, not a config file", path);
    FILE *f = fopen(path, "rb");
    if (!f) fatal("%s: cannot read the config file (%s)", path, strerror(errno));
    json_error_t je;
    json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &je);
    fclose(f);
    if (!root) fatal("%s: line %d, column %d: %s", path, je.line, je.column, je.text);
    load_root(c, root, path);
    json_decref(root);
    snprintf(c->source, sizeof c->source, "%s", path);
}

static json_t *key_to_json(const RunConfig *c, const KeyDef *k);

/* The model keys a run started from a checkpoint may set otherwise than the checkpoint's config (config.h) */
static bool may_differ_from_checkpoint(const KeyDef *k) {
    static const char *const keys[] = {"attention", "msa_layers", "dropout", "init_std", "rope_theta"};
    if (!strncmp(k->key, "rope_", 5)) return true;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (!strcmp(k->key, keys[i])) return true;
    return false;
}

void config_take_model(RunConfig *c, const char *stored_json, const char *checkpoint) {
    char where[CFG_STR + 64];
    snprintf(where, sizeof where, "%s (the config stored in train.init_from)", checkpoint);
    json_error_t je;
    json_t *root = json_loads(stored_json, JSON_REJECT_DUPLICATES, &je);
    if (!root) fatal("%s: line %d, column %d: %s", where, je.line, je.column, je.text);
    RunConfig stored;
    config_defaults(&stored);
    load_root(&stored, root, where);
    json_decref(root);
    const char *src = c->source[0] ? c->source : "config";
    for (int i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &KEYS[i];
        if (strcmp(k->section, "model")) continue;
        json_t *mine = key_to_json(c, k), *theirs = key_to_json(&stored, k);
        const bool vocab_from_data = k->offset == offsetof(RunConfig, model.vocab_size) && c->model.vocab_size == 0;
        if (c->given[i] && !vocab_from_data && !may_differ_from_checkpoint(k) && !json_equal(mine, theirs)) {
            char *a = json_dumps(mine, JSON_ENCODE_ANY), *b = json_dumps(theirs, JSON_ENCODE_ANY);
            fatal("%s: model.%s = %s contradicts train.init_from = %s, whose model.%s = %s (leave the key out to take "
                  "the checkpoint's)",
                  src, k->key, a, checkpoint, k->key, b);
        }
        json_decref(mine);
        json_decref(theirs);
        if (!c->given[i] || vocab_from_data) memcpy(field(c, k), cfield(&stored, k), k->size);
    }
}

void config_set(RunConfig *c, const char *assignment) {
    char where[320];
    snprintf(where, sizeof where, "--set %s", assignment);
    const char *eq = strchr(assignment, '='), *dot = strchr(assignment, '.');
    if (!eq || !dot || dot > eq) fatal("%s: expected section.key=value", where);
    char section[64], key[64];
    size_t ls = (size_t)(dot - assignment), lk = (size_t)(eq - dot - 1);
    if (ls >= sizeof section || lk >= sizeof key) fatal("%s: no such key", where);
    memcpy(section, assignment, ls);
    section[ls] = 0;
    memcpy(key, dot + 1, lk);
    key[lk] = 0;
    const KeyDef *k = lookup(where, section, key);
    c->given[k - KEYS] = true;
    const char *val = eq + 1;
    char *end;
    errno = 0;
    switch (k->type) {
    case K_INT: {
        long long x = strtoll(val, &end, 10);
        bool ok = *val && !*end && !errno;
        if (*val && *end) { /* 1e5, as JSON allows */
            double d = strtod(val, &end);
            ok = !*end && d == floor(d) && fabs(d) < 1e15;
            x = ok ? (long long)d : 0; /* converting inf or 1e300 is undefined */
        }
        if (!ok) wrong_type(where, k, "text that is not one");
        set_int(c, k, x, where);
        break;
    }
    case K_FLOAT: {
        double x = strtod(val, &end);
        if (!*val || *end) wrong_type(where, k, "text that is not one");
        set_float(c, k, x, where);
        break;
    }
    case K_BOOL:
        if (!strcmp(val, "true") || !strcmp(val, "1")) *(bool *)field(c, k) = true;
        else if (!strcmp(val, "false") || !strcmp(val, "0")) *(bool *)field(c, k) = false;
        else wrong_type(where, k, "text that is not one");
        break;
    case K_STRING: set_string(c, k, val, where); break;
    case K_U64: {
        uint64_t x;
        if (!parse_u64(val, &x)) wrong_type(where, k, "text that is not one");
        set_u64(c, k, x);
        break;
    }
    }
}

void config_validate(const RunConfig *c) {
    const char *src = c->source[0] ? c->source : "config";
    /* every key again: code (tests, tools) may fill the struct without going through the reader */
    for (int i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &KEYS[i];
        char s[48];
        const void *p = cfield(c, k);
        if (k->type == K_INT && !in_range(k, *(const int *)p)) {
            snprintf(s, sizeof s, "%d", *(const int *)p);
            out_of_range(src, k, s);
        }
        if (k->type == K_FLOAT && (!isfinite(*(const float *)p) || !in_range(k, *(const float *)p))) {
            snprintf(s, sizeof s, "%g", (double)*(const float *)p);
            out_of_range(src, k, s);
        }
        if (k->type == K_STRING) {
            const char *v = p;
            if (strnlen(v, k->size) >= k->size) fatal("%s: %s.%s is not NUL-terminated", src, k->section, k->key);
            if (!is_utf8(v)) not_utf8(src, k);
            if (k->check == S_CHOICES && !choice_ok(k->choices, v)) {
                char list[64];
                choice_list(list, sizeof list, k->choices);
                fatal("%s: %s.%s = \"%s\" is not one of: %s", src, k->section, k->key, v, list);
            }
            if (k->check == S_SELECTOR) {
                char err[256];
                if (!parse_selector(v, c->model.n_layers, NULL, err, sizeof err))
                    fatal("%s: %s.%s %s", src, k->section, k->key, err);
            }
        }
    }
    const ModelConfig *m = &c->model;
    if (m->n_heads % m->n_kv_heads)
        fatal("%s: model.n_kv_heads = %d must divide model.n_heads = %d", src, m->n_kv_heads, m->n_heads);
    if (m->head_dim == 0 && m->d_model % m->n_heads)
        fatal("%s: model.d_model = %d is not divisible by model.n_heads = %d (or set model.head_dim)", src,
              m->d_model, m->n_heads);
    int hd = m->head_dim ? m->head_dim : m->d_model / m->n_heads;
    if (hd % 2)
        fatal("%s: the head dimension %d (model.head_dim, or model.d_model / model.n_heads) must be even for RoPE",
              src, hd);
    if (m->rotary_dim % 2 || m->rotary_dim > hd)
        fatal("%s: model.rotary_dim = %d must be even and <= the head dimension %d", src, m->rotary_dim, hd);
    rope_scaling_validate(m, src);
    const LayerKind *attention = layer_kind(LAYER_ATTENTION, m->attention);
    const bool has_msa = attention && attention->learned_selection; /* index parameters to train alone */
    if (!has_msa && strcmp(c->optim.warmup_trainable, "index") == 0)
        fatal("%s: optim.warmup_trainable = \"index\" needs MSA layers (model.attention = \"msa\")", src);
    if (c->train.keep_attention_outputs && !c->train.recompute)
        fatal("%s: train.keep_attention_outputs = true keeps, for train.recompute's replay of each block, what the "
              "replay would compute again; without train.recompute = true there is no replay (set both, or neither)",
              src);
    if (!has_msa && c->optim.backbone_lr_scale == 0)
        fatal("%s: optim.backbone_lr_scale = 0 freezes every parameter of a model without MSA layers", src);
    if (c->train.diverge_factor > 0 && c->train.diverge_factor < 1)
        fatal("%s: train.diverge_factor = %g must be 0 (no bound) or >= 1 (a bound below the first validation loss "
              "would stop a run that is learning)",
              src, (double)c->train.diverge_factor);
    if (c->optim.min_lr > c->optim.lr)
        fatal("%s: optim.min_lr = %g must be <= optim.lr = %g", src, (double)c->optim.min_lr, (double)c->optim.lr);
    if (!strcmp(c->train.device, "cuda") &&
        (m->d_model > CUDA_NORM_DIM_MAX || (m->d_model % 8 && m->d_model > CUDA_NORM_DIM_MAX_UNALIGNED)))
        fatal("%s: model.d_model = %d is more than the CUDA RMSNorm takes (%d, a multiple of 8; %d otherwise: "
              "kernels/cuda/limits.h CUDA_NORM_DIM_MAX)", src, m->d_model, CUDA_NORM_DIM_MAX,
              CUDA_NORM_DIM_MAX_UNALIGNED);
    if (config_cp_sequence(c) && c->dist.cp > 1) {
        /* what sequence-split CP (autograd/op_cp_sequence.c, op_cp_blocks.c) does not cover yet; every attention
         * kind runs on either backend (the MSA and window kernels read rows named by MsaParams.query_index and
         * key_rows on the CPU and on CUDA, kernels/cuda/NOTES.md) */
        const int cp = c->dist.cp;
        if (m->dropout > 0)
            fatal("%s: dist.cp_mode = sequence (dist.cp = %d) does not take model.dropout = %g: a rank's two chunks of "
                  "a sequence would need two mask offsets; use model.dropout = 0 or dist.cp_mode = heads",
                  src, cp, (double)m->dropout);
        if (c->train.seq_len % (2 * cp))
            fatal("%s: train.seq_len = %d is not a multiple of 2 * dist.cp = %d: dist.cp_mode = sequence cuts each "
                  "sequence into 2 * cp equal chunks, two per rank",
                  src, c->train.seq_len, 2 * cp);
    }
    /* the keys of the layer variants in use, and the limits of the backend that runs them */
    layers_require(c, src);
}

bool config_cp_sequence(const RunConfig *c) {
    if (!strcmp(c->dist.cp_mode, "auto")) return c->model.n_kv_heads % c->dist.cp != 0;
    return !strcmp(c->dist.cp_mode, "sequence");
}

static json_t *key_to_json(const RunConfig *c, const KeyDef *k) {
    const void *p = cfield(c, k);
    switch (k->type) {
    case K_INT: return json_integer(*(const int *)p);
    case K_FLOAT: {
        /* the shortest decimal of the float, so the file reads 0.001 (JSON_REAL_PRECISION below) */
        char buf[32];
        format_float(buf, sizeof buf, *(const float *)p);
        return json_real(strtod(buf, NULL));
    }
    case K_BOOL: return json_boolean(*(const bool *)p);
    case K_STRING: {
        /* set_string admits UTF-8 only; a struct filled by other code must not lose the key silently */
        json_t *v = json_string(p);
        if (!v) fatal("config: %s.%s = \"%s\" is not valid UTF-8 text and cannot be stored as JSON", k->section, k->key,
                      (const char *)p);
        return v;
    }
    case K_U64: {
        uint64_t v = *(const uint64_t *)p;
        if (v <= (uint64_t)INT64_MAX) return json_integer((json_int_t)v);
        char buf[32];
        snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
        return json_string(buf);
    }
    }
    return json_null();
}

char *config_to_json(const RunConfig *c) {
    json_t *root = json_object();
    for (int s = 0; s < N_SECTIONS; s++) {
        json_t *sec = json_object();
        for (int i = 0; i < N_KEYS; i++)
            if (!strcmp(KEYS[i].section, SECTIONS[s])) json_object_set_new(sec, KEYS[i].key, key_to_json(c, &KEYS[i]));
        json_object_set_new(root, SECTIONS[s], sec);
    }
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
    json_decref(root);
    if (!text) fatal("config_to_json: out of memory");
    /* hand back memory the caller frees with free(), with the newline a text file ends in */
    size_t n = strlen(text);
    char *out = xmalloc(n + 2);
    memcpy(out, text, n);
    out[n] = '\n';
    out[n + 1] = 0;
    free(text);
    return out;
}

void config_print_help(void) {
    printf("| section | key | type | default | allowed | meaning |\n");
    printf("| --- | --- | --- | --- | --- | --- |\n");
    for (int i = 0; i < N_KEYS; i++) {
        const KeyDef *k = &KEYS[i];
        char def[64], allowed[96];
        switch (k->type) {
        case K_INT: snprintf(def, sizeof def, "%d", (int)k->def); break;
        case K_FLOAT: format_float(def, sizeof def, (float)k->def); break;
        case K_BOOL: snprintf(def, sizeof def, "%s", k->def != 0 ? "true" : "false"); break;
        case K_U64: snprintf(def, sizeof def, "%.0f", k->def); break;
        case K_STRING: snprintf(def, sizeof def, "\"%s\"", k->def_str); break;
        }
        if (k->type == K_BOOL) snprintf(allowed, sizeof allowed, "true, false");
        else if (k->type == K_U64) snprintf(allowed, sizeof allowed, "0 to 2^64 - 1");
        else if (k->type != K_STRING) format_range(allowed, sizeof allowed, k);
        else if (k->check == S_CHOICES) choice_list(allowed, sizeof allowed, k->choices);
        else if (k->check == S_SELECTOR) snprintf(allowed, sizeof allowed, "layer selector");
        else snprintf(allowed, sizeof allowed, "at most %zu bytes", k->size - 1);
        printf("| %s | %s | %s | `%s` | %s | %s |\n", k->section, k->key, type_name(k->type), def, allowed, k->doc);
    }
}
