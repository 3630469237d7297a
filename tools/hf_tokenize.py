#!/usr/bin/env python3
"""Text -> HDF5 token files with a Hugging Face tokenizer (tokenizer.json, through the `tokenizers`
package), in the format data/dataset.h describes (the same files build/prepare_text writes).

    python3 tools/hf_tokenize.py --tokenizer TOKENIZER.json [--name NAME] [--val-fraction F]
                                 [--doc-separator STR] [--eos TOKEN] [--chunk-bytes N]
                                 [--whole-documents] [--min-doc-tokens N] INPUT OUTDIR

INPUT is a UTF-8 text file, or a directory whose regular files (sorted by name, hidden ones skipped)
are one document each; --doc-separator also cuts files into documents at that string (dropped; empty
documents are skipped). --eos appends that token (e.g. "<|endoftext|>") to every document. The last
F of the input bytes (default 0.1; cut at the first line end after that point) go to OUTDIR/val.h5,
the rest to OUTDIR/train.h5; F = 0 writes no val file. --whole-documents moves the split to the document
start nearest that point instead, so that no document is cut (an input of one document is still cut). --min-doc-tokens N keeps only the documents of at least N tokens (the EOS
included) in each file: a length bucket for long-context training and evaluation (build/prepare_text has
the same option).

Streaming: files are read --chunk-bytes at a time (default 4 MiB), tokenised in batches of about that
many bytes, and the token and document-offset datasets are extended as tokens arrive, so memory stays
bounded whatever the corpus size. A document longer than a chunk is tokenised in pieces cut at line
ends (else at a space, else at a character boundary); for byte-level BPE tokenizers decoding still
gives back the exact text.

Each file holds: tokens int32 (chunked, shuffle + deflate), doc_offsets int64, attributes vocab_size
(int32) and tokenizer ("hf:<name>", at most 31 characters), and the dataset tokenizer_json (the
tokenizer itself, as bytes) so the tokens can be decoded later. OUTDIR is created with its parents;
each file is written as NAME.h5.tmp and renamed into place once both are complete and checked. Any
problem (bad input; an OUTDIR that is a file, not writable or on a full disk) exits 1 with one error
line and leaves OUTDIR as it was.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tool_common, however the tool is started

from tool_common import Fail, Hdf5Writer, exit_with, make_out_dir, remove_dirs, report

import numpy as np

CHUNK_TOKENS = 1 << 16  # HDF5 chunk of the tokens dataset (256 KiB of int32), as prepare_text
FLUSH_TOKENS = 1 << 20  # tokens buffered in memory before they are appended to the file
PIECE_BYTES = 1 << 16   # longest text the tokenizer encodes as one sequence
DEFLATE_LEVEL = 6


# ---- input ----------------------------------------------------------------------------------------------

def input_files(path):
    if not os.path.exists(path):
        raise Fail(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        return [path]
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError as e:
        raise Fail(f"{path}: cannot list the folder ({e.strerror})")
    files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not files:
        raise Fail(f"{path}: no text files in the directory")
    return files


def char_boundary(buf, lo, limit):
    """The largest i in (lo, limit] at which a UTF-8 character starts (or the end of buf); limit itself
    when there is none (invalid UTF-8, which the decode then reports)."""
    i = limit
    while i > lo and i < len(buf) and (buf[i] & 0xC0) == 0x80:
        i -= 1
    return i if i > lo else limit


def cut_point(buf, lo, limit):
    """Where a piece that starts at lo ends, at most at limit: after its last line end; else before its
    last space (byte-level BPE keeps a space with the word after it); else at a character boundary."""
    cut = buf.rfind(b"\n", lo, limit) + 1 or max(buf.rfind(b" ", lo + 1, limit), 0)
    return cut if cut > lo else char_boundary(buf, lo, limit)


def pieces(paths, sep, chunk):
    """Yields (path, starts_document, bytes, global byte offset): the documents of the input in pieces
    of at most PIECE_BYTES, cut at line ends where possible. The tokenizer encodes a batch of pieces in
    parallel, and each piece's transient memory stays small. Holds at most about chunk + PIECE_BYTES
    bytes of text."""
    piece = min(chunk, PIECE_BYTES)
    keep = len(sep) - 1 if sep else 0  # a tail that may be the start of a separator split across reads
    pos = 0  # global offset of buf[0]
    for path in paths:
        start = True
        buf = b""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise Fail(f"{path}: cannot read ({e.strerror})")
        with f:
            eof = False
            while not eof:
                data = f.read(chunk)
                eof = not data
                buf += data
                i = 0  # bytes of buf consumed
                while True:
                    j = buf.find(sep, i) if sep else -1
                    final = j >= 0 or eof  # the document text ends at `end`
                    end = j if j >= 0 else len(buf) if eof else len(buf) - keep
                    # strictly longer than a piece: then buf[i + piece] exists and tells whether a
                    # character continues past the cut
                    while end - i > piece or (final and end > i):
                        cut = end if end - i <= piece else cut_point(buf, i, i + piece)
                        yield path, start, buf[i:cut], pos + i
                        start = False
                        i = cut
                    if j < 0:
                        break
                    start = True
                    i = j + len(sep)
                pos += i
                buf = buf[i:]


def nearest_document_start(paths, sep, chunk, target, total):
    """The global byte offset of the document start nearest target (each file's start, and the byte after
    each separator), other than the input's start and end; None when there is none (one document). Reads
    the input once, chunk bytes at a time, as pieces() finds the separators: left to right, not overlapping."""
    best, pos = None, 0

    def consider(b):
        nonlocal best
        if 0 < b < total and (best is None or abs(b - target) < abs(best - target)):
            best = b

    for path in paths:
        consider(pos)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise Fail(f"{path}: cannot read ({e.strerror})")
        with f:
            tail, base, free_from = b"", pos, pos  # base: offset of tail[0]; free_from: end of the last match
            while sep:
                data = f.read(chunk)
                if not data:
                    break
                buf = tail + data
                i = buf.find(sep)
                while i >= 0:
                    if base + i >= free_from:
                        free_from = base + i + len(sep)
                        consider(free_from)
                    i = buf.find(sep, i + 1)
                cut = max(len(buf) - (len(sep) - 1), 0)  # a separator may start in the last len(sep) - 1 bytes
                base, tail = base + cut, buf[cut:]
        pos += os.path.getsize(path)
    return best


def split_pieces(stream, split_at, at_document=False):
    """Tags each piece with its output (0 = train, 1 = val): bytes from global offset split_at on go to
    val, the piece holding that offset cut at its first line end at or after it (at_document: split_at is
    a document start, where pieces start, so nothing is cut). The first val piece always starts a document."""
    if split_at is None:
        for piece in stream:
            yield piece + (0,)
        return
    switched, first_val = False, True
    for path, start, data, pos in stream:
        if not switched and pos + len(data) > split_at:
            at = max(split_at - pos, 0)
            cut = at if at_document else data.find(b"\n", at) + 1
            if cut <= 0:
                cut = char_boundary(data, 0, at) if 0 < at < len(data) else at
            if cut > 0:
                yield path, start, data[:cut], pos, 0
            switched = True
            data, pos, start = data[cut:], pos + cut, True
            if not data:
                continue
        if switched and first_val:
            start, first_val = True, False
        yield path, start, data, pos, 1 if switched else 0


# ---- output ---------------------------------------------------------------------------------------------

class TokenWriter:
    """One token file, grown as tokens arrive (written to path.tmp; the caller renames it)."""

    def __init__(self, path, vocab_size, name, tokenizer_json, min_doc_tokens=0):
        self.path, self.tmp = path, path + ".tmp"
        self.min_doc_tokens = min_doc_tokens
        self.out = Hdf5Writer(self.tmp)
        try:
            self.create(vocab_size, name, tokenizer_json)
        except BaseException:
            self.out.discard()
            raise
        self.n_tokens = 0       # in the file and the buffer
        self.n_docs = 0
        self.buf, self.buf_len = [], 0
        self.off_buf = []
        self.in_doc = False     # the current document has tokens
        # the current document's tokens not yet in buf: all of them with min_doc_tokens (its length decides
        # whether it is kept), else none (streamed as they come)
        self.doc, self.doc_len, self.doc_kept = [], 0, False

    def create(self, vocab_size, name, tokenizer_json):
        f = self.out.file
        with self.out.writing():
            self.tokens = self.out.hold(f.create_dataset(
                "tokens", shape=(0,), maxshape=(None,), dtype="<i4", chunks=(CHUNK_TOKENS,), shuffle=True,
                compression="gzip", compression_opts=DEFLATE_LEVEL))
            self.offsets = self.out.hold(f.create_dataset(
                "doc_offsets", shape=(0,), maxshape=(None,), dtype="<i8", chunks=(1 << 14,), compression="gzip",
                compression_opts=DEFLATE_LEVEL))
            f.attrs.create("vocab_size", np.int32(vocab_size))
            # a fixed-length string, as prepare_text writes (dataset.c reads both kinds)
            f.attrs.create("tokenizer", np.bytes_(name.encode("utf-8")))
            self.out.hold(f.create_dataset("tokenizer_json", data=np.frombuffer(tokenizer_json, dtype=np.uint8),
                                           compression="gzip", compression_opts=DEFLATE_LEVEL))
        self.out.flush()

    def add(self, start, ids, eos):
        if start and self.in_doc:
            self.end_doc(eos)
        if not ids:
            return
        self.in_doc = True
        self.doc.append(np.asarray(ids, dtype=np.int32))
        self.doc_len += len(ids)
        if not self.min_doc_tokens:
            self.keep_doc()

    def keep_doc(self):
        """Moves the current document's held tokens to the file's buffer (its offset with the first)."""
        if not self.doc:
            return
        if not self.doc_kept:
            self.off_buf.append(self.n_tokens)
            self.n_docs += 1
            self.doc_kept = True
        for a in self.doc:
            self.buf.append(a)
            self.buf_len += a.size
            self.n_tokens += a.size
        self.doc = []
        if self.buf_len >= FLUSH_TOKENS:
            self.flush()

    def end_doc(self, eos):
        if self.in_doc and eos is not None:
            self.doc.append(np.array([eos], dtype=np.int32))
            self.doc_len += 1
        if self.doc_len >= self.min_doc_tokens:
            self.keep_doc()
        self.doc, self.doc_len, self.doc_kept = [], 0, False
        self.in_doc = False

    def flush(self):
        with self.out.writing():
            for ds, parts in ((self.tokens, self.buf), (self.offsets, self.off_buf)):
                if not len(parts):
                    continue
                a = np.concatenate(parts) if ds is self.tokens else np.asarray(parts, dtype=np.int64)
                n = ds.shape[0]
                ds.resize((n + a.size,))
                ds[n:] = a
        self.out.flush()  # a full disk shows here, one buffer at a time
        self.buf, self.buf_len, self.off_buf = [], 0, []

    def finish(self, eos):
        self.end_doc(eos)
        self.off_buf.append(self.n_tokens)
        self.flush()
        self.out.close()
        check_file(self.tmp)

    def abort(self):
        self.out.discard()


def check_file(path):
    """Reads a written file back through the checks data/dataset.c makes (in chunks, not whole)."""
    import h5py

    with h5py.File(path, "r") as f:
        tok, off = f["tokens"], f["doc_offsets"][()]
        n, v = tok.shape[0], int(f.attrs["vocab_size"])
        if n == 0:
            raise Fail(f"{path}: no tokens")
        if off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
            raise Fail(f"{path}: internal error: document offsets do not cover the tokens")
        for s in range(0, n, FLUSH_TOKENS):
            t = tok[s:s + FLUSH_TOKENS]
            if t.min() < 0 or t.max() >= v:
                raise Fail(f"{path}: internal error: token ids outside the vocabulary of {v}")


# ---- main -----------------------------------------------------------------------------------------------

def tokenizer_name(args):
    name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.tokenizer))) or "tokenizer"
    return ("hf:" + name)[:31]  # data/dataset.c keeps at most 31 characters


def run(args):
    from tokenizers import Tokenizer

    if not os.path.isfile(args.tokenizer):
        raise Fail(f"{args.tokenizer}: no such tokenizer file")
    try:
        with open(args.tokenizer, "rb") as f:
            tok_json = f.read()
    except OSError as e:
        raise Fail(f"{args.tokenizer}: cannot read ({e.strerror})")
    try:
        tok = Tokenizer.from_str(tok_json.decode("utf-8"))
    except Exception as e:  # the Rust library raises plain Exceptions
        raise Fail(f"{args.tokenizer}: not a Hugging Face tokenizer.json ({e})")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = None
    if args.eos is not None:
        eos = tok.token_to_id(args.eos)
        if eos is None:
            raise Fail(f"{args.tokenizer}: --eos {args.eos!r} is not a token of this tokenizer")
    if not 0 <= args.val_fraction < 1:
        raise Fail(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.min_doc_tokens < 0:
        raise Fail(f"--min-doc-tokens {args.min_doc_tokens}: must be >= 0")
    if args.chunk_bytes < 16:
        raise Fail(f"--chunk-bytes {args.chunk_bytes}: must be at least 16")
    sep = args.doc_separator.encode("utf-8") if args.doc_separator is not None else None
    if sep == b"":
        raise Fail("--doc-separator: the separator must not be empty")

    files = input_files(args.input)
    total = sum(os.path.getsize(p) for p in files)
    if total == 0:
        raise Fail(f"{args.input}: no text (empty input)")
    split_at = int(total * (1 - args.val_fraction)) if args.val_fraction > 0 else None
    at_document = None
    if split_at is not None and args.whole_documents:
        at_document = nearest_document_start(files, sep, args.chunk_bytes, split_at, total)
        split_at = at_document if at_document is not None else split_at

    created = make_out_dir(args.outdir)
    name = tokenizer_name(args)
    outs = []
    try:
        outs.append(TokenWriter(os.path.join(args.outdir, "train.h5"), vocab, name, tok_json, args.min_doc_tokens))
        if split_at is not None:
            outs.append(TokenWriter(os.path.join(args.outdir, "val.h5"), vocab, name, tok_json, args.min_doc_tokens))
        batch, batch_bytes = [], 0

        def encode(batch):
            encs = tok.encode_batch([text for _, _, text in batch], add_special_tokens=False)
            for (which, start, _), enc in zip(batch, encs):
                if which == 1 and outs[0].in_doc:
                    outs[0].end_doc(None)  # a document the split cuts continues in val.h5: no EOS at the cut
                outs[which].add(start, enc.ids, eos)

        for path, start, data, pos, which in split_pieces(pieces(files, sep, args.chunk_bytes), split_at,
                                                                  at_document is not None):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Fail(f"{path}: not UTF-8 text (invalid byte at offset {pos + e.start} of the input)")
            batch.append((which, start, text))
            batch_bytes += len(data)
            if batch_bytes >= args.chunk_bytes:
                encode(batch)
                batch, batch_bytes = [], 0
        if batch:
            encode(batch)
        for w, label in zip(outs, ("train", "validation")):
            if w.n_tokens == 0:
                if args.min_doc_tokens:
                    raise Fail(f"{args.input}: no document of the {label} part has at least --min-doc-tokens "
                               f"{args.min_doc_tokens} tokens")
                raise Fail(f"{args.input}: the {label} part has no tokens (too little text for --val-fraction "
                           f"{args.val_fraction}?)")
        for w in outs:
            w.finish(eos)
        for w in outs:  # only once every file is complete and checked
            try:
                os.replace(w.tmp, w.path)
            except OSError as e:
                raise Fail(f"{w.path}: cannot rename {w.tmp} into place ({e.strerror})")
    except BaseException:
        for w in outs:
            w.abort()
        remove_dirs(created)
        raise
    print(f"hf_tokenize: {args.input}: {len(files)} file{'s' if len(files) != 1 else ''}, {total} bytes, "
          f"tokenizer {name} (vocab {vocab})")
    for w in outs:
        print(f"  {w.path}: {w.n_tokens} tokens, {w.n_docs} document{'s' if w.n_docs != 1 else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/hf_tokenize.py",
                                 description="Tokenise text files with a Hugging Face tokenizer.json into HDF5 "
                                             "token files (OUTDIR/train.h5, OUTDIR/val.h5).")
    ap.add_argument("input", metavar="INPUT", help="a text file, or a directory of text files (one document each)")
    ap.add_argument("outdir", metavar="OUTDIR")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json of a Hugging Face tokenizer")
    ap.add_argument("--name", help="tokenizer name stored as \"hf:NAME\" (default: the tokenizer's directory name)")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of the input for val.h5 (default 0.1)")
    ap.add_argument("--doc-separator", help="also split files into documents at this string")
    ap.add_argument("--eos", help="token appended to every document, e.g. \"<|endoftext|>\"")
    ap.add_argument("--whole-documents", action="store_true",
                    help="split train/val at the document start nearest the split point (no document cut)")
    ap.add_argument("--min-doc-tokens", type=int, default=0,
                    help="keep only documents of at least this many tokens (default 0: all)")
    ap.add_argument("--chunk-bytes", type=int, default=4 << 20, help="bytes read and tokenised at a time")
    return report(run, ap.parse_args(argv))


if __name__ == "__main__":
    exit_with(main())
