/* build/forward: the logits of a checkpoint on one token sequence, for checking an import against
 * a reference implementation (tests/test_import.py) and for scripts.
 *
 *   build/forward CONFIG.json CHECKPOINT.h5 TOKENS.h5 OUT.h5 [--set section.key=value]...
 *
 * Builds the model CONFIG.json describes, loads CHECKPOINT.h5's parameters (MSA index parameters the
 * checkpoint lacks keep their fresh initialisation, as train.init_from does), runs the forward
 * (no gradients) over the int32 dataset "tokens" of TOKENS.h5 as one document (positions 0..T-1),
 * and writes the logits as dataset "logits", float32 [T, V], to OUT.h5. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../data/h5read.h"
#include "../kernels/util.h"
#include "../train/config.h"
#include "../train/inference.h"

static void usage(FILE *f) {
    fprintf(f, "usage: build/forward CONFIG.json CHECKPOINT.h5 TOKENS.h5 OUT.h5 [--set section.key=value]...\n"
               "Writes the logits (float32 [T, V], dataset \"logits\") of the checkpoint's model on the int32\n"
               "dataset \"tokens\" of TOKENS.h5, read as one document.\n");
}

/* The 1-D integer dataset "tokens" of path, as int32 (malloc'd); *n gets its length. */
static int32_t *read_tokens(const char *path, int64_t *n) {
    H5Reader rd;
    h5r_open(&rd, path, "token file", NULL, true);
    const H5DatasetSpec spec = {.mem_type = H5T_NATIVE_INT32, .ndim = 1};
    H5Shape shape;
    void *tokens;
    h5r_dataset_read(&rd, rd.file, "tokens", &spec, true, &shape, &tokens);
    h5r_close(&rd);
    if (shape.dims[0] == 0 || shape.dims[0] > 0x7fffffff)
        fatal("%s: dataset \"tokens\" has %lld tokens (1 to 2^31 - 1 make a document)", path, (long long)shape.dims[0]);
    *n = shape.dims[0];
    return tokens;
}

/* logits [T, V] float32 to path (through path.tmp, so a failed run leaves no half file) */
static void write_logits(const char *path, const float *logits, int64_t T, int64_t V) {
    char *tmp = xmalloc(strlen(path) + 5);
    sprintf(tmp, "%s.tmp", path);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) fatal("%s: cannot create", tmp);
    hsize_t dims[2] = {(hsize_t)T, (hsize_t)V};
    hid_t space = H5Screate_simple(2, dims, NULL);
    hid_t d = H5Dcreate2(f, "logits", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    bool ok = d >= 0 && H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, logits) >= 0;
    if (d >= 0) ok = H5Dclose(d) >= 0 && ok;
    H5Sclose(space);
    ok = H5Fclose(f) >= 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        fatal("%s: cannot write the logits", path);
    }
    free(tmp);
}

int main(int argc, char **argv) {
    const char *pos[4];
    int npos = 0;
    RunConfig cfg;
    config_defaults(&cfg);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) fatal("--set needs section.key=value");
            if (npos < 1) fatal("--set must come after the config file");
            config_set(&cfg, argv[++i]);
        } else if (argv[i][0] == '-') {
            usage(stderr);
            fatal("unknown option %s", argv[i]);
        } else if (npos < 4) {
            pos[npos++] = argv[i];
            if (npos == 1) config_load(&cfg, argv[i]);
        } else fatal("unexpected argument %s", argv[i]);
    }
    if (npos != 4) {
        usage(stderr);
        return 2;
    }
    h5_setup(); /* failures are reported by name, and a failed close does not crash the exit */
    Inference inf;
    inference_open(&inf, &cfg, pos[0], pos[1]);
    int64_t T;
    int32_t *tokens = read_tokens(pos[2], &T);
    float *host = inference_logits(&inf, tokens, T, pos[2], NULL);
    const int64_t V = inf.model.cfg.vocab_size;
    write_logits(pos[3], host, T, V);
    printf("forward: %s on %lld tokens of %s -> %s (logits [%lld, %lld])\n", pos[1], (long long)T, pos[2], pos[3],
           (long long)T, (long long)V);

    free(host);
    free(tokens);
    inference_close(&inf);
    return 0;
}
