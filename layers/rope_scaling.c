/* RoPE scaling: model.rope_* -> the RopeTable of a forward (the formulas in rope_scaling.h, those of
 * transformers' _compute_*_parameters, in double precision). */
#include "rope_scaling.h"

#include <math.h>
#include <string.h>

#include "../autograd/arena.h"
#include "../kernels/util.h"

void rope_scaling_validate(const ModelConfig *c, const char *src) {
    const char *type = c->rope_scaling;
    if (!strcmp(type, "none")) return;
    if (strcmp(type, "linear") && c->rope_original_max_position == 0)
        fatal("%s: model.rope_scaling = \"%s\" needs model.rope_original_max_position (the context the model was "
              "trained at), which is 0",
              src, type);
    if (!strcmp(type, "llama3") && !(c->rope_high_freq_factor > c->rope_low_freq_factor))
        fatal("%s: model.rope_high_freq_factor = %g must be > model.rope_low_freq_factor = %g (llama3's band)", src,
              (double)c->rope_high_freq_factor, (double)c->rope_low_freq_factor);
    if (!strcmp(type, "yarn") && !(c->rope_beta_fast > c->rope_beta_slow))
        fatal("%s: model.rope_beta_fast = %g must be > model.rope_beta_slow = %g (yarn's ramp)", src,
              (double)c->rope_beta_fast, (double)c->rope_beta_slow);
}

/* yarn's dimension at which a frequency makes `rotations` turns over the original context */
static double yarn_correction_dim(double rotations, int dim, double base, double context) {
    return dim * log(context / (rotations * 2 * M_PI)) / (2 * log(base));
}

static double yarn_mscale(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * log(factor) + 1.0; }

/* YaRN's frequencies into inv_freq; returns its attention factor (Peng et al. 2023, §3.3-3.4) */
static double yarn_table(const ModelConfig *c, int dim, double *inv_freq) {
    const double base = c->rope_theta, s = c->rope_factor, L = c->rope_original_max_position;
    double low = yarn_correction_dim(c->rope_beta_fast, dim, base, L);
    double high = yarn_correction_dim(c->rope_beta_slow, dim, base, L);
    if (c->rope_truncate) low = floor(low), high = ceil(high);
    if (low < 0) low = 0;
    if (high > dim - 1) high = dim - 1;
    if (low == high) high += 0.001; /* transformers' guard against an empty ramp */
    for (int i = 0; i < dim / 2; i++) {
        double ramp = (i - low) / (high - low); /* 0: keep the frequency (extrapolate), 1: divide it by s */
        ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
        const double f = pow(base, -2.0 * i / dim);
        inv_freq[i] = f / s * ramp + f * (1 - ramp);
    }
    if (c->rope_attention_factor > 0) return c->rope_attention_factor;
    if (c->rope_mscale > 0 && c->rope_mscale_all_dim > 0)
        return yarn_mscale(s, c->rope_mscale) / yarn_mscale(s, c->rope_mscale_all_dim);
    return yarn_mscale(s, 1);
}

/* Llama 3.1's frequency bands into inv_freq */
static void llama3_table(const ModelConfig *c, int dim, double *inv_freq) {
    const double s = c->rope_factor, L = c->rope_original_max_position;
    const double lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
    for (int i = 0; i < dim / 2; i++) {
        const double f = pow((double)c->rope_theta, -2.0 * i / dim), wavelen = 2 * M_PI / f;
        if (wavelen < L / hi) inv_freq[i] = f;
        else if (wavelen > L / lo) inv_freq[i] = f / s;
        else {
            const double smooth = (L / wavelen - lo) / (hi - lo);
            inv_freq[i] = (1 - smooth) * f / s + smooth * f;
        }
    }
}

RopeTable rope_table(const ModelConfig *c, int rotary_dim, int64_t positions_end, double *inv_freq) {
    const int dim = rotary_dim;
    const char *type = c->rope_scaling;
    RopeTable t = {.rotary_dim = dim, .attention_scale = 1.0, .inv_freq = inv_freq};
    double base = c->rope_theta;
    if (!strcmp(type, "yarn")) {
        t.attention_scale = yarn_table(c, dim, inv_freq);
        return t;
    }
    if (!strcmp(type, "llama3")) {
        llama3_table(c, dim, inv_freq);
        return t;
    }
    if (!strcmp(type, "dynamic")) {
        if (positions_end <= 0) fatal("rope_table: dynamic RoPE scaling needs the forward's longest sequence");
        if (dim <= 2) fatal("rope_table: dynamic RoPE scaling needs more than 2 rotary dims, got %d", dim);
        const double L = c->rope_original_max_position, T = positions_end > L ? (double)positions_end : L;
        const double s = c->rope_factor;
        base *= pow(s * T / L - (s - 1), (double)dim / (dim - 2));
    }
    const double divide = !strcmp(type, "linear") ? c->rope_factor : 1.0;
    for (int i = 0; i < dim / 2; i++) inv_freq[i] = pow(base, -2.0 * i / dim) / divide;
    return t;
}

const RopeTable *rope_table_in(Engine *e, const ModelConfig *c, int rotary_dim, int64_t positions_end) {
    RopeTable *t = arena_alloc(&e->host, sizeof *t);
    double *inv_freq = arena_alloc(&e->host, (size_t)(rotary_dim / 2) * sizeof(double));
    *t = rope_table(c, rotary_dim, positions_end, inv_freq);
    return t;
}
