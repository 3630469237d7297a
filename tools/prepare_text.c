/* build/prepare_text: text -> HDF5 token files (the format data/dataset.h describes).
 *
 *   build/prepare_text [--tokenizer char|byte] [--val-fraction F] [--doc-separator STR] [--whole-documents]
 *                      [--min-doc-tokens N] INPUT OUTDIR
 *
 * INPUT is a text file, or a directory whose regular files (sorted by name, hidden ones skipped) are
 * one document each; --doc-separator also cuts files into documents at that string (the separator
 * itself is dropped, empty documents are skipped). The token stream is split at one token position
 * as nanoGPT's shakespeare_char does: the first (1 - F) of the tokens go to OUTDIR/train.h5, the rest
 * to OUTDIR/val.h5 (F = 0: no val file); a document cut by the split continues as the first document
 * of val.h5; with --whole-documents the split moves to the document boundary nearest that position instead,
 * so that no document is cut (an input of one document is still cut). --min-doc-tokens N keeps only the
 * documents of at least N tokens in each file (a length bucket for long-context training and evaluation;
 * a part left without any is an error). Tokenizers: "char" = the sorted set of distinct bytes of the input (stored as the
 * "vocab" attribute; 65 for tiny Shakespeare), "byte" = the 256 byte values. Each file is written as
 * NAME.h5.tmp, checked by reading it back with dataset_open, then renamed into place. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../data/dataset.h"
#include "../data/h5read.h"
#include "../kernels/util.h"

#define CHUNK_TOKENS ((hsize_t)1 << 16) /* 256 KiB of int32 per chunk: small reads stay cheap */
#define DEFLATE_LEVEL 6

typedef struct Options {
    const char *tokenizer, *separator, *input, *outdir;
    double val_fraction;
    bool whole_documents;
    int64_t min_doc_tokens; /* 0: every document */
} Options;

/* All documents laid end to end; doc_offsets[d] is where document d starts in text. */
typedef struct Corpus {
    unsigned char *text;
    int64_t n, cap;
    int64_t *doc_offsets; /* [n_docs + 1] */
    int64_t n_docs, docs_cap;
} Corpus;

static noreturn void usage_error(const char *msg) {
    fprintf(stderr,
            "usage: build/prepare_text [--tokenizer char|byte] [--val-fraction F] [--doc-separator STR] "
            "[--whole-documents] [--min-doc-tokens N] INPUT OUTDIR\n");
    fatal("%s", msg);
}

static void corpus_add_doc(Corpus *c, const unsigned char *p, int64_t len) {
    if (len <= 0) return; /* an empty document would only be an empty segment */
    if (c->n + len > c->cap) {
        c->cap = (c->n + len) * 2;
        c->text = xrealloc(c->text, (size_t)c->cap);
    }
    if (c->n_docs + 2 > c->docs_cap) {
        c->docs_cap = (c->n_docs + 2) * 2;
        c->doc_offsets = xrealloc(c->doc_offsets, (size_t)c->docs_cap * sizeof(int64_t));
    }
    memcpy(c->text + c->n, p, (size_t)len);
    c->doc_offsets[c->n_docs++] = c->n;
    c->n += len;
    c->doc_offsets[c->n_docs] = c->n;
}

static void read_file_docs(Corpus *c, const char *path, const char *sep) {
    FILE *f = fopen(path, "rb");
    if (!f) fatal("%s: cannot read (%s)", path, strerror(errno));
    size_t cap = 1 << 20, n = 0;
    unsigned char *buf = xmalloc(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = xrealloc(buf, cap *= 2);
    }
    if (ferror(f)) fatal("%s: read error (%s)", path, strerror(errno));
    fclose(f);
    size_t seplen = sep ? strlen(sep) : 0;
    const unsigned char *p = buf, *end = buf + n;
    while (seplen) {
        const unsigned char *hit = memmem(p, (size_t)(end - p), sep, seplen);
        if (!hit) break;
        corpus_add_doc(c, p, hit - p);
        p = hit + seplen;
    }
    corpus_add_doc(c, p, end - p);
    free(buf);
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void read_input(Corpus *c, const Options *o) {
    struct stat st;
    if (stat(o->input, &st) != 0) fatal("%s: cannot read the input (%s)", o->input, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        read_file_docs(c, o->input, o->separator);
        return;
    }
    DIR *d = opendir(o->input);
    if (!d) fatal("%s: cannot list the directory (%s)", o->input, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue; /* ".", ".." and hidden files (editor and OS litter) */
        size_t size = strlen(o->input) + strlen(e->d_name) + 2;
        char *path = xmalloc(size);
        snprintf(path, size, "%s/%s", o->input, e->d_name);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
            free(path);
            continue;
        }
        if (n == cap) names = xrealloc(names, (cap = cap ? 2 * cap : 64) * sizeof(char *));
        names[n++] = path;
    }
    closedir(d);
    qsort(names, n, sizeof(char *), cmp_names);
    for (size_t i = 0; i < n; i++) {
        read_file_docs(c, names[i], o->separator);
        free(names[i]);
    }
    free(names);
}

/* ---- HDF5 writer ------------------------------------------------------------------------------ */

typedef struct Writer {
    char *path, *tmp;
    hid_t file;
} Writer;

/* Give up on this file: drop its half-written temporary (an earlier file of that name stays as it was)
 * and say why. The exit after a failed close is clean because main called h5_setup. */
static noreturn void writer_fail(Writer *w, const char *what) {
    if (w->file >= 0) H5Fclose(w->file);
    unlink(w->tmp);
    fatal("%s: cannot write %s into %s (disk full or no permission?); %s is unchanged", w->path, what, w->tmp, w->path);
}

/* A growable (unlimited) 1-D chunked, shuffled and deflated dataset, appended to one chunk at a time
 * so a streaming tokenizer can later feed it without holding the corpus. */
static void write_1d(Writer *w, const char *name, hid_t ftype, hid_t mtype, const void *data, hsize_t n,
                     size_t elem) {
    hsize_t zero[1] = {0}, maxd[1] = {H5S_UNLIMITED}, chunk[1] = {n < CHUNK_TOKENS ? (n ? n : 1) : CHUNK_TOKENS};
    hid_t space = H5Screate_simple(1, zero, maxd);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    /* shuffle groups the bytes of small ids together: deflate then shrinks int32 tokens ~2x more */
    if (space < 0 || dcpl < 0 || H5Pset_chunk(dcpl, 1, chunk) < 0 || H5Pset_shuffle(dcpl) < 0 ||
        H5Pset_deflate(dcpl, DEFLATE_LEVEL) < 0)
        writer_fail(w, "the layout of a dataset");
    hid_t dset = H5Dcreate2(w->file, name, ftype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Sclose(space);
    if (dset < 0) writer_fail(w, name);
    for (hsize_t at = 0; at < n; at += CHUNK_TOKENS) {
        hsize_t cnt[1] = {n - at < CHUNK_TOKENS ? n - at : CHUNK_TOKENS}, size[1] = {at + cnt[0]}, off[1] = {at};
        bool ok = H5Dset_extent(dset, size) >= 0;
        hid_t fspace = H5Dget_space(dset), mspace = H5Screate_simple(1, cnt, NULL);
        ok = ok && H5Sselect_hyperslab(fspace, H5S_SELECT_SET, off, NULL, cnt, NULL) >= 0;
        ok = ok && H5Dwrite(dset, mtype, mspace, fspace, H5P_DEFAULT, (const char *)data + at * elem) >= 0;
        H5Sclose(mspace);
        H5Sclose(fspace);
        if (!ok) {
            H5Dclose(dset);
            writer_fail(w, name);
        }
    }
    if (H5Dclose(dset) < 0) writer_fail(w, name); /* the chunks still cached are written here */
}

/* A fixed-length string attribute of exactly len bytes (NUL-padded, so a NUL inside survives). */
static void write_string_attr(Writer *w, const char *name, const char *s, size_t len) {
    hid_t type = H5Tcopy(H5T_C_S1), space = H5Screate(H5S_SCALAR);
    H5Tset_size(type, len ? len : 1);
    H5Tset_strpad(type, H5T_STR_NULLPAD);
    hid_t a = H5Acreate2(w->file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    bool ok = a >= 0 && H5Awrite(a, type, s) >= 0;
    if (a >= 0) H5Aclose(a);
    H5Tclose(type);
    H5Sclose(space);
    if (!ok) writer_fail(w, name);
}

static void write_token_file(const char *path, const int32_t *tokens, int64_t n, const int64_t *offsets,
                             int64_t n_docs, const char *tokenizer, int vocab_size, const char *vocab) {
    Writer w = {.path = xstrdup(path), .tmp = xmalloc(strlen(path) + 5), .file = -1};
    sprintf(w.tmp, "%s.tmp", path);
    errno = 0;
    w.file = H5Fcreate(w.tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w.file < 0) fatal("%s: cannot create (%s)", w.tmp, errno ? strerror(errno) : "HDF5 error");
    write_1d(&w, "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, tokens, (hsize_t)n, sizeof(int32_t));
    write_1d(&w, "doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, offsets, (hsize_t)n_docs + 1, sizeof(int64_t));
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(w.file, "vocab_size", H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT);
    int32_t v = vocab_size;
    bool ok = a >= 0 && H5Awrite(a, H5T_NATIVE_INT32, &v) >= 0;
    if (a >= 0) H5Aclose(a);
    H5Sclose(space);
    if (!ok) writer_fail(&w, "vocab_size");
    write_string_attr(&w, "tokenizer", tokenizer, strlen(tokenizer));
    if (vocab) write_string_attr(&w, "vocab", vocab, (size_t)vocab_size);
    if (H5Fclose(w.file) < 0) {
        w.file = -1;
        writer_fail(&w, "the file's last blocks (closing it)");
    }
    w.file = -1;
    /* read it back through the trainer's own checks before it takes the final name */
    TokenDataset ds;
    dataset_open(&ds, w.tmp);
    dataset_close(&ds);
    if (rename(w.tmp, path) != 0) {
        int err = errno;
        unlink(w.tmp);
        fatal("%s: cannot rename %s into place (%s)", path, w.tmp, strerror(err));
    }
    free(w.tmp);
    free(w.path);
}

static void parse_args(Options *o, int argc, char **argv) {
    *o = (Options){.tokenizer = "char", .val_fraction = 0.1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: build/prepare_text [--tokenizer char|byte] [--val-fraction F] [--doc-separator STR] "
                   "INPUT OUTDIR\n"
                   "Tokenises INPUT (a text file, or a directory of text files = one document each) into\n"
                   "OUTDIR/train.h5 and OUTDIR/val.h5 (the last F of the tokens; default F = 0.1).\n"
                   "  --tokenizer char    vocabulary = the distinct bytes of the input (default)\n"
                   "  --tokenizer byte    vocabulary = the 256 byte values\n"
                   "  --doc-separator S   also split files into documents at the string S\n"
                   "  --whole-documents   split train/val at the document boundary nearest the split point\n"
                   "  --min-doc-tokens N  keep only documents of at least N tokens (in each file)\n");
            exit(0);
        }
        if (!strcmp(a, "--whole-documents")) {
            o->whole_documents = true;
            continue;
        }
        if (!strcmp(a, "--tokenizer") || !strcmp(a, "--val-fraction") || !strcmp(a, "--doc-separator") ||
            !strcmp(a, "--min-doc-tokens")) {
            if (i + 1 >= argc) usage_error("missing value after an option");
            const char *v = argv[++i];
            if (!strcmp(a, "--tokenizer")) {
                if (strcmp(v, "char") && strcmp(v, "byte")) fatal("--tokenizer %s: must be char or byte", v);
                o->tokenizer = v;
            } else if (!strcmp(a, "--val-fraction")) {
                char *end;
                o->val_fraction = strtod(v, &end);
                if (!*v || *end || !(o->val_fraction >= 0 && o->val_fraction < 1))
                    fatal("--val-fraction %s: must be a number in [0, 1)", v);
            } else if (!strcmp(a, "--min-doc-tokens")) {
                char *end;
                errno = 0;
                long long n = strtoll(v, &end, 10);
                if (!*v || *end || errno || n < 1) fatal("--min-doc-tokens %s: must be an integer >= 1", v);
                o->min_doc_tokens = n;
            } else {
                if (!*v) fatal("--doc-separator: the separator must not be empty");
                o->separator = v;
            }
        } else if (a[0] == '-' && a[1]) {
            char msg[256];
            snprintf(msg, sizeof msg, "unknown option %s", a);
            usage_error(msg);
        } else if (!o->input) o->input = a;
        else if (!o->outdir) o->outdir = a;
        else usage_error("too many arguments");
    }
    if (!o->input || !o->outdir) usage_error("INPUT and OUTDIR are required");
}

/* The document boundary (a start other than 0) nearest token position at; at itself when the corpus is one
 * document. */
static int64_t nearest_boundary(const Corpus *c, int64_t at) {
    int64_t best = at, dist = INT64_MAX;
    for (int64_t d = 1; d < c->n_docs; d++) {
        int64_t b = c->doc_offsets[d], e = b > at ? b - at : at - b;
        if (e < dist) best = b, dist = e;
    }
    return best;
}

/* --min-doc-tokens: drops the documents shorter than that from one part (tokens *tokens, document offsets
 * off [*n_docs + 1]); *tokens becomes a new array of the documents kept (malloc'd), off and *n_docs theirs.
 * Returns the tokens kept. */
static int64_t keep_long_documents(const Options *o, const char *path, int32_t **tokens, int64_t *off, int64_t *n_docs) {
    int32_t *kept = xmalloc((size_t)(off[*n_docs] > 0 ? off[*n_docs] : 1) * sizeof(int32_t));
    int64_t n = 0, docs = 0, longest = 0;
    for (int64_t d = 0; d < *n_docs; d++) {
        int64_t len = off[d + 1] - off[d];
        longest = len > longest ? len : longest;
        if (len < o->min_doc_tokens) continue;
        memcpy(kept + n, *tokens + off[d], (size_t)len * sizeof(int32_t));
        off[docs++] = n; /* docs <= d: the entry was read already */
        n += len;
    }
    if (!docs)
        fatal("%s: no document of at least --min-doc-tokens %lld tokens would go into %s (its longest has %lld)",
              o->input, (long long)o->min_doc_tokens, path, (long long)longest);
    off[docs] = n;
    *n_docs = docs;
    *tokens = kept;
    return n;
}

static const char *plural(int64_t n) { return n == 1 ? "" : "s"; }

int main(int argc, char **argv) {
    Options o;
    parse_args(&o, argc, argv);
    h5_setup(); /* failures are reported by name below, and a failed close does not crash the exit */

    Corpus c = {0};
    read_input(&c, &o);
    if (c.n == 0) fatal("%s: no text (empty input)", o.input);

    /* tokenise */
    bool chars = !strcmp(o.tokenizer, "char");
    int vocab_size = 256;
    char vocab[257] = {0};
    int32_t map[256];
    for (int b = 0; b < 256; b++) map[b] = b;
    if (chars) {
        bool seen[256] = {false};
        for (int64_t i = 0; i < c.n; i++) seen[c.text[i]] = true;
        vocab_size = 0;
        for (int b = 0; b < 256; b++)
            if (seen[b]) {
                map[b] = vocab_size;
                vocab[vocab_size++] = (char)b;
            }
    }
    int32_t *tokens = xmalloc((size_t)c.n * sizeof(int32_t));
    for (int64_t i = 0; i < c.n; i++) tokens[i] = map[c.text[i]];
    free(c.text);

    /* split at one token position, as nanoGPT: n_train = int(n * 0.9) */
    int64_t n = c.n, n_train = (int64_t)floor((double)n * (1.0 - o.val_fraction));
    if (o.whole_documents && o.val_fraction > 0) n_train = nearest_boundary(&c, n_train);
    int64_t n_val = n - n_train;
    if (n_train <= 0 || (o.val_fraction > 0 && n_val <= 0))
        fatal("%s: %lld tokens are too few to split with --val-fraction %g", o.input, (long long)n, o.val_fraction);

    /* documents of each part: a document the split cuts belongs to both */
    int64_t *tr_off = xmalloc((size_t)(c.n_docs + 1) * sizeof(int64_t)), n_tr_docs = 0;
    int64_t *va_off = xmalloc((size_t)(c.n_docs + 2) * sizeof(int64_t)), n_va_docs = 0;
    for (int64_t d = 0; d < c.n_docs; d++) {
        if (c.doc_offsets[d] < n_train) tr_off[n_tr_docs++] = c.doc_offsets[d];
        if (c.doc_offsets[d + 1] > n_train)
            va_off[n_va_docs++] = (c.doc_offsets[d] > n_train ? c.doc_offsets[d] : n_train) - n_train;
    }
    tr_off[n_tr_docs] = n_train;
    va_off[n_va_docs] = n_val;

    char failed[4096];
    int err = make_dirs(o.outdir, failed, sizeof failed);
    if (err) fatal("%s: cannot create the directory %s (%s)", o.outdir, failed, strerror(err));
    char *train_path = xmalloc(strlen(o.outdir) + 16), *val_path = xmalloc(strlen(o.outdir) + 16);
    sprintf(train_path, "%s/train.h5", o.outdir);
    sprintf(val_path, "%s/val.h5", o.outdir);
    const char *v = chars ? vocab : NULL;
    int32_t *tr_tokens = tokens, *va_tokens = tokens + n_train;
    if (o.min_doc_tokens) {
        n_train = keep_long_documents(&o, train_path, &tr_tokens, tr_off, &n_tr_docs);
        if (n_val > 0) n_val = keep_long_documents(&o, val_path, &va_tokens, va_off, &n_va_docs);
    }
    write_token_file(train_path, tr_tokens, n_train, tr_off, n_tr_docs, o.tokenizer, vocab_size, v);
    if (n_val > 0) write_token_file(val_path, va_tokens, n_val, va_off, n_va_docs, o.tokenizer, vocab_size, v);

    printf("prepare_text: %s: %lld tokens in %lld document%s, %s tokenizer, vocab size %d\n", o.input, (long long)n,
           (long long)c.n_docs, plural(c.n_docs), o.tokenizer, vocab_size);
    printf("  %s: %lld tokens, %lld document%s\n", train_path, (long long)n_train, (long long)n_tr_docs,
           plural(n_tr_docs));
    if (n_val > 0)
        printf("  %s: %lld tokens, %lld document%s\n", val_path, (long long)n_val, (long long)n_va_docs,
               plural(n_va_docs));
    else printf("  (no validation file: --val-fraction 0)\n");
    if (o.min_doc_tokens) {
        free(tr_tokens);
        if (n_val > 0) free(va_tokens);
    }
    free(tr_off);
    free(va_off);
    free(tokens);
    free(c.doc_offsets);
    free(train_path);
    free(val_path);
    return 0;
}
