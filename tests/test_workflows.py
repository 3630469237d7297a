#!/usr/bin/env python3
"""The three user workflows, end to end on tiny models, through the shipped configs in configs/:

1. pretraining from scratch: configs/shakespeare_char.json (dense), configs/shakespeare_msa.json (MSA),
   configs/pretrain_msa_moe.json (MSA + MoE);
2. continued long-context training from a checkpoint: configs/longctx_continue.json (longer sequence,
   RoPE theta change, init_from), and the whole continuation workflow of the README's long-context section:
   a model trained at 64 tokens, extended to 256 with a RoPE change and MSA on whole long documents
   (data.sample = documents), build/eval before and after, tools/plot_eval.py;
3. indexer fine-tuning of a dense GQA checkpoint: dense pretrain -> tools/hf_export.py -> Hugging Face
   directory -> tools/hf_import.py --attention msa -> configs/indexer_finetune.json (stage 1 dense
   warm-up training only the index branch, stage 2 sparse), checking that the backbone never moved,
   that the index branch did, and that KL, recall and the dense-attention reference loss are reported;
4. a recipe applies to any model: config files layered left to right (build/train MODEL.json RECIPE.json,
   --set last), the model keys a recipe leaves out taken from train.init_from's checkpoint, a contradicting
   one named with both values, a YaRN context extension on init_from.

Each config runs with --set overrides that shrink the model and the step count, so the whole file takes
seconds on a CPU. Prints "N passed, N failed". Run from anywhere with the project's virtual environment.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TRAIN = os.path.join(ROOT, "build", "train")
EVAL = os.path.join(ROOT, "build", "eval")
LONG_DATA = ["data.train_path=data/shakespeare_long/train.h5", "data.val_path=data/shakespeare_long/val.h5"]

# a tiny model every workflow config can be shrunk to
TINY_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64"]
TINY_MSA = ["msa.block_size=8", "msa.topk_blocks=2", "msa.index_dim=8", "msa.recall_stride=2"]
TINY_MOE = ["moe.num_experts=4", "moe.expert_dim=16", "moe.shared_expert_dim=32"]
DATA = ["data.train_path=data/shakespeare/train.h5", "data.val_path=data/shakespeare/val.h5"]

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def train(config, out_dir, sets):
    args = [TRAIN, os.path.join(ROOT, "configs", config)]
    for s in DATA + [f"train.out_dir={out_dir}", "train.log_every=1", "train.sample_tokens=0"] + sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{config} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def newest_checkpoint(out_dir):
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n.endswith(".h5"))
    assert names, f"no checkpoint in {out_dir}"
    return os.path.join(out_dir, names[-1])


def params(path):
    with h5py.File(path, "r") as f:
        return {k: np.array(v) for k, v in f["params"].items()}


@test
def pretraining_configs_run_and_learn(tmp):
    for config, extra in [("shakespeare_char.json", []),
                          ("shakespeare_msa.json", TINY_MSA + ["msa.dense_warmup_steps=3"]),
                          ("pretrain_msa_moe.json", TINY_MSA + TINY_MOE + ["msa.dense_warmup_steps=3"])]:
        out = os.path.join(tmp, config.replace(".json", ""))
        train(config, out, TINY_MODEL + extra + ["train.steps=8", "train.seq_len=64", "train.batch_size=4",
                                                  "train.eval_every=4", "train.eval_batches=2",
                                                  "train.checkpoint_every=0", "optim.warmup_steps=2"])
        m = metrics(out)
        losses = [r["loss"] for r in m if "loss" in r]
        assert len(losses) == 8 and losses[-1] < losses[0], f"{config}: loss did not fall: {losses}"
        evals = [r for r in m if "val_loss" in r]
        assert evals, f"{config}: no eval"
        if "msa" in config:
            assert all("kl" in r and 0 <= r["recall"] <= 1 for r in evals), f"{config}: MSA metrics missing"
        if "moe" in config:
            assert all(r["moe_max_over_mean_load"] >= 1 for r in m if "loss" in r), f"{config}: MoE load missing"
        newest_checkpoint(out)


@test
def long_context_continuation_from_a_checkpoint(tmp):
    base = os.path.join(tmp, "base")
    train("shakespeare_msa.json", base, TINY_MODEL + TINY_MSA + ["train.steps=4", "train.seq_len=64",
                                                                  "train.batch_size=2", "train.eval_every=0",
                                                                  "train.eval_batches=1"])
    start = newest_checkpoint(base)
    out = os.path.join(tmp, "long")
    # longer sequence (4x), RoPE theta changed (the shipped config's 40000 against 10000), recompute on; the
    # recipe has no model shape: the checkpoint's stored config supplies it (no TINY_MODEL here)
    train("longctx_continue.json", out, TINY_MSA + [f"train.init_from={start}", "train.steps=3",
                                                                  "train.seq_len=256", "train.batch_size=1",
                                                                  "train.eval_every=0", "train.eval_batches=1",
                                                                  "train.checkpoint_every=0"])
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["train"]["seq_len"] == 256 and cfg["model"]["rope_theta"] == 40000, "continuation config not applied"
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["n_layers"] == 2, f"model not from the checkpoint: {cfg}"
    assert cfg["train"]["recompute"] is True
    # it started from the checkpoint: the first loss is well below a fresh model's ln(65) = 4.17
    first = [r["loss"] for r in metrics(out) if "loss" in r][0]
    fresh = [r["loss"] for r in metrics(base) if "loss" in r][0]
    assert first < fresh, f"continuation starts at {first}, a fresh model at {fresh}"


def evaluate(config, checkpoint, out_json):
    r = subprocess.run([EVAL, config, checkpoint, "--data", "data/shakespeare_long/val.h5", "--lengths", "256",
                        "--depths", "0,0.5,1", "--trials", "1", "--loss-length", "256", "--loss-windows", "8",
                        "--buckets", "4", "--json", out_json], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"build/eval failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    with open(out_json) as f:
        return json.load(f), r.stdout


@test
def long_context_continuation_with_eval_before_and_after(tmp):
    # the README's long-context recipe, small: a dense model trained at 64 tokens ...
    base = os.path.join(tmp, "base")
    train("shakespeare_char.json", base, TINY_MODEL + LONG_DATA + [
        "train.steps=60", "train.seq_len=64", "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1",
        "optim.lr=0.01", "optim.warmup_steps=5"])
    start = newest_checkpoint(base)
    before, table = evaluate(os.path.join(base, "config.json"), start, os.path.join(tmp, "before.json"))
    check_eval(before, table, msa=False)
    # ... extended to 256 with a RoPE theta change (the shipped config's 40000) and MSA, on whole long documents
    out = os.path.join(tmp, "long")
    train("longctx_continue.json", out, TINY_MODEL + TINY_MSA + LONG_DATA + [
        f"train.init_from={start}", "train.steps=20", "train.seq_len=256", "train.batch_size=2",
        "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0", "data.sample=documents",
        "optim.lr=0.003", "optim.warmup_steps=3"])
    after, table = evaluate(os.path.join(out, "config.json"), newest_checkpoint(out), os.path.join(tmp, "after.json"))
    check_eval(after, table, msa=True)
    # positions past the 64 the base model was trained on: the continued model predicts them better
    def far(r):
        return np.mean([b["loss"] for b in r["position_loss"]["buckets"] if b["start"] >= 64])
    assert far(after) < far(before), f"loss at positions >= 64: {far(before):.4f} before, {far(after):.4f} after"
    png = os.path.join(tmp, "eval.png")
    r = subprocess.run([PY, os.path.join(ROOT, "tools", "plot_eval.py"), os.path.join(tmp, "before.json"),
                        os.path.join(tmp, "after.json"), "--labels", "before,after", "-o", png],
                       capture_output=True, text=True)
    assert r.returncode == 0 and os.path.getsize(png) > 0, f"plot_eval: {r.stderr}"


def check_eval(r, table, msa):
    pk = r["passkey"]
    assert pk["lengths"] == [256] and pk["depths"] == [0, 0.5, 1], f"grid {pk}"
    assert all(0 <= a <= 1 for row in pk["accuracy"] for a in row), f"accuracy {pk['accuracy']}"
    assert all(np.isfinite(t["key_logprob"]) and t["key_logprob"] < 0 for t in pk["trials"]), "key log-probabilities"
    losses = [b["loss"] for b in r["position_loss"]["buckets"]]
    assert r["position_loss"]["windows"] == 8 and all(np.isfinite(x) and 0 < x < 10 for x in losses), f"{losses}"
    assert ("recall_by_length" in r) == msa, "recall by length for MSA models only"
    if msa:
        assert all(0 < x["recall"] <= 1 for x in r["recall_by_length"]), f"{r['recall_by_length']}"
    assert "passkey exact-match accuracy" in table and "per-position loss" in table, table


@test
def indexer_finetuning_of_an_imported_dense_model(tmp):
    dense = os.path.join(tmp, "dense")
    train("shakespeare_char.json", dense, TINY_MODEL + ["train.steps=6", "train.seq_len=64", "train.batch_size=4",
                                                         "train.eval_every=0", "train.eval_batches=1",
                                                         "optim.warmup_steps=2"])
    hf = os.path.join(tmp, "hf")
    imported = os.path.join(tmp, "imported")
    subprocess.run([PY, os.path.join(ROOT, "tools", "hf_export.py"), newest_checkpoint(dense), hf], check=True,
                   capture_output=True)
    subprocess.run([PY, os.path.join(ROOT, "tools", "hf_import.py"), hf, imported, "--attention", "msa",
                    "--msa-layers", "1-", "--block-size", "8", "--topk-blocks", "2", "--index-dim", "8"], check=True,
                   capture_output=True)
    start = os.path.join(imported, "ckpt_import.h5")
    out = os.path.join(tmp, "finetune")
    log = train("indexer_finetune.json", out, TINY_MSA + [
        f"train.init_from={start}", "train.steps=6", "msa.dense_warmup_steps=3", "train.seq_len=64",
        "train.batch_size=2", "train.eval_every=3", "train.eval_batches=2", "optim.warmup_steps=1"])
    assert "eval step 0 " in log, "no reference evaluation before the first step"
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6], f"evals at {[r['step'] for r in evals]}"
    for r in evals:
        assert "kl" in r and "recall" in r and "dense_attention_val_loss" in r, f"eval lacks metrics: {r}"
    # the backbone is frozen in both stages (warmup_trainable = index, backbone_lr_scale = 0): the dense
    # reference loss never moves, and the final backbone equals the imported one bit for bit
    dense_refs = {round(r["dense_attention_val_loss"], 9) for r in evals}
    assert len(dense_refs) == 1, f"dense-attention loss moved: {dense_refs}"
    before, after = params(start), params(newest_checkpoint(out))
    moved_index = False
    for name, value in after.items():
        if ".index." in name:
            moved_index |= not np.array_equal(value, params_fresh_value(name, before))
        else:
            assert np.array_equal(value, before[name]), f"backbone parameter {name} changed"
    assert moved_index, "the index branch did not train"
    # stage 1 is dense: the KL of the first steps is reported as dense in the progress lines
    assert "(dense)" in log


def params_fresh_value(name, imported):
    # the imported checkpoint has no index parameters (they start fresh): anything is "moved" from that
    return imported.get(name, np.zeros(0))


@test
def stage_two_can_unfreeze_the_backbone_with_its_own_lr(tmp):
    dense = os.path.join(tmp, "dense2")
    train("shakespeare_char.json", dense, TINY_MODEL + ["train.steps=2", "train.seq_len=64", "train.batch_size=2",
                                                         "train.eval_every=0", "train.eval_batches=1"])
    start = newest_checkpoint(dense)
    out = os.path.join(tmp, "unfrozen")
    train("indexer_finetune.json", out, TINY_MODEL + TINY_MSA + [
        f"train.init_from={start}", "train.steps=4", "msa.dense_warmup_steps=2", "optim.backbone_lr_scale=0.1",
        "train.seq_len=64", "train.batch_size=2", "train.eval_every=2", "train.eval_batches=1"])
    evals = [r for r in metrics(out) if "val_loss" in r]
    refs = [r["dense_attention_val_loss"] for r in evals]
    # frozen through stage 1 (evals at steps 0 and 2 agree), moving in stage 2
    assert refs[0] == refs[1] and refs[2] != refs[1], f"dense-attention losses {refs}"


def train_files(configs, out_dir, sets):
    """build/train with several config files layered left to right; (returncode, stdout, stderr)."""
    args = [TRAIN, *configs]
    for s in DATA + [f"train.out_dir={out_dir}", "train.log_every=1", "train.sample_tokens=0"] + sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@test
def a_recipe_applies_to_any_model(tmp):
    """build/train MODEL.json RECIPE.json: the later file's keys override the earlier one's, --set comes
    last; with train.init_from the checkpoint supplies the model keys the files leave out, and a given
    key that contradicts it stops the run naming both values."""
    dense = os.path.join(tmp, "dense")
    train("shakespeare_char.json", dense, TINY_MODEL + ["train.steps=2", "train.seq_len=64", "train.batch_size=2",
                                                         "train.eval_every=0", "train.eval_batches=1"])
    start = newest_checkpoint(dense)
    # the model file: the dense run's own config.json (d_model 32, 2 layers, and its train keys)
    model_file = os.path.join(dense, "config.json")
    recipe = os.path.join(ROOT, "configs", "indexer_finetune.json")
    shrink = TINY_MSA + ["train.steps=2", "msa.dense_warmup_steps=1", "train.seq_len=64", "train.batch_size=2",
                         "train.eval_every=0", "train.eval_batches=1", "optim.warmup_steps=1"]
    out = os.path.join(tmp, "layered")
    rc, log, err = train_files([model_file, recipe], out, shrink + [f"train.init_from={start}", "train.seed=5"])
    assert rc == 0, f"layered run failed ({rc}):\n{log[-2000:]}\n{err[-2000:]}"
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    with open(model_file) as f:
        base = json.load(f)
    assert cfg["model"]["d_model"] == 32 and cfg["model"]["attention"] == "msa", f"model: {cfg['model']}"
    assert cfg["optim"]["backbone_lr_scale"] == 0 and cfg["optim"]["warmup_trainable"] == "index", \
        "the recipe (the later file) did not override the model file's optim keys"
    assert base["optim"]["warmup_trainable"] == "all", "the model file should hold the opposite value"
    assert cfg["train"]["seed"] == 5, "--set must come after every file"
    # the recipe alone with init_from: the checkpoint supplies d_model, n_layers, ... (defaults: 128, 4)
    out = os.path.join(tmp, "recipe_only")
    rc, log, err = train_files([recipe], out, shrink + [f"train.init_from={start}"])
    assert rc == 0, f"recipe-only run failed ({rc}):\n{log[-2000:]}\n{err[-2000:]}"
    with open(os.path.join(out, "config.json")) as f:
        m = json.load(f)["model"]
    assert (m["d_model"], m["n_layers"], m["ffn_dim"], m["attention"]) == (32, 2, 64, "msa"), f"model: {m}"
    # an explicit key that contradicts the checkpoint: both values named
    rc, log, err = train_files([recipe], os.path.join(tmp, "contradiction"),
                               shrink + [f"train.init_from={start}", "model.d_model=48"])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, f"want one error line, got {rc}: {err}"
    for needle in ("model.d_model = 48", "model.d_model = 32", start, "indexer_finetune.json"):
        assert needle in lines[0], f"the message lacks {needle!r}: {lines[0]}"
    # a context extension on init_from is allowed to differ: YaRN over the checkpoint's 64-token context
    out = os.path.join(tmp, "yarn")
    rc, log, err = train_files([recipe], out, shrink + [f"train.init_from={start}", "model.rope_scaling=yarn",
                                                        "model.rope_factor=4", "model.rope_original_max_position=64",
                                                        "train.seq_len=256", "train.batch_size=1"])
    assert rc == 0, f"YaRN extension failed ({rc}):\n{log[-2000:]}\n{err[-2000:]}"
    with open(os.path.join(out, "config.json")) as f:
        m = json.load(f)["model"]
    assert m["rope_scaling"] == "yarn" and m["d_model"] == 32, f"model: {m}"


def main():
    if not os.path.exists(EVAL) or not os.path.exists(os.path.join(ROOT, "data/shakespeare_long/val.h5")) or \
            not os.path.exists(os.path.join(ROOT, "data/shakespeare/train.h5")):
        print(f"{TRAIN}, {EVAL} or the Shakespeare data is missing: run make, make data and make data-long first")
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    for fn in TESTS:
        tmp = tempfile.mkdtemp(prefix="msa_workflow_")
        try:
            fn(tmp)
            print(f"  ok   {fn.__name__}")
            passed += 1
        except Exception:
            print(f"  FAIL {fn.__name__}")
            traceback.print_exc(file=sys.stdout)
            failed += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
