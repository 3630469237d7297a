/* build/train: trains the model a JSON config describes (configs/README.md lists every key).
 *
 *   build/train CONFIG.json [--set section.key=value]... [--resume]   train (or continue a run)
 *   build/train MODEL.json RECIPE.json ...                             files layered left to right
 *   mpirun -np N build/train CONFIG.json ...                           the same on N ranks (dist.*)
 *   build/train --help | --help-config                                 usage | every config key
 *   build/train --check-config CONFIG.json... [--set ...]              validate; print the effective config
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"
#include "checkpoint.h"
#include "trainer.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: build/train CONFIG.json [CONFIG.json]... [--set section.key=value]... [--resume]\n"
            "       build/train --help-config      (every config key, its default and meaning)\n"
            "       build/train --check-config CONFIG.json... [--set section.key=value]...\n"
            "                                      (the checks a run makes of the keys, without data;\n"
            "                                      prints the effective config as JSON, with the model\n"
            "                                      keys train.init_from's checkpoint supplies)\n"
            "Trains the decoder-only transformer the config describes, prints a progress line per\n"
            "log step and the validation loss every train.eval_every steps. Example:\n"
            "  build/train configs/shakespeare_char.json --set train.steps=100\n"
            "Several config files are layered left to right, each key of a later file overriding the\n"
            "same key of an earlier one, and every --set after all of them, wherever it stands:\n"
            "  build/train runs/imported/config.json configs/indexer_finetune.json\n"
            "With train.init_from (and no --resume), every model key no file or --set gives comes from\n"
            "the config stored in that checkpoint, so a recipe needs no model section; a given model key\n"
            "that contradicts the checkpoint's stops the run naming both values (only model.attention,\n"
            "model.msa_layers, model.rope_theta, model.rope_*, model.dropout and model.init_std may\n"
            "differ: dense -> MSA, a context extension).\n"
            "\n"
            "Checkpoints (with train.out_dir set): OUT_DIR/ckpt_<step>.h5, written atomically every\n"
            "train.checkpoint_every steps (0 = only at the end) and at the end of the run; the newest\n"
            "train.keep_checkpoints (default 3; 0 = all) are kept. A fresh run refuses an out_dir that\n"
            "already holds checkpoints.\n"
            "  --resume            continue from the newest checkpoint in train.out_dir, bit-for-bit as\n"
            "                      if the run had not stopped (same as --set train.resume=true);\n"
            "                      metrics.jsonl is appended to; raise train.steps to train further\n"
            "  train.init_from     a checkpoint whose parameters start a new run; MSA index parameters\n"
            "                      it lacks are freshly initialised (dense checkpoint -> MSA model)\n"
            "  train.save_best     also write OUT_DIR/ckpt_best.h5 at every eval with the lowest val\n"
            "                      loss so far (kept across --resume; never pruned, never resumed from)\n"
            "SIGINT (Ctrl-C), SIGTERM or SIGHUP: the run finishes its current step (or cuts its eval\n"
            "short), writes a checkpoint, says where, and exits 0; a second signal kills it at once.\n"
            "Without train.out_dir a signal kills the run as usual. One run per out_dir: a second run\n"
            "on the out_dir of a running one stops, naming its pid (OUT_DIR/train.lock).\n"
            "\n"
            "Distributed: mpirun -np N build/train CONFIG.json trains on N ranks, data parallel by\n"
            "default (train.batch_size is the global batch, split over the ranks; optimizer state\n"
            "sharded, ZeRO-1); dist.dp/ep/cp choose the groups, dist.timeout the collective timeout.\n"
            "Rank 0 prints, writes the run directory and checkpoints (they load on any number of ranks).\n"
            "Every rank must be given the same config: one that differs from rank 0's stops the job,\n"
            "naming the first key that differs.\n");
}

/* The program's body; main wraps it in MPI's lifetime. */
static int train_main(int argc, char **argv, Dist *dist) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            if (dist->rank == 0) usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--help-config")) {
            if (dist->rank == 0) config_print_help();
            return 0;
        }
    }
    Run run;
    memset(&run, 0, sizeof run);
    run.dist = dist;
    config_defaults(&run.cfg);
    bool resume = false, check_only = false;
    int n_files = 0;
    for (int i = 1; i < argc; i++) { /* the files, left to right */
        if (!strcmp(argv[i], "--set")) i++;
        else if (argv[i][0] != '-') {
            config_load(&run.cfg, argv[i]);
            n_files++;
        }
    }
    if (!n_files) {
        if (dist->rank == 0) usage(stderr);
        return 2;
    }
    char sources[sizeof run.cfg.source] = "";
    for (int i = 1, first = 1; i < argc; i++) /* messages name every file: "a.json + b.json" */
        if (!strcmp(argv[i], "--set")) i++;
        else if (argv[i][0] != '-') {
            size_t n = strlen(sources);
            snprintf(sources + n, sizeof sources - n, "%s%s", first ? "" : " + ", argv[i]);
            first = 0;
        }
    snprintf(run.cfg.source, sizeof run.cfg.source, "%s", sources);
    run.config_path = run.cfg.source;
    for (int i = 1; i < argc; i++) { /* then the options: every --set after every file */
        if (!strcmp(argv[i], "--resume")) resume = true;
        else if (!strcmp(argv[i], "--check-config")) check_only = true;
        else if (!strcmp(argv[i], "--set")) {
            if (i + 1 >= argc) fatal("--set needs section.key=value");
            config_set(&run.cfg, argv[++i]);
        } else if (argv[i][0] == '-') {
            usage(stderr);
            fatal("unknown option %s", argv[i]);
        }
    }
    if (resume) run.cfg.train.resume = true;
    /* a fresh run from a checkpoint: its stored config supplies the model keys the files leave out */
    if (run.cfg.train.init_from[0] && !run.cfg.train.resume) {
        char *stored = checkpoint_read_config(run.cfg.train.init_from);
        if (stored) config_take_model(&run.cfg, stored, run.cfg.train.init_from);
        free(stored);
    }
    if (check_only) {
        /* tools/hf_import.py and hf_export.py ask this before they write a model: the trainer's own rules */
        config_validate(&run.cfg);
        char *json = config_to_json(&run.cfg);
        if (dist->rank == 0) puts(json);
        free(json);
        return 0;
    }
    run_init(&run);
    run_train(&run);
    if (!run.stopped) run_sample(&run); /* rank 0's (and its expert-parallel peers') */
    run_free(&run);
    return 0;
}

int main(int argc, char **argv) {
    /* first: under mpirun every rank learns its place, and from here on a fatal() on any rank ends the
     * whole job; without mpirun this is a one-rank MPI singleton that behaves as a plain process */
    Dist dist;
    dist_init(&dist, &argc, &argv);
    int status = train_main(argc, argv, &dist);
    dist_finalize(&dist);
    return status;
}
