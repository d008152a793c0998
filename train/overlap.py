"""Score while compiling (``--overlap-compile``): the eval starts on eager CUDA graphs and moves to compiled
ones when a background thread has compiled the TTT step.

Why: the compiled step replays ~2x faster than the eager one (H200, seeds' config, all 50,000 documents: 111.3 s
of replay compiled vs ~230 s eager, ``bench/results/eval-h200.md``), but its compile is most of the time to the
first score (32.3 s cold: 19.0 s warm-up, 15.8 s of it Dynamo + Inductor; 5.8 s of the load waiting for
torch.compile's imports and worker pool). Here the first score waits only for the eager graphs (no compile), and
the compile runs beside the scoring: Inductor's Triton builds run in its worker processes, Dynamo's tracing shares
the GIL with a replay loop that needs ~1-2 ms of Python per step.

Order (``train.eval._score_documents``):

1. eager ``StepGraphs`` with ``lazy=True``: the first step's (bucket, kind) is warmed on synthetic tokens and
   captured at that step, so the first score waits for one graph instead of the plan's 29 (4.4-6.8 s on the H200);
   right after it the rest of the plan is captured (``capture_planned``; the warm steps' updates of the live adapter
   and optimizer rows are undone). The main thread's forward stays eager (``forward.set_thread_eager``) even after
   the thread attaches the compile;
2. then ``BackgroundCompile.start()``: ``compile_rows_nll`` is attached and ``train.warmup.warmup`` runs its TTT
   passes on synthetic tokens with its own adapters, optimizer and ledger, on a CUDA stream of its own. No capture
   runs while the thread does (on the H200 a build that captured lazily beside the thread stopped with a CUDA error
   whose message was cut; with the captures moved before the thread the same run completed);
3. the document queue replays the eager graphs; before each batch it asks ``ready()``; once the thread is done, the
   main thread leaves eager mode and compiled graphs (lazy too) replace the eager ones from that batch on. A batch
   boundary is where the batch schedule resets every adapter row and the optimizer.

Measured on the H200 (seeds' config, ``--reference``, all 50,000 docs, cold caches): first score 7.0 s after process
start (3.3 s start-up, 0.7 s load, 2.8 s for the first step's eager graph), but the thread took 148.1 s (a solo cold
warm-up: ~19 s) and the eager graphs replayed 2,343 steps (139 batches) at ~0.75 M window tok/s before the hand-over:
205.2 s wall against 143.6 s without the option. An earlier build's thread finished in 9.5 s with warm caches, but
it ran beside the first batch (the 64 longest documents, few live rows late in it), so cold caches and a fuller GPU
are not separated. Suspects: Inductor's kernel launches hold the GIL (pytorch/pytorch#163061), so a launch that
blocks on a full GPU queue stalls the other thread; and Inductor's runtime autotuning benchmarks kernels at their
first call on a GPU the replays keep busy. Lowering the interpreter's switch interval (0.2 ms) while the thread ran
did not change it (148.1 vs 144.8 s) and is not done.

``--overlap-compile process`` (``ProcessCompile``; its GPU test passes on an H200, its time not measured yet): a child
``python -m train.eval ... --warmup-only`` compiles and warms up on synthetic tokens with its own interpreter, filling
the Inductor and Triton caches; once it exits, this process compiles from those caches at the next batch boundary
(Dynamo tracing again, every compile a cache hit: a warm process's warm-up took 4.3 s on the H200) and hands over the
same way. Its GPU work is the warm-up's few steps, in a CUDA context of its own.

What may not run while the thread compiles: Dynamo on the main thread (two threads in Dynamo at once). The main
thread's forward is eager until the hand-over; the deadline fallback joins the thread first.

Legality is unchanged: the thread's warm-up reads synthetic tokens only; every validation target is scored once,
by an eager graph or a compiled one (same math, bf16 rounding apart: the report says which batches ran eager).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional

import torch


def _check_args(who: str, model, warm) -> None:
    if not callable(warm):
        raise TypeError(f"{who}: warm: expected a callable returning the warm-up's rates, got {type(warm).__name__}")
    if not isinstance(model, torch.nn.Module) or next(model.parameters(), None) is None:
        raise TypeError(f"{who}: model: expected a torch.nn.Module with parameters (the GPT), got "
                        f"{type(model).__name__}")


class CompileChild:
    """A child process that fills this machine's compile caches and exits (``cmd``, default
    ``python -m train.eval <argv>``; the caller passes its own arguments with ``--warmup-only``). Its output goes to a
    temporary file; ``wait()`` returns its exit code and the tail of that output. Shared by ``ProcessCompile`` and
    the eval's ``--parallel-compile``."""

    def __init__(self, argv: Optional[List[str]] = None, *, cmd: Optional[List[str]] = None, who: str = "CompileChild"):
        if cmd is None:
            if not (isinstance(argv, (list, tuple)) and all(isinstance(a, str) for a in argv)):
                raise TypeError(f"{who}: argv: expected a list of str (the eval's arguments), got {argv!r}")
            cmd = [sys.executable, "-m", "train.eval", *argv]
        self.cmd, self.who = list(cmd), who
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        self.t0 = 0.0
        self.outcome: Optional[Dict[str, object]] = None

    def start(self) -> "CompileChild":
        if self.proc is not None:
            raise RuntimeError(f"{self.who}.start: already started")
        self.t0 = time.perf_counter()
        self._log = tempfile.TemporaryFile(mode="w+")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root)
        return self

    def done(self) -> bool:
        if self.proc is None:
            raise RuntimeError(f"{self.who}: not started")
        return self.proc.poll() is not None

    def wait(self) -> Dict[str, object]:
        """Wait for the child: its exit code (``rc``), the seconds waited here (``waited_s``), its whole run
        (``child_s``) and, when it failed, the tail of its output (``tail``). Idempotent."""
        if self.proc is None:
            raise RuntimeError(f"{self.who}: not started")
        if self.outcome is None:
            t = time.perf_counter()
            rc = self.proc.wait()
            self.outcome = {"rc": rc, "waited_s": round(time.perf_counter() - t, 3),
                            "child_s": round(time.perf_counter() - self.t0, 3)}
            self._log.seek(0)
            tail = self._log.read()[-2000:]
            self._log.close()
            if rc != 0:
                self.outcome["tail"] = tail
        return dict(self.outcome)


class BackgroundCompile:
    """``compile_rows_nll(model)`` and the TTT warm-up in a daemon thread (see the module docstring).

    ``warm``: called in the thread with no arguments, after the compile is attached; returns the warm-up's rates
    (``train.warmup.warmup``'s dict). ``compile``: False attaches no compile (the CPU tests exercise the
    hand-over that way without two threads in Dynamo). ``precompiled``: passed to ``compile_rows_nll``.
    """

    def __init__(self, model, warm: Callable[[], Dict[str, float]], *, compile: bool = True,
                 precompiled: Optional[str] = None):
        _check_args("BackgroundCompile", model, warm)
        self.model, self.warm, self.compile, self.precompiled = model, warm, bool(compile), precompiled
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.rates: Optional[Dict[str, float]] = None
        self.stats: Dict[str, float] = {}
        self._t0 = 0.0

    @property
    def started(self) -> bool:
        return self.thread is not None

    def start(self) -> "BackgroundCompile":
        if self.thread is not None:
            raise RuntimeError("BackgroundCompile.start: already started")
        self._t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="pgolf-background-compile", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        from .forward import compile_rows_nll

        try:
            if self.compile:
                compile_rows_nll(self.model, precompiled=self.precompiled)
            dev = next(self.model.parameters()).device
            # a stream of its own: the warm steps overlap the main thread's replays instead of queueing behind
            # them on the default stream
            stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.rates = self.warm()
            if stream is not None:
                stream.synchronize()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by result()
            self.error = e
        self.stats["background_compile_s"] = round(time.perf_counter() - self._t0, 3)

    def ready(self) -> bool:
        """The thread has finished (compiled and warmed, or failed: ``result()`` raises then)."""
        if self.thread is None:
            raise RuntimeError("BackgroundCompile.ready: not started")
        return not self.thread.is_alive()

    def result(self) -> Dict[str, float]:
        """Wait for the thread; its warm-up rates, or the error that stopped it (raised here, on the main thread)."""
        if self.thread is None:
            raise RuntimeError("BackgroundCompile.result: not started")
        t = time.perf_counter()
        self.thread.join()
        self.stats["waited_s"] = round(self.stats.get("waited_s", 0.0) + time.perf_counter() - t, 3)
        if self.error is not None:
            raise RuntimeError(f"--overlap-compile: the background compile failed: {type(self.error).__name__}: "
                               f"{self.error}") from self.error
        return dict(self.rates or {})


class ProcessCompile:
    """``--overlap-compile process``: the cold part of the compile in a child process, the rest here.

    The child (``cmd``, default ``python -m train.eval <argv>``; the eval passes its own arguments with
    ``--warmup-only``) loads the artifact, compiles and runs the warm-up on synthetic tokens, filling the Inductor and
    Triton cache folders this process shares with it, and exits. It has its own interpreter, so its compile does not
    take this process's GIL (see the module docstring for what a thread did). ``result()`` then attaches
    ``compile_rows_nll`` here and calls ``warm`` on the calling thread: Dynamo traces again and every compile is a
    cache hit (a warm process's warm-up took 4.3 s on the H200). Same interface as ``BackgroundCompile``.
    """

    compile = True

    def __init__(self, model, argv: List[str], warm: Callable[[], Dict[str, float]], *,
                 precompiled: Optional[str] = None, cmd: Optional[List[str]] = None):
        _check_args("ProcessCompile", model, warm)
        self.child = CompileChild(argv, cmd=cmd, who="ProcessCompile")
        self.model, self.warm, self.precompiled, self.cmd = model, warm, precompiled, self.child.cmd
        # as BackgroundCompile.error: what stopped the compile (the child's failure, or the compile here), else None
        self.error: Optional[BaseException] = None
        self.rates: Optional[Dict[str, float]] = None
        self.stats: Dict[str, float] = {}

    @property
    def started(self) -> bool:
        return self.child.proc is not None

    def start(self) -> "ProcessCompile":
        self.child.start()
        return self

    def ready(self) -> bool:
        """The child has exited (``result()`` then compiles here, or raises the child's failure)."""
        if not self.started:
            raise RuntimeError("ProcessCompile.ready: not started")
        return self.child.done()

    def result(self) -> Dict[str, float]:
        """Wait for the child; then the compile and warm-up here (cache hits); their rates. The child's failure is
        raised here with the tail of its output."""
        if not self.started:
            raise RuntimeError("ProcessCompile.result: not started")
        if self.rates is not None:
            return dict(self.rates)
        out = self.child.wait()
        self.stats["waited_s"], self.stats["child_s"] = out["waited_s"], out["child_s"]
        if out["rc"] != 0:
            self.error = RuntimeError(f"--overlap-compile process: the compile child exited {out['rc']}: "
                                      f"{out.get('tail', '')}")
            raise self.error
        from .forward import compile_rows_nll, set_thread_eager

        t = time.perf_counter()
        before = set_thread_eager(False)  # the overlap keeps this thread eager until the hand-over: compile now
        try:
            compile_rows_nll(self.model, precompiled=self.precompiled)
            self.rates = self.warm()
        except BaseException as e:
            self.error = e
            raise
        finally:
            set_thread_eager(before)
        self.stats["here_compile_s"] = round(time.perf_counter() - t, 3)
        self.stats["background_compile_s"] = round(time.perf_counter() - self.child.t0, 3)
        return dict(self.rates)
