"""Warm-up of the eval: every compiled graph, Triton specialization and autotune bucket the scoring
will meet is built on synthetic random tokens (never validation tokens) before the validation shards
are read, and the TTT and scoring rates are measured for the deadline estimate."""
from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import torch

from .adapters import DocLoRA, identity_rows_for
from .bpb import ByteLUT
from .chunked import ChunkedConfig, chunked_ttt
from .data import BOS_ID
from .rows import plan_rows, split_docs, ttt_positions
from .schedules import ttt_batch
from .scoring import make_state, score_rows, sync_device
from .ttt_config import TTTConfig
from .ttt_optim import optimizer_for


def _synthetic_docs(V: int, n_docs: int, doc_len: int, g: torch.Generator, device):
    """``n_docs`` synthetic documents of ``doc_len`` random tokens after a BOS (never validation tokens), as the eval's
    stream: (stream on ``device``, document starts, target counts)."""
    docs = torch.randint(4, V, (n_docs, doc_len + 1), generator=g)
    docs[:, 0] = BOS_ID
    stream = docs.reshape(-1).to(device)
    starts, ns = split_docs(stream.cpu())
    return stream, starts, ns


def _warm_shapes(model, lut, cfg, ad, opt, device, V, g, doc_len):
    """Small batches of synthetic documents (1, 2, 3, 6, 12, 24 of ``doc_len``, and 2 of 40 tokens):
    the eval's steps shrink to a few live rows (the long-document tails), so rows x window spans
    128 ... 65k positions; every compiled-graph variant, Triton JIT specialization and int6 autotune
    bucket those sizes reach is built here rather than inside the timed scoring. (Measured on the
    H200 before this sweep: the first batch of a 1/8 share, the 64 longest documents, took 37 s of a
    68 s scoring, much of it tuning and compiling for small sizes first met there.)"""
    for k, n in ((1, doc_len), (2, doc_len), (3, doc_len), (6, doc_len), (12, doc_len), (24, doc_len), (2, 40)):
        k = min(k, cfg.batch_size)
        stream, starts, ns = _synthetic_docs(V, k, n, g, device)
        st = make_state(stream, lut)
        ttt_batch(model, stream, starts, ns, np.arange(len(ns)), cfg, ad, opt, st)
        score_rows(model, stream, plan_rows(starts, ns, cfg.chunk, cfg.window), cfg.window, st)


def _full_window_step(model, lut, cfg, ad, opt, device, V, g, bucketed: bool = False) -> None:
    """One TTT step at the largest shape the eval runs: every adapter row, every window full (each row's chunk
    ends ``cfg.window`` positions into a synthetic document), on a stream and ledger of its own; ``bucketed``: padded
    to the CUDA graphs' largest bucket, as the eval's graphs pad it. ``warmup`` runs it before any other call of the
    compiled forward: a dynamic-shape graph takes its kernels' size hints from its first call, and a Triton kernel
    autotuned at run time keeps the configuration its first call chose for every later size; the warm-up's TTT pass
    starts at windows of one chunk, while the eval's time goes to full windows (the records' 1/8 share: 903 of its
    4,431 steps in the (64 rows, 2048) bucket, the largest)."""
    from .schedules import _ttt_step

    rows = min(cfg.batch_size, ad.n_docs)
    stream, starts, ns = _synthetic_docs(V, rows, cfg.window + cfg.chunk, g, device)
    st = make_state(stream, lut)
    ad.reset(starts)  # A drawn, B zero, as at a batch's start (the pass after this resets them again)
    opt.reset()
    a = np.full(rows, cfg.window - cfg.chunk, dtype=np.int64)
    graphs = None
    if bucketed:
        from .graphs import StepGraphs

        graphs = StepGraphs(model, ad, opt, cfg, st, capture=False)
    _ttt_step(model, stream, np.stack([starts, a, a + cfg.chunk], 1), np.arange(rows), np.ones(rows, dtype=bool),
              cfg, ad, opt, st, 64, None, graphs)
    ad.set_rows(None)


def warmup(model, lut: ByteLUT, cfg: TTTConfig, backend: str, device, *, n_docs: int, doc_len: int,
           seed: int = 0, graphs: bool = False) -> Dict[str, float]:
    """Run the TTT step and the no-grad scorer on synthetic random tokens (never validation tokens).

    Returns measured rates in window positions per second (TTT fwd+bwd, no-grad scoring).

    First of all one TTT step at the largest shape (``_full_window_step``: the compiled graphs' size hints and
    autotuned configurations come from their first call).

    ``graphs=True`` (the eval's ``--cuda-graphs``): only the two TTT passes. The graphs' own preparation
    runs a warm step in every bucket the eval will replay, so the small-batch shape sweep would compile
    nothing those steps do not; and the adapter-less scorer serves only the deadline fallback, so its
    compiled graphs are left to that fallback (built if it ever runs). Why: on the H200 the sweep and the
    scorer's passes took 38.4 of the 39.3 s cold warm-up of the 50,000-document eval (5 Dynamo frames,
    8 FX graphs; the adapter-less scorer's 2 frames are not needed by a replayed step). The deadline
    estimate then takes the TTT rate for the base scorer's (``base_pos_per_s``, flagged
    ``base_rate_from_ttt``): per window position a no-grad forward costs less than a TTT step, so the
    estimate errs towards falling back early, which also covers compiling the fallback's graphs.
    """
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    stream, starts, ns = _synthetic_docs(V, n_docs, doc_len, g, device)
    st = make_state(stream, lut)
    ad = DocLoRA(model, cfg, cfg.batch_size, device, backend, identity_rows=identity_rows_for(cfg))
    opt = optimizer_for(ad.params, cfg, per_row=graphs, backend=ad.backend)  # as the eval's
    batch = np.arange(min(len(ns), cfg.batch_size))
    rates = {}
    # graphs: the passes' steps padded to the graphs' buckets (StepGraphs without capture runs the same bucketed body
    # as is), so every (rows, window) shape they meet is one the graphs' preparation meets again, and whatever a shape
    # costs the first time it runs (Dynamo guards, cuDNN's per-shape attention plans, allocator growth) is paid once.
    # The passes had padded windows to multiples of 64 while the records' buckets step by 96 or 256
    bucketed = None
    if graphs and ad.n_docs >= 2:
        from .graphs import StepGraphs

        bucketed = StepGraphs(model, ad, opt, cfg, st, capture=False)
    t = time.perf_counter()
    _full_window_step(model, lut, cfg, ad, opt, device, V, g, bucketed is not None)  # first: the size hints
    sync_device(device)
    rates["full_window_step_s"] = time.perf_counter() - t
    # phase times (s) go into the report: on the H100 the kernel path's warm-up took 125.7 s against
    # 50.0 s for --reference (bench/results/eval-h100.md), and these say which phase holds the difference
    if not graphs:
        t = time.perf_counter()
        _warm_shapes(model, lut, cfg, ad, opt, device, V, g, doc_len)
        sync_device(device)
        rates["warm_shapes_s"] = time.perf_counter() - t
    for rep in range(2):  # first pass compiles / autotunes, second is timed
        sync_device(device)
        t = time.perf_counter()
        ttt_batch(model, stream, starts, ns, batch, cfg, ad, opt, st, batch_index=rep, graphs=bucketed)
        sync_device(device)
        dt = time.perf_counter() - t
        rates[f"ttt_pass{rep}_s"] = dt
        rates["ttt_pos_per_s"] = ttt_positions(ns[batch], cfg.chunk, cfg.window) / max(dt, 1e-9)
        if graphs:
            rates["base_pos_per_s"] = rates["ttt_pos_per_s"]
            rates["base_rate_from_ttt"] = True
            continue
        rows = plan_rows(starts, ns, cfg.chunk, cfg.window)
        sync_device(device)
        t = time.perf_counter()
        score_rows(model, stream, rows, cfg.window, st)
        sync_device(device)
        dt = time.perf_counter() - t
        rates[f"score_pass{rep}_s"] = dt
        rates["base_pos_per_s"] = ttt_positions(ns, cfg.chunk, cfg.window) / max(dt, 1e-9)
    rates["backend"] = ad.backend
    rates.update(compile_cache_counts())
    del ad, opt, st
    return rates


def _check_part_args(who: str, model, cfg, device) -> torch.device:
    """The arguments of a --parallel-compile part's warm-up, refused by name before any work."""
    if not (hasattr(model, "config") and hasattr(model, "blocks")):
        raise TypeError(f"{who}: model: expected a train.model.GPT, got {type(model).__name__}")
    if not isinstance(cfg, TTTConfig):
        raise TypeError(f"{who}: cfg: expected a TTTConfig, got {type(cfg).__name__}")
    dev = torch.device(device)
    at = next(model.parameters()).device
    if (dev.type, dev.index or 0) != (at.type, at.index or 0):
        raise ValueError(f"{who}: device: expected the model's device ({at}), got {dev}")
    return dev


def warmup_ttt_steps(model, lut: ByteLUT, cfg: TTTConfig, backend: str, device, *, seed: int = 0,
                     n_docs: Optional[int] = None, doc_len: Optional[int] = None) -> Dict[str, float]:
    """One TTT batch on synthetic random tokens (never validation tokens), through the same step as the eval
    (``ttt_batch``), with adapters, optimizer and ledger of its own: what an eval's ``--parallel-compile`` child runs
    with one compiled function (``compile_rows_nll(only=...)``), so the eval's own warm-up then loads its graphs
    (cache hits). The batch is the eval's warm-up batch (``n_docs`` = ``cfg.batch_size`` documents of ``doc_len`` =
    ``cfg.window + cfg.chunk`` tokens, as ``warmup``): the forward is compiled with dynamic shapes, and Inductor picks
    its kernels' block sizes and reduction strategy from the sizes of the first call, which a cache hit then keeps, so
    a small batch here would hand the eval kernels tuned for small sizes. Returns its time and the compile counters."""
    device = _check_part_args("warmup_ttt_steps", model, cfg, device)
    if not isinstance(lut, ByteLUT):
        raise TypeError(f"warmup_ttt_steps: lut: expected a train.bpb.ByteLUT, got {type(lut).__name__}")
    if backend not in ("bmm", "kernel"):
        raise ValueError(f"warmup_ttt_steps: backend: expected 'bmm' or 'kernel', got {backend!r}")
    n_docs = cfg.batch_size if n_docs is None else n_docs
    doc_len = cfg.window + cfg.chunk if doc_len is None else doc_len
    for name, v, lo in (("n_docs", n_docs, 1), ("doc_len", doc_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"warmup_ttt_steps: {name}: expected a whole number >= {lo}, got {v!r}")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    stream, starts, ns = _synthetic_docs(model.config.vocab_size, n_docs, doc_len, g, device)
    st = make_state(stream, lut)
    ad = DocLoRA(model, cfg, cfg.batch_size, device, backend)  # the eval's adapter rows: their shapes are static
    opt = optimizer_for(ad.params, cfg, per_row=True, backend=ad.backend)
    _full_window_step(model, lut, cfg, ad, opt, device, model.config.vocab_size, g)  # first, as warmup() does
    ttt_batch(model, stream, starts, ns, np.arange(min(len(ns), cfg.batch_size)), cfg, ad, opt, st)
    sync_device(device)
    del ad, opt, st
    return dict(ttt_steps_warmup_s=time.perf_counter() - t0, **compile_cache_counts())


def warmup_global(model, cfg: TTTConfig, device, *, seed: int = 0, view=None) -> Dict[str, float]:
    """The phased recipe's global pass, forward and backward to every base weight, on synthetic random tokens (never
    validation tokens), without an optimizer step: a micro-batch of ``cfg.global_batch_seqs`` pieces of
    ``cfg.global_seq_len`` targets (the pass's own size: a compiled graph may guard on a size threshold, as CPU
    Inductor's does on rows x positions > 4096) and one of 3 pieces with a shorter last one (two shapes, as the pass
    meets). It compiles what the eval's first global pass would compile (the forward without adapters, gradients to
    the base weights; the records' 1/8 share compiled 2 Dynamo frames, ~13 s, after its warm-up on an H200, most
    likely these) and leaves the model as it was (weights, ``requires_grad``, no ``.grad``). The eval runs it in a
    child process beside its own warm-up (``--parallel-compile``), so the pass then compiles from cache hits
    (bench/results/parallel-compile-cpu.md, CPU Inductor, tiny model: the pass 5.1 s instead of 33.2 s cold, all 3 of
    its graphs from this one's entries; on an H200 the first global pass compiled in 1.4 s instead of ~13 s).
    ``view``: the adapter hook of the eval's global passes (``train.adapters.base_view``), so the same graphs are
    compiled. Returns its time and the compile counters."""
    from .forward import rows_nll
    from .phased import global_rows
    from .rows import build_rows

    device = _check_part_args("warmup_global", model, cfg, device)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    L = int(cfg.global_seq_len)
    R = max(int(cfg.global_batch_seqs), 2)
    stream, starts, ns = _synthetic_docs(model.config.vocab_size, (R + 1) // 2 + 2, 2 * L, g, device)
    rows = global_rows(starts, ns, np.arange(len(ns)), L)
    rows[-1, 2] = rows[-1, 1] + max(L // 2, 1)  # a shorter last piece: a second window length
    params = [p for p in model.parameters() if p.is_floating_point()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for mb in (rows[:R], rows[-3:]):
            rb = build_rows(stream, mb, L, 64, min_size=2)  # as global_pass builds its micro-batches
            nll = rows_nll(model, rb, view)
            (nll * rb.mask).sum().backward()
    finally:
        for p, w in zip(params, was):
            p.grad = None
            p.requires_grad_(w)
    sync_device(device)
    return dict(global_warmup_s=time.perf_counter() - t0, **compile_cache_counts())


def compile_cache_counts() -> Dict[str, float]:
    """torch.compile's cache outcomes in this process so far (Dynamo frames compiled, AOTAutograd and
    Inductor FX-graph cache hits / misses / bypasses): what a warm cache saved, and what it did not; and
    where its compile time went (``compile_s.*``, seconds summed over every compile so far, from
    ``torch._dynamo.utils.compilation_time_metrics``): Dynamo's whole frame compiles (``frame``), its
    bytecode tracing (``tracing``), the backend (``backend``: AOTAutograd + Inductor), Inductor's code
    generation (``codegen``), loading generated modules (``load_modules``), waiting for the parallel
    Triton compiles (``async_wait``) and host C++ builds (``cpp_build``; none is expected on the GPU)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    out: Dict[str, float] = {"dynamo_frames": int(counters["frames"].get("ok", 0))}
    for group in ("aot_autograd", "inductor"):
        for k, v in counters[group].items():
            if "cache" in k:
                out[f"{group}.{k}"] = int(v)
    for name, key in _COMPILE_PHASES:
        out[f"compile_s.{name}"] = round(float(sum(compilation_time_metrics.get(key, ()))), 3)
    return out


# (report name, torch._dynamo.utils.compilation_time_metrics key); keys that a torch version does not
# record read as 0
_COMPILE_PHASES = (("frame", "_compile.compile_inner"), ("tracing", "bytecode_tracing"),
                   ("backend", "OutputGraph.call_user_compiler"), ("codegen", "GraphLowering.codegen"),
                   ("load_modules", "PyCodeCache.load_by_key_path"), ("async_wait", "async_compile.wait"),
                   ("cpp_build", "compile_file"))


def warmup_chunked(model, lut: ByteLUT, cc: ChunkedConfig, backend: str, device, *, rank: int = 0, world: int = 1,
                   seed: int = 0) -> Dict[str, float]:
    """Chunked mode's warm-up on synthetic random tokens (never validation tokens): two chunks of
    ``chunk_tokens`` (score + train the first, score the second), so every kernel and shape class the
    eval runs is compiled / autotuned. Returns the wall time."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * cc.chunk_tokens + 1
    stream = torch.randint(4, model.config.vocab_size, (n,), generator=g)
    stream[0] = BOS_ID
    stream = stream.to(device)
    st = make_state(stream, lut)
    t = time.perf_counter()
    chunked_ttt(model, stream, cc, st, backend=backend, rank=rank, world=world, log=lambda *a, **k: None)
    sync_device(device)
    return {"warmup_chunked_s": time.perf_counter() - t}
