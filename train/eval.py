"""Eval driver: load an int6 artifact, score the validation stream legally, report val BPB.

    python3 -m train.eval --artifact final.ptz --val 'data/fineweb_val_*.bin' \\
        --tokenizer data/fineweb_1024_bpe.model [--mode ttt|flat|sliding|base] [--reference]
    torchrun --nproc_per_node 8 -m train.eval --artifact ...        (documents shared across ranks)

Modes (see ``train/rows.py`` for the exact row semantics):
  ttt      (default) per-document batched LoRA test-time training, score-first per chunk.
  base     the same per-document chunk/window scoring without adapters (the no-TTT baseline).
  flat     the stream in non-overlapping windows of ``--window``.
  sliding  windows of ``--window`` advanced by ``--stride``; each target scored once.
  chunked  PR #550-style chunked score-first TTT over the stream: chunks of ``--chunk-tokens``
           (default 32,768) are scored (sliding windows, ``--window`` default = the model's seq_len,
           ``--stride``) with ONE shared rank-``--rank`` LoRA on Q/V, then the adapter trains on the
           scored chunk for ``--epochs`` (3) with Adam (``--lr`` 0.01, cosine over all steps); the last
           chunk is never trained on (``train/chunked.py``).

Per-document TTT options (``train/ttt_config.py``; ``--recipe records`` sets the 2026-04-29 record's
values, options given explicitly override them): ``--lora-targets`` any of q,k,v,o,mlp,up,down,head;
``--rank`` up to 128; ``--alpha`` (scale alpha/rank); ``--optimizer adam|adamw`` with ``--beta1`` (0
allowed), ``--beta2``, ``--eps``, ``--weight-decay``; ``--warm-start-a``; phased TTT ``--phases P
--phase-docs N`` with ``--global-lr/-momentum/-clip/-seq-len/-batch-seqs/-chunk-tokens`` and
``--phase-scope`` (``train/phased.py``). On the kernel path the fused LoRA covers q, k, v and the head;
o, mlp, up and down run as torch.bmm (logged). Once a global pass moves the base weights, int6 codes
are replaced by their dequantized weights (logged and reported as ``base_weights``): by the CLI at load
(``--unfreeze-int6 load``, its default with ``--phases``: one compile and one set of CUDA graphs), or by
``evaluate`` at the first global pass (``--unfreeze-int6 first-pass``: phase 1 scored on the int6 codes,
the steps compiled and captured again after the pass).

No illegal variant has a code path. Scores enter the BPB only through ``scoring.take_score`` (ledger
record first, then the additive float64 sums: a score can be added, never replaced, and there is no
best-of / last-of selection anywhere), called from exactly ``score_rows`` and the TTT step; every
training step calls ``ledger.require_scored`` on its loss's targets before the backward, and the
chunked mode's training loop never scores; every global step of phased TTT calls
``ledger.require_scored_global`` on its targets (after sharing every rank's counts). ``evaluate`` ends with ``ledger.check(expected)``, which
raises ``LegalityError`` on any target scored twice, never scored, or trained on before its score.
``tests/test_compliance.py`` pins these call sites and runs the seeds' illegal patterns (PR #713,
PR #605) as test doubles through the checks.

Kernel path (default): block matrices stay int6 codes (``Int6Linear``), adapters run through
``pgolf_kernels.lora.multi_lora_linear``. ``--reference``: every matrix dequantized to bf16
``nn.Linear`` and the LoRA deltas as ``torch.bmm`` (parity and speed-up in one run).

Deadline: the budget (``--budget`` s, default 600 - ``--margin`` 30) counts from the start of
the artifact load, warm-up included. Warm-up runs the TTT step and the no-grad scorer on
synthetic random tokens (never validation tokens) and measures both rates. Before each TTT batch
the driver checks that the batch plus base-model scoring of everything not yet claimed still fits;
if not, every remaining document is scored by the base model (same chunks and windows, no
adapter) and the report says how many.

Multi-rank (chunked): chunks stay sequential; each rank scores every W-th row of a chunk and every
W-th training window of a step, gradients are all-reduced (see ``chunked_ttt``).

Multi-rank (ttt/base): document batches (longest first) are claimed one at a time (``train/doc_queue.py``)
through a counter in the torch.distributed store (``store.add``), so a rank that drew long documents claims fewer; the
float64 sums and the score ledger are all-reduced at the end. A batch's adapter initialization is
seeded by its index, so 1 and N ranks compute the same scores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from typing import Dict, List, Optional

import numpy as np
import torch

from .adapters import DocLoRA, base_view, identity_rows_for
from .bpb import ByteLUT
from .chunked import ChunkedConfig, chunked_ttt
from .data import BOS_ID
from .doc_queue import DocQueue, share_of
from .graphs import StepGraphs
from .forward import compile_rows_nll
from .phased import global_pass, global_rows, phase_plan, unfreeze_int6
from .ledger import LegalityError
from .rows import plan_rows, split_docs
from .scoring import make_state, score_rows, sync_device
from .ttt_config import MAX_RANK, OPTIMIZERS, RECIPES, TARGETS, TTTConfig, fit_window_step, recipe
from .ttt_optim import optimizer_for
from .warmup import warmup, warmup_chunked

MODES = ("ttt", "base", "flat", "sliding", "chunked")

DEFAULT_BUDGET_S = 600.0
DEFAULT_MARGIN_S = 30.0


class ArtifactLoadError(ValueError):
    """The artifact is missing, truncated, corrupt or not a train artifact."""


# ------------------------------------------------------------------------------------ loading
def first_score_line(age_s: Optional[float]) -> str:
    """The line logged when the first step's scores are in (with CUDA graphs), ``age_s`` seconds after process
    start: a run stopped before its report still says when its first score came (``bench.bench_warmup`` reads it)."""
    if age_s is None:
        return "[eval] first score in (process age unknown)"
    return f"[eval] first score {age_s:.2f} s after process start"


def process_age_s() -> Optional[float]:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): the interpreter start and the
    imports (torch, triton, the package) happen before ``main()`` and belong to the time to the first
    scored token."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load_model(path: str, *, reference: bool = False, device="cuda", dtype: Optional[torch.dtype] = None):
    """Verify and load an artifact -> (model, info). ``reference``: dequantized weights, plain Linear.

    Verification: the file exists and is non-empty; the codec's own checks (container magic, length,
    checksum where the format has one, decompression) must pass; the config and every tensor must
    load strictly into the model. Any failure is an ``ArtifactLoadError`` naming the file and cause.
    """
    from . import artifact as art

    if not os.path.isfile(path):
        raise ArtifactLoadError(f"artifact not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise ArtifactLoadError(f"{path}: empty file")
    try:
        model = art.model_from_artifact(path, int6=not reference, device=device, dtype=dtype)
    except (FileNotFoundError, ArtifactLoadError):
        raise
    except Exception as e:  # codec errors (truncation, checksum, zstd), bad meta, state-dict mismatch
        raise ArtifactLoadError(f"{path}: refused ({type(e).__name__}: {e})") from e
    for p in model.parameters():
        p.requires_grad_(False)
    sub = art.submission_bytes(path)  # what a submission pays: this model + the drivers' code (import graph)
    info = {"artifact_bytes": size, "artifact_code_bytes": sub["bytes_code"], "submission_bytes": sub["bytes_total"],
            "artifact_limit_ok": sub["ok"]}
    return model, info


def load_val_tokens(pattern: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    from .data import load_tokens

    return load_tokens(pattern, max_tokens).to(torch.int64)


def docs_prefix(tokens: torch.Tensor, max_docs: int) -> torch.Tensor:
    """The stream cut after its first ``max_docs`` documents."""
    starts = (tokens == BOS_ID).nonzero().flatten()
    if starts.numel() <= max_docs:
        return tokens
    return tokens[: int(starts[max_docs])]


# ------------------------------------------------------------------------------------ driver
def evaluate(model, tokens: torch.Tensor, lut: ByteLUT, *, mode: str = "ttt", cfg: TTTConfig = TTTConfig(),
             stride: int = 64, backend: str = "kernel", t_start: Optional[float] = None,
             budget_s: float = DEFAULT_BUDGET_S - DEFAULT_MARGIN_S, rates: Optional[dict] = None,
             share=None, strict: bool = False, keep_nll: bool = False, progress_s: float = 15.0,
             log=print, return_state: bool = False, clock=time.perf_counter,
             chunked: Optional[ChunkedConfig] = None, train_hook=None, background=None, before_global=None):
    """Score ``tokens`` (1-D int64 on the model's device) in ``mode``; returns the report dict.

    ``before_global``: a callable run once, before the first global pass of phased TTT (the CLI's
    ``--parallel-compile`` waits there for its global-pass child); what it returns goes into the report's
    ``before_global``.

    ``background``: a ``train.overlap.BackgroundCompile`` or ``ProcessCompile`` not yet started
    (``--overlap-compile``): the TTT steps
    start on eager CUDA graphs (the first step's captured at that step, the rest of the plan right after it), the
    thread starts after those, this thread's forward stays eager until it is done, and compiled graphs take over at
    the next batch boundary (mode ttt, cfg.cuda_graphs, batch schedule, no phases).

    ``chunked``: the chunked mode's config (default ``ChunkedConfig()``; ``cfg`` and ``stride`` are not
    used by that mode). ``train_hook(rows, mask, loss)``: called before every chunked training step
    and every global step of phased TTT (tests instrument score-before-update with it).

    Phased TTT (``cfg.phases`` > 0) trains the model's base weights in place (and replaces its
    ``Int6Linear`` modules by dense ones): evaluate a fresh copy to reuse the model afterwards.

    ``t_start``: the deadline origin (``clock()`` at artifact load); default now. ``clock``: the
    time source (tests pass a fake one to exercise the deadline path).
    ``rates``: positions/s from ``warmup`` for the deadline estimates (default: no fallback until
    the first batch has been timed). ``share=(k, n)``: single process, every n-th TTT batch from k.
    """
    import torch.distributed as dist

    if cfg.cuda_graphs and mode != "ttt":
        raise ValueError(f"evaluate: cfg.cuda_graphs = True: expected mode 'ttt' (the TTT steps are what the graphs "
                         f"replay), got mode {mode!r}")
    if background is not None and not callable(getattr(background, "start", None)):
        raise TypeError(f"evaluate: background: expected a train.overlap.BackgroundCompile or ProcessCompile, got "
                        f"{type(background).__name__}")
    if background is not None and not (mode == "ttt" and cfg.cuda_graphs and cfg.schedule == "batch"
                                       and cfg.phases == 0):
        raise ValueError(f"evaluate: background (--overlap-compile): expected mode 'ttt' with cuda_graphs, the batch "
                         f"schedule and no phases; got mode {mode!r}, cuda_graphs {cfg.cuda_graphs}, schedule "
                         f"{cfg.schedule!r}, phases {cfg.phases}")
    if cfg.cuda_graphs and (strict or train_hook is not None):
        raise ValueError("evaluate: cfg.cuda_graphs = True: expected strict=False and no train_hook (a captured step "
                         "cannot sync the host or call back into Python)")
    dev = tokens.device
    t_start = clock() if t_start is None else t_start
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    st = make_state(tokens, lut, strict=strict, keep_nll=keep_nll)
    t0 = clock()
    expected = torch.ones(tokens.numel(), dtype=torch.bool, device=dev)  # targets that must be scored once
    expected[0] = False
    report: Dict[str, object] = {"mode": mode, "world_size": world}

    if mode in ("flat", "sliding"):
        n = tokens.numel() - 1
        chunk = cfg.window if mode == "flat" else stride
        rows = plan_rows([0], [n], chunk, cfg.window, first=cfg.window)
        score_rows(model, tokens, rows[rank::world], cfg.window, st)  # static split: rows cost about the same
        report.update(docs=int((tokens == BOS_ID).sum()), window=cfg.window,
                      stride=(stride if mode == "sliding" else cfg.window))
    elif mode in ("ttt", "base"):
        if share is not None and distributed:
            raise ValueError("share= is for a single process; with torchrun the ranks share the work")
        starts, ns = split_docs(tokens.cpu())
        expected[torch.from_numpy(starts).to(dev)] = False
        from .forward import set_thread_eager

        # --overlap-compile keeps this thread's forward eager until the hand-over; whatever happens, the caller's
        # setting comes back (a failed background thread raises through here)
        eager_before = set_thread_eager(False) if background is not None else None
        try:
            report.update(_score_documents(model, tokens, starts, ns, cfg, st, expected, mode=mode, backend=backend,
                                           deadline=t_start + budget_s, rates=rates, share=share, rank=rank,
                                           world=world, distributed=distributed, clock=clock, log=log,
                                           progress_s=progress_s, train_hook=train_hook, background=background,
                                           before_global=before_global))
        finally:
            if background is not None:
                set_thread_eager(eager_before)
    elif mode == "chunked":
        if share is not None:
            raise ValueError("share= is for the per-document modes; the chunked mode's chunks are sequential")
        cc = chunked if chunked is not None else ChunkedConfig()
        report.update(chunked_ttt(model, tokens, cc, st, backend=backend, rank=rank, world=world,
                                  deadline=t_start + budget_s, clock=clock, log=log, train_hook=train_hook))
        report.update(docs=int((tokens == BOS_ID).sum()))
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")

    report.update(_finalize(st, mode, expected, distributed, dev), score_s=clock() - t0)
    if mode == "ttt" and report["docs_no_ttt_deadline"]:
        log(f"[eval] {report['docs_no_ttt_deadline']} documents were scored by the base model (deadline)")
    if return_state:
        return report, st
    return report


def _score_documents(model, tokens, starts, ns, cfg: TTTConfig, st, expected, *, mode, backend, deadline, rates,
                     share, rank, world, distributed, clock, log, progress_s, train_hook=None,
                     background=None, before_global=None) -> Dict[str, object]:
    """The per-document modes: one ``DocQueue`` over all documents, or (phased TTT) one per phase with a
    global pass on the base weights after each phase and a last queue for the rest. Narrows
    ``expected`` to this process's share; returns the report's fields."""
    dev = tokens.device
    report: Dict[str, object] = {}
    adapter = opt = graphs = None
    if mode == "ttt":
        adapter = DocLoRA(model, cfg, cfg.batch_size, dev, backend, identity_rows=identity_rows_for(cfg))
        # per-row Adam with CUDA graphs (the step count lives on the device): same updates as batch-wide Adam
        # when every row starts together, as in the batch schedule
        opt = optimizer_for(adapter.params, cfg, per_row=cfg.schedule == "rolling" or cfg.cuda_graphs,
                            backend=adapter.backend)
        report.update(lora_backend=adapter.backend, lora_backend_reason=adapter.backend_reason, schedule=cfg.schedule,
                      fused_optimizer=opt.fused, fused_qk=adapter.fused_qk, fused_mlp=adapter.fused_mlp,
                      fused_residual=adapter.fused_residual)
        if adapter.backend != backend:
            log(f"[eval] LoRA backend {adapter.backend}: {adapter.backend_reason}")
        if adapter.backend == "kernel" and adapter.bmm_targets:
            fused = [t for t in adapter.bmm_targets if adapter.fused_residual and t in ("o", "mlp", "down")]
            log(f"[eval] LoRA targets {','.join(adapter.bmm_targets)} run as torch.bmm (the fused kernel covers "
                f"q, k, v and the head)" + (f"; {','.join(fused)}: the shrink only, the expand inside the residual "
                                            f"GEMM (--fused-residual)" if fused else ""))
            report["lora_bmm_targets"] = list(adapter.bmm_targets)
    phased = mode == "ttt" and cfg.phases > 0
    groups = phase_plan(ns, cfg.phase_docs, cfg.phases) if phased else [np.argsort(-ns, kind="stable")]
    bs = cfg.batch_size
    group_batches = [[g[i:i + bs] for i in range(0, len(g), bs)] for g in groups]
    if mode == "ttt" and cfg.cuda_graphs:
        # the batch schedule's step shapes follow from the batches this process scores (all of them with several
        # ranks claiming from a shared counter); the rolling one's from the order its batches are claimed, known in
        # advance in a single process (all batches, or its static share), else every bucket is captured. Why the
        # share: the records' 1/8 share planned its graphs over every batch of the set, 119 (bucket, kind) pairs of
        # which its own steps use 64, and prepared them in 25.8 s cold on the H200
        own = [share_of(bt, share) for bt in group_batches]
        batches_ns = None
        if cfg.schedule == "batch":
            batches_ns = [ns[b] for batches in (group_batches if distributed else own) for b in batches]
        claims = own if cfg.schedule == "rolling" and not distributed else None
        graphs = _step_graphs(model, adapter, opt, cfg, st, log, batches_ns=batches_ns, rolling_claims=claims,
                              ns=ns, lazy=background is not None)
        report["cuda_graphs"] = dict(graphs.stats)
    first_graphs = graphs  # the first step's: when its scores were in (first_score_s)
    swap = None
    if background is not None:
        swap = _overlap(model, adapter, opt, cfg, st, log, graphs, background, report, clock)
        graphs = None  # the queue holds the current graphs; swap["graphs"] says which were used last
    if first_graphs is not None:
        # one line as soon as the first scores are in: a run stopped before its report (a bench's time limit) still
        # says when its first score came (the warm-up target's figure)
        then = first_graphs.on_first_replay

        def say_first_score():
            log(first_score_line(process_age_s()))
            if then is not None:
                then()
        first_graphs.on_first_replay = say_first_score
    graphs_at = tensor_addresses(model)  # what the captured steps read; a global pass that changes it recaptures
    queues = []
    keep = torch.zeros(tokens.numel(), dtype=torch.bool, device=dev) if share is not None else None
    passes = []
    for p, batches in enumerate(group_batches):
        work_after = sum(DocQueue.work_of(b, ns, cfg) for b in group_batches[p + 1:]) / (share[1] if share else world)
        q = DocQueue(model, tokens, starts, ns, cfg, st, mode=mode, adapter=adapter, opt=opt, graphs=graphs,
                     deadline=deadline,
                     rates=queues[-1].rates() if queues else rates, share=share, rank=rank, world=world,
                     distributed=distributed, clock=clock, log=log, progress_s=progress_s, batches=batches,
                     claim_key=f"pgolf_eval_claim_{p}", work_after=work_after,
                     fallback=bool(queues) and queues[-1].fallback, swap_graphs=swap["fn"] if swap else None)
        if swap is not None:
            q.graphs = swap["graphs"]
            swap["queue"] = q
        if share is not None:  # only this share's documents are expected to be scored
            for i in q.share_docs():
                keep[int(starts[i]) + 1: int(starts[i]) + 1 + int(ns[i])] = True
        q.run()
        queues.append(q)
        if phased and p < cfg.phases:
            if _any_rank(q.fallback, distributed, dev):  # past the deadline: no more training of any kind
                log(f"[eval] phase {p + 1}/{cfg.phases}: deadline fallback, no global pass")
                continue
            if not passes:
                report["base_weights"] = unfreeze_int6(model)
                log(f"[eval] phased TTT: base weights move; {report['base_weights']}")
            scored = np.concatenate(groups[:p + 1] if cfg.phase_cumulative else [groups[p]])
            if share is not None:  # a single process's share: only the documents it scored
                mine = np.concatenate([qq.share_docs() for qq in (queues if cfg.phase_cumulative else [q])])
                scored = scored[np.isin(scored, mine)]
            rows = global_rows(starts, ns, scored, cfg.global_seq_len)
            if before_global is not None and not passes:
                report["before_global"] = before_global()
            from .warmup import compile_cache_counts

            c0 = compile_cache_counts()
            # PGOLF_GLOBAL_FUSED=1: the kernel path's global passes through its TTT steps' fused ops (off: base_view None)
            view = base_view(model, cfg, adapter.backend if adapter is not None else "bmm", dev)
            info = global_pass(model, tokens, rows, cfg, st, rank=rank, world=world, train_hook=train_hook,
                               clock=clock, view=view)
            c1 = compile_cache_counts()
            # what the pass compiled (a cold eval compiled ~13 s after its warm-up on the records' recipe, H200):
            # said here so a log shows which phase paid it
            compiled = dict(frames=c1["dynamo_frames"] - c0["dynamo_frames"],
                            seconds=round(c1["compile_s.frame"] - c0["compile_s.frame"], 3))
            passes.append(dict(info, phase=p, docs=int(len(scored)), compiled=compiled))
            log(f"[eval] phase {p + 1}/{cfg.phases}: global pass over {len(scored):,} scored documents, "
                f"{info['steps']} SGD steps, {info['seconds']:.1f} s"
                + (f" (of which compile: {compiled['frames']} Dynamo frames, {compiled['seconds']:.1f} s)"
                   if compiled["frames"] else ""))
            adapter.invalidate_a()  # fresh adapters on the moved base (as the record rebuilds them)
            if graphs is not None:
                if tensor_addresses(model) != graphs_at:
                    # the pass replaced tensors the captured steps read (int6 layers swapped for dense ones at the
                    # first pass): capture again
                    q.graphs = None
                    # the replaced graphs' pool goes first: kept until the new capture, the kernel path's records
                    # recipe held two sets (the first 59.56 GiB) and ran an 80 GB H100 out of memory at its first
                    # pass (bench/results/logs/eval-records-kernel-graphs-mlp-h100.txt)
                    graphs.release()
                    if st.bytes_at.device.type == "cuda":
                        torch.cuda.empty_cache()
                    graphs = _step_graphs(model, adapter, opt, cfg, st, log, prev=graphs)
                    graphs_at = tensor_addresses(model)
                    report["cuda_graphs"].setdefault("recaptures", []).append(dict(graphs.stats, phase=p))
                else:
                    # trained in place (same storage): a replay reads the moved weights. Capturing again cost
                    # 18.7-23.0 s per phase on the records' recipe (160 graphs, 1/8 share, H200)
                    report["cuda_graphs"]["kept_after_pass"] = report["cuda_graphs"].get("kept_after_pass", 0) + 1
                    log(f"[eval] phase {p + 1}/{cfg.phases}: CUDA graphs kept (base weights moved in place)")
    if share is not None:
        expected &= keep
    if swap is not None:
        graphs = swap["graphs"]
        if not swap["swapped"] and background.started:  # every batch ran eagerly: the thread must end
            background.result()
            swap["done"]()
        report["overlap_compile"] = dict(report.get("overlap_compile", {}), **background.stats)
    if graphs is not None:
        if graphs.lazy:  # captured while scoring: the preparation's figures are final only now
            report["cuda_graphs"].update(graphs.stats)
        report["cuda_graphs"].update(graphs.usage())
    if first_graphs is not None and first_graphs.first_replay_at is not None:
        report["first_step_at"] = first_graphs.first_replay_at
    if phased:
        report["phases"] = passes
    report.update(docs=sum(q.n_docs() for q in queues), chunk=cfg.chunk, window=cfg.window)
    return report


def _overlap(model, adapter, opt, cfg: TTTConfig, st, log, graphs: StepGraphs, background, report, clock) -> dict:
    """``--overlap-compile``: the main thread scores on eager graphs (``graphs``, lazy: the first step's captured at
    that step, the rest of the plan's right after it) with the model's forward kept eager on this thread
    (``set_thread_eager``); the background compile starts once those captures are done. Returns the queue's swap
    state: ``fn(wait)`` hands over compiled graphs for the same plan once the compile is done (``train.overlap``)."""
    from .forward import dynamo_settings, set_thread_eager

    state = {"graphs": graphs, "swapped": False, "queue": None}
    t0 = clock()
    set_thread_eager(True)

    def done():  # the thread has ended: this thread may run the compiled forward
        set_thread_eager(False)
        if background.compile:
            dynamo_settings()   # this thread runs the compiled graphs' warm steps (per-thread config)

    def fn(wait: bool):
        if wait:  # the deadline fallback scores with the forward from here: join only, no graphs it would not use
            if background.started:
                background.result()
            done()
            return None
        if not background.started or not background.ready():  # (not started: no step has run yet)
            state["eager_batches"] = state.get("eager_batches", 0) + 1
            return None
        rates = background.result()
        done()
        old = state["graphs"]
        new = _step_graphs(model, adapter, opt, cfg, st, log, prev=old, lazy=True)
        q = state["queue"]
        if q is not None:
            # the deadline estimate's base-scoring rate: the thread's warm-up measured it while this thread replayed
            # (contended: the H200's seeds run took it for ~1,000 s of base scoring and fell back), so it is at
            # least the TTT rate this thread measured on eager graphs (a no-grad forward costs less per position)
            q.base_rate = max(rates.get("base_pos_per_s") or 0.0, q.ttt_rate or 0.0) or None
            q.ttt_rate = q.ttt_rate or rates.get("ttt_pos_per_s")
        state.update(graphs=new, swapped=True)
        report["overlap_compile"] = {"switched_after_s": round(clock() - t0, 3),
                                     "eager_batches": state.get("eager_batches", 0),
                                     "eager_graphs": dict(old.stats, **old.usage()), "warmup_rates": rates}
        old.release()  # the eager graphs' memory pool is not needed again
        log(f"[eval] overlap-compile: compiled graphs from batch {state.get('eager_batches', 0)} on "
            f"({old.steps} steps replayed eagerly, background compile {background.stats.get('background_compile_s')} s)")
        return new

    def after_first_step():
        # the rest of the plan's eager graphs first, then the thread: no capture runs beside the thread's compile
        # (on the H200, seeds' config, 50,000 docs, a build that captured beside it stopped with a CUDA error; this
        # order completed)
        state["eager_captured_after_first"] = graphs.capture_planned()
        background.start()

    graphs.on_first_replay = after_first_step
    state.update(fn=fn, done=done)
    return state


def _step_graphs(model, adapter, opt, cfg: TTTConfig, st, log, batches_ns=None, rolling_claims=None, ns=None,
                 prev: Optional[StepGraphs] = None, lazy: bool = False) -> StepGraphs:
    """The TTT steps' graphs, prepared: captured (on a CPU device: the same bucketed steps, run eagerly); only the
    (bucket, kind) pairs the batch schedule meets over ``batches_ns`` when given (``StepGraphs.plan``), or the rolling
    schedule over the claim order ``rolling_claims`` of documents with ``ns`` targets (``StepGraphs.plan_rolling``);
    ``prev``:
    the graphs these replace after a global pass (same plan; their step counts carry over); ``lazy``: each bucket is
    captured at its first step (``StepGraphs(lazy=True)``), as with ``cfg.graph_capture == "first-use"``, where that
    step is the graph's warm step (``warm_real``)."""
    first_use = cfg.graph_capture == "first-use"
    graphs = StepGraphs(model, adapter, opt, cfg, st, lazy=lazy or first_use, warm_real=first_use)
    lazy = graphs.lazy
    if prev is not None:
        plan = prev.planned
        graphs.steps, graphs.real_positions, graphs.bucket_positions = (prev.steps, prev.real_positions,
                                                                       prev.bucket_positions)
        graphs.eager_steps, graphs.used, graphs.rare = prev.eager_steps, prev.used, prev.rare
    elif batches_ns is not None:
        plan = graphs.plan(batches_ns, min_steps=cfg.graph_min_steps)
    elif rolling_claims is not None:
        plan = graphs.plan_rolling(ns, rolling_claims, min_steps=cfg.graph_min_steps)
    else:
        plan = None
    stats = graphs.prepare(keys=plan)
    if graphs.rare and prev is None:
        log(f"[eval] CUDA graphs: {len(graphs.rare)} (bucket, kind) pairs met in fewer than {cfg.graph_min_steps} "
            f"steps ({sum(graphs.rare.values())} steps in all) run without a graph (--graph-min-steps)")
    if graphs.capture and lazy:
        log(f"[eval] CUDA graphs: {len(plan) if plan is not None else 'all'} to capture, each at its first step")
    elif graphs.capture:
        n_all = 2 * len(graphs.r_buckets) * len(graphs.l_buckets)
        which = f"those the {cfg.schedule} schedule will use" if plan is not None else "all"
        mem = (f"; {stats['graph_reserved_gib']:.2f} GiB more reserved, {stats['reserved_gib']:.2f} GiB in all"
               if "reserved_gib" in stats else "")
        log(f"[eval] CUDA graphs: {stats['graphs']} captured ({which} of {n_all}: {len(graphs.r_buckets)} row x "
            f"{len(graphs.l_buckets)} length buckets, score+train and score-only) in {stats['graph_prepare_s']:.1f} s"
            + mem)
    else:
        log(f"[eval] CUDA graphs: {graphs.st.bytes_at.device} device, nothing to capture: the bucketed steps run eagerly")
    return graphs


def unfreeze_at_load(model, mode: str, cfg: TTTConfig, how: str = "load") -> Optional[str]:
    """``--unfreeze-int6``: with phased per-document TTT (``mode`` "ttt", ``cfg.phases`` > 0) and ``how`` "load",
    replace ``model``'s int6 codes by their dequantized weights now (``unfreeze_int6``) and return what was done;
    else leave the model and return None (``how`` "first-pass": ``evaluate`` does it at the first global pass).
    Why at load: the first global pass replaces them anyway, and done before anything is compiled or captured, the
    steps are compiled once and their graphs kept across the passes. Replaced at the pass, the records' recipe
    (share 0/8, H100) compiled 6 Dynamo frames after its warm-up, 2 of them the global pass's own (the reference
    compiled those 2 only), and captured its 45 graphs again in 47.8 s (bench/results/warmup-h100.md)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unfreeze_at_load: model: expected a torch.nn.Module (train.model.GPT), got "
                        f"{type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"unfreeze_at_load: mode = {mode!r}: expected one of {sorted(MODES)}")
    if not isinstance(cfg, TTTConfig):
        raise TypeError(f"unfreeze_at_load: cfg: expected a TTTConfig, got {type(cfg).__name__}")
    if how not in ("load", "first-pass"):
        raise ValueError(f"unfreeze_at_load: how = {how!r}: expected 'load' or 'first-pass'")
    if mode != "ttt" or cfg.phases == 0 or how != "load" or not _has_int6(model):
        return None
    return unfreeze_int6(model) + " at load (--unfreeze-int6 load)"


def _has_int6(model) -> bool:
    """Whether ``model`` holds int6 codes (``Int6Linear`` modules: the kernel path's layers)."""
    from pgolf_kernels.int6_linear import Int6Linear

    return any(isinstance(m, Int6Linear) for m in model.modules())


def tensor_addresses(model) -> tuple:
    """(name, storage address) of every parameter and buffer: a CUDA graph replays on these addresses, so the
    captured TTT steps stay valid as long as this does not change (in-place updates keep it)."""
    return tuple((n, t.data_ptr()) for n, t in list(model.named_parameters()) + list(model.named_buffers()))


def _any_rank(flag: bool, distributed: bool, dev) -> bool:
    """``flag`` OR-ed over ranks (every rank takes the same branch around a collective)."""
    if not distributed:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _finalize(st, mode: str, expected: torch.Tensor, distributed: bool, dev) -> Dict[str, object]:
    """All-reduce the sums, the ledger and the counters over ranks, then check the ledger against
    ``expected`` (raises ``LegalityError`` on any violation) -> the report's score fields."""
    import torch.distributed as dist

    sync_device(dev)
    st.acc.all_reduce()
    st.ledger.all_reduce()
    counts = torch.tensor([st.docs_ttt, st.docs_base, st.steps, st.positions], dtype=torch.float64, device=dev)
    if distributed:
        dist.all_reduce(counts)
    legality = st.ledger.check(expected)
    return dict(val_loss=st.acc.val_loss, val_bpb=st.acc.bpb, targets=st.acc.n_targets, bytes=int(st.acc.byte_sum),
                docs_ttt=int(counts[0]), docs_no_ttt_deadline=int(counts[1]) if mode == "ttt" else 0,
                steps=int(counts[2]), window_positions=int(counts[3]), legality=legality)


# ---------------------------------------------------------------------------------------- CLI
def _parse(argv):
    from argparse import BooleanOptionalAction

    from .checks import OneLineArgumentParser

    ap = OneLineArgumentParser(prog="python3 -m train.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--val", default=os.environ.get("PGOLF_VAL", "data/datasets/fineweb10B_sp1024/fineweb_val_*.bin"),
                    help="glob of validation shards")
    ap.add_argument("--tokenizer", default=os.environ.get("PGOLF_TOKENIZER", "data/tokenizers/fineweb_1024_bpe.model"))
    ap.add_argument("--mode", default="ttt", choices=list(MODES))
    ap.add_argument("--reference", action="store_true", help="dequantized bf16 weights + bmm LoRA")
    ap.add_argument("--recipe", default="seeds", choices=sorted(RECIPES),
                    help="per-document TTT preset: seeds (rank 8 on q,v,head; the default) or records (the "
                         "2026-04-29 record's phased recipe); options given explicitly override the preset")
    ap.add_argument("--rank", type=int, default=None, dest="lora_rank", help=f"LoRA rank, 1..{MAX_RANK} (default 8)")
    ap.add_argument("--targets", "--lora-targets", default=None, dest="targets",
                    help=f"LoRA targets, a subset of {','.join(TARGETS)} (default q,v,head; chunked: q,v)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA scale alpha / rank (default: scale 1)")
    ap.add_argument("--chunk", type=int, default=None, help="targets per TTT chunk (default: the recipe's, at most the window; seeds 256)")
    ap.add_argument("--window", type=int, default=None,
                    help="context window, 1 .. the model's trained seq_len (default: per-document TTT the recipe's, seeds "
                         "1024, records 2048, at most seq_len; other modes the model's seq_len)")
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=32768, help="chunked: tokens per chunk (2048-65536)")
    ap.add_argument("--epochs", type=int, default=3, help="chunked: training epochs per scored chunk")
    ap.add_argument("--train-len", type=int, default=None, help="chunked: training window (default: seq_len)")
    ap.add_argument("--batch-seqs", type=int, default=32, help="chunked: training windows per Adam step")
    ap.add_argument("--batch-size", type=int, default=None, help="documents per TTT batch (default 64)")
    ap.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS), help="per-document optimizer (default adam)")
    ap.add_argument("--lr", type=float, default=None, help="default 0.01")
    ap.add_argument("--beta1", type=float, default=None, help="default 0.9 (0 allowed)")
    ap.add_argument("--beta2", type=float, default=None, help="default 0.95")
    ap.add_argument("--eps", type=float, default=None, help="default 1e-8")
    ap.add_argument("--weight-decay", type=float, default=None, help="AdamW's decoupled weight decay (default 0)")
    ap.add_argument("--warm-start-a", action="store_true", default=None,
                    help="keep LoRA A across document resets (only B is zeroed)")
    ap.add_argument("--tail-block", action=BooleanOptionalAction, default=None,
                    help="per-document TTT: run the last block's attention queries, output projection and MLP at the scored "
                         "chunk only (same scores up to rounding; fewer FLOPs per step; on in the records recipe, "
                         "--no-tail-block turns it off)")
    ap.add_argument("--phases", type=int, default=None, help="phased TTT: number of phases (default 0: off)")
    ap.add_argument("--phase-docs", type=int, default=None, help="phased TTT: documents in the phases")
    ap.add_argument("--phase-scope", default=None, choices=["cumulative", "phase"],
                    help="phased TTT: a global pass trains on every document scored so far (cumulative, the "
                         "record) or on its phase's only")
    ap.add_argument("--unfreeze-int6", default="load", choices=["load", "first-pass"],
                    help="phased TTT on int6 codes: replace them by their dequantized weights at load (one compile "
                         "and one set of CUDA graphs) or at the first global pass (phase 1 scored on the codes; the "
                         "steps compiled and captured again after the pass: 47.8 s on the records' recipe, H100)")
    ap.add_argument("--global-lr", type=float, default=None, help="phased TTT: SGD lr (default 1e-3)")
    ap.add_argument("--global-momentum", type=float, default=None, help="phased TTT: SGD momentum (default 0.9)")
    ap.add_argument("--global-clip", type=float, default=None, help="phased TTT: grad-norm clip (default 1.0)")
    ap.add_argument("--global-seq-len", type=int, default=None, help="phased TTT: training sequence (default 2048)")
    ap.add_argument("--global-batch-seqs", type=int, default=None, help="phased TTT: sequences per step (default 32)")
    ap.add_argument("--global-chunk-tokens", type=int, default=None,
                    help="phased TTT: targets per lr-schedule chunk (default 32768)")
    ap.add_argument("--schedule", default="batch", choices=["batch", "rolling"],
                    help="per-doc TTT: whole batches (the seeds' loop) or rows refilled as documents finish")
    ap.add_argument("--cuda-graphs", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                    help="--mode ttt: replay every TTT step from a CUDA graph of its shape bucket (captured before "
                         "the first scored step, on synthetic tokens, and again only after a global pass that replaced "
                         "the tensors they read; CUDA only). "
                         "auto (default): on for --mode ttt on CUDA (unless --separate-score-pass), else off")
    ap.add_argument("--graph-window-step", type=int, default=None,
                    help="--cuda-graphs: the window buckets' step in positions (default max(chunk, window / 8)); finer "
                         "pads less, captures more graphs")
    ap.add_argument("--graph-capture", default=None, choices=["ahead", "first-use"],
                    help="--cuda-graphs: capture each graph before the first scored step after a synthetic warm step "
                         "(ahead, the default), or at its bucket's first step, which runs without a graph as the "
                         "warm step (first-use: no synthetic steps)")
    ap.add_argument("--fused-optimizer", default="auto", choices=["auto", "on", "off"],
                    help="the adapters' Adam / AdamW step in one pass per parameter (pgolf_kernels.adam_rows); auto: "
                         "on for the kernel path, off for --reference")
    ap.add_argument("--fused-mlp", default="auto", choices=["auto", "on", "off"],
                    help="the MLP as pgolf_kernels.linear_act.mlp_leaky_sq (activation in the up-projection's epilogue, "
                         "its derivative in the backward's first GEMM, up / down adapters merged per row; int6 MLP codes "
                         "dequantized per call); auto: on for the kernel path when the MLP carries an adapter (the "
                         "records' 'mlp' target, or up and down), off otherwise and for --reference")
    ap.add_argument("--fused-residual", default="auto", choices=["auto", "on", "off"],
                    help="the block's two residual sites as pgolf_kernels.linear_residual (projection, o / mlp "
                         "adapters' expand and the residual add in one GEMM); auto: on for the kernel path where "
                         "model_dim, the MLP width and the rank are multiples of 8, off for --reference")
    ap.add_argument("--fused-qk", default="auto", choices=["auto", "on", "off"],
                    help="q's and k's per-head RMSNorm, q_gain and rotary in one pass each (pgolf_kernels."
                         "head_norm_rope); auto: on for the kernel path where the head dim is twice a power of two, "
                         "off for --reference")
    ap.add_argument("--graph-min-steps", type=int, default=None,
                    help="--cuda-graphs: capture only the graphs the plan meets in at least this many steps; the "
                         "rarer ones' steps run the same body without a graph (default 3; 1: capture every planned "
                         "graph)")
    ap.add_argument("--overlap-compile", nargs="?", const="thread", default=None, choices=["thread", "process"],
                    help="--cuda-graphs with the compiled forward, batch schedule, no phases: start scoring on eager "
                         "CUDA graphs at once and switch to compiled ones when the step is compiled (train/overlap.py): "
                         "'thread' (the default) compiles and warms up in a background thread; 'process' in a child "
                         "process that fills the compile caches, then here from them at a batch boundary")
    ap.add_argument("--separate-score-pass", action="store_true",
                    help="score each chunk from its own no-grad forward before the training forward (2x forwards)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S)
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN_S)
    ap.add_argument("--max-docs", type=int, default=None, help="only the first N documents")
    ap.add_argument("--share", default=None, help="k/n: one rank's static share (every n-th batch from k)")
    ap.add_argument("--no-warmup", action="store_true", help="same as --warmup off")
    ap.add_argument("--warmup", default="auto", choices=["auto", "full", "off"],
                    help="auto: full on CUDA; on CPU (nothing to compile or autotune) skipped for ttt/base, one "
                         "2,048-token chunk pair for chunked; full: the GPU-size sweep everywhere")
    ap.add_argument("--warmup-only", action="store_true",
                    help="run the warm-up (synthetic tokens: compile, autotune; full even on CPU) and exit without "
                         "reading a validation shard: it fills this machine's compile caches for a later eval of the "
                         "same model config and options (the train driver runs it during training: warm_eval_caches)")
    ap.add_argument("--warmup-part", default="all", choices=["all", *PARALLEL_PARTS],
                    help="with --warmup-only: all (default) the whole warm-up; else one part, compiling only its "
                         "functions, on synthetic tokens (what --parallel-compile's children run): ttt-block, "
                         "ttt-head, ttt-tail (one TTT batch of the warm-up's size), global (the phased recipe's global pass)")
    ap.add_argument("--parallel-compile", default="off", choices=["auto", "global", "off"],
                    help="phased TTT, compiled, on one CUDA device: compile the TTT step's functions and the global "
                         "pass in child processes (--warmup-only --warmup-part ..., synthetic tokens), one each, in "
                         "parallel beside this process's load; the warm-up and the first global pass then compile from "
                         "cache hits. auto: on there, off elsewhere; global: the global pass's child only (its ~13 s "
                         "compile left the timed eval on an H200); off (default): the TTT children saved no compile "
                         "time on an H200 (0.95x, bench/results/parallel-compile-h200.md)")
    ap.add_argument("--allow-tokenizer-mismatch", action="store_true",
                    help="score even when --tokenizer is not the tokenizer recorded in the artifact")
    ap.add_argument("--debug", action="store_true", help="full traceback on an input error (default: one line, exit 2)")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="torch.compile the model forward (auto: on for CUDA); compile time falls in the warm-up")
    ap.add_argument("--precompiled", default=None, metavar="DIR",
                    help="folder of ahead-of-time compiled forward functions (torch.compile(...).aot_compile): loaded "
                         "when present, else compiled on first use and saved there; a later eval with the same folder "
                         "skips Dynamo's tracing (needs the compiled forward: --compile on, or auto on CUDA)")
    ap.add_argument("--compile-cache", default=None, metavar="FILE",
                    help="one file of torch.compile's caches (pgolf_kernels/compile_cache.py): loaded before the first compile "
                         "when it exists, else written at the end (rank 0); a process on a machine with empty caches "
                         "then compiles from cache hits. Make it with --warmup-only (synthetic tokens only); needs the "
                         "compiled forward (--compile on, or auto on CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.warmup_only and (args.no_warmup or args.warmup == "off"):
        ap.error("--warmup-only: expected the warm-up on (got --warmup off / --no-warmup: there would be nothing to run)")
    if args.warmup_part != "all" and not args.warmup_only:
        ap.error(f"--warmup-part {args.warmup_part}: expected --warmup-only (it names which warm-up to run and exit)")
    from .checks import eval_numbers

    eval_numbers(args)  # explicit numbers by name (CheckError: one line, exit 2 from the CLI)
    try:  # validated before the artifact is even read: a bad value is refused by name in one line
        args.ttt_cfg, args.chunked_cfg = _configs(args)
    except ValueError as e:
        ap.error(str(e))
    return args


# CLI option -> TTTConfig field (options left unset keep the recipe's value)
# (window and chunk are resolved against the model's trained length in main(), by checks.eval_args)
_TTT_OPTIONS = {"lora_rank": "rank", "alpha": "alpha", "batch_size": "batch_size",
                "optimizer": "optimizer", "lr": "lr", "beta1": "beta1", "beta2": "beta2", "eps": "eps",
                "weight_decay": "weight_decay", "warm_start_a": "warm_start_a", "tail_block": "tail_block",
                "graph_window_step": "graph_window_step", "graph_capture": "graph_capture",
                "graph_min_steps": "graph_min_steps",
                "phases": "phases",
                "phase_docs": "phase_docs", "global_lr": "global_lr", "global_momentum": "global_momentum",
                "global_clip": "global_clip", "global_seq_len": "global_seq_len",
                "global_batch_seqs": "global_batch_seqs", "global_chunk_tokens": "global_chunk_tokens"}


def _configs(args):
    """(TTTConfig, ChunkedConfig or None) from the parsed CLI: the recipe, then the options given."""
    over = {f: getattr(args, a) for a, f in _TTT_OPTIONS.items() if getattr(args, a) is not None}
    if args.targets is not None:
        over["targets"] = tuple(t for t in args.targets.split(",") if t)
    if args.phase_scope is not None:
        over["phase_cumulative"] = args.phase_scope == "cumulative"
    if args.mode == "chunked":
        if args.recipe != "seeds":
            raise ValueError(f"--recipe {args.recipe} is a per-document recipe; --mode chunked takes its own options")
        cc = ChunkedConfig(**{k: v for k, v in dict(
            chunk_tokens=args.chunk_tokens, rank=args.lora_rank, epochs=args.epochs, lr=args.lr, beta1=args.beta1,
            beta2=args.beta2, stride=args.stride,
            batch_seqs=args.batch_seqs, targets=over.get("targets", ("q", "v"))).items() if v is not None})
        return TTTConfig(), cc  # the per-document config is unused by the chunked mode
    return recipe(args.recipe, separate_score_pass=args.separate_score_pass, schedule=args.schedule,
                  cuda_graphs=args.cuda_graphs == "on",
                  fused_optimizer=_auto_on_off(args.fused_optimizer), fused_mlp=_auto_on_off(args.fused_mlp),
                  fused_qk=_auto_on_off(args.fused_qk), fused_residual=_auto_on_off(args.fused_residual), **over), None


def _auto_on_off(choice: str) -> Optional[bool]:
    """An auto|on|off option as TTTConfig takes it: None (the path decides), True or False."""
    return {"auto": None, "on": True, "off": False}[choice]


def auto_cuda_graphs(device: torch.device, mode: str, reference: bool, separate_score_pass: bool = False):
    """``--cuda-graphs auto`` -> (on, reason). On where replay is measured to pay and verified on a GPU:
    * ``--reference``: the compiled seeds eval of all 50,000 docs took 143.6 s cold / 129.5 s warm-cache wall with
      graphs (174.7 / 146.9 s in an earlier build) vs 301.8 s without (1.68 vs ~1.1 M window tok/s; H200s of one
      image, but the runs without graphs were another device call and build, not an A/B in one call:
      bench/results/eval-h200.md); replay equals eager in the GPU tests for bmm LoRA at rank 8 and 96, compiled or
      not, incl. phased TTT (tests/test_graphs.py).
    * the kernel path: replay equals its bucketed steps run eagerly (bf16, rank 8 and 96) and the eval with graphs
      equals the eager eval (fp32: rank 8 and 96, int6, int6 phased) on an H100
      (bench/results/logs/gpu-tests-kernel-graphs-h100.txt); the records' recipe on share 0/8 ran complete with
      graphs at 1.36-1.44 M window tok/s, val_bpb within 2.6e-5 (relative) of --reference
      (bench/results/warmup-h100.md). Without graphs its compiled step is host-free only at the records' large
      shapes (step 91.55 vs 88.88 GPU-ms, H100, bench/results/profile-ttt-h100.md); the seeds' small steps were
      host-bound (1/8 share 173.0 s vs 80.3 s for --reference, an earlier build without graphs)."""
    device = torch.device(device)  # a str is taken too; anything else raises naming it
    if mode not in MODES:
        raise ValueError(f"auto_cuda_graphs: mode = {mode!r}: expected one of {sorted(MODES)}")
    if device.type != "cuda":
        return False, f"{device} device (graphs are CUDA only)"
    if mode != "ttt":
        return False, f"--mode {mode} (graphs replay per-document TTT steps)"
    if separate_score_pass:
        return False, "--separate-score-pass: its captured steps are not verified on a GPU (--cuda-graphs on to try)"
    if not reference:
        return True, ("kernel path per-document TTT on CUDA (replay equals eager in the GPU tests at rank 8 and 96; "
                      "the records' recipe on a 1/8 share at 1.36-1.44 M window tok/s with graphs, H100)")
    return True, ("--reference per-document TTT on CUDA (50,000 docs with graphs: 143.6 s cold, 129.5 s with warm "
                  "caches; 301.8 s without graphs in an earlier build, H200)")


def _start_cuda(device: torch.device) -> None:
    """The CUDA context and the libraries a TTT step calls first, in a daemon thread beside the artifact decode:
    a bf16 GEMM with its backward (cuBLAS / cuBLASLt handles and workspaces, autograd's device thread) and a causal
    GQA bf16 SDPA forward + backward at head dim 64 (the SDPA backend's library load). Why: the first eager step of
    ``--overlap-compile`` took 2.8 s of its 7.0 s to the first score on the H200, the first use of those libraries
    included. Handles go back to torch's per-device pools when this thread ends, so the main thread reuses them.
    No random numbers (the CUDA generator's state is left as it was). The caller joins the thread before the
    warm-up (a graph capture must not meet this thread's work). Quiet on failure (e.g. a device index this
    machine lacks): the main thread's first use of the device raises it, as one error."""
    try:
        torch.zeros(1, device=device)
        import torch.nn.functional as F

        with torch.enable_grad():
            x = torch.full((256, 512), 0.01, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = torch.full((512, 512), 0.01, device=device, dtype=torch.bfloat16, requires_grad=True)
            q = (x @ w).view(1, 256, 8, 64).transpose(1, 2)
            kv = q[:, :4]  # 8 query heads over 4 key/value heads, as the model's attention calls it
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).float().sum().backward()
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


# --warmup-part -> the compile_rows_nll functions its child compiles (global: the adapter-free block and head that
# the global pass runs with gradients to the base weights)
PARALLEL_PARTS = {"ttt-block": ("block_adapted",), "ttt-head": ("head_adapted",), "ttt-tail": ("block_tail",),
                  "global": ("block_plain", "head_plain")}


def _parallel_compile_parts(args, cfg: TTTConfig, compiled: bool, device, world: int) -> List[str]:
    """``--parallel-compile auto``: the ``--warmup-part`` children to start (none: off). On for a phased per-document
    TTT eval with the compiled forward on one CUDA device, with the warm-up on and none of ``--warmup-only``,
    ``--overlap-compile``, ``--compile-cache`` or ``--precompiled`` (each brings its own way to the caches): one child
    per compiled function of the TTT step (the tail block's with ``--tail-block``) and one for the global pass.
    Off by default. Why it exists: on the records' 1/8 share (H200, cold) the warm-up compiled 3 Dynamo frames one
    after another (31.1 s) and 2 more came inside the timed eval (~13 s, the first global pass's). Why it is off: on
    the H200 the children did not shorten the compile (``python3 -m bench.parallel_compile --tail-block``: children
    50.6 s of wall, process start included, then the warm-up 25.3 s from their entries, against 72.5 s cold, 0.95x;
    bench/results/parallel-compile-h200.md), and the records' 1/8 share run with it (and ``--graph-capture
    first-use``) scored at 845k window tokens/s against 1.19M without either (the cause not separated yet; the
    global pass did compile in 1.4 s instead of ~13 s). ``global``: that child only. One GPU only: a child of every
    rank of a distributed eval would each compile the same graphs."""
    if not (args.parallel_compile in ("auto", "global") and compiled and torch.device(device).type == "cuda"
            and args.mode == "ttt" and cfg.phases > 0 and world == 1 and not args.warmup_only
            and not (args.no_warmup or args.warmup == "off") and not args.overlap_compile
            and not args.compile_cache and not args.precompiled):
        return []
    if args.parallel_compile == "global":
        return ["global"]
    return ["ttt-block", "ttt-head"] + (["ttt-tail"] if cfg.tail_block else []) + ["global"]


def _wait_children(children: Dict[str, object], log, what: str) -> Dict[str, Dict[str, object]]:
    """``--parallel-compile``: wait for ``children`` (part -> ``CompileChild``) before ``what`` compiles here; their
    outcomes for the report. A failed child is said in the log and the report, and its functions compile here as
    they would without it."""
    outs = {}
    for part, child in children.items():
        out = outs[part] = child.wait()
        if out["rc"] == 0:
            log(f"[eval] parallel-compile: {part} child done in {out['child_s']:.1f} s (waited {out['waited_s']:.1f} s "
                f"here, before {what})")
        else:
            log(f"[eval] parallel-compile: {part} child failed (exit {out['rc']}); {what} compiles it here. Its "
                f"output ends: {' '.join(str(out.get('tail', '')).split())[-400:]}")
    return outs


def _compile_child_argv(argv) -> list:
    """This eval's arguments for ``--overlap-compile process``'s child: the same model, recipe and TTT options with
    ``--warmup-only`` (synthetic tokens only; no validation shard is read), without ``--overlap-compile``, ``--json``
    and ``--max-docs``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for i, a in enumerate(raw):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name == "--overlap-compile":
            skip = "=" not in a and i + 1 < len(raw) and raw[i + 1] in ("thread", "process")
            continue
        if name in ("--json", "--max-docs"):
            skip = "=" not in a
            continue
        out.append(a)
    return out + ["--warmup-only"]


def _import_compiler() -> None:
    """torch.compile's modules, in a daemon thread at process start on CUDA: the imports took 2.6 s of a 2.9 s
    ``compile_rows_nll`` on 2 CPU cores, and there they overlap the artifact decode and the CUDA context set-up.
    A failure here is not an error: the import repeats in the main thread and raises there."""
    try:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def _start_compile_workers() -> None:
    """Inductor's pool of compile worker processes, which it otherwise starts at the first compile (each worker
    imports torch): started once the inputs are checked, its start-up overlaps the model's load. Not an error if
    it fails: Inductor tries again at the first compile."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def main(argv=None) -> dict:
    startup_s = process_age_s()  # interpreter + imports, before main()
    args = _parse(argv)
    t_start = time.perf_counter()
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    log = print if rank == 0 else (lambda *a, **k: None)
    # work that waits on neither the checks nor the artifact, in daemon threads while the artifact is
    # decoded: the code import walk of the submission's byte count, the CUDA context, torch.compile's imports
    from .artifact import prefetch_code_paths

    prefetch_code_paths()
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    compiler = cuda_libs = None
    if device.type == "cuda":
        cuda_libs = threading.Thread(target=_start_cuda, args=(device,), daemon=True)
        cuda_libs.start()
        if compiled and not args.overlap_compile:  # --overlap-compile: the background thread imports it later
            compiler = threading.Thread(target=_import_compiler, daemon=True)
            compiler.start()
    cfg, cc = args.ttt_cfg, args.chunked_cfg
    if args.cuda_graphs == "auto":
        on, why = auto_cuda_graphs(device, args.mode, args.reference, cfg.separate_score_pass)
        cfg = dataclasses.replace(cfg, cuda_graphs=on)
        if args.mode == "ttt":
            log(f"[eval] CUDA graphs {'on' if on else 'off'} (--cuda-graphs auto): {why}")
    if cfg.cuda_graphs and (device.type != "cuda" or args.mode != "ttt"):
        from .checks import CheckError

        raise CheckError("--cuda-graphs", True, f"--mode ttt on a CUDA device (got --mode {args.mode} on {device})")
    if args.graph_window_step is not None and not cfg.cuda_graphs:  # it would change nothing: say so, do not ignore it
        from .checks import CheckError

        raise CheckError("--graph-window-step", args.graph_window_step, "--cuda-graphs on (or auto resolving to on: "
                         f"--mode ttt on CUDA); the CUDA graphs are off here")
    for flag, value in (("--graph-capture", args.graph_capture), ("--graph-min-steps", args.graph_min_steps)):
        if value is not None and not cfg.cuda_graphs:
            from .checks import CheckError

            raise CheckError(flag, value, "--cuda-graphs on (or auto resolving to on: --mode ttt on CUDA); "
                                          "the CUDA graphs are off here")
    overlap = args.overlap_compile
    if overlap:
        from .checks import CheckError

        why = [w for bad, w in ((not compiled, f"the compiled forward (got --compile {args.compile} on {device})"),
                                (not cfg.cuda_graphs, "--cuda-graphs on (or auto on CUDA)"),
                                (args.mode != "ttt", f"--mode ttt (got {args.mode})"),
                                (cfg.schedule != "batch", f"--schedule batch (got {cfg.schedule})"),
                                (cfg.phases > 0, f"no phased TTT (got {cfg.phases} phases)"),
                                (args.warmup_only, "no --warmup-only (nothing is scored to overlap)"),
                                (args.no_warmup or args.warmup == "off",
                                 "the warm-up on (it is what the background thread compiles)")) if bad]
        if why:
            raise CheckError("--overlap-compile", overlap, "; ".join(why))
    if args.precompiled:
        from .checks import CheckError
        from .precompiled import unsupported_reason

        why = unsupported_reason()
        if why:
            raise CheckError("--precompiled", args.precompiled, f"a torch that saves compiled functions; {why} "
                                                                 f"(run without --precompiled)")
    # every input is checked here, before the artifact is decoded and long before the warm-up; the
    # window defaults (per-document TTT) to the recipe's (seeds 1024, records 2048) or else the model's trained seq_len
    from .checks import eval_args

    seq_len, window, chunk, share, budget_s = eval_args(args, log, recipe_window=RECIPES[args.recipe].get("window"),
                                                        recipe_chunk=RECIPES[args.recipe].get("chunk", cfg.chunk))
    # where the load goes (seconds since the previous mark): the warm process's load (9.6 s) exceeded the cold
    # one's (7.3 s) on the H200 and the total alone did not say why
    load_parts, t_mark = {}, [t_start]

    def mark(name: str) -> None:
        now = time.perf_counter()
        load_parts[name] = round(now - t_mark[0], 3)
        t_mark[0] = now

    mark("checks")
    cfg = dataclasses.replace(cfg, window=window, chunk=chunk, graph_window_step=fit_window_step(
        cfg.graph_window_step, window, given=args.graph_window_step is not None))
    if cc is not None:
        cc = dataclasses.replace(cc, window=window, train_len=args.train_len or seq_len)
    from .checks import CheckError

    for flag, value in (("--precompiled", args.precompiled), ("--compile-cache", args.compile_cache)):
        if value and not compiled:  # both act on torch.compile's output
            raise CheckError(flag, value, f"the compiled forward (--compile on, or auto on CUDA; got --compile "
                                          f"{args.compile} on {device})")
    cache_file_exists = None
    if args.compile_cache is not None:
        from pgolf_kernels.compile_cache import CompileCacheError, check_compile_cache_path

        try:
            cache_file_exists = check_compile_cache_path(args.compile_cache, "--compile-cache")
        except CompileCacheError as e:
            raise CheckError(e.arg, e.value, e.expected) from None
    if args.warmup_part == "global" and cfg.phases == 0:
        raise CheckError("--warmup-part", "global", "a phased recipe (--phases > 0): without phases there is no "
                                                    "global pass to compile")
    if args.warmup_part == "ttt-tail" and not cfg.tail_block:
        raise CheckError("--warmup-part", "ttt-tail", "--tail-block (without it the tail block's function is not used)")
    if args.warmup_part != "all" and args.mode != "ttt":
        raise CheckError("--warmup-part", args.warmup_part, f"--mode ttt (got --mode {args.mode})")
    if args.warmup_part != "all" and args.precompiled:
        raise CheckError("--warmup-part", args.warmup_part, "no --precompiled (a part compiles some functions; a "
                                                            "precompiled folder holds all of them)")
    children = {}
    parts = _parallel_compile_parts(args, cfg, compiled, device, world)
    if parts:
        from .overlap import CompileChild

        children = {part: CompileChild(_compile_child_argv(argv) + ["--warmup-part", part],
                                       who="--parallel-compile").start() for part in parts}
        log(f"[eval] parallel-compile: {len(parts)} child processes compile {', '.join(parts)} on synthetic tokens "
            f"beside the load")
    if compiler is not None and not overlap:
        compiler.join()  # one thread starts the worker pool: two callers could each make one
        # apart: on the H200 this wait plus the pool start took 5.8-5.9 s of a 6.6-6.8 s load (cold and warm), and
        # on the 2-core CPU machine the imports took 3.1-4.4 s, torch_key 0.26 s and the pool start ~0 s
        mark("compile_imports")
        # with a compile-cache file every compile of the warm-up is meant to be a cache hit, which needs no
        # worker: Inductor still starts the pool at its first real compile if one misses (what this saves is
        # not timed yet: load_parts' compile_workers of the seeds-ref-cachefile warm-up case will say)
        if not cache_file_exists:
            _start_compile_workers()
        mark("compile_workers")
    model, info = load_model(args.artifact, reference=args.reference, device=device)
    mark("model")
    unfrozen = unfreeze_at_load(model, args.mode, cfg, args.unfreeze_int6)
    if unfrozen is not None:
        log(f"[eval] phased TTT: the base weights move at the first global pass; {unfrozen}")
        mark("unfreeze_int6")
    precompiled = {}
    if compiled and not overlap:  # --overlap-compile: attached by the background thread, after the eager graphs
        precompiled = compile_rows_nll(model, precompiled=args.precompiled, only=PARALLEL_PARTS.get(args.warmup_part))
    mark("compile_setup")
    cache_file = None
    if cache_file_exists:  # before the warm-up's first compile: its compiles become cache hits
        from pgolf_kernels.compile_cache import load_compile_cache

        cache_file = load_compile_cache(args.compile_cache, "--compile-cache")
        log(f"[eval] compile cache: {cache_file['loaded_bytes']:,} bytes from {args.compile_cache} "
            f"({cache_file['entries']}) in {cache_file['load_s']:.1f} s")
        mark("compile_cache_file")
    # the Precompiled objects' counters, read when the report is written (they count the warm-up's compiles)
    precompiled_stats = lambda: {n: dict(p.stats) for n, p in precompiled.items()}  # noqa: E731
    lut = ByteLUT.from_sentencepiece(args.tokenizer, vocab_size=model.config.vocab_size)
    mark("tokenizer")
    if cuda_libs is not None:
        cuda_libs.join()  # before anything is warmed up or captured
        mark("cuda_libs")
    sync_device(device)
    mark("sync")
    load_s = time.perf_counter() - t_start
    info = dict(info, load_parts=load_parts)
    rates = None
    t_w = time.perf_counter()
    wmode = "off" if args.no_warmup else args.warmup
    if args.warmup_only and wmode == "auto":
        wmode = "full"
    if wmode == "auto":
        # a CPU run compiles and autotunes nothing; there the GPU-size sweep only measures the rates of the
        # deadline fallback, and took 74 s against 73 s of TTT scoring even at 2 documents a shape
        # (tiny-preset artifact, fixture val set, 2 loaded cores), so the per-document modes skip it
        wmode = "full" if (device.type == "cuda" or compiled) else "cpu"
        if wmode == "cpu" and args.mode in ("ttt", "base"):
            log("[eval] warm-up: skipped on CPU (nothing to compile or autotune); without measured rates the "
                "deadline fallback to base-model scoring is off (--warmup full measures them)")
        elif wmode == "cpu" and args.mode == "chunked":
            log("[eval] warm-up: CPU, nothing to compile or autotune: one 2,048-token synthetic chunk pair only "
                "(--warmup full: the configured chunk size)")
    background = None

    def ttt_warmup():  # synthetic tokens only
        return warmup(model, lut, cfg, "bmm" if args.reference else "kernel", device, n_docs=cfg.batch_size,
                      doc_len=cfg.window + cfg.chunk, graphs=cfg.cuda_graphs and args.mode == "ttt")

    parallel = {}
    if args.warmup_part == "global":  # a --parallel-compile child: the global pass only, on synthetic tokens
        from .warmup import warmup_global

        if _has_int6(model):
            unfreeze_int6(model)  # as the first global pass does, so the same graphs are compiled
        rates = warmup_global(model, cfg, device, view=base_view(model, cfg, "bmm" if args.reference else "kernel",
                                                                 device))
    elif args.warmup_part != "all":  # a --parallel-compile child: one warm-up-size TTT batch, its functions compiled
        from .warmup import warmup_ttt_steps

        rates = warmup_ttt_steps(model, lut, cfg, "bmm" if args.reference else "kernel", device)
    elif overlap == "process" and wmode != "off":
        from .overlap import ProcessCompile

        background = ProcessCompile(model, _compile_child_argv(argv), ttt_warmup, precompiled=args.precompiled)
        log("[eval] overlap-compile: torch.compile and the warm-up run in a child process that fills the compile "
            "caches while the first batches replay eager CUDA graphs; the compile here follows from those caches")
    elif overlap and wmode != "off":
        from .overlap import BackgroundCompile

        def _background_warm():
            if compiler is not None:
                compiler.join()
            if not cache_file_exists:
                _start_compile_workers()
            return ttt_warmup()

        background = BackgroundCompile(model, _background_warm, precompiled=args.precompiled)
        log("[eval] overlap-compile: the warm-up and torch.compile run in a background thread while the first "
            "batches replay eager CUDA graphs")
    elif wmode == "full" and args.mode in ("ttt", "base"):
        # synthetic tokens only; the validation shards are not even read until warm-up is over
        ttt_children = {p: c for p, c in children.items() if p != "global"}
        if ttt_children:  # their cache entries first: this warm-up then compiles from hits
            parallel.update(_wait_children(ttt_children, log, "the warm-up"))
        rates = ttt_warmup()
    elif wmode != "off" and args.mode == "chunked":
        wcc = cc if wmode == "full" else dataclasses.replace(cc, chunk_tokens=2048)
        rates = warmup_chunked(model, lut, wcc, "bmm" if args.reference else "kernel", device, rank=rank,
                               world=dist.get_world_size() if dist.is_initialized() else 1)
    warmup_s = time.perf_counter() - t_w
    if args.warmup_only:
        if precompiled:
            info = dict(info, precompiled=precompiled_stats())
        info = dict(info, **_compile_cache_report(args, cache_file, cache_file_exists, rank, log))
        return _warmup_only_report(args, info, rates, startup_s, load_s, warmup_s, time.perf_counter() - t_start,
                                   compiled, device, rank, log)
    t_v = time.perf_counter()
    tokens = load_val_tokens(args.val)
    if args.max_docs:
        tokens = docs_prefix(tokens, args.max_docs)
    tokens = tokens.to(device)
    val_load_s = time.perf_counter() - t_v
    # time from process start to the first scored token: what a cold or warm compile cache changes
    to_scoring_s = (startup_s or 0.0) + (time.perf_counter() - t_start)
    rep = evaluate(model, tokens, lut, mode=args.mode, cfg=cfg, stride=args.stride,
                   backend="bmm" if args.reference else "kernel", t_start=t_start,
                   budget_s=budget_s, rates=rates, share=share, log=log, chunked=cc, background=background,
                   before_global=((lambda: _wait_children({"global": children["global"]}, log, "the first global pass"))
                                  if "global" in children else None))
    wall = time.perf_counter() - t_start
    if unfrozen is not None:
        rep["base_weights"] = unfrozen
    rep.update(info, startup_s=startup_s, load_s=load_s, warmup_s=warmup_s, val_load_s=val_load_s,
               to_scoring_s=to_scoring_s, timed_eval_s=rep["score_s"], wall_s=wall + (startup_s or 0.0),
               # process start to the first step's scores on the device (CUDA graphs; the graphs' preparation
               # before it included): the warm-up target's figure
               first_score_s=(round((startup_s or 0.0) + rep.pop("first_step_at") - t_start, 3)
                              if "first_step_at" in rep else None),
               reference=args.reference, compiled=compiled, ttt=asdict(cc if cc is not None else cfg), device=str(device),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if rates:
        rep["warmup_rates"] = rates
    if children:  # every child's outcome (one the eval never waited for, e.g. no global pass ran: waited now)
        parallel.update(rep.pop("before_global", {}))
        parallel.update({p: c.wait() for p, c in children.items() if p not in parallel})
        rep["parallel_compile"] = parallel
    if compiled:
        # the compile counters at the end: what the graphs' preparation or the scoring still compiled after the
        # warm-up (the warm-up's own are in warmup_rates); the graphs' warm steps stop on that evidence
        from .warmup import compile_cache_counts

        rep["compile_cache_end"] = compile_cache_counts()
    if precompiled:
        rep["precompiled"] = precompiled_stats()
    rep.update(_compile_cache_report(args, cache_file, cache_file_exists, rank, log))
    log(f"[eval] val_loss {rep['val_loss']:.6f} val_bpb {rep['val_bpb']:.6f} targets {rep['targets']:,} "
        f"bytes {rep['bytes']:,} | load {load_s:.1f} s warm-up {warmup_s:.1f} s scoring {rep['score_s']:.1f} s "
        f"(timed eval) | start-up {startup_s or 0.0:.1f} s, to scoring {to_scoring_s:.1f} s"
        + (f", first score {rep['first_score_s']:.1f} s" if rep.get("first_score_s") is not None else "") + " | "
        f"wall {wall + (startup_s or 0.0):.1f} s from process start" + (f" | docs TTT {rep['docs_ttt']:,}, no-TTT (deadline) "
                                                f"{rep['docs_no_ttt_deadline']:,}" if args.mode == "ttt" else ""))
    if args.mode == "chunked":
        log(f"[eval] chunked: {rep['chunks']} chunks of {rep['chunk_tokens']:,} tokens, {rep['chunks_trained']} trained "
            f"({rep['train_steps']} Adam steps, {rep['epochs']} epochs), LoRA rank {rep['lora_rank']} "
            f"({rep['lora_backend']}), window {rep['window']} stride {rep['stride']}")
    return _finish(rep, args, rank)


def _compile_cache_report(args, loaded, existed, rank: int, log) -> dict:
    """``--compile-cache``: {"compile_cache_file": what was loaded, or what rank 0 wrote now}; {} without the option."""
    if args.compile_cache is None:
        return {}
    if existed:
        return {"compile_cache_file": loaded}
    if rank != 0:
        return {"compile_cache_file": {"path": args.compile_cache, "saved_bytes": 0, "note": "written by rank 0"}}
    from pgolf_kernels.compile_cache import save_compile_cache

    saved = save_compile_cache(args.compile_cache, "--compile-cache")
    log(f"[eval] compile cache: {saved['saved_bytes']:,} bytes written to {args.compile_cache} ({saved['entries']}) "
        f"in {saved['save_s']:.1f} s")
    return {"compile_cache_file": saved}


def _finish(rep: dict, args, rank: int) -> dict:
    """Write the report (``--json``, rank 0) and leave the process group; returns ``rep``."""
    import torch.distributed as dist

    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1, default=str)
    if dist.is_initialized():
        dist.destroy_process_group()
    return rep


def _warmup_only_report(args, info, rates, startup_s, load_s, warmup_s, wall, compiled, device, rank, log) -> dict:
    """``--warmup-only``: the report of a warm-up run (no validation shard was read, nothing was scored)."""
    rep = dict(info, warmup_only=True, mode=args.mode, startup_s=startup_s, load_s=load_s, warmup_s=warmup_s,
               wall_s=wall + (startup_s or 0.0), reference=args.reference, compiled=compiled, device=str(device),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", warmup_rates=rates or {})
    log(f"[eval] warm-up only: load {load_s:.1f} s, warm-up {warmup_s:.1f} s, wall {rep['wall_s']:.1f} s from process "
        f"start; {'compiled' if compiled else 'not compiled'}, compile caches: "
        f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'torch default')}")
    return _finish(rep, args, rank)


if __name__ == "__main__":
    from .checks import run_cli

    from pgolf_kernels.compile_cache import CompileCacheError

    run_cli(main, extra=(ArtifactLoadError, LegalityError, CompileCacheError))
