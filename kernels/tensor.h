/* Tensor: a plain descriptor of a contiguous, row-major array on one device.
 * Kernels read and write tensors through this struct and nothing else; the autograd fields
 * (grad, requires_grad) are carried along but kernels never look at them. */
#ifndef MSA_TENSOR_H
#define MSA_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* F64 exists for the float64 gradient checks and CPU references; models train in F32 on the CPU
 * and in BF16 activations / F32 master weights on CUDA. */
typedef enum { DT_F32 = 0, DT_F64, DT_BF16, DT_I32, DT_COUNT } DType;
typedef enum { DEV_CPU = 0, DEV_CUDA } Device;

#define TENSOR_MAX_DIMS 4

typedef struct Tensor {
    DType dtype;
    Device device;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    int64_t numel;
    void *data;
    struct Tensor *grad;  /* same shape, dtype and device; NULL until backward reaches it */
    struct Tensor *view_of; /* engine_view: the tensor whose data and gradient this one shares (its gradient is
                               made when one of them first needs it); NULL otherwise */
    bool requires_grad;
    bool is_param;        /* lives in the parameter store: its grad persists across micro-steps */
    const char *name;     /* parameters only; becomes the checkpoint dataset name */
    void *shadow;         /* CUDA F32 parameters only: a BF16 copy of data (same device), owned by the
                             ParamStore and kept current by it (params_sync_shadow) and by the CUDA
                             AdamW. GEMMs that round their inputs to BF16 anyway read it instead of
                             casting data on every call. NULL everywhere else; kernels never require it. */
    /* An input the host filled (model_upload: tokens, targets, cu_seqlens): the host's copy of data, as
     * long as the tensor lives, so that a kernel that must know something of the contents on the host
     * (the cuDNN attention's longest document, the cross-entropy's counted rows) reads it there instead
     * of waiting for a copy from the device. NULL: none. A view of part of the tensor offsets it as data. */
    const void *host_data;
} Tensor;

static inline size_t dtype_size(DType dt) {
    switch (dt) {
    case DT_F32: return 4;
    case DT_F64: return 8;
    case DT_BF16: return 2;
    case DT_I32: return 4;
    default: return 0;
    }
}

static inline const char *dtype_name(DType dt) {
    static const char *names[] = {"f32", "f64", "bf16", "i32"};
    return dt < DT_COUNT ? names[dt] : "?";
}

static inline size_t tensor_bytes(const Tensor *t) { return (size_t)t->numel * dtype_size(t->dtype); }

/* size of dimension d, counting negative d from the end (like Python) */
static inline int64_t tensor_dim(const Tensor *t, int d) { return t->shape[d < 0 ? t->ndim + d : d]; }

/* product of all dimensions but the last: the number of "rows" a row-wise kernel processes */
static inline int64_t tensor_rows(const Tensor *t) { return t->numel / t->shape[t->ndim - 1]; }

/* The same data seen as a 2-D [rows, last dim] matrix: a by-value descriptor for kernel calls. */
static inline Tensor tensor_as_rows(const Tensor *t) {
    Tensor v = *t;
    v.ndim = 2;
    v.shape[0] = tensor_rows(t);
    v.shape[1] = t->shape[t->ndim - 1];
    v.shape[2] = v.shape[3] = 0;
    v.grad = NULL;
    return v;
}

/* Entries [begin, begin + n) along the first dimension (rows of a matrix, elements of a vector): a
 * by-value descriptor over the same data, for kernel calls on a part of a tensor (not for a parameter's
 * BF16 shadow, which it does not offset). */
static inline Tensor tensor_first_dim_range(const Tensor *t, int64_t begin, int64_t n) {
    Tensor v = *t;
    const int64_t per_entry = t->shape[0] ? t->numel / t->shape[0] : 0;
    v.shape[0] = n;
    v.numel = n * per_entry;
    v.data = (char *)t->data + (size_t)(begin * per_entry) * dtype_size(t->dtype);
    v.grad = NULL;
    v.shadow = NULL;
    if (t->host_data) v.host_data = (const char *)t->host_data + (size_t)(begin * per_entry) * dtype_size(t->dtype);
    return v;
}

/* Float element access for CPU tensors of F32 or F64 (tests, references, host-side metrics). */
static inline double tensor_get(const Tensor *t, int64_t i) {
    return t->dtype == DT_F64 ? ((const double *)t->data)[i] : (double)((const float *)t->data)[i];
}
static inline void tensor_set(Tensor *t, int64_t i, double v) {
    if (t->dtype == DT_F64) ((double *)t->data)[i] = v;
    else ((float *)t->data)[i] = (float)v;
}

#endif
