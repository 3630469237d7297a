/* Small helpers every part of the project uses: checked allocation, fatal errors, timing. */
#ifndef MSA_UTIL_H
#define MSA_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdnoreturn.h>

/* Print "error: <message>" to stderr and exit(1). For bad input and unrecoverable states. */
noreturn void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What fatal() does besides printing, for the layer that owns the process: with a hook set, the message
 * reads "error: <tag>: <message>" and fatal calls hook(ctx) before exit(1). dist/ sets one that calls
 * MPI_Abort when the job has several ranks (tag "rank 3"), so a failing rank ends the whole job with its
 * message instead of leaving the others waiting; this file stays free of MPI. NULL hook: the default. */
typedef void (*FatalHook)(void *ctx);
void fatal_set_hook(FatalHook hook, void *ctx, const char *tag);

void *xmalloc(size_t bytes);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t bytes);
char *xstrdup(const char *s);

double wall_seconds(void);

/* Create the directory dir and every missing parent (mkdir -p), mode 0755; one that exists is fine. Returns
 * 0, or an errno value (ENOTDIR when a component exists but is not a directory) with the component that
 * could not be made in failed[0..failed_size). The caller words the message: it knows what dir is for. */
int make_dirs(const char *dir, char *failed, size_t failed_size);

/* splitmix64-seeded xoshiro256** generator: deterministic, state is a plain value */
typedef struct Rng {
    uint64_t s[4];
} Rng;
void rng_seed(Rng *r, uint64_t seed);
uint64_t rng_next(Rng *r);
double rng_uniform(Rng *r); /* [0, 1) */
double rng_normal(Rng *r);  /* standard normal (Box-Muller, no cached second value) */

#endif
