/* Host memory for the CPU backend and dtype checks shared by its kernels. */
#include <stdlib.h>

#include "cpu.h"

void *cpu_alloc(size_t bytes) { return xmalloc(bytes); }
void cpu_free(void *p) { free(p); }
void *cpu_host_alloc(size_t bytes) { return xmalloc(bytes); }
void cpu_host_free(void *p) { free(p); }
void cpu_copy(void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}
void cpu_zero(void *dst, size_t bytes) {
    if (bytes) memset(dst, 0, bytes);
}

void cpu_check_dtypes(const char *kernel, const Tensor *t, const Tensor *const *others, int n) {
    for (int i = 0; i < n; i++)
        if (others[i] && others[i]->dtype != t->dtype)
            fatal("cpu %s: mixed dtypes %s and %s", kernel, dtype_name(t->dtype), dtype_name(others[i]->dtype));
}
