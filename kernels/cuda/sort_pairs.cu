/* The stable pair sort of primitives.cuh (CUB's radix sort over the bits the largest key needs). */
#include <cub/device/device_radix_sort.cuh>

#include "primitives.cuh"

namespace msacuda {

/* bits that keys 0 .. max_key need (at least one) */
static int key_bits(uint32_t max_key) { return max_key ? 32 - __builtin_clz(max_key) : 1; }

size_t sort_pairs_temp_bytes(int64_t n, uint32_t max_key) {
    size_t bytes = 0;
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const uint32_t *)nullptr, (uint32_t *)nullptr,
                                               (const int32_t *)nullptr, (int32_t *)nullptr, (int)n, 0, key_bits(max_key)));
    return bytes;
}

void sort_pairs(void *temp, size_t temp_bytes, const uint32_t *keys_in, uint32_t *keys_out, const int32_t *vals_in,
                int32_t *vals_out, int64_t n, uint32_t max_key) {
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out, (int)n, 0,
                                               key_bits(max_key), stream()));
}

}  // namespace msacuda
