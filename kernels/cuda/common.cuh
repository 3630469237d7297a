/* Shared internals of the CUDA kernels (C++): error checking, lazy device initialisation, the per-call
 * scratch buffer, the device error word, dtype conversions and dispatch. See cuda.h for the backend's
 * execution and numerics conventions. */
#ifndef MSA_CUDA_COMMON_CUH
#define MSA_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda.h"

/* kernels/util.c (declared here rather than through util.h, whose C11 noreturn is not C++) */
extern "C" __attribute__((noreturn, format(printf, 1, 2))) void fatal(const char *fmt, ...);

typedef __nv_bfloat16 bf16;

namespace msacuda {

/* Initialise on first use: pick the current device, read its properties, allocate the error word.
 * Exits with "no CUDA device found" when the machine has none. Cheap after the first call. */
void init();
[[noreturn]] void fail(const char *call, const char *code, const char *msg, const char *file, int line);
/* After a kernel launch: check the launch (and, with MSA_CUDA_SYNC=1, its execution). */
void after_launch(const char *kernel, const char *file, int line);

/* A device buffer of at least `bytes`, valid until the next scratch() call. Every user takes one
 * region per backend call and carves it; kernels on the single stream run in order, so reuse across
 * calls is safe. */
void *scratch(size_t bytes);

/* The device error word, int[4]: [0] an error code (first one wins), [1], [2] details. Kernels that
 * find bad input (a token outside the vocabulary, ...) record it instead of trapping; the host reads it
 * at its synchronisation points (check_device_errors: copies to the host, sumsq, cross-entropy). */
enum { ERR_NONE = 0, ERR_TOKEN = 1, ERR_TARGET = 2, ERR_CU_SEQLENS = 3 };
int *errbuf();
void check_device_errors();

int sm_count();
int max_smem_optin(); /* bytes of dynamic shared memory a block may opt in to */

/* Blocks for a grid-stride loop over n items. */
static inline int grid_for(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads, cap = (int64_t)sm_count() * 16;
    if (b > cap) b = cap;
    return b < 1 ? 1 : (int)b;
}

const char *dt_name(DType dt);

/* n rounded up to a multiple of 256 bytes: the alignment of the regions a call carves out of one
 * device buffer (its scratch() region, or a kernel's private workspace). */
static inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace msacuda

#define CUDA_CHECK(call)                                                                              \
    do {                                                                                              \
        cudaError_t err_ = (call);                                                                    \
        if (err_ != cudaSuccess)                                                                      \
            msacuda::fail(#call, cudaGetErrorName(err_), cudaGetErrorString(err_), __FILE__, __LINE__); \
    } while (0)

#define LAUNCH_CHECK(kernel) msacuda::after_launch(kernel, __FILE__, __LINE__)

/* Run the statements with T bound to the C++ type of float dtype dt (F32 or BF16; F64 too with
 * DISPATCH_FLOAT64). Nesting is fine. */
#define DISPATCH_FLOAT(dt, T, what, ...)                                                               \
    switch (dt) {                                                                                     \
    case DT_F32: {                                                                                    \
        typedef float T;                                                                              \
        __VA_ARGS__;                                                                                  \
    } break;                                                                                          \
    case DT_BF16: {                                                                                   \
        typedef bf16 T;                                                                               \
        __VA_ARGS__;                                                                                  \
    } break;                                                                                          \
    default: fatal("cuda %s: dtype %s not supported (f32 or bf16)", what, msacuda::dt_name(dt));     \
    }

#define DISPATCH_FLOAT64(dt, T, what, ...)                                                             \
    switch (dt) {                                                                                     \
    case DT_F32: {                                                                                    \
        typedef float T;                                                                              \
        __VA_ARGS__;                                                                                  \
    } break;                                                                                          \
    case DT_BF16: {                                                                                   \
        typedef bf16 T;                                                                               \
        __VA_ARGS__;                                                                                  \
    } break;                                                                                          \
    case DT_F64: {                                                                                    \
        typedef double T;                                                                             \
        __VA_ARGS__;                                                                                  \
    } break;                                                                                          \
    default: fatal("cuda %s: dtype %s not supported (f32, bf16 or f64)", what, msacuda::dt_name(dt)); \
    }

/* ---- device-side conversions ---- */
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(double x) { return (float)x; }
__device__ __forceinline__ double to_f64(float x) { return (double)x; }
__device__ __forceinline__ double to_f64(bf16 x) { return (double)__bfloat162float(x); }
__device__ __forceinline__ double to_f64(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ double from_f32<double>(float x) { return (double)x; }

template <typename T> __device__ __forceinline__ T from_f64(double x);
template <> __device__ __forceinline__ float from_f64<float>(double x) { return (float)x; }
template <> __device__ __forceinline__ bf16 from_f64<bf16>(double x) { return __double2bfloat16(x); }
template <> __device__ __forceinline__ double from_f64<double>(double x) { return x; }

/* record the first bad-input error (see errbuf) */
__device__ __forceinline__ void report_error(int *err, int code, int a, int b) {
    if (atomicCAS(err, 0, code) == 0) {
        err[1] = a;
        err[2] = b;
    }
}

/* ---- search ---- */

/* The first index in the ascending a[0 .. n) with a[i] >= x (n when there is none). The index type I
 * is the caller's (int for i32 lists, int64_t for long key arrays): the midpoints are computed in it. */
template <typename K, typename I> __device__ __forceinline__ I lower_bound(const K *a, I n, K x) {
    I lo = 0, hi = n;
    while (lo < hi) {
        const I mid = (lo + hi) >> 1;
        if (a[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* ---- warp and block reductions ---- */
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
 * `sh` needs 32 elements; the block must not use `sh` again before a __syncthreads(). */
template <typename A> __device__ __forceinline__ A block_sum(A v, A *sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    A r = lane < nw ? sh[lane] : (A)0;
    return warp_sum(r);
}

#endif
