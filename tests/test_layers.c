/* The layers floor (layers/layer.h): the registry gives the config its choices; requires() stops a
 * config whose kernels the backend cannot run at validation, before anything is built, with the limit
 * named; the rule on a selection's forced blocks lives in one function; and the KL statistic is the
 * unweighted KL whatever msa.kl_weight is. Run from the repository root after `make data`. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../layers/msa.h"
#include "../train/trainer.h"
#include "gradcheck.h"
#include "test.h"

static void validate(const void *c) { config_validate(c); }

/* config_validate(c) in a child process: its exit status, and its stderr in err */
static int validate_in_child(const RunConfig *c, char *err, size_t n) { return test_run_child(validate, c, err, n); }

static RunConfig msa_config(const char *device) {
    RunConfig c;
    config_defaults(&c);
    snprintf(c.model.attention, sizeof c.model.attention, "msa");
    snprintf(c.train.device, sizeof c.train.device, "%s", device);
    return c;
}

/* Every variant layers.def lists is a value the config accepts for its key, and nothing else is. */
TEST(registry_gives_the_config_its_choices) {
    const struct {
        LayerRole role;
        const char *key, *names;
    } roles[] = {{LAYER_ATTENTION, "model.attention", layer_attention_names}, {LAYER_FFN, "model.ffn", layer_ffn_names}};
    for (int r = 0; r < 2; r++) {
        EXPECT(roles[r].names[0] == '|', "%s: names \"%s\"", roles[r].key, roles[r].names);
        char list[256];
        snprintf(list, sizeof list, "%s", roles[r].names + 1);
        int n = 0;
        for (char *name = strtok(list, "|"); name; name = strtok(NULL, "|"), n++) {
            const LayerKind *k = layer_kind(roles[r].role, name);
            EXPECT(k && k->declare && k->forward && layer_kind(roles[1 - r].role, name) != k, "%s = %s: no such variant",
                   roles[r].key, name);
            RunConfig c;
            config_defaults(&c);
            char set[128];
            snprintf(set, sizeof set, "%s=%s", roles[r].key, name);
            config_set(&c, set); /* exits on a value the key does not accept */
        }
        EXPECT(n >= 2 && layer_kind(roles[r].role, "dense"), "%s: %d variants, dense among them?", roles[r].key, n);
        EXPECT(!layer_kind(roles[r].role, "sparse"), "%s: an unlisted name was found", roles[r].key);
    }
}

/* On the CPU any size runs; with train.device = "cuda" the CUDA kernels' limits (kernels/cuda/limits.h)
 * stop the config at validation, naming the key, the value and the limit. */
TEST(cuda_limits_stop_a_config_at_validation) {
    const struct {
        const char *what;
        int ok, bad;
        const char *key;
    } cases[] = {
        {"top-k", 32, 33, "msa.topk_blocks = 33"},
        {"index dim", 128, 130, "msa.index_dim = 130"},
        {"head dim", 256, 258, "head dimension 258"},
        {"d_model", 8192, 8200, "model.d_model = 8200"},            /* RMSNorm rows */
        {"d_model not a multiple of 8", 2048, 2050, "model.d_model = 2050"},
        {"index heads", 128, 129, "model.n_kv_heads = 129"},        /* one index head per KV head */
    };
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        for (int cuda = 0; cuda < 2; cuda++)
            for (int bad = 0; bad < 2; bad++) {
                RunConfig c = msa_config(cuda ? "cuda" : "cpu");
                const int v = bad ? cases[i].bad : cases[i].ok;
                if (i == 0) c.msa.topk_blocks = v;
                if (i == 1) c.msa.index_dim = v;
                if (i == 2) c.model.head_dim = v;
                if (i == 3 || i == 4) c.model.d_model = v, c.model.head_dim = 64;
                if (i == 5) c.model.n_heads = c.model.n_kv_heads = v, c.model.head_dim = 64;
                char err[4096];
                const int st = validate_in_child(&c, err, sizeof err);
                if (cuda && bad) {
                    EXPECT(st == 1 && strstr(err, cases[i].key) && strstr(err, "CUDA") && strstr(err, "limits.h"),
                           "%s %d on cuda: status %d, message: %s", cases[i].what, v, st, err);
                } else {
                    EXPECT(st == 0, "%s %d on %s refused: %s", cases[i].what, v, cuda ? "cuda" : "cpu", err);
                }
            }
    }
    /* the dense attention has the head-dimension limit too, and a dense model the MSA ones not */
    RunConfig c = msa_config("cuda");
    snprintf(c.model.attention, sizeof c.model.attention, "dense");
    c.msa.topk_blocks = 64;
    char err[4096];
    EXPECT(validate_in_child(&c, err, sizeof err) == 0, "a dense model refused for its msa keys: %s", err);
    c.model.head_dim = 512;
    EXPECT(validate_in_child(&c, err, sizeof err) == 1 && strstr(err, "CUDA_HEAD_DIM_MAX"), "dense head dim 512: %s", err);
}

/* The program stops at validation: before the backend is chosen (this build's CUDA backend may not
 * exist) and before the model or the engine allocate anything. */
TEST(train_program_stops_before_building) {
    char err[4096];
    int st = test_system("build/train configs/shakespeare_msa.json --set train.device=cuda --set msa.topk_blocks=40 "
                         "--set train.out_dir= >/dev/null 2>/tmp/msa_layers_err.txt",
                         "/tmp/msa_layers_err.txt", err, sizeof err, false);
    EXPECT(st == 1 && strstr(err, "msa.topk_blocks = 40") && strstr(err, "CUDA_MSA_TOPK_MAX") &&
               !strstr(err, "no CUDA backend"),
           "status %d: %s", st, err);
}

/* The forced blocks (init + local) must fit the budget: one function says so, for the config and for
 * opcheck's attributes alike. */
TEST(forced_blocks_rule_lives_in_msa_check) {
    char why[256];
    MsaParams p = {.block_size = 8, .topk_blocks = 3, .init_blocks = 1, .local_blocks = 2};
    EXPECT(msa_check(&p, "msa.", why, sizeof why), "init 1 + local 2 = topk 3 refused: %s", why);
    p.local_blocks = 3;
    EXPECT(!msa_check(&p, "msa.", why, sizeof why) && strstr(why, "msa.topk_blocks = 3") && strstr(why, "msa.init_blocks"),
           "init 1 + local 3 > topk 3: %s", why);
    RunConfig c = msa_config("cpu");
    c.msa.topk_blocks = 3, c.msa.init_blocks = 1, c.msa.local_blocks = 3;
    char err[4096];
    EXPECT(validate_in_child(&c, err, sizeof err) == 1 && strstr(err, why), "config: %s (msa_check: %s)", err, why);
}

/* A few steps of the tiny MSA recipe with kl_weight w: the first step's statistics and weighted loss */
static void first_step(float w, StepResult *s, EvalMetrics *em) {
    Run r;
    memset(&r, 0, sizeof r);
    r.quiet = true;
    config_defaults(&r.cfg);
    r.config_path = "configs/shakespeare_msa.json";
    config_load(&r.cfg, r.config_path);
    const char *sets[] = {"model.d_model=32", "model.n_layers=2", "model.ffn_dim=48", "msa.block_size=8",
                          "msa.topk_blocks=3", "msa.index_dim=8", "msa.dense_warmup_steps=0", "train.batch_size=2",
                          "train.seq_len=48", "train.eval_batches=1", "train.out_dir="};
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) config_set(&r.cfg, sets[i]);
    r.cfg.msa.kl_weight = w;
    run_init(&r);
    *s = run_step(&r);
    run_evaluate(&r, em);
    run_free(&r);
}

/* The logged KL is the unweighted one: with msa.kl_weight 0 (the KL trains nothing) or 3 it is the KL
 * that weight 1 puts into the loss. */
TEST(kl_statistic_is_unweighted) {
    StepResult s1, s;
    EvalMetrics e1, e;
    first_step(1.0f, &s1, &e1);
    const double kl1 = metrics_mean(&s1.layers, "kl");
    EXPECT(kl1 > 0 && kl1 == s1.aux, "weight 1: the KL statistic %.9g, the auxiliary loss %.9g", kl1, s1.aux);
    EXPECT(metrics_mean(&e1.layers, "kl") > 0 && metrics_mean(&e1.layers, "recall") > 0, "weight 1: eval kl %g, recall %g",
           metrics_mean(&e1.layers, "kl"), metrics_mean(&e1.layers, "recall"));
    const float weights[] = {0.0f, 3.0f};
    for (int i = 0; i < 2; i++) {
        first_step(weights[i], &s, &e);
        EXPECT(metrics_mean(&s.layers, "kl") == kl1, "weight %g: the step's KL statistic %.9g, unweighted %.9g",
               (double)weights[i], metrics_mean(&s.layers, "kl"), kl1);
        EXPECT(fabs(s.aux - weights[i] * kl1) <= 1e-6 * kl1, "weight %g: auxiliary loss %.9g, weight * KL %.9g",
               (double)weights[i], s.aux, weights[i] * kl1);
        EXPECT(metrics_mean(&e.layers, "kl") > 0, "weight %g: the eval KL is %g", (double)weights[i],
               metrics_mean(&e.layers, "kl"));
    }
}

int main(void) {
    TEST_BEGIN();
    RUN(registry_gives_the_config_its_choices);
    RUN(cuda_limits_stop_a_config_at_validation);
    RUN(train_program_stops_before_building);
    RUN(forced_blocks_rule_lives_in_msa_check);
    RUN(kl_statistic_is_unweighted);
    TEST_END();
}
