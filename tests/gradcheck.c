#include "gradcheck.h"

#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "../data/h5read.h"
#include "../kernels/util.h"

Tensor *test_tensor(DType dt, int ndim, const int64_t *shape) {
    Tensor *t = xcalloc(1, sizeof(Tensor));
    t->dtype = dt;
    t->device = DEV_CPU;
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    t->data = xcalloc((size_t)t->numel, dtype_size(dt));
    return t;
}

Tensor *test_randn(DType dt, int ndim, const int64_t *shape, double std, uint64_t seed) {
    Tensor *t = test_tensor(dt, ndim, shape);
    Rng r;
    rng_seed(&r, seed);
    for (int64_t i = 0; i < t->numel; i++) tensor_set(t, i, std * rng_normal(&r));
    return t;
}

void test_tensor_free(Tensor *t) {
    if (!t) return;
    if (t->grad) {
        free(t->grad->data);
        free(t->grad);
    }
    free(t->data);
    free(t);
}

Tensor *test_cu_seqlens(const int *doc_lens, int ndocs) {
    Tensor *cu = test_tensor(DT_I32, 1, (int64_t[]){ndocs + 1});
    int32_t *c = cu->data;
    c[0] = 0;
    for (int d = 0; d < ndocs; d++) c[d + 1] = c[d] + doc_lens[d];
    return cu;
}

void test_requires_grad(Tensor *t) {
    t->requires_grad = true;
    if (!t->grad) {
        t->grad = test_tensor(t->dtype, t->ndim, t->shape);
    }
}

double rel_err(const double *a, const double *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* L = sum(out * R) evaluated without recording */
static double eval_loss(Engine *e, GradCheckFn fn, Tensor **inputs, void *ctx, const double *R) {
    engine_reset(e);
    bool prev = engine_set_grad(e, false);
    Tensor *out = fn(e, inputs, ctx);
    engine_set_grad(e, prev);
    double *host = xmalloc((size_t)out->numel * sizeof(double));
    if (out->dtype != DT_F64) fatal("gradcheck: the function must produce f64 (got %s)", dtype_name(out->dtype));
    tensor_to_host(e, host, out);
    double L = 0;
    for (int64_t i = 0; i < out->numel; i++) L += host[i] * R[i];
    free(host);
    return L;
}

GradCheckResult gradcheck(Engine *e, GradCheckFn fn, Tensor **inputs, int n_inputs, void *ctx, int max_elems,
                          uint64_t seed) {
    GradCheckResult res = {0, -1, 0};
    /* analytic gradients */
    engine_reset(e);
    for (int i = 0; i < n_inputs; i++)
        if (inputs[i] && inputs[i]->grad) memset(inputs[i]->grad->data, 0, tensor_bytes(inputs[i]->grad));
    Tensor *out = fn(e, inputs, ctx);
    Rng rng;
    rng_seed(&rng, seed);
    double *R = xmalloc((size_t)out->numel * sizeof(double));
    for (int64_t i = 0; i < out->numel; i++) R[i] = rng_normal(&rng);
    Tensor *seed_t = engine_empty(e, DT_F64, out->ndim, out->shape);
    tensor_from_host(e, seed_t, R);
    engine_backward_from(e, out, seed_t, 0);

    const double h = 1e-6;
    for (int i = 0; i < n_inputs; i++) {
        Tensor *x = inputs[i];
        if (!x || !x->requires_grad) continue;
        if (x->dtype != DT_F64) fatal("gradcheck: input %d must be f64", i);
        int64_t n = x->numel, m = (max_elems > 0 && n > max_elems) ? max_elems : n;
        double *an = xmalloc((size_t)m * sizeof(double)), *nu = xmalloc((size_t)m * sizeof(double));
        double *xd = x->data;
        for (int64_t j = 0; j < m; j++) {
            int64_t idx = (m == n) ? j : (int64_t)(rng_next(&rng) % (uint64_t)n);
            an[j] = ((double *)x->grad->data)[idx];
            double old = xd[idx];
            xd[idx] = old + h;
            double lp = eval_loss(e, fn, inputs, ctx, R);
            xd[idx] = old - h;
            double lm = eval_loss(e, fn, inputs, ctx, R);
            xd[idx] = old;
            nu[j] = (lp - lm) / (2 * h);
        }
        double err = rel_err(an, nu, m), nn = 0;
        for (int64_t j = 0; j < m; j++) nn += nu[j] * nu[j];
        if (res.worst_input < 0 || err > res.max_rel_err) {
            res.max_rel_err = err;
            res.worst_input = i;
            res.numeric_norm = sqrt(nn);
        }
        free(an);
        free(nu);
    }
    free(R);
    engine_reset(e);
    return res;
}

int test_run_child(void (*fn)(const void *), const void *arg, char *err, size_t errn) {
    int fd[2];
    if (pipe(fd) != 0) return -2;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        dup2(fd[1], 2);
        if (!freopen("/dev/null", "w", stdout)) _exit(3);
        fn(arg);
        fflush(NULL);
        _exit(0);
    }
    close(fd[1]);
    size_t n = 0;
    ssize_t got;
    while ((got = read(fd[0], err + n, errn - 1 - n)) > 0) n += (size_t)got;
    err[n] = 0;
    close(fd[0]);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int test_run_program(char *const argv[], long fsize_limit, char *out, size_t n) {
    int fd[2];
    if (pipe(fd) != 0) return -1000;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        dup2(fd[1], 1);
        dup2(fd[1], 2);
        if (fsize_limit > 0) {
            /* an ignored signal stays ignored across exec: the write fails with EFBIG instead */
            signal(SIGXFSZ, SIG_IGN);
            struct rlimit rl = {(rlim_t)fsize_limit, (rlim_t)fsize_limit};
            setrlimit(RLIMIT_FSIZE, &rl);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    close(fd[1]);
    size_t k = 0;
    char sink[256];
    for (ssize_t got;;) { /* keep what fits, drain the rest so the child never blocks on a full pipe */
        bool room = k + 1 < n;
        if ((got = read(fd[0], room ? out + k : sink, room ? n - 1 - k : sizeof sink)) <= 0) break;
        if (room) k += (size_t)got;
    }
    out[k] = 0;
    close(fd[0]);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? -WTERMSIG(st) : -1000;
}

int test_system(const char *cmd, const char *errpath, char *err, size_t errn, bool first_line) {
    int st = system(cmd);
    err[0] = 0;
    FILE *f = fopen(errpath, "r");
    if (f) {
        size_t n = fread(err, 1, errn - 1, f);
        err[n] = 0;
        fclose(f);
    }
    char *nl = first_line ? strchr(err, '\n') : NULL;
    if (nl) *nl = 0;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

pid_t test_spawn_train(const char *args, const char *env_kv, const char *out_path) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        char buf[4096], *argv[128];
        int argc = 0;
        snprintf(buf, sizeof buf, "%s", args);
        argv[argc++] = "build/train";
        for (char *w = strtok(buf, " "); w && argc < 127; w = strtok(NULL, " ")) argv[argc++] = w;
        argv[argc] = NULL;
        if (env_kv) putenv((char *)env_kv);
        int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) _exit(126);
        dup2(fd, 1);
        dup2(fd, 2);
        execv("build/train", argv);
        _exit(127);
    }
    return pid;
}

char *test_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = xmalloc((size_t)(n > 0 ? n : 0) + 1);
    *len = fread(buf, 1, (size_t)(n > 0 ? n : 0), f);
    buf[*len] = 0;
    fclose(f);
    return buf;
}

double test_norm(const Tensor *t) {
    double s = 0;
    for (int64_t i = 0; i < t->numel; i++) s += tensor_get(t, i) * tensor_get(t, i);
    return sqrt(s);
}

Tensor *test_copy_as(const Tensor *src, DType dt) {
    Tensor *t = test_tensor(dt, src->ndim, src->shape);
    for (int64_t i = 0; i < src->numel; i++) tensor_set(t, i, tensor_get(src, i));
    return t;
}

void test_h5_write(hid_t f, const char *name, int ndim, const hsize_t *dims, const void *data, bool is_int) {
    hid_t space = H5Screate_simple(ndim, dims, NULL);
    hid_t dset = H5Dcreate2(f, name, is_int ? H5T_STD_I32LE : H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(dset, is_int ? H5T_NATIVE_INT32 : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    H5Dclose(dset);
    H5Sclose(space);
}

void test_h5_attr(hid_t f, const char *name, double v, bool is_int) {
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, is_int ? H5T_STD_I32LE : H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    int32_t iv = (int32_t)v;
    H5Awrite(a, is_int ? H5T_NATIVE_INT32 : H5T_NATIVE_DOUBLE, is_int ? (const void *)&iv : (const void *)&v);
    H5Aclose(a);
    H5Sclose(space);
}

void *test_h5_read(const char *path, const char *name, int64_t numel, bool is_int) {
    H5Reader rd;
    if (!h5r_open(&rd, path, "output file", NULL, false)) return NULL;
    const H5DatasetSpec spec = {.mem_type = is_int ? H5T_NATIVE_INT32 : H5T_NATIVE_FLOAT, .ndim = -1};
    H5Shape shape;
    void *buf = NULL;
    if (h5r_dataset_read(&rd, rd.file, name, &spec, false, &shape, &buf) == 1 && shape.numel != numel) {
        free(buf);
        buf = NULL;
    }
    h5r_close(&rd);
    return buf;
}

double test_rel_err_f32(const float *got, const float *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
