"""CUDA-graph replay of the per-document TTT step over static shape buckets (``--cuda-graphs``).

The device work of a TTT step (``train.schedules._step_body``: the forward of R rows x L window positions,
the score of their targets into the ledger and the BPB sums, and, when a row trains, the loss, its
backward to the adapters and the per-row Adam step) has no host sync, so it can be captured once and
replayed: the host then issues one graph launch per step instead of the forward's, backward's and
optimizer's kernel launches and their Python (on the H100 the compiled step left 8.1 ms
(``--reference``) and 26.8 ms (kernel path) of host time per 64 x 1024 step not hidden behind the GPU,
``bench/results/profile-ttt-h100.md``).

Buckets. A graph has fixed shapes, so every step is padded to a bucket (R_b, L_b) x C: R_b the next row
bucket (2, 4, 8, then multiples of 8 up to the adapter rows), L_b the next multiple of ``l_step`` (default
max(chunk, window / 8)) up to the window, C = the chunk. Padding rows and slots are masked (no score, no loss, zero
gradient) and padding rows sit on adapter rows no real row of the step uses. Two graphs per bucket:
score-and-train and score-only (a step where every row is at its document's last chunk). Under the batch
schedule the steps' shapes follow from the document lengths alone, so ``plan`` lists the (bucket, kind) pairs
it will use and ``prepare(keys=...)`` captures only those (29 of 80 for the seeds' config on the 50,000-doc
set). The rolling schedule's shapes follow from the lengths and the order its batches are claimed, known in advance
in a single process, so ``plan_rolling`` does the same there (with ranks claiming from a shared counter every bucket
is captured). A step outside the prepared keys runs the same body eagerly and is counted (``graph_eager_steps``).

Inputs are copied into the bucket's static buffers before each replay (x, sel, y, pos, mask, adapter rows,
train flags). The adapters, the optimizer state, the ledger and the BPB sums are the graphs' own
persistent tensors: a ``StepGraphs`` serves one ``DocLoRA``, one per-row ``BatchedAdam`` and one
``EvalState``.

``prepare()`` runs before the first scored step: for every bucket and kind, one or more eager steps on synthetic
random tokens with a scratch ledger (torch.compile, Triton JIT and autotuning happen there: a capture
cannot compile), then the capture itself, which records kernels without running them: no validation
token is read, no score or adapter is touched by the capture. ``capture=False`` runs the same staged,
bucketed body eagerly (the CPU lane tests everything but the capture that way). ``lazy=True`` (``--overlap-compile``)
moves each bucket's warm steps and capture to the first step that stages it: the warm steps' updates of the live
adapter and optimizer rows are undone (their tensors copied before and back after), so a capture may happen
mid-batch. ``warm_real=True`` (with ``lazy``; ``--graph-capture first-use``) makes that first step itself the warm
step: the bucket's real step runs once without a graph (it scores and trains, as a replay would), then the capture
records the same body for the later steps, and that step is not replayed. No synthetic warm step, no copy of the
adapter and optimizer state (3.85 GB at the records' recipe: 320.9 M fp32 adapter parameters for 64 rows at rank
96 on six targets, counted, times three with Adam's m and v). A
first call that compiled something (a dynamic-shape recompile for the bucket) is followed by synthetic warm steps
with the state kept, as in plain lazy mode, since a capture cannot compile. Why: ahead of the first step, the
records' 1/8 share warmed its 119 graphs for 20.4 s cold / 17.2 s warm (one synthetic step each) before capturing
them (5.3 / 4.8 s) on an H200 (bench/results/eval-h200.md).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .bpb import BPBAccumulator
from .ledger import ScoreLedger
from .rows import RowBatch, batch_steps, build_rows, rolling_steps
from .scoring import EvalState


@dataclass
class _Buffers:
    """The static inputs of one bucket."""

    rb: RowBatch
    rows: torch.Tensor   # (R,) adapter row of every row
    train: torch.Tensor  # (R,) bool: the row's document trains on this step


def warm_until_settled(step, compiles, first: int = 1, most: int = 3) -> int:
    """Run ``step()`` ``first`` times, then again while the last call compiled something (``compiles()``: a
    running count, e.g. Dynamo frames), at most ``most`` calls in all; returns the calls made. A capture cannot
    compile, so a bucket is captured only after a call that compiled nothing; the first call also settles cuBLAS
    workspaces, Triton autotuning and the allocator for the bucket. Why not a fixed two calls: the warm-up's
    dynamic-shape graph serves every bucket (the 50,000-doc eval's warm-up compiled 2 Dynamo frames, H200), and two
    warm calls per bucket took 3.1 s of its 4.1 s graph preparation (one call each: not yet timed)."""
    if not (callable(step) and callable(compiles)):
        raise TypeError(f"warm_until_settled: step and compiles must be callables, got {type(step).__name__} and "
                        f"{type(compiles).__name__}")
    if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= most:
        raise ValueError(f"warm_until_settled: first = {first!r}, most = {most!r}: expected 1 <= first <= most")
    n = 0
    while True:
        before = compiles()
        step()
        n += 1
        if n >= most or (n >= first and compiles() == before):
            return n


def dynamo_frames() -> int:
    """Dynamo frames compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"].get("ok", 0))


def graph_buckets(rows: int, window: int, chunk: int, l_step: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """(row buckets, window buckets) of the step graphs: rows padded to 2, 4, 8 or a multiple of 8 (at most
    ``rows``), windows to a multiple of ``l_step`` = max(chunk, window / 8) (at most ``window``)."""
    # window buckets: multiples of max(chunk, window / 8): 4 for the seeds (chunk 256, window 1024), 8 for
    # the records (chunk 48, window 2048) instead of 43 chunk multiples, each one more graph pair to warm
    for name, v in (("rows", rows), ("window", window), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"cuda_graphs: {name} = {v!r}: expected an integer >= 1")
    l_step = int(l_step or max(chunk, -(-window // 8)))
    if l_step < 1:
        raise ValueError(f"cuda_graphs: l_step = {l_step}: expected a positive integer")
    r_buckets = sorted({r for r in (2, 4, 8) if r <= rows} | set(range(8, rows + 1, 8)) | {rows})
    l_buckets = sorted(set(range(l_step, window + 1, l_step)) | {window})
    return r_buckets, l_buckets


def bucket_of(r_buckets: List[int], l_buckets: List[int], n_rows: int, length: int) -> Tuple[int, int]:
    """(R_b, L_b): the smallest buckets holding a step of ``n_rows`` rows (at least 2) whose longest window holds
    ``length`` positions."""
    R = next((r for r in r_buckets if r >= max(n_rows, 2)), None)
    L = next((x for x in l_buckets if x >= length), None)
    if R is None or L is None:
        raise ValueError(f"cuda_graphs: a step of {n_rows} rows x {length} positions exceeds the largest bucket "
                         f"({r_buckets[-1]} x {l_buckets[-1]})")
    return R, L


def window_spans(b: np.ndarray, window: int) -> np.ndarray:
    """Each row's window length: the positions up to its chunk's end ``b``, at most ``window``."""
    return b - np.maximum(0, b - window)


class StepGraphs:
    """Captured TTT steps of one eval (see the module docstring)."""

    def __init__(self, model, adapter, opt, cfg, st: EvalState, *, l_step: Optional[int] = None,
                 capture: Optional[bool] = None, lazy: bool = False, warm_real: bool = False):
        dev = st.bytes_at.device
        self.capture = dev.type == "cuda" if capture is None else bool(capture)
        if self.capture and dev.type != "cuda":
            raise ValueError(f"cuda_graphs: expected the eval on a CUDA device, got {dev}")
        if opt.row_t is None:
            raise ValueError("cuda_graphs: expected a per-row optimizer (BatchedAdam(per_row=True)): a graph cannot "
                             "hold the host step count of the batch-wide bias correction")
        if st.ledger.strict:
            raise ValueError("cuda_graphs: expected a non-strict ledger (strict checks sync the host every step)")
        if adapter.n_docs < 2:
            raise ValueError(f"cuda_graphs: expected at least 2 adapter rows, got {adapter.n_docs}")
        self.r_buckets, self.l_buckets = graph_buckets(adapter.n_docs, cfg.window, cfg.chunk,
                                                       l_step if l_step is not None else cfg.graph_window_step)
        self.model, self.adapter, self.opt, self.cfg, self.st = model, adapter, opt, cfg, st
        self.C = max(int(cfg.chunk), 2)
        self.buffers: Dict[Tuple[int, int], _Buffers] = {}
        self.graphs: Dict[Tuple[int, int, bool], "torch.cuda.CUDAGraph"] = {}
        self._key: Optional[Tuple[int, int]] = None
        self.stats: Dict[str, float] = {}
        # what the padding costs: window positions of the staged steps' real rows vs their buckets
        self.steps = self.real_positions = self.bucket_positions = 0
        # steps whose bucket was not captured (not in the plan given to prepare()): run eagerly, counted
        self.eager_steps = 0
        self.used: Dict[Tuple[int, int, bool], int] = {}
        self.planned: Optional[List[Tuple[int, int, bool]]] = None  # the keys prepare() was given (None: all)
        # (bucket, kind) -> planned steps, for the graphs a plan left out as too rare to capture (min_steps)
        self.rare: Dict[Tuple[int, int, bool], int] = {}
        # lazy: prepare() only records the plan; a bucket is warmed and captured when a step first stages it
        # (``--overlap-compile``: the first score waits for one graph, not for all 29 of the seeds' plan, which
        # took 4.4 s warm / 6.8 s cold on the H200, bench/results/warmup-h200.md)
        self.lazy = bool(lazy)
        if warm_real and not self.lazy:
            raise ValueError("StepGraphs: warm_real=True needs lazy=True (the real step warms a bucket at its first use)")
        self.warm_real = bool(warm_real)
        self._prep: Optional[dict] = None   # the preparation's scratch state, kept for lazy captures
        # called once, after the first replay has run on the device (train.overlap starts its thread there)
        self.on_first_replay: Optional[Callable[[], object]] = None
        self.first_replay_at: Optional[float] = None   # time.perf_counter() when the first step's scores were in

    # ------------------------------------------------------------------------------ buckets
    def bucket(self, n_rows: int, length: int) -> Tuple[int, int]:
        """(R_b, L_b) for a step of ``n_rows`` rows whose longest window holds ``length`` positions."""
        return bucket_of(self.r_buckets, self.l_buckets, n_rows, length)

    def _step_bucket(self, n_rows: int, b: np.ndarray) -> Tuple[Tuple[int, int], np.ndarray]:
        """The bucket of a step whose rows end their chunks at target positions ``b``, and each row's window
        span (positions up to ``b``, at most the window)."""
        spans = window_spans(b, self.cfg.window)
        return self.bucket(n_rows, int(spans.max())), spans

    def plan(self, batches_ns, min_steps: int = 1) -> List[Tuple[int, int, bool]]:
        """The (R_b, L_b, trains) graphs the batch schedule will replay over document batches with target
        counts ``batches_ns`` (each sorted longest first, as ``rows.plan_doc_batches`` cuts them): the same
        steps as ``schedules.ttt_batch`` (``rows.batch_steps``), bucketed as ``stage`` does. Why: the seeds'
        config over the 50,000-doc set uses 29 of its 80 bucket graphs, and preparing one took ~0.2 s on the
        H200 (80 in 16.3 s), so ``prepare(keys=plan(...))`` captures only those. ``min_steps``: only the graphs
        met in at least that many steps (``TTTConfig.graph_min_steps``); the others are in ``self.rare`` with their
        step counts."""
        steps: Dict[Tuple[int, int, bool], int] = {}
        for n in batches_ns:
            for live, _a, b, train in batch_steps(n, self.cfg.chunk):
                k = self._step_bucket(live.size, b)[0] + (bool(train.any()),)
                steps[k] = steps.get(k, 0) + 1
        return self._keep(steps, min_steps)

    def plan_rolling(self, ns: np.ndarray, claims: List[List[np.ndarray]],
                     min_steps: int = 1) -> List[Tuple[int, int, bool]]:
        """The (R_b, L_b, trains) graphs the rolling schedule will replay when its claims are known in advance:
        ``claims`` holds, per queue (one per phase), the document batches in the order this process claims them
        (a single process, or a static share). The same steps as ``schedules.ttt_rolling``
        (``rows.rolling_steps``), bucketed as ``stage`` does. Why: on the records' recipe a 1/8 share replayed 75 of
        the 160 graphs, and capturing all of them took 26.2 s on the H200. ``min_steps``: as in ``plan``."""
        steps: Dict[Tuple[int, int, bool], int] = {}
        for seq in claims:
            it = iter(seq)
            for _s, _n, live, _d, _a, b, train in rolling_steps(ns, self.cfg.chunk, self.adapter.n_docs,
                                                                lambda: next(it, None)):
                k = self._step_bucket(live.size, b)[0] + (bool(train.any()),)
                steps[k] = steps.get(k, 0) + 1
        return self._keep(steps, min_steps)

    def _keep(self, steps: Dict[Tuple[int, int, bool], int], min_steps: int) -> List[Tuple[int, int, bool]]:
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
            raise ValueError(f"StepGraphs.plan: min_steps = {min_steps!r}: expected a whole number >= 1")
        self.rare = {k: n for k, n in steps.items() if n < min_steps}
        return sorted(k for k, n in steps.items() if n >= min_steps)

    def _buffers(self, key: Tuple[int, int]) -> _Buffers:
        if key not in self.buffers:
            R, L = key
            dev = self.st.bytes_at.device
            z = lambda *shape, dtype=torch.int64: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
            rb = RowBatch(z(R, L), z(R, self.C), z(R, self.C), z(R, self.C), z(R, self.C, dtype=torch.bool))
            self.buffers[key] = _Buffers(rb, z(R), z(R, dtype=torch.bool))
        return self.buffers[key]

    # ------------------------------------------------------------------------------ per step
    def stage(self, stream: torch.Tensor, rows: np.ndarray, row_map: np.ndarray, train_rows: np.ndarray) -> RowBatch:
        """Copy a step's rows (s, a, b), adapter rows and train flags into its bucket's static buffers;
        returns the padded RowBatch (same values as the buffers)."""
        key, spans = self._step_bucket(len(rows), rows[:, 2])
        R, L = key
        self.steps += 1
        self.real_positions += int(spans.sum())
        self.bucket_positions += R * L
        rb = build_rows(stream, rows, self.cfg.window, shape=(R, L, self.C))
        free = np.setdiff1d(np.arange(self.adapter.n_docs), row_map)[:R - len(row_map)]
        full_map = np.concatenate([row_map, free]).astype(np.int64)
        self.adapter.check_row_map(full_map)
        train = np.concatenate([train_rows, np.zeros(R - len(train_rows), dtype=bool)])
        buf = self._buffers(key)
        for dst, src in zip((buf.rb.x, buf.rb.sel, buf.rb.y, buf.rb.pos, buf.rb.mask), (rb.x, rb.sel, rb.y, rb.pos, rb.mask)):
            dst.copy_(src)
        dev = buf.rows.device
        buf.rows.copy_(torch.from_numpy(full_map).to(dev, non_blocking=True))
        buf.train.copy_(torch.from_numpy(train).to(dev, non_blocking=True))
        self._key = key
        return rb

    def replay(self, do_train: bool) -> None:
        """Run the staged step: its graph's replay, or (``capture=False``) the same body eagerly."""
        from .schedules import _step_body

        if self._key is None:
            raise RuntimeError("StepGraphs.replay: no step was staged")
        key = self._key + (bool(do_train),)
        self.used[key] = self.used.get(key, 0) + 1
        done = False  # warm_real: the step ran as its bucket's warm step
        if self.lazy and self.capture and key not in self.graphs and self._prep is not None and (
                self.planned is None or key in self.planned):
            if self.warm_real:
                self._capture_after_real(key)
                done = True
            else:
                self._capture_staged(key)
        graph = self.graphs.get(key) if self.capture and not done else None
        if graph is not None:
            graph.replay()
            # the ledger's host-side counters (the captured body incremented them once, at capture)
            self.st.ledger.n_records += 1
            if do_train:
                self.st.ledger.n_train_checks += 1
        elif not done:
            if self.capture:
                if self._prep is None:
                    raise RuntimeError("StepGraphs.replay: nothing was captured (prepare() first)")
                # a bucket outside prepare()'s plan: the same body, run eagerly on the bucket's buffers
                self.eager_steps += 1
            buf = self.buffers[self._key]
            _step_body(self.model, buf.rb, buf.rows, buf.train, do_train, self.cfg, self.adapter, self.opt, self.st)
        if self.first_replay_at is None:
            if self.capture and self.st.bytes_at.device.type == "cuda":
                torch.cuda.synchronize(self.st.bytes_at.device)  # once: the first scores are in when this returns
            self.first_replay_at = time.perf_counter()
            hook, self.on_first_replay = self.on_first_replay, None
            if hook is not None:
                hook()

    def release(self) -> None:
        """Drop the captured graphs, their memory pool and the buffers (graphs that others replaced: the report's
        counters stay). Waits for the device first: a graph's private pool may be handed to other allocations once the
        graph is gone, and its last replay may still be running."""
        if self.capture and self.graphs:
            torch.cuda.synchronize(self.st.bytes_at.device)
        self.graphs.clear()
        self.buffers.clear()
        self._prep = None
        self._key = None

    def usage(self) -> Dict[str, float]:
        """Steps staged so far and the share of their bucket positions that real rows filled."""
        unplanned = sum(n for k, n in self.used.items() if self.planned is not None and k not in self.planned
                        and k not in self.rare)
        rare = sum(n for k, n in self.used.items() if k in self.rare)
        return {"graph_steps": self.steps,
                "graph_fill": round(self.real_positions / self.bucket_positions, 4) if self.bucket_positions else 0.0,
                "graph_eager_steps": self.eager_steps, "buckets_used": len(self.used),
                "graphs_planned": len(self.planned) if self.planned is not None else "all",
                "unplanned_steps": unplanned, "rare_graphs": len(self.rare), "rare_steps": rare}

    # ------------------------------------------------------------------------------ capture
    def keys(self) -> List[Tuple[int, int]]:
        return [(R, L) for R in self.r_buckets for L in self.l_buckets]

    def prepare(self, seed: int = 0, warm_steps: Optional[int] = None,
                keys: Optional[List[Tuple[int, int, bool]]] = None) -> Dict[str, float]:
        """Warm every bucket and kind (or only ``keys``: (R_b, L_b, trains) from ``plan``) on synthetic tokens,
        then capture it (see the module docstring). A step outside ``keys`` later runs its body eagerly
        (``graph_eager_steps`` in ``usage()``).
        Returns the times and the number of graphs; a no-op apart from the buffers with ``capture=False``.
        ``warm_steps`` per bucket and kind: default with ``compile_rows_nll`` in effect, one step and then
        more while a step compiled (``warm_until_settled``, at most 3: a bucket's first call may compile again
        for dynamic shapes), 1 without (cuBLAS, Triton JIT and autotune are settled by one call; eager, two warm
        steps each took 22.8 of the 30.4 s that 160 graphs took to prepare on the H200,
        bench/results/warmup-h200.md); an integer: exactly that many."""
        from .forward import is_compiled

        adaptive = warm_steps is None and is_compiled(self.model)
        if warm_steps is None:
            warm_steps = 1
        if isinstance(warm_steps, bool) or not isinstance(warm_steps, int) or warm_steps < 1:
            raise ValueError(f"StepGraphs.prepare: warm_steps = {warm_steps!r}: expected an integer >= 1 (a capture "
                             f"cannot compile or autotune)")
        t0 = time.perf_counter()
        all_keys = [k + (t,) for k in self.keys() for t in (True, False)]
        self.planned = None if keys is None else sorted({(int(R), int(L), bool(t)) for R, L, t in keys})
        if keys is None:
            keys = all_keys
        else:
            keys = self.planned
            allowed = set(all_keys)
            bad = [k for k in keys if k not in allowed]
            if bad:
                raise ValueError(f"StepGraphs.prepare: keys {bad[:3]} are not buckets (R_b in {self.r_buckets}, "
                                 f"L_b in {self.l_buckets}, trains True/False)")
        for R, L, _ in keys:
            self._buffers((R, L))
        if not self.capture:
            self.stats = {"graphs": 0, "graph_warm_s": 0.0, "graph_capture_s": 0.0, "graph_prepare_s": 0.0,
                          "captured": False}
            return self.stats
        dev = self.st.bytes_at.device
        n_pos = self.r_buckets[-1] * self.C
        self._prep = dict(
            g=torch.Generator().manual_seed(seed), pool=None, side=torch.cuda.Stream(dev) if dev.type == "cuda" else None,
            scratch=EvalState(BPBAccumulator(dev), ScoreLedger(n_pos, dev), torch.zeros(n_pos, dtype=torch.int16, device=dev)),
            # (compile counter, first, most): adaptive, or exactly warm_steps calls
            settle=(dynamo_frames, 1, 3) if adaptive else (lambda: 0, warm_steps, warm_steps))
        self.stats = {"graphs": 0, "graph_warm_s": 0.0, "graph_warm_steps": 0, "graph_capture_s": 0.0,
                      "graph_prepare_s": 0.0, "captured": True, "lazy": self.lazy}
        cuda = dev.type == "cuda"
        reserved0 = torch.cuda.memory_reserved(dev) if cuda else 0
        if not self.lazy:
            for key in keys:
                self._capture(key, preserve=False)
            if cuda:
                # what the preparation (warm steps and the graphs' pool) left reserved, and the device's total: the
                # kernel path's 45 graphs of the records' recipe held a 59.56 GiB pool on an 80 GB H100
                reserved = torch.cuda.memory_reserved(dev)
                self.stats["graph_reserved_gib"] = round((reserved - reserved0) / 2**30, 4)
                self.stats["reserved_gib"] = round(reserved / 2**30, 4)
            self.adapter.set_rows(None)
            # the synthetic warm steps trained A too: warm-start A as drawn before them. (Drawing it afresh at the
            # next reset instead, from that batch's document ids, made the replayed eval differ from the eager one:
            # 4.8e-5 / 1.2e-4 relative BPB at rank 8 / 96 in the kernel path's GPU tests)
            self.adapter.redraw_a()
        self.stats["graph_prepare_s"] = time.perf_counter() - t0
        return self.stats

    def capture_planned(self) -> int:
        """Lazy mode: warm and capture every planned (bucket, kind) not captured yet (all without a plan), keeping the
        adapter and optimizer rows' values (a batch may be half done; the staged step must have been replayed).
        Returns how many were captured. ``train.overlap`` calls it after the first step, before its thread starts:
        no capture then runs beside the thread's compile and warm-up."""
        if self._prep is None:
            return 0
        t0 = time.perf_counter()
        todo = [k for k in (self.planned if self.planned is not None else
                            [b + (t,) for b in self.keys() for t in (True, False)]) if k not in self.graphs]
        for k in todo:
            self._buffers(k[:2])
            self._capture(k, preserve=True)
        self.stats["graph_prepare_s"] += time.perf_counter() - t0
        return len(todo)

    def _capture_staged(self, k: Tuple[int, int, bool]) -> None:
        """Lazy mode: warm and capture ``k`` for the step staged in its buffers, whose inputs are set aside and put
        back (the warm steps fill the buffers with synthetic tokens); the warm steps' updates of the adapter and
        optimizer rows are undone too (a batch may be half done)."""
        t0 = time.perf_counter()
        buf = self.buffers[k[:2]]
        inputs = (buf.rb.x, buf.rb.sel, buf.rb.y, buf.rb.pos, buf.rb.mask, buf.rows, buf.train)
        staged = [t.clone() for t in inputs]
        self._capture(k, preserve=True)
        torch._foreach_copy_(list(inputs), staged)
        self.stats["graph_prepare_s"] += time.perf_counter() - t0

    def _capture_after_real(self, k: Tuple[int, int, bool]) -> None:
        """``warm_real``: run the staged step once without a graph (the real step: it scores and trains) on the
        capture stream, then capture ``k`` for the steps after it. When that call compiled something, the bucket is
        settled first on synthetic tokens with the state kept (``_capture_staged``): a capture cannot compile."""
        from .schedules import _step_body

        t0 = time.perf_counter()
        R, L, do_train = k
        p = self._prep
        buf = self.buffers[(R, L)]
        counter, first = p["settle"][0], p["settle"][1]
        before = counter()
        with self._on_side():
            _step_body(self.model, buf.rb, buf.rows, buf.train, do_train, self.cfg, self.adapter, self.opt, self.st)
        # the real step is scoring work, not preparation: its time is reported apart (graph_real_warm_s)
        self.stats["graph_real_warm_steps"] = self.stats.get("graph_real_warm_steps", 0) + 1
        self.stats["graph_real_warm_s"] = self.stats.get("graph_real_warm_s", 0.0) + time.perf_counter() - t0
        if counter() != before or first > 1:
            self._capture_staged(k)  # (adds its own time to graph_prepare_s)
        else:
            t1 = time.perf_counter()
            opt_t = self.opt.t  # the capture runs the optimizer's host step counter once
            self._record(k)
            self.opt.t = opt_t
            self.stats["graph_prepare_s"] += time.perf_counter() - t1

    @contextlib.contextmanager
    def _on_side(self):
        """Run the body on the capture stream, after the current stream's work and before its next, and wait for the
        device at its end (as the warm steps before a capture do)."""
        dev = self.st.bytes_at.device
        side = self._prep["side"]
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)

    def _capture(self, k: Tuple[int, int, bool], preserve: bool) -> None:
        """Warm bucket-and-kind ``k`` on synthetic tokens with a scratch ledger, then capture it. ``preserve``: the
        warm steps' updates of the adapters and the optimizer state are undone (lazy captures mid-batch); the capture
        itself records kernels without running them."""
        from .schedules import _step_body

        R, L, do_train = k
        p = self._prep
        buf = self.buffers[(R, L)]
        self._fill_synthetic(buf, R, L, self.model.config.vocab_size, p["g"])
        opt = self.opt
        state = ([*opt.params, *opt.m, *opt.v] + ([opt.row_t] if opt.row_t is not None else [])) if preserve else []
        t = time.perf_counter()
        with self._on_side():
            saved = [x.detach().clone() for x in state]
            opt_t = opt.t

            def step():
                _step_body(self.model, buf.rb, buf.rows, buf.train, do_train, self.cfg, self.adapter, self.opt,
                           p["scratch"])

            self.stats["graph_warm_steps"] += warm_until_settled(step, *p["settle"])
            if preserve:
                with torch.no_grad():
                    torch._foreach_copy_(state, saved)
                opt.t = opt_t
                for x in opt.params:
                    x.grad = None
        self.stats["graph_warm_s"] += time.perf_counter() - t
        self._record(k)

    def _record(self, k: Tuple[int, int, bool]) -> None:
        """Capture bucket-and-kind ``k``, warmed already, on the capture stream into the graphs' shared pool."""
        from .schedules import _step_body

        R, L, do_train = k
        p = self._prep
        buf = self.buffers[(R, L)]
        side = p["side"]
        t = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # captured on the warm steps' stream: cuBLAS keeps a workspace per (handle, stream), made there
        # by the warm steps rather than lazily inside the capture
        with torch.cuda.graph(graph, pool=p["pool"], stream=side):
            _step_body(self.model, buf.rb, buf.rows, buf.train, do_train, self.cfg, self.adapter, self.opt, self.st)
        p["pool"] = graph.pool() if p["pool"] is None else p["pool"]
        self.graphs[k] = graph
        # the capture ran the ledger's host-side counters once: take them back
        self.st.ledger.n_records -= 1
        self.st.ledger.n_train_checks -= int(do_train)
        self.stats["graphs"] = len(self.graphs)
        self.stats["graph_capture_s"] += time.perf_counter() - t

    def _fill_synthetic(self, buf: _Buffers, R: int, L: int, V: int, g: torch.Generator) -> None:
        """Random tokens and a full mask: every row trains, scores its last C window positions at
        distinct scratch-ledger positions."""
        C = self.C
        buf.rb.x.copy_(torch.randint(4, V, (R, L), generator=g))
        buf.rb.sel.copy_(torch.clamp(torch.arange(L - C, L), min=0).expand(R, C))
        buf.rb.y.copy_(torch.randint(4, V, (R, C), generator=g))
        buf.rb.pos.copy_(torch.arange(R * C).view(R, C))
        buf.rb.mask.fill_(True)
        buf.rows.copy_(torch.arange(R))
        buf.train.fill_(True)
