/* Device primitives shared by the CUDA kernels (C++): dtype conversions, searches, warp and block
 * reductions, the PTX wrappers of the tensor-core kernels (cp.async, ldmatrix, mma.sync bf16) with their
 * fragment helpers, the lanes-over-the-head-dim layout of the CUDA-core attention kernels, and the
 * stable pair sort the MoE and MSA plans are built with. One home for each, so that a fix or a faster
 * version reaches every kernel (common.cuh keeps the runtime: errors, initialisation, scratch, dispatch). */
#ifndef MSA_CUDA_PRIMITIVES_CUH
#define MSA_CUDA_PRIMITIVES_CUH

#include <initializer_list>

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

/* ---- vector access ---- */

/* V elements of T as one aligned access (16 bytes at V = 16 / sizeof(T)): the bandwidth-bound kernels' loads
 * and stores; 2-byte accesses of BF16 elements ran them at a third of the device's rate */
template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
    T v[V];
};
template <typename T, int V> __device__ __forceinline__ Vec<T, V> load_vec(const T *p) { return *(const Vec<T, V> *)p; }
template <typename T, int V> __device__ __forceinline__ void store_vec(T *p, const Vec<T, V> &x) { *(Vec<T, V> *)p = x; }
/* the same, converted to and from fp32 */
template <typename T, int V> __device__ __forceinline__ void load_f32(const T *p, float (&out)[V]) {
    const Vec<T, V> x = load_vec<T, V>(p);
#pragma unroll
    for (int i = 0; i < V; i++) out[i] = to_f32(x.v[i]);
}
template <typename T, int V> __device__ __forceinline__ void store_f32(T *p, const float (&in)[V]) {
    Vec<T, V> x;
#pragma unroll
    for (int i = 0; i < V; i++) x.v[i] = from_f32<T>(in[i]);
    store_vec<T, V>(p, x);
}
/* the vector width (host) for rows of C elements of type T at these addresses: 16 bytes when every row starts
 * aligned, else 1 */
template <typename T> inline int vec_width(int64_t C, std::initializer_list<const void *> ptrs) {
    constexpr int V = 16 / sizeof(T);
    uintptr_t bits = (uintptr_t)((size_t)C * sizeof(T));
    for (const void *p : ptrs) bits |= (uintptr_t)p;
    return bits % 16 == 0 ? V : 1;
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
/* over each aligned group of W lanes (W a power of two, at most 32; every lane of a group gets its group's
 * result): the combines give a (query, head) row a group of lanes, not a warp */
template <int W, typename X> __device__ __forceinline__ X lanes_sum(X v) {
    for (int o = W / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <int W> __device__ __forceinline__ float lanes_max(float v) {
    for (int o = W / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <int W> __device__ __forceinline__ int lanes_min(int v) {
    for (int o = W / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) { return lanes_sum<32>(v); }
__device__ __forceinline__ double warp_sum(double v) { return lanes_sum<32>(v); }
__device__ __forceinline__ float warp_max(float v) { return lanes_max<32>(v); }
__device__ __forceinline__ int warp_min(int v) { return lanes_min<32>(v); }

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
/* wait until at most N committed groups are still in flight (the newest N: a double buffer's next load); N = 0
 * is cp_async_wait_committed */
template <int N> __device__ __forceinline__ void cp_async_wait_pending() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
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
/* stmatrix .trans: four 8x8 b16 matrices stored transposed. Register i of a thread holds its pair of matrix i in the
 * mma fragment layout (row gid = lane / 4, columns 2 tig, 2 tig + 1, tig = lane % 4); lane 8i + r gives the shared
 * address of row r of the stored matrix i, i.e. of fragment column r (16 bytes, 16-byte aligned) */
__device__ __forceinline__ void stsm_x4_t(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3)
                 : "memory");
}
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
/* 2^x on the special-function unit alone (ex2.approx.ftz: one instruction, where exp2f adds the scaling that
 * keeps results below 2^-126 as denormals; a probability that small is 0 in BF16 and in any sum of them) */
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
/* log2 x on the special-function unit alone (lg2.approx.ftz: one instruction, relative error ~2^-22; log2f's
 * exact rounding costs a range reduction and a polynomial, ~15 instructions): for values only summed into
 * a logged statistic (the KL), where a denormal argument counts as 0 */
__device__ __forceinline__ float log2_ftz(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
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

/* The warp's index in its block, broadcast from lane 0, so that the compiler knows it is the same in every
 * lane (threadIdx.x >> 5 it cannot prove uniform; CUTLASS's canonical_warp_idx_sync does the same). Measured
 * in the backward tile (tenth session), it moves the static SASS by under 2% either way: the descriptors'
 * cost was their per-step construction (gmma_desc_add), not this */
__device__ __forceinline__ int warp_idx_uniform() { return __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 5), 0); }

/* ---- tensor cores, Hopper: warpgroup MMA (wgmma) with shared-memory descriptors ----
 *
 * A warpgroup (4 warps, 128 threads) computes D[64 x N] (+)= A[64 x 16] B[16 x N], fp32 accumulators,
 * asynchronously: issue between wgmma_fence() and wgmma_commit(), then wgmma_wait<n>() before the
 * accumulators (or registers holding A) are touched again. Accumulators: warp w of the group holds rows
 * 16w .. 16w+15 in the m16n8 C layout of every 8-column block (d[j][e]: columns 8j + 2 tig + (e & 1),
 * row gid + 8 (e >> 1)); A from registers has the m16n8k16 A layout of mma.sync, so acc_to_a_frag turns
 * two accumulator blocks into one k16 step of A.
 *
 * Shared-memory operands use the 128-byte swizzle: a tile of R rows x 64 bf16 ("panel") stores row r at
 * r * 128 bytes with 16-byte chunk c at (c ^ (r & 7)) * 16; wider rows are consecutive panels (gmma_off).
 * Tile bases must be 1024-byte aligned (the swizzle follows address bits). A K-major operand (the 16 k of
 * a step contiguous in a row: A = [m][k], B = [n][k]) takes a descriptor at row 0 / k-step offset 32 bytes
 * per step with SBO = 1024 (8 rows); an MN-major B ([k][n] rows, transposed by the instruction) takes LBO
 * = the panel stride (64 n apart) and SBO = 1024 (8 k apart), its start advancing 16 rows per k step. */

/* byte offset of 16-byte chunk c of row r in a swizzled tile of `rows` rows (chunks of 8 bf16) */
__host__ __device__ __forceinline__ uint32_t gmma_off(int r, int c, int rows) {
    return (uint32_t)((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}
/* descriptor of a 128B-swizzled shared-memory operand starting at shared address addr */
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return (uint64_t)((addr & 0x3ffff) >> 4) | ((uint64_t)((lbo_bytes >> 4) & 0x3fff) << 16) |
           ((uint64_t)((sbo_bytes >> 4) & 0x3fff) << 32) | (1ull << 62);
}
/* gmma_desc(addr + bytes, ...) from gmma_desc(addr, ...): the start address (addr >> 4) is the low 14 bits of the
 * low word, and shared addresses stay below 256 KB, so a k step's descriptor is one 32-bit add of a constant
 * to its tile's (computed once per tile instead of masked, shifted and combined per step) */
__device__ __forceinline__ uint64_t gmma_desc_add(uint64_t desc, uint32_t bytes) {
    const uint32_t lo = (uint32_t)desc + (bytes >> 4), hi = (uint32_t)(desc >> 32);
    return ((uint64_t)hi << 32) | lo;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* shared-memory writes of the generic proxy (st.shared, cp.async) made visible to wgmma's reads; each
 * writing thread fences, then the block synchronises */
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/* keep the compiler from moving accumulator reads/writes across an asynchronous MMA */
template <int NB> __device__ __forceinline__ void wgmma_hold(float (&d)[NB][4]) {
#pragma unroll
    for (int j = 0; j < NB; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[j][e])::"memory");
}
/* D (+)= A B, m64nNk16, A and B from shared memory (TA / TB: A / B MN-major, transposed by the
 * instruction), or A from registers (the mma.sync A fragment of the warp's 16 rows); zero_d: D = A B */
template <int TA, int TB> __device__ __forceinline__ void wgmma_ss_n8(float (&d)[1][4], uint64_t da, uint64_t db, bool zero_d) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %6, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, %7, %8;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
                 : "l"(da), "l"(db), "r"((uint32_t)zero_d), "n"(TA), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_ss_n32(float (&d)[4][4], uint64_t da, uint64_t db, bool zero_d) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
                 : "l"(da), "l"(db), "r"((uint32_t)zero_d), "n"(TA), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db, bool zero_d) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "l"(da), "l"(db), "r"((uint32_t)zero_d), "n"(TA), "n"(TB));
}
template <int TB> __device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db, bool zero_d) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"((uint32_t)zero_d), "n"(TB));
}
template <int TA, int TB> __device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db, bool zero_d) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "l"(da), "l"(db), "r"((uint32_t)zero_d), "n"(TA), "n"(TB));
}
template <int TB> __device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db, bool zero_d) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"((uint32_t)zero_d), "n"(TB));
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
