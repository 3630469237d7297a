/* HDF5 token datasets (format in dataset.h) and the batch sampler. Every problem with a file is the
 * user's to fix, so each one ends the program with a message that names the file and what is wrong,
 * never with HDF5's own error stack. */
#include "dataset.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5read.h"

/* Raw-data chunk cache per open token dataset: random windows hit chunks all over the file, and the
 * default 1 MiB cache would inflate a chunk again for nearly every window. 64 MiB holds the whole of
 * small corpora (Shakespeare: 4 MiB) and a useful working set of large ones. */
#define CHUNK_CACHE_BYTES ((size_t)64 << 20)
#define CHUNK_CACHE_SLOTS 12421 /* a prime well above the chunks the cache holds (HDF5's advice) */

/* dataset_open's failure path: release everything (a fuzzer's fatal hook may carry on), then end the
 * program with the reader's message, which names the file, the object and what was expected. */
static noreturn void open_fail(TokenDataset *ds, H5Reader *rd) {
    char msg[sizeof rd->error];
    memcpy(msg, rd->error, sizeof msg);
    dataset_close(ds); /* closes rd's file too: ds->hid_file is the same handle */
    fatal("%s", msg);
}

/* ... with a problem found in what was read */
static noreturn void open_problem(TokenDataset *ds, H5Reader *rd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static noreturn void open_problem(TokenDataset *ds, H5Reader *rd, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    rd->exit_on_error = false;
    h5r_fail(rd, "%s", msg);
    open_fail(ds, rd);
}

/* The char tokenizer's alphabet, optional (without it nothing can be decoded). */
static void read_vocab(TokenDataset *ds, H5Reader *rd) {
    char *v = NULL;
    size_t len = 0;
    int st = h5r_attr_string(rd, rd->file, "vocab", false, &v, &len);
    if (st < 0) open_fail(ds, rd);
    if (st == 0) return;
    /* a fixed-length attribute of exactly vocab_size bytes may hold a NUL character; a longer one
     * (or a variable-length string) is read up to its terminator */
    if (len != (size_t)ds->vocab_size) len = strlen(v);
    if (len != (size_t)ds->vocab_size) {
        free(v);
        open_problem(ds, rd, "attribute \"vocab\" has %zu characters but vocab_size is %d", len, ds->vocab_size);
    }
    ds->vocab = v;
}

void dataset_open(TokenDataset *ds, const char *path) {
    memset(ds, 0, sizeof(*ds));
    ds->hid_file = ds->hid_tokens = -1;
    ds->path = xstrdup(path);
    H5Reader rd;
    /* errors come back here first, so that the handles are closed before fatal() */
    if (!h5r_open(&rd, ds->path, "token file", " (make one with build/prepare_text)", false)) open_fail(ds, &rd);
    hid_t file = rd.file;
    ds->hid_file = file;

    /* tokens: read as int32 (a wider type could hold ids that do not fit), a window at a time */
    const H5DatasetSpec tokens_spec = {.mem_type = H5T_NATIVE_INT32, .ndim = 1};
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS), tokens;
    H5Pset_chunk_cache(dapl, CHUNK_CACHE_SLOTS, CHUNK_CACHE_BYTES, 1.0);
    H5Shape shape;
    int st = h5r_dataset_open(&rd, file, "tokens", &tokens_spec, true, dapl, &tokens, &shape);
    H5Pclose(dapl);
    if (st != 1) open_fail(ds, &rd);
    ds->hid_tokens = tokens;
    ds->n_tokens = shape.dims[0];
    if (ds->n_tokens <= 0) open_problem(ds, &rd, "dataset \"tokens\" is empty");

    /* doc_offsets */
    const H5DatasetSpec offsets_spec = {.mem_type = H5T_NATIVE_INT64, .ndim = 1};
    void *offsets;
    if (h5r_dataset_read(&rd, file, "doc_offsets", &offsets_spec, true, &shape, &offsets) != 1) open_fail(ds, &rd);
    ds->doc_offsets = offsets;
    int64_t n_off = shape.dims[0];
    if (n_off < 2) open_problem(ds, &rd, "dataset \"doc_offsets\" needs at least 2 entries (0 and n_tokens)");
    ds->n_docs = n_off - 1;
    if (ds->doc_offsets[0] != 0) open_problem(ds, &rd, "dataset \"doc_offsets\" must start at 0");
    if (ds->doc_offsets[n_off - 1] != ds->n_tokens)
        open_problem(ds, &rd, "dataset \"doc_offsets\" ends at %lld, not at n_tokens = %lld",
                     (long long)ds->doc_offsets[n_off - 1], (long long)ds->n_tokens);
    for (int64_t i = 1; i < n_off; i++)
        if (ds->doc_offsets[i] < ds->doc_offsets[i - 1])
            open_problem(ds, &rd, "dataset \"doc_offsets\" decreases at entry %lld (%lld after %lld)",
                         (long long)i, (long long)ds->doc_offsets[i], (long long)ds->doc_offsets[i - 1]);

    int64_t vocab;
    if (h5r_attr_int(&rd, file, "vocab_size", true, 1, INT32_MAX, &vocab) != 1) open_fail(ds, &rd);
    ds->vocab_size = (int)vocab;

    char *tok = NULL;
    if (h5r_attr_string(&rd, file, "tokenizer", true, &tok, NULL) != 1) open_fail(ds, &rd);
    size_t len = strlen(tok);
    if (len == 0 || len >= sizeof ds->tokenizer) {
        free(tok);
        open_problem(ds, &rd, "attribute \"tokenizer\" is empty or longer than %zu characters",
                     sizeof ds->tokenizer - 1);
    }
    memcpy(ds->tokenizer, tok, len + 1);
    free(tok);
    if (!strcmp(ds->tokenizer, "char")) read_vocab(ds, &rd);
}

void dataset_close(TokenDataset *ds) {
    if (ds->hid_tokens > 0) H5Dclose((hid_t)ds->hid_tokens);
    if (ds->hid_file > 0) H5Fclose((hid_t)ds->hid_file);
    free(ds->path);
    free(ds->doc_offsets);
    free(ds->vocab);
    memset(ds, 0, sizeof(*ds));
    ds->hid_file = ds->hid_tokens = -1;
}

void dataset_read(const TokenDataset *ds, int64_t start, int64_t n, int32_t *out) {
    if (start < 0 || n < 0 || start + n > ds->n_tokens)
        fatal("%s: read of tokens [%lld, %lld) outside the %lld tokens", ds->path, (long long)start,
              (long long)(start + n), (long long)ds->n_tokens);
    if (n == 0) return;
    /* the file passed dataset_open's checks; any failure now is the file changing or breaking under us */
    H5Reader rd = {.path = ds->path, .file = (hid_t)ds->hid_file, .exit_on_error = true};
    const H5Shape shape = {.ndim = 1, .dims = {ds->n_tokens}, .numel = ds->n_tokens};
    h5r_read_rows(&rd, (hid_t)ds->hid_tokens, &shape, H5T_NATIVE_INT32, start, n, out);
    /* an id outside the vocabulary would index past the embedding table; checking what we read
     * anyway costs nothing next to the read */
    for (int64_t i = 0; i < n; i++)
        if (out[i] < 0 || out[i] >= ds->vocab_size)
            fatal("%s: token %lld is %d, outside the vocabulary [0, %d)", ds->path, (long long)(start + i), out[i],
                  ds->vocab_size);
}

/* ---- batches ---------------------------------------------------------------------------------- */

void batch_alloc(Batch *b, int B, int T) {
    memset(b, 0, sizeof(*b));
    if (B <= 0 || T <= 0) fatal("batch_alloc: B = %d and T = %d must be positive", B, T);
    size_t N = (size_t)B * (size_t)T;
    b->B = B;
    b->T = T;
    b->inputs = xmalloc(N * sizeof(int32_t));
    b->targets = xmalloc(N * sizeof(int32_t));
    b->positions = xmalloc(N * sizeof(int32_t));
    b->cu_seqlens = xmalloc((N + 1) * sizeof(int32_t)); /* at worst every token starts a segment */
}

void batch_free(Batch *b) {
    free(b->inputs);
    free(b->targets);
    free(b->positions);
    free(b->cu_seqlens);
    memset(b, 0, sizeof(*b));
}

/* The document holding token p: the last d with doc_offsets[d] <= p < doc_offsets[d + 1] (empty
 * documents, equal consecutive offsets, are skipped by taking the last such d). */
static int64_t doc_of(const TokenDataset *ds, int64_t p) {
    int64_t lo = 0, hi = ds->n_docs - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (ds->doc_offsets[mid] <= p) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* Fills row `row` of the batch from the T + 1 tokens at `start` (buf is scratch of T + 1). */
static void fill_row(const TokenDataset *ds, Batch *b, int row, int64_t start, int32_t *buf) {
    int T = b->T;
    dataset_read(ds, start, (int64_t)T + 1, buf);
    int64_t d = doc_of(ds, start);
    int32_t pos = 0;
    size_t base = (size_t)row * (size_t)T;
    for (int t = 0; t < T; t++) {
        int64_t g = start + t;
        while (g >= ds->doc_offsets[d + 1]) d++;
        if (t == 0 || g == ds->doc_offsets[d]) {
            b->cu_seqlens[b->n_segments++] = (int32_t)(base + (size_t)t);
            pos = 0;
        }
        b->inputs[base + t] = buf[t];
        b->positions[base + t] = pos++;
        /* the next token opens another document: nothing in this one predicts it */
        b->targets[base + t] = g + 1 >= ds->doc_offsets[d + 1] ? -1 : buf[t + 1];
    }
}

static void check_fits(const TokenDataset *ds, int T) {
    if (ds->n_tokens < (int64_t)T + 1)
        fatal("%s: %lld tokens are too few for windows of seq_len + 1 = %d tokens", ds->path,
              (long long)ds->n_tokens, T + 1);
}

static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void sampler_init(Sampler *s, const TokenDataset *ds, uint64_t seed) {
    *s = (Sampler){.ds = ds, .seed = seed};
}

void sampler_init_mix(Sampler *s, const DataMix *mix, uint64_t seed) {
    if (mix->n < 1) fatal("sampler_init_mix: an empty mix");
    *s = (Sampler){.mix = mix, .seed = seed};
}

DocList long_documents(const TokenDataset *ds, int64_t min_tokens, const char *why) {
    DocList l = {xmalloc((size_t)ds->n_docs * sizeof(int64_t)), 0};
    int64_t longest = 0;
    for (int64_t d = 0; d < ds->n_docs; d++) {
        int64_t len = ds->doc_offsets[d + 1] - ds->doc_offsets[d];
        if (len >= min_tokens) l.docs[l.n++] = d;
        longest = len > longest ? len : longest;
    }
    if (!l.n)
        fatal("%s: %s needs documents of at least %lld tokens, and the longest of its %lld documents has %lld (a file of "
              "long documents: build/prepare_text --min-doc-tokens)",
              ds->path, why, (long long)min_tokens, (long long)ds->n_docs, (long long)longest);
    return l;
}

void sampler_documents(Sampler *s, int T) {
    const int n = s->mix ? s->mix->n : 1;
    s->doc_tokens = (int64_t)T + 1;
    s->long_docs = xcalloc((size_t)n, sizeof(DocList));
    for (int i = 0; i < n; i++)
        s->long_docs[i] = long_documents(s->mix ? &s->mix->ds[i] : s->ds, s->doc_tokens,
                                         "data.sample = \"documents\" with train.seq_len + 1 tokens");
}

void sampler_free(Sampler *s) {
    const int n = s->mix ? s->mix->n : 1;
    for (int i = 0; s->long_docs && i < n; i++) free(s->long_docs[i].docs);
    free(s->long_docs);
    s->long_docs = NULL;
    s->doc_tokens = 0;
}

/* uniform in [0, n), n > 0, from one uniform draw */
static uint64_t draw_below(Rng *r, uint64_t n) {
    uint64_t x = (uint64_t)(rng_uniform(r) * (double)n);
    return x < n ? x : n - 1;
}

/* window `counter` depends on (seed, counter) alone: a resumed run that restores the counter draws
 * the same windows, and no RNG state needs saving */
static void window_rng(Rng *r, uint64_t seed, uint64_t counter) {
    rng_seed(r, mix64(seed) ^ mix64(counter ^ 0x5851f42d4c957f2dULL));
}

/* The file of a mix for one window: the window's first uniform against the cumulative weights. A
 * one-file mix draws nothing, so it gives exactly the windows of that file alone. */
static int pick_file(const DataMix *mix, Rng *r) {
    if (!mix || mix->n == 1) return 0;
    double u = rng_uniform(r), acc = 0.0;
    for (int i = 0; i < mix->n - 1; i++)
        if (u < (acc += mix->weights[i])) return i;
    return mix->n - 1; /* also catches the rounding of the weights' sum */
}

int sampler_pick(const Sampler *s, uint64_t counter) {
    Rng r;
    window_rng(&r, s->seed, counter);
    return pick_file(s->mix, &r);
}

static void check_part(const Batch *b, int first_row, int global_rows) {
    if (first_row < 0 || global_rows < b->B || first_row > global_rows - b->B)
        fatal("sampler: rows [%d, %d) are not inside a batch of %d rows", first_row, first_row + b->B, global_rows);
}

void sampler_next(Sampler *s, Batch *b) { sampler_next_part(s, b, 0, b->B); }

void sampler_next_part(Sampler *s, Batch *b, int first_row, int global_rows) {
    check_part(b, first_row, global_rows);
    int32_t *buf = xmalloc(((size_t)b->T + 1) * sizeof(int32_t));
    b->n_segments = 0;
    for (int i = 0; i < b->B; i++) {
        Rng r;
        window_rng(&r, s->seed, s->counter + (uint64_t)first_row + (uint64_t)i);
        const int f = pick_file(s->mix, &r);
        const TokenDataset *ds = s->mix ? &s->mix->ds[f] : s->ds;
        check_fits(ds, b->T);
        int64_t start;
        if (s->doc_tokens) {
            const DocList *l = &s->long_docs[f];
            int64_t d = l->docs[draw_below(&r, (uint64_t)l->n)];
            int64_t len = ds->doc_offsets[d + 1] - ds->doc_offsets[d];
            start = ds->doc_offsets[d] + (int64_t)draw_below(&r, (uint64_t)(len - b->T)); /* len - T - 1 + 1 starts */
        } else start = (int64_t)draw_below(&r, (uint64_t)(ds->n_tokens - b->T)); /* starts 0 .. n_tokens - T - 1 */
        fill_row(ds, b, i, start, buf);
    }
    s->counter += (uint64_t)global_rows;
    b->cu_seqlens[b->n_segments] = b->B * b->T;
    free(buf);
}

void sampler_sequential(const TokenDataset *ds, int64_t index, Batch *b) {
    sampler_sequential_part(ds, index, b, 0, b->B);
}

void sampler_sequential_part(const TokenDataset *ds, int64_t index, Batch *b, int first_row, int global_rows) {
    check_part(b, first_row, global_rows);
    check_fits(ds, b->T);
    /* windows start every T tokens, so every token is an input exactly once (a window's extra
     * last token is only the next window's first input, used as a target) */
    int64_t n_windows = (ds->n_tokens - 1) / b->T;
    int32_t *buf = xmalloc(((size_t)b->T + 1) * sizeof(int32_t));
    b->n_segments = 0;
    for (int i = 0; i < b->B; i++) {
        int64_t w = ((index % n_windows) * global_rows + first_row + i) % n_windows;
        if (w < 0) w += n_windows;
        fill_row(ds, b, i, w * b->T, buf);
    }
    b->cu_seqlens[b->n_segments] = b->B * b->T;
    free(buf);
}

void sampler_documents_part(const TokenDataset *ds, int64_t index, Batch *b, int first_row, int global_rows) {
    check_part(b, first_row, global_rows);
    DocList l = long_documents(ds, (int64_t)b->T + 1, "data.sample = \"documents\" (validation) with train.seq_len + 1 tokens");
    int32_t *buf = xmalloc(((size_t)b->T + 1) * sizeof(int32_t));
    b->n_segments = 0;
    for (int i = 0; i < b->B; i++) {
        int64_t w = ((index % l.n) * global_rows + first_row + i) % l.n;
        if (w < 0) w += l.n;
        fill_row(ds, b, i, ds->doc_offsets[l.docs[w]], buf);
    }
    b->cu_seqlens[b->n_segments] = b->B * b->T;
    free(buf);
    free(l.docs);
}

/* ---- several training files ------------------------------------------------------------------- */

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t')) *--e = 0;
    return s;
}

void datamix_open(DataMix *mx, const char *spec, const char *where) {
    memset(mx, 0, sizeof(*mx));
    char *copy = xstrdup(spec);
    int cap = 0;
    double largest = 0.0;
    for (char *save = NULL, *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        item = trim(item);
        char *colon = strrchr(item, ':');
        if (!colon)
            fatal("%s: data.train_mix entry \"%s\" must be path:weight (e.g. \"a.h5:0.7,b.h5:0.3\")", where, item);
        *colon = 0;
        const char *path = trim(item), *wtext = trim(colon + 1);
        char *end;
        double w = strtod(wtext, &end);
        if (!*path) fatal("%s: data.train_mix entry \":%s\" has no path", where, wtext);
        if (!*wtext || *end || !(w > 0) || !isfinite(w))
            fatal("%s: data.train_mix: the weight of %s is \"%s\"; it must be a number > 0", where, path, wtext);
        if (mx->n == cap) {
            cap = cap ? 2 * cap : 4;
            mx->ds = xrealloc(mx->ds, (size_t)cap * sizeof(TokenDataset));
            mx->weights = xrealloc(mx->weights, (size_t)cap * sizeof(double));
        }
        dataset_open(&mx->ds[mx->n], path); /* its own messages name the file */
        mx->weights[mx->n++] = w;
        largest = fmax(largest, w);
    }
    free(copy);
    if (mx->n == 0) fatal("%s: data.train_mix lists no files", where);
    /* any positive finite weights, any scale: relative to the largest first, so that the sum (at most n)
     * cannot overflow to inf, which would make every weight 0 */
    double total = 0.0;
    for (int i = 0; i < mx->n; i++) total += mx->weights[i] /= largest;
    for (int i = 0; i < mx->n; i++) {
        mx->weights[i] /= total;
        if (!(mx->weights[i] > 0))
            fatal("%s: data.train_mix: the weight of %s is so much smaller than the largest (%g) that it rounds to "
                  "0: the file would never be drawn; raise it or drop the file",
                  where, mx->ds[i].path, largest);
        const TokenDataset *a = &mx->ds[0], *b = &mx->ds[i];
        /* windows of one batch would otherwise mix token ids of different vocabularies */
        if (b->vocab_size != a->vocab_size || strcmp(b->tokenizer, a->tokenizer))
            fatal("%s: data.train_mix: %s (tokenizer %s, vocab_size %d) and %s (tokenizer %s, vocab_size %d) "
                  "must share the tokenizer",
                  where, a->path, a->tokenizer, a->vocab_size, b->path, b->tokenizer, b->vocab_size);
    }
}

void datamix_close(DataMix *mx) {
    for (int i = 0; i < mx->n; i++) dataset_close(&mx->ds[i]);
    free(mx->ds);
    free(mx->weights);
    memset(mx, 0, sizeof(*mx));
}
