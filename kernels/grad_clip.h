/* The gradient-clipping factor, shared by the trainer's host code and the backends' clip_scale kernels so
 * that the factor computed on the device is the host's bit for bit (double arithmetic, one rounding to
 * float at the end). */
#ifndef MSA_GRAD_CLIP_H
#define MSA_GRAD_CLIP_H

#ifdef __CUDACC__
#define MSA_CLIP_HOST_DEVICE __host__ __device__
#else
#define MSA_CLIP_HOST_DEVICE
#endif

/* The factor that brings a global gradient norm down to max_norm: 1 when max_norm is 0 (off) or not
 * exceeded; the 1e-6 keeps the clipped norm just under max_norm. */
static inline MSA_CLIP_HOST_DEVICE float clip_factor(double norm, float max_norm) {
    return max_norm > 0 && norm > max_norm ? (float)(max_norm / (norm + 1e-6)) : 1.0f;
}

#endif
