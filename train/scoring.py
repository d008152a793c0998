"""Taking scores: the one place a target's NLL enters the BPB, and the no-grad scorer of independent rows.

``take_score`` records the scored positions in the ``ScoreLedger`` first, then adds to the float64 BPB
sums (a score can be added, never replaced; there is no best-of / last-of selection anywhere). It is
called from exactly ``score_rows`` (independent rows, no adapter update) and the TTT step
(``train.schedules._ttt_step``); ``tests/test_compliance.py`` pins these call sites.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bpb import BPBAccumulator, ByteLUT
from .forward import rows_nll
from .ledger import ScoreLedger
from .rows import RowBatch, build_rows


@dataclass
class EvalState:
    """What a scoring pass accumulates (one per rank; all-reduced at the end)."""

    acc: BPBAccumulator
    ledger: ScoreLedger
    bytes_at: torch.Tensor  # (N,) bytes of the target at each stream position
    docs_ttt: int = 0
    docs_base: int = 0
    steps: int = 0
    positions: int = 0      # window positions run through the model (work measure)


def stream_bytes_table(stream: torch.Tensor, lut: ByteLUT) -> torch.Tensor:
    """bytes_at[p] = bytes of target tok[p] after tok[p-1] (p >= 1; bytes_at[0] = 0), int16."""
    lut = lut.to(stream.device)
    out = torch.zeros_like(stream, dtype=torch.int16)
    if stream.numel() > 1:
        out[1:] = lut.target_bytes(stream[:-1], stream[1:]).to(torch.int16)
    return out


def make_state(stream: torch.Tensor, lut: ByteLUT, *, strict=False, keep_nll=False) -> EvalState:
    return EvalState(BPBAccumulator(stream.device), ScoreLedger(stream.numel(), stream.device, strict=strict,
                                                                   keep_nll=keep_nll),
                     stream_bytes_table(stream, lut))


def take_score(st: EvalState, rb: RowBatch, nll: torch.Tensor) -> None:
    """The only place a score is taken: ledger first, then the BPB sums."""
    st.ledger.record(rb.pos, rb.mask, nll)
    st.acc.add(nll, st.bytes_at[rb.pos], rb.mask)


@torch.no_grad()
def score_rows(model, stream: torch.Tensor, rows: np.ndarray, window: int, st: EvalState,
               max_positions: int = 1 << 16, pad_to: int = 64, adapter=None) -> None:
    """Score independent rows (flat, sliding, per-doc no-TTT, a chunk of chunked TTT) in batches of
    <= max_positions window positions (65,536 = the seeds' 64 docs x 1024: fits with room on an 80 GB
    GPU). ``adapter``: a shared adapter (chunked TTT) applied to every row, or None (base model)."""
    if len(rows) == 0:
        return
    spans = rows[:, 2] - np.maximum(0, rows[:, 2] - window)  # window length of each row
    order = np.argsort(-spans, kind="stable")  # similar lengths together: little padding
    i = 0
    while i < len(order):
        L = int(spans[order[i]])
        n = max(1, max_positions // max(L, 1))
        idx = order[i:i + n]
        rb = build_rows(stream, rows[idx], window, pad_to, min_size=2)
        nll = rows_nll(model, rb, adapter)
        take_score(st, rb, nll)
        st.steps += 1
        st.positions += int(rb.x.numel())
        i += n


def sync_device(dev) -> None:
    """Wait for the device's queue (timings and rates measure work done, not work queued)."""
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)
