/* Checkpoints in HDF5 (format in checkpoint.h). A checkpoint is the user's file: every problem with one
 * ends the program with "error: <file>: <problem>" naming the tensor at fault (or, verifying, returns
 * it), never with HDF5's own error stack, and a failed read or write never touches another file. Tensor
 * data goes through the backend's copy functions, so the same code saves CPU and device memory. */
#include "checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../data/crc32.h"
#include "../data/h5read.h"
#include "../kernels/util.h"

#define CKPT_FORMAT "msa-train-checkpoint"
#define CKPT_VERSION 2      /* 2: a crc32 attribute on every tensor */
#define CKPT_OLDEST_VERSION 1
#define NAME_MAX_LEN 256    /* parameter names are far shorter ("layers.12.moe.shared.0.w_gate") */
#define VERIFY_SLAB_FLOATS ((int64_t)1 << 20) /* checkpoint_verify's read buffer: 4 MiB */

/* A parameter-store slice (dtype of the store, F32 in training, F64 in gradient checks) <-> host f32. */
static void store_to_f32(const KernelBackend *be, DType dt, const void *src, int64_t numel, float *out) {
    if (dt == DT_F32) {
        be->copy_to_host(out, src, (size_t)numel * sizeof(float));
        return;
    }
    if (dt != DT_F64)
        fatal("checkpoint: parameters of dtype %d cannot be saved (f32 or f64 master weights only)", (int)dt);
    double *tmp = xmalloc((size_t)numel * sizeof(double));
    be->copy_to_host(tmp, src, (size_t)numel * sizeof(double));
    for (int64_t i = 0; i < numel; i++) out[i] = (float)tmp[i];
    free(tmp);
}

static void f32_to_store(const KernelBackend *be, DType dt, void *dst, int64_t numel, const float *in) {
    if (dt == DT_F32) {
        be->copy_from_host(dst, in, (size_t)numel * sizeof(float));
        return;
    }
    if (dt != DT_F64)
        fatal("checkpoint: parameters of dtype %d cannot be loaded (f32 or f64 master weights only)", (int)dt);
    double *tmp = xmalloc((size_t)numel * sizeof(double));
    for (int64_t i = 0; i < numel; i++) tmp[i] = in[i];
    be->copy_from_host(dst, tmp, (size_t)numel * sizeof(double));
    free(tmp);
}

static int64_t max_param_numel(const ParamStore *ps) {
    int64_t mx = 0;
    for (int i = 0; i < ps->n; i++)
        if (ps->p[i].t->numel > mx) mx = ps->p[i].t->numel;
    return mx;
}

static const char *moe_bias_name(char *buf, size_t n, int layer) {
    snprintf(buf, n, "layers.%d.moe.bias", layer);
    return buf;
}

/* ---- writing ---------------------------------------------------------------------------------- */

typedef struct Writer {
    const char *path;
    char tmp[4096];
    hid_t file;
} Writer;

/* Give up: drop the half-written temporary file (never the previous checkpoint) and say why. */
static noreturn void write_fail(Writer *w, const char *what, const char *name) {
    if (w->file >= 0) H5Fclose(w->file);
    unlink(w->tmp);
    fatal("%s: cannot write the checkpoint (%s%s%s; disk full or no permission?); earlier checkpoints are untouched",
          w->path, what, name ? " " : "", name ? name : "");
}

static hid_t make_group(Writer *w, const char *name) {
    hid_t g = H5Gcreate2(w->file, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) write_fail(w, "creating group", name);
    return g;
}

/* A tensor and its crc32 attribute (checkpoint.h). */
static void write_f32(Writer *w, hid_t group, const char *gname, const char *name, int ndim, const int64_t *shape,
                      const float *host) {
    hsize_t dims[TENSOR_MAX_DIMS];
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        dims[i] = (hsize_t)shape[i];
        numel *= shape[i];
    }
    char full[NAME_MAX_LEN + 32];
    snprintf(full, sizeof full, "%s/%s", gname, name);
    uint32_t crc = crc32_update(0, host, (size_t)numel * sizeof(float));
    hid_t space = H5Screate_simple(ndim, dims, NULL), one = H5Screate(H5S_SCALAR);
    hid_t d = space >= 0 ? H5Dcreate2(group, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    bool ok = d >= 0 && H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, host) >= 0;
    hid_t a = ok && one >= 0 ? H5Acreate2(d, "crc32", H5T_STD_U32LE, one, H5P_DEFAULT, H5P_DEFAULT) : -1;
    ok = a >= 0 && H5Awrite(a, H5T_NATIVE_UINT32, &crc) >= 0;
    if (a >= 0) ok = H5Aclose(a) >= 0 && ok;
    if (d >= 0) ok = H5Dclose(d) >= 0 && ok;
    if (one >= 0) H5Sclose(one);
    if (space >= 0) H5Sclose(space);
    if (!ok) write_fail(w, "writing", full);
}

static void write_scalar_attr(Writer *w, const char *name, hid_t file_type, hid_t mem_type, const void *value) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(w->file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    bool ok = a >= 0 && H5Awrite(a, mem_type, value) >= 0;
    if (a >= 0) ok = H5Aclose(a) >= 0 && ok;
    H5Sclose(space);
    if (!ok) write_fail(w, "writing attribute", name);
}

/* Variable-length UTF-8 string: what h5py writes and reads back as str. */
static void write_string_attr(Writer *w, const char *name, const char *value) {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    write_scalar_attr(w, name, type, type, &value);
    H5Tclose(type);
}

/* Moments or parameter values of every parameter into one group; base is a buffer laid out as the store,
 * in the memory of backend be. */
static void write_store_slices(Writer *w, hid_t group, const char *gname, const ParamStore *ps,
                               const KernelBackend *be, const void *base, float *host) {
    size_t es = dtype_size(ps->dtype);
    for (int i = 0; i < ps->n; i++) {
        const Param *p = &ps->p[i];
        store_to_f32(be, ps->dtype, (const char *)base + (size_t)p->offset * es, p->t->numel, host);
        write_f32(w, group, gname, p->t->name, p->t->ndim, p->t->shape, host);
    }
}

/* Make the data of a closed file durable before the rename publishes it (and the rename itself after). */
static void fsync_path(const char *path, bool directory) {
    int fd = open(path, O_RDONLY | (directory ? O_DIRECTORY : 0));
    if (fd < 0) return;
    fsync(fd); /* best effort for the directory: some file systems refuse it, and the data is already safe */
    close(fd);
}

/* Test hook, for tests/test_checkpoint.c only: MSA_CKPT_TEST_KILL_AFTER_PARAMS=<step> makes the process
 * kill itself with SIGKILL while writing the checkpoint of that step (the first one: with train.save_best
 * a new best's ckpt_best.h5 comes before ckpt_<step>.h5), right after the parameters are flushed to
 * <path>.tmp, so a test can check that a crash mid-write leaves a half-written .tmp file that nothing
 * takes for a checkpoint, and the previous checkpoint intact. */
static void test_hook_kill_after_params(Writer *w, int64_t step) {
    const char *env = getenv("MSA_CKPT_TEST_KILL_AFTER_PARAMS");
    if (!env || !*env || strtoll(env, NULL, 10) != step) return;
    H5Fflush(w->file, H5F_SCOPE_GLOBAL);
    raise(SIGKILL);
}

/* Test hook, for tests/test_checkpoint.c only: MSA_CKPT_TEST_CORRUPT=<step> flips one bit in the data of
 * the first parameter of the checkpoint of that step, in <path>.tmp after it is written and closed,
 * before the verification: the damage a bad disk or a bad write would do. */
static void test_hook_corrupt(const Writer *w, int64_t step, const char *tensor) {
    const char *env = getenv("MSA_CKPT_TEST_CORRUPT");
    if (!env || !*env || strtoll(env, NULL, 10) != step) return;
    char name[NAME_MAX_LEN + 16];
    snprintf(name, sizeof name, "params/%s", tensor);
    hid_t f = H5Fopen(w->tmp, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = f >= 0 ? H5Dopen2(f, name, H5P_DEFAULT) : -1;
    haddr_t at = d >= 0 ? H5Dget_offset(d) : HADDR_UNDEF;
    if (d >= 0) H5Dclose(d);
    if (f >= 0) H5Fclose(f);
    int fd = open(w->tmp, O_RDWR);
    unsigned char byte = 0;
    if (at == HADDR_UNDEF || fd < 0 || pread(fd, &byte, 1, (off_t)at + 6) != 1) fatal("MSA_CKPT_TEST_CORRUPT: cannot find %s", name);
    byte ^= 0x80; /* the lowest exponent bit of the second value: it halves or doubles, still finite */
    if (pwrite(fd, &byte, 1, (off_t)at + 6) != 1) fatal("MSA_CKPT_TEST_CORRUPT: cannot write %s", w->tmp);
    close(fd);
}

void checkpoint_write(const char *path, const Model *m, const AdamW *opt, const TrainState *st, const char *config_json) {
    h5_setup();
    Writer w = {.path = path, .file = -1};
    if ((size_t)snprintf(w.tmp, sizeof w.tmp, "%s.tmp", path) >= sizeof w.tmp) fatal("%s: path too long", path);
    const ParamStore *ps = &m->params;
    for (int i = 0; i < ps->n; i++)
        if (strlen(ps->p[i].t->name) >= NAME_MAX_LEN || strchr(ps->p[i].t->name, '/'))
            fatal("%s: parameter name \"%s\" cannot be a checkpoint dataset name", path, ps->p[i].t->name);
    if (opt && opt->numel != ps->numel) fatal("%s: the optimizer does not match the model's parameters", path);
    if (opt && (opt->begin != 0 || opt->end < ps->numel))
        fatal("%s: the optimizer holds only a shard of the moments; gather them first", path);

    /* the temporary file replaces any leftover of an earlier crashed write of the same checkpoint */
    w.file = H5Fcreate(w.tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w.file < 0) fatal("%s: cannot create the checkpoint file (does the directory exist, is it writable?)", w.tmp);
    float *host = xmalloc((size_t)max_param_numel(ps) * sizeof(float) + sizeof(float));

    hid_t g = make_group(&w, "params");
    write_store_slices(&w, g, "params", ps, ps->be, ps->data, host);
    H5Gclose(g);
    test_hook_kill_after_params(&w, st ? st->step : 0);

    if (opt) { /* an imported checkpoint has parameters only */
        hid_t og = make_group(&w, "optimizer");
        hid_t mg = make_group(&w, "optimizer/m");
        write_store_slices(&w, mg, "optimizer/m", ps, opt->be, opt->m, host);
        H5Gclose(mg);
        hid_t vg = make_group(&w, "optimizer/v");
        write_store_slices(&w, vg, "optimizer/v", ps, opt->be, opt->v, host);
        H5Gclose(vg);
        H5Gclose(og);
    }

    hid_t sg = make_group(&w, "state");
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const MoeLayer *ml = moe_layer_of(&m->layers[l].ffn);
        const MoeLayerParams *mp = ml ? &ml->p : NULL;
        if (!mp || !mp->bias) continue;
        char name[64];
        int64_t shape[1] = {mp->num_experts};
        float *bias = xmalloc((size_t)mp->num_experts * sizeof(float)); /* the bias lives in the backend's memory */
        moe_bias_to_host(mp, bias);
        write_f32(&w, sg, "state", moe_bias_name(name, sizeof name, l), 1, shape, bias);
        free(bias);
    }
    H5Gclose(sg);
    free(host);

    int version = CKPT_VERSION, adam_t = opt ? opt->t : 0;
    int64_t step = st ? st->step : 0;
    uint64_t counter = st ? st->data_counter : 0, seed = st ? st->seed : 0;
    double best = st ? st->best_val_loss : NAN, first = st ? st->first_val_loss : NAN;
    write_string_attr(&w, "format", CKPT_FORMAT);
    write_scalar_attr(&w, "version", H5T_STD_I32LE, H5T_NATIVE_INT, &version);
    write_scalar_attr(&w, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step);
    write_scalar_attr(&w, "adam_t", H5T_STD_I32LE, H5T_NATIVE_INT, &adam_t);
    write_scalar_attr(&w, "data_counter", H5T_STD_U64LE, H5T_NATIVE_UINT64, &counter);
    write_scalar_attr(&w, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, &seed);
    write_scalar_attr(&w, "best_val_loss", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &best);
    write_scalar_attr(&w, "first_val_loss", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &first);
    if (config_json) write_string_attr(&w, "config", config_json);

    hid_t file = w.file;
    w.file = -1;
    if (H5Fclose(file) < 0) write_fail(&w, "closing", w.tmp);
    fsync_path(w.tmp, false);
    test_hook_corrupt(&w, step, ps->p[0].t->name);
    /* what the disk holds now, read back through the loaders' own checks: a write that came out wrong
     * must not replace a good checkpoint, nor let keep_checkpoints delete older ones */
    char why[1024];
    if (!checkpoint_verify(w.tmp, why, sizeof why))
        fatal("%s: the checkpoint just written does not verify (%s); it stays as %s, earlier checkpoints are untouched",
              path, why, w.tmp);
    if (rename(w.tmp, path) != 0) {
        int err = errno;
        unlink(w.tmp);
        fatal("%s: cannot rename %s over it (%s); earlier checkpoints are untouched", path, w.tmp, strerror(err));
    }
    char dir[sizeof w.tmp];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    fsync_path(slash ? (dir[0] ? dir : "/") : ".", true);
}

/* ---- reading ---------------------------------------------------------------------------------- */

typedef struct Ckpt {
    H5Reader rd; /* its mode decides: loaders end the program on a problem, checkpoint_verify returns it */
    int version;
} Ckpt;

/* A version 1 file says so once per file, not at each of the reads of one --resume. */
static void warn_unverifiable(const char *path) {
    static char warned[4096];
    if (!strcmp(warned, path)) return;
    snprintf(warned, sizeof warned, "%s", path);
    fprintf(stderr,
            "warning: %s: checkpoint format version 1 has no checksums, so its tensors load unverified (NaN and "
            "infinite values are still refused); checkpoints written from now on have them\n",
            path);
}

/* Opens a checkpoint read-only and checks that it is one of ours, of a version this build reads. */
static bool open_checkpoint(Ckpt *c, const char *path, bool exit_on_error) {
    H5Reader *r = &c->rd;
    if (!h5r_open(r, path, "checkpoint", ", so not a checkpoint (truncated or corrupt?)", exit_on_error)) return false;
    char *format = NULL;
    int64_t version = 0;
    int st = h5r_attr_string(r, r->file, "format", false, &format, NULL);
    if (st == 0)
        h5r_fail(r, "not an msa-train checkpoint (no \"format\" attribute; an HDF5 file of another kind?)");
    else if (st == 1 && strcmp(format, CKPT_FORMAT) != 0)
        h5r_fail(r, "not an msa-train checkpoint (attribute \"format\" is \"%.64s\", not \"" CKPT_FORMAT "\")", format);
    else if (st == 1 && h5r_attr_int(r, r->file, "version", true, 0, INT32_MAX, &version) == 1) {
        int params = 0;
        if (version < CKPT_OLDEST_VERSION || version > CKPT_VERSION)
            h5r_fail(r, "checkpoint format version %lld; this build reads versions %d to %d", (long long)version,
                     CKPT_OLDEST_VERSION, CKPT_VERSION);
        else if ((params = h5r_link(r, r->file, "params")) == 0)
            h5r_fail(r, "checkpoint without a /params group (truncated or corrupt)");
        else if (params == 1) {
            free(format);
            c->version = (int)version;
            if (c->version < 2) warn_unverifiable(path);
            return true;
        }
    }
    free(format);
    h5r_close(r);
    return false;
}

/* 1: *g open; 0: absent and not required; -1: a problem. why follows "no /<name> group". */
static int open_group(Ckpt *c, const char *name, bool required, const char *why, hid_t *g) {
    *g = -1;
    int link = h5r_link(&c->rd, c->rd.file, name);
    if (link < 0) return -1;
    if (link == 0) {
        if (!required) return 0;
        h5r_fail(&c->rd, "the checkpoint has no /%s group%s", name, why);
        return -1;
    }
    *g = H5Gopen2(c->rd.file, name, H5P_DEFAULT);
    if (*g >= 0) return 1;
    h5r_fail(&c->rd, "/%s is not a group (corrupt checkpoint?)", name);
    return -1;
}

/* Opens tensor gname/name as a floating-point dataset; of the given shape, or of any (shape NULL). */
static int open_tensor(Ckpt *c, hid_t group, const char *name, int ndim, const int64_t *shape, bool required, hid_t *d,
                       H5Shape *sh) {
    const H5DatasetSpec spec = {.mem_type = H5T_NATIVE_FLOAT, .ndim = shape ? ndim : -1, .dims = shape,
                                .hint = " (a different model config?)"};
    return h5r_dataset_open(&c->rd, group, name, &spec, required, H5P_DEFAULT, d, sh);
}

/* Reads the open tensor d (shape sh) into out, or with out NULL through a bounded scratch buffer only to
 * check it: every value must be finite, and from version 2 on the CRC-32 of the values must equal the
 * tensor's crc32 attribute. */
static bool read_tensor(Ckpt *c, hid_t d, const char *gname, const char *name, const H5Shape *sh, float *out) {
    H5Reader *r = &c->rd;
    uint64_t want = 0;
    if (c->version >= 2 && h5r_attr_uint(r, d, "crc32", true, UINT32_MAX, &want) != 1) return false;
    int64_t rows = sh->ndim ? sh->dims[0] : 1, row_floats = rows ? sh->numel / rows : 0;
    int64_t slab = out || row_floats == 0 ? rows : VERIFY_SLAB_FLOATS / row_floats;
    if (slab < 1) slab = 1;
    float *scratch = out ? NULL : xmalloc((size_t)((slab < rows ? slab : rows) * row_floats) * sizeof(float) + 1);
    uint32_t crc = 0;
    bool ok = true;
    for (int64_t at = 0; ok && at < rows; at += slab) {
        int64_t n = slab < rows - at ? slab : rows - at, count = n * row_floats;
        float *buf = out ? out + at * row_floats : scratch;
        ok = h5r_read_rows(r, d, sh, H5T_NATIVE_FLOAT, at, n, buf);
        for (int64_t i = 0; ok && i < count; i++)
            if (!isfinite(buf[i]))
                ok = h5r_fail(r, "tensor %s/%s holds %g at element %lld: the checkpoint is corrupt, or was written "
                                 "by a run that had diverged",
                              gname, name, (double)buf[i], (long long)(at * row_floats + i));
        if (ok) crc = crc32_update(crc, buf, (size_t)count * sizeof(float));
    }
    free(scratch);
    if (ok && c->version >= 2 && crc != (uint32_t)want)
        ok = h5r_fail(r, "tensor %s/%s does not match its checksum (crc32 0x%08x stored, 0x%08x read): the checkpoint "
                         "is corrupt",
                      gname, name, (unsigned)want, (unsigned)crc);
    return ok;
}

/* Every link of a group must name something the model has: is_known(ctx, name) decides. */
typedef bool (*KnownFn)(const void *ctx, const char *name);

static void check_no_unexpected(Ckpt *c, hid_t group, const char *gname, KnownFn is_known, const void *ctx) {
    H5G_info_t info;
    if (H5Gget_info(group, &info) < 0) h5r_fail(&c->rd, "cannot list /%s (the checkpoint is corrupt)", gname);
    for (hsize_t i = 0; i < info.nlinks; i++) {
        char name[NAME_MAX_LEN + 1];
        ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
        if (len < 0) h5r_fail(&c->rd, "cannot list /%s (the checkpoint is corrupt)", gname);
        if (len >= (ssize_t)sizeof name || !is_known(ctx, name))
            h5r_fail(&c->rd, "unexpected tensor %s/%s: the model has no such %s (a different model config?)", gname,
                     name, !strcmp(gname, "state") ? "state" : "parameter");
    }
}

static bool is_param(const void *ps, const char *name) { return params_find((ParamStore *)ps, name) != NULL; }

static bool is_moe_bias(const void *model, const char *name) {
    const Model *m = model;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        char b[64];
        if (moe_layer_of(&m->layers[l].ffn) && !strcmp(name, moe_bias_name(b, sizeof b, l))) return true;
    }
    return false;
}

static bool is_index_param(const char *name) { return strstr(name, ".index.") != NULL; }

/* Loads the parameter-shaped group gname (values or a moment) into base, a buffer laid out as the store in
 * the memory of backend be (the reader ends the program on any problem).
 * Every tensor's presence and shape is checked before any is read, so a file for another model leaves
 * the model as it was. A tensor the file lacks is an error unless it is an MSA index parameter and
 * allow_missing_index is set. Returns the number of tensors loaded. */
static int load_store_group(Ckpt *c, const char *gname, ParamStore *ps, const KernelBackend *be, void *base,
                            bool allow_missing_index, const char *why_no_group) {
    const char *path = c->rd.path;
    hid_t g, d;
    H5Shape sh;
    open_group(c, gname, true, why_no_group, &g);
    bool *present = xcalloc((size_t)ps->n + 1, sizeof(bool));
    for (int i = 0; i < ps->n; i++) {
        const Tensor *t = ps->p[i].t;
        present[i] = open_tensor(c, g, t->name, t->ndim, t->shape, false, &d, &sh) == 1;
        if (present[i]) H5Dclose(d);
        if (!present[i] && !(allow_missing_index && is_index_param(t->name))) {
            char shape[128];
            h5r_format_shape(shape, sizeof shape, t->ndim, t->shape);
            fatal("%s: missing tensor %s/%s (the model has it, shape %s)%s", path, gname, t->name, shape,
                  is_index_param(t->name) ? "; a dense checkpoint initialises an MSA model through train.init_from"
                                          : "");
        }
    }
    check_no_unexpected(c, g, gname, is_param, ps);

    float *host = xmalloc((size_t)max_param_numel(ps) * sizeof(float) + sizeof(float));
    size_t es = dtype_size(ps->dtype);
    int loaded = 0;
    for (int i = 0; i < ps->n; i++) {
        if (!present[i]) continue;
        const Param *p = &ps->p[i];
        open_tensor(c, g, p->t->name, p->t->ndim, p->t->shape, true, &d, &sh);
        read_tensor(c, d, gname, p->t->name, &sh, host);
        H5Dclose(d);
        f32_to_store(be, ps->dtype, (char *)base + (size_t)p->offset * es, p->t->numel, host);
        loaded++;
    }
    free(host);
    free(present);
    H5Gclose(g);
    return loaded;
}

/* The MoE selection biases in /state. required: every MoE layer's bias must be there (resume); else
 * the ones present are loaded and the others stay as they are (an imported checkpoint has none). */
static void load_moe_biases(Ckpt *c, Model *m, bool required) {
    const bool any_moe = m->n_moe_layers > 0;
    hid_t g, d;
    H5Shape sh;
    if (open_group(c, "state", required && any_moe, " (no MoE selection biases to resume)", &g) == 0) return;
    if (required) check_no_unexpected(c, g, "state", is_moe_bias, m);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        MoeLayer *ml = moe_layer_of(&m->layers[l].ffn);
        if (!ml) continue;
        MoeLayerParams *mp = &ml->p;
        char name[64];
        int64_t shape[1] = {mp->num_experts};
        if (open_tensor(c, g, moe_bias_name(name, sizeof name, l), 1, shape, false, &d, &sh) == 1) {
            float *bias = xmalloc((size_t)mp->num_experts * sizeof(float)); /* read on the host, then copied */
            if (read_tensor(c, d, "state", name, &sh, bias)) moe_bias_from_host(mp, bias);
            free(bias);
            H5Dclose(d);
        } else if (required)
            fatal("%s: missing tensor state/%s (the model's MoE layer %d needs its selection bias, shape [%d])",
                  c->rd.path, name, l, mp->num_experts);
    }
    H5Gclose(g);
}

/* The train-state root attributes. required: step, adam_t, data_counter and seed must be there (resume);
 * else only those present are checked. best_val_loss and first_val_loss are optional (NaN). */
static bool read_train_state(Ckpt *c, bool required, TrainState *st, int *adam_t) {
    H5Reader *r = &c->rd;
    int64_t step = 0, t = 0;
    uint64_t counter = 0, seed = 0;
    double best = NAN, first = NAN;
    if (h5r_attr_int(r, r->file, "step", required, 0, INT32_MAX, &step) < 0 ||
        h5r_attr_int(r, r->file, "adam_t", required, 0, INT32_MAX, &t) < 0 ||
        h5r_attr_uint(r, r->file, "data_counter", required, UINT64_MAX, &counter) < 0 ||
        h5r_attr_uint(r, r->file, "seed", required, UINT64_MAX, &seed) < 0 ||
        h5r_attr_float(r, r->file, "best_val_loss", false, false, &best) < 0 ||
        h5r_attr_float(r, r->file, "first_val_loss", false, false, &first) < 0)
        return false;
    *st = (TrainState){.step = step, .data_counter = counter, .seed = seed, .best_val_loss = best,
                       .first_val_loss = first};
    *adam_t = (int)t;
    return true;
}

int checkpoint_read_params(const char *path, Model *m, bool allow_missing_index) {
    Ckpt c;
    open_checkpoint(&c, path, true);
    int loaded = load_store_group(&c, "params", &m->params, m->params.be, m->params.data, allow_missing_index, "");
    params_sync_shadow(&m->params); /* device GEMMs read the BF16 copy of the weights */
    /* MoE selection biases decide which experts run, so they are part of the model's function */
    load_moe_biases(&c, m, false);
    h5r_close(&c.rd);
    return loaded;
}

void checkpoint_read_state(const char *path, Model *m, AdamW *opt, TrainState *st) {
    Ckpt c;
    open_checkpoint(&c, path, true);
    const char *no_opt = " (an imported checkpoint without optimizer state can start a run through train.init_from, "
                         "not resume one)";
    if (opt->numel != m->params.numel) fatal("%s: the optimizer does not match the model's parameters", path);
    if (opt->begin != 0 || opt->end < m->params.numel)
        fatal("%s: the optimizer holds only a shard of the moments; read into a whole-store one, then scatter", path);
    load_store_group(&c, "optimizer/m", &m->params, opt->be, opt->m, false, no_opt);
    load_store_group(&c, "optimizer/v", &m->params, opt->be, opt->v, false, no_opt);
    load_moe_biases(&c, m, true);
    read_train_state(&c, true, st, &opt->t);
    h5r_close(&c.rd);
}

char *checkpoint_read_config(const char *path) {
    Ckpt c;
    open_checkpoint(&c, path, true);
    char *out = NULL;
    h5r_attr_string(&c.rd, c.rd.file, "config", false, &out, NULL);
    h5r_close(&c.rd);
    return out;
}

/* Every link of group gname must be a finite, checksum-true tensor. */
static bool verify_group(Ckpt *c, const char *gname, bool required) {
    hid_t g;
    int st = open_group(c, gname, required, "", &g);
    if (st <= 0) return st == 0;
    H5G_info_t info;
    bool ok = H5Gget_info(g, &info) >= 0 || h5r_fail(&c->rd, "cannot list /%s (the checkpoint is corrupt)", gname);
    for (hsize_t i = 0; ok && i < info.nlinks; i++) {
        char name[NAME_MAX_LEN + 1];
        ssize_t len = H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
        if (len < 0 || len >= (ssize_t)sizeof name) {
            ok = h5r_fail(&c->rd, "cannot list /%s (the checkpoint is corrupt)", gname);
            break;
        }
        hid_t d;
        H5Shape sh;
        ok = open_tensor(c, g, name, -1, NULL, true, &d, &sh) == 1;
        if (ok) {
            ok = read_tensor(c, d, gname, name, &sh, NULL);
            H5Dclose(d);
        }
    }
    H5Gclose(g);
    return ok;
}

bool checkpoint_verify(const char *path, char *why, size_t why_len) {
    Ckpt c;
    TrainState st;
    int adam_t;
    bool ok = open_checkpoint(&c, path, false);
    if (ok) {
        bool has_m = h5r_link(&c.rd, c.rd.file, "optimizer/m") == 1;
        ok = verify_group(&c, "params", true) && verify_group(&c, "optimizer/m", false) &&
             verify_group(&c, "optimizer/v", has_m) && verify_group(&c, "state", false) &&
             read_train_state(&c, false, &st, &adam_t);
        char *config = NULL;
        ok = ok && h5r_attr_string(&c.rd, c.rd.file, "config", false, &config, NULL) >= 0;
        free(config);
        h5r_close(&c.rd);
    }
    snprintf(why, why_len, "%s", ok ? "" : c.rd.error);
    return ok;
}
