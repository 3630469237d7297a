/* Shared runtime of the CUDA kernels (C++): error checking, lazy device initialisation, the per-call
 * scratch buffer, the device error word and dtype dispatch. See cuda.h for the backend's execution and
 * numerics conventions; the device primitives the kernels share are in primitives.cuh. */
#ifndef MSA_CUDA_COMMON_CUH
#define MSA_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <vector>
#include <stdint.h>

#include "cuda.h"

/* kernels/util.c (declared here rather than through util.h, whose C11 noreturn is not C++) */
extern "C" __attribute__((noreturn, format(printf, 1, 2))) void fatal(const char *fmt, ...);

typedef __nv_bfloat16 bf16;

namespace msacuda {

/* Initialise on first use: pick the current device, read its properties, allocate the error word.
 * Exits with "no CUDA device found" when the machine has none. Cheap after the first call. */
void init();
/* The backend's one stream: every kernel launch, copy and memset of kernels/cuda, and the cuBLASLt,
 * cuBLAS, cuDNN, CUB and CUTLASS calls, go to it, so that they run in call order and a CUDA graph
 * capture (cuda_graph_begin) can take the whole training step from it. Created by init(), blocking
 * (see runtime.cu). */
cudaStream_t stream();
/* Whether the stream is being captured into a graph: the host must not wait then (a wait fails). */
bool capturing();
[[noreturn]] void fail(const char *call, const char *code, const char *msg, const char *file, int line);
/* After a kernel launch: check the launch (and, with MSA_CUDA_SYNC=1, its execution). */
void after_launch(const char *kernel, const char *file, int line);

/* The host waits for the device at `site` (a copy to the host, a synchronisation, a free of memory a
 * kernel may still use): counted, so that tests can hold a training step to none after its first steps
 * (cuda_host_waits, cuda_last_host_wait). Call it just before the blocking call. */
void host_wait(const char *site);
/* Free device memory that kernels may still use (a wait, counted at `site`, and a release: see
 * cuda_memory_releases). NULL: nothing. During a graph capture the memory is kept until the graph is freed
 * (take_retired): no wait, still a release. */
void release(void *p, const char *site);
/* The memory released during the capture just ended, which its graph owns from then on. */
std::vector<void *> take_retired();
/* cudaFree now (no wait counted: the caller knows nothing uses it), and out of device_memory's count */
void free_device(void *p);
/* During a graph capture (graph.cu): a copy of bytes at src in page-locked memory kept with the graph, the
 * source of the captured copy. */
void *capture_host_copy(const void *src, size_t bytes);
/* A blocking copy of device memory to the host, counted at `site` (no device error check). */
void copy_to_host_at(void *dst, const void *src, size_t bytes, const char *site);

/* A device buffer of at least `bytes`, valid until the next scratch() call. Every user takes one
 * region per backend call and carves it; kernels on the single stream run in order, so reuse across
 * calls is safe. */
void *scratch(size_t bytes);

/* The device error word, int[ERR_WORDS]: [0] an error code (first one wins), [1..] details. Kernels that
 * find bad input (a token outside the vocabulary, ...) record it instead of trapping or making the host
 * wait; the host reads it where it waits anyway (check_device_errors: copies to the host, in training the
 * logged steps' loss read), so a bad input costs no round trip while the step runs. */
enum { ERR_NONE = 0, ERR_TOKEN = 1, ERR_TARGET = 2, ERR_CU_SEQLENS = 3, ERR_MSA_TOPK = 4, ERR_RING_INDEX = 5 };
/* The MoE kernels' (moe.cu, moe_grouped_gemm.cu), reported with report_error_at: [2..3] the lowest (position,
 * value) met, [1] and [4] as named (read by check_device_errors) */
enum {
    ERR_MOE_TOPK = 6,     /* position: token whose scores Top-k cannot rank; value: the pick that failed */
    ERR_MOE_PLAN = 7,     /* position: idx element; value: the expert index; [1] E, [4] k */
    ERR_MOE_COMBINE = 8,  /* position: idx element; value: the expert index */
    ERR_MOE_ROWS = 9,     /* position: rows element; value: the row */
    ERR_MOE_OFFSETS = 10, /* position: expert e; value: offsets[e+1] */
};
/* msa kernels (query_index, key_rows): [1] 1 for query_index, 0 for key_rows, [2] index, [3] value, [4] rows */
enum { ERR_MSA_ROWS = 11 };
constexpr int ERR_WORDS = 8;
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

/* record the first bad-input error (see errbuf) */
__device__ __forceinline__ void report_error(int *err, int code, int a, int b, int c = 0, int d = 0, int e = 0,
                                             int f = 0) {
    if (atomicCAS(err, 0, code) == 0) {
        err[1] = a;
        err[2] = b;
        err[3] = c;
        err[4] = d;
        err[5] = e;
        err[6] = f;
    }
}

/* Record bad input at a position (< 2^31) so that the report does not depend on which thread or block met
 * it first: the first code still wins (report_error), and among the reports of that code the lowest
 * (position, value), an atomicMax of its complement into [2..3] (0 there: none yet). [1] and [4] (a, b:
 * values of the launch, such as a shape) come from the thread that set the code, so from the first launch
 * that met bad input (when several launches of one code meet some before the host reads the word, the
 * lowest position of all is read with the first one's a and b: the MoE layers of a model share E and k). */
__device__ __forceinline__ void report_error_at(int *err, int code, int64_t pos, int value, int a = 0, int b = 0) {
    const int was = atomicCAS(err, 0, code);
    if (was != 0 && was != code) return;
    if (was == 0) {
        err[1] = a;
        err[4] = b;
    }
    atomicMax((unsigned long long *)(err + 2), ~(((unsigned long long)pos << 32) | (unsigned long long)(uint32_t)value));
}

#endif
