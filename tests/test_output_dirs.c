/* Output folders are created with their parents (issue 12 item 1): make_dirs itself (nested, existing,
 * a file in the way), build/train's train.out_dir three levels below a folder that does not exist yet
 * (a fresh clone has no runs/), and build/prepare_text's OUTDIR the same way.
 * Run from the repository root after `make data` (make test does both); it runs build/train. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../kernels/util.h"
#include "test.h"

static bool is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* a fresh scratch folder for one test (removed by the test when it passes) */
static void scratch(char *dir, size_t n, const char *name) {
    snprintf(dir, n, "/tmp/msa_test_%s_XXXXXX", name);
    if (!mkdtemp(dir)) fatal("cannot create a scratch folder %s (%s)", dir, strerror(errno));
}

static void remove_tree(const char *dir) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) printf("    (could not remove %s)\n", dir);
}

/* the command's exit status; its stdout and stderr go to log */
static int run(const char *cmd, const char *log) {
    char full[2048];
    snprintf(full, sizeof full, "%s >%s 2>&1", cmd, log);
    int st = system(full);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void tail_of(const char *log, char *out, size_t n) {
    FILE *f = fopen(log, "r");
    size_t k = 0;
    if (f) {
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, size > (long)n - 1 ? size - ((long)n - 1) : 0, SEEK_SET);
        k = fread(out, 1, n - 1, f);
        fclose(f);
    }
    out[k] = 0;
}

TEST(make_dirs_creates_every_parent) {
    char root[64], path[320], failed[320];
    scratch(root, sizeof root, "make_dirs");
    snprintf(path, sizeof path, "%s/a/b/c", root);
    int err = make_dirs(path, failed, sizeof failed);
    EXPECT(err == 0 && is_dir(path), "make_dirs(%s): %s", path, strerror(err));
    EXPECT(make_dirs(path, failed, sizeof failed) == 0, "a folder that exists must be fine");
    snprintf(path, sizeof path, "%s/a/b/c/", root); /* a trailing slash, as a user may type it */
    EXPECT(make_dirs(path, failed, sizeof failed) == 0, "trailing slash: %s", failed);

    /* a file where a folder must go: ENOTDIR naming the file, nothing created below it */
    char file[256];
    snprintf(file, sizeof file, "%s/a/plain", root);
    FILE *f = fopen(file, "w");
    EXPECT(f, "cannot write %s", file);
    fclose(f);
    snprintf(path, sizeof path, "%s/x/y", file);
    err = make_dirs(path, failed, sizeof failed);
    EXPECT(err == ENOTDIR && !strcmp(failed, file), "file in the way: error %d (%s) at %s", err, strerror(err),
           failed);
    err = make_dirs(file, failed, sizeof failed);
    EXPECT(err == ENOTDIR && !strcmp(failed, file), "the target itself a file: error %d at %s", err, failed);
    remove_tree(root);
}

TEST(train_creates_a_nested_out_dir) {
    char root[64], out_dir[256], cmd[1024], log[256], text[2048], path[320];
    scratch(root, sizeof root, "out_dir");
    snprintf(out_dir, sizeof out_dir, "%s/runs/nested/deeper", root);
    snprintf(log, sizeof log, "%s/train.log", root);
    snprintf(cmd, sizeof cmd,
             "build/train configs/tiny.json --set train.steps=2 --set train.batch_size=2 --set train.eval_batches=1 "
             "--set train.out_dir=%s",
             out_dir);
    int rc = run(cmd, log);
    tail_of(log, text, sizeof text);
    EXPECT(rc == 0, "build/train exited %d:\n%s", rc, text);
    const char *files[] = {"config.json", "metrics.jsonl", "ckpt_00000002.h5"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/%s", out_dir, files[i]);
        EXPECT(is_file(path), "%s was not written:\n%s", path, text);
    }

    /* a file in the way: one error line naming the key and the file, exit 1 */
    snprintf(path, sizeof path, "%s/blocker", root);
    FILE *f = fopen(path, "w");
    EXPECT(f, "cannot write %s", path);
    fclose(f);
    snprintf(cmd, sizeof cmd, "build/train configs/tiny.json --set train.steps=2 --set train.out_dir=%s/sub", path);
    rc = run(cmd, log);
    tail_of(log, text, sizeof text);
    EXPECT(rc == 1 && strstr(text, "error: train.out_dir") && strstr(text, path) && strstr(text, "Not a directory"),
           "out_dir below a file: exit %d:\n%s", rc, text);
    remove_tree(root);
}

TEST(prepare_text_creates_a_nested_outdir) {
    char root[64], outdir[256], cmd[1024], log[256], text[2048], path[320];
    scratch(root, sizeof root, "prepare_text");
    snprintf(path, sizeof path, "%s/input.txt", root);
    FILE *f = fopen(path, "w");
    EXPECT(f, "cannot write %s", path);
    for (int i = 0; i < 50; i++) fprintf(f, "line %d of a small text\n", i);
    fclose(f);
    snprintf(outdir, sizeof outdir, "%s/data/nested/tokens", root);
    snprintf(log, sizeof log, "%s/prepare.log", root);
    snprintf(cmd, sizeof cmd, "build/prepare_text %s %s", path, outdir);
    int rc = run(cmd, log);
    tail_of(log, text, sizeof text);
    EXPECT(rc == 0, "build/prepare_text exited %d:\n%s", rc, text);
    snprintf(path, sizeof path, "%s/train.h5", outdir);
    EXPECT(is_file(path), "%s was not written:\n%s", path, text);
    remove_tree(root);
}

int main(void) {
    TEST_BEGIN();
    RUN(make_dirs_creates_every_parent);
    RUN(train_creates_a_nested_out_dir);
    RUN(prepare_text_creates_a_nested_outdir);
    TEST_END();
}
