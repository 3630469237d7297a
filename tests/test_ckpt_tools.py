#!/usr/bin/env python3
"""Checkpoints through the Python tools: checksums, and clean failures on a full disk.

The crc32 attributes build/train writes are zlib.crc32 of each tensor's little-endian float32 bytes
(checked against Python's zlib, an implementation independent of data/crc32.c). tools/hf_export.py
refuses a checkpoint with one flipped bit, a NaN, or an array where the version belongs, naming the
tensor or attribute, and exports a version 1 file (no checksums) with a warning. tools/hf_import.py and
tools/hf_export.py on a full disk (a file size limit, under which writes fail with EFBIG as they do with
ENOSPC) exit 1 with one error line: no traceback, no SIGSEGV (HDF5's clean-up after a failed close), and
nothing left behind. Prints "N passed, N failed". Run with .venv/bin/python from the repository root.
"""
import os
import resource
import shutil
import signal
import subprocess
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
import test_import as hf_models  # noqa: E402  (the small Hugging Face models it writes)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TRAIN = os.path.join(ROOT, "build", "train")
EXPORT = os.path.join(ROOT, "tools", "hf_export.py")
IMPORT = os.path.join(ROOT, "tools", "hf_import.py")
TENSOR_GROUPS = ("params", "optimizer/m", "optimizer/v")

def run(cmd, fsize_limit=0):
    """cmd from the repository root; with fsize_limit > 0 under RLIMIT_FSIZE with SIGXFSZ ignored."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit if fsize_limit else None)


def must(cmd):
    r = run(cmd)
    check(r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def clean_error(r, *needles):
    """Status 1 and a single error line holding every needle: no traceback, no crash."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    check(r.returncode == 1, f"status {r.returncode} (negative: killed by that signal): {r.stderr}")
    check(len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr,
          f"not one error line: {r.stderr}")
    for n in needles:
        check(n in lines[0], f"{n!r} not in: {lines[0]}")


def train_checkpoint(work):
    """A checkpoint of configs/tiny.json after 4 steps, written by build/train."""
    out = os.path.join(work, "run")
    must([TRAIN, "configs/tiny.json", "--set", "train.steps=4", "--set", "train.batch_size=4", "--set",
          "train.eval_batches=1", "--set", f"train.out_dir={out}"])
    return os.path.join(out, "ckpt_00000004.h5")


def flip_bit(path, name, byte, mask):
    """Flip bits of one byte of dataset name's data in the file itself (the writer's layout is contiguous)."""
    with h5py.File(path, "r") as f:
        at = f[name].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(at + byte)
        b = f.read(1)[0] ^ mask
        f.seek(at + byte)
        f.write(bytes([b]))


# ---- tests -----------------------------------------------------------------------------------------------

@test
def crc32_of_every_tensor_is_zlibs(work):
    ck = train_checkpoint(work)
    n = 0
    with h5py.File(ck, "r") as f:
        check(int(f.attrs["version"]) == 2, f"version {f.attrs['version']}")
        for g in TENSOR_GROUPS:
            for name, d in f[g].items():
                want = zlib.crc32(np.ascontiguousarray(d[()], "<f4").data)
                check(int(d.attrs["crc32"]) == want, f"{g}/{name}: crc32 {int(d.attrs['crc32']):#x}, zlib {want:#x}")
                n += 1
    check(n == 3 * 20, f"{n} tensors, expected 3 x 20")


@test
def export_verifies_every_tensor(work):
    ck = train_checkpoint(work)
    good = os.path.join(work, "good")
    must([PY, EXPORT, ck, good])
    with open(os.path.join(good, "model.safetensors"), "rb") as f:
        exported = f.read()

    flipped = os.path.join(work, "flipped.h5")
    shutil.copy(ck, flipped)
    flip_bit(flipped, "params/layers.0.attn.wq", 6, 0x80)
    out = os.path.join(work, "out")
    clean_error(run([PY, EXPORT, flipped, out]), flipped, "params/layers.0.attn.wq", "checksum")
    check(not os.path.exists(out), "an export was written from a damaged checkpoint")

    nan = os.path.join(work, "nan.h5")
    shutil.copy(ck, nan)
    with h5py.File(nan, "r+") as f:
        d = f["params/final_norm"]
        a = d[()]
        a[5] = np.nan
        d[...] = a
        d.attrs["crc32"] = np.uint32(zlib.crc32(np.ascontiguousarray(a, "<f4").data))
    clean_error(run([PY, EXPORT, nan, out]), "params/final_norm", "nan")

    arrays = os.path.join(work, "array_version.h5")
    shutil.copy(ck, arrays)
    with h5py.File(arrays, "r+") as f:
        del f.attrs["version"]
        f.attrs["version"] = np.zeros(1000, "<i8")
    clean_error(run([PY, EXPORT, arrays, out]), arrays, 'attribute "version"', "[1000]")

    # version 1: no checksums, exported with a warning, the same tensors
    old = os.path.join(work, "version1.h5")
    shutil.copy(ck, old)
    with h5py.File(old, "r+") as f:
        f.attrs["version"] = np.int32(1)
        for g in TENSOR_GROUPS:
            for d in f[g].values():
                del d.attrs["crc32"]
    r = must([PY, EXPORT, old, out])
    check("version 1" in r.stderr and "unverified" in r.stderr, f"no warning: {r.stderr}")
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        check(f.read() == exported, "the version 1 export differs")


@test
def import_on_a_full_disk_exits_cleanly(work):
    hf = os.path.join(work, "hf")
    hf_models.make_hf(hf, "llama")
    full = os.path.join(work, "full")
    must([PY, IMPORT, hf, full])
    size = os.path.getsize(os.path.join(full, "ckpt_import.h5"))
    # inside the tensors, and the last bytes: the metadata h5py writes when it closes the file
    for limit in (size // 3, size - 512):
        out = os.path.join(work, f"out_{limit}")
        r = run([PY, IMPORT, hf, out], fsize_limit=limit)
        clean_error(r, os.path.join(out, "ckpt_import.h5"), "cannot write")
        check(not os.path.exists(out), f"limit {limit}: {out} left behind: {os.listdir(out) if os.path.isdir(out) else ''}")


@test
def export_on_a_full_disk_exits_cleanly(work):
    ck = train_checkpoint(work)
    out = os.path.join(work, "out")
    must([PY, EXPORT, ck, out])
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    clean_error(run([PY, EXPORT, ck, out], fsize_limit=size // 2), out, "cannot write")
    after = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    check(after == before, f"the earlier export changed: {sorted(after)}")


def main():
    return pyharness.run(TESTS, "msa_test_ckpt_tools_", (TRAIN,))


if __name__ == "__main__":
    sys.exit(main())
