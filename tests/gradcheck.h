/* Float64 finite-difference gradient checking for any function of tensors built from ops.
 *
 * fn(e, inputs, ctx) builds an output tensor from the inputs with ops. The check forms the scalar
 * L = sum(out * R) for fixed random R, computes dL/d(input) by backward, and compares it with
 * central differences (L(x+h) - L(x-h)) / 2h for every input element (or a deterministic sample of
 * `max_elems` per input) of each input with requires_grad. The error reported per input is the
 * relative norm ||analytic - numeric|| / ||numeric|| over the checked elements. */
#ifndef MSA_GRADCHECK_H
#define MSA_GRADCHECK_H

#include <hdf5.h>
#include <stdbool.h>
#include <sys/types.h>

#include "../autograd/engine.h"

typedef Tensor *(*GradCheckFn)(Engine *e, Tensor **inputs, void *ctx);

typedef struct GradCheckResult {
    double max_rel_err;   /* worst input's relative error */
    int worst_input;
    double numeric_norm;  /* of the worst input (a check of an all-zero gradient proves nothing) */
} GradCheckResult;

/* Persistent CPU tensors for test inputs (outside the engine's arena). Free with test_tensor_free. */
Tensor *test_tensor(DType dt, int ndim, const int64_t *shape);
Tensor *test_randn(DType dt, int ndim, const int64_t *shape, double std, uint64_t seed);
void test_tensor_free(Tensor *t);
/* cu_seqlens (i32 [ndocs+1]) for documents of the given lengths laid end to end */
Tensor *test_cu_seqlens(const int *doc_lens, int ndocs);
/* ||got - ref|| / ||ref|| over n floats (||got - ref|| when ref is all zero), in double */
double test_rel_err_f32(const float *got, const float *ref, int64_t n);
/* Give t a persistent zeroed grad and mark it requires_grad. */
void test_requires_grad(Tensor *t);

GradCheckResult gradcheck(Engine *e, GradCheckFn fn, Tensor **inputs, int n_inputs, void *ctx, int max_elems,
                          uint64_t seed);

/* Runs fn(arg) in a forked child with its stderr captured into err (stdout discarded); returns the exit
 * status (-1 if killed, 0 when fn returns). Lets tests watch code that ends the program on bad input. */
int test_run_child(void (*fn)(const void *), const void *arg, char *err, size_t errn);
/* Runs the program argv[0] (a path) with argv (NULL-terminated), its stdout and stderr together into
 * out (what fits in n - 1 bytes). fsize_limit > 0: under RLIMIT_FSIZE = fsize_limit bytes with SIGXFSZ
 * ignored, so that a write past the limit fails with EFBIG as one on a full disk does. Returns the exit
 * status, or -N when signal N killed it (a crash is told apart from a clean error exit). */
int test_run_program(char *const argv[], long fsize_limit, char *out, size_t n);
/* Runs the shell command cmd, which sends its stderr to the file errpath; err gets that file's text (its
 * first line only with first_line), "" without the file. Returns the exit status (-1 if killed). Lets
 * tests run the programs (build/opcheck, test_gpu --die). */
int test_system(const char *cmd, const char *errpath, char *err, size_t errn, bool first_line);

/* Starts build/train with `args` (words separated by single spaces; none may hold a space) in the
 * background, its stdout and stderr into the file out_path; env_kv ("NAME=value") is added to its
 * environment when not NULL. Returns the pid (waitpid it). Lets tests signal a running training. */
pid_t test_spawn_train(const char *args, const char *env_kv, const char *out_path);
/* The whole file, NUL-terminated (malloc'd; *len bytes without the NUL), or NULL without the file. */
char *test_read_file(const char *path, size_t *len);

/* L2 norm of a CPU float tensor; a copy of src converted to dtype dt (F32 or F64) */
double test_norm(const Tensor *t);
Tensor *test_copy_as(const Tensor *src, DType dt);

/* ||a - b|| / ||b|| over n doubles */
double rel_err(const double *a, const double *b, int64_t n);

/* HDF5 files of the program tests (build/opcheck's input and output): write a dataset of f32 (is_int:
 * i32) values, or a scalar attribute stored as f64 (is_int: i32); read a dataset back as float (is_int:
 * int32), NULL when it is absent or has another element count (the caller frees it). */
void test_h5_write(hid_t f, const char *name, int ndim, const hsize_t *dims, const void *data, bool is_int);
void test_h5_attr(hid_t f, const char *name, double v, bool is_int);
void *test_h5_read(const char *path, const char *name, int64_t numel, bool is_int);

#endif
