/* Between dist.c (MPI, host memory), nccl.c (NCCL, device memory; CUDA builds only) and staged.c (device
 * memory through MPI, for ranks that share a GPU; CUDA builds only). */
#ifndef MSA_DIST_INTERNAL_H
#define MSA_DIST_INTERNAL_H

#include "dist.h"

/* Waiting for other ranks with a deadline: poll, then back off so that a waiting rank does not take the
 * core from a rank that shares it (oversubscribed CPU runs); past Dist.timeout_s, end the job with a
 * message naming the collective and the group. */
typedef struct DistWait {
    const DistGroup *g;
    const char *what;
    double start;
    long polls;
} DistWait;

/* Is g the dp_cp group standing in for the dp or cp group (sharing its communicators, which must be
 * freed once)? */
bool dist_group_is_alias(const Dist *d, const DistGroup *g);

void dist_wait_begin(DistWait *w, const DistGroup *g, const char *what);
void dist_wait_poll(DistWait *w);

/* nccl.c: device of this rank, CUDA stream and the groups' communicators; their teardown; the device
 * collectives (the same contracts as the public ones); a device-to-device copy for groups of one rank. */
void dist_nccl_setup(Dist *d, const char *where);
void dist_nccl_teardown(Dist *d);
void dist_nccl_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op);
void dist_nccl_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op);
void dist_nccl_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t);
void dist_nccl_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                           void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t);
void dist_nccl_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root);
/* The started forms of the per-rank-parts collectives on Dist.side_stream (p->done recorded after them),
 * and the test of their completion (true when done; errors and NCCL failures end the job). */
void dist_nccl_start_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op, bool reduce,
                           DistPending *p);
bool dist_nccl_test(DistPending *p);
void dist_nccl_copy(void *dst, const void *src, size_t bytes);

/* staged.c: the device collectives of dist_nccl_* for ranks that share a GPU (Dist.gpu_shared), through MPI
 * with page-locked host staging; the same contracts. dist_staged_parts completes before it returns. */
void dist_staged_all_reduce(const DistGroup *g, void *buf, int64_t count, DistType t, DistOp op);
void dist_staged_reduce_scatter(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t, DistOp op);
void dist_staged_all_gather(const DistGroup *g, const void *send, void *recv, int64_t count, DistType t);
void dist_staged_all_to_allv(const DistGroup *g, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                             void *recv, const int64_t *recv_counts, const int64_t *recv_displs, DistType t);
void dist_staged_broadcast(const DistGroup *g, void *buf, int64_t count, DistType t, int root);
void dist_staged_parts(const DistGroup *g, void *buf, const int64_t *counts, DistType t, DistOp op, bool reduce,
                       DistPending *p);

#endif
