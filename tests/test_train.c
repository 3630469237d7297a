/* Integration tests of the training program: the tiny config learns, runs are reproducible,
 * recomputation changes nothing, and bad input stops the program with a message naming the problem.
 * Run from the repository root after `make data` (make test does both). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../train/trainer.h"
#include "test.h"

#define TINY "configs/tiny.json"

/* Run `steps` steps of the tiny config quietly; fill losses[]; return the final validation loss. */
static double train_tiny_dropout(int steps, bool recompute, uint64_t seed, float dropout, double *losses) {
    Run r;
    memset(&r, 0, sizeof r);
    r.quiet = true;
    config_defaults(&r.cfg);
    config_load(&r.cfg, TINY);
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
    memset(&r, 0, sizeof r);
    r.quiet = true;
    config_defaults(&r.cfg);
    config_load(&r.cfg, TINY);
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

int main(void) {
    TEST_BEGIN();
    RUN(tiny_config_loss_falls);
    RUN(same_seed_same_losses_and_recompute_identical);
    RUN(dropout_reproducible_and_recompute_identical);
    RUN(sampler_distribution_matches_the_loss);
    RUN(bad_input_exits_with_a_message);
    TEST_END();
}
