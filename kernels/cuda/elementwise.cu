/* Elementwise kernels and reductions of the CUDA backend: axpy, scale, add, sumsq, cast (any float
 * dtypes, mixed allowed, fp64 arithmetic), SwiGLU and bias add (fp32 arithmetic), and AdamW on the
 * F32 master weights (fp64 arithmetic like the CPU reference, and the BF16 shadow written in the same
 * pass). Grid-stride loops; reductions are two-pass and deterministic (fixed grid, fixed order). */
#include <math.h>

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
        axpy_kernel<Ty, Tx><<<grid_for(y->numel, 256), 256>>>((Ty *)y->data, (const Tx *)x->data, y->numel, (double)alpha);
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
        scale_kernel<T><<<grid_for(y->numel, 256), 256>>>((T *)y->data, y->numel, (double)alpha);
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
        add_kernel<To, Ta, Tb><<<grid_for(out->numel, 256), 256>>>((To *)out->data, (const Ta *)a->data,
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
        if (dst->data != src->data) CUDA_CHECK(cudaMemcpy(dst->data, src->data, tensor_bytes(src), cudaMemcpyDeviceToDevice));
        return;
    }
    DISPATCH_FLOAT64(dst->dtype, Td, "cast", DISPATCH_FLOAT64(src->dtype, Ts, "cast", {
        cast_kernel<Td, Ts><<<grid_for(dst->numel, 256), 256>>>((Td *)dst->data, (const Ts *)src->data, dst->numel);
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

__global__ void sum_partials_kernel(double *out, const double *partial, int n) {
    __shared__ double sh[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) *out = s;
}

extern "C" double cuda_sumsq(const Tensor *x) {
    init();
    if (x->numel == 0) return 0.0;
    const int blocks = grid_for(x->numel, 256);
    double *buf = (double *)scratch((size_t)(blocks + 1) * sizeof(double));
    DISPATCH_FLOAT64(x->dtype, T, "sumsq", {
        sumsq_partial_kernel<T><<<blocks, 256>>>(buf + 1, (const T *)x->data, x->numel);
        LAUNCH_CHECK("sumsq_partial");
    });
    sum_partials_kernel<<<1, 1024>>>(buf, buf + 1, blocks);
    LAUNCH_CHECK("sum_partials");
    double r = 0.0;
    CUDA_CHECK(cudaMemcpy(&r, buf, sizeof r, cudaMemcpyDeviceToHost));
    check_device_errors();
    return r;
}

/* ---- SwiGLU: out = silu(gate) * up, fp32 arithmetic ---- */

template <typename T> __global__ void swiglu_fwd_kernel(T *out, const T *gate, const T *up, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]), sig = 1.0f / (1.0f + expf(-g));
        out[i] = from_f32<T>(g * sig * to_f32(up[i]));
    }
}

template <typename T>
__global__ void swiglu_bwd_kernel(T *dgate, T *dup, const T *dout, const T *gate, const T *up, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]), sig = 1.0f / (1.0f + expf(-g)), d = to_f32(dout[i]);
        if (dgate) dgate[i] = from_f32<T>(to_f32(dgate[i]) + d * to_f32(up[i]) * sig * (1.0f + g * (1.0f - sig)));
        if (dup) dup[i] = from_f32<T>(to_f32(dup[i]) + d * g * sig);
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
        swiglu_fwd_kernel<T><<<grid_for(gate->numel, 256), 256>>>((T *)out->data, (const T *)gate->data,
                                                                  (const T *)up->data, gate->numel);
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
        swiglu_bwd_kernel<T><<<grid_for(gate->numel, 256), 256>>>(
            dgate ? (T *)dgate->data : nullptr, dup ? (T *)dup->data : nullptr, (const T *)dout->data,
            (const T *)gate->data, (const T *)up->data, gate->numel);
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
        bias_add_fwd_kernel<Tx, Tb><<<grid_for(x->numel, 256), 256>>>((Tx *)y->data, (const Tx *)x->data,
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
        colsum_partial_kernel<T><<<grid, 128>>>(partial, (const T *)dy->data, rows, cols, rows_per_chunk);
        LAUNCH_CHECK("bias_add_backward partial");
    });
    DISPATCH_FLOAT(db->dtype, Tb, "bias_add_backward", {
        colsum_finish_kernel<Tb><<<(unsigned)((cols + 127) / 128), 128>>>((Tb *)db->data, partial, cols, chunks);
        LAUNCH_CHECK("bias_add_backward finish");
    });
}

/* ---- AdamW on F32 master weights (fp64 arithmetic as the CPU reference) ---- */

__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, bf16 *shadow, int64_t n, double lr, double b1,
                             double b2, double c1, double c2, double eps, double wd) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const double gi = g[i];
        const double mi = b1 * m[i] + (1.0 - b1) * gi;
        const double vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        m[i] = (float)mi;
        v[i] = (float)vi;
        const double pi = p[i];
        const float pn = (float)(pi - lr * ((mi / c1) / (sqrt(vi / c2) + eps) + wd * pi));
        p[i] = pn;
        if (shadow) shadow[i] = __float2bfloat16_rn(pn);
    }
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
    const double c1 = 1.0 - pow((double)beta1, t), c2 = 1.0 - pow((double)beta2, t);
    adamw_kernel<<<grid_for(param->numel, 256), 256>>>((float *)param->data, (const float *)grad->data, (float *)m->data,
                                                       (float *)v->data, (bf16 *)param->shadow, param->numel, lr, beta1,
                                                       beta2, c1, c2, eps, weight_decay);
    LAUNCH_CHECK("adamw");
}
