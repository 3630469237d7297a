#!/usr/bin/env python3
"""How many key blocks the MSA selections of adjacent queries share.

Reads the files an MSA model's inference forwards write with MSA_DUMP_SELECTION=PREFIX (layers/msa.c:
PREFIX_<n>.bin, each the int64 shape [index heads, queries, topk_blocks] and the int32 block ids, ascending,
-1 padding) and prints, for windows of W consecutive queries of one index head, the mean and 90th percentile
of the number of distinct blocks their selections hold, and that mean over topk_blocks. A kernel that walked
tiles of W queries over the union of their blocks would compute that many times the pairs the selection
asks for (kernels/cuda/NOTES.md).

A query whose selection holds every block it can see (its own block id + 1 <= topk_blocks: the start of a
document) chose nothing and is left out, as is a window whose queries are not in one document (a query's own
block, its largest id, falls from one query to the next).

With --rows, also the load the KV-outer kernels see: per file (one layer's forward), over its index heads, how many
queries selected each block (a row of the plan; ids are document-relative, so with several documents a row here
is the same block id of every document), the mean, 90th percentile and largest count over the blocks selected at
all, and the share of the selected (query, block) pairs that the hottest 1% of those rows hold. A uniform
selection spreads the pairs evenly; a skewed one (every query picking the same few blocks) leaves many rows with
only their own block's queries, each a short segment of the attention backward's tiles.

  .venv/bin/python tools/selection_union.py PREFIX [--windows 1,2,4,8,16] [--rows]
"""
import argparse
import glob
import math
import os
import sys

import numpy as np


def read_dump(path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 24:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the 24-byte shape")
    heads, queries, k = (int(x) for x in np.frombuffer(raw[:24], dtype="<i8"))
    if heads < 1 or queries < 0 or k < 1 or len(raw) != 24 + 4 * heads * queries * k:
        raise ValueError(f"{path}: shape [{heads}, {queries}, {k}] does not match its {len(raw)} bytes")
    return k, np.frombuffer(raw[24:], dtype="<i4").reshape(heads, queries, k)


def window_unions(rows, k, w):
    """the distinct-block counts of the qualifying windows of w consecutive queries of one head's rows [queries, k]"""
    nw = rows.shape[0] // w
    if nw == 0:
        return np.zeros(0, dtype=np.int64)
    win = rows[:nw * w].reshape(nw, w, k)
    own = win.max(axis=2)                                    # ids ascending, -1 padding: the own block is the largest
    keep = (own + 1 > k).all(axis=1)                         # every query chose among more blocks than it keeps
    if w > 1:
        keep &= (np.diff(own, axis=1) >= 0).all(axis=1)      # one document: the own block never falls
    ids = np.sort(win[keep].reshape(-1, w * k), axis=1)
    distinct = (ids >= 0) & np.concatenate([np.ones((ids.shape[0], 1), bool), np.diff(ids, axis=1) != 0], axis=1)
    return distinct.sum(axis=1)


def row_loads(heads):
    """the per-row query counts (blocks selected at least once) of every head of one dump [heads, queries, k]"""
    counts = []
    for rows in heads:
        ids = rows[rows >= 0]
        c = np.bincount(ids) if len(ids) else np.zeros(0, dtype=np.int64)
        counts.append(c[c > 0])
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def percentile(values, p):
    s = np.sort(values)
    return int(s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix", help="the MSA_DUMP_SELECTION prefix the files were written with")
    ap.add_argument("--windows", default="1,2,4,8,16", help="window sizes W, comma-separated")
    ap.add_argument("--rows", action="store_true", help="also the queries per selected block, per file")
    a = ap.parse_args()
    try:
        windows = [int(x) for x in a.windows.split(",")]
        if any(w < 1 for w in windows):
            raise ValueError
    except ValueError:
        print(f"error: --windows {a.windows}: expected positive integers, comma-separated", file=sys.stderr)
        return 1
    paths = sorted(glob.glob(glob.escape(a.prefix) + "_*.bin"))
    if not paths:
        print(f"error: no {a.prefix}_<n>.bin files (run the model with MSA_DUMP_SELECTION={a.prefix})",
              file=sys.stderr)
        return 1
    counts = {w: [] for w in windows}
    ks = set()
    loads = []
    try:
        for p in paths:
            k, heads = read_dump(p)
            ks.add(k)
            if a.rows:
                loads.append((p, row_loads(heads)))
            for rows in heads:
                for w in windows:
                    counts[w].append(window_unions(rows, k, w))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(ks) != 1:
        print(f"error: the files mix topk_blocks {sorted(ks)}", file=sys.stderr)
        return 1
    k = ks.pop()
    print(f"{len(paths)} selections, topk_blocks {k}")
    print("| queries W | windows | distinct blocks, mean | p90 | mean / topk_blocks |")
    print("|---|---|---|---|---|")
    for w in windows:
        c = np.concatenate(counts[w])
        if len(c) == 0:
            print(f"| {w} | 0 | - | - | - |")
            continue
        mean = float(c.mean())
        print(f"| {w} | {len(c)} | {mean:.2f} | {percentile(c, 90)} | {mean / k:.2f} |")
    if a.rows:
        print()
        print("| file | rows | pairs | queries a row, mean | p90 | max | pairs in the hottest 1% of rows |")
        print("|---|---|---|---|---|---|---|")
        for p, c in loads:
            if len(c) == 0:
                print(f"| {os.path.basename(p)} | 0 | 0 | - | - | - | - |")
                continue
            hot = np.sort(c)[::-1][:max(1, math.ceil(len(c) / 100))]
            print(f"| {os.path.basename(p)} | {len(c)} | {int(c.sum())} | {float(c.mean()):.1f} | {percentile(c, 90)} | "
                  f"{int(c.max())} | {hot.sum() / c.sum():.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
