/* The device collectives of ranks that share a GPU (CUDA builds): NCCL refuses two ranks of one
 * communicator on one device ("Duplicate GPU detected"), so when dist_nccl_setup finds a GPU shared
 * (Dist.gpu_shared) every device collective runs here instead: the device buffer is copied into
 * page-locked host memory, the host collective of dist.c runs over MPI (with its timeout), and the result
 * is copied back. This is for testing sequence-split context parallelism and the other multi-rank paths
 * on a machine with one GPU; it costs two host copies per collective and the kernels wait for them.
 *
 * MPI reduces no bf16: a bf16 reduction is widened to f32 on the host, reduced, and rounded back to
 * nearest even (NCCL sums bf16 in bf16, so the two transports may differ in the last bit).
 *
 * Ordering: the copies are cudaMemcpy on the legacy default stream, with which the backend's stream (a
 * blocking stream, cuda_stream()) synchronises, so they follow every kernel issued before and precede every
 * kernel issued after; the collectives in flight
 * (dist_start_*) complete before they return here. */
#ifdef MSA_CUDA

#include <string.h>

#include <cuda_runtime_api.h>

#include "../kernels/util.h"
#include "dist_internal.h"

#define CUDA_OK(call)                                                                                               \
    do {                                                                                                            \
        cudaError_t err_ = (call);                                                                                  \
        if (err_ != cudaSuccess) fatal("%s failed: %s (%s:%d)", #call, cudaGetErrorString(err_), __FILE__, __LINE__); \
    } while (0)

/* Grow-only page-locked host buffers, one per role (a collective's send and receive sides, and the f32
 * copy of a bf16 reduction), kept for the process's life. */
enum { STAGE_SEND, STAGE_RECV, STAGE_WIDE, STAGE_COUNT };

static void *stage(int role, size_t bytes) {
    static void *buf[STAGE_COUNT];
    static size_t cap[STAGE_COUNT];
    if (bytes > cap[role]) {
        if (buf[role]) CUDA_OK(cudaFreeHost(buf[role]));
        cap[role] = bytes + bytes / 4 + 4096;
        CUDA_OK(cudaMallocHost(&buf[role], cap[role]));
    }
    return buf[role];
}

static void to_host(void *dst, const void *src, size_t bytes) {
    if (bytes) CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

static void to_device(void *dst, const void *src, size_t bytes) {
    if (bytes) CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* The host buffer a reduction runs on: data itself, or its f32 widening (STAGE_WIDE) for bf16. */
static void *widen(void *data, int64_t count, DistType t, DistType *rt) {
    *rt = t;
    if (t != DIST_BF16) return data;
    float *w = stage(STAGE_WIDE, (size_t)(count > 0 ? count : 1) * sizeof(float));
    for (int64_t i = 0; i < count; i++) w[i] = bf16_to_f32(((const uint16_t *)data)[i]);
    *rt = DIST_F32;
    return w;
}

/* count reduced values of wide (at element `at`) back into data's type at data[at ..] */
static void narrow(void *data, const void *wide, int64_t at, int64_t count, DistType t) {
    if (t != DIST_BF16) return;
    for (int64_t i = at; i < at + count; i++) ((uint16_t *)data)[i] = f32_to_bf16(((const float *)wide)[i]);
}

void dist_staged_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op) {
    const size_t bytes = (size_t)count * dist_type_size(t);
    void *h = stage(STAGE_SEND, bytes);
    to_host(h, buf, bytes);
    DistType rt;
    void *w = widen(h, count, t, &rt);
    dist_all_reduce(g, w, count, rt, op, DEV_CPU);
    narrow(h, w, 0, count, t);
    to_device(buf, h, bytes);
}

void dist_staged_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op) {
    const size_t es = dist_type_size(t), bytes = (size_t)count * es;
    const int64_t total = count * g->size;
    void *h = stage(STAGE_SEND, (size_t)total * es);
    to_host(h, send, (size_t)total * es);
    DistType rt;
    void *w = widen(h, total, t, &rt);
    /* in place: the sum lands in this rank's slice of the (widened) buffer */
    const size_t slice = (size_t)(g->rank * count) * dist_type_size(rt);
    dist_reduce_scatter(g, w, (char *)w + slice, count, rt, op, DEV_CPU);
    narrow(h, w, g->rank * count, count, t);
    to_device(recv, (char *)h + (size_t)(g->rank * count) * es, bytes);
}

void dist_staged_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t) {
    const size_t bytes = (size_t)count * dist_type_size(t);
    void *h = stage(STAGE_RECV, bytes * (size_t)g->size);
    /* in place: this rank's part at its slice of the gathered buffer */
    to_host((char *)h + (size_t)g->rank * bytes, send, bytes);
    dist_all_gather(g, (char *)h + (size_t)g->rank * bytes, h, count, t, DEV_CPU);
    to_device(recv, h, bytes * (size_t)g->size);
}

/* one past the last element the per-rank parts reach */
static int64_t extent(const int64_t *counts, const int64_t *displs, int size) {
    int64_t end = 0;
    for (int r = 0; r < size; r++)
        if (counts[r] > 0 && displs[r] + counts[r] > end) end = displs[r] + counts[r];
    return end;
}

void dist_staged_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                             void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t) {
    const size_t es = dist_type_size(t);
    const int64_t send_end = extent(send_counts, send_displs, g->size);
    const int64_t recv_end = extent(recv_counts, recv_displs, g->size);
    void *hs = stage(STAGE_SEND, (size_t)send_end * es), *hr = stage(STAGE_RECV, (size_t)recv_end * es);
    for (int r = 0; r < g->size; r++)
        to_host((char *)hs + (size_t)send_displs[r] * es, (const char *)send + (size_t)send_displs[r] * es,
                (size_t)send_counts[r] * es);
    dist_all_to_allv(g, hs, send_counts, send_displs, hr, recv_counts, recv_displs, t, DEV_CPU);
    /* only the received parts: the rest of recv stays as it was, as with NCCL */
    for (int r = 0; r < g->size; r++)
        to_device((char *)recv + (size_t)recv_displs[r] * es, (const char *)hr + (size_t)recv_displs[r] * es,
                  (size_t)recv_counts[r] * es);
}

void dist_staged_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root) {
    const size_t bytes = (size_t)count * dist_type_size(t);
    void *h = stage(STAGE_SEND, bytes);
    if (g->rank == root) to_host(h, buf, bytes);
    dist_broadcast(g, h, count, t, root, DEV_CPU);
    if (g->rank != root) to_device(buf, h, bytes);
}

void dist_staged_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op, bool reduce,
                       DistPending *p) {
    const size_t es = dist_type_size(t);
    int64_t total = 0, mine = 0;
    for (int r = 0; r < g->size; r++) {
        if (r == g->rank) mine = total;
        total += counts[r];
    }
    void *h = stage(STAGE_RECV, (size_t)total * es);
    to_host(h, buf, (size_t)total * es);
    DistPending hp;
    if (reduce) {
        DistType rt;
        void *w = widen(h, total, t, &rt);
        dist_start_reduce_scatter_parts(g, w, counts, rt, op, DEV_CPU, p->what, &hp);
        dist_finish(&hp);
        narrow(h, w, mine, counts[g->rank], t);
        to_device((char *)buf + (size_t)mine * es, (char *)h + (size_t)mine * es, (size_t)counts[g->rank] * es);
    } else {
        dist_start_all_gather_parts(g, h, counts, t, DEV_CPU, p->what, &hp);
        dist_finish(&hp);
        to_device(buf, h, (size_t)total * es);
    }
    p->active = false; /* done already: dist_test has nothing to wait for */
}

#endif /* MSA_CUDA */
