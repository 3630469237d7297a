/* MPI setup, groups, and the collectives on host memory (format and contracts in dist.h).
 *
 * Every MPI collective here is the nonblocking form (MPI_Iallreduce, ...) completed by polling
 * MPI_Test against a deadline, rather than the blocking call: a blocking MPI collective has no
 * timeout, and a rank that hangs outside MPI would leave the others waiting forever. A rank that
 * fails calls fatal(), whose hook (installed by dist_init) calls MPI_Abort, so the job ends at once
 * with that rank's message; a rank that crashes is seen by mpirun, which ends the job. */
#include "dist.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../kernels/util.h"
#include "dist_internal.h"

/* ---- errors ------------------------------------------------------------------------------------- */

/* fatal()'s hook with more than one rank: the message is printed already; take every rank down. The
 * pause first: mpirun forwards a rank's stderr asynchronously, and an immediate MPI_Abort can tear the job
 * down before the message is forwarded (seen under load: the job ended with status 1 and no message). */
static void abort_job(void *ctx) {
    (void)ctx;
    fflush(stdout);
    fflush(stderr);
    struct timespec forward_time = {0, 300 * 1000 * 1000};
    nanosleep(&forward_time, NULL);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

void dist_wait_begin(DistWait *w, const DistGroup *g, const char *what) {
    w->g = g;
    w->what = what;
    w->start = wall_seconds();
    w->polls = 0;
}

void dist_wait_poll(DistWait *w) {
    /* the first few thousand polls spin (a collective among ranks in step takes microseconds); after
     * that, sleep 50 us between polls so that a waiting rank yields its core */
    if (++w->polls < 2000) return;
    const Dist *d = w->g->dist;
    double waited = wall_seconds() - w->start;
    if (d->timeout_s > 0 && waited > d->timeout_s)
        fatal("%s over the %s group (%d ranks) did not complete within dist.timeout = %g s: another rank has failed "
              "or hangs (a failed rank's own message comes first); raise dist.timeout if a rank is legitimately "
              "busy that long (e.g. rank 0 writing a large checkpoint)",
              w->what, w->g->name, w->g->size, d->timeout_s);
    struct timespec ts = {0, 50 * 1000};
    nanosleep(&ts, NULL);
}

static void mpi_wait(const DistGroup *g, MPI_Request *req, const char *what) {
    DistWait w;
    dist_wait_begin(&w, g, what);
    for (;;) {
        int done = 0;
        MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (done) return;
        dist_wait_poll(&w);
    }
}

/* ---- types -------------------------------------------------------------------------------------- */

size_t dist_type_size(DistType t) {
    static const size_t sizes[] = {4, 8, 2, 4, 8, 8, 1};
    return sizes[t];
}

static MPI_Datatype mpi_type(DistType t) {
    switch (t) {
    case DIST_F32: return MPI_FLOAT;
    case DIST_F64: return MPI_DOUBLE;
    case DIST_BF16: return MPI_UINT16_T; /* moved, never reduced */
    case DIST_I32: return MPI_INT32_T;
    case DIST_I64: return MPI_INT64_T;
    case DIST_U64: return MPI_UINT64_T;
    case DIST_U8: return MPI_UINT8_T;
    }
    return MPI_DATATYPE_NULL;
}

static MPI_Op mpi_op(DistType t, DistOp op, const char *what) {
    if (t == DIST_BF16 || t == DIST_U8) fatal("%s: host reductions of bf16 or byte data are not supported", what);
    return op == DIST_SUM ? MPI_SUM : op == DIST_MAX ? MPI_MAX : MPI_MIN;
}

/* MPI counts are int: a CPU collective of more elements per rank is far beyond any CPU run (GPU runs
 * move tensors through NCCL, whose counts are size_t). */
static int mpi_count(const DistGroup *g, int64_t count, const char *what) {
    if (count < 0 || count > INT_MAX)
        fatal("%s over the %s group: %lld elements per rank exceed MPI's int count", what, g->name, (long long)count);
    return (int)count;
}

static void check_group(const DistGroup *g, const char *what) {
    if (!g || !g->dist) fatal("%s: the distributed context is not set up (dist_init / dist_single)", what);
}

/* Device buffers of a group of one rank still need their copy (reduce-scatter and all-gather out of
 * place); CPU buffers need memmove, device buffers the device's copy. */
static void local_copy(void *dst, const void *src, size_t bytes, Device dev) {
    if (dst == src || bytes == 0) return;
    if (dev == DEV_CPU) memmove(dst, src, bytes);
    else dist_nccl_copy(dst, src, bytes);
}

#ifndef MSA_CUDA
/* A CPU-only build: device collectives cannot be asked for (train.device = "cuda" is refused earlier). */
static noreturn void no_cuda(void) { fatal("dist: a device collective in a build without CUDA"); }
void dist_nccl_setup(Dist *d, const char *where) {
    (void)d, (void)where;
    no_cuda();
}
void dist_nccl_teardown(Dist *d) { (void)d; }
void dist_nccl_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op) {
    (void)g, (void)buf, (void)count, (void)t, (void)op;
    no_cuda();
}
void dist_nccl_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op) {
    (void)g, (void)send, (void)recv, (void)count, (void)t, (void)op;
    no_cuda();
}
void dist_nccl_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t) {
    (void)g, (void)send, (void)recv, (void)count, (void)t;
    no_cuda();
}
void dist_nccl_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                           void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t) {
    (void)g, (void)send, (void)send_counts, (void)send_displs, (void)recv, (void)recv_counts, (void)recv_displs, (void)t;
    no_cuda();
}
void dist_nccl_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root) {
    (void)g, (void)buf, (void)count, (void)t, (void)root;
    no_cuda();
}
void dist_nccl_start_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op, bool reduce,
                           DistPending *p) {
    (void)g, (void)buf, (void)counts, (void)t, (void)op, (void)reduce, (void)p;
    no_cuda();
}
bool dist_nccl_test(DistPending *p) {
    (void)p;
    no_cuda();
}
void dist_nccl_copy(void *dst, const void *src, size_t bytes) {
    (void)dst, (void)src, (void)bytes;
    no_cuda();
}
#endif

/* ---- setup -------------------------------------------------------------------------------------- */

static void group_single(DistGroup *g, const char *name, Dist *d) {
    *g = (DistGroup){.name = name, .rank = 0, .size = 1, .comm = MPI_COMM_NULL, .nccl = NULL, .dist = d};
}

void dist_single(Dist *d) {
    memset(d, 0, sizeof(*d));
    d->size = d->local_size = d->dp = d->ep = d->cp = 1;
    d->cuda_device = -1;
    group_single(&d->world, "world", d);
    group_single(&d->dp_group, "dp", d);
    group_single(&d->ep_group, "ep", d);
    group_single(&d->cp_group, "cp", d);
    group_single(&d->dp_cp_group, "dp*cp", d);
}

void dist_init(Dist *d, int *argc, char ***argv) {
    dist_single(d);
    /* Started without mpirun (OpenMPI sets OMPI_COMM_WORLD_SIZE for its ranks): an isolated singleton,
     * which skips starting a helper daemon (orted) that only MPI_Comm_spawn would need, so a plain
     * build/train starts as fast as before MPI. A user's own setting wins; other MPIs ignore it. */
    if (!getenv("OMPI_COMM_WORLD_SIZE")) setenv("OMPI_MCA_ess_singleton_isolated", "1", 0);
    /* FUNNELED: the kernels' OpenMP threads never call MPI; the main thread makes every MPI call */
    int provided = 0;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        fatal("MPI_Init failed (run under mpirun, or check the MPI installation)");
    d->mpi = true;
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->size);
    d->world.rank = d->rank;
    d->world.size = d->size;
    d->world.comm = MPI_COMM_WORLD;
    /* the ranks that share this node's memory: the node-local rank picks the GPU */
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d->rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &d->local_rank);
    MPI_Comm_size(node, &d->local_size);
    MPI_Comm_free(&node);
    if (d->size > 1) {
        snprintf(d->tag, sizeof d->tag, "rank %d", d->rank);
        fatal_set_hook(abort_job, NULL, d->tag);
    }
}

static void split(Dist *d, DistGroup *g, const char *name, int color, int key) {
    group_single(g, name, d);
    MPI_Comm c;
    if (MPI_Comm_split(MPI_COMM_WORLD, color, key, &c) != MPI_SUCCESS)
        fatal("MPI_Comm_split of the %s group failed", name);
    g->comm = c;
    MPI_Comm_rank(c, &g->rank);
    MPI_Comm_size(c, &g->size);
}

void dist_set_timeout(Dist *d, double timeout_s) { d->timeout_s = timeout_s; }

void dist_setup(Dist *d, int dp, int ep, int cp, double timeout_s, Device device, const char *where) {
    if (d->setup) fatal("dist_setup: called twice");
    d->timeout_s = timeout_s;
    d->device = device;
    if (ep < 1 || cp < 1 || dp < 0)
        fatal("%s: dist.dp = %d, dist.ep = %d, dist.cp = %d: ep and cp must be >= 1, dp >= 0", where, dp, ep, cp);
    if (dp == 0) {
        if (d->size % (ep * cp))
            fatal("%s: dist.dp = 0 takes the ranks left by dist.ep * dist.cp = %d, but %d ranks are not a multiple "
                  "of it",
                  where, ep * cp, d->size);
        dp = d->size / (ep * cp);
    }
    if ((int64_t)dp * ep * cp != d->size)
        fatal("%s: dist.dp * dist.ep * dist.cp = %d * %d * %d = %lld, but the job has %d rank%s (mpirun -np); the "
              "product must equal the number of ranks (dist.dp = 0 takes whatever ep and cp leave)",
              where, dp, ep, cp, (long long)dp * ep * cp, d->size, d->size == 1 ? "" : "s");
    d->dp = dp;
    d->ep = ep;
    d->cp = cp;
    if (d->mpi && d->size > 1) {
        /* a rank still opening a file on a stuck file system would otherwise leave the others in
         * MPI_Comm_split, which has no timeout, forever */
        dist_meet(&d->world, "its start-up, before the groups are made");
        int dp_i = d->rank / (ep * cp), ep_i = (d->rank / cp) % ep, cp_i = d->rank % cp;
        split(d, &d->dp_group, "dp", ep_i * cp + cp_i, dp_i);
        split(d, &d->ep_group, "ep", dp_i * cp + cp_i, ep_i);
        split(d, &d->cp_group, "cp", dp_i * ep + ep_i, cp_i);
        if (dp > 1 && cp > 1) split(d, &d->dp_cp_group, "dp*cp", ep_i, dp_i * cp + cp_i);
    }
    /* one rank keeps the CUDA backend's own device choice and needs no communicator */
    if (device == DEV_CUDA && d->size > 1) dist_nccl_setup(d, where);
    if (!(dp > 1 && cp > 1)) { /* dp * cp ranks are the dp or the cp group: share its communicators */
        d->dp_cp_group = cp > 1 ? d->cp_group : d->dp_group;
        d->dp_cp_group.name = "dp*cp";
    }
    d->setup = true;
}

bool dist_group_is_alias(const Dist *d, const DistGroup *g) {
    return g == &d->dp_cp_group && !(d->dp > 1 && d->cp > 1);
}

void dist_finalize(Dist *d) {
    if (d->device == DEV_CUDA && d->setup) dist_nccl_teardown(d);
    if (d->mpi) {
        DistGroup *groups[] = {&d->dp_group, &d->ep_group, &d->cp_group, &d->dp_cp_group};
        for (int i = 0; i < 4; i++)
            if (groups[i]->comm != MPI_COMM_NULL && groups[i]->comm != MPI_COMM_WORLD && !dist_group_is_alias(d, groups[i]))
                MPI_Comm_free(&groups[i]->comm);
        fatal_set_hook(NULL, NULL, NULL);
        MPI_Finalize();
    }
    d->mpi = false;
    d->setup = false;
}

/* ---- collectives -------------------------------------------------------------------------------- */

void dist_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op, Device dev) {
    check_group(g, "all_reduce");
    if (g->size == 1 || count == 0) return;
    if (dev == DEV_CUDA) {
        dist_nccl_all_reduce(g, buf, count, t, op);
        return;
    }
    MPI_Request req;
    MPI_Iallreduce(MPI_IN_PLACE, buf, mpi_count(g, count, "all_reduce"), mpi_type(t), mpi_op(t, op, "all_reduce"),
                   g->comm, &req);
    mpi_wait(g, &req, "all_reduce");
}

void dist_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op,
                         Device dev) {
    check_group(g, "reduce_scatter");
    size_t es = dist_type_size(t), bytes = (size_t)count * es;
    if (g->size == 1) {
        local_copy(recv, send, bytes, dev);
        return;
    }
    if (count == 0) return;
    if (dev == DEV_CUDA) {
        dist_nccl_reduce_scatter(g, send, recv, count, t, op);
        return;
    }
    int n = mpi_count(g, count, "reduce_scatter");
    MPI_Request req;
    bool in_place = (const char *)recv == (const char *)send + (size_t)g->rank * bytes;
    if (in_place) {
        /* MPI's in-place form leaves the result at the start of the buffer, NCCL's in the rank's slice */
        MPI_Ireduce_scatter_block(MPI_IN_PLACE, (void *)send, n, mpi_type(t), mpi_op(t, op, "reduce_scatter"), g->comm,
                                  &req);
        mpi_wait(g, &req, "reduce_scatter");
        if (g->rank) memmove(recv, send, bytes);
    } else {
        MPI_Ireduce_scatter_block(send, recv, n, mpi_type(t), mpi_op(t, op, "reduce_scatter"), g->comm, &req);
        mpi_wait(g, &req, "reduce_scatter");
    }
}

void dist_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, Device dev) {
    check_group(g, "all_gather");
    size_t bytes = (size_t)count * dist_type_size(t);
    if (g->size == 1) {
        local_copy(recv, send, bytes, dev);
        return;
    }
    if (count == 0) return;
    if (dev == DEV_CUDA) {
        dist_nccl_all_gather(g, send, recv, count, t);
        return;
    }
    int n = mpi_count(g, count, "all_gather");
    MPI_Request req;
    if ((const char *)send == (const char *)recv + (size_t)g->rank * bytes)
        MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, n, mpi_type(t), g->comm, &req);
    else MPI_Iallgather(send, n, mpi_type(t), recv, n, mpi_type(t), g->comm, &req);
    mpi_wait(g, &req, "all_gather");
}

void dist_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                      void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t, Device dev) {
    check_group(g, "all_to_allv");
    size_t es = dist_type_size(t);
    if (g->size == 1) {
        if (send_counts[0] != recv_counts[0])
            fatal("all_to_allv over one rank: it sends %lld elements to itself but expects %lld",
                  (long long)send_counts[0], (long long)recv_counts[0]);
        local_copy((char *)recv + (size_t)recv_displs[0] * es, (const char *)send + (size_t)send_displs[0] * es,
                   (size_t)send_counts[0] * es, dev);
        return;
    }
    if (dev == DEV_CUDA) {
        dist_nccl_all_to_allv(g, send, send_counts, send_displs, recv, recv_counts, recv_displs, t);
        return;
    }
    int *c = xmalloc(4 * (size_t)g->size * sizeof(int));
    int *sc = c, *sd = c + g->size, *rc = c + 2 * g->size, *rd = c + 3 * g->size;
    for (int r = 0; r < g->size; r++) {
        sc[r] = mpi_count(g, send_counts[r], "all_to_allv");
        sd[r] = mpi_count(g, send_displs[r], "all_to_allv");
        rc[r] = mpi_count(g, recv_counts[r], "all_to_allv");
        rd[r] = mpi_count(g, recv_displs[r], "all_to_allv");
    }
    MPI_Request req;
    MPI_Ialltoallv(send, sc, sd, mpi_type(t), recv, rc, rd, mpi_type(t), g->comm, &req);
    mpi_wait(g, &req, "all_to_allv");
    free(c);
}

void dist_all_to_all(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, Device dev) {
    check_group(g, "all_to_all");
    int64_t *c = xmalloc(2 * (size_t)g->size * sizeof(int64_t)), *counts = c, *displs = c + g->size;
    for (int r = 0; r < g->size; r++) {
        counts[r] = count;
        displs[r] = (int64_t)r * count;
    }
    dist_all_to_allv(g, send, counts, displs, recv, counts, displs, t, dev);
    free(c);
}

void dist_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root, Device dev) {
    check_group(g, "broadcast");
    if (g->size == 1 || count == 0) return;
    if (dev == DEV_CUDA) {
        dist_nccl_broadcast(g, buf, count, t, root);
        return;
    }
    MPI_Request req;
    MPI_Ibcast(buf, mpi_count(g, count, "broadcast"), mpi_type(t), root, g->comm, &req);
    mpi_wait(g, &req, "broadcast");
}

void dist_gather_host(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, int root) {
    check_group(g, "gather");
    if (g->size == 1) {
        local_copy(recv, send, (size_t)count * dist_type_size(t), DEV_CPU);
        return;
    }
    int n = mpi_count(g, count, "gather");
    MPI_Request req;
    MPI_Igather(send, n, mpi_type(t), recv, n, mpi_type(t), root, g->comm, &req);
    mpi_wait(g, &req, "gather");
}

void dist_scatter_host(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, int root) {
    check_group(g, "scatter");
    if (g->size == 1) {
        local_copy(recv, send, (size_t)count * dist_type_size(t), DEV_CPU);
        return;
    }
    int n = mpi_count(g, count, "scatter");
    MPI_Request req;
    MPI_Iscatter(send, n, mpi_type(t), recv, n, mpi_type(t), root, g->comm, &req);
    mpi_wait(g, &req, "scatter");
}

static void barrier(const DistGroup *g, const char *what) {
    check_group(g, "barrier");
    if (g->size == 1) return;
    MPI_Request req;
    MPI_Ibarrier(g->comm, &req);
    mpi_wait(g, &req, what);
}

void dist_barrier(const DistGroup *g) { barrier(g, "barrier"); }

void dist_meet(const DistGroup *g, const char *what) {
    char msg[256];
    snprintf(msg, sizeof msg, "the barrier of every rank arriving from %s", what);
    barrier(g, msg);
}

/* ---- collectives in flight --------------------------------------------------------------------- */

/* The element offset of rank r's part: the parts before it. */
static int64_t part_offset(const int64_t *counts, int r) {
    int64_t o = 0;
    for (int i = 0; i < r; i++) o += counts[i];
    return o;
}

/* MPI's int counts and displacements of the parts (2 * size ints), kept in p until completion. */
static void mpi_parts(const DistGroup *g, const int64_t *counts, const char *what, DistPending *p) {
    p->mpi_counts = xmalloc(2 * (size_t)g->size * sizeof(int));
    for (int r = 0; r < g->size; r++) {
        p->mpi_counts[r] = mpi_count(g, counts[r], what);
        p->mpi_counts[g->size + r] = mpi_count(g, part_offset(counts, r), what);
    }
}

static void start(const DistGroup *g, Device dev, const char *what, DistPending *p) {
    check_group(g, what);
    *p = (DistPending){.g = g, .what = what, .dev = dev, .req = MPI_REQUEST_NULL};
}

void dist_start_reduce_scatter_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op,
                                     Device dev, const char *what, DistPending *p) {
    start(g, dev, what, p);
    if (g->size == 1) return; /* the one part is its own sum */
    p->active = true;
    if (dev == DEV_CUDA) {
        dist_nccl_start_parts(g, buf, counts, t, op, true, p);
        return;
    }
    mpi_parts(g, counts, what, p);
    size_t es = dist_type_size(t);
    p->move_to = (char *)buf + (size_t)part_offset(counts, g->rank) * es;
    p->move_from = buf;
    p->move_bytes = (size_t)counts[g->rank] * es;
    MPI_Ireduce_scatter(MPI_IN_PLACE, buf, p->mpi_counts, mpi_type(t), mpi_op(t, op, what), g->comm, &p->req);
}

void dist_start_all_gather_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, Device dev,
                                 const char *what, DistPending *p) {
    start(g, dev, what, p);
    if (g->size == 1) return;
    p->active = true;
    if (dev == DEV_CUDA) {
        dist_nccl_start_parts(g, buf, counts, t, DIST_SUM, false, p);
        return;
    }
    mpi_parts(g, counts, what, p);
    MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, p->mpi_counts, p->mpi_counts + g->size, mpi_type(t),
                    g->comm, &p->req);
}

bool dist_test(DistPending *p) {
    if (!p->active) return true;
    if (p->dev == DEV_CUDA) {
        if (!dist_nccl_test(p)) return false;
    } else {
        int done = 0;
        MPI_Test(&p->req, &done, MPI_STATUS_IGNORE);
        if (!done) return false;
        if (p->move_bytes && p->move_to != p->move_from) memmove(p->move_to, p->move_from, p->move_bytes);
        free(p->mpi_counts);
        p->mpi_counts = NULL;
    }
    p->active = false;
    return true;
}

void dist_finish(DistPending *p) {
    if (!p->active) return;
    DistWait w;
    dist_wait_begin(&w, p->g, p->what);
    while (!dist_test(p)) dist_wait_poll(&w);
}

/* ---- the Comm interface (kernels/comm.h) -------------------------------------------------------- */

static DistType comm_type(DType t) {
    switch (t) {
    case DT_F32: return DIST_F32;
    case DT_F64: return DIST_F64;
    case DT_BF16: return DIST_BF16;
    case DT_I32: return DIST_I32;
    default: fatal("dist: dtype %s cannot be exchanged", dtype_name(t));
    }
}

static void comm_all_to_all(const Comm *c, const void *send, void *recv, int64_t count, DType t, Device dev) {
    dist_all_to_all(c->impl, send, recv, count, comm_type(t), dev);
}

static void comm_all_to_allv(const Comm *c, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                             void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DType t, Device dev) {
    dist_all_to_allv(c->impl, send, send_counts, send_displs, recv, recv_counts, recv_displs, comm_type(t), dev);
}

static void comm_all_gather(const Comm *c, const void *send, void *recv, int64_t count, DType t, Device dev) {
    dist_all_gather(c->impl, send, recv, count, comm_type(t), dev);
}

static void comm_reduce_scatter_sum(const Comm *c, const void *send, void *recv, int64_t count, DType t, Device dev) {
    dist_reduce_scatter(c->impl, send, recv, count, comm_type(t), DIST_SUM, dev);
}

void dist_comm(Comm *c, const DistGroup *g) {
    check_group(g, "dist_comm");
    *c = (Comm){
        .name = g->name,
        .rank = g->rank,
        .size = g->size,
        .impl = g,
        .all_to_all = comm_all_to_all,
        .all_to_allv = comm_all_to_allv,
        .all_gather = comm_all_gather,
        .reduce_scatter_sum = comm_reduce_scatter_sum,
    };
}
