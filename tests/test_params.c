/* The parameter store's initial values: each parameter's are its own random stream (seeded by the run's
 * seed and the parameter's name), so they do not depend on the order or the threads that fill them. */
#include <math.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../autograd/params.h"
#include "../kernels/util.h"
#include "test.h"

/* FNV-1a, 64-bit (the published prime 0x100000001b3), written apart from the store's. Its offset basis is the
 * store's 1469598103934665603 = 0x14650fb0739d0383, the published 14695981039346656037 = 0xcbf29ce484222325 one
 * digit short: a slip of the store's first version, kept because every model initialised since has its values */
static uint64_t fnv1a_reference(const char *s) {
    uint64_t h = 0x14650fb0739d0383ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

/* a store of a few parameters of every init kind, one of them a slice (init_first) of a larger tensor, filled
 * with `threads` threads; its F32 values returned (caller frees) */
static float *filled_store(int threads, int64_t *numel, ParamStore *ps) {
    params_init(ps, &cpu_backend, DT_F32);
    params_add(ps, "wte", 2, (int64_t[]){300, 64}, INIT_NORMAL, 0.02f, false);
    params_add(ps, "layers.0.attn_norm", 1, (int64_t[]){64}, INIT_ONES, 0, false);
    params_add(ps, "layers.0.attn.wq", 2, (int64_t[]){64, 64}, INIT_NORMAL, 0.5f, true);
    params_add(ps, "layers.0.bias", 1, (int64_t[]){64}, INIT_ZEROS, 0, false);
    params_add(ps, "layers.0.experts.w_up", 3, (int64_t[]){2, 32, 64}, INIT_NORMAL, 1.0f, true);
    params_find(ps, "layers.0.experts.w_up")->init_first = 3 * 32 * 64; /* experts 3 and 4 of a larger tensor */
    ps->init_threads = threads;
    params_allocate(ps, 1234);
    *numel = ps->numel;
    float *v = xmalloc((size_t)ps->numel * sizeof(float));
    memcpy(v, ps->data, (size_t)ps->numel * sizeof(float));
    return v;
}

TEST(initial_values_are_each_names_stream_for_any_thread_count) {
    ParamStore one, many;
    int64_t n1, n4;
    float *a = filled_store(1, &n1, &one), *b = filled_store(4, &n4, &many);
    EXPECT(n1 == n4 && memcmp(a, b, (size_t)n1 * sizeof(float)) == 0, "1 thread and 4 threads give different values");
    /* the reference: element j of a normal parameter is std * (the (init_first + j)-th Box-Muller normal of the
     * xoshiro stream seeded with seed ^ FNV-1a(name)), ones and zeros as named */
    double worst = 0;
    for (int i = 0; i < one.n; i++) {
        const Param *p = &one.p[i];
        Rng rng;
        rng_seed(&rng, 1234 ^ fnv1a_reference(p->t->name));
        for (int64_t j = 0; p->init == INIT_NORMAL && j < p->init_first; j++) rng_normal(&rng);
        for (int64_t j = 0; j < p->t->numel; j++) {
            const double want = p->init == INIT_ONES ? 1.0 : p->init == INIT_ZEROS ? 0.0 : p->init_std * rng_normal(&rng);
            const double got = a[p->offset + j];
            worst = fmax(worst, fabs(got - (float)want));
        }
    }
    EXPECT(worst == 0, "values differ from the name's stream by up to %.3e", worst);
    free(a);
    free(b);
    params_free(&one);
    params_free(&many);
}

/* The fill's threads end with the call: a child forked afterwards (as the tests' fatal-error checks fork) fills a
 * store of its own. An OpenMP pool left by the parent made such a child hang in its first parallel region. */
TEST(a_child_forked_after_a_fill_fills_too) {
    ParamStore parent;
    int64_t n;
    free(filled_store(4, &n, &parent));
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        alarm(30); /* a hang ends the child by SIGALRM, which the parent reports */
        ParamStore child;
        int64_t m;
        free(filled_store(4, &m, &child));
        params_free(&child);
        _exit(m == n ? 0 : 3);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the forked child %s %d",
           WIFSIGNALED(st) ? "was killed by signal" : "exited with", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    params_free(&parent);
}

int main(void) {
    TEST_BEGIN();
    RUN(initial_values_are_each_names_stream_for_any_thread_count);
    RUN(a_child_forked_after_a_fill_fills_too);
    TEST_END();
}
