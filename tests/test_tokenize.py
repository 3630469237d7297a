#!/usr/bin/env python3
"""tools/hf_tokenize.py: text -> HDF5 token files with a Hugging Face tokenizer.

A byte-level BPE tokenizer is trained here on a few sentences with the `tokenizers` library (no
network). Checks: tokenise -> decode gives back every document's exact text (UTF-8 beyond ASCII,
documents longer than the streaming chunk, --doc-separator, --eos), the train/val split loses
nothing, the file format (datasets, attributes, growable chunked tokens) is what data/dataset.h
describes and build/train trains on it (alone and as a data.train_mix of two corpora), memory stays
bounded on an input much larger than the chunk, and every bad input exits 1 with a message and no
output file; so does an output folder that is a file, unwritable or on a full disk (one error line,
an earlier output intact), and a missing one is created with its parents. Prints "N passed, N failed". Run with the project's virtual environment:
.venv/bin/python tests/test_tokenize.py
"""
import contextlib
import io
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyharness  # noqa: E402
from pyharness import TESTS, check, test  # noqa: E402

import h5py
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TOOL = os.path.join(ROOT, "tools", "hf_tokenize.py")
TRAIN = os.path.join(ROOT, "build", "train")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "Un éléphant, ça trompe énormément.",
    "中文分词测试，还有表情 🙂🚀",
    "tabs\tand  double  spaces\nand new lines\n\n",
]

DOCS = {
    "a.txt": "".join(SENTENCES[i % len(SENTENCES)] + ("\n" if i % 3 else " ") for i in range(200)),
    "b.txt": "Short document with ümlauts — and a dash.",
    "c.txt": "",  # empty: skipped
    "d.txt": "x" * 500 + " no newline in this long line " + "ü" * 300,  # cut at a space / a character boundary
    ".hidden": "never read",
}

def make_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 10, trainer)
    tok.save(path)
    return tok


def make_corpus(d):
    os.makedirs(d, exist_ok=True)
    for name, text in DOCS.items():
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.write(text)


def run(*args):
    return subprocess.run([PY, TOOL, *args], capture_output=True, text=True)


def must(*args):
    r = run(*args)
    if r.returncode != 0:
        raise AssertionError(f"hf_tokenize {' '.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def read(path):
    with h5py.File(path, "r") as f:
        return f["tokens"][()], f["doc_offsets"][()], dict(f.attrs), bytes(f["tokenizer_json"][()])


def decode_docs(tok, path):
    t, off, _, _ = read(path)
    return [tok.decode(t[off[i]:off[i + 1]].tolist(), skip_special_tokens=False) for i in range(len(off) - 1)]


def setup(work):
    tk = os.path.join(work, "tok", "tokenizer.json")
    os.makedirs(os.path.dirname(tk))
    tok = make_tokenizer(tk)
    corpus = os.path.join(work, "corpus")
    make_corpus(corpus)
    return tk, tok, corpus


EXPECTED_DOCS = [DOCS[n] for n in sorted(DOCS) if not n.startswith(".") and DOCS[n]]


@test
def round_trip_small_and_large_chunks(work):
    tk, tok, corpus = setup(work)
    for chunk in ("64", "100000"):
        out = os.path.join(work, "out" + chunk)
        must("--tokenizer", tk, "--val-fraction", "0", "--chunk-bytes", chunk, corpus, out)
        check(sorted(os.listdir(out)) == ["train.h5"], f"files: {os.listdir(out)}")
        got = decode_docs(tok, os.path.join(out, "train.h5"))
        check(got == EXPECTED_DOCS, f"chunk {chunk}: decoded documents differ from the text")


@test
def single_file_separator_and_eos(work):
    tk, tok, _ = setup(work)
    src = os.path.join(work, "one.txt")
    parts = ["first part 🙂", "second\npart", "", "third"]
    with open(src, "w", encoding="utf-8") as f:
        f.write("<doc>".join(parts))
    out = os.path.join(work, "out")
    must("--tokenizer", tk, "--val-fraction", "0", "--chunk-bytes", "16", "--doc-separator", "<doc>", "--eos",
         "<|endoftext|>", src, out)
    got = decode_docs(tok, os.path.join(out, "train.h5"))
    check(got == [p + "<|endoftext|>" for p in parts if p], f"documents {got}")
    t, off, _, _ = read(os.path.join(out, "train.h5"))
    eos = tok.token_to_id("<|endoftext|>")
    check(all(t[off[i + 1] - 1] == eos for i in range(len(off) - 1)), "every document ends with the EOS id")


@test
def split_loses_nothing(work):
    tk, tok, corpus = setup(work)
    out = os.path.join(work, "out")
    r = must("--tokenizer", tk, "--val-fraction", "0.2", "--chunk-bytes", "128", corpus, out)
    check("val.h5" in r.stdout, r.stdout)
    train, val = decode_docs(tok, os.path.join(out, "train.h5")), decode_docs(tok, os.path.join(out, "val.h5"))
    check(len(val) >= 1 and len(train) >= 1, f"{len(train)} train and {len(val)} val documents")
    # the split cuts one document at a line end: its halves are train's last and val's first document
    joined = train[:-1] + [train[-1] + val[0]] + val[1:]
    check(joined == EXPECTED_DOCS or train + val == EXPECTED_DOCS, "train + val differ from the text")
    total = sum(len(d.encode()) for d in EXPECTED_DOCS)
    val_bytes = sum(len(d.encode()) for d in val)
    check(0.1 * total < val_bytes < 0.3 * total, f"val holds {val_bytes} of {total} bytes for fraction 0.2")


@test
def whole_documents_split_at_the_nearest_document_start(work):
    tk, tok, corpus = setup(work)
    # the reference: document starts in bytes (file starts here, the empty c.txt's too) and the nearest one
    # to the split point of fraction F
    names = sorted(n for n in DOCS if not n.startswith("."))
    sizes = [len(DOCS[n].encode()) for n in names]
    total = sum(sizes)
    starts = [sum(sizes[:i]) for i in range(1, len(names)) if 0 < sum(sizes[:i]) < total]
    for frac in ("0.2", "0.5", "0.8"):
        target = int(total * (1 - float(frac)))
        at = min(starts, key=lambda b: abs(b - target))
        want_train = [DOCS[n] for n, b in zip(names, [sum(sizes[:i]) for i in range(len(names))]) if b < at and DOCS[n]]
        want_val = [DOCS[n] for n, b in zip(names, [sum(sizes[:i]) for i in range(len(names))]) if b >= at and DOCS[n]]
        for chunk in ("16", "100000"):
            out = os.path.join(work, f"whole{frac}_{chunk}")
            must("--tokenizer", tk, "--val-fraction", frac, "--whole-documents", "--chunk-bytes", chunk, corpus, out)
            train, val = decode_docs(tok, os.path.join(out, "train.h5")), decode_docs(tok, os.path.join(out, "val.h5"))
            check(train == want_train and val == want_val, f"fraction {frac}, chunk {chunk}: {len(train)} train "
                  f"and {len(val)} val documents, want {len(want_train)} and {len(want_val)}")
    # separators: documents "aaa", "bbbbbbbbbb", "cc" of one file; at 0.5 of 17 bytes (8) the nearest start
    # is the one after the first separator (4), not the second (15)
    src = os.path.join(work, "sep.txt")
    with open(src, "w") as f:
        f.write("aaa|bbbbbbbbbb|cc")
    for chunk in ("16", "100000"):
        out = os.path.join(work, "sep" + chunk)
        must("--tokenizer", tk, "--val-fraction", "0.5", "--whole-documents", "--doc-separator", "|", "--chunk-bytes",
             chunk, src, out)
        train, val = decode_docs(tok, os.path.join(out, "train.h5")), decode_docs(tok, os.path.join(out, "val.h5"))
        check(train == ["aaa"] and val == ["bbbbbbbbbb", "cc"], f"chunk {chunk}: {train} | {val}")


@test
def min_doc_tokens_keeps_the_long_documents_whole(work):
    tk, tok, corpus = setup(work)
    # the reference: each document tokenised alone (plus its EOS), the kept ones those of >= N tokens
    eos = tok.token_to_id("<|endoftext|>")
    lengths = [len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in EXPECTED_DOCS]
    n = sorted(lengths)[len(lengths) // 2]  # about half the documents survive
    want = [d + "<|endoftext|>" for d, k in zip(EXPECTED_DOCS, lengths) if k >= n]
    check(0 < len(want) < len(EXPECTED_DOCS), f"a test corpus with documents on both sides of {n}: {lengths}")
    for chunk in ("16", "100000"):  # documents in many pieces, and whole
        out = os.path.join(work, "long" + chunk)
        must("--tokenizer", tk, "--val-fraction", "0", "--chunk-bytes", chunk, "--eos", "<|endoftext|>",
             "--min-doc-tokens", str(n), corpus, out)
        got = decode_docs(tok, os.path.join(out, "train.h5"))
        check(got == want, f"chunk {chunk}: kept documents {got!r}, want {want!r}")
        t, off, _, _ = read(os.path.join(out, "train.h5"))
        check(all(off[i + 1] - off[i] >= n and t[off[i + 1] - 1] == eos for i in range(len(off) - 1)),
              "a kept document is shorter than --min-doc-tokens or lost its EOS")
    r = run("--tokenizer", tk, "--val-fraction", "0", "--min-doc-tokens", str(10 ** 9), corpus,
            os.path.join(work, "none"))
    check(r.returncode == 1 and "--min-doc-tokens" in r.stderr, f"no long document: {r.returncode} {r.stderr}")
    check(not os.path.exists(os.path.join(work, "none")), "a failed run left its output folder")


@test
def file_format(work):
    tk, tok, corpus = setup(work)
    out = os.path.join(work, "out")
    must("--tokenizer", tk, "--name", "tiny-bpe", "--val-fraction", "0", corpus, out)
    path = os.path.join(out, "train.h5")
    t, off, attrs, tj = read(path)
    with h5py.File(path, "r") as f:
        check(f["tokens"].dtype == np.int32 and f["doc_offsets"].dtype == np.int64, "dtypes")
        check(f["tokens"].maxshape == (None,) and f["tokens"].chunks is not None, "tokens must be growable, chunked")
    check(attrs["tokenizer"] == b"hf:tiny-bpe", f"tokenizer attribute {attrs['tokenizer']!r}")
    check(int(attrs["vocab_size"]) == tok.get_vocab_size(with_added_tokens=True), "vocab_size")
    check(off[0] == 0 and off[-1] == len(t) and np.all(np.diff(off) > 0), f"offsets {off}")
    check(t.min() >= 0 and t.max() < int(attrs["vocab_size"]), "ids outside the vocabulary")
    check(Tokenizer.from_str(tj.decode()).get_vocab() == tok.get_vocab(), "stored tokenizer_json")
    check(not any(n.endswith(".tmp") for n in os.listdir(out)), "temporary file left")


def tiny_config(path, data):
    cfg = {
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 32},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 0, "eval_batches": 1, "log_every": 1},
        "data": data,
    }
    with open(path, "w") as f:
        json.dump(cfg, f)


@test
def train_reads_the_files_and_a_mix(work):
    tk, tok, corpus = setup(work)
    out1, out2 = os.path.join(work, "out1"), os.path.join(work, "out2")
    must("--tokenizer", tk, "--val-fraction", "0.2", corpus, out1)
    other = os.path.join(work, "other.txt")
    with open(other, "w") as f:
        f.write("\n".join(SENTENCES[:3]) * 30)
    must("--tokenizer", tk, "--val-fraction", "0.2", other, out2)
    cfg = os.path.join(work, "cfg.json")
    tiny_config(cfg, {"train_path": os.path.join(out1, "train.h5"), "val_path": os.path.join(out1, "val.h5")})
    r = subprocess.run([TRAIN, cfg], capture_output=True, text=True)
    check(r.returncode == 0, f"build/train on hf_tokenize output: {r.stdout}{r.stderr}")
    mix = f"{os.path.join(out1, 'train.h5')}:0.7,{os.path.join(out2, 'train.h5')}:0.3"
    tiny_config(cfg, {"train_mix": mix, "val_path": os.path.join(out1, "val.h5")})
    r = subprocess.run([TRAIN, cfg], capture_output=True, text=True)
    check(r.returncode == 0, f"build/train with data.train_mix: {r.stdout}{r.stderr}")
    check("train_mix" in r.stdout or os.path.join(out2, "train.h5") in r.stdout, f"the mix is not reported: {r.stdout}")
    r = subprocess.run([TRAIN, cfg, "--set", f"data.train_path={os.path.join(out1, 'train.h5')}"], capture_output=True,
                       text=True)
    check(r.returncode == 1 and "data.train_path and data.train_mix" in r.stderr, f"both set: {r.stderr}")


@test
def streams_in_bounded_pieces(work):
    """In-process: text reaches the tokenizer in pieces of at most PIECE_BYTES, tokens reach the file in
    many appends of at most FLUSH_TOKENS + one batch, and the result decodes to the text."""
    tk, tok, _ = setup(work)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import hf_tokenize

    src = os.path.join(work, "text.txt")
    text = "".join(SENTENCES[i % len(SENTENCES)] + ("\n" if i % 5 else "") for i in range(3000))
    with open(src, "w", encoding="utf-8") as f:
        f.write(text)
    longest, appends, buffered = [0], [0], [0]
    orig_pieces, orig_flush = hf_tokenize.pieces, hf_tokenize.TokenWriter.flush

    def pieces(*a):
        for p in orig_pieces(*a):
            longest[0] = max(longest[0], len(p[2]))
            yield p

    def flush(self):
        appends[0] += 1
        buffered[0] = max(buffered[0], self.buf_len)
        orig_flush(self)

    saved = hf_tokenize.FLUSH_TOKENS, hf_tokenize.PIECE_BYTES
    hf_tokenize.pieces, hf_tokenize.TokenWriter.flush = pieces, flush
    hf_tokenize.FLUSH_TOKENS, hf_tokenize.PIECE_BYTES = 2000, 1000
    try:
        out = os.path.join(work, "out")
        with contextlib.redirect_stdout(io.StringIO()):  # its summary lines
            code = hf_tokenize.main(["--tokenizer", tk, "--val-fraction", "0", "--chunk-bytes", "4096", src, out])
    finally:
        hf_tokenize.pieces, hf_tokenize.TokenWriter.flush = orig_pieces, orig_flush
        hf_tokenize.FLUSH_TOKENS, hf_tokenize.PIECE_BYTES = saved
    check(code == 0, f"exit {code}")
    t, off, _, _ = read(os.path.join(out, "train.h5"))
    check(tok.decode(t.tolist()) == text and len(off) == 2, "decoded text differs")
    check(0 < longest[0] <= 1000, f"a piece of {longest[0]} bytes")
    check(appends[0] >= len(t) // 4100, f"{appends[0]} appends for {len(t)} tokens")
    check(buffered[0] <= 2000 + 4096, f"{buffered[0]} tokens buffered")


@test
def memory_follows_the_chunk_not_the_corpus(work):
    """1 MB and 3 MB of text (~0.7M and ~2M tokens) peak at about the same memory."""
    tk, _, _ = setup(work)
    block = "".join(s + "\n" for s in SENTENCES).encode()
    probe = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], "
             "run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
             "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)\n")

    def peak_kib(mib):
        src, out = os.path.join(work, f"{mib}.txt"), os.path.join(work, f"o{mib}")
        with open(src, "wb") as f:
            for _ in range((mib << 20) // len(block) + 1):
                f.write(block)
        r = subprocess.run([PY, "-c", probe, TOOL, "--tokenizer", tk, "--val-fraction", "0", "--chunk-bytes",
                            str(128 << 10), src, out], capture_output=True, text=True)
        check(r.returncode == 0, r.stderr)
        with h5py.File(os.path.join(out, "train.h5"), "r") as f:
            n = f["tokens"].shape[0]
        return int(r.stderr.split("maxrss")[-1].split()[0]), n

    base, _ = peak_kib(1)
    peak, n = peak_kib(3)
    check(n > 1_500_000, f"only {n} tokens")
    # the extra ~1.3M tokens held as Python ints (> 30 bytes each) would add > 40 MiB; the token
    # buffer (at most 1M int32 before each append) explains the rest
    check(peak - base < 32 * 1024, f"peak memory grew by {(peak - base) / 1024:.0f} MiB from 1 MB to 3 MB of text")


@test
def bad_inputs_fail_cleanly(work):
    tk, _, corpus = setup(work)

    def expect(needles, *args):
        out = os.path.join(work, "out_bad")
        r = run(*args, out)
        check(r.returncode == 1, f"exit {r.returncode}: {r.stderr}")
        check(r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr)
        for n in needles:
            check(n in r.stderr, f"message lacks {n!r}: {r.stderr}")
        check(not os.path.exists(out), f"output left: {os.listdir(out) if os.path.isdir(out) else out}")

    expect(["nope.json"], "--tokenizer", os.path.join(work, "nope.json"), corpus)
    bad = os.path.join(work, "bad.json")
    with open(bad, "w") as f:
        f.write("{\"not\": \"a tokenizer\"}")
    expect(["bad.json", "not a Hugging Face tokenizer.json"], "--tokenizer", bad, corpus)
    expect(["missing_input"], "--tokenizer", tk, os.path.join(work, "missing_input"))
    latin1 = os.path.join(work, "latin1.txt")
    with open(latin1, "wb") as f:
        f.write("caf\u00e9 ok\n".encode() + "na\u00efve".encode("latin-1"))
    expect(["latin1.txt", "not UTF-8"], "--tokenizer", tk, "--val-fraction", "0", latin1)
    expect(["--eos", "<eos>"], "--tokenizer", tk, "--eos", "<eos>", corpus)
    empty = os.path.join(work, "empty.txt")
    open(empty, "w").close()
    expect(["empty input"], "--tokenizer", tk, empty)
    expect(["--val-fraction"], "--tokenizer", tk, "--val-fraction", "1.5", corpus)


@test
def output_folder_failures(work):
    tk, _, corpus = setup(work)
    pyharness.output_folder_failures(work, lambda out: [PY, TOOL, "--tokenizer", tk, corpus, out],
                                     ["train.h5", "val.h5"])


def main():
    return pyharness.run(TESTS, "msa_test_tokenize_", (TRAIN,))


if __name__ == "__main__":
    sys.exit(main())
