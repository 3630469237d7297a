/* Distributed runs (DESIGN §6): MPI launches the ranks (`mpirun -np N build/train CONFIG`), gives each
 * its place (world rank, node-local rank) and carries the collectives on host memory; NCCL carries the
 * collectives on device memory in CUDA builds (rank 0 of each group makes the ncclUniqueId, MPI
 * broadcasts it). One process started without mpirun is an MPI singleton of one rank and behaves
 * exactly as a build without this module: every collective over a group of one rank is a local no-op.
 *
 * Groups: the world of W = dp * ep * cp ranks is a grid with cp varying fastest, then ep, then dp:
 *   world rank = (dp_index * ep + ep_index) * cp + cp_index
 * so the ranks of a context-parallel group (the most traffic, every layer) are neighbours, on one node
 * whenever cp divides the GPUs per node, and the data-parallel group (one reduce-scatter and one
 * all-gather per step) spans the nodes. The dp group of a rank holds the ranks with its ep and cp
 * indices, and likewise for ep and cp; the dp_cp group holds the ranks with its ep index.
 *
 * Collectives take a device: DEV_CPU buffers go through MPI, DEV_CUDA buffers through the group's NCCL
 * communicator (CUDA builds; made for every group of more than one rank but the world, whose
 * collectives are host-only unless dist.ep > 1: expert parallelism reduces the parameters every rank
 * holds over the world). None of them can wait forever: each waits at most Dist.timeout_s for
 * the other ranks, then ends the job with a message that names the collective and the group (a rank
 * that failed has already ended it with its own message; this catches a rank that hangs).
 *
 * Errors: dist_init makes fatal() (kernels/util.c) tag its message with the rank and call MPI_Abort
 * when the world has more than one rank, so a failing rank ends the whole job with its message and
 * the others never wait for it. */
#ifndef MSA_DIST_H
#define MSA_DIST_H

#include <stdbool.h>
#include <stdint.h>

#include <mpi.h>

#include "../kernels/comm.h"
#include "../kernels/tensor.h"

/* element types; BF16 and U8 only move (no host reductions of them) */
typedef enum { DIST_F32 = 0, DIST_F64, DIST_BF16, DIST_I32, DIST_I64, DIST_U64, DIST_U8 } DistType;
typedef enum { DIST_SUM = 0, DIST_MAX, DIST_MIN } DistOp;

struct Dist;

typedef struct DistGroup {
    const char *name;     /* "world", "dp", "ep", "cp": for messages */
    int rank, size;       /* this rank's index in the group, and the group's size */
    MPI_Comm comm;        /* MPI_COMM_NULL in a single process without MPI */
    void *nccl;           /* ncclComm_t of the group (CUDA builds, device collectives), or NULL */
    /* a second ncclComm_t of the same ranks for the collectives in flight (dist_start_*; the ZeRO groups
     * only), or NULL: they run on another stream, concurrently with the group's other collectives, and
     * NCCL orders nothing between two streams' operations on one communicator */
    void *nccl_side;
    struct Dist *dist;    /* the context: timeout, CUDA stream */
} DistGroup;

/* Everything distributed about one process. A zeroed Dist is not valid: use dist_init (a process that
 * may be one of several MPI ranks) or dist_single (one process, no MPI: tests that drive the trainer
 * in-process). */
typedef struct Dist {
    bool mpi;                 /* we initialised MPI and must finalise it */
    int rank, size;           /* world */
    int local_rank, local_size; /* among the ranks on this node (one device per local rank) */
    int dp, ep, cp;           /* group sizes, dp * ep * cp = size (after dist_setup) */
    DistGroup world, dp_group, ep_group, cp_group;
    /* the dp * cp ranks that share this rank's ep index: they hold the same copy of every parameter
     * (context parallelism splits tokens, not weights), so ZeRO-1 shards the optimizer and sums the
     * gradients over them. The dp or cp group itself when the other has one rank (no extra communicator). */
    DistGroup dp_cp_group;
    double timeout_s;         /* the longest a collective waits for the other ranks (0 = forever) */
    Device device;            /* where the training tensors live (dist_setup) */
    int cuda_device;          /* the GPU of this rank (CUDA), -1 otherwise */
    /* two ranks of the job run on one GPU (found at set-up by their devices' UUIDs), which NCCL refuses:
     * the device collectives go through MPI with host staging instead (dist/staged.c) */
    bool gpu_shared;
    void *stream;             /* cudaStream_t the NCCL collectives run on, or NULL */
    void *side_stream;        /* cudaStream_t of the collectives started by dist_start_* (non-blocking: they
                                 run beside the compute kernels), or NULL */
    bool setup;               /* dist_setup has run */
    char tag[32];             /* "rank 3" in messages (empty for a single rank) */
} Dist;

/* MPI_Init (as a singleton without mpirun), world rank and size, node-local rank; with more than one
 * rank, installs the fatal() hook that aborts the job. Call first thing in main. */
void dist_init(Dist *d, int *argc, char ***argv);
/* One process without MPI: every group of size 1, no MPI call ever made. */
void dist_single(Dist *d);
/* The longest a collective waits for the other ranks (0 = forever), from dist.timeout: set as soon as the
 * config is read, so that the collectives before dist_setup (the start-up checks) time out too. */
void dist_set_timeout(Dist *d, double timeout_s);
/* After the config is known: the groups for dp * ep * cp = world size (dp = 0: world / (ep * cp)); the
 * device of this rank (CUDA with more than one rank: the local rank's GPU by cudaSetDevice, which must
 * come before the first CUDA call, modulo the node's GPUs when there are fewer; a stream and the NCCL
 * communicators, or none when ranks share a GPU: Dist.gpu_shared); the collective timeout.
 * The ranks first meet in a barrier under the timeout: MPI_Comm_split and the NCCL set-up have no
 * timeout of their own, so every rank must be there before they start. `where` prefixes error messages
 * (the config file). Stops with a message when the sizes do not multiply to the world size. */
void dist_setup(Dist *d, int dp, int ep, int cp, double timeout_s, Device device, const char *where);
/* MPI_Finalize (and NCCL teardown) when dist_init initialised MPI; nothing for dist_single. */
void dist_finalize(Dist *d);

size_t dist_type_size(DistType t);

/* ---- collectives over a group; buf on `dev` (DEV_CPU: MPI on host memory, DEV_CUDA: NCCL) ---------- */

/* In place: buf[count] = op over the group's ranks of their buf. */
void dist_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op, Device dev);
/* recv[count] = op over ranks of send[rank * count .. (rank + 1) * count); send has size * count
 * elements. In place when recv == send + rank * count (NCCL's convention; the result then lands in
 * this rank's slice of send, and the rest of send is clobbered). */
void dist_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op,
                         Device dev);
/* recv[r * count .. (r + 1) * count) = rank r's send[count]. In place when send == recv + rank * count. */
void dist_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, Device dev);
/* recv[r * count ..] = rank r's send[rank * count ..]: block r of send goes to rank r. */
void dist_all_to_all(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, Device dev);
/* The same with per-rank counts and displacements (elements; arrays of group size). */
void dist_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                      void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t, Device dev);
/* buf[count] of rank `root` to every rank. */
void dist_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root, Device dev);

/* Host memory only (MPI): the root's recv[r * count ..] = rank r's send[count] (recv is ignored on
 * other ranks), and its inverse; checkpoints gather and scatter the optimizer shards with them. */
void dist_gather_host(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, int root);
void dist_scatter_host(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, int root);
/* Every rank of the group has arrived (host, with the timeout). */
void dist_barrier(const DistGroup *g);
/* The same, its timeout message saying what the ranks were to arrive from (`what`, e.g. "reading its
 * config and data files"), since the rank that is missing has not yet said anything itself. */
void dist_meet(const DistGroup *g, const char *what);

/* ---- collectives in flight: gradient buckets (train/grad_buckets.h) ---------------------------------
 * dist_start_* returns at once; the collective runs beside the caller's computation (MPI: it progresses
 * inside MPI calls, so poll it with dist_test; NCCL: on Dist.side_stream, after the kernels issued
 * before the start) and is done after dist_test returns true or dist_finish returns. Its buffer must
 * not be touched until then. Ranks start them in the same order per group, as every collective. */
typedef struct DistPending {
    const DistGroup *g;
    const char *what;       /* names it in the timeout message (a string that outlives it) */
    Device dev;
    bool active;            /* started and not yet seen done */
    MPI_Request req;        /* DEV_CPU */
    int *mpi_counts;        /* MPI's int counts and displacements: kept until completion, as MPI requires */
    void *done;             /* cudaEvent_t recorded on the side stream after the NCCL calls (DEV_CUDA) */
    /* MPI's in-place reduce-scatter leaves this rank's result at the start of the buffer: moved to the
     * rank's part on completion */
    char *move_to;
    const char *move_from;
    size_t move_bytes;
} DistPending;

/* In place, per-rank parts: buf holds the group's parts one after another, rank r's counts[r] elements
 * (zero allowed); on completion this rank's part holds op over the group's ranks of their copies of that
 * part, and the other parts are clobbered. The same sums, element by element, as dist_reduce_scatter of
 * the whole range (MPI: bit for bit with Open MPI 4.1, tests/test_dist_overlap.c; NCCL: one reduce per
 * part, whose order of summation may differ from its reduce-scatter's in the last bits). */
void dist_start_reduce_scatter_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op,
                                     Device dev, const char *what, DistPending *p);
/* In place, per-rank parts laid out as above: every rank's part goes to every rank. */
void dist_start_all_gather_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, Device dev,
                                 const char *what, DistPending *p);
/* Lets it progress; true once it is done (then, and for one never started, a no-op). */
bool dist_test(DistPending *p);
/* Waits until it is done, at most Dist.timeout_s (then ends the job naming p->what and the group). */
void dist_finish(DistPending *p);

/* The group as a Comm (kernels/comm.h) for the autograd ops that span ranks: rank and size, and the
 * collectives above behind its function pointers (DType mapped to DistType). g must outlive c; every
 * size works, one included. */
void dist_comm(Comm *c, const DistGroup *g);

#endif
