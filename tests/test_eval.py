#!/usr/bin/env python3
"""build/eval (passkey retrieval, per-position loss, MSA recall by length) and tools/plot_eval.py, on tiny
models trained two steps.

A model that small retrieves nothing, so the grid's machinery is held to an independent reference instead:
the prompts are rebuilt here from the documented template, run through build/forward, and scored with numpy
(argmax at the answer positions, log-softmax of the key); teacher-forced scoring is checked against real
greedy decoding, one token at a time; the per-position loss is recomputed from build/forward's logits; recall
is 1 when every block is selected and below 1 when few are.

Run with the project's virtual environment: .venv/bin/python tests/test_eval.py
"""
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402
from pyharness import expect_error_line  # noqa: E402

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
EVAL = os.path.join(ROOT, "build", "eval")
FORWARD = os.path.join(ROOT, "build", "forward")
TRAIN = os.path.join(ROOT, "build", "train")
VAL = os.path.join(ROOT, "data", "shakespeare", "val.h5")

# the template tools/eval.c documents, written out again here
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is "


def needle(key):
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
        "train.steps=2", "train.seq_len=32", "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1",
        "train.sample_tokens=0", "optim.warmup_steps=1"]
MSA = ["model.attention=msa", "msa.block_size=8", "msa.topk_blocks=2", "msa.index_dim=8", "msa.recall_stride=1"]
INV = {}  # token -> character of Shakespeare's alphabet
MODELS = {}  # kind -> (config.json, checkpoint), trained once per run
SCRATCH = tempfile.mkdtemp(prefix="msa_test_eval_models_")

def must(cmd):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def model(kind):
    if kind not in MODELS:
        out = os.path.join(SCRATCH, kind)
        sets = TINY + (MSA if kind == "msa" else []) + [f"train.out_dir={out}"]
        must([TRAIN, os.path.join(ROOT, "configs", "tiny.json")] + [a for s in sets for a in ("--set", s)])
        MODELS[kind] = (os.path.join(out, "config.json"), os.path.join(out, "ckpt_00000002.h5"))
    return MODELS[kind]


def run_eval(kind, work, *args):
    cfg, ckpt = model(kind)
    out = os.path.join(work, f"eval_{kind}.json")
    r = must([EVAL, cfg, ckpt, "--json", out, *args])
    with open(out) as f:
        return json.load(f), r.stdout


def vocab_of(path):
    with h5py.File(path, "r") as f:
        v = f.attrs["vocab"]
    v = v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return {c: i for i, c in enumerate(v)}


def logits(kind, ids, work):
    cfg, ckpt = model(kind)
    tok, out = os.path.join(work, "tokens.h5"), os.path.join(work, "logits.h5")
    with h5py.File(tok, "w") as f:
        f.create_dataset("tokens", data=np.asarray(ids, dtype=np.int32))
    must([FORWARD, cfg, ckpt, tok, out])
    with h5py.File(out, "r") as f:
        return f["logits"][()].astype(np.float64)


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def prompt(length, depth, key, enc):
    """The prompt text of context length `length` tokens (char tokenizer: one token a character)."""
    fill = length - len(INTRO) - len(needle(key)) - len(QUESTION)
    p = math.floor(depth * fill + 0.5)
    text = FILLER * (fill // len(FILLER) + 1)
    s = INTRO + text[:p] + needle(key) + text[p:fill] + QUESTION
    assert len(s) == length
    return [enc[c] for c in s], len(INTRO) + p


# ---- tests -----------------------------------------------------------------------------------------------

@test
def passkey_prompts_and_scores_match_a_reference(work):
    lengths, depths, trials, K = [256, 320], [0.0, 1.0], 2, 4
    res, out = run_eval("dense", work, "--data", VAL, "--lengths", ",".join(map(str, lengths)), "--depths",
                        ",".join(map(str, depths)), "--trials", str(trials), "--key-length", str(K), "--loss-windows", "0")
    pk = res["passkey"]
    check(pk["lengths"] == lengths and pk["depths"] == depths and len(pk["trials"]) == 8, f"grid {pk}")
    check("recall_by_length" not in res and all(t["recall"] is None for t in pk["trials"]), "recall of a dense model")
    check("position_loss" not in res, "--loss-windows 0 still measured the loss")
    enc = vocab_of(VAL)
    INV.update({i: c for c, i in enc.items()})
    keys = [t["key"] for t in pk["trials"]]
    # Shakespeare's alphabet lacks most digits: keys of lowercase letters, random per trial
    check(all(len(k) == K and k.isalpha() and k.islower() for k in keys) and len(set(keys)) > 4, f"keys {keys}")
    correct = {}
    for t in pk["trials"]:
        ids, at = prompt(t["length"], t["depth"], t["key"], enc)
        check(t["needle_at"] == at, f"needle at {t['needle_at']}, the template puts it at {at}")
        key_ids = [enc[c] for c in t["key"]]
        lp = log_softmax(logits("dense", ids + key_ids[:-1], work)[t["length"] - 1:])
        argmax = [int(np.argmax(row)) for row in lp]
        # greedy decoding's output up to its first wrong token
        wrong = [k for k in range(K) if argmax[k] != key_ids[k]]
        answer = argmax[:wrong[0] + 1] if wrong else argmax
        check(t["answer_tokens"] == answer, f"answer {t['answer_tokens']}, the logits' argmax {argmax}")
        want_lp = float(sum(lp[k, key_ids[k]] for k in range(K)))
        check(abs(t["key_logprob"] - want_lp) < 1e-4 * max(1.0, abs(want_lp)), f"key log-prob {t['key_logprob']} "
              f"!= {want_lp}")
        check(t["correct"] == (answer == key_ids), "exact match")
        correct.setdefault((t["length"], t["depth"]), []).append(answer == key_ids)
    for li, L in enumerate(lengths):
        for di, d in enumerate(depths):
            check(pk["accuracy"][li][di] == np.mean(correct[(L, d)]), f"accuracy at {L}, {d}")
    check("passkey exact-match accuracy" in out and "| 1.00 |" in out, f"table:\n{out}")

    # teacher forcing scores what greedy decoding answers: decode one trial token by token
    t = pk["trials"][-1]
    ids, _ = prompt(t["length"], t["depth"], t["key"], enc)
    decoded = greedy(ids, K, work)
    n = len(t["answer_tokens"])
    check(decoded[:n] == t["answer_tokens"] and t["correct"] == (decoded == [enc[c] for c in t["key"]]),
          f"greedy decoding gives {decoded}, the eval {t['answer_tokens']} (correct: {t['correct']})")

    # a hand-made retrieval: a key this model answers anyway (its greedy answer to a prompt with that key)
    # must score 1, checked by decoding the prompt of that key here
    L, d = 256, 0.5
    first = "".join(INV[x] for x in greedy(prompt(L, d, "abcd", enc)[0], K, work))
    echo = "".join(INV[x] for x in greedy(prompt(L, d, first, enc)[0], K, work))
    check(echo == first, f"no fixed point for the hand-made case: {first!r} answers {echo!r}")
    res, _ = run_eval("dense", work, "--data", VAL, "--lengths", str(L), "--depths", str(d), "--trials", "2", "--key",
                      first, "--loss-windows", "0")
    t = res["passkey"]["trials"]
    check(res["passkey"]["accuracy"] == [[1.0]] and all(x["correct"] and x["answer"] == first for x in t),
          f"the model answers {first!r} to its own key: {res['passkey']}")


def greedy(ids, K, work):
    decoded = []
    for _ in range(K):
        decoded.append(int(np.argmax(logits("dense", ids + decoded, work)[-1])))
    return decoded


def write_docs(path, lengths):
    """A char token file of documents of these lengths cut from Shakespeare's validation text."""
    with h5py.File(VAL, "r") as f:
        tokens, attrs = f["tokens"][:sum(lengths)], dict(f.attrs)
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=tokens.astype(np.int32))
        f.create_dataset("doc_offsets", data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        for k, v in attrs.items():
            f.attrs[k] = v
    return tokens


@test
def per_position_loss_is_the_mean_over_positions(work):
    data = os.path.join(work, "docs.h5")
    lens = [30, 70, 40, 100]
    tokens = write_docs(data, lens)
    T, buckets = 64, 4
    res, out = run_eval("dense", work, "--data", data, "--lengths", "256", "--depths", "0.5", "--trials", "1",
                        "--loss-length", str(T), "--loss-windows", "2", "--buckets", str(buckets))
    pl = res["position_loss"]
    check(pl["length"] == T and pl["windows"] == 2, f"{pl}")
    # one window of T + 1 tokens fits in each of the documents of 70 and 100 tokens, at 30 and 140
    nll = []
    for start in (30, 140):
        ids = tokens[start:start + T + 1]
        lp = log_softmax(logits("dense", ids[:T], work))
        nll.append(-lp[np.arange(T), ids[1:]])
    nll = np.stack(nll)
    for b, got in enumerate(pl["buckets"]):
        lo, hi = T * b // buckets, T * (b + 1) // buckets
        want = nll[:, lo:hi].mean()
        check(got["start"] == lo and got["end"] == hi and got["tokens"] == 2 * (hi - lo), f"bucket {got}")
        check(abs(got["loss"] - want) < 1e-5, f"bucket {b}: loss {got['loss']}, the logits give {want}")
    check("per-position loss (2 windows" in out, out)
    # a third window does not fit: the message names the file and the longest document
    cfg, ckpt = model("dense")
    r = subprocess.run([EVAL, cfg, ckpt, "--data", data, "--lengths", "256", "--trials", "1", "--loss-length",
                        str(T), "--loss-windows", "3"], cwd=ROOT, capture_output=True, text=True)
    expect_error_line(r, data, "--loss-windows", "2 windows", "has 100 tokens")
    # windows every T tokens inside a document: 4 of a 4T + 1 token document, positions restarting at 0
    tokens = write_docs(data, [4 * T + 1])
    res, _ = run_eval("dense", work, "--data", data, "--lengths", "256", "--depths", "0.5", "--trials", "1",
                      "--loss-length", str(T), "--loss-windows", "4", "--buckets", "1")
    nll = [-log_softmax(logits("dense", tokens[w * T:(w + 1) * T], work))[np.arange(T), tokens[w * T + 1:(w + 1) * T + 1]]
           for w in range(4)]
    got = res["position_loss"]["buckets"][0]["loss"]
    check(abs(got - np.mean(nll)) < 1e-5, f"4 windows of one document: {got}, the logits give {np.mean(nll)}")


@test
def msa_recall_by_length(work):
    few, _ = run_eval("msa", work, "--data", VAL, "--lengths", "256,512", "--depths", "0.5", "--trials", "1",
                      "--loss-windows", "0")
    rec = few["recall_by_length"]
    check([x["length"] for x in rec] == [256, 512], f"{rec}")
    # 2 of 32 or 64 blocks of 8 tokens: a near-uniform untrained attention leaves much of its mass outside
    check(all(0 < x["recall"] < 0.95 for x in rec), f"recall with 2 blocks selected: {rec}")
    check(all(t["recall"] is not None for t in few["passkey"]["trials"]), "per-trial recall")
    every, out = run_eval("msa", work, "--data", VAL, "--lengths", "256,512", "--depths", "0.5", "--trials", "1",
                          "--loss-windows", "0", "--set", "msa.topk_blocks=100")
    check(all(abs(x["recall"] - 1) < 1e-5 for x in every["recall_by_length"]), f"every block selected: {every}")
    check("indexer recall by context length" in out, out)


@test
def bad_inputs_fail_with_one_line(work):
    cfg, ckpt = model("dense")
    hf = os.path.join(work, "hf.h5")
    write_docs(hf, [300])
    with h5py.File(hf, "a") as f:
        f.attrs["tokenizer"] = np.bytes_(b"hf:tiny")
    cases = [
        (["--data", hf], [hf, "char", "byte"]),
        (["--data", VAL, "--lengths", "200"], ["--lengths 200", "shorter than the passkey prompt"]),
        (["--data", VAL, "--depths", "0.5,2"], ["--depths", "\"2\""]),
        (["--lengths", "300"], ["--data"]),
    ]
    for args, needles in cases:
        r = subprocess.run([EVAL, cfg, ckpt, *args], cwd=ROOT, capture_output=True, text=True)
        if args[0] == "--lengths":  # the usage comes first
            check(r.returncode == 1 and all(n in r.stderr for n in needles), f"{args}: {r.returncode} {r.stderr}")
        else:
            expect_error_line(r, *needles)


@test
def plot_draws_before_and_after(work):
    res, _ = run_eval("msa", work, "--data", VAL, "--lengths", "256", "--depths", "0,1", "--trials", "1",
                      "--loss-length", "64", "--loss-windows", "1")
    js = os.path.join(work, "eval_msa.json")
    png = os.path.join(work, "pic", "eval.png")
    r = must([PY, os.path.join(ROOT, "tools", "plot_eval.py"), js, js, "--labels", "before,after", "-o", png])
    with open(png, "rb") as f:
        check(f.read(8) == b"\x89PNG\r\n\x1a\n", "not a PNG")
    for title in ("passkey accuracy: before", "passkey accuracy: after", "per-position loss", "MSA indexer recall"):
        check(title in r.stdout, f"panel {title!r} missing: {r.stdout}")
    bad = os.path.join(work, "bad.json")
    with open(bad, "w") as f:
        f.write('{"passkey": {}}')
    expect_error_line(subprocess.run([PY, os.path.join(ROOT, "tools", "plot_eval.py"), bad], capture_output=True,
                                     text=True), bad, "build/eval")


def main():
    try:
        return pyharness.run(TESTS, "msa_test_eval_", (EVAL, FORWARD, TRAIN))
    finally:
        import shutil
        shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
