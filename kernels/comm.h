/* Comm: the collectives of one group of ranks, as the autograd ops that span ranks see them.
 *
 * autograd/ must not know about MPI or NCCL (DESIGN §1), yet the context- and expert-parallel ops
 * (autograd/op_cp.c, op_ep.c) exchange data between the ranks of a group inside their forward and
 * backward rules. So, as with KernelBackend, the bottom layer only declares the interface: dist/ fills a
 * Comm from one of its groups (dist_comm in dist/dist.h) and train/ wires the Comm into the model, the
 * ops call the function pointers and nothing else.
 *
 * Conventions (those of dist/dist.h, whose collectives implement it):
 *   - every rank of the group calls the same collective in the same order with matching sizes; a
 *     collective returns when this rank's part is done, on the host and, for device buffers, on the
 *     device too (the ops may read the result at once: they synchronise the device);
 *   - buffers are raw: count and displacements are in elements of `t`, buffers live on `dev`. DEV_CPU
 *     buffers are allowed in a CUDA run (small host exchanges such as op_ep's per-expert row counts);
 *   - `send` and `recv` do not overlap (no in-place forms);
 *   - a Comm of size 1 needs no implementation: callers never call the function pointers of a group of
 *     one rank (a collective over one rank is a local copy, which the caller does with its backend, or
 *     the identity). comm_single() makes such a Comm; dist_comm() fills the pointers for any size.
 */
#ifndef MSA_COMM_H
#define MSA_COMM_H

#include <stdint.h>

#include "tensor.h"

typedef struct Comm {
    const char *name; /* the group in messages ("cp", "ep", "single") */
    int rank, size;   /* this rank's index in the group, and the group's size */
    const void *impl; /* the implementation's group (dist/: a DistGroup), NULL for comm_single */

    /* recv[r * count .. (r + 1) * count) = rank r's send[rank * count ..]: block r of send goes to rank r
     * (send and recv both hold size * count elements) */
    void (*all_to_all)(const struct Comm *c, const void *send, void *recv, int64_t count, DType t, Device dev);
    /* the same with per-rank blocks: send_counts[r] elements from send + send_displs[r] go to rank r,
     * and recv_counts[s] elements from rank s land at recv + recv_displs[s] (arrays of size elements;
     * recv_counts[s] must equal what rank s sends here, zero allowed) */
    void (*all_to_allv)(const struct Comm *c, const void *send, const int64_t *send_counts,
                        const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                        const int64_t *recv_displs, DType t, Device dev);
    /* recv[r * count .. (r + 1) * count) = rank r's send[count] */
    void (*all_gather)(const struct Comm *c, const void *send, void *recv, int64_t count, DType t, Device dev);
    /* recv[count] = the sum over ranks of their send[rank * count .. (rank + 1) * count) (send holds
     * size * count elements); float dtypes only (BF16 on device only) */
    void (*reduce_scatter_sum)(const struct Comm *c, const void *send, void *recv, int64_t count, DType t,
                               Device dev);
} Comm;

/* A group of this process alone: rank 0 of 1, no implementation. */
static inline Comm comm_single(void) { return (Comm){.name = "single", .rank = 0, .size = 1}; }

#endif
