/* Elementwise kernels and reductions of the CUDA backend: axpy, scale, add, sumsq, cast (any float
 * dtypes, mixed allowed, fp64 arithmetic), SwiGLU and bias add (fp32 arithmetic), and AdamW on the
 * F32 master weights (fp64 arithmetic like the CPU reference, and the BF16 shadow written in the same
 * pass), with the optimizer's multi-tensor forms of sumsq and AdamW (a list of tensors in one launch).
 * Grid-stride loops; reductions are two-pass and deterministic (fixed grid, fixed order). */
#include <math.h>

#include "../grad_clip.h"
#include "primitives.cuh"

using namespace msacuda;

static void need_same_numel(const char *what, const Tensor *a, const Tensor *b) {
    if (a->numel != b->numel)
        fatal("cuda %s: %lld vs %lld elements", what, (long long)a->numel, (long long)b->numel);
}

/* ---- axpy, scale, add, cast ---- */

template <typename Ty, typename Tx> __global__ void axpy_kernel(Ty *y, const Tx *x, int64_t n, double alpha) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        /* as the CPU: the product rounded to y's precision first, then the sum */
        if (sizeof(Ty) == 8 || sizeof(Tx) == 8) y[i] = from_f64<Ty>(to_f64(y[i]) + alpha * to_f64(x[i]));
        else y[i] = from_f32<Ty>(to_f32(y[i]) + (float)(alpha * to_f64(x[i])));
    }
}

extern "C" void cuda_axpy(Tensor *y, const Tensor *x, float alpha) {
    init();
    need_same_numel("axpy", y, x);
    if (y->numel == 0) return;
    DISPATCH_FLOAT64(y->dtype, Ty, "axpy", DISPATCH_FLOAT64(x->dtype, Tx, "axpy", {
        axpy_kernel<Ty, Tx><<<grid_for(y->numel, 256), 256, 0, stream()>>>((Ty *)y->data, (const Tx *)x->data, y->numel, (double)alpha);
        LAUNCH_CHECK("axpy");
    }));
}

template <typename T> __global__ void scale_kernel(T *y, int64_t n, double alpha) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = from_f64<T>(alpha * to_f64(y[i]));
}

extern "C" void cuda_scale(Tensor *y, float alpha) {
    init();
    if (y->numel == 0) return;
    DISPATCH_FLOAT64(y->dtype, T, "scale", {
        scale_kernel<T><<<grid_for(y->numel, 256), 256, 0, stream()>>>((T *)y->data, y->numel, (double)alpha);
        LAUNCH_CHECK("scale");
    });
}

template <typename To, typename Ta, typename Tb> __global__ void add_kernel(To *out, const Ta *a, const Tb *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = from_f64<To>(to_f64(a[i]) + to_f64(b[i]));
}

extern "C" void cuda_add(Tensor *out, const Tensor *a, const Tensor *b) {
    init();
    need_same_numel("add", out, a);
    need_same_numel("add", out, b);
    if (out->numel == 0) return;
    DISPATCH_FLOAT64(out->dtype, To, "add", DISPATCH_FLOAT64(a->dtype, Ta, "add", DISPATCH_FLOAT64(b->dtype, Tb, "add", {
        add_kernel<To, Ta, Tb><<<grid_for(out->numel, 256), 256, 0, stream()>>>((To *)out->data, (const Ta *)a->data,
                                                                   (const Tb *)b->data, out->numel);
        LAUNCH_CHECK("add");
    })));
}

template <typename Td, typename Ts> __global__ void cast_kernel(Td *dst, const Ts *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = from_f64<Td>(to_f64(src[i]));
}

extern "C" void cuda_cast(Tensor *dst, const Tensor *src) {
    init();
    need_same_numel("cast", dst, src);
    if (dst->numel == 0) return;
    if (dst->dtype == src->dtype) {
        if (dst->data != src->data) CUDA_CHECK(cudaMemcpyAsync(dst->data, src->data, tensor_bytes(src), cudaMemcpyDeviceToDevice, stream()));
        return;
    }
    DISPATCH_FLOAT64(dst->dtype, Td, "cast", DISPATCH_FLOAT64(src->dtype, Ts, "cast", {
        cast_kernel<Td, Ts><<<grid_for(dst->numel, 256), 256, 0, stream()>>>((Td *)dst->data, (const Ts *)src->data, dst->numel);
        LAUNCH_CHECK("cast");
    }));
}

/* ---- sumsq: per-block fp64 partial sums, then one block sums them in order ---- */

template <typename T> __global__ void sumsq_partial_kernel(double *partial, const T *x, int64_t n) {
    __shared__ double sh[32];
    double s = 0.0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        double v = to_f64(x[i]);
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/* *out = (or += with add) the sum of the partials */
__global__ void sum_partials_kernel(double *out, const double *partial, int n, bool add) {
    __shared__ double sh[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *out = add ? *out + s : s;
}

extern "C" double cuda_sumsq(const Tensor *x) {
    init();
    if (x->numel == 0) return 0.0;
    const int blocks = grid_for(x->numel, 256);
    double *buf = (double *)scratch((size_t)(blocks + 1) * sizeof(double));
    DISPATCH_FLOAT64(x->dtype, T, "sumsq", {
        sumsq_partial_kernel<T><<<blocks, 256, 0, stream()>>>(buf + 1, (const T *)x->data, x->numel);
        LAUNCH_CHECK("sumsq_partial");
    });
    sum_partials_kernel<<<1, 1024, 0, stream()>>>(buf, buf + 1, blocks, false);
    LAUNCH_CHECK("sum_partials");
    double r = 0.0;
    copy_to_host_at(&r, buf, sizeof r, "sumsq");
    check_device_errors();
    return r;
}

/* ---- SwiGLU: out = silu(gate) * up, fp32 arithmetic ----
 * V elements a thread per step (16-byte accesses when n and every pointer allow, primitives.cuh vec_width; V = 1
 * otherwise): bandwidth-bound, and 2-byte BF16 accesses ran it at about half the device's rate (the ~1.1B dense
 * step's SwiGLU 30 ms of 289, docs/benchmarks.md). The arithmetic per element is the same for every V. */

__device__ __forceinline__ float silu_sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T, int V> __global__ void swiglu_fwd_kernel(T *out, const T *gate, const T *up, int64_t n) {
    for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V; i < n; i += (int64_t)gridDim.x * blockDim.x * V) {
        float g[V], u[V], o[V];
        load_f32<T, V>(gate + i, g);
        load_f32<T, V>(up + i, u);
#pragma unroll
        for (int e = 0; e < V; e++) o[e] = g[e] * silu_sigmoid(g[e]) * u[e];
        store_f32<T, V>(out + i, o);
    }
}

template <typename T, int V>
__global__ void swiglu_bwd_kernel(T *dgate, T *dup, const T *dout, const T *gate, const T *up, int64_t n) {
    for (int64_t i = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * V; i < n; i += (int64_t)gridDim.x * blockDim.x * V) {
        float g[V], u[V], d[V], sig[V];
        load_f32<T, V>(gate + i, g);
        load_f32<T, V>(up + i, u);
        load_f32<T, V>(dout + i, d);
#pragma unroll
        for (int e = 0; e < V; e++) sig[e] = silu_sigmoid(g[e]);
        if (dgate) {
            float x[V];
            load_f32<T, V>(dgate + i, x);
#pragma unroll
            for (int e = 0; e < V; e++) x[e] = x[e] + d[e] * u[e] * sig[e] * (1.0f + g[e] * (1.0f - sig[e]));
            store_f32<T, V>(dgate + i, x);
        }
        if (dup) {
            float x[V];
            load_f32<T, V>(dup + i, x);
#pragma unroll
            for (int e = 0; e < V; e++) x[e] = x[e] + d[e] * g[e] * sig[e];
            store_f32<T, V>(dup + i, x);
        }
    }
}

static void need_dtype(const char *what, const Tensor *t, DType dt) {
    if (t && t->dtype != dt)
        fatal("cuda %s: mixed activation dtypes %s and %s", what, dtype_name(dt), dtype_name(t->dtype));
}

extern "C" void cuda_swiglu_forward(Tensor *out, const Tensor *gate, const Tensor *up) {
    init();
    need_same_numel("swiglu_forward", gate, up);
    need_same_numel("swiglu_forward", gate, out);
    need_dtype("swiglu_forward", up, gate->dtype);
    need_dtype("swiglu_forward", out, gate->dtype);
    if (gate->numel == 0) return;
    DISPATCH_FLOAT(gate->dtype, T, "swiglu_forward", {
        const int64_t n = gate->numel;
        if (vec_width<T>(n, {out->data, gate->data, up->data}) > 1) {
            constexpr int V = 16 / sizeof(T);
            swiglu_fwd_kernel<T, V><<<grid_for(n / V, 256), 256, 0, stream()>>>((T *)out->data, (const T *)gate->data,
                                                                               (const T *)up->data, n);
        } else {
            swiglu_fwd_kernel<T, 1><<<grid_for(n, 256), 256, 0, stream()>>>((T *)out->data, (const T *)gate->data,
                                                                            (const T *)up->data, n);
        }
        LAUNCH_CHECK("swiglu_forward");
    });
}

extern "C" void cuda_swiglu_backward(Tensor *dgate, Tensor *dup, const Tensor *dout, const Tensor *gate, const Tensor *up) {
    init();
    if (!dgate && !dup) return;
    need_same_numel("swiglu_backward", gate, up);
    need_same_numel("swiglu_backward", gate, dout);
    if (dgate) need_same_numel("swiglu_backward", gate, dgate);
    if (dup) need_same_numel("swiglu_backward", gate, dup);
    need_dtype("swiglu_backward", up, gate->dtype);
    need_dtype("swiglu_backward", dout, gate->dtype);
    need_dtype("swiglu_backward", dgate, gate->dtype);
    need_dtype("swiglu_backward", dup, gate->dtype);
    if (gate->numel == 0) return;
    DISPATCH_FLOAT(gate->dtype, T, "swiglu_backward", {
        const int64_t n = gate->numel;
        T *dg = dgate ? (T *)dgate->data : nullptr, *du = dup ? (T *)dup->data : nullptr;
        if (vec_width<T>(n, {dg, du, dout->data, gate->data, up->data}) > 1) {
            constexpr int V = 16 / sizeof(T);
            swiglu_bwd_kernel<T, V><<<grid_for(n / V, 256), 256, 0, stream()>>>(dg, du, (const T *)dout->data,
                                                                               (const T *)gate->data, (const T *)up->data, n);
        } else {
            swiglu_bwd_kernel<T, 1><<<grid_for(n, 256), 256, 0, stream()>>>(dg, du, (const T *)dout->data,
                                                                            (const T *)gate->data, (const T *)up->data, n);
        }
        LAUNCH_CHECK("swiglu_backward");
    });
}

/* ---- bias add: y[r, c] = x[r, c] + b[c]; db[c] += sum_r dy[r, c] (two deterministic passes) ---- */

template <typename Tx, typename Tb>
__global__ void bias_add_fwd_kernel(Tx *y, const Tx *x, const Tb *b, int64_t n, int64_t cols) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = from_f32<Tx>(to_f32(x[i]) + to_f32(b[i % cols]));
}

/* column sums over row chunks: partial[chunk, c] = sum of dy[r, c] for the chunk's rows, in row order */
template <typename T>
__global__ void colsum_partial_kernel(float *partial, const T *dy, int64_t rows, int64_t cols, int64_t rows_per_chunk) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float s = 0.0f;
    for (int64_t r = r0; r < r1; r++) s += to_f32(dy[r * cols + c]);
    partial[blockIdx.y * cols + c] = s;
}

template <typename Tb> __global__ void colsum_finish_kernel(Tb *db, const float *partial, int64_t cols, int chunks) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(int64_t)k * cols + c];
    db[c] = from_f32<Tb>(to_f32(db[c]) + s);
}

extern "C" void cuda_bias_add_forward(Tensor *y, const Tensor *x, const Tensor *b) {
    init();
    const int64_t cols = tensor_dim(x, -1);
    if (b->numel != cols || y->numel != x->numel)
        fatal("cuda bias_add: bias of %lld for rows of %lld", (long long)b->numel, (long long)cols);
    need_dtype("bias_add_forward", y, x->dtype);
    if (x->numel == 0) return;
    DISPATCH_FLOAT(x->dtype, Tx, "bias_add_forward", DISPATCH_FLOAT(b->dtype, Tb, "bias_add_forward", {
        bias_add_fwd_kernel<Tx, Tb><<<grid_for(x->numel, 256), 256, 0, stream()>>>((Tx *)y->data, (const Tx *)x->data,
                                                                      (const Tb *)b->data, x->numel, cols);
        LAUNCH_CHECK("bias_add_forward");
    }));
}

extern "C" void cuda_bias_add_backward(Tensor *db, const Tensor *dy) {
    init();
    if (!db) return;
    const int64_t cols = tensor_dim(dy, -1), rows = tensor_rows(dy);
    if (db->numel != cols)
        fatal("cuda bias_add backward: bias of %lld for rows of %lld", (long long)db->numel, (long long)cols);
    if (rows == 0 || cols == 0) return;
    const int64_t rows_per_chunk = rows > 64 * 4096 ? (rows + 4095) / 4096 : 64; /* at most 4096 chunks */
    const int chunks = (int)((rows + rows_per_chunk - 1) / rows_per_chunk);
    float *partial = (float *)scratch((size_t)chunks * (size_t)cols * sizeof(float));
    const dim3 grid((unsigned)((cols + 127) / 128), (unsigned)chunks);
    DISPATCH_FLOAT(dy->dtype, T, "bias_add_backward", {
        colsum_partial_kernel<T><<<grid, 128, 0, stream()>>>(partial, (const T *)dy->data, rows, cols, rows_per_chunk);
        LAUNCH_CHECK("bias_add_backward partial");
    });
    DISPATCH_FLOAT(db->dtype, Tb, "bias_add_backward", {
        colsum_finish_kernel<Tb><<<(unsigned)((cols + 127) / 128), 128, 0, stream()>>>((Tb *)db->data, partial, cols, chunks);
        LAUNCH_CHECK("bias_add_backward finish");
    });
}

/* ---- AdamW on F32 master weights (fp64 arithmetic as the CPU reference) ---- */

struct AdamwRates {
    double b1, b2, c1, c2, eps; /* betas, bias corrections 1 - beta^t, epsilon */
};

static AdamwRates adamw_rates(float beta1, float beta2, float eps, int t) {
    return {beta1, beta2, adamw_bias_correction(beta1, t), adamw_bias_correction(beta2, t), eps};
}

__device__ __forceinline__ void adamw_element(float *p, float g, float *m, float *v, bf16 *shadow, int64_t i,
                                              const AdamwRates &r, double lr, double wd) {
    const double gi = g;
    const double mi = r.b1 * m[i] + (1.0 - r.b1) * gi;
    const double vi = r.b2 * v[i] + (1.0 - r.b2) * gi * gi;
    m[i] = (float)mi;
    v[i] = (float)vi;
    const double pi = p[i];
    const float pn = (float)(pi - lr * ((mi / r.c1) / (sqrt(vi / r.c2) + r.eps) + wd * pi));
    p[i] = pn;
    if (shadow) shadow[i] = __float2bfloat16_rn(pn);
}

__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, bf16 *shadow, int64_t n, double lr,
                             AdamwRates r, double wd) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        adamw_element(p, g[i], m, v, shadow, i, r, lr, wd);
}

extern "C" void cuda_adamw_update(Tensor *param, const Tensor *grad, Tensor *m, Tensor *v, float lr, float beta1,
                                  float beta2, float eps, float weight_decay, int t) {
    init();
    const Tensor *all[4] = {param, grad, m, v};
    for (int i = 0; i < 4; i++) {
        if (all[i]->dtype != DT_F32)
            fatal("cuda adamw_update: parameters, gradients and moments must be f32 (got %s)", dtype_name(all[i]->dtype));
        need_same_numel("adamw_update", param, all[i]);
    }
    if (param->numel == 0) return;
    adamw_kernel<<<grid_for(param->numel, 256), 256, 0, stream()>>>((float *)param->data, (const float *)grad->data, (float *)m->data,
                                                       (float *)v->data, (bf16 *)param->shadow, param->numel, lr,
                                                       adamw_rates(beta1, beta2, eps, t), weight_decay);
    LAUNCH_CHECK("adamw");
}

/* ---- the optimizer's multi-tensor forms: the tensor list travels as a kernel parameter (no copy, no
 * synchronisation), up to MANY_TENSORS a launch; block b of a launch takes the MANY_CHUNK elements
 * (b - first_block[s]) * MANY_CHUNK ... of its tensor s ---- */

#define MANY_TENSORS 32
#define MANY_THREADS 256
#define MANY_CHUNK (MANY_THREADS * 16)

struct ManyBlocks {
    int64_t numel[MANY_TENSORS];
    int first_block[MANY_TENSORS + 1]; /* first_block[count]: the launch's blocks */
    int count;
};

/* Append a tensor of numel elements (the caller launches and restarts a full list first). */
static void many_add(ManyBlocks &l, int64_t numel) {
    if (l.count == 0) l.first_block[0] = 0;
    l.numel[l.count] = numel;
    l.first_block[l.count + 1] = l.first_block[l.count] + (int)((numel + MANY_CHUNK - 1) / MANY_CHUNK);
    l.count++;
}

/* This block's tensor and its element range [*begin, *end) (an empty tensor has no block). */
__device__ __forceinline__ int many_part(const ManyBlocks &l, int64_t *begin, int64_t *end) {
    const int s = upper_bound(l.first_block + 1, l.count, (int)blockIdx.x);
    *begin = (int64_t)(blockIdx.x - l.first_block[s]) * MANY_CHUNK;
    *end = min(*begin + MANY_CHUNK, l.numel[s]);
    return s;
}

struct AdamwList {
    ManyBlocks blocks;
    float *p[MANY_TENSORS], *g[MANY_TENSORS], *m[MANY_TENSORS], *v[MANY_TENSORS];
    bf16 *shadow[MANY_TENSORS];
    float lr_scale[MANY_TENSORS], wd[MANY_TENSORS];
};

/* The step's numbers come from the device (schedule, backend.h ADAMW_*): a captured launch reads each
 * replay's own. r's bias corrections are unused here. */
__global__ void __launch_bounds__(MANY_THREADS) adamw_many_kernel(const __grid_constant__ AdamwList l,
                                                                 const float *scale, const double *schedule,
                                                                 AdamwRates r) {
    int64_t begin, end;
    const int s = many_part(l.blocks, &begin, &end);
    const float grad_scale = scale ? *scale : 1.0f;
    const float lr = __fmul_rn((float)schedule[ADAMW_LR], l.lr_scale[s]); /* the host's float product */
    r.c1 = schedule[ADAMW_BIAS1];
    r.c2 = schedule[ADAMW_BIAS2];
    float *g = l.g[s];
    for (int64_t i = begin + threadIdx.x; i < end; i += MANY_THREADS) {
        float gi = g[i];
        if (grad_scale != 1.0f) g[i] = gi = (float)((double)grad_scale * gi); /* as cuda_scale */
        adamw_element(l.p[s], gi, l.m[s], l.v[s], l.shadow[s], i, r, lr, l.wd[s]);
    }
}

static void adamw_many_launch(const AdamwList &l, const float *grad_scale, const double *schedule, const AdamwRates &r) {
    if (l.blocks.count == 0 || l.blocks.first_block[l.blocks.count] == 0) return;
    adamw_many_kernel<<<l.blocks.first_block[l.blocks.count], MANY_THREADS, 0, stream()>>>(l, grad_scale, schedule, r);
    LAUNCH_CHECK("adamw_many");
}

extern "C" void cuda_adamw_update_many(AdamwPart *parts, int n, const Tensor *scale, const Tensor *schedule,
                                       float beta1, float beta2, float eps) {
    init();
    if (scale && (scale->dtype != DT_F32 || scale->numel != 1))
        fatal("cuda adamw_update_many: the gradient scale must be an f32 scalar");
    if (schedule->dtype != DT_F64 || schedule->numel != ADAMW_SCHEDULE)
        fatal("cuda adamw_update_many: the schedule must be f64 [%d] (backend.h ADAMW_SCHEDULE)", ADAMW_SCHEDULE);
    const float *grad_scale = scale ? (const float *)scale->data : nullptr;
    const double *sched = (const double *)schedule->data;
    const AdamwRates r = {beta1, beta2, 0.0, 0.0, eps};
    AdamwList l{};
    for (int i = 0; i < n; i++) {
        AdamwPart *q = &parts[i];
        const Tensor *all[4] = {&q->param, &q->grad, &q->m, &q->v};
        for (int k = 0; k < 4; k++) {
            if (all[k]->dtype != DT_F32)
                fatal("cuda adamw_update_many: parameters, gradients and moments must be f32 (got %s)",
                      dtype_name(all[k]->dtype));
            need_same_numel("adamw_update_many", &q->param, all[k]);
        }
        if (l.blocks.count == MANY_TENSORS) {
            adamw_many_launch(l, grad_scale, sched, r);
            l.blocks.count = 0;
        }
        const int s = l.blocks.count;
        many_add(l.blocks, q->param.numel);
        l.p[s] = (float *)q->param.data, l.g[s] = (float *)q->grad.data;
        l.m[s] = (float *)q->m.data, l.v[s] = (float *)q->v.data;
        l.shadow[s] = (bf16 *)q->param.shadow;
        l.lr_scale[s] = q->lr_scale, l.wd[s] = q->weight_decay;
    }
    adamw_many_launch(l, grad_scale, sched, r);
}

/* sumsq_many: one fp64 partial sum per block over all launches, then sum_partials_kernel in order */
struct SumsqList {
    ManyBlocks blocks;
    const void *x[MANY_TENSORS];
};

template <typename T> __global__ void __launch_bounds__(MANY_THREADS) sumsq_many_kernel(double *partial,
                                                                                       const __grid_constant__ SumsqList l) {
    __shared__ double sh[32];
    int64_t begin, end;
    const T *x = (const T *)l.x[many_part(l.blocks, &begin, &end)];
    double s = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += MANY_THREADS) {
        const double v = to_f64(x[i]);
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

static void sumsq_many_launch(const SumsqList &l, DType dt, double *partial) {
    const int blocks = l.blocks.count ? l.blocks.first_block[l.blocks.count] : 0;
    if (blocks == 0) return;
    DISPATCH_FLOAT64(dt, T, "sumsq_many", {
        sumsq_many_kernel<T><<<blocks, MANY_THREADS, 0, stream()>>>(partial, l);
        LAUNCH_CHECK("sumsq_many");
    });
}

extern "C" void cuda_sumsq_many(Tensor *sum, const Tensor *const *xs, int n) {
    init();
    if (sum->dtype != DT_F64 || sum->numel != 1) fatal("cuda sumsq_many: the sum must be an f64 scalar");
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        if (xs[i]->dtype != xs[0]->dtype)
            fatal("cuda sumsq_many: tensors of one dtype (%s and %s)", dtype_name(xs[0]->dtype), dtype_name(xs[i]->dtype));
        total += (xs[i]->numel + MANY_CHUNK - 1) / MANY_CHUNK;
    }
    if (total == 0) return;
    if (total > INT32_MAX) fatal("cuda sumsq_many: %lld blocks of %d elements are too many", (long long)total, MANY_CHUNK);
    double *buf = (double *)scratch((size_t)(total + 1) * sizeof(double)), *partial = buf + 1;
    SumsqList l{};
    for (int i = 0; i < n; i++) {
        if (l.blocks.count == MANY_TENSORS) {
            sumsq_many_launch(l, xs[0]->dtype, partial);
            partial += l.blocks.first_block[l.blocks.count];
            l.blocks.count = 0;
        }
        l.x[l.blocks.count] = xs[i]->data;
        many_add(l.blocks, xs[i]->numel);
    }
    sumsq_many_launch(l, xs[0]->dtype, partial);
    sum_partials_kernel<<<1, 1024, 0, stream()>>>((double *)sum->data, buf + 1, (int)total, true);
    LAUNCH_CHECK("sum_partials");
}

__global__ void clip_scale_kernel(float *scale, const double *sumsq, float max_norm) {
    *scale = clip_factor(sqrt(*sumsq), max_norm);
}

extern "C" void cuda_clip_scale(Tensor *scale, const Tensor *sumsq, float max_norm) {
    init();
    if (scale->dtype != DT_F32 || scale->numel != 1 || sumsq->dtype != DT_F64 || sumsq->numel != 1)
        fatal("cuda clip_scale: the scale must be an f32 scalar and the sum of squares an f64 scalar");
    clip_scale_kernel<<<1, 1, 0, stream()>>>((float *)scale->data, (const double *)sumsq->data, max_norm);
    LAUNCH_CHECK("clip_scale");
}
