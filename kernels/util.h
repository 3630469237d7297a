/* Small helpers every part of the project uses: checked allocation, fatal errors, timing. */
#ifndef MSA_UTIL_H
#define MSA_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdnoreturn.h>

/* Print "error: <message>" to stderr and exit(1). For bad input and unrecoverable states. */
noreturn void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void *xmalloc(size_t bytes);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t bytes);
char *xstrdup(const char *s);

double wall_seconds(void);

/* splitmix64-seeded xoshiro256** generator: deterministic, state is a plain value */
typedef struct Rng {
    uint64_t s[4];
} Rng;
void rng_seed(Rng *r, uint64_t seed);
uint64_t rng_next(Rng *r);
double rng_uniform(Rng *r); /* [0, 1) */
double rng_normal(Rng *r);  /* standard normal (Box-Muller, no cached second value) */

#endif
