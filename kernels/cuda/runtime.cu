/* Device set-up, memory and the shared helpers of the CUDA backend (see common.cuh). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

namespace msacuda {

static bool g_ready = false;
static bool g_sync_each_launch = false;
static int g_sm_count = 0, g_smem_optin = 0;
static int *g_err = nullptr;
static void *g_scratch = nullptr;
static size_t g_scratch_bytes = 0;

void fail(const char *call, const char *code, const char *msg, const char *file, int line) {
    fatal("CUDA call %s failed at %s:%d: %s (%s)", call, file, line, code, msg);
}

void init() {
    if (g_ready) return;
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0)
        fatal("no CUDA device found (cudaGetDeviceCount: %s); run with train.device = \"cpu\" on this machine",
              err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&g_sm_count, cudaDevAttrMultiProcessorCount, dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&g_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    CUDA_CHECK(cudaMalloc((void **)&g_err, ERR_WORDS * sizeof(int)));
    CUDA_CHECK(cudaMemset(g_err, 0, ERR_WORDS * sizeof(int)));
    const char *s = getenv("MSA_CUDA_SYNC");
    g_sync_each_launch = s && s[0] && strcmp(s, "0") != 0;
    g_ready = true;
}

void after_launch(const char *kernel, const char *file, int line) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) fatal("CUDA kernel %s failed to launch at %s:%d: %s (%s)", kernel, file, line, cudaGetErrorName(err), cudaGetErrorString(err));
    if (g_sync_each_launch) {
        err = cudaDeviceSynchronize();
        if (err != cudaSuccess) fatal("CUDA kernel %s (launched at %s:%d) failed: %s (%s)", kernel, file, line, cudaGetErrorName(err), cudaGetErrorString(err));
        check_device_errors();
    }
}

void *scratch(size_t bytes) {
    if (bytes > g_scratch_bytes) {
        size_t want = bytes + bytes / 4 + 256;
        if (g_scratch) CUDA_CHECK(cudaFree(g_scratch)); /* synchronises: nothing still reads the old one */
        g_scratch = nullptr;
        CUDA_CHECK(cudaMalloc(&g_scratch, want));
        g_scratch_bytes = want;
    }
    return g_scratch;
}

int *errbuf() { return g_err; }

void check_device_errors() {
    int h[ERR_WORDS];
    CUDA_CHECK(cudaMemcpy(h, g_err, sizeof h, cudaMemcpyDeviceToHost));
    if (h[0] == ERR_NONE) return;
    CUDA_CHECK(cudaMemset(g_err, 0, sizeof h));
    switch (h[0]) {
    case ERR_TOKEN: fatal("embedding: token %d at position %d outside the vocabulary", h[2], h[1]);
    case ERR_TARGET: fatal("cross_entropy: target %d at row %d outside the vocabulary", h[2], h[1]);
    case ERR_CU_SEQLENS:
        fatal("attention: bad cu_seqlens (entry %d = %d): it must start at 0, never decrease and end at N", h[1], h[2]);
    case ERR_MSA_TOPK: /* msa_plan: [1] group, [2] query, [3] first id, [4] kind, [5] slot, [6] id, [7] unused */
        if (h[4] == 0)
            fatal("cuda msa_plan: topk[%d, %d] = {%d, ...}: slot %d holds block %d; ids must be ascending visible blocks",
                  h[1], h[2], h[3], h[5], h[6]);
        if (h[4] == 1) fatal("cuda msa_plan: topk[%d, %d] selects no block", h[1], h[2]);
        fatal("cuda msa_plan: topk[%d, %d] slot %d holds %d after the padding began (-1 expected)", h[1], h[2], h[5], h[6]);
    default: fatal("cuda backend: device error code %d (%d, %d)", h[0], h[1], h[2]);
    }
}

int sm_count() { return g_sm_count; }
int max_smem_optin() { return g_smem_optin; }

const char *dt_name(DType dt) { return dtype_name(dt); }

}  // namespace msacuda

using namespace msacuda;

extern "C" void *cuda_alloc(size_t bytes) {
    init();
    void *p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        fatal("cudaMalloc of %zu bytes failed: %s (%zu of %zu MiB free)", bytes, cudaGetErrorString(err),
              free_b >> 20, total_b >> 20);
    }
    return p;
}

extern "C" void *cuda_host_alloc(size_t bytes) {
    init();
    void *p = nullptr;
    cudaError_t err = cudaMallocHost(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) fatal("cudaMallocHost of %zu bytes (page-locked host memory) failed: %s", bytes, cudaGetErrorString(err));
    return p;
}

extern "C" void cuda_host_free(void *p) {
    if (!p) return;
    init();
    CUDA_CHECK(cudaFreeHost(p));
}

extern "C" void cuda_free(void *p) {
    if (!p) return;
    init();
    CUDA_CHECK(cudaFree(p));
}

extern "C" void cuda_copy_to_host(void *dst, const void *src, size_t bytes) {
    init();
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    check_device_errors();
}

extern "C" void cuda_copy_from_host(void *dst, const void *src, size_t bytes) {
    init();
    if (bytes) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

extern "C" void cuda_copy(void *dst, const void *src, size_t bytes) {
    init();
    if (bytes && dst != src) CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}

extern "C" void cuda_synchronize(void) {
    init();
    CUDA_CHECK(cudaDeviceSynchronize());
}

extern "C" void cuda_zero(void *dst, size_t bytes) {
    init();
    if (bytes) CUDA_CHECK(cudaMemset(dst, 0, bytes));
}
