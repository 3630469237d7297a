/* Fuzz target: a checkpoint (train/checkpoint.c). The input does not hold the file's bytes: the project's
 * own writer (checkpoint_write) makes a valid checkpoint of one of three small models (dense, MoE with
 * its /state selection biases, MSA with index parameters), with or without optimizer state and stored
 * config, and the input then keeps or replaces each of its attributes, groups and tensors by a variant
 * (fuzz.h: array for scalar, wrong class, odd strings, wrong or huge shapes, missing, NaN and inf
 * values, a group for a tensor, an unexpected tensor, ...). Starting from the writer's file keeps the
 * target right when the format grows (a new attribute or checksum is kept by decision 0). Then it reads
 * the file as build/train does: the stored config (check_resume_config), the parameters (--resume,
 * init_from and build/forward, with and without MSA index parameters allowed to be missing) and the
 * optimizer state (--resume). What a read accepts must be finite (issue 12: non-finite weights or moments
 * are refused on load). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/backend.h"
#include "../../layers/moe.h"
#include "../../train/checkpoint.h"
#include "fuzz.h"

enum { DENSE, MOE, MSA, N_MODELS };

static struct {
    RunConfig cfg;
    Model model;
    AdamW opt;
    float *params, *m, *v, *bias; /* the values every input starts from (a refused read leaves others) */
} models[N_MODELS];

static void small_config(RunConfig *c, int kind) {
    config_defaults(c);
    c->model.vocab_size = 13;
    c->model.d_model = 8;
    c->model.n_layers = 2;
    c->model.n_heads = 2;
    c->model.n_kv_heads = 1;
    c->model.ffn_dim = 16;
    c->model.tie_embeddings = false;
    if (kind == MOE) {
        strcpy(c->model.ffn, "moe");
        strcpy(c->model.moe_layers, "1-");
        c->moe.num_experts = 4;
        c->moe.experts_per_token = 2;
        c->moe.expert_dim = 8;
        c->moe.shared_experts = 1;
    }
    if (kind == MSA) {
        strcpy(c->model.attention, "msa");
        c->msa.block_size = 8;
        c->msa.topk_blocks = 2;
        c->msa.index_dim = 4;
    }
    config_validate(c);
}

static size_t store_bytes(const Model *m) { return (size_t)m->params.numel * sizeof(float); }

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    for (int k = 0; k < N_MODELS; k++) {
        small_config(&models[k].cfg, k);
        Model *m = &models[k].model;
        model_build(m, &models[k].cfg, &cpu_backend, DT_F32, 1234 + (uint64_t)k);
        adamw_init(&models[k].opt, &m->params);
        size_t n = (size_t)m->params.numel;
        models[k].params = malloc(store_bytes(m));
        models[k].m = malloc(store_bytes(m));
        models[k].v = malloc(store_bytes(m));
        memcpy(models[k].params, m->params.data, store_bytes(m));
        /* moments as a trained run has them: m of either sign, v positive */
        for (size_t i = 0; i < n; i++) {
            models[k].m[i] = (float)((int)(i % 7) - 3) * 1e-3f;
            models[k].v[i] = (float)(1 + i % 5) * 1e-6f;
        }
        models[k].bias = calloc((size_t)m->cfg.n_layers * 4, sizeof(float));
        for (int l = 0; l < m->cfg.n_layers; l++)
            if (moe_layer_of(&m->layers[l].ffn))
                for (int e = 0; e < 4; e++) models[k].bias[l * 4 + e] = 0.01f * (float)(e - l);
    }
    return 0;
}

/* Every input starts from the same model and optimizer (a refused read may have overwritten some). */
static void restore(int k) {
    Model *m = &models[k].model;
    AdamW *opt = &models[k].opt;
    memcpy(m->params.data, models[k].params, store_bytes(m));
    memcpy(opt->m, models[k].m, store_bytes(m));
    memcpy(opt->v, models[k].v, store_bytes(m));
    opt->t = 7;
    for (int l = 0; l < m->cfg.n_layers; l++)
        if (moe_layer_of(&m->layers[l].ffn))
            moe_bias_from_host(&moe_layer_of(&m->layers[l].ffn)->p, &models[k].bias[l * 4]);
}

static void write_checkpoint(FuzzBytes *b, int k, const char *path) {
    bool with_opt = fb_pick(b, 4) != 3, with_config = fb_pick(b, 4) != 3; /* imported: neither */
    TrainState st = {.step = 7, .data_counter = 1234, .seed = 99, .best_val_loss = fb_pick(b, 2) ? 2.5 : NAN};
    char *json = with_config ? config_to_json(&models[k].cfg) : NULL;
    fuzz_arm();
    if (setjmp(fuzz_refused)) fuzz_broken("checkpoint_write of a valid model failed (%s)", path);
    checkpoint_write(path, &models[k].model, with_opt ? &models[k].opt : NULL, &st, json);
    free(json);
}

/* Keeps, removes, replaces or adds to the group gname and keeps or replaces each of its tensors. */
static void mutate_group(FuzzBytes *b, hid_t file, const char *gname) {
    if (H5Lexists(file, gname, H5P_DEFAULT) <= 0) return;
    switch (fb_variant(b, 4)) {
    case 1: H5Ldelete(file, gname, H5P_DEFAULT); return;
    case 2: { /* a dataset where the group was */
        H5Ldelete(file, gname, H5P_DEFAULT);
        float one = 1;
        fz_write_dataset(b, file, gname, &(FzArray){H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 1, {1}, &one});
        return;
    }
    case 3: { /* a tensor no model has */
        hid_t g = H5Gopen2(file, gname, H5P_DEFAULT);
        float one = 1;
        fz_write_dataset(b, g, "layers.99.no_such_param", &(FzArray){H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 1, {1}, &one});
        H5Gclose(g);
        break;
    }
    default: break;
    }
    hid_t g = H5Gopen2(file, gname, H5P_DEFAULT);
    if (g < 0) return;
    H5G_info_t info;
    char names[64][128];
    int n = 0;
    if (H5Gget_info(g, &info) >= 0)
        for (hsize_t i = 0; i < info.nlinks && n < 64; i++)
            if (H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, names[n], sizeof names[n], H5P_DEFAULT) > 0) n++;
    for (int i = 0; i < n; i++) fz_mutate_dataset(b, g, names[i]);
    H5Gclose(g);
}

static void mutate_checkpoint(FuzzBytes *b, const char *path) {
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    if (f < 0) fuzz_broken("cannot open the checkpoint just written (%s)", path);
    static const char *const attrs[] = {"format", "version", "step", "adam_t", "data_counter", "seed",
                                        "best_val_loss", "config"};
    for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++) fz_mutate_attr(b, f, attrs[i]);
    static const char *const groups[] = {"params", "optimizer/m", "optimizer/v", "optimizer", "state"};
    for (size_t i = 0; i < sizeof groups / sizeof groups[0]; i++) mutate_group(b, f, groups[i]);
    H5Fclose(f);
}

static void check_finite(const char *what, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) fuzz_broken("a checkpoint read accepted a non-finite value in the %s (element %lld)", what, (long long)i);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static FuzzBytes b; /* static: it outlives the jumps back from refusals */
    static int k;
    b = (FuzzBytes){data, size};
    k = (int)fb_pick(&b, N_MODELS);
    Model *m = &models[k].model;
    restore(k);
    const char *path = fuzz_scratch_path();
    write_checkpoint(&b, k, path);
    mutate_checkpoint(&b, path);
    fuzz_close_hdf5();
    bool allow_missing_index = fb_pick(&b, 2);

    fuzz_arm();
    if (setjmp(fuzz_refused) == 0) free(checkpoint_read_config(path));
    fuzz_close_hdf5();

    fuzz_arm();
    if (setjmp(fuzz_refused) == 0) {
        int loaded = checkpoint_read_params(path, m, allow_missing_index);
        if (loaded < 0 || loaded > m->params.n) fuzz_broken("checkpoint_read_params loaded %d tensors", loaded);
        check_finite("parameters", m->params.data, m->params.numel);
    }
    fuzz_close_hdf5();

    fuzz_arm();
    if (setjmp(fuzz_refused) == 0) {
        TrainState st;
        checkpoint_read_state(path, m, &models[k].opt, &st);
        if (st.step < 0 || models[k].opt.t < 0) fuzz_broken("checkpoint_read_state accepted step %lld", (long long)st.step);
        check_finite("first moments", models[k].opt.m, m->params.numel);
        check_finite("second moments", models[k].opt.v, m->params.numel);
    }
    fuzz_close_hdf5();
    return 0;
}
