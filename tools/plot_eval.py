#!/usr/bin/env python3
"""A picture of build/eval results: one or more of its --json files (e.g. before and after a long-context
continuation) in one PNG.

    .venv/bin/python tools/plot_eval.py EVAL.json [EVAL2.json ...] [--labels A,B,...] [-o OUT.png]

Panels: a heat-map of passkey exact-match accuracy (depth down, context length across; 0 red to 1 green,
each cell's value written in it) per file; the per-position loss (mean loss of each position bucket at the
bucket's middle position) of every file that has one, in one panel; the MSA indexer recall by context length
of every file that has one, in one panel. Labels default to the files' names. Writes the first file's name
with .png unless -o names another (written under a temporary name and renamed). Uses matplotlib's Agg
backend. A file that cannot be read or is not build/eval's JSON ends the program with status 1 and one error
line naming it.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tool_common, however the tool is started

from tool_common import Fail, exit_with, read_json, report, save_png

PANEL_INCHES = (5.0, 3.8)
COLUMNS = 3
DPI = 100


def read_eval(path):
    """build/eval's JSON, checked for the parts this tool draws."""
    r = read_json(path)
    try:
        pk = r["passkey"]
        lengths, depths, acc = pk["lengths"], pk["depths"], pk["accuracy"]
        ok = len(acc) == len(lengths) and all(len(row) == len(depths) for row in acc)
        for b in r.get("position_loss", {"buckets": []})["buckets"]:
            ok = ok and isinstance(b["start"], int) and isinstance(b["end"], int)
        for x in r.get("recall_by_length", []):
            ok = ok and isinstance(x["length"], int)
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise Fail(f"{path}: not the JSON of build/eval --json (passkey lengths x depths accuracy, position_loss, "
                   f"recall_by_length)")
    return r


def plot(paths, labels, out_path):
    """Draws the panels into out_path; returns their titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [read_eval(p) for p in paths]
    losses = [(r["position_loss"], lab) for r, lab in zip(results, labels) if "position_loss" in r]
    recalls = [(r["recall_by_length"], lab) for r, lab in zip(results, labels) if "recall_by_length" in r]
    n = len(results) + bool(losses) + bool(recalls)
    cols = min(n, COLUMNS)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    i = 0
    for r, label in zip(results, labels):
        pk = r["passkey"]
        i += 1
        ax = fig.add_subplot(rows, cols, i)
        grid = [[pk["accuracy"][l][d] for l in range(len(pk["lengths"]))] for d in range(len(pk["depths"]))]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(pk["lengths"])), [str(x) for x in pk["lengths"]])
        ax.set_yticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]])
        for d, row in enumerate(grid):
            for l, v in enumerate(row):
                ax.text(l, d, f"{v:.2f}", ha="center", va="center", fontsize="small")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey accuracy: {label}")
        fig.colorbar(im, ax=ax)
    if losses:
        i += 1
        ax = fig.add_subplot(rows, cols, i)
        for pl, label in losses:
            mids = [(b["start"] + b["end"] - 1) / 2 for b in pl["buckets"]]
            ax.plot(mids, [b["loss"] for b in pl["buckets"]], marker="o", markersize=3, label=label)
        ax.set_xlabel("token position")
        ax.set_ylabel("loss")
        ax.set_title("per-position loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if recalls:
        i += 1
        ax = fig.add_subplot(rows, cols, i)
        for rec, label in recalls:
            ax.plot([x["length"] for x in rec], [x["recall"] for x in rec], marker="o", markersize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("recall")
        ax.set_title("MSA indexer recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, out_path)
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def run(args):
    labels = args.labels.split(",") if args.labels else [os.path.splitext(os.path.basename(p))[0] for p in args.files]
    if len(labels) != len(args.files):
        raise Fail(f"--labels has {len(labels)} names for {len(args.files)} files")
    out = args.output or os.path.splitext(args.files[0])[0] + ".png"
    titles = plot(args.files, labels, out)
    print(f"plot_eval: {', '.join(args.files)} -> {out} (panels: {', '.join(titles)})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/plot_eval.py",
                                 description="Draw build/eval --json results (passkey accuracy heat-maps, per-position "
                                             "loss, MSA recall by length) into one PNG.")
    ap.add_argument("files", metavar="EVAL.json", nargs="+", help="build/eval --json files")
    ap.add_argument("--labels", help="comma-separated names of the files in the legends (default: file names)")
    ap.add_argument("-o", "--output", metavar="OUT.png", help="the picture (default: the first file with .png)")
    return report(run, ap.parse_args(argv))


if __name__ == "__main__":
    exit_with(main())
