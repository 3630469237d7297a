/* Gradient buckets: ZeRO-1's collectives (train/trainer.c) in pieces that start while the step still
 * computes. The backward finishes the gradients block by block from the last block to the first
 * (Model.block_tape_start says where each block's backward ends), so a bucket, a contiguous range of
 * about dist.bucket_mb of the parameter store inside one ZeRO region, can be reduce-scattered as soon
 * as the backward has passed the blocks its parameters belong to, while the earlier blocks' backward
 * runs; only the buckets of the parameters outside the blocks (embedding, final norm, LM head: their
 * gradients are final only at the very end) and the last started ones are left to wait for after the
 * backward. Likewise the updated parameters are all-gathered bucket by bucket as soon as the update of
 * their region is done, and waited for only before their next use: in the next step's forward, just
 * before the first block that reads them (Model.before_block), so the gathers of later blocks overlap the
 * forward of the earlier ones.
 *
 * Each rank's part of a bucket is the bucket's overlap with its shard of the region, so the parts are
 * unequal (dist_start_reduce_scatter_parts), and each element is summed over the same ranks as the whole
 * region's reduce-scatter sums it: the results are those of dist.bucket_mb = 0 (one reduce-scatter per
 * region after the backward, one all-gather after the update), bit for bit where the MPI sums each
 * element in an order that does not depend on the message (tests/test_dist_overlap.c checks it; NCCL's
 * reduce per part may round differently from its reduce-scatter).
 *
 * Every rank starts the buckets in one fixed order (by the last block they wait for, then from the
 * store's end), which is what MPI and NCCL need of collectives on one group; when a bucket becomes ready
 * differs between ranks, its place in that order does not. */
#ifndef MSA_GRAD_BUCKETS_H
#define MSA_GRAD_BUCKETS_H

#include "../autograd/params.h"
#include "../dist/dist.h"

/* A contiguous range of the parameter store whose parameters the ranks of `group` hold alike: their
 * gradients are summed (reduce-scatter) and their AdamW state sharded over the group, rank i updating
 * the elements [begin + i * shard, begin + (i + 1) * shard) (Run.opt and Run.opt_experts hold the
 * moments of this rank's shard of region 0 and 1). The range, padding included, is
 * [begin, begin + group->size * shard); shard is a multiple of 64 elements (256 bytes: aligned for NCCL
 * and the vector kernels) when the group has more than one rank. */
typedef struct ZeroRegion {
    const DistGroup *group;
    int64_t begin, shard;
} ZeroRegion;

typedef struct GradBucket {
    int region;          /* its ZeroRegion */
    int64_t begin, end;  /* store elements */
    /* its gradients are final once the backward has finished blocks last_block .. n_layers - 1; -1: only
     * when the backward has ended (a parameter outside the blocks); n_layers: from the start (padding) */
    int last_block;
    /* the first block whose forward reads its parameters; -1: before the first (a parameter outside the
     * blocks: the embedding, and conservatively the final norm and LM head); n_layers: none (padding) */
    int first_block;
    bool gathering;      /* its all-gather is started and not yet waited for */
    int64_t *counts;     /* per rank of the region's group: the bucket's elements in that rank's shard */
    DistPending pending;
} GradBucket;

typedef struct GradBuckets {
    ParamStore *ps;
    const ZeroRegion *zero;
    GradBucket *b;        /* in the order every rank starts them */
    int n;                /* 0: no bucketing (dist.bucket_mb = 0, or no region spans several ranks) */
    int started;          /* the reduce-scatters of b[0 .. started) are started (or done) */
    int n_layers;
    int *block_tape_start; /* n_layers entries, filled by the forward (Model.block_tape_start points here) */
    bool gathering;       /* all-gathers in flight */
} GradBuckets;

/* Buckets of about bucket_mb MiB (at least 64 elements) over the regions of more than one rank; none
 * for bucket_mb = 0. The regions must outlive gb. */
void grad_buckets_init(GradBuckets *gb, ParamStore *ps, const ZeroRegion *zero, int n_zero, int n_layers,
                       double bucket_mb);
void grad_buckets_free(GradBuckets *gb);
/* Engine.backward_progress of the backward that completes the step's gradients (the last micro-batch's):
 * starts the buckets that have become final, in order, and lets the started ones progress. ctx: gb. */
void grad_buckets_backward_progress(void *ctx, int tape_index);
/* After that backward: starts the buckets not started yet. */
void grad_buckets_reduce_rest(GradBuckets *gb);
/* Waits for every bucket's reduce-scatter (with the timeout): each rank's shards then hold the summed
 * gradients, as after dist_reduce_scatter of each region. Resets for the next step. */
void grad_buckets_reduce_finish(GradBuckets *gb);
/* After the update of region `region`: starts the all-gather of its buckets' parameters. */
void grad_buckets_gather_start(GradBuckets *gb, int region);
/* Waits for the all-gathers of the buckets whose parameters the forward reads up to block `layer` (-1:
 * the embedding) and refreshes their BF16 shadow (CUDA); lets the others progress. */
void grad_buckets_gather_wait(GradBuckets *gb, int layer);
/* Model.before_block: grad_buckets_gather_wait. ctx: gb. */
void grad_buckets_before_block(void *ctx, int layer);
/* Waits for every all-gather still in flight (an evaluation, a checkpoint or sampling reads every
 * parameter), refreshing their BF16 shadow. */
void grad_buckets_gather_finish(GradBuckets *gb);

#endif
