"""Configuration of per-document LoRA test-time training (``--mode ttt``), validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass
class TTTConfig:
    rank: int = 8
    targets: Tuple[str, ...] = ("q", "v", "head")
    chunk: int = 256
    window: int = 1024
    batch_size: int = 64
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    seed: int = 1234
    # True: score each chunk from its own no-grad forward, then run a second forward with grad for
    # the update (the literal two-pass recipe). False (default): score from the detached NLL of the
    # training forward itself -- the same values before any update, one forward instead of two
    # (tested equal in tests/test_compliance.py).
    separate_score_pass: bool = False
    # "batch": whole batches of batch_size documents, reset together (the seeds' loop); "rolling": rows
    # refilled with new documents as documents finish (ttt_rolling), same per-document computation
    schedule: str = "batch"

    def __post_init__(self):
        bad = set(self.targets) - {"q", "k", "v", "head"}
        if bad:
            raise ValueError(f"TTT targets must be among q, k, v, head; got {sorted(bad)}")
        if not 0 < self.chunk <= self.window:
            raise ValueError(f"need 0 < chunk ({self.chunk}) <= window ({self.window})")
        if self.schedule not in ("batch", "rolling"):
            raise ValueError(f"TTT schedule must be 'batch' or 'rolling', got {self.schedule!r}")
        if self.rank < 1 or self.batch_size < 1:
            raise ValueError(f"rank ({self.rank}) and batch_size ({self.batch_size}) must be >= 1")
