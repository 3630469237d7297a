/* The block transpose of the context-parallel exchanges (autograd/op_cp.c): src [a, b, inner] ->
 * dst [b, a, inner]. A pure copy, done in the widest word (16, 8, 4, 2 or 1 bytes) that divides the
 * row of inner elements and both base addresses, so a BF16 head row of 128 dims moves as 16 uint4. */
#include <stdint.h>

#include "common.cuh"

using namespace msacuda;

template <typename W>
__global__ void transpose01_kernel(W *dst, const W *src, int64_t a, int64_t b, int64_t words) {
    const int64_t n = a * b * words;
    for (int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; x < n; x += (int64_t)gridDim.x * blockDim.x) {
        const int64_t w = x % words, row = x / words, i = row / b, j = row % b;
        dst[(j * a + i) * words + w] = src[x];
    }
}

template <typename W> static void launch(void *dst, const void *src, int64_t a, int64_t b, size_t row_bytes) {
    const int64_t words = (int64_t)(row_bytes / sizeof(W));
    transpose01_kernel<W><<<grid_for(a * b * words, 256), 256, 0, stream()>>>((W *)dst, (const W *)src, a, b, words);
    LAUNCH_CHECK("transpose01");
}

extern "C" void cuda_transpose01(Tensor *dst, const Tensor *src, int64_t a, int64_t b) {
    init();
    if (a <= 0 || b <= 0 || src->numel % (a * b) != 0)
        fatal("cuda transpose01: %lld elements are not [%lld, %lld, inner]", (long long)src->numel, (long long)a,
              (long long)b);
    if (dst->numel != src->numel || dst->dtype != src->dtype)
        fatal("cuda transpose01: dst (%lld %s) differs from src (%lld %s)", (long long)dst->numel, dt_name(dst->dtype),
              (long long)src->numel, dt_name(src->dtype));
    const size_t row = (size_t)(src->numel / (a * b)) * dtype_size(src->dtype);
    if (row == 0) return;
    const uintptr_t align = (uintptr_t)dst->data | (uintptr_t)src->data | (uintptr_t)row;
    if (align % 16 == 0) launch<uint4>(dst->data, src->data, a, b, row);
    else if (align % 8 == 0) launch<uint2>(dst->data, src->data, a, b, row);
    else if (align % 4 == 0) launch<uint32_t>(dst->data, src->data, a, b, row);
    else if (align % 2 == 0) launch<uint16_t>(dst->data, src->data, a, b, row);
    else launch<uint8_t>(dst->data, src->data, a, b, row);
}
