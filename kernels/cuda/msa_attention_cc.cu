/* The CUDA-core tile kernels of the CUDA MSA attention (F32, and BF16 with head dims other than 64
 * and 128; the schedule, the reductions and the entry points are in msa_attention.cu, which describes
 * the design): the same schedule with 32-row tiles and 32-key (16 for D > 128) segments, fp32 math in
 * shared memory as attention.cu (lane = key for scores, lanes over the head dim for P V), one tile at a
 * time; exact to fp32 rounding, for the fp32 checks. */
#include <math.h>

#include "msa_attention.cuh"

using namespace msacuda;

namespace {

constexpr unsigned FULL = 0xffffffffu;

constexpr int CC_THREADS = 128, CC_WARPS = 4, CC_M = 32, CC_QPW = 8;


/* the tile's row meta from global memory (thread p < CC_M) */
__device__ __forceinline__ int4 cc_meta(const TileArgs &a, const TileDesc &d, int p) {
    int4 mt = make_int4(-1, 0, 0, -1);
    if (p < (d.rows & TILE_ROWS)) {
        const int pi = d.off0 + p, lq = pi / a.G, hh = pi - lq * a.G;
        mt = msa_row_meta(a, a.ent[d.ebase + lq], (d.gr / a.Rb) * a.G + hh, d.ks);
    }
    return mt;
}

/* rows of x [*, H, D] selected by meta (or keys klo.. < khi of head g when meta is NULL) into
 * smem rows of `pitch` floats, times mul; invalid rows and dims past D are zero */
template <typename T>
__device__ __forceinline__ void cc_load(float *dst, int pitch, int nrows, const T *x, const int4 *meta, int klo, int khi,
                                        int g, int H, int D, float mul) {
    for (int idx = threadIdx.x; idx < nrows * pitch; idx += blockDim.x) {
        const int r = idx / pitch, dd = idx - r * pitch;
        int64_t row = -1;
        if (meta) {
            if (meta[r].x >= 0) row = (int64_t)meta[r].x * H + meta[r].y;
        } else if (klo + r < khi) {
            row = (int64_t)(klo + r) * H + g;
        }
        dst[idx] = (row >= 0 && dd < D) ? to_f32(x[row * D + dd]) * mul : 0.0f;
    }
}

template <typename T, typename PT, int DPL>
__global__ void __launch_bounds__(CC_THREADS) msa_fwd_cc_kernel(TileArgs a, int D) {
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP, KB = 32;
    extern __shared__ float4 smem4[];
    float *Qs = (float *)smem4; /* [CC_M][LP], scaled */
    float *Ks = Qs + CC_M * LP; /* [KB][RP] */
    float *Vs = Ks + KB * RP;   /* [KB][LP] */
    int4 *meta = (int4 *)(Vs + KB * LP);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    int64_t cur = -1;
    for (int i = tb; i < te; i++) {
        const TileDesc d = a.desc[i];
        const int g = d.gr / a.Rb;
        __syncthreads();
        if (threadIdx.x < CC_M) meta[threadIdx.x] = cc_meta(a, d, threadIdx.x);
        __syncthreads();
        cc_load(Qs, LP, CC_M, (const T *)a.q, meta, 0, 0, 0, a.Hq, D, a.scale);
        const int64_t seg = (int64_t)d.gr * a.nks + d.ks;
        if (seg != cur) {
            cc_load(Ks, RP, KB, (const T *)a.k, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
            cc_load(Vs, LP, KB, (const T *)a.v, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
            cur = seg;
        }
        __syncthreads();
        int4 mt[CC_QPW];
        bool any = false;
#pragma unroll
        for (int r = 0; r < CC_QPW; r++) {
            mt[r] = meta[warp * CC_QPW + r];
            any |= mt[r].x >= 0;
        }
        if (!any) continue; /* warp-uniform: meta is shared */
        float s[CC_QPW];
#pragma unroll
        for (int r = 0; r < CC_QPW; r++) s[r] = 0.0f;
        const float4 *kr = (const float4 *)(Ks + lane * RP);
        for (int d4 = 0; d4 < D4; d4++) {
            const float4 kk = kr[d4];
#pragma unroll
            for (int r = 0; r < CC_QPW; r++) s[r] += dot4(((const float4 *)(Qs + (warp * CC_QPW + r) * LP))[d4], kk);
        }
        const int key = d.klo + lane, nk = d.khi - d.klo;
#pragma unroll
        for (int r = 0; r < CC_QPW; r++) {
            if (mt[r].x < 0) continue;
            const bool vis = key < d.khi && key <= mt[r].w;
            const float mx = warp_max(vis ? s[r] : -INFINITY);
            const float p = vis ? expf(s[r] - mx) : 0.0f;
            const float l = warp_sum(p);
            float o[DPL];
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) o[jj] = 0.0f;
            for (int kk = 0; kk < nk; kk++) {
                const float pk = __shfl_sync(FULL, p, kk);
                const float *vr = Vs + kk * LP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) o[jj] += pk * vr[32 * jj];
            }
            const int64_t base = ((int64_t)(mt[r].x - a.c0) * a.Hq + mt[r].y) * a.NS + mt[r].z;
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            PT *orow = (PT *)a.opart + base * D;
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) {
                const int dd = lane + 32 * jj;
                if (dd < D) orow[dd] = from_f32<PT>(o[jj] * inv);
            }
            if (lane == 0) a.lpart[base] = l > 0.0f ? mx + logf(l) : -INFINITY;
        }
    }
}

template <int DPL, int KPW>
__device__ __forceinline__ void cc_flush(float (&ak)[KPW][DPL], float (&av)[KPW][DPL], const TileDesc &d, bool started,
                                         bool ended, const TileArgs &a, int D) {
    constexpr int KB = CC_WARPS * KPW;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = d.gr / a.Rb;
    const bool whole = started && ended;
    float *cutp = a.cut + (((int64_t)blockIdx.x * 2 + (started ? 1 : 0)) * 2) * KB * D;
#pragma unroll
    for (int i = 0; i < KPW; i++) {
        const int kr = warp * KPW + i, key = d.klo + kr;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) {
            const int dd = lane + 32 * jj;
            if (key < d.khi && dd < D) {
                if (whole) {
                    const int64_t o = ((int64_t)key * a.Hkv + g) * D + dd;
                    if (a.acck) a.acck[o] += ak[i][jj];
                    if (a.accv) a.accv[o] += av[i][jj];
                } else {
                    cutp[(int64_t)kr * D + dd] = ak[i][jj];
                    cutp[(int64_t)(KB + kr) * D + dd] = av[i][jj];
                }
            }
            ak[i][jj] = av[i][jj] = 0.0f;
        }
    }
}

/* Backward tile: lanes over the 32 packed rows for P and dS of the warp's KPW keys, then over the
 * head dim for dK, dV (registers, whole segment) and, after a barrier, dQ_partial = dS K per row. */
template <typename T, int DPL, int KPW>
__global__ void __launch_bounds__(CC_THREADS) msa_bwd_cc_kernel(TileArgs a, int D) {
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP, KB = CC_WARPS * KPW, SP = KB + 1;
    extern __shared__ float4 smem4[];
    float *Ks = (float *)smem4;  /* [KB][LP] */
    float *Vs = Ks + KB * LP;    /* [KB][LP] */
    float *Qs = Vs + KB * LP;    /* [CC_M][RP] */
    float *Os = Qs + CC_M * RP;  /* [CC_M][RP] dout */
    float *dSs = Os + CC_M * RP; /* [CC_M][SP] */
    float *Ls = dSs + CC_M * SP, *Ds = Ls + CC_M;
    int4 *meta = (int4 *)(Ds + CC_M);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    int tb, te;
    cta_range(a.tile_off[a.n_gr], blockIdx.x, gridDim.x, tb, te);
    if (tb >= te) return;
    const bool want_kv = a.acck || a.accv;
    float ak[KPW][DPL], av[KPW][DPL];
#pragma unroll
    for (int i = 0; i < KPW; i++)
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) ak[i][jj] = av[i][jj] = 0.0f;
    TileDesc cd = a.desc[tb];
    bool started = (cd.rows & TILE_FIRST) != 0;
    for (int i = tb; i < te; i++) {
        const TileDesc d = a.desc[i];
        const int g = d.gr / a.Rb;
        const bool fresh = i == tb || d.gr != cd.gr || d.ks != cd.ks;
        if (fresh && i != tb) {
            if (want_kv) cc_flush<DPL, KPW>(ak, av, cd, started, (cd.rows & TILE_LAST) != 0, a, D);
            started = (d.rows & TILE_FIRST) != 0;
        }
        cd = d;
        __syncthreads();
        if (threadIdx.x < CC_M) {
            const int4 mt = cc_meta(a, d, threadIdx.x);
            meta[threadIdx.x] = mt;
            const int64_t o = (int64_t)mt.y * a.Nq + mt.x;
            Ls[threadIdx.x] = mt.x >= 0 ? a.lse[o] : 0.0f;
            Ds[threadIdx.x] = mt.x >= 0 ? a.dsum[o] : 0.0f;
        }
        __syncthreads();
        cc_load(Qs, RP, CC_M, (const T *)a.q, meta, 0, 0, 0, a.Hq, D, 1.0f);
        cc_load(Os, RP, CC_M, (const T *)a.dout, meta, 0, 0, 0, a.Hq, D, 1.0f);
        if (fresh) {
            cc_load(Ks, LP, KB, (const T *)a.k, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
            cc_load(Vs, LP, KB, (const T *)a.v, nullptr, d.klo, d.khi, g, a.Hkv, D, 1.0f);
        }
        __syncthreads();
        const int t = meta[lane].w;
        const float lt = Ls[lane], dt = Ds[lane];
        float s[KPW], dp[KPW];
#pragma unroll
        for (int k = 0; k < KPW; k++) s[k] = dp[k] = 0.0f;
        const float4 *qr = (const float4 *)(Qs + lane * RP), *orr = (const float4 *)(Os + lane * RP);
        for (int d4 = 0; d4 < D4; d4++) {
            const float4 qq = qr[d4], oo = orr[d4];
#pragma unroll
            for (int k = 0; k < KPW; k++) {
                s[k] += dot4(qq, ((const float4 *)(Ks + (warp * KPW + k) * LP))[d4]);
                dp[k] += dot4(oo, ((const float4 *)(Vs + (warp * KPW + k) * LP))[d4]);
            }
        }
#pragma unroll
        for (int k = 0; k < KPW; k++) {
            const int key = d.klo + warp * KPW + k;
            const bool vis = t >= 0 && key < d.khi && key <= t;
            const float P = vis ? expf(a.scale * s[k] - lt) : 0.0f;
            const float dS = P * (dp[k] - dt);
            dSs[lane * SP + warp * KPW + k] = dS;
            if (!want_kv || !__any_sync(FULL, vis)) continue;
            for (int kk = 0; kk < CC_M; kk++) {
                const float pk = __shfl_sync(FULL, P, kk), gk = __shfl_sync(FULL, dS, kk);
                const float *orow = Os + kk * RP + lane, *qrow = Qs + kk * RP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) {
                    av[k][jj] += pk * orow[32 * jj];
                    ak[k][jj] += gk * qrow[32 * jj];
                }
            }
        }
        if (!a.dqp) continue;
        __syncthreads();
        const int nk = d.khi - d.klo;
        for (int r = warp * CC_QPW; r < (warp + 1) * CC_QPW; r++) {
            const int4 mt = meta[r];
            if (mt.x < 0) continue;
            float acc[DPL];
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) acc[jj] = 0.0f;
            for (int kk = 0; kk < nk; kk++) {
                const float gk = dSs[r * SP + kk];
                const float *krow = Ks + kk * LP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) acc[jj] += gk * krow[32 * jj];
            }
            float *dst = (float *)a.dqp + (((int64_t)(mt.x - a.c0) * a.Hq + mt.y) * a.NS + mt.z) * D;
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) {
                const int dd = lane + 32 * jj;
                if (dd < D) dst[dd] = acc[jj];
            }
        }
    }
    if (want_kv) cc_flush<DPL, KPW>(ak, av, cd, started, (cd.rows & TILE_LAST) != 0, a, D);
}

template <typename T> Geo forward_geo(int D) {
    Geo g;
    const int dpl = dpl_of(D), LP = 32 * dpl, RP = LP + 4;
    g.M = CC_M;
    g.KB = 32;
    g.threads = CC_THREADS;
    g.smem = (size_t)(CC_M * LP + 32 * RP + 32 * LP) * sizeof(float) + CC_M * sizeof(int4);
    const char *name = "msa_attention_forward";
    switch (dpl) {
    case 1: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 1>>(name, CC_THREADS, g.smem); break;
    case 2: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 2>>(name, CC_THREADS, g.smem); break;
    case 4: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 4>>(name, CC_THREADS, g.smem); break;
    default: g.grid = persistent_grid<msa_fwd_cc_kernel<T, float, 8>>(name, CC_THREADS, g.smem); break;
    }
    return g;
}

template <typename T> void forward_tiles(const Geo &g, const TileArgs &a, int D) {
    switch (dpl_of(D)) {
    case 1: msa_fwd_cc_kernel<T, float, 1><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    case 2: msa_fwd_cc_kernel<T, float, 2><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    case 4: msa_fwd_cc_kernel<T, float, 4><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    default: msa_fwd_cc_kernel<T, float, 8><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    }
    LAUNCH_CHECK("msa_attention_forward tiles");
}

template <typename T> Geo backward_geo(int D) {
    Geo g;
    const int dpl = dpl_of(D), LP = 32 * dpl, RP = LP + 4, KPW = dpl <= 4 ? 8 : 4;
    g.M = CC_M;
    g.KB = CC_WARPS * KPW;
    g.threads = CC_THREADS;
    g.smem = (size_t)(2 * g.KB * LP + 2 * CC_M * RP + CC_M * (g.KB + 1) + 2 * CC_M) * sizeof(float) + CC_M * sizeof(int4);
    const char *name = "msa_attention_backward";
    switch (dpl) {
    case 1: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 1, 8>>(name, CC_THREADS, g.smem); break;
    case 2: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 2, 8>>(name, CC_THREADS, g.smem); break;
    case 4: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 4, 8>>(name, CC_THREADS, g.smem); break;
    default: g.grid = persistent_grid<msa_bwd_cc_kernel<T, 8, 4>>(name, CC_THREADS, g.smem); break;
    }
    return g;
}

template <typename T> void backward_tiles(const Geo &g, const TileArgs &a, int D) {
    switch (dpl_of(D)) {
    case 1: msa_bwd_cc_kernel<T, 1, 8><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    case 2: msa_bwd_cc_kernel<T, 2, 8><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    case 4: msa_bwd_cc_kernel<T, 4, 8><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    default: msa_bwd_cc_kernel<T, 8, 4><<<g.grid, g.threads, g.smem, stream()>>>(a, D); break;
    }
    LAUNCH_CHECK("msa_attention_backward tiles");
}

}  // namespace

namespace msacuda {

Geo msa_cc_forward_geo(DType dt, int D) {
    Geo g;
    DISPATCH_FLOAT(dt, T, "msa_attention_forward", g = forward_geo<T>(D));
    return g;
}
void msa_cc_forward_tiles(const Geo &g, const TileArgs &a, DType dt, int D) {
    DISPATCH_FLOAT(dt, T, "msa_attention_forward", forward_tiles<T>(g, a, D));
}
Geo msa_cc_backward_geo(DType dt, int D) {
    Geo g;
    DISPATCH_FLOAT(dt, T, "msa_attention_backward", g = backward_geo<T>(D));
    return g;
}
void msa_cc_backward_tiles(const Geo &g, const TileArgs &a, DType dt, int D) {
    DISPATCH_FLOAT(dt, T, "msa_attention_backward", backward_tiles<T>(g, a, D));
}

}  // namespace msacuda
