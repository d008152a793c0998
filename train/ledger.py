"""The score ledger: proof that every target is scored exactly once and trained on only after its score.

Legality is structural: the score of a chunk is taken from the forward pass that precedes the update
computed from it (the update only ever uses losses already recorded), each target is recorded exactly
once (``ScoreLedger.record`` raises or counts a violation on a second record), and every training step
asserts that every target in its loss was recorded before (``require_scored``). A global step on the
base weights (phased TTT) asserts the same, on every rank's scores, for every target of its batch
(``share_counts`` then ``require_scored_global``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


class LegalityError(RuntimeError):
    """A target was scored twice, never scored, or trained on before it was scored."""


class ScoreLedger:
    """Counts how often every stream position was scored, on the device, without host syncs.

    ``record(pos, mask)`` adds 1 to ``count[pos]`` for the masked positions and counts a violation
    for any position whose count is now != 1 (scored before, or twice in this call).
    ``require_scored(pos, mask)`` counts a violation for any masked position never recorded
    (used by the training step on the targets of its loss). ``strict=True`` raises at once (tests);
    otherwise ``check()`` raises at the end of the eval (one sync). ``keep_nll=True`` also keeps the
    recorded NLL per position (tests compare scores across runs).
    """

    def __init__(self, n_positions: int, device="cpu", *, strict: bool = False, keep_nll: bool = False):
        self.n = int(n_positions)
        self.device = torch.device(device)
        # slot n is a sink for masked-out entries (no data-dependent shapes, hence no syncs)
        self.count = torch.zeros(self.n + 1, dtype=torch.int32, device=self.device)
        self.double_scored = torch.zeros((), dtype=torch.int64, device=self.device)
        self.trained_unscored = torch.zeros((), dtype=torch.int64, device=self.device)
        self.global_unscored = torch.zeros((), dtype=torch.int64, device=self.device)
        self.strict = strict
        self.nll = torch.full((self.n + 1,), float("nan"), dtype=torch.float64, device=self.device) if keep_nll else None
        self.n_records = 0
        self.n_train_checks = 0
        self.n_global_checks = 0
        # multi-rank chunked TTT: counts of the chunks already scored on *every* rank (all-reduced per
        # chunk by ``publish``) so that ``require_scored`` sees scores taken by other ranks; None = local counts
        self.published: Optional[torch.Tensor] = None
        # phased TTT: every rank's counts at the positions a global pass trains on (``share_counts``)
        self.shared: Optional[torch.Tensor] = None

    def _idx(self, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, pos, torch.full_like(pos, self.n)).reshape(-1)

    def record(self, pos: torch.Tensor, mask: torch.Tensor, nll: Optional[torch.Tensor] = None) -> None:
        idx = self._idx(pos, mask)
        m = mask.reshape(-1)
        self.count.index_add_(0, idx, m.to(torch.int32))
        bad = ((self.count[idx] != 1) & m).sum()
        self.double_scored += bad
        if self.nll is not None and nll is not None:
            # masked entries all land in the sink slot n (no boolean indexing: no sync, CUDA-graph safe)
            vals = nll.detach().reshape(-1).to(torch.float64)
            self.nll.index_put_((idx,), torch.where(m, vals, torch.full_like(vals, float("nan"))))
        self.n_records += 1
        if self.strict and int(bad):
            raise LegalityError(f"{int(bad)} target(s) scored more than once (record #{self.n_records})")

    def publish(self, lo: int, hi: int) -> None:
        """All-reduce the counts of positions [lo, hi) into ``published`` (the other ranks' scores of a
        chunk become visible to ``require_scored``). No-op without an initialized multi-rank group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if self.published is None:
            self.published = torch.zeros_like(self.count)
        buf = self.count[lo:hi].clone()
        dist.all_reduce(buf)
        self.published[lo:hi] = buf

    def _unscored(self, pos: torch.Tensor, mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """How many masked targets ``seen`` (counts per position) holds as never scored (on the device)."""
        return ((seen[self._idx(pos, mask)] == 0) & mask.reshape(-1)).sum()

    def require_scored(self, pos: torch.Tensor, mask: torch.Tensor) -> None:
        bad = self._unscored(pos, mask, self.count if self.published is None else self.published)
        self.trained_unscored += bad
        self.n_train_checks += 1
        if self.strict and int(bad):
            raise LegalityError(f"training step #{self.n_train_checks} uses {int(bad)} target(s) not scored yet")

    def share_counts(self, pos: torch.Tensor) -> None:
        """All-reduce the counts at the stream positions ``pos`` (1-D int64) into ``shared``, so that
        ``require_scored_global`` sees the scores every rank took there. No-op on one rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if self.shared is None:
            self.shared = torch.zeros_like(self.count)
        buf = self.count[pos]
        dist.all_reduce(buf)
        self.shared[pos] = buf

    def require_scored_global(self, pos: torch.Tensor, mask: torch.Tensor) -> None:
        """The check of a global step on the base weights (phased TTT): counts a violation for every
        masked target not scored yet on any rank (``share_counts`` first when several ranks score)."""
        bad = self._unscored(pos, mask, self.count if self.shared is None else self.shared)
        self.global_unscored += bad
        self.n_global_checks += 1
        if self.strict and int(bad):
            raise LegalityError(f"global step #{self.n_global_checks} on the base weights uses {int(bad)} target(s) "
                                f"not scored yet")

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.count, self.double_scored, self.trained_unscored, self.global_unscored):
                dist.all_reduce(t)

    def check(self, expected: Optional[torch.Tensor] = None) -> Dict[str, int]:
        """Raise LegalityError on any violation; ``expected`` (bool, n) = positions that must be
        scored exactly once (coverage). Returns counts for the report."""
        c = self.count[: self.n]
        info = {"double_scored": int(self.double_scored), "trained_unscored": int(self.trained_unscored),
                "global_unscored": int(self.global_unscored), "scored": int((c > 0).sum())}
        if expected is not None:
            exp = expected.to(c.device)
            info["missing"] = int(((c == 0) & exp).sum())
            info["unexpected"] = int(((c > 0) & ~exp).sum())
            info["multi"] = int((c > 1).sum())
        bad = {k: v for k, v in info.items() if k != "scored" and v}
        if bad:
            raise LegalityError(f"score ledger violations: {bad}")
        return info
