/* MSA Index Branch selection on the GPU (DESIGN §4, msa_spec.md b.1-b.2, e.3): per (index head g,
 * query t) the document-relative block scores S[b] = max over the keys j of block b of qi[t,g].ki[j],
 * then the forced init/local blocks plus the best-scoring other blocks up to topk_blocks, ids ascending,
 * -1 padding, ties to the lower block id, every visible block when they fit the budget. Scores are never
 * materialised: score GEMM, block max-pool and Top-k run in one pass, with no exponentials. Same rule
 * as the CPU reference (kernels/cpu/msa_indexer_impl.h); positive index_scale does not change the
 * ranking, so raw dot products are ranked (a negative or zero scale flips or flattens them, exactly).
 *
 * Only candidate blocks need scores: for a query whose local block is lb, the candidates are the blocks
 * init .. lb-local, all strictly before its own block, so every key scored is visible and no causal mask
 * is needed; the forced blocks are never scored and a query that sees at most topk_blocks blocks is not
 * scored at all.
 *
 * A thread block owns ROWS consecutive (query, head) rows of qi [N*Hidx, Di] (ROWS/Hidx queries, which
 * may span documents: each document segment of the tile is one pass) and streams the keys of the
 * segment's candidate range in tiles of TK keys (cp.async, double-buffered), in key order:
 *   - BF16: 8 warps x 32 rows; each warp keeps its 32 rows' qi as mma A fragments in registers (loaded
 *     once with ldmatrix) and computes its 32 x TK scores with mma.sync m16n8k16 (fp32 accumulation),
 *     32 key columns at a time (ldmatrix B fragments from the key tile), so only 32 accumulators live;
 *   - F32: 4 warps x 32 rows, the same fragment layout computed with fp32 FMAs from shared memory (the
 *     fp32 path is for checks; a BF16 tensor-core product would not rank fp32 inputs like the CPU).
 * Block max-pool right after each 32-column chunk: with block_size % 8 == 0 every 8-key n-tile lies in
 * one block, so each thread folds its accumulators into a running max per row until the block ends, then
 * one 3-shuffle transpose-reduction leaves row (8*(lane%4) + lane/4) of the warp's block max in lane
 * `lane` (its owner); other block sizes stage the chunk's scores in shared memory and each owner lane
 * scans its own row. Blocks reach the owner in ascending id, and it keeps a sorted list of the best
 * topk_blocks - init - local candidates in shared memory (insertion only when a block beats the current
 * last one, strictly: ties keep the lower id), so the Top-k costs almost nothing next to the GEMM.
 * Thread blocks are issued heaviest first (the last query tiles see the most keys).
 *
 * idx_lse (the student's log-normaliser over the selected tokens, msa_spec.md b.4) is a second pass over
 * the selection only, KV-outer from its plan (msa_kl.cu msa_selected_lse; the caller's, else a temporary one): the selected tokens are
 * k * B per query where the scoring above visits the whole prefix, so the exponentials are not worth
 * folding into this pass over every candidate as the official K1 kernel does.
 *
 * With a query_index (sequence-split context parallelism) a tile is ROWS consecutive query rows, whose tokens
 * ascend but may skip (another rank's tokens): its segments are the documents meeting [first token, last token],
 * each owner row takes its own token's visible blocks, and the keys of the tokens between are scanned for
 * nothing but cost only time (at most the one tile per skip).
 *
 * Limits (kernels/cuda/limits.h): topk_blocks <= CUDA_MSA_TOPK_MAX (the selection lists' shared memory),
 * Di <= CUDA_MSA_INDEX_DIM_MAX, Hidx <= CUDA_MSA_INDEX_HEADS_MAX; N < 2^30. */
#include <math.h>
#include <type_traits>

#include "limits.h"
#include "msa_plan.cuh"

using namespace msacuda;

namespace {

constexpr unsigned FULL = 0xffffffffu;

template <typename T, int KS, bool FAST> struct Cfg {
    static constexpr bool BF = std::is_same<T, bf16>::value;
    static constexpr int WARPS = BF ? 8 : 4, THREADS = WARPS * 32, ROWS = WARPS * 32;
    static constexpr int TK = (BF && FAST) ? 128 : 64; /* keys per tile */
    static constexpr int NCH = TK / 32;                  /* 32-key chunks per tile */
    static constexpr int DP = 16 * KS;                   /* Di padded with zeros to the mma's k = 16 */
    static constexpr int PITCH = DP + (BF ? 8 : 4);      /* smem row pitch (elements): conflict-free ldmatrix / float4 */
    static constexpr int CH = 16 / (int)sizeof(T);       /* elements per 16-byte copy */
    static constexpr size_t Q_BYTES = (size_t)ROWS * PITCH * sizeof(T);
    static constexpr size_t KBUF_BYTES = (size_t)TK * PITCH * sizeof(T);
    static constexpr size_t S_BYTES = FAST ? 0 : (size_t)WARPS * 32 * 33 * sizeof(float);
    /* BF16 moves qi into registers before the first key tile, so its staging area is reused for the key
     * tiles; F32 reads qi from shared memory throughout */
    static constexpr size_t K_OFF = BF ? 0 : Q_BYTES;
    static constexpr size_t S_OFF = K_OFF + 2 * KBUF_BYTES;
    static constexpr size_t END0 = S_OFF + S_BYTES;
    static constexpr size_t LIST_OFF = ((BF && Q_BYTES > END0 ? Q_BYTES : END0) + 15) / 16 * 16;
    static size_t smem(int rsel) { return LIST_OFF + (size_t)rsel * ROWS * 8; }
};

__device__ __forceinline__ float neg_or_zero(float x, float mul) { return x * mul; }
__device__ __forceinline__ bf16 neg_or_zero(bf16 x, float mul) { return __float2bfloat16_rn(__bfloat162float(x) * mul); }

/* Copy rows [r0, r0 + nrows) of the row-major [nlimit, Di] matrix x into smem rows of PITCH elements,
 * dims padded with zeros to DP, rows at or past nlimit zero. 16-byte cp.async when Di allows it
 * (rows of x then start 16-byte aligned), plain loads otherwise. */
template <typename T, int DP, int PITCH, int CH>
__device__ __forceinline__ void load_tile(T *dst, const T *x, int64_t r0, int nrows, int64_t nlimit, int Di, bool vec) {
    constexpr int CPR = DP / CH; /* chunks per row */
    if (vec) {
        for (int idx = threadIdx.x; idx < nrows * CPR; idx += blockDim.x) {
            const int r = idx / CPR, c = idx - r * CPR;
            const int64_t gr = r0 + r;
            const bool ok = gr < nlimit && c * CH < Di;
            cp_async16(smem_u32(dst + r * PITCH + c * CH), ok ? (const void *)(x + gr * Di + c * CH) : (const void *)x, ok);
        }
    } else {
        for (int idx = threadIdx.x; idx < nrows * DP; idx += blockDim.x) {
            const int r = idx / DP, d = idx - r * DP;
            const int64_t gr = r0 + r;
            dst[r * PITCH + d] = (gr < nlimit && d < Di) ? x[gr * Di + d] : (T)0.0f;
        }
    }
}

/* One 32-key chunk (keys 32*c .. 32*c+31 of the tile) of the warp's 32 rows, in the m16n8 C layout:
 * acc[mt][j][2h+e] = score of row 16*mt + 8*h + lane/4 and key 32*c + 8*j + 2*(lane%4) + e. */
template <typename T, int KS, bool FAST> struct Chunk;

/* a chunk's accumulators, zeroed before either Chunk::compute sums into them */
__device__ __forceinline__ void zero_chunk(float (&acc)[2][4][4]) {
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][j][i] = 0.0f;
}

template <int KS, bool FAST> struct Chunk<bf16, KS, FAST> {
    using C = Cfg<bf16, KS, FAST>;
    static __device__ __forceinline__ void compute(float (&acc)[2][4][4], const uint32_t (&a)[2][KS][4], const bf16 *,
                                                   const bf16 *kb, int c, int lane) {
        zero_chunk(acc);
        /* ldmatrix x4 over 16 keys x 16 dims: matrices (keys 0-7, dims 0-7), (keys 0-7, dims 8-15),
         * (keys 8-15, dims 0-7), (keys 8-15, dims 8-15) = the B fragments of two n8 tiles */
        const bf16 *base = kb + (32 * c + (lane >> 4) * 8 + (lane & 7)) * C::PITCH + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int ks = 0; ks < KS; ks++)
#pragma unroll
            for (int jp = 0; jp < 2; jp++) {
                uint32_t b[4];
                ldsm_x4(b, smem_u32(base + 16 * jp * C::PITCH + 16 * ks));
                mma_bf16_16816(acc[0][2 * jp], a[0][ks], b[0], b[1]);
                mma_bf16_16816(acc[1][2 * jp], a[1][ks], b[0], b[1]);
                mma_bf16_16816(acc[0][2 * jp + 1], a[0][ks], b[2], b[3]);
                mma_bf16_16816(acc[1][2 * jp + 1], a[1][ks], b[2], b[3]);
            }
    }
};

template <int KS, bool FAST> struct Chunk<float, KS, FAST> {
    using C = Cfg<float, KS, FAST>;
    static __device__ __forceinline__ void compute(float (&acc)[2][4][4], const uint32_t (&)[2][KS][4], const float *qw,
                                                   const float *kb, int c, int lane) {
        zero_chunk(acc);
        const int g = lane >> 2, q = lane & 3;
        const float *qr = qw + g * C::PITCH;                  /* row g of the warp; +8, +16, +24 */
        const float *kr = kb + (32 * c + 2 * q) * C::PITCH;   /* key 2q of the chunk; +8j, +e */
#pragma unroll 2
        for (int d = 0; d < C::DP; d += 4) {
            float4 qv[4];
#pragma unroll
            for (int s = 0; s < 4; s++) qv[s] = *(const float4 *)(qr + 8 * s * C::PITCH + d);
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float4 kv = *(const float4 *)(kr + (8 * j + e) * C::PITCH + d);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++)
#pragma unroll
                        for (int h = 0; h < 2; h++) acc[mt][j][2 * h + e] += dot4(qv[2 * mt + h], kv);
                }
        }
    }
};

/* The owner lane's candidate list: scores and block ids sorted by (score desc, id asc), in shared
 * memory column `row` of [rsel][ROWS] arrays (lanes hit distinct banks). */
template <int ROWS> struct TopList {
    float *ls;
    int *lb;
    int row, rsel, cnt;
    float thr; /* the last kept score once the list is full */
    __device__ __forceinline__ void offer(int b, float v) {
        if (cnt == rsel && !(v > thr)) return; /* ties keep the lower (earlier) id */
        int pos = cnt < rsel ? cnt++ : rsel - 1;
        while (pos > 0) {
            const float ps = ls[(pos - 1) * ROWS + row];
            if (!(ps < v)) break;
            ls[pos * ROWS + row] = ps;
            lb[pos * ROWS + row] = lb[(pos - 1) * ROWS + row];
            pos--;
        }
        ls[pos * ROWS + row] = v;
        lb[pos * ROWS + row] = b;
        if (cnt == rsel) thr = ls[(rsel - 1) * ROWS + row];
    }
};

/* Max over the warp's 4 lanes of a quad for each of the 4 row slots m[s] (slot s = row 8s + lane/4),
 * returned for slot lane%4 only: 3 shuffles instead of 8. */
__device__ __forceinline__ float quad_transpose_max(const float (&m)[4], int lane) {
    const bool hi = lane & 2, lo = lane & 1;
    float k0 = hi ? m[2] : m[0], k1 = hi ? m[3] : m[1];
    const float s0 = hi ? m[0] : m[2], s1 = hi ? m[1] : m[3];
    k0 = fmaxf(k0, __shfl_xor_sync(FULL, s0, 2));
    k1 = fmaxf(k1, __shfl_xor_sync(FULL, s1, 2));
    const float keep = lo ? k1 : k0, send = lo ? k0 : k1;
    return fmaxf(keep, __shfl_xor_sync(FULL, send, 1));
}

struct IndexArgs {
    int32_t *topk;
    const int32_t *cu;
    const int32_t *q_token; /* [Nq] the token of each query row (query_index), NULL: the row */
    int *err;
    int64_t N, Nq;          /* tokens (ki's rows), query rows (qi's, topk's) */
    int ndocs, H, Di, B, K, init, local, rsel, TQ;
    float qmul; /* sign of index_scale: the ranking key is qmul * dot */
    bool vec;   /* Di * sizeof(T) % 16 == 0: 16-byte copies */
};

template <typename T, int KS, bool FAST>
__global__ void __launch_bounds__(Cfg<T, KS, FAST>::THREADS, (Cfg<T, KS, FAST>::BF && FAST) ? 2 : 1)
    msa_index_kernel(const T *__restrict__ qi, const T *__restrict__ ki, const IndexArgs a) {
    using C = Cfg<T, KS, FAST>;
    extern __shared__ float4 smem4[];
    char *smem = (char *)smem4;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t N = a.N;
    const int B = a.B;
    const int32_t *cu = a.cu;

    if (blockIdx.x == 0) /* cu_seqlens check (the kernels below stay in bounds whatever it holds) */
        for (int i = threadIdx.x; i <= a.ndocs; i += blockDim.x) {
            const bool bad = (i == 0 && cu[0] != 0) || (i == a.ndocs && cu[a.ndocs] != N) || (i > 0 && cu[i] < cu[i - 1]);
            if (bad) report_error(a.err, ERR_CU_SEQLENS, i, cu[i]);
        }

    const int64_t tile = (int64_t)gridDim.x - 1 - blockIdx.x; /* heaviest (latest) tiles first */
    const int64_t r0 = tile * a.TQ, r1 = min(r0 + a.TQ, a.Nq); /* the tile's query rows */
    const int nrows = (int)(r1 - r0) * a.H;
    /* the tile's tokens [t0, t1): the rows' first and one past their last */
    const int64_t t0 = msa_row_token(a.q_token, (int)r0, (int)N), t1 = msa_row_token(a.q_token, (int)r1 - 1, (int)N) + 1;

    /* stage qi rows r0*H .. r0*H + ROWS (rows past the tile's queries are computed and ignored) */
    T *qs = (T *)smem;
    load_tile<T, C::DP, C::PITCH, C::CH>(qs, qi, r0 * a.H, C::ROWS, a.Nq * a.H, a.Di, a.vec);
    cp_async_commit();
    cp_async_wait_committed();
    __syncthreads();
    if (a.qmul != 1.0f)
        for (int i = threadIdx.x; i < C::ROWS * C::PITCH; i += blockDim.x) qs[i] = neg_or_zero(qs[i], a.qmul);
    __syncthreads();
    uint32_t af[2][KS][4];
    if constexpr (C::BF) {
        /* A fragments (m16k16, row-major): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
         * (rows 0-7, k 8-15), (rows 8-15, k 8-15) */
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int ks = 0; ks < KS; ks++)
                ldsm_x4(af[mt][ks],
                        smem_u32(qs + (warp * 32 + 16 * mt + (lane & 7) + ((lane >> 3) & 1) * 8) * C::PITCH + 16 * ks + (lane >> 4) * 8));
        __syncthreads(); /* the staging area becomes the key tiles */
    }
    const T *qw = qs + warp * 32 * C::PITCH;
    T *kbuf = (T *)(smem + C::K_OFF);
    float *sw = (float *)(smem + C::S_OFF) + warp * 32 * 33; /* generic path: this warp's 32 x 32 chunk */

    /* the row this lane owns: 8*(lane%4) + lane/4 of the warp (the slot quad_transpose_max leaves it) */
    const int orow_w = 8 * (lane & 3) + (lane >> 2), orow = warp * 32 + orow_w;
    const bool ovalid = orow < nrows;
    const int64_t orq = r0 + orow / a.H; /* the owner's query row and its token */
    const int64_t ot = ovalid ? msa_row_token(a.q_token, (int)orq, (int)N) : t1;
    const int oh = orow % a.H;
    TopList<C::ROWS> list{(float *)(smem + C::LIST_OFF), (int *)(smem + C::LIST_OFF) + a.rsel * C::ROWS, orow, a.rsel, 0,
                          -INFINITY};
    int o_lb = -1; /* the owner's local block */

    /* token and key indices fit int: N < 2^30 */
    for (int d = msa_doc_of(cu, a.ndocs, t0); d < a.ndocs; d++) {
        const int ds = min(max(cu[d], 0), (int)N);
        if (ds >= t1) break;
        const int qa = max((int)t0, ds), qb = min((int)t1, cu[d + 1]);
        if (qa >= qb) continue;
        const bool o_in = ovalid && ot >= qa && ot < qb;
        if (o_in) o_lb = ((int)ot - ds) / B;
        const int lb_last = (qb - 1 - ds) / B;
        if (lb_last + 1 <= a.K || a.rsel == 0) continue; /* no choice to make in this segment */
        const bool o_act = o_in && o_lb + 1 > a.K;
        const int o_loc0 = o_lb - a.local + 1; /* the owner's candidates: init .. o_loc0 - 1 */
        const int kstart = ds + a.init * B, kend = ds + (lb_last - a.local + 1) * B;
        /* keys past the warp's last candidate block change nothing for its rows */
        const int warp_end = __reduce_max_sync(FULL, o_act ? ds + o_loc0 * B : kstart);
        const int ntiles = (kend - kstart + C::TK - 1) / C::TK;

        int cur = a.init;                 /* block being pooled (warp-uniform) */
        int nbnd = ds + (a.init + 1) * B; /* first key of the next block */
        float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}; /* fast path: per row slot */
        float mm = -INFINITY;             /* generic path: the owner row */
        auto flush = [&]() {
            float v;
            if constexpr (FAST) v = quad_transpose_max(m, lane);
            else v = mm;
            if (o_act && cur < o_loc0) list.offer(cur, v);
        };
        bool wdone = warp_end <= kstart;

        load_tile<T, C::DP, C::PITCH, C::CH>(kbuf, ki, kstart, C::TK, N, a.Di, a.vec);
        cp_async_commit();
        for (int it = 0; it < ntiles; it++) {
            cp_async_wait_committed();
            __syncthreads(); /* tile it landed; everyone is done with tile it-1, whose buffer is refilled next */
            if (it + 1 < ntiles)
                load_tile<T, C::DP, C::PITCH, C::CH>(kbuf + ((it + 1) & 1) * C::TK * C::PITCH, ki,
                                                     kstart + (it + 1) * C::TK, C::TK, N, a.Di, a.vec);
            cp_async_commit();
            const int kt = kstart + it * C::TK;
            if (wdone) continue;
            if (kt >= warp_end) {
                flush();
                wdone = true;
                continue;
            }
            const T *kb = kbuf + (it & 1) * C::TK * C::PITCH;
#pragma unroll 1
            for (int c = 0; c < C::NCH; c++) {
                float acc[2][4][4];
                Chunk<T, KS, FAST>::compute(acc, af, qw, kb, c, lane);
                const int k0 = kt + 32 * c;
                if constexpr (FAST) {
                    /* block_size % 8 == 0: each n8 tile lies in one block, and a step of 8 keys crosses
                     * at most one block boundary */
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        if (k0 + 8 * j >= nbnd) {
                            flush();
                            cur++;
                            nbnd += B;
#pragma unroll
                            for (int s = 0; s < 4; s++) m[s] = -INFINITY;
                        }
#pragma unroll
                        for (int mt = 0; mt < 2; mt++)
#pragma unroll
                            for (int h = 0; h < 2; h++)
                                m[2 * mt + h] = fmaxf(m[2 * mt + h], fmaxf(acc[mt][j][2 * h], acc[mt][j][2 * h + 1]));
                    }
                } else {
                    const int g = lane >> 2, q = lane & 3;
#pragma unroll
                    for (int mt = 0; mt < 2; mt++)
#pragma unroll
                        for (int j = 0; j < 4; j++)
#pragma unroll
                            for (int h = 0; h < 2; h++)
#pragma unroll
                                for (int e = 0; e < 2; e++)
                                    sw[(16 * mt + 8 * h + g) * 33 + 8 * j + 2 * q + e] = acc[mt][j][2 * h + e];
                    __syncwarp();
                    const float *sr = sw + orow_w * 33;
                    for (int cc = 0; cc < 32; cc++) {
                        if (k0 + cc >= nbnd) { /* uniform across the warp: boundaries depend on keys only */
                            flush();
                            cur++;
                            nbnd += B;
                            mm = -INFINITY;
                        }
                        mm = fmaxf(mm, sr[cc]);
                    }
                    __syncwarp();
                }
            }
        }
        if (!wdone) flush();
        __syncthreads(); /* the next segment's first tile reuses the buffers */
    }

    if (!ovalid) return;
    int32_t *out = a.topk + ((int64_t)oh * a.Nq + orq) * a.K;
    const int lb = o_lb < 0 ? 0 : o_lb;
    if (lb + 1 <= a.K) { /* dense fallback: everything visible fits the budget */
        for (int i = 0; i < a.K; i++) out[i] = i <= lb ? i : -1;
        return;
    }
    int n = 0;
    for (int b = 0; b < a.init; b++) out[n++] = b;
    for (int i = 0; i < list.cnt; i++) { /* the kept candidates, ascending by id */
        const int id = list.lb[i * C::ROWS + orow];
        int rank = 0;
        for (int j = 0; j < list.cnt; j++) rank += list.lb[j * C::ROWS + orow] < id;
        out[n + rank] = id;
    }
    n += list.cnt;
    for (int b = lb - a.local + 1; b <= lb; b++) out[n++] = b;
    for (; n < a.K; n++) out[n] = -1;
}

template <typename T, int KS, bool FAST> void index_launch(const Tensor *qi, const Tensor *ki, IndexArgs a) {
    using C = Cfg<T, KS, FAST>;
    static int raised = 0;
    const size_t smem = C::smem(a.rsel);
    if (smem > 48 * 1024 && (int)smem > raised) {
        if ((int)smem > max_smem_optin())
            fatal("cuda msa_indexer: needs %zu bytes of shared memory, the device allows %d", smem, max_smem_optin());
        CUDA_CHECK(cudaFuncSetAttribute(msa_index_kernel<T, KS, FAST>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        raised = (int)smem;
    }
    a.TQ = C::ROWS / a.H;
    a.vec = (a.Di * (int)sizeof(T)) % 16 == 0 && ((uintptr_t)qi->data | (uintptr_t)ki->data) % 16 == 0;
    const int64_t tiles = (a.Nq + a.TQ - 1) / a.TQ;
    msa_index_kernel<T, KS, FAST><<<(unsigned)tiles, C::THREADS, smem, stream()>>>((const T *)qi->data, (const T *)ki->data, a);
    LAUNCH_CHECK("msa_indexer");
}

/* The limits as the kernels meet them: the widest instantiation (KS = 8) holds CUDA_MSA_INDEX_DIM_MAX dims,
 * and a tile of the fewest rows (F32's) at least one query of CUDA_MSA_INDEX_HEADS_MAX heads (TQ >= 1). */
static_assert(Cfg<bf16, 8, true>::DP >= CUDA_MSA_INDEX_DIM_MAX, "the index dims of the widest instantiation");
static_assert(Cfg<float, 8, false>::ROWS >= CUDA_MSA_INDEX_HEADS_MAX && Cfg<bf16, 8, true>::ROWS >= CUDA_MSA_INDEX_HEADS_MAX,
              "a tile holds every index head of one query");

template <typename T, bool FAST> void index_dispatch_ks(const Tensor *qi, const Tensor *ki, const IndexArgs &a) {
    if (a.Di <= 32) index_launch<T, 2, FAST>(qi, ki, a);
    else if (a.Di <= 64) index_launch<T, 4, FAST>(qi, ki, a);
    else index_launch<T, 8, FAST>(qi, ki, a);
}

}  // namespace

extern "C" void cuda_msa_indexer(Tensor *topk, Tensor *idx_lse, Tensor *plan, const Tensor *qi, const Tensor *ki,
                                 const Tensor *cu_seqlens, const MsaParams *p) {
    init();
    const int64_t ndocs = msa_check_params("msa_indexer", p, cu_seqlens);
    if (qi->ndim != 3) fatal("cuda msa_indexer: qi must be [Nq, Hidx, Di], got %d dims", qi->ndim);
    if (ki->ndim != 2) fatal("cuda msa_indexer: ki must be [N, Di], got %d dims", ki->ndim);
    const int64_t Nq = qi->shape[0], N = ki->shape[0], H = qi->shape[1], Di = qi->shape[2], K = p->topk_blocks;
    const int32_t *q_token = msa_query_tokens("msa_indexer", p, Nq, N);
    if (ki->shape[1] != Di)
        fatal("cuda msa_indexer: ki must be [N = %lld, Di = %lld] (one key shared by all index heads)", (long long)N,
              (long long)Di);
    if (qi->dtype != ki->dtype) fatal("cuda msa_indexer: qi and ki dtypes differ (%s, %s)", dtype_name(qi->dtype), dtype_name(ki->dtype));
    if (!topk || topk->dtype != DT_I32 || topk->ndim != 3 || topk->shape[0] != H || topk->shape[1] != Nq || topk->shape[2] != K)
        fatal("cuda msa_indexer: topk must be i32 [Hidx = %lld, Nq = %lld, topk_blocks = %lld]", (long long)H, (long long)Nq,
              (long long)K);
    if (K > CUDA_MSA_TOPK_MAX)
        fatal("cuda msa_indexer: topk_blocks = %lld not supported (at most %d, kernels/cuda/limits.h CUDA_MSA_TOPK_MAX)",
              (long long)K, CUDA_MSA_TOPK_MAX);
    if (Di < 1 || Di > CUDA_MSA_INDEX_DIM_MAX)
        fatal("cuda msa_indexer: index head dim %lld not supported (1..%d, kernels/cuda/limits.h CUDA_MSA_INDEX_DIM_MAX)",
              (long long)Di, CUDA_MSA_INDEX_DIM_MAX);
    if (H < 1 || H > CUDA_MSA_INDEX_HEADS_MAX)
        fatal("cuda msa_indexer: %lld index heads not supported (1..%d, kernels/cuda/limits.h CUDA_MSA_INDEX_HEADS_MAX)",
              (long long)H, CUDA_MSA_INDEX_HEADS_MAX);
    if (N >= (int64_t)1 << 30) fatal("cuda msa_indexer: %lld tokens: too many (< 2^30)", (long long)N);
    if (N == 0 || Nq == 0) return;
    if (idx_lse && idx_lse->numel != H * Nq)
        fatal("cuda msa_indexer: idx_lse must be f32 [Hidx = %lld, Nq = %lld]", (long long)H, (long long)Nq);
    IndexArgs a;
    a.topk = (int32_t *)topk->data;
    a.cu = (const int32_t *)cu_seqlens->data;
    a.q_token = q_token;
    a.err = errbuf();
    a.N = N;
    a.Nq = Nq;
    a.ndocs = (int)ndocs;
    a.H = (int)H;
    a.Di = (int)Di;
    a.B = p->block_size;
    a.K = (int)K;
    a.init = p->init_blocks;
    a.local = p->local_blocks;
    a.rsel = (int)K - p->init_blocks - p->local_blocks;
    a.TQ = 0;
    a.qmul = p->index_scale > 0 ? 1.0f : p->index_scale < 0 ? -1.0f : 0.0f;
    a.vec = false;
    const bool fast = p->block_size % 8 == 0;
    DISPATCH_FLOAT(qi->dtype, T, "msa_indexer", {
        if (fast) index_dispatch_ks<T, true>(qi, ki, a);
        else index_dispatch_ks<T, false>(qi, ki, a);
    });
    if (plan) cuda_msa_plan(plan, topk, cu_seqlens, p);
    if (idx_lse) msa_selected_lse(idx_lse, qi, ki, topk, plan, cu_seqlens, p);
}
