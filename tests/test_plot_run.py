#!/usr/bin/env python3
"""tools/plot_run.py: a picture of a run from its metrics.jsonl.

Two tiny runs of build/train (dense, and MSA + MoE) are plotted. Checks: the PNG exists and is a PNG of the
grid's size (two panels a row); the panels it names are the ones the model has (loss, learning rate and
tokens/s always; KL and recall with MSA; expert load with MoE); each panel's cell of the image holds
drawing and an unused cell is blank (read back with matplotlib's image reader, not through the plotting
code); a bad metrics file, a missing run and an output that cannot be written end with one error line,
an earlier picture intact. Prints "N passed, N failed". Run with the project's virtual environment:
.venv/bin/python tests/test_plot_run.py
"""
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
from pyharness import expect_error_line, run_constrained  # noqa: E402

import matplotlib.image
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TOOL = os.path.join(ROOT, "tools", "plot_run.py")
TRAIN = os.path.join(ROOT, "build", "train")

# the figure's grid: two panels a row, 600 x 320 pixels each (tools/plot_run.py PANEL_INCHES at 100 dpi)
CELL_W, CELL_H = 600, 320
ALWAYS = ["loss", "learning rate", "tokens/s"]
MSA_MOE = ["loss", "KL (MSA)", "recall (MSA)", "expert load max/mean (MoE)", "learning rate", "tokens/s"]

SHORT = ["train.steps=12", "train.log_every=1", "train.eval_every=4", "train.batch_size=2", "train.eval_batches=1",
         "train.sample_tokens=0", "data.train_path=data/shakespeare/train.h5",
         "data.val_path=data/shakespeare/val.h5"]
TINY_MSA_MOE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
                "msa.block_size=8", "msa.topk_blocks=2", "msa.index_dim=8", "msa.recall_stride=2",
                "moe.num_experts=4", "moe.expert_dim=16", "moe.shared_expert_dim=32", "train.seq_len=32"]

def must(cmd):
    r = run_constrained(cmd)
    check(r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def train(config, out_dir, sets):
    cmd = [TRAIN, os.path.join(ROOT, "configs", config)]
    for s in SHORT + sets + [f"train.out_dir={out_dir}"]:
        cmd += ["--set", s]
    must(cmd)


def panels_of(stdout):
    """The panel titles plot_run.py reports drawing."""
    line = [l for l in stdout.splitlines() if l.startswith("plot_run:")][-1]
    return line.split("(panels: ", 1)[1].rstrip(")").split(", ")


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    check(head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def check_picture(path, titles):
    """The PNG has one 600 x 320 cell per panel, two a row; drawn cells hold ink, the unused one none."""
    w, h = png_size(path)
    rows = (len(titles) + 1) // 2
    check((w, h) == (2 * CELL_W, rows * CELL_H), f"{path}: {w} x {h} pixels for {len(titles)} panels")
    img = matplotlib.image.imread(path)[..., :3]
    ink = np.any(img < 0.5, axis=-1)  # dark pixels: lines, text, axes
    for i in range(rows * 2):
        r, c = divmod(i, 2)
        # below the figure title, which spans the first row's top
        cell = ink[r * CELL_H + 40:(r + 1) * CELL_H, c * CELL_W:(c + 1) * CELL_W]
        if i < len(titles):
            check(cell.mean() > 0.01, f"{path}: the cell of panel {titles[i]!r} is nearly blank")
        else:
            check(not cell.any(), f"{path}: the unused cell {i} holds drawing")


@test
def dense_run_has_loss_lr_and_throughput(work):
    run = os.path.join(work, "dense")
    train("tiny.json", run, [])
    r = must([PY, TOOL, run])
    check(panels_of(r.stdout) == ALWAYS, f"panels: {r.stdout}")
    check_picture(os.path.join(run, "metrics.png"), ALWAYS)


@test
def msa_moe_run_adds_kl_recall_and_expert_load(work):
    run = os.path.join(work, "msa_moe")
    train("pretrain_msa_moe.json", run, TINY_MSA_MOE)
    out = os.path.join(work, "pictures", "new", "run.png")  # -o into folders that do not exist yet
    r = must([PY, TOOL, run, "-o", out])
    check(panels_of(r.stdout) == MSA_MOE, f"panels: {r.stdout}")
    check_picture(out, MSA_MOE)


@test
def bad_runs_fail_with_one_line(work):
    missing = os.path.join(work, "no_run")
    expect_error_line(run_constrained([PY, TOOL, missing]), os.path.join(missing, "metrics.jsonl"))
    run = os.path.join(work, "run")
    os.makedirs(run)
    metrics = os.path.join(run, "metrics.jsonl")
    good = '{"step": 1, "loss": 4.1, "lr": 1e-4, "tokens_per_s": 900.0, "moe_max_over_mean_load": 0.0}\n'
    for name, bad, needles in (
            ("truncated", '{"step": 2, "loss": ', ["line 2", "not valid JSON"]),
            ("nested", "[" * 100000 + "]" * 100000, ["line 2", "nested"]),
            ("array", "[1, 2]", ["line 2", "not a JSON object"]),
            ("string", '{"step": 2, "loss": "low"}', ["line 2", '"loss"', "not a number"]),
            ("no_step", '{"loss": 3.0}', ["line 2", '"step"'])):
        with open(metrics, "w") as f:
            f.write(good + bad + "\n")
        expect_error_line(run_constrained([PY, TOOL, run]), metrics, *needles)
        check(not os.path.exists(os.path.join(run, "metrics.png")), f"{name}: a picture was written")
    open(metrics, "w").close()
    expect_error_line(run_constrained([PY, TOOL, run]), metrics, "no records")


@test
def unwritable_output_fails_with_one_line(work):
    run = os.path.join(work, "run")
    train("tiny.json", run, [])
    plain = os.path.join(work, "plain_file")
    with open(plain, "w") as f:
        f.write("not a folder\n")
    expect_error_line(run_constrained([PY, TOOL, run, "-o", os.path.join(plain, "x.png")]), plain)
    # a disk that fills up while writing: the earlier picture survives
    must([PY, TOOL, run])
    png = os.path.join(run, "metrics.png")
    with open(png, "rb") as f:
        before = f.read()
    r = run_constrained([PY, TOOL, run], file_size_limit=4096)
    expect_error_line(r, png, "File too large")
    with open(png, "rb") as f:
        check(f.read() == before, "the earlier picture changed")
    check(not any(n.endswith(".tmp") for n in os.listdir(run)), f"a temporary file was left: {os.listdir(run)}")


def main():
    return pyharness.run(TESTS, "msa_test_plot_run_", (TRAIN,))


if __name__ == "__main__":
    sys.exit(main())
