"""The per-document modes' work queue: batches claimed across ranks, TTT or base scoring per batch,
the deadline decision and the progress log.

``DocQueue.run()`` claims document batches (longest first) one at a time until none is left. A
claimed batch is TTT-trained and scored (``--mode ttt``), or scored by the base model (``--mode base``,
or every batch claimed once the deadline estimate says TTT no longer fits). Before each TTT batch:

    need = work(batch) / ttt_rate + 1.25 * work(unclaimed) / base_rate

(window positions / measured positions per second; 1.25 = a margin for the base scorer's rate
varying with the row lengths); if ``now + need > deadline``, TTT stops for good and every remaining
document is scored by the base model (same chunks and windows, no adapter).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

from .rows import plan_doc_batches, plan_rows, ttt_positions
from .schedules import ttt_batch, ttt_rolling
from .scoring import EvalState, score_rows, sync_device


def share_of(batches: list, share) -> list:
    """The batches a static share ``(k, n)`` scores: every n-th from k (all of them for ``share=None``), the order
    ``BatchClaimer`` hands them out in. The eval's graph plan, its document count and the bench's work count use it."""
    return list(batches) if share is None else list(batches)[share[0]::share[1]]


class BatchClaimer:
    """Hands out batch indices 0, 1, ... exactly once across ranks.

    With a ``torch.distributed`` store: ``store.add(key, 1)`` is atomic, so the next free batch goes
    to whichever rank asks first (dynamic balancing). Without one (single rank) a local counter.
    ``share=(k, n)`` restricts a single process to every n-th batch starting at k (one rank's
    static share, used by the benchmark to time 1/8 of the set on one GPU).
    """

    def __init__(self, n_batches: int, store=None, key: str = "pgolf_eval_claim", share=None):
        self.n = n_batches
        self.store = store
        self.key = key
        self.share = share
        self._local = 0

    def next(self) -> Optional[int]:
        if self.store is not None:
            i = int(self.store.add(self.key, 1)) - 1
        else:
            i = self._local
            self._local += 1
            if self.share is not None:
                k, n = self.share
                i = k + i * n
        return i if i < self.n else None

    def peek(self) -> int:
        """Batches claimed so far (an upper bound of the next index)."""
        if self.store is not None:
            return min(self.n, int(self.store.add(self.key, 0)))
        if self.share is not None:
            k, n = self.share
            return min(self.n, k + self._local * n)
        return min(self.n, self._local)


def dist_store():
    """The default process group's store when more than one rank runs, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store
    except ImportError:  # a torch without the private accessor: static round robin instead (logged by the caller)
        return None
    return _get_default_store()


class DocQueue:
    """One rank's share of the per-document modes (see the module docstring).

    ``adapter`` / ``opt``: the TTT adapter and optimizer (None for ``--mode base``). ``share=(k, n)``:
    a single process takes every n-th batch from k. ``rates``: warm-up rates (positions/s) for the
    deadline estimate; the TTT rate is re-measured every ~2 s of batches.
    """

    def __init__(self, model, tokens, starts: np.ndarray, ns: np.ndarray, cfg, st: EvalState, *, mode: str,
                 adapter, opt, deadline: float, rates: Optional[dict], share, rank: int, world: int,
                 distributed: bool, clock: Callable[[], float], log, progress_s: float,
                 batches: Optional[List[np.ndarray]] = None, claim_key: str = "pgolf_eval_claim",
                 work_after: float = 0.0, fallback: bool = False, graphs=None,
                 swap_graphs: Optional[Callable[[bool], Optional[object]]] = None):
        """``graphs``: the eval's ``train.graphs.StepGraphs`` (every TTT step replayed from it), or None.
        ``batches``: the document batches in claim order (default: all documents, longest first);
        ``claim_key``: the store counter (one per queue); ``work_after``: this rank's work of the queues
        that follow (phased TTT), for the deadline estimate; ``fallback``: start without TTT.
        ``swap_graphs(wait)`` (``--overlap-compile``, batch schedule): asked before every batch; returns the graphs
        that replace ``graphs`` from that batch on once they are ready (``wait=True``: wait for them), else None."""
        self.model, self.tokens, self.starts, self.ns, self.cfg, self.st = model, tokens, starts, ns, cfg, st
        self.mode, self.adapter, self.opt, self.graphs = mode, adapter, opt, graphs
        self.swap_graphs = swap_graphs
        if swap_graphs is not None and mode == "ttt" and cfg.schedule == "rolling":
            raise ValueError("DocQueue: swap_graphs needs the batch schedule (a rolling step never sees all rows reset)")
        self.deadline, self.share, self.rank, self.world = deadline, share, rank, world
        self.clock, self.log, self.progress_s = clock, log, progress_s
        self.batches = plan_doc_batches(ns, cfg.batch_size) if batches is None else batches
        self.claimer = BatchClaimer(len(self.batches), dist_store(), key=claim_key, share=share)
        if distributed and self.claimer.store is None:  # static round robin over the longest-first batches
            self.claimer = BatchClaimer(len(self.batches), None, share=(rank, world))
        self.work = np.array([ttt_positions(ns[b], cfg.chunk, cfg.window) for b in self.batches], dtype=np.float64)
        self.work_after = work_after
        self.base_rate = (rates or {}).get("base_pos_per_s")
        self.ttt_rate = (rates or {}).get("ttt_pos_per_s")
        self.rolling = mode == "ttt" and cfg.schedule == "rolling"
        self.fallback = mode == "base" or fallback  # True: every batch from now on is scored by the base model
        self.t0 = self.last_log = self.rate_t = clock()
        self.done_docs = self.done_work = self.ttt_work = self.rate_work = 0
        self.my_total = self.my_work()

    # ------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        if self.rolling:
            ttt_rolling(self.model, self.tokens, self.starts, self.ns, self.claim_rolling, self.cfg, self.adapter,
                        self.opt, self.st, graphs=self.graphs)
        else:
            while self.next_batch() is not None:
                pass

    def claim_rolling(self) -> Optional[np.ndarray]:
        """Next batch for the rolling TTT schedule; batches past the deadline are base-scored here."""
        while True:
            nxt = self.next_batch()
            if nxt is None:
                return None
            if nxt is not True:
                return nxt

    def next_batch(self):
        """One claimed batch: None (no more), True (handled: trained and scored, or base-scored), or its
        documents (rolling schedule: ``ttt_rolling`` trains and scores them)."""
        i = self.claimer.next()
        if i is None:
            return None
        docs = self.batches[i]
        if not self.fallback:
            self._check_deadline(i)
        if self.swap_graphs is not None:
            # between batches every adapter row and the optimizer are reset: the one place graphs may change;
            # the fallback calls the model's forward from this thread, so it waits for them
            new = self.swap_graphs(self.fallback)
            if new is not None:
                self.graphs, self.swap_graphs = new, None
        if self.fallback:
            cfg = self.cfg
            score_rows(self.model, self.tokens, plan_rows(self.starts[docs], self.ns[docs], cfg.chunk, cfg.window),
                       cfg.window, self.st)
            self.st.docs_base += len(docs)
        elif self.rolling:
            # counted when claimed (ttt_rolling finishes them later); the TTT rate for the deadline
            # estimate stays the warm-up's measurement in this schedule
            self._count(docs, i, ttt=True)
            return docs
        else:
            ttt_batch(self.model, self.tokens, self.starts, self.ns, docs, self.cfg, self.adapter, self.opt, self.st,
                      batch_index=i, graphs=self.graphs)
        self._count(docs, i, ttt=not self.fallback)
        now = self.clock()
        if not self.fallback and (now - self.rate_t > 2.0 or self.ttt_rate is None):
            now = self._measure_ttt_rate()
        if now - self.last_log > self.progress_s:
            self._log_progress(now)
        return True

    # ---------------------------------------------------------------------------- bookkeeping
    def _work_left(self) -> float:
        nxt = self.claimer.peek()
        left = self.work[nxt::self.share[1]].sum() if self.share else self.work[nxt:].sum() / self.world
        return left + self.work_after

    def _check_deadline(self, i: int) -> None:
        now = self.clock()
        if not (self.ttt_rate and self.base_rate):
            return
        need = self.work[i] / self.ttt_rate + 1.25 * self._work_left() / self.base_rate
        if now + need > self.deadline:
            self.fallback = True
            self.log(f"[eval] deadline: {self.deadline - now:.1f} s left < {need:.1f} s needed for TTT batch {i} "
                     f"+ base scoring of the rest; remaining documents are scored without TTT")

    def _count(self, docs, i: int, ttt: bool) -> None:
        self.done_docs += len(docs)
        self.done_work += self.work[i]
        if ttt:
            self.ttt_work += self.work[i]

    def _measure_ttt_rate(self) -> float:
        """TTT rate over the batches since the last measurement; the sync (one per ~2 s) keeps it
        honest, since the host otherwise runs ahead of the GPU queue."""
        sync_device(self.tokens.device)
        now = self.clock()
        r = (self.ttt_work - self.rate_work) / max(now - self.rate_t, 1e-9)
        self.ttt_rate = r if self.ttt_rate is None else 0.5 * self.ttt_rate + 0.5 * r
        self.rate_t, self.rate_work = now, self.ttt_work
        return now

    def _log_progress(self, now: float) -> None:
        el = now - self.t0
        rate = self.done_work / max(el, 1e-9)
        eta = max(0.0, (self.my_total - self.done_work) / max(rate, 1e-9))
        self.log(f"[eval] rank {self.rank}: {self.done_docs:,} docs done ({self.st.docs_base:,} without TTT), "
                 f"{rate:,.0f} window tok/s, elapsed {el:.1f} s, ETA {eta:.1f} s")
        self.last_log = now

    @staticmethod
    def work_of(batches: List[np.ndarray], ns: np.ndarray, cfg) -> float:
        """Window positions the per-document scoring of ``batches`` runs (all ranks together)."""
        return float(sum(ttt_positions(ns[b], cfg.chunk, cfg.window) for b in batches))

    def my_work(self) -> float:
        """This rank's expected work in window positions (its share, or 1/world of the queue)."""
        return float(self.work[self.share[0]::self.share[1]].sum()) if self.share else float(self.work.sum()) / self.world

    def rates(self) -> dict:
        """The measured rates, handed to the next queue (phased TTT)."""
        return {"ttt_pos_per_s": self.ttt_rate, "base_pos_per_s": self.base_rate}

    def n_docs(self) -> int:
        """Documents of this run (all of them, or this process's share)."""
        return int(sum(len(b) for b in share_of(self.batches, self.share)))

    def share_docs(self) -> np.ndarray:
        """Document indices of this process's static share."""
        mine = share_of(self.batches, self.share)
        return np.concatenate(mine) if mine else np.zeros(0, np.int64)
