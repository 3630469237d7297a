/* The device side of dist (CUDA builds): one GPU per node-local rank (more ranks than GPUs share them
 * round-robin, and then every device collective goes through MPI with host staging instead: dist/staged.c,
 * since NCCL refuses two ranks on one device), a CUDA stream for the
 * collectives, and an NCCL communicator per group of more than one rank (dp, ep, cp, dp*cp; the world's
 * collectives are host-only but under expert parallelism, whose ZeRO-1 of the parameters every rank holds
 * runs over it). Rank 0 of each group makes the ncclUniqueId and MPI broadcasts it.
 *
 * Timeouts: the communicators are nonblocking (ncclConfig_t.blocking = 0), so neither
 * ncclCommInitRank nor a collective ever blocks the host; the host polls ncclCommGetAsyncError and then
 * the stream, against Dist.timeout_s, and a collective that does not finish in time ends the job
 * through fatal() (MPI_Abort, which also tears down this process's CUDA context and NCCL's kernels).
 * No watchdog thread is needed: this is the pattern NCCL documents for fault tolerance.
 *
 * Ordering: the kernels run on the CUDA backend's one stream (cuda_stream(), kernels/cuda/cuda.h). Each
 * collective's stream first waits for an event recorded on it, so that the collective sees every kernel
 * issued before it, and is waited for on the host before the collective returns (the timeout needs it;
 * it also keeps host copies of the results simple), so that every kernel issued after it sees its
 * result. No ordering rests on the legacy default stream.
 *
 * Collectives in flight (dist_start_*: the gradient buckets reduced during the backward, the parameters
 * gathered after the update) run on a second, non-blocking stream instead, so that the backend's
 * kernels do not wait for them: the same event orders them after the kernels that wrote their buffer,
 * and an event recorded on the side stream after them says, when the host sees it complete
 * (dist_test), that their result is there. They use a second communicator of
 * their group (DistGroup.nccl_side, the ZeRO groups only): the backward's own exchanges (context and
 * expert parallel) may share the group's first one, and two streams' kernels on one communicator could
 * meet in different orders on different ranks. */
#ifdef MSA_CUDA

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "../kernels/cuda/cuda.h"
#include "../kernels/util.h"
#include "dist_internal.h"

#if NCCL_VERSION_CODE < 21400
#error "dist/nccl.c needs NCCL 2.14 or later (nonblocking communicators, ncclCommInitRankConfig)"
#endif

#define CUDA_OK(call)                                                                                               \
    do {                                                                                                            \
        cudaError_t err_ = (call);                                                                                  \
        if (err_ != cudaSuccess) fatal("%s failed: %s (%s:%d)", #call, cudaGetErrorString(err_), __FILE__, __LINE__); \
    } while (0)

/* Make stream s wait for the work issued so far on the backend's stream (one event, recorded again each
 * time: a wait takes the event as it was when the wait was issued). */
static void after_backend_work(cudaStream_t s) {
    static cudaEvent_t issued;
    if (!issued) CUDA_OK(cudaEventCreateWithFlags(&issued, cudaEventDisableTiming));
    CUDA_OK(cudaEventRecord(issued, cuda_stream()));
    CUDA_OK(cudaStreamWaitEvent(s, issued, 0));
}

/* The collectives' stream, after the backend's work so far. */
static cudaStream_t collective_stream(const DistGroup *g) {
    cudaStream_t s = (cudaStream_t)g->dist->stream;
    after_backend_work(s);
    return s;
}

static ncclDataType_t nccl_type(DistType t) {
    switch (t) {
    case DIST_F32: return ncclFloat32;
    case DIST_F64: return ncclFloat64;
    case DIST_BF16: return ncclBfloat16;
    case DIST_I32: return ncclInt32;
    case DIST_I64: return ncclInt64;
    case DIST_U64: return ncclUint64;
    case DIST_U8: return ncclUint8;
    }
    return ncclFloat32;
}

static ncclRedOp_t nccl_op(DistOp op) { return op == DIST_SUM ? ncclSum : op == DIST_MAX ? ncclMax : ncclMin; }

static ncclComm_t comm_of(const DistGroup *g, const char *what) {
    if (!g->nccl)
        fatal("%s over the %s group on device memory: the group has no NCCL communicator (only dp, ep, cp and dp*cp groups "
              "of more than one rank have one)",
              what, g->name);
    return (ncclComm_t)g->nccl;
}

/* After an NCCL call on a nonblocking communicator: wait until it is enqueued (ncclInProgress turns
 * into ncclSuccess), then, with stream set, until the stream has run it; fail on an NCCL or CUDA error
 * and on the timeout. */
static void nccl_wait(const DistGroup *g, ncclComm_t comm, ncclResult_t r, const char *what, bool stream) {
    if (r != ncclSuccess && r != ncclInProgress)
        fatal("%s over the %s group: NCCL error %s (%s)", what, g->name, ncclGetErrorString(r), ncclGetLastError(comm));
    DistWait w;
    dist_wait_begin(&w, g, what);
    for (;;) {
        ncclResult_t st = ncclSuccess;
        ncclCommGetAsyncError(comm, &st);
        if (st != ncclSuccess && st != ncclInProgress)
            fatal("%s over the %s group: NCCL error %s (%s)", what, g->name, ncclGetErrorString(st),
                  ncclGetLastError(comm));
        if (st == ncclSuccess) {
            if (!stream) return;
            cudaError_t q = cudaStreamQuery((cudaStream_t)g->dist->stream);
            if (q == cudaSuccess) return;
            if (q != cudaErrorNotReady) fatal("%s over the %s group: CUDA error %s", what, g->name, cudaGetErrorString(q));
        }
        dist_wait_poll(&w);
    }
}

static ncclComm_t comm_create(const DistGroup *g) {
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (g->rank == 0) {
        ncclResult_t r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) fatal("ncclGetUniqueId for the %s group: %s", g->name, ncclGetErrorString(r));
    }
    dist_broadcast(g, &id, (int64_t)sizeof id, DIST_U8, 0, DEV_CPU); /* over MPI, host memory */
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = NULL;
    ncclResult_t r = ncclCommInitRankConfig(&comm, g->size, id, g->rank, &config);
    nccl_wait(g, comm, r, "ncclCommInitRank", false);
    return comm;
}

static void comm_destroy(const DistGroup *g, void **slot) {
    if (!*slot) return;
    ncclComm_t comm = *slot;
    nccl_wait(g, comm, ncclCommFinalize(comm), "ncclCommFinalize", false);
    ncclCommDestroy(comm);
    *slot = NULL;
}

/* Do two ranks of the job use one GPU? Their devices' UUIDs, gathered over the world (host memory). */
static bool gpu_shared(const Dist *d) {
    struct cudaDeviceProp prop;
    CUDA_OK(cudaGetDeviceProperties(&prop, d->cuda_device));
    unsigned char *all = xmalloc((size_t)d->size * sizeof prop.uuid.bytes);
    dist_all_gather(&d->world, prop.uuid.bytes, all, (int64_t)sizeof prop.uuid.bytes, DIST_U8, DEV_CPU);
    bool shared = false;
    for (int a = 0; a < d->size && !shared; a++)
        for (int b = a + 1; b < d->size && !shared; b++)
            shared = !memcmp(all + a * sizeof prop.uuid.bytes, all + b * sizeof prop.uuid.bytes, sizeof prop.uuid.bytes);
    free(all);
    return shared;
}

void dist_nccl_setup(Dist *d, const char *where) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0)
        fatal("%s: train.device = \"cuda\" but this node has no usable GPU (%s)", where,
              err != cudaSuccess ? cudaGetErrorString(err) : "no device");
    /* one rank per GPU; more ranks than GPUs on a node share them round-robin (staged collectives) */
    d->cuda_device = d->local_rank % n;
    CUDA_OK(cudaSetDevice(d->cuda_device));
    d->gpu_shared = gpu_shared(d);
    if (d->gpu_shared && d->rank == 0)
        printf("dist: %d ranks share a GPU (%d on this node, %d GPU%s): device collectives go through MPI with host "
               "staging instead of NCCL (slow; for tests)\n",
               d->size, d->local_size, n, n == 1 ? "" : "s");
    cudaStream_t s;
    CUDA_OK(cudaStreamCreate(&s));
    d->stream = s;
    cudaStream_t side;
    CUDA_OK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    d->side_stream = side;
    if (d->gpu_shared) return; /* no communicators: NCCL refuses two ranks on one device */
    /* dp_cp_group is still of one rank here unless it is a group of its own (dist_setup aliases it after) */
    DistGroup *groups[] = {&d->dp_group, &d->ep_group, &d->cp_group, &d->dp_cp_group};
    for (int i = 0; i < 4; i++)
        if (groups[i]->size > 1) groups[i]->nccl = comm_create(groups[i]);
    /* expert parallelism: ZeRO-1 of the parameters every rank holds (all but the routed experts) runs over
     * the world, which is the ep group itself when dp = cp = 1 */
    if (d->ep > 1) {
        if (d->world.size == d->ep) d->world.nccl = d->ep_group.nccl;
        else d->world.nccl = comm_create(&d->world);
        d->world.nccl_side = comm_create(&d->world);
    }
    /* the dp * cp group's side communicator, made on the group dist_setup will alias when it is the dp or
     * the cp group */
    DistGroup *zero = d->dp > 1 && d->cp > 1 ? &d->dp_cp_group : d->cp > 1 ? &d->cp_group : &d->dp_group;
    if (zero->size > 1) zero->nccl_side = comm_create(zero);
}

void dist_nccl_teardown(Dist *d) {
    DistGroup *groups[] = {&d->dp_group, &d->ep_group, &d->cp_group, &d->dp_cp_group};
    for (int i = 0; i < 4; i++) {
        DistGroup *g = groups[i];
        if (dist_group_is_alias(d, g)) continue;
        comm_destroy(g, &g->nccl);
        comm_destroy(g, &g->nccl_side);
    }
    if (d->world.size != d->ep) comm_destroy(&d->world, &d->world.nccl);
    d->world.nccl = NULL;
    comm_destroy(&d->world, &d->world.nccl_side);
    if (d->stream) cudaStreamDestroy((cudaStream_t)d->stream);
    if (d->side_stream) cudaStreamDestroy((cudaStream_t)d->side_stream);
    d->stream = d->side_stream = NULL;
}

void dist_nccl_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op) {
    if (g->dist->gpu_shared) {
        dist_staged_all_reduce(g, buf, count, t, op);
        return;
    }
    ncclComm_t comm = comm_of(g, "all_reduce");
    ncclResult_t r = ncclAllReduce(buf, buf, (size_t)count, nccl_type(t), nccl_op(op), comm, collective_stream(g));
    nccl_wait(g, comm, r, "all_reduce", true);
}

void dist_nccl_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op) {
    if (g->dist->gpu_shared) {
        dist_staged_reduce_scatter(g, send, recv, count, t, op);
        return;
    }
    ncclComm_t comm = comm_of(g, "reduce_scatter");
    ncclResult_t r = ncclReduceScatter(send, recv, (size_t)count, nccl_type(t), nccl_op(op), comm, collective_stream(g));
    nccl_wait(g, comm, r, "reduce_scatter", true);
}

void dist_nccl_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t) {
    if (g->dist->gpu_shared) {
        dist_staged_all_gather(g, send, recv, count, t);
        return;
    }
    ncclComm_t comm = comm_of(g, "all_gather");
    ncclResult_t r = ncclAllGather(send, recv, (size_t)count, nccl_type(t), comm, collective_stream(g));
    nccl_wait(g, comm, r, "all_gather", true);
}

void dist_nccl_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                           void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t) {
    if (g->dist->gpu_shared) {
        dist_staged_all_to_allv(g, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
        return;
    }
    ncclComm_t comm = comm_of(g, "all_to_allv");
    cudaStream_t s = collective_stream(g);
    size_t es = dist_type_size(t);
    ncclDataType_t nt = nccl_type(t);
    /* point-to-point pairs inside one group call: NCCL schedules them together without deadlock */
    ncclResult_t r = ncclGroupStart();
    for (int p = 0; p < g->size && r == ncclSuccess; p++) {
        if (send_counts[p] > 0)
            r = ncclSend((const char *)send + (size_t)send_displs[p] * es, (size_t)send_counts[p], nt, p, comm, s);
        if ((r == ncclSuccess || r == ncclInProgress) && recv_counts[p] > 0)
            r = ncclRecv((char *)recv + (size_t)recv_displs[p] * es, (size_t)recv_counts[p], nt, p, comm, s);
        if (r == ncclInProgress) r = ncclSuccess;
    }
    ncclResult_t e = ncclGroupEnd();
    nccl_wait(g, comm, r != ncclSuccess ? r : e, "all_to_allv", true);
}

void dist_nccl_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root) {
    if (g->dist->gpu_shared) {
        dist_staged_broadcast(g, buf, count, t, root);
        return;
    }
    ncclComm_t comm = comm_of(g, "broadcast");
    ncclResult_t r = ncclBroadcast(buf, buf, (size_t)count, nccl_type(t), root, comm, collective_stream(g));
    nccl_wait(g, comm, r, "broadcast", true);
}

/* Per-rank parts as one NCCL group on the side stream and the group's side communicator: a reduce-scatter of unequal parts is a reduce of
 * each part to its rank, an all-gather of them a broadcast of each part from its rank (in place: NCCL
 * allows sendbuff == recvbuff for both). */
void dist_nccl_start_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op, bool reduce,
                           DistPending *p) {
    if (g->dist->gpu_shared) {
        dist_staged_parts(g, buf, counts, t, op, reduce, p);
        return;
    }
    const char *what = p->what;
    if (!g->nccl_side)
        fatal("%s over the %s group on device memory: the group has no side communicator (only the ZeRO groups, "
              "dp*cp and the world under expert parallelism, have one)",
              what, g->name);
    ncclComm_t comm = g->nccl_side;
    cudaStream_t side = (cudaStream_t)g->dist->side_stream;
    cudaEvent_t done;
    CUDA_OK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    after_backend_work(side); /* after the kernels that wrote buf */
    size_t es = dist_type_size(t), offset = 0;
    ncclDataType_t nt = nccl_type(t);
    ncclResult_t r = ncclGroupStart();
    for (int k = 0; k < g->size && (r == ncclSuccess || r == ncclInProgress); k++) {
        void *part = (char *)buf + offset * es;
        if (counts[k] > 0)
            r = reduce ? ncclReduce(part, part, (size_t)counts[k], nt, nccl_op(op), k, comm, side)
                       : ncclBroadcast(part, part, (size_t)counts[k], nt, k, comm, side);
        offset += (size_t)counts[k];
    }
    ncclResult_t e = ncclGroupEnd();
    /* enqueued (a nonblocking communicator may still be launching): only then does the event follow it */
    nccl_wait(g, comm, r != ncclSuccess && r != ncclInProgress ? r : e, what, false);
    CUDA_OK(cudaEventRecord(done, side));
    p->done = done;
}

bool dist_nccl_test(DistPending *p) {
    ncclComm_t comm = (ncclComm_t)p->g->nccl_side;
    ncclResult_t st = ncclSuccess;
    ncclCommGetAsyncError(comm, &st);
    if (st != ncclSuccess && st != ncclInProgress)
        fatal("%s over the %s group: NCCL error %s (%s)", p->what, p->g->name, ncclGetErrorString(st),
              ncclGetLastError(comm));
    cudaError_t q = cudaEventQuery((cudaEvent_t)p->done);
    if (q == cudaErrorNotReady) return false;
    if (q != cudaSuccess) fatal("%s over the %s group: CUDA error %s", p->what, p->g->name, cudaGetErrorString(q));
    CUDA_OK(cudaEventDestroy((cudaEvent_t)p->done));
    p->done = NULL;
    return true;
}

void dist_nccl_copy(void *dst, const void *src, size_t bytes) {
    CUDA_OK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_stream()));
}

#endif /* MSA_CUDA */
