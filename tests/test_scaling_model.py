#!/usr/bin/env python3
"""tools/scaling_model.py: the per-step communication volumes of a tiny config (2 layers, layer 1 MSA and
MoE) against formulas worked out here by hand, at a head-parallel CP layout with expert parallelism and at
a sequence-split CP layout; a config without a vocabulary size is refused with one error line; and
docs/scaling.md is exactly what `tools/scaling_model.py --doc` writes (regenerate it after changing the
tool or its configs). Prints "N passed, N failed". Run with the project's virtual environment:
.venv/bin/python tests/test_scaling_model.py
"""
import json
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
from pyharness import expect_error_line  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TOOL = os.path.join(ROOT, "tools", "scaling_model.py")
TRAIN = os.path.join(ROOT, "build", "train")

TINY = {
    "model": {"vocab_size": 100, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 160,
              "tie_embeddings": True, "attention": "msa", "msa_layers": "1", "ffn": "moe", "moe_layers": "1"},
    "msa": {"block_size": 8, "topk_blocks": 3, "local_blocks": 1, "index_dim": 16},
    "moe": {"num_experts": 4, "experts_per_token": 2, "expert_dim": 32, "shared_experts": 1,
            "shared_expert_dim": 48},
}

# By hand, for TINY (head_dim 64 / 4 = 16):
#   attention: wq, wo 64 x 64 each, wk, wv 64 x 32 each                         = 12288
#   index (MSA layer 1): wq 64 x (2 x 16), wk 64 x 16, two norm gains of 16     = 3104
#   layer 0: 2 norms of 64 + attention + dense SwiGLU 3 x 64 x 160               = 43136
#   layer 1: 2 norms + attention + index + router 4 x 64 + shared 3 x 64 x 48    = 24992
#   tied embedding 100 x 64 and the final norm                                   = 6464
#   routed experts of layer 1: 4 x 3 x 64 x 32                                   = 24576
HELD = 6464 + 43136 + 24992
EXPERTS = 24576
ACTIVE = HELD + 2 * 3 * 64 * 32

def predict(work, contexts, gpus):
    path = os.path.join(work, "tiny.json")
    with open(path, "w") as f:
        json.dump(TINY, f)
    r = subprocess.run([PY, TOOL, path, "--contexts", contexts, "--gpus", gpus, "--json"], capture_output=True,
                       text=True)
    check(r.returncode == 0, f"the tool failed: {r.stderr}")
    return json.loads(r.stdout)


def expect_bytes(record, want):
    for key, value in want.items():
        got = record["bytes"][key]
        check(math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-6), f"{key}: the tool says {got}, by hand {value}")


@test
def parameter_counts_match_the_hand_count(work):
    out = predict(work, "16777216", "8")
    check(out["held_params"] == HELD and out["expert_params"] == EXPERTS and out["active_params"] == ACTIVE,
          f"params: held {out['held_params']} (hand {HELD}), experts {out['expert_params']} (hand {EXPERTS}), "
          f"active {out['active_params']} (hand {ACTIVE})")


@test
def head_parallel_layout_with_experts(work):
    # 16M tokens: one GPU holds 32768 x 2048 x 22 / (64 x 2) = 11,534,336 tokens, so cp = 2 (divides the 2 KV
    # heads: head-parallel), and the other 4 of 8 GPUs are expert-parallel (4 experts): dp 1
    r = predict(work, "16777216", "8")["records"][0]
    check((r["dp"], r["ep"], r["cp"], r["cp_mode"]) == (1, 4, 2, "heads"), f"layout {r}")
    tokens = 16777216 // 2
    expect_bytes(r, {
        # ZeRO-1: the held parameters over the world of 8, the experts (a quarter per ep rank) over dp x cp = 2
        "dp_reduce_scatter_held": 4 * HELD * 7 / 8,
        "dp_reduce_scatter_experts": 4 * (EXPERTS / 4) / 2,
        "dp_all_gather_held": 4 * HELD * 7 / 8,
        "dp_all_gather_experts": 4 * (EXPERTS / 4) / 2,
        # one MoE layer: k = 2 rows of 64 bf16 per token, 3/4 of them leave, 6 exchanges
        "ep_all_to_all": tokens * 2 * 64 * 2 * 3 / 4 * 6,
        # q, k, v, out = (8 + 4) heads of 16 per token on both layers, half moved, 3 passes; and the MSA
        # layer's index queries (2 x 16)
        "cp_heads_all_to_all": 2 * tokens * 12 * 16 * 2 / 2 * 3 + tokens * 2 * 16 * 2 / 2 * 3,
        # the index key (16 per token) all-gathered from the other rank, 3 passes
        "cp_index_keys": tokens * 16 * 2 * 3,
        "cp_ring_kv": 0, "cp_block_fetch": 0,
    })


@test
def sequence_split_layout(work):
    # 128M tokens on 8 GPUs: cp would need 16, gets all 8 (over memory); 8 does not divide 2 KV heads
    r = predict(work, "134217728", "8")["records"][0]
    check((r["dp"], r["ep"], r["cp"], r["cp_mode"], r["over_activation_memory"]) == (1, 1, 8, "sequence", True),
          f"layout {r}")
    n, tokens = 134217728, 134217728 // 8
    # the rank's 2,097,152 query blocks choose 2 remote blocks per group each: 8,388,608 (block, group) pairs,
    # fewer than the n / 2 / 8 x 2 groups = 16,777,216 pairs its queries see; 7/8 of them on other ranks
    chosen, visible = tokens // 8 * 2 * 2, n // 2 // 8 * 2
    pairs = min(chosen, visible) * 7 / 8
    expect_bytes(r, {
        # dp * cp = 8 ranks hold every parameter alike (no expert parallelism)
        "dp_reduce_scatter_held": 4 * HELD * 7 / 8,
        "dp_reduce_scatter_experts": 4 * EXPERTS * 7 / 8,
        "ep_all_to_all": 0,
        "cp_heads_all_to_all": 0,
        # the dense layer 0: K and V (2 heads of 16) of the 7 other ranks' tokens, 4 passes
        "cp_ring_kv": 7 * tokens * 64 * 2 * 4,
        "cp_index_keys": 7 * tokens * 16 * 2 * 3,
        # K and V of a head over a block (2 x 16 x 8 bf16) and its id, 3 passes (forward, replay, dK/dV back)
        "cp_block_fetch": pairs * (2 * 16 * 8 * 2 + 4) * 3,
    })


@test
def a_config_without_a_vocabulary_is_refused(work):
    path = os.path.join(work, "novocab.json")
    with open(path, "w") as f:
        json.dump({"model": {"d_model": 64}}, f)
    r = subprocess.run([PY, TOOL, path], capture_output=True, text=True)
    expect_error_line(r, path, "model.vocab_size")


@test
def docs_scaling_md_is_what_the_tool_writes(work):
    r = subprocess.run([PY, TOOL, "--doc"], capture_output=True, text=True)
    check(r.returncode == 0, f"--doc failed: {r.stderr}")
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        committed = f.read()
    if r.stdout != committed:
        a, b = committed.splitlines(), r.stdout.splitlines()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(f"docs/scaling.md differs from `tools/scaling_model.py --doc` at line {first + 1} "
                             f"(regenerate it): committed {a[first] if first < len(a) else '<end>'!r}, "
                             f"tool {b[first] if first < len(b) else '<end>'!r}")


def main():
    return pyharness.run(TESTS, "msa_test_scaling_model_", (TRAIN,))


if __name__ == "__main__":
    sys.exit(main())
