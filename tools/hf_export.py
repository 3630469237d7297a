#!/usr/bin/env python3
"""msa-train checkpoint -> Hugging Face model directory (config.json + model.safetensors).

    python3 tools/hf_export.py CHECKPOINT.h5 OUT_DIR [--config CONFIG.json] [--arch auto|llama|mistral|qwen2|qwen3]
                               [--dtype f32|bf16|f16] [--max-position N]

Exports the backbone: embedding, attention, SwiGLU FFN, norms and head. MSA index parameters
(layers.N.index.*) have no Hugging Face counterpart and are dropped; MoE models are refused, and so
is a partial rotary dim (model.rotary_dim below the head dimension): transformers' Llama, Mistral,
Qwen2 and Qwen3 rotate the whole head whatever partial_rotary_factor says. RoPE scaling
(model.rope_scaling and its rope_* keys) is written as the rope_scaling block transformers reads. The config is CONFIG.json
when given, else the one stored in the checkpoint; either is read by build/train --check-config (the
trainer's own checks, its defaults for keys left out). The naming follows the config (--arch auto):
model.qk_norm -> Qwen3, model.qkv_bias -> Qwen2, otherwise Llama. tools/hf_import.py reads the result
back to the same tensors (tests/test_import.py checks the round trip).

OUT_DIR is created with its parents; model.safetensors and config.json are written under temporary
names and renamed into place once both are complete. Any problem (a tensor missing, of the wrong shape
or type, or a group where a tensor belongs; a config the trainer refuses; an OUT_DIR that is a file,
not writable or on a full disk) ends the program with status 1 and one line naming it. The
safetensors file is written one tensor at a time (header first), so a checkpoint larger than memory
exports fine; bf16 rounds to nearest even.

Every tensor read is checked as build/train checks it (train/checkpoint.h): its crc32 attribute must
equal zlib.crc32 of its values as little-endian float32 bytes (format version 2; a version 1 file has
none and is exported with a warning) and every value must be finite; a mismatch names the tensor.
"""
import argparse
import json
import os
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tool_common, however the tool is started

from tool_common import Fail, check_config, exit_with, make_out_dir, remove_dirs, report, write_text

import numpy as np

FORMAT = "msa-train-checkpoint"
VERSIONS = (1, 2)  # the checkpoint format versions this tool reads (2: a crc32 on every tensor)

ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

ST_DTYPE = {"f32": ("F32", "<f4", 4), "f16": ("F16", "<f2", 2), "bf16": ("BF16", "<u2", 2)}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    nan = np.isnan(a)
    rounded = rounded.astype(np.uint16)
    rounded[nan] = np.uint16(0x7FC0)
    return rounded


def string_attr(f, path, name):
    """A root attribute that must be one string (None when absent)."""
    v = f.attrs.get(name)
    if v is None:
        return None
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise Fail(f"{path}: attribute {name} is not UTF-8 text")
    if not isinstance(v, str):
        raise Fail(f"{path}: attribute {name} must be a string, got {type(v).__name__} "
                   f"{getattr(v, 'shape', '')}".rstrip())
    return v


def load_model_config(ckpt_file, ckpt_path, config_path):
    """(where, model section) of the config build/train accepts: CONFIG.json, else the stored one."""
    if config_path:
        return config_path, check_config(config_path, config_path)["model"]
    text = string_attr(ckpt_file, ckpt_path, "config")
    if text is None:
        raise Fail(f"{ckpt_path}: the checkpoint stores no config; pass --config CONFIG.json")
    where = f"{ckpt_path} (stored config)"
    try:
        cfg = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Fail(f"{where}: not valid JSON ({e})")
    return where, check_config(cfg, where)["model"]


def verified(obj, path, name, version):
    """The values of params/name as float32 after the checks build/train makes on every load
    (train/checkpoint.h): its crc32 attribute (from version 2 on) equal to zlib.crc32 of its little-endian
    float32 bytes, every value finite."""
    try:
        a = np.ascontiguousarray(obj[()], dtype="<f4")
    except (OSError, ValueError) as e:
        raise Fail(f"{path}: tensor params/{name} cannot be read ({e}): the checkpoint is truncated or corrupt")
    if version >= 2:
        want = obj.attrs.get("crc32")
        if want is None or np.ndim(want) != 0 or not isinstance(want, (int, np.integer)):
            raise Fail(f"{path}: tensor params/{name} has no crc32 checksum (every tensor of a version {version} "
                       f"checkpoint has one): the checkpoint is corrupt")
        got = zlib.crc32(a.data)
        if got != int(want):
            raise Fail(f"{path}: tensor params/{name} does not match its checksum (crc32 0x{int(want):08x} stored, "
                       f"0x{got:08x} read): the checkpoint is corrupt")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise Fail(f"{path}: tensor params/{name} holds {a.flat[bad[0]]} at element {bad[0]}: the checkpoint is "
                   f"corrupt, or was written by a run that had diverged")
    return a


def tensor(params, path, name, shape):
    """params/name as float32, after checking that it is a float dataset of the shape the config needs."""
    import h5py

    obj = params.get(name)
    if obj is None:
        raise Fail(f"{path}: missing tensor params/{name} (the config needs it, shape {list(shape)})")
    if not isinstance(obj, h5py.Dataset):
        raise Fail(f"{path}: params/{name} is a {type(obj).__name__.lower()}, not a tensor (a dataset of "
                   f"shape {list(shape)})")
    if obj.dtype.kind != "f":
        raise Fail(f"{path}: params/{name} holds {obj.dtype}, not floating-point numbers")
    if tuple(obj.shape) != tuple(shape):
        raise Fail(f"{path}: shape mismatch for params/{name}: {list(obj.shape)}, the config needs {list(shape)}")
    return obj


def hf_names(model, V):
    """[(our name, hf name, shape)] of the backbone."""
    C, F = model["d_model"], model["ffn_dim"]
    Hq, Hkv = model["n_heads"], model["n_kv_heads"]
    D = model["head_dim"] or C // Hq
    out = [("wte", "model.embed_tokens.weight", (V, C))]
    for l in range(model["n_layers"]):
        o, p = f"layers.{l}.", f"model.layers.{l}."
        out += [
            (o + "attn_norm", p + "input_layernorm.weight", (C,)),
            (o + "attn.wq", p + "self_attn.q_proj.weight", (Hq * D, C)),
            (o + "attn.wk", p + "self_attn.k_proj.weight", (Hkv * D, C)),
            (o + "attn.wv", p + "self_attn.v_proj.weight", (Hkv * D, C)),
            (o + "attn.wo", p + "self_attn.o_proj.weight", (C, Hq * D)),
        ]
        if model["qkv_bias"]:
            out += [
                (o + "attn.bq", p + "self_attn.q_proj.bias", (Hq * D,)),
                (o + "attn.bk", p + "self_attn.k_proj.bias", (Hkv * D,)),
                (o + "attn.bv", p + "self_attn.v_proj.bias", (Hkv * D,)),
            ]
        if model["qk_norm"]:
            out += [
                (o + "attn.q_norm", p + "self_attn.q_norm.weight", (D,)),
                (o + "attn.k_norm", p + "self_attn.k_norm.weight", (D,)),
            ]
        out += [
            (o + "ffn_norm", p + "post_attention_layernorm.weight", (C,)),
            (o + "ffn.w_gate", p + "mlp.gate_proj.weight", (F, C)),
            (o + "ffn.w_up", p + "mlp.up_proj.weight", (F, C)),
            (o + "ffn.w_down", p + "mlp.down_proj.weight", (C, F)),
        ]
    out.append(("final_norm", "model.norm.weight", (C,)))
    if not model["tie_embeddings"]:
        out.append(("lm_head", "lm_head.weight", (V, C)))
    return out


def choose_arch(model, requested, where):
    if model["qk_norm"] and model["qkv_bias"]:
        raise Fail(f"{where}: model.qk_norm and model.qkv_bias together match no Hugging Face family")
    auto = "qwen3" if model["qk_norm"] else "qwen2" if model["qkv_bias"] else "llama"
    if requested in (None, "auto"):
        return auto
    fits = {"llama": auto == "llama", "mistral": auto == "llama", "qwen2": auto == "qwen2", "qwen3": auto == "qwen3"}
    if not fits[requested]:
        raise Fail(f"{where}: --arch {requested} does not fit this model (qk_norm = {model['qk_norm']}, "
                   f"qkv_bias = {model['qkv_bias']}; it exports as {auto})")
    return requested


def hf_rope_scaling(model):
    """Our model.rope_* keys -> transformers' rope_scaling block (None: plain RoPE), the names
    modeling_rope_utils.py reads for each rope_type."""
    kind = model.get("rope_scaling", "none")
    if kind == "none":
        return None
    spec = {"rope_type": kind, "factor": float(model["rope_factor"])}
    if kind == "llama3":
        spec.update(low_freq_factor=float(model["rope_low_freq_factor"]),
                    high_freq_factor=float(model["rope_high_freq_factor"]),
                    original_max_position_embeddings=model["rope_original_max_position"])
    if kind == "yarn":
        spec.update(original_max_position_embeddings=model["rope_original_max_position"],
                    beta_fast=float(model["rope_beta_fast"]), beta_slow=float(model["rope_beta_slow"]))
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if model[f"rope_{name}"]:
                spec[name] = float(model[f"rope_{name}"])
        if not model["rope_truncate"]:
            spec["truncate"] = False
    return spec


def default_max_position(model):
    """max_position_embeddings when --max-position is not given: dynamic NTK reads it as the trained
    context; for yarn, factor x the original context, so that transformers 4.x (which recomputes a YaRN
    factor as max_position_embeddings / original_max_position_embeddings) gets the same factor."""
    kind = model.get("rope_scaling", "none")
    if kind == "dynamic":
        return model["rope_original_max_position"]
    if kind == "yarn":
        return int(round(model["rope_factor"] * model["rope_original_max_position"]))
    return 131072


def hf_config(model, arch, V, dtype, max_position):
    D = model["head_dim"] or model["d_model"] // model["n_heads"]
    cls, mtype = ARCH[arch]
    cfg = {
        "architectures": [cls],
        "model_type": mtype,
        "vocab_size": V,
        "hidden_size": model["d_model"],
        "intermediate_size": model["ffn_dim"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": D,
        "hidden_act": "silu",
        "max_position_embeddings": max_position,
        "rms_norm_eps": float(model["norm_eps"]),
        "rope_theta": float(model["rope_theta"]),
        "rope_scaling": hf_rope_scaling(model),
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "initializer_range": float(model["init_std"]),
        "attention_dropout": 0.0,
        "torch_dtype": TORCH_DTYPE[dtype],
    }
    if arch in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if arch == "llama":
        cfg["mlp_bias"] = False
    if arch == "mistral":
        cfg["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        cfg["use_sliding_window"] = False
    return cfg


def write_safetensors(path, entries, read, dtype):
    """entries: [(hf name, shape)] in file order; read(hf name) -> float32 array."""
    st_dtype, store, size = ST_DTYPE[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, _ in entries:
            a = read(name)
            data = to_bf16_bits(a) if dtype == "bf16" else a.astype(store)
            f.write(np.ascontiguousarray(data).tobytes())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/hf_export.py",
                                 description="Export an msa-train checkpoint's backbone as a Hugging Face model "
                                             "directory (config.json + model.safetensors).")
    ap.add_argument("checkpoint", metavar="CHECKPOINT.h5")
    ap.add_argument("out_dir", metavar="OUT_DIR")
    ap.add_argument("--config", help="our config JSON (default: the one stored in the checkpoint)")
    ap.add_argument("--arch", choices=("auto", "llama", "mistral", "qwen2", "qwen3"), default="auto",
                    help="Hugging Face family (default: by the config)")
    ap.add_argument("--dtype", choices=("f32", "bf16", "f16"), default="f32", help="tensor dtype (default f32)")
    ap.add_argument("--max-position", type=int,
                    help="max_position_embeddings to write (default 131072; model.rope_scaling = dynamic: "
                         "model.rope_original_max_position, which it must then equal; yarn: rope_factor x "
                         "rope_original_max_position)")
    return report(run, ap.parse_args(argv))


def run(args):
    import h5py

    path = args.checkpoint
    if not os.path.isfile(path):
        raise Fail(f"{path}: no such checkpoint file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise Fail(f"{path}: not an HDF5 file (truncated or corrupt?)")
    with f:
        fmt = string_attr(f, path, "format")
        if fmt != FORMAT or not isinstance(f.get("params"), h5py.Group):
            raise Fail(f"{path}: not an msa-train checkpoint (format {fmt!r}, /params "
                       f"{'a group' if isinstance(f.get('params'), h5py.Group) else 'not a group'})")
        version = f.attrs.get("version")
        if isinstance(version, np.ndarray):
            if version.size != 1:
                raise Fail(f"{path}: attribute \"version\": expected a single value, found an array of shape "
                           f"{list(version.shape)}")
            version = version.reshape(()).item()
        if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or int(version) not in VERSIONS:
            raise Fail(f"{path}: checkpoint format version {version!r}; this tool reads versions "
                       f"{VERSIONS[0]} to {VERSIONS[-1]}")
        version = int(version)
        if version < 2:
            print(f"warning: {path}: checkpoint format version 1 has no checksums, so its tensors are exported "
                  f"unverified (NaN and infinite values are still refused)", file=sys.stderr)
        where, model = load_model_config(f, path, args.config)
        if model["ffn"] == "moe":
            raise Fail(f"{where}: model.ffn = moe: MoE layers have no Llama/Qwen counterpart to export to")
        D = model["head_dim"] or model["d_model"] // model["n_heads"]
        if model["rotary_dim"] not in (0, D):
            raise Fail(f"{where}: model.rotary_dim = {model['rotary_dim']} rotates part of the head dimension {D}: "
                       f"Hugging Face transformers' Llama, Mistral, Qwen2 and Qwen3 rotate the whole head whatever "
                       f"partial_rotary_factor says, so no Hugging Face config describes this model")
        max_position = args.max_position or default_max_position(model)
        if model.get("rope_scaling") == "dynamic" and max_position != model["rope_original_max_position"]:
            raise Fail(f"{where}: --max-position {max_position} with model.rope_scaling = dynamic: transformers' "
                       f"dynamic NTK reads max_position_embeddings as the trained context, "
                       f"model.rope_original_max_position = {model['rope_original_max_position']}")
        params = f["params"]
        wte = params.get("wte")
        if not isinstance(wte, h5py.Dataset) or len(wte.shape) != 2:
            raise Fail(f"{path}: params/wte must be a tensor [vocab, d_model]")
        V = wte.shape[0]
        if model["vocab_size"] not in (0, V):
            raise Fail(f"{where}: model.vocab_size = {model['vocab_size']} but params/wte has {V} rows")
        arch = choose_arch(model, args.arch, where)
        mapping = hf_names(model, V)
        tensors = {ours: tensor(params, path, ours, shape) for ours, _, shape in mapping}
        dropped = []
        for name in params:
            if name in tensors:
                continue
            if ".index." in name:
                dropped.append(name)
                continue
            raise Fail(f"{path}: unexpected tensor params/{name} for this config")
        to_ours = {hf: ours for ours, hf, _ in mapping}
        entries = [(hf, shape) for _, hf, shape in mapping]

        def read(hf):
            return verified(tensors[to_ours[hf]], path, to_ours[hf], version)

        write_outputs(args.out_dir, entries, read, hf_config(model, arch, V, args.dtype, max_position),
                      args.dtype)
    print(f"hf_export: {path} -> {args.out_dir} ({ARCH[arch][0]}, {len(entries)} tensors, {args.dtype})")
    if dropped:
        print(f"  dropped {len(dropped)} MSA index tensors (no Hugging Face counterpart)")


def write_outputs(out_dir, entries, read, config, dtype):
    """OUT_DIR/model.safetensors and config.json, under temporary names until both are complete: a failure
    leaves OUT_DIR as it was (and removes the folders this call created)."""
    created = make_out_dir(out_dir)
    st_path = os.path.join(out_dir, "model.safetensors")
    cfg_path = os.path.join(out_dir, "config.json")
    tmps = [st_path + ".tmp", cfg_path + ".tmp"]
    try:
        try:
            write_safetensors(tmps[0], entries, read, dtype)
        except OSError as e:
            raise Fail(f"{tmps[0]}: cannot write ({e.strerror})")
        write_text(tmps[1], json.dumps(config, indent=2) + "\n")
        for tmp, final in zip(tmps, (st_path, cfg_path)):
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise Fail(f"{final}: cannot rename {tmp} into place ({e.strerror})")
    except BaseException:
        for t in tmps:
            if os.path.exists(t):
                os.unlink(t)
        remove_dirs(created)
        raise


if __name__ == "__main__":
    exit_with(main())
