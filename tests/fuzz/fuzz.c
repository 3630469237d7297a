/* The fuzz targets' shared parts (fuzz.h). */
#include "fuzz.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <sanitizer/common_interface_defs.h>

#include "../../kernels/util.h"
#include "../../train/config.h"

/* ---- the input as decisions ------------------------------------------------------------------- */

uint8_t fb_u8(FuzzBytes *b) {
    if (b->n == 0) return 0;
    b->n--;
    return *b->p++;
}

/* little-endian; one call per statement, so the bytes are read in one defined order */
uint16_t fb_u16(FuzzBytes *b) {
    uint16_t lo = fb_u8(b);
    return (uint16_t)(lo | fb_u8(b) << 8);
}

uint32_t fb_u32(FuzzBytes *b) {
    uint32_t lo = fb_u16(b);
    return lo | (uint32_t)fb_u16(b) << 16;
}

uint64_t fb_u64(FuzzBytes *b) {
    uint64_t lo = fb_u32(b);
    return lo | (uint64_t)fb_u32(b) << 32;
}

unsigned fb_pick(FuzzBytes *b, unsigned n) { return n ? fb_u8(b) % n : 0; }

unsigned fb_variant(FuzzBytes *b, unsigned n) {
    uint8_t v = fb_u8(b);
    return v < 128 || n < 2 ? 0 : 1 + (unsigned)(v - 128) % (n - 1);
}

uint64_t fb_dim(FuzzBytes *b) {
    static const uint64_t edges[] = {0, 1, 2, 3, 63, 64, 65, 255, 256, 0x7fffffffULL, 0x80000000ULL,
                                     0xffffffffULL, 0x100000000ULL, 1ULL << 40, 1ULL << 61, 1ULL << 62,
                                     0x7fffffffffffffffULL};
    uint8_t v = fb_u8(b);
    if (v < 192) return v % 97;
    return edges[(v - 192) % (sizeof edges / sizeof edges[0])];
}

int64_t fb_int(FuzzBytes *b) {
    static const int64_t edges[] = {0, 1, -1, 2, 127, 128, 255, 256, 0x7fffffff, 0x80000000LL, -0x80000000LL,
                                    0xffffffffLL, 0x100000000LL, INT64_MAX, INT64_MIN};
    uint8_t v = fb_u8(b);
    if (v < 128) return v;
    if (v < 224) return edges[(v - 128) % (sizeof edges / sizeof edges[0])];
    return (int64_t)fb_u64(b);
}

double fb_double(FuzzBytes *b) {
    static const double edges[] = {0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-320, 3.5e38, 1e300, -1e300};
    uint8_t v = fb_u8(b);
    if (v < 96) return v / 8.0;
    if (v < 112) return NAN;
    if (v < 120) return INFINITY;
    if (v < 128) return -INFINITY;
    if (v < 224) return edges[(v - 128) % (sizeof edges / sizeof edges[0])];
    uint64_t bits = fb_u64(b);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* Up to max bytes of the input as a string of any bytes (NUL-terminated at len; may hold NULs before). */
static size_t fb_text(FuzzBytes *b, char *out, size_t max) {
    size_t len = fb_pick(b, (unsigned)(max < 256 ? max : 256));
    for (size_t i = 0; i < len; i++) out[i] = (char)fb_u8(b);
    out[len] = 0;
    return len;
}

/* ---- refusals --------------------------------------------------------------------------------- */

jmp_buf fuzz_refused;

static void jump_back(void *ctx) {
    (void)ctx;
    longjmp(fuzz_refused, 1);
}

void fuzz_arm(void) { fatal_set_hook(jump_back, NULL, NULL); }

void fuzz_broken(const char *fmt, ...) {
    char msg[8192];
    va_list ap;
    va_start(ap, fmt);
    int k = snprintf(msg, sizeof msg, "fuzz: broken property: ");
    vsnprintf(msg + k, sizeof msg - (size_t)k, fmt, ap);
    va_end(ap);
    /* to where the sanitizers report: libFuzzer's -close_fd_mask=2 (smoke.sh) closes stderr but keeps that */
    __sanitizer_report_error_summary(msg);
    abort();
}

void fuzz_check_config_round_trip(const RunConfig *c) {
    char *text = config_to_json(c);
    int fd;
    const char *path = fuzz_memfile(text, strlen(text), &fd);
    static RunConfig again; /* static: it outlives the jump back from a refusal */
    fuzz_arm();
    if (setjmp(fuzz_refused)) fuzz_broken("config_load refused the config_to_json of a loaded config:\n%s", text);
    config_defaults(&again);
    config_load(&again, path);
    fuzz_memfile_close(fd);
    char *text2 = config_to_json(&again);
    if (strcmp(text, text2))
        fuzz_broken("config_to_json does not read back as the same config:\n%s\nread back as:\n%s", text, text2);
    free(text);
    free(text2);
}

/* ---- scratch files ---------------------------------------------------------------------------- */

static char scratch[512];

static void remove_scratch(void) { unlink(scratch); }

const char *fuzz_scratch_path(void) {
    if (scratch[0]) return scratch;
    const char *dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(scratch, sizeof scratch, "%s/msa_fuzz_%d.h5", dir, (int)getpid());
    atexit(remove_scratch);
    return scratch;
}

const char *fuzz_memfile(const void *data, size_t size, int *fd) {
    static char path[64];
    *fd = memfd_create("fuzz_input", 0);
    if (*fd < 0) fuzz_broken("memfd_create failed");
    for (size_t done = 0; done < size;) {
        ssize_t k = write(*fd, (const char *)data + done, size - done);
        if (k <= 0) fuzz_broken("cannot write the memory file");
        done += (size_t)k;
    }
    snprintf(path, sizeof path, "/proc/self/fd/%d", *fd);
    return path;
}

void fuzz_memfile_close(int fd) { close(fd); }

void fuzz_close_hdf5(void) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    ssize_t n = H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (n <= 0) return;
    hid_t *ids = malloc((size_t)n * sizeof(hid_t));
    n = H5Fget_obj_ids(H5F_OBJ_ALL, H5F_OBJ_ALL, (size_t)n, ids);
    /* objects before files: a file closes only when nothing in it is open */
    for (int pass = 0; pass < 2; pass++)
        for (ssize_t i = 0; i < n; i++) {
            H5I_type_t t = H5Iget_type(ids[i]);
            if (pass == 0 && t == H5I_DATASET) H5Dclose(ids[i]);
            if (pass == 0 && t == H5I_GROUP) H5Gclose(ids[i]);
            if (pass == 0 && t == H5I_ATTR) H5Aclose(ids[i]);
            if (pass == 0 && t == H5I_DATATYPE) H5Tclose(ids[i]);
            if (pass == 1 && t == H5I_FILE) H5Fclose(ids[i]);
        }
    free(ids);
}

/* ---- HDF5 objects as expected, or a variant ----------------------------------------------------- */

/* Integer file types, then two of another class with the same size (a bitfield, an enum-free opaque
 * would not convert at all, which is a simpler case). */
static hid_t int_type(FuzzBytes *b) {
    const hid_t types[] = {H5T_STD_I8LE,  H5T_STD_U8LE,  H5T_STD_I16LE, H5T_STD_U16LE, H5T_STD_I32LE,
                           H5T_STD_U32LE, H5T_STD_I64LE, H5T_STD_U64LE, H5T_STD_I32BE, H5T_STD_I64BE,
                           H5T_STD_U64BE, H5T_STD_B32LE, H5T_STD_B64LE};
    return types[fb_pick(b, sizeof types / sizeof types[0])];
}

static hid_t float_type(FuzzBytes *b) {
    const hid_t types[] = {H5T_IEEE_F32LE, H5T_IEEE_F64LE, H5T_IEEE_F32BE, H5T_IEEE_F64BE};
    return types[fb_pick(b, 4)];
}

/* The same value in the type of another class: its text for strings, a number for numbers. */
static void value_text(const FzValue *v, char *out, size_t n) {
    if (v->cls == H5T_STRING) snprintf(out, n, "%s", v->s ? v->s : "");
    else if (v->cls == H5T_FLOAT) snprintf(out, n, "%.17g", v->f);
    else snprintf(out, n, "%lld", (long long)v->i);
}

static hid_t vlen_string_type(void) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    return t;
}

/* {int64 a; double b}: a class (compound) no reader takes for a number or a string */
typedef struct Pair {
    int64_t a;
    double b;
} Pair;

static hid_t pair_type(void) {
    hid_t t = H5Tcreate(H5T_COMPOUND, sizeof(Pair));
    H5Tinsert(t, "a", offsetof(Pair, a), H5T_NATIVE_INT64);
    H5Tinsert(t, "b", offsetof(Pair, b), H5T_NATIVE_DOUBLE);
    return t;
}

static void put_attr(hid_t loc, const char *name, hid_t type, hid_t space, hid_t mem_type, const void *data) {
    hid_t a = H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a >= 0 && data) H5Awrite(a, mem_type, data);
    if (a >= 0) H5Aclose(a);
}

/* The expected type of want: its integer or float file type, or a variable-length UTF-8 string. */
static hid_t want_type(const FzValue *want) {
    return want->cls == H5T_STRING ? vlen_string_type() : H5Tcopy(want->type);
}

/* Writes want's value through its expected type into an attribute of that type and space. */
static void put_want(hid_t loc, const char *name, const FzValue *want, hid_t space) {
    hid_t t = want_type(want);
    if (want->cls == H5T_STRING) {
        const char *s = want->s ? want->s : "";
        put_attr(loc, name, t, space, t, &s);
    } else if (want->cls == H5T_FLOAT) put_attr(loc, name, t, space, H5T_NATIVE_DOUBLE, &want->f);
    else put_attr(loc, name, t, space, H5T_NATIVE_INT64, &want->i);
    H5Tclose(t);
}

enum { ATTR_VARIANTS = 13 };

static void write_attr_variant(FuzzBytes *b, hid_t loc, const char *name, const FzValue *want, unsigned variant) {
    hid_t scalar = H5Screate(H5S_SCALAR);
    char text[512];
    switch (variant) {
    case 0: put_want(loc, name, want, scalar); break;
    case 1: break; /* absent */
    case 2: {      /* an integer of any width, signedness, byte order (or a bitfield) */
        int64_t v = fb_int(b);
        put_attr(loc, name, int_type(b), scalar, H5T_NATIVE_INT64, &v);
        break;
    }
    case 3: { /* an array where a scalar is expected: 1 to 4 elements, or 2 x 2 */
        int64_t v[4];
        unsigned shape = fb_pick(b, 5);
        hsize_t dims[2] = {shape < 4 ? shape + 1 : 2, 2};
        /* the first element the expected value: the case that reads as valid and corrupts what follows */
        for (int i = 0; i < 4; i++) v[i] = i == 0 && want->cls == H5T_INTEGER ? want->i : fb_int(b);
        hid_t space = H5Screate_simple(shape < 4 ? 1 : 2, dims, NULL);
        if (want->cls == H5T_STRING) {
            const char *s[4] = {want->s ? want->s : "", "", "x", ""};
            hid_t t = vlen_string_type();
            put_attr(loc, name, t, space, t, s);
            H5Tclose(t);
        } else if (want->cls == H5T_FLOAT) {
            double d[4] = {want->f};
            for (int i = 1; i < 4; i++) d[i] = fb_double(b);
            put_attr(loc, name, want->type, space, H5T_NATIVE_DOUBLE, d);
        } else put_attr(loc, name, want->type, space, H5T_NATIVE_INT64, v);
        H5Sclose(space);
        break;
    }
    case 4: { /* a float (NaN, inf, huge, fractional) */
        double d = fb_double(b);
        put_attr(loc, name, float_type(b), scalar, H5T_NATIVE_DOUBLE, &d);
        break;
    }
    case 5: { /* an array of floats */
        double d[3];
        for (int i = 0; i < 3; i++) d[i] = fb_double(b);
        hsize_t dims[1] = {1 + fb_pick(b, 3)};
        hid_t space = H5Screate_simple(1, dims, NULL);
        put_attr(loc, name, float_type(b), space, H5T_NATIVE_DOUBLE, d);
        H5Sclose(space);
        break;
    }
    case 6: { /* a fixed-length string of any length, padding and character set: the expected text or bytes */
        size_t len;
        if (fb_pick(b, 2)) len = fb_text(b, text, sizeof text - 1);
        else {
            value_text(want, text, sizeof text);
            len = strlen(text);
        }
        unsigned size_choice = fb_pick(b, 8);
        size_t size = size_choice < 7 ? len + size_choice : 1 + fb_u16(b) % 400; /* +0: no room for a NUL */
        if (size == 0) size = 1;
        char *buf = calloc(size + 1, 1);
        memcpy(buf, text, len < size ? len : size);
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, size);
        const H5T_str_t pads[] = {H5T_STR_NULLTERM, H5T_STR_NULLPAD, H5T_STR_SPACEPAD};
        H5Tset_strpad(t, pads[fb_pick(b, 3)]);
        H5Tset_cset(t, fb_pick(b, 2) ? H5T_CSET_UTF8 : H5T_CSET_ASCII);
        put_attr(loc, name, t, scalar, t, buf);
        H5Tclose(t);
        free(buf);
        break;
    }
    case 7: { /* a variable-length string: any bytes (invalid UTF-8 too), or the value as text */
        if (fb_pick(b, 2)) fb_text(b, text, sizeof text - 1);
        else value_text(want, text, sizeof text);
        const char *s = text;
        hid_t t = H5Tcopy(H5T_C_S1);
        H5Tset_size(t, H5T_VARIABLE);
        H5Tset_cset(t, fb_pick(b, 2) ? H5T_CSET_UTF8 : H5T_CSET_ASCII);
        put_attr(loc, name, t, scalar, t, &s);
        H5Tclose(t);
        break;
    }
    case 8: { /* an array of variable-length strings */
        value_text(want, text, sizeof text);
        const char *s[3] = {text, "", "char"};
        hsize_t dims[1] = {2 + fb_pick(b, 2)};
        hid_t space = H5Screate_simple(1, dims, NULL), t = vlen_string_type();
        put_attr(loc, name, t, space, t, s);
        H5Tclose(t);
        H5Sclose(space);
        break;
    }
    case 9: { /* the expected type with a null dataspace: an attribute that holds no value */
        hid_t space = H5Screate(H5S_NULL), t = want_type(want);
        put_attr(loc, name, t, space, t, NULL);
        H5Tclose(t);
        H5Sclose(space);
        break;
    }
    case 10: { /* the expected type with zero elements */
        hsize_t dims[1] = {0};
        hid_t space = H5Screate_simple(1, dims, NULL), t = want_type(want);
        put_attr(loc, name, t, space, t, NULL);
        H5Tclose(t);
        H5Sclose(space);
        break;
    }
    case 11: { /* a compound */
        Pair p = {.a = fb_int(b)};
        p.b = fb_double(b);
        hid_t t = pair_type();
        put_attr(loc, name, t, scalar, t, &p);
        H5Tclose(t);
        break;
    }
    default: { /* the expected type, a fuzzed value */
        FzValue v = *want;
        v.i = fb_int(b);
        v.f = fb_double(b);
        fb_text(b, text, sizeof text - 1);
        v.s = text;
        put_want(loc, name, &v, scalar);
        break;
    }
    }
    H5Sclose(scalar);
}

void fz_write_attr(FuzzBytes *b, hid_t loc, const char *name, const FzValue *want) {
    write_attr_variant(b, loc, name, want, fb_variant(b, ATTR_VARIANTS));
}

void fz_mutate_attr(FuzzBytes *b, hid_t loc, const char *name) {
    unsigned variant = fb_variant(b, ATTR_VARIANTS);
    if (variant == 0 || H5Aexists(loc, name) <= 0) return;
    /* what is there now is the expected value the variants derive from */
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    hid_t t = H5Aget_type(a);
    FzValue want = {.cls = H5Tget_class(t), .type = H5T_STD_I64LE};
    char *text = NULL;
    if (want.cls == H5T_INTEGER) {
        want.type = H5Tget_size(t) == 4 ? H5T_STD_I32LE : H5Tget_sign(t) == H5T_SGN_NONE ? H5T_STD_U64LE : H5T_STD_I64LE;
        H5Aread(a, H5T_NATIVE_INT64, &want.i);
    } else if (want.cls == H5T_FLOAT) {
        want.type = H5T_IEEE_F64LE;
        H5Aread(a, H5T_NATIVE_DOUBLE, &want.f);
    } else if (want.cls == H5T_STRING && H5Tis_variable_str(t) > 0) {
        hid_t m = vlen_string_type();
        H5Tset_cset(m, H5Tget_cset(t));
        if (H5Aread(a, m, &text) < 0) text = NULL;
        want.s = text;
        H5Tclose(m);
    } else want.cls = H5T_STRING; /* anything else: replaced by variants of an empty string */
    H5Tclose(t);
    H5Aclose(a);
    H5Adelete(loc, name);
    write_attr_variant(b, loc, name, &want, variant);
    if (text) H5free_memory(text);
}

static hsize_t numel_of(int rank, const hsize_t *dims) {
    hsize_t n = 1;
    for (int i = 0; i < rank; i++) n *= dims[i];
    return n;
}

/* A dataset of type and shape; data (mem_type) written unless NULL; chunked (and deflated) when asked
 * or when a dimension is too large to hold in a file that is never written. */
static void put_dataset(hid_t loc, const char *name, hid_t type, int rank, const hsize_t *dims, hid_t mem_type,
                        const void *data, bool chunked) {
    hid_t space = H5Screate_simple(rank, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (chunked && rank > 0) {
        hsize_t chunk[4];
        for (int i = 0; i < rank; i++) chunk[i] = dims[i] < 1 ? 1 : dims[i] < 64 ? dims[i] : 64;
        H5Pset_chunk(dcpl, rank, chunk);
        if (data) H5Pset_deflate(dcpl, 1);
    }
    hid_t d = space >= 0 ? H5Dcreate2(loc, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT) : -1;
    if (d >= 0 && data) H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (d >= 0) H5Dclose(d);
    H5Pclose(dcpl);
    if (space >= 0) H5Sclose(space);
}

enum { DATASET_VARIANTS = 13 };

/* The most elements a variant copies from want (a checkpoint tensor or a token list is small here). */
#define FZ_MAX_ELEMENTS ((hsize_t)1 << 22)

static void write_dataset_variant(FuzzBytes *b, hid_t loc, const char *name, const FzArray *want, unsigned variant) {
    hsize_t n = numel_of(want->rank, want->dims);
    size_t es = H5Tget_size(want->mem_type);
    switch (variant) {
    case 0: put_dataset(loc, name, want->file_type, want->rank, want->dims, want->mem_type, want->data, false); break;
    case 1: put_dataset(loc, name, want->file_type, want->rank, want->dims, want->mem_type, want->data, true); break;
    case 2:    /* a few values replaced by edge values (out of range, negative, NaN, inf, ...) */
    case 12: { /* the leading values all raw bytes */
        uint8_t *copy = malloc(n * es + 1);
        memcpy(copy, want->data, n * es);
        int k = variant == 2 ? 1 + (int)fb_pick(b, 4) : (int)(n < 64 ? n : 64);
        bool is_float = H5Tget_class(want->mem_type) == H5T_FLOAT;
        for (int j = 0; j < k && n > 0; j++) {
            uint8_t *at = copy + (variant == 2 ? fb_u32(b) % n : (hsize_t)j) * es;
            if (variant == 12) {
                for (size_t i = 0; i < es; i++) at[i] = fb_u8(b);
            } else if (is_float && es == sizeof(float)) {
                float f = (float)fb_double(b);
                memcpy(at, &f, es);
            } else if (is_float && es == sizeof(double)) {
                double d = fb_double(b);
                memcpy(at, &d, es);
            } else { /* an integer: the low bytes of an edge value (little-endian, as x86 and ARM) */
                int64_t v = fb_int(b);
                memcpy(at, &v, es < sizeof v ? es : sizeof v);
            }
        }
        bool chunked = fb_pick(b, 2);
        put_dataset(loc, name, want->file_type, want->rank, want->dims, want->mem_type, copy, chunked);
        free(copy);
        break;
    }
    case 3: break; /* absent */
    case 4: {      /* another type, the values converted (clipped where they do not fit) */
        hid_t t = fb_pick(b, 3) ? int_type(b) : float_type(b);
        put_dataset(loc, name, t, want->rank, want->dims, want->mem_type, want->data, false);
        break;
    }
    case 5: { /* another rank: a scalar of the first value, or an extra leading dimension of 1 */
        if (fb_pick(b, 2) || n == 0) {
            hid_t space = H5Screate(H5S_SCALAR);
            hid_t d = H5Dcreate2(loc, name, want->file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
            if (d >= 0 && n > 0) H5Dwrite(d, want->mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, want->data);
            if (d >= 0) H5Dclose(d);
            H5Sclose(space);
        } else if (want->rank < 4) {
            hsize_t dims[4] = {1};
            memcpy(dims + 1, want->dims, (size_t)want->rank * sizeof(hsize_t));
            put_dataset(loc, name, want->file_type, want->rank + 1, dims, want->mem_type, want->data, false);
        }
        break;
    }
    case 6: { /* one dimension changed (to 0, off by one, 2^31, 2^62, ...): chunked, never written */
        hsize_t dims[4];
        int rank = want->rank ? want->rank : 1;
        for (int i = 0; i < rank; i++) dims[i] = want->rank ? want->dims[i] : 1;
        unsigned which = fb_pick(b, (unsigned)rank);
        unsigned how = fb_pick(b, 3); /* one more, one fewer, or an edge value */
        if (how == 0 || (how == 1 && dims[which] == 0)) dims[which]++;
        else if (how == 1) dims[which]--;
        else dims[which] = fb_dim(b);
        put_dataset(loc, name, want->file_type, rank, dims, want->mem_type, NULL, true);
        break;
    }
    case 7: { /* a group */
        hid_t g = H5Gcreate2(loc, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (g >= 0) H5Gclose(g);
        break;
    }
    case 8: H5Lcreate_soft("/no/such/object", loc, name, H5P_DEFAULT, H5P_DEFAULT); break;
    case 9: { /* strings */
        char text[3][64];
        const char *s[3];
        for (int i = 0; i < 3; i++) {
            fb_text(b, text[i], sizeof text[i] - 1);
            s[i] = text[i];
        }
        hsize_t dims[1] = {1 + fb_pick(b, 3)};
        hid_t t = vlen_string_type();
        put_dataset(loc, name, t, 1, dims, t, s, false);
        H5Tclose(t);
        break;
    }
    case 10: { /* a null dataspace */
        hid_t space = H5Screate(H5S_NULL);
        hid_t d = H5Dcreate2(loc, name, want->file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (d >= 0) H5Dclose(d);
        H5Sclose(space);
        break;
    }
    default: { /* a compound of the same shape */
        hid_t t = pair_type();
        put_dataset(loc, name, t, want->rank, want->dims, t, NULL, false);
        H5Tclose(t);
        break;
    }
    }
}

void fz_write_dataset(FuzzBytes *b, hid_t loc, const char *name, const FzArray *want) {
    write_dataset_variant(b, loc, name, want, fb_variant(b, DATASET_VARIANTS));
}

void fz_mutate_dataset(FuzzBytes *b, hid_t loc, const char *name) {
    unsigned variant = fb_variant(b, DATASET_VARIANTS);
    if (variant == 0) return;
    hid_t d = H5Dopen2(loc, name, H5P_DEFAULT);
    if (d < 0) return;
    hid_t ftype = H5Dget_type(d), space = H5Dget_space(d);
    H5T_class_t cls = H5Tget_class(ftype);
    if (cls != H5T_INTEGER && cls != H5T_FLOAT) { /* numbers are all our writers store in datasets */
        H5Tclose(ftype);
        H5Sclose(space);
        H5Dclose(d);
        return;
    }
    FzArray want = {.file_type = H5Tcopy(ftype), .rank = H5Sget_simple_extent_ndims(space)};
    want.mem_type = H5Tget_native_type(ftype, H5T_DIR_ASCEND);
    bool ok = want.rank >= 0 && want.rank <= 4 && want.mem_type >= 0;
    if (ok) H5Sget_simple_extent_dims(space, want.dims, NULL);
    hsize_t n = ok ? numel_of(want.rank, want.dims) : 0;
    void *data = NULL;
    if (ok && n <= FZ_MAX_ELEMENTS) {
        data = calloc(n + 1, H5Tget_size(want.mem_type));
        ok = H5Dread(d, want.mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0;
    }
    want.data = data;
    H5Sclose(space);
    H5Tclose(ftype);
    H5Dclose(d);
    if (ok && data) {
        H5Ldelete(loc, name, H5P_DEFAULT);
        write_dataset_variant(b, loc, name, &want, variant);
    }
    free(data);
    if (want.mem_type >= 0) H5Tclose(want.mem_type);
    H5Tclose(want.file_type);
}
