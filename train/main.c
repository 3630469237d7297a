/* build/train: trains the model a JSON config describes (configs/README.md lists every key).
 *
 *   build/train CONFIG.json [--set section.key=value]...   train
 *   build/train --help | --help-config                      usage | every config key
 */
#include <stdio.h>
#include <string.h>

#include "../kernels/util.h"
#include "trainer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: build/train CONFIG.json [--set section.key=value]...\n"
            "       build/train --help-config      (every config key, its default and meaning)\n"
            "Trains the decoder-only transformer the config describes, prints a progress line per\n"
            "log step and the validation loss every train.eval_every steps. Example:\n"
            "  build/train configs/shakespeare_char.json --set train.steps=100\n");
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--help-config")) {
            config_print_help();
            return 0;
        }
    }
    Run run;
    memset(&run, 0, sizeof run);
    config_defaults(&run.cfg);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) fatal("--set needs section.key=value");
            if (!run.config_path) fatal("--set must come after the config file");
            config_set(&run.cfg, argv[++i]);
        } else if (argv[i][0] == '-') {
            usage(stderr);
            fatal("unknown option %s", argv[i]);
        } else if (!run.config_path) {
            run.config_path = argv[i];
            config_load(&run.cfg, run.config_path);
        } else fatal("unexpected argument %s (one config file only)", argv[i]);
    }
    if (!run.config_path) {
        usage(stderr);
        return 2;
    }
    run_init(&run);
    run_train(&run);
    run_sample(&run);
    run_free(&run);
    return 0;
}
