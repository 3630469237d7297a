/* The parameter registry: every learnable tensor by name, in one persistent allocation for values
 * and one for gradients (as llm.c does). Names are the checkpoint dataset names
 * ("layers.3.attn.wq"). Frozen parameters have requires_grad = false and receive no gradient. */
#ifndef MSA_PARAMS_H
#define MSA_PARAMS_H

#include "../kernels/backend.h"

typedef enum { INIT_NORMAL = 0, INIT_ZEROS, INIT_ONES } InitKind;

typedef struct Param {
    Tensor *t;       /* value; t->grad is the gradient (persistent, accumulated across micro-steps) */
    InitKind init;
    float init_std;  /* INIT_NORMAL */
    bool decay;      /* AdamW weight decay applies (off for norms and embeddings by default) */
    float lr_scale;  /* multiplies the scheduled LR (e.g. a separate backbone LR) */
    int64_t offset;  /* element offset in the store's buffers */
    int64_t init_first; /* INIT_NORMAL: the values are elements [init_first, init_first + numel) of the
                           name's random stream (0 after params_add): a slice of a larger tensor, e.g.
                           an expert-parallel rank's experts, gets the values the whole tensor has there */
} Param;

typedef struct ParamStore {
    const KernelBackend *be;
    DType dtype;     /* F32 master weights (F64 in gradient checks) */
    Param *p;
    int n, cap;
    int64_t numel;   /* elements of each flat buffer (CUDA: with alignment gaps between parameters) */
    int64_t capacity;/* elements allocated per buffer, >= numel: the tail past numel (zero, no parameter's)
                        pads the store to a multiple of the ranks that shard it (params_reserve) */
    void *data, *grad;
    void *shadow;    /* CUDA with F32 master weights: a BF16 copy of data (numel elements), each
                        parameter's Tensor.shadow points into it; NULL on the CPU. See params_sync_shadow. */
    bool no_shadow;  /* set before params_allocate: no BF16 copy on CUDA either (train.weight_shadow = false);
                        the GEMMs then cast each F32 weight they read into the backend's scratch */
    int init_threads;/* set before params_allocate: threads that draw the initial values (0: one per online CPU);
                        the values do not depend on it */
    bool allocated;
} ParamStore;

void params_init(ParamStore *ps, const KernelBackend *be, DType dtype);
void params_free(ParamStore *ps);
/* Declare a parameter (before params_allocate). Names must be unique. */
Tensor *params_add(ParamStore *ps, const char *name, int ndim, const int64_t *shape, InitKind init, float std,
                   bool decay);
/* Allocate values and gradients, initialise every parameter from seed (each parameter's stream is
 * seeded from seed and its name, so adding a parameter never changes the others' values). */
void params_allocate(ParamStore *ps, uint64_t seed);
void params_zero_grad(ParamStore *ps);
/* Grow the allocated buffers (values, gradients, BF16 shadow) to `capacity` elements, moving every
 * parameter's pointers: the store's flat buffers can then be reduce-scattered and all-gathered in
 * equal contiguous shards (ZeRO-1, train/trainer.c). The tail is zero and stays so. No-op when the
 * buffers are that large already. */
void params_reserve(ParamStore *ps, int64_t capacity);
/* Move the parameters p[first..n) up so that p[first] starts at element `offset` (>= where it starts),
 * keeping their layout; values, gradients and shadow move along and the gap is zero (no parameter's).
 * ZeRO-1 over two groups (train/trainer.c) pads the store's first region, the parameters before `first`,
 * to a multiple of its ranks this way. numel and capacity grow by the gap. */
void params_move_from(ParamStore *ps, int first, int64_t offset);
/* Refresh the BF16 shadow copy of every parameter from the F32 master weights (one cast over the
 * whole store; a no-op when the store has no shadow, i.e. on the CPU). params_allocate and the CUDA
 * AdamW (which writes the shadow of each parameter it updates) keep it current by themselves; any
 * other code that writes parameter values on a CUDA store (checkpoint loading, imports, tests that
 * upload weights) must call this afterwards, or the GEMMs keep reading the old values. */
void params_sync_shadow(ParamStore *ps);
/* The same for the store elements [begin, end) only (clipped to the store; the padding has no shadow). */
void params_sync_shadow_range(ParamStore *ps, int64_t begin, int64_t end);
Param *params_find(ParamStore *ps, const char *name);
/* Set requires_grad of every parameter whose name contains `substring` (NULL = all). Returns count. */
int params_set_trainable(ParamStore *ps, const char *substring, bool trainable);
int64_t params_count(const ParamStore *ps, bool trainable_only);

#endif
