/* Causal GQA attention within packed documents on the GPU: our own FlashAttention-2-style kernels, and
 * the dispatch to cuDNN's fused SDPA engines (attention_cudnn.cu), which cuda_attention_forward /
 * _backward try first: BF16 with D % 16 == 0 and D <= 128 goes to cuDNN unless MSA_ATTENTION=own
 * (MSA_ATTENTION=cudnn forces it); F32, other head dims and graphs cuDNN refuses run the kernels here.
 *
 * Shapes as the CPU reference: q [N,Hq,D], k/v [N,Hkv,D], out [N,Hq,D], lse [Hq,N] F32 (natural log,
 * scale included); query t of document [s,e) sees keys s..t; query head h reads KV head h/(Hq/Hkv).
 * BF16 (or F32) data, fp32 arithmetic in registers and shared memory; head dims up to 256.
 *
 * The kernels read the visible pairs as row ranges (attention.cuh's AttnRows): query row t sees the key
 * rows key_lo[t] .. key_hi[t]-1, key row j is seen by the query rows query_lo[j] .. query_hi[j]-1, all four
 * non-decreasing. Here the rows are the tokens (key_lo = document start, key_hi = t + 1); one step of ring
 * attention (attention_ring.cu) runs the same kernels on its tokens named by index, merging the step into
 * the running (out, lse).
 *
 * Forward: a block = one head x 32 consecutive queries (4 warps x 8 queries); it walks the key tiles
 * from the first query's first key to the last query's last, 32 keys per tile staged in shared memory
 * as fp32. Scores: lane l of a warp takes key l of the tile against the warp's 8 queries (row-per-lane
 * reads padded to 4 mod 32 floats: no bank conflicts); online softmax per query (running max and sum);
 * P.V with lanes across the head dim and the probabilities broadcast by shuffles. Tiles (or queries)
 * that see none of a tile's keys are skipped, so the causal mask costs at most one tile per block.
 * Backward: no atomics, deterministic; three kernels as the CPU reference's two passes:
 *   1. Dsum[h,t] = dout_t . out_t;
 *   2. dq: the forward's layout, recomputing P = exp(scale q.k - lse) and dS = P (dout.v - Dsum);
 *   3. dk, dv: a block = one KV head x 32 (16 for D > 128) keys, walking the queries that see them
 *      for every query head of the group, lanes over queries for P and dS, then over the
 *      head dim to accumulate dv += P dout and dk += dS q in registers.
 * About 2x the arithmetic of a fused backward with atomics for dq; correctness and determinism first.
 * The scores use CUDA cores, not tensor cores: a wgmma/mma version is future work. */
#include <math.h>

#include "attention.cuh"
#include "limits.h"

using namespace msacuda;

namespace msacuda {
/* attention_cudnn.cu: true when the cuDNN path ran the call, false when our kernels must */
bool cudnn_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                             const Tensor *cu_seqlens, float scale, int N, int Hq, int Hkv, int D, int ndocs);
bool cudnn_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k,
                              const Tensor *v, const Tensor *out, const Tensor *lse, const Tensor *cu_seqlens, float scale,
                              int N, int Hq, int Hkv, int D, int ndocs);
}  // namespace msacuda

namespace {

constexpr int NWARPS = 4, THREADS = NWARPS * 32;
constexpr int QPW = 8;               /* queries per warp (forward, dq) */
constexpr int BQ = NWARPS * QPW;     /* queries per block */
constexpr int BK = 32;               /* keys per tile (= lanes) */
constexpr unsigned FULL = 0xffffffffu;

/* Copy rows [r0, r0 + nrows) of head `head` of x [N, H, D] into smem rows of `pitch` floats, times mul;
 * rows past `rlimit` and dims past D are zero. */
template <typename T>
__device__ __forceinline__ void load_rows(float *dst, int pitch, const T *x, int64_t r0, int nrows, int64_t rlimit, int H,
                                          int head, int D, float mul) {
    for (int idx = threadIdx.x; idx < nrows * pitch; idx += blockDim.x) {
        const int r = idx / pitch, d = idx - r * pitch;
        const int64_t t = r0 + r;
        dst[idx] = (t < rlimit && d < D) ? to_f32(x[(t * H + head) * D + d]) * mul : 0.0f;
    }
}

/* The visible rows of the whole micro-batch from cu_seqlens (query t of document [s, e) sees keys s..t),
 * and cu_seqlens' validation (errors go to the error word; the ranges are clamped so that the kernels stay
 * in bounds whatever cu_seqlens holds). */
__global__ void doc_rows_kernel(AttnRows r, const int *cu, int ndocs, int N, int *err) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < max(N, ndocs + 1); i += gridDim.x * blockDim.x) {
        if (i <= ndocs) {
            const bool bad = (i == 0 && cu[0] != 0) || (i == ndocs && cu[ndocs] != N) || (i > 0 && cu[i] < cu[i - 1]);
            if (bad) report_error(err, ERR_CU_SEQLENS, i, cu[i]);
        }
        if (i < N) {
            int lo = 0, hi = ndocs; /* last d in [0, ndocs) with cu[d] <= i */
            while (hi - lo > 1) {
                const int mid = (lo + hi) / 2;
                if (cu[mid] <= i) lo = mid;
                else hi = mid;
            }
            r.key_lo[i] = min(max(cu[lo], 0), i);
            r.key_hi[i] = i + 1;
            r.query_lo[i] = i;
            r.query_hi[i] = max(min(cu[lo + 1], N), i + 1);
        }
    }
}

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) attn_fwd_kernel(T *out, float *lse, const T *q, const T *k, const T *v,
                                                          AttnRows r, float scale, bool merge) {
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP;
    extern __shared__ float4 smem4[];
    float *Qs = (float *)smem4;   /* [BQ][LP], pre-multiplied by scale */
    float *Ks = Qs + BQ * LP;     /* [BK][RP] */
    float *Vs = Ks + BK * RP;     /* [BK][LP] */
    const int Nq = r.Nq, Hq = r.Hq, Hkv = r.Hkv, D = r.D;
    const int h = blockIdx.y, hk = h / (Hq / Hkv);
    const int t0 = blockIdx.x * BQ, tlast = min(t0 + BQ, Nq) - 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    load_rows(Qs, LP, q, t0, BQ, Nq, Hq, h, D, scale);

    const int wq0 = t0 + warp * QPW, wqlast = min(wq0 + QPW, Nq) - 1;
    const int wkmin = wq0 < Nq ? r.key_lo[wq0] : 0, wkend = wq0 < Nq ? r.key_hi[wqlast] : 0;
    int qs[QPW], qe[QPW];
    float m[QPW], l[QPW], o[QPW][DPL];
#pragma unroll
    for (int i = 0; i < QPW; i++) {
        qs[i] = wq0 + i < Nq ? r.key_lo[wq0 + i] : 0;
        qe[i] = wq0 + i < Nq ? r.key_hi[wq0 + i] : 0;
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) o[i][jj] = 0.0f;
    }

    const int kend = r.key_hi[tlast]; /* one past the last key any query of the block sees */
    for (int kt = r.key_lo[t0]; kt < kend; kt += BK) {
        __syncthreads();
        load_rows(Ks, RP, k, kt, BK, kend, Hkv, hk, D, 1.0f);
        load_rows(Vs, LP, v, kt, BK, kend, Hkv, hk, D, 1.0f);
        __syncthreads();
        if (wq0 >= Nq || kt >= wkend || kt + BK - 1 < wkmin) continue; /* warp-uniform */
        float s[QPW];
#pragma unroll
        for (int i = 0; i < QPW; i++) s[i] = 0.0f;
        const float4 *kr = (const float4 *)(Ks + lane * RP);
        for (int d4 = 0; d4 < D4; d4++) {
            const float4 kk = kr[d4];
#pragma unroll
            for (int i = 0; i < QPW; i++) s[i] += dot4(((const float4 *)(Qs + (warp * QPW + i) * LP))[d4], kk);
        }
        const int j = kt + lane;
#pragma unroll
        for (int i = 0; i < QPW; i++) {
            const bool vis = j >= qs[i] && j < qe[i];
            if (!__any_sync(FULL, vis)) continue;
            const float si = vis ? s[i] : -INFINITY;
            const float mnew = fmaxf(m[i], warp_max(si));
            const float p = vis ? expf(si - mnew) : 0.0f;
            const float alpha = expf(m[i] - mnew); /* 0 while m was -inf */
            l[i] = l[i] * alpha + warp_sum(p);
            m[i] = mnew;
#pragma unroll
            for (int jj = 0; jj < DPL; jj++) o[i][jj] *= alpha;
            for (int kk = 0; kk < BK; kk++) {
                const float pk = __shfl_sync(FULL, p, kk);
                const float *vr = Vs + kk * LP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) o[i][jj] += pk * vr[32 * jj];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < QPW; i++) {
        const int t = wq0 + i;
        if (t >= Nq || l[i] == 0.0f) continue; /* no visible key: a ring step leaves the query as it was */
        const float blk = m[i] + logf(l[i]);
        float keep = 0.0f, add = 1.0f / l[i], merged = blk;
        if (merge) { /* L = logaddexp(L_run, L_blk); out = out_run e^(L_run - L) + out_blk e^(L_blk - L) */
            const float run = lse[(int64_t)h * Nq + t], top = fmaxf(run, blk);
            merged = top + logf(expf(run - top) + expf(blk - top));
            keep = expf(run - merged);
            add *= expf(blk - merged);
        }
        T *orow = out + ((int64_t)t * Hq + h) * D;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) {
            const int d = lane + 32 * jj;
            if (d < D) orow[d] = from_f32<T>(merge ? to_f32(orow[d]) * keep + o[i][jj] * add : o[i][jj] * add);
        }
        __syncwarp(); /* every lane has read the running lse before lane 0 overwrites it */
        if (lane == 0) lse[(int64_t)h * Nq + t] = merged;
    }
}

/* Dsum[h, t] = dout[t, h, :] . out[t, h, :], one warp per (t, h) */
template <typename T>
__global__ void attn_dsum_kernel(float *dsum, const T *dout, const T *out, int N, int Hq, int D) {
    const int64_t row = blockIdx.x * (int64_t)NWARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (int64_t)N * Hq) return;
    const T *a = dout + row * D, *b = out + row * D;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += to_f32(a[d]) * to_f32(b[d]);
    s = warp_sum(s);
    if (lane == 0) {
        const int64_t t = row / Hq, h = row % Hq;
        dsum[h * N + t] = s;
    }
}

template <typename T, int DPL>
__global__ void __launch_bounds__(THREADS) attn_bwd_dq_kernel(T *dq, const T *dout, const T *q, const T *k, const T *v,
                                                             const float *lse, const float *dsum, AttnRows r,
                                                             float scale) {
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP;
    extern __shared__ float4 smem4[];
    float *Qs = (float *)smem4;   /* [BQ][LP] */
    float *Os = Qs + BQ * LP;     /* [BQ][LP] dout */
    float *Ks = Os + BQ * LP;     /* [BK][RP] */
    float *Vs = Ks + BK * RP;     /* [BK][RP] */
    const int Nq = r.Nq, Hq = r.Hq, Hkv = r.Hkv, D = r.D;
    const int h = blockIdx.y, hk = h / (Hq / Hkv);
    const int t0 = blockIdx.x * BQ, tlast = min(t0 + BQ, Nq) - 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    load_rows(Qs, LP, q, t0, BQ, Nq, Hq, h, D, 1.0f);
    load_rows(Os, LP, dout, t0, BQ, Nq, Hq, h, D, 1.0f);

    const int wq0 = t0 + warp * QPW, wqlast = min(wq0 + QPW, Nq) - 1;
    const int wkmin = wq0 < Nq ? r.key_lo[wq0] : 0, wkend = wq0 < Nq ? r.key_hi[wqlast] : 0;
    int qs[QPW], qe[QPW];
    float ql[QPW], qd[QPW], acc[QPW][DPL];
#pragma unroll
    for (int i = 0; i < QPW; i++) {
        const int t = wq0 + i;
        qs[i] = t < Nq ? r.key_lo[t] : 0;
        qe[i] = t < Nq ? r.key_hi[t] : 0;
        ql[i] = t < Nq ? lse[(int64_t)h * Nq + t] : 0.0f;
        qd[i] = t < Nq ? dsum[(int64_t)h * Nq + t] : 0.0f;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) acc[i][jj] = 0.0f;
    }

    const int kend = r.key_hi[tlast];
    for (int kt = r.key_lo[t0]; kt < kend; kt += BK) {
        __syncthreads();
        load_rows(Ks, RP, k, kt, BK, kend, Hkv, hk, D, 1.0f);
        load_rows(Vs, RP, v, kt, BK, kend, Hkv, hk, D, 1.0f);
        __syncthreads();
        if (wq0 >= Nq || kt >= wkend || kt + BK - 1 < wkmin) continue;
        float s[QPW], dp[QPW];
#pragma unroll
        for (int i = 0; i < QPW; i++) s[i] = dp[i] = 0.0f;
        const float4 *kr = (const float4 *)(Ks + lane * RP), *vr = (const float4 *)(Vs + lane * RP);
        for (int d4 = 0; d4 < D4; d4++) {
            const float4 kk = kr[d4], vv = vr[d4];
#pragma unroll
            for (int i = 0; i < QPW; i++) {
                s[i] += dot4(((const float4 *)(Qs + (warp * QPW + i) * LP))[d4], kk);
                dp[i] += dot4(((const float4 *)(Os + (warp * QPW + i) * LP))[d4], vv);
            }
        }
        const int j = kt + lane;
#pragma unroll
        for (int i = 0; i < QPW; i++) {
            const bool vis = j >= qs[i] && j < qe[i];
            if (!__any_sync(FULL, vis)) continue;
            const float P = vis ? expf(scale * s[i] - ql[i]) : 0.0f;
            const float dS = P * (dp[i] - qd[i]);
            for (int kk = 0; kk < BK; kk++) {
                const float g = __shfl_sync(FULL, dS, kk);
                const float *krow = Ks + kk * RP + lane;
#pragma unroll
                for (int jj = 0; jj < DPL; jj++) acc[i][jj] += g * krow[32 * jj];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < QPW; i++) {
        const int t = wq0 + i;
        if (t >= Nq || qs[i] >= qe[i]) continue; /* no visible key: nothing to add */
        T *row = dq + ((int64_t)t * Hq + h) * D;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) {
            const int d = lane + 32 * jj;
            if (d < D) row[d] = from_f32<T>(to_f32(row[d]) + scale * acc[i][jj]);
        }
    }
}

template <typename T, int DPL, int KPW>
__global__ void __launch_bounds__(THREADS) attn_bwd_dkv_kernel(T *dk, T *dv, const T *dout, const T *q, const T *k, const T *v,
                                                              const float *lse, const float *dsum, AttnRows r,
                                                              float scale) {
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP, BKK = NWARPS * KPW, BQT = 32;
    extern __shared__ float4 smem4[];
    float *Ks = (float *)smem4;   /* [BKK][LP] */
    float *Vs = Ks + BKK * LP;    /* [BKK][LP] */
    float *Qs = Vs + BKK * LP;    /* [BQT][RP] */
    float *Os = Qs + BQT * RP;    /* [BQT][RP] dout */
    float *Ls = Os + BQT * RP;    /* [BQT] lse */
    float *Ds = Ls + BQT;         /* [BQT] Dsum */
    const int Nq = r.Nq, Nk = r.Nk, Hq = r.Hq, Hkv = r.Hkv, D = r.D;
    const int hk = blockIdx.y, group = Hq / Hkv;
    const int j0 = blockIdx.x * BKK, jlast = min(j0 + BKK, Nk) - 1;
    const int qbegin = r.query_lo[j0], qend = r.query_hi[jlast]; /* the queries any key of the block serves */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D4 = (D + 3) / 4;
    load_rows(Ks, LP, k, j0, BKK, Nk, Hkv, hk, D, 1.0f);
    load_rows(Vs, LP, v, j0, BKK, Nk, Hkv, hk, D, 1.0f);

    const int wj0 = j0 + warp * KPW;
    int kbeg[KPW], kend[KPW];
    float ak[KPW][DPL], av[KPW][DPL];
    int wqbeg = wj0 < Nk ? r.query_lo[wj0] : 0, wqend = 0;
#pragma unroll
    for (int i = 0; i < KPW; i++) {
        kbeg[i] = wj0 + i < Nk ? r.query_lo[wj0 + i] : 0;
        kend[i] = wj0 + i < Nk ? r.query_hi[wj0 + i] : 0;
        wqend = max(wqend, kend[i]);
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) ak[i][jj] = av[i][jj] = 0.0f;
    }

    for (int h = hk * group; h < (hk + 1) * group; h++) {
        for (int tq = qbegin; tq < qend; tq += BQT) {
            __syncthreads();
            load_rows(Qs, RP, q, tq, BQT, qend, Hq, h, D, 1.0f);
            load_rows(Os, RP, dout, tq, BQT, qend, Hq, h, D, 1.0f);
            if (threadIdx.x < BQT) {
                const int t = tq + threadIdx.x;
                Ls[threadIdx.x] = t < qend ? lse[(int64_t)h * Nq + t] : 0.0f;
                Ds[threadIdx.x] = t < qend ? dsum[(int64_t)h * Nq + t] : 0.0f;
            }
            __syncthreads();
            if (wj0 >= Nk || tq >= wqend || tq + BQT - 1 < wqbeg) continue; /* warp-uniform */
            float s[KPW], dp[KPW];
#pragma unroll
            for (int i = 0; i < KPW; i++) s[i] = dp[i] = 0.0f;
            const float4 *qr = (const float4 *)(Qs + lane * RP), *orr = (const float4 *)(Os + lane * RP);
            for (int d4 = 0; d4 < D4; d4++) {
                const float4 qq = qr[d4], oo = orr[d4];
#pragma unroll
                for (int i = 0; i < KPW; i++) {
                    s[i] += dot4(qq, ((const float4 *)(Ks + (warp * KPW + i) * LP))[d4]);
                    dp[i] += dot4(oo, ((const float4 *)(Vs + (warp * KPW + i) * LP))[d4]);
                }
            }
            const int t = tq + lane;
            const float lt = Ls[lane], dt = Ds[lane];
#pragma unroll
            for (int i = 0; i < KPW; i++) {
                const bool vis = t >= kbeg[i] && t < kend[i];
                if (!__any_sync(FULL, vis)) continue;
                const float P = vis ? expf(scale * s[i] - lt) : 0.0f;
                const float dS = P * (dp[i] - dt);
                for (int kk = 0; kk < BQT; kk++) {
                    const float pk = __shfl_sync(FULL, P, kk), gk = __shfl_sync(FULL, dS, kk);
                    const float *orow = Os + kk * RP + lane, *qrow = Qs + kk * RP + lane;
#pragma unroll
                    for (int jj = 0; jj < DPL; jj++) {
                        av[i][jj] += pk * orow[32 * jj];
                        ak[i][jj] += gk * qrow[32 * jj];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < KPW; i++) {
        const int j = wj0 + i;
        if (j >= Nk || kbeg[i] >= kend[i]) continue; /* seen by no query: nothing to add */
        const int64_t base = ((int64_t)j * Hkv + hk) * D;
#pragma unroll
        for (int jj = 0; jj < DPL; jj++) {
            const int d = lane + 32 * jj;
            if (d >= D) continue;
            if (dk) dk[base + d] = from_f32<T>(to_f32(dk[base + d]) + scale * ak[i][jj]);
            if (dv) dv[base + d] = from_f32<T>(to_f32(dv[base + d]) + av[i][jj]);
        }
    }
}

/* Launch with `smem` bytes of dynamic shared memory, raising the kernel's limit once when needed. */
template <typename Kern, typename... Args>
void launch(const char *name, Kern kernel, int &raised, dim3 grid, size_t smem, Args... args) {
    if (smem > 48 * 1024 && (int)smem > raised) {
        if ((int)smem > max_smem_optin())
            fatal("cuda %s: needs %zu bytes of shared memory, the device allows %d", name, smem, max_smem_optin());
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        raised = (int)smem;
    }
    kernel<<<grid, THREADS, smem, stream()>>>(args...);
    LAUNCH_CHECK(name);
}

struct Dims {
    int N, Hq, Hkv, D, ndocs;
};

Dims check_dims(const char *what, const Tensor *q, const Tensor *k, const Tensor *v, const Tensor *cu) {
    if (q->ndim != 3 || k->ndim != 3 || v->ndim != 3) fatal("cuda %s: q, k, v must be [N, H, D]", what);
    const int64_t N = q->shape[0], Hq = q->shape[1], Hkv = k->shape[1], D = q->shape[2];
    if (k->shape[0] != N || k->shape[2] != D || v->shape[0] != N || v->shape[1] != Hkv || v->shape[2] != D)
        fatal("cuda %s: k and v must be [%lld, Hkv, %lld] like each other", what, (long long)N, (long long)D);
    if (Hkv <= 0 || Hq % Hkv != 0) fatal("cuda %s: %lld query heads are not a multiple of %lld KV heads", what, (long long)Hq, (long long)Hkv);
    if (D < 1 || D > CUDA_HEAD_DIM_MAX)
        fatal("cuda %s: head dim %lld not supported (1..%d)", what, (long long)D, CUDA_HEAD_DIM_MAX);
    if (N >= INT32_MAX / 2 || Hq > CUDA_HEADS_MAX) fatal("cuda %s: too many tokens or heads", what);
    if (q->dtype != k->dtype || q->dtype != v->dtype) fatal("cuda %s: q, k, v dtypes differ", what);
    if (cu->dtype != DT_I32 || cu->numel < 2) fatal("cuda %s: cu_seqlens must be i32 [ndocs+1] with ndocs >= 1", what);
    return Dims{(int)N, (int)Hq, (int)Hkv, (int)D, (int)(cu->numel - 1)};
}

/* scratch layout: the four row ranges [N] each | (backward) dsum [Hq*N] */
AttnRows doc_rows(const Dims &a, const Tensor *cu, size_t extra_bytes, void **extra) {
    const size_t rows_bytes = align256((size_t)4 * a.N * sizeof(int));
    char *ws = (char *)scratch(rows_bytes + extra_bytes);
    int *x = (int *)ws;
    const AttnRows r{x, x + a.N, x + 2 * a.N, x + 3 * a.N, a.N, a.N, a.Hq, a.Hkv, a.D};
    doc_rows_kernel<<<grid_for((int64_t)a.N + a.ndocs + 1, 256), 256, 0, stream()>>>(r, (const int *)cu->data, a.ndocs, a.N, errbuf());
    LAUNCH_CHECK("attention doc_rows");
    if (extra) *extra = ws + rows_bytes;
    return r;
}

template <typename T, int DPL>
void forward_impl(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v, const AttnRows &r,
                  float scale, bool merge, const char *what) {
    static int raised = 0;
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP;
    const size_t smem = (size_t)(BQ * LP + BK * RP + BK * LP) * sizeof(float);
    const dim3 grid((unsigned)((r.Nq + BQ - 1) / BQ), (unsigned)r.Hq);
    launch(what, attn_fwd_kernel<T, DPL>, raised, grid, smem, (T *)out->data, (float *)lse->data, (const T *)q->data,
           (const T *)k->data, (const T *)v->data, r, scale, merge);
}

template <typename T, int DPL>
void backward_impl(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k, const Tensor *v,
                   const Tensor *lse, const AttnRows &r, const float *dsum, float scale) {
    constexpr int LP = Pitch<DPL>::LP, RP = Pitch<DPL>::RP;
    if (dq) {
        static int raised = 0;
        const size_t smem = (size_t)(2 * BQ * LP + 2 * BK * RP) * sizeof(float);
        const dim3 grid((unsigned)((r.Nq + BQ - 1) / BQ), (unsigned)r.Hq);
        launch("attention backward dq", attn_bwd_dq_kernel<T, DPL>, raised, grid, smem, (T *)dq->data,
               (const T *)dout->data, (const T *)q->data, (const T *)k->data, (const T *)v->data, (const float *)lse->data,
               dsum, r, scale);
    }
    if (dk || dv) {
        static int raised = 0;
        constexpr int KPW = DPL <= 4 ? 8 : 4, BKK = NWARPS * KPW;
        const size_t smem = (size_t)(2 * BKK * LP + 2 * 32 * RP + 64) * sizeof(float);
        const dim3 grid((unsigned)((r.Nk + BKK - 1) / BKK), (unsigned)r.Hkv);
        launch("attention backward dk dv", attn_bwd_dkv_kernel<T, DPL, KPW>, raised, grid, smem,
               dk ? (T *)dk->data : nullptr, dv ? (T *)dv->data : nullptr, (const T *)dout->data, (const T *)q->data,
               (const T *)k->data, (const T *)v->data, (const float *)lse->data, dsum, r, scale);
    }
}

}  // namespace

namespace msacuda {

void attention_rows_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                            const AttnRows &r, float scale, bool merge, const char *what) {
    if (r.Nq == 0 || r.Nk == 0) return;
    DISPATCH_FLOAT(q->dtype, T, what, {
        switch (dpl_of(r.D)) {
        case 1: forward_impl<T, 1>(out, lse, q, k, v, r, scale, merge, what); break;
        case 2: forward_impl<T, 2>(out, lse, q, k, v, r, scale, merge, what); break;
        case 4: forward_impl<T, 4>(out, lse, q, k, v, r, scale, merge, what); break;
        default: forward_impl<T, 8>(out, lse, q, k, v, r, scale, merge, what); break;
        }
    });
}

void attention_rows_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k,
                             const Tensor *v, const Tensor *out, const Tensor *lse, const AttnRows &r, float *dsum,
                             float scale, const char *what) {
    if (r.Nq == 0 || r.Nk == 0) return;
    DISPATCH_FLOAT(q->dtype, T, what, {
        const int64_t rows = (int64_t)r.Nq * r.Hq;
        attn_dsum_kernel<T><<<(unsigned)((rows + NWARPS - 1) / NWARPS), THREADS, 0, stream()>>>(dsum, (const T *)dout->data,
                                                                                   (const T *)out->data, r.Nq, r.Hq, r.D);
        LAUNCH_CHECK("attention backward dsum");
        switch (dpl_of(r.D)) {
        case 1: backward_impl<T, 1>(dq, dk, dv, dout, q, k, v, lse, r, dsum, scale); break;
        case 2: backward_impl<T, 2>(dq, dk, dv, dout, q, k, v, lse, r, dsum, scale); break;
        case 4: backward_impl<T, 4>(dq, dk, dv, dout, q, k, v, lse, r, dsum, scale); break;
        default: backward_impl<T, 8>(dq, dk, dv, dout, q, k, v, lse, r, dsum, scale); break;
        }
    });
}

}  // namespace msacuda

extern "C" void cuda_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                                       const Tensor *cu_seqlens, float scale) {
    init();
    const Dims a = check_dims("attention_forward", q, k, v, cu_seqlens);
    if (out->numel != q->numel || out->dtype != q->dtype) fatal("cuda attention_forward: out must have q's shape and dtype");
    if (lse->numel != (int64_t)a.Hq * a.N || lse->dtype != DT_F32) fatal("cuda attention_forward: lse must be f32 [Hq, N]");
    if (a.N == 0) return;
    if (cudnn_attention_forward(out, lse, q, k, v, cu_seqlens, scale, a.N, a.Hq, a.Hkv, a.D, a.ndocs)) return;
    attention_rows_forward(out, lse, q, k, v, doc_rows(a, cu_seqlens, 0, nullptr), scale, false, "attention_forward");
}

extern "C" void cuda_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q,
                                        const Tensor *k, const Tensor *v, const Tensor *out, const Tensor *lse,
                                        const Tensor *cu_seqlens, float scale) {
    init();
    if (!dq && !dk && !dv) return;
    const Dims a = check_dims("attention_backward", q, k, v, cu_seqlens);
    if (dout->numel != q->numel || out->numel != q->numel || dout->dtype != q->dtype || out->dtype != q->dtype)
        fatal("cuda attention_backward: dout and out must have q's shape and dtype");
    if (lse->numel != (int64_t)a.Hq * a.N || lse->dtype != DT_F32) fatal("cuda attention_backward: lse must be f32 [Hq, N]");
    const Tensor *grads[3] = {dq, dk, dv}, *like[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        if (grads[i] && (grads[i]->numel != like[i]->numel || grads[i]->dtype != q->dtype))
            fatal("cuda attention_backward: gradients must have their inputs' shapes and dtype");
    if (a.N == 0) return;
    if (cudnn_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens, scale, a.N, a.Hq, a.Hkv, a.D, a.ndocs))
        return;
    void *extra = nullptr;
    const AttnRows r = doc_rows(a, cu_seqlens, (size_t)a.Hq * a.N * sizeof(float), &extra);
    attention_rows_backward(dq, dk, dv, dout, q, k, v, out, lse, r, (float *)extra, scale, "attention_backward");
}
