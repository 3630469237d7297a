/* A training step on CUDA without the host waiting for the device (issue 16, issue 14's "no host round
 * trips in an MSA step"): after the first steps have sized every buffer (scratch, plans, arenas, cuDNN
 * and cuBLAS plans), the backend's count of host waits (kernels.def host_waits: copies to the host,
 * synchronisations, frees) must not move over a step that is not logged. A dense model (the cuDNN
 * attention path, which once copied cu_seqlens to the host at every layer) and an MSA model in its dense
 * warm-up (whose KL backward once read its upstream gradient on the host) and its sparse phase. A failure
 * names the call site of the last wait (cuda_last_host_wait). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/cuda/cuda.h"
#include "../../train/trainer.h"
#include "gpu_cases.h"

void host_waits_case(const void *args) {
    const HostWaitsCase *c = args;
    const char *each = getenv("MSA_CUDA_SYNC");
    if (each && each[0] && strcmp(each, "0") != 0) {
        printf("    host waits per step, %s: not checked (MSA_CUDA_SYNC waits after every launch)\n", c->label);
        return;
    }
    Run r;
    memset(&r, 0, sizeof r);
    r.quiet = true;
    config_defaults(&r.cfg);
    config_load(&r.cfg, c->config);
    for (int i = 0; i < 8 && c->sets[i]; i++) config_set(&r.cfg, c->sets[i]);
    /* no step logged but the first and the last (train.steps) */
    config_set(&r.cfg, "train.log_every=1000000");
    r.cfg.train.steps = c->warm_steps + c->measured_steps + 1;
    snprintf(r.cfg.train.device, sizeof r.cfg.train.device, "cuda");
    r.config_path = c->config;
    run_init(&r);
    r.defer_step_results = true; /* as run_train on a GPU */
    for (int s = 0; s < c->warm_steps; s++) run_step(&r);
    int64_t worst = 0;
    const char *site = "none";
    bool read = false; /* a step not logged must leave its loss on the device */
    for (int s = 0; s < c->measured_steps; s++) {
        const int64_t before = GB->host_waits();
        StepResult res = run_step(&r);
        const int64_t waits = GB->host_waits() - before;
        if (waits > worst) worst = waits, site = cuda_last_host_wait();
        read |= !isnan(res.loss);
    }
    /* the last step is logged: its loss and norm come to the host, finite */
    StepResult last = run_step(&r);
    char name[160];
    snprintf(name, sizeof name, "host waits per step, %s", c->label);
    record(worst == 0 && !read && isfinite(last.loss) && isfinite(last.grad_norm),
           "%-58s %lld in the worst of %d steps (last at %s)%s; logged step loss %.4f, gnorm %.4f", name,
           (long long)worst, c->measured_steps, site, read ? ", an unlogged step read its loss" : "", last.loss,
           last.grad_norm);
    run_free(&r);
}

/* copy_from_host stages copies of up to 4 MiB through a ring of page-locked memory and returns before the
 * device has them (kernels/cuda/runtime.cu): many copies of mixed sizes, from one host buffer that is
 * overwritten right after each call, around the ring several times (it reuses a region only after the
 * copy that read it has passed), plus one past the ring's limit, must each land as their bytes were at
 * the call. */
void staged_copies_case(const void *args) {
    (void)args;
    enum { COPIES = 300 };
    const size_t big = (size_t)5 << 20;
    size_t size[COPIES + 1], at[COPIES + 2], total = 0;
    for (int i = 0; i <= COPIES; i++) {
        size[i] = i == COPIES ? big : 1 + (size_t)(rng_next(&gpu_check.rng) % (i % 7 == 0 ? 300000 : 5000));
        at[i] = total;
        total += size[i];
    }
    unsigned char *src = xmalloc(big), *want = xmalloc(total), *got = xmalloc(total);
    char *dev = GB->alloc(total);
    const int64_t waits = GB->host_waits();
    for (int i = 0; i <= COPIES; i++) {
        for (size_t b = 0; b < size[i]; b++) src[b] = (unsigned char)(rng_next(&gpu_check.rng) >> 24);
        memcpy(want + at[i], src, size[i]);
        GB->copy_from_host(dev + at[i], src, size[i]);
        memset(src, 0xAB, size[i]); /* the staged copy must not read the caller's buffer after the call */
    }
    const int64_t staged_waits = GB->host_waits() - waits;
    GB->copy_to_host(got, dev, total);
    size_t bad = 0;
    for (size_t b = 0; b < total; b++) bad += got[b] != want[b];
    record(bad == 0, "%-58s %zu of %zu bytes differ; %lld host waits (the %zu-byte copy blocks)",
           "staged copy_from_host, 301 copies around the ring", bad, total, (long long)staged_waits, big);
    GB->free(dev);
    free(src), free(want), free(got);
}
