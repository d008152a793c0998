"""Chunked score-first TTT over the stream-as-one-sequence (``--mode chunked``): one shared adapter.

The stream is cut into chunks of 2K-64K targets; per chunk, its sliding rows are scored with ONE shared
Q/V LoRA, then that adapter trains on the scored chunk for several epochs (never on the last chunk);
see ``chunked_ttt``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .adapters import DocLoRA
from .forward import rows_nll
from .rows import build_rows
from .scoring import EvalState, score_rows, sync_device
from .ttt_config import AdamSettings, TTTConfig
from .ttt_optim import BatchedAdam


@dataclass
class ChunkedConfig(AdamSettings):
    """Chunked score-first TTT (PR #550 style), see ``chunked_ttt``.

    chunk_tokens: targets per chunk (2,048-65,536; the records' 32,768). rank: the shared LoRA's rank
    (1-8). epochs: training passes over each scored chunk. lr: Adam's peak lr, cosine-decayed to 0 over
    all training steps of the eval. window / stride: scoring context and stride (sliding windows as in
    ``--mode sliding``; stride = window is flat scoring); window None = the model's seq_len.
    train_len: training window (None = the model's seq_len). batch_seqs: training windows per
    optimizer step (32 x 2048 as in the records: one step per epoch of a 32,768-token chunk).
    """

    chunk_tokens: int = 32768
    rank: int = 8
    epochs: int = 3
    window: Optional[int] = None
    stride: int = 64
    train_len: Optional[int] = None
    batch_seqs: int = 32
    targets: Tuple[str, ...] = ("q", "v")
    seed: int = 1234

    def __post_init__(self):
        if not 2048 <= self.chunk_tokens <= 65536:
            raise ValueError(f"chunk_tokens must be in [2048, 65536], got {self.chunk_tokens}")
        if not 1 <= self.rank <= 8:
            raise ValueError(f"rank (the shared LoRA's rank) must be in [1, 8], got {self.rank}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if self.batch_seqs < 1:
            raise ValueError(f"batch_seqs must be >= 1, got {self.batch_seqs}")
        bad = set(self.targets) - {"q", "k", "v"}
        if bad or not self.targets:
            raise ValueError(f"chunked TTT targets must be a non-empty subset of q, k, v; got {self.targets}")
        for name in ("window", "train_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the model's seq_len), got {v}")
        if self.stride < 1 or (self.window is not None and self.stride > self.window):
            raise ValueError(f"stride must be in [1, window], got stride {self.stride}, window {self.window}")

    def resolved(self, model) -> "ChunkedConfig":
        """window / train_len filled in from the model's seq_len; stride capped at the window."""
        sl = int(model.config.seq_len)
        w = self.window or sl
        return dataclasses.replace(self, window=w, train_len=self.train_len or sl, stride=min(self.stride, w))


def chunked_plan(n_targets: int, chunk: int, window: int, stride: int) -> List[Tuple[int, int, np.ndarray]]:
    """[(c0, c1, rows)] for the chunks [c0, c1) of the targets 0..n-1 of the stream-as-one-sequence.

    rows (R, 3) = (0, a, b): the sliding-window rows (first row ``window`` targets, then ``stride``)
    cut at the chunk boundaries, so no row straddles two chunks. A row keeps its window ending at its
    own end b, so every target still has >= window - stride tokens of context (when chunk and window
    are multiples of stride, no row is cut and the contexts are exactly those of ``--mode sliding``).
    """
    n = int(n_targets)
    if n <= 0:
        return []
    bnd = np.unique(np.concatenate([[0], np.arange(window, n, stride), np.arange(chunk, n, chunk), [n]]))
    a, b = bnd[:-1], bnd[1:]
    rows = np.stack([np.zeros_like(a), a, b], 1).astype(np.int64)
    c0s = np.arange(0, n, chunk)
    cut = np.searchsorted(a, c0s)
    out = []
    for i, c0 in enumerate(c0s):
        hi = cut[i + 1] if i + 1 < len(cut) else len(rows)
        out.append((int(c0), int(min(n, c0 + chunk)), rows[cut[i]:hi]))
    return out


def chunk_train_batches(c0: int, c1: int, train_len: int, batch_seqs: int) -> List[np.ndarray]:
    """Training windows of chunk [c0, c1): rows (0, a, b) with [a, b) consecutive pieces of
    ``train_len`` targets (the last one shorter; its window still reaches ``train_len`` back), in
    batches of ``batch_seqs`` rows (one optimizer step each)."""
    a = np.arange(c0, c1, train_len, dtype=np.int64)
    rows = np.stack([np.zeros_like(a), a, np.minimum(a + train_len, c1)], 1)
    return [rows[i:i + batch_seqs] for i in range(0, len(rows), batch_seqs)]


def cosine_lr(lr: float, step: int, total: int) -> float:
    """lr * (1 + cos(pi * step / total)) / 2 for step 0..total-1: starts at lr, decays towards 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def all_reduce_grads(params: List[torch.Tensor]) -> None:
    """Sum the gradients over ranks (one flat all-reduce); a rank without windows contributes zeros."""
    import torch.distributed as dist

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    o = 0
    for p in params:
        k = p.numel()
        p.grad = flat[o:o + k].view_as(p)
        o += k


def chunked_ttt(model, stream: torch.Tensor, cc: ChunkedConfig, st: EvalState, *, backend: str = "bmm",
                rank: int = 0, world: int = 1, deadline: Optional[float] = None, clock=None,
                log=print, train_hook: Optional[Callable] = None, pad_to: int = 64) -> Dict[str, object]:
    """Chunked score-first TTT over the stream-as-one-sequence (targets = stream positions 1..N-1).

    For chunk c = 0, 1, ..., K-1 (targets [c0, c1)):
      1. **score**: every target of the chunk, once, under no-grad with the current shared adapter
         (sliding rows of ``chunked_plan``; recorded in the ledger and summed into the BPB);
      2. **train** (c < K-1 only: the last chunk is never trained on): ``epochs`` passes over the
         chunk's training windows; per batch of windows one Adam step on
             L = mean_{targets t of the batch} NLL_t
         with lr_k = cosine_lr(lr, k, total_steps), k counting steps over the whole eval.
    The adapter is ONE rank-r LoRA on ``targets`` (Q/V) of every layer shared by every row
    (``DocLoRA`` with n_docs = 1: plain GEMMs on the bmm path, ``multi_lora_linear`` with
    adapter_index = 0 on the kernel path), A Kaiming-uniform (hash init), B = 0.
    Multi-epoch is legal here because every training target was scored in step 1 before any epoch:
    each step's targets pass ``ledger.require_scored`` first, and scores are taken only in step 1.

    Multi-rank (``world`` > 1, torch.distributed initialized): the chunks stay sequential (the adapter
    is shared); rank r scores rows r, r+W, ... of each chunk (rows cost about the same), the chunk's
    ledger counts are all-reduced (``ledger.publish``) so the training check sees every rank's
    scores, and in each training step rank r runs windows r, r+W, ... of the batch, divides its NLL
    sum by the batch's global target count and the gradients are summed by one all-reduce: every
    rank applies the same Adam step to the same adapter. The deadline decision is all-reduced (MAX)
    so that all ranks stop training together.

    Deadline: before training chunk c, if the estimated training time of chunk c (rate measured on
    earlier chunks) plus the scoring of the remaining chunks does not fit, training stops for good;
    the remaining chunks are scored with the adapter as it is (still legal, still every target once).
    """
    import torch.distributed as dist

    clock = clock or time.perf_counter
    dev = stream.device
    cc = cc.resolved(model)
    n = stream.numel() - 1
    plan = chunked_plan(n, cc.chunk_tokens, cc.window, cc.stride)
    tcfg = TTTConfig(rank=cc.rank, targets=tuple(cc.targets), chunk=1, window=max(cc.window, cc.train_len),
                     batch_size=1, lr=cc.lr, beta1=cc.beta1, beta2=cc.beta2, eps=cc.eps, seed=cc.seed)
    adapter = DocLoRA(model, tcfg, 1, dev, backend)
    adapter.reset([0])
    opt = BatchedAdam(adapter.params, cc.lr, (cc.beta1, cc.beta2), cc.eps)
    batches = [chunk_train_batches(c0, c1, cc.train_len, cc.batch_seqs) for c0, c1, _ in plan]
    total = cc.epochs * sum(len(b) for b in batches[:-1])
    step = 0
    trained = 0
    stop_training = False
    score_rate = train_rate = None  # window positions / s, measured
    dist_on = world > 1 and dist.is_available() and dist.is_initialized()
    for c, (c0, c1, rows) in enumerate(plan):
        t = clock()
        mine = rows[rank::world]
        score_rows(model, stream, mine, cc.window, st, pad_to=pad_to, adapter=adapter)
        sync_device(dev)
        pos = float(np.sum(rows[:, 2] - np.maximum(0, rows[:, 2] - cc.window))) / world
        score_rate = pos / max(clock() - t, 1e-9)
        if c == len(plan) - 1:
            break  # the last chunk is never trained on
        st.ledger.publish(c0 + 1, c1 + 1)  # stream positions of targets c0..c1-1
        if not stop_training and deadline is not None:
            now = clock()
            tpos = cc.epochs * -(-(c1 - c0) // cc.train_len) * cc.train_len / world  # full windows: an upper bound
            rest = sum(float(np.sum(r[:, 2] - np.maximum(0, r[:, 2] - cc.window))) for _, _, r in plan[c + 1:]) / world
            need = (tpos / train_rate if train_rate else 0.0) + 1.25 * rest / score_rate
            flag = torch.tensor([1.0 if now + need > deadline else 0.0], device=dev)
            if dist_on:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) > 0:
                stop_training = True
                log(f"[eval] deadline: training stops before chunk {c} of {len(plan)}; the remaining chunks are "
                    f"scored with the adapter as trained so far")
        if stop_training:
            continue
        t = clock()
        tpos = 0
        for _ in range(cc.epochs):
            for b in batches[c]:
                mine = b[rank::world]
                n_glob = int((b[:, 2] - b[:, 1]).sum())
                opt.lr = cosine_lr(cc.lr, step, total)
                if len(mine):
                    rb = build_rows(stream, mine, cc.train_len, pad_to)
                    st.ledger.require_scored(rb.pos, rb.mask)  # every target of the loss was scored before
                    nll = rows_nll(model, rb, adapter)
                    loss = (nll * rb.mask).sum() / n_glob
                    if train_hook is not None:
                        train_hook(rb, rb.mask, loss)
                    loss.backward()
                    tpos += int(rb.x.numel())
                if dist_on:
                    all_reduce_grads(adapter.params)
                opt.step()
                step += 1
                st.steps += 1
        sync_device(dev)
        st.positions += tpos
        train_rate = tpos / max(clock() - t, 1e-9)
        trained += 1
    return {"chunks": len(plan), "chunks_trained": trained, "train_steps": step, "total_train_steps": total,
            "lora_backend": adapter.backend, "chunk_tokens": cc.chunk_tokens, "epochs": cc.epochs,
            "lora_rank": cc.rank, "window": cc.window, "stride": cc.stride, "train_len": cc.train_len,
            "batch_seqs": cc.batch_seqs, "lr": cc.lr}

