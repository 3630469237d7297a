/* Device set-up, memory and the shared helpers of the CUDA backend (see common.cuh). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deque>
#include <unordered_map>
#include <vector>

#include "common.cuh"

namespace msacuda {

static bool g_ready = false;
static bool g_sync_each_launch = false;
static int g_sm_count = 0, g_smem_optin = 0;
static int *g_err = nullptr;
static void *g_scratch = nullptr;
static size_t g_scratch_bytes = 0;
static int64_t g_host_waits = 0, g_releases = 0;
static const char *g_last_wait = "none";
/* Blocking (cudaStreamCreate without cudaStreamNonBlocking): whatever still reaches the legacy default
 * stream (a library's internal call, code outside kernels/cuda) stays ordered with our work as before,
 * and while a graph is captured such an implicit dependency is reported as an error instead of racing.
 * Everything of ours runs on this one stream, so nothing is lost by the ordering. */
static cudaStream_t g_stream = nullptr;

cudaStream_t stream() {
    init();
    return g_stream;
}

bool capturing() {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    CUDA_CHECK(cudaStreamIsCapturing(stream(), &st));
    return st != cudaStreamCaptureStatusNone;
}

void host_wait(const char *site) {
    if (g_ready && capturing())
        fatal("CUDA graph capture: the training step waits for the device at %s, which a captured step cannot "
              "(set train.cuda_graph = off for this configuration)",
              site);
    g_host_waits++;
    g_last_wait = site;
}

void copy_to_host_at(void *dst, const void *src, size_t bytes, const char *site) {
    if (!bytes) return;
    host_wait(site);
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream()));
    CUDA_CHECK(cudaStreamSynchronize(stream()));
}

/* Memory released while a graph was being captured: the captured kernels before the release still use it
 * at every launch of the graph, so it is freed with the graph (take_retired), not now (a free would also
 * wait for the device, which a capture cannot). */
static std::vector<void *> g_retired;

/* bytes of each live allocation of cuda_alloc (device_memory's `allocated`) */
static std::unordered_map<void *, size_t> g_allocations;
static int64_t g_allocated = 0;

void free_device(void *p) {
    auto it = g_allocations.find(p);
    if (it != g_allocations.end()) {
        g_allocated -= (int64_t)it->second;
        g_allocations.erase(it);
    }
    CUDA_CHECK(cudaFree(p));
}

void release(void *p, const char *site) {
    if (!p) return;
    g_releases++;
    if (g_ready && capturing()) {
        g_retired.push_back(p);
        return;
    }
    host_wait(site);
    free_device(p);
}

std::vector<void *> take_retired() {
    std::vector<void *> r;
    r.swap(g_retired);
    return r;
}

void fail(const char *call, const char *code, const char *msg, const char *file, int line) {
    fatal("CUDA call %s failed at %s:%d: %s (%s)", call, file, line, code, msg);
}

void init() {
    if (g_ready) return;
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0)
        fatal("no CUDA device found (cudaGetDeviceCount: %s); run with train.device = \"cpu\" on this machine",
              err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&g_sm_count, cudaDevAttrMultiProcessorCount, dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&g_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    CUDA_CHECK(cudaStreamCreate(&g_stream));
    CUDA_CHECK(cudaMalloc((void **)&g_err, ERR_WORDS * sizeof(int)));
    CUDA_CHECK(cudaMemsetAsync(g_err, 0, ERR_WORDS * sizeof(int), g_stream));
    const char *s = getenv("MSA_CUDA_SYNC");
    g_sync_each_launch = s && s[0] && strcmp(s, "0") != 0;
    g_ready = true;
}

void after_launch(const char *kernel, const char *file, int line) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) fatal("CUDA kernel %s failed to launch at %s:%d: %s (%s)", kernel, file, line, cudaGetErrorName(err), cudaGetErrorString(err));
    if (g_sync_each_launch && !capturing()) { /* a captured kernel runs at the graph's launch */
        host_wait("MSA_CUDA_SYNC");
        err = cudaDeviceSynchronize();
        if (err != cudaSuccess) fatal("CUDA kernel %s (launched at %s:%d) failed: %s (%s)", kernel, file, line, cudaGetErrorName(err), cudaGetErrorString(err));
        check_device_errors();
    }
}

void *scratch(size_t bytes) {
    if (bytes > g_scratch_bytes) {
        /* headroom so that a few growing requests do not each reallocate, capped: at long contexts one
         * request (cuDNN's attention backward) is GiBs, where a quarter more would be wasted for good */
        const size_t headroom = bytes / 4 < ((size_t)64 << 20) ? bytes / 4 : ((size_t)64 << 20);
        size_t want = bytes + headroom + 256;
        release(g_scratch, "scratch growth"); /* synchronises: nothing still reads the old one */
        g_scratch = nullptr;
        CUDA_CHECK(cudaMalloc(&g_scratch, want));
        g_scratch_bytes = want;
    }
    return g_scratch;
}

int *errbuf() { return g_err; }

/* The (position, value) that report_error_at kept in h[2..3] */
static unsigned long long error_key(const int *h) {
    return ~(((unsigned long long)(uint32_t)h[3] << 32) | (unsigned long long)(uint32_t)h[2]);
}
static long long error_position(const int *h) { return (long long)(error_key(h) >> 32); }
static int error_value(const int *h) { return (int)(int32_t)(uint32_t)(error_key(h) & 0xffffffffull); }

void check_device_errors() {
    int h[ERR_WORDS];
    copy_to_host_at(h, g_err, sizeof h, "device error word");
    if (h[0] == ERR_NONE) return;
    CUDA_CHECK(cudaMemsetAsync(g_err, 0, sizeof h, stream()));
    switch (h[0]) {
    case ERR_TOKEN: fatal("embedding: token %d at position %d outside the vocabulary", h[2], h[1]);
    case ERR_TARGET: fatal("cross_entropy: target %d at row %d outside the vocabulary", h[2], h[1]);
    case ERR_CU_SEQLENS:
        fatal("attention: bad cu_seqlens (entry %d = %d): it must start at 0, never decrease and end at N", h[1], h[2]);
    case ERR_MSA_TOPK: /* msa_plan: [1] group, [2] query, [3] first id, [4] kind, [5] slot, [6] id, [7] unused */
        if (h[4] == 0)
            fatal("cuda msa_plan: topk[%d, %d] = {%d, ...}: slot %d holds block %d; ids must be ascending visible blocks",
                  h[1], h[2], h[3], h[5], h[6]);
        if (h[4] == 1) fatal("cuda msa_plan: topk[%d, %d] selects no block", h[1], h[2]);
        fatal("cuda msa_plan: topk[%d, %d] slot %d holds %d after the padding began (-1 expected)", h[1], h[2], h[5], h[6]);
    case ERR_RING_INDEX: /* attention_ring: [1] 1 for q_index, 0 for k_index, [2] row, [3] token */
        fatal("attention_ring: %s[%d] = %d: the tokens must ascend inside cu_seqlens' tokens", h[1] ? "q_index" : "k_index",
              h[2], h[3]);
    case ERR_MOE_TOPK: fatal("cuda moe_topk: router scores of token %lld are not finite numbers", error_position(h));
    case ERR_MOE_PLAN: { /* idx [N, k] */
        const long long p = error_position(h), k = h[4] > 0 ? h[4] : 1;
        fatal("cuda moe_plan: expert index %d outside [0, %d) at idx[%lld, %lld]", error_value(h), h[1], p / k, p % k);
    }
    case ERR_MOE_COMBINE:
        fatal("cuda moe_combine_weights: expert index %d at idx element %lld is outside [0, E) of the scores",
              error_value(h), error_position(h));
    case ERR_MOE_ROWS:
        fatal("cuda moe_permute/moe_unpermute: rows element %lld = %d is outside the grouped buffer", error_position(h),
              error_value(h));
    case ERR_MOE_OFFSETS:
        fatal("cuda grouped_matmul: offsets[%lld] = %d ends expert %lld's segment out of order or outside the grouped "
              "buffer (offsets must rise from 0 to its rows)",
              error_position(h) + 1, error_value(h), error_position(h));
    case ERR_MSA_ROWS: /* msa kernels: [1] 1 for query_index, 0 for key_rows, [2] index, [3] value, [4] rows */
        if (h[1])
            fatal("cuda msa kernels: query_index[%d] = %d: the query tokens must ascend within [0, N = %d)", h[2], h[3],
                  h[4]);
        fatal("cuda msa kernels: key_rows[%d] = %d is not a row of k's %d (or -1)", h[2], h[3], h[4]);
    default: fatal("cuda backend: device error code %d (%d, %d)", h[0], h[1], h[2]);
    }
}

int sm_count() { return g_sm_count; }
int max_smem_optin() { return g_smem_optin; }

const char *dt_name(DType dt) { return dtype_name(dt); }

}  // namespace msacuda

using namespace msacuda;

extern "C" void *cuda_alloc(size_t bytes) {
    init();
    void *p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        fatal("cudaMalloc of %zu bytes failed: %s (%zu of %zu MiB free)", bytes, cudaGetErrorString(err),
              free_b >> 20, total_b >> 20);
    }
    g_allocations[p] = bytes;
    g_allocated += (int64_t)bytes;
    return p;
}

extern "C" void cuda_device_memory(DeviceMemory *m) {
    init();
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    *m = DeviceMemory{(int64_t)(total_b - free_b), (int64_t)total_b, g_allocated, (int64_t)g_scratch_bytes};
}

extern "C" void *cuda_host_alloc(size_t bytes) {
    init();
    void *p = nullptr;
    cudaError_t err = cudaMallocHost(&p, bytes ? bytes : 1);
    if (err != cudaSuccess) fatal("cudaMallocHost of %zu bytes (page-locked host memory) failed: %s", bytes, cudaGetErrorString(err));
    return p;
}

extern "C" void cuda_host_free(void *p) {
    if (!p) return;
    init();
    host_wait("host_free");
    g_releases++;
    CUDA_CHECK(cudaFreeHost(p));
}

extern "C" void cuda_free(void *p) {
    if (!p) return;
    init();
    release(p, "free");
}

extern "C" void cuda_copy_to_host(void *dst, const void *src, size_t bytes) {
    init();
    copy_to_host_at(dst, src, bytes, "copy_to_host");
    check_device_errors();
}

namespace {

/* Copies from pageable host memory make the host wait for everything queued before them (the CUDA
 * runtime synchronises the stream first). Small ones, the per-step uploads of a batch, go through this
 * ring of page-locked memory instead: the bytes are copied into the ring on the host and from there to the
 * device asynchronously, and a region of the ring is reused only after the event recorded behind its copy
 * has passed. The ring holds at least RING_COPIES copies of the largest size seen, so the host waits only
 * when it runs that many copies ahead of the device. */
constexpr size_t RING_MAX_COPY = (size_t)4 << 20; /* larger copies (weights, checkpoints) stay blocking */
constexpr size_t RING_COPIES = 16;

struct InFlight {
    size_t begin;
    cudaEvent_t done;
};

struct StagingRing {
    char *buf = nullptr;
    size_t cap = 0, head = 0;
    std::deque<InFlight> in_flight; /* oldest first; in ring order from head */
    std::deque<cudaEvent_t> spare;

    void retire_front() {
        InFlight f = in_flight.front();
        if (cudaEventQuery(f.done) == cudaErrorNotReady) {
            host_wait("staged copy_from_host (ring full)");
            CUDA_CHECK(cudaEventSynchronize(f.done));
        }
        spare.push_back(f.done);
        in_flight.pop_front();
    }
    void grow(size_t bytes) {
        while (!in_flight.empty()) retire_front();
        size_t want = cap ? cap : (size_t)1 << 20;
        while (want < bytes * RING_COPIES) want *= 2;
        if (buf) {
            host_wait("staging ring growth");
            CUDA_CHECK(cudaFreeHost(buf));
        }
        CUDA_CHECK(cudaMallocHost((void **)&buf, want));
        cap = want;
        head = 0;
    }
    /* The region [at, at + bytes) after waiting for the copies that still read it. */
    size_t take(size_t bytes) {
        if (bytes * RING_COPIES > cap) grow(bytes);
        const bool wrap = head + bytes > cap;
        const size_t span = wrap ? cap - head + bytes : bytes; /* in ring order from head */
        while (!in_flight.empty() && (in_flight.front().begin + cap - head) % cap < span) retire_front();
        const size_t at = wrap ? 0 : head;
        head = (at + bytes) % cap;
        return at;
    }
    void copy(void *dst, const void *src, size_t bytes) {
        const size_t at = take(bytes);
        memcpy(buf + at, src, bytes);
        CUDA_CHECK(cudaMemcpyAsync(dst, buf + at, bytes, cudaMemcpyHostToDevice, stream()));
        cudaEvent_t done;
        if (spare.empty()) CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        else {
            done = spare.front();
            spare.pop_front();
        }
        CUDA_CHECK(cudaEventRecord(done, stream()));
        in_flight.push_back({at, done});
    }
};

StagingRing g_ring;

}  // namespace

extern "C" void cuda_copy_from_host(void *dst, const void *src, size_t bytes) {
    init();
    if (!bytes) return;
    if (capturing()) {
        CUDA_CHECK(cudaMemcpyAsync(dst, capture_host_copy(src, bytes), bytes, cudaMemcpyHostToDevice, stream()));
        return;
    }
    if (bytes <= RING_MAX_COPY) return g_ring.copy(dst, src, bytes);
    host_wait("copy_from_host of pageable memory");
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream()));
    CUDA_CHECK(cudaStreamSynchronize(stream())); /* the source may change as soon as the call returns */
}

extern "C" void cuda_copy(void *dst, const void *src, size_t bytes) {
    init();
    if (bytes && dst != src) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
}

namespace {

/* The asynchronous copies' stream (kernels.def: copy_to_host_async): a copy engine moves the bytes while the
 * backend's stream computes. Each copy waits for an event recorded on the backend's stream when it is
 * issued, and records its lane's event when done; copy_lane_wait makes the backend's stream wait for that
 * event, on the device. Non-blocking: no implicit ordering with the legacy default stream either. */
cudaStream_t g_copy_stream = nullptr;
cudaEvent_t g_copy_issued, g_lane_done[2];

void lane_copy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, int lane) {
    init();
    if (lane != 0 && lane != 1) fatal("copy lane %d (the lanes are 0 and 1)", lane);
    if (!bytes) return;
    if (capturing()) { /* a graph: the copy in the captured stream's order (no overlap, no event) */
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, stream()));
        return;
    }
    if (!g_copy_stream) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&g_copy_stream, cudaStreamNonBlocking));
        CUDA_CHECK(cudaEventCreateWithFlags(&g_copy_issued, cudaEventDisableTiming));
        for (cudaEvent_t &ev : g_lane_done) CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    }
    CUDA_CHECK(cudaEventRecord(g_copy_issued, stream()));
    CUDA_CHECK(cudaStreamWaitEvent(g_copy_stream, g_copy_issued, 0));
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, g_copy_stream));
    CUDA_CHECK(cudaEventRecord(g_lane_done[lane], g_copy_stream));
}

}  // namespace

extern "C" void cuda_copy_to_host_async(void *dst, const void *src, size_t bytes, int lane) {
    lane_copy(dst, src, bytes, cudaMemcpyDeviceToHost, lane);
}

extern "C" void cuda_copy_from_host_async(void *dst, const void *src, size_t bytes, int lane) {
    lane_copy(dst, src, bytes, cudaMemcpyHostToDevice, lane);
}

extern "C" void cuda_copy_lane_wait(int lane) {
    init();
    if (lane != 0 && lane != 1) fatal("copy lane %d (the lanes are 0 and 1)", lane);
    /* none issued yet, or inside a capture (the copies went into the captured stream): nothing to wait for */
    if (g_copy_stream && !capturing()) CUDA_CHECK(cudaStreamWaitEvent(stream(), g_lane_done[lane], 0));
}

extern "C" void cuda_synchronize(void) {
    init();
    host_wait("synchronize");
    CUDA_CHECK(cudaDeviceSynchronize());
}

extern "C" void cuda_zero(void *dst, size_t bytes) {
    init();
    if (bytes) CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream()));
}

extern "C" int64_t cuda_host_waits(void) { return g_host_waits; }

extern "C" int64_t cuda_memory_releases(void) { return g_releases; }

extern "C" struct CUstream_st *cuda_stream(void) { return stream(); }

extern "C" const char *cuda_last_host_wait(void) { return g_last_wait; }
