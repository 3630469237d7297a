/* What the fuzz targets of tests/fuzz/ share (README.md there says how they work and how to run them):
 * the fuzzer's bytes read as a stream of decisions, the fatal() hook that turns a refused input into a
 * return, scratch files, and the writer of HDF5 attributes and datasets that are either what a reader
 * expects or a variant of it (wrong class, array for scalar, odd string, huge dims, missing, ...). */
#ifndef MSA_FUZZ_H
#define MSA_FUZZ_H

#include <setjmp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hdf5.h>

/* ---- the input as decisions ------------------------------------------------------------------- */

/* Reads past the end give zeros, and a zero decision always means "as the reader expects": the empty
 * input is a valid file, and every prefix of an input is a mostly valid one. */
typedef struct FuzzBytes {
    const uint8_t *p;
    size_t n;
} FuzzBytes;

uint8_t fb_u8(FuzzBytes *b);
uint16_t fb_u16(FuzzBytes *b);
uint32_t fb_u32(FuzzBytes *b);
uint64_t fb_u64(FuzzBytes *b);
/* In [0, n), n <= 256. */
unsigned fb_pick(FuzzBytes *b, unsigned n);
/* 0 (as expected) for half of the byte values, else a variant in [1, n): half of the objects of a
 * random input stay valid, so the fuzzer gets past the first check of a reader. */
unsigned fb_variant(FuzzBytes *b, unsigned n);
/* A length or dimension: small ones mostly, else one at an integer-width edge (2^31, 2^32, 2^62, ...). */
uint64_t fb_dim(FuzzBytes *b);
/* An integer value: small, at a width edge (INT32_MAX + 1, -1, INT64_MIN, ...), or 8 raw bytes. */
int64_t fb_int(FuzzBytes *b);
/* A double: small, NaN, +-inf, huge, tiny, or 8 raw bytes. */
double fb_double(FuzzBytes *b);

/* ---- refusals --------------------------------------------------------------------------------- */

/* fatal() is the project's one error path for bad input (it prints the message and exits 1). A target
 * calls fuzz_arm() and then `if (setjmp(fuzz_refused)) { ...refused... }` around each reader call: the
 * hook jumps back there, so a refusal ends the input and only a crash or a sanitizer report is a finding.
 * Memory and HDF5 handles the reader held when it refused are not freed (fatal exits in the programs);
 * fuzz_close_hdf5 closes the handles so that the scratch file can be written again. */
extern jmp_buf fuzz_refused;
void fuzz_arm(void);

/* Ends the run as a finding (abort) with a message: for a property a reader promised and broke. */
_Noreturn void fuzz_broken(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The config as the run directory and checkpoints store it (config_to_json) must read back through
 * config_load as the same config (same JSON again); else fuzz_broken. A refusal of that text is broken too. */
struct RunConfig;
void fuzz_check_config_round_trip(const struct RunConfig *c);

/* ---- scratch files ---------------------------------------------------------------------------- */

/* The path of this process's scratch HDF5 file, in /dev/shm (memory) when it exists, else in $TMPDIR or
 * /tmp; removed at exit. */
const char *fuzz_scratch_path(void);
/* A memory file (memfd) holding data, as a path a reader can open: "/proc/self/fd/N". fuzz_memfile_close
 * releases it. */
const char *fuzz_memfile(const void *data, size_t size, int *fd);
void fuzz_memfile_close(int fd);

/* Closes every HDF5 file, group, dataset, attribute and named type still open (a refused read leaves
 * them) and silences HDF5's error stack. */
void fuzz_close_hdf5(void);

/* ---- HDF5 objects as expected, or a variant ----------------------------------------------------- */

/* What a reader expects of an attribute. cls: H5T_INTEGER (value i, file type type), H5T_FLOAT (value f,
 * type type) or H5T_STRING (text s, written as a variable-length UTF-8 string). */
typedef struct FzValue {
    H5T_class_t cls;
    hid_t type;
    int64_t i;
    double f;
    const char *s;
} FzValue;

/* What a reader expects of a dataset: file type and memory type of data, rank and dims, the values. */
typedef struct FzArray {
    hid_t file_type, mem_type;
    int rank;
    hsize_t dims[4];
    const void *data; /* prod(dims) elements of mem_type */
} FzArray;

/* Writes attribute name on loc: the expected one or, as the input decides, absent, another integer width,
 * an array of 1 to 4 elements, a float, a fixed-length string of any length and padding, a
 * variable-length string (any bytes), an array of strings, an empty or null dataspace, a compound, or the
 * expected type with a fuzzed value. */
void fz_write_attr(FuzzBytes *b, hid_t loc, const char *name, const FzValue *want);
/* The same for a dataset: expected (contiguous or chunked and compressed), a few values overwritten,
 * absent, another type, another rank, a dimension changed (up to 2^63 - 1, chunked and never written),
 * a group, a dangling link, strings, a null dataspace, a compound. */
void fz_write_dataset(FuzzBytes *b, hid_t loc, const char *name, const FzArray *want);
/* For a file another writer made (checkpoint_write): keeps the existing attribute or dataset name of loc
 * (decision 0), or replaces it by a variant of itself as above. */
void fz_mutate_attr(FuzzBytes *b, hid_t loc, const char *name);
void fz_mutate_dataset(FuzzBytes *b, hid_t loc, const char *name);

#endif
