/* The CPU reference backend: float32 kernels (float64 for gradient checks), OpenMP, OpenBLAS GEMMs.
 * Its table is kernels.def with .entry = cpu_<entry>; the CPU is the reference, so it has every group but
 * GRAPH (its kernels run as the host calls them: there is no launch to save). */
#include "cpu.h"

void cpu_copy_to_host(void *dst, const void *src, size_t bytes) { cpu_copy(dst, src, bytes); }
void cpu_copy_from_host(void *dst, const void *src, size_t bytes) { cpu_copy(dst, src, bytes); }
/* the copies are done when they return, so a lane has nothing to wait for */
void cpu_copy_to_host_async(void *dst, const void *src, size_t bytes, int lane) { (void)lane; cpu_copy(dst, src, bytes); }
void cpu_copy_from_host_async(void *dst, const void *src, size_t bytes, int lane) { (void)lane; cpu_copy(dst, src, bytes); }
void cpu_copy_lane_wait(int lane) { (void)lane; }

/* every CPU kernel has finished when it returns (OpenMP regions join before that) */
void cpu_synchronize(void) {}

/* the host never waits for a device: it computes everything itself */
int64_t cpu_host_waits(void) { return 0; }

/* no device: its memory is the host's, which the arena and the profile already count */
void cpu_device_memory(DeviceMemory *m) { *m = (DeviceMemory){0}; }

/* The groups of kernels.def this backend implements: a group it lacked would expand to nothing here,
 * leaving its entries NULL for backend_missing() to report at start-up. */
#define CPU_HAS_CORE(entry) entry,
#define CPU_HAS_MSA(entry) entry,
#define CPU_HAS_MOE(entry) entry,
#define CPU_HAS_RING(entry) entry,
#define CPU_HAS_GRAPH(entry)

const KernelBackend cpu_backend = {
    .name = "cpu",
    .device = DEV_CPU,
#define KERNEL(group, ret, name, params) CPU_HAS_##group(.name = cpu_##name)
#include "../kernels.def"
#undef KERNEL
};
