#!/usr/bin/env python3
"""Summarise Nsight Compute's SASS source page of one kernel (tools/device_check.sh ncu-source).

Input: the CSV of `ncu --import R --page source --print-source sass --csv` (one row per SASS
instruction with its executed count and warp-stall samples). Output: where the kernel's issue slots and
stalls go, by opcode and by region of the hot path (between its waits, barriers, fences and wgmma groups:
instructions per pass, e.g. per tile), and the instructions with the most stall samples, with their
neighbours, so that a latency-bound tile kernel's hot spots can be read without the GUI.
"""
import collections
import csv
import io
import sys


def column(header, *words):
    """the first column whose name holds every word (case-insensitive), or None"""
    for i, name in enumerate(header):
        if all(w.lower() in name.lower() for w in words):
            return i
    return None


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


# where a tile kernel's warps wait for each other or for their products, or start issuing a group of wgmmas
# (WARPGROUP.ARRIVE): each ends a region
LANDMARKS = ("WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR", "BAR.SYNC", "BAR.ARV", "MEMBAR", "DEPBAR")


def landmark(op):
    """the synchronisation point this opcode is, or None"""
    return next((m for m in LANDMARKS if op.startswith(m)), None)


def regions(body, src, execd, stall, addr, total_stall):
    """The hot path cut at its synchronisation points: per region, the instructions a warp executes each time it
    passes the point that ends the region (the region's executed count over the point's), and the region's share of
    the stall samples. Points passed less than 1% as often as the hottest instruction are not cut at (the prologue,
    rare branches), so their instructions count in the region around them."""
    def opcode(r):
        t = [w for w in r[src].split() if not w.startswith("@")]
        return t[0] if t else ""
    hottest = max((number(r[execd]) for r in body), default=0.0)
    if hottest <= 0:
        return
    print("\nregions of the hot path, each ending at a wait, a barrier, a fence or a wgmma group's start:"
          " instructions per pass, % of stall samples")
    acc_e = acc_s = 0.0
    for i, r in enumerate(body):
        op = opcode(r)
        e = number(r[execd])
        acc_e += e
        acc_s += number(r[stall]) if stall is not None else 0.0
        if landmark(op) is None or e < 0.01 * hottest:
            continue
        where = r[addr] if addr is not None else str(i)
        print(f"  {where:>16s} {r[src][:44]:44s} {acc_e / e:8.1f}  {100 * acc_s / (total_stall or 1):6.2f}%")
        acc_e = acc_s = 0.0
    if acc_e > 0:
        print(f"  {'(to the end)':>16s} {'':44s} {acc_e / hottest:8.1f}  {100 * acc_s / (total_stall or 1):6.2f}%")


def main(path, top=40):
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError as e:
        sys.exit(f"error: {path}: cannot read it ({e.strerror})")
    start = next((i for i, l in enumerate(lines) if '"Address"' in l or l.startswith("Address")), None)
    if start is None:
        sys.exit(f"error: {path}: no SASS table (no Address column); it begins {' | '.join(lines[:3])[:300]!r}")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    def first_of(*alternatives):  # the first alternative naming a column (an index may be 0)
        return next((i for i in (column(header, *a) for a in alternatives) if i is not None), None)

    src = column(header, "source")
    execd = first_of(("instructions executed",), ("inst_executed",))
    stall = first_of(("(all samples)",), ("sampling",))  # ("all" alone is in "Stall")
    stall_ni = column(header, "stall sampling", "not-issued")
    if src is None or execd is None:
        sys.exit(f"error: {path}: no Source or Instructions Executed column among {header}")
    total_exec = sum(number(r[execd]) for r in body) or 1.0
    total_stall = sum(number(r[stall]) for r in body) if stall is not None else 0.0
    print(f"{len(body)} SASS instructions, {total_exec:.4g} warp instructions executed, {total_stall:.4g} stall samples")
    print(f"columns: {[header[i] for i in (src, execd, stall, stall_ni) if i is not None]}")

    by_op = collections.defaultdict(lambda: [0.0, 0.0])
    for r in body:
        op = r[src].split()
        op = [t for t in op if not t.startswith("@")]  # predicates
        name = op[0].split(".")[0] if op else "?"
        by_op[name][0] += number(r[execd])
        if stall is not None:
            by_op[name][1] += number(r[stall])
    print("\nopcode: % of executed warp instructions, % of stall samples")
    for name, (e, s) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {name:12s} {100 * e / total_exec:6.2f}% exec  {100 * s / (total_stall or 1):6.2f}% stalls")

    regions(body, src, execd, stall, column(header, "address"), total_stall)

    if stall is None:
        return
    print(f"\nthe {top} instructions with the most stall samples (address, executed, samples, instruction, the one before)")
    order = sorted(range(len(body)), key=lambda i: -number(body[i][stall]))[:top]
    addr = column(header, "address")
    for i in order:
        r = body[i]
        prev = body[i - 1][src] if i > 0 else ""
        print(f"  {r[addr] if addr is not None else i:>8s} {number(r[execd]):10.4g} {number(r[stall]):8.0f}  "
              f"{r[src][:70]:70s} | {prev[:50]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
