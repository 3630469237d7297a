#!/usr/bin/env bash
# Runs every test program given, prints each one's output and a closing "N passed, N failed" line
# summing their counts. A program that crashes or prints no count line counts as one failure.
set -u
passed=0; failed=0
for t in "$@"; do
    echo "== $t"
    out=$("$t" 2>&1); rc=$?
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
