"""The runner the Python test programs share: each test gets its own scratch folder; prints
"  ok   name" / "  FAIL name" with the traceback, and the closing line "N passed, N failed". Scratch files
are kept when something failed, for inspection. Also how the tests run a tool on a full disk or into a
folder it may not write, and check that it then fails with one error line."""
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def run_constrained(cmd, file_size_limit=None, honour_modes=False):
    """subprocess.run(cmd) with its output captured as text. file_size_limit: no file the command writes
    grows past that many bytes; a write beyond fails with EFBIG as one on a full disk fails with ENOSPC
    (SIGXFSZ is ignored). honour_modes: a folder's mode bits bind the command even when the tests run as
    root (it runs without the capabilities that override them), so that mode 0555 means unwritable."""
    def setup():
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        if honour_modes and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=setup)


def expect_error_line(r, *needles):
    """The command exited 1 with exactly one line on stderr, "error: ...", holding every needle."""
    lines = r.stderr.strip().splitlines()
    if r.returncode != 1 or len(lines) != 1 or not lines[0].startswith("error: "):
        raise AssertionError(f"want exit 1 and one error line; got exit {r.returncode}, stderr:\n{r.stderr}")
    for n in needles:
        if n not in lines[0]:
            raise AssertionError(f"the message lacks {n!r}: {lines[0]}")
    return lines[0]


# the test functions, in order: @test registers one, run(TESTS, ...) runs those of the program that was started
# (a test program may import another one for its helpers: its tests register here too, and are not run)
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def run(tests, prefix, required_exes=()):
    for exe in required_exes:
        if not os.access(exe, os.X_OK):
            print(f"  FAIL setup: {exe} is not built (make)")
            print("0 passed, 1 failed")
            return 1
    scratch = tempfile.mkdtemp(prefix=prefix)
    passed = failed = 0
    for fn in [t for t in tests if t.__module__ == "__main__"]:
        work = os.path.join(scratch, fn.__name__)
        os.makedirs(work)
        try:
            fn(work)
            passed += 1
            print(f"  ok   {fn.__name__}", flush=True)
        except Exception:
            failed += 1
            print(f"  FAIL {fn.__name__}")
            print("    " + traceback.format_exc().replace("\n", "\n    "), flush=True)
    if not failed:
        shutil.rmtree(scratch)
    else:
        print(f"  (scratch files kept in {scratch})")
    print(f"{passed} passed, {failed} failed")
    sys.stdout.flush()
    return 1 if failed else 0


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def output_folder_failures(work, command, outputs):
    """command(OUT_DIR) -> argv of a tool that writes the files `outputs` into OUT_DIR. OUT_DIR three levels
    below a missing folder is created; an OUT_DIR that is a file, below a file, in a folder of mode 0555, or
    on a disk that fills up fails with one error line, writes nothing, and leaves an earlier output intact."""
    nested = os.path.join(work, "new", "deeper", "out")
    r = run_constrained(command(nested))
    check(r.returncode == 0, f"{' '.join(command(nested))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    check(sorted(os.listdir(nested)) == sorted(outputs), f"{nested} holds {os.listdir(nested)}")

    plain = os.path.join(work, "plain_file")
    with open(plain, "w") as f:
        f.write("not a folder\n")
    expect_error_line(run_constrained(command(plain)), plain, "not a folder")
    expect_error_line(run_constrained(command(os.path.join(plain, "sub"))), plain, "Not a directory")

    locked = os.path.join(work, "locked")
    os.makedirs(locked)
    os.chmod(locked, 0o555)
    try:
        r = run_constrained(command(os.path.join(locked, "out")), honour_modes=True)
    finally:
        os.chmod(locked, 0o755)
    expect_error_line(r, locked, "Permission denied")
    check(os.listdir(locked) == [], f"{locked} holds {os.listdir(locked)}")

    before = {n: _read(os.path.join(nested, n)) for n in outputs}
    r = run_constrained(command(nested), file_size_limit=4096)
    expect_error_line(r, nested, "File too large")
    check(sorted(os.listdir(nested)) == sorted(outputs), f"after a full disk {nested} holds {os.listdir(nested)}")
    for n in outputs:
        check(_read(os.path.join(nested, n)) == before[n], f"{n} changed by the failed write")
