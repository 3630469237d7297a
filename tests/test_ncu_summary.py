#!/usr/bin/env python3
"""tools/ncu_sass_summary.py (the GPU machine's `device_check.sh ncu-source` stage): on a hand-made page of
Nsight Compute's SASS source CSV, the shares of executed instructions and stall samples per opcode
(predicates ignored, modifiers folded into the opcode) against sums worked out here, the hottest
instructions in order with the one before each, the hot path's regions between its waits, barriers and fences
(instructions per pass of each, share of the stall samples), columns in any order, and one error line for a file
without the table.
Prints "N passed, N failed". Run with the project's virtual environment:
.venv/bin/python tests/test_ncu_summary.py
"""
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
from pyharness import expect_error_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "ncu_sass_summary.py")

# the page as `ncu --import R --page source --print-source sass --csv` writes it: a line of the profiler's before
# the header, quoted fields, thousands separators
PAGE = """==PROF== Connected to process 1234
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"0x7f0000000000","MOV R1, c[0x0][0x28]","10","5","1,000"
"0x7f0000000010","@P0 FFMA R2, R3, R4, R5","300","200","6,000"
"0x7f0000000020","FFMA R6, R7, R8, R9","100","50","2,000"
"0x7f0000000030","HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24","500","400","1,000"
"0x7f0000000040","@!P1 BRA 0x7f0000000000","90","10","0"
"""


def run_tool(path, *extra):
    return subprocess.run([sys.executable, TOOL, path, *extra], capture_output=True, text=True)


def summarise(work, name, page, top):
    """the tool's output on `page` written to work/name, showing `top` hottest instructions (it must succeed)"""
    path = os.path.join(work, name)
    with open(path, "w") as f:
        f.write(page)
    r = run_tool(path, str(top))
    check(r.returncode == 0, f"exit {r.returncode}: {r.stderr}")
    return r.stdout


@test
def opcode_shares_and_hottest_instructions(work):
    out = summarise(work, "page.csv", PAGE, 3)
    # by hand: executed 1000 + 6000 + 2000 + 1000 + 0 = 10000; stall samples 10 + 300 + 100 + 500 + 90 = 1000
    check("5 SASS instructions, 1e+04 warp instructions executed, 1000 stall samples" in out, out)
    shares = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^\s+(\S+)\s+([0-9.]+)% exec\s+([0-9.]+)% stalls", out, re.M)}
    want = {"FFMA": (80.0, 40.0), "MOV": (10.0, 1.0), "HGMMA": (10.0, 50.0), "BRA": (0.0, 9.0)}
    check(set(shares) == set(want), f"opcodes {sorted(shares)}, want {sorted(want)}")
    for op, (e, s) in want.items():
        check(abs(shares[op][0] - e) < 0.01 and abs(shares[op][1] - s) < 0.01, f"{op}: {shares[op]}, want {(e, s)}")
    # the 3 hottest by stall samples, most first, each with the instruction before it
    hot = out[out.index("the 3 instructions"):].splitlines()[1:]
    check(len(hot) == 3, f"{len(hot)} hot lines:\n{out}")
    check("HGMMA" in hot[0] and "| FFMA R6" in hot[0], hot[0])
    check("@P0 FFMA" in hot[1] and "| MOV R1" in hot[1], hot[1])
    check("FFMA R6" in hot[2].split("|")[0], hot[2])


@test
def columns_in_any_order(work):
    """the same page with its columns reversed (the executed count first, at index 0): the same summary"""
    rows = [line.split('","') for line in PAGE.splitlines()[1:]]
    flipped = ['"' + '","'.join(reversed([f.strip('"') for f in r])) + '"' for r in rows]
    a = summarise(work, "page.csv", PAGE, 3)
    b = summarise(work, "flipped.csv", PAGE.splitlines()[0] + "\n" + "\n".join(flipped) + "\n", 3)
    summary = lambda out: out[out.index("opcode:"):out.index("the 3 instructions")]
    check(summary(a) == summary(b), f"{a}\n---\n{b}")


@test
def a_file_without_the_table_is_one_error_line(work):
    path = os.path.join(work, "log.csv")
    with open(path, "w") as f:
        f.write("==ERROR== Could not open report file 'r.ncu-rep'.\n")
    expect_error_line(run_tool(path), "no SASS table", "Could not open report file")
    expect_error_line(run_tool(os.path.join(work, "missing.csv")), "cannot read it")


# a tile loop's page: a prologue and an epilogue run once per warp (50), the loop 10,000 times, with a KL-like flush
# every second pass behind its own barrier
LOOP_PAGE = """"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"
"0x00","MOV R1, c[0x0][0x28]","10","50"
"0x10","FFMA R2, R3, R4, R5","100","10000"
"0x20","WARPGROUP.ARRIVE","0","10000"
"0x30","HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24","200","10000"
"0x40","WARPGROUP.DEPBAR.LE gsb0, 0x0","300","10000"
"0x50","FADD R6, R7, R8","50","20000"
"0x60","BAR.SYNC.DEFER_BLOCKING 0x0","250","10000"
"0x70","HMMA.16816.F32.BF16 R8, R12, R16, R8","40","5000"
"0x80","BAR.SYNC.DEFER_BLOCKING 0x0","50","5000"
"0x90","EXIT","0","50"
"""


@test
def regions_between_synchronisation_points(work):
    out = summarise(work, "loop.csv", LOOP_PAGE, 2)
    body = out[out.index("regions of the hot path"):out.index("the 2 instructions")].splitlines()[1:]
    got = [(m.group(1), float(m.group(2)), float(m.group(3)))
           for m in (re.match(r"\s+(\S+).*?\s([0-9.]+)\s+([0-9.]+)%$", l) for l in body) if m]
    # by hand (1000 stall samples in all): the prologue, the FFMA and the ARRIVE up to the wgmma group's start,
    # (50 + 10000 + 10000) / 10000 passes, 110 samples; the HGMMA and its wait, 20000 / 10000, 500; the FADDs (two a
    # pass) and the barrier, 30000 / 10000, 300; the flush and its barrier per pass of that barrier, 10000 / 5000,
    # 90; the epilogue over the hottest count, 50 / 10000, no samples
    want = [("0x20", 2.005, 11.0), ("0x40", 2.0, 50.0), ("0x60", 3.0, 30.0), ("0x80", 2.0, 9.0), ("(to", 0.005, 0.0)]
    check(len(got) == len(want), f"{len(got)} regions, want {len(want)}:\n{out}")
    for (a, e, s), (wa, we, ws) in zip(got, want):
        check(a == wa and abs(e - we) < 0.06 and abs(s - ws) < 0.006, f"region {(a, e, s)}, want {(wa, we, ws)}")


def main():
    return pyharness.run(TESTS, "msa_test_ncu_summary_", ())


if __name__ == "__main__":
    sys.exit(main())
