"""Per-document score-first LoRA TTT (``--mode ttt``): the step and the two document schedules.

Documents are sorted by length (longest first) in batches of ``batch_size``; for chunk c of every
document of a batch: forward the windows, **score** the chunk's targets (recorded in the
``ScoreLedger`` and summed into the BPB), then one optimizer step on
    L = sum_docs mean_{t in chunk} NLL_t        (docs whose last chunk this is excluded)
on per-document LoRA adapters (``train.adapters.DocLoRA``: A from a hash of the document's id, B = 0;
reset in place per batch, optimizer state too). Summing per-document means keeps documents
independent: the gradient of document i's adapters depends on document i only, Adam is elementwise
and its step count is the chunk index, and the initial adapter depends only on the document, so a
document's scores do not depend on the batch size, its batch mates or the rank that processed it
(tested: batch sizes 1/3/4, 1 vs 2 ranks).

The scoring forward and the training forward are the same pass (the NLL is detached for scoring
before ``backward``), which is the same math as a separate no-grad forward followed by a training
forward, at half the cost (``TTTConfig.separate_score_pass`` runs the literal two passes).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .adapters import DocLoRA
from .graphs import StepGraphs
from .forward import rows_nll
from .rows import batch_steps, build_rows, rolling_steps
from .scoring import EvalState, take_score
from .ttt_config import TTTConfig
from .ttt_optim import BatchedAdam


def _ttt_step(model, stream: torch.Tensor, rows: np.ndarray, row_map: np.ndarray, train_rows: np.ndarray,
              cfg: TTTConfig, adapter: DocLoRA, opt: BatchedAdam, st: EvalState, pad_to: int,
              train_hook: Optional[Callable], graphs: Optional[StepGraphs] = None) -> None:
    """One score-first step: forward the rows (s, a, b), score them, then one Adam step on the rows
    marked in ``train_rows`` (documents whose last chunk this is are never trained on).
    ``row_map[j]``: adapter row of rows[j]. Rows and slots are padded to >= 2 (see build_rows): a lone
    row gets a masked padding row on another adapter row (its loss weight and gradient are 0).
    ``graphs``: the step's body is replayed from the CUDA graph of the rows' shape bucket (``train.graphs``)
    instead of run eagerly; same computation on the same inputs."""
    dev = stream.device
    do_train = bool(train_rows.any())
    if graphs is not None:
        rb = graphs.stage(stream, rows, row_map, train_rows)
        graphs.replay(do_train)
    else:
        min_size = 2 if adapter.n_docs >= 2 else 1
        rb = build_rows(stream, rows, cfg.window, pad_to, min_size=min_size)
        if len(row_map) < rb.x.shape[0]:
            row_map = np.concatenate([row_map, [1 if row_map[0] != 1 else 0]])
            train_rows = np.concatenate([train_rows, [False]])
        adapter.check_row_map(row_map)
        # always a row map (also when it is the identity): one compiled graph for every step
        rows_t = torch.from_numpy(np.ascontiguousarray(row_map)).to(dev, non_blocking=True)
        train_t = torch.from_numpy(np.ascontiguousarray(train_rows)).to(dev, non_blocking=True)
        _step_body(model, rb, rows_t, train_t, do_train, cfg, adapter, opt, st, train_hook)
    st.steps += 1
    st.positions += int(rb.x.numel())


def _step_body(model, rb, rows_t: torch.Tensor, train_t: torch.Tensor, do_train: bool, cfg: TTTConfig,
               adapter: DocLoRA, opt: BatchedAdam, st: EvalState, train_hook: Optional[Callable] = None) -> None:
    """The device work of a TTT step, without a host sync (so a CUDA graph can capture it): the forward of
    ``rb`` with adapter rows ``rows_t``, the score of its targets (ledger, then the BPB sums), and -- when
    ``do_train`` -- the loss L = sum over rows with ``train_t`` of the mean NLL of their targets, its
    backward to the adapters and the optimizer step. The score comes from the forward that precedes the
    update computed from it."""
    adapter.set_rows(rows_t)
    if cfg.separate_score_pass:
        with torch.no_grad():
            take_score(st, rb, rows_nll(model, rb, adapter))
        if do_train:
            nll = rows_nll(model, rb, adapter)
    else:
        # with grad also when no row trains (a step where every live document is at its last chunk, about one
        # per batch): the compiled forward then needs no grad-free adapter variant of the blocks and the head
        # (a TTT eval with compile_rows_nll on the CPU lane: 3 Dynamo frames instead of 5; the seeds' GPU
        # warm-up compiled 7); such a step only keeps its activations alive until the NLL is scored
        with torch.enable_grad():
            nll = rows_nll(model, rb, adapter)
        take_score(st, rb, nll)  # scored from this forward, before any update that uses it
    if do_train:
        tmask = rb.mask & train_t[:, None]
        st.ledger.require_scored(rb.pos, tmask)
        w = tmask.float() / tmask.sum(1, keepdim=True).clamp_min(1)
        loss = (nll * w).sum()
        if train_hook is not None:
            train_hook(rb, tmask, loss)
        loss.backward()
        opt.step()


def ttt_batch(model, stream: torch.Tensor, starts: np.ndarray, ns: np.ndarray, docs: np.ndarray,
              cfg: TTTConfig, adapter: DocLoRA, opt: BatchedAdam, st: EvalState, batch_index: int = 0,
              pad_to: int = 64, train_hook: Optional[Callable] = None, graphs: Optional[StepGraphs] = None) -> None:
    """Score-first TTT over one batch of documents (indices ``docs`` into starts/ns; documents sorted
    longest first). ``batch_index`` only labels the batch (logs, tests): a document's adapter init is
    keyed by its own BOS position, so results do not depend on batching."""
    s = starts[docs]
    adapter.reset(s)
    opt.reset()
    for live, a, b, train in batch_steps(ns[docs], cfg.chunk):
        _ttt_step(model, stream, np.stack([s[live], a, b], 1), live, train, cfg, adapter, opt, st, pad_to,
                  train_hook, graphs)
    adapter.set_rows(None)
    st.docs_ttt += len(docs)


def ttt_rolling(model, stream: torch.Tensor, starts: np.ndarray, ns: np.ndarray, claim: Callable[[], Optional[np.ndarray]],
                cfg: TTTConfig, adapter: DocLoRA, opt: BatchedAdam, st: EvalState, pad_to: int = 64,
                refill_below: float = 0.5, train_hook: Optional[Callable] = None,
                graphs: Optional[StepGraphs] = None) -> None:
    """Score-first TTT with rows refilled as documents finish (``--schedule rolling``).

    Same per-document computation as ``ttt_batch`` -- each document's adapter row is reset to its own
    initial adapter and its own Adam state (``opt`` must be ``per_row``: step count per row), its
    chunk k is scored then trained at Adam step k+1, its gradient depends on its own loss only -- but
    a row is given the next document (from ``claim()``, which returns a batch of document indices or
    None when there are no more) once fewer than ``refill_below`` x rows are live. Why: with whole
    batches, the 64 longest documents of a share left 333 sequential steps with few live rows, 37 of
    68 s of a 1/8 share on the H200 (bench/results/eval-h200.md); here those steps carry other
    documents too. Windows of fresh documents are padded to the longest row of the step.
    """
    if opt.row_t is None:
        raise ValueError("ttt_rolling needs BatchedAdam(..., per_row=True)")
    adapter.reset(np.zeros(0, dtype=np.int64))
    opt.reset()
    for slots, new, live, d, a, b, train in rolling_steps(ns, cfg.chunk, adapter.n_docs, claim, refill_below):
        if slots.size:
            adapter.reset_rows(slots, starts[new])
            opt.reset_rows(slots)
        _ttt_step(model, stream, np.stack([starts[d], a, b], 1), live, train, cfg, adapter, opt, st, pad_to,
                  train_hook, graphs)
        st.docs_ttt += int((~train).sum())  # a row's last chunk does not train: its document is done
    adapter.set_rows(None)
