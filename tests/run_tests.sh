#!/usr/bin/env bash
# Runs every test program given, prints each one's output and a closing "N passed, N failed" line
# summing their counts. A program that crashes or prints no count line counts as one failure.
# tests/*.py run with the project's virtual environment (.venv, made by tools/install_deps.sh), or
# $PYTHON when set.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
passed=0; failed=0
for t in "$@"; do
    echo "== $t"
    if [[ "$t" == *.py ]]; then
        modules=$(sed -e 's/#.*//' -e 's/[<>=!~ ].*//' "$root/tools/requirements.txt" | grep . | paste -sd, -)
        if ! "$python" -c "import $modules" >/dev/null 2>&1; then
            echo "   $python lacks one of $modules (run: bash tools/install_deps.sh): counted as 1 failure"
            failed=$((failed + 1)); continue
        fi
        out=$("$python" "$t" 2>&1); rc=$?
    else
        out=$("$t" 2>&1); rc=$?
    fi
    echo "$out"
    line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then
        echo "   $t exited with status $rc without a result line: counted as 1 failure"
        failed=$((failed + 1)); continue
    fi
    p=$(echo "$line" | cut -d' ' -f1); f=$(echo "$line" | cut -d' ' -f3)
    passed=$((passed + p)); failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then failed=$((failed + 1)); fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
