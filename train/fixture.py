"""Build a small offline dataset: a sentencepiece BPE tokenizer + train/val shards.

Default text source: the docstrings of the Python standard library (present on every Python
installation; ~4,400 docstrings >= 80 chars, ~1.6 MB on CPython 3.11 -> ~0.66 M tokens at vocab
1024), optionally plus the module sources themselves (``include_sources``, ~10x more text).
Any text files can be given instead: ``.jsonl`` files are read as one ``{"text": ...}`` document
per line, other files are cut into documents of consecutive paragraphs of >= 1,500 characters.

Tokenizer: BPE, ``byte_fallback=True`` (every byte is representable, so BPB byte counts are exact),
ids pad 0 / BOS 1 / EOS 2 / UNK 3 as in the challenge's sp1024, digits split, identity
normalization and no dummy prefix / whitespace folding, so ``decode(encode(doc)) == doc`` for
any text without the ``▁`` (U+2581) character.

Shards: every document is written as ``[BOS=1] + tokens`` (no EOS), in the challenge shard format
(``train/data.py``). Every ``val_every``-th document (after a seeded shuffle) goes to val.
The result is cached in ``out_dir`` keyed by the inputs, so re-running costs nothing.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sys
import sysconfig
import time
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .data import BOS_ID, read_shard, write_shard

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test", "lib2to3", "ensurepip"}


def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dp, dn, fn in os.walk(root):
        dn[:] = sorted(d for d in dn if d not in _SKIP_DIRS and not d.startswith("config-"))
        files += [os.path.join(dp, f) for f in sorted(fn) if f.endswith(".py")]
    return files


def stdlib_documents(include_sources: bool = False, min_chars: int = 80) -> List[str]:
    """Docstrings (module, class, function) of the standard library, + module sources if asked."""
    docs = []
    for p in stdlib_files():
        try:
            with open(p, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= min_chars:
                    docs.append(d)
        if include_sources and len(src) >= min_chars:
            docs.append(src)
    return docs


def file_documents(paths: Sequence[str], min_chars: int = 1500) -> List[str]:
    docs = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"fixture text file not found: {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            if p.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        t = json.loads(line).get("text", "")
                        if t:
                            docs.append(t)
                continue
            text = f.read().replace("\r\n", "\n")
        cur = []
        n = 0
        for para in text.split("\n\n"):
            if not para.strip():
                continue
            cur.append(para)
            n += len(para)
            if n >= min_chars:
                docs.append("\n\n".join(cur))
                cur, n = [], 0
        if cur:
            docs.append("\n\n".join(cur))
    return docs


def train_tokenizer(docs: Sequence[str], model_prefix: str, vocab_size: int = 1024, seed_lines: int = 300_000):
    """Train a BPE sentencepiece model on the documents' non-empty lines; returns the .model path."""
    import sentencepiece as spm

    lines = [ln for d in docs for ln in d.split("\n") if ln.strip()]
    if not lines:
        raise ValueError("train_tokenizer: no text")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, split_digits=True,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.9995, num_threads=max(1, min(8, os.cpu_count() or 1)),
        input_sentence_size=seed_lines, shuffle_input_sentence=True, max_sentence_length=16384,
        minloglevel=2, hard_vocab_limit=False,
    )
    return model_prefix + ".model"


def encode_documents(sp, docs: Sequence[str]) -> np.ndarray:
    """[BOS] + ids for every document, concatenated -> uint16 array."""
    ids = sp.encode(list(docs))
    total = sum(len(x) + 1 for x in ids)
    out = np.empty(total, dtype=np.uint16)
    pos = 0
    for x in ids:
        out[pos] = BOS_ID
        out[pos + 1:pos + 1 + len(x)] = x
        pos += len(x) + 1
    return out


def decode_shard_documents(sp, tokens) -> List[str]:
    """Inverse of the shard layout: split at BOS and decode each document."""
    arr = np.asarray(tokens, dtype=np.int64)
    starts = np.flatnonzero(arr == BOS_ID)
    docs = []
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else len(arr)
        docs.append(sp.decode(arr[s + 1:e].tolist()))
    return docs


def build_fixture(out_dir: str, text_files: Optional[Sequence[str]] = None, vocab_size: int = 1024,
                  val_every: int = 20, seed: int = 0, include_sources: bool = False, log=print) -> dict:
    """Build (or reuse) tokenizer + shards in ``out_dir``; returns the fixture's info dict with
    ``tokenizer``, ``train_pattern``, ``val_pattern``, token and document counts."""
    if val_every < 2:
        raise ValueError(f"build_fixture: val_every must be >= 2, got {val_every}")
    key_src = json.dumps({"files": [os.path.abspath(p) for p in text_files] if text_files else None,
                          "sizes": [os.path.getsize(p) for p in text_files] if text_files else None,
                          "python": sys.version, "vocab": vocab_size, "val_every": val_every, "seed": seed,
                          "sources": include_sources, "v": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    d = os.path.join(out_dir, f"fixture-{key}")
    info_path = os.path.join(d, "fixture.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        try:
            read_shard(info["train_pattern"])
            read_shard(info["val_pattern"])
            if os.path.isfile(info["tokenizer"]):
                info["cached"] = True
                return info
        except (ValueError, KeyError):
            pass
    t0 = time.time()
    docs = file_documents(text_files) if text_files else stdlib_documents(include_sources)
    if len(docs) < 2 * val_every:
        raise ValueError(f"build_fixture: only {len(docs)} documents; need at least {2 * val_every}")
    random.Random(seed).shuffle(docs)
    val_docs = docs[::val_every]
    train_docs = [x for i, x in enumerate(docs) if i % val_every]
    import sentencepiece as spm

    model_path = train_tokenizer(train_docs, os.path.join(d, f"fixture_bpe{vocab_size}"), vocab_size)
    sp = spm.SentencePieceProcessor(model_file=model_path)
    train_tok = encode_documents(sp, train_docs)
    val_tok = encode_documents(sp, val_docs)
    tp = os.path.join(d, "fixture_train_000000.bin")
    vp = os.path.join(d, "fixture_val_000000.bin")
    write_shard(tp, train_tok)
    write_shard(vp, val_tok)
    info = dict(tokenizer=model_path, train_pattern=tp, val_pattern=vp, vocab_size=int(sp.vocab_size()),
                n_train_docs=len(train_docs), n_val_docs=len(val_docs), n_train_tokens=int(train_tok.size),
                n_val_tokens=int(val_tok.size), source=("files" if text_files else
                                                       "stdlib docstrings" + (" + sources" if include_sources else "")),
                build_seconds=round(time.time() - t0, 2))
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    if log:
        log(f"fixture: built {d} in {info['build_seconds']} s: {info['n_train_docs']} train docs / "
            f"{info['n_train_tokens']:,} tokens, {info['n_val_docs']} val docs / {info['n_val_tokens']:,} tokens")
    info["cached"] = False
    return info


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python3 -m train.fixture", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs/fixture")
    ap.add_argument("--text", nargs="*", default=None, help="text / .jsonl files (default: the stdlib's docstrings)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--val-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-sources", action="store_true")
    a = ap.parse_args(argv)
    info = build_fixture(a.out_dir, a.text, a.vocab_size, a.val_every, a.seed, a.include_sources)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
