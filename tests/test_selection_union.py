#!/usr/bin/env python3
"""MSA_DUMP_SELECTION (layers/msa.c) and tools/selection_union.py.

The tool on hand-made selection files against unions counted by hand (queries at a document's start and windows
across a document boundary left out); one error line and a nonzero exit for a truncated file, no files or bad
windows. End to end: a tiny MSA model's build/eval with MSA_DUMP_SELECTION writes files whose shape is
[n_kv_heads, queries, topk_blocks] and whose rows are selections as the spec has them (ids ascending, -1
padding only at the end, the query's own block last and always chosen), and the tool reads them; a second run
with the same prefix stops naming the file that exists and overwrites nothing.

Run with the project's virtual environment: .venv/bin/python tests/test_selection_union.py
"""
import glob
import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
from pyharness import expect_error_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "selection_union.py")
TRAIN = os.path.join(ROOT, "build", "train")
EVAL = os.path.join(ROOT, "build", "eval")
VAL = os.path.join(ROOT, "data", "shakespeare", "val.h5")


def write_dump(path, rows_per_head, k):
    heads, queries = len(rows_per_head), len(rows_per_head[0])
    with open(path, "wb") as f:
        f.write(struct.pack("<3q", heads, queries, k))
        for rows in rows_per_head:
            for r in rows:
                f.write(struct.pack(f"<{k}i", *r))


def read_dump(path):
    with open(path, "rb") as f:
        raw = f.read()
    heads, queries, k = struct.unpack("<3q", raw[:24])
    ids = struct.unpack(f"<{heads * queries * k}i", raw[24:])
    return (heads, queries, k), [[list(ids[(h * queries + q) * k:(h * queries + q + 1) * k]) for q in range(queries)]
                                 for h in range(heads)]


def table(stdout):
    """{W: (windows, mean or None)} from the tool's table"""
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            out[int(cells[0])] = (int(cells[1]), None if cells[2] == "-" else float(cells[2]))
    return out


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)


@test
def unions_counted_by_hand(work):
    prefix = os.path.join(work, "sel")
    # topk 2. Queries 0-1 see no more blocks than they may select (own block 0, 1): left out. Windows of 2: {0,1,2},
    # {0,2,3}; of 3: queries 3-5 {0,1,2,3} (0-2 holds query 0).
    write_dump(prefix + "_0.bin", [[[0, -1], [0, 1], [0, 2], [1, 2], [0, 3], [2, 3]]], 2)
    # a second document starts at query 2 (its own block falls from 3 to 2): of 2, {0,1,3} and {0,2,3}; of 4, none
    write_dump(prefix + "_1.bin", [[[0, 3], [1, 3], [0, 2], [2, 3]]], 2)
    r = run_tool(prefix, "--windows", "1,2,3,4")
    check(r.returncode == 0, f"exit {r.returncode}: {r.stderr}")
    t = table(r.stdout)
    check(t.get(1) == (8, 2.0), f"W=1: {t.get(1)}, want 8 windows of 2.00\n{r.stdout}")
    check(t.get(2) == (4, 3.0), f"W=2: {t.get(2)}, want 4 windows of 3.00\n{r.stdout}")
    check(t.get(3) == (1, 4.0), f"W=3: {t.get(3)}, want 1 window of 4.00\n{r.stdout}")
    check(t.get(4) == (0, None), f"W=4: {t.get(4)}, want no window\n{r.stdout}")
    check("| 2 | 4 | 3.00 | 3 | 1.50 |" in r.stdout, r.stdout)
    # --rows: file 0's blocks 0, 1, 2, 3 hold 4, 2, 3, 2 queries (11 pairs, -1 left out); the hottest 1% of 4 rows is
    # one row, of 4: 36.4%. File 1's hold 2, 1, 2, 3.
    r = run_tool(prefix, "--windows", "1", "--rows")
    check(r.returncode == 0, f"--rows: exit {r.returncode}: {r.stderr}")
    check("| sel_0.bin | 4 | 11 | 2.8 | 4 | 4 | 36.4% |" in r.stdout, r.stdout)
    check("| sel_1.bin | 4 | 8 | 2.0 | 3 | 3 | 37.5% |" in r.stdout, r.stdout)


@test
def bad_input_one_error_line(work):
    prefix = os.path.join(work, "bad")
    with open(prefix + "_0.bin", "wb") as f:
        f.write(struct.pack("<3q", 1, 4, 2) + b"\0" * 12)  # 4 x 2 ids need 32 bytes
    expect_error_line(run_tool(prefix), "bad_0.bin", "does not match")
    expect_error_line(run_tool(os.path.join(work, "none")), "MSA_DUMP_SELECTION")
    expect_error_line(run_tool(prefix, "--windows", "2,0"), "--windows")


@test
def a_models_dumped_selections(work):
    out = os.path.join(work, "model")
    sets = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
            "model.attention=msa", "msa.block_size=8", "msa.topk_blocks=3", "msa.index_dim=8", "train.steps=2",
            "train.seq_len=64", "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1",
            "train.sample_tokens=0", "optim.warmup_steps=1", "msa.dense_warmup_steps=0", f"train.out_dir={out}"]
    r = subprocess.run([TRAIN, os.path.join(ROOT, "configs", "tiny.json")] + [a for s in sets for a in ("--set", s)],
                       cwd=ROOT, capture_output=True, text=True)
    check(r.returncode == 0, f"train exit {r.returncode}: {r.stderr[-1000:]}")
    prefix = os.path.join(work, "dump")
    env = dict(os.environ, MSA_DUMP_SELECTION=prefix)
    r = subprocess.run([EVAL, os.path.join(out, "config.json"), os.path.join(out, "ckpt_00000002.h5"), "--data", VAL,
                        "--lengths", "256", "--depths", "0.5", "--trials", "1", "--loss-length", "64", "--loss-windows",
                        "1", "--buckets", "1"], cwd=ROOT, env=env, capture_output=True, text=True)
    check(r.returncode == 0, f"eval exit {r.returncode}: {r.stderr[-1000:]}")
    paths = sorted(glob.glob(prefix + "_*.bin"))
    check(len(paths) >= 2, f"{len(paths)} selection files")  # the model's one MSA layer, several forwards
    for p in paths:
        (heads, queries, k), rows = read_dump(p)
        check(heads == 2 and k == 3 and queries >= 64, f"{p}: shape {[heads, queries, k]}")
        for h in range(heads):
            for q in range(64):  # the first document of the forward: query q's own block is q // 8
                ids = [b for b in rows[h][q] if b >= 0]
                pad = rows[h][q][len(ids):]
                check(pad == [-1] * len(pad), f"{p}: head {h} query {q}: -1 before an id: {rows[h][q]}")
                check(ids == sorted(set(ids)), f"{p}: head {h} query {q}: ids not ascending: {ids}")
                check(ids and ids[-1] == q // 8, f"{p}: head {h} query {q}: own block {q // 8} not last: {ids}")
                check(len(ids) == min(3, q // 8 + 1), f"{p}: head {h} query {q}: {len(ids)} blocks: {ids}")
    # a second run with the same prefix stops on the first file, naming it, and leaves every file as it was
    before = {p: open(p, "rb").read() for p in paths}
    r = subprocess.run([EVAL, os.path.join(out, "config.json"), os.path.join(out, "ckpt_00000002.h5"), "--data", VAL,
                        "--lengths", "256", "--depths", "0.5", "--trials", "1"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    check(r.returncode != 0 and "dump_0.bin exists" in r.stderr, f"second run: exit {r.returncode}: {r.stderr[-500:]}")
    check(sorted(glob.glob(prefix + "_*.bin")) == paths and all(open(p, "rb").read() == b for p, b in before.items()),
          "the second run changed the first run's files")
    r = run_tool(prefix, "--windows", "1,4")
    check(r.returncode == 0, f"tool exit {r.returncode}: {r.stderr}")
    t = table(r.stdout)
    # a query past its document's start holds exactly topk_blocks blocks; 4 queries at least that many
    check(t.get(1, (0, None))[0] > 0 and t[1][1] == 3.0, f"W=1: {t.get(1)}\n{r.stdout}")
    check(t.get(4, (0, None))[0] > 0 and 3.0 <= t[4][1] <= 12.0, f"W=4: {t.get(4)}\n{r.stdout}")


if __name__ == "__main__":
    sys.exit(pyharness.run(TESTS, "msa_test_selection_union_", (TRAIN, EVAL)))
