/* The GPU tests' harness (tests/gpu/gpu_check.h): the same values on the CPU and the GPU, poisoned
 * outputs, relative-error checks that count into the TestCtx. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_cases.h"

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

/* ---------- attention cases ---------- */

AttnCase attn_inputs(DType act, int64_t N, int64_t Hq, int64_t Hkv, int64_t D) {
    AttnCase a;
    memset(&a, 0, sizeof a);
    a.q = pair_rand(act, 3, (int64_t[]){N, Hq, D}, 0, 1);
    a.k = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1);
    a.v = pair_rand(act, 3, (int64_t[]){N, Hkv, D}, 0, 1);
    a.out = pair_out(act, 3, (int64_t[]){N, Hq, D});
    a.lse = pair_out(DT_F32, 2, (int64_t[]){Hq, N});
    return a;
}

void attn_backward_inputs(AttnCase *a, DType act) {
    const int64_t N = a->q.c.shape[0], Hq = a->q.c.shape[1], D = a->q.c.shape[2], Hkv = a->k.c.shape[1];
    a->o2 = pair_from(act, 3, (int64_t[]){N, Hq, D}, (const float *)a->out.c.data);
    a->l2 = pair_from(DT_F32, 2, (int64_t[]){Hq, N}, (const float *)a->lse.c.data);
    a->dout = pair_rand(act, 3, (int64_t[]){N, Hq, D}, 0, 1);
    a->dq = grad_new(act, 3, (int64_t[]){N, Hq, D});
    a->dk = grad_new(act, 3, (int64_t[]){N, Hkv, D});
    a->dv = grad_new(act, 3, (int64_t[]){N, Hkv, D});
}

void attn_check_forward(const AttnCase *a, const char *label, const char *desc, double tol) {
    char name[320];
    snprintf(name, sizeof name, "%s fwd out %s", label, desc);
    check(name, &a->out, tol);
    snprintf(name, sizeof name, "%s fwd lse %s", label, desc);
    check(name, &a->lse, tol);
}

void attn_arm_grads(AttnCase *a) {
    grad_arm(&a->dq);
    grad_arm(&a->dk);
    grad_arm(&a->dv);
}

void attn_check_grads(AttnCase *a, int grads, const char *label, const char *desc, double tol) {
    Grad *gs[3] = {&a->dq, &a->dk, &a->dv};
    const char *gn[3] = {"dq", "dk", "dv"};
    char name[320];
    for (int i = 0; i < 3; i++) {
        if (!(grads & (1 << i))) continue;
        snprintf(name, sizeof name, "%s bwd %s %s%s", label, gn[i], desc, grads == 7 ? "" : " (others NULL)");
        grad_check(name, gs[i], tol);
    }
}

void attn_free(AttnCase *a) {
    grad_free(&a->dq);
    grad_free(&a->dk);
    grad_free(&a->dv);
    Pair *ps[] = {&a->dout, &a->o2, &a->l2, &a->out, &a->lse, &a->q, &a->k, &a->v};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) pair_free(ps[i]);
}

/* ---------- the case list ---------- */

void gpu_case_add(const char *group, GpuCaseFn run, const void *args, size_t bytes) {
    GpuCheck *g = &gpu_check;
    if (g->ncases == g->cap) {
        g->cap = g->cap ? 2 * g->cap : 256;
        g->cases = xrealloc(g->cases, (size_t)g->cap * sizeof *g->cases);
    }
    void *copy = NULL;
    if (args) {
        copy = xmalloc(bytes);
        memcpy(copy, args, bytes);
    }
    g->cases[g->ncases++] = (GpuCase){.group = group, .run = run, .args = copy};
}

const GpuCase *gpu_case_list(int *n) {
    *n = gpu_check.ncases;
    return gpu_check.cases;
}

void gpu_case_list_free(void) {
    for (int i = 0; i < gpu_check.ncases; i++) free(gpu_check.cases[i].args);
    free(gpu_check.cases);
    gpu_check.cases = NULL;
    gpu_check.ncases = gpu_check.cap = 0;
}

/* ---------- --bench helpers ---------- */

void gpu_sync(void) {
    static Tensor s;
    if (!s.data) s = mk(GB, DT_F32, 1, (int64_t[]){1});
    float x;
    GB->copy_to_host(&x, s.data, 4);
}

Tensor dev_rand(DType dt, int ndim, const int64_t *shape, double std) {
    Tensor t = mk(GB, dt, ndim, shape);
    float *v = randn(t.numel, 0, std);
    upload_f32(&t, v);
    free(v);
    return t;
}

double msa_bench_selection(Tensor *topk, Tensor *cu, Tensor *plan, int64_t Hkv, int64_t N, int B, int K) {
    const int64_t nt = Hkv * N * K;
    int32_t *tk = xmalloc((size_t)nt * sizeof(int32_t));
    double pairs = 0;
    for (int64_t g = 0; g < Hkv; g++)
        for (int64_t t = 0; t < N; t++) {
            int32_t *row = tk + (g * N + t) * K;
            const int local = (int)(t / B);
            int n = 0;
            if (local + 1 <= K) {
                for (int b = 0; b <= local; b++) row[n++] = b;
            } else {
                row[n++] = local;
                while (n < K) {
                    const int b = (int)(rng_uniform(&gpu_check.rng) * local);
                    bool dup = false;
                    for (int i = 1; i < n; i++) dup |= row[i] == b;
                    if (!dup) row[n++] = b;
                }
                for (int i = 1; i < n; i++)
                    for (int j = i; j > 0 && row[j - 1] > row[j]; j--) {
                        const int32_t x = row[j];
                        row[j] = row[j - 1];
                        row[j - 1] = x;
                    }
            }
            for (int i = 0; i < n; i++) {
                const int64_t lo = (int64_t)row[i] * B, hi = lo + B < t + 1 ? lo + B : t + 1;
                pairs += (double)(hi - lo);
            }
            for (int i = n; i < K; i++) row[i] = -1;
        }
    *topk = mk(GB, DT_I32, 3, (int64_t[]){Hkv, N, K});
    *cu = mk(GB, DT_I32, 1, (int64_t[]){2});
    GB->copy_from_host(topk->data, tk, (size_t)nt * sizeof(int32_t));
    GB->copy_from_host(cu->data, (int32_t[]){0, (int32_t)N}, 8);
    free(tk);
    *plan = mk(GB, DT_I32, 2, (int64_t[]){Hkv, msa_plan_width(N, K)});
    return pairs / (double)Hkv;
}
