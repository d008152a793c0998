"""Phased TTT: per-document LoRA TTT interleaved with global SGD passes on the base weights.

The ``phase_docs`` longest documents (the first ones the longest-first queue hands out) are cut into
``phases`` phases of consecutive documents (boundaries N*p // P, p = 1..P, as the record). Phase p is
scored with per-document TTT (``train.doc_queue``); then the base weights take one global pass over the
documents already scored (phases 0..p, or phase p only with ``phase_cumulative=False``); then phase
p+1 is scored on the updated base. The documents after the prefix are scored with per-document TTT on
the base as the last pass left it.

Global pass (``global_pass``), over the rows of ``global_rows``: every document's targets in pieces of
``global_seq_len``, each seen through a window of ``global_seq_len`` inputs ending at the piece's end
(a full piece sees its own tokens; a document's shorter last piece also sees the end of the piece
before it; no window crosses the document's BOS). The rows are cut, in order, into chunks of
``global_chunk_tokens`` targets; the last chunk is not trained on (as the record's global pass).
Chunk c is ONE step of SGD with momentum on every floating-point base parameter,
lr_c = global_lr * (1 + cos(pi * c / (n_chunks - 1))) / 2, on
    L = sum_{targets t of the chunk} NLL_t / (number of targets of the chunk),
with the global gradient norm clipped to ``global_clip`` (the record: one step per 32,768-token
chunk, its 16 sequences of 2048 split over the ranks). Weights below fp32 are stepped through fp32
master copies, rounded back after every step. The chunk's rows run in micro-batches of
``global_batch_seqs`` rows (gradients accumulated). Several ranks split a chunk's rows (rank r takes
rows r, r+W, ...) and sum their gradients (one all-reduce), so every rank applies the same step to the
same base. Every micro-batch's targets pass ``ScoreLedger.require_scored_global`` first.

Int6 bases: once the base weights move, the int6 codes no longer describe them; before the first step
every ``Int6Linear`` is replaced by an ``nn.Linear`` holding its dequantized weights (in the dtype of
the model's other floating-point weights) and the report says so (``unfreeze_int6``).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .chunked import all_reduce_grads
from .forward import rows_nll
from .rows import build_rows
from .scoring import EvalState, sync_device


def phase_plan(ns: np.ndarray, phase_docs: int, phases: int) -> List[np.ndarray]:
    """Document indices (into ``ns``) of phases 0..P-1 and then of the rest, each longest first:
    the longest-first order (stable) cut at min(phase_docs, n) * p // P and after the prefix."""
    order = np.argsort(-np.asarray(ns), kind="stable")
    if phases > len(order):
        raise ValueError(f"phases: {phases}; expected <= the number of documents ({len(order)})")
    n = min(int(phase_docs), len(order))
    cuts = [n * p // phases for p in range(phases + 1)]
    return [order[cuts[p]:cuts[p + 1]] for p in range(phases)] + [order[n:]]


def global_rows(starts: np.ndarray, ns: np.ndarray, docs: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows (s, a, b) of the global pass: each document of ``docs`` (in order) in pieces of ``seq_len``
    targets [a, b) (trained with window ``seq_len``, see the module docstring)."""
    out = []
    for d in docs:
        a = np.arange(0, int(ns[d]), seq_len, dtype=np.int64)
        out.append(np.stack([np.full_like(a, starts[d]), a, np.minimum(a + seq_len, ns[d])], 1))
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def unfreeze_int6(model) -> str:
    """Replace every ``Int6Linear`` of ``model`` by an ``nn.Linear`` with its dequantized weights (the
    base weights are about to move); returns what was done, for the log and the report."""
    from pgolf_kernels.int6_linear import Int6Linear
    from pgolf_kernels.quant import QTensor

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32
    n = 0
    for parent in list(model.modules()):
        for name, mod in list(parent.named_children()):
            if isinstance(mod, Int6Linear):
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                device=mod.q.device, dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(QTensor(mod.q, mod.scale, int(mod.bits)).dequantize(dtype))
                    if mod.bias is not None:
                        lin.bias.copy_(mod.bias)
                lin.requires_grad_(False)
                setattr(parent, name, lin)
                n += 1
    if n == 0:
        return "dense base weights trained in place"
    return f"{n} int6 matrices replaced by their dequantized {str(dtype).replace('torch.', '')} weights"


def global_pass(model, stream: torch.Tensor, rows: np.ndarray, cfg, st: EvalState, *, rank: int = 0,
                world: int = 1, pad_to: int = 64, train_hook: Optional[Callable] = None,
                clock=time.perf_counter, view=None) -> Dict[str, object]:
    """One global SGD pass over ``rows`` (see the module docstring); returns its counts and time. ``view``: the
    adapter hook the model runs under (``train.adapters.base_view``: the kernel path's fused ops), None for the
    blocks' own ops."""
    import torch.distributed as dist

    t0 = clock()
    dist_on = world > 1 and dist.is_available() and dist.is_initialized()
    n_t = rows[:, 2] - rows[:, 1]
    chunk_of = (np.cumsum(n_t) - n_t) // cfg.global_chunk_tokens  # chunk of each row (by targets before it)
    n_chunks = int(chunk_of.max()) + 1 if len(rows) else 0
    # every rank must see every other rank's scores of these targets before the first check
    pos = torch.from_numpy(np.concatenate([s + 1 + np.arange(a, b) for s, a, b in rows]) if len(rows)
                           else np.zeros(0, np.int64)).to(stream.device)
    st.ledger.share_counts(pos)
    params = [p for p in model.parameters() if p.is_floating_point()]
    # fp32 master copies of low-precision weights: a bf16 weight has 8 significant bits, so a step of
    # lr 1e-3 x a clipped gradient (relative size ~1e-4 and below) would round away in place
    masters = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
    opt = torch.optim.SGD(masters, lr=cfg.global_lr, momentum=cfg.global_momentum)
    steps = trained = 0
    for p in params:
        p.requires_grad_(True)
    try:
        for c in range(n_chunks - 1):  # the last chunk is not trained on
            lr = cfg.global_lr * 0.5 * (1.0 + math.cos(math.pi * c / max(n_chunks - 1, 1)))
            for g in opt.param_groups:
                g["lr"] = lr
            crow = rows[chunk_of == c]
            n_glob = int((crow[:, 2] - crow[:, 1]).sum())
            mine = crow[rank::world]
            for i in range(0, len(mine), cfg.global_batch_seqs):  # micro-batches, gradients accumulated
                mb = mine[i:i + cfg.global_batch_seqs]
                # at least 2 rows (a padding row is masked: no loss, no gradient): the compiled forward specializes a
                # 1-row batch, and a chunk's last micro-batch of one piece compiled the pass's graphs again
                # (CPU trace: 5 Dynamo frames instead of 2, bench/results/parallel-compile-cpu.md)
                rb = build_rows(stream, mb, cfg.global_seq_len, pad_to, min_size=2)
                st.ledger.require_scored_global(rb.pos, rb.mask)  # only scored targets move the base
                nll = rows_nll(model, rb, view)
                loss = (nll * rb.mask).sum() / n_glob
                if train_hook is not None:
                    train_hook(rb, rb.mask, loss)
                loss.backward()
                trained += int((mb[:, 2] - mb[:, 1]).sum())
            for p, m in zip(params, masters):
                if m is not p:
                    m.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            if dist_on:
                all_reduce_grads(masters)
            if cfg.global_clip > 0:
                torch.nn.utils.clip_grad_norm_(masters, cfg.global_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zip(params, masters):
                    if m is not p:
                        p.copy_(m)
            steps += 1
    finally:
        for p in params:
            p.requires_grad_(False)
    sync_device(stream.device)
    return {"rows": int(len(rows)), "chunks": n_chunks, "steps": steps, "targets_trained": trained,
            "seconds": clock() - t0}
