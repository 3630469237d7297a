/* Token data: tools/prepare_text (run as a program, as users run it) and data/dataset.c. Round trips
 * through the char and byte tokenizers, the exact 90/10 split, document boundaries in batches
 * (cu_seqlens, positions, ignored targets) against hand-computed expectations, sampler determinism,
 * and every malformed input ending the program with status 1 and a message naming the file. */
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
    char dir[128];  /* scratch directory of this run */
    char tool[512]; /* build/prepare_text next to this test's build/tests/ */
    char train[512]; /* build/train, there too */
} Fixture;

#define FX ((Fixture *)tc->fixture)

/* ---- helpers ---------------------------------------------------------------------------------- */

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fwrite(data, 1, n, f);
    fclose(f);
}

/* The bytes of a file (malloc'd; NULL when it cannot be read), *n of them. */
static char *read_whole(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)(len > 0 ? len : 1));
    *n = fread(buf, 1, (size_t)(len > 0 ? len : 0), f);
    fclose(f);
    return buf;
}

/* dst = a/b; the paths here are short, a long one is a broken test setup */
static void join(char *dst, size_t n, const char *a, const char *b) {
    if (snprintf(dst, n, "%s/%s", a, b) >= (int)n) {
        fprintf(stderr, "path too long: %s/%s\n", a, b);
        exit(2);
    }
}

static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Runs a shell command with stdout and stderr captured; returns the exit status (-1 if killed). */
static int run_cmd(const Fixture *fx, const char *cmd, char *err, size_t errn) {
    char full[8192], errpath[1024];
    join(errpath, sizeof errpath, fx->dir, "cmd.err");
    snprintf(full, sizeof full, "%s >%s/cmd.out 2>%s", cmd, fx->dir, errpath);
    fflush(NULL);
    return test_system(full, errpath, err, errn, false);
}

static void open_and_close(const void *path) {
    TokenDataset ds;
    dataset_open(&ds, path);
    dataset_close(&ds);
}

static void open_and_sample(const void *path) {
    TokenDataset ds;
    dataset_open(&ds, path);
    Batch b;
    batch_alloc(&b, 1, 4);
    sampler_sequential(&ds, 0, &b);
    batch_free(&b);
    dataset_close(&ds);
}

static int prepare(TestCtx *tc, const char *args, char *err, size_t errn) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s %s", FX->tool, args);
    return run_cmd(FX, cmd, err, errn);
}

/* The decoded text of tokens [0, n) of a char dataset. */
static char *decode_all(const TokenDataset *ds) {
    int32_t *t = malloc((size_t)ds->n_tokens * sizeof(int32_t));
    dataset_read(ds, 0, ds->n_tokens, t);
    char *s = malloc((size_t)ds->n_tokens + 1);
    for (int64_t i = 0; i < ds->n_tokens; i++) s[i] = ds->vocab ? ds->vocab[t[i]] : (char)t[i];
    s[ds->n_tokens] = 0;
    free(t);
    return s;
}

/* A small HDF5 token file written directly, to build the malformed files the tool never writes. */
typedef struct RawFile {
    const int32_t *tokens;
    int64_t n;
    const int64_t *offsets;
    int64_t n_off;
    int vocab_size;
    const char *tokenizer, *vocab;
    bool no_tokens, float_tokens, no_vocab_size;
    int vocab_size_elems;  /* > 0: vocab_size as an array of that many elements, where a scalar belongs */
    bool tokens_rank2;     /* tokens as [2, n/2] */
    bool wide_tokens;      /* tokens as int64 */
    bool unwritten_tokens; /* tokens declared, never written (no storage) */
    bool tokens_group;     /* a group named "tokens" */
    const char *tokens_link; /* "tokens" as an external link to this file's "tokens" */
} RawFile;

static void write_raw(const char *path, const RawFile *r) {
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[1] = {(hsize_t)r->n};
    hid_t sp = H5Screate_simple(1, dims, NULL);
    if (r->tokens_group) H5Gclose(H5Gcreate2(f, "tokens", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    if (r->tokens_link) H5Lcreate_external(r->tokens_link, "tokens", f, "tokens", H5P_DEFAULT, H5P_DEFAULT);
    if (r->tokens_rank2 || r->wide_tokens || r->unwritten_tokens) {
        hsize_t d2[2] = {2, (hsize_t)r->n / 2};
        hid_t sp2 = r->tokens_rank2 ? H5Screate_simple(2, d2, NULL) : H5Screate_simple(1, dims, NULL);
        hid_t d = H5Dcreate2(f, "tokens", r->wide_tokens ? H5T_STD_I64LE : H5T_STD_I32LE, sp2, H5P_DEFAULT,
                             H5P_DEFAULT, H5P_DEFAULT);
        if (!r->unwritten_tokens) H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, r->tokens);
        H5Dclose(d);
        H5Sclose(sp2);
    } else if (!r->no_tokens && !r->tokens_group && !r->tokens_link) {
        if (r->float_tokens) {
            float *x = malloc((size_t)r->n * sizeof(float));
            for (int64_t i = 0; i < r->n; i++) x[i] = (float)r->tokens[i];
            hid_t d = H5Dcreate2(f, "tokens", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
            H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x);
            H5Dclose(d);
            free(x);
        } else {
            hid_t d = H5Dcreate2(f, "tokens", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
            H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, r->tokens);
            H5Dclose(d);
        }
    }
    H5Sclose(sp);
    dims[0] = (hsize_t)r->n_off;
    sp = H5Screate_simple(1, dims, NULL);
    hid_t d = H5Dcreate2(f, "doc_offsets", H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(d, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, r->offsets);
    H5Dclose(d);
    H5Sclose(sp);
    sp = H5Screate(H5S_SCALAR);
    if (r->vocab_size_elems > 0) {
        /* HDF5 writes every element into the reader's buffer: before the checked reader, 2 overwrote a
         * neighbour on the stack and 1000 crashed */
        hsize_t n[1] = {(hsize_t)r->vocab_size_elems};
        hid_t asp = H5Screate_simple(1, n, NULL);
        int *v = calloc((size_t)r->vocab_size_elems, sizeof(int));
        for (int i = 0; i < r->vocab_size_elems; i++) v[i] = r->vocab_size;
        hid_t a = H5Acreate2(f, "vocab_size", H5T_STD_I32LE, asp, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT, v);
        H5Aclose(a);
        H5Sclose(asp);
        free(v);
    } else if (!r->no_vocab_size) {
        hid_t a = H5Acreate2(f, "vocab_size", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT, &r->vocab_size);
        H5Aclose(a);
    }
    /* variable-length strings here (h5py's default), the tool writes fixed-length ones */
    hid_t st = H5Tcopy(H5T_C_S1);
    H5Tset_size(st, H5T_VARIABLE);
    hid_t a = H5Acreate2(f, "tokenizer", st, sp, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(a, st, &r->tokenizer);
    H5Aclose(a);
    if (r->vocab) {
        a = H5Acreate2(f, "vocab", st, sp, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, st, &r->vocab);
        H5Aclose(a);
    }
    H5Tclose(st);
    H5Sclose(sp);
    H5Fclose(f);
}

/* A text of exactly n characters with a varied alphabet. */
static char *make_text(size_t n) {
    static const char *const words[] = {"To be, or not to be: ", "that is the question.\n", "Whether 'tis nobler ",
                                        "in the mind to suffer\n", "The slings and arrows! ", "QUEEN: Ay; 0-9?\n"};
    char *s = malloc(n + 64);
    size_t at = 0;
    for (int i = 0; at < n; i++) at += (size_t)sprintf(s + at, "%s", words[(i * 7 + i / 3) % 6]);
    s[n] = 0;
    return s;
}

/* ---- tests ------------------------------------------------------------------------------------ */

TEST(char_round_trip_and_split) {
    size_t n = 1003;
    char *text = make_text(n), in[512], out[512], args[3200], err[4096];
    join(in, sizeof in, FX->dir, "rt.txt");
    join(out, sizeof out, FX->dir, "rt");
    write_bytes(in, text, n);
    snprintf(args, sizeof args, "--tokenizer char --val-fraction 0.1 %s %s", in, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);

    /* the alphabet: sorted distinct bytes */
    bool seen[256] = {false};
    for (size_t i = 0; i < n; i++) seen[(unsigned char)text[i]] = true;
    char alphabet[257];
    int V = 0;
    for (int b = 0; b < 256; b++)
        if (seen[b]) alphabet[V++] = (char)b;
    alphabet[V] = 0;

    char tp[1024], vp[1024];
    join(tp, sizeof tp, out, "train.h5");
    join(vp, sizeof vp, out, "val.h5");
    TokenDataset tr, va;
    dataset_open(&tr, tp);
    dataset_open(&va, vp);
    int64_t n_train = (int64_t)floor((double)n * 0.9); /* nanoGPT: int(n * 0.9) = 902 */
    EXPECT(n_train == 902, "n_train %lld", (long long)n_train);
    EXPECT(tr.n_tokens == n_train && va.n_tokens == (int64_t)n - n_train, "split %lld + %lld",
           (long long)tr.n_tokens, (long long)va.n_tokens);
    EXPECT(!strcmp(tr.tokenizer, "char") && !strcmp(va.tokenizer, "char"), "tokenizer %s", tr.tokenizer);
    EXPECT(tr.vocab_size == V && va.vocab_size == V, "vocab_size %d, want %d", tr.vocab_size, V);
    EXPECT(tr.vocab && !strcmp(tr.vocab, alphabet), "vocab \"%s\"", tr.vocab ? tr.vocab : "(none)");
    EXPECT(tr.n_docs == 1 && va.n_docs == 1 && va.doc_offsets[0] == 0 && va.doc_offsets[1] == va.n_tokens,
           "docs %lld %lld", (long long)tr.n_docs, (long long)va.n_docs);
    char *a = decode_all(&tr), *b = decode_all(&va);
    EXPECT(!strncmp(a, text, (size_t)n_train) && !strcmp(b, text + n_train), "decoded text differs");
    /* reads in the middle agree with the whole */
    int32_t part[10];
    dataset_read(&tr, 500, 10, part);
    for (int i = 0; i < 10; i++) EXPECT(tr.vocab[part[i]] == text[500 + i], "read at 500+%d", i);
    free(a);
    free(b);
    dataset_close(&tr);
    dataset_close(&va);
    free(text);
}

TEST(byte_tokenizer) {
    unsigned char text[40];
    for (int i = 0; i < 40; i++) text[i] = (unsigned char)(i * 37 + 200);
    char in[512], out[512], args[3200], err[4096], tp[1024], vp[1024];
    join(in, sizeof in, FX->dir, "bytes.bin");
    join(out, sizeof out, FX->dir, "bytes");
    write_bytes(in, text, sizeof text);
    snprintf(args, sizeof args, "--tokenizer byte --val-fraction 0.25 %s %s", in, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);
    join(tp, sizeof tp, out, "train.h5");
    join(vp, sizeof vp, out, "val.h5");
    TokenDataset tr, va;
    dataset_open(&tr, tp);
    dataset_open(&va, vp);
    EXPECT(tr.vocab_size == 256 && !tr.vocab && !strcmp(tr.tokenizer, "byte"), "byte vocab");
    EXPECT(tr.n_tokens == 30 && va.n_tokens == 10, "split %lld + %lld", (long long)tr.n_tokens,
           (long long)va.n_tokens);
    int32_t t[30];
    dataset_read(&tr, 0, 30, t);
    for (int i = 0; i < 30; i++) EXPECT(t[i] == text[i], "token %d", i);
    dataset_read(&va, 0, 10, t);
    for (int i = 0; i < 10; i++) EXPECT(t[i] == text[30 + i], "val token %d", i);
    dataset_close(&tr);
    dataset_close(&va);
}

/* Three documents "abcde", "fgh", "ijklmn" (offsets 0, 5, 8, 14), windows of T = 6 (+1). */
TEST(document_boundaries_in_batches) {
    const char *text = "abcde<SEP>fgh<SEP><SEP>ijklmn<SEP>"; /* an empty and a trailing document are dropped */
    char in[512], out[512], args[3200], err[4096], tp[1024], vp[1024];
    join(in, sizeof in, FX->dir, "docs.txt");
    join(out, sizeof out, FX->dir, "docs");
    write_bytes(in, text, strlen(text));
    snprintf(args, sizeof args, "--val-fraction 0 --doc-separator '<SEP>' %s %s", in, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);
    join(tp, sizeof tp, out, "train.h5");
    join(vp, sizeof vp, out, "val.h5");
    EXPECT(!file_exists(vp), "--val-fraction 0 wrote a val file");
    TokenDataset ds;
    dataset_open(&ds, tp);
    EXPECT(ds.n_tokens == 14 && ds.n_docs == 3, "%lld tokens, %lld docs", (long long)ds.n_tokens,
           (long long)ds.n_docs);
    const int64_t offs[4] = {0, 5, 8, 14};
    for (int i = 0; i < 4; i++) EXPECT(ds.doc_offsets[i] == offs[i], "doc_offsets[%d] = %lld", i,
                                       (long long)ds.doc_offsets[i]);
    EXPECT(ds.vocab_size == 14 && !strcmp(ds.vocab, "abcdefghijklmn"), "vocab %s", ds.vocab);

    /* windows: [0, 7) and [6, 13); ids equal letters - 'a' since the vocab is a..n */
    Batch b;
    batch_alloc(&b, 2, 6);
    sampler_sequential(&ds, 0, &b);
    const int32_t in_ids[12] = {0, 1, 2, 3, 4, 5, /**/ 6, 7, 8, 9, 10, 11};
    /* e -> f crosses into document 1, h -> i into document 2 */
    const int32_t tg_ids[12] = {1, 2, 3, 4, -1, 6, /**/ 7, -1, 9, 10, 11, 12};
    /* row 0: a..e doc 0, f starts doc 1; row 1: g (mid-document, a sequence start), h, then i.. doc 2 */
    const int32_t pos[12] = {0, 1, 2, 3, 4, 0, /**/ 0, 1, 0, 1, 2, 3};
    const int32_t cu[5] = {0, 5, 6, 8, 12};
    for (int i = 0; i < 12; i++) {
        EXPECT(b.inputs[i] == in_ids[i], "inputs[%d] = %d, want %d", i, b.inputs[i], in_ids[i]);
        EXPECT(b.targets[i] == tg_ids[i], "targets[%d] = %d, want %d", i, b.targets[i], tg_ids[i]);
        EXPECT(b.positions[i] == pos[i], "positions[%d] = %d, want %d", i, b.positions[i], pos[i]);
    }
    EXPECT(b.n_segments == 4, "n_segments %d", b.n_segments);
    for (int i = 0; i < 5; i++) EXPECT(b.cu_seqlens[i] == cu[i], "cu_seqlens[%d] = %d", i, b.cu_seqlens[i]);

    /* (14 - 1) / 6 = 2 windows: batch 1 wraps around to the same two */
    Batch c;
    batch_alloc(&c, 2, 6);
    sampler_sequential(&ds, 1, &c);
    EXPECT(!memcmp(b.inputs, c.inputs, 12 * sizeof(int32_t)) && !memcmp(b.targets, c.targets, 12 * sizeof(int32_t)),
           "sequential batches do not wrap");

    /* random windows obey the same rules: check them against the document table */
    Sampler s;
    sampler_init(&s, &ds, 7);
    int32_t all[14];
    dataset_read(&ds, 0, 14, all);
    for (int rep = 0; rep < 20; rep++) {
        sampler_next(&s, &c);
        for (int r = 0; r < 2; r++) {
            int start = c.inputs[r * 6]; /* ids are offsets here (one letter each) */
            EXPECT(start >= 0 && start <= 14 - 7, "window start %d", start);
            for (int t = 0; t < 6; t++) {
                int g = start + t, d = g >= 8 ? 2 : g >= 5 ? 1 : 0;
                int ds0 = (int)offs[d];
                EXPECT(c.inputs[r * 6 + t] == all[g], "input");
                EXPECT(c.positions[r * 6 + t] == (g - ds0 < t ? g - ds0 : t), "position at %d", g);
                int want = g + 1 == offs[d + 1] ? -1 : all[g + 1];
                EXPECT(c.targets[r * 6 + t] == want, "target at %d", g);
            }
        }
        EXPECT(c.cu_seqlens[0] == 0 && c.cu_seqlens[c.n_segments] == 12, "cu_seqlens ends");
        for (int i = 0; i < c.n_segments; i++)
            EXPECT(c.positions[c.cu_seqlens[i]] == 0 && c.cu_seqlens[i] < c.cu_seqlens[i + 1], "segment %d", i);
    }
    batch_free(&b);
    batch_free(&c);
    dataset_close(&ds);
}

/* "abcd" "efgh" "ij", val fraction 0.5: the split at 5 cuts document 1; val starts with its rest. */
TEST(split_cuts_a_document) {
    char in[512], out[512], args[3200], err[4096], tp[1024], vp[1024];
    join(in, sizeof in, FX->dir, "cut.txt");
    join(out, sizeof out, FX->dir, "cut");
    write_bytes(in, "abcd|efgh|ij", 12);
    snprintf(args, sizeof args, "--val-fraction 0.5 --doc-separator '|' %s %s", in, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);
    join(tp, sizeof tp, out, "train.h5");
    join(vp, sizeof vp, out, "val.h5");
    TokenDataset tr, va;
    dataset_open(&tr, tp);
    dataset_open(&va, vp);
    EXPECT(tr.n_tokens == 5 && tr.n_docs == 2 && tr.doc_offsets[1] == 4 && tr.doc_offsets[2] == 5, "train docs");
    EXPECT(va.n_tokens == 5 && va.n_docs == 2 && va.doc_offsets[0] == 0 && va.doc_offsets[1] == 3 &&
               va.doc_offsets[2] == 5,
           "val docs");
    char *a = decode_all(&tr), *b = decode_all(&va);
    EXPECT(!strcmp(a, "abcde") && !strcmp(b, "fghij"), "decoded %s | %s", a, b);
    free(a);
    free(b);
    dataset_close(&tr);
    dataset_close(&va);
}

/* Documents "ab", "cdefghijkl", "mn", "opqrstuvwxyzABCD", "EF" (2, 10, 2, 16, 2 tokens). --whole-documents with
 * val fraction 0.5 (split point 16) moves the split to the nearest boundary, 14 (between "mn" and the 16-token
 * document); --min-doc-tokens 5 then keeps "cdefghijkl" in train and "opqrstuvwxyzABCD" in val. */
TEST(whole_documents_and_min_doc_tokens) {
    char in[512], out[512], args[3200], err[4096], tp[1024], vp[1024];
    join(in, sizeof in, FX->dir, "long.txt");
    join(out, sizeof out, FX->dir, "long");
    const char *text = "ab|cdefghijkl|mn|opqrstuvwxyzABCD|EF";
    write_bytes(in, text, strlen(text));
    snprintf(args, sizeof args, "--val-fraction 0.5 --doc-separator '|' --whole-documents --min-doc-tokens 5 %s %s",
             in, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);
    join(tp, sizeof tp, out, "train.h5");
    join(vp, sizeof vp, out, "val.h5");
    TokenDataset tr, va;
    dataset_open(&tr, tp);
    dataset_open(&va, vp);
    char *a = decode_all(&tr), *b = decode_all(&va);
    EXPECT(!strcmp(a, "cdefghijkl") && tr.n_docs == 1, "train %s (%lld docs)", a, (long long)tr.n_docs);
    EXPECT(!strcmp(b, "opqrstuvwxyzABCD") && va.n_docs == 1, "val %s (%lld docs)", b, (long long)va.n_docs);
    free(a);
    free(b);
    dataset_close(&tr);
    dataset_close(&va);
    /* without --whole-documents the split at 16 cuts the long document into 2 + 14 tokens */
    snprintf(args, sizeof args, "--val-fraction 0.5 --doc-separator '|' --min-doc-tokens 3 %s %s", in, out);
    st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);
    dataset_open(&va, vp);
    b = decode_all(&va);
    EXPECT(!strcmp(b, "qrstuvwxyzABCD"), "cut val %s", b);
    free(b);
    dataset_close(&va);
    /* no document long enough: an error naming the bound and the longest document */
    snprintf(args, sizeof args, "--val-fraction 0 --doc-separator '|' --min-doc-tokens 17 %s %s", in, out);
    st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 1 && strstr(err, "--min-doc-tokens 17") && strstr(err, "longest has 16"), "status %d: %s", st, err);
}

/* data.sample = "documents": documents of 3, 40, 5, 100, 8 tokens, each token = its document's number * 100 +
 * its position in the document, so a window shows where it came from. */
static void write_numbered_docs(const char *path) {
    const int64_t lens[5] = {3, 40, 5, 100, 8};
    int64_t off[6] = {0};
    for (int d = 0; d < 5; d++) off[d + 1] = off[d] + lens[d];
    int32_t *t = malloc((size_t)off[5] * sizeof(int32_t));
    for (int d = 0; d < 5; d++)
        for (int64_t i = 0; i < lens[d]; i++) t[off[d] + i] = (int32_t)(d * 100 + i);
    write_raw(path, &(RawFile){.tokens = t, .n = off[5], .offsets = off, .n_off = 6, .vocab_size = 500,
                               .tokenizer = "byte"});
    free(t);
}

TEST(sampler_draws_windows_inside_long_documents) {
    char p[1024];
    join(p, sizeof p, FX->dir, "numbered.h5");
    write_numbered_docs(p);
    TokenDataset ds;
    dataset_open(&ds, p);
    const int T = 31; /* documents 1 (40 tokens) and 3 (100) hold T + 1 */
    Batch b;
    batch_alloc(&b, 4, T);
    Sampler s;
    sampler_init(&s, &ds, 11);
    sampler_documents(&s, T);
    int seen[5] = {0};
    for (int rep = 0; rep < 25; rep++) {
        sampler_next(&s, &b);
        EXPECT(b.n_segments == 4, "a window crossed a document boundary: %d segments", b.n_segments);
        for (int r = 0; r < 4; r++) {
            const int32_t *in = b.inputs + r * T, *tg = b.targets + r * T;
            int d = in[0] / 100, first = in[0] % 100;
            seen[d]++;
            EXPECT(d == 1 || d == 3, "a window from document %d (shorter than T + 1)", d);
            for (int t = 0; t < T; t++) {
                EXPECT(in[t] == d * 100 + first + t && tg[t] == in[t] + 1 && b.positions[r * T + t] == t,
                       "row %d token %d: input %d target %d position %d", r, t, in[t], tg[t], b.positions[r * T + t]);
            }
        }
    }
    /* uniform over the two documents, and inside document 3 starts beyond document 1's length too */
    EXPECT(seen[1] > 25 && seen[3] > 25, "documents drawn %d and %d times of 100", seen[1], seen[3]);
    /* the stream is (seed, counter) alone: a fresh sampler at the same counter draws the same batch */
    Sampler again;
    sampler_init(&again, &ds, 11);
    sampler_documents(&again, T);
    again.counter = s.counter - 4;
    Batch c;
    batch_alloc(&c, 4, T);
    sampler_next(&again, &c);
    EXPECT(!memcmp(b.inputs, c.inputs, 4 * T * sizeof(int32_t)), "the documents stream does not replay");
    sampler_free(&again);
    sampler_free(&s);

    /* validation: window w = the first T + 1 tokens of the w-th long document, cyclically */
    sampler_documents_part(&ds, 0, &b, 0, 4);
    for (int r = 0; r < 4; r++)
        EXPECT(b.inputs[r * T] == (r % 2 ? 300 : 100) && b.inputs[r * T + T - 1] == b.inputs[r * T] + T - 1,
               "validation row %d starts with %d", r, b.inputs[r * T]);
    batch_free(&b);
    batch_free(&c);
    dataset_close(&ds);
}

static void sample_documents_of_101(const void *path) {
    TokenDataset ds;
    dataset_open(&ds, path);
    Sampler s;
    sampler_init(&s, &ds, 1);
    sampler_documents(&s, 100);
}

TEST(sampler_documents_without_a_long_document) {
    char p[1024], err[4096];
    join(p, sizeof p, FX->dir, "numbered.h5");
    write_numbered_docs(p);
    int st = test_run_child(sample_documents_of_101, p, err, sizeof err);
    EXPECT(st == 1 && strstr(err, p) && strstr(err, "data.sample") && strstr(err, "101") && strstr(err, "has 100"),
           "status %d: %s", st, err);
}

TEST(directory_input_sorted_documents) {
    char dir[512], p[1024], out[512], args[3200], err[4096], tp[1024];
    join(dir, sizeof dir, FX->dir, "corpus");
    mkdir(dir, 0755);
    join(p, sizeof p, dir, "b.txt");
    write_bytes(p, "world", 5);
    join(p, sizeof p, dir, "a.txt");
    write_bytes(p, "hello", 5);
    join(p, sizeof p, dir, ".hidden");
    write_bytes(p, "zzz", 3);
    join(p, sizeof p, dir, "sub");
    mkdir(p, 0755);
    join(out, sizeof out, FX->dir, "corpus_out");
    snprintf(args, sizeof args, "--val-fraction 0 %s %s", dir, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 0, "prepare_text exited %d: %s", st, err);
    join(tp, sizeof tp, out, "train.h5");
    TokenDataset ds;
    dataset_open(&ds, tp);
    char *s = decode_all(&ds);
    EXPECT(!strcmp(s, "helloworld"), "decoded %s", s);
    EXPECT(ds.n_docs == 2 && ds.doc_offsets[1] == 5, "documents");
    EXPECT(!strcmp(ds.vocab, "dehlorw"), "vocab %s", ds.vocab);
    free(s);
    dataset_close(&ds);
}

static bool batches_equal(const Batch *a, const Batch *b) {
    size_t N = (size_t)a->B * a->T * sizeof(int32_t);
    return a->n_segments == b->n_segments && !memcmp(a->inputs, b->inputs, N) &&
           !memcmp(a->targets, b->targets, N) && !memcmp(a->positions, b->positions, N) &&
           !memcmp(a->cu_seqlens, b->cu_seqlens, (size_t)(a->n_segments + 1) * sizeof(int32_t));
}

TEST(sampler_determinism) {
    char path[1024];
    join(path, sizeof path, FX->dir, "rt/train.h5"); /* from char_round_trip_and_split */
    TokenDataset ds;
    dataset_open(&ds, path);
    enum { B = 4, T = 16, STEPS = 6 };
    Sampler s1, s2, s3, s4;
    sampler_init(&s1, &ds, 1234);
    sampler_init(&s2, &ds, 1234);
    sampler_init(&s3, &ds, 1235);
    Batch a, b, c;
    batch_alloc(&a, B, T);
    batch_alloc(&b, B, T);
    batch_alloc(&c, B, T);
    bool differs = false;
    Batch third;
    batch_alloc(&third, B, T);
    for (int i = 0; i < STEPS; i++) {
        sampler_next(&s1, &a);
        sampler_next(&s2, &b);
        sampler_next(&s3, &c);
        EXPECT(batches_equal(&a, &b), "same seed, batch %d differs", i);
        differs |= !batches_equal(&a, &c);
        if (i == 2) sampler_next(&(Sampler){.ds = &ds, .seed = 1234, .counter = 2 * B}, &third);
        if (i == 2) EXPECT(batches_equal(&a, &third), "a sampler restored at counter %d differs", 2 * B);
        /* single document: only sequence starts open segments, every target is the next input */
        EXPECT(a.n_segments == B, "segments %d", a.n_segments);
        for (int r = 0; r < B; r++)
            for (int t = 0; t + 1 < T; t++) EXPECT(a.targets[r * T + t] == a.inputs[r * T + t + 1], "target");
    }
    EXPECT(differs, "another seed gave the same batches");
    EXPECT(s1.counter == (uint64_t)STEPS * B, "counter %llu", (unsigned long long)s1.counter);
    /* windows are spread over the whole file: on a file whose token i is i, a window's first input
     * is its start */
    enum { N = 5000 };
    int32_t *ids = malloc(N * sizeof(int32_t));
    for (int i = 0; i < N; i++) ids[i] = i;
    const int64_t offs[2] = {0, N};
    char raw[1024];
    join(raw, sizeof raw, FX->dir, "spread.h5");
    write_raw(raw, &(RawFile){.tokens = ids, .n = N, .offsets = offs, .n_off = 2, .vocab_size = N,
                              .tokenizer = "test"});
    free(ids);
    TokenDataset big;
    dataset_open(&big, raw);
    sampler_init(&s4, &big, 99);
    int64_t lo = N, hi = 0, sum = 0;
    for (int i = 0; i < 100; i++) {
        sampler_next(&s4, &a);
        for (int r = 0; r < B; r++) {
            int64_t p = a.inputs[r * T];
            EXPECT(p >= 0 && p <= N - T - 1, "window start %lld outside [0, %d]", (long long)p, N - T - 1);
            lo = p < lo ? p : lo;
            hi = p > hi ? p : hi;
            sum += p;
        }
    }
    double mean = (double)sum / (100 * B), want = (N - T - 1) / 2.0;
    EXPECT(lo < N / 50 && hi > N - N / 50 && fabs(mean - want) < 0.1 * want, "starts in [%lld, %lld], mean %.0f",
           (long long)lo, (long long)hi, mean);
    dataset_close(&big);
    batch_free(&a);
    batch_free(&b);
    batch_free(&c);
    batch_free(&third);
    dataset_close(&ds);
}

static void expect_open_fails(TestCtx *tc, const char *path, const char *word) {
    char err[4096];
    int st = test_run_child(open_and_close, path, err, sizeof err);
    EXPECT(st == 1, "%s: exit status %d, want 1 (stderr: %s)", path, st, err);
    EXPECT(strstr(err, "error: ") && strstr(err, path), "%s: message does not name the file: %s", path, err);
    EXPECT(!word || strstr(err, word), "%s: message lacks \"%s\": %s", path, word, err);
    EXPECT(!strstr(err, "HDF5-DIAG"), "HDF5's error stack leaked: %s", err);
}

TEST(missing_garbage_and_truncated_files) {
    char p[1024];
    join(p, sizeof p, FX->dir, "does_not_exist.h5");
    expect_open_fails(tc, p, "No such file");
    if (tc->current_failed) return;

    join(p, sizeof p, FX->dir, "garbage.h5");
    char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (char)(i * 131 + 7);
    write_bytes(p, junk, sizeof junk);
    expect_open_fails(tc, p, "not an HDF5 file");
    if (tc->current_failed) return;

    /* the first half of a valid file: the superblock is there, the rest is not */
    char src[1024];
    join(src, sizeof src, FX->dir, "rt/train.h5");
    FILE *f = fopen(src, "rb");
    EXPECT(f, "no %s", src);
    char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    join(p, sizeof p, FX->dir, "truncated.h5");
    write_bytes(p, buf, n / 2);
    expect_open_fails(tc, p, NULL);
    if (tc->current_failed) return;

    snprintf(p, sizeof p, "%s", FX->dir);
    expect_open_fails(tc, p, "directory");
}

TEST(malformed_datasets) {
    const int32_t tok[6] = {0, 1, 2, 0, 1, 2};
    const int64_t good[3] = {0, 2, 6}, down[3] = {0, 7, 6}, short_end[3] = {0, 2, 5}, late[3] = {1, 2, 6};
    RawFile base = {.tokens = tok, .n = 6, .offsets = good, .n_off = 3, .vocab_size = 3, .tokenizer = "char",
                    .vocab = "xyz"};
    char p[1024];
    join(p, sizeof p, FX->dir, "raw_ok.h5");
    write_raw(p, &base);
    char err[4096];
    int st = test_run_child(open_and_sample, p, err, sizeof err);
    EXPECT(st == 0, "a valid raw file (variable-length strings) fails: %s", err);

    struct {
        const char *name, *word;
        RawFile r;
    } cases[] = {
        {"no_tokens", "\"tokens\"", base},    {"float_tokens", "integer", base},
        {"offsets_down", "decreases", base},  {"offsets_end", "n_tokens", base},
        {"offsets_start", "start at 0", base}, {"vocab_zero", "vocab_size", base},
        {"no_vocab_size", "vocab_size", base}, {"vocab_length", "\"vocab\"", base},
        {"vocab_size_x2", "attribute \"vocab_size\": expected a scalar integer", base},
        {"vocab_size_x1000", "attribute \"vocab_size\": expected a scalar integer", base},
        {"tokens_2d", "dataset \"tokens\": shape mismatch", base},
        {"tokens_int64", "wider than int32", base},
        {"tokens_unwritten", "never written", base},
        {"tokens_group", "\"tokens\" is a group", base},
        /* a link to another file (which could be a FIFO that never answers) is not followed */
        {"tokens_external", "\"tokens\" is a soft or external link", base},
    };
    cases[0].r.no_tokens = true;
    cases[1].r.float_tokens = true;
    cases[2].r.offsets = down;
    cases[3].r.offsets = short_end;
    cases[4].r.offsets = late;
    cases[5].r.vocab_size = 0;
    cases[6].r.no_vocab_size = true;
    cases[7].r.vocab = "xyzw";
    cases[8].r.vocab_size_elems = 2;
    cases[9].r.vocab_size_elems = 1000;
    cases[10].r.tokens_rank2 = true;
    cases[11].r.wide_tokens = true;
    cases[12].r.unwritten_tokens = true;
    cases[13].r.tokens_group = true;
    char linked[1024];
    join(linked, sizeof linked, FX->dir, "raw_ok.h5");
    cases[14].r.tokens_link = linked;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(p, sizeof p, "%s/raw_%s.h5", FX->dir, cases[i].name);
        write_raw(p, &cases[i].r);
        expect_open_fails(tc, p, cases[i].word);
        if (tc->current_failed) return;
    }

    /* ids past vocab_size open fine (the check would need the whole file) but fail when read */
    RawFile big = base;
    const int32_t bad[6] = {0, 1, 2, 7, 1, 2};
    big.tokens = bad;
    join(p, sizeof p, FX->dir, "raw_bad_id.h5");
    write_raw(p, &big);
    st = test_run_child(open_and_sample, p, err, sizeof err);
    EXPECT(st == 1 && strstr(err, p) && strstr(err, "outside the vocabulary"), "bad id: status %d, %s", st, err);
}

/* build/train on a token file with an array where vocab_size belongs: status 1 and a message naming the
 * file and the attribute (before the checked reader: SIGSEGV). */
TEST(train_program_refuses_a_hostile_token_file) {
    const int32_t tok[6] = {0, 1, 2, 0, 1, 2};
    const int64_t offs[2] = {0, 6};
    RawFile r = {.tokens = tok, .n = 6, .offsets = offs, .n_off = 2, .vocab_size = 3, .tokenizer = "char",
                 .vocab_size_elems = 1000};
    char p[1024], set_train[1100], set_val[1100], out[8192];
    join(p, sizeof p, FX->dir, "hostile.h5");
    write_raw(p, &r);
    snprintf(set_train, sizeof set_train, "data.train_path=%s", p);
    snprintf(set_val, sizeof set_val, "data.val_path=%s", p);
    char *argv[] = {FX->train, "configs/tiny.json", "--set", set_train, "--set", set_val, NULL};
    int st = test_run_program(argv, 0, out, sizeof out);
    EXPECT(st == 1 && strstr(out, p) && strstr(out, "attribute \"vocab_size\": expected a scalar integer"),
           "build/train on %s: status %d (negative: killed by that signal): %s", p, st, out);
}

/* A disk that fills while prepare_text writes (a file size limit makes the writes fail as ENOSPC does), in
 * the data and at the end: status 1 with the message, never SIGSEGV at exit (HDF5's clean-up after a
 * failed close), no temporary file left, and the train.h5 of an earlier run as it was. */
TEST(prepare_text_on_a_full_disk_exits_cleanly) {
    char in[512], out_dir[512], train[1024], tmp[1100], out[8192];
    join(in, sizeof in, FX->dir, "big.txt");
    join(out_dir, sizeof out_dir, FX->dir, "full");
    join(train, sizeof train, out_dir, "train.h5");
    snprintf(tmp, sizeof tmp, "%s.tmp", train);
    /* letters at random: they compress about 4:3, so the data is most of the file */
    char *text = malloc(400000);
    uint64_t x = 12345;
    for (int i = 0; i < 400000; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        text[i] = (char)('a' + (x >> 33) % 26);
    }
    write_bytes(in, text, 400000);
    free(text);
    char *argv[] = {FX->tool, "--val-fraction", "0.1", in, out_dir, NULL};
    int st = test_run_program(argv, 0, out, sizeof out);
    EXPECT(st == 0, "prepare_text without a limit: status %d: %s", st, out);
    size_t n_before;
    char *before = read_whole(train, &n_before);
    EXPECT(before, "no %s", train);
    const long limits[2] = {(long)n_before / 4, (long)n_before - 512};
    bool same = true;
    for (int i = 0; i < 2 && same; i++) {
        st = test_run_program(argv, limits[i], out, sizeof out);
        printf("    limit %ld bytes: status %d, %s", limits[i], st, out);
        size_t n_now;
        char *now = read_whole(train, &n_now);
        same = now && n_now == n_before && !memcmp(now, before, n_before) && !file_exists(tmp);
        free(now);
        if (st != 1 || !strstr(out, train) || !strstr(out, "cannot write")) break;
    }
    free(before);
    EXPECT(st == 1 && strstr(out, train) && strstr(out, "cannot write"),
           "status %d (negative: killed by that signal): %s", st, out);
    EXPECT(same, "%s changed, or %s remained", train, tmp);
}

TEST(tool_errors) {
    char out[512], args[3200], err[4096];
    join(out, sizeof out, FX->dir, "never");
    snprintf(args, sizeof args, "%s/no_such_input.txt %s", FX->dir, out);
    int st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 1, "missing input: status %d", st);
    EXPECT(strstr(err, "no_such_input.txt") && strstr(err, "error: "), "message: %s", err);
    EXPECT(!file_exists(out), "a missing input still created %s", out);

    snprintf(args, sizeof args, "--tokenizer bpe %s/rt.txt %s", FX->dir, out);
    st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 1 && strstr(err, "bpe"), "bad tokenizer: status %d, %s", st, err);
    snprintf(args, sizeof args, "--val-fraction 1.5 %s/rt.txt %s", FX->dir, out);
    st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 1 && strstr(err, "val-fraction"), "bad fraction: status %d, %s", st, err);
    char empty[1024];
    join(empty, sizeof empty, FX->dir, "empty.txt");
    write_bytes(empty, "", 0);
    snprintf(args, sizeof args, "%s %s", empty, out);
    st = prepare(tc, args, err, sizeof err);
    EXPECT(st == 1 && strstr(err, empty), "empty input: status %d, %s", st, err);
    EXPECT(!file_exists(out), "a failed run created %s", out);
}

int main(void) {
    TEST_BEGIN();
    Fixture fx;
    snprintf(fx.dir, sizeof fx.dir, "/tmp/msa_test_data_%d", (int)getpid());
    if (mkdir(fx.dir, 0755) != 0 && errno != EEXIST) {
        perror(fx.dir);
        return 1;
    }
    /* the tool sits in build/, this program in build/tests/ */
    char exe[400];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    snprintf(fx.tool, sizeof fx.tool, "%s/prepare_text", exe);
    snprintf(fx.train, sizeof fx.train, "%s/train", exe);
    tc->fixture = &fx;
    if (!file_exists(fx.tool)) {
        printf("  FAIL %s is not built (make build/prepare_text)\n", fx.tool);
        tc->failed++;
        TEST_END();
    }
    RUN(char_round_trip_and_split);
    RUN(byte_tokenizer);
    RUN(document_boundaries_in_batches);
    RUN(split_cuts_a_document);
    RUN(directory_input_sorted_documents);
    RUN(whole_documents_and_min_doc_tokens);
    RUN(sampler_draws_windows_inside_long_documents);
    RUN(sampler_documents_without_a_long_document);
    RUN(sampler_determinism);
    RUN(missing_garbage_and_truncated_files);
    RUN(malformed_datasets);
    RUN(train_program_refuses_a_hostile_token_file);
    RUN(prepare_text_on_a_full_disk_exits_cleanly);
    RUN(tool_errors);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "rm -rf %s", fx.dir);
    if (system(cmd) != 0) printf("  (could not remove %s)\n", fx.dir);
    TEST_END();
}
