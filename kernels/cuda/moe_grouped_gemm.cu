/* The MoE grouped GEMMs (moe_grouped_gemm.cuh) on CUTLASS's SM90 grouped GEMM: one persistent,
 * TMA-fed, warp-specialised (cooperative) kernel walks the tiles of every expert's problem, reading the
 * problem shapes and the A/B/C/D pointers of expert e from device arrays (cutlass::gemm::GroupProblemShape,
 * "ptr-array"). setup_kernel fills those arrays from the expert offsets on the device, so the host never
 * reads them and one launch covers a variable number of rows per expert; the group count is E.
 *
 * BF16 operands, fp32 accumulation, 128x128x64 tiles (two consumer warp groups of 64 rows), no cluster
 * (experts' M differ, so there is nothing to multicast reliably). Layouts, row-major storage throughout:
 *   forward  A = xs_e [m, in] (K-major),      B = w_e [out, in] (K-major),     D = ys_e [m, out] bf16
 *   dx       A = dys_e [m, out] (K-major),    B = w_e as [K=out, N=in] (N-major), C = D = dxs_e bf16
 *   dw       A = dys_e^T [out, m] (M-major),  B = xs_e as [K=m, N=in] (N-major),  C = D = dw_e f32
 * An empty expert is a problem with M = 0 (no tiles), also for dw, whose K would be 0. TMA clips every
 * tile at the problem's edge, so m, in and out need no multiple of the tile; the rows and segment starts
 * must be 16-byte aligned (grouped_gemm_fits). The headers come from PyPI's nvidia-cutlass wheel
 * (tools/install_deps.sh puts them in .deps/cutlass/include). */
/* CUTLASS first: its unqualified cute::Tensor would be ambiguous with our ::Tensor (tensor.h) declared
 * before it */
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include <stdlib.h>
#include <string.h>

#include "moe_grouped_gemm.cuh"

namespace msacuda {
namespace {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>; /* (M, N, K) per expert */
using Shape3 = ProblemShape::UnderlyingProblemShape;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

/* One CUTLASS grouped GEMM type: A and B BF16 with the given layouts (CUTLASS's convention: B is N x K,
 * ColumnMajor = K-major), C and D of ElementD, row-major, tiles of TileM x 128 x 64 on clusters of ClusterM
 * CTAs along M (the CTAs of a cluster share their B tile by TMA multicast) */
template <class LayoutA, class LayoutB, class ElementD, int TileM, int ClusterM> struct Grouped {
    using Element = cutlass::bfloat16_t;
    static constexpr int ALIGN_AB = 128 / cutlass::sizeof_bits<Element>::value;
    static constexpr int ALIGN_D = 128 / cutlass::sizeof_bits<ElementD>::value;
    using TileShape = Shape<Int<TileM>, _128, _64>;
    using ClusterShape = Shape<Int<ClusterM>, _1, _1>;
    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, RowMajor *, ALIGN_D, ElementD,
        RowMajor *, ALIGN_D, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
        cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA *, ALIGN_AB, Element, LayoutB *, ALIGN_AB,
        float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideC = typename Kernel::InternalStrideC;
    using StrideD = typename Kernel::InternalStrideD;
    using Out = ElementD;
};

/* The tile configurations: 128 x 128 on single CTAs, and 256 x 128 on pairs of CTAs (CUTLASS's
 * grouped-GEMM example's cooperative shape: each consumer warpgroup 128 x 128, half the B loads per
 * output). Measured on an H100 (docs/benchmarks.md, eleventh session, test_gpu --bench moe): the forward
 * is faster on 256 x 128 at all four bench shapes (430 -> 540 TFLOP/s at 2048 -> 704), the backward
 * (dx + dw) slower at three of four (454 -> 393), so the forward takes 256 x 128 and the backward
 * 128 x 128. MSA_MOE_TILE=128x128 or 256x128 puts every product on one of them (for measuring). */
template <int TileM, int ClusterM> struct Config {
    using Forward = Grouped<RowMajor, ColumnMajor, cutlass::bfloat16_t, TileM, ClusterM>;
    using Dx = Grouped<RowMajor, RowMajor, cutlass::bfloat16_t, TileM, ClusterM>;
    using Dw = Grouped<ColumnMajor, RowMajor, float, TileM, ClusterM>;
};
using Tile128 = Config<128, 1>;
using Tile256 = Config<256, 2>;

/* whether product p runs on the 256 x 128 tiles */
bool wide_tiles(GroupedProduct p) {
    static const int forced = [] { /* -1: by product */
        const char *v = getenv("MSA_MOE_TILE");
        if (!v || !*v) return -1;
        if (!strcmp(v, "128x128")) return 0;
        if (!strcmp(v, "256x128")) return 1;
        fatal("MSA_MOE_TILE=%s: expected 128x128 or 256x128", v);
    }();
    return forced >= 0 ? forced != 0 : p == GROUPED_FORWARD;
}

/* The per-expert argument arrays, each E entries, carved from the caller's workspace in this order
 * (256-byte aligned each), then CUTLASS's own workspace. */
template <class G> struct Args {
    Shape3 *shape;
    const typename G::Gemm::ElementA **a;
    const typename G::Gemm::ElementB **b;
    const typename G::Out **c;
    typename G::Out **d;
    typename G::StrideA *sa;
    typename G::StrideB *sb;
    typename G::StrideC *sc;
    typename G::StrideD *sd;
};

template <class G> size_t args_bytes(int64_t E) {
    const size_t e = (size_t)E;
    return align256(e * sizeof(Shape3)) + 4 * align256(e * sizeof(void *)) + align256(e * sizeof(typename G::StrideA)) +
           align256(e * sizeof(typename G::StrideB)) + align256(e * sizeof(typename G::StrideC)) +
           align256(e * sizeof(typename G::StrideD));
}

template <class G> Args<G> carve(char *ws, int64_t E) {
    const size_t e = (size_t)E;
    Args<G> r;
    auto take = [&](size_t bytes) {
        char *p = ws;
        ws += align256(bytes);
        return (void *)p;
    };
    r.shape = (Shape3 *)take(e * sizeof(Shape3));
    r.a = (const typename G::Gemm::ElementA **)take(e * sizeof(void *));
    r.b = (const typename G::Gemm::ElementB **)take(e * sizeof(void *));
    r.c = (const typename G::Out **)take(e * sizeof(void *));
    r.d = (typename G::Out **)take(e * sizeof(void *));
    r.sa = (typename G::StrideA *)take(e * sizeof(typename G::StrideA));
    r.sb = (typename G::StrideB *)take(e * sizeof(typename G::StrideB));
    r.sc = (typename G::StrideC *)take(e * sizeof(typename G::StrideC));
    r.sd = (typename G::StrideD *)take(e * sizeof(typename G::StrideD));
    return r;
}

/* One thread per expert: its segment [lo, hi) of the grouped rows -> its problem and operand addresses.
 * A segment outside [0, M) or reversed, or offsets that do not start at 0 and end at M, is recorded in
 * the device error word (ERR_MOE_OFFSETS) and made empty. */
template <class G, GroupedProduct P>
__global__ void setup_kernel(Args<G> g, typename G::Out *dst, const bf16 *rows_in, const bf16 *other,
                             const int32_t *off, int64_t E, int64_t M, int out, int in, int *err) {
    using EA = typename G::Gemm::ElementA;
    using EB = typename G::Gemm::ElementB;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < E; e += (int64_t)gridDim.x * blockDim.x) {
        const int32_t lo = off[e], hi = off[e + 1];
        const bool ok = lo >= 0 && lo <= hi && hi <= M && (e > 0 || lo == 0) && (e < E - 1 || hi == M);
        if (!ok) report_error_at(err, ERR_MOE_OFFSETS, e, hi);
        const int m = ok ? hi - lo : 0;
        const int64_t r0 = ok ? lo : 0;
        const EA *a = (const EA *)rows_in;
        const EB *b = (const EB *)other;
        typename G::Out *d;
        if (P == GROUPED_FORWARD) { /* (m, out, in): xs_e w_e^T */
            g.shape[e] = Shape3(m, out, in);
            a += r0 * in;
            b += e * (int64_t)out * in;
            d = dst + r0 * out;
            g.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, in, 1});
            g.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {out, in, 1});
            g.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, out, 1});
        } else if (P == GROUPED_DX) { /* (m, in, out): dys_e w_e */
            g.shape[e] = Shape3(m, in, out);
            a += r0 * out;
            b += e * (int64_t)out * in;
            d = dst + r0 * in;
            g.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, out, 1});
            g.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {in, out, 1});
            g.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, in, 1});
        } else { /* (out, in, m): dys_e^T xs_e; no rows, no tiles (K = 0 would still run the epilogue) */
            g.shape[e] = Shape3(m > 0 ? out : 0, in, m);
            a += r0 * out;
            b = (const EB *)other + r0 * in;
            d = dst + e * (int64_t)out * in;
            g.sa[e] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {out, m, 1});
            g.sb[e] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {in, m, 1});
            g.sd[e] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {out, in, 1});
        }
        g.sc[e] = g.sd[e];
        g.a[e] = a;
        g.b[e] = b;
        g.c[e] = d;
        g.d[e] = d;
    }
}

template <class G> size_t gemm_workspace(int64_t E) {
    typename G::Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = ProblemShape{(int)E, nullptr, nullptr};
    args.hw_info.sm_count = sm_count();
    return G::Gemm::get_workspace_size(args);
}

template <class G, GroupedProduct P>
void run(void *dst, const bf16 *rows_in, const bf16 *other, const int32_t *offsets, int64_t E, int64_t M, int64_t out,
         int64_t in, int *err, void *ws) {
    Args<G> g = carve<G>((char *)ws, E);
    void *gemm_ws = (char *)ws + args_bytes<G>(E);
    setup_kernel<G, P><<<grid_for(E, 128), 128, 0, stream()>>>(g, (typename G::Out *)dst, rows_in, other, offsets, E, M, (int)out,
                                                  (int)in, err);
    LAUNCH_CHECK("grouped_matmul setup");

    typename G::Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = ProblemShape{(int)E, g.shape, nullptr}; /* no host copy: the shapes stay on the device */
    args.mainloop.ptr_A = g.a;
    args.mainloop.dA = g.sa;
    args.mainloop.ptr_B = g.b;
    args.mainloop.dB = g.sb;
    args.epilogue.ptr_C = g.c;
    args.epilogue.dC = g.sc;
    args.epilogue.ptr_D = g.d;
    args.epilogue.dD = g.sd;
    auto &fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = P == GROUPED_FORWARD ? 0.0f : 1.0f; /* beta 0: C is never read */
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
    fusion.alpha_ptr_array = nullptr;
    fusion.beta_ptr_array = nullptr;
    args.hw_info.device_id = 0;
    CUDA_CHECK(cudaGetDevice(&args.hw_info.device_id));
    args.hw_info.sm_count = sm_count();

    typename G::Gemm gemm;
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess)
        fatal("cuda grouped_matmul: CUTLASS cannot run the grouped GEMM (%s) for E = %lld, out = %lld, in = %lld",
              cutlassGetStatusString(st), (long long)E, (long long)out, (long long)in);
    st = gemm.initialize(args, gemm_ws, stream());
    if (st == cutlass::Status::kSuccess) st = gemm.run(stream());
    if (st != cutlass::Status::kSuccess) fatal("cuda grouped_matmul: CUTLASS grouped GEMM failed: %s", cutlassGetStatusString(st));
    LAUNCH_CHECK("grouped_matmul");
}

template <class Cfg> size_t workspace_of(GroupedProduct p, int64_t E) {
    switch (p) {
    case GROUPED_FORWARD: return args_bytes<typename Cfg::Forward>(E) + align256(gemm_workspace<typename Cfg::Forward>(E));
    case GROUPED_DX: return args_bytes<typename Cfg::Dx>(E) + align256(gemm_workspace<typename Cfg::Dx>(E));
    case GROUPED_DW: return args_bytes<typename Cfg::Dw>(E) + align256(gemm_workspace<typename Cfg::Dw>(E));
    }
    fatal("cuda grouped_matmul: unknown product %d", (int)p);
}

template <class Cfg>
void run_config(GroupedProduct p, void *dst, const bf16 *rows_in, const bf16 *other, const int32_t *offsets, int64_t E,
                int64_t M, int64_t out, int64_t in, int *err, void *ws) {
    switch (p) {
    case GROUPED_FORWARD: run<typename Cfg::Forward, GROUPED_FORWARD>(dst, rows_in, other, offsets, E, M, out, in, err, ws); break;
    case GROUPED_DX: run<typename Cfg::Dx, GROUPED_DX>(dst, rows_in, other, offsets, E, M, out, in, err, ws); break;
    case GROUPED_DW: run<typename Cfg::Dw, GROUPED_DW>(dst, rows_in, other, offsets, E, M, out, in, err, ws); break;
    }
}

}  // namespace

size_t grouped_gemm_workspace(GroupedProduct p, int64_t E) {
    return wide_tiles(p) ? workspace_of<Tile256>(p, E) : workspace_of<Tile128>(p, E);
}

void grouped_gemm(GroupedProduct p, void *dst, const bf16 *rows_in, const bf16 *other, const int32_t *offsets, int64_t E,
                  int64_t M, int64_t out, int64_t in, int *err, void *ws) {
    if (E <= 0) return;
    if (M > INT32_MAX || E > INT32_MAX || !grouped_gemm_fits(in, out))
        fatal("cuda grouped_matmul: E = %lld, M = %lld, out = %lld, in = %lld outside the grouped GEMM's range", (long long)E,
              (long long)M, (long long)out, (long long)in);
    if (wide_tiles(p)) run_config<Tile256>(p, dst, rows_in, other, offsets, E, M, out, in, err, ws);
    else run_config<Tile128>(p, dst, rows_in, other, offsets, E, M, out, in, err, ws);
}

}  // namespace msacuda
