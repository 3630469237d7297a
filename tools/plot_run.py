#!/usr/bin/env python3
"""A picture of a run: what build/train recorded in RUN_DIR/metrics.jsonl, in one PNG.

    .venv/bin/python tools/plot_run.py RUN_DIR [-o OUT.png]

Panels, each against the optimizer step, and each drawn only when the run recorded its metric:
    loss                         training loss of every logged step, validation loss of every eval (and the
                                 dense-attention reference loss with train.eval_dense_reference)
    KL (MSA)                     mean KL(Main Branch || Index Branch) over the MSA layers, at each eval
    recall (MSA)                 share of the Main Branch's attention the selected blocks hold, at each eval
    expert load max/mean (MoE)   the busiest routed expert's token count over the mean, per logged step
                                 (1 = perfectly balanced)
    learning rate                the schedule (warm-up, cosine decay)
    tokens/s                     training throughput per logged step

Writes RUN_DIR/metrics.png unless -o names another file (its folder is created with its parents; the
picture is written under a temporary name and renamed, so an earlier one survives a failed write) and
prints the panels it drew. Uses matplotlib's Agg backend: no display needed. A missing or unreadable
metrics.jsonl, a line that is not a JSON object of numbers, or an output path that cannot be written
ends the program with status 1 and one error line naming the file (and the line).
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tool_common, however the tool is started

from tool_common import Fail, exit_with, parse_json, report, save_png

# (title, y label, [(record key, legend label, kind of record)]): "train" records are the logged steps,
# "eval" ones the validation passes (they hold val_loss)
PANELS = (
    ("loss", "cross-entropy", [("loss", "train", "train"), ("val_loss", "validation", "eval"),
                               ("dense_attention_val_loss", "validation, dense attention", "eval")]),
    ("KL (MSA)", "KL", [("kl", "validation", "eval")]),
    ("recall (MSA)", "recall", [("recall", "validation", "eval")]),
    ("expert load max/mean (MoE)", "max / mean tokens", [("moe_max_over_mean_load", "train", "train")]),
    ("learning rate", "lr", [("lr", None, "train")]),
    ("tokens/s", "tokens/s", [("tokens_per_s", None, "train")]),
)
COLUMNS = 2
PANEL_INCHES = (6.0, 3.2)
DPI = 100


def read_metrics(path):
    """(train records, eval records) of metrics.jsonl; Fail naming the file and line of a bad one."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise Fail(f"{path}: cannot read ({e.strerror}); is it a run directory of build/train (train.out_dir)?")
    train, evals = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {i}"
        rec = parse_json(line, where)
        if not isinstance(rec, dict):
            raise Fail(f"{where}: not a JSON object")
        for key, v in rec.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise Fail(f"{where}: \"{key}\" = {v!r} is not a number")
        if not isinstance(rec.get("step"), int):
            raise Fail(f"{where}: no integer \"step\"")
        (evals if "val_loss" in rec else train).append(rec)
    if not train and not evals:
        raise Fail(f"{path}: no records (did the run log a step?)")
    return train, evals


def series(records, key):
    """(steps, values) of the records that hold key."""
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def panels_with_data(train, evals):
    """The PANELS entries the run has data for. The trainer writes the MoE load as 0 for a model
    without MoE layers (a real one is at least 1), so only a positive load counts."""
    chosen = []
    for title, ylabel, lines in PANELS:
        kept = []
        for key, label, kind in lines:
            steps, values = series(train if kind == "train" else evals, key)
            if key == "moe_max_over_mean_load" and not any(v > 0 for v in values):
                continue
            if steps:
                kept.append((steps, values, label))
        if kept:
            chosen.append((title, ylabel, kept))
    return chosen


def plot(run_dir, out_path):
    """Draws the run's panels into out_path (PNG); returns their titles, read back from the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = os.path.join(run_dir, "metrics.jsonl")
    train, evals = read_metrics(metrics)
    chosen = panels_with_data(train, evals)
    rows = math.ceil(len(chosen) / COLUMNS)
    fig = Figure(figsize=(PANEL_INCHES[0] * COLUMNS, PANEL_INCHES[1] * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    for i, (title, ylabel, kept) in enumerate(chosen):
        ax = fig.add_subplot(rows, COLUMNS, i + 1)
        for steps, values, label in kept:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(label for _, _, label in kept):
            ax.legend(fontsize="small")
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)) or run_dir)
    fig.tight_layout()

    save_png(fig, out_path)
    return [ax.get_title() for ax in fig.axes]


def run(args):
    out = args.output or os.path.join(args.run_dir, "metrics.png")
    titles = plot(args.run_dir, out)
    print(f"plot_run: {os.path.join(args.run_dir, 'metrics.jsonl')} -> {out} (panels: {', '.join(titles)})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/plot_run.py",
                                 description="Draw a build/train run's metrics.jsonl (loss, MSA KL and recall, MoE "
                                             "expert load, learning rate, tokens/s) into one PNG.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.out_dir (holds metrics.jsonl)")
    ap.add_argument("-o", "--output", metavar="OUT.png", help="the picture (default RUN_DIR/metrics.png)")
    return report(run, ap.parse_args(argv))


if __name__ == "__main__":
    exit_with(main())
