/* build/eval: does a checkpoint use its context? Three measurements, printed as tables and written as JSON
 * (tools/plot_eval.py draws them):
 *
 *   build/eval CONFIG.json CHECKPOINT.h5 --data TOKENS.h5 [options] [--set section.key=value]...
 *
 * Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", §4.2): a random key hidden at a chosen
 * depth in repeated filler text, the model asked for it at the end; exact-match accuracy on a grid of
 * context lengths x depths. The prompt of context length L (tokens before the answer) is
 *     INTRO + filler[0, p) + NEEDLE(key) + filler[p, F) + QUESTION
 * with F filler tokens (the filler sentence repeated and cut to F tokens) and p = round(depth * F). Greedy
 * decoding reproduces the key exactly iff at each answer position the argmax of the logits, with the key's
 * earlier tokens as input, is the key's token; so one forward over the prompt and the key (teacher forcing)
 * scores a trial, and also gives the key's log-probability. The answer recorded is greedy decoding's output
 * up to its first wrong token.
 * Per-position loss: the mean next-token loss by position bucket over windows of T + 1 tokens of the data
 * file's documents, each read as one document (positions 0 .. T-1): windows laid every T tokens from each
 * document's start, none crossing its end, the first --loss-windows of them in file order. Falling loss at far
 * positions is the standard sign that a model uses far context.
 * Indexer recall (MSA models): the mean recall the MSA layers report (the share of the dense teacher's
 * attention mass inside the selected blocks), by context length, over the passkey forwards.
 * The passkey prompts are text, so the data file's tokenizer must be "char" or "byte". */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "../data/dataset.h"
#include "../data/h5read.h"
#include "../kernels/util.h"
#include "../train/config.h"
#include "../train/inference.h"

#define MAX_GRID 64

static const char INTRO[] = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                            "it. I will quiz you about the important information there.\n";
static const char FILLER[] = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
static const char NEEDLE_HEAD[] = "The pass key is ", NEEDLE_MID[] = ". Remember it. ", NEEDLE_TAIL[] = " is the pass key. ";
static const char QUESTION[] = "What is the pass key? The pass key is ";

typedef struct Options {
    const char *config, *checkpoint, *data, *json, *key;
    int lengths[MAX_GRID], n_lengths;
    double depths[MAX_GRID];
    int n_depths;
    int trials, key_length, loss_length, loss_windows, buckets;
    uint64_t seed;
} Options;

static void usage(FILE *f) {
    fprintf(f,
            "usage: build/eval CONFIG.json CHECKPOINT.h5 --data TOKENS.h5 [options] [--set section.key=value]...\n"
            "Passkey retrieval accuracy on a grid of context lengths x depths, per-position loss on TOKENS.h5's\n"
            "documents, and (MSA models) indexer recall by context length; tables on stdout, --json for a file.\n"
            "  --data FILE.h5     token file (char or byte tokenizer): encodes the prompts, documents for the loss\n"
            "  --lengths L,...    passkey context lengths in tokens (default 256,512,1024)\n"
            "  --depths D,...     needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)\n"
            "  --trials N         random keys per cell (default 4)\n"
            "  --key-length K     key characters (default 5; digits, or lowercase letters if the vocabulary\n"
            "                     lacks a digit)\n"
            "  --seed S           seed of the keys (default 1)\n"
            "  --key KEY          this key in every trial instead of random ones (characters of the vocabulary)\n"
            "  --loss-length T    tokens per window of the per-position loss (default: the largest length)\n"
            "  --loss-windows N   windows for the per-position loss (default 4; 0 = none), T + 1 tokens each, laid\n"
            "                     every T tokens from each document's start\n"
            "  --buckets N        position buckets of equal width (default 8)\n"
            "  --json OUT.json    also write the results as JSON\n");
}

/* ---- options ------------------------------------------------------------------------------------ */

static long parse_int(const char *opt, const char *v, long lo, long hi) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi) fatal("%s %s: must be an integer in [%ld, %ld]", opt, v, lo, hi);
    return x;
}

/* "a,b,c" into out (at most MAX_GRID values); returns the count */
static int parse_list(const char *opt, const char *v, bool integers, double lo, double hi, double *out) {
    char *copy = xstrdup(v);
    int n = 0;
    for (char *save = NULL, *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (n == MAX_GRID) fatal("%s: more than %d values", opt, MAX_GRID);
        char *end;
        double x = strtod(item, &end);
        if (!*item || *end || !(x >= lo && x <= hi) || (integers && x != floor(x)))
            fatal("%s: \"%s\" must be %s in [%g, %g]", opt, item, integers ? "an integer" : "a number", lo, hi);
        out[n++] = x;
    }
    free(copy);
    if (!n) fatal("%s: no values", opt);
    return n;
}

static void parse_args(Options *o, RunConfig *cfg, int argc, char **argv) {
    *o = (Options){.trials = 4, .key_length = 5, .loss_windows = 4, .buckets = 8, .seed = 1,
                   .lengths = {256, 512, 1024}, .n_lengths = 3, .depths = {0, 0.25, 0.5, 0.75, 1}, .n_depths = 5};
    config_defaults(cfg);
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        }
        if (a[0] != '-') {
            if (npos == 0) config_load(cfg, o->config = a);
            else if (npos == 1) o->checkpoint = a;
            else fatal("unexpected argument %s", a);
            npos++;
            continue;
        }
        if (i + 1 >= argc) fatal("%s needs a value", a);
        const char *v = argv[++i];
        double list[MAX_GRID];
        if (!strcmp(a, "--set")) {
            if (!o->config) fatal("--set must come after the config file");
            config_set(cfg, v);
        } else if (!strcmp(a, "--data")) o->data = v;
        else if (!strcmp(a, "--json")) o->json = v;
        else if (!strcmp(a, "--key")) {
            if (!*v || strlen(v) > 64) fatal("--key \"%s\": must have 1 to 64 characters", v);
            o->key = v;
        }
        else if (!strcmp(a, "--lengths")) {
            o->n_lengths = parse_list(a, v, true, 1, 0x7ffffffe, list);
            for (int k = 0; k < o->n_lengths; k++) o->lengths[k] = (int)list[k];
        } else if (!strcmp(a, "--depths")) o->n_depths = parse_list(a, v, false, 0, 1, o->depths);
        else if (!strcmp(a, "--trials")) o->trials = (int)parse_int(a, v, 1, 1 << 20);
        else if (!strcmp(a, "--key-length")) o->key_length = (int)parse_int(a, v, 1, 64);
        else if (!strcmp(a, "--seed")) o->seed = (uint64_t)parse_int(a, v, 0, 0x7fffffffffffffffL);
        else if (!strcmp(a, "--loss-length")) o->loss_length = (int)parse_int(a, v, 1, 0x7ffffffe);
        else if (!strcmp(a, "--loss-windows")) o->loss_windows = (int)parse_int(a, v, 0, 1 << 20);
        else if (!strcmp(a, "--buckets")) o->buckets = (int)parse_int(a, v, 1, 1 << 20);
        else {
            usage(stderr);
            fatal("unknown option %s", a);
        }
    }
    if (npos != 2 || !o->data) {
        usage(stderr);
        fatal("CONFIG.json, CHECKPOINT.h5 and --data are required");
    }
    if (o->key) o->key_length = (int)strlen(o->key);
    if (!o->loss_length)
        for (int k = 0; k < o->n_lengths; k++)
            if (o->lengths[k] > o->loss_length) o->loss_length = o->lengths[k];
    if (o->buckets > o->loss_length)
        fatal("--buckets %d: more buckets than the %d positions of --loss-length", o->buckets, o->loss_length);
}

/* ---- text <-> tokens (char and byte tokenizers) -------------------------------------------------- */

typedef struct Codec {
    int32_t id[256]; /* byte -> token, -1: not in the vocabulary */
    char text[256];  /* token -> byte */
    int n_text;      /* tokens with a byte: the file's vocabulary (a model's may be larger) */
    const char *path;
} Codec;

static void codec_init(Codec *c, const TokenDataset *ds) {
    c->path = ds->path;
    c->n_text = ds->vocab_size;
    for (int b = 0; b < 256; b++) c->id[b] = -1;
    if (!strcmp(ds->tokenizer, "byte") && ds->vocab_size == 256) {
        for (int b = 0; b < 256; b++) c->id[b] = b, c->text[b] = (char)b;
    } else if (!strcmp(ds->tokenizer, "char") && ds->vocab) {
        for (int t = 0; t < ds->vocab_size; t++) c->id[(unsigned char)ds->vocab[t]] = t, c->text[t] = ds->vocab[t];
    } else
        fatal("%s: tokenizer \"%s\"%s: the passkey prompts are text, and build/eval encodes them only with the char "
              "tokenizer (with its \"vocab\" attribute) or the byte tokenizer (build/prepare_text)",
              ds->path, ds->tokenizer, strcmp(ds->tokenizer, "char") ? "" : " without a vocab attribute");
}

static void encode(const Codec *c, const char *s, size_t n, int32_t *out) {
    for (size_t i = 0; i < n; i++) {
        int32_t t = c->id[(unsigned char)s[i]];
        if (t < 0) fatal("%s: the passkey prompt's character '%c' (byte %d) is not in the vocabulary", c->path, s[i],
                         (unsigned char)s[i]);
        out[i] = t;
    }
}

/* The key's alphabet: the digits when the vocabulary has them all (the usual passkey), else lowercase
 * letters (tiny Shakespeare has one digit). */
static const char *key_alphabet(const Codec *c) {
    static const char digits[] = "0123456789", letters[] = "abcdefghijklmnopqrstuvwxyz";
    bool all = true;
    for (const char *p = digits; *p; p++) all = all && c->id[(unsigned char)*p] >= 0;
    if (all) return digits;
    for (const char *p = letters; *p; p++)
        if (c->id[(unsigned char)*p] < 0)
            fatal("%s: the vocabulary lacks a digit and the letter '%c': no alphabet for the passkey", c->path, *p);
    return letters;
}

/* ---- passkey ------------------------------------------------------------------------------------ */

typedef struct Trial {
    char key[65];
    /* greedy decoding's output up to and including its first token that is not the key's */
    char answer[65];
    int32_t answer_tokens[64];
    int answer_length;
    int64_t needle_at; /* token offset of the needle in the prompt */
    bool correct;
    double key_logprob, recall; /* recall: NaN without MSA layers */
} Trial;

static size_t needle_length(int K) { return strlen(NEEDLE_HEAD) + strlen(NEEDLE_MID) + strlen(NEEDLE_TAIL) + 2 * (size_t)K; }

static int64_t shortest_prompt(int K) { return (int64_t)(strlen(INTRO) + needle_length(K) + strlen(QUESTION)); }

/* The prompt of context length L with the needle at depth, followed by the key's first K - 1 tokens (the
 * answer positions' inputs): L + K - 1 tokens into out. Returns the needle's offset. */
static int64_t passkey_prompt(const Codec *c, int64_t L, double depth, const char *key, int32_t *out) {
    const int K = (int)strlen(key);
    const int64_t F = L - shortest_prompt(K), p = (int64_t)floor(depth * (double)F + 0.5);
    const size_t nf = strlen(FILLER);
    size_t n_needle = needle_length(K);
    char *needle = xmalloc(n_needle + 1);
    snprintf(needle, n_needle + 1, "%s%s%s%s%s", NEEDLE_HEAD, key, NEEDLE_MID, key, NEEDLE_TAIL);
    int32_t *o = out;
    encode(c, INTRO, strlen(INTRO), o), o += strlen(INTRO);
    for (int64_t i = 0; i < p; i++) encode(c, &FILLER[i % nf], 1, o++);
    const int64_t at = o - out;
    encode(c, needle, n_needle, o), o += n_needle;
    for (int64_t i = p; i < F; i++) encode(c, &FILLER[i % nf], 1, o++);
    encode(c, QUESTION, strlen(QUESTION), o), o += strlen(QUESTION);
    encode(c, key, (size_t)K - 1, o);
    free(needle);
    return at;
}

/* log softmax(row)[t] in double */
static double log_prob(const float *row, int V, int t) {
    double mx = row[0], sum = 0;
    for (int v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
    for (int v = 0; v < V; v++) sum += exp((double)row[v] - mx);
    return (double)row[t] - mx - log(sum);
}

static int argmax(const float *row, int V) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (row[v] > row[best]) best = v;
    return best;
}

static void run_trial(Inference *inf, const Codec *c, int64_t L, double depth, const char *key, Trial *tr) {
    const int K = (int)strlen(key), V = inf->model.cfg.vocab_size;
    const int64_t n = L + K - 1;
    int32_t *tokens = xmalloc((size_t)n * sizeof(int32_t)), want[64];
    tr->needle_at = passkey_prompt(c, L, depth, key, tokens);
    encode(c, key, (size_t)K, want);
    Metrics metrics;
    float *logits = inference_logits(inf, tokens, n, "the passkey prompt", inf->model.n_msa_layers ? &metrics : NULL);
    snprintf(tr->key, sizeof tr->key, "%s", key);
    tr->correct = true;
    tr->key_logprob = 0;
    tr->answer_length = 0;
    for (int k = 0; k < K; k++) {
        const float *row = logits + (size_t)(L - 1 + k) * (size_t)V;
        tr->key_logprob += log_prob(row, V, want[k]);
        if (!tr->correct) continue;
        /* greedy decoding's token while its output so far is the key; after a wrong one it would go on from
         * its own output, which this forward did not see */
        const int32_t t = argmax(row, V);
        const char ch = t < c->n_text ? c->text[t] : 0;
        tr->answer_tokens[tr->answer_length] = t;
        tr->answer[tr->answer_length++] = ch >= 32 && ch < 127 ? ch : '?'; /* JSON text: printable ASCII only */
        tr->correct = t == want[k];
    }
    tr->answer[tr->answer_length] = 0;
    tr->recall = inf->model.n_msa_layers ? metrics_mean(&metrics, "recall") : NAN;
    free(logits);
    free(tokens);
}

/* every trial of the grid, in the order length, depth, trial; keys from (seed, that index) alone */
static Trial *run_passkey(Inference *inf, const Codec *c, const Options *o) {
    const char *alphabet = key_alphabet(c);
    const size_t na = strlen(alphabet);
    for (int l = 0; l < o->n_lengths; l++)
        if (o->lengths[l] < shortest_prompt(o->key_length))
            fatal("--lengths %d: shorter than the passkey prompt without filler (%lld tokens with --key-length %d)",
                  o->lengths[l], (long long)shortest_prompt(o->key_length), o->key_length);
    Trial *all = xcalloc((size_t)o->n_lengths * (size_t)o->n_depths * (size_t)o->trials, sizeof(Trial));
    Trial *tr = all;
    for (int l = 0; l < o->n_lengths; l++)
        for (int d = 0; d < o->n_depths; d++)
            for (int t = 0; t < o->trials; t++, tr++) {
                Rng r;
                rng_seed(&r, o->seed * 0x9e3779b97f4a7c15ULL + (uint64_t)(tr - all));
                char key[65];
                for (int k = 0; k < o->key_length; k++) key[k] = o->key ? o->key[k] : alphabet[rng_next(&r) % na];
                key[o->key_length] = 0;
                run_trial(inf, c, o->lengths[l], o->depths[d], key, tr);
            }
    return all;
}

/* ---- per-position loss -------------------------------------------------------------------------- */

typedef struct PositionLoss {
    int n_windows;
    double *sum;   /* [buckets] */
    int64_t *count;
} PositionLoss;

static int64_t bucket_start(const Options *o, int b) { return (int64_t)o->loss_length * b / o->buckets; }

static void window_loss(Inference *inf, const TokenDataset *ds, const Options *o, int64_t start, int32_t *tokens,
                        PositionLoss *pl) {
    const int64_t T = o->loss_length;
    const int V = inf->model.cfg.vocab_size;
    dataset_read(ds, start, T + 1, tokens);
    float *logits = inference_logits(inf, tokens, T, ds->path, NULL);
    for (int b = 0; b < o->buckets; b++)
        for (int64_t t = bucket_start(o, b); t < bucket_start(o, b + 1); t++) {
            pl->sum[b] -= log_prob(logits + (size_t)t * (size_t)V, V, tokens[t + 1]);
            pl->count[b]++;
        }
    free(logits);
    pl->n_windows++;
}

static void run_position_loss(Inference *inf, const TokenDataset *ds, const Options *o, PositionLoss *pl) {
    const int64_t T = o->loss_length;
    pl->sum = xcalloc((size_t)o->buckets, sizeof(double));
    pl->count = xcalloc((size_t)o->buckets, sizeof(int64_t));
    int32_t *tokens = xmalloc(((size_t)T + 1) * sizeof(int32_t));
    int64_t longest = 0;
    for (int64_t d = 0; d < ds->n_docs && pl->n_windows < o->loss_windows; d++) {
        const int64_t begin = ds->doc_offsets[d], end = ds->doc_offsets[d + 1];
        longest = end - begin > longest ? end - begin : longest;
        for (int64_t at = begin; at + T + 1 <= end && pl->n_windows < o->loss_windows; at += T)
            window_loss(inf, ds, o, at, tokens, pl);
    }
    free(tokens);
    if (pl->n_windows < o->loss_windows)
        fatal("%s: its documents hold %d window%s of --loss-length + 1 = %lld tokens, --loss-windows asks for %d (the "
              "longest document has %lld tokens): lower --loss-length or --loss-windows, or use a file of longer "
              "documents (build/prepare_text --min-doc-tokens)",
              ds->path, pl->n_windows, pl->n_windows == 1 ? "" : "s", (long long)T + 1, o->loss_windows,
              (long long)longest);
}

/* ---- report ------------------------------------------------------------------------------------- */

static const Trial *cell(const Trial *all, const Options *o, int l, int d) {
    return all + ((size_t)l * (size_t)o->n_depths + (size_t)d) * (size_t)o->trials;
}

static double cell_accuracy(const Trial *t, int n) {
    int ok = 0;
    for (int i = 0; i < n; i++) ok += t[i].correct;
    return (double)ok / n;
}

static double length_recall(const Trial *all, const Options *o, int l) {
    const Trial *t = cell(all, o, l, 0);
    double sum = 0;
    int n = o->n_depths * o->trials;
    for (int i = 0; i < n; i++) sum += t[i].recall;
    return sum / n;
}

static void print_tables(const Trial *all, const PositionLoss *pl, const Options *o, bool msa) {
    printf("passkey exact-match accuracy (%d keys of %d characters per cell)\n| depth \\ length |", o->trials,
           o->key_length);
    for (int l = 0; l < o->n_lengths; l++) printf(" %d |", o->lengths[l]);
    printf("\n|---|");
    for (int l = 0; l < o->n_lengths; l++) printf("---|");
    printf("\n");
    for (int d = 0; d < o->n_depths; d++) {
        printf("| %.2f |", o->depths[d]);
        for (int l = 0; l < o->n_lengths; l++) printf(" %.2f |", cell_accuracy(cell(all, o, l, d), o->trials));
        printf("\n");
    }
    if (msa) {
        printf("\nindexer recall by context length (MSA layers, passkey prompts)\n| length | recall |\n|---|---|\n");
        for (int l = 0; l < o->n_lengths; l++) printf("| %d | %.4f |\n", o->lengths[l], length_recall(all, o, l));
    }
    if (pl->n_windows) {
        printf("\nper-position loss (%d windows of %d positions)\n| positions | loss |\n|---|---|\n", pl->n_windows,
               o->loss_length);
        for (int b = 0; b < o->buckets; b++)
            printf("| %lld-%lld | %.4f |\n", (long long)bucket_start(o, b), (long long)bucket_start(o, b + 1) - 1,
                   pl->sum[b] / (double)pl->count[b]);
    }
    fflush(stdout);
}

static json_t *number(double x) { return isfinite(x) ? json_real(x) : json_null(); }

static json_t *passkey_json(const Trial *all, const Options *o) {
    json_t *lengths = json_array(), *depths = json_array(), *acc = json_array(), *trials = json_array();
    for (int l = 0; l < o->n_lengths; l++) json_array_append_new(lengths, json_integer(o->lengths[l]));
    for (int d = 0; d < o->n_depths; d++) json_array_append_new(depths, json_real(o->depths[d]));
    for (int l = 0; l < o->n_lengths; l++) {
        json_t *row = json_array();
        for (int d = 0; d < o->n_depths; d++) json_array_append_new(row, json_real(cell_accuracy(cell(all, o, l, d), o->trials)));
        json_array_append_new(acc, row);
        for (int d = 0; d < o->n_depths; d++)
            for (int t = 0; t < o->trials; t++) {
                const Trial *tr = cell(all, o, l, d) + t;
                json_t *answer = json_array();
                for (int k = 0; k < tr->answer_length; k++) json_array_append_new(answer, json_integer(tr->answer_tokens[k]));
                json_array_append_new(trials, json_pack("{s:i, s:f, s:s, s:s, s:I, s:o, s:b, s:o, s:o}", "length",
                                                        o->lengths[l], "depth", o->depths[d], "key", tr->key,
                                                        "answer", tr->answer,
                                                        "needle_at", (json_int_t)tr->needle_at, "answer_tokens", answer,
                                                        "correct", tr->correct, "key_logprob", number(tr->key_logprob),
                                                        "recall", number(tr->recall)));
            }
    }
    return json_pack("{s:o, s:o, s:i, s:i, s:o, s:o}", "lengths", lengths, "depths", depths, "trials_per_cell",
                     o->trials, "key_length", o->key_length, "accuracy", acc, "trials", trials);
}

static void write_json(const Trial *all, const PositionLoss *pl, const Options *o, bool msa) {
    json_t *root = json_pack("{s:s, s:s, s:s, s:o}", "config", o->config, "checkpoint", o->checkpoint, "data", o->data,
                             "passkey", passkey_json(all, o));
    if (msa) {
        json_t *rec = json_array();
        for (int l = 0; l < o->n_lengths; l++)
            json_array_append_new(rec, json_pack("{s:i, s:o}", "length", o->lengths[l], "recall",
                                                 number(length_recall(all, o, l))));
        json_object_set_new(root, "recall_by_length", rec);
    }
    if (pl->n_windows) {
        json_t *buckets = json_array();
        for (int b = 0; b < o->buckets; b++)
            json_array_append_new(buckets, json_pack("{s:I, s:I, s:o, s:I}", "start", (json_int_t)bucket_start(o, b),
                                                     "end", (json_int_t)bucket_start(o, b + 1), "loss",
                                                     number(pl->sum[b] / (double)pl->count[b]), "tokens",
                                                     (json_int_t)pl->count[b]));
        json_object_set_new(root, "position_loss",
                            json_pack("{s:i, s:i, s:o}", "length", o->loss_length, "windows", pl->n_windows, "buckets", buckets));
    }
    char *tmp = xmalloc(strlen(o->json) + 5);
    sprintf(tmp, "%s.tmp", o->json);
    if (json_dump_file(root, tmp, JSON_INDENT(1)) != 0 || rename(tmp, o->json) != 0) {
        unlink(tmp);
        fatal("%s: cannot write the results (%s)", o->json, strerror(errno));
    }
    free(tmp);
    json_decref(root);
}

int main(int argc, char **argv) {
    Options o;
    RunConfig cfg;
    parse_args(&o, &cfg, argc, argv);
    h5_setup(); /* failures are reported by name, and a failed close does not crash the exit */
    TokenDataset ds;
    dataset_open(&ds, o.data);
    if (cfg.model.vocab_size == 0) cfg.model.vocab_size = ds.vocab_size;
    if (cfg.model.vocab_size < ds.vocab_size) /* larger is fine: a padded vocabulary, as build/train allows */
        fatal("%s: model.vocab_size is %d but %s has vocab_size %d", o.config, cfg.model.vocab_size, o.data,
              ds.vocab_size);
    Codec codec;
    codec_init(&codec, &ds);
    Inference inf;
    inference_open(&inf, &cfg, o.config, o.checkpoint);
    const bool msa = inf.model.n_msa_layers > 0;

    Trial *trials = run_passkey(&inf, &codec, &o);
    PositionLoss pl = {0};
    if (o.loss_windows) run_position_loss(&inf, &ds, &o, &pl);
    print_tables(trials, &pl, &o, msa);
    if (o.json) {
        write_json(trials, &pl, &o, msa);
        printf("\neval: results in %s\n", o.json);
    }
    free(trials);
    free(pl.sum);
    free(pl.count);
    inference_close(&inf);
    dataset_close(&ds);
    return 0;
}
