#!/usr/bin/env python3
"""Hugging Face import and export (tools/hf_import.py, tools/hf_export.py, build/forward).

Small random Llama-, Qwen2- (q/k/v biases, tied head) and Qwen3-style (q/k norm, head_dim !=
hidden/heads) models are written in Hugging Face format here (numpy + safetensors, no network),
imported, run through build/forward, and the logits compared with a float64 numpy forward of the same
HF weights written from the Hugging Face modeling code's semantics (not from our C code): relative
error < 1e-4; the same with each RoPE scaling (linear, dynamic, yarn with and without mscale terms,
llama3), whose frequencies and attention scaling hf_rope writes from the published definitions, and
whose rope_scaling block survives import -> export -> import. Also: every bad input (missing tensor, wrong shape, unsupported architecture or RoPE
scaling, partial rotary, corrupt, truncated or too deeply nested files, missing config key, unexpected
tensor, a model build/train would refuse) exits 1 with one error line naming it and writes nothing to
OUT_DIR; so does an OUT_DIR that is a file, unwritable or on a full disk, for both tools; export ->
import round trips are exact (f32) or bf16-rounded; an MSA import loads with fresh index parameters.
Prints "N passed, N failed".
Run with the project's virtual environment: .venv/bin/python tests/test_import.py
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
from pyharness import expect_error_line, run_constrained  # noqa: E402

import h5py
import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
IMPORT = os.path.join(ROOT, "tools", "hf_import.py")
EXPORT = os.path.join(ROOT, "tools", "hf_export.py")
FORWARD = os.path.join(ROOT, "build", "forward")
TRAIN = os.path.join(ROOT, "build", "train")
TOL = 1e-4

# ---- Hugging Face models, written here ------------------------------------------------------------

FAMILIES = {
    # Llama: untied head, default theta, sharded weights with an index
    "llama": dict(arch="LlamaForCausalLM", mtype="llama", V=61, C=32, L=2, Hq=4, Hkv=2, D=8, F=40, theta=10000.0,
                  eps=1e-5, tie=False, prf=None, bias=False, qk_norm=False, shards=2),
    # Qwen2: q/k/v biases, tied head, large theta
    "qwen2": dict(arch="Qwen2ForCausalLM", mtype="qwen2", V=53, C=24, L=2, Hq=6, Hkv=2, D=4, F=36, theta=1e6,
                  eps=1e-6, tie=True, prf=None, bias=True, qk_norm=False, shards=1),
    # Qwen3: per-head q/k RMSNorm, head_dim 16 != C/Hq = 8
    "qwen3": dict(arch="Qwen3ForCausalLM", mtype="qwen3", V=47, C=32, L=3, Hq=4, Hkv=1, D=16, F=48, theta=5e5,
                  eps=1e-6, tie=False, prf=None, bias=False, qk_norm=True, shards=1),
}


def make_hf(path, family, seed=0, **over):
    """Writes config.json and safetensors weights of a random model; returns (config, tensors)."""
    s = dict(FAMILIES[family])
    s.update(over)
    rng = np.random.default_rng(seed)
    V, C, L, Hq, Hkv, D, F = (s[k] for k in ("V", "C", "L", "Hq", "Hkv", "D", "F"))

    def w(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gain(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, C, std=1.0)}
    for l in range(L):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = gain(C)
        t[p + "self_attn.q_proj.weight"] = w(Hq * D, C)
        t[p + "self_attn.k_proj.weight"] = w(Hkv * D, C)
        t[p + "self_attn.v_proj.weight"] = w(Hkv * D, C)
        t[p + "self_attn.o_proj.weight"] = w(C, Hq * D)
        if s["bias"]:
            t[p + "self_attn.q_proj.bias"] = w(Hq * D, std=0.5)
            t[p + "self_attn.k_proj.bias"] = w(Hkv * D, std=0.5)
            t[p + "self_attn.v_proj.bias"] = w(Hkv * D, std=0.5)
        if s["qk_norm"]:
            t[p + "self_attn.q_norm.weight"] = gain(D)
            t[p + "self_attn.k_norm.weight"] = gain(D)
        t[p + "post_attention_layernorm.weight"] = gain(C)
        t[p + "mlp.gate_proj.weight"] = w(F, C)
        t[p + "mlp.up_proj.weight"] = w(F, C)
        t[p + "mlp.down_proj.weight"] = w(C, F)
    t["model.norm.weight"] = gain(C)
    if not s["tie"]:
        t["lm_head.weight"] = w(V, C)

    cfg = {
        "architectures": [s["arch"]],
        "model_type": s["mtype"],
        "vocab_size": V,
        "hidden_size": C,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": Hq,
        "num_key_value_heads": Hkv,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": s["eps"],
        "rope_theta": s["theta"],
        "rope_scaling": None,
        "tie_word_embeddings": s["tie"],
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
    if D != C // Hq or family == "qwen3":
        cfg["head_dim"] = D
    if s["prf"] is not None:
        cfg["partial_rotary_factor"] = s["prf"]
    if family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=4096, max_window_layers=L)
    if family in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    write_hf(path, cfg, t, s["shards"])
    return cfg, t


def write_hf(path, cfg, tensors, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


# ---- the reference: the Hugging Face forward, in float64 numpy --------------------------------------

def hf_rope(cfg, dim, T):
    """(inv_freq, attention scaling) of a sequence of T tokens, from the published definitions of the
    Hugging Face rope_type (transformers' modeling_rope_utils.py; YaRN: Peng et al. 2023, arXiv
    2309.00071; dynamic NTK: /u/bloc97 and /u/emozilla; llama3: Meta's Llama 3.1 reference code),
    written here from those definitions, not from msa-train's C code."""
    spec = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = spec.get("rope_type", spec.get("type", "default"))
    base = cfg.get("rope_theta", spec.get("rope_theta"))
    idx = np.arange(0, dim, 2, dtype=np.float64)
    plain = 1.0 / base ** (idx / dim)
    if kind == "default":
        return plain, 1.0
    s = spec["factor"]
    if kind == "linear":  # positions divided by s
        return plain / s, 1.0
    if kind == "dynamic":  # the base grows once the sequence outruns the trained context
        L = cfg["max_position_embeddings"]
        seq = max(T, L)
        b = base * (s * seq / L - (s - 1)) ** (dim / (dim - 2))
        return 1.0 / b ** (idx / dim), 1.0
    if kind == "llama3":
        L, lo, hi = spec["original_max_position_embeddings"], spec["low_freq_factor"], spec["high_freq_factor"]
        out = []
        for f in plain:
            wavelen = 2 * np.pi / f
            if wavelen < L / hi:  # high frequencies: unchanged
                out.append(f)
            elif wavelen > L / lo:  # low frequencies: interpolated by s
                out.append(f / s)
            else:  # the band between: a smooth mix
                smooth = (L / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / s + smooth * f)
        return np.array(out), 1.0
    assert kind == "yarn", kind
    L = spec.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    fast, slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

    def dim_of(rotations):  # the dimension whose frequency turns `rotations` times over L
        return dim * np.log(L / (rotations * 2 * np.pi)) / (2 * np.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if spec.get("truncate", True):
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)  # 0: extrapolate, 1: interpolate
    inv_freq = plain / s * ramp + plain * (1 - ramp)

    def mscale(m):
        return 1.0 if s <= 1 else 0.1 * m * np.log(s) + 1.0

    if spec.get("attention_factor"):
        att = spec["attention_factor"]
    elif spec.get("mscale") and spec.get("mscale_all_dim"):
        att = mscale(spec["mscale"]) / mscale(spec["mscale_all_dim"])
    else:
        att = mscale(1)
    return inv_freq, att


def hf_reference_logits(cfg, t, ids):
    """Logits [T, V] of the HF model (LlamaForCausalLM / Qwen2 / Qwen3 modeling semantics)."""
    g = {k: v.astype(np.float64) for k, v in t.items()}
    C, Hq = cfg["hidden_size"], cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads", Hq)
    D = cfg.get("head_dim") or C // Hq
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)

    def rms_norm(x, weight):  # LlamaRMSNorm: weight * x / sqrt(mean(x^2) + eps)
        return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    # rotary embedding over the whole head: emb = cat(freqs, freqs) of the (scaled) inverse frequencies,
    # cos and sin times the attention scaling; the four families' modeling code has no partial rotary
    # (hf_import refuses the factor)
    inv_freq, attention_scaling = hf_rope(cfg, D, T)
    freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :] * attention_scaling, np.sin(emb)[:, None, :] * attention_scaling

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return np.concatenate([-x2, x1], axis=-1)

    def apply_rope(x):  # [T, H, D]
        return x * cos + rotate_half(x) * sin

    def linear(x, name):
        y = x @ g[name + ".weight"].T
        return y + g[name + ".bias"] if name + ".bias" in g else y

    h = g["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        x = rms_norm(h, g[p + "input_layernorm.weight"])
        q = linear(x, p + "self_attn.q_proj").reshape(T, Hq, D)
        k = linear(x, p + "self_attn.k_proj").reshape(T, Hkv, D)
        v = linear(x, p + "self_attn.v_proj").reshape(T, Hkv, D)
        if p + "self_attn.q_norm.weight" in g:  # Qwen3: per-head norm before RoPE
            q = rms_norm(q, g[p + "self_attn.q_norm.weight"])
            k = rms_norm(k, g[p + "self_attn.k_norm.weight"])
        q, k = apply_rope(q), apply_rope(k)
        rep = Hq // Hkv  # repeat_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", probs, v).reshape(T, Hq * D)
        h = h + linear(att, p + "self_attn.o_proj")
        x = rms_norm(h, g[p + "post_attention_layernorm.weight"])
        gate, up = linear(x, p + "mlp.gate_proj"), linear(x, p + "mlp.up_proj")
        h = h + linear(gate / (1.0 + np.exp(-gate)) * up, p + "mlp.down_proj")
    h = rms_norm(h, g["model.norm.weight"])
    head = g["lm_head.weight"] if "lm_head.weight" in g else g["model.embed_tokens.weight"]
    return h @ head.T


# ---- running the tools -------------------------------------------------------------------------------

def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def must(cmd):
    r = run(cmd)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def hf_import(hf, out, *extra):
    return must([PY, IMPORT, hf, out, *extra])


def forward(out_dir, ids, work):
    tok = os.path.join(work, "tokens.h5")
    with h5py.File(tok, "w") as f:
        f.create_dataset("tokens", data=np.asarray(ids, dtype=np.int32))
    logits = os.path.join(work, "logits.h5")
    must([FORWARD, os.path.join(out_dir, "config.json"), os.path.join(out_dir, "ckpt_import.h5"), tok, logits])
    with h5py.File(logits, "r") as f:
        return f["logits"][()]


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_params(path):
    with h5py.File(path, "r") as f:
        return {k: f["params"][k][()] for k in f["params"]}


# ---- tests -------------------------------------------------------------------------------------------

def import_matches_reference(work, family, T=20):
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    cfg, t = make_hf(hf, family, seed={"llama": 11, "qwen2": 12, "qwen3": 13}[family])
    hf_import(hf, out)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], T)
    ours = forward(out, ids, work)
    ref = hf_reference_logits(cfg, t, ids)
    check(ours.shape == ref.shape, f"logits shape {ours.shape}, want {ref.shape}")
    err = rel_err(ours, ref)
    check(err < TOL, f"{family}: relative error {err:.3e} of the logits against the HF reference")
    return cfg, out


@test
def llama_sharded_logits_match_hf(work):
    _, out = import_matches_reference(work, "llama")
    with open(os.path.join(out, "config.json")) as f:
        m = json.load(f)["model"]
    check(m["qk_norm"] is False and m["qkv_bias"] is False and m["tie_embeddings"] is False, f"flags: {m}")
    check("lm_head" in read_params(os.path.join(out, "ckpt_import.h5")), "no lm_head in the checkpoint")


@test
def qwen2_biases_tied_logits_match_hf(work):
    _, out = import_matches_reference(work, "qwen2")
    with open(os.path.join(out, "config.json")) as f:
        m = json.load(f)["model"]
    check(m["qkv_bias"] is True and m["tie_embeddings"] is True, f"flags: {m}")
    p = read_params(os.path.join(out, "ckpt_import.h5"))
    check("layers.1.attn.bk" in p and "lm_head" not in p, f"params: {sorted(p)}")


@test
def qwen3_qk_norm_logits_match_hf(work):
    _, out = import_matches_reference(work, "qwen3")
    with open(os.path.join(out, "config.json")) as f:
        m = json.load(f)["model"]
    check(m["qk_norm"] is True and m["head_dim"] == 16 and m["rotary_dim"] == 0 and m["d_model"] == 32, f"{m}")


@test
def checkpoint_attributes(work):
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    make_hf(hf, "llama")
    hf_import(hf, out)
    with h5py.File(os.path.join(out, "ckpt_import.h5"), "r") as f:
        check(f.attrs["format"] == "msa-train-checkpoint" and int(f.attrs["version"]) == 2, "format/version")
        # every tensor's crc32 is zlib's CRC-32 of its little-endian float32 bytes (train/checkpoint.h)
        check(all(int(d.attrs["crc32"]) == zlib.crc32(np.ascontiguousarray(d[()], "<f4").data)
                  for d in f["params"].values()), "crc32 attributes")
        check(int(f.attrs["step"]) == 0, "step")
        check(set(f.keys()) == {"params"}, f"groups {set(f.keys())}: an import has parameters only")
        stored = json.loads(f.attrs["config"])
        check(all(f["params"][k].dtype == np.float32 for k in f["params"]), "params must be f32")
    with open(os.path.join(out, "config.json")) as f:
        check(json.load(f) == stored, "the stored config differs from config.json")
    check(sorted(os.listdir(out)) == ["ckpt_import.h5", "config.json"], f"files: {os.listdir(out)}")


@test
def mistral_bf16_weights(work):
    """Mistral naming (= Llama) with bf16 safetensors, written by our exporter and read by the importer."""
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    cfg, t = make_hf(hf, "llama", arch="MistralForCausalLM", mtype="mistral", shards=1)
    hf_import(hf, out)
    bf = os.path.join(work, "hf_bf16")
    must([PY, EXPORT, os.path.join(out, "ckpt_import.h5"), bf, "--dtype", "bf16", "--arch", "mistral"])
    with open(os.path.join(bf, "config.json")) as f:
        check(json.load(f)["architectures"] == ["MistralForCausalLM"], "architecture")
    out2 = os.path.join(work, "out2")
    hf_import(bf, out2)
    p = read_params(os.path.join(out2, "ckpt_import.h5"))
    a, ref = p["layers.1.attn.wq"], t["model.layers.1.self_attn.q_proj.weight"]
    check(np.all((a.view(np.uint32) & 0xFFFF) == 0), "bf16 values must have zero low mantissa bits")
    check(np.all(np.abs(a - ref) <= np.abs(ref) * 2.0 ** -8), "bf16 rounding error above half an ulp")
    check(np.any(a != ref), "bf16 export did not round")


@test
def export_round_trip_is_exact(work):
    for family in ("llama", "qwen2", "qwen3"):
        d = os.path.join(work, family)
        hf, out, hf2, out2 = (os.path.join(d, n) for n in ("hf", "out", "hf2", "out2"))
        cfg, t = make_hf(hf, family, seed=5)
        hf_import(hf, out)
        must([PY, EXPORT, os.path.join(out, "ckpt_import.h5"), hf2])
        back = load_file(os.path.join(hf2, "model.safetensors"))  # the safetensors library reads it
        check(sorted(back) == sorted(t), f"{family}: exported names differ: {sorted(set(back) ^ set(t))}")
        for n in t:
            check(np.array_equal(back[n], t[n]), f"{family}: {n} changed in the round trip")
        with open(os.path.join(hf2, "config.json")) as f:
            c2 = json.load(f)
        check(c2["architectures"] == cfg["architectures"], f"{family}: architecture {c2['architectures']}")
        hf_import(hf2, out2)
        p1, p2 = read_params(os.path.join(out, "ckpt_import.h5")), read_params(os.path.join(out2, "ckpt_import.h5"))
        check(sorted(p1) == sorted(p2), f"{family}: parameter names differ")
        for n in p1:
            check(np.array_equal(p1[n], p2[n]), f"{family}: {n} differs after import -> export -> import")
        with open(os.path.join(out, "config.json")) as f1, open(os.path.join(out2, "config.json")) as f2:
            check(json.load(f1) == json.load(f2), f"{family}: config.json differs after the round trip")


# Small contexts (rope_original_max_position) against the 20-token test sequence and head dims of 8 to 16,
# so that each scaling's bands all hold some of the frequencies and dynamic's sequence outruns its context.
ROPE_CASES = {
    "linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 3.0}}),
    "dynamic": ("qwen2", {"max_position_embeddings": 8, "rope_scaling": {"type": "dynamic", "factor": 2.5}}),
    "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 16.0, "original_max_position_embeddings": 512}}),
    # Qwen2.5's YaRN block (factor 4 over 32768 there), as transformers 5 writes it: rope_parameters
    "yarn": ("qwen2", {"rope_scaling": None,
                       "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                           "original_max_position_embeddings": 512}}),
    # DeepSeek-style mscale terms, untruncated ramp, beta 16/2
    "yarn_mscale": ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 16.0, "beta_fast": 16, "beta_slow": 2,
                                               "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False,
                                               "original_max_position_embeddings": 1024}}),
    "yarn_attention_factor": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                         "attention_factor": 1.3}}),
}


def rope_case(work, name, seed=21):
    family, edit = ROPE_CASES[name]
    hf = os.path.join(work, name, "hf")
    cfg, t = make_hf(hf, family, seed=seed)
    cfg.update(edit)
    shutil.rmtree(hf)
    write_hf(hf, cfg, t)
    return hf, cfg, t


@test
def rope_scaling_logits_match_hf(work):
    """Every rope_type: the imported model's logits (build/forward, positions 0..19) against the numpy
    forward with hf_rope's frequencies and attention scaling, and different from the unscaled model's."""
    ids = np.random.default_rng(3).integers(0, 40, 20)
    for name in ROPE_CASES:
        hf, cfg, t = rope_case(work, name)
        out = os.path.join(work, name, "out")
        hf_import(hf, out)
        ref = hf_reference_logits(cfg, t, ids)
        err = rel_err(forward(out, ids, work), ref)
        check(err < TOL, f"{name}: relative error {err:.3e} of the logits against the HF reference")
        plain = dict(cfg, rope_scaling=None, rope_parameters=None)
        plain["rope_theta"] = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
        moved = rel_err(hf_reference_logits(plain, t, ids), ref)
        check(moved > 1e-3, f"{name}: the scaling changes the logits by only {moved:.3e}; the case tests nothing")


@test
def rope_scaling_round_trips(work):
    """import -> export -> import keeps every rope_* key, and the exported config.json carries the
    rope_scaling block transformers reads (the same frequencies: hf_rope of both agree)."""
    for name in ROPE_CASES:
        hf, cfg, t = rope_case(work, name)
        out, hf2, out2 = (os.path.join(work, name, n) for n in ("out", "hf2", "out2"))
        hf_import(hf, out)
        must([PY, EXPORT, os.path.join(out, "ckpt_import.h5"), hf2])
        with open(os.path.join(hf2, "config.json")) as f:
            c2 = json.load(f)
        D = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        for T in (20, 5000):  # below and above every context here (dynamic changes with T)
            (f1, a1), (f2, a2) = hf_rope(cfg, D, T), hf_rope(c2, D, T)
            check(np.allclose(f1, f2, rtol=1e-6) and abs(a1 - a2) < 1e-6,
                  f"{name}: the exported rope_scaling {c2['rope_scaling']} gives other frequencies at T={T}")
        hf_import(hf2, out2)
        with open(os.path.join(out, "config.json")) as f1, open(os.path.join(out2, "config.json")) as f2:
            m1, m2 = json.load(f1)["model"], json.load(f2)["model"]
        check(m1 == m2, f"{name}: model section differs after import -> export -> import: {m1} vs {m2}")
        check(m1["rope_scaling"] == name.split("_")[0], f"{name}: model.rope_scaling = {m1['rope_scaling']}")


@test
def rope_scaling_bad_values_name_the_key(work):
    cases = (
        ("no_low", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64}, ['needs "low_freq_factor"']),
        ("factor_below_1", {"rope_type": "linear", "factor": 0.5}, ["rope_scaling.factor = 0.5", ">= 1"]),
        ("factor_string", {"rope_type": "yarn", "factor": "4"}, ['"rope_scaling.factor"', "positive number"]),
        ("band", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                  "original_max_position_embeddings": 64},
         ["model.rope_high_freq_factor = 1", "model.rope_low_freq_factor = 4", "rope_scaling.high_freq_factor"]),
        ("truncate", {"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, ["rope_scaling.truncate", "true or false"]),
    )
    for name, spec, needles in cases:
        hf = mutate(work, name, cfg_edit=lambda c: c.update(rope_scaling=spec))
        expect_fail(work, hf, ["config.json"] + needles)
    # our side: a config whose scaling lacks what it needs, or with an unknown type, names the key
    for assignment, needles in (("model.rope_scaling=yarn", ["model.rope_original_max_position", "yarn"]),
                                ("model.rope_scaling=ntk", ["model.rope_scaling", "none, linear, dynamic"]),
                                ("model.rope_factor=0.5", ["model.rope_factor = 0.5", "out of range"])):
        r = run([TRAIN, "--check-config", os.path.join(ROOT, "configs", "tiny.json"), "--set", assignment])
        expect_error_line(r, *needles)


@test
def msa_import_loads_with_fresh_index(work):
    hf = os.path.join(work, "hf")
    cfg, t = make_hf(hf, "llama", seed=3)
    ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], 24)
    ref = hf_reference_logits(cfg, t, ids)
    # blocks of 16, budget 2: a 24-token sequence has 2 blocks, all selected: exactly dense attention
    out = os.path.join(work, "msa_all")
    hf_import(hf, out, "--attention", "msa", "--msa-layers", "1-", "--block-size", "16", "--topk-blocks", "2",
              "--index-dim", "8")
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    check(c["model"]["attention"] == "msa" and c["model"]["msa_layers"] == "1-", f"model: {c['model']}")
    check(c["msa"] == {"block_size": 16, "topk_blocks": 2, "index_dim": 8}, f"msa: {c['msa']}")
    check(not any(".index." in n for n in read_params(os.path.join(out, "ckpt_import.h5"))),
          "the import must leave the index parameters to a fresh initialisation")
    err = rel_err(forward(out, ids, work), ref)
    check(err < TOL, f"MSA with every block selected: relative error {err:.3e} against dense HF")
    # blocks of 4, budget 2: sparse; loads and gives finite logits that differ from dense
    out = os.path.join(work, "msa_sparse")
    hf_import(hf, out, "--attention", "msa", "--msa-layers", "all", "--block-size", "4", "--topk-blocks", "2",
              "--index-dim", "8")
    ours = forward(out, ids, work)
    check(ours.shape == ref.shape and np.all(np.isfinite(ours)), "sparse MSA logits")
    check(rel_err(ours, ref) > 1e-3, "sparse MSA gave dense logits")
    # a trained MSA checkpoint carries index parameters: export drops them
    ck = os.path.join(out, "ckpt_import.h5")
    with h5py.File(ck, "a") as f:
        for l in range(cfg["num_hidden_layers"]):
            wq = np.ones((2 * 8, 32), np.float32)
            f["params"].create_dataset(f"layers.{l}.index.wq", data=wq).attrs["crc32"] = np.uint32(zlib.crc32(wq.data))
    check(forward(out, ids, work).shape == ref.shape, "forward with index parameters present")
    hf2 = os.path.join(work, "hf2")
    r = must([PY, EXPORT, ck, hf2])
    check("dropped 2 MSA index tensors" in r.stdout, r.stdout)
    back = load_file(os.path.join(hf2, "model.safetensors"))
    check(sorted(back) == sorted(t) and all(np.array_equal(back[n], t[n]) for n in t), "export of the backbone")


@test
def train_starts_from_the_import(work):
    """build/train runs from an imported checkpoint (train.init_from), dense and with fresh MSA indexers."""
    hf = os.path.join(work, "hf")
    cfg, _ = make_hf(hf, "qwen2", seed=4)
    data = os.path.join(work, "tokens.h5")
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], 400).astype(np.int32)
    with h5py.File(data, "w") as f:
        f.create_dataset("tokens", data=ids)
        f.create_dataset("doc_offsets", data=np.array([0, 150, 400], np.int64))
        f.attrs["vocab_size"] = np.int32(cfg["vocab_size"])
        f.attrs["tokenizer"] = "test"
    for name, extra in (("dense", []), ("msa", ["--attention", "msa", "--msa-layers", "1-", "--block-size", "4",
                                                 "--topk-blocks", "2", "--index-dim", "8"])):
        out = os.path.join(work, name)
        hf_import(hf, out, *extra)
        r = must([TRAIN, os.path.join(out, "config.json"), "--set", f"data.train_path={data}", "--set",
                  f"data.val_path={data}", "--set", f"train.init_from={os.path.join(out, 'ckpt_import.h5')}",
                  "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=16", "--set",
                  "train.eval_batches=1", "--set", "optim.warmup_steps=1"])
        check("step     2/2" in r.stdout and "nan" not in r.stdout, f"{name}: {r.stdout}")


def expect_fail(work, hf, needles, *extra):
    """The import exits 1 with one error line naming each needle, and neither a new OUT_DIR (two levels
    below a folder that does not exist) nor an existing one gets a file."""
    for existing in (False, True):
        out = os.path.join(work, "out_existing" if existing else "out_new/nested")
        if existing:
            os.makedirs(out, exist_ok=True)
        r = run([PY, IMPORT, hf, out, *extra])
        expect_error_line(r, *needles)
        if existing:
            check(os.listdir(out) == [], f"files left in OUT_DIR: {os.listdir(out)}")
        else:
            check(not os.path.exists(os.path.dirname(out)), "OUT_DIR or its parent was created")
    return r.stderr


def mutate(work, name, family="llama", cfg_edit=None, t_edit=None, shards=1):
    hf = os.path.join(work, name)
    cfg, t = make_hf(hf, family, shards=shards)
    if cfg_edit or t_edit:
        if cfg_edit:
            cfg_edit(cfg)
        if t_edit:
            t_edit(t)
        shutil.rmtree(hf)
        write_hf(hf, cfg, t, shards)
    return hf


@test
def bad_inputs_fail_cleanly(work):
    hf = mutate(work, "missing", t_edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_fail(work, hf, ["missing tensor", "model.layers.1.mlp.up_proj.weight"])

    def bad_shape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((12, 32), np.float32)
    hf = mutate(work, "shape", t_edit=bad_shape)
    expect_fail(work, hf, ["shape mismatch", "model.layers.0.self_attn.k_proj.weight", "[12, 32]", "[16, 32]",
                           "model.safetensors"])

    def extra(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    hf = mutate(work, "unexpected", t_edit=extra)
    expect_fail(work, hf, ["unexpected tensor", "model.layers.0.self_attn.o_proj.bias"])

    hf = mutate(work, "arch", cfg_edit=lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    expect_fail(work, hf, ["unsupported architecture", "GPT2LMHeadModel", "config.json"])

    hf = mutate(work, "rope", cfg_edit=lambda c: c.update(rope_scaling={"rope_type": "longrope", "factor": 8.0}))
    expect_fail(work, hf, ["unsupported rope_scaling type", "longrope", "config.json"])

    hf = mutate(work, "key", cfg_edit=lambda c: c.pop("intermediate_size"))
    expect_fail(work, hf, ["missing config key", "intermediate_size"])

    # corrupt safetensors: garbage header, truncated data, in a shard of a sharded model
    hf = mutate(work, "garbage")
    with open(os.path.join(hf, "model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\x00not json at all")
    expect_fail(work, hf, ["model.safetensors", "corrupt"])
    hf = mutate(work, "truncated", shards=2)
    shard = os.path.join(hf, "model-00002-of-00002.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 100)
    expect_fail(work, hf, ["model-00002-of-00002.safetensors", "truncated"])
    hf = mutate(work, "tiny")
    with open(os.path.join(hf, "model.safetensors"), "wb") as f:
        f.write(b"abc")
    expect_fail(work, hf, ["model.safetensors", "not a safetensors file"])
    # an index naming a shard that is not there
    hf = mutate(work, "noshard", shards=2)
    os.unlink(os.path.join(hf, "model-00001-of-00002.safetensors"))
    expect_fail(work, hf, ["model-00001-of-00002.safetensors", "missing"])
    # no weights at all, and a bad MSA option
    hf = mutate(work, "noweights")
    os.unlink(os.path.join(hf, "model.safetensors"))
    expect_fail(work, hf, ["no model.safetensors"])
    hf = mutate(work, "msaopt")
    expect_fail(work, hf, ["--msa-layers", "5-9"], "--attention", "msa", "--msa-layers", "5-9")


@test
def export_refuses_bad_checkpoints(work):
    r = run([PY, EXPORT, os.path.join(work, "none.h5"), os.path.join(work, "o")])
    check(r.returncode == 1 and "none.h5" in r.stderr, r.stderr)
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    make_hf(hf, "llama")
    hf_import(hf, out)
    ck = os.path.join(out, "ckpt_import.h5")
    with h5py.File(ck, "a") as f:
        del f["params"]["layers.0.ffn.w_up"]
    r = run([PY, EXPORT, ck, os.path.join(work, "o")])
    check(r.returncode == 1 and "params/layers.0.ffn.w_up" in r.stderr, r.stderr)
    check(not os.path.exists(os.path.join(work, "o")), "export wrote after an error")
    r = run([PY, EXPORT, ck, os.path.join(work, "o"), "--arch", "qwen3"])
    check(r.returncode == 1 and "--arch qwen3" in r.stderr, r.stderr)


def help_config_defaults():
    """{model key: default} from build/train --help-config's table (the trainer's own account of them)."""
    out = must([TRAIN, "--help-config"]).stdout
    defaults = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 4 and cells[0] == "model":
            kind, text = cells[2], cells[3].strip("`")
            defaults[cells[1]] = {"int": int, "float": float, "bool": lambda v: v == "true",
                                  "string": lambda v: v.strip('"')}[kind](text)
    return defaults


@test
def export_fills_left_out_keys_with_the_trainers_defaults(work):
    """hf_export --config with keys left out exports what build/train would run: its defaults."""
    hf, out, hf2 = (os.path.join(work, n) for n in ("hf", "out", "hf2"))
    make_hf(hf, "qwen2")  # eps 1e-6, theta 1e6, tied: not the defaults except the tie
    hf_import(hf, out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    for key in ("norm_eps", "rope_theta", "init_std", "tie_embeddings"):
        del cfg["model"][key]
    partial = os.path.join(work, "partial.json")
    with open(partial, "w") as f:
        json.dump(cfg, f)
    must([PY, EXPORT, os.path.join(out, "ckpt_import.h5"), hf2, "--config", partial])
    with open(os.path.join(hf2, "config.json")) as f:
        c2 = json.load(f)
    d = help_config_defaults()
    for hf_key, ours in (("rms_norm_eps", "norm_eps"), ("rope_theta", "rope_theta"), ("initializer_range", "init_std")):
        check(abs(c2[hf_key] - d[ours]) <= 1e-6 * d[ours], f"{hf_key} = {c2[hf_key]}, the default {d[ours]}")
    check(c2["tie_word_embeddings"] is d["tie_embeddings"], f"tie_word_embeddings {c2['tie_word_embeddings']}")


@test
def partial_rotary_is_refused_both_ways(work):
    """transformers' Llama, Mistral, Qwen2 and Qwen3 rotate the whole head whatever partial_rotary_factor
    says: the import refuses the key (top level or in rope_parameters), the export a rotary_dim below
    the head dimension; a factor of 1 is the whole head and imports."""
    families = (("llama", "LlamaForCausalLM", "llama"), ("llama", "MistralForCausalLM", "mistral"),
                ("qwen2", "Qwen2ForCausalLM", "qwen2"), ("qwen3", "Qwen3ForCausalLM", "qwen3"))
    for family, arch, mtype in families:
        for place in ("top", "rope_parameters"):
            def edit(c):
                c.update(architectures=[arch], model_type=mtype)
                if place == "top":
                    c["partial_rotary_factor"] = 0.5
                else:
                    c["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"],
                                            "partial_rotary_factor": 0.5}
            hf = mutate(work, f"{mtype}_{place}", family=family, cfg_edit=edit)
            key = "partial_rotary_factor" if place == "top" else "rope_parameters.partial_rotary_factor"
            expect_fail(work, hf, [f'"{key}" = 0.5', "config.json"])
    hf = mutate(work, "factor_one", family="qwen3", cfg_edit=lambda c: c.update(partial_rotary_factor=1.0))
    out = os.path.join(work, "factor_one_out")
    hf_import(hf, out)

    # export: a Qwen3-shaped model (head_dim 16) with rotary_dim 8
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["rotary_dim"] = 8
    partial = os.path.join(work, "partial_rotary.json")
    with open(partial, "w") as f:
        json.dump(cfg, f)
    o = os.path.join(work, "hf_out")
    r = run([PY, EXPORT, os.path.join(out, "ckpt_import.h5"), o, "--config", partial])
    expect_error_line(r, partial, "model.rotary_dim = 8", "head dimension 16")
    check(not os.path.exists(o), "export wrote after refusing")


@test
def import_refuses_what_the_trainer_refuses(work):
    """A model build/train would not load is refused before anything is written, naming the trainer's key
    and the Hugging Face key it came from."""
    cases = (
        ("head_dim", dict(D=15), ["head dimension 15", 'config key "head_dim"']),
        ("layers", dict(L=300, C=8, Hq=2, Hkv=1, D=4, F=8, V=11, shards=1),
         ["model.n_layers = 300", 'config key "num_hidden_layers"']),
        ("eps", dict(eps=2.0), ["model.norm_eps = 2", 'config key "rms_norm_eps"']),
        ("theta", dict(theta=1e300), ["model.rope_theta = 1e+300", 'config key "rope_theta"']),
    )
    for name, over, needles in cases:
        hf = os.path.join(work, name)
        make_hf(hf, "llama", **over)
        expect_fail(work, hf, ["build/train refuses it", os.path.join(hf, "config.json")] + needles)


@test
def nested_json_fails_cleanly(work):
    """JSON nested deeper than Python's recursion limit, in every JSON file the import reads."""
    deep = "[" * 100000 + "]" * 100000
    hf = mutate(work, "config")
    with open(os.path.join(hf, "config.json"), "w") as f:
        f.write(deep)
    expect_fail(work, hf, ["config.json", "nested"])
    hf = mutate(work, "index", shards=2)
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": ' + deep + "}")
    expect_fail(work, hf, ["model.safetensors.index.json", "nested"])
    hf = mutate(work, "header")
    raw = deep.encode()
    with open(os.path.join(hf, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    expect_fail(work, hf, ["model.safetensors", "corrupt", "nested"])


@test
def export_refuses_a_config_the_trainer_refuses(work):
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    make_hf(hf, "llama")
    hf_import(hf, out)
    ck = os.path.join(out, "ckpt_import.h5")
    o = os.path.join(work, "o")
    with open(os.path.join(out, "config.json")) as f:
        good = json.load(f)
    for name, edit, needles in (("heads0", {"n_heads": 0}, ["model.n_heads = 0"]),
                                ("string", {"d_model": "128"}, ["model.d_model", "string"])):
        cfg = json.loads(json.dumps(good))
        cfg["model"].update(edit)
        p = os.path.join(work, name + ".json")
        with open(p, "w") as f:
            json.dump(cfg, f)
        expect_error_line(run([PY, EXPORT, ck, o, "--config", p]), p, "build/train refuses it", *needles)
        check(not os.path.exists(o), f"{name}: export wrote after refusing")
    p = os.path.join(work, "nested.json")
    with open(p, "w") as f:
        f.write('{"model": ' + "[" * 100000 + "]" * 100000 + "}")
    expect_error_line(run([PY, EXPORT, ck, o, "--config", p]), p, "depth")
    # the config stored in the checkpoint goes through the same checks
    bad = os.path.join(work, "bad_stored.h5")
    shutil.copy(ck, bad)
    cfg = json.loads(json.dumps(good))
    cfg["model"]["n_heads"] = 0
    with h5py.File(bad, "a") as f:
        f.attrs["config"] = json.dumps(cfg)
    expect_error_line(run([PY, EXPORT, bad, o]), "(stored config)", "model.n_heads = 0")
    check(not os.path.exists(o), "export wrote after refusing")


@test
def export_refuses_groups_and_non_tensors(work):
    """A group, a non-float dataset or a non-scalar attribute where the checkpoint format has a tensor or a
    string: one error line naming the object."""
    hf, out = os.path.join(work, "hf"), os.path.join(work, "out")
    make_hf(hf, "llama")
    hf_import(hf, out)
    ck = os.path.join(out, "ckpt_import.h5")

    def group_for(name):
        def edit(f):
            del f["params"][name]
            f["params"].create_group(name)
        return edit

    def int_tensor(f):
        a = f["params"]["final_norm"][()]
        del f["params"]["final_norm"]
        f["params"].create_dataset("final_norm", data=a.astype(np.int32))

    def params_dataset(f):
        del f["params"]
        f.create_dataset("params", data=np.zeros(3, np.float32))

    def array_attr(name):
        def edit(f):
            f.attrs[name] = np.array([b"msa-train-checkpoint", b"x"])
        return edit

    cases = (
        ("wq_group", group_for("layers.0.attn.wq"), ["params/layers.0.attn.wq", "group", "not a tensor"]),
        ("wte_group", group_for("wte"), ["params/wte", "tensor"]),
        ("int_tensor", int_tensor, ["params/final_norm", "int32"]),
        ("params_dataset", params_dataset, ["not an msa-train checkpoint", "/params"]),
        ("format_array", array_attr("format"), ["attribute format", "string"]),
        ("config_array", array_attr("config"), ["attribute config", "string"]),
    )
    for name, edit, needles in cases:
        bad = os.path.join(work, name + ".h5")
        shutil.copy(ck, bad)
        with h5py.File(bad, "a") as f:
            edit(f)
        o = os.path.join(work, "o_" + name)
        expect_error_line(run([PY, EXPORT, bad, o]), bad, *needles)
        check(not os.path.exists(o), f"{name}: export wrote after refusing")


@test
def import_output_folder_failures(work):
    hf = os.path.join(work, "hf")
    make_hf(hf, "llama")
    pyharness.output_folder_failures(work, lambda out: [PY, IMPORT, hf, out], ["ckpt_import.h5", "config.json"])


@test
def export_output_folder_failures(work):
    hf, out = os.path.join(work, "hf"), os.path.join(work, "imported")
    make_hf(hf, "llama")
    hf_import(hf, out)
    ck = os.path.join(out, "ckpt_import.h5")
    pyharness.output_folder_failures(work, lambda o: [PY, EXPORT, ck, o], ["model.safetensors", "config.json"])


# ---- runner ----------------------------------------------------------------------------------------------

def main():
    return pyharness.run(TESTS, "msa_test_import_", (FORWARD, TRAIN))


if __name__ == "__main__":
    sys.exit(main())
