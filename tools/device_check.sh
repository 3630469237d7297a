#!/bin/bash
# Everything issue 6 asks of the GPU machine, in one script for the device tool (one H100; a run is at
# most 10 minutes, so the stages are selectable):
#
#   bash tools/device_check.sh [build] [test] [bench] [baseline-dense] [baseline-msa]
#
#   build            make (BLAS=0: the machine has no OpenBLAS headers; jansson from the carried .deps)
#   test             make test-gpu (every CUDA op against the CPU reference, opcheck --device cuda against
#                    --device cpu, the CPU-vs-CUDA training runs)
#   bench            build/bench: the table of docs/benchmarks.md (training throughput, attention)
#   baseline-dense   configs/shakespeare_gpu.json, 5000 steps (nanoGPT's baby GPT)
#   baseline-msa     the same with model.attention=msa
#
# Logs and results go to $OUT (the device tool brings that folder back), or /tmp/device_check.
# Needs the git-ignored .deps folder (jansson headers and static library; see kernels/cuda/NOTES.md)
# carried along.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH NCCL_NVLS_ENABLE=0
MAKE="make -j16 BLAS=0 DEPS_PREFIX=$PWD/.deps"
status=0
stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }

for what in "$@"; do
    case "$what" in
    build)
        stage build
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
        if ! $MAKE >"$OUT/build.log" 2>&1 || ! $MAKE data >>"$OUT/build.log" 2>&1; then
            grep -E "error|Error" "$OUT/build.log" | head -40
            exit 1
        fi
        echo "built"
        ;;
    test)
        stage "make test-gpu"
        build/tests/gpu/test_gpu >"$OUT/test_gpu.log" 2>&1 || status=1
        grep -E "FAIL|passed" "$OUT/test_gpu.log" | tail -60
        ;;
    bench)
        stage bench
        build/bench | tee "$OUT/bench.md"
        ;;
    baseline-dense | baseline-msa)
        variant=${what#baseline-}
        stage "shakespeare baseline ($variant)"
        extra=""
        [ "$variant" = msa ] && extra="--set model.attention=msa"
        start=$(date +%s)
        build/train configs/shakespeare_gpu.json $extra --set train.out_dir="$OUT/run_$variant" \
            --set train.sample_tokens=300 >"$OUT/baseline_$variant.log" 2>&1 || status=1
        echo "wall $(($(date +%s) - start)) s"
        grep -E "eval step|done:" "$OUT/baseline_$variant.log" | tail -22
        rm -f "$OUT/run_$variant"/ckpt_*.h5
        ;;
    *)
        echo "unknown stage '$what'"
        exit 2
        ;;
    esac
done
exit $status
