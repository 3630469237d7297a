#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* The process's fatal() hook (util.h): set once at start-up by dist_init, before any other thread
 * exists, and read only by fatal. */
static struct {
    FatalHook hook;
    void *ctx;
    char tag[32];
    int entered; /* a fatal() inside the hook must not run the hook again */
} fatal_ctx;

void fatal_set_hook(FatalHook hook, void *ctx, const char *tag) {
    fatal_ctx.hook = hook;
    fatal_ctx.ctx = ctx;
    fatal_ctx.entered = 0; /* setting arms it again: the fuzz targets' hook jumps out of fatal each input */
    snprintf(fatal_ctx.tag, sizeof fatal_ctx.tag, "%s", hook && tag ? tag : "");
}

void fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    /* one write per message, so that the messages of several ranks do not interleave mid-line */
    char msg[8192];
    int k = snprintf(msg, sizeof msg, "error: %s%s", fatal_ctx.tag, fatal_ctx.tag[0] ? ": " : "");
    vsnprintf(msg + k, sizeof msg - (size_t)k, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", msg);
    fflush(stderr);
    if (fatal_ctx.hook && !fatal_ctx.entered++) fatal_ctx.hook(fatal_ctx.ctx);
    exit(1);
}

void *xmalloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 1;
    if (posix_memalign(&p, 64, bytes) != 0) fatal("out of host memory allocating %zu bytes", bytes);
    return p;
}

void *xcalloc(size_t n, size_t size) {
    void *p = xmalloc(n * size);
    memset(p, 0, n * size);
    return p;
}

void *xrealloc(void *p, size_t bytes) {
    void *q = realloc(p, bytes ? bytes : 1);
    if (!q) fatal("out of host memory reallocating %zu bytes", bytes);
    return q;
}

char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = xmalloc(n);
    memcpy(d, s, n);
    return d;
}

double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int make_dirs(const char *dir, char *failed, size_t failed_size) {
    char *p = xstrdup(dir);
    int err = 0;
    /* each prefix that ends at a '/' (the leading one of an absolute path excluded), then dir itself */
    for (char *s = p + 1; *p && !err; s++) {
        if (*s != '/' && *s) continue;
        char c = *s;
        *s = 0;
        struct stat st;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) err = errno;
        else if (stat(p, &st) != 0) err = errno;
        else if (!S_ISDIR(st.st_mode)) err = ENOTDIR;
        if (err) snprintf(failed, failed_size, "%s", p);
        *s = c;
        if (!c) break;
    }
    free(p);
    return err;
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void rng_seed(Rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rng_next(Rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double rng_uniform(Rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

double rng_normal(Rng *r) {
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}
