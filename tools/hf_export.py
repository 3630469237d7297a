#!/usr/bin/env python3
"""msa-train checkpoint -> Hugging Face model directory (config.json + model.safetensors).

    python3 tools/hf_export.py CHECKPOINT.h5 OUT_DIR [--config CONFIG.json] [--arch auto|llama|mistral|qwen2|qwen3]
                               [--dtype f32|bf16|f16] [--max-position N]

Exports the backbone: embedding, attention, SwiGLU FFN, norms and head. MSA index parameters
(layers.N.index.*) have no Hugging Face counterpart and are dropped; MoE models are refused. The
config is CONFIG.json when given, else the one stored in the checkpoint. The naming follows the
config (--arch auto): model.qk_norm -> Qwen3, model.qkv_bias -> Qwen2, otherwise Llama. A partial
rotary dim is written as partial_rotary_factor. tools/hf_import.py reads the result back to the same
tensors (tests/test_import.py checks the round trip).

The safetensors file is written one tensor at a time (header first), so a checkpoint larger than
memory exports fine; bf16 rounds to nearest even.

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

try:
    import numpy as np
except ImportError:  # the system python3 rather than the project's environment
    sys.exit(f"error: {sys.executable} lacks numpy (and the other packages of tools/requirements.txt): "
             f"run `bash tools/install_deps.sh`, then .venv/bin/python {' '.join(sys.argv)}")

FORMAT = "msa-train-checkpoint"
VERSIONS = (1, 2)  # the checkpoint format versions this tool reads (2: a crc32 on every tensor)

# Defaults of the model section's keys (train/config.c's key table; tests/test_import.py checks
# that they agree with `build/train --help-config`). A config written by hf_import.py names every
# key, a config written by build/train too; hand-written ones may leave keys out.
MODEL_DEFAULTS = {
    "vocab_size": 0,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 0,
    "ffn_dim": 384,
    "rope_theta": 10000.0,
    "rotary_dim": 0,
    "qk_norm": False,
    "qkv_bias": False,
    "tie_embeddings": True,
    "norm_eps": 1e-5,
    "init_std": 0.02,
    "attention": "dense",
    "ffn": "dense",
}

ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

ST_DTYPE = {"f32": ("F32", "<f4", 4), "f16": ("F16", "<f2", 2), "bf16": ("BF16", "<u2", 2)}
TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


class Fail(Exception):
    """A problem with the user's input: reported as "error: <message>" with exit status 1."""


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    nan = np.isnan(a)
    rounded = rounded.astype(np.uint16)
    rounded[nan] = np.uint16(0x7FC0)
    return rounded


def root_attr(ckpt_file, path, name, kind):
    """The root attribute name as one value of kind (str or int), None when absent: an array where one
    value belongs is an error naming it, as in build/train (data/h5read.h)."""
    try:
        v = ckpt_file.attrs.get(name)
    except (OSError, TypeError, ValueError) as e:
        raise Fail(f"{path}: attribute \"{name}\" cannot be read ({e})")
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        if v.size != 1:
            raise Fail(f"{path}: attribute \"{name}\": expected a single value, found an array of shape {list(v.shape)}")
        v = v.reshape(()).item()
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    ok = isinstance(v, str) if kind is str else isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not ok:
        raise Fail(f"{path}: attribute \"{name}\": expected {'a string' if kind is str else 'an integer'}, "
                   f"found {type(v).__name__}")
    return v


def checked_tensor(params, path, name, version):
    """params/<name> as float32 after the checks build/train makes on every load: a floating-point dataset,
    its crc32 attribute (from version 2 on) equal to zlib.crc32 of its little-endian float32 bytes, every
    value finite."""
    import h5py

    obj = params.get(name)
    if not isinstance(obj, h5py.Dataset) or obj.dtype.kind != "f":
        raise Fail(f"{path}: params/{name} is not a floating-point tensor")
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


def load_config(ckpt_file, ckpt_path, config_path):
    if config_path:
        try:
            with open(config_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise Fail(f"{config_path}: cannot read the config ({e})")
        where = config_path
    else:
        text = root_attr(ckpt_file, ckpt_path, "config", str)
        if text is None:
            raise Fail(f"{ckpt_path}: the checkpoint stores no config; pass --config CONFIG.json")
        try:
            cfg = json.loads(str(text))
        except ValueError as e:
            raise Fail(f"{ckpt_path}: the stored config is not valid JSON ({e})")
        where = f"{ckpt_path} (stored config)"
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", {}), dict):
        raise Fail(f"{where}: not a config (an object with a \"model\" section)")
    model = dict(MODEL_DEFAULTS)
    model.update(cfg.get("model", {}))
    return where, model


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


def hf_config(model, arch, V, dtype, max_position):
    D = model["head_dim"] or model["d_model"] // model["n_heads"]
    rotary = model["rotary_dim"] or D
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
        "rope_scaling": None,
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "initializer_range": float(model["init_std"]),
        "attention_dropout": 0.0,
        "torch_dtype": TORCH_DTYPE[dtype],
    }
    if rotary != D:
        cfg["partial_rotary_factor"] = rotary / D
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
    ap.add_argument("--max-position", type=int, default=131072, help="max_position_embeddings to write")
    args = ap.parse_args(argv)
    import h5py

    try:
        path = args.checkpoint
        if not os.path.isfile(path):
            raise Fail(f"{path}: no such checkpoint file")
        try:
            f = h5py.File(path, "r")
        except OSError:
            raise Fail(f"{path}: not an HDF5 file (truncated or corrupt?)")
        with f:
            fmt = root_attr(f, path, "format", str)
            if fmt != FORMAT or not isinstance(f.get("params"), h5py.Group):
                raise Fail(f"{path}: not an msa-train checkpoint (format {fmt!r}, /params "
                           f"{'present' if 'params' in f else 'absent'})")
            version = root_attr(f, path, "version", int)
            if version not in VERSIONS:
                raise Fail(f"{path}: checkpoint format version {version}; this tool reads versions "
                           f"{VERSIONS[0]} to {VERSIONS[-1]}")
            if version < 2:
                print(f"warning: {path}: checkpoint format version 1 has no checksums, so its tensors are exported "
                      f"unverified (NaN and infinite values are still refused)", file=sys.stderr)
            where, model = load_config(f, path, args.config)
            if model["ffn"] == "moe":
                raise Fail(f"{where}: model.ffn = moe: MoE layers have no Llama/Qwen counterpart to export to")
            params = f["params"]
            if not isinstance(params.get("wte"), h5py.Dataset) or len(params["wte"].shape) != 2:
                raise Fail(f"{path}: missing tensor params/wte (a 2-D dataset)")
            V = params["wte"].shape[0]
            if model["vocab_size"] not in (0, V):
                raise Fail(f"{where}: model.vocab_size = {model['vocab_size']} but params/wte has {V} rows")
            arch = choose_arch(model, args.arch, where)
            mapping = hf_names(model, V)
            for ours, _, shape in mapping:
                if not isinstance(params.get(ours), h5py.Dataset):
                    raise Fail(f"{path}: missing tensor params/{ours} (the config needs it, shape {list(shape)})")
                if tuple(params[ours].shape) != tuple(shape):
                    raise Fail(f"{path}: shape mismatch for params/{ours}: {list(params[ours].shape)}, the config "
                               f"needs {list(shape)}")
            known = {ours for ours, _, _ in mapping}
            dropped = []
            for name in params:
                if name in known:
                    continue
                if ".index." in name:
                    dropped.append(name)
                    continue
                raise Fail(f"{path}: unexpected tensor params/{name} for this config")
            to_ours = {hf: ours for ours, hf, _ in mapping}
            entries = [(hf, shape) for _, hf, shape in mapping]

            created = not os.path.exists(args.out_dir)
            os.makedirs(args.out_dir, exist_ok=True)
            st_path = os.path.join(args.out_dir, "model.safetensors")
            cfg_path = os.path.join(args.out_dir, "config.json")
            tmps = [st_path + ".tmp", cfg_path + ".tmp"]
            try:
                try:
                    write_safetensors(tmps[0], entries, lambda hf: checked_tensor(params, path, to_ours[hf], version),
                                      args.dtype)
                    with open(tmps[1], "w") as out:
                        json.dump(hf_config(model, arch, V, args.dtype, args.max_position), out, indent=2)
                        out.write("\n")
                    os.replace(tmps[0], st_path)
                    os.replace(tmps[1], cfg_path)
                except OSError as e:
                    raise Fail(f"{args.out_dir}: cannot write the export ({e.strerror or e}; disk full or no "
                               f"permission?); nothing in it was replaced")
            except BaseException:
                for t in tmps:
                    if os.path.exists(t):
                        os.unlink(t)
                if created and not os.listdir(args.out_dir):
                    os.rmdir(args.out_dir)
                raise
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"hf_export: {path} -> {args.out_dir} ({ARCH[arch][0]}, {len(entries)} tensors, {args.dtype})")
    if dropped:
        print(f"  dropped {len(dropped)} MSA index tensors (no Hugging Face counterpart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
