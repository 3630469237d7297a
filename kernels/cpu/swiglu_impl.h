/* Typed bodies of SwiGLU, out = silu(gate) * up (instantiated by swiglu.c). */
static void S(swiglu_fwd)(T *out, const T *gate, const T *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        double g = gate[i], sig = 1.0 / (1.0 + exp(-g));
        out[i] = (T)(g * sig * up[i]);
    }
}

/* d silu(g)/dg = sig * (1 + g * (1 - sig)) */
static void S(swiglu_bwd)(T *dgate, T *dup, const T *dout, const T *gate, const T *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        double g = gate[i], sig = 1.0 / (1.0 + exp(-g));
        if (dgate) dgate[i] += (T)(dout[i] * up[i] * sig * (1.0 + g * (1.0 - sig)));
        if (dup) dup[i] += (T)(dout[i] * g * sig);
    }
}
