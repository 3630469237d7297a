/* Fuzz target: a config file (train/config.c). The input is the file's bytes; config_load reads them as
 * build/train reads its config argument, then come what train does next (config_validate, the layer
 * selectors the model builder asks for) and the run directory's copy of the config (config_to_json),
 * which must read back as the same config. A refusal (fatal) is the expected answer to most inputs. */
#include <stdint.h>

#include "../../train/config.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static RunConfig c; /* static: it outlives the jump back from a refusal */
    int fd;
    const char *path = fuzz_memfile(data, size, &fd);
    fuzz_arm();
    if (setjmp(fuzz_refused)) {
        fuzz_memfile_close(fd);
        return 0;
    }
    config_defaults(&c);
    config_load(&c, path);
    fuzz_memfile_close(fd);
    fuzz_check_config_round_trip(&c);
    fuzz_arm();
    if (setjmp(fuzz_refused)) return 0;
    config_validate(&c);
    for (int l = 0; l < c.model.n_layers; l++) {
        config_layer_attention(&c, l);
        config_layer_ffn(&c, l);
    }
    return 0;
}
