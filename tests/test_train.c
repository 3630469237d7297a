/* Integration tests of the training program: the tiny config learns, runs are reproducible,
 * recomputation changes nothing, the sampler prints only text the vocabulary has (and a placeholder for ids
 * beyond it), and bad input stops the program with a message naming the problem: weights that are not
 * finite (named, not called a divergence), a checkpoint's corrupt stored config (with the parser's line and
 * column), token files without a single next-token target (not a val loss of 0).
 * Run from the repository root after `make data` (make test does both). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hdf5.h>

#include "../data/dataset.h"
#include "../train/trainer.h"
#include "gradcheck.h"
#include "test.h"

#define TINY "configs/tiny.json"

/* a quiet run of configs/tiny.json (the caller sets what it varies, then config_path and run_init) */
static void tiny_run_config(Run *r) {
    memset(r, 0, sizeof *r);
    r->quiet = true;
    config_defaults(&r->cfg);
    config_load(&r->cfg, TINY);
}

/* Run `steps` steps of the tiny config quietly; fill losses[]; return the final validation loss. */
static double train_tiny_dropout(int steps, bool recompute, uint64_t seed, float dropout, double *losses) {
    Run r;
    tiny_run_config(&r);
    r.cfg.train.steps = steps;
    r.cfg.train.recompute = recompute;
    r.cfg.train.seed = seed;
    r.cfg.model.dropout = dropout;
    r.config_path = TINY;
    run_init(&r);
    for (int s = 0; s < steps; s++) losses[s] = run_step(&r).loss;
    double val = run_evaluate(&r, NULL);
    run_free(&r);
    return val;
}

static double train_tiny(int steps, bool recompute, uint64_t seed, double *losses) {
    return train_tiny_dropout(steps, recompute, seed, 0.0f, losses);
}

TEST(tiny_config_loss_falls) {
    double losses[60];
    double val = train_tiny(60, false, 1337, losses);
    double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[57] + losses[58] + losses[59]) / 3;
    printf("    train loss %.3f -> %.3f, val loss %.3f\n", first, last, val);
    EXPECT(first > 3.9, "initial loss %.3f should be near ln(65) = 4.17", first);
    EXPECT(first - last > 1.0, "loss fell only %.3f over 60 steps", first - last);
    EXPECT(val < 3.2, "validation loss %.3f after 60 steps", val);
}

TEST(same_seed_same_losses_and_recompute_identical) {
    double a[12], b[12], c[12], d[12];
    train_tiny(12, false, 5, a);
    train_tiny(12, false, 5, b);
    train_tiny(12, true, 5, c);
    train_tiny(12, false, 6, d);
    EXPECT(memcmp(a, b, sizeof a) == 0, "two runs with the same seed differ");
    EXPECT(memcmp(a, c, sizeof a) == 0, "activation recomputation changed the losses");
    EXPECT(memcmp(a, d, sizeof a) != 0, "a different seed gave the same losses");
}

/* train.offload_block_inputs: with recomputation, 4 blocks whose inputs wait on the host between forward
 * and backward, over 2 micro-batches per step: the losses and the final validation loss are those of the
 * run that keeps them on the device, bit for bit. */
static double train_offload(bool offload, double *losses, int *offloaded) {
    Run r;
    tiny_run_config(&r);
    config_set(&r.cfg, "model.n_layers=4");
    config_set(&r.cfg, "train.grad_accum=2");
    r.cfg.train.steps = 6;
    r.cfg.train.recompute = true;
    r.cfg.train.offload_block_inputs = offload;
    r.config_path = TINY;
    run_init(&r);
    for (int s = 0; s < 6; s++) losses[s] = run_step(&r).loss;
    *offloaded = r.engine.n_offloaded; /* the last micro-batch's */
    double val = run_evaluate(&r, NULL);
    run_free(&r);
    return val;
}

TEST(offloaded_block_inputs_change_nothing) {
    double kept[6], offloaded[6];
    int n_kept, n_offloaded;
    const double val_kept = train_offload(false, kept, &n_kept), val_offloaded = train_offload(true, offloaded, &n_offloaded);
    EXPECT(n_kept == 0 && n_offloaded == 4, "block outputs offloaded per micro-batch: %d without, %d with (expected 0, 4)",
           n_kept, n_offloaded);
    EXPECT(memcmp(kept, offloaded, sizeof kept) == 0, "offloading changed the losses (step 6: %.9f vs %.9f)", kept[5],
           offloaded[5]);
    EXPECT(val_kept == val_offloaded, "offloading changed the validation loss: %.9f vs %.9f", val_kept, val_offloaded);
}

/* Run.defer_step_results (run_train on a GPU): the steps not logged leave their loss, aux and norm on the
 * device (NaN in StepResult), the logged ones (log_every 3, the first, the last) read the very values a
 * run that reads every step gets, over 2 micro-batches a step; the training itself is the same. With MSA
 * layers past a 2-step dense warm-up, the KL terms their backwards compute (read with the loss) too. */
static void train_deferred(bool defer, bool msa, StepResult *res) {
    Run r;
    tiny_run_config(&r);
    config_set(&r.cfg, "train.grad_accum=2");
    config_set(&r.cfg, "train.log_every=3");
    if (msa) {
        static const char *sets[] = {"model.attention=msa", "msa.dense_warmup_steps=2", "msa.block_size=8",
                                     "msa.topk_blocks=3", "msa.index_dim=16"};
        for (int i = 0; i < 5; i++) config_set(&r.cfg, sets[i]);
    }
    r.cfg.train.steps = 7;
    r.config_path = TINY;
    run_init(&r);
    r.defer_step_results = defer;
    for (int s = 0; s < 7; s++) res[s] = run_step(&r);
    run_free(&r);
}

TEST(deferred_step_results_read_only_on_logged_steps) {
    for (int msa = 0; msa < 2; msa++) {
        StepResult every[7], deferred[7];
        train_deferred(false, msa, every);
        train_deferred(true, msa, deferred);
        EXPECT(!msa || every[6].aux > 0, "the MSA run reports no KL (aux %g)", every[6].aux);
        for (int s = 0; s < 7; s++) {
            const bool logged = s == 0 || (s + 1) % 3 == 0 || s == 6;
            if (logged)
                EXPECT(deferred[s].loss == every[s].loss && deferred[s].grad_norm == every[s].grad_norm &&
                           deferred[s].aux == every[s].aux,
                       "%s step %d: loss %.9f vs %.9f, aux %.9f vs %.9f, norm %.9f vs %.9f", msa ? "msa" : "dense", s + 1,
                       deferred[s].loss, every[s].loss, deferred[s].aux, every[s].aux, deferred[s].grad_norm,
                       every[s].grad_norm);
            else
                EXPECT(isnan(deferred[s].loss) && isnan(deferred[s].grad_norm) && isfinite(every[s].loss),
                       "%s step %d (not logged): loss %g, norm %g read", msa ? "msa" : "dense", s + 1, deferred[s].loss,
                       deferred[s].grad_norm);
        }
    }
}

/* Dropout: reproducible, the recomputed forward regenerates the same masks (bit-identical losses),
 * and it changes the training losses. */
TEST(dropout_reproducible_and_recompute_identical) {
    double a[8], b[8], c[8], d[8];
    double va = train_tiny_dropout(8, false, 5, 0.2f, a);
    train_tiny_dropout(8, false, 5, 0.2f, b);
    train_tiny_dropout(8, true, 5, 0.2f, c);
    train_tiny_dropout(8, false, 5, 0.0f, d);
    EXPECT(memcmp(a, b, sizeof a) == 0, "two dropout runs with the same seed differ");
    EXPECT(memcmp(a, c, sizeof a) == 0, "activation recomputation changed the dropout losses");
    EXPECT(a[0] != d[0], "dropout 0.2 left the first step's loss unchanged (%.6f)", a[0]);
    EXPECT(isfinite(va) && va < 4.3, "validation loss %.3f", va);
}

/* run build/train with args; capture stderr; return the exit status */
static int run_train_cli(const char *args, char *err, size_t n) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "build/train %s 2>/tmp/msa_train_err.txt >/dev/null", args);
    int st = system(cmd);
    FILE *f = fopen("/tmp/msa_train_err.txt", "r");
    size_t k = f ? fread(err, 1, n - 1, f) : 0;
    err[k] = 0;
    if (f) fclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

/* The sampler's next-token distribution is the model's: over a text, the mean -log p(next token) from
 * run_next_token_probs equals the cross-entropy the loss path gives for the same text (and the
 * distribution is normalised); a longer context uses its last seq_len tokens. */
TEST(sampler_distribution_matches_the_loss) {
    Run r;
    tiny_run_config(&r);
    r.cfg.train.steps = 20;
    r.config_path = TINY;
    run_init(&r);
    for (int s = 0; s < 20; s++) run_step(&r);
    enum { LEN = 40 };
    const int V = r.model.cfg.vocab_size;
    int32_t text[LEN];
    for (int i = 0; i < LEN; i++) text[i] = (int32_t)((i * 7 + 3) % V);
    double *p = xmalloc((size_t)V * sizeof(double)), nll = 0, worst_norm = 0;
    for (int t = 1; t < LEN; t++) {
        run_next_token_probs(&r, text, t, 1.0, p);
        double sum = 0;
        for (int v = 0; v < V; v++) sum += p[v];
        worst_norm = fmax(worst_norm, fabs(sum - 1));
        nll -= log(p[text[t]]) / (LEN - 1);
    }
    double loss = run_text_loss(&r, text, LEN);
    EXPECT(fabs(nll - loss) <= 1e-5 * loss, "sampler -log p %.8f vs loss %.8f", nll, loss);
    EXPECT(worst_norm < 1e-12, "probabilities sum to 1 +- %.2e", worst_norm);
    /* a context longer than seq_len: only its last seq_len tokens count */
    const int T = r.cfg.train.seq_len;
    int32_t *long_ctx = xmalloc((size_t)(T + 5) * sizeof(int32_t));
    for (int i = 0; i < T + 5; i++) long_ctx[i] = (int32_t)((i * 11 + 1) % V);
    double *q = xmalloc((size_t)V * sizeof(double)), diff = 0;
    run_next_token_probs(&r, long_ctx, T + 5, 0.8, p);
    run_next_token_probs(&r, long_ctx + 5, T, 0.8, q);
    for (int v = 0; v < V; v++) diff = fmax(diff, fabs(p[v] - q[v]));
    EXPECT(diff == 0, "a context past seq_len changed the distribution by %.2e", diff);
    printf("    sampler -log p %.6f, loss %.6f\n", nll, loss);
    free(long_ctx);
    free(q);
    free(p);
    run_free(&r);
}

TEST(bad_input_exits_with_a_message) {
    char err[4096];
    EXPECT(run_train_cli("/tmp/msa_no_such_config.json", err, sizeof err) == 1 && strstr(err, "msa_no_such_config.json"),
           "missing config: %s", err);
    write_file("/tmp/msa_bad_key.json", "{\"model\": {\"d_modle\": 64}}");
    EXPECT(run_train_cli("/tmp/msa_bad_key.json", err, sizeof err) == 1 && strstr(err, "d_modle"), "unknown key: %s", err);
    write_file("/tmp/msa_bad_value.json", "{\"train\": {\"steps\": -5}}");
    EXPECT(run_train_cli("/tmp/msa_bad_value.json", err, sizeof err) == 1 && strstr(err, "steps"), "bad value: %s", err);
    write_file("/tmp/msa_bad_type.json", "{\"model\": {\"n_heads\": \"four\"}}");
    EXPECT(run_train_cli("/tmp/msa_bad_type.json", err, sizeof err) == 1 && strstr(err, "n_heads"), "wrong type: %s", err);
    write_file("/tmp/msa_bad_data.json", "{\"data\": {\"train_path\": \"/tmp/msa_missing.h5\", \"val_path\": \"/tmp/msa_missing.h5\"}}");
    EXPECT(run_train_cli("/tmp/msa_bad_data.json", err, sizeof err) == 1 && strstr(err, "msa_missing.h5"), "missing data: %s", err);
    write_file("/tmp/msa_bad_heads.json",
               "{\"model\": {\"n_heads\": 4, \"n_kv_heads\": 3}, \"data\": {\"train_path\": \"data/shakespeare/train.h5\", "
               "\"val_path\": \"data/shakespeare/val.h5\"}}");
    EXPECT(run_train_cli("/tmp/msa_bad_heads.json", err, sizeof err) == 1 && strstr(err, "n_kv_heads"), "bad heads: %s", err);
    EXPECT(run_train_cli(TINY " --set train.nonsense=1", err, sizeof err) == 1 && strstr(err, "nonsense"), "bad --set: %s", err);
    EXPECT(run_train_cli(TINY " --frobnicate", err, sizeof err) == 1 && strstr(err, "frobnicate"), "bad option: %s", err);
}

/* build/train with args to the end: its exit status (-signal when killed) and its stdout and stderr. */
static int train_output(const char *args, char *out, size_t n) {
    char log[64];
    snprintf(log, sizeof log, "/tmp/msa_train_out_%d.txt", (int)getpid());
    int st;
    waitpid(test_spawn_train(args, NULL, log), &st, 0);
    size_t len;
    char *text = test_read_file(log, &len);
    snprintf(out, n, "%s", text ? text : "");
    free(text);
    unlink(log);
    return WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? -WTERMSIG(st) : -1000;
}

/* model.vocab_size 200 over the 65 characters of the data: the untrained model samples ids past the
 * alphabet, which print as "<id N>" (they once read past the alphabet's string: garbage, a heap over-read);
 * every other byte of the sample is a character of the alphabet, and the tokens add up to the count asked. */
TEST(sample_never_reads_past_the_vocabulary) {
    TokenDataset ds;
    dataset_open(&ds, "data/shakespeare/train.h5");
    EXPECT(ds.vocab && !memchr(ds.vocab, '<', (size_t)ds.vocab_size), "the test needs a char alphabet without '<'");
    static char out[65536];
    int st = train_output(TINY " --set model.vocab_size=200 --set train.steps=1 --set train.eval_batches=1 "
                               "--set train.sample_tokens=300",
                          out, sizeof out);
    const char *begin = strstr(out, "----\n"), *end = strstr(out, "\n---- end of sample ----");
    EXPECT(st == 0 && begin && end && begin < end, "status %d, no sample in: %s", st, out);
    begin += 5;
    int tokens = 0, placeholders = 0;
    for (const char *p = begin; p < end; tokens++) {
        int id, len = 0;
        if (sscanf(p, "<id %d>%n", &id, &len) == 1 && len > 0) {
            EXPECT(id >= ds.vocab_size && id < 200, "placeholder for id %d, which %s", id,
                   id < ds.vocab_size ? "has text" : "the model cannot sample");
            placeholders++;
            p += len;
        } else {
            EXPECT(*p && memchr(ds.vocab, *p, (size_t)ds.vocab_size), "byte 0x%02x at %d is not in the alphabet",
                   (unsigned char)*p, (int)(p - begin));
            p++;
        }
    }
    printf("    %d tokens sampled, %d of them ids past the alphabet\n", tokens, placeholders);
    EXPECT(tokens == 300 && placeholders > 0, "%d tokens (want 300), %d placeholders", tokens, placeholders);
    dataset_close(&ds);
}

/* In a child (fatal ends it, not the test): the tiny run with element 3 of parameter tensor `name` set to
 * NaN, then one step. */
static void step_with_a_nan_weight(const void *name) {
    Run r;
    tiny_run_config(&r);
    r.config_path = TINY;
    run_init(&r);
    for (int i = 0; i < r.model.params.n; i++)
        if (!strcmp(r.model.params.p[i].t->name, name)) ((float *)r.model.params.p[i].t->data)[3] = NAN;
    run_step(&r);
}

/* Weights that are not finite make the loss NaN whatever the learning rate: the message names the tensor
 * and where the weights came from, not a divergence to cure by lowering optim.lr (as it once did); finite
 * weights and a loss that overflows are still a divergence. The first test main runs: its child computes
 * with OpenMP, which can hang in a child forked from a process whose OpenMP threads have run. */
TEST(nan_weights_are_named_not_called_a_divergence) {
    char err[4096];
    int st = test_run_child(step_with_a_nan_weight, "layers.1.attn.wk", err, sizeof err);
    EXPECT(st == 1 && strstr(err, "parameter tensor layers.1.attn.wk holds 1 non-finite values of ") &&
               strstr(err, "(element 3 is nan)") && strstr(err, "initial weights") && !strstr(err, "diverged"),
           "status %d: %s", st, err);
    /* a learning rate of 1e30 overflows the activations within a few steps while the weights stay finite */
    st = train_output(TINY " --set optim.lr=1e30 --set optim.min_lr=0 --set optim.warmup_steps=0 --set train.steps=20",
                      err, sizeof err);
    EXPECT(st == 1 && strstr(err, "with finite weights (diverged); lower optim.lr"), "lr 1e30: status %d: %s", st, err);
}

/* Replace a root string attribute of an HDF5 file. */
static bool set_string_attr(const char *path, const char *name, const char *value) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (f < 0) return false;
    H5Adelete(f, name);
    hid_t type = H5Tcopy(H5T_C_S1), space = H5Screate(H5S_SCALAR);
    H5Tset_size(type, H5T_VARIABLE);
    hid_t a = H5Acreate2(f, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    bool ok = a >= 0 && H5Awrite(a, type, &value) >= 0;
    if (a >= 0) H5Aclose(a);
    H5Sclose(space);
    H5Tclose(type);
    return H5Fclose(f) >= 0 && ok;
}

/* A checkpoint whose stored config is not JSON: --resume says where the parser stopped and why (it once
 * said "not valid JSON ()", the text of a later, successful parse). */
TEST(corrupt_stored_config_names_line_and_column) {
    char dir[] = "/tmp/msa_train_cfg_XXXXXX", args[512], ckpt[128], out[8192];
    EXPECT(mkdtemp(dir), "mkdtemp");
    snprintf(args, sizeof args, TINY " --set train.steps=1 --set train.eval_batches=1 --set train.out_dir=%s", dir);
    int st = train_output(args, out, sizeof out);
    snprintf(ckpt, sizeof ckpt, "%s/ckpt_00000001.h5", dir);
    EXPECT(st == 0 && set_string_attr(ckpt, "config", "{\"model\": {\"d_model\": 64,,}}"), "setup: status %d: %s", st,
           out);
    snprintf(args, sizeof args, TINY " --set train.steps=2 --set train.eval_batches=1 --set train.out_dir=%s --resume",
             dir);
    st = train_output(args, out, sizeof out);
    EXPECT(st == 1 && strstr(out, ckpt) && strstr(out, "is not valid JSON: line 1, column 26: ") && !strstr(out, "()"),
           "status %d: %s", st, out);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    EXPECT(system(cmd) == 0, "%s", cmd);
}

/* Token files from text through build/prepare_text with "|" between documents; split at half the tokens. */
static bool prepare_tokens(const char *dir, const char *text) {
    char path[256], cmd[1024];
    snprintf(path, sizeof path, "%s/input.txt", dir);
    FILE *f = fopen(path, "w");
    if (!f) return false;
    fputs(text, f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "build/prepare_text --tokenizer char --val-fraction 0.5 --doc-separator '|' %s %s >/dev/null",
             path, dir);
    return system(cmd) == 0;
}

/* n letters of one document, then `singles` documents of 1 letter, then `tail` letters of one document */
static char *documents(int n, int singles, int tail) {
    char *t = xmalloc((size_t)(n + 2 * singles + tail) + 2), *p = t;
    for (int i = 0; i < n; i++) *p++ = (char)('a' + i % 26);
    for (int i = 0; i < singles; i++) {
        *p++ = '|';
        *p++ = (char)('a' + i % 26);
    }
    if (tail) *p++ = '|';
    for (int i = 0; i < tail; i++) *p++ = (char)('a' + i % 26);
    *p = 0;
    return t;
}

/* A token is a target only within its document: a file of 1-token documents has none, and its loss, once
 * reported as 0.0000, is refused at start-up with the file named; validation batches that happen to hold no
 * target are not counted as a loss of 0 in the mean, and an eval with none at all is refused. */
TEST(files_without_targets_are_refused) {
    char dir[] = "/tmp/msa_train_docs_XXXXXX", args[1024], out[8192];
    EXPECT(mkdtemp(dir), "mkdtemp");
    char *text = documents(2000, 2000, 0); /* train.h5: the long document; val.h5: 2000 documents of 1 token */
    bool made = prepare_tokens(dir, text);
    free(text);
    EXPECT(made, "prepare_text failed");
    snprintf(args, sizeof args,
             TINY " --set train.steps=1 --set train.eval_batches=1 --set data.train_path=%s/train.h5 --set "
                  "data.val_path=%s/val.h5",
             dir, dir);
    int st = train_output(args, out, sizeof out);
    EXPECT(st == 1 && strstr(out, "val.h5 (data.val_path): each of its 2000 documents is 1 token long"), "val: %d: %s",
           st, out);
    snprintf(args, sizeof args,
             TINY " --set train.steps=1 --set train.eval_batches=1 --set data.train_path=%s/val.h5 --set "
                  "data.val_path=%s/train.h5",
             dir, dir);
    st = train_output(args, out, sizeof out);
    EXPECT(st == 1 && strstr(out, "val.h5 (data.train_path): each of its 2000 documents is 1 token long"),
           "train: %d: %s", st, out);
    /* val.h5: 1500 documents of 1 token, then one of 1500: eval batches 0 and 1 (tokens [0, 1024) of 8 rows of
     * 64) have no target, batches 2 and 3 have */
    text = documents(3000, 1500, 1499);
    made = prepare_tokens(dir, text);
    free(text);
    EXPECT(made, "prepare_text failed");
    snprintf(args, sizeof args,
             TINY " --set train.steps=1 --set train.eval_batches=1 --set data.train_path=%s/train.h5 --set "
                  "data.val_path=%s/val.h5",
             dir, dir);
    st = train_output(args, out, sizeof out);
    EXPECT(st == 1 && strstr(out, "the 1 validation batches (train.eval_batches) hold no targets"), "1 batch: %d: %s",
           st, out);
    snprintf(args, sizeof args,
             TINY " --set train.steps=1 --set train.eval_batches=4 --set data.train_path=%s/train.h5 --set "
                  "data.val_path=%s/val.h5",
             dir, dir);
    st = train_output(args, out, sizeof out);
    /* the model after one step at a warm-up LR of 4e-4 is still near uniform: its loss is near ln 26 = 3.26;
     * counting the two empty batches as 0 would halve it */
    const char *v = strstr(out, "val loss ");
    double val = v ? strtod(v + 9, NULL) : NAN;
    printf("    val loss over the 2 measured batches of 4: %.4f (ln 26 = %.4f)\n", val, log(26.0));
    EXPECT(st == 0 && fabs(val - log(26.0)) < 0.3, "4 batches: status %d, val loss %g: %s", st, val, out);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    EXPECT(system(cmd) == 0, "%s", cmd);
}

int main(void) {
    TEST_BEGIN();
    RUN(nan_weights_are_named_not_called_a_divergence); /* first: it forks a child that computes */
    RUN(tiny_config_loss_falls);
    RUN(same_seed_same_losses_and_recompute_identical);
    RUN(dropout_reproducible_and_recompute_identical);
    RUN(offloaded_block_inputs_change_nothing);
    RUN(deferred_step_results_read_only_on_logged_steps);
    RUN(sampler_distribution_matches_the_loss);
    RUN(bad_input_exits_with_a_message);
    RUN(sample_never_reads_past_the_vocabulary);
    RUN(corrupt_stored_config_names_line_and_column);
    RUN(files_without_targets_are_refused);
    TEST_END();
}
