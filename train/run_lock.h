/* One run per run directory. Two runs on one train.out_dir would prune each other's checkpoints and
 * interleave metrics.jsonl, so the run that writes the directory (rank 0) holds an advisory lock (flock)
 * on OUT_DIR/train.lock for its whole life; the file also names the holder (pid and host), so that a
 * second run can say who has the directory. The lock goes with the process (exit, crash or kill -9
 * release it); the file stays behind and means nothing without the lock. */
#ifndef MSA_RUN_LOCK_H
#define MSA_RUN_LOCK_H

#define RUN_LOCK_FILE "train.lock"

/* Take the lock of directory dir (which exists) without waiting; returns the file descriptor that holds
 * it (run_dir_unlock releases it), or -1 after a warning where the file system has no locks. When another
 * process holds it, ends the program with a message that names the directory and the holder. */
int run_dir_lock(const char *dir);
void run_dir_unlock(int fd);

#endif
