/* Run configuration (train/config.c): defaults, JSON loading over them, every kind of bad input
 * ending the program with status 1 and a message naming the file and the key, --set overrides,
 * the JSON round trip, cross-key validation, layer selectors, and configs/README.md matching the
 * key table. Code that exits runs in a forked child whose stderr comes back through a pipe. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../train/config.h"
#include "test.h"

typedef struct Fixture {
    char dir[128];  /* scratch directory */
    char root[512]; /* the repository (two levels above build/tests/test_config) */
} Fixture;

#define FX ((Fixture *)tc->fixture)

static void join(char *dst, size_t n, const char *a, const char *b) {
    if (snprintf(dst, n, "%s/%s", a, b) >= (int)n) {
        fprintf(stderr, "path too long: %s/%s\n", a, b);
        exit(2);
    }
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
}

/* Runs fn(arg) in a child; its stdout goes to out (when given) and its stderr to err. Returns the
 * exit status (0 when fn returns, -1 when killed). */
static int run_child(void (*fn)(const void *), const void *arg, char *out, size_t outn, char *err, size_t errn) {
    int fe[2], fo[2];
    if (pipe(fe) != 0 || pipe(fo) != 0) return -2;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fe[0]);
        close(fo[0]);
        dup2(fe[1], 2);
        dup2(fo[1], 1);
        fn(arg);
        fflush(NULL);
        _exit(0);
    }
    close(fe[1]);
    close(fo[1]);
    /* stdout first: help text is larger than a pipe buffer, stderr messages are one line */
    size_t n = 0;
    ssize_t got;
    char sink[4096];
    while ((got = read(fo[0], out && n < outn - 1 ? out + n : sink,
                       out && n < outn - 1 ? outn - 1 - n : sizeof sink)) > 0)
        if (out && n < outn - 1) n += (size_t)got;
    if (out) out[n] = 0;
    n = 0;
    while ((got = read(fe[0], err + n, errn - 1 - n)) > 0) n += (size_t)got;
    err[n] = 0;
    close(fe[0]);
    close(fo[0]);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void load_default_and_validate(const void *path) {
    RunConfig c;
    config_defaults(&c);
    config_load(&c, path);
    config_validate(&c);
}

static void validate_cfg(const void *cfg) { config_validate(cfg); }

static void set_one(const void *a) {
    RunConfig c;
    config_defaults(&c);
    config_set(&c, a);
}

static void print_help(const void *unused) {
    (void)unused;
    config_print_help();
}

/* The file text, the status and stderr of loading it; EXPECTs status 1 and every word in stderr. */
static void expect_load_fails(TestCtx *tc, const char *name, const char *json, const char *const *words) {
    char path[1024], err[4096];
    join(path, sizeof path, FX->dir, name);
    if (json) write_text(path, json);
    int st = run_child(load_default_and_validate, path, NULL, 0, err, sizeof err);
    EXPECT(st == 1, "%s: status %d, want 1 (stderr: %s)", name, st, err);
    EXPECT(!strncmp(err, "error: ", 7) && strstr(err, path), "%s: message does not name the file: %s", name, err);
    for (int i = 0; words[i]; i++) EXPECT(strstr(err, words[i]), "%s: message lacks \"%s\": %s", name, words[i], err);
}

#define WORDS(...) ((const char *const[]){__VA_ARGS__, NULL})

static void expect_set_fails(TestCtx *tc, const char *assignment, const char *word) {
    char err[4096];
    int st = run_child(set_one, assignment, NULL, 0, err, sizeof err);
    EXPECT(st == 1, "--set %s: status %d (stderr: %s)", assignment, st, err);
    EXPECT(strstr(err, word), "--set %s: message lacks \"%s\": %s", assignment, word, err);
}

static void expect_invalid(TestCtx *tc, const RunConfig *c, const char *w1, const char *w2) {
    char err[4096];
    int st = run_child(validate_cfg, c, NULL, 0, err, sizeof err);
    EXPECT(st == 1, "validate: status %d, want 1 (expected a message with %s)", st, w1);
    EXPECT(strstr(err, w1) && (!w2 || strstr(err, w2)), "validate: message lacks %s / %s: %s", w1, w2 ? w2 : "",
           err);
}

/* ---- tests ------------------------------------------------------------------------------------ */

TEST(defaults_are_valid) {
    RunConfig c;
    config_defaults(&c);
    char err[4096];
    int st = run_child(validate_cfg, &c, NULL, 0, err, sizeof err);
    EXPECT(st == 0, "defaults fail validation: %s", err);
    EXPECT(c.model.d_model == 128 && c.model.n_layers == 4 && c.model.n_heads == 4 && c.model.n_kv_heads == 2 &&
               c.model.ffn_dim == 384 && c.model.head_dim == 0 && c.model.vocab_size == 0,
           "model defaults");
    EXPECT(c.model.rope_theta == 10000.0f && c.model.norm_eps == 1e-5f && c.model.init_std == 0.02f &&
               c.model.tie_embeddings && !c.model.qk_norm,
           "model float/bool defaults");
    EXPECT(!strcmp(c.model.attention, "dense") && !strcmp(c.model.msa_layers, "all") && !strcmp(c.model.ffn, "dense"),
           "model strings");
    EXPECT(c.msa.block_size == 128 && c.msa.topk_blocks == 16 && c.msa.init_blocks == 0 && c.msa.local_blocks == 1 &&
               c.msa.index_heads == 0 && c.msa.index_dim == 128 && c.msa.kl_weight == 1.0f &&
               c.msa.dense_warmup_steps == 0 && c.msa.recall_stride == 8,
           "msa defaults");
    EXPECT(c.optim.lr == 1e-3f && c.optim.min_lr == 1e-4f && c.optim.warmup_steps == 100 &&
               c.optim.weight_decay == 0.1f && !c.optim.decay_embeddings && c.optim.beta1 == 0.9f &&
               c.optim.beta2 == 0.95f && c.optim.eps == 1e-8f && c.optim.grad_clip == 1.0f,
           "optim defaults");
    EXPECT(c.train.steps == 1000 && c.train.batch_size == 16 && c.train.seq_len == 128 && c.train.grad_accum == 1 &&
               c.train.eval_every == 100 && c.train.eval_batches == 8 && c.train.log_every == 10 &&
               c.train.seed == 1337 && !c.train.recompute && !strcmp(c.train.device, "cpu") &&
               c.train.sample_tokens == 0 && c.train.sample_temperature == 1.0f && !c.train.out_dir[0],
           "train defaults");
    EXPECT(!c.data.train_path[0] && !c.data.val_path[0], "data defaults");
    for (int l = 0; l < c.model.n_layers; l++)
        EXPECT(!strcmp(config_layer_attention(&c, l), "dense") && !strcmp(config_layer_ffn(&c, l), "dense"), "default layer %d not dense", l);
}

TEST(sample_json_loads) {
    char path[1024];
    join(path, sizeof path, FX->dir, "sample.json");
    write_text(path, "{\n"
                     "  \"model\": {\"d_model\": 96, \"n_layers\": 6, \"n_heads\": 6, \"n_kv_heads\": 3,\n"
                     "            \"rope_theta\": 500000, \"qk_norm\": true, \"attention\": \"msa\",\n"
                     "            \"msa_layers\": \"2-\", \"ffn_dim\": 1e3},\n"
                     "  \"msa\": {\"block_size\": 64, \"topk_blocks\": 8, \"init_blocks\": 1, \"kl_weight\": 0.5},\n"
                     "  \"moe\": {\"score_func\": \"sigmoid\"},\n"
                     "  \"optim\": {\"lr\": 3e-4, \"beta2\": 0.99},\n"
                     "  \"train\": {\"seed\": 42, \"device\": \"cuda\", \"out_dir\": \"runs/x\"},\n"
                     "  \"data\": {\"train_path\": \"a.h5\", \"val_path\": \"b.h5\"}\n"
                     "}\n");
    RunConfig c;
    config_defaults(&c);
    config_load(&c, path);
    EXPECT(c.model.d_model == 96 && c.model.n_layers == 6 && c.model.n_heads == 6 && c.model.n_kv_heads == 3 &&
               c.model.ffn_dim == 1000,
           "ints");
    EXPECT(c.model.rope_theta == 500000.0f && c.model.qk_norm && c.msa.kl_weight == 0.5f && c.optim.lr == 3e-4f &&
               c.optim.beta2 == 0.99f,
           "floats/bools");
    EXPECT(c.msa.block_size == 64 && c.msa.topk_blocks == 8 && c.msa.init_blocks == 1, "msa");
    EXPECT(c.train.seed == 42 && !strcmp(c.train.device, "cuda") && !strcmp(c.train.out_dir, "runs/x") &&
               !strcmp(c.data.train_path, "a.h5") && !strcmp(c.data.val_path, "b.h5") &&
               !strcmp(c.moe.score_func, "sigmoid"),
           "strings");
    EXPECT(!strcmp(c.source, path), "source %s", c.source);
    /* keys not in the file keep their defaults */
    EXPECT(c.train.steps == 1000 && c.optim.beta1 == 0.9f && c.msa.local_blocks == 1, "defaults kept");
    for (int l = 0; l < 6; l++) EXPECT(!strcmp(config_layer_attention(&c, l), "msa") == (l >= 2), "msa layer %d", l);
    char err[4096];
    int st = run_child(load_default_and_validate, path, NULL, 0, err, sizeof err);
    EXPECT(st == 0, "sample fails validation: %s", err);
}

TEST(shipped_configs_load) {
    const char *names[] = {"configs/tiny.json", "configs/shakespeare_char.json"};
    for (int i = 0; i < 2; i++) {
        char path[1024], err[4096];
        join(path, sizeof path, FX->root, names[i]);
        struct stat st;
        if (stat(path, &st) != 0) continue; /* not every checkout has every config */
        int rc = run_child(load_default_and_validate, path, NULL, 0, err, sizeof err);
        EXPECT(rc == 0, "%s: %s", names[i], err);
    }
}

TEST(bad_files_name_the_problem) {
    expect_load_fails(tc, "unknown_key.json", "{\"model\": {\"d_modle\": 64}}",
                      WORDS("unknown key", "model.d_modle", "did you mean \"model.d_model\""));
    if (tc->current_failed) return;
    /* a key in the wrong section: the suggestion finds its section */
    expect_load_fails(tc, "wrong_section.json", "{\"model\": {\"block_size\": 64}}",
                      WORDS("model.block_size", "msa.block_size"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "unknown_section.json", "{\"optimizer\": {\"lr\": 1}}",
                      WORDS("unknown section", "optimizer", "did you mean \"optim\""));
    if (tc->current_failed) return;
    expect_load_fails(tc, "type_int.json", "{\"train\": {\"steps\": \"100\"}}", WORDS("train.steps", "integer"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "type_frac.json", "{\"train\": {\"batch_size\": 2.5}}", WORDS("train.batch_size", "integer"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "type_bool.json", "{\"model\": {\"qk_norm\": 1}}", WORDS("model.qk_norm", "true or false"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "type_float.json", "{\"optim\": {\"lr\": \"fast\"}}", WORDS("optim.lr", "number"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "type_string.json", "{\"data\": {\"train_path\": 3}}", WORDS("data.train_path", "string"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "type_section.json", "{\"model\": [1, 2]}", WORDS("model", "object"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "range_int.json", "{\"model\": {\"d_model\": 0}}", WORDS("model.d_model", "out of range"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "range_float.json", "{\"optim\": {\"beta1\": 1.5}}", WORDS("optim.beta1", "out of range"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "range_open.json", "{\"model\": {\"norm_eps\": 0}}", WORDS("model.norm_eps", "(0, 1]"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "range_seed.json", "{\"train\": {\"seed\": -1}}", WORDS("train.seed"));
    if (tc->current_failed) return;
    char long_json[1024] = "{\"train\": {\"out_dir\": \"";
    for (int i = 0; i < 300; i++) strcat(long_json, "x");
    strcat(long_json, "\"}}");
    expect_load_fails(tc, "too_long.json", long_json, WORDS("train.out_dir", "too long"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "attention.json", "{\"model\": {\"attention\": \"sparse\"}}",
                      WORDS("model.attention", "sparse", "dense, msa"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "device.json", "{\"train\": {\"device\": \"tpu\"}}", WORDS("train.device", "cpu, cuda"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "selector.json", "{\"model\": {\"msa_layers\": \"1-x\"}}", WORDS("model.msa_layers"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "syntax.json", "{\n  \"model\": {\n    \"d_model\": 64,\n  }\n}\n", WORDS("line 4"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "duplicate.json", "{\"model\": {\"d_model\": 64, \"d_model\": 32}}", WORDS("d_model"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "top_array.json", "[1]", WORDS("object"));
    if (tc->current_failed) return;
    expect_load_fails(tc, "missing_file.json", NULL, WORDS("No such file"));
}

TEST(set_overrides) {
    RunConfig c;
    config_defaults(&c);
    config_set(&c, "model.d_model=256");
    config_set(&c, "optim.lr=0.0025");
    config_set(&c, "model.qk_norm=true");
    config_set(&c, "model.tie_embeddings=0");
    config_set(&c, "train.out_dir=runs/a=b"); /* the value is everything after the first '=' */
    config_set(&c, "train.seed=18446744073709551615");
    config_set(&c, "model.attention=msa");
    config_set(&c, "model.msa_layers=0,3-5");
    config_set(&c, "data.val_path=");
    config_set(&c, "train.steps=2e3");
    EXPECT(c.train.steps == 2000, "steps=2e3 gave %d", c.train.steps);
    config_set(&c, "msa.block_size=010");
    EXPECT(c.msa.block_size == 10, "block_size=010 gave %d", c.msa.block_size);
    EXPECT(c.model.d_model == 256 && c.optim.lr == 0.0025f && c.model.qk_norm && !c.model.tie_embeddings, "values");
    EXPECT(!strcmp(c.train.out_dir, "runs/a=b") && c.train.seed == UINT64_MAX && !c.data.val_path[0], "strings");
    config_set(&c, "train.seed=010");
    EXPECT(c.train.seed == 10, "seed=010 read as %llu", (unsigned long long)c.train.seed);
    config_set(&c, "train.seed=0x10");
    EXPECT(c.train.seed == 16, "seed=0x10 read as %llu", (unsigned long long)c.train.seed);
    EXPECT(!strcmp(c.model.attention, "msa") && !strcmp(c.model.msa_layers, "0,3-5"), "attention");
    expect_set_fails(tc, "model.d_model=abc", "model.d_model");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.d_model=12x", "integer");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.d_model=2.5", "integer");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.d_model=-4", "out of range");
    if (tc->current_failed) return;
    /* too large for any integer: refused, never converted (a sanitizer build stops on the conversion) */
    expect_set_fails(tc, "model.d_model=1e300", "integer");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.d_model=inf", "integer");
    if (tc->current_failed) return;
    /* a float key without an upper bound of its own: the message gives the float range, not just "> 0" */
    expect_set_fails(tc, "model.rope_theta=1e300", "at most 3.40282e+38, the float range");
    if (tc->current_failed) return;
    /* a Latin-1 byte: config.json (JSON, UTF-8) could not store it and would drop the key */
    expect_set_fails(tc, "train.out_dir=runs/caf\xe9", "train.out_dir is not UTF-8");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.qk_norm=maybe", "true or false");
    if (tc->current_failed) return;
    expect_set_fails(tc, "optim.lr=nan", "optim.lr");
    if (tc->current_failed) return;
    expect_set_fails(tc, "train.seed=-1", "train.seed");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.d_modle=3", "did you mean \"model.d_model\"");
    if (tc->current_failed) return;
    expect_set_fails(tc, "modle.d_model=3", "unknown section");
    if (tc->current_failed) return;
    expect_set_fails(tc, "d_model=3", "section.key=value");
    if (tc->current_failed) return;
    expect_set_fails(tc, "model.d_model", "section.key=value");
    if (tc->current_failed) return;
    expect_set_fails(tc, "train.device=gpu", "cpu, cuda");
}

static void to_json(const void *cfg) { free(config_to_json(cfg)); }

/* The stored config is JSON, which holds UTF-8 only: a string value that is not UTF-8 is refused with the
 * key's name (by --set, or by the writer for a struct that code filled), never dropped from config.json and
 * the checkpoints as it once was; UTF-8 beyond ASCII is kept as it is. */
TEST(non_utf8_strings_are_refused_not_dropped) {
    expect_set_fails(tc, "data.train_path=caf\xe9.h5", "data.train_path is not UTF-8");
    if (tc->current_failed) return;
    expect_set_fails(tc, "train.out_dir=runs/\xff\xfe", "train.out_dir is not UTF-8");
    if (tc->current_failed) return;
    RunConfig c;
    config_defaults(&c);
    config_set(&c, "train.out_dir=runs/caf\xc3\xa9"); /* "café" in UTF-8 */
    char *json = config_to_json(&c);
    EXPECT(strstr(json, "\"out_dir\": \"runs/caf\xc3\xa9\""), "UTF-8 out_dir not stored as it is: %s", json);
    free(json);
    snprintf(c.data.val_path, sizeof c.data.val_path, "val\xff.h5");
    char err[4096];
    int st = run_child(to_json, &c, NULL, 0, err, sizeof err);
    EXPECT(st == 1 && strstr(err, "data.val_path") && strstr(err, "UTF-8"), "writing a non-UTF-8 val_path: status %d, %s",
           st, err);
}

TEST(json_round_trip) {
    RunConfig a, b;
    config_defaults(&a);
    a.model.d_model = 200;
    a.model.rope_theta = 1e6f;
    a.model.init_std = 0.0123f;
    a.model.qk_norm = true;
    a.optim.lr = 0.1f;
    a.optim.eps = 1.5e-7f;
    a.optim.min_lr = 3.3333333e-5f;
    a.train.seed = 0xfedcba9876543210ULL; /* above 2^63: written as a string */
    snprintf(a.train.out_dir, sizeof a.train.out_dir, "runs/\"quoted\" \\ dir\tä");
    config_set(&a, "model.attention=msa"); /* (unlike snprintf, zeroes the rest of the field) */
    config_set(&a, "model.msa_layers=3-");
    char *json = config_to_json(&a);
    EXPECT(strstr(json, "\"lr\": 0.1,") || strstr(json, "\"lr\": 0.1\n"), "floats not written short: %s", json);
    char path[1024];
    join(path, sizeof path, FX->dir, "round_trip.json");
    write_text(path, json);
    config_defaults(&b);
    b.model.d_model = 1; /* every key is in the file: nothing of b's own may survive */
    config_load(&b, path);
    char *json2 = config_to_json(&b);
    EXPECT(!strcmp(json, json2), "the saved config reads back differently:\n%s\n---\n%s", json, json2);
    /* the struct too, except where it was read from and which keys a file gave (memcmp is fair: defaults
     * zero every byte) */
    memcpy(b.source, a.source, sizeof a.source);
    memcpy(b.given, a.given, sizeof a.given);
    size_t diff = 0;
    while (diff < sizeof a && ((const char *)&a)[diff] == ((const char *)&b)[diff]) diff++;
    EXPECT(diff == sizeof a, "the structs differ after a round trip at byte %zu of %zu", diff, sizeof a);
    /* every section and a key of each */
    const char *const must[] = {"\"model\"", "\"msa\"", "\"moe\"", "\"optim\"", "\"train\"", "\"data\"",
                                "\"recall_stride\"", "\"score_func\"", "\"grad_clip\"", "\"val_path\""};
    for (size_t i = 0; i < sizeof must / sizeof must[0]; i++) EXPECT(strstr(json, must[i]), "no %s", must[i]);
    free(json);
    free(json2);
}

TEST(validation_cross_keys) {
    RunConfig c;
    config_defaults(&c);
    c.model.n_kv_heads = 3;
    expect_invalid(tc, &c, "model.n_kv_heads", "model.n_heads");
    if (tc->current_failed) return;
    config_defaults(&c);
    c.train.keep_attention_outputs = true; /* without train.recompute: nothing to keep for */
    expect_invalid(tc, &c, "train.keep_attention_outputs", "train.recompute");
    if (tc->current_failed) return;
    config_defaults(&c);
    c.model.d_model = 130; /* / 4 heads */
    expect_invalid(tc, &c, "model.d_model", "model.n_heads");
    if (tc->current_failed) return;
    config_defaults(&c);
    c.model.d_model = 132;
    c.model.n_heads = 4;
    c.model.n_kv_heads = 1; /* head dim 33 */
    expect_invalid(tc, &c, "even", NULL);
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.data.val_path, sizeof c.data.val_path, "caf\xe9.h5"); /* code, not the reader, filled it */
    expect_invalid(tc, &c, "data.val_path", "UTF-8");
    if (tc->current_failed) return;
    config_defaults(&c);
    c.model.head_dim = 16;
    c.model.d_model = 100; /* d_model need not divide by heads when head_dim is given */
    char err[4096];
    int st = run_child(validate_cfg, &c, NULL, 0, err, sizeof err);
    EXPECT(st == 0, "explicit head_dim rejected: %s", err);
    c.model.rotary_dim = 18;
    expect_invalid(tc, &c, "model.rotary_dim", NULL);
    if (tc->current_failed) return;
    c.model.rotary_dim = 7;
    expect_invalid(tc, &c, "model.rotary_dim", NULL);
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.model.attention, sizeof c.model.attention, "msa"); /* the msa keys of a model with MSA layers */
    c.msa.index_heads = 4;
    expect_invalid(tc, &c, "msa.index_heads", "model.n_kv_heads");
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.model.attention, sizeof c.model.attention, "msa");
    c.msa.init_blocks = 16;
    expect_invalid(tc, &c, "msa.topk_blocks", "msa.init_blocks");
    if (tc->current_failed) return;
    config_defaults(&c);
    c.train.batch_size = 0; /* set in code, not read: validate still checks the range */
    expect_invalid(tc, &c, "train.batch_size", NULL);
    if (tc->current_failed) return;
    config_defaults(&c);
    c.train.seq_len = -5;
    expect_invalid(tc, &c, "train.seq_len", NULL);
    if (tc->current_failed) return;
    config_defaults(&c);
    c.optim.min_lr = 0.01f;
    expect_invalid(tc, &c, "optim.min_lr", NULL);
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.model.msa_layers, sizeof c.model.msa_layers, "2,9");
    expect_invalid(tc, &c, "model.msa_layers", "layer 9");
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.model.ffn, sizeof c.model.ffn, "moe");
    c.moe.experts_per_token = 9;
    expect_invalid(tc, &c, "moe.experts_per_token", "moe.num_experts");
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.train.device, sizeof c.train.device, "tpu");
    expect_invalid(tc, &c, "train.device", NULL);
    if (tc->current_failed) return;
    /* RoPE scaling: each type with what it needs (linear needs no context), then what it lacks */
    const char *types[] = {"linear", "dynamic", "yarn", "llama3"};
    for (int i = 0; i < 4; i++) {
        config_defaults(&c);
        snprintf(c.model.rope_scaling, sizeof c.model.rope_scaling, "%s", types[i]);
        c.model.rope_factor = 4;
        c.model.rope_original_max_position = 4096;
        st = run_child(validate_cfg, &c, NULL, 0, err, sizeof err);
        EXPECT(st == 0, "rope_scaling %s rejected: %s", types[i], err);
        if (i == 0) continue;
        c.model.rope_original_max_position = 0;
        expect_invalid(tc, &c, "model.rope_original_max_position", types[i]);
        if (tc->current_failed) return;
    }
    config_defaults(&c);
    snprintf(c.model.rope_scaling, sizeof c.model.rope_scaling, "llama3");
    c.model.rope_original_max_position = 8192;
    c.model.rope_low_freq_factor = 4;
    c.model.rope_high_freq_factor = 4;
    expect_invalid(tc, &c, "model.rope_high_freq_factor = 4", "model.rope_low_freq_factor = 4");
    if (tc->current_failed) return;
    config_defaults(&c);
    snprintf(c.model.rope_scaling, sizeof c.model.rope_scaling, "yarn");
    c.model.rope_original_max_position = 8192;
    c.model.rope_beta_slow = 64;
    expect_invalid(tc, &c, "model.rope_beta_fast = 32", "model.rope_beta_slow = 64");
    if (tc->current_failed) return;
    config_defaults(&c);
    c.model.rope_factor = 0.5f; /* a factor below 1 shrinks the context */
    expect_invalid(tc, &c, "model.rope_factor", "out of range");
}

typedef struct TakeModel {
    const RunConfig *c;
    const char *stored;
} TakeModel;

static void take_model(const void *arg) {
    const TakeModel *t = arg;
    RunConfig c = *t->c;
    config_take_model(&c, t->stored, "ckpt.h5");
}

/* train.init_from's stored config supplies the model keys no file or --set gave; a given one that
 * contradicts it stops naming both values, except the keys a continued run may change. */
/* Sequence-split context parallelism on CUDA takes every attention kind: dense layers (the ring kernels of
 * attention_ring.cu), MSA and window layers (the MSA kernels read the rank's query rows through query_index and
 * the fetched blocks through key_rows, kernels/cuda/NOTES.md); what it does not take is refused as on the CPU. */
TEST(sequence_cp_on_cuda_takes_every_attention_kind) {
    RunConfig c;
    config_defaults(&c);
    snprintf(c.train.device, sizeof c.train.device, "cuda");
    c.dist.cp = 4; /* > the 2 KV heads: auto picks sequence */
    char err[4096];
    static const char *const kinds[] = {"dense", "msa", "window"};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        snprintf(c.model.attention, sizeof c.model.attention, "%s", kinds[i]);
        snprintf(c.model.msa_layers, sizeof c.model.msa_layers, "2-");
        int st = run_child(validate_cfg, &c, NULL, 0, err, sizeof err);
        EXPECT(st == 0, "model.attention = %s under sequence cp on cuda refused: %s", kinds[i], err);
    }
    c.model.dropout = 0.1f;
    expect_invalid(tc, &c, "dist.cp_mode = sequence (dist.cp = 4)", "does not take model.dropout");
}

TEST(model_from_the_checkpoint) {
    RunConfig stored;
    config_defaults(&stored);
    stored.model.d_model = 96;
    stored.model.n_layers = 3;
    stored.model.vocab_size = 65;
    stored.model.qk_norm = true;
    stored.model.rope_theta = 5e5f;
    char *json = config_to_json(&stored);
    /* a recipe: no model shape, a new attention and a context extension, a train key */
    char path[1024];
    join(path, sizeof path, FX->dir, "recipe.json");
    write_text(path, "{\"model\": {\"attention\": \"msa\", \"rope_scaling\": \"yarn\", \"rope_factor\": 4,"
                     " \"rope_original_max_position\": 4096, \"rope_theta\": 1e6}, \"train\": {\"steps\": 7}}");
    RunConfig c;
    config_defaults(&c);
    config_load(&c, path);
    config_set(&c, "model.n_layers=3"); /* given and equal: no contradiction */
    config_take_model(&c, json, "ckpt.h5");
    EXPECT(c.model.d_model == 96 && c.model.n_layers == 3 && c.model.vocab_size == 65 && c.model.qk_norm,
           "shape keys not taken: d_model %d n_layers %d vocab %d", c.model.d_model, c.model.n_layers,
           c.model.vocab_size);
    EXPECT(!strcmp(c.model.attention, "msa") && !strcmp(c.model.rope_scaling, "yarn") && c.model.rope_theta == 1e6f &&
               c.train.steps == 7,
           "the recipe's own keys were overwritten");
    /* vocab_size 0 ("from the data") takes the stored size */
    config_defaults(&c);
    config_set(&c, "model.vocab_size=0");
    config_take_model(&c, json, "ckpt.h5");
    EXPECT(c.model.vocab_size == 65, "vocab_size 0 -> %d", c.model.vocab_size);
    /* contradictions, from a file and from --set, name both values and the checkpoint */
    const char *sets[] = {"model.d_model=128", "model.qk_norm=false", "model.n_layers=4"};
    const char *words[][2] = {{"model.d_model = 128", "model.d_model = 96"},
                              {"model.qk_norm = false", "model.qk_norm = true"},
                              {"model.n_layers = 4", "model.n_layers = 3"}};
    for (int i = 0; i < 3; i++) {
        config_defaults(&c);
        config_set(&c, sets[i]);
        char err[4096];
        TakeModel t = {&c, json};
        int st = run_child(take_model, &t, NULL, 0, err, sizeof err);
        EXPECT(st == 1 && strstr(err, words[i][0]) && strstr(err, words[i][1]) && strstr(err, "ckpt.h5"),
               "%s: status %d, %s", sets[i], st, err);
    }
    free(json);
}

static bool sel(RunConfig *c, const char *s, int l) {
    snprintf(c->model.msa_layers, sizeof c->model.msa_layers, "%s", s);
    return !strcmp(config_layer_attention(c, l), "msa");
}

TEST(layer_selectors) {
    RunConfig c;
    config_defaults(&c);
    c.model.n_layers = 8;
    snprintf(c.model.attention, sizeof c.model.attention, "msa");
    struct {
        const char *s;
        const char *want; /* '1' = MSA, per layer 0..7 */
    } cases[] = {
        {"all", "11111111"}, {"none", "00000000"}, {"3-", "00011111"},  {"1-4", "01111000"},
        {"0,2,5", "10100100"}, {"0,3-5", "10011100"}, {" 6 , 1 ", "01000010"}, {"7", "00000001"},
        {"2-2,6-", "00100011"}, {"0-7", "11111111"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int l = 0; l < 8; l++)
            EXPECT(sel(&c, cases[i].s, l) == (cases[i].want[l] == '1'), "\"%s\" layer %d", cases[i].s, l);
        char err[4096];
        int st = run_child(validate_cfg, &c, NULL, 0, err, sizeof err);
        EXPECT(st == 0, "\"%s\" rejected: %s", cases[i].s, err);
    }
    EXPECT(!sel(&c, "all", 8) && !sel(&c, "all", -1), "layers outside the model");
    /* dense attention: the selector does not matter */
    snprintf(c.model.attention, sizeof c.model.attention, "dense");
    EXPECT(!sel(&c, "all", 0), "dense attention with msa_layers all");
    /* the same syntax for MoE */
    snprintf(c.model.ffn, sizeof c.model.ffn, "moe");
    snprintf(c.model.moe_layers, sizeof c.model.moe_layers, "3-");
    for (int l = 0; l < 8; l++) EXPECT(!strcmp(config_layer_ffn(&c, l), "moe") == (l >= 3), "moe layer %d", l);

    const char *bad[] = {"", "x", "4-1", "1-2-3", "0,,1", "-3", "1,", "all,1", "8", "3-9", "99999999999"};
    snprintf(c.model.attention, sizeof c.model.attention, "msa");
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(c.model.msa_layers, sizeof c.model.msa_layers, "%s", bad[i]);
        expect_invalid(tc, &c, "model.msa_layers", NULL);
        if (tc->current_failed) {
            printf("    (selector \"%s\")\n", bad[i]);
            return;
        }
    }
}

TEST(help_table_and_readme) {
    static char out[1 << 16];
    char err[4096];
    int st = run_child(print_help, NULL, out, sizeof out, err, sizeof err);
    EXPECT(st == 0, "help: status %d", st);
    EXPECT(!strncmp(out, "| section | key | type | default | allowed | meaning |\n| --- |", 58), "header: %.80s", out);
    /* every key of every section, once: count the rows against the JSON of the defaults */
    RunConfig c;
    config_defaults(&c);
    char *json = config_to_json(&c);
    int keys = 0;
    for (const char *p = json; (p = strstr(p, "\": ")); p++)
        if (p[3] != '{') keys++;
    int rows = 0;
    for (const char *p = out; (p = strchr(p, '\n')); p++) rows++;
    EXPECT(rows == keys + 2, "help has %d rows for %d keys", rows - 2, keys);
    EXPECT(strstr(out, "| model | d_model | int | `128` |") && strstr(out, "| optim | lr | float | `0.001` |") &&
               strstr(out, "| train | device | string | `\"cpu\"` |") && strstr(out, "| train | seed | uint64 | `1337` |"),
           "rows: %s", out);
    free(json);

    /* configs/README.md carries the same table */
    char path[1024];
    join(path, sizeof path, FX->root, "configs/README.md");
    FILE *f = fopen(path, "r");
    EXPECT(f, "cannot read %s", path);
    static char readme[1 << 17];
    size_t n = fread(readme, 1, sizeof readme - 1, f);
    readme[n] = 0;
    fclose(f);
    EXPECT(strstr(readme, out), "%s does not contain the table config_print_help prints (regenerate it)", path);
}

int main(void) {
    TEST_BEGIN();
    Fixture fx;
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_test_config_%d", (int)getpid());
    if (mkdir(fx.dir, 0755) != 0 && errno != EEXIST) {
        perror(fx.dir);
        return 1;
    }
    char exe[400];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    for (int up = 0; up < 3; up++) { /* build/tests/test_config -> the repository */
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
    }
    snprintf(fx.root, sizeof fx.root, "%s", exe);
    tc->fixture = &fx;
    RUN(defaults_are_valid);
    RUN(sample_json_loads);
    RUN(shipped_configs_load);
    RUN(bad_files_name_the_problem);
    RUN(set_overrides);
    RUN(non_utf8_strings_are_refused_not_dropped);
    RUN(json_round_trip);
    RUN(validation_cross_keys);
    RUN(sequence_cp_on_cuda_takes_every_attention_kind);
    RUN(model_from_the_checkpoint);
    RUN(layer_selectors);
    RUN(help_table_and_readme);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", fx.dir);
    if (system(cmd) != 0) printf("  (could not remove %s)\n", fx.dir);
    TEST_END();
}
