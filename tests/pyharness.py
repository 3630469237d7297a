"""The runner the Python test programs share: each test gets its own scratch folder; prints
"  ok   name" / "  FAIL name" with the traceback, and the closing line "N passed, N failed". Scratch files
are kept when something failed, for inspection."""
import os
import shutil
import sys
import tempfile
import traceback


def run(tests, prefix, required_exes=()):
    for exe in required_exes:
        if not os.access(exe, os.X_OK):
            print(f"  FAIL setup: {exe} is not built (make)")
            print("0 passed, 1 failed")
            return 1
    scratch = tempfile.mkdtemp(prefix=prefix)
    passed = failed = 0
    for fn in tests:
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
