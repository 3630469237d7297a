/* build/train as a process among others: a stop signal (SIGTERM, SIGHUP) during a long eval acts within
 * seconds, with a checkpoint that resumes; SIGHUP stops a run as SIGTERM does unless the run was started
 * ignoring it (nohup); a second run on the out_dir of a running one stops at once, naming the first one's
 * pid, and changes none of its files.
 * Run from the repository root after `make data` (make test does both). */
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../kernels/util.h"
#include "gradcheck.h"
#include "test.h"

#define TINY "configs/tiny.json"
#define TINY_SET "--set train.batch_size=8 --set train.log_every=1"

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static void remove_tree(const char *dir) { nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

static void make_temp_dir(char *dir, size_t n) {
    snprintf(dir, n, "/tmp/msa_runs_test_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
}

static bool file_contains(const char *path, const char *text) {
    size_t n;
    char *all = test_read_file(path, &n);
    bool found = all && strstr(all, text);
    free(all);
    return found;
}

/* Wait (at most timeout_s) until the file holds text; false on timeout. */
static bool wait_for_text(const char *path, const char *text, double timeout_s) {
    struct timespec nap = {0, 20 * 1000 * 1000};
    for (double t0 = wall_seconds(); wall_seconds() - t0 < timeout_s; nanosleep(&nap, NULL))
        if (file_contains(path, text)) return true;
    return false;
}

/* waitpid with a deadline: the status, or (after SIGKILL) -1 when the process outlived it. */
static int wait_at_most(pid_t pid, double timeout_s) {
    struct timespec nap = {0, 10 * 1000 * 1000};
    int st;
    for (double t0 = wall_seconds(); wall_seconds() - t0 < timeout_s; nanosleep(&nap, NULL))
        if (waitpid(pid, &st, WNOHANG) == pid) return st;
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return -1;
}

static void read_text(const char *path, char *out, size_t n) {
    size_t len;
    char *all = test_read_file(path, &len);
    snprintf(out, n, "%s", all ? all : "");
    free(all);
}

/* ---- stop signals ------------------------------------------------------------------------------ */

/* An eval of 100000 batches (minutes) starts after step 2; SIGTERM a second into it: the run stops within
 * seconds (it once finished the eval first), writes the step-2 checkpoint, logs no val loss of the cut
 * eval, and the checkpoint resumes. */
TEST(sigterm_during_a_long_eval_stops_within_seconds) {
    char dir[64], args[1024], log[128], metrics[128], ckpt[160], out[8192];
    make_temp_dir(dir, sizeof dir);
    snprintf(log, sizeof log, "%s/train.log", dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
    snprintf(args, sizeof args,
             TINY " " TINY_SET " --set train.steps=1000000 --set train.eval_every=2 --set train.eval_batches=100000 "
                  "--set train.out_dir=%s",
             dir);
    pid_t pid = test_spawn_train(args, NULL, log);
    bool started = wait_for_text(metrics, "{\"step\": 2,", 120);
    struct timespec into_eval = {1, 0};
    nanosleep(&into_eval, NULL);
    kill(pid, SIGTERM);
    double t0 = wall_seconds();
    int st = wait_at_most(pid, 60);
    double took = wall_seconds() - t0;
    read_text(log, out, sizeof out);
    printf("    exited %.2f s after SIGTERM\n", took);
    EXPECT(started, "step 2 never logged: %s", out);
    EXPECT(st != -1, "still running 60 s after SIGTERM (the eval was not cut short): %s", out);
    EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0, "after SIGTERM: status %d: %s", st, out);
    EXPECT(took < 10, "took %.1f s to stop after SIGTERM", took);
    EXPECT(strstr(out, "stopped by SIGTERM at step 2/") && strstr(out, "cut short"), "no stop message: %s", out);
    snprintf(ckpt, sizeof ckpt, "%s/ckpt_00000002.h5", dir);
    EXPECT(access(ckpt, F_OK) == 0, "no %s: %s", ckpt, out);
    EXPECT(!file_contains(metrics, "val_loss"), "the cut eval logged a val loss");
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=3 --set train.eval_batches=2 --set train.out_dir=%s --resume",
             dir);
    st = wait_at_most(test_spawn_train(args, NULL, log), 120);
    read_text(log, out, sizeof out);
    EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(out, "resumed from") && strstr(out, "at step 2"),
           "resume: status %d: %s", st, out);
    remove_tree(dir);
}

/* SIGHUP (a closed terminal or ssh session) stops the run with a checkpoint as SIGTERM does; it once killed
 * the run without one. */
TEST(sighup_stops_with_a_checkpoint) {
    char dir[64], args[1024], log[128], metrics[128], out[8192];
    make_temp_dir(dir, sizeof dir);
    snprintf(log, sizeof log, "%s/train.log", dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=1000000 --set train.out_dir=%s", dir);
    pid_t pid = test_spawn_train(args, NULL, log);
    bool started = wait_for_text(metrics, "{\"step\": 3,", 120);
    kill(pid, SIGHUP);
    int st = wait_at_most(pid, 60);
    read_text(log, out, sizeof out);
    EXPECT(started, "step 3 never logged: %s", out);
    EXPECT(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "after SIGHUP: %s %d: %s",
           st != -1 && WIFSIGNALED(st) ? "killed by signal" : "status", st != -1 && WIFSIGNALED(st) ? WTERMSIG(st) : st,
           out);
    int step = 0;
    const char *said = strstr(out, "stopped by SIGHUP at step ");
    EXPECT(said && sscanf(said, "stopped by SIGHUP at step %d", &step) == 1 && step >= 3, "no stop message: %s", out);
    char ckpt[160];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt_%08d.h5", dir, step);
    EXPECT(access(ckpt, F_OK) == 0, "no checkpoint %s after SIGHUP", ckpt);
    remove_tree(dir);
}

/* A run started ignoring SIGHUP (nohup) keeps ignoring it: it trains on, and SIGTERM still stops it. */
TEST(nohup_run_ignores_sighup) {
    char dir[64], args[1024], log[128], metrics[128], out[8192], later[32];
    make_temp_dir(dir, sizeof dir);
    snprintf(log, sizeof log, "%s/train.log", dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=1000000 --set train.out_dir=%s", dir);
    struct sigaction ignore = {.sa_handler = SIG_IGN}, old;
    sigemptyset(&ignore.sa_mask);
    sigaction(SIGHUP, &ignore, &old); /* what nohup does; the child inherits it across exec */
    pid_t pid = test_spawn_train(args, NULL, log);
    sigaction(SIGHUP, &old, NULL);
    bool started = wait_for_text(metrics, "{\"step\": 3,", 120);
    kill(pid, SIGHUP);
    /* still training: a later step is logged after the SIGHUP */
    size_t n;
    char *text = test_read_file(metrics, &n);
    int logged = 0;
    for (size_t i = 0; text && i < n; i++) logged += text[i] == '\n';
    free(text);
    snprintf(later, sizeof later, "{\"step\": %d,", logged + 3);
    bool went_on = wait_for_text(metrics, later, 120);
    kill(pid, SIGTERM);
    int st = wait_at_most(pid, 60);
    read_text(log, out, sizeof out);
    EXPECT(started, "step 3 never logged: %s", out);
    EXPECT(went_on, "no step logged after SIGHUP under nohup (%s): %s", later, out);
    EXPECT(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(out, "stopped by SIGTERM"), "then SIGTERM: %s",
           out);
    remove_tree(dir);
}

/* ---- one run per out_dir ------------------------------------------------------------------------ */

/* While a run trains in a directory, a second run there, fresh or --resume, stops at once with a message
 * naming the first one's pid and changes none of its files (it once truncated metrics.jsonl and wrote its
 * own config.json, checkpoints and records among the first run's). Once the first has stopped, the
 * directory is free again. */
TEST(second_run_on_the_same_out_dir_stops_naming_the_first) {
    char dir[64], args[1024], log[128], metrics[128], config[128], out[8192], want[64];
    make_temp_dir(dir, sizeof dir);
    snprintf(log, sizeof log, "%s/first.log", dir);
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
    snprintf(config, sizeof config, "%s/config.json", dir);
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=1000000 --set train.out_dir=%s", dir);
    pid_t first = test_spawn_train(args, NULL, log);
    bool started = wait_for_text(metrics, "{\"step\": 2,", 120);
    size_t n;
    char *config_before = test_read_file(config, &n);
    snprintf(want, sizeof want, "is in use by another run (pid %d on ", (int)first);
    /* what the second runs did, checked after the first run is stopped (a failed check must not leave it
     * running) */
    const char *const second[] = {"--set train.steps=2", "--set train.steps=2 --resume"};
    int second_status[2] = {-2, -2};
    double second_took[2] = {0, 0};
    char second_out[2][4096] = {"", ""};
    for (int i = 0; i < 2 && started; i++) {
        char second_log[128];
        snprintf(second_log, sizeof second_log, "%s/second.log", dir);
        snprintf(args, sizeof args, TINY " " TINY_SET " %s --set train.out_dir=%s", second[i], dir);
        double t0 = wall_seconds();
        second_status[i] = wait_at_most(test_spawn_train(args, NULL, second_log), 60);
        second_took[i] = wall_seconds() - t0;
        read_text(second_log, second_out[i], sizeof second_out[i]);
    }
    char *config_after = test_read_file(config, &n);
    bool config_kept = config_before && config_after && !strcmp(config_before, config_after);
    free(config_before);
    free(config_after);
    bool metrics_kept = file_contains(metrics, "{\"step\": 1,");
    kill(first, SIGTERM);
    int st = wait_at_most(first, 60);
    read_text(log, out, sizeof out);
    EXPECT(started, "the first run never logged step 2: %s", out);
    for (int i = 0; i < 2; i++) {
        int s2 = second_status[i];
        EXPECT(s2 != -1 && WIFEXITED(s2) && WEXITSTATUS(s2) == 1 && strstr(second_out[i], want) &&
                   strstr(second_out[i], dir),
               "second run (%s) on the directory of a running one: status %d, want \"%s\": %s", second[i], s2, want,
               second_out[i]);
        EXPECT(second_took[i] < 10, "the second run took %.1f s to stop", second_took[i]);
    }
    EXPECT(config_kept && metrics_kept, "the second run changed the first one's files: config.json %s, metrics.jsonl %s",
           config_kept ? "kept" : "changed", metrics_kept ? "kept" : "lost step 1");
    int step = 0;
    const char *said = strstr(out, "stopped by SIGTERM at step ");
    EXPECT(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0 && said &&
               sscanf(said, "stopped by SIGTERM at step %d", &step) == 1,
           "the first run after SIGTERM: %s", out);
    /* the directory is free once its run has ended */
    snprintf(args, sizeof args, TINY " " TINY_SET " --set train.steps=%d --set train.eval_batches=1 --set train.out_dir=%s --resume",
             step + 1, dir);
    st = wait_at_most(test_spawn_train(args, NULL, log), 120);
    read_text(log, out, sizeof out);
    EXPECT(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0 && strstr(out, "resumed from"),
           "resume after the first run ended: %s", out);
    remove_tree(dir);
}

int main(void) {
    TEST_BEGIN();
    RUN(sigterm_during_a_long_eval_stops_within_seconds);
    RUN(sighup_stops_with_a_checkpoint);
    RUN(nohup_run_ignores_sighup);
    RUN(second_run_on_the_same_out_dir_stops_naming_the_first);
    TEST_END();
}
