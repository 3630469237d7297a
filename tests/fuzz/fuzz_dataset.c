/* Fuzz target: a token file (data/dataset.c). The input does not hold the file's bytes: it decides what a
 * token file written with the HDF5 API holds (README.md says why), starting from a valid one (the
 * format of data/dataset.h: tokens, doc_offsets, vocab_size, tokenizer, vocab) and turning any of its
 * objects into a variant (fuzz.h: wrong class, array for scalar, odd strings, huge dims, missing, values
 * out of the vocabulary, offsets not monotonic, ...). Then it does what build/train does with a data file:
 * dataset_open, random windows (sampler_next) and sequential ones (sampler_sequential). Whatever
 * dataset_open accepts must keep data/dataset.h's promises, and every batch must hold token ids inside the
 * vocabulary; a broken promise is a finding like a crash. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../data/dataset.h"
#include "fuzz.h"

/* A valid token file for the input's first decisions (an empty input gives one too). */
typedef struct Recipe {
    int vocab_size;
    int64_t n_tokens;
    int n_docs;
    int32_t tokens[1100];
    int64_t doc_offsets[10];
    char tokenizer[16];
    char vocab[96];
} Recipe;

static void make_recipe(FuzzBytes *b, Recipe *r) {
    r->vocab_size = 2 + (int)fb_pick(b, 90); /* printable alphabets of the char tokenizer */
    r->n_tokens = 65 + fb_u16(b) % 1000;
    r->n_docs = 1 + (int)fb_pick(b, 8);
    uint64_t x = fb_u32(b);
    for (int64_t i = 0; i < r->n_tokens; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        r->tokens[i] = (int32_t)((x >> 33) % (uint64_t)r->vocab_size);
    }
    /* document starts: n_docs - 1 cut points in order (equal ones are empty documents, which are valid) */
    r->doc_offsets[0] = 0;
    for (int d = 1; d < r->n_docs; d++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        int64_t cut = (int64_t)((x >> 33) % (uint64_t)r->n_tokens);
        r->doc_offsets[d] = cut < r->doc_offsets[d - 1] ? r->doc_offsets[d - 1] : cut;
    }
    r->doc_offsets[r->n_docs] = r->n_tokens;
    static const char *const tokenizers[] = {"char", "byte", "hf:gpt2", "char"};
    strcpy(r->tokenizer, tokenizers[fb_pick(b, 4)]);
    for (int i = 0; i < r->vocab_size; i++) r->vocab[i] = (char)(' ' + i);
    r->vocab[r->vocab_size] = 0;
}

static void write_file(FuzzBytes *b, const Recipe *r, const char *path) {
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) fuzz_broken("cannot create the scratch file %s", path);
    FzArray tokens = {H5T_STD_I32LE, H5T_NATIVE_INT32, 1, {(hsize_t)r->n_tokens}, r->tokens};
    FzArray offsets = {H5T_STD_I64LE, H5T_NATIVE_INT64, 1, {(hsize_t)r->n_docs + 1}, r->doc_offsets};
    fz_write_dataset(b, f, "tokens", &tokens);
    fz_write_dataset(b, f, "doc_offsets", &offsets);
    fz_write_attr(b, f, "vocab_size", &(FzValue){.cls = H5T_INTEGER, .type = H5T_STD_I32LE, .i = r->vocab_size});
    fz_write_attr(b, f, "tokenizer", &(FzValue){.cls = H5T_STRING, .s = r->tokenizer});
    if (!strcmp(r->tokenizer, "char") || fb_pick(b, 2))
        fz_write_attr(b, f, "vocab", &(FzValue){.cls = H5T_STRING, .s = r->vocab});
    if (fb_pick(b, 4) == 0) { /* hf_tokenize.py's copy of tokenizer.json, which the reader ignores */
        uint8_t json[2] = {'{', '}'};
        FzArray tj = {H5T_STD_U8LE, H5T_NATIVE_UINT8, 1, {2}, json};
        fz_write_dataset(b, f, "tokenizer_json", &tj);
    }
    H5Fclose(f);
}

/* data/dataset.h's promises about an open TokenDataset */
static void check_open(const TokenDataset *ds) {
    if (ds->n_tokens <= 0 || ds->n_docs < 1 || ds->vocab_size < 1)
        fuzz_broken("dataset_open accepted n_tokens %lld, n_docs %lld, vocab_size %d", (long long)ds->n_tokens,
                    (long long)ds->n_docs, ds->vocab_size);
    if (ds->doc_offsets[0] != 0 || ds->doc_offsets[ds->n_docs] != ds->n_tokens)
        fuzz_broken("dataset_open accepted doc_offsets from %lld to %lld for %lld tokens",
                    (long long)ds->doc_offsets[0], (long long)ds->doc_offsets[ds->n_docs], (long long)ds->n_tokens);
    for (int64_t d = 0; d < ds->n_docs; d++)
        if (ds->doc_offsets[d + 1] < ds->doc_offsets[d]) fuzz_broken("dataset_open accepted decreasing doc_offsets");
    size_t tlen = strnlen(ds->tokenizer, sizeof ds->tokenizer);
    if (tlen == 0 || tlen == sizeof ds->tokenizer) fuzz_broken("dataset_open accepted an empty or unterminated tokenizer");
    if (ds->vocab) { /* vocab_size bytes and a NUL (AddressSanitizer checks the allocation holds them) */
        unsigned sum = 0;
        for (int i = 0; i < ds->vocab_size; i++) sum += (unsigned char)ds->vocab[i];
        if (ds->vocab[ds->vocab_size] != 0) fuzz_broken("dataset_open's vocab is not NUL-terminated (sum %u)", sum);
    }
}

/* data/dataset.h's promises about a batch */
static void check_batch(const TokenDataset *ds, const Batch *bt) {
    int N = bt->B * bt->T;
    for (int i = 0; i < N; i++) {
        if (bt->inputs[i] < 0 || bt->inputs[i] >= ds->vocab_size || bt->targets[i] < -1 ||
            bt->targets[i] >= ds->vocab_size)
            fuzz_broken("batch row %d: input %d, target %d outside the vocabulary [0, %d)", i, bt->inputs[i],
                        bt->targets[i], ds->vocab_size);
        if (bt->positions[i] < 0 || bt->positions[i] >= bt->T) fuzz_broken("batch position %d", bt->positions[i]);
    }
    if (bt->n_segments < bt->B || bt->n_segments > N || bt->cu_seqlens[0] != 0 || bt->cu_seqlens[bt->n_segments] != N)
        fuzz_broken("batch of %d segments, cu_seqlens from %d to %d", bt->n_segments, bt->cu_seqlens[0],
                    bt->cu_seqlens[bt->n_segments]);
    for (int s = 0; s < bt->n_segments; s++)
        if (bt->cu_seqlens[s + 1] <= bt->cu_seqlens[s]) fuzz_broken("cu_seqlens not increasing at %d", s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* static: they outlive the jump back from a refusal */
    static FuzzBytes b;
    static Recipe r;
    static TokenDataset ds;
    static Batch batch;
    b = (FuzzBytes){data, size};
    if (batch.inputs) batch_free(&batch); /* left by the previous input's refusal */
    const char *path = fuzz_scratch_path();
    make_recipe(&b, &r);
    write_file(&b, &r, path);
    fuzz_arm();
    if (setjmp(fuzz_refused)) {
        fuzz_close_hdf5();
        return 0;
    }
    dataset_open(&ds, path);
    check_open(&ds);
    batch_alloc(&batch, 1 + (int)fb_pick(&b, 3), 1 + (int)fb_pick(&b, 64));
    Sampler s;
    sampler_init(&s, &ds, fb_u64(&b));
    sampler_next(&s, &batch);
    check_batch(&ds, &batch);
    sampler_sequential(&ds, (int64_t)fb_u32(&b), &batch);
    check_batch(&ds, &batch);
    batch_free(&batch);
    dataset_close(&ds);
    fuzz_close_hdf5();
    return 0;
}
