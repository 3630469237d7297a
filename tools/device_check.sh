#!/bin/bash
# Everything issue 6 asks of the GPU machine, in one script for the device tool (one H100; a run is at
# most 10 minutes, so the stages are selectable):
#
#   bash tools/device_check.sh [build] [test] [bench] [baseline-dense] [baseline-msa] [memory] [memory-fit]
#                              [cp-one-gpu] ...
#
#   build            make (BLAS=0: the machine has no OpenBLAS headers; jansson from the carried .deps)
#   test             make test-gpu (every CUDA op against the CPU reference, opcheck --device cuda against
#                    --device cpu, the CPU-vs-CUDA training runs)
#   bench            build/bench: the table of docs/benchmarks.md (training throughput, attention)
#   attention        build/bench --only attention and the attention peers (.peers/attn_peer.py) at both of
#                    its head shapes (SIZES=8192,32768,131072 by default)
#   baseline-dense   configs/shakespeare_gpu.json, 5000 steps (nanoGPT's baby GPT; its steps replayed as a CUDA
#                    graph, train.cuda_graph: the log's "cuda graph" lines)
#                    then the compiled PyTorch peer (.peers/shakespeare_torch.py, same recipe) and the ratio
#   baseline-msa     the same with model.attention=msa
#   dist             (2 GPUs: nvidia-h200-x2) DP-2, EP-2 and CP-2 with NCCL against one GPU on configs/tiny.json
#                    (losses step by step), and the 1 -> 2 GPU DP scaling of the bench's ~1B dense model at
#                    4K (same per-GPU batch); not yet run: no 2-GPU machine has been lent so far
#   memory           peak GPU memory and tokens/s with train.recompute=true, batch 1, vocab 32000, 3 steps, of
#                    the cases in MEM_CASES: [SIZE_]VARIANT_CONTEXT[_offload][_chunked][_noshadow], SIZE 0.1b (12 layers, d 768,
#                    12/4 heads of 64, SwiGLU 2048: ~0.12B), 1b (the default: the bench's 22 layers, d 2048,
#                    32/4 heads of 64, SwiGLU 5632: ~1.1B) or 3b (Llama 3.2 3B's 28 layers, d 3072, 24/8 heads
#                    of 128, SwiGLU 8192: ~3.0B), VARIANT dense or msa, CONTEXT like 64k or 1m, _offload for
#                    train.offload_block_inputs=true, _chunked for train.ffn_chunk_tokens=8192, _noshadow for
#                    train.weight_shadow=false (default: the
#                    1.1B dense at 32K, 64K, 128K, MSA at 128K, 256K, dense 64K and MSA 256K offloaded);
#                    MEM_EXTRA="--set k=v ..." is added to every run, e.g. train.loss_chunk_tokens=0 for the unchunked head; the peak is the most nvidia-smi
#                    saw used while the run lasted (CUDA context, cuBLAS/cuDNN workspaces and the activation
#                    arena's chunks included), and step 2's profile has the arena's bytes per op kind at its
#                    peak (the memory columns)
#   memory-fit       the table "longest context that fits" per model size and variant: for each size in
#                    FIT_SIZES (0.1b 1b 3b) and variant in FIT_VARIANTS (dense msa dense_offload_chunked_noshadow
#                    msa_offload_chunked_noshadow), contexts doubling from FIT_FROM_01B=128, FIT_FROM_1B=64, FIT_FROM_3B=16 (K tokens) up to
#                    FIT_MAX_K=2048 until one fails, one step each (MEM_TIMEOUT s at most a run); prints "longest context that fits: ..."
#                    per pair (a whole table takes more than one 10-minute call: split it by FIT_SIZES)
#   memory-model     the longest context predicted to fit, per size in FIT_SIZES and variant in FIT_VARIANTS
#                    (default dense_offload_chunked_noshadow msa_offload_chunked_noshadow): one step at MODEL_FROM_01B=64,
#                    MODEL_FROM_1B=32, MODEL_FROM_3B=16 K tokens and at twice that, peak = fixed + per-token
#                    line through the two peaks, met with the device's memory (or FIT_TOTAL_MIB); cheap where memory-fit's
#                    doubling runs take minutes a step (dense attention at 1M tokens)
#   cp-one-gpu       sequence-split context parallelism on one GPU: the split ops on device tensors against the
#                    CPU (mpirun -np 2 and 4 build/tests/test_dist_cp --cuda), then configs/tiny.json with one KV head (so cp 2
#                    exceeds it), 10 steps, as one process and as 2 ranks sharing the GPU (mpirun -np 2, dist.cp=2,
#                    dist.cp_mode=sequence: ring attention, collectives staged through MPI), the same on the CPU;
#                    losses compared step by step, PASS when the CUDA split moves the loss by at most twice what
#                    bf16 itself does (CUDA vs CPU at cp 1, same call); then the MSA variant (every layer
#                    MSA, 3 dense warm-up steps, then sparse) and the sliding-window variant compared the same way
#   baby-8k          issue 14's baby GPT at 8K context: dense, MSA top-16, MSA top-8 (BABY_STEPS), tokens/s and best
#                    validation loss, MSA over dense (BABY_PROFILE=1: with each variant's step profile)
#   baseline-seeds   configs/shakespeare_gpu.json's best validation loss over SEEDS (SEED_EXTRA added)
#   ncu              Nsight Compute sections of the MSA kernels of one attention layer (NCU_SIZE tokens,
#                    NCU_HEADS, NCU_KERNELS a regex of kernel names)
#   ncu-source       per-SASS-instruction executed counts and stall samples of one launch of each kernel in
#                    NCU_KERNELS (regexes of the demangled names, "msa_bwd_tc_kernel<.int.64,..int.0>"; default the MSA backward tile with and without the KL),
#                    summarised by tools/ncu_sass_summary.py
#   kernel-times     every kernel of one attention layer (NCU_SIZE, NCU_HEADS) with its summed device time (ncu, one
#                    metric): the MSA layer's milliseconds per kernel
#   ab               a kernel change against its baseline on one card: build/bench's attention table (SIZES, default
#                    32768; AB_HEADS, default 32/4/64) for the tree as sent, then with the patch AB_PATCH reversed
#                    (a file in the tree, made here with `git diff BASE HEAD -- kernels > ab.patch`; the device's git
#                    history may be stale, so the patch travels as a file), then the patch re-applied and rebuilt.
#                    Calls can land on an H100 or an H200, so a change is only measured against a baseline timed
#                    in the same call
#   continuation     issue 15's long-context workflow at the ~1.1B size (dense base at 4K, extended to 32K
#                    with YaRN and MSA), build/eval's tables before and after (CONT_BASE_STEPS, CONT_LONG_STEPS)
#   profile          per-op profiles (train.profile_steps) of the bench's ~1B dense model at 4K and 32K,
#                    the MoE model at 4K and the MSA model at 32K, on the shakespeare data
#                    (PROFILES="dense_32k msa_32k" selects some of them; dense_32k_keep and msa_32k_keep: the
#                    same with train.keep_attention_outputs; moe_4k_keep the MoE model so, moe_4k_accum2 and
#                    moe_4k_accum4 without recomputation over 2 or 4 micro-batches of the same 16384 tokens a step;
#                    PROFILE_STEPS=7: three CUDA-graph replays after the profiled eager steps; PROFILE_NCU="regex":
#                    each run under Nsight Compute, the device time of every kernel whose name matches, summed per
#                    kernel as kernel-times does, e.g. PROFILE_NCU="msa_|kl_|sched_" PROFILE_STEPS=2: a training
#                    step's MSA kernels, to set beside kernel-times' bench layer)
#
# Logs and results go to $OUT (the device tool brings that folder back), or /tmp/device_check.
# Needs the git-ignored .deps folder (jansson headers and static library; see kernels/cuda/NOTES.md; and
# CUTLASS's headers in .deps/cutlass, from tools/install_deps.sh) carried along.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH NCCL_NVLS_ENABLE=0
MAKE="make -j16 BLAS=0 DEPS_PREFIX=$PWD/.deps"
status=0
# The device tool brings back only the first few files of $OUT (in name order): every log also goes into one
# archive whose name sorts first, written when the script ends, however it ends (a stage's timeout included).
bundle() { tar -czf "$OUT/0_logs.tgz" -C "$OUT" --exclude 0_logs.tgz . 2>/dev/null; }
trap bundle EXIT
trap "exit 143" TERM INT
stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }
# the largest relative loss difference over the logged steps of two runs' metrics.jsonl; with a third
# argument, that number alone (for arithmetic)
cmp_losses() {
    python3 -c 'import json,sys
a,b=[[json.loads(l) for l in open(f) if "\"loss\"" in l] for f in sys.argv[1:3]]
if not a or len(a)!=len(b): sys.exit("no or unequal loss lines: %d and %d" % (len(a),len(b)))
d=max(abs(x["loss"]-y["loss"])/abs(x["loss"]) for x,y in zip(a,b))
print("%.3e" % d if len(sys.argv)>3 else "  %d steps, max relative loss difference %.2e" % (len(a), d))' "$@"
}

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
    attention)
        # build/bench's attention table (both head shapes) and the peers of ../shared/peers/attn_peer.py
        # (carried in .peers/) at the same shapes in the same call; the peer states 64/4/128, so a copy
        # with the ~1.1B model's 32/4/64 runs the second shape
        stage attention
        sizes=${SIZES:-8192,32768,131072}
        build/bench --only attention --sizes "$sizes" | tee "$OUT/bench_attention.md"
        for shape in 64,4,128 32,4,64; do
            echo "--- peers at H_q,H_kv,d = $shape"
            sed "s/^dev = \"cuda\"; Hq, Hkv, D, BS, K = 64, 4, 128, 128, 16/dev = \"cuda\"; Hq, Hkv, D, BS, K = $shape, 128, 16/" \
                .peers/attn_peer.py >/tmp/attn_peer_shape.py
            grep -q "Hq, Hkv, D, BS, K = $shape," /tmp/attn_peer_shape.py || { echo "peer script changed: no shape line"; status=1; continue; }
            python3 /tmp/attn_peer_shape.py "$sizes" 2>&1 | tee -a "$OUT/peer_attention.txt"
        done
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
        grep -E "cuda graph|eval step|done:" "$OUT/baseline_$variant.log" | tail -30
        rm -f "$OUT/run_$variant"/ckpt_*.h5
        # the peer in the same call: ../shared/peers/shakespeare_torch.py (carried in .peers/), the same recipe in
        # PyTorch with torch.compile, 5000 steps; its tokens/s leave out its evaluations (ours include them)
        if [ "$variant" = dense ] && [ -f .peers/shakespeare_torch.py ]; then
            echo "--- peer: shakespeare_torch.py --arch llama --kv 6 --dropout 0.2 (torch.compile)"
            python3 .peers/shakespeare_torch.py --arch llama --kv 6 --dropout 0.2 >"$OUT/baseline_peer.log" 2>&1 || status=1
            grep -E "step 5000|RESULT" "$OUT/baseline_peer.log"
            python3 - "$OUT/baseline_$variant.log" "$OUT/baseline_peer.log" <<'PY'
import re, sys
log, peer_log = open(sys.argv[1]).read(), open(sys.argv[2]).read()
ours = re.search(r"([0-9]+) tokens/s overall", log)
peer = re.search(r"tokens/s=([0-9,]+)", peer_log)
if ours and peer:
    o, p = float(ours.group(1)), float(peer.group(1).replace(",", ""))
    print("shakespeare: msa-train %.0f tokens/s (evaluations included), peer %.0f (evaluations left out): %.2fx" % (o, p, o / p))
vals = [float(x) for x in re.findall(r"eval step [0-9]+ \| val loss ([0-9.]+)", log)]
pbest = re.search(r"best_val=([0-9.]+)", peer_log)
if vals and pbest:
    b, pb = min(vals), float(pbest.group(1))
    print("shakespeare: best validation loss %.4f, peer %.4f: %+.4f (issue 16 asks +-0.01)" % (b, pb, b - pb))
PY
        fi
        ;;
    baby-8k)
        # issue 14's baby GPT at 8K context (configs/shakespeare_gpu.json with sequences of 8192, batch 2, MSA
        # blocks of 128, index dim 64): dense, MSA top-16 and MSA top-8 with the same seed and tokens,
        # BABY_STEPS steps each (default 300, the issue measured 1500); tokens/s of the last logged steps
        # (after the dense warm-up and the graph's capture) and the best validation loss, MSA over dense
        stage "baby GPT at 8K (${BABY_STEPS:-300} steps)"
        baby="--set train.seq_len=8192 --set train.batch_size=2 --set msa.block_size=128 --set msa.index_dim=64
              --set train.steps=${BABY_STEPS:-300} --set train.log_every=50 --set train.eval_every=${BABY_STEPS:-300}"
        # BABY_PROFILE=1: step profiles too (train.profile_steps=2: every op's self time, device synchronised
        # around each), the table printed per variant: where a G = 1 MSA step's time goes; the sparse phase
        # then starts at the first step (msa.dense_warmup_steps=0), so that the profiled steps are sparse
        [ -n "${BABY_PROFILE:-}" ] && baby="$baby --set train.profile_steps=2 --set msa.dense_warmup_steps=0"
        for v in dense msa16 msa8; do
            case $v in
                dense) extra="" ;;
                msa16) extra="--set model.attention=msa --set msa.topk_blocks=16" ;;
                msa8) extra="--set model.attention=msa --set msa.topk_blocks=8" ;;
            esac
            # shellcheck disable=SC2086
            build/train configs/shakespeare_gpu.json $baby $extra >"$OUT/baby8k_$v.log" 2>&1 || status=1
            grep -E "cuda graph: (on|off)" "$OUT/baby8k_$v.log" | head -1
            [ -n "${BABY_PROFILE:-}" ] && grep -E "^\| [a-z_]+ .*\| [0-9.]+ \|" "$OUT/baby8k_$v.log" | sort -t'|' -k7 -rn | head -12
        done
        python3 - "$OUT" <<'PY'
import re, sys
rate, best = {}, {}
for v in ("dense", "msa16", "msa8"):
    t = open(f"{sys.argv[1]}/baby8k_{v}.log").read()
    r = [float(x) for x in re.findall(r"\| ([0-9.]+) tok/s", t)]
    vals = [float(x) for x in re.findall(r"val loss ([0-9.]+)", t)]
    rate[v] = sum(r[-3:]) / max(1, len(r[-3:])) if r else float("nan")
    best[v] = min(vals) if vals else float("nan")
    print(f"baby 8K {v}: {rate[v]:.0f} tokens/s (mean of the last 3 logged), best val {best[v]:.4f}, "
          f"{rate[v] / rate['dense']:.2f}x dense, val {best[v] - best['dense']:+.4f}")
PY
        ;;
    baseline-seeds)
        # the spread of the baby GPT's best validation loss over seeds (SEEDS, default "1 2 3"; the whole
        # 5000-step recipe, since train.steps sets the cosine's length), to read the peer's best against;
        # SEED_EXTRA="--set k=v ..." is added to every run
        stage "shakespeare best validation loss over seeds ${SEED_EXTRA:-}"
        for seed in ${SEEDS:-1 2 3}; do
            # shellcheck disable=SC2086
            build/train configs/shakespeare_gpu.json --set train.seed="$seed" ${SEED_EXTRA:-} \
                >"$OUT/seed_$seed.log" 2>&1 || status=1
            echo "seed $seed: best val $(grep -o 'val loss [0-9.]*' "$OUT/seed_$seed.log" | awk '{print $3}' | sort -n | head -1)"
        done
        ;;
    ncu)
        # Nsight Compute on the MSA kernels of one attention layer (bench shape, NCU_SIZE tokens, default
        # 32768): speed of light, memory and warp-state sections of the first launches of the tile kernels,
        # the combines and the indexer (NCU_KERNELS, a regex, picks others)
        stage ncu
        ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        if [ -z "$ncu_bin" ]; then echo "no ncu on this machine"; status=1; continue; fi
        timeout 400 "$ncu_bin" --clock-control none --kernel-name "regex:${NCU_KERNELS:-msa_(fwd|bwd)_tc|combine|msa_indexer}" --launch-count 8 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
            --section InstructionStats --section SourceCounters \
            build/bench --only attention --sizes "${NCU_SIZE:-32768}" --heads "${NCU_HEADS:-64/4/128}" \
            >"$OUT/ncu_msa.txt" 2>&1 || status=1
        grep -E "^  [a-z_].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Stall|Warp Cycles Per Issued|Executed Instructions  |Issued Ipc" "$OUT/ncu_msa.txt" | head -120
        ;;
    ncu-source)
        # one launch of each kernel in NCU_KERNELS (a space-separated list of regexes, default the MSA backward
        # tile kernel with and without the KL) with Nsight Compute's per-SASS-instruction counts and warp-stall
        # samples, summarised by tools/ncu_sass_summary.py: which instructions a latency-bound kernel waits on
        stage ncu-source
        ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        if [ -z "$ncu_bin" ]; then echo "no ncu on this machine"; status=1; continue; fi
        n=0
        for k in ${NCU_KERNELS:-msa_bwd_tc_kernel<.int.64,..int.128> msa_bwd_tc_kernel<.int.64,..int.0>}; do
            n=$((n + 1))
            rep="$OUT/ncu_source_$n"
            echo "--- $k"
            timeout 200 "$ncu_bin" --clock-control none --kernel-name-base demangled --kernel-name "regex:$k" \
                --launch-skip "${NCU_SKIP:-0}" --launch-count 1 --import-source no \
                --section WarpStateStats --section SourceCounters --section InstructionStats \
                -o "$rep" -f build/bench --only attention --sizes "${NCU_SIZE:-32768}" --heads "${NCU_HEADS:-32/4/64}" \
                >"$rep.log" 2>&1 || { tail -5 "$rep.log"; status=1; continue; }
            "$ncu_bin" --import "$rep.ncu-rep" --page source --print-source sass --csv >"$rep.csv" 2>&1 ||
                "$ncu_bin" --import "$rep.ncu-rep" --page source --csv >"$rep.csv" 2>&1
            "$ncu_bin" --import "$rep.ncu-rep" --page details --print-details all >"$rep.txt" 2>&1
            grep -E "Stall|Warp Cycles Per Issued|Executed Instructions  " "$rep.txt" | head -30
            python3 tools/ncu_sass_summary.py "$rep.csv" 40 || head -20 "$rep.csv"
            rm -f "$rep.ncu-rep"
        done
        ;;
    kernel-times)
        # every kernel of one MSA attention layer (bench shape, NCU_SIZE tokens, NCU_HEADS) with its device
        # time, summed per kernel name over the bench's launches (one metric, so the replays are quick):
        # where a layer's milliseconds go, the indexer's two passes and the combines included
        stage kernel-times
        ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        if [ -z "$ncu_bin" ]; then echo "no ncu on this machine"; status=1; continue; fi
        timeout 400 "$ncu_bin" --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
            build/bench --only attention --sizes "${NCU_SIZE:-32768}" --heads "${NCU_HEADS:-64/4/128}" \
            >"$OUT/kernel_times.txt" 2>&1 || status=1
        grep -E "^  [A-Za-z_].*\(|gpu__time_duration.sum|Invocations|^    [a-z_<]" "$OUT/kernel_times.txt" | head -150
        ;;
    continuation)
        # issue 15's workflow at the ~1.1B size: a dense base trained at 4K on the long-document split, then
        # extended to 32K with YaRN (factor 8 over 4096) and MSA in layers 1- (configs/longctx_continue.json,
        # whole documents), build/eval before and after on the same validation windows (per-position loss
        # at 32K, passkey at 4K/16K/32K, indexer recall), and how many blocks adjacent queries' selections share
        # (tools/selection_union.py); CONT_BASE_STEPS, CONT_LONG_STEPS
        stage continuation
        make data-long >>"$OUT/build.log" 2>&1 || { echo "make data-long failed"; status=1; continue; }
        w=/tmp/continuation
        rm -rf $w
        big="--set model.d_model=2048 --set model.n_layers=22 --set model.n_heads=32 --set model.n_kv_heads=4
             --set model.head_dim=64 --set model.ffn_dim=5632 --set model.dropout=0 --set model.tie_embeddings=false
             --set data.train_path=data/shakespeare_long/train.h5 --set data.val_path=data/shakespeare_long/val.h5
             --set train.eval_every=0 --set train.sample_tokens=0 --set train.checkpoint_every=0"
        ev="--data data/shakespeare_long/val.h5 --lengths 4096,16384,32768 --depths 0,0.5,1 --trials 2
            --loss-length 32768 --loss-windows 4 --buckets 8"
        # shellcheck disable=SC2086
        build/train configs/shakespeare_gpu.json $big --set train.seq_len=4096 --set train.batch_size=4 \
            --set train.steps=${CONT_BASE_STEPS:-200} --set train.log_every=50 --set optim.lr=3e-4 \
            --set optim.min_lr=3e-5 --set optim.warmup_steps=20 --set train.out_dir=$w/base \
            >"$OUT/cont_base.log" 2>&1 || { tail -5 "$OUT/cont_base.log"; status=1; continue; }
        grep -E "^step|val" "$OUT/cont_base.log" | tail -4
        base_ckpt=$(ls $w/base/ckpt_*.h5 | tail -1)
        # shellcheck disable=SC2086
        build/eval $w/base/config.json "$base_ckpt" $ev --json "$OUT/cont_before.json" >"$OUT/cont_before.md" 2>&1 || status=1
        cat "$OUT/cont_before.md"
        # shellcheck disable=SC2086
        build/train configs/longctx_continue.json $big --set train.device=cuda --set train.init_from="$base_ckpt" \
            --set model.rope_theta=10000 --set model.rope_scaling=yarn --set model.rope_factor=8 \
            --set model.rope_original_max_position=4096 --set msa.block_size=128 --set msa.topk_blocks=16 \
            --set msa.index_dim=128 --set msa.recall_stride=64 --set train.seq_len=32768 --set train.batch_size=1 \
            --set train.steps=${CONT_LONG_STEPS:-40} --set train.log_every=10 --set data.sample=documents \
            --set optim.lr=1e-4 --set optim.min_lr=1e-5 --set optim.warmup_steps=5 --set train.out_dir=$w/long \
            >"$OUT/cont_long.log" 2>&1 || { tail -5 "$OUT/cont_long.log"; status=1; continue; }
        grep -E "^step" "$OUT/cont_long.log" | tail -3
        rm -f "$base_ckpt"
        # shellcheck disable=SC2086
        build/eval $w/long/config.json "$(ls $w/long/ckpt_*.h5 | tail -1)" $ev --json "$OUT/cont_after.json" \
            >"$OUT/cont_after.md" 2>&1 || status=1
        cat "$OUT/cont_after.md"
        # the continued model's block selections at 32K (one passkey prompt and one loss window, every MSA layer):
        # how many blocks adjacent queries share (tools/selection_union.py; kernels/cuda/NOTES.md)
        MSA_DUMP_SELECTION=$w/sel build/eval $w/long/config.json "$(ls $w/long/ckpt_*.h5 | tail -1)" \
            --data data/shakespeare_long/val.h5 --lengths 32768 --depths 0.5 --trials 1 --loss-length 32768 \
            --loss-windows 1 --buckets 1 >/dev/null 2>&1 || status=1
        python3 tools/selection_union.py $w/sel || status=1
        rm -rf $w
        ;;
    profile)
        stage profile
        # the bench's ~1B shape (TinyLlama) on the shakespeare tokens (vocab 65: the embedding is not
        # what is measured); 2 steps of warm-up, 2 profiled, step 4 captured as a CUDA graph; PROFILE_STEPS=7
        # adds three replayed steps (what a long run's steps are: no launch gaps, no host waits)
        big="--set model.d_model=2048 --set model.n_layers=22 --set model.n_heads=32 --set model.n_kv_heads=4
             --set model.head_dim=64 --set model.ffn_dim=5632 --set model.dropout=0 --set train.steps=${PROFILE_STEPS:-4}
             --set train.profile_steps=2 --set train.eval_every=0 --set train.eval_batches=1
             --set train.sample_tokens=0 --set train.log_every=1"
        moe="--set model.ffn=moe --set moe.num_experts=16 --set moe.experts_per_token=4 --set moe.expert_dim=704
             --set moe.shared_experts=1 --set moe.shared_expert_dim=2816"
        msa="--set model.attention=msa --set msa.block_size=128 --set msa.topk_blocks=16 --set msa.index_dim=128
             --set msa.dense_warmup_steps=0"
        for p in "dense_4k:--set train.seq_len=4096 --set train.batch_size=4" \
                 "dense_32k:--set train.seq_len=32768 --set train.batch_size=1 --set train.recompute=true" \
                 "moe_4k:--set train.seq_len=4096 --set train.batch_size=4 --set train.recompute=true $moe" \
                 "moe_4k_keep:--set train.seq_len=4096 --set train.batch_size=4 --set train.recompute=true --set train.keep_attention_outputs=true $moe" \
                 "moe_4k_accum2:--set train.seq_len=4096 --set train.batch_size=2 --set train.grad_accum=2 $moe" \
                 "moe_4k_accum4:--set train.seq_len=4096 --set train.batch_size=1 --set train.grad_accum=4 $moe" \
                 "msa_32k:--set train.seq_len=32768 --set train.batch_size=1 --set train.recompute=true $msa" \
                 "dense_32k_keep:--set train.seq_len=32768 --set train.batch_size=1 --set train.recompute=true --set train.keep_attention_outputs=true" \
                 "msa_32k_keep:--set train.seq_len=32768 --set train.batch_size=1 --set train.recompute=true --set train.keep_attention_outputs=true $msa" \
                 "dense_64k_keep:--set train.seq_len=65536 --set train.batch_size=1 --set train.recompute=true --set train.keep_attention_outputs=true" \
                 "msa_64k_keep:--set train.seq_len=65536 --set train.batch_size=1 --set train.recompute=true --set train.keep_attention_outputs=true $msa"; do
            name=${p%%:*}
            # PROFILES="dense_32k msa_32k" runs only those
            case " ${PROFILES:-$name} " in *" $name "*) ;; *) continue ;; esac
            echo "--- $name"
            runner=()
            if [ -n "${PROFILE_NCU:-}" ]; then
                ncu_bin=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
                if [ -z "$ncu_bin" ]; then echo "no ncu on this machine"; status=1; break; fi
                runner=("$ncu_bin" --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel
                        --kernel-name "regex:$PROFILE_NCU")
            fi
            # shellcheck disable=SC2086
            "${runner[@]}" build/train configs/shakespeare_gpu.json $big ${p#*:} --set train.out_dir= \
                >"$OUT/profile_$name.log" 2>&1 || status=1
            if [ -n "${PROFILE_NCU:-}" ]; then
                grep -E "^step|^  [A-Za-z_].*\(|gpu__time_duration.sum|Invocations" "$OUT/profile_$name.log" | head -150
            else
                tail -45 "$OUT/profile_$name.log"
            fi
        done
        ;;
    memory | memory-fit | memory-model)
        stage "$what"
        common="--set model.vocab_size=32000 --set model.tie_embeddings=false --set model.dropout=0
                --set train.batch_size=1 --set train.recompute=true --set train.profile_steps=1 --set train.eval_every=0
                --set train.eval_batches=1 --set train.sample_tokens=0 --set train.log_every=1"
        msa="--set model.attention=msa --set msa.block_size=128 --set msa.topk_blocks=16 --set msa.index_dim=128
             --set msa.dense_warmup_steps=0"
        # one case: [SIZE_]VARIANT_CONTEXT[_offload], SIZE 0.1b, 1b (the default) or 3b, VARIANT dense or msa,
        # CONTEXT 64k, 1m, ...; prints "NAME: fits|out of memory ..." and returns 1 when the run failed
        mem_case() {
            local name=$1 rest=$1 size=1b shape extra="" tokens ctx variant peak tps steps=$2
            case $rest in 0.1b_* | 1b_* | 3b_*) size=${rest%%_*}; rest=${rest#*_} ;; esac
            variant=${rest%%_*}
            ctx=${rest#*_}
            ctx=${ctx%%_*}
            case $ctx in *m) tokens=$((${ctx%m} * 1048576)) ;; *) tokens=$((${ctx%k} * 1024)) ;; esac
            case $size in
            # ~0.12B: GPT-2 small's width and depth, Llama's blocks
            0.1b) shape="--set model.d_model=768 --set model.n_layers=12 --set model.n_heads=12 --set model.n_kv_heads=4
                         --set model.head_dim=64 --set model.ffn_dim=2048" ;;
            # ~1.1B: the bench's model (TinyLlama's shape)
            1b) shape="--set model.d_model=2048 --set model.n_layers=22 --set model.n_heads=32 --set model.n_kv_heads=4
                       --set model.head_dim=64 --set model.ffn_dim=5632" ;;
            # ~3.0B: Llama 3.2 3B's shape with the bench's vocabulary
            3b) shape="--set model.d_model=3072 --set model.n_layers=28 --set model.n_heads=24 --set model.n_kv_heads=8
                       --set model.head_dim=128 --set model.ffn_dim=8192" ;;
            esac
            [ "$variant" = msa ] && extra=$msa
            case $name in *_offload*) extra="$extra --set train.offload_block_inputs=true" ;; esac
            case $name in *_chunked*) extra="$extra --set train.ffn_chunk_tokens=8192" ;; esac
            case $name in *_noshadow*) extra="$extra --set train.weight_shadow=false" ;; esac
            echo "--- $name"
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$OUT/memory_$name.smi" &
            local smi=$! rc=0
            # shellcheck disable=SC2086
            # no out_dir (no multi-GB checkpoint at the end); the evaluation reads the training split, since
            # the shipped validation split (111K tokens) is shorter than these windows
            timeout "${MEM_TIMEOUT:-400}" build/train configs/shakespeare_gpu.json $common $shape $extra ${MEM_EXTRA:-} \
                --set train.steps=$steps --set train.seq_len=$tokens --set data.val_path=data/shakespeare/train.h5 \
                --set train.out_dir= >"$OUT/memory_$name.log" 2>&1 || rc=$?
            kill $smi
            wait $smi 2>/dev/null
            peak=$(sort -n "$OUT/memory_$name.smi" | tail -1)
            tps=$(grep -E "^step +$steps/$steps" "$OUT/memory_$name.log" | sed -E 's/.*\| ([0-9.]+) tok\/s.*/\1/')
            local params
            params=$(grep -oE "[0-9]+ parameters" "$OUT/memory_$name.log" | head -1)
            if [ $rc = 0 ]; then
                echo "$name: fits; seq_len $tokens, $params, peak GPU memory ${peak:-?} MiB (nvidia-smi), step $steps ${tps:-n/a} tokens/s"
            elif [ $rc = 124 ]; then
                echo "$name: not finished within MEM_TIMEOUT=${MEM_TIMEOUT:-400} s; seq_len $tokens, peak GPU memory ${peak:-?} MiB so far"
                grep -E "^step" "$OUT/memory_$name.log" | tail -2
            else
                echo "$name: failed; seq_len $tokens, $params, peak GPU memory ${peak:-?} MiB before it ended"
                grep -E "out of memory|failed|error" "$OUT/memory_$name.log" | head -3
            fi
            grep -E "^\| (step wall time|other|checkpoint|lm_head_loss|linear|attention|msa_)" "$OUT/memory_$name.log" | head -12
            return $rc
        }
        if [ "$what" = memory ]; then
            for name in ${MEM_CASES:-dense_32k dense_64k dense_128k msa_128k msa_256k dense_64k_offload msa_256k_offload}; do
                mem_case "$name" 3 || status=1
            done
        elif [ "$what" = memory-model ]; then
            # the longest context predicted to fit, per model size and variant, from the peaks of one step at two
            # contexts (MODEL_FROM_<size> K tokens and twice that): every activation buffer, the offload slots
            # and cuDNN's workspace grow in proportion to the tokens, the weights, optimizer state and CUDA
            # context do not, so peak = fixed + per_token * tokens; the prediction is where that line meets the
            # device's memory (nvidia-smi's memory.total), rounded down to a power of two
            # FIT_TOTAL_MIB: the memory to predict for (81559 = an H100 80GB's, when the call runs on an H200)
            total=${FIT_TOTAL_MIB:-$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)}
            for size in ${FIT_SIZES:-0.1b 1b 3b}; do
                for variant in ${FIT_VARIANTS:-dense_offload_chunked_noshadow msa_offload_chunked_noshadow}; do
                    case $size in 0.1b) k=${MODEL_FROM_01B:-64} ;; 1b) k=${MODEL_FROM_1B:-32} ;; 3b) k=${MODEL_FROM_3B:-16} ;; esac
                    v=${variant%%_*}
                    sfx=${variant#"$v"}
                    a="${size}_${v}_${k}k$sfx" b="${size}_${v}_$((2 * k))k$sfx"
                    mem_case "$a" 1 && mem_case "$b" 1 || { status=1; echo "=== memory model: $size $variant: a run failed"; continue; }
                    python3 - "$total" "$k" "$OUT/memory_$a.smi" "$OUT/memory_$b.smi" "$size $variant" <<'PY'
import sys
total, k = int(sys.argv[1]), int(sys.argv[2])
p1, p2 = (max(int(l) for l in open(f) if l.strip()) for f in sys.argv[3:5])
per_k = (p2 - p1) / k                      # MiB per 1024 tokens
fixed = p1 - per_k * k
longest = (total - fixed) / per_k          # in units of 1024 tokens
pow2 = 1
while pow2 * 2 <= longest: pow2 *= 2
print("=== memory model: %s: peak %d MiB at %dK, %d MiB at %dK: %.1f MiB per 1K tokens + %.0f MiB; "
      "predicted to fit up to %.0fK tokens in %d MiB (longest power of two: %dK)"
      % (sys.argv[5], p1, k, p2, 2 * k, per_k, fixed, longest, total, pow2))
PY
                done
            done
        else
            # the longest context that fits, per model size and variant: contexts doubling from FIT_FROM_<size>
            # until one fails (one step each: the first step is the one with the highest peak, since the arena
            # and the scratch grow in it; its tokens/s include that warm-up). A run cut by MEM_TIMEOUT ends
            # the doubling without a verdict on its context.
            for size in ${FIT_SIZES:-0.1b 1b 3b}; do
                for variant in ${FIT_VARIANTS:-dense msa dense_offload_chunked_noshadow msa_offload_chunked_noshadow}; do
                    case $size in 0.1b) k=${FIT_FROM_01B:-128} ;; 1b) k=${FIT_FROM_1B:-64} ;; 3b) k=${FIT_FROM_3B:-16} ;; esac
                    fitted=none
                    while [ "$k" -le "${FIT_MAX_K:-2048}" ]; do
                        v=${variant%%_*}
                        sfx=${variant#"$v"}
                        mem_case "${size}_${v}_${k}k$sfx" 1 || break
                        fitted=${k}K
                        k=$((k * 2))
                    done
                    echo "=== longest context that fits: $size $variant: $fitted"
                done
            done
        fi
        ;;
    dist)
        stage "2 GPUs"
        nvidia-smi -L
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        two="mpirun -np 2 -x NCCL_NVLS_ENABLE=0 -x PATH -x LD_LIBRARY_PATH"
        tiny="configs/tiny.json --set train.device=cuda --set train.steps=10 --set train.log_every=1
              --set train.eval_batches=2 --set train.sample_tokens=0"
        # tests/test_dist_ep.c's MoE (no balance loss: each rank's would differ from the global one)
        moe="--set model.ffn=moe --set moe.num_experts=8 --set moe.experts_per_token=2 --set moe.expert_dim=32
             --set moe.shared_experts=1 --set moe.aux_loss_weight=0 --set moe.z_loss_weight=0.001
             --set moe.bias_update_rate=0.01"
        for p in "dp:" "ep:$moe --set dist.ep=2" "cp:--set dist.cp=2"; do
            name=${p%%:*}
            extra=${p#*:}
            echo "--- $name-2 vs 1 GPU"
            rm -rf /tmp/one_$name /tmp/two_$name
            # shellcheck disable=SC2086
            build/train $tiny ${extra/--set dist.*=2/} --set train.out_dir=/tmp/one_$name >"$OUT/dist_${name}_1.log" 2>&1 || status=1
            # shellcheck disable=SC2086
            $two build/train $tiny $extra --set train.out_dir=/tmp/two_$name >"$OUT/dist_${name}_2.log" 2>&1 || status=1
            cmp_losses /tmp/one_$name/metrics.jsonl /tmp/two_$name/metrics.jsonl || status=1
        done
        echo "--- DP scaling, ~1B dense model at 4K, 4 sequences per GPU"
        big="configs/shakespeare_gpu.json --set model.d_model=2048 --set model.n_layers=22 --set model.n_heads=32
             --set model.n_kv_heads=4 --set model.head_dim=64 --set model.ffn_dim=5632 --set model.dropout=0
             --set train.seq_len=4096 --set train.steps=8 --set train.log_every=1 --set train.eval_every=0
             --set train.eval_batches=1 --set train.sample_tokens=0"
        rm -rf /tmp/scale_1 /tmp/scale_2
        # shellcheck disable=SC2086
        build/train $big --set train.batch_size=4 --set train.out_dir=/tmp/scale_1 >"$OUT/scale_1.log" 2>&1 || status=1
        # shellcheck disable=SC2086
        $two build/train $big --set train.batch_size=8 --set train.out_dir=/tmp/scale_2 >"$OUT/scale_2.log" 2>&1 || status=1
        python3 -c 'import json,sys
t=[[json.loads(l)["tokens_per_s"] for l in open(f) if "tokens_per_s" in l][3:] for f in sys.argv[1:3]]
one,two=(sum(x)/len(x) for x in t)
print("  1 GPU %.0f tokens/s, 2 GPUs %.0f tokens/s: %.2fx (target 1.85x)" % (one,two,two/one))' \
            /tmp/scale_1/metrics.jsonl /tmp/scale_2/metrics.jsonl || status=1
        ;;
    cp-one-gpu)
        stage "sequence-split CP, 2 ranks on one GPU"
        nvidia-smi -L
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
        ranks="mpirun --allow-run-as-root --oversubscribe -x PATH -x LD_LIBRARY_PATH -x MSA_ATTENTION"
        two="$ranks -np 2"
        # one KV head: cp 2 exceeds it, as sequence mode is for; no evaluation (the losses of the logged steps)
        tiny="configs/tiny.json --set model.n_kv_heads=1 --set train.steps=10 --set train.log_every=1
              --set train.eval_every=0 --set train.eval_batches=1 --set train.sample_tokens=0"
        seq="--set dist.cp=2 --set dist.cp_mode=sequence"
        # the single process runs our own attention kernels, the ones the ring runs (not cuDNN's)
        export MSA_ATTENTION=own
        run_cp() { # name, ranks (1 or 2), device, extra settings...
            local name=$1 np=$2 dev=$3
            shift 3
            rm -rf "/tmp/cp1g_$name"
            local launch=""
            [ "$np" = 2 ] && launch=$two
            # shellcheck disable=SC2086
            $launch build/train $tiny --set train.device="$dev" "$@" --set train.out_dir="/tmp/cp1g_$name" \
                >"$OUT/cp1g_$name.log" 2>&1
        }
        echo "--- the split ops on device tensors against the CPU (build/tests/test_dist_cp --cuda)"
        for np in 2 4; do
            if $ranks -np $np build/tests/test_dist_cp --cuda >"$OUT/cp1g_ops_$np.log" 2>&1 &&
                [ "$(grep -c "cuda ok" "$OUT/cp1g_ops_$np.log")" = $np ]; then
                grep -E "^cp $np:" "$OUT/cp1g_ops_$np.log"
                echo "  PASS ($np ranks on one GPU)"
            else
                echo "  FAIL ($np ranks):"
                grep -E "error|FAIL|differs" "$OUT/cp1g_ops_$np.log" | head -10
                status=1
            fi
        done
        # one variant (name prefix, extra settings...): 1 and 2 ranks on CUDA and on the CPU, losses compared
        compare_cp() {
            local v=$1 ok=1
            shift
            run_cp "${v}cuda1" 1 cuda "$@" || ok=0
            # shellcheck disable=SC2086
            run_cp "${v}cuda2" 2 cuda $seq "$@" || ok=0
            run_cp "${v}cpu1" 1 cpu "$@" || ok=0
            # shellcheck disable=SC2086
            run_cp "${v}cpu2" 2 cpu $seq "$@" || ok=0
            grep -m1 "share a GPU" "$OUT/cp1g_${v}cuda2.log"
            if [ $ok = 1 ]; then
                local split_cuda bf16 split_cpu cross
                split_cuda=$(cmp_losses "/tmp/cp1g_${v}cuda1/metrics.jsonl" "/tmp/cp1g_${v}cuda2/metrics.jsonl" x)
                bf16=$(cmp_losses "/tmp/cp1g_${v}cuda1/metrics.jsonl" "/tmp/cp1g_${v}cpu1/metrics.jsonl" x)
                split_cpu=$(cmp_losses "/tmp/cp1g_${v}cpu1/metrics.jsonl" "/tmp/cp1g_${v}cpu2/metrics.jsonl" x)
                cross=$(cmp_losses "/tmp/cp1g_${v}cpu2/metrics.jsonl" "/tmp/cp1g_${v}cuda2/metrics.jsonl" x)
                echo "  max relative loss difference over 10 steps: CUDA cp 2 vs cp 1 $split_cuda; CUDA vs CPU at cp 1" \
                    "(bf16 vs fp32) $bf16; CPU cp 2 vs cp 1 $split_cpu; CUDA vs CPU at cp 2 $cross"
                # the split changes only the rounding of bf16 activations (the merges, the sums over ranks), so it
                # must stay within twice what bf16 rounding does to this run
                if python3 -c "import sys; sys.exit(0 if $split_cuda <= 2 * $bf16 else 1)"; then
                    echo "  PASS: CUDA cp 2 within 2 x (bf16 vs fp32) = $(python3 -c "print('%.3e' % (2 * $bf16))")"
                else
                    echo "  FAIL: CUDA cp 2 differs from cp 1 by more than 2 x (bf16 vs fp32)"
                    status=1
                fi
            else
                echo "  FAIL: a run failed:"
                tail -n 5 "$OUT"/cp1g_"${v}"*.log
                status=1
            fi
        }
        echo "--- dense layers"
        compare_cp ""
        # every layer MSA, 3 steps of dense warm-up (the ring attention, the dense KL over the gathered keys), then
        # the sparse phase (this rank's queries over the fetched blocks: query_index and key_rows in the kernels)
        echo "--- MSA layers"
        # shellcheck disable=SC2086
        compare_cp msa_ --set model.attention=msa --set model.msa_layers=1- --set msa.block_size=8 \
            --set msa.topk_blocks=3 --set msa.index_dim=16 --set msa.dense_warmup_steps=3
        # every layer a sliding window of 2 blocks of 8 and a sink block: the same kernels, with a fixed selection
        echo "--- sliding-window layers"
        compare_cp window_ --set model.attention=window --set model.msa_layers=1- --set msa.block_size=8 \
            --set msa.local_blocks=2 --set msa.init_blocks=1
        unset MSA_ATTENTION
        ;;
    ab)
        stage "ab: the tree, then AB_PATCH reversed"
        if [ ! -f "${AB_PATCH:-}" ]; then echo "ab: AB_PATCH names no file"; status=1; continue; fi
        ab_bench() {
            echo "--- $1"
            build/bench --only attention --sizes "${SIZES:-32768}" --heads "${AB_HEADS:-32/4/64}" | tee "$OUT/ab_$1.md" |
                grep -E "^\|" | grep -v "^|---"
        }
        ab_bench change
        # the tree is put back only when the reverse applied (a patch of the wrong direction would otherwise
        # be applied forward onto a tree that lacks it)
        if ! git apply -R "$AB_PATCH"; then echo "ab: AB_PATCH does not reverse on this tree"; status=1; continue; fi
        if $MAKE build/bench >>"$OUT/build.log" 2>&1; then
            ab_bench baseline
        else
            echo "ab: the baseline did not build"
            status=1
        fi
        git apply "$AB_PATCH"
        $MAKE >>"$OUT/build.log" 2>&1 || { echo "ab: the tree did not rebuild"; status=1; }
        ;;
    *)
        echo "unknown stage '$what'"
        exit 2
        ;;
    esac
done
exit $status
