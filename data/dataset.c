/* HDF5 token datasets (format in dataset.h) and the batch sampler. Every problem with a file is the
 * user's to fix, so each one ends the program with a message that names the file and what is wrong,
 * never with HDF5's own error stack. */
#include "dataset.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <hdf5.h>

/* Raw-data chunk cache per open token dataset: random windows hit chunks all over the file, and the
 * default 1 MiB cache would inflate a chunk again for nearly every window. 64 MiB holds the whole of
 * small corpora (Shakespeare: 4 MiB) and a useful working set of large ones. */
#define CHUNK_CACHE_BYTES ((size_t)64 << 20)
#define CHUNK_CACHE_SLOTS 12421 /* a prime well above the chunks the cache holds (HDF5's advice) */

/* Reads a string attribute, fixed-length (our writer) or variable-length (h5py's default), into a
 * malloc'd NUL-terminated buffer; *len is its length in bytes (a fixed-length string may hold NULs).
 * Returns NULL when the attribute is not a string. */
static char *read_string_attr(hid_t attr, size_t *len) {
    hid_t ftype = H5Aget_type(attr);
    if (ftype < 0) return NULL;
    char *out = NULL;
    if (H5Tget_class(ftype) != H5T_STRING) goto done;
    hid_t space = H5Aget_space(attr);
    hssize_t npoints = space >= 0 ? H5Sget_simple_extent_npoints(space) : -1;
    if (space >= 0) H5Sclose(space);
    if (npoints != 1) goto done; /* a scalar or one-element string, nothing else */
    htri_t vlen = H5Tis_variable_str(ftype);
    hid_t mtype = H5Tcopy(H5T_C_S1);
    /* HDF5 converts no string between ASCII and UTF-8, and h5py writes str attributes as UTF-8 */
    H5Tset_cset(mtype, H5Tget_cset(ftype));
    if (vlen > 0) {
        char *s = NULL;
        H5Tset_size(mtype, H5T_VARIABLE);
        if (H5Aread(attr, mtype, &s) >= 0 && s) {
            *len = strlen(s);
            out = xstrdup(s);
            H5free_memory(s);
        }
    } else if (vlen == 0) {
        size_t size = H5Tget_size(ftype);
        H5Tset_size(mtype, size);
        H5Tset_strpad(mtype, H5T_STR_NULLPAD);
        out = xcalloc(size + 1, 1);
        if (H5Aread(attr, mtype, out) < 0) {
            free(out);
            out = NULL;
        } else *len = size;
    }
    H5Tclose(mtype);
done:
    H5Tclose(ftype);
    return out;
}

/* dataset_open's failure path: release what is open (dset: another open dataset, or -1), then report. */
static noreturn void open_fail(TokenDataset *ds, hid_t dset, const char *fmt, const char *detail) {
    char msg[512];
    snprintf(msg, sizeof msg, fmt, detail);
    if (dset >= 0 && dset != (hid_t)ds->hid_tokens) H5Dclose(dset);
    if (ds->hid_tokens >= 0) H5Dclose((hid_t)ds->hid_tokens);
    if (ds->hid_file >= 0) H5Fclose((hid_t)ds->hid_file);
    fatal("%s: %s", ds->path, msg);
}

/* A 1-D integer dataset; returns its length, or fails naming the dataset. */
static int64_t check_1d_integer(TokenDataset *ds, hid_t dset, const char *name, bool int32) {
    hid_t type = H5Dget_type(dset), space = H5Dget_space(dset);
    bool integer = type >= 0 && H5Tget_class(type) == H5T_INTEGER;
    size_t size = type >= 0 ? H5Tget_size(type) : 0;
    bool is_signed = type >= 0 && H5Tget_sign(type) == H5T_SGN_2;
    int ndims = space >= 0 ? H5Sget_simple_extent_ndims(space) : -1;
    hsize_t dims[1] = {0};
    if (ndims == 1) H5Sget_simple_extent_dims(space, dims, NULL);
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (!integer) open_fail(ds, dset, "dataset \"%s\" is not an integer dataset", name);
    /* tokens are read as int32: a wider type (or uint32) could hold ids that do not fit */
    if (int32 && (size > 4 || (size == 4 && !is_signed)))
        open_fail(ds, dset, "dataset \"%s\" has an integer type wider than int32", name);
    if (ndims != 1) open_fail(ds, dset, "dataset \"%s\" is not 1-dimensional", name);
    return (int64_t)dims[0];
}

void dataset_open(TokenDataset *ds, const char *path) {
    memset(ds, 0, sizeof(*ds));
    ds->hid_file = ds->hid_tokens = -1;
    ds->path = xstrdup(path);
    /* our messages replace HDF5's stack dumps, which name neither the file nor the fix */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);

    struct stat st;
    if (stat(path, &st) != 0) fatal("%s: cannot open the token file (%s)", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) fatal("%s: is a directory, not a token file", path);
    FILE *probe = fopen(path, "rb");
    if (!probe) fatal("%s: cannot read the token file (%s)", path, strerror(errno));
    fclose(probe);
    if (H5Fis_hdf5(path) <= 0) fatal("%s: not an HDF5 file (make one with build/prepare_text)", path);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) fatal("%s: cannot open as HDF5 (the file is truncated or corrupt)", path);
    ds->hid_file = file;

    /* tokens */
    if (H5Lexists(file, "tokens", H5P_DEFAULT) <= 0) open_fail(ds, -1, "%s", "no dataset \"tokens\"");
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
    H5Pset_chunk_cache(dapl, CHUNK_CACHE_SLOTS, CHUNK_CACHE_BYTES, 1.0);
    hid_t tokens = H5Dopen2(file, "tokens", dapl);
    H5Pclose(dapl);
    if (tokens < 0) open_fail(ds, -1, "%s", "cannot open dataset \"tokens\" (is it a dataset? corrupt file?)");
    ds->hid_tokens = tokens;
    ds->n_tokens = check_1d_integer(ds, tokens, "tokens", true);
    if (ds->n_tokens <= 0) open_fail(ds, -1, "%s", "dataset \"tokens\" is empty");

    /* doc_offsets */
    if (H5Lexists(file, "doc_offsets", H5P_DEFAULT) <= 0) open_fail(ds, -1, "%s", "no dataset \"doc_offsets\"");
    hid_t offs = H5Dopen2(file, "doc_offsets", H5P_DEFAULT);
    if (offs < 0) open_fail(ds, -1, "%s", "cannot open dataset \"doc_offsets\"");
    int64_t n_off = check_1d_integer(ds, offs, "doc_offsets", false);
    if (n_off < 2) open_fail(ds, offs, "%s", "dataset \"doc_offsets\" needs at least 2 entries (0 and n_tokens)");
    ds->doc_offsets = xmalloc((size_t)n_off * sizeof(int64_t));
    if (H5Dread(offs, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, ds->doc_offsets) < 0)
        open_fail(ds, offs, "%s", "cannot read dataset \"doc_offsets\" (corrupt file?)");
    H5Dclose(offs);
    ds->n_docs = n_off - 1;
    char detail[160];
    if (ds->doc_offsets[0] != 0)
        open_fail(ds, -1, "%s", "dataset \"doc_offsets\" must start at 0");
    if (ds->doc_offsets[n_off - 1] != ds->n_tokens) {
        snprintf(detail, sizeof detail, "dataset \"doc_offsets\" ends at %lld, not at n_tokens = %lld",
                 (long long)ds->doc_offsets[n_off - 1], (long long)ds->n_tokens);
        open_fail(ds, -1, "%s", detail);
    }
    for (int64_t i = 1; i < n_off; i++)
        if (ds->doc_offsets[i] < ds->doc_offsets[i - 1]) {
            snprintf(detail, sizeof detail, "dataset \"doc_offsets\" decreases at entry %lld (%lld after %lld)",
                     (long long)i, (long long)ds->doc_offsets[i], (long long)ds->doc_offsets[i - 1]);
            open_fail(ds, -1, "%s", detail);
        }

    /* vocab_size */
    if (H5Aexists(file, "vocab_size") <= 0) open_fail(ds, -1, "%s", "no attribute \"vocab_size\"");
    hid_t attr = H5Aopen(file, "vocab_size", H5P_DEFAULT);
    hid_t atype = attr >= 0 ? H5Aget_type(attr) : -1;
    bool ok = atype >= 0 && H5Tget_class(atype) == H5T_INTEGER;
    if (atype >= 0) H5Tclose(atype);
    long long vocab = 0;
    ok = ok && H5Aread(attr, H5T_NATIVE_LLONG, &vocab) >= 0;
    if (attr >= 0) H5Aclose(attr);
    if (!ok) open_fail(ds, -1, "%s", "attribute \"vocab_size\" is not an integer");
    if (vocab <= 0 || vocab > 0x7fffffff) {
        snprintf(detail, sizeof detail, "attribute \"vocab_size\" = %lld must be in [1, 2^31)", vocab);
        open_fail(ds, -1, "%s", detail);
    }
    ds->vocab_size = (int)vocab;

    /* tokenizer */
    if (H5Aexists(file, "tokenizer") <= 0) open_fail(ds, -1, "%s", "no attribute \"tokenizer\"");
    attr = H5Aopen(file, "tokenizer", H5P_DEFAULT);
    size_t len = 0;
    char *tok = attr >= 0 ? read_string_attr(attr, &len) : NULL;
    if (attr >= 0) H5Aclose(attr);
    if (!tok) open_fail(ds, -1, "%s", "attribute \"tokenizer\" is not a string");
    len = strlen(tok);
    if (len == 0 || len >= sizeof ds->tokenizer) {
        free(tok);
        open_fail(ds, -1, "%s", "attribute \"tokenizer\" is empty or longer than 31 characters");
    }
    memcpy(ds->tokenizer, tok, len + 1);
    free(tok);

    /* vocab: the char tokenizer's alphabet, optional (without it nothing can be decoded) */
    if (!strcmp(ds->tokenizer, "char") && H5Aexists(file, "vocab") > 0) {
        attr = H5Aopen(file, "vocab", H5P_DEFAULT);
        char *v = attr >= 0 ? read_string_attr(attr, &len) : NULL;
        if (attr >= 0) H5Aclose(attr);
        if (!v) open_fail(ds, -1, "%s", "attribute \"vocab\" is not a string");
        /* a fixed-length attribute of exactly vocab_size bytes may hold a NUL character; a longer one
         * (or a variable-length string) is read up to its terminator */
        if (len != (size_t)ds->vocab_size) len = strlen(v);
        if (len != (size_t)ds->vocab_size) {
            free(v);
            snprintf(detail, sizeof detail, "attribute \"vocab\" has %zu characters but vocab_size is %d", len,
                     ds->vocab_size);
            open_fail(ds, -1, "%s", detail);
        }
        ds->vocab = xmalloc(len + 1);
        memcpy(ds->vocab, v, len);
        ds->vocab[len] = 0;
        free(v);
    }
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
    hid_t dset = (hid_t)ds->hid_tokens;
    hid_t fspace = H5Dget_space(dset);
    hsize_t off[1] = {(hsize_t)start}, cnt[1] = {(hsize_t)n};
    herr_t st = H5Sselect_hyperslab(fspace, H5S_SELECT_SET, off, NULL, cnt, NULL);
    hid_t mspace = H5Screate_simple(1, cnt, NULL);
    if (st >= 0) st = H5Dread(dset, H5T_NATIVE_INT32, mspace, fspace, H5P_DEFAULT, out);
    H5Sclose(mspace);
    H5Sclose(fspace);
    if (st < 0)
        fatal("%s: cannot read tokens [%lld, %lld) (corrupt file?)", ds->path, (long long)start,
              (long long)(start + n));
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
    s->ds = ds;
    s->mix = NULL;
    s->seed = seed;
    s->counter = 0;
}

void sampler_init_mix(Sampler *s, const DataMix *mix, uint64_t seed) {
    if (mix->n < 1) fatal("sampler_init_mix: an empty mix");
    s->ds = NULL;
    s->mix = mix;
    s->seed = seed;
    s->counter = 0;
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
        const TokenDataset *ds = s->mix ? &s->mix->ds[pick_file(s->mix, &r)] : s->ds;
        check_fits(ds, b->T);
        uint64_t n_starts = (uint64_t)(ds->n_tokens - b->T); /* starts 0 .. n_tokens - T - 1 */
        uint64_t start = (uint64_t)(rng_uniform(&r) * (double)n_starts);
        if (start >= n_starts) start = n_starts - 1;
        fill_row(ds, b, i, (int64_t)start, buf);
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
