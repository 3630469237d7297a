/* Fuzz target: command-line overrides (`--set section.key=value`, train/config.c). The input is a list of
 * assignments, one per line; each goes through config_set as build/train's --set does, over the
 * defaults, the ones refused leaving the config as it was. The result must pass the same round trip
 * through the run directory's config.json as a config file (fuzz_check_config_round_trip), and
 * config_validate either accepts or refuses it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../train/config.h"
#include "fuzz.h"

#define MAX_ASSIGNMENTS 16

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static RunConfig c; /* static: it outlives the jumps back from refusals */
    static char *lines[MAX_ASSIGNMENTS];
    static int n;
    /* command-line arguments cannot hold a NUL: one ends the list */
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = 0;
    n = 0;
    for (char *p = text; n < MAX_ASSIGNMENTS;) {
        lines[n++] = p;
        p += strcspn(p, "\n");
        if (!*p) break;
        *p++ = 0;
    }
    config_defaults(&c);
    static int i; /* static: it outlives the jumps back from refusals */
    for (i = 0; i < n; i++) {
        fuzz_arm();
        if (setjmp(fuzz_refused) == 0) config_set(&c, lines[i]);
    }
    free(text);
    fuzz_check_config_round_trip(&c);
    fuzz_arm();
    if (setjmp(fuzz_refused)) return 0;
    config_validate(&c);
    return 0;
}
