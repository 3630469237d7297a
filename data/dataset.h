/* HDF5 token datasets and the batch sampler.
 *
 * File format (written by tools/prepare_text, read here):
 *   dataset "tokens"       int32 [n_tokens], chunked + deflate
 *   dataset "doc_offsets"  int64 [n_docs + 1], document start offsets into tokens, last = n_tokens
 *   attribute "vocab_size" int32, attribute "tokenizer" string ("char", "byte", ...)
 *   attribute "vocab"      string (char tokenizer only: the alphabet, token id = index, for decoding)
 * Tokens are read with hyperslab selections, never the whole file, so files larger than memory work. */
#ifndef MSA_DATASET_H
#define MSA_DATASET_H

#include <stdbool.h>
#include <stdint.h>

#include "../kernels/util.h"

typedef struct TokenDataset {
    char *path;
    int64_t hid_file, hid_tokens;  /* hid_t handles (kept as int64 so this header needs no hdf5.h) */
    int64_t n_tokens;
    int64_t n_docs;
    int64_t *doc_offsets;          /* [n_docs + 1], in memory (small) */
    int vocab_size;
    char tokenizer[32];
    char *vocab;                   /* char tokenizer alphabet (NUL-terminated, vocab_size bytes), or NULL */
} TokenDataset;

/* Open and validate; on a missing/corrupt file or a malformed dataset prints an error naming the file
 * and the problem, and exits 1. */
void dataset_open(TokenDataset *ds, const char *path);
void dataset_close(TokenDataset *ds);
/* Read tokens [start, start + n) into out. */
void dataset_read(const TokenDataset *ds, int64_t start, int64_t n, int32_t *out);

/* One micro-batch, host memory: B sequences of T tokens laid end to end (N = B*T rows).
 * Documents inside a window are split at their boundaries: cu_seqlens lists every document segment's
 * start (sequence starts included), positions restart at 0 at each segment start, and the target of
 * a segment's last token is ignore_index (-1) when the next token belongs to another document. */
typedef struct Batch {
    int B, T;
    int32_t *inputs;      /* [B*T] */
    int32_t *targets;     /* [B*T], -1 = ignore */
    int32_t *positions;   /* [B*T] position within the document segment */
    int32_t *cu_seqlens;  /* [n_segments + 1] */
    int n_segments;
} Batch;

void batch_alloc(Batch *b, int B, int T);
void batch_free(Batch *b);

/* Deterministic sampler of random windows of T+1 tokens; its whole state is (seed, counter), so a
 * resumed run continues the same stream. */
typedef struct Sampler {
    const TokenDataset *ds;
    uint64_t seed;
    uint64_t counter;      /* windows drawn so far */
} Sampler;

void sampler_init(Sampler *s, const TokenDataset *ds, uint64_t seed);
void sampler_next(Sampler *s, Batch *b);
/* Sequential, non-overlapping windows from the start (validation: the same batches every eval). */
void sampler_sequential(const TokenDataset *ds, int64_t index, Batch *b);

#endif
