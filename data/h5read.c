/* Checked reads of HDF5 files (contract in h5read.h). */
#include "h5read.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../kernels/util.h"

/* The most a dataset's stored bytes may inflate through its filters: deflate, the strongest of the
 * filters in use, stops at 1032:1. A dataset that claims more is corrupt, and reading it would only
 * allocate and fill memory. */
#define MAX_INFLATION 1100

void h5_setup(void) {
    static bool done;
    if (done) return;
    done = true;
    H5dont_atexit();
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

bool h5r_fail(H5Reader *r, const char *fmt, ...) {
    int k = snprintf(r->error, sizeof r->error, "%s: ", r->path);
    if (k < 0 || k >= (int)sizeof r->error) k = (int)sizeof r->error - 1; /* a path longer than the message */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->error + k, sizeof r->error - (size_t)k, fmt, ap);
    va_end(ap);
    if (r->exit_on_error) fatal("%s", r->error);
    return false;
}

bool h5r_open(H5Reader *r, const char *path, const char *kind, const char *hint, bool exit_on_error) {
    h5_setup();
    *r = (H5Reader){.path = path, .file = -1, .exit_on_error = exit_on_error};
    struct stat sb;
    if (stat(path, &sb) != 0) return h5r_fail(r, "cannot open the %s (%s)", kind, strerror(errno));
    if (S_ISDIR(sb.st_mode)) return h5r_fail(r, "is a directory, not a %s", kind);
    /* a FIFO or a device would block the open or feed HDF5 endless bytes */
    if (!S_ISREG(sb.st_mode)) return h5r_fail(r, "is not a regular file, so not a %s", kind);
    FILE *probe = fopen(path, "rb");
    if (!probe) return h5r_fail(r, "cannot read the %s (%s)", kind, strerror(errno));
    fclose(probe);
    if (sb.st_size == 0) return h5r_fail(r, "the %s is empty (truncated)", kind);
    r->file_bytes = (int64_t)sb.st_size;
    if (H5Fis_hdf5(path) <= 0) return h5r_fail(r, "not an HDF5 file%s", hint ? hint : "");
    r->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (r->file < 0) return h5r_fail(r, "cannot open as HDF5 (the %s is truncated or corrupt)", kind);
    return true;
}

void h5r_close(H5Reader *r) {
    if (r->file >= 0) H5Fclose(r->file);
    r->file = -1;
}

void h5r_format_shape(char *buf, size_t n, int ndim, const int64_t *dims) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)dims[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* ---- naming objects and types ------------------------------------------------------------------ */

/* The HDF5 path of an open object without the leading '/' ("" for the root group). */
static void object_path(hid_t obj, char *buf, size_t n) {
    char full[512];
    ssize_t k = H5Iget_name(obj, full, sizeof full);
    if (k < 0) snprintf(full, sizeof full, "?");
    snprintf(buf, n, "%s", full[0] == '/' ? full + 1 : full);
}

/* attribute "name" or attribute "name" of "params/wte" */
static void attr_label(hid_t obj, const char *name, char *buf, size_t n) {
    char where[512];
    object_path(obj, where, sizeof where);
    if (where[0]) snprintf(buf, n, "attribute \"%s\" of \"%s\"", name, where);
    else snprintf(buf, n, "attribute \"%s\"", name);
}

/* dataset "params/wte": loc's path joined with name */
static void dataset_label(hid_t loc, const char *name, char *buf, size_t n) {
    char where[512];
    object_path(loc, where, sizeof where);
    snprintf(buf, n, "dataset \"%s%s%s\"", where, where[0] ? "/" : "", name);
}

static const char *class_name(H5T_class_t c) {
    switch (c) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "floating-point number";
    case H5T_STRING: return "string";
    case H5T_BITFIELD: return "bitfield";
    case H5T_OPAQUE: return "opaque value";
    case H5T_COMPOUND: return "compound value";
    case H5T_REFERENCE: return "reference";
    case H5T_ENUM: return "enum";
    case H5T_VLEN: return "variable-length sequence";
    case H5T_ARRAY: return "array-typed value";
    default: return "value of unknown type";
    }
}

/* "a scalar integer", "an integer array of shape [2]", "a string with no value (null dataspace)" */
static void describe(hid_t type, hid_t space, char *buf, size_t n) {
    const char *cls = type >= 0 ? class_name(H5Tget_class(type)) : "value of unreadable type";
    const char *an = strchr("aeiou", cls[0]) ? "an" : "a";
    H5S_class_t sc = space >= 0 ? H5Sget_simple_extent_type(space) : H5S_NO_CLASS;
    if (sc == H5S_SCALAR) {
        snprintf(buf, n, "a scalar %s", cls);
    } else if (sc == H5S_SIMPLE) {
        hsize_t hd[H5S_MAX_RANK];
        int64_t dims[H5S_MAX_RANK];
        int nd = H5Sget_simple_extent_dims(space, hd, NULL);
        for (int i = 0; i < nd; i++) dims[i] = (int64_t)hd[i];
        char shape[160];
        h5r_format_shape(shape, sizeof shape, nd > 0 ? nd : 0, dims);
        snprintf(buf, n, "%s %s array of shape %s", an, cls, shape);
    } else {
        snprintf(buf, n, "%s %s with no value (null dataspace)", an, cls);
    }
}

static bool is_number(H5T_class_t c) { return c == H5T_INTEGER || c == H5T_FLOAT; }

/* ---- attributes ------------------------------------------------------------------------------- */

/* Opens attribute name of obj if it is one value of class want (or, with any_number, of either
 * numeric class); *attr and *type are then open. 1, 0 (absent, not required), -1 as in h5read.h. */
static int open_attr(H5Reader *r, hid_t obj, const char *name, bool required, H5T_class_t want, bool any_number,
                     const char *expected, hid_t *attr, hid_t *type) {
    char label[640];
    attr_label(obj, name, label, sizeof label);
    htri_t exists = H5Aexists(obj, name);
    if (exists == 0 && !required) return 0;
    if (exists <= 0) {
        h5r_fail(r, exists == 0 ? "no %s (expected %s)" : "cannot look up %s (expected %s; corrupt file?)", label,
                 expected);
        return -1;
    }
    *attr = H5Aopen(obj, name, H5P_DEFAULT);
    *type = *attr >= 0 ? H5Aget_type(*attr) : -1;
    hid_t space = *attr >= 0 ? H5Aget_space(*attr) : -1;
    H5T_class_t cls = *type >= 0 ? H5Tget_class(*type) : H5T_NO_CLASS;
    bool one = space >= 0 && H5Sget_simple_extent_type(space) != H5S_NULL && H5Sget_simple_extent_npoints(space) == 1;
    bool ok = one && (cls == want || (any_number && is_number(cls) && is_number(want)));
    char found[256] = "";
    if (!ok) describe(*type, space, found, sizeof found);
    if (space >= 0) H5Sclose(space);
    if (ok) return 1;
    if (*type >= 0) H5Tclose(*type);
    if (*attr >= 0) H5Aclose(*attr);
    *attr = *type = -1;
    h5r_fail(r, "%s: expected %s, found %s", label, expected, *found ? found : "nothing readable");
    return -1;
}

static int close_attr(H5Reader *r, hid_t obj, const char *name, hid_t attr, hid_t type, bool read_ok) {
    H5Tclose(type);
    H5Aclose(attr);
    if (read_ok) return 1;
    char label[640];
    attr_label(obj, name, label, sizeof label);
    h5r_fail(r, "cannot read %s (corrupt file?)", label);
    return -1;
}

int h5r_attr_int(H5Reader *r, hid_t obj, const char *name, bool required, int64_t lo, int64_t hi, int64_t *out) {
    hid_t attr, type;
    int st = open_attr(r, obj, name, required, H5T_INTEGER, false, "a scalar integer", &attr, &type);
    if (st != 1) return st;
    bool is_signed = H5Tget_sign(type) == H5T_SGN_2, too_big = false;
    int64_t v = 0;
    bool ok;
    if (is_signed) ok = H5Aread(attr, H5T_NATIVE_INT64, &v) >= 0;
    else {
        uint64_t u = 0;
        ok = H5Aread(attr, H5T_NATIVE_UINT64, &u) >= 0;
        too_big = u > (uint64_t)INT64_MAX;
        v = too_big ? INT64_MAX : (int64_t)u;
    }
    if ((st = close_attr(r, obj, name, attr, type, ok)) != 1) return st;
    if (too_big || v < lo || v > hi) {
        char label[640];
        attr_label(obj, name, label, sizeof label);
        h5r_fail(r, "%s = %s%lld: expected an integer in [%lld, %lld]", label, too_big ? "more than " : "",
                 (long long)v, (long long)lo, (long long)hi);
        return -1;
    }
    *out = v;
    return 1;
}

int h5r_attr_uint(H5Reader *r, hid_t obj, const char *name, bool required, uint64_t hi, uint64_t *out) {
    hid_t attr, type;
    int st = open_attr(r, obj, name, required, H5T_INTEGER, false, "a scalar unsigned integer", &attr, &type);
    if (st != 1) return st;
    bool negative = false, ok;
    uint64_t u = 0;
    if (H5Tget_sign(type) == H5T_SGN_2) {
        int64_t v = 0;
        ok = H5Aread(attr, H5T_NATIVE_INT64, &v) >= 0;
        negative = v < 0;
        u = negative ? 0 : (uint64_t)v;
    } else ok = H5Aread(attr, H5T_NATIVE_UINT64, &u) >= 0;
    if ((st = close_attr(r, obj, name, attr, type, ok)) != 1) return st;
    if (negative || u > hi) {
        char label[640];
        attr_label(obj, name, label, sizeof label);
        h5r_fail(r, "%s is %s: expected an integer in [0, %llu]", label, negative ? "negative" : "too large",
                 (unsigned long long)hi);
        return -1;
    }
    *out = u;
    return 1;
}

int h5r_attr_float(H5Reader *r, hid_t obj, const char *name, bool required, bool any_number, double *out) {
    hid_t attr, type;
    int st = open_attr(r, obj, name, required, H5T_FLOAT, any_number, any_number ? "a single number" : "a scalar "
                       "floating-point number", &attr, &type);
    if (st != 1) return st;
    double v = 0;
    bool ok = H5Aread(attr, H5T_NATIVE_DOUBLE, &v) >= 0;
    if ((st = close_attr(r, obj, name, attr, type, ok)) != 1) return st;
    *out = v;
    return 1;
}

int h5r_attr_string(H5Reader *r, hid_t obj, const char *name, bool required, char **out, size_t *len) {
    hid_t attr, type;
    int st = open_attr(r, obj, name, required, H5T_STRING, false, "a scalar string", &attr, &type);
    if (st != 1) return st;
    char *s = NULL;
    size_t n = 0;
    hid_t mtype = H5Tcopy(H5T_C_S1);
    /* HDF5 converts no string between ASCII and UTF-8, and h5py writes str attributes as UTF-8 */
    bool ok = mtype >= 0 && H5Tset_cset(mtype, H5Tget_cset(type)) >= 0;
    htri_t vlen = H5Tis_variable_str(type);
    if (ok && vlen > 0) {
        char *v = NULL;
        ok = H5Tset_size(mtype, H5T_VARIABLE) >= 0 && H5Aread(attr, mtype, &v) >= 0 && v;
        if (ok) {
            n = strlen(v);
            s = xstrdup(v);
        }
        if (v) H5free_memory(v);
    } else if (ok && vlen == 0) {
        /* exactly the stored bytes, NUL-padded: a fixed-length string may hold NULs (a char vocabulary);
         * one longer than the file is a corrupt header, not an allocation to make */
        n = H5Tget_size(type);
        ok = n > 0 && n <= (size_t)r->file_bytes;
        s = ok ? xcalloc(n + 1, 1) : NULL;
        ok = ok && H5Tset_size(mtype, n) >= 0 && H5Tset_strpad(mtype, H5T_STR_NULLPAD) >= 0 &&
             H5Aread(attr, mtype, s) >= 0;
        if (!ok) {
            free(s);
            s = NULL;
        }
    } else ok = false;
    if (mtype >= 0) H5Tclose(mtype);
    if ((st = close_attr(r, obj, name, attr, type, ok)) != 1) return st;
    *out = s;
    if (len) *len = n;
    return 1;
}

/* ---- datasets --------------------------------------------------------------------------------- */

/* Do the values of the integer file type fit the native integer type mem? */
static bool integer_fits(hid_t file_type, hid_t mem_type) {
    size_t fs = H5Tget_size(file_type), ms = H5Tget_size(mem_type);
    bool f_signed = H5Tget_sign(file_type) == H5T_SGN_2, m_signed = H5Tget_sign(mem_type) == H5T_SGN_2;
    if (f_signed) return m_signed && fs <= ms;
    return m_signed ? fs < ms : fs <= ms;
}

static const char *mem_type_name(hid_t mem_type) {
    if (H5Tequal(mem_type, H5T_NATIVE_INT32) > 0) return "int32";
    if (H5Tequal(mem_type, H5T_NATIVE_INT64) > 0) return "int64";
    if (H5Tequal(mem_type, H5T_NATIVE_FLOAT) > 0) return "float32";
    if (H5Tequal(mem_type, H5T_NATIVE_DOUBLE) > 0) return "float64";
    return "the expected type";
}

static const char *values_name(H5T_class_t c, bool any_number) {
    return any_number ? "numeric" : c == H5T_INTEGER ? "integer" : c == H5T_FLOAT ? "floating-point" : class_name(c);
}

/* The checks of h5read.h on an open dataset d; fills shape. */
static bool check_dataset(H5Reader *r, hid_t d, const char *label, const H5DatasetSpec *spec, H5Shape *shape) {
    hid_t type = H5Dget_type(d), space = H5Dget_space(d);
    H5T_class_t cls = type >= 0 ? H5Tget_class(type) : H5T_NO_CLASS, want = H5Tget_class(spec->mem_type);
    bool class_ok = cls == want || (spec->any_number && is_number(cls) && is_number(want));
    bool fits = !class_ok || cls != H5T_INTEGER || want != H5T_INTEGER || spec->any_number ||
                integer_fits(type, spec->mem_type);
    size_t file_elem = type >= 0 ? H5Tget_size(type) : 0;
    bool file_signed = type >= 0 && H5Tget_sign(type) == H5T_SGN_2;
    H5S_class_t sc = space >= 0 ? H5Sget_simple_extent_type(space) : H5S_NO_CLASS;
    int nd = sc == H5S_SIMPLE || sc == H5S_SCALAR ? H5Sget_simple_extent_ndims(space) : -1;
    hsize_t hd[H5S_MAX_RANK];
    if (nd > 0 && nd <= H5R_MAX_RANK) H5Sget_simple_extent_dims(space, hd, NULL);
    char found[256] = "";
    if (!class_ok || nd < 0) describe(type, space, found, sizeof found);
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (!class_ok || nd < 0)
        return h5r_fail(r, "%s: expected %s values, found %s", label, values_name(want, spec->any_number), found);
    if (!fits)
        return h5r_fail(r, "%s: its integer type (%zu bytes, %s) is wider than %s", label, file_elem,
                        file_signed ? "signed" : "unsigned", mem_type_name(spec->mem_type));
    if (nd > H5R_MAX_RANK)
        return h5r_fail(r, "%s: %d dimensions, more than the %d this reader takes", label, nd, H5R_MAX_RANK);

    shape->ndim = nd;
    shape->numel = 1;
    bool overflow = false;
    for (int i = 0; i < nd; i++) {
        shape->dims[i] = (int64_t)hd[i];
        if (hd[i] > (hsize_t)INT64_MAX || (hd[i] && shape->numel > INT64_MAX / (int64_t)hd[i])) overflow = true;
        else shape->numel *= (int64_t)hd[i];
    }
    bool same = spec->ndim < 0 || nd == spec->ndim;
    for (int i = 0; same && spec->ndim >= 0 && spec->dims && i < nd; i++)
        same = spec->dims[i] < 0 || spec->dims[i] == shape->dims[i];
    if (!same) {
        char got[256], want_s[256];
        h5r_format_shape(got, sizeof got, nd, shape->dims);
        if (spec->dims) h5r_format_shape(want_s, sizeof want_s, spec->ndim, spec->dims);
        else snprintf(want_s, sizeof want_s, "%d dimension%s", spec->ndim, spec->ndim == 1 ? "" : "s");
        return h5r_fail(r, "%s: shape mismatch: the file has %s, expected %s%s", label, got, want_s,
                        spec->hint ? spec->hint : "");
    }

    /* the data must be in this file, and no more than the file holds or can inflate to */
    hid_t dcpl = H5Dget_create_plist(d);
    H5D_layout_t layout = dcpl >= 0 ? H5Pget_layout(dcpl) : H5D_LAYOUT_ERROR;
    int external = dcpl >= 0 ? H5Pget_external_count(dcpl) : -1, filters = dcpl >= 0 ? H5Pget_nfilters(dcpl) : -1;
    if (dcpl >= 0) H5Pclose(dcpl);
    if (layout == H5D_VIRTUAL || layout == H5D_LAYOUT_ERROR || external != 0 || filters < 0)
        return h5r_fail(r, "%s: its data is %s (this reader takes data stored in the file itself)", label,
                        layout == H5D_VIRTUAL || external > 0 ? "stored in other files" : "of an unreadable layout");
    uint64_t stored = H5Dget_storage_size(d);
    double need = (double)shape->numel * (double)file_elem;
    if (overflow || stored > (uint64_t)r->file_bytes)
        return h5r_fail(r, "%s: claims more data than the file's %lld bytes (truncated or corrupt)", label,
                        (long long)r->file_bytes);
    if (shape->numel > 0 && filters == 0 && (double)stored < need)
        return h5r_fail(r, "%s: holds %llu of the %.0f bytes its shape needs (truncated, or never written)", label,
                        (unsigned long long)stored, need);
    if (shape->numel > 0 && filters > 0 && (double)stored * MAX_INFLATION < need)
        return h5r_fail(r, "%s: %llu compressed bytes cannot hold the %.0f its shape needs (corrupt)", label,
                        (unsigned long long)stored, need);
    return true;
}

int h5r_link(H5Reader *r, hid_t loc, const char *name) {
    char prefix[512];
    if (snprintf(prefix, sizeof prefix, "%s", name) >= (int)sizeof prefix) {
        h5r_fail(r, "the name \"%.64s...\" is too long", name);
        return -1;
    }
    /* one component at a time: H5Lexists would follow a soft or external link in the middle of the path */
    for (char *slash = prefix;; slash++) {
        slash = strchr(slash, '/');
        if (slash) *slash = 0;
        if (H5Lexists(loc, prefix, H5P_DEFAULT) <= 0) return 0;
        H5L_info_t info;
        if (H5Lget_info(loc, prefix, &info, H5P_DEFAULT) < 0 || info.type != H5L_TYPE_HARD) {
            char where[512];
            object_path(loc, where, sizeof where);
            h5r_fail(r, "\"%s%s%s\" is a soft or external link, which this reader does not follow", where,
                     where[0] ? "/" : "", prefix);
            return -1;
        }
        if (!slash) return 1;
        *slash = '/';
    }
}

int h5r_dataset_open(H5Reader *r, hid_t loc, const char *name, const H5DatasetSpec *spec, bool required, hid_t dapl,
                     hid_t *dset, H5Shape *shape) {
    char label[640];
    dataset_label(loc, name, label, sizeof label);
    *dset = -1;
    int link = h5r_link(r, loc, name);
    if (link < 0) return -1;
    if (link == 0 && !required) return 0;
    if (link == 0) {
        h5r_fail(r, "no %s", label);
        return -1;
    }
    hid_t obj = H5Oopen(loc, name, H5P_DEFAULT);
    H5I_type_t kind = obj >= 0 ? H5Iget_type(obj) : H5I_BADID;
    if (obj >= 0) H5Oclose(obj);
    if (kind != H5I_DATASET) {
        h5r_fail(r, "%s is %s, not a dataset", label, kind == H5I_GROUP ? "a group" : "unreadable (corrupt file?)");
        return -1;
    }
    hid_t d = H5Dopen2(loc, name, dapl);
    if (d < 0) {
        h5r_fail(r, "cannot open %s (corrupt file?)", label);
        return -1;
    }
    if (!check_dataset(r, d, label, spec, shape)) {
        H5Dclose(d);
        return -1;
    }
    *dset = d;
    return 1;
}

bool h5r_read_rows(H5Reader *r, hid_t dset, const H5Shape *shape, hid_t mem_type, int64_t first, int64_t n, void *out) {
    char name[512]; /* for messages only: the path of an object costs a lookup */
    int64_t rows = shape->ndim ? shape->dims[0] : 1;
    if (first < 0 || n < 0 || first > rows - n) {
        object_path(dset, name, sizeof name);
        return h5r_fail(r, "dataset \"%s\": rows [%lld, %lld) are outside its %lld rows", name, (long long)first,
                        (long long)(first + n), (long long)rows);
    }
    if (n == 0 || shape->numel == 0) return true;
    herr_t st;
    if (shape->ndim == 0 || (first == 0 && n == rows)) {
        st = H5Dread(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
    } else {
        hsize_t start[H5R_MAX_RANK] = {0}, count[H5R_MAX_RANK];
        for (int i = 0; i < shape->ndim; i++) count[i] = (hsize_t)shape->dims[i];
        start[0] = (hsize_t)first;
        count[0] = (hsize_t)n;
        hid_t fspace = H5Dget_space(dset), mspace = H5Screate_simple(shape->ndim, count, NULL);
        st = fspace >= 0 && mspace >= 0 ? H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
        if (st >= 0) st = H5Dread(dset, mem_type, mspace, fspace, H5P_DEFAULT, out);
        if (mspace >= 0) H5Sclose(mspace);
        if (fspace >= 0) H5Sclose(fspace);
    }
    if (st < 0) {
        object_path(dset, name, sizeof name);
        return h5r_fail(r, "dataset \"%s\": cannot read rows [%lld, %lld) (the file is truncated or corrupt)", name,
                        (long long)first, (long long)(first + n));
    }
    return true;
}

int h5r_dataset_read(H5Reader *r, hid_t loc, const char *name, const H5DatasetSpec *spec, bool required, H5Shape *shape,
                     void **data) {
    hid_t d;
    int st = h5r_dataset_open(r, loc, name, spec, required, H5P_DEFAULT, &d, shape);
    *data = NULL;
    if (st != 1) return st;
    void *buf = xmalloc((size_t)shape->numel * H5Tget_size(spec->mem_type));
    bool ok = h5r_read_rows(r, d, shape, spec->mem_type, 0, shape->ndim ? shape->dims[0] : 1, buf);
    H5Dclose(d);
    if (!ok) {
        free(buf);
        return -1;
    }
    *data = buf;
    return 1;
}
