/* Ranks agree or stop (ranks_agree.h). */
#include "ranks_agree.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "../kernels/util.h"

/* The section of the agreed JSON that holds the data files' headers, next to the config's sections. */
#define DATA_FILES "data files"

/* What every rank must agree on, as canonical JSON text (malloc'd): the config's sections, then a section
 * of the data files' headers, "<config key>: <field>" (e.g. "data.val_path: tokens"). */
static char *agreed_text(const RunConfig *c, const AgreedFile *files, int n_files) {
    char *config = config_to_json(c);
    json_error_t je;
    json_t *root = json_loads(config, 0, &je);
    if (!root) fatal("the config as JSON does not parse: line %d, column %d: %s", je.line, je.column, je.text);
    free(config);
    json_t *data = json_object();
    for (int i = 0; i < n_files; i++) {
        const TokenDataset *ds = files[i].ds;
        const char *const fields[] = {"vocab_size", "tokenizer", "tokens", "documents"};
        json_t *const values[] = {json_integer(ds->vocab_size), json_string(ds->tokenizer), json_integer(ds->n_tokens),
                                  json_integer(ds->n_docs)};
        for (int f = 0; f < 4; f++) {
            char key[128];
            snprintf(key, sizeof key, "%s: %s", files[i].key, fields[f]);
            json_object_set_new(data, key, values[f]);
        }
    }
    json_object_set_new(root, DATA_FILES, data);
    char *text = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
    json_decref(root);
    if (!text) fatal("ranks_agree: out of memory");
    return text;
}

/* The first entry, two levels deep (section, key), where mine differs from rank 0's, in my order and then
 * rank 0's (an entry only one of them has); false when none does. */
static bool first_difference(json_t *mine, json_t *theirs, const char **section, const char **key) {
    for (int pass = 0; pass < 2; pass++) {
        json_t *a = pass ? theirs : mine, *b = pass ? mine : theirs;
        const char *s, *k;
        json_t *sa, *va;
        json_object_foreach(a, s, sa) {
            json_t *sb = json_object_get(b, s);
            json_object_foreach(sa, k, va) {
                json_t *vb = json_object_get(sb, k);
                if (!vb || !json_equal(va, vb)) {
                    *section = s;
                    *key = k;
                    return true;
                }
            }
        }
    }
    return false;
}

/* JSON text of the value at (section, key) of root, or "(absent)"; malloc'd. */
static char *value_text(json_t *root, const char *section, const char *key) {
    json_t *v = json_object_get(json_object_get(root, section), key);
    return v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(9)) : xstrdup("(absent)");
}

/* This rank differs from rank 0 (whose text is theirs): stop the job, naming the first differing key. */
static noreturn void report_difference(const char *mine_text, const char *theirs_text, const char *where) {
    json_error_t je;
    json_t *mine = json_loads(mine_text, 0, &je), *theirs = json_loads(theirs_text, 0, &je);
    const char *section = NULL, *key = NULL;
    if (!mine || !theirs || !first_difference(mine, theirs, &section, &key))
        fatal("%s: this rank's config differs from rank 0's (byte for byte, though no key does): every rank must run "
              "the same config",
              where);
    char *a = value_text(mine, section, key), *b = value_text(theirs, section, key), name[512];
    if (!strcmp(section, DATA_FILES)) snprintf(name, sizeof name, "the data file header %s", key);
    else snprintf(name, sizeof name, "%s.%s", section, key);
    fatal("%s: this rank's config or data differ from rank 0's: %s = %s here but %s on rank 0. Every rank must run "
          "the same config on the same data: check the config file and the --set arguments each rank is given (and "
          "that every node sees the same data files)",
          where, name, a, b);
}

void ranks_agree(const Dist *d, const RunConfig *c, const AgreedFile *files, int n_files, const char *where) {
    if (d->size == 1) return;
    dist_meet(&d->world, "reading its config and data files");
    char *mine = agreed_text(c, files, n_files);
    int64_t len = (int64_t)strlen(mine) + 1;
    dist_broadcast(&d->world, &len, 1, DIST_I64, 0, DEV_CPU);
    char *theirs = d->rank == 0 ? mine : xmalloc((size_t)len);
    dist_broadcast(&d->world, theirs, len, DIST_U8, 0, DEV_CPU);
    /* the lowest rank that differs reports; the others wait for its report to end the job */
    int first = strcmp(mine, theirs) ? d->rank : d->size;
    dist_all_reduce(&d->world, &first, 1, DIST_I32, DIST_MIN, DEV_CPU);
    if (first == d->rank) report_difference(mine, theirs, where);
    if (first < d->size) {
        char what[128];
        snprintf(what, sizeof what, "the config check (rank %d's config differs from rank 0's; its message says how)",
                 first);
        dist_meet(&d->world, what); /* never completes: rank `first` ends the job */
        fatal("%s: rank %d's config or data differ from rank 0's", where, first);
    }
    if (theirs != mine) free(theirs);
    free(mine);
}
