/* AdamW against a hand-computed reference, gradient clipping, the LR schedule. */
#include <math.h>
#include <string.h>

#include "../train/optim.h"
#include "test.h"

/* PyTorch's formulation (decay applied multiplicatively first), independent of ours */
static void adamw_reference(double *p, const double *g, double *m, double *v, int n, double lr, double b1, double b2,
                            double eps, double wd, int t) {
    for (int i = 0; i < n; i++) {
        p[i] *= 1 - lr * wd;
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
        double mh = m[i] / (1 - pow(b1, t)), vh = v[i] / (1 - pow(b2, t));
        p[i] -= lr * mh / (sqrt(vh) + eps);
    }
}

static OptimConfig test_optim(void) {
    OptimConfig oc = {.lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 3, .weight_decay = 0.1f, .beta1 = 0.9f,
                      .beta2 = 0.95f, .eps = 1e-8f, .grad_clip = 1.0f};
    return oc;
}

TEST(adamw_three_steps_match_reference) {
    ParamStore ps;
    params_init(&ps, &cpu_backend, DT_F64);
    Tensor *w = params_add(&ps, "w", 2, (int64_t[]){2, 3}, INIT_NORMAL, 1.0f, true);
    Tensor *g = params_add(&ps, "norm", 1, (int64_t[]){3}, INIT_ONES, 0, false);
    params_allocate(&ps, 42);
    OptimConfig oc = test_optim();
    AdamW opt;
    adamw_init(&opt, &ps);
    double p_ref[9], m_ref[9] = {0}, v_ref[9] = {0};
    memcpy(p_ref, ps.data, sizeof p_ref);
    double grads[3][9] = {{0.1, -0.2, 0.3, 0.5, -1.0, 2.0, 0.01, 0.02, -0.03},
                          {-0.3, 0.2, 0.1, 0.0, 1.5, -0.5, 0.2, -0.1, 0.05},
                          {0.7, 0.7, -0.7, 0.1, 0.2, 0.3, -0.02, 0.04, 0.0}};
    for (int t = 1; t <= 3; t++) {
        memcpy(ps.grad, grads[t - 1], sizeof grads[0]);
        adamw_step(&opt, &ps, &oc, oc.lr, NULL);
        adamw_reference(p_ref, grads[t - 1], m_ref, v_ref, 6, oc.lr, oc.beta1, oc.beta2, oc.eps, oc.weight_decay, t);
        adamw_reference(p_ref + 6, grads[t - 1] + 6, m_ref + 6, v_ref + 6, 3, oc.lr, oc.beta1, oc.beta2, oc.eps, 0.0, t);
        double err = 0;
        for (int i = 0; i < 9; i++) err = fmax(err, fabs(((double *)ps.data)[i] - p_ref[i]));
        EXPECT(err < 1e-9, "step %d: max |p - p_ref| = %.3e", t, err);
    }
    (void)w;
    (void)g;
    adamw_free(&opt);
    params_free(&ps);
}

TEST(frozen_parameters_do_not_move) {
    ParamStore ps;
    params_init(&ps, &cpu_backend, DT_F64);
    params_add(&ps, "backbone.w", 1, (int64_t[]){4}, INIT_NORMAL, 1.0f, true);
    params_add(&ps, "index.w", 1, (int64_t[]){4}, INIT_NORMAL, 1.0f, true);
    params_allocate(&ps, 1);
    EXPECT(params_set_trainable(&ps, "backbone", false) == 1, "pattern should match one parameter");
    double before[8];
    memcpy(before, ps.data, sizeof before);
    for (int i = 0; i < 8; i++) ((double *)ps.grad)[i] = 1.0;
    OptimConfig oc = test_optim();
    AdamW opt;
    adamw_init(&opt, &ps);
    adamw_step(&opt, &ps, &oc, oc.lr, NULL);
    EXPECT(memcmp(before, ps.data, 4 * sizeof(double)) == 0, "a frozen parameter moved");
    EXPECT(memcmp(before + 4, (double *)ps.data + 4, 4 * sizeof(double)) != 0, "a trainable parameter did not move");
    EXPECT(params_count(&ps, true) == 4, "trainable count %lld", (long long)params_count(&ps, true));
    adamw_free(&opt);
    params_free(&ps);
}

TEST(clipping_clips_to_max_norm) {
    ParamStore ps;
    params_init(&ps, &cpu_backend, DT_F64);
    params_add(&ps, "a", 1, (int64_t[]){2}, INIT_ZEROS, 0, true);
    params_add(&ps, "b", 1, (int64_t[]){2}, INIT_ZEROS, 0, true);
    params_allocate(&ps, 1);
    double g[4] = {3, 4, 0, 12}; /* norm 13 */
    memcpy(ps.grad, g, sizeof g);
    double before = clip_grad_norm(&ps, 1.0f);
    EXPECT(fabs(before - 13.0) < 1e-12, "norm before clipping %.15f", before);
    double after = grad_global_norm(&ps);
    EXPECT(fabs(after - 1.0) < 1e-6, "norm after clipping %.15f", after);
    EXPECT(fabs(((double *)ps.grad)[1] / ((double *)ps.grad)[0] - 4.0 / 3.0) < 1e-12, "clipping changed direction");
    /* under the threshold nothing changes */
    memcpy(ps.grad, g, sizeof g);
    clip_grad_norm(&ps, 100.0f);
    EXPECT(memcmp(ps.grad, g, sizeof g) == 0, "clipping changed a gradient below the threshold");
    params_free(&ps);
}

/* adamw_step's grad_scale is the clipping step folded into the update (one backend call): the same
 * parameters and moments as scaling the gradients first, bit for bit, and the gradients left scaled */
TEST(adamw_grad_scale_is_clipping_then_update) {
    ParamStore ps[2];
    AdamW opt[2];
    OptimConfig oc = test_optim();
    for (int k = 0; k < 2; k++) {
        params_init(&ps[k], &cpu_backend, DT_F32);
        params_add(&ps[k], "w", 2, (int64_t[]){3, 5}, INIT_NORMAL, 1.0f, true);
        params_add(&ps[k], "norm", 1, (int64_t[]){5}, INIT_ONES, 0, false);
        params_allocate(&ps[k], 7);
        for (int i = 0; i < 20; i++) ((float *)ps[k].grad)[i] = 0.1f * (float)(i % 7) - 0.25f;
        adamw_init(&opt[k], &ps[k]);
    }
    const float sc = 0.37f;
    grad_scale_range(&ps[0], 0, ps[0].numel, sc);
    adamw_step(&opt[0], &ps[0], &oc, oc.lr, NULL);
    Tensor scale = step_scalar(&cpu_backend, DT_F32);
    *(float *)scale.data = sc;
    adamw_step(&opt[1], &ps[1], &oc, oc.lr, &scale);
    step_scalar_free(&cpu_backend, &scale);
    const size_t bytes = 20 * sizeof(float);
    EXPECT(memcmp(ps[0].data, ps[1].data, bytes) == 0, "parameters differ");
    EXPECT(memcmp(opt[0].m, opt[1].m, bytes) == 0 && memcmp(opt[0].v, opt[1].v, bytes) == 0, "moments differ");
    EXPECT(memcmp(ps[0].grad, ps[1].grad, bytes) == 0, "gradients not left scaled");
    for (int k = 0; k < 2; k++) {
        adamw_free(&opt[k]);
        params_free(&ps[k]);
    }
}

TEST(lr_schedule_warmup_then_cosine) {
    OptimConfig oc = test_optim();
    oc.warmup_steps = 10;
    int total = 110;
    EXPECT(fabsf(lr_schedule(&oc, 0, total) - oc.lr / 10) < 1e-9f, "first warm-up step");
    EXPECT(fabsf(lr_schedule(&oc, 9, total) - oc.lr) < 1e-9f, "end of warm-up reaches the peak");
    EXPECT(fabsf(lr_schedule(&oc, 10, total) - oc.lr) < 1e-9f, "decay starts at the peak");
    EXPECT(fabsf(lr_schedule(&oc, total - 1, total) - oc.min_lr) < 1e-9f, "last step is min_lr");
    /* decay runs over steps 10..109 (99 intervals): step 59 is 49/99 of the way */
    double mid = oc.min_lr + (oc.lr - oc.min_lr) * 0.5 * (1 + cos(M_PI * 49.0 / 99.0));
    EXPECT(fabs(lr_schedule(&oc, 10 + 49, total) - mid) < 1e-6 * oc.lr, "cosine midpoint");
    for (int s = 10; s < total - 1; s++)
        EXPECT(lr_schedule(&oc, s + 1, total) <= lr_schedule(&oc, s, total), "not monotone at step %d", s);
}

int main(void) {
    TEST_BEGIN();
    RUN(adamw_three_steps_match_reference);
    RUN(frozen_parameters_do_not_move);
    RUN(clipping_clips_to_max_norm);
    RUN(adamw_grad_scale_is_clipping_then_update);
    RUN(lr_schedule_warmup_then_cosine);
    TEST_END();
}
