/* Dense causal GQA attention through cuDNN's fused flash-attention engines, built with the backend
 * ("graph") C API of cudnn_graph.h: no cudnn-frontend, only cudnnBackendCreateDescriptor /
 * SetAttribute / Finalize / Execute. Needs cuDNN >= 9.6 at run time (ragged Stats); written against
 * what 9.14 offers (no SDPA_FWD/BWD operation descriptors, no diagonal-band or softmax operations).
 *
 * Selection (msacuda::cudnn_attention_forward / _backward, called first by cuda_attention_forward /
 * _backward in attention.cu; they return false when our own kernel must run):
 *   MSA_ATTENTION unset, "" or "auto": cuDNN for BF16 q/k/v with D % 16 == 0, D <= 128 and 16-byte
 *       aligned pointers; our kernel otherwise, and for a shape whose graph cuDNN refuses (one warning
 *       line on stderr per refused shape, then our kernel for it silently);
 *   MSA_ATTENTION=own: always our kernel;  MSA_ATTENTION=cudnn: always cuDNN, fatal (with the graph
 *       dumped to stderr) when the inputs do not qualify or cuDNN refuses the graph.
 *   MSA_CUDNN_VERBOSE=1 dumps every graph built and the engine chosen for it.
 * The forward and the backward choose independently: their statistics (lse) mean the same thing.
 *
 * Layout: the packed documents are the batch of a "THD" (ragged) problem, exactly as cudnn-frontend's
 * SDPA node lowers a THD graph with padding mask and max_total_seq_len (TransformerEngine's path):
 *   b = ndocs rounded up to a power of two, s = the longest document rounded up to a power of two
 *   (at least 64); the documents past ndocs have length 0. Q/O/dO/dQ are [b, Hq, s, D] with strides
 *   (s*Hq*D, D, Hq*D, 1) and ragged offsets cu[i]*Hq*D (elements), K/V/dK/dV [b, Hkv, s, D] likewise
 *   with cu[i]*Hkv*D, so every tensor is our token-major [N, H, D] buffer as is. GQA: the matmuls
 *   broadcast KV head h/(Hq/Hkv) over the batch dims (Hq a multiple of Hkv). Stats [b, Hq, s, 1] with
 *   strides (Hq*s, 1, Hq, 1) and offsets cu[i]*Hq, i.e. token-major [N, Hq]; a small kernel turns it
 *   into our lse [Hq, N] (and back for the backward).
 *   Per call: the longest document from the host's copy of cu_seqlens (Tensor.host_data, the batch's;
 *   without one, a copy to the host: a wait); a kernel writes the per-document lengths and the ragged
 *   offsets into scratch.
 *
 * Forward graph (cudnn-frontend's CompositeSDPANode for a backend < 9.21):
 *   S1 = matmul(Q, K^T) [m, n overridden by seq_len_q/kv; padding value 0] ; S2 = S1 * attn_scale
 *   padding mask: r = gen_index(S2, axis 2), c = gen_index(S2, axis 3), keep = (r < seq_len_q) &&
 *       (c < seq_len_kv), S3 = select(keep ? S2 : -inf)
 *   causal mask: r, c as above on S3, keep = r >= c, S4 = select(keep ? S3 : -inf)
 *   softmax: M = max over keys, E = exp(S4 - M), Z = sum over keys, Stats = M + log Z, P = E / Z (BF16)
 *   O = matmul(P, V) [m = seq_len_q, k = seq_len_kv]
 * Backward graph (CompositeSDPABackwardNode, its max_total_seq_len layout, the non-deterministic variant):
 *   softmax_sum = rowsum(dO * O) * 1 (non-virtual F32, laid out like Stats)
 *   S = matmul(Q, K^T) * attn_scale, padding mask, - Stats, causal mask (as above), P = exp(S)
 *   dV(full heads) = matmul(reshape(P)^T as BF16, dO); dV = sum over the group's heads (GQA)
 *   dP = matmul(dO, V^T), dS = (dP - softmax_sum) * P * attn_scale
 *   dK(full heads) = matmul(reshape(dS)^T as BF16, Q); dK = sum over the group's heads (GQA)
 *   dQ_accum (non-virtual F32 [N, Hq, D]) = matmul(dS, K); dQ = identity(dQ_accum)
 *   dQ, dK, dV are written into scratch and added to the caller's gradients (+=, NULL skipped).
 *   cuDNN's backward is expected to accumulate dQ_accum with atomics (not bitwise reproducible run to
 *   run; its engines report no NONDETERMINISTIC note, so the e2e determinism checks will tell).
 * Plans are cached per (direction, b, s, Hq, Hkv, D); attn_scale and -inf travel by value, so one
 * plan serves every scale and every set of document lengths in its bucket. */
#include <cudnn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <array>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "common.cuh"

using namespace msacuda;

namespace {

/* ---------------------------------------------------------------------------------------------
 * errors
 * ------------------------------------------------------------------------------------------- */

std::string last_error_string() {
    char buf[4096];
    buf[0] = 0;
    cudnnGetLastErrorString(buf, sizeof buf);
    return buf;
}

[[noreturn]] void cudnn_fail(const char *call, cudnnStatus_t st, const char *file, int line) {
    const std::string le = last_error_string();
    fatal("cuDNN call %s failed at %s:%d: %s (%d)%s%s", call, file, line, cudnnGetErrorString(st), (int)st,
          le.empty() ? "" : "; cuDNN says: ", le.c_str());
}

#define CUDNN_CHECK(call)                                                                   \
    do {                                                                                    \
        cudnnStatus_t st_ = (call);                                                         \
        if (st_ != CUDNN_STATUS_SUCCESS) cudnn_fail(#call, st_, __FILE__, __LINE__);        \
    } while (0)

enum Mode { MODE_AUTO, MODE_OWN, MODE_CUDNN };

/* read on every call (a few string compares): tests and the benchmark switch it with setenv */
Mode attention_mode() {
    const char *s = getenv("MSA_ATTENTION");
    if (!s || !s[0] || !strcmp(s, "auto")) return MODE_AUTO;
    if (!strcmp(s, "own")) return MODE_OWN;
    if (!strcmp(s, "cudnn")) return MODE_CUDNN;
    fatal("MSA_ATTENTION=%s: expected \"own\", \"cudnn\" or \"auto\" (unset: cuDNN where it applies)", s);
}

bool verbose() {
    const char *s = getenv("MSA_CUDNN_VERBOSE");
    return s && s[0] && strcmp(s, "0") != 0;
}

constexpr size_t MIN_VERSION = 90600; /* ragged (THD) Stats and the max_total_seq_len layout */

std::string version_string() {
    const size_t v = cudnnGetVersion();
    char b[64];
    snprintf(b, sizeof b, "cuDNN %zu.%zu.%zu (built with %d.%d.%d)", v / 10000, v / 100 % 100, v % 100, CUDNN_MAJOR,
             CUDNN_MINOR, CUDNN_PATCHLEVEL);
    return b;
}

cudnnHandle_t g_handle = nullptr;

/* The cuDNN handle, created on first use; NULL when cuDNN cannot serve us (too old, or it fails to
 * start: missing sub-libraries, ...): fatal when forced, else one warning and our kernels from then on. */
cudnnHandle_t ready(Mode mode) {
    static bool tried = false, warned = false;
    static std::string why;
    if (!tried) {
        tried = true;
        const size_t v = cudnnGetVersion();
        if (v < MIN_VERSION) {
            why = version_string() + " is loaded; the cuDNN attention path needs 9.6 or newer";
        } else {
            cudnnStatus_t st = cudnnCreate(&g_handle);
            if (st == CUDNN_STATUS_SUCCESS) st = cudnnSetStream(g_handle, stream());
            if (st != CUDNN_STATUS_SUCCESS) {
                g_handle = nullptr;
                why = std::string("cudnnCreate or cudnnSetStream failed: ") + cudnnGetErrorString(st) + " (" + std::to_string((int)st) + ")";
                const std::string le = last_error_string();
                if (!le.empty()) why += "; cuDNN says: " + le;
            }
        }
    }
    if (!g_handle) {
        if (mode == MODE_CUDNN) fatal("MSA_ATTENTION=cudnn: %s", why.c_str());
        if (!warned) {
            fprintf(stderr, "warning: cuDNN attention unavailable (%s); our own attention kernels run instead\n", why.c_str());
            fflush(stderr);
            warned = true;
        }
    }
    return g_handle;
}

cudnnHandle_t handle() { return g_handle; } /* after ready() returned it */

const char *dtype_str(cudnnDataType_t t) {
    switch (t) {
    case CUDNN_DATA_FLOAT: return "f32";
    case CUDNN_DATA_BFLOAT16: return "bf16";
    case CUDNN_DATA_INT32: return "i32";
    case CUDNN_DATA_INT64: return "i64";
    case CUDNN_DATA_BOOLEAN: return "bool";
    default: return "?";
    }
}

/* ---------------------------------------------------------------------------------------------
 * graph builder: owns its descriptors, logs every tensor and operation (dumped on failure or with
 * MSA_CUDNN_VERBOSE=1), and records the first failing call instead of stopping, so that a refused
 * graph can fall back to our kernel in the default mode
 * ------------------------------------------------------------------------------------------- */

typedef std::array<int64_t, 4> Dim4;

enum Bind { DEVICE, HOST, VIRTUAL }; /* in device memory, a host scalar passed by value, between ops only */

struct Ten {
    cudnnBackendDescriptor_t d = nullptr;
    int64_t uid = 0;
    const char *name = "";
};

struct Builder {
    std::vector<cudnnBackendDescriptor_t> descs; /* kept alive with the plan (never destroyed) */
    std::vector<cudnnBackendDescriptor_t> ops;
    std::vector<std::string> log;
    std::string err; /* the first failure */
    int64_t next_virtual_uid = 1000;

    bool ok() const { return err.empty(); }

    void failed(const char *what, cudnnStatus_t st, int line) {
        if (!err.empty()) return;
        char b[768];
        snprintf(b, sizeof b, "%s failed (attention_cudnn.cu:%d): %s (%d)", what, line, cudnnGetErrorString(st), (int)st);
        err = b;
        const std::string le = last_error_string();
        if (!le.empty()) err += "; cuDNN says: " + le;
    }

    cudnnBackendDescriptor_t create(cudnnBackendDescriptorType_t type, const char *tname, const char *name, int line) {
        if (!ok()) return nullptr;
        cudnnBackendDescriptor_t d = nullptr;
        const cudnnStatus_t st = cudnnBackendCreateDescriptor(type, &d);
        if (st != CUDNN_STATUS_SUCCESS) {
            const std::string w = std::string("cudnnBackendCreateDescriptor(") + tname + ") for " + name;
            failed(w.c_str(), st, line);
            return nullptr;
        }
        descs.push_back(d);
        return d;
    }

    void set(cudnnBackendDescriptor_t d, const char *name, cudnnBackendAttributeName_t attr, const char *aname,
             cudnnBackendAttributeType_t type, int64_t n, const void *values, int line) {
        if (!ok()) return;
        const cudnnStatus_t st = cudnnBackendSetAttribute(d, attr, type, n, values);
        if (st != CUDNN_STATUS_SUCCESS) {
            const std::string w = std::string("cudnnBackendSetAttribute(") + name + ", " + aname + ")";
            failed(w.c_str(), st, line);
        }
    }

    void finalize(cudnnBackendDescriptor_t d, const char *name, int line) {
        if (!ok()) return;
        const cudnnStatus_t st = cudnnBackendFinalize(d);
        if (st != CUDNN_STATUS_SUCCESS) {
            const std::string w = std::string("cudnnBackendFinalize(") + name + ")";
            failed(w.c_str(), st, line);
        }
    }

    Ten tensor(int64_t uid, const char *name, cudnnDataType_t dt, Dim4 dim, Dim4 stride, Bind bind, Ten ragged, int line);
    Ten virt(const char *name, cudnnDataType_t dt, Dim4 dim, Dim4 stride, int line, Ten ragged = Ten()) {
        return tensor(next_virtual_uid++, name, dt, dim, stride, VIRTUAL, ragged, line);
    }
    void pointwise(const char *name, cudnnPointwiseMode_t mode, cudnnDataType_t prec, Ten x, Ten b, Ten t, Ten y,
                   int64_t axis, int line);
    void matmul(const char *name, Ten a, Ten b, Ten c, Ten m, Ten n, Ten k, int line);
    void reduction(const char *name, cudnnReduceTensorOp_t op, Ten x, Ten y, int line);
    void reshape(const char *name, Ten x, Ten y, int line);
};

#define B_CREATE(b, T, name) (b).create(T, #T, name, __LINE__)
#define B_SET(b, d, name, A, T, n, v) (b).set(d, name, A, #A, T, n, v, __LINE__)
#define B_FIN(b, d, name) (b).finalize(d, name, __LINE__)

Ten Builder::tensor(int64_t uid, const char *name, cudnnDataType_t dt, Dim4 dim, Dim4 stride, Bind bind, Ten ragged,
                    int line) {
    Ten t;
    t.uid = uid;
    t.name = name;
    char b[512];
    snprintf(b, sizeof b, "  tensor %-4lld %-24s %-4s dim [%lld,%lld,%lld,%lld] stride [%lld,%lld,%lld,%lld] %s%s%s",
             (long long)uid, name, dtype_str(dt), (long long)dim[0], (long long)dim[1], (long long)dim[2],
             (long long)dim[3], (long long)stride[0], (long long)stride[1], (long long)stride[2], (long long)stride[3],
             bind == VIRTUAL ? "virtual" : bind == HOST ? "by value" : "device", ragged.d ? " ragged offsets " : "",
             ragged.d ? ragged.name : "");
    log.push_back(b);
    t.d = create(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "CUDNN_BACKEND_TENSOR_DESCRIPTOR", name, line);
    const int64_t align = 16;
    const bool is_virtual = bind == VIRTUAL, by_value = bind == HOST;
    set(t.d, name, CUDNN_ATTR_TENSOR_UNIQUE_ID, "CUDNN_ATTR_TENSOR_UNIQUE_ID", CUDNN_TYPE_INT64, 1, &uid, line);
    set(t.d, name, CUDNN_ATTR_TENSOR_DATA_TYPE, "CUDNN_ATTR_TENSOR_DATA_TYPE", CUDNN_TYPE_DATA_TYPE, 1, &dt, line);
    set(t.d, name, CUDNN_ATTR_TENSOR_DIMENSIONS, "CUDNN_ATTR_TENSOR_DIMENSIONS", CUDNN_TYPE_INT64, 4, dim.data(), line);
    set(t.d, name, CUDNN_ATTR_TENSOR_STRIDES, "CUDNN_ATTR_TENSOR_STRIDES", CUDNN_TYPE_INT64, 4, stride.data(), line);
    set(t.d, name, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, "CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT", CUDNN_TYPE_INT64, 1, &align, line);
    set(t.d, name, CUDNN_ATTR_TENSOR_IS_VIRTUAL, "CUDNN_ATTR_TENSOR_IS_VIRTUAL", CUDNN_TYPE_BOOLEAN, 1, &is_virtual, line);
    set(t.d, name, CUDNN_ATTR_TENSOR_IS_BY_VALUE, "CUDNN_ATTR_TENSOR_IS_BY_VALUE", CUDNN_TYPE_BOOLEAN, 1, &by_value, line);
    if (ragged.d)
        set(t.d, name, CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC, "CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC",
            CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &ragged.d, line);
    finalize(t.d, name, line);
    return t;
}

const char *pw_name(cudnnPointwiseMode_t m) {
    switch (m) {
    case CUDNN_POINTWISE_ADD: return "ADD";
    case CUDNN_POINTWISE_SUB: return "SUB";
    case CUDNN_POINTWISE_MUL: return "MUL";
    case CUDNN_POINTWISE_DIV: return "DIV";
    case CUDNN_POINTWISE_EXP: return "EXP";
    case CUDNN_POINTWISE_LOG: return "LOG";
    case CUDNN_POINTWISE_IDENTITY: return "IDENTITY";
    case CUDNN_POINTWISE_CMP_LT: return "CMP_LT";
    case CUDNN_POINTWISE_CMP_GE: return "CMP_GE";
    case CUDNN_POINTWISE_LOGICAL_AND: return "LOGICAL_AND";
    case CUDNN_POINTWISE_GEN_INDEX: return "GEN_INDEX";
    case CUDNN_POINTWISE_BINARY_SELECT: return "BINARY_SELECT";
    default: return "?";
    }
}

/* inside the helpers below: the caller's line goes into the messages */
#define L_CREATE(T, name) create(T, #T, name, line)
#define L_SET(d, name, A, T, n, v) set(d, name, A, #A, T, n, v, line)
#define L_FIN(d, name) finalize(d, name, line)

/* y = mode(x [, b [, t]]); alpha1 = alpha2 = 1 as cudnn-frontend sets them */
void Builder::pointwise(const char *name, cudnnPointwiseMode_t mode, cudnnDataType_t prec, Ten x, Ten b, Ten t, Ten y,
                        int64_t axis, int line) {
    char l[512];
    snprintf(l, sizeof l, "  op pointwise %-14s %-24s (%s%s%s%s%s) -> %s  math %s%s", pw_name(mode), name, x.name,
             b.d ? ", " : "", b.d ? b.name : "", t.d ? ", " : "", t.d ? t.name : "", y.name, dtype_str(prec),
             mode == CUDNN_POINTWISE_GEN_INDEX ? (axis == 2 ? " axis 2" : " axis 3") : "");
    log.push_back(l);
    cudnnBackendDescriptor_t pw = L_CREATE(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, name);
    L_SET(pw, name, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
    L_SET(pw, name, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    if (mode == CUDNN_POINTWISE_GEN_INDEX) L_SET(pw, name, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
    L_FIN(pw, name);
    cudnnBackendDescriptor_t op = L_CREATE(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, name);
    L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &pw);
    L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x.d);
    if (b.d) L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b.d);
    if (t.d) L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &t.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y.d);
    const float one = 1.0f;
    L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one);
    L_SET(op, name, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
    L_FIN(op, name);
    ops.push_back(op);
}

/* c = a @ b with the GEMM sizes overridden per batch by the seq-len tensors given (m, n, k);
 * compute F32, padding value 0 (cudnn-frontend always sets it) */
void Builder::matmul(const char *name, Ten a, Ten b, Ten c, Ten m, Ten n, Ten k, int line) {
    char l[512];
    snprintf(l, sizeof l, "  op matmul    %-24s (%s, %s) -> %s%s%s%s%s%s%s", name, a.name, b.name, c.name,
             m.d ? "  m=" : "", m.d ? m.name : "", n.d ? "  n=" : "", n.d ? n.name : "", k.d ? "  k=" : "",
             k.d ? k.name : "");
    log.push_back(l);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    const double pad = 0.0;
    cudnnBackendDescriptor_t md = L_CREATE(CUDNN_BACKEND_MATMUL_DESCRIPTOR, name);
    L_SET(md, name, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    L_SET(md, name, CUDNN_ATTR_MATMUL_PADDING_VALUE, CUDNN_TYPE_DOUBLE, 1, &pad);
    L_FIN(md, name);
    cudnnBackendDescriptor_t op = L_CREATE(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, name);
    L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &a.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &c.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &md);
    if (m.d) L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &m.d);
    if (n.d) L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n.d);
    if (k.d) L_SET(op, name, CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &k.d);
    L_FIN(op, name);
    ops.push_back(op);
}

void Builder::reduction(const char *name, cudnnReduceTensorOp_t rop, Ten x, Ten y, int line) {
    char l[512];
    snprintf(l, sizeof l, "  op reduction %-14s %-24s (%s) -> %s", rop == CUDNN_REDUCE_TENSOR_MAX ? "MAX" : "ADD", name,
             x.name, y.name);
    log.push_back(l);
    const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    cudnnBackendDescriptor_t rd = L_CREATE(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, name);
    L_SET(rd, name, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp);
    L_SET(rd, name, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &rop);
    L_FIN(rd, name);
    cudnnBackendDescriptor_t op = L_CREATE(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, name);
    L_SET(op, name, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_REDUCTION_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &rd);
    L_FIN(op, name);
    ops.push_back(op);
}

void Builder::reshape(const char *name, Ten x, Ten y, int line) {
    char l[512];
    snprintf(l, sizeof l, "  op reshape   %-24s (%s) -> %s", name, x.name, y.name);
    log.push_back(l);
    cudnnBackendDescriptor_t op = L_CREATE(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, name);
    L_SET(op, name, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x.d);
    L_SET(op, name, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y.d);
    L_FIN(op, name);
    ops.push_back(op);
}

#define TENSOR(b, uid, name, dt, dim, stride, bind, ragged) (b).tensor(uid, name, dt, dim, stride, bind, ragged, __LINE__)
#define VIRT(b, name, dt, dim, stride) (b).virt(name, dt, dim, stride, __LINE__)
#define PW(b, name, mode, prec, x, bb, t, y) (b).pointwise(name, mode, prec, x, bb, t, y, -1, __LINE__)
#define GEN_INDEX(b, name, prec, x, y, axis) (b).pointwise(name, CUDNN_POINTWISE_GEN_INDEX, prec, x, Ten(), Ten(), y, axis, __LINE__)
#define MATMUL(b, name, a, bb, c, m, n, k) (b).matmul(name, a, bb, c, m, n, k, __LINE__)
#define REDUCE(b, name, op, x, y) (b).reduction(name, op, x, y, __LINE__)
#define RESHAPE(b, name, x, y) (b).reshape(name, x, y, __LINE__)

/* ---------------------------------------------------------------------------------------------
 * plans and their cache
 * ------------------------------------------------------------------------------------------- */

/* unique ids of the non-virtual tensors (virtual ones count from 1000) */
enum : int64_t {
    U_Q = 1, U_K, U_V, U_O, U_STATS, U_SCALE, U_SEQ_Q, U_SEQ_KV, U_Q_OFF, U_K_OFF, U_V_OFF, U_O_OFF, U_ST_OFF,
    U_NEG_PAD, U_NEG_CAUSAL, U_DO, U_DQ, U_DK, U_DV, U_SOFTMAX_SUM, U_DQ_ACC, U_DK_FULL, U_DV_FULL, U_ONE
};

struct Shape {
    int64_t b, s, hq, hkv, d;
};

struct Plan {
    bool ok = false, warned = false;
    std::string why;                          /* why cuDNN refused the graph */
    std::vector<std::string> dump;            /* the graph, for messages */
    cudnnBackendDescriptor_t plan = nullptr;
    int64_t workspace = 0;
    std::string engine;                       /* the engine chosen (verbose) */
    std::vector<cudnnBackendDescriptor_t> descs;
};

std::string shape_string(const char *dir, const Shape &sh) {
    char b[256];
    snprintf(b, sizeof b, "%s, b=%lld documents (bucket) x s=%lld tokens (bucket), Hq=%lld, Hkv=%lld, D=%lld, bf16",
             dir, (long long)sh.b, (long long)sh.s, (long long)sh.hq, (long long)sh.hkv, (long long)sh.d);
    return b;
}

void print_dump(const Plan *p, const std::string &title) {
    fprintf(stderr, "cuDNN attention graph (%s; %s):\n", title.c_str(), version_string().c_str());
    for (const std::string &l : p->dump) fprintf(stderr, "%s\n", l.c_str());
    fflush(stderr);
}

/* best effort, for the verbose log: the engine's global index and numerical notes */
std::string engine_info(cudnnBackendDescriptor_t cfg) {
    cudnnBackendDescriptor_t eng = nullptr;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng) != CUDNN_STATUS_SUCCESS) return "?";
    std::string s = "engine ?";
    int64_t n = 0;
    if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &eng) ==
        CUDNN_STATUS_SUCCESS) {
        int64_t idx = -1;
        if (cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n, &idx) == CUDNN_STATUS_SUCCESS)
            s = "engine " + std::to_string(idx);
        cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
        int64_t nn = 0;
        if (cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                                     CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &nn, notes) == CUDNN_STATUS_SUCCESS) {
            for (int64_t i = 0; i < nn; i++) {
                if (notes[i] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) s += ", nondeterministic";
                if (notes[i] == CUDNN_NUMERICAL_NOTE_TENSOR_CORE) s += ", tensor cores";
            }
        }
    }
    cudnnBackendDestroyDescriptor(eng);
    return s;
}

/* operation graph -> heuristics (mode A) -> the first engine config whose execution plan finalizes */
void finish(Builder &b, Plan *p) {
    cudnnHandle_t h = handle();
    if (b.ok()) {
        char l[128];
        snprintf(l, sizeof l, "  (%zu operations)", b.ops.size());
        b.log.push_back(l);
    }
    cudnnBackendDescriptor_t graph = B_CREATE(b, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
    B_SET(b, graph, "operation graph", CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, (int64_t)b.ops.size(),
          b.ops.data());
    B_SET(b, graph, "operation graph", CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
    B_FIN(b, graph, "operation graph");
    cudnnBackendDescriptor_t heur = B_CREATE(b, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "heuristics");
    const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    B_SET(b, heur, "heuristics", CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
    B_SET(b, heur, "heuristics", CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    B_FIN(b, heur, "heuristics");
    int64_t count = 0;
    if (b.ok()) {
        const cudnnStatus_t st = cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                                          0, &count, nullptr);
        if (st != CUDNN_STATUS_SUCCESS) b.failed("cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS) count", st, __LINE__);
    }
    std::vector<cudnnBackendDescriptor_t> cfgs;
    for (int64_t i = 0; i < count && b.ok(); i++) cfgs.push_back(B_CREATE(b, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config"));
    if (b.ok() && count > 0) {
        int64_t got = 0;
        const cudnnStatus_t st = cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                                          count, &got, cfgs.data());
        if (st != CUDNN_STATUS_SUCCESS) b.failed("cudnnBackendGetAttribute(heuristics, CUDNN_ATTR_ENGINEHEUR_RESULTS)", st, __LINE__);
        else count = got < count ? got : count;
    }
    if (b.ok() && count == 0) b.err = "cuDNN's heuristics (mode A) offer no engine for this graph";
    std::string tried;
    for (int64_t i = 0; i < count && b.ok() && !p->plan; i++) {
        cudnnBackendDescriptor_t plan = nullptr;
        cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan);
        if (st != CUDNN_STATUS_SUCCESS) {
            b.failed("cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)", st, __LINE__);
            break;
        }
        b.descs.push_back(plan);
        /* deprecated in newer cuDNN (the graph's handle serves), still honoured: a refusal is only logged */
        st = cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h);
        if (st != CUDNN_STATUS_SUCCESS && i == 0)
            b.log.push_back(std::string("  (CUDNN_ATTR_EXECUTION_PLAN_HANDLE not taken: ") + cudnnGetErrorString(st) + ")");
        B_SET(b, plan, "execution plan", CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfgs[i]);
        if (!b.ok()) break;
        st = cudnnBackendFinalize(plan);
        if (st == CUDNN_STATUS_SUCCESS) {
            p->plan = plan;
            if (verbose()) p->engine = engine_info(cfgs[i]) + " (config " + std::to_string(i) + " of " + std::to_string(count) + ")";
        } else {
            const std::string le = last_error_string();
            char m[256];
            snprintf(m, sizeof m, "%sconfig %lld: %s (%d)", tried.empty() ? "" : "; ", (long long)i, cudnnGetErrorString(st),
                     (int)st);
            tried += m;
            if (!le.empty()) tried += " [" + le + "]";
        }
    }
    if (b.ok() && !p->plan)
        b.err = "no engine config of the " + std::to_string(count) + " offered finalizes an execution plan: " + tried;
    if (b.ok()) {
        const cudnnStatus_t st = cudnnBackendGetAttribute(p->plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64,
                                                          1, nullptr, &p->workspace);
        if (st != CUDNN_STATUS_SUCCESS) b.failed("cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)", st, __LINE__);
    }
    p->ok = b.ok();
    p->why = b.err;
    p->dump = b.log;
    p->descs = b.descs;
}

/* cudnn-frontend's padding_mask score modifier on scores s [b, hq, s, s]: keep (row < seq_len_q) &&
 * (col < seq_len_kv), -inf elsewhere */
Ten padding_mask(Builder &b, Ten s, Ten seq_q, Ten seq_kv, Ten neg_inf, Dim4 sdim, Dim4 sstr) {
    Ten prow = VIRT(b, "pad::row_index", CUDNN_DATA_INT32, sdim, sstr);
    GEN_INDEX(b, "gen_row_idx_padding", CUDNN_DATA_INT32, s, prow, 2);
    Ten pcol = VIRT(b, "pad::col_index", CUDNN_DATA_INT32, sdim, sstr);
    GEN_INDEX(b, "gen_col_idx_padding", CUDNN_DATA_INT32, s, pcol, 3);
    Ten rmask = VIRT(b, "pad::row<seq_len_q", CUDNN_DATA_BOOLEAN, sdim, sstr);
    PW(b, "lt_row_sq_padding", CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, prow, seq_q, Ten(), rmask);
    Ten cmask = VIRT(b, "pad::col<seq_len_kv", CUDNN_DATA_BOOLEAN, sdim, sstr);
    PW(b, "lt_col_skv_padding", CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, pcol, seq_kv, Ten(), cmask);
    Ten pmask = VIRT(b, "pad::keep", CUDNN_DATA_BOOLEAN, sdim, sstr);
    PW(b, "and_row_col_padding", CUDNN_POINTWISE_LOGICAL_AND, CUDNN_DATA_BOOLEAN, rmask, cmask, Ten(), pmask);
    Ten padded = VIRT(b, "S::padded", CUDNN_DATA_FLOAT, sdim, sstr);
    PW(b, "select_padding", CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s, neg_inf, pmask, padded);
    return padded;
}

/* the top-left causal mask (cudnn-frontend's CompositeDiagonalBandMaskNode with right bound 0, what
 * its causal mask lowers to before cuDNN 9.21): keep row >= col, -inf elsewhere */
Ten causal_mask(Builder &b, Ten padded, Ten neg_inf, Dim4 sdim, Dim4 sstr) {
    Ten crow = VIRT(b, "causal::row_index", CUDNN_DATA_INT32, sdim, sstr);
    GEN_INDEX(b, "gen_row_index", CUDNN_DATA_FLOAT, padded, crow, 2);
    Ten ccol = VIRT(b, "causal::col_index", CUDNN_DATA_INT32, sdim, sstr);
    GEN_INDEX(b, "gen_col_index", CUDNN_DATA_FLOAT, padded, ccol, 3);
    Ten keep = VIRT(b, "causal::row>=col", CUDNN_DATA_BOOLEAN, sdim, sstr);
    PW(b, "row>=col", CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, crow, ccol, Ten(), keep);
    Ten causal = VIRT(b, "S::causal", CUDNN_DATA_FLOAT, sdim, sstr);
    PW(b, "binary_select", CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, padded, neg_inf, keep, causal);
    return causal;
}

/* the tensors both directions share: ragged offsets, sequence lengths, Q, K^T, V, O, Stats, scalars */
struct Common {
    Ten q_off, k_off, v_off, o_off, st_off, seq_q, seq_kv, q, kt, v, o, stats, scale, neg_pad, neg_causal;
    Dim4 qdim, qstr, kdim, kstr, ktdim, ktstr, sdim, sstr, rdim, rstr, stdim, ststr;
};

Common common_tensors(Builder &b, const Shape &sh) {
    Common c;
    const int64_t B = sh.b, S = sh.s, H = sh.hq, G = sh.hkv, D = sh.d;
    const Dim4 one = {1, 1, 1, 1}, off_dim = {B + 1, 1, 1, 1}, len_dim = {B, 1, 1, 1};
    c.qdim = {B, H, S, D};
    c.qstr = {S * H * D, D, H * D, 1}; /* token-major [N, H, D] with ragged batches */
    c.kdim = {B, G, S, D};
    c.kstr = {S * G * D, D, G * D, 1};
    c.ktdim = {B, G, D, S}; /* K and V as the backend wants them: transposed views of the same memory */
    c.ktstr = {S * G * D, D, 1, G * D};
    c.sdim = {B, H, S, S};
    c.sstr = {H * S * S, S * S, S, 1};
    c.rdim = {B, H, S, 1};
    c.rstr = {H * S, S, 1, 1};
    c.stdim = {B, H, S, 1};
    c.ststr = {H * S, 1, H, 1}; /* token-major [N, H] */
    c.q_off = TENSOR(b, U_Q_OFF, "ragged_offset_q", CUDNN_DATA_INT64, off_dim, one, DEVICE, Ten());
    c.k_off = TENSOR(b, U_K_OFF, "ragged_offset_k", CUDNN_DATA_INT64, off_dim, one, DEVICE, Ten());
    c.v_off = TENSOR(b, U_V_OFF, "ragged_offset_v", CUDNN_DATA_INT64, off_dim, one, DEVICE, Ten());
    c.o_off = TENSOR(b, U_O_OFF, "ragged_offset_o", CUDNN_DATA_INT64, off_dim, one, DEVICE, Ten());
    c.st_off = TENSOR(b, U_ST_OFF, "ragged_offset_stats", CUDNN_DATA_INT64, off_dim, one, DEVICE, Ten());
    c.seq_q = TENSOR(b, U_SEQ_Q, "seq_len_q", CUDNN_DATA_INT32, len_dim, one, DEVICE, Ten());
    c.seq_kv = TENSOR(b, U_SEQ_KV, "seq_len_kv", CUDNN_DATA_INT32, len_dim, one, DEVICE, Ten());
    c.scale = TENSOR(b, U_SCALE, "attn_scale", CUDNN_DATA_FLOAT, one, one, HOST, Ten());
    c.neg_pad = TENSOR(b, U_NEG_PAD, "-inf (padding)", CUDNN_DATA_FLOAT, one, one, HOST, Ten());
    c.neg_causal = TENSOR(b, U_NEG_CAUSAL, "-inf (causal)", CUDNN_DATA_FLOAT, one, one, HOST, Ten());
    return c;
}

Plan *build_forward(const Shape &sh) {
    Plan *p = new Plan;
    Builder b;
    Common c = common_tensors(b, sh);
    c.q = TENSOR(b, U_Q, "Q", CUDNN_DATA_BFLOAT16, c.qdim, c.qstr, DEVICE, c.q_off);
    c.kt = TENSOR(b, U_K, "K^T", CUDNN_DATA_BFLOAT16, c.ktdim, c.ktstr, DEVICE, c.k_off);
    c.v = TENSOR(b, U_V, "V", CUDNN_DATA_BFLOAT16, c.kdim, c.kstr, DEVICE, c.v_off);
    c.o = TENSOR(b, U_O, "O", CUDNN_DATA_BFLOAT16, c.qdim, c.qstr, DEVICE, c.o_off);
    c.stats = TENSOR(b, U_STATS, "Stats", CUDNN_DATA_FLOAT, c.stdim, c.ststr, DEVICE, c.st_off);

    Ten s1 = VIRT(b, "bmm1::C", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    MATMUL(b, "bmm1", c.q, c.kt, s1, c.seq_q, c.seq_kv, Ten());
    Ten s2 = VIRT(b, "attn_scale::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "attn_scale", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, s1, c.scale, Ten(), s2);
    Ten s3 = padding_mask(b, s2, c.seq_q, c.seq_kv, c.neg_pad, c.sdim, c.sstr);
    Ten s4 = causal_mask(b, s3, c.neg_causal, c.sdim, c.sstr);

    /* softmax (cudnn-frontend's CompositeSoftmaxNode with a Stats output) */
    Ten mx = VIRT(b, "Max", CUDNN_DATA_FLOAT, c.rdim, c.rstr);
    REDUCE(b, "Max", CUDNN_REDUCE_TENSOR_MAX, s4, mx);
    Ten sub = VIRT(b, "sub_M", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "sub", CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, s4, mx, Ten(), sub);
    Ten ex = VIRT(b, "exp_sub_M", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "exp", CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, sub, Ten(), Ten(), ex);
    Ten sum = VIRT(b, "SumExp", CUDNN_DATA_FLOAT, c.rdim, c.rstr);
    REDUCE(b, "sum", CUDNN_REDUCE_TENSOR_ADD, ex, sum);
    Ten lg = VIRT(b, "log::OUT", CUDNN_DATA_FLOAT, c.rdim, c.rstr);
    PW(b, "log", CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, sum, Ten(), Ten(), lg);
    PW(b, "add", CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, mx, lg, Ten(), c.stats);
    Ten prob = VIRT(b, "softmax::S", CUDNN_DATA_BFLOAT16, c.sdim, c.sstr); /* bmm2's A in the io type */
    PW(b, "div", CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, ex, sum, Ten(), prob);

    MATMUL(b, "bmm2", prob, c.v, c.o, c.seq_q, Ten(), c.seq_kv);
    finish(b, p);
    return p;
}

Plan *build_backward(const Shape &sh) {
    Plan *p = new Plan;
    Builder b;
    const int64_t B = sh.b, S = sh.s, H = sh.hq, G = sh.hkv, D = sh.d;
    const bool gqa = H != G;
    const Dim4 one = {1, 1, 1, 1};
    Common c = common_tensors(b, sh);
    c.q = TENSOR(b, U_Q, "Q", CUDNN_DATA_BFLOAT16, c.qdim, c.qstr, DEVICE, c.q_off);
    c.kt = TENSOR(b, U_K, "K^T", CUDNN_DATA_BFLOAT16, c.ktdim, c.ktstr, DEVICE, c.k_off);
    Ten vt = TENSOR(b, U_V, "V^T", CUDNN_DATA_BFLOAT16, c.ktdim, c.ktstr, DEVICE, c.v_off);
    c.o = TENSOR(b, U_O, "O", CUDNN_DATA_BFLOAT16, c.qdim, c.qstr, DEVICE, c.o_off);
    Ten dout = TENSOR(b, U_DO, "dO", CUDNN_DATA_BFLOAT16, c.qdim, c.qstr, DEVICE, c.o_off);
    c.stats = TENSOR(b, U_STATS, "Stats", CUDNN_DATA_FLOAT, c.stdim, c.ststr, DEVICE, c.st_off);
    Ten dq = TENSOR(b, U_DQ, "dQ", CUDNN_DATA_BFLOAT16, c.qdim, c.qstr, DEVICE, c.q_off);
    Ten dk = TENSOR(b, U_DK, "dK", CUDNN_DATA_BFLOAT16, c.kdim, c.kstr, DEVICE, c.k_off);
    Ten dv = TENSOR(b, U_DV, "dV", CUDNN_DATA_BFLOAT16, c.kdim, c.kstr, DEVICE, c.v_off);
    Ten one_t = TENSOR(b, U_ONE, "one", CUDNN_DATA_FLOAT, one, one, HOST, Ten());
    /* frontend-owned workspace tensors of the max_total_seq_len layout */
    Ten softmax_sum = TENSOR(b, U_SOFTMAX_SUM, "softmax_sum", CUDNN_DATA_FLOAT, c.stdim, c.ststr, DEVICE, c.st_off);
    Ten dq_acc = TENSOR(b, U_DQ_ACC, "dQ_accum", CUDNN_DATA_FLOAT, c.qdim, c.qstr, DEVICE, c.q_off);
    /* GQA: dK, dV for every query head (BF16, [N, Hq, D] with the K/V offsets, which cuDNN scales by
     * Hq/Hkv implicitly), then summed over each group's heads */
    const Dim4 full_dim = {B, H, S, D}, full_str = {S * H * D, D, H * D, 1};
    Ten dk_full, dv_full;
    if (gqa) {
        dk_full = TENSOR(b, U_DK_FULL, "dK_fullhead", CUDNN_DATA_BFLOAT16, full_dim, full_str, DEVICE, c.k_off);
        dv_full = TENSOR(b, U_DV_FULL, "dV_fullhead", CUDNN_DATA_BFLOAT16, full_dim, full_str, DEVICE, c.v_off);
    }
    const Dim4 sTdim = c.sdim, sTstr = {H * S * S, S * S, 1, S}; /* [b, hq, s_kv, s_q] views of the scores */

    /* softmax_sum = rowsum(dO * O) */
    Ten doo = VIRT(b, "mul_dO_O::OUT", CUDNN_DATA_FLOAT, c.qdim, (Dim4{H * S * D, S * D, H * D, 1}));
    PW(b, "mul_dO_O", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dout, c.o, Ten(), doo);
    Ten red = VIRT(b, "reduce_dO_o::Y", CUDNN_DATA_FLOAT, c.rdim, c.rstr);
    REDUCE(b, "reduce_dO_o", CUDNN_REDUCE_TENSOR_ADD, doo, red);
    PW(b, "scale_dropout_inv", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, red, one_t, Ten(), softmax_sum);

    /* P = exp(scale Q K^T - Stats), masked */
    Ten s1 = VIRT(b, "matmul_Q_KT::C", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    MATMUL(b, "matmul_Q_KT", c.q, c.kt, s1, c.seq_q, c.seq_kv, Ten());
    Ten s2 = VIRT(b, "mul_s_attn_scale::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "mul_s_attn_scale", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, s1, c.scale, Ten(), s2);
    /* padding before the Stats subtraction, causal after it: the order cudnn-frontend emitted while cuDNN
     * 9.14 was current (its latest versions subtract first) */
    Ten s3 = padding_mask(b, s2, c.seq_q, c.seq_kv, c.neg_pad, c.sdim, c.sstr);
    Ten s4 = VIRT(b, "sub_s_m::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "sub_s_m", CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, s3, c.stats, Ten(), s4);
    Ten s5 = causal_mask(b, s4, c.neg_causal, c.sdim, c.sstr);
    Ten prob = VIRT(b, "exp_s::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "exp_s", CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, s5, Ten(), Ten(), prob);

    /* dV = P^T dO */
    Ten pt = VIRT(b, "reshape_p::Y", CUDNN_DATA_BFLOAT16, sTdim, sTstr);
    RESHAPE(b, "reshape_p", prob, pt);
    if (gqa) {
        MATMUL(b, "matmul_pT_dO", pt, dout, dv_full, c.seq_kv, Ten(), c.seq_q);
        REDUCE(b, "red_dV_head", CUDNN_REDUCE_TENSOR_ADD, dv_full, dv);
    } else {
        MATMUL(b, "matmul_pT_dO", pt, dout, dv, c.seq_kv, Ten(), c.seq_q);
    }

    /* dS = (dO V^T - softmax_sum) * P * scale */
    Ten dp = VIRT(b, "matmul_dO_VT::C", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    MATMUL(b, "matmul_dO_VT", dout, vt, dp, c.seq_q, c.seq_kv, Ten());
    Ten dp2 = VIRT(b, "sub_dP_softmax_sum::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "sub_dP_softmax_sum", CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, dp, softmax_sum, Ten(), dp2);
    Ten ds1 = VIRT(b, "mul_dP_exp_s::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "mul_dP_exp_s", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, dp2, prob, Ten(), ds1);
    Ten ds = VIRT(b, "mul_dS_attn_scale::OUT", CUDNN_DATA_FLOAT, c.sdim, c.sstr);
    PW(b, "mul_dS_attn_scale", CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, ds1, c.scale, Ten(), ds);

    /* dK = dS^T Q */
    Ten dst = VIRT(b, "reshape_dS::Y", CUDNN_DATA_BFLOAT16, sTdim, sTstr);
    RESHAPE(b, "reshape_dS", ds, dst);
    if (gqa) {
        MATMUL(b, "matmul_dST_Q", dst, c.q, dk_full, c.seq_kv, Ten(), c.seq_q);
        REDUCE(b, "red_dK_head", CUDNN_REDUCE_TENSOR_ADD, dk_full, dk);
    } else {
        MATMUL(b, "matmul_dST_Q", dst, c.q, dk, c.seq_kv, Ten(), c.seq_q);
    }

    /* dQ = dS K, accumulated in F32 */
    Ten kr = b.virt("reshape_k::Y", CUDNN_DATA_FLOAT, c.kdim, c.kstr, __LINE__, c.k_off);
    RESHAPE(b, "reshape_k", c.kt, kr);
    MATMUL(b, "matmul_dS_K", ds, kr, dq_acc, c.seq_q, Ten(), c.seq_kv);
    PW(b, "identity_dQ", CUDNN_POINTWISE_IDENTITY, CUDNN_DATA_FLOAT, dq_acc, Ten(), Ten(), dq);
    finish(b, p);
    return p;
}

Plan *get_plan(bool bwd, const Shape &sh) {
    static std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t>, Plan *> cache;
    const auto key = std::make_tuple(bwd ? 1 : 0, sh.b, sh.s, sh.hq, sh.hkv, sh.d);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    Plan *p = bwd ? build_backward(sh) : build_forward(sh);
    cache[key] = p;
    if (verbose()) {
        print_dump(p, shape_string(bwd ? "backward" : "forward", sh));
        if (p->ok)
            fprintf(stderr, "  -> plan ready: %s, workspace %lld bytes\n", p->engine.c_str(), (long long)p->workspace);
        else
            fprintf(stderr, "  -> refused: %s\n", p->why.c_str());
    }
    return p;
}

/* ---------------------------------------------------------------------------------------------
 * small kernels
 * ------------------------------------------------------------------------------------------- */

/* per-document lengths (0 past ndocs) and the element offsets of each ragged tensor (cu[ndocs] = N past
 * ndocs). Every tensor of the graph gets its own array, as cudnn-frontend users pass them (no aliasing
 * between unique ids); the Q and O offsets are equal, the K and V ones too. */
struct RaggedPtrs {
    int *seq_q, *seq_kv;
    int64_t *q, *k, *v, *o, *st;
};

__global__ void ragged_prep_kernel(const int *cu, int ndocs, int nb, int64_t qmul, int64_t kvmul, int64_t stmul,
                                   RaggedPtrs r) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i <= nb; i += gridDim.x * blockDim.x) {
        const int64_t c = cu[min(i, ndocs)];
        if (i < nb) r.seq_q[i] = r.seq_kv[i] = i < ndocs ? cu[i + 1] - cu[i] : 0;
        r.q[i] = r.o[i] = c * qmul;
        r.k[i] = r.v[i] = c * kvmul;
        r.st[i] = c * stmul;
    }
}

/* lse [H, N] <-> stats [N, H] */
__global__ void stats_to_lse_kernel(float *lse, const float *stats, int64_t N, int H) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * H; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / H, h = i - t * H;
        lse[h * N + t] = stats[i];
    }
}

__global__ void lse_to_stats_kernel(float *stats, const float *lse, int64_t N, int H) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N * H; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / H, h = i - t * H;
        stats[i] = lse[h * N + t];
    }
}

/* dst += src (BF16, fp32 sum) */
__global__ void accumulate_kernel(bf16 *dst, const bf16 *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(__bfloat162float(dst[i]) + __bfloat162float(src[i]));
}

void accumulate(Tensor *dst, const bf16 *src, const char *what) {
    if (!dst) return;
    accumulate_kernel<<<grid_for(dst->numel, 256), 256, 0, stream()>>>((bf16 *)dst->data, src, dst->numel);
    LAUNCH_CHECK(what);
}

/* ---------------------------------------------------------------------------------------------
 * calls
 * ------------------------------------------------------------------------------------------- */

int64_t pow2_at_least(int64_t x) {
    int64_t p = 1;
    while (p < x) p *= 2;
    return p;
}

bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* NULL when the cuDNN path can take these tensors, else why not */
const char *unsuitable(const Tensor *const *ts, int n, int D) {
    for (int i = 0; i < n; i++)
        if (ts[i] && ts[i]->dtype != DT_BF16) return "the cuDNN path takes bf16 tensors only";
    if (D % 16 != 0 || D > 128) return "the cuDNN path needs a head dim that is a multiple of 16, at most 128";
    for (int i = 0; i < n; i++)
        if (ts[i] && !aligned16(ts[i]->data)) return "the cuDNN path needs 16-byte aligned tensors";
    return nullptr;
}

/* The longest document, from the host's copy of cu_seqlens when it has one (model_upload), else from a
 * copy to the host (a wait). Validated: the plan's s must cover it. */
int64_t longest_document(const Tensor *cu_seqlens, int ndocs, int N) {
    std::vector<int> copy;
    const int *cu = (const int *)cu_seqlens->host_data;
    if (!cu) {
        copy.resize((size_t)ndocs + 1);
        copy_to_host_at(copy.data(), cu_seqlens->data, ((size_t)ndocs + 1) * sizeof(int), "cudnn attention cu_seqlens");
        cu = copy.data();
    }
    int64_t longest = 0;
    for (int i = 0; i <= ndocs; i++) {
        const bool bad = (i == 0 && cu[0] != 0) || (i == ndocs && cu[ndocs] != N) || (i > 0 && cu[i] < cu[i - 1]);
        if (bad) fatal("attention: bad cu_seqlens (entry %d = %d): it must start at 0, never decrease and end at N", i, cu[i]);
        if (i > 0 && cu[i] - cu[i - 1] > longest) longest = cu[i] - cu[i - 1];
    }
    return longest;
}

/* false: use our kernel (after one warning line in the default mode); fatal when cuDNN is forced */
bool usable(Mode mode, Plan *p, const char *dir, const Shape &sh) {
    if (p->ok) return true;
    const std::string what = shape_string(dir, sh);
    if (mode == MODE_CUDNN) {
        print_dump(p, what);
        fatal("MSA_ATTENTION=cudnn: cuDNN refused the attention %s graph (%s): %s", dir, version_string().c_str(),
              p->why.c_str());
    }
    if (!p->warned) {
        fprintf(stderr, "warning: cuDNN refused the attention graph (%s): %s; our own kernel runs it instead\n", what.c_str(),
                p->why.c_str());
        fflush(stderr);
        p->warned = true;
    }
    return false;
}

/* carves 256-byte aligned regions out of one scratch buffer */
struct Carve {
    size_t total = 0;
    char *base = nullptr;
    size_t take(size_t bytes) {
        const size_t at = total;
        total += (bytes + 255) / 256 * 256;
        return at;
    }
    void *at(size_t off) const { return base + off; }
};

struct Ragged {
    size_t seq_q, seq_kv, q, k, v, o, st;
};

Ragged plan_ragged(Carve &c, int64_t nb) {
    Ragged r;
    r.seq_q = c.take((size_t)nb * sizeof(int));
    r.seq_kv = c.take((size_t)nb * sizeof(int));
    size_t *offs[5] = {&r.q, &r.k, &r.v, &r.o, &r.st};
    for (size_t *o : offs) *o = c.take(((size_t)nb + 1) * sizeof(int64_t));
    return r;
}

void run_ragged_prep(const Carve &c, const Ragged &r, const Tensor *cu, int ndocs, const Shape &sh) {
    const RaggedPtrs p = {(int *)c.at(r.seq_q), (int *)c.at(r.seq_kv), (int64_t *)c.at(r.q), (int64_t *)c.at(r.k),
                          (int64_t *)c.at(r.v), (int64_t *)c.at(r.o), (int64_t *)c.at(r.st)};
    ragged_prep_kernel<<<(unsigned)((sh.b + 1 + 255) / 256), 256, 0, stream()>>>((const int *)cu->data, ndocs, (int)sh.b, sh.hq * sh.d,
                                                                     sh.hkv * sh.d, sh.hq, p);
    LAUNCH_CHECK("cudnn attention ragged offsets");
}

/* the values passed by value (host memory, read when the plan is launched) */
struct alignas(16) Scalars {
    float scale, neg_inf_pad, neg_inf_causal, one;
};

void execute(Plan *p, const std::vector<int64_t> &uids, const std::vector<void *> &ptrs, void *workspace) {
    if (uids.size() != ptrs.size()) fatal("cudnn attention: %zu unique ids for %zu pointers", uids.size(), ptrs.size());
    cudnnBackendDescriptor_t pack = nullptr;
    CUDNN_CHECK(cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack));
    CUDNN_CHECK(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, (int64_t)uids.size(),
                                         uids.data()));
    CUDNN_CHECK(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                         (int64_t)ptrs.size(), ptrs.data()));
    CUDNN_CHECK(cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace));
    CUDNN_CHECK(cudnnBackendFinalize(pack));
    CUDNN_CHECK(cudnnBackendExecute(handle(), p->plan, pack));
    CUDNN_CHECK(cudnnBackendDestroyDescriptor(pack));
    LAUNCH_CHECK("cudnn attention (cudnnBackendExecute)");
}

}  // namespace

namespace msacuda {

/* attention.cu calls these first; false = run our own kernel. Shapes and dtypes are checked there. */
bool cudnn_attention_forward(Tensor *out, Tensor *lse, const Tensor *q, const Tensor *k, const Tensor *v,
                             const Tensor *cu_seqlens, float scale, int N, int Hq, int Hkv, int D, int ndocs) {
    const Mode mode = attention_mode();
    if (mode == MODE_OWN) return false;
    const Tensor *ts[4] = {q, k, v, out};
    if (const char *why = unsuitable(ts, 4, D)) {
        if (mode == MODE_CUDNN)
            fatal("MSA_ATTENTION=cudnn: %s (attention forward with %s q, D=%d)", why, dt_name(q->dtype), D);
        return false;
    }
    if (!ready(mode)) return false;
    const int64_t longest = longest_document(cu_seqlens, ndocs, N);
    const Shape sh = {pow2_at_least(ndocs), pow2_at_least(longest > 64 ? longest : 64), Hq, Hkv, D};
    Plan *p = get_plan(false, sh);
    if (!usable(mode, p, "forward", sh)) return false;

    Carve c;
    const Ragged r = plan_ragged(c, sh.b);
    const size_t stats = c.take((size_t)N * Hq * sizeof(float));
    const size_t ws = c.take((size_t)p->workspace);
    c.base = (char *)scratch(c.total);
    run_ragged_prep(c, r, cu_seqlens, ndocs, sh);

    Scalars sc = {scale, -INFINITY, -INFINITY, 1.0f};
    const std::vector<int64_t> uids = {U_Q,     U_K,     U_V,     U_O,     U_STATS,  U_SCALE,   U_SEQ_Q,     U_SEQ_KV,
                                       U_Q_OFF, U_K_OFF, U_V_OFF, U_O_OFF, U_ST_OFF, U_NEG_PAD, U_NEG_CAUSAL};
    const std::vector<void *> ptrs = {q->data,        k->data,       v->data,          out->data,          c.at(stats),
                                      &sc.scale,      c.at(r.seq_q), c.at(r.seq_kv),   c.at(r.q),          c.at(r.k),
                                      c.at(r.v),      c.at(r.o),     c.at(r.st),       &sc.neg_inf_pad,    &sc.neg_inf_causal};
    execute(p, uids, ptrs, c.at(ws));
    stats_to_lse_kernel<<<grid_for((int64_t)N * Hq, 256), 256, 0, stream()>>>((float *)lse->data, (const float *)c.at(stats), N, Hq);
    LAUNCH_CHECK("cudnn attention stats -> lse");
    return true;
}

bool cudnn_attention_backward(Tensor *dq, Tensor *dk, Tensor *dv, const Tensor *dout, const Tensor *q, const Tensor *k,
                              const Tensor *v, const Tensor *out, const Tensor *lse, const Tensor *cu_seqlens, float scale,
                              int N, int Hq, int Hkv, int D, int ndocs) {
    const Mode mode = attention_mode();
    if (mode == MODE_OWN) return false;
    const Tensor *ts[8] = {q, k, v, out, dout, dq, dk, dv};
    if (const char *why = unsuitable(ts, 8, D)) {
        if (mode == MODE_CUDNN)
            fatal("MSA_ATTENTION=cudnn: %s (attention backward with %s q, D=%d)", why, dt_name(q->dtype), D);
        return false;
    }
    if (!ready(mode)) return false;
    const int64_t longest = longest_document(cu_seqlens, ndocs, N);
    const Shape sh = {pow2_at_least(ndocs), pow2_at_least(longest > 64 ? longest : 64), Hq, Hkv, D};
    Plan *p = get_plan(true, sh);
    if (!usable(mode, p, "backward", sh)) return false;

    const int64_t nq = (int64_t)N * Hq * D, nkv = (int64_t)N * Hkv * D;
    const bool gqa = Hq != Hkv;
    Carve c;
    const Ragged r = plan_ragged(c, sh.b);
    const size_t stats = c.take((size_t)N * Hq * sizeof(float));
    const size_t softmax_sum = c.take((size_t)N * Hq * sizeof(float));
    const size_t dq_acc = c.take((size_t)nq * sizeof(float));
    /* BF16 tensors, sized as cudnn-frontend sizes them (4 bytes an element) */
    const size_t dk_full = gqa ? c.take((size_t)nq * sizeof(float)) : 0;
    const size_t dv_full = gqa ? c.take((size_t)nq * sizeof(float)) : 0;
    const size_t dq_t = c.take((size_t)nq * sizeof(bf16));
    const size_t dk_t = c.take((size_t)nkv * sizeof(bf16));
    const size_t dv_t = c.take((size_t)nkv * sizeof(bf16));
    const size_t ws = c.take((size_t)p->workspace);
    c.base = (char *)scratch(c.total);
    run_ragged_prep(c, r, cu_seqlens, ndocs, sh);
    lse_to_stats_kernel<<<grid_for((int64_t)N * Hq, 256), 256, 0, stream()>>>((float *)c.at(stats), (const float *)lse->data, N, Hq);
    LAUNCH_CHECK("cudnn attention lse -> stats");
    /* cuDNN >= 9.6 clears dQ_accum itself (cudnn-frontend stopped doing it); cheap insurance */
    CUDA_CHECK(cudaMemsetAsync(c.at(dq_acc), 0, (size_t)nq * sizeof(float), stream()));

    Scalars sc = {scale, -INFINITY, -INFINITY, 1.0f};
    std::vector<int64_t> uids = {U_Q,     U_K,     U_V,     U_O,     U_DO,     U_STATS, U_SCALE, U_SEQ_Q, U_SEQ_KV,
                                 U_Q_OFF, U_K_OFF, U_V_OFF, U_O_OFF, U_ST_OFF, U_DQ,    U_DK,    U_DV,    U_ONE,
                                 U_SOFTMAX_SUM, U_DQ_ACC, U_NEG_PAD, U_NEG_CAUSAL};
    std::vector<void *> ptrs = {q->data,       k->data,        v->data,      out->data,  dout->data, c.at(stats),
                                &sc.scale,     c.at(r.seq_q),  c.at(r.seq_kv), c.at(r.q), c.at(r.k),  c.at(r.v),
                                c.at(r.o),     c.at(r.st),     c.at(dq_t),   c.at(dk_t), c.at(dv_t), &sc.one,
                                c.at(softmax_sum), c.at(dq_acc), &sc.neg_inf_pad, &sc.neg_inf_causal};
    if (gqa) {
        uids.push_back(U_DK_FULL);
        ptrs.push_back(c.at(dk_full));
        uids.push_back(U_DV_FULL);
        ptrs.push_back(c.at(dv_full));
    }
    execute(p, uids, ptrs, c.at(ws));
    accumulate(dq, (const bf16 *)c.at(dq_t), "cudnn attention dq +=");
    accumulate(dk, (const bf16 *)c.at(dk_t), "cudnn attention dk +=");
    accumulate(dv, (const bf16 *)c.at(dv_t), "cudnn attention dv +=");
    return true;
}

}  // namespace msacuda
