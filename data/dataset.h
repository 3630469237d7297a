/* HDF5 token datasets and the batch sampler.
 *
 * File format (written by tools/prepare_text and tools/hf_tokenize.py, read here):
 *   dataset "tokens"       int32 [n_tokens], chunked + deflate
 *   dataset "doc_offsets"  int64 [n_docs + 1], document start offsets into tokens, last = n_tokens
 *   attribute "vocab_size" int32, attribute "tokenizer" string ("char", "byte", "hf:<name>", ...)
 *   attribute "vocab"      string (char tokenizer only: the alphabet, token id = index, for decoding)
 *   dataset "tokenizer_json" uint8 (hf_tokenize.py only: the tokenizer.json used; ignored here)
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

/* Several training files, each window drawn from one picked by weight (config data.train_mix). */
typedef struct DataMix {
    int n;
    TokenDataset *ds;      /* [n], open */
    double *weights;       /* [n], normalised to sum 1 */
} DataMix;

/* Parses "path1:w1,path2:w2,..." (weights > 0, any scale; a path may itself hold ':' since the
 * weight follows the last one) and opens every file; the files must agree on vocab_size and
 * tokenizer. Any problem ends the program with a message that starts with `where` (the config). */
void datamix_open(DataMix *mx, const char *spec, const char *where);
void datamix_close(DataMix *mx); /* also fine on a zeroed, never opened DataMix */

/* The documents of a file with at least some number of tokens (a length bucket), by index. */
typedef struct DocList {
    int64_t *docs;
    int64_t n;
} DocList;

/* The documents of ds with at least min_tokens tokens; none ends the program with a message that names
 * the file, `why` (what needs them) and the longest document. */
DocList long_documents(const TokenDataset *ds, int64_t min_tokens, const char *why);

/* Deterministic sampler of random windows of T+1 tokens; its whole state is (seed, counter), so a
 * resumed run continues the same stream. With a mix, each window's file is picked from the same
 * (seed, counter) draw as its start, with probability = the file's weight. */
typedef struct Sampler {
    const TokenDataset *ds;  /* the one file (NULL with a mix) */
    const DataMix *mix;      /* NULL: ds alone */
    uint64_t seed;
    uint64_t counter;        /* windows drawn so far */
    /* sampler_documents: every window inside one document of at least doc_tokens tokens (0: anywhere) */
    int64_t doc_tokens;
    DocList *long_docs;      /* [number of files] those documents of each file */
} Sampler;

void sampler_init(Sampler *s, const TokenDataset *ds, uint64_t seed);
void sampler_init_mix(Sampler *s, const DataMix *mix, uint64_t seed);
/* config data.sample = "documents": from now on each window of T + 1 tokens is drawn from one document of
 * at least T + 1 tokens: the document uniformly among those of its file, the window's start uniformly
 * inside it; no window crosses a document boundary, so a long-context run sees documents as long as its
 * window (positions 0 .. T-1, as random windows). A file without such a document ends the program with a
 * message naming it and its longest document. */
void sampler_documents(Sampler *s, int T);
void sampler_free(Sampler *s); /* what sampler_documents allocated */
/* The file window number `counter` of a mix comes from (index into mix->ds); 0 without a mix. */
int sampler_pick(const Sampler *s, uint64_t counter);
void sampler_next(Sampler *s, Batch *b);
/* Data parallel: this rank's rows of a global batch of global_rows windows. b gets the windows a single
 * process would put at rows [first_row, first_row + b->B) of that global batch (window numbers counter +
 * first_row ...), and the counter advances by global_rows on every rank, so the ranks stay in step, no
 * two ranks read the same window, the union is exactly the single process's batch, and a checkpoint's
 * counter means the same on any number of ranks. sampler_next(s, b) is sampler_next_part(s, b, 0, b->B). */
void sampler_next_part(Sampler *s, Batch *b, int first_row, int global_rows);
/* Sequential, non-overlapping windows from the start (validation: the same batches every eval). */
void sampler_sequential(const TokenDataset *ds, int64_t index, Batch *b);
/* Rows [first_row, first_row + b->B) of sampler_sequential's batch `index` of global_rows rows. */
void sampler_sequential_part(const TokenDataset *ds, int64_t index, Batch *b, int first_row, int global_rows);
/* Validation with data.sample = "documents": window w is the first T + 1 tokens of the w-th document (in file
 * order, cyclically) of at least T + 1 tokens, so every window starts at a document's position 0; rows as
 * sampler_sequential_part. */
void sampler_documents_part(const TokenDataset *ds, int64_t index, Batch *b, int first_row, int global_rows);

#endif
