/* RoPE scaling (model.rope_scaling): the rotary frequencies and the cos/sin scale of a forward, computed
 * on the host from the config exactly as Hugging Face transformers' modeling_rope_utils.py computes them
 * for its rope_type of the same name, and handed to the rope kernels of every backend (RopeTable,
 * kernels/backend.h). With base b = rope_theta, dim = rotary_dim, s = rope_factor, L = the original
 * context (rope_original_max_position) and f_i = b^(-2i/dim):
 *   none     f_i
 *   linear   f_i / s
 *   dynamic  f_i with b' = b * (s * T / L - (s - 1))^(dim / (dim - 2)), T = max(L, the forward's
 *            longest sequence): the table changes with the forward's positions
 *   yarn     f_i / s below the ramp of dims [low, high] (from beta_slow and beta_fast rotations over L),
 *            f_i above it, linear in between; cos and sin times the attention factor
 *   llama3   f_i where the wavelength 2 pi / f_i < L / high_freq_factor, f_i / s where it is
 *            > L / low_freq_factor, smoothly interpolated in between */
#ifndef MSA_ROPE_SCALING_H
#define MSA_ROPE_SCALING_H

#include "../autograd/engine.h"
#include "../kernels/backend.h"
#include "../train/config.h"

/* The cross-key rules of the rope_* keys; stops naming the key (src: the config's file). */
void rope_scaling_validate(const ModelConfig *c, const char *src);

/* The table of a forward of rotary_dim dims whose longest sequence reaches position positions_end - 1
 * (only dynamic reads it; 0 = unknown, which dynamic refuses). inv_freq holds rotary_dim / 2 values. */
RopeTable rope_table(const ModelConfig *c, int rotary_dim, int64_t positions_end, double *inv_freq);

/* The same in e's host arena, where it lives as long as the tape that reads it in the backward. */
const RopeTable *rope_table_in(Engine *e, const ModelConfig *c, int rotary_dim, int64_t positions_end);

#endif
