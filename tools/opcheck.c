/* opcheck: run one op chain on given inputs and write every output and gradient, so that a backend
 * (the CUDA kernels, or an external reference such as a PyTorch port) can be compared against the
 * CPU reference on identical data.
 *
 *   opcheck msa IN.h5 OUT.h5 [--device cpu|cuda]
 *
 * IN.h5 (datasets are read through HDF5 type conversion, so any numeric type works):
 *   q [T,Hq,d], k [T,Hkv,d], v [T,Hkv,d], qi [T,Hidx,didx] (Hidx = Hkv), ki [T,didx],
 *   cu_seqlens [ndocs+1] (integers, 0 .. T), dout [T,Hq,d]
 *   root attributes: block_size, topk_blocks, init_blocks, local_blocks (integers),
 *                    scale, index_scale, kl_weight (reals)
 * The chain is the MSA layer's (layers/msa.h msa_attend): topk = indexer(qi, ki), its plan;
 *            out, lse = msa_attention(q, k, v, topk); kl = kl_weight * mean KL(teacher(q, k, lse) ||
 *            student(qi, ki)) over topk; backward of  L = sum(out * dout) + kl (the sparse phase's one
 *            node: the KL computed by the backward, with the indexer's idx_lse).
 * OUT.h5 (float32 unless noted): out [T,Hq,d], lse [Hq,T], topk [Hidx,T,topk_blocks] (int32),
 *   kl (scalar: the loss term kl_weight * mean KL), kl_unweighted (scalar: mean KL),
 *   dq, dk, dv (shapes of q, k, v), dqi, dki (shapes of qi, ki).
 * Bad input (a missing file, dataset or attribute, a shape mismatch) exits with status 1 and a
 * message naming the file and the item. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/ops.h"
#include "../data/h5read.h"
#include "../kernels/util.h"
#include "../layers/msa.h"

typedef struct {
    int ndim;
    int64_t dims[4];
    void *data; /* float or int32_t */
} HostArray;

static void shape_str(char *buf, size_t n, int ndim, const int64_t *dims) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++) o += (size_t)snprintf(buf + o, n - o, i ? ", %lld" : "%lld", (long long)dims[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* Read dataset `name` of rank `ndim` (any numeric type) into host memory as float (is_int = 0) or int32
 * (is_int = 1). */
static HostArray read_dataset(H5Reader *rd, const char *name, int ndim, int is_int) {
    const H5DatasetSpec spec = {.mem_type = is_int ? H5T_NATIVE_INT32 : H5T_NATIVE_FLOAT, .any_number = true,
                                .ndim = ndim};
    H5Shape shape;
    HostArray a = {.ndim = ndim};
    h5r_dataset_read(rd, rd->file, name, &spec, true, &shape, &a.data);
    for (int i = 0; i < ndim; i++) a.dims[i] = shape.dims[i];
    return a;
}

/* A one-element (scalar or [1]) numeric attribute of the root group, as double. */
static double read_attr(H5Reader *rd, const char *name) {
    double v = 0;
    h5r_attr_float(rd, rd->file, name, true, true, &v);
    return v;
}

static int read_int_attr(H5Reader *rd, const char *name) {
    double v = read_attr(rd, name);
    if (!(v >= INT_MIN && v <= INT_MAX) || v != floor(v))
        fatal("%s: attribute \"%s\" must be an integer, got %g", rd->path, name, v);
    return (int)v;
}

static void expect_shape(const char *path, const char *name, const HostArray *a, int ndim, const int64_t *want,
                         const char *meaning) {
    bool ok = a->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = a->dims[i] == want[i];
    if (!ok) {
        char got[96], exp[96];
        shape_str(got, sizeof got, a->ndim, a->dims);
        shape_str(exp, sizeof exp, ndim, want);
        fatal("%s: dataset \"%s\" has shape %s, expected %s %s", path, name, got, exp, meaning);
    }
}

static void write_dataset(hid_t file, const char *path, const char *name, int ndim, const int64_t *dims,
                          const void *data, int is_int) {
    hsize_t hd[4];
    for (int i = 0; i < ndim; i++) hd[i] = (hsize_t)dims[i];
    hid_t space = ndim ? H5Screate_simple(ndim, hd, NULL) : H5Screate(H5S_SCALAR);
    hid_t ftype = is_int ? H5T_STD_I32LE : H5T_IEEE_F32LE;
    hid_t dset = H5Dcreate2(file, name, ftype, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (dset < 0 || H5Dwrite(dset, is_int ? H5T_NATIVE_INT32 : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
        fatal("%s: cannot write dataset \"%s\"", path, name);
    H5Dclose(dset);
    H5Sclose(space);
}

/* A leaf activation on the engine's device in its activation dtype, from float32 host data. */
static Tensor *upload(Engine *e, const HostArray *a, bool requires_grad) {
    Tensor *t32 = engine_empty(e, DT_F32, a->ndim, a->dims);
    tensor_from_host(e, t32, a->data);
    Tensor *t = t32;
    if (e->act_dtype != DT_F32) {
        t = engine_empty(e, e->act_dtype, a->ndim, a->dims);
        e->be->cast(t, t32);
    }
    t->requires_grad = requires_grad;
    return t;
}

/* float32 host copy of any float tensor (zeros for a NULL gradient) */
static float *download(Engine *e, const Tensor *t, int64_t numel) {
    float *h = xcalloc((size_t)(numel > 0 ? numel : 1), sizeof(float));
    if (!t) return h;
    tensor_to_host_f32(e, h, t);
    return h;
}

static void usage(void) {
    fprintf(stderr, "usage: opcheck msa IN.h5 OUT.h5 [--device cpu|cuda]\n");
    exit(1);
}

static int run_msa(const char *in_path, const char *out_path, const char *device) {
    const KernelBackend *be = NULL;
    DType act = DT_F32;
    if (strcmp(device, "cpu") == 0) be = &cpu_backend;
    else if (strcmp(device, "cuda") == 0) {
#ifdef MSA_CUDA
        be = &cuda_backend;
        act = DT_BF16; /* the CUDA backend's activation dtype (DESIGN §5) */
#else
        fatal("--device cuda: CUDA backend not built (this opcheck was compiled without MSA_CUDA)");
#endif
    } else fatal("--device must be cpu or cuda, got '%s'", device);

    H5Reader rd; /* its messages name the file and the item; h5_setup keeps a failed close from crashing the exit */
    h5r_open(&rd, in_path, "input file", NULL, true);
    HostArray q = read_dataset(&rd, "q", 3, 0);
    const int64_t T = q.dims[0], Hq = q.dims[1], d = q.dims[2];
    HostArray k = read_dataset(&rd, "k", 3, 0);
    const int64_t Hkv = k.dims[1];
    expect_shape(in_path, "k", &k, 3, (int64_t[]){T, Hkv, d}, "(T and d from q)");
    HostArray v = read_dataset(&rd, "v", 3, 0);
    expect_shape(in_path, "v", &v, 3, k.dims, "(the shape of k)");
    if (Hkv < 1 || Hq % Hkv != 0)
        fatal("%s: q has %lld heads, not a multiple of k's %lld heads", in_path, (long long)Hq, (long long)Hkv);
    HostArray qi = read_dataset(&rd, "qi", 3, 0);
    const int64_t didx = qi.dims[2];
    expect_shape(in_path, "qi", &qi, 3, (int64_t[]){T, Hkv, didx}, "(T from q; one index head per KV head)");
    HostArray ki = read_dataset(&rd, "ki", 2, 0);
    expect_shape(in_path, "ki", &ki, 2, (int64_t[]){T, didx}, "(T from q, didx from qi)");
    HostArray cu = read_dataset(&rd, "cu_seqlens", 1, 1);
    const int32_t *c = cu.data;
    const int64_t ndocs = cu.dims[0] - 1;
    if (ndocs < 1) fatal("%s: cu_seqlens needs at least 2 entries", in_path);
    if (c[0] != 0 || c[ndocs] != T) fatal("%s: cu_seqlens must run from 0 to T = %lld, got %d .. %d", in_path, (long long)T, c[0], c[ndocs]);
    for (int64_t i = 0; i < ndocs; i++)
        if (c[i + 1] < c[i]) fatal("%s: cu_seqlens decreases at entry %lld", in_path, (long long)i + 1);
    HostArray dout = read_dataset(&rd, "dout", 3, 0);
    expect_shape(in_path, "dout", &dout, 3, q.dims, "(the shape of q)");
    const MsaSettings s = {
        .params = {.block_size = read_int_attr(&rd, "block_size"),
                   .topk_blocks = read_int_attr(&rd, "topk_blocks"),
                   .init_blocks = read_int_attr(&rd, "init_blocks"),
                   .local_blocks = read_int_attr(&rd, "local_blocks"),
                   .scale = (float)read_attr(&rd, "scale"),
                   .index_scale = (float)read_attr(&rd, "index_scale")},
        .kl_weight = (float)read_attr(&rd, "kl_weight"),
    };
    h5r_close(&rd);
    char why[256];
    if (!msa_check(&s.params, "attribute ", why, sizeof why)) fatal("%s: %s", in_path, why);

    Engine e;
    engine_init(&e, be, act, 64 << 20);
    Tensor *tq = upload(&e, &q, true), *tk = upload(&e, &k, true), *tv = upload(&e, &v, true);
    Tensor *tqi = upload(&e, &qi, true), *tki = upload(&e, &ki, true), *tdout = upload(&e, &dout, false);
    Tensor *tcu = engine_empty(&e, DT_I32, SHAPE(ndocs + 1));
    tensor_from_host(&e, tcu, cu.data);

    Tensor *kl = engine_zeros(&e, DT_F32, SHAPE(1)); /* the unweighted mean KL, the backward's */
    MsaAttention a = msa_attend(&e, &s, tq, tk, tv, tqi, tki, tcu, false, kl, NULL);
    /* seed L = sum(out * dout) + kl in one walk of the tape (two separate backward calls would run
     * the KL node twice) */
    be->axpy(engine_grad(&e, a.out), tdout, 1.0f);
    if (a.loss->dtype != DT_F32) fatal("opcheck: expected an f32 loss, got %s", dtype_name(a.loss->dtype));
    Tensor *one = engine_empty(&e, DT_F32, SHAPE(1));
    tensor_from_host(&e, one, &(float){1.0f});
    be->axpy(engine_grad(&e, a.loss), one, 1.0f);
    engine_backward_tape(&e, 0);
    const float klu = (float)tensor_item(&e, kl);
    /* the loss term as the KL op forms it (weight * KL in f32), known after the backward when deferred */
    const double kl_val = a.deferred ? (s.kl_weight == 1.0f ? klu : klu * s.kl_weight) : tensor_item(&e, a.loss);

    hid_t o = H5Fcreate(out_path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (o < 0) fatal("%s: cannot create the output file", out_path);
    struct {
        const char *name;
        const Tensor *t, *like;
    } outs[] = {{"out", a.out, a.out}, {"lse", a.lse, a.lse}, {"dq", tq->grad, tq}, {"dk", tk->grad, tk},
                {"dv", tv->grad, tv}, {"dqi", tqi->grad, tqi}, {"dki", tki->grad, tki}};
    for (size_t i = 0; i < sizeof outs / sizeof outs[0]; i++) {
        float *h = download(&e, outs[i].t, outs[i].like->numel);
        write_dataset(o, out_path, outs[i].name, outs[i].like->ndim, outs[i].like->shape, h, 0);
        free(h);
    }
    int32_t *htk = xmalloc(tensor_bytes(a.topk));
    tensor_to_host(&e, htk, a.topk);
    write_dataset(o, out_path, "topk", 3, a.topk->shape, htk, 1);
    free(htk);
    const float klw = (float)kl_val;
    write_dataset(o, out_path, "kl", 0, NULL, &klw, 0);
    write_dataset(o, out_path, "kl_unweighted", 0, NULL, &klu, 0);
    if (H5Fclose(o) < 0) fatal("%s: cannot close the output file", out_path);
    printf("opcheck msa (%s): T=%lld Hq=%lld Hkv=%lld d=%lld didx=%lld docs=%lld, kl=%.6g -> %s\n", be->name,
           (long long)T, (long long)Hq, (long long)Hkv, (long long)d, (long long)didx, (long long)ndocs, kl_val, out_path);
    engine_free(&e);
    HostArray *all[] = {&q, &k, &v, &qi, &ki, &cu, &dout};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]->data);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) usage();
    const char *device = "cpu";
    for (int i = 4; i < argc; i++) {
        if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) device = argv[++i];
        else if (strncmp(argv[i], "--device=", 9) == 0) device = argv[i] + 9;
        else {
            fprintf(stderr, "opcheck: unknown argument '%s'\n", argv[i]);
            usage();
        }
    }
    if (strcmp(argv[1], "msa") == 0) return run_msa(argv[2], argv[3], device);
    fprintf(stderr, "opcheck: unknown op '%s' (supported: msa)\n", argv[1]);
    usage();
}
