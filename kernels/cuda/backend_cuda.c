/* The CUDA backend's dispatch table (kernels/cuda/cuda.h lists the kernels and their conventions):
 * kernels.def with .entry = cuda_<entry>. Built only when nvcc is present (the Makefile then defines
 * MSA_CUDA everywhere). */
#include "cuda.h"

/* The groups of kernels.def this backend implements (all of them). A group whose kernels had not landed
 * would expand to nothing here: its entries stay NULL, the autograd ops that use them check first
 * (BACKEND_REQUIRE in backend.h), and backend_missing() lets a program refuse an MSA or MoE
 * configuration on this backend at start-up with a message instead of failing mid-run. */
#define CUDA_HAS_CORE(entry) entry,
#define CUDA_HAS_MSA(entry) entry,
#define CUDA_HAS_MOE(entry) entry,
#define CUDA_HAS_RING(entry) entry,
#define CUDA_HAS_GRAPH(entry) entry,

const KernelBackend cuda_backend = {
    .name = "cuda",
    .device = DEV_CUDA,
#define KERNEL(group, ret, name, params) CUDA_HAS_##group(.name = cuda_##name)
#include "../kernels.def"
#undef KERNEL
};
