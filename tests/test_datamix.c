/* Several training files (data.train_mix): the "path:weight,..." parser and its errors, the files'
 * shared-tokenizer check, window counts that follow the weights (of any scale), determinism in (seed, counter),
 * and a one-file mix drawing exactly the windows of that file alone. */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hdf5.h>

#include "../data/dataset.h"
#include "gradcheck.h"
#include "test.h"

typedef struct Fixture {
    char dir[128];
    char a[256], b[256], c[256], colon[256], other_vocab[256], short_file[256];
} Fixture;

#define FX ((Fixture *)tc->fixture)

/* A token file whose every token is `value` (so a window tells which file it came from). */
static void write_file(const char *path, int64_t n, int32_t value, int vocab_size, const char *tokenizer) {
    int32_t *t = malloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) t[i] = value;
    int64_t offs[2] = {0, n};
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[1] = {(hsize_t)n};
    hid_t sp = H5Screate_simple(1, dims, NULL);
    hid_t d = H5Dcreate2(f, "tokens", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, t);
    H5Dclose(d);
    H5Sclose(sp);
    dims[0] = 2;
    sp = H5Screate_simple(1, dims, NULL);
    d = H5Dcreate2(f, "doc_offsets", H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offs);
    H5Dclose(d);
    H5Sclose(sp);
    sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "vocab_size", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, H5T_NATIVE_INT, &vocab_size);
    H5Aclose(a);
    hid_t st = H5Tcopy(H5T_C_S1);
    H5Tset_size(st, H5T_VARIABLE);
    a = H5Acreate2(f, "tokenizer", st, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, st, &tokenizer);
    H5Aclose(a);
    H5Tclose(st);
    H5Sclose(sp);
    H5Fclose(f);
    free(t);
}

static void open_mix(const void *spec) {
    DataMix mx;
    datamix_open(&mx, spec, "cfg.json");
    datamix_close(&mx);
}

static void sample_mix(const void *spec) {
    DataMix mx;
    datamix_open(&mx, spec, "cfg.json");
    Sampler s;
    sampler_init_mix(&s, &mx, 3);
    Batch b;
    batch_alloc(&b, 8, 16);
    for (int i = 0; i < 8; i++) sampler_next(&s, &b);
    batch_free(&b);
    datamix_close(&mx);
}

static bool batches_equal(const Batch *a, const Batch *b) {
    size_t n = (size_t)a->B * (size_t)a->T * sizeof(int32_t);
    return a->n_segments == b->n_segments && !memcmp(a->inputs, b->inputs, n) && !memcmp(a->targets, b->targets, n) &&
           !memcmp(a->positions, b->positions, n) &&
           !memcmp(a->cu_seqlens, b->cu_seqlens, (size_t)(a->n_segments + 1) * sizeof(int32_t));
}

TEST(parse_weights_and_paths) {
    char spec[8192];
    snprintf(spec, sizeof spec, " %s:5 , %s:3,%s:2 ", FX->a, FX->b, FX->c);
    DataMix mx;
    datamix_open(&mx, spec, "cfg.json");
    EXPECT(mx.n == 3, "%d files", mx.n);
    EXPECT(fabs(mx.weights[0] - 0.5) < 1e-12 && fabs(mx.weights[1] - 0.3) < 1e-12 && fabs(mx.weights[2] - 0.2) < 1e-12,
           "weights %g %g %g", mx.weights[0], mx.weights[1], mx.weights[2]);
    EXPECT(!strcmp(mx.ds[1].path, FX->b), "second file %s", mx.ds[1].path);
    datamix_close(&mx);
    /* the weight follows the last ':', so a path may hold one */
    snprintf(spec, sizeof spec, "%s:1e-3", FX->colon);
    datamix_open(&mx, spec, "cfg.json");
    EXPECT(mx.n == 1 && !strcmp(mx.ds[0].path, FX->colon) && mx.weights[0] == 1.0, "path with a colon");
    datamix_close(&mx);
    datamix_close(&mx); /* twice is harmless */
}

/* Weights of any finite scale: ones whose sum overflows a double keep their proportions (the sum once made
 * every weight 0, so every window came from the last file), and a weight too small next to the largest to
 * be drawn at all is refused rather than silently dropped. */
TEST(huge_weights_keep_their_proportions) {
    char spec[8192], err[4096];
    snprintf(spec, sizeof spec, "%s:1e308,%s:1e308,%s:1.5e308", FX->a, FX->b, FX->c);
    DataMix mx;
    datamix_open(&mx, spec, "cfg.json");
    const double want[3] = {1 / 3.5, 1 / 3.5, 1.5 / 3.5};
    for (int i = 0; i < 3; i++)
        EXPECT(fabs(mx.weights[i] - want[i]) < 1e-12, "weight %d is %g, want %g", i, mx.weights[i], want[i]);
    Sampler s;
    sampler_init_mix(&s, &mx, 5);
    long count[3] = {0, 0, 0};
    enum { WINDOWS = 20000 };
    for (uint64_t w = 0; w < WINDOWS; w++) count[sampler_pick(&s, w)]++;
    for (int i = 0; i < 3; i++) {
        double sigma = sqrt(WINDOWS * want[i] * (1 - want[i]));
        EXPECT(fabs(count[i] - WINDOWS * want[i]) < 5 * sigma, "file %d drew %ld of %d windows, want %.0f", i, count[i],
               WINDOWS, WINDOWS * want[i]);
    }
    datamix_close(&mx);
    snprintf(spec, sizeof spec, "%s:1e-320,%s:1e300", FX->a, FX->b);
    int st = test_run_child(open_mix, spec, err, sizeof err);
    EXPECT(st == 1 && strstr(err, "error: cfg.json: data.train_mix") && strstr(err, FX->a) && strstr(err, "rounds to 0"),
           "a weight 1e-320 next to 1e300: status %d, stderr: %s", st, err);
}

TEST(bad_specs_name_the_problem) {
    char spec[8192], err[4096];
    struct {
        const char *fmt, *want;
    } cases[] = {
        {"%s", "must be path:weight"},
        {"%s:x", "must be a number > 0"},
        {"%s:0", "must be a number > 0"},
        {"%s:-1", "must be a number > 0"},
        {"%s:1,:2", "has no path"},
        {"%s:nan", "must be a number > 0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(spec, sizeof spec, cases[i].fmt, FX->a);
        int st = test_run_child(open_mix, spec, err, sizeof err);
        EXPECT(st == 1 && strstr(err, "error: cfg.json: data.train_mix") && strstr(err, cases[i].want),
               "spec \"%s\": status %d, stderr: %s", spec, st, err);
    }
    int st = test_run_child(open_mix, ",", err, sizeof err);
    EXPECT(st == 1 && strstr(err, "lists no files"), "empty mix: status %d, %s", st, err);
    snprintf(spec, sizeof spec, "%s:1,%s/missing.h5:1", FX->a, FX->dir);
    st = test_run_child(open_mix, spec, err, sizeof err);
    EXPECT(st == 1 && strstr(err, "missing.h5"), "missing file: status %d, %s", st, err);
    snprintf(spec, sizeof spec, "%s:1,%s:1", FX->a, FX->other_vocab);
    st = test_run_child(open_mix, spec, err, sizeof err);
    EXPECT(st == 1 && strstr(err, FX->a) && strstr(err, FX->other_vocab) && strstr(err, "share the tokenizer"),
           "vocab mismatch: status %d, %s", st, err);
    /* a file too short for the windows is named when the sampler reaches it */
    snprintf(spec, sizeof spec, "%s:1,%s:1", FX->a, FX->short_file);
    st = test_run_child(sample_mix, spec, err, sizeof err);
    EXPECT(st == 1 && strstr(err, FX->short_file) && strstr(err, "too few"), "short file: status %d, %s", st, err);
}

TEST(counts_follow_weights_deterministically) {
    char spec[8192];
    snprintf(spec, sizeof spec, "%s:5,%s:3,%s:2", FX->a, FX->b, FX->c);
    DataMix mx;
    datamix_open(&mx, spec, "cfg.json");
    enum { B = 8, T = 4, STEPS = 2500 };
    Sampler s1, s2, s3;
    sampler_init_mix(&s1, &mx, 42);
    sampler_init_mix(&s2, &mx, 42);
    sampler_init_mix(&s3, &mx, 43);
    Batch a, b, c, r;
    batch_alloc(&a, B, T);
    batch_alloc(&b, B, T);
    batch_alloc(&c, B, T);
    batch_alloc(&r, B, T);
    long count[3] = {0, 0, 0};
    bool differs = false;
    for (int step = 0; step < STEPS; step++) {
        uint64_t before = s1.counter;
        sampler_next(&s1, &a);
        sampler_next(&s2, &b);
        sampler_next(&s3, &c);
        EXPECT(batches_equal(&a, &b), "same seed, batch %d differs", step);
        differs |= !batches_equal(&a, &c);
        if (step == 7) { /* a sampler restored at this counter (a resumed run) draws the same batch */
            sampler_next(&(Sampler){.mix = &mx, .seed = 42, .counter = before}, &r);
            EXPECT(batches_equal(&a, &r), "restored sampler differs");
        }
        for (int row = 0; row < B; row++) {
            int file = a.inputs[row * T] - 1; /* file i holds only the token i + 1 */
            EXPECT(file >= 0 && file < 3, "token %d", a.inputs[row * T]);
            EXPECT(sampler_pick(&s1, before + (uint64_t)row) == file, "sampler_pick disagrees with the window");
            count[file]++;
        }
    }
    EXPECT(differs, "another seed gave the same batches");
    double n = (double)STEPS * B, p[3] = {0.5, 0.3, 0.2};
    for (int i = 0; i < 3; i++) {
        double sigma = sqrt(n * p[i] * (1 - p[i]));
        EXPECT(fabs(count[i] - n * p[i]) < 5 * sigma, "file %d drew %ld windows of %.0f, want %.0f +- %.0f", i,
               count[i], n, n * p[i], 5 * sigma);
    }
    batch_free(&a);
    batch_free(&b);
    batch_free(&c);
    batch_free(&r);
    datamix_close(&mx);
}

TEST(one_file_mix_is_the_file_alone) {
    char spec[8192];
    snprintf(spec, sizeof spec, "%s:0.25", FX->b);
    DataMix mx;
    datamix_open(&mx, spec, "cfg.json");
    TokenDataset ds;
    dataset_open(&ds, FX->b);
    Sampler s1, s2;
    sampler_init_mix(&s1, &mx, 9);
    sampler_init(&s2, &ds, 9);
    Batch a, b;
    batch_alloc(&a, 4, 8);
    batch_alloc(&b, 4, 8);
    for (int i = 0; i < 20; i++) {
        sampler_next(&s1, &a);
        sampler_next(&s2, &b);
        EXPECT(batches_equal(&a, &b), "batch %d differs", i);
    }
    batch_free(&a);
    batch_free(&b);
    dataset_close(&ds);
    datamix_close(&mx);
}

int main(void) {
    TEST_BEGIN();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    Fixture fx;
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_test_datamix_%d", (int)getpid());
    if (mkdir(fx.dir, 0755) != 0 && errno != EEXIST) {
        perror(fx.dir);
        return 1;
    }
    snprintf(fx.a, sizeof fx.a, "%s/a.h5", fx.dir);
    snprintf(fx.b, sizeof fx.b, "%s/b.h5", fx.dir);
    snprintf(fx.c, sizeof fx.c, "%s/c.h5", fx.dir);
    snprintf(fx.colon, sizeof fx.colon, "%s/x:y.h5", fx.dir);
    snprintf(fx.other_vocab, sizeof fx.other_vocab, "%s/other.h5", fx.dir);
    snprintf(fx.short_file, sizeof fx.short_file, "%s/short.h5", fx.dir);
    /* different lengths, so the weights (not the sizes) must be what sets the counts */
    write_file(fx.a, 300, 1, 8, "test");
    write_file(fx.b, 1000, 2, 8, "test");
    write_file(fx.c, 50, 3, 8, "test");
    write_file(fx.colon, 40, 4, 8, "test");
    write_file(fx.other_vocab, 100, 1, 9, "test");
    write_file(fx.short_file, 10, 2, 8, "test");
    tc->fixture = &fx;
    RUN(parse_weights_and_paths);
    RUN(huge_weights_keep_their_proportions);
    RUN(bad_specs_name_the_problem);
    RUN(counts_follow_weights_deterministically);
    RUN(one_file_mix_is_the_file_alone);
    const char *files[] = {fx.a, fx.b, fx.c, fx.colon, fx.other_vocab, fx.short_file};
    for (int i = 0; i < 6; i++) unlink(files[i]);
    rmdir(fx.dir);
    TEST_END();
}
