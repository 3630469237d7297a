/* The MoE layer's grouped GEMMs as one launch each (moe_grouped_gemm.cu, CUTLASS's SM90 grouped GEMM),
 * shared by moe.cu (the entry points, the per-expert fallback) and the file that instantiates CUTLASS.
 * The expert offsets stay on the device: a setup kernel turns them into the per-expert problem shapes
 * and operand pointers, and the GEMM launch covers all E experts (an empty one has no tiles). */
#ifndef MSA_CUDA_MOE_GROUPED_GEMM_CUH
#define MSA_CUDA_MOE_GROUPED_GEMM_CUH

#include "common.cuh"

namespace msacuda {

/* The three products of the grouped linear layer, expert e owning rows [offsets[e], offsets[e+1]) of the
 * grouped buffers (xs [M, in], ys and dys [M, out]) and the matrix w[e] [out, in]:
 *   forward  ys_e   = xs_e w_e^T     (BF16 out)
 *   dx       dxs_e += dys_e w_e      (BF16 out, accumulated)
 *   dw       dw_e  += dys_e^T xs_e   (F32 out, accumulated; per-expert K = the expert's rows) */
enum GroupedProduct { GROUPED_FORWARD = 0, GROUPED_DX, GROUPED_DW };

/* Whether the single-launch path takes a layer of these widths: TMA needs 16-byte aligned rows and
 * segment starts, so both widths must be multiples of 8 BF16 elements. */
static inline bool grouped_gemm_fits(int64_t in, int64_t out) {
    return in > 0 && out > 0 && in % 8 == 0 && out % 8 == 0 && in <= INT32_MAX && out <= INT32_MAX;
}

/* Device bytes one grouped_gemm call needs for its per-expert arguments and CUTLASS's workspace */
size_t grouped_gemm_workspace(GroupedProduct p, int64_t E);

/* One product for all E experts: `rows_in` is xs (forward) or dys (dx, dw); `other` is w's BF16 values
 * [E, out, in] (forward, dx) or xs (dw); `dst` is ys, dxs (bf16) or dw (f32). `offsets` i32 [E+1] on the
 * device, M the grouped buffer's rows. A segment that does not lie inside [0, M) in order is recorded in
 * the device error word `err` (errbuf(): ERR_MOE_OFFSETS, the lowest such expert and its offsets[e+1]) and
 * computed as empty, so no memory outside the tensors is touched; it is reported at the next copy to the
 * host. `ws` holds grouped_gemm_workspace(p, E) bytes, 256-aligned. No host synchronisation. */
void grouped_gemm(GroupedProduct p, void *dst, const bf16 *rows_in, const bf16 *other, const int32_t *offsets, int64_t E,
                  int64_t M, int64_t out, int64_t in, int *err, void *ws);

}  // namespace msacuda

#endif
