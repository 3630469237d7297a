/* Device primitives shared by the CUDA kernels (C++): dtype conversions, searches, warp and block
 * reductions, the PTX wrappers of the tensor-core kernels (cp.async, ldmatrix, mma.sync bf16) with their
 * fragment helpers, the lanes-over-the-head-dim layout of the CUDA-core attention kernels, and the
 * stable pair sort the MoE and MSA plans are built with. One home for each, so that a fix or a faster
 * version reaches every kernel (common.cuh keeps the runtime: errors, initialisation, scratch, dispatch). */
#ifndef MSA_CUDA_PRIMITIVES_CUH
#define MSA_CUDA_PRIMITIVES_CUH

#include "common.cuh"
#include "limits.h"

/* ---- dtype conversions ---- */
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

/* The first index in the non-decreasing a[0 .. n) with a[i] > x (n when there is none). */
template <typename K, typename I> __device__ __forceinline__ I upper_bound(const K *a, I n, K x) {
    I lo = 0, hi = n;
    while (lo < hi) {
        const I mid = (lo + hi) >> 1;
        if (a[mid] <= x) lo = mid + 1;
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
__device__ __forceinline__ int warp_min(int v) {
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
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

/* ---- async copies global -> shared (sm_80+) ---- */

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
/* 16 bytes to shared address dst (smem_u32); zero-fill when !valid (src must still be a mapped address,
 * nothing is read from it) */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
/* close the group of the copies issued so far */
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/* wait for every committed group (copies issued after the last commit are not waited for) */
__device__ __forceinline__ void cp_async_wait_committed() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
/* wait for every copy issued so far, committed or not */
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/* ---- tensor cores: ldmatrix and mma.sync m16n8k16 bf16 (fp32 accumulators) ---- */

/* four 8x8 b16 matrices from shared memory (addr = smem_u32 of this lane's row), one register each */
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
/* the same, each matrix transposed */
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
/* c += a (16x16, row) * b (16x8, col), bf16 in, fp32 accumulate */
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
/* two floats as a bf16 pair in one register, lo in the low half (the fragments' element order) */
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* .x (low half) = lo */
    return *reinterpret_cast<uint32_t *>(&v);
}
/* The fp32 accumulators of two adjacent n8 tiles (the m16n8 C layout, lo = columns 0-7, hi = 8-15) as
 * the bf16 A fragment of one m16n8k16 step over those 16 columns: the C layout of two n-tiles is the
 * A layout of a k16 step. */
__device__ __forceinline__ void acc_to_a_frag(uint32_t (&f)[4], const float (&lo)[4], const float (&hi)[4]) {
    f[0] = pack_bf16(lo[0], lo[1]);
    f[1] = pack_bf16(lo[2], lo[3]);
    f[2] = pack_bf16(hi[0], hi[1]);
    f[3] = pack_bf16(hi[2], hi[3]);
}
/* Max and sum over the quad of lanes (lane ^ 1, lane ^ 2) that holds one row of an m16n8 C fragment */
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/* ---- CUDA cores: fp32 attention tiles with the lanes over the head dim (attention.cu and the
 * CUDA-core MSA attention) ---- */

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

/* head-dim elements per lane (DPL) for head dim D <= CUDA_HEAD_DIM_MAX: the kernels' template argument */
static inline int dpl_of(int D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8; }
static_assert(CUDA_HEAD_DIM_MAX <= 8 * 32, "dpl_of: 8 elements a lane of a warp hold the largest head dim");

/* Shared-memory row pitches (floats): LP for rows read along the head dim by the lanes (covers every
 * lane's dims), RP = LP + 4 for rows read whole by one lane each with float4 loads (4 mod 32: the
 * 8 lanes of each quarter-warp hit distinct banks). */
template <int DPL> struct Pitch {
    static constexpr int LP = 32 * DPL, RP = 32 * DPL + 4;
};

namespace msacuda {

/* ---- stable sort of (key, value) pairs: the MoE plan (by expert) and the MSA plan (by key block) ---- */

/* CUB's radix sort of n pairs by key, keys in [0, max_key]: stable (equal keys keep their input order,
 * so the plans equal the CPU's counting sorts) and with no atomics deciding a position (deterministic).
 * sort_pairs_temp_bytes is the workspace sort_pairs needs (sort_pairs.cu). */
size_t sort_pairs_temp_bytes(int64_t n, uint32_t max_key);
void sort_pairs(void *temp, size_t temp_bytes, const uint32_t *keys_in, uint32_t *keys_out, const int32_t *vals_in,
                int32_t *vals_out, int64_t n, uint32_t max_key);

}  // namespace msacuda

#endif
