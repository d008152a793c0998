"""Input checks shared by the training and eval drivers: refuse bad input before the expensive part.

Every check raises ``CheckError`` whose text is one line naming the argument, the value seen and
what was expected, e.g. ``--stride = 0: expected an integer in [1, 256] (the sliding-window step,
at most the window)``. ``run_cli`` turns these (and the other user-facing errors: bad shards,
tokenizers, artifacts) into ``error: <line>`` on stderr and exit code 2, with the traceback only
under ``--debug``.

What is checked, and why it must happen first:
  * globs match files, every shard header is valid and holds > 0 tokens (a 0-token train set made
    the token stream spin forever; an empty val shard failed after a 74 s warm-up);
  * token ids < vocabulary, one vectorized max per shard (id 65535 with vocab 1024 ended in a
    91-line ``torch.embedding`` traceback);
  * the tokenizer file exists, parses, fits the vocabulary, and is the one the artifact was trained
    with (sha256 + piece count recorded at training time: scoring with another tokenizer gave a
    silently wrong BPB);
  * numeric ranges (window / stride / chunk / share / lr / budget ...): ``--stride 0`` ran out of
    memory after 201 s, ``--window 0`` was read as 1024, ``--lr -1`` was accepted.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np


class CheckError(ValueError):
    """A command-line value is out of range or inconsistent: ``<arg> = <value>: expected <what>``."""

    def __init__(self, arg: str, value, expected: str):
        self.arg, self.value, self.expected = arg, value, expected
        super().__init__(f"{arg} = {value!r}: expected {expected}")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error:`` line (no multi-line usage dump), exit code 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------ numbers
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _out_of_range(arg: str, value, kind: str, lo, hi, lo_open: bool, hi_open: bool, spec: str, what: str):
    """CheckError for ``value`` outside the interval, e.g. ``an integer in [1, 256] (what)`` or ``a finite
    number > 0`` (bounds formatted with ``format(bound, spec)``; a None bound is left out)."""
    if lo is not None and hi is not None:
        rng = f"{kind} in {'(' if lo_open else '['}{lo:{spec}}, {hi:{spec}}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{kind} {'>' if lo_open else '>='} {lo:{spec}}"
    elif hi is not None:
        rng = f"{kind} {'<' if hi_open else '<='} {hi:{spec}}"
    else:
        rng = kind
    return CheckError(arg, value, rng + (f" ({what})" if what else ""))


def int_range(arg: str, value, lo: Optional[int] = None, hi: Optional[int] = None, what: str = "") -> int:
    """``value`` is an int in [lo, hi] (either bound may be None)."""
    if not (_is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)):
        raise _out_of_range(arg, value, "an integer", lo, hi, False, False, "", what)
    return int(value)


def float_range(arg: str, value, lo: Optional[float] = None, hi: Optional[float] = None, *,
                lo_open: bool = False, hi_open: bool = False, what: str = "") -> float:
    """``value`` is a finite number in the interval (bounds closed unless ``*_open``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    ok = math.isfinite(v) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise _out_of_range(arg, value, "a finite number", lo, hi, lo_open, hi_open, "g", what)
    return v


def share(arg: str, value: Optional[str]) -> Optional[Tuple[int, int]]:
    """``k/n`` with integers 0 <= k < n -> (k, n); None stays None."""
    if value is None:
        return None
    parts = str(value).split("/")
    try:
        k, n = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        k = n = None
    if k is None or not (n >= 1 and 0 <= k < n):
        raise CheckError(arg, value, "k/n with integers 0 <= k < n (this process takes every n-th batch from k)")
    return k, n


def budget(budget_arg: str, budget_s: float, margin_arg: str, margin_s: float) -> float:
    """Deadline budget > margin >= 0; returns the usable seconds ``budget - margin``."""
    float_range(margin_arg, margin_s, 0.0, what="seconds kept in reserve before the deadline")
    float_range(budget_arg, budget_s, margin_s, lo_open=True,
                what=f"seconds for the whole eval, more than {margin_arg} = {margin_s:g}")
    return float(budget_s) - float(margin_s)


def window(arg: str, value: int, seq_len: int) -> int:
    """A context window in [1, seq_len]: the model never saw positions past its training length."""
    return int_range(arg, value, 1, int(seq_len), what=f"context window, at most the model's trained "
                                                        f"sequence length {seq_len}")


# ------------------------------------------------------------------------------------------ shards
def shards(arg: str, pattern: str, *, min_tokens: int = 1, what: str = "token shards") -> List[Tuple[str, int]]:
    """Files of the glob ``pattern`` with their header token counts (headers and sizes validated,
    tokens not read). Refuses: no match, a bad header, a 0-token shard, fewer than ``min_tokens``
    tokens in total."""
    from .data import ShardError, shard_num_tokens, shard_paths

    if not pattern:
        raise CheckError(arg, pattern, f"a glob of {what}")
    try:
        paths = shard_paths(pattern)
    except ShardError:
        raise CheckError(arg, pattern, f"a glob matching at least one of the {what} (it matches no file)") from None
    out = []
    for p in paths:
        try:
            n = shard_num_tokens(p)
        except ShardError as e:
            raise CheckError(arg, pattern, f"valid {what}; {e}") from None
        if n == 0:
            raise CheckError(arg, pattern, f"{what} holding tokens; {p} holds 0 tokens")
        out.append((p, n))
    total = sum(n for _, n in out)
    if total < min_tokens:
        raise CheckError(arg, pattern, f"at least {min_tokens:,} tokens in the {what}; the {len(out)} "
                                       f"shard(s) hold {total:,}")
    return out


def token_ids(arg: str, value, tokens, vocab_size: int, source: str = "") -> None:
    """Every id < ``vocab_size`` (one vectorized max; ids are uint16 so never negative). ``value``:
    the argument's value (the glob) for the message; ``source``: the file, when known."""
    arr = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
    if arr.size == 0:
        return
    top = int(arr.max())
    if top >= vocab_size:
        pos = int(np.argmax(arr >= vocab_size))
        where = f" of {source}" if source else ""
        raise CheckError(arg, value, f"token ids < the model's vocabulary size {vocab_size}; found id {top} "
                                     f"(first out-of-range id at position {pos:,}{where})")


def shard_token_ids(arg: str, value, paths: Iterable[str], vocab_size: int) -> None:
    """``token_ids`` over each shard, one shard in memory at a time."""
    from .data import read_shard

    for p in paths:
        token_ids(arg, value, read_shard(p), vocab_size, source=p)


# ------------------------------------------------------------------------------------------ tokenizer
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer(arg: str, path: str, vocab_size: Optional[int] = None) -> dict:
    """A sentencepiece ``.model`` that exists, parses and has at most ``vocab_size`` pieces ->
    ``dict(sha256, pieces, name)``: the identity recorded in the artifact."""
    if not path:
        raise CheckError(arg, path, "a sentencepiece .model file")
    if not os.path.isfile(path):
        raise CheckError(arg, path, "an existing sentencepiece .model file (not found)")
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
        n = int(sp.vocab_size())
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with a parser message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckError(arg, path, f"a sentencepiece .model file; it does not parse ({msg})") from None
    if vocab_size is not None and n > vocab_size:
        raise CheckError(arg, path, f"a tokenizer of at most {vocab_size} pieces (the model's vocabulary); it has {n}")
    return dict(sha256=file_sha256(path), pieces=n, name=os.path.basename(path))


def tokenizer_identity(arg: str, path: str, seen: dict, recorded: Optional[dict], allow_flag: str,
                       allow: bool, log: Callable = print) -> None:
    """Refuse scoring with a tokenizer other than the one the artifact was trained with (the BPB
    would be silently wrong), unless ``allow``; an artifact that records none is reported, not refused."""
    if not recorded:
        log(f"[check] the artifact records no tokenizer identity; {arg} {path} (sha256 {seen['sha256'][:12]}, "
            f"{seen['pieces']} pieces) cannot be verified")
        return
    same = recorded.get("sha256") == seen["sha256"] and int(recorded.get("pieces", -1)) == seen["pieces"]
    if same:
        return
    desc = (f"the artifact's training tokenizer {recorded.get('name', '?')} (sha256 {str(recorded.get('sha256'))[:12]}, "
            f"{recorded.get('pieces')} pieces); got {seen['name']} (sha256 {seen['sha256'][:12]}, {seen['pieces']} pieces)")
    if allow:
        log(f"[check] WARNING: tokenizer mismatch accepted by {allow_flag}: expected {desc}")
        return
    raise CheckError(arg, path, desc + f"; pass {allow_flag} to score anyway")


# ------------------------------------------------------------------------------------------ eval
def eval_numbers(args) -> Tuple[Optional[Tuple[int, int]], float]:
    """The numbers of ``python3 -m train.eval`` that need no file (called while parsing): each value
    given explicitly against its range, by name. -> (share, budget_s)."""
    if args.lora_rank is not None:
        int_range("--rank", args.lora_rank, 1, 128 if args.mode != "chunked" else 8, "LoRA rank")
    if args.batch_size is not None:
        int_range("--batch-size", args.batch_size, 1, what="documents per TTT batch")
    if args.lr is not None:
        float_range("--lr", args.lr, 0.0, lo_open=True, what="the TTT learning rate")
    if args.beta1 is not None:
        float_range("--beta1", args.beta1, 0.0, 1.0, hi_open=True)
    if args.beta2 is not None:
        float_range("--beta2", args.beta2, 0.0, 1.0, hi_open=True)
    budget_s = budget("--budget", args.budget, "--margin", args.margin)
    k_n = share("--share", args.share)
    if args.max_docs is not None:
        int_range("--max-docs", args.max_docs, 1)
    if args.mode == "chunked":
        int_range("--chunk-tokens", args.chunk_tokens, 2048, 65536, "chunk_tokens: targets per chunk")
        int_range("--epochs", args.epochs, 1, what="training passes over each scored chunk")
        int_range("--batch-seqs", args.batch_seqs, 1, what="training windows per Adam step")
    return k_n, budget_s


def eval_args(args, log=print, *, recipe_window: Optional[int] = None, recipe_chunk: int = 256):
    """``python3 -m train.eval``'s arguments (``train/eval.py: _parse``), before any model is built:
    every number against its range, the val shards' headers and ids, the tokenizer and its identity
    with the artifact's, the window against the model's trained length (from the artifact's
    metadata). Window: ``--window``, else (per-document TTT) the recipe's (``recipe_window``, at most the
    model's trained length), else the model's trained length; chunk: ``--chunk``, else ``min(recipe_chunk, window)``. The per-document TTT values
    (rank, lr, betas, ...) are checked where the recipe is resolved (``TTTConfig``); the ones given
    here are checked again by name. -> (seq_len, window, chunk, share, budget_s)."""
    from . import artifact as art

    k_n, budget_s = eval_numbers(args)
    # inputs, cheapest first: the val shards' headers, the tokenizer file, the artifact's metadata
    warm_only = getattr(args, "warmup_only", False)  # --warmup-only reads no validation shard
    val_shards = None if warm_only else shards("--val", args.val, min_tokens=2, what="val token shards")
    tok = tokenizer("--tokenizer", args.tokenizer)
    if not os.path.isfile(args.artifact):
        raise CheckError("--artifact", args.artifact, "an existing artifact file (not found)")
    try:
        gcfg, _, meta = art.load_artifact(args.artifact)
    except Exception as e:  # codec errors (truncation, checksum, zstd, duplicate entries), bad meta
        msg = " ".join(str(e).split())
        raise CheckError("--artifact", args.artifact, f"a train artifact; refused ({type(e).__name__}: {msg})") from e
    seq_len, vocab = int(gcfg.seq_len), int(gcfg.vocab_size)
    if tok["pieces"] > vocab:
        raise CheckError("--tokenizer", args.tokenizer, f"a tokenizer of at most {vocab} pieces (the artifact's "
                                                            f"vocabulary); it has {tok['pieces']}")
    tokenizer_identity("--tokenizer", args.tokenizer, tok, meta.get("tokenizer"), "--allow-tokenizer-mismatch",
                          args.allow_tokenizer_mismatch, log=log)
    if args.window is not None:
        win = window("--window", args.window, seq_len)
    elif recipe_window is not None and args.mode == "ttt":
        # the recipe's TTT context (seeds 1024, records 2048), at most what the model was trained on
        win = min(int(recipe_window), seq_len)
        if win < recipe_window:
            log(f"[eval] window {win}: the recipe's {recipe_window} exceeds the model's trained length {seq_len}")
    else:
        win = seq_len
    chunk = args.chunk if args.chunk is not None else min(recipe_chunk, win)
    int_range("--chunk", chunk, 1, win, f"the TTT chunk, at most the window {win}")
    if args.mode in ("sliding", "chunked"):
        int_range("--stride", args.stride, 1, win, f"the sliding-window step, at most the window {win}")
    if args.mode == "chunked" and args.train_len is not None:
        int_range("--train-len", args.train_len, 1, seq_len, f"the training window, at most the model's "
                                                                f"trained sequence length {seq_len}")
    if val_shards is not None:
        shard_token_ids("--val", args.val, [p for p, _ in val_shards], vocab)
    return seq_len, win, chunk, k_n, budget_s


# ------------------------------------------------------------------------------------------ CLI
def user_errors() -> Tuple[type, ...]:
    """Exception classes that mean bad input (one line, exit 2), not a bug (traceback)."""
    from .bpb import TokenizerError
    from .data import ShardError

    errs: List[type] = [CheckError, ShardError, TokenizerError]
    try:
        from pgolf_kernels.quant import ArtifactError

        errs.append(ArtifactError)
    except ImportError:
        pass
    return tuple(errs)


def run_cli(main: Callable, argv: Optional[Sequence[str]] = None, extra: Tuple[type, ...] = ()) -> int:
    """Run ``main(argv)``; a user error prints ``error: <one line>`` to stderr and exits 2; the
    traceback only with ``--debug`` among the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except user_errors() + tuple(extra) as e:
        if "--debug" in argv:
            raise
        msg = " ".join(str(e).split("\n"))
        sys.stderr.write(f"error: {msg}\n")
        sys.stderr.flush()
        sys.exit(2)
    return 0
