/* CUDA graphs of the backend's stream (kernels.def's GRAPH entries): a capture of everything issued on
 * stream() between graph_begin and graph_end, instantiated once and launched as one call.
 *
 * The capture is relaxed (cudaStreamCaptureModeRelaxed): an allocation during it (an arena chunk, a
 * library's lazy workspace) is allowed, and the graph keeps using that memory, which is right here: no
 * memory of ours is freed without memory_releases counting it, and memory released during a capture (a
 * scratch or arena chunk that grew) stays allocated with the graph, whose kernels captured before the
 * release still use it (release and take_retired, runtime.cu). Other threads' CUDA calls (NCCL's proxy) are not taken into it. A copy from the host during the capture would read its source at every launch, and the staging
 * ring (runtime.cu) reuses its memory: such copies go to page-locked memory of the capture's own,
 * allocated before the capture starts (allocating it during one could synchronise) and freed with the
 * graph. */
#include <string.h>

#include "common.cuh"

namespace msacuda {
namespace {

/* what one capture may copy from the host: the backward's seed of ones and such, a few bytes */
constexpr size_t CAPTURE_HOST_BYTES = (size_t)64 << 10;

struct CapturedCopies {
    char *host = nullptr; /* page-locked, CAPTURE_HOST_BYTES; non-NULL while a capture is under way */
    size_t used = 0;
};
CapturedCopies g_copies;

}  // namespace

void *capture_host_copy(const void *src, size_t bytes) {
    if (!g_copies.host) fatal("cuda: capture_host_copy outside a graph capture");
    if (g_copies.used + align256(bytes) > CAPTURE_HOST_BYTES)
        fatal("CUDA graph capture: the step copies more than %zu bytes from the host (a copy of %zu bytes after %zu); "
              "inputs that change go into fixed buffers before the launch (set train.cuda_graph = off for this "
              "configuration)",
              CAPTURE_HOST_BYTES, bytes, g_copies.used);
    char *at = g_copies.host + g_copies.used;
    memcpy(at, src, bytes);
    g_copies.used += align256(bytes);
    return at;
}

}  // namespace msacuda

using namespace msacuda;

namespace {

struct CudaGraph {
    cudaGraphExec_t exec;
    char *host_copies;            /* CapturedCopies.host of its capture */
    std::vector<void *> retired;  /* device memory released during its capture, which it still uses */
};

}  // namespace

extern "C" void cuda_graph_begin(void) {
    init();
    if (g_copies.host || capturing()) fatal("cuda graph_begin: a capture is already under way");
    CUDA_CHECK(cudaMallocHost((void **)&g_copies.host, CAPTURE_HOST_BYTES));
    g_copies.used = 0;
    CUDA_CHECK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeRelaxed));
}

extern "C" void *cuda_graph_end(int64_t *nodes) {
    init();
    if (!g_copies.host) fatal("cuda graph_end without graph_begin");
    cudaGraph_t graph = nullptr;
    /* a call the capture cannot take (a library's synchronisation, work on the legacy stream) invalidates it */
    cudaError_t err = cudaStreamEndCapture(stream(), &graph);
    if (err != cudaSuccess)
        fatal("CUDA graph capture of the training step failed: %s (%s); set train.cuda_graph = off for this "
              "configuration",
              cudaGetErrorName(err), cudaGetErrorString(err));
    size_t n = 0;
    CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &n));
    CudaGraph *g = new CudaGraph{nullptr, g_copies.host, take_retired()};
    err = cudaGraphInstantiate(&g->exec, graph, 0);
    if (err != cudaSuccess)
        fatal("CUDA graph of the training step (%zu nodes) cannot be instantiated: %s (%s); set train.cuda_graph = off "
              "for this configuration",
              n, cudaGetErrorName(err), cudaGetErrorString(err));
    CUDA_CHECK(cudaGraphDestroy(graph));
    g_copies = CapturedCopies{};
    if (nodes) *nodes = (int64_t)n;
    return g;
}

extern "C" void cuda_graph_launch(void *graph) {
    init();
    CUDA_CHECK(cudaGraphLaunch(((CudaGraph *)graph)->exec, stream()));
    LAUNCH_CHECK("graph");
}

extern "C" void cuda_graph_free(void *graph) {
    if (!graph) return;
    init();
    CudaGraph *g = (CudaGraph *)graph;
    host_wait("graph_free"); /* a launch may still read the graph's copies */
    CUDA_CHECK(cudaStreamSynchronize(stream()));
    CUDA_CHECK(cudaGraphExecDestroy(g->exec));
    CUDA_CHECK(cudaFreeHost(g->host_copies));
    for (void *p : g->retired) free_device(p);
    delete g;
}
