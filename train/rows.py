"""Row planning: which targets every forward scores, from which window of context.

Vocabulary. The validation stream ``tok`` (N tokens) is a concatenation of documents ``[BOS] + text``.
A *sequence* is a span of the stream starting at stream index ``s`` with ``n`` targets: target
``t in [0, n)`` is the token at stream index ``s + 1 + t``, predicted from ``tok[s : s + 1 + t]``.

* per-document modes: one sequence per document (``s`` = its BOS), so BOS tokens are never targets
  and no context crosses a document boundary; N - n_docs targets.
* flat / sliding modes: the whole stream is one sequence (``s = 0``), as in the baseline's eval;
  N - 1 targets (BOS targets add loss and 0 bytes).

Every mode is a list of *rows*. A row scores the targets ``[a, b)`` of one sequence from the window
of inputs ``tok[s + w : s + b]`` with ``w = max(0, b - window)``; the scored targets sit at window
positions ``a - w ... b - w - 1`` (the window's tail). Rows are independent unless TTT links them.

* flat:    chunks of ``window`` targets (every target sees the context since its window start).
* sliding: the first chunk has ``window`` targets, then chunks of ``stride``: every target after the
           first window has at least ``window - stride`` tokens of context.
* ttt:     chunks of ``chunk`` targets per document, ``window`` of context (``train.schedules``).
* chunked: the stream cut into chunks of 2K-64K targets, sliding rows inside each (``train.chunked``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import BOS_ID


def split_docs(tokens: torch.Tensor, bos_id: int = BOS_ID) -> Tuple[np.ndarray, np.ndarray]:
    """Document starts (BOS stream indices) and target counts. A stream not starting with BOS gets a
    first document starting at 0. Documents with no targets are dropped."""
    t = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    starts = np.flatnonzero(t == bos_id)
    if t.size and (starts.size == 0 or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [t.size]])
    n = ends - starts - 1
    keep = n > 0
    return starts[keep].astype(np.int64), n[keep].astype(np.int64)


def chunk_bounds(n: int, chunk: int, first: Optional[int] = None) -> List[Tuple[int, int]]:
    """[a, b) chunks covering [0, n): the first of ``first`` (default ``chunk``) targets, then ``chunk``."""
    out, a = [], 0
    step = first or chunk
    while a < n:
        b = min(n, a + step)
        out.append((a, b))
        a, step = b, chunk
    return out


def plan_rows(starts: Sequence[int], ns: Sequence[int], chunk: int, window: int,
              first: Optional[int] = None) -> np.ndarray:
    """All rows (s, a, b) of independent chunked scoring (flat, sliding, per-doc no-TTT)."""
    if chunk > window or (first or chunk) > window:
        raise ValueError(f"chunk ({first or chunk}) must not exceed window ({window})")
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    ns = np.asarray(ns, dtype=np.int64).reshape(-1)
    if first is not None and first != chunk:
        rows = [(s, a, b) for s, n in zip(starts, ns) for a, b in chunk_bounds(int(n), chunk, first)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    # vectorized (1.3 M rows for the official set at chunk 48): chunk c of a sequence = [cC, min((c+1)C, n))
    k = -(-ns // chunk)
    seq = np.repeat(np.arange(ns.size), k)
    c = np.arange(int(k.sum()), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    a = c * chunk
    b = np.minimum(a + chunk, ns[seq])
    return np.stack([starts[seq], a, b], 1)


def plan_doc_batches(ns: np.ndarray, batch_size: int) -> List[np.ndarray]:
    """Document indices sorted by target count, longest first (balances ranks: the longest work is
    claimed first and the short tail evens out the finish), cut into batches of ``batch_size``."""
    order = np.argsort(-ns, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _step_args(op: str, n, **counts) -> np.ndarray:
    """A schedule's arguments checked: every count (chunk, rows) an integer >= 1, ``n`` a 1-D array of non-negative
    target counts; returns n as int64."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{op}: {name} = {v!r}: expected an integer >= 1")
    n = np.asarray(n)
    if n.ndim != 1 or not np.issubdtype(n.dtype, np.integer) or (n.size and n.min() < 0):
        raise ValueError(f"{op}: n must be a 1-D array of non-negative target counts, got shape {n.shape}, "
                         f"dtype {n.dtype}")
    return n.astype(np.int64)


def batch_steps(n: np.ndarray, chunk: int):
    """The steps of the batch schedule over documents with ``n`` targets (sorted longest first): for chunk
    c = 0, 1, ... of the longest, yields ``(live, a, b, train)``: the documents with targets left (a shrinking
    prefix), their chunk's target range [a, b) and whether each trains after scoring (not its last chunk).
    ``schedules.ttt_batch`` runs these steps and ``graphs.StepGraphs.plan`` predicts their shape buckets."""
    n = _step_args("batch_steps", n, chunk=chunk)
    n_chunks = -(-n // chunk)
    for c in range(int(n_chunks.max()) if n.size else 0):
        live = np.flatnonzero(n_chunks > c)
        a = np.full(live.size, c * chunk, dtype=np.int64)
        yield live, a, np.minimum(a + chunk, n[live]), n_chunks[live] > c + 1


def rolling_steps(n: np.ndarray, chunk: int, rows: int, claim: Callable[[], Optional[np.ndarray]],
                  refill_below: float = 0.5):
    """The steps of the rolling schedule (``schedules.ttt_rolling``) over documents with ``n`` targets and
    ``rows`` adapter rows: documents come from ``claim()`` (a batch of document indices, or None when there are
    no more) into free rows once fewer than ``refill_below`` x rows are live. Yields, per step,
    ``(slots, new, live, d, a, b, train)``: the rows given new documents ``new`` just before this step (empty
    arrays when none), the live rows, their documents, their chunk's target range [a, b) and whether each
    trains after scoring (not its last chunk: a row with train False is free after the step)."""
    n = _step_args("rolling_steps", n, chunk=chunk, rows=rows)
    if not (0.0 < refill_below <= 1.0):
        raise ValueError(f"rolling_steps: refill_below = {refill_below!r}: expected a fraction in (0, 1]")
    if not callable(claim):
        raise TypeError(f"rolling_steps: claim: expected a callable returning document indices or None, got "
                        f"{type(claim).__name__}")
    slot_doc = np.full(rows, -1, dtype=np.int64)
    slot_c = np.zeros(rows, dtype=np.int64)
    n_chunks = -(-n // chunk)
    queue: List[int] = []
    exhausted = False
    none = np.zeros(0, dtype=np.int64)
    while True:
        slots, new = none, none
        live = np.flatnonzero(slot_doc >= 0)
        if not exhausted and live.size < max(1.0, refill_below * rows):
            free = np.flatnonzero(slot_doc < 0)
            while len(queue) < free.size and not exhausted:
                docs = claim()
                if docs is None:
                    exhausted = True
                else:
                    queue.extend(int(x) for x in docs)
            take = min(free.size, len(queue))
            if take:
                slots, new = free[:take], np.asarray(queue[:take], dtype=np.int64)
                del queue[:take]
                slot_doc[slots], slot_c[slots] = new, 0
                live = np.flatnonzero(slot_doc >= 0)
        if live.size == 0:
            return
        d, c = slot_doc[live], slot_c[live]
        a = c * chunk
        b = np.minimum(a + chunk, n[d])
        train = n_chunks[d] > c + 1
        yield slots, new, live, d, a, b, train
        slot_c[live] += 1
        slot_doc[live[~train]] = -1


def ttt_positions(ns: np.ndarray, chunk: int, window: int, first: Optional[int] = None) -> int:
    """Window positions the chunked scoring of sequences with ``ns`` targets runs (work estimate):
    sum over chunks of min(chunk end, window)."""
    ns = np.asarray(ns, dtype=np.int64).reshape(-1)
    if first is not None and first != chunk:
        return int(sum(b - max(0, b - window) for n in ns for a, b in chunk_bounds(int(n), chunk, first)))
    k = -(-ns // chunk)                      # chunks per sequence
    m = np.minimum(k - 1, window // chunk)   # full chunks j = 1..k-1 whose end j*C is still <= window
    full = chunk * m * (m + 1) // 2 + (k - 1 - m) * window
    return int((full + np.minimum(ns, window)).sum())


@dataclass
class RowBatch:
    """Device tensors for one forward over R rows (see module docstring)."""

    x: torch.Tensor      # (R, L) int64 window inputs (0-padded past each row's length)
    sel: torch.Tensor    # (R, C) window positions of the scored targets (clamped)
    y: torch.Tensor      # (R, C) int64 scored targets
    pos: torch.Tensor    # (R, C) stream positions of the scored targets
    mask: torch.Tensor   # (R, C) bool: slot holds a real target


def build_rows(stream: torch.Tensor, rows: np.ndarray, window: int, pad_to: int = 1, min_size: int = 1,
               shape: Optional[Tuple[int, int, int]] = None) -> RowBatch:
    """rows (R, 3) = (s, a, b) on the host -> device RowBatch (one small host->device copy).

    ``min_size``: at least that many rows and score slots (padding rows / slots are masked out). The
    eval uses 2: a compiled forward specializes sizes 0 and 1, so a 1-row or 1-target step would
    otherwise recompile every block mid-eval (measured on the H200: ~15-25 s per variant).
    ``shape`` (R, L, C): exactly that many rows, window positions and score slots (a CUDA-graph bucket,
    ``train.graphs``); it must hold the rows (R >= len(rows), L >= the longest window, C >= the most
    targets of a row)."""
    n_real = len(rows)
    n_rows = max(min_size, shape[0] if shape else 0)
    if n_real < n_rows:
        rows = np.concatenate([rows, np.repeat(rows[:1], n_rows - n_real, 0)])
    s, a, b = rows[:, 0], rows[:, 1], rows[:, 2]
    w = np.maximum(0, b - window)
    L = int((b - w).max())
    L = -(-L // pad_to) * pad_to
    C = max(int((b - a).max()), min_size)
    if shape is not None:
        if len(rows) > shape[0] or L > shape[1] or C > shape[2]:
            raise ValueError(f"build_rows: shape = {tuple(shape)}: expected room for {n_real} rows, {L} window "
                             f"positions and {C} score slots")
        L, C = shape[1], shape[2]
    meta = torch.from_numpy(np.stack([s + w, b - w, a - w, b - a, s + 1 + a], 1))
    dev = stream.device
    if dev.type == "cuda":
        meta = meta.pin_memory().to(dev, non_blocking=True)
    else:
        meta = meta.to(dev)
    base, ln, off, cnt, p0 = meta.unbind(1)
    ar_L = torch.arange(L, device=dev)
    ar_C = torch.arange(C, device=dev)
    valid = ar_L[None] < ln[:, None]
    gi = torch.where(valid, base[:, None] + ar_L[None], 0)
    x = torch.where(valid, stream[gi], 0)
    mask = ar_C[None] < cnt[:, None]
    if n_real < len(rows):
        mask[n_real:] = False
    sel = torch.where(mask, off[:, None] + ar_C[None], 0)
    pos = torch.where(mask, p0[:, None] + ar_C[None], 0)
    y = torch.where(mask, stream[pos], 0)
    return RowBatch(x, sel, y, pos, mask)
