/* The GPU tests' harness (tests/gpu/gpu_check.h): the same values on the CPU and the GPU, poisoned
 * outputs, relative-error checks that count into the TestCtx. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_check.h"

GpuCheck gpu_check = {.gpu = &cuda_backend, .cpu = &cpu_backend};

/* ---------- host BF16 (round to nearest even, as __float2bfloat16_rn) ---------- */

uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
float round_to(DType dt, float f) { return dt == DT_BF16 ? bf16_value(bf16_bits(f)) : f; }

/* ---------- tensors on either backend ---------- */

Tensor mk(const KernelBackend *be, DType dt, int ndim, const int64_t *shape) {
    Tensor t;
    memset(&t, 0, sizeof t);
    t.dtype = dt;
    t.device = be->device;
    t.ndim = ndim;
    t.numel = 1;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        t.numel *= shape[i];
    }
    t.data = be->alloc(tensor_bytes(&t) + 16);
    return t;
}

void upload_f32(Tensor *g, const float *h) {
    size_t es = dtype_size(g->dtype);
    char *buf = xmalloc((size_t)g->numel * es + 16);
    for (int64_t i = 0; i < g->numel; i++) {
        if (g->dtype == DT_BF16) ((uint16_t *)buf)[i] = bf16_bits(h[i]);
        else if (g->dtype == DT_F32) ((float *)buf)[i] = h[i];
        else if (g->dtype == DT_I32) ((int32_t *)buf)[i] = (int32_t)h[i];
        else ((double *)buf)[i] = h[i];
    }
    if (g->device == DEV_CUDA) GB->copy_from_host(g->data, buf, (size_t)g->numel * es);
    else memcpy(g->data, buf, (size_t)g->numel * es);
    free(buf);
}

float *download_f32(const Tensor *g) {
    size_t es = dtype_size(g->dtype);
    char *buf = xmalloc((size_t)g->numel * es + 16);
    if (g->device == DEV_CUDA) GB->copy_to_host(buf, g->data, (size_t)g->numel * es);
    else memcpy(buf, g->data, (size_t)g->numel * es);
    float *h = xmalloc((size_t)g->numel * sizeof(float) + 4);
    for (int64_t i = 0; i < g->numel; i++) {
        if (g->dtype == DT_BF16) h[i] = bf16_value(((uint16_t *)buf)[i]);
        else if (g->dtype == DT_F32) h[i] = ((float *)buf)[i];
        else if (g->dtype == DT_I32) h[i] = (float)((int32_t *)buf)[i];
        else h[i] = (float)((double *)buf)[i];
    }
    free(buf);
    return h;
}

void poison(Tensor *g) { /* all bits set: NaN in f32 and bf16 */
    size_t n = tensor_bytes(g);
    char *buf = xmalloc(n + 1);
    memset(buf, 0xff, n);
    GB->copy_from_host(g->data, buf, n);
    free(buf);
}

void free_t(Tensor *t) {
    if (!t->data) return;
    (t->device == DEV_CUDA ? GB : CB)->free(t->data);
    t->data = NULL;
}

Pair pair_from(DType gdt, int ndim, const int64_t *shape, const float *vals) {
    Pair p;
    p.g = mk(GB, gdt, ndim, shape);
    p.c = mk(CB, gdt == DT_I32 ? DT_I32 : DT_F32, ndim, shape);
    p.h = xmalloc((size_t)p.g.numel * sizeof(float) + 4);
    for (int64_t i = 0; i < p.g.numel; i++) p.h[i] = round_to(gdt, vals[i]);
    upload_f32(&p.g, p.h);
    upload_f32(&p.c, p.h);
    return p;
}

float *randn(int64_t n, double mean, double std) {
    float *v = xmalloc((size_t)n * sizeof(float) + 4);
    for (int64_t i = 0; i < n; i++) v[i] = (float)(mean + std * rng_normal(&gpu_check.rng));
    return v;
}

Pair pair_rand(DType gdt, int ndim, const int64_t *shape, double mean, double std) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    float *v = randn(n, mean, std);
    Pair p = pair_from(gdt, ndim, shape, v);
    free(v);
    return p;
}

Pair pair_i32(int64_t n, const int32_t *vals) {
    float *v = xmalloc((size_t)n * sizeof(float) + 4);
    for (int64_t i = 0; i < n; i++) v[i] = (float)vals[i];
    Pair p = pair_from(DT_I32, 1, (int64_t[]){n}, v);
    free(v);
    return p;
}

/* an output: the GPU side poisoned, the CPU side zeroed */
Pair pair_out(DType gdt, int ndim, const int64_t *shape) {
    Pair p;
    p.g = mk(GB, gdt, ndim, shape);
    p.c = mk(CB, DT_F32, ndim, shape);
    p.h = NULL;
    poison(&p.g);
    memset(p.c.data, 0, tensor_bytes(&p.c));
    return p;
}

void pair_free(Pair *p) {
    free_t(&p->c);
    free_t(&p->g);
    free(p->h);
    p->h = NULL;
}

/* ---------- checks ---------- */

void record(bool ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("  %s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
    if (ok) TC->passed++;
    else TC->failed++;
}

double rel_err_f32(const float *a, const float *b, int64_t n, bool *nan) {
    double num = 0, den = 0;
    *nan = false;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) *nan = true;
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    /* a reference that is exactly zero (e.g. dq of a one-token document) is held to the absolute rms
     * error instead: the inputs are O(1) */
    if (den == 0) return n ? sqrt(num / (double)n) : 0;
    return sqrt(num / den);
}

double tol_of(DType path) { return path == DT_BF16 ? TOL_BF16 : TOL_F32; }

/* GPU tensor against a host reference */
void check_h(const char *what, const Tensor *g, const float *ref, double tol) {
    float *a = download_f32(g);
    bool nan;
    double e = rel_err_f32(a, ref, g->numel, &nan);
    record(!nan && e <= tol, "%-58s rel err %.2e (tol %.0e)%s", what, e, tol, nan ? " NaN/inf in the GPU output" : "");
    free(a);
}

void check(const char *what, const Pair *p, double tol) { check_h(what, &p->g, (const float *)p->c.data, tol); }

Grad grad_new(DType gdt, int ndim, const int64_t *shape) {
    Grad gr = {.p = pair_out(gdt, ndim, shape), .g0 = NULL};
    return gr;
}

void grad_arm(Grad *gr) {
    const float *inc = gr->p.c.data;
    double ss = 0;
    for (int64_t i = 0; i < gr->p.c.numel; i++) ss += (double)inc[i] * inc[i];
    double rms = gr->p.c.numel ? sqrt(ss / (double)gr->p.c.numel) : 0;
    if (rms == 0) rms = 1;
    gr->g0 = randn(gr->p.g.numel, 0, 0.25 * rms); /* small enough that rounding g0 + inc to BF16 stays
                                                      well inside the tolerance even for one element */
    for (int64_t i = 0; i < gr->p.g.numel; i++) gr->g0[i] = round_to(gr->p.g.dtype, gr->g0[i]);
    upload_f32(&gr->p.g, gr->g0);
}

void grad_check(const char *what, Grad *gr, double tol) {
    float *a = download_f32(&gr->p.g);
    for (int64_t i = 0; i < gr->p.g.numel; i++) a[i] -= gr->g0[i];
    bool nan;
    double e = rel_err_f32(a, (const float *)gr->p.c.data, gr->p.g.numel, &nan);
    record(!nan && e <= tol, "%-58s rel err %.2e (tol %.0e)%s", what, e, tol, nan ? " NaN/inf in the GPU output" : "");
    free(a);
}

void grad_free(Grad *gr) {
    pair_free(&gr->p);
    free(gr->g0);
}

const char *dn(DType dt) { return dtype_name(dt); }

/* ---------- elementwise ---------- */
