/* The run directory's lock (run_lock.h). */
#include "run_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "../kernels/util.h"
#include "config.h"

/* The holder's own words in the lock file ("pid 1234 on host"), "" when it has written none yet. It
 * writes them right after taking the lock, so a run that meets the lock that moment waits for them
 * briefly rather than naming no one. */
static void read_holder(int fd, char *buf, size_t n) {
    struct timespec nap = {0, 10 * 1000 * 1000};
    buf[0] = 0;
    for (int tries = 0; tries < 100 && !buf[0]; tries++) {
        ssize_t got = pread(fd, buf, n - 1, 0);
        buf[got > 0 ? got : 0] = 0;
        buf[strcspn(buf, "\n")] = 0;
        if (!buf[0]) nanosleep(&nap, NULL);
    }
}

int run_dir_lock(const char *dir) {
    char path[CFG_STR + 32];
    snprintf(path, sizeof path, "%s/" RUN_LOCK_FILE, dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) fatal("%s: cannot open the run directory's lock file (%s)", path, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK) { /* a file system without locks (some network ones) must not stop the run */
            fprintf(stderr, "warning: %s: cannot lock the run directory (%s): a second run on it will not be stopped\n",
                    path, strerror(errno));
            close(fd);
            return -1;
        }
        char holder[256];
        read_holder(fd, holder, sizeof holder);
        close(fd);
        fatal("train.out_dir \"%s\" is in use by another run (%s, which holds the lock on %s): two runs in one "
              "directory would delete each other's checkpoints and mix their metrics.jsonl; wait for that run to "
              "end or stop it, or choose another train.out_dir",
              dir, holder[0] ? holder : "one that has not yet written its pid", path);
    }
    char host[128] = "?", me[256];
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = 0;
    int len = snprintf(me, sizeof me, "pid %d on %s\n", (int)getpid(), host);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, me, (size_t)len, 0) != len)
        fatal("%s: cannot write the run directory's lock file (%s)", path, strerror(errno));
    return fd;
}

void run_dir_unlock(int fd) {
    if (fd >= 0) close(fd); /* closing the only descriptor of the open file releases its flock */
}
