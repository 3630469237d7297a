/* The dropout mask, shared by the CPU and CUDA kernels so both drop exactly the same elements.
 *
 * Counter-based: element i of a dropout call with seed s is kept iff dropout_bits(s, offset + i) >=
 * dropout_threshold(p), where offset places the tensor inside the global batch (so data-parallel ranks
 * draw the mask a single process would) and the caller derives s from (run seed, step, micro-batch,
 * layer, site). No state: activation recomputation and the backward regenerate the mask from
 * (s, offset) instead of storing it. The bits are splitmix64's finaliser of the counter, whose output
 * passes BigCrush for sequential inputs; the top 32 bits decide. */
#ifndef MSA_DROPOUT_MASK_H
#define MSA_DROPOUT_MASK_H

#include <stdint.h>

#ifdef __CUDACC__
#define MSA_HOST_DEVICE __host__ __device__
#else
#define MSA_HOST_DEVICE
#endif

static inline MSA_HOST_DEVICE uint32_t dropout_bits(uint64_t seed, int64_t i) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

/* elements whose bits fall below this are dropped: P(drop) = p to within 2^-32 (0 <= p < 1) */
static inline MSA_HOST_DEVICE uint32_t dropout_threshold(float p) { return (uint32_t)((double)p * 4294967296.0); }

/* A dropout kernel reads its seed from the backend's memory (kernels.def dropout_forward), so that a
 * training step captured in a CUDA graph reads each step's: an i32 [2] tensor of its low and high 32
 * bits (the dtypes have no 64-bit integer). */
static inline MSA_HOST_DEVICE uint64_t dropout_seed_of_words(const int32_t *w) {
    return (uint64_t)(uint32_t)w[0] | (uint64_t)(uint32_t)w[1] << 32;
}
static inline void dropout_seed_words(uint64_t seed, int32_t w[2]) {
    w[0] = (int32_t)(uint32_t)seed;
    w[1] = (int32_t)(uint32_t)(seed >> 32);
}

/* a seed for one dropout site from its coordinates (mixing each in through the same finaliser) */
static inline uint64_t dropout_seed(uint64_t run_seed, uint64_t step, uint64_t layer, uint64_t site) {
    uint64_t s = run_seed;
    s = ((uint64_t)dropout_bits(s, (int64_t)step) << 32) | dropout_bits(s ^ 0x5bd1e995u, (int64_t)step);
    s = ((uint64_t)dropout_bits(s, (int64_t)layer) << 32) | dropout_bits(s ^ 0x5bd1e995u, (int64_t)layer);
    s = ((uint64_t)dropout_bits(s, (int64_t)site) << 32) | dropout_bits(s ^ 0x5bd1e995u, (int64_t)site);
    return s;
}

#endif
