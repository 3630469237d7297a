#!/usr/bin/env python3
"""A scaling model on paper: per-step communication volume and predicted step time of a model under
DP x EP x CP on many GPUs, from measured single-GPU compute and stated link bandwidths.

    .venv/bin/python tools/scaling_model.py --doc > docs/scaling.md        # the document (its tables)
    .venv/bin/python tools/scaling_model.py CONFIG.json [--contexts 32768,131072] [--gpus 8,64] [--json]

CONFIG is a config of build/train (its model, msa and moe sections matter; build/train --check-config
reads it, so every key has its default and a refused config is refused here with the trainer's message).
--doc writes the markdown of docs/scaling.md for the three configs of tools/scaling/ (the ~1.1B bench
model dense and with MSA, and an M3-shaped MSA + MoE model); the test suite checks that the committed
file is what it writes. --json prints one record per (context, GPU count) with every volume in bytes and
every time in seconds. The rules (what is measured, what is extrapolated, how layouts are chosen, which
communication overlaps which compute) are written in the document's text below (DOC_RULES), next to the
numbers they make.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tool_common, however the tool is started

from tool_common import ROOT, Fail, check_config, exit_with, report

# ---- measured single-GPU compute: docs/benchmarks.md, one H100 80GB HBM3 SXM (nvidia-h100-x1) -------------
# (a) the bench's 1.1B at 32K tokens, recompute on (commit bb0a2dd dense, e648fe1 MoE)
DENSE_32K_STEP_MS = 1695.0
MOE_32K_STEP_MS = 1922.0
MEASURED_TOKENS = 32768
# (c) per-op profile of the same model (commit 408d62a): dense attention's share of the dense 32K step, and
# the MSA 32K step (21 MSA layers and one dense) with the MSA ops' share (msa_kl 43.1 %, msa_attention
# 25.1 %, indexer + plan 3.3 %) and the dense layer 0's (1.8 %)
DENSE_ATTENTION_SHARE = 0.616
MSA_32K_STEP_MS = 2566.0
MSA_SHARE = 0.431 + 0.251 + 0.033
MSA_DENSE_LAYER_SHARE = 0.018
MEASURED_LAYERS, MEASURED_MSA_LAYERS = 22, 21
MEASURED_QUERY_WIDTH = 32 * 64  # H_q * head_dim of the measured model
# (b) one attention layer forward + backward (H_q 64, H_kv 4, d 128) at N tokens, ms: the context scaling
LAYER_MS_DENSE = {8192: 7.91, 32768: 116.16, 131072: 1923.91}
LAYER_MS_MSA = {8192: 33.62, 32768: 140.24, 131072: 594.66}

# ---- links, and the machines ----------------------------------------------------------------------------
NVLINK_BYTES_S = 900e9   # within a node of 8 GPUs
IB_BYTES_S = 400e9 / 8   # 400 Gb/s InfiniBand per GPU across nodes
GPUS_PER_NODE = 8
GPU_MEMORY_GB = 80
ACT_BYTES, GRAD_BYTES, MASTER_BYTES = 2, 4, 4  # bf16 activations; f32 gradients and master weights
MEASURED_CONTEXT_PER_GPU = 32768  # the 1.1B's 32K step fits one H100 with recompute (docs/benchmarks.md (a))

CONTEXTS = [32768, 131072, 1048576]
GPU_COUNTS = [8, 64, 512]
DOC_CONFIGS = [("1.1B dense", "tools/scaling/bench_1b.json"), ("1.1B MSA", "tools/scaling/bench_1b_msa.json"),
               ("M3-shaped MSA + MoE", "tools/scaling/m3_shape.json")]
CP16_CONTEXT = 196608  # the official MSA recipe's "192K / CP16" workload (../shared/msa_spec.md e.7)


# ---- the model's shape, from its config --------------------------------------------------------------------

def layer_set(selector, n_layers, key):
    """The layers a selector names (train/config.c's syntax: all, none, 3-, 1-4, 0,2,5, 0,3-5)."""
    if selector == "all":
        return set(range(n_layers))
    if selector == "none":
        return set()
    layers = set()
    for part in selector.split(","):
        lo, dash, hi = part.partition("-")
        try:
            a = int(lo)
            b = (int(hi) if hi else n_layers - 1) if dash else a
        except ValueError:
            raise Fail(f"{key} = \"{selector}\": not a layer selector")
        layers.update(range(a, min(b, n_layers - 1) + 1))
    return layers


class Shape:
    """What the scaling model needs of a config: dimensions, which layers are MSA and MoE, and the
    parameter counts (those the ranks hold alike, the routed experts, and per token active)."""

    def __init__(self, cfg, where):
        m, msa, moe = cfg["model"], cfg["msa"], cfg["moe"]
        if m["vocab_size"] <= 0:
            raise Fail(f"{where}: model.vocab_size is 0 (taken from the data at training time); the scaling model "
                       f"needs it in the config")
        self.d, self.layers, self.vocab = m["d_model"], m["n_layers"], m["vocab_size"]
        self.hq, self.hkv = m["n_heads"], m["n_kv_heads"]
        self.hd = m["head_dim"] or self.d // self.hq
        self.msa = layer_set(m["msa_layers"], self.layers, "model.msa_layers") if m["attention"] == "msa" else set()
        self.moe = layer_set(m["moe_layers"], self.layers, "model.moe_layers") if m["ffn"] == "moe" else set()
        self.block, self.topk, self.local = msa["block_size"], msa["topk_blocks"], msa["local_blocks"]
        self.idx_dim = msa["index_dim"]
        self.experts, self.k = moe["num_experts"], moe["experts_per_token"]
        d, hd = self.d, self.hd
        attention = 2 * d * self.hq * hd + 2 * d * self.hkv * hd
        attention += 2 * hd if m["qk_norm"] else 0
        attention += (self.hq + 2 * self.hkv) * hd if m["qkv_bias"] else 0
        index = d * self.hkv * self.idx_dim + d * self.idx_dim + 2 * self.idx_dim
        shared_dim = moe["shared_expert_dim"] or moe["expert_dim"]
        moe_shared = self.experts * d + moe["shared_experts"] * 3 * d * shared_dim
        expert_each = 3 * d * moe["expert_dim"]
        held = self.vocab * d * (1 if m["tie_embeddings"] else 2) + d  # embeddings, LM head, final norm
        ends = held
        self.expert_params = 0
        active = held
        for layer in range(self.layers):
            per = 2 * d + attention + (index if layer in self.msa else 0)
            if layer in self.moe:
                per += moe_shared
                self.expert_params += self.experts * expert_each
                active += self.k * expert_each
            else:
                per += 3 * d * m["ffn_dim"]
            held += per
            active += per
        self.held_params = held          # every parameter but the routed experts
        self.active_params = active      # per token (the routed experts it goes through)
        self.end_params = ends           # outside the blocks: their gradients are final only at the end

    def total_params(self):
        return self.held_params + self.expert_params


# ---- layouts -------------------------------------------------------------------------------------------------

def tokens_per_gpu_cap(s):
    """Context tokens one GPU holds: the 1.1B's measured 32K, scaled by the activation bytes per token that
    recomputation keeps (one d_model row per block)."""
    return MEASURED_CONTEXT_PER_GPU * (2048 * 22) // (s.d * s.layers)


def layout(s, n, gpus):
    """(dp, ep, cp) for context n on `gpus` GPUs: cp the smallest power of two that brings a GPU's share of
    the context under tokens_per_gpu_cap (at most every GPU); for MoE models every other rank
    expert-parallel up to the number of experts; the rest data parallel."""
    cp = 1
    while n // cp > tokens_per_gpu_cap(s) and cp < gpus:
        cp *= 2
    ep = 1
    if s.moe:
        while ep * 2 <= min(s.experts, gpus // cp):
            ep *= 2
    return gpus // (cp * ep), ep, cp


def cp_mode(s, cp):
    """head-parallel when cp divides the KV heads (an all-to-all over heads), else sequence-split."""
    return "heads" if s.hkv % cp == 0 else "sequence"


def members_per_node(group, stride):
    """Ranks of a group per node of GPUS_PER_NODE: ranks `stride` apart in the grid (cp fastest, then ep)."""
    return max(1, min(group, GPUS_PER_NODE // stride)) if stride <= GPUS_PER_NODE else 1


# ---- per-step communication volume per GPU (bytes sent) -----------------------------------------------------

def volumes(s, n, dp, ep, cp):
    """Bytes each GPU sends per step, by kind, for one sequence of n tokens per dp x ep row split over cp.
    Passes with recomputation: forward, the forward replayed in the backward, and the backward."""
    tokens = n // cp
    world = dp * ep * cp
    g0 = world if ep > 1 else dp * cp  # ZeRO group of the parameters every rank holds (train/trainer.c)
    g1 = dp * cp                       # ... of the routed experts
    v = {}
    region0 = s.held_params * (g0 - 1) / g0
    region1 = s.expert_params / ep * (g1 - 1) / g1
    v["dp_reduce_scatter_held"] = GRAD_BYTES * region0
    v["dp_reduce_scatter_experts"] = GRAD_BYTES * region1
    v["dp_all_gather_held"] = MASTER_BYTES * region0
    v["dp_all_gather_experts"] = MASTER_BYTES * region1
    # the embeddings', final norm's and LM head's share of region 0: final only at the end of the backward
    v["dp_reduce_scatter_at_end"] = GRAD_BYTES * s.end_params * (g0 - 1) / g0
    # every MoE layer: each token's k rows out to their experts' ranks and back (2 exchanges) per pass;
    # forward, replay, and backward (the two exchanges' gradients): 6
    v["ep_all_to_all"] = len(s.moe) * tokens * s.k * s.d * ACT_BYTES * (ep - 1) / ep * 6
    remote = (cp - 1) / cp
    attention_layers = s.layers - len(s.msa)
    v["cp_heads_all_to_all"] = v["cp_ring_kv"] = v["cp_index_keys"] = v["cp_block_fetch"] = 0.0
    if cp > 1 and cp_mode(s, cp) == "heads":
        width = (2 * s.hq + 2 * s.hkv) * s.hd  # q, k, v in and the output back
        per_layer = tokens * width * ACT_BYTES * remote * 3
        index_q = tokens * s.hkv * s.idx_dim * ACT_BYTES * remote * 3
        v["cp_heads_all_to_all"] = s.layers * per_layer + len(s.msa) * index_q
        v["cp_index_keys"] = len(s.msa) * (cp - 1) * tokens * s.idx_dim * ACT_BYTES * 3
    elif cp > 1:
        kv = 2 * s.hkv * s.hd
        # ring attention: every other rank's K/V pass through once per pass, dK/dV travel back in the backward
        v["cp_ring_kv"] = attention_layers * (cp - 1) * tokens * kv * ACT_BYTES * 4
        v["cp_index_keys"] = len(s.msa) * (cp - 1) * tokens * s.idx_dim * ACT_BYTES * 3
        # fetched in the forward and again in the replay, whose rows the backward reuses: it only returns dK/dV
        v["cp_block_fetch"] = len(s.msa) * fetched_pairs(s, n, cp) * block_pair_bytes(s) * 3
    return v


def fetched_pairs(s, n, cp):
    """(KV block, group) pairs a rank fetches from the others per MSA layer and pass: its query blocks'
    top-k selections (the forced local block is its own), as if the queries of one block selected alike,
    at most every block its queries see (half the sequence on average under causal load balancing), the
    share (cp - 1) / cp of them held by other ranks."""
    query_blocks = n // cp // s.block
    chosen = query_blocks * (s.topk - s.local) * s.hkv
    visible = n // 2 // s.block * s.hkv
    return min(chosen, visible) * (cp - 1) / cp


def block_pair_bytes(s):
    """K and V of one KV head over one block, and its 4-byte id."""
    return 2 * s.hd * s.block * ACT_BYTES + 4


# ---- compute, from the measurements ------------------------------------------------------------------------

def interpolate(table, n):
    """Per-token time of a measured layer at n tokens, relative to 32K: linear in n between the measured
    contexts, and outside them along the nearest interval's line."""
    points = sorted((k, v / k) for k, v in table.items())
    i = 0
    while i < len(points) - 2 and n > points[i + 1][0]:
        i += 1
    (a, fa), (b, fb) = points[i], points[i + 1]
    return (fa + (fb - fa) * (n - a) / (b - a)) / (table[32768] / 32768)


def reference_active_params():
    return Shape(check_config(os.path.join(ROOT, DOC_CONFIGS[0][1]), DOC_CONFIGS[0][1]), DOC_CONFIGS[0][1]).active_params


def compute_seconds(s, n, tokens, ref_active):
    """(step compute, its attention part) for `tokens` tokens of context n on one GPU, seconds."""
    us = 1e-3 / MEASURED_TOKENS  # ms per step -> s per token
    rest_dense = DENSE_32K_STEP_MS * (1 - DENSE_ATTENTION_SHARE) * us
    rest_moe = (MOE_32K_STEP_MS - DENSE_32K_STEP_MS * DENSE_ATTENTION_SHARE) * us
    dense_layer = DENSE_32K_STEP_MS * DENSE_ATTENTION_SHARE / MEASURED_LAYERS * us
    msa_layer = MSA_32K_STEP_MS * MSA_SHARE / MEASURED_MSA_LAYERS * us
    moe_share = len(s.moe) / s.layers
    rest = rest_dense * s.active_params / ref_active * (1 + (rest_moe / rest_dense - 1) * moe_share)
    width = s.hq * s.hd / MEASURED_QUERY_WIDTH
    dense_at_n = dense_layer * width * interpolate(LAYER_MS_DENSE, n)
    msa_at_n = msa_layer * width * interpolate(LAYER_MS_MSA, n)
    attention = (s.layers - len(s.msa)) * dense_at_n + len(s.msa) * msa_at_n
    return tokens * (rest + attention), tokens * (s.layers - len(s.msa)) * dense_at_n


# ---- time ----------------------------------------------------------------------------------------------------

def seconds(dp, ep, cp, v, compute, dense_attention):
    """Communication time per kind and the step time with the stated overlap."""
    world = dp * ep * cp

    def ring(bytes_, group, stride):  # the slowest link of the ring sets its pace
        if group == 1:
            return 0.0
        return bytes_ / (NVLINK_BYTES_S if members_per_node(group, stride) >= group else IB_BYTES_S)

    def pairwise(bytes_, group, stride):  # to each peer its share: the node's peers over NVLink, the rest IB
        if group == 1:
            return 0.0
        m = members_per_node(group, stride)
        return bytes_ * ((m - 1) / (group - 1) / NVLINK_BYTES_S + (group - m) / (group - 1) / IB_BYTES_S)

    g0 = world if ep > 1 else dp * cp
    # the dp * cp group of the experts: its cp ranks are neighbours, its dp ranks ep * cp apart
    g1_per_node = cp if cp >= GPUS_PER_NODE else cp * members_per_node(dp, ep * cp)
    g1_stride = 1 if g1_per_node >= dp * cp else GPUS_PER_NODE

    def zero(held, experts):
        return ring(held, g0, 1) + ring(experts, dp * cp, g1_stride)

    t = {"dp_reduce_scatter": zero(v["dp_reduce_scatter_held"], v["dp_reduce_scatter_experts"]),
         "dp_all_gather": zero(v["dp_all_gather_held"], v["dp_all_gather_experts"]),
         "ep_all_to_all": pairwise(v["ep_all_to_all"], ep, cp),
         "cp_heads_all_to_all": pairwise(v["cp_heads_all_to_all"], cp, 1),
         "cp_ring_kv": ring(v["cp_ring_kv"], cp, 1),
         "cp_index_keys": ring(v["cp_index_keys"], cp, 1),
         "cp_block_fetch": pairwise(v["cp_block_fetch"], cp, 1)}
    backward = 0.75 * compute
    at_end = ring(v["dp_reduce_scatter_at_end"], g0, 1)
    # the all-gather: the same buckets (embeddings, final norm, LM head) are waited for before the forward
    # starts, the blocks' buckets each before its block
    at_start = at_end * MASTER_BYTES / GRAD_BYTES
    exposed = {"dp_reduce_scatter": at_end + max(0.0, t["dp_reduce_scatter"] - at_end - backward),
               "dp_all_gather": at_start + max(0.0, t["dp_all_gather"] - at_start - (compute - backward)),
               "cp_ring_kv": max(0.0, t["cp_ring_kv"] - dense_attention)}
    for kind in ("ep_all_to_all", "cp_heads_all_to_all", "cp_index_keys", "cp_block_fetch"):
        exposed[kind] = t[kind]
    return t, exposed, compute + sum(exposed.values())


def model_state_gb(s, dp, ep, cp):
    """Weights (f32 and the bf16 copy), f32 gradients and the ZeRO-1 shard of the AdamW moments, per GPU."""
    world = dp * ep * cp
    g0 = world if ep > 1 else dp * cp
    held = s.held_params * (MASTER_BYTES + GRAD_BYTES + ACT_BYTES) + s.held_params * 8 / g0
    experts = s.expert_params / ep * (MASTER_BYTES + GRAD_BYTES + ACT_BYTES) + s.expert_params / ep * 8 / (dp * cp)
    return (held + experts) / 1e9


def predict(s, n, gpus, ref_active, forced=None):
    dp, ep, cp = forced or layout(s, n, gpus)
    tokens = n // cp
    v = volumes(s, n, dp, ep, cp)
    compute, dense_attention = compute_seconds(s, n, tokens, ref_active)
    t, exposed, step = seconds(dp, ep, cp, v, compute, dense_attention)
    return {"context": n, "gpus": dp * ep * cp, "dp": dp, "ep": ep, "cp": cp, "cp_mode": cp_mode(s, cp),
            "tokens_per_gpu": tokens, "over_activation_memory": tokens > tokens_per_gpu_cap(s),
            "model_state_gb": model_state_gb(s, dp, ep, cp), "bytes": v, "comm_seconds": t,
            "exposed_seconds": exposed, "compute_seconds": compute, "step_seconds": step,
            "tokens_per_second": dp * ep * n / step}


# ---- the document ----------------------------------------------------------------------------------------------

DOC_RULES = """\
# Scaling model: communication volume and step time at 8, 64 and 512 GPUs

Written by `tools/scaling_model.py --doc` (do not edit by hand; `tests/test_scaling_model.py` checks that
this file is what the tool writes). The models are the configs in `tools/scaling/`: the ~1.1B bench
model of `docs/benchmarks.md` (22 layers, d_model 2048, 32/4 heads of 64, SwiGLU 5632, vocab 32000,
untied), dense and with MSA on layers 1-21 (block 128, top-16, index dim 128), and an M3-shaped MSA +
MoE model (`../shared/msa_spec.md` d.1 and g: 41 layers, d_model 3072, attention 64/4/128, vocab 200K,
layers 0-2 dense attention and dense FFN, layers 3-40 MSA and MoE with 128 routed experts top-4 plus one
shared expert). The expert width is not published; 2048 makes the active parameters ~6B without the
embeddings, as the paper states, and the total comes to ~97B against the paper's ~109B. A prediction,
not a measurement: nothing here has run on more than one GPU.

## How it is computed

**Per step**: every data- and expert-parallel rank row takes one sequence of the context length N, split
over its cp ranks (N / cp tokens per GPU); every row assumes `train.recompute` (as the 32K measurements
did), so a block's forward runs twice.

**Layout** (DP x EP x CP = GPUs; the trainer's grid, cp ranks neighbours, then ep): cp is the smallest
power of two that brings N / cp under the tokens one GPU holds (the 1.1B's measured 32K, scaled by
2048 x 22 / (d_model x layers): recomputation keeps one d_model row per block and token), at most the
GPU count (then the row is marked *over memory*); MoE models make every remaining rank expert-parallel
up to the number of experts; the rest is data parallel. CP is head-parallel when cp divides the KV heads,
sequence-split otherwise (so at cp > 4 for both models here).

**Volumes** (bytes sent per GPU per step, ring algorithms; bf16 activations, f32 gradients and master
weights as the trainer keeps them):
- DP: ZeRO-1 reduce-scatter of the gradients, 4 B x (P_held (g0 - 1) / g0 + P_experts / ep (g1 - 1) / g1),
  and the same for the all-gather of the updated f32 weights; g0 = the world with expert parallelism, else
  dp x cp; g1 = dp x cp.
- EP: per MoE layer each token's k rows of d_model go to their experts' ranks and come back, (ep - 1) / ep
  of them off the GPU; forward, replay and backward: 6 exchanges.
- CP heads: per layer q, k, v and the output, (2 H_q + 2 H_kv) x head_dim per token, (cp - 1) / cp of it
  moved, 3 passes; MSA layers add the index queries (H_kv x d_idx) and the all-gather of the shared index
  key (d_idx per token).
- CP sequence: dense layers pass K/V around the ring (2 H_kv head_dim per token, cp - 1 shares; forward,
  replay, and the backward's K/V plus dK/dV: 4 passes); MSA layers all-gather the index keys (3 passes)
  and fetch the K/V blocks their queries selected: per layer and pass, the rank's query blocks x (top-k -
  local) x H_kv (block, group) pairs, as if the queries of one 128-token block chose alike (the low end:
  the high end is every visible block), at most the blocks its queries see (half the sequence on average
  under causal load balancing), (cp - 1) / cp of them remote, 2 x head_dim x block bf16 each; forward,
  replay (whose rows the backward reads), and the dK/dV returned: 3 passes (`autograd/op_cp_blocks.c`;
  it fetches a block with every KV head when any group selects it, which is more than this count when the
  groups choose different blocks).

**Links**: NVLink 900 GB/s per GPU within a node of 8, InfiniBand 400 Gb/s (50 GB/s) per GPU across
nodes, as sustained bandwidths (no latency term). A ring collective (reduce-scatter, all-gather, ring K/V)
runs at NVLink speed when its group lies in one node, else at the InfiniBand speed of its slowest hop; an
all-to-all or a block fetch sends each peer its share, the node's peers over NVLink and the others over
InfiniBand.

**Compute** (one H100 80GB HBM3 SXM, `docs/benchmarks.md`): the 1.1B dense step at 32K, 1695 ms for
32768 tokens ((a), commit bb0a2dd), is split by the per-op profile ((c), commit 408d62a: dense attention
61.6 %) into attention and the rest; the MSA step at 32K, 2566 ms ((c), 408d62a), gives an MSA layer's
time (msa_kl + msa_attention + indexer + plan, 71.5 % over 21 layers); the MoE step at 32K, 1922 ms ((a),
commit e648fe1), gives the slower rest of MoE layers (grouped GEMMs). The extrapolation rule: the rest
scales with the active parameters (the same achieved FLOP rate); attention per layer scales with H_q x
head_dim (the FLOPs of a query-key pair) and with the context as the one-layer measurements of (b) do
(per-token time linear in N between 8K, 32K and 128K, and along the 32K-128K line beyond: dense attention
grows ~4x per 4x context, MSA 6 % per 4x, its indexer's O(N) term). docs/benchmarks.md has no whole-model
64K measurement, so 32K is the only measured context of the step; the MSA numbers predate the MsaReplay
change and the KL folded into the attention backward (issue 14), both not yet timed on a GPU, so the MSA
rows are pessimistic.

**Overlap** (what the trainer does, `dist.bucket_mb` in README's distributed section): the ZeRO-1
reduce-scatter runs in buckets during the backward (3/4 of a step's compute with recomputation) and only
the buckets of the embedding, final norm and LM head (final at the very end) and whatever the backward
cannot cover are exposed; the all-gather of the updated weights is started after the update
and waited for in the next forward block by block, so the buckets outside the blocks (waited for before
the embedding) and whatever the forward (1/4 of the compute) cannot cover are exposed; the EP all-to-alls, the CP head all-to-alls, the
index-key all-gathers and the block fetches sit on the critical path of their layers (exposed); ring K/V
overlaps the attention of the previous chunk (exposed only beyond the dense layers' attention time).
Step time = compute + exposed communication.

Columns: *state* = weights (f32 and bf16), f32 gradients and the ZeRO-1 moment shard per GPU (activations
excluded; more than 80 GB does not fit an H100 with ZeRO-1); volumes in GB sent per GPU per step; *exposed*
= the communication time not hidden behind compute; *tok/s* = tokens of the whole job per second.
"""


def dp_bytes(b):
    return sum(b[k] for k in ("dp_reduce_scatter_held", "dp_reduce_scatter_experts", "dp_all_gather_held",
                              "dp_all_gather_experts"))


def fmt_gb(x):
    return f"{x / 1e9:.2f}"


def table(name, s, ref_active):
    rows = [f"\n### {name}: {s.total_params() / 1e9:.2f}B parameters, {s.active_params / 1e9:.2f}B active per "
            f"token\n",
            "| GPUs | context | DP x EP x CP (cp mode) | tokens/GPU | state GB | DP RS + AG GB | EP a2a GB | "
            "CP GB | compute s | exposed comm s | step s | tok/s | compute share |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in CONTEXTS:
        for gpus in GPU_COUNTS:
            p = predict(s, n, gpus, ref_active)
            b = p["bytes"]
            cp_bytes = b["cp_heads_all_to_all"] + b["cp_ring_kv"] + b["cp_index_keys"] + b["cp_block_fetch"]
            mode = f" ({p['cp_mode']})" if p["cp"] > 1 else ""
            notes = []
            if p["over_activation_memory"]:
                notes.append("over memory")
            if p["model_state_gb"] > GPU_MEMORY_GB:
                notes.append("state > 80 GB")
            flag = f" *{', '.join(notes)}*" if notes else ""
            exposed = sum(p["exposed_seconds"].values())
            rows.append(f"| {gpus} | {n // 1024}K | {p['dp']} x {p['ep']} x {p['cp']}{mode} | {p['tokens_per_gpu']} | "
                        f"{p['model_state_gb']:.1f}{flag} | {fmt_gb(dp_bytes(b))} | "
                        f"{fmt_gb(b['ep_all_to_all'])} | {fmt_gb(cp_bytes)} | {p['compute_seconds']:.2f} | "
                        f"{exposed:.3f} | {p['step_seconds']:.2f} | {p['tokens_per_second']:.0f} | "
                        f"{p['compute_seconds'] / p['step_seconds']:.0%} |")
    return "\n".join(rows) + "\n"


def cp16_section(models, ref_active):
    lines = ["\n## CP 16 at 192K\n",
             f"The official MSA recipe trains packs of {CP16_CONTEXT} tokens (192K) at context parallelism 16 "
             "(12,288 query tokens per rank; `../shared/msa_spec.md` e.7). CP 16 exceeds the 4 KV heads of both "
             "models, so it is sequence-split. What the model predicts, per GPU and step:\n",
             "| model | GPUs | DP x EP x CP | tokens/GPU | CP: index keys GB | CP: block fetch GB | CP: ring K/V GB | "
             "EP a2a GB | DP RS + AG GB | compute s | exposed comm s | step s | tok/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    predictions = []
    for name, s in models:
        if not s.msa:
            continue
        # the MoE model on 512 GPUs (every non-cp rank expert-parallel), the 1.1B on 64 (4 data-parallel rows)
        ep = min(s.experts, 512 // 16) if s.moe else 1
        dp = (512 // 16) // ep if s.moe else 4
        p = predict(s, CP16_CONTEXT, dp * ep * 16, ref_active, forced=(dp, ep, 16))
        predictions.append((name, p))
        b = p["bytes"]
        lines.append(f"| {name} | {dp * ep * 16} | {dp} x {ep} x 16 | {p['tokens_per_gpu']} | {fmt_gb(b['cp_index_keys'])} | "
                     f"{fmt_gb(b['cp_block_fetch'])} | {fmt_gb(b['cp_ring_kv'])} | {fmt_gb(b['ep_all_to_all'])} | "
                     f"{fmt_gb(dp_bytes(b))} | {p['compute_seconds']:.2f} | "
                     f"{sum(p['exposed_seconds'].values()):.3f} | {p['step_seconds']:.2f} | "
                     f"{p['tokens_per_second']:.0f} |")
    for name, s in models:
        if s.msa:
            q_blocks = CP16_CONTEXT // 16 // s.block
            lines.append(f"- {name}: a rank's {q_blocks} query blocks choose up to {q_blocks * (s.topk - s.local)} "
                         f"remote blocks per group, against the {CP16_CONTEXT // 2 // s.block} blocks its queries see "
                         f"on average: the block fetch is bounded by what is visible, i.e. it moves about as much as "
                         f"all-gathering the visible K/V would.")
    lines.append("\nCP 16 spans two nodes of 8, so the ring and the fetches run at InfiniBand speed. The index keys "
                 "are small (d_idx per token). Under this model a rank's selections cover fewer blocks than its "
                 "queries see only when cp > 2 (top-k - local) = 30: from CP 32 on, an MSA layer's fetch grows with "
                 "the rank's tokens instead of the context; below it, sequence-split MSA moves about what "
                 "all-gathered K/V would, and what it saves is the dense ring's attention over every block.\n")
    for name, p in predictions:
        e = p["exposed_seconds"]
        exposed = sum(e.values())
        cp = e["cp_ring_kv"] + e["cp_index_keys"] + e["cp_block_fetch"]
        lines.append(f"- {name}: {exposed:.2f} s of the {p['step_seconds']:.2f} s step is exposed communication "
                     f"({exposed / p['step_seconds']:.0%}): EP all-to-all {e['ep_all_to_all']:.2f} s, ZeRO-1 "
                     f"reduce-scatter + all-gather {e['dp_reduce_scatter'] + e['dp_all_gather']:.2f} s, the CP "
                     f"exchanges {cp:.2f} s.")
    return "\n".join(lines) + "\n"


def document():
    ref_active = reference_active_params()
    models = []
    for name, path in DOC_CONFIGS:
        models.append((name, Shape(check_config(os.path.join(ROOT, path), path), path)))
    parts = [DOC_RULES, "\n## Predictions\n"]
    for name, s in models:
        parts.append(table(name, s, ref_active))
    parts.append(cp16_section(models, ref_active))
    return "".join(parts)


def parse_list(text, what):
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise Fail(f"--{what} = \"{text}\": expected comma-separated whole numbers")
    if not values or any(x <= 0 for x in values):
        raise Fail(f"--{what} = \"{text}\": expected positive numbers")
    return values


def run(args):
    if args.doc:
        sys.stdout.write(document())
        return
    if not args.config:
        raise Fail("a config file is needed (or --doc)")
    s = Shape(check_config(args.config, args.config), args.config)
    ref_active = reference_active_params()
    records = [predict(s, n, g, ref_active) for n in parse_list(args.contexts, "contexts")
               for g in parse_list(args.gpus, "gpus")]
    if args.json:
        print(json.dumps({"held_params": s.held_params, "expert_params": s.expert_params,
                          "active_params": s.active_params, "records": records}, indent=1))
    else:
        for r in records:
            print(f"{r['gpus']} GPUs, {r['context']} tokens: dp {r['dp']} ep {r['ep']} cp {r['cp']} ({r['cp_mode']}), "
                  f"step {r['step_seconds']:.3f} s, compute {r['compute_seconds']:.3f} s, "
                  f"{r['tokens_per_second']:.0f} tok/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="a build/train config (JSON)")
    ap.add_argument("--doc", action="store_true", help="write docs/scaling.md's markdown to stdout")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="context lengths in tokens")
    ap.add_argument("--gpus", default=",".join(map(str, GPU_COUNTS)), help="GPU counts")
    ap.add_argument("--json", action="store_true", help="every volume (bytes) and time (seconds) as JSON")
    return report(run, ap.parse_args())


if __name__ == "__main__":
    exit_with(main())
