/* Checkpoints in HDF5 (format in checkpoint.h). A checkpoint is the user's file: every problem with one
 * ends the program with "error: <file>: <problem>" naming the tensor at fault, never with HDF5's own
 * error stack, and a failed read or write never touches another file. Tensor data goes through the
 * backend's copy functions, so the same code saves CPU and device memory. */
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

#include <hdf5.h>

#include "../kernels/util.h"

#define CKPT_FORMAT "msa-train-checkpoint"
#define CKPT_VERSION 1
#define NAME_MAX_LEN 256 /* parameter names are far shorter ("layers.12.moe.shared.0.w_gate") */

/* our messages replace HDF5's stack dumps, which name neither the file nor the tensor */
static void silence_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static void format_shape(char *buf, size_t n, int ndim, const int64_t *dims) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)dims[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

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

static void write_f32(Writer *w, hid_t group, const char *gname, const char *name, int ndim, const int64_t *shape,
                      const float *host) {
    hsize_t dims[TENSOR_MAX_DIMS];
    for (int i = 0; i < ndim; i++) dims[i] = (hsize_t)shape[i];
    char full[NAME_MAX_LEN + 32];
    snprintf(full, sizeof full, "%s/%s", gname, name);
    hid_t space = H5Screate_simple(ndim, dims, NULL);
    hid_t d = space >= 0 ? H5Dcreate2(group, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) : -1;
    bool ok = d >= 0 && H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, host) >= 0;
    if (d >= 0) ok = H5Dclose(d) >= 0 && ok;
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

void checkpoint_write(const char *path, const Model *m, const AdamW *opt, const TrainState *st, const char *config_json) {
    silence_hdf5();
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
        write_f32(&w, sg, "state", moe_bias_name(name, sizeof name, l), 1, shape, mp->bias); /* host memory */
    }
    H5Gclose(sg);
    free(host);

    int version = CKPT_VERSION, adam_t = opt ? opt->t : 0;
    int64_t step = st ? st->step : 0;
    uint64_t counter = st ? st->data_counter : 0, seed = st ? st->seed : 0;
    double best = st ? st->best_val_loss : NAN;
    write_string_attr(&w, "format", CKPT_FORMAT);
    write_scalar_attr(&w, "version", H5T_STD_I32LE, H5T_NATIVE_INT, &version);
    write_scalar_attr(&w, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step);
    write_scalar_attr(&w, "adam_t", H5T_STD_I32LE, H5T_NATIVE_INT, &adam_t);
    write_scalar_attr(&w, "data_counter", H5T_STD_U64LE, H5T_NATIVE_UINT64, &counter);
    write_scalar_attr(&w, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, &seed);
    write_scalar_attr(&w, "best_val_loss", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &best);
    if (config_json) write_string_attr(&w, "config", config_json);

    hid_t file = w.file;
    w.file = -1;
    if (H5Fclose(file) < 0) write_fail(&w, "closing", w.tmp);
    fsync_path(w.tmp, false);
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

/* A scalar string attribute, variable-length (our writer, h5py) or fixed-length, as a malloc'd
 * NUL-terminated string; NULL when it is not a string. */
static char *read_string_attr(hid_t attr) {
    hid_t type = H5Aget_type(attr);
    if (type < 0) return NULL;
    char *out = NULL;
    if (H5Tget_class(type) == H5T_STRING) {
        hid_t mtype = H5Tcopy(H5T_C_S1);
        H5Tset_cset(mtype, H5Tget_cset(type)); /* HDF5 converts no string between ASCII and UTF-8 */
        if (H5Tis_variable_str(type) > 0) {
            char *s = NULL;
            H5Tset_size(mtype, H5T_VARIABLE);
            if (H5Aread(attr, mtype, &s) >= 0 && s) {
                out = xstrdup(s);
                H5free_memory(s);
            }
        } else {
            size_t size = H5Tget_size(type);
            H5Tset_size(mtype, size + 1); /* room for the terminator a NULPAD string lacks */
            out = xcalloc(size + 2, 1);
            if (H5Aread(attr, mtype, out) < 0) {
                free(out);
                out = NULL;
            }
        }
        H5Tclose(mtype);
    }
    H5Tclose(type);
    return out;
}

/* Opens a checkpoint read-only and checks that it is one of ours; any problem ends the program. */
static hid_t open_checkpoint(const char *path) {
    silence_hdf5();
    struct stat sb;
    if (stat(path, &sb) != 0) fatal("%s: cannot open the checkpoint (%s)", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) fatal("%s: is a directory, not a checkpoint", path);
    FILE *probe = fopen(path, "rb");
    if (!probe) fatal("%s: cannot read the checkpoint (%s)", path, strerror(errno));
    fclose(probe);
    if (sb.st_size == 0) fatal("%s: the checkpoint is empty (truncated)", path);
    if (H5Fis_hdf5(path) <= 0) fatal("%s: not an HDF5 file, so not a checkpoint (truncated or corrupt?)", path);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (file < 0) fatal("%s: cannot open as HDF5 (the checkpoint is truncated or corrupt)", path);

    if (H5Aexists(file, "format") <= 0)
        fatal("%s: not an msa-train checkpoint (no \"format\" attribute; an HDF5 file of another kind?)", path);
    hid_t a = H5Aopen(file, "format", H5P_DEFAULT);
    char *format = a >= 0 ? read_string_attr(a) : NULL;
    if (a >= 0) H5Aclose(a);
    if (!format || strcmp(format, CKPT_FORMAT) != 0)
        fatal("%s: not an msa-train checkpoint (attribute \"format\" is %s%s%s, not \"" CKPT_FORMAT "\")", path,
              format ? "\"" : "not a string", format ? format : "", format ? "\"" : "");
    free(format);

    long long version = 0;
    a = H5Aexists(file, "version") > 0 ? H5Aopen(file, "version", H5P_DEFAULT) : -1;
    if (a < 0 || H5Aread(a, H5T_NATIVE_LLONG, &version) < 0)
        fatal("%s: checkpoint without a readable \"version\" attribute", path);
    H5Aclose(a);
    if (version != CKPT_VERSION)
        fatal("%s: checkpoint format version %lld; this build reads version %d", path, version, CKPT_VERSION);
    if (H5Lexists(file, "params", H5P_DEFAULT) <= 0)
        fatal("%s: checkpoint without a /params group (truncated or corrupt)", path);
    return file;
}

static hid_t open_group(const char *path, hid_t file, const char *name, const char *why) {
    hid_t g = H5Lexists(file, name, H5P_DEFAULT) > 0 ? H5Gopen2(file, name, H5P_DEFAULT) : -1;
    if (g < 0) fatal("%s: the checkpoint has no /%s group%s", path, name, why);
    return g;
}

/* Checks that gname/name exists as a floating-point dataset of the given shape. Returns false when it is
 * absent; any other mismatch ends the program naming the tensor and both shapes. */
static bool check_tensor(const char *path, hid_t group, const char *gname, const char *name, int ndim,
                         const int64_t *shape) {
    if (H5Lexists(group, name, H5P_DEFAULT) <= 0) return false;
    hid_t d = H5Dopen2(group, name, H5P_DEFAULT);
    if (d < 0) fatal("%s: %s/%s is not a dataset (corrupt checkpoint?)", path, gname, name);
    hid_t type = H5Dget_type(d), space = H5Dget_space(d);
    bool is_float = type >= 0 && H5Tget_class(type) == H5T_FLOAT;
    int fnd = space >= 0 ? H5Sget_simple_extent_ndims(space) : -1;
    hsize_t fdims[H5S_MAX_RANK];
    int64_t fshape[H5S_MAX_RANK];
    if (fnd > 0) H5Sget_simple_extent_dims(space, fdims, NULL);
    for (int i = 0; i < fnd; i++) fshape[i] = (int64_t)fdims[i];
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    H5Dclose(d);
    if (!is_float) fatal("%s: %s/%s is not a floating-point dataset", path, gname, name);
    bool same = fnd == ndim;
    for (int i = 0; same && i < ndim; i++) same = fshape[i] == shape[i];
    if (!same) {
        char want[128], got[128];
        format_shape(want, sizeof want, ndim, shape);
        format_shape(got, sizeof got, fnd < 0 ? 0 : fnd, fshape);
        fatal("%s: shape mismatch for %s/%s: the checkpoint has %s, the model needs %s (a different model config?)",
              path, gname, name, got, want);
    }
    return true;
}

static void read_f32(const char *path, hid_t group, const char *gname, const char *name, float *out) {
    hid_t d = H5Dopen2(group, name, H5P_DEFAULT);
    if (d < 0 || H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
        fatal("%s: cannot read %s/%s (the checkpoint is truncated or corrupt)", path, gname, name);
    H5Dclose(d);
}

/* Every link of a group must name something the model has: is_known(ctx, name) decides. */
typedef bool (*KnownFn)(const void *ctx, const char *name);

static void check_no_unexpected(const char *path, hid_t group, const char *gname, KnownFn is_known, const void *ctx) {
    H5G_info_t info;
    if (H5Gget_info(group, &info) < 0) fatal("%s: cannot list /%s (the checkpoint is corrupt)", path, gname);
    for (hsize_t i = 0; i < info.nlinks; i++) {
        char name[NAME_MAX_LEN + 1];
        ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
        if (len < 0) fatal("%s: cannot list /%s (the checkpoint is corrupt)", path, gname);
        if (len >= (ssize_t)sizeof name || !is_known(ctx, name))
            fatal("%s: unexpected tensor %s/%s: the model has no such %s (a different model config?)", path, gname,
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
 * the memory of backend be.
 * Every tensor is checked before any is read, so a bad file leaves the model as it was. A tensor the
 * file lacks is an error unless it is an MSA index parameter and allow_missing_index is set. Returns
 * the number of tensors loaded. */
static int load_store_group(const char *path, hid_t file, const char *gname, ParamStore *ps, const KernelBackend *be,
                            void *base, bool allow_missing_index, const char *why_no_group) {
    hid_t g = open_group(path, file, gname, why_no_group);
    bool *present = xcalloc((size_t)ps->n + 1, sizeof(bool));
    for (int i = 0; i < ps->n; i++) {
        const Tensor *t = ps->p[i].t;
        present[i] = check_tensor(path, g, gname, t->name, t->ndim, t->shape);
        if (!present[i] && !(allow_missing_index && is_index_param(t->name))) {
            char shape[128];
            format_shape(shape, sizeof shape, t->ndim, t->shape);
            fatal("%s: missing tensor %s/%s (the model has it, shape %s)%s", path, gname, t->name, shape,
                  is_index_param(t->name) ? "; a dense checkpoint initialises an MSA model through train.init_from"
                                          : "");
        }
    }
    check_no_unexpected(path, g, gname, is_param, ps);

    float *host = xmalloc((size_t)max_param_numel(ps) * sizeof(float) + sizeof(float));
    size_t es = dtype_size(ps->dtype);
    int loaded = 0;
    for (int i = 0; i < ps->n; i++) {
        if (!present[i]) continue;
        const Param *p = &ps->p[i];
        read_f32(path, g, gname, p->t->name, host);
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
static void load_moe_biases(const char *path, hid_t file, Model *m, bool required) {
    const bool any_moe = m->n_moe_layers > 0;
    if (H5Lexists(file, "state", H5P_DEFAULT) <= 0) {
        if (required && any_moe)
            fatal("%s: the checkpoint has no /state group (no MoE selection biases to resume)", path);
        return;
    }
    hid_t g = open_group(path, file, "state", "");
    if (required) check_no_unexpected(path, g, "state", is_moe_bias, m);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        MoeLayer *ml = moe_layer_of(&m->layers[l].ffn);
        if (!ml) continue;
        MoeLayerParams *mp = &ml->p;
        char name[64];
        int64_t shape[1] = {mp->num_experts};
        if (check_tensor(path, g, "state", moe_bias_name(name, sizeof name, l), 1, shape))
            read_f32(path, g, "state", name, mp->bias);
        else if (required)
            fatal("%s: missing tensor state/%s (the model's MoE layer %d needs its selection bias, shape [%d])", path,
                  name, l, mp->num_experts);
    }
    H5Gclose(g);
}

/* A scalar root attribute of the given class read as mem_type: 1 read, 0 absent, -1 there but not a
 * readable scalar of that class. */
static int read_scalar_attr(hid_t file, const char *name, H5T_class_t cls, hid_t mem_type, void *out) {
    if (H5Aexists(file, name) <= 0) return 0;
    hid_t a = H5Aopen(file, name, H5P_DEFAULT);
    hid_t type = a >= 0 ? H5Aget_type(a) : -1;
    bool ok = type >= 0 && H5Tget_class(type) == cls && H5Aread(a, mem_type, out) >= 0;
    if (type >= 0) H5Tclose(type);
    if (a >= 0) H5Aclose(a);
    return ok ? 1 : -1;
}

static bool read_int_attr(hid_t file, const char *name, hid_t mem_type, void *out) {
    return read_scalar_attr(file, name, H5T_INTEGER, mem_type, out) == 1;
}

/* An optional float attribute: NaN when the file lacks it (older checkpoints); false when it is there but
 * not a readable floating-point scalar. */
static bool read_optional_float_attr(hid_t file, const char *name, double *out) {
    *out = NAN;
    return read_scalar_attr(file, name, H5T_FLOAT, H5T_NATIVE_DOUBLE, out) >= 0;
}

int checkpoint_read_params(const char *path, Model *m, bool allow_missing_index) {
    hid_t file = open_checkpoint(path);
    int loaded = load_store_group(path, file, "params", &m->params, m->params.be, m->params.data, allow_missing_index, "");
    params_sync_shadow(&m->params); /* device GEMMs read the BF16 copy of the weights */
    /* MoE selection biases decide which experts run, so they are part of the model's function */
    load_moe_biases(path, file, m, false);
    H5Fclose(file);
    return loaded;
}

void checkpoint_read_state(const char *path, Model *m, AdamW *opt, TrainState *st) {
    hid_t file = open_checkpoint(path);
    const char *no_opt = " (an imported checkpoint without optimizer state can start a run through train.init_from, "
                         "not resume one)";
    if (opt->numel != m->params.numel) fatal("%s: the optimizer does not match the model's parameters", path);
    if (opt->begin != 0 || opt->end < m->params.numel)
        fatal("%s: the optimizer holds only a shard of the moments; read into a whole-store one, then scatter", path);
    load_store_group(path, file, "optimizer/m", &m->params, opt->be, opt->m, false, no_opt);
    load_store_group(path, file, "optimizer/v", &m->params, opt->be, opt->v, false, no_opt);
    load_moe_biases(path, file, m, true);
    int64_t step;
    int adam_t;
    uint64_t counter, seed;
    double best;
    if (!read_int_attr(file, "step", H5T_NATIVE_INT64, &step) || step < 0 || step > 0x7fffffff)
        fatal("%s: the checkpoint has no valid \"step\" attribute", path);
    if (!read_int_attr(file, "adam_t", H5T_NATIVE_INT, &adam_t) || adam_t < 0)
        fatal("%s: the checkpoint has no valid \"adam_t\" attribute", path);
    if (!read_int_attr(file, "data_counter", H5T_NATIVE_UINT64, &counter))
        fatal("%s: the checkpoint has no valid \"data_counter\" attribute", path);
    if (!read_int_attr(file, "seed", H5T_NATIVE_UINT64, &seed))
        fatal("%s: the checkpoint has no valid \"seed\" attribute", path);
    if (!read_optional_float_attr(file, "best_val_loss", &best))
        fatal("%s: the checkpoint's \"best_val_loss\" attribute is not a floating-point number", path);
    H5Fclose(file);
    opt->t = adam_t;
    st->step = step;
    st->data_counter = counter;
    st->seed = seed;
    st->best_val_loss = best;
}

char *checkpoint_read_config(const char *path) {
    hid_t file = open_checkpoint(path);
    char *out = NULL;
    if (H5Aexists(file, "config") > 0) {
        hid_t a = H5Aopen(file, "config", H5P_DEFAULT);
        out = a >= 0 ? read_string_attr(a) : NULL;
        if (a >= 0) H5Aclose(a);
        if (!out) fatal("%s: the checkpoint's \"config\" attribute is not a string", path);
    }
    H5Fclose(file);
    return out;
}
