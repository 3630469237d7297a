"""What the Python tools share (hf_import.py, hf_export.py, hf_tokenize.py, plot_run.py).

Every problem with the user's input or with the file system ends a tool with one line,
"error: <file or key>: <problem>", and status 1, never a traceback. This module holds the pieces that make
that true everywhere: Fail (the exception the tools' main functions report), JSON reading that survives any
input (invalid, not UTF-8, nested deeper than Python's recursion limit), output folders made with their
parents and removed again after a failure, HDF5 writes whose failure (full disk, quota, I/O error) is a Fail
instead of a crash, and build/train's own verdict on a config (`build/train --check-config`), so that a tool
never writes a config the trainer would refuse and never keeps a second copy of its rules.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import numpy  # noqa: F401  (every tool needs it; checked first so that a missing one gets a message)
except ImportError:  # the system python3 rather than the project's environment
    sys.exit(f"error: {sys.executable} lacks numpy (and the other packages of tools/requirements.txt): "
             f"run `bash tools/install_deps.sh`, then .venv/bin/python {' '.join(sys.argv)}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "build", "train")


class Fail(Exception):
    """A problem with the user's input or the file system: reported as "error: <message>" with exit status 1."""


def os_reason(e):
    """An OSError in words: its strerror, and the path it concerns."""
    what = e.strerror or str(e)
    return f"{what}: {e.filename}" if e.filename else what


# ---- JSON -------------------------------------------------------------------------------------------------

def parse_json(text, where):
    """The value of JSON text (str or bytes); Fail naming `where` when it is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise Fail(f"{where}: not valid JSON for this tool (nested more than {sys.getrecursionlimit()} levels deep)")
    except ValueError as e:  # UnicodeDecodeError is one too
        raise Fail(f"{where}: not valid JSON ({e})")


def read_json(path):
    """The value of the JSON file at path; Fail naming the file when it cannot be read or is not JSON."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise Fail(f"{path}: cannot read ({e.strerror})")
    return parse_json(text, path)


# ---- output folders -------------------------------------------------------------------------------------------

def make_out_dir(path):
    """Creates the folder `path` with its missing parents. Returns the folders it created, outermost first,
    for remove_dirs after a failure; Fail naming the path when it cannot (a file in the way, no permission)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise Fail(f"{path}: exists and is not a folder (the output goes into a folder of that name)")
    created, p = [], os.path.abspath(path)
    while not os.path.lexists(p):
        created.append(p)
        p = os.path.dirname(p)
    created.reverse()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        remove_dirs(created)
        raise Fail(f"{path}: cannot create the output folder ({os_reason(e)})")
    return created


def remove_dirs(created):
    """Removes the folders make_out_dir created, innermost first, as far as they are empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            return


def save_png(fig, out_path):
    """A matplotlib figure to out_path (its folder created with its parents), written under a temporary name
    and renamed, so an earlier picture survives a failed write; a failure leaves nothing behind."""
    created = make_out_dir(os.path.dirname(out_path) or ".")
    tmp = out_path + ".tmp"
    try:
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, out_path)
        except OSError as e:
            raise Fail(f"{out_path}: cannot write ({e.strerror})")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        remove_dirs(created)
        raise


def write_text(path, text):
    """Writes text to the file at path; Fail naming it when the write fails (full disk, no permission)."""
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise Fail(f"{path}: cannot write ({e.strerror})")


# ---- HDF5 output -------------------------------------------------------------------------------------------

# Writers whose file failed to write. HDF5 cannot close such a file: h5py's close, or freeing one of its
# objects, prints a traceback or crashes (SIGSEGV), and so does HDF5's own clean-up at interpreter exit.
# They stay referenced here until exit_with ends the process without that clean-up.
_failed_writers = []


def hdf5_reason(e):
    """The operating system's words inside an HDF5 error message, else its first line."""
    m = re.search(r"error message = '([^']*)'", str(e))
    return m.group(1) if m else str(e).splitlines()[0]


class Hdf5Writer:
    """A new HDF5 file at `path`, written so that a failed write is a Fail naming the file. HDF5 writes an
    object's data when h5py frees it and only prints a failure there, so every object made through the
    writer is held (hold) and the file is flushed (flush) while they are: that is where a full disk shows."""

    def __init__(self, path):
        import h5py

        self.path = path
        self.held = []
        try:
            self.file = h5py.File(path, "w")
        except OSError as e:
            raise Fail(f"{path}: cannot create ({hdf5_reason(e)})")

    def hold(self, obj):
        self.held.append(obj)
        return obj

    @contextlib.contextmanager
    def writing(self):
        """Turns HDF5's errors inside the block into a Fail naming the file (and marks the file failed)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            _failed_writers.append(self)
            raise Fail(f"{self.path}: cannot write ({hdf5_reason(e)})")

    def flush(self):
        with self.writing():
            self.file.flush()

    def close(self):
        self.flush()
        with self.writing():
            self.held.clear()
            self.file.close()

    def discard(self):
        """Removes the file after a failure (closing it only when its writes did not fail)."""
        if self not in _failed_writers and self.file.id.valid:
            try:
                self.held.clear()
                self.file.close()
            except (OSError, RuntimeError):
                _failed_writers.append(self)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def exit_with(status):
    """sys.exit(status); after a failed HDF5 write the process ends at once instead (its output flushed),
    since HDF5's clean-up at exit would try to finish the failed file and crash."""
    if _failed_writers:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def report(fn, *args):
    """Runs fn(*args); a Fail becomes "error: <message>" on stderr. Returns the exit status (0 or 1)."""
    try:
        fn(*args)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# ---- the trainer's verdict on a config ---------------------------------------------------------------------

def check_config(config, where):
    """The config as build/train reads it (every key, defaults filled in), after the trainer's own checks
    (`build/train --check-config`). `config` is a path or a dict (written to a temporary file); `where` names
    it in a refusal, which quotes the trainer's message."""
    if not os.access(TRAIN, os.X_OK):
        raise Fail(f"{TRAIN} is not built (run make): the tools check configs with build/train --check-config")
    with tempfile.TemporaryDirectory(prefix="msa_check_config_") as tmp:
        path = config
        if not isinstance(config, str):
            path = os.path.join(tmp, "config.json")
            write_text(path, json.dumps(config, indent=2) + "\n")
        r = subprocess.run([TRAIN, "--check-config", path], capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        msg = lines[-1] if lines else f"build/train --check-config exited with status {r.returncode}"
        msg = msg.removeprefix("error: ").removeprefix(f"{path}: ")
        raise Fail(f"{where}: build/train refuses it: {msg}")
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise Fail(f"{where}: build/train --check-config printed no config: {r.stdout[:200]!r}")
