/* Checked reads of HDF5 files: the one way the project reads an attribute or a dataset (token files,
 * checkpoints, build/forward's tokens, build/opcheck's inputs, the tests' own files).
 *
 * HDF5 writes an attribute or a dataset of whatever shape the file says into the caller's buffer, so a
 * file with an array where a scalar belongs overflows a stack variable. Here every object is read only
 * after its shape and type are checked against what the caller expects: an attribute must be a scalar
 * (or a one-element array) of the expected class (integer, floating-point, string), a dataset must have
 * the expected type class, rank and extents, a type whose values fit the memory type, storage in this
 * file, and no more bytes than the file can hold or inflate to. A mismatch is an error that names the
 * file, the object and what was expected:
 *     <file>: attribute "version": expected a scalar integer, found an integer array of shape [2]
 *     <file>: dataset "params/wte": shape mismatch: the file has [32, 64], expected [65, 64]
 * With exit_on_error the error ends the program (fatal); without, the functions return it in
 * H5Reader.error and leave the program running (--resume trying older checkpoints). */
#ifndef MSA_H5READ_H
#define MSA_H5READ_H

#include <stdbool.h>
#include <stdint.h>

#include <hdf5.h>

#define H5R_MAX_RANK 8

/* HDF5 as this project uses it; every program calls it before its first HDF5 function (the library's
 * entry points do too). HDF5 prints no error stack (our messages name the file and the object), and
 * installs no clean-up at exit: after an H5Fclose that failed (a full disk), HDF5 1.10's clean-up
 * dereferences the half-closed file and the process dies with SIGSEGV after printing the right error.
 * Nothing is lost without it: every file written is closed, and the close checked, before exit. */
void h5_setup(void);

typedef struct H5Reader {
    const char *path;    /* the file, for messages (not copied: it must outlive the reader) */
    hid_t file;          /* -1 when not open */
    int64_t file_bytes;  /* bounds what a dataset may claim to hold */
    bool exit_on_error;
    char error[1024];    /* the last error, "<file>: <object>: <problem>" */
} H5Reader;

/* Opens path read-only. kind names the file in messages ("checkpoint", "token file"); hint follows
 * "not an HDF5 file" (e.g. " (make one with build/prepare_text)"). False (or exit) when it is missing,
 * unreadable, a directory, empty, not HDF5, or HDF5 cannot open it. */
bool h5r_open(H5Reader *r, const char *path, const char *kind, const char *hint, bool exit_on_error);
void h5r_close(H5Reader *r);

/* Records "<file>: <message>" as the reader's error (ends the program with exit_on_error); returns
 * false. For the callers' own checks of what they read, so that those follow the same mode. */
bool h5r_fail(H5Reader *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Attributes of obj (the file, a group or a dataset). Each returns 1 when read, 0 when absent and not
 * required, -1 on any problem (only without exit_on_error). */
/* An integer attribute in [lo, hi]. */
int h5r_attr_int(H5Reader *r, hid_t obj, const char *name, bool required, int64_t lo, int64_t hi, int64_t *out);
/* An unsigned integer attribute in [0, hi] (a signed type is accepted with a value >= 0). */
int h5r_attr_uint(H5Reader *r, hid_t obj, const char *name, bool required, uint64_t hi, uint64_t *out);
/* A floating-point attribute (any_number: an integer one too). NaN and infinities are returned as they
 * are: what they mean is the caller's to decide. */
int h5r_attr_float(H5Reader *r, hid_t obj, const char *name, bool required, bool any_number, double *out);
/* A string attribute, fixed-length or variable-length (h5py's str), as a malloc'd NUL-terminated copy;
 * *len (may be NULL) is its length in bytes: a fixed-length string's whole size, NULs it holds included. */
int h5r_attr_string(H5Reader *r, hid_t obj, const char *name, bool required, char **out, size_t *len);

/* Whether loc/name ("a" or "a/b/c") is there as an object of this file: 1 yes, 0 absent, -1 a soft or
 * external link on the way (an error: a link to another file would open it, a FIFO would hang). */
int h5r_link(H5Reader *r, hid_t loc, const char *name);

typedef struct H5Shape {
    int ndim; /* 0: a scalar dataset */
    int64_t dims[H5R_MAX_RANK];
    int64_t numel;
} H5Shape;

/* What a dataset must be. */
typedef struct H5DatasetSpec {
    hid_t mem_type;      /* the native type its values are read as: H5T_NATIVE_FLOAT, _DOUBLE, _INT32, _INT64;
                            the file's type must be of the same class and (integers) its values must fit */
    bool any_number;     /* also accept the other numeric class (HDF5 converts: build/opcheck's inputs) */
    int ndim;            /* the rank it must have; -1 = any (up to H5R_MAX_RANK) */
    const int64_t *dims; /* with ndim >= 0: the extents it must have (an entry of -1 = any); NULL = any */
    const char *hint;    /* follows a shape mismatch, e.g. " (a different model config?)"; NULL = none */
} H5DatasetSpec;

/* Opens loc/name and checks it against spec; on 1 *dset is open (the caller closes it) and *shape
 * holds its shape. dapl: access properties (H5P_DEFAULT). 0 when absent and not required, -1 on a
 * problem (a link that is not a dataset, type, shape, storage). */
int h5r_dataset_open(H5Reader *r, hid_t loc, const char *name, const H5DatasetSpec *spec, bool required, hid_t dapl,
                     hid_t *dset, H5Shape *shape);

/* Reads the rows [first, first + n) along the first dimension of dset (of shape, as h5r_dataset_open
 * gave it) as mem_type into out; a scalar dataset has one row. */
bool h5r_read_rows(H5Reader *r, hid_t dset, const H5Shape *shape, hid_t mem_type, int64_t first, int64_t n, void *out);

/* h5r_dataset_open, then all of it into a malloc'd buffer *data (the caller frees it). 1, 0, -1 as there. */
int h5r_dataset_read(H5Reader *r, hid_t loc, const char *name, const H5DatasetSpec *spec, bool required, H5Shape *shape,
                     void **data);

/* "[2, 3]" */
void h5r_format_shape(char *buf, size_t n, int ndim, const int64_t *dims);

#endif
