#!/usr/bin/env bash
# make fuzz-smoke: runs each fuzz target given for SECONDS seconds under ASan and UBSan, starting from its
# seed corpus tests/fuzz/corpus_NAME (every seed runs first, so a kept crashing input fails at once).
# New inputs go to build-fuzz/corpus/NAME (kept between runs), a finding's input to
# build-fuzz/findings/NAME-crash-... Prints one line per target and exits 1 if any target found anything.
#   usage: tests/fuzz/smoke.sh SECONDS build-fuzz/fuzz/fuzz_config ...
set -u
cd "$(dirname "$0")/../.."
seconds=$1
shift
findings=build-fuzz/findings
mkdir -p "$findings"
# detect_leaks=0: a refused input leaves what the reader held (in the programs fatal() exits there).
# allocator_may_return_null + max_allocation_size_mb: an allocation a file's dimensions ask for that is
# larger than 1 GiB fails as it would on a machine without that memory (xmalloc refuses with "out of
# host memory") instead of being a finding of libFuzzer's memory limit.
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:max_allocation_size_mb=1024
export UBSAN_OPTIONS=print_stacktrace=1
status=0
for target in "$@"; do
    name=$(basename "$target")
    name=${name#fuzz_}
    seeds=tests/fuzz/corpus_$name
    work=build-fuzz/corpus/$name
    log=build-fuzz/$name.log
    mkdir -p "$work"
    # -close_fd_mask=3: the refusals' messages would flood the log (libFuzzer's own and the sanitizers'
    # reports still show)
    "$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -close_fd_mask=3 \
        -artifact_prefix="$findings/$name-" "$work" "$seeds" >"$log" 2>&1
    rc=$?
    runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz $name: ${runs:-?}s, no finding"
    else
        status=1
        echo "fuzz $name: FINDING (exit $rc), log $log:"
        {
            grep -E 'ERROR:|runtime error|broken property' "$log" | head -n 2
            # the stack's frames in the project's code, then where the input was kept
            grep -E '^ *#[0-9]+ .* in [^ ]+ [^ ]*/(autograd|data|dist|kernels|tests|tools|train)/' "$log" | head -n 8
            grep -E 'Test unit written to' "$log"
        } | sed 's/^/    /'
    fi
done
exit $status
