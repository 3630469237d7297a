#!/usr/bin/env python3
"""Hugging Face dense GQA model -> msa-train checkpoint and config.

    python3 tools/hf_import.py HF_DIR OUT_DIR [--attention dense|msa] [--msa-layers SEL]
                               [--block-size B] [--topk-blocks K] [--index-dim D]

HF_DIR holds config.json and the weights as model.safetensors, or as shards listed by
model.safetensors.index.json (any *.safetensors files when neither exists). Supported families:
Llama, Mistral, Qwen2 (q/k/v biases -> model.qkv_bias) and Qwen3 (per-head q/k RMSNorm ->
model.qk_norm), with RoPE over the whole head, plain or scaled: rope_scaling (transformers 5:
rope_parameters) of rope_type linear, dynamic, yarn or llama3 (Llama 3.1/3.2, Qwen2.5 YaRN) becomes
model.rope_scaling and its rope_* keys (configs/README.md), read as transformers reads them; other
types (longrope, ...) are refused. Hugging Face transformers does not implement partial_rotary_factor
for these four (5.x rotates the whole head anyway, 4.57 crashes), so a config that sets it describes
no model transformers runs, and is refused.

Writes
    OUT_DIR/ckpt_import.h5   /params/<name> f32, each with its crc32, and the root attributes format,
                             version, step = 0 and config (train/checkpoint.h); no optimizer state
    OUT_DIR/config.json      our config (model section; msa section with --attention msa)
With --attention msa the checkpoint still holds only the backbone: the MSA index parameters are
absent and start freshly initialised when the model loads it (train.init_from, build/forward).

OUT_DIR is created with its parents. The config written is first put to build/train --check-config:
a model the trainer would refuse (an odd head dimension, more layers than it takes, rms_norm_eps above
1, a rope_theta beyond float range) is refused here, naming the key.

Every problem with the input (missing config key, missing or unexpected tensor, shape mismatch,
corrupt safetensors file, unsupported architecture or RoPE scaling type) or with OUT_DIR (a file, no
permission, a full disk) ends the program with status 1 and one line naming the file and the tensor,
and leaves OUT_DIR as it was. The weights are read one tensor at a time straight from the safetensors
files (their headers are checked first), so a model larger than memory imports fine.
"""
import argparse
import json
import os
import re
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tool_common, however the tool is started

from tool_common import Fail, Hdf5Writer, check_config, exit_with, make_out_dir, parse_json, read_json, \
    remove_dirs, report, write_text

import numpy as np

FORMAT = "msa-train-checkpoint"
VERSION = 2  # 2: a crc32 attribute on every tensor (train/checkpoint.h)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# safetensors dtype -> (numpy little-endian storage dtype, bytes per element); BF16 is stored as
# uint16 and widened by hand (numpy has no bfloat16)
ST_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}

# the largest safetensors JSON header we accept: the format itself caps it at 100 MB
MAX_HEADER = 100 * 1000 * 1000


# ---- safetensors ---------------------------------------------------------------------------------

class SafetensorsFile:
    """The header of one safetensors file, checked against the file's size, and per-tensor reads."""

    def __init__(self, path):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise Fail(f"{path}: not a safetensors file (shorter than the 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise Fail(f"{path}: corrupt or truncated safetensors file (header length {n} "
                               f"does not fit in the file's {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise Fail(f"{path}: cannot read ({e.strerror})")
        header = parse_json(raw, f"{path}: corrupt safetensors file: the header")
        if not isinstance(header, dict):
            raise Fail(f"{path}: corrupt safetensors file (the header is not a JSON object)")
        header.pop("__metadata__", None)
        data_start = 8 + n
        self.tensors = {}  # name -> (safetensors dtype, shape tuple, absolute byte offset)
        for name, info in header.items():
            where = f"{path}: tensor {name}"
            if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                    and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
                    and len(info["data_offsets"]) == 2
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])):
                raise Fail(f"{where}: corrupt header entry {info!r}")
            dtype = info["dtype"]
            if dtype not in ST_DTYPES:
                raise Fail(f"{where} has dtype {dtype}; supported: {', '.join(ST_DTYPES)}")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            nbytes = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dtype][1]
            if begin < 0 or end - begin != nbytes:
                raise Fail(f"{where}: corrupt header (data_offsets {begin}..{end} for {nbytes} bytes of "
                           f"{dtype} {list(shape)})")
            if data_start + end > size:
                raise Fail(f"{where}: the file is truncated (the tensor ends at byte {data_start + end}, "
                           f"the file has {size})")
            self.tensors[name] = (dtype, shape, data_start + begin)

    def read(self, name):
        """The tensor as float32 (only this tensor is read from disk)."""
        dtype, shape, offset = self.tensors[name]
        store, _ = ST_DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        a = np.fromfile(self.path, dtype=store, count=count, offset=offset)
        if a.size != count:
            raise Fail(f"{self.path}: tensor {name}: short read (truncated file?)")
        if dtype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False).reshape(shape)


class Weights:
    """All tensors of a model directory: name -> the safetensors file that holds it."""

    def __init__(self, hf_dir):
        self.dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        self.where = {}
        if os.path.exists(index):
            self.source = index
            content = read_json(index)
            wm = content.get("weight_map") if isinstance(content, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise Fail(f"{index}: no \"weight_map\" object")
            files = {}
            for name, fname in wm.items():
                if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
                    raise Fail(f"{index}: tensor {name} maps to {fname!r}, not a file name in {hf_dir}")
                if fname not in files:
                    p = os.path.join(hf_dir, fname)
                    if not os.path.isfile(p):
                        raise Fail(f"{index}: shard {fname} (holding {name}) is missing from {hf_dir}")
                    files[fname] = SafetensorsFile(p)
                if name not in files[fname].tensors:
                    raise Fail(f"{files[fname].path}: missing tensor {name} (the index {index} places it there)")
            shard_list = list(files.values())
        elif os.path.exists(single):
            self.source = single
            shard_list = [SafetensorsFile(single)]
        else:
            names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
            if not names:
                raise Fail(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                           f"(only safetensors checkpoints are supported)")
            self.source = os.path.join(hf_dir, "*.safetensors")
            shard_list = [SafetensorsFile(os.path.join(hf_dir, n)) for n in names]
        for st in shard_list:
            for name in st.tensors:
                if name in self.where and self.where[name] is not st:
                    raise Fail(f"{st.path}: tensor {name} is also in {self.where[name].path}")
                self.where[name] = st

    def shape(self, name):
        return self.where[name].tensors[name][1]

    def read(self, name):
        return self.where[name].read(name)

    def file_of(self, name):
        return self.where[name].path


# ---- config ---------------------------------------------------------------------------------------

def read_hf_config(hf_dir, allow_sliding_window):
    """The HF config.json -> (family, our model section as a dict, init_std)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise Fail(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    if not os.path.isfile(path):
        raise Fail(f"{path}: missing (a Hugging Face model directory holds config.json)")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise Fail(f"{path}: the top level is not a JSON object")

    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise Fail(f"{path}: unsupported architecture {archs!r}; supported: {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[archs[0]]
    else:
        family = cfg.get("model_type")
        if family not in ARCHITECTURES.values():
            raise Fail(f"{path}: unsupported model_type {family!r} (and no \"architectures\"); supported: "
                       f"{', '.join(sorted(set(ARCHITECTURES.values())))}")

    def need(key):
        if cfg.get(key) is None:
            raise Fail(f"{path}: missing config key \"{key}\"")
        return cfg[key]

    def positive_int(key, value):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise Fail(f"{path}: config key \"{key}\" = {value!r} must be a positive integer")
        return value

    def number(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise Fail(f"{path}: config key \"{key}\" = {value!r} must be a positive number")
        return float(value)

    hidden = positive_int("hidden_size", need("hidden_size"))
    layers = positive_int("num_hidden_layers", need("num_hidden_layers"))
    heads = positive_int("num_attention_heads", need("num_attention_heads"))
    ffn = positive_int("intermediate_size", need("intermediate_size"))
    vocab = positive_int("vocab_size", need("vocab_size"))
    eps = number("rms_norm_eps", need("rms_norm_eps"))
    # the HF defaults of the four families for keys older configs leave out
    kv_heads = positive_int("num_key_value_heads", cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise Fail(f"{path}: num_key_value_heads = {kv_heads} does not divide num_attention_heads = {heads}")
    if cfg.get("head_dim") is not None:
        head_dim = positive_int("head_dim", cfg["head_dim"])
    elif hidden % heads:
        raise Fail(f"{path}: missing config key \"head_dim\" (hidden_size {hidden} is not divisible by "
                   f"num_attention_heads {heads})")
    else:
        head_dim = hidden // heads

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise Fail(f"{path}: unsupported hidden_act {act!r} (msa-train's FFN is SwiGLU: silu)")
    # RoPE and its scaling: transformers < 5 writes "rope_scaling", 5 moves theta, the type and the
    # scaling keys into "rope_parameters"
    rope_params = cfg.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise Fail(f"{path}: config key \"rope_parameters\" is not an object")
    theta = number("rope_theta", cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
    # transformers' Llama, Mistral, Qwen2 and Qwen3 rotate the whole head whatever partial_rotary_factor
    # says (5.x; 4.57 crashes on it): a factor below 1 describes a model no Hugging Face code runs
    for key, spec in (("partial_rotary_factor", cfg), ("rope_parameters.partial_rotary_factor", rope_params)):
        factor = spec.get("partial_rotary_factor")
        if factor is not None and factor != 1:
            raise Fail(f"{path}: config key \"{key}\" = {factor!r}: Hugging Face transformers does not implement "
                       f"partial rotary for {family} (it rotates the whole head), so which model this is cannot "
                       f"be told; remove the key to import it with RoPE over the whole head")

    # features the model does not have
    if family == "mistral" and cfg.get("sliding_window") is not None and not allow_sliding_window:
        raise Fail(f"{path}: sliding_window = {cfg['sliding_window']}: sliding-window attention is not "
                   f"supported (--allow-sliding-window imports it as full attention, which differs only for "
                   f"sequences longer than the window)")
    if cfg.get("use_sliding_window") and not allow_sliding_window:
        raise Fail(f"{path}: use_sliding_window = true: sliding-window attention is not supported "
                   f"(--allow-sliding-window imports it as full attention)")
    if cfg.get("attention_bias") and family != "qwen2":
        raise Fail(f"{path}: attention_bias = true (biases on q/k/v and o_proj) is not supported; msa-train "
                   f"has q/k/v biases only (Qwen2)")
    if cfg.get("mlp_bias"):
        raise Fail(f"{path}: mlp_bias = true is not supported (the FFN has no biases)")
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise Fail(f"{path}: config key \"tie_word_embeddings\" = {tie!r} must be true or false")
    init_std = cfg.get("initializer_range", 0.02)
    init_std = number("initializer_range", init_std) if init_std else 0.02

    model = {
        "vocab_size": vocab,
        "d_model": hidden,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "head_dim": head_dim,
        "ffn_dim": ffn,
        "rope_theta": theta,
        "rotary_dim": 0,  # the whole head
        "qk_norm": False,    # set from the tensors present
        "qkv_bias": False,   # set from the tensors present
        "tie_embeddings": tie,
        "norm_eps": eps,
        "init_std": init_std,
        **rope_scaling_keys(path, cfg, rope_params, number, positive_int),
    }
    return path, family, model


ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}


def rope_scaling_keys(path, cfg, rope_params, number, positive_int):
    """HF rope_scaling (or 5.x rope_parameters) -> our model.rope_* keys, read as transformers'
    modeling_rope_utils.py reads them for each rope_type."""
    spec_key = "rope_scaling" if cfg.get("rope_scaling") is not None else "rope_parameters"
    spec = cfg.get("rope_scaling") if spec_key == "rope_scaling" else (rope_params or None)
    if spec is None:
        return {"rope_scaling": "none"}
    if not isinstance(spec, dict):
        raise Fail(f"{path}: config key \"{spec_key}\" = {spec!r} is not an object")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise Fail(f"{path}: unsupported {spec_key} type {kind!r}: msa-train implements "
                   f"{', '.join(ROPE_TYPES)}")
    keys = {"rope_scaling": ROPE_TYPES[kind]}
    if kind == "default":
        return keys

    def need(name):
        if spec.get(name) is None:
            raise Fail(f"{path}: {spec_key} of type {kind!r} needs \"{name}\"")
        return spec[name]

    def spec_number(name, value):
        return number(f"{spec_key}.{name}", value)

    def max_position():
        return positive_int("max_position_embeddings", cfg.get("max_position_embeddings") or
                            need("original_max_position_embeddings"))

    if kind == "yarn" and spec.get("factor") is None and spec.get("original_max_position_embeddings"):
        # transformers: a YaRN config without a factor extends original_max_position_embeddings to
        # max_position_embeddings
        keys["rope_factor"] = max_position() / positive_int(f"{spec_key}.original_max_position_embeddings",
                                                            spec["original_max_position_embeddings"])
    else:
        keys["rope_factor"] = spec_number("factor", need("factor"))
    if keys["rope_factor"] < 1:
        raise Fail(f"{path}: {spec_key}.factor = {keys['rope_factor']!r} must be >= 1 (a context extension)")
    if kind == "dynamic":  # transformers' dynamic NTK reads the model's max_position_embeddings
        keys["rope_original_max_position"] = positive_int("max_position_embeddings",
                                                          cfg.get("max_position_embeddings"))
    if kind == "llama3":
        keys["rope_original_max_position"] = positive_int(f"{spec_key}.original_max_position_embeddings",
                                                          need("original_max_position_embeddings"))
        keys["rope_low_freq_factor"] = spec_number("low_freq_factor", need("low_freq_factor"))
        keys["rope_high_freq_factor"] = spec_number("high_freq_factor", need("high_freq_factor"))
    if kind == "yarn":
        orig = spec.get("original_max_position_embeddings")
        keys["rope_original_max_position"] = (positive_int(f"{spec_key}.original_max_position_embeddings", orig)
                                              if orig is not None else max_position())
        # transformers: `spec.get("beta_fast") or 32`, so an explicit 0 or null means the default too
        keys["rope_beta_fast"] = spec_number("beta_fast", spec.get("beta_fast") or 32)
        keys["rope_beta_slow"] = spec_number("beta_slow", spec.get("beta_slow") or 1)
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if spec.get(name):  # unset (None) and 0 both leave transformers' default
                keys[f"rope_{name}"] = spec_number(name, spec[name])
        truncate = spec.get("truncate", True)
        if not isinstance(truncate, bool):
            raise Fail(f"{path}: {spec_key}.truncate = {truncate!r} must be true or false")
        keys["rope_truncate"] = truncate
    return keys


# ---- tensor mapping ---------------------------------------------------------------------------------

# buffers some checkpoints carry that are derived from the config, not weights
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def tensor_map(model):
    """[(hf name, our name, shape)] of every tensor the model needs."""
    C, F, V = model["d_model"], model["ffn_dim"], model["vocab_size"]
    Hq, Hkv, D = model["n_heads"], model["n_kv_heads"], model["head_dim"]
    out = [("model.embed_tokens.weight", "wte", (V, C))]
    for l in range(model["n_layers"]):
        p, o = f"model.layers.{l}.", f"layers.{l}."
        out += [
            (p + "input_layernorm.weight", o + "attn_norm", (C,)),
            (p + "self_attn.q_proj.weight", o + "attn.wq", (Hq * D, C)),
            (p + "self_attn.k_proj.weight", o + "attn.wk", (Hkv * D, C)),
            (p + "self_attn.v_proj.weight", o + "attn.wv", (Hkv * D, C)),
            (p + "self_attn.o_proj.weight", o + "attn.wo", (C, Hq * D)),
        ]
        if model["qkv_bias"]:
            out += [
                (p + "self_attn.q_proj.bias", o + "attn.bq", (Hq * D,)),
                (p + "self_attn.k_proj.bias", o + "attn.bk", (Hkv * D,)),
                (p + "self_attn.v_proj.bias", o + "attn.bv", (Hkv * D,)),
            ]
        if model["qk_norm"]:
            out += [
                (p + "self_attn.q_norm.weight", o + "attn.q_norm", (D,)),
                (p + "self_attn.k_norm.weight", o + "attn.k_norm", (D,)),
            ]
        out += [
            (p + "post_attention_layernorm.weight", o + "ffn_norm", (C,)),
            (p + "mlp.gate_proj.weight", o + "ffn.w_gate", (F, C)),
            (p + "mlp.up_proj.weight", o + "ffn.w_up", (F, C)),
            (p + "mlp.down_proj.weight", o + "ffn.w_down", (C, F)),
        ]
    out.append(("model.norm.weight", "final_norm", (C,)))
    if not model["tie_embeddings"]:
        out.append(("lm_head.weight", "lm_head", (V, C)))
    return out


def plan_import(weights, model):
    """Check every tensor name and shape against the config; returns the mapping to write."""
    names = set(weights.where)
    # optional per-family tensors: decided by what the checkpoint has (then every layer must have them)
    model["qk_norm"] = any(n.endswith(".self_attn.q_norm.weight") for n in names)
    model["qkv_bias"] = any(n.endswith(".self_attn.q_proj.bias") for n in names)
    mapping = tensor_map(model)
    for hf, _, shape in mapping:
        if hf not in names:
            raise Fail(f"{weights.source}: missing tensor {hf} (expected shape {list(shape)})")
        got = weights.shape(hf)
        if tuple(got) != tuple(shape):
            raise Fail(f"{weights.file_of(hf)}: shape mismatch for {hf}: the file has {list(got)}, the config "
                       f"needs {list(shape)}")
    expected = {hf for hf, _, _ in mapping}
    for n in sorted(names - expected):
        if IGNORED.match(n):
            continue
        if n == "lm_head.weight" and model["tie_embeddings"]:
            # some tied checkpoints store the head anyway; fine as long as it is the embedding
            if tuple(weights.shape(n)) != tuple(weights.shape("model.embed_tokens.weight")) or \
                    not np.array_equal(weights.read(n), weights.read("model.embed_tokens.weight")):
                raise Fail(f"{weights.file_of(n)}: tie_word_embeddings is true but lm_head.weight differs from "
                           f"model.embed_tokens.weight")
            continue
        raise Fail(f"{weights.file_of(n)}: unexpected tensor {n} (msa-train has no such parameter; "
                   f"an unsupported variant of the architecture?)")
    return mapping


# ---- the trainer's checks ------------------------------------------------------------------------------

# where each key of the written config comes from, so that the trainer's refusal names what to change
SOURCES = {
    "model.vocab_size": 'config key "vocab_size"',
    "model.d_model": 'config key "hidden_size"',
    "model.n_layers": 'config key "num_hidden_layers"',
    "model.n_heads": 'config key "num_attention_heads"',
    "model.n_kv_heads": 'config key "num_key_value_heads"',
    "model.head_dim": 'config key "head_dim" (or hidden_size / num_attention_heads)',
    "model.ffn_dim": 'config key "intermediate_size"',
    "model.rope_theta": 'config key "rope_theta"',
    "model.rope_factor": 'config key "rope_scaling.factor"',
    "model.rope_original_max_position": 'config key "rope_scaling.original_max_position_embeddings" (dynamic: '
                                        '"max_position_embeddings")',
    "model.rope_low_freq_factor": 'config key "rope_scaling.low_freq_factor"',
    "model.rope_high_freq_factor": 'config key "rope_scaling.high_freq_factor"',
    "model.rope_beta_fast": 'config key "rope_scaling.beta_fast"',
    "model.rope_beta_slow": 'config key "rope_scaling.beta_slow"',
    "model.norm_eps": 'config key "rms_norm_eps"',
    "model.init_std": 'config key "initializer_range"',
    "model.msa_layers": "--msa-layers",
    "msa.block_size": "--block-size",
    "msa.topk_blocks": "--topk-blocks",
    "msa.index_dim": "--index-dim",
}


def check_with_trainer(config, hf_config_path):
    """build/train --check-config on the config about to be written; its refusal names the source too."""
    try:
        check_config(config, f"{hf_config_path}: the imported model")
    except Fail as e:
        msg = str(e)
        found = [(msg.find(key), key) for key in SOURCES if key in msg]
        if found:
            key = min(found)[1]
            msg += f" ({key} comes from {SOURCES[key]})"
        raise Fail(msg)


# ---- writing ------------------------------------------------------------------------------------------------

def write_outputs(out_dir, weights, mapping, config, hf_dir):
    """OUT_DIR/ckpt_import.h5 and config.json, each written under a temporary name and renamed into place once
    both are complete: a failure leaves OUT_DIR as it was (and removes the folders this call created)."""
    created = make_out_dir(out_dir)
    ckpt = os.path.join(out_dir, "ckpt_import.h5")
    cfg_path = os.path.join(out_dir, "config.json")
    tmp_ckpt, tmp_cfg = ckpt + ".tmp", cfg_path + ".tmp"
    text = json.dumps(config, indent=2) + "\n"
    writer = None
    try:
        writer = Hdf5Writer(tmp_ckpt)
        f = writer.file
        with writer.writing():
            g = writer.hold(f.create_group("params"))
        for hf, ours, _ in mapping:
            a = np.ascontiguousarray(weights.read(hf), dtype="<f4")
            if not np.all(np.isfinite(a)):
                raise Fail(f"{weights.file_of(hf)}: tensor {hf} holds NaN or Inf values")
            with writer.writing():
                d = writer.hold(g.create_dataset(ours, data=a))
                d.attrs["crc32"] = np.uint32(zlib.crc32(a.data))  # checked on every load (train/checkpoint.h)
        with writer.writing():
            f.attrs["format"] = FORMAT
            f.attrs["version"] = np.int32(VERSION)
            f.attrs["step"] = np.int64(0)
            f.attrs["config"] = text
            f.attrs["imported_from"] = os.path.abspath(hf_dir)
        writer.close()
        write_text(tmp_cfg, text)
        for tmp, final in ((tmp_ckpt, ckpt), (tmp_cfg, cfg_path)):
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise Fail(f"{final}: cannot rename {tmp} into place ({e.strerror})")
    except BaseException:
        if writer is not None:
            writer.discard()
        if os.path.exists(tmp_cfg):
            os.unlink(tmp_cfg)
        remove_dirs(created)
        raise
    return ckpt, cfg_path


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="tools/hf_import.py",
        description="Import a Hugging Face Llama/Mistral/Qwen2/Qwen3 safetensors model into an msa-train "
                    "checkpoint (OUT_DIR/ckpt_import.h5) and config (OUT_DIR/config.json).")
    ap.add_argument("hf_dir", metavar="HF_DIR")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("--attention", choices=("dense", "msa"), default="dense",
                    help="attention of the layers --msa-layers selects (default dense)")
    ap.add_argument("--msa-layers", default="all",
                    help="layer selector for MSA: all, none, 3- (MiniMax-M3 style), 1-4, 0,2,5 (default all)")
    ap.add_argument("--block-size", type=int, default=128, help="MSA KV block size (default 128)")
    ap.add_argument("--topk-blocks", type=int, default=16, help="MSA blocks per query (default 16)")
    ap.add_argument("--index-dim", type=int, default=128, help="MSA index query/key dim (default 128)")
    ap.add_argument("--allow-sliding-window", action="store_true",
                    help="import a sliding-window model as full attention")
    args = ap.parse_args(argv)
    return report(run, args)


def run(args):
    hf_config_path, family, model = read_hf_config(args.hf_dir, args.allow_sliding_window)
    weights = Weights(args.hf_dir)
    mapping = plan_import(weights, model)
    model["attention"] = args.attention
    config = {"model": model}
    if args.attention == "msa":
        model["msa_layers"] = args.msa_layers
        config["msa"] = {"block_size": args.block_size, "topk_blocks": args.topk_blocks, "index_dim": args.index_dim}
    check_with_trainer(config, hf_config_path)
    ckpt, cfg_path = write_outputs(args.out_dir, weights, mapping, config, args.hf_dir)
    n_params = sum(int(np.prod(s)) for _, _, s in mapping)
    print(f"hf_import: {args.hf_dir} ({family}, {model['n_layers']} layers, d_model {model['d_model']}, heads "
          f"{model['n_heads']}/{model['n_kv_heads']}, {n_params / 1e6:.2f}M parameters"
          f"{', q/k norm' if model['qk_norm'] else ''}{', q/k/v bias' if model['qkv_bias'] else ''})")
    print(f"  {ckpt}: {len(mapping)} tensors")
    print(f"  {cfg_path}: attention {args.attention}"
          + (f" (layers {args.msa_layers}; index parameters start fresh)" if args.attention == "msa" else ""))


if __name__ == "__main__":
    exit_with(main())
