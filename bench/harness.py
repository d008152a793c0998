"""One harness for every kernel benchmark.

Timing: median of ``triton.testing.do_bench`` (CUDA events, warm-up excluded, L2 flushed
between reps by do_bench itself) or of CUDA-graph replay for launch-bound cases. Where
the inputs would sit in L2 across reps, pass several input sets and ``rotate`` cycles
through them.

Each run writes ``bench/results/<kernel>-<gpu>.json`` with top-level ``device``, ``torch``,
``triton``, ``date`` and ``rows``; every row has at least
``{kernel, case, ours_ms, baseline, baseline_ms, speedup}`` with
``speedup = baseline_ms / ours_ms``, plus any extra fields (tflops, gbps, formula ...).
A markdown table with the same rows is written beside it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import signal
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpu_slug() -> str:
    """Short lowercase GPU name for file names: 'h100', 'h200', else a sanitized name."""
    name = torch.cuda.get_device_name()
    for tag in ("H100", "H200", "A100", "B200", "GB200", "L40S", "4090"):
        if tag in name:
            return tag.lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def env_info() -> Dict[str, str]:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def bench_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` via triton.testing.do_bench (events, L2 flush)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rotate(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """Cycle through ``fns`` (closures over different input sets) on successive calls."""
    state = {"i": 0}

    def f():
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return f


def graph_bench_ms(fn: Callable[[], object], *, n_inner: int = 20, reps: int = 30) -> float:
    """Median ms per call of ``fn`` from CUDA-graph replay (``n_inner`` calls per graph).

    Use for launch-bound ops (many small kernels) where launch gaps are not the op's cost
    in a real captured training/eval step.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        times.append(st.elapsed_time(en) / n_inner)
    times.sort()
    return times[len(times) // 2]


def time_all(fns: Dict[str, Callable[[], object]], timer: Callable[[Callable[[], object]], float],
             label: str = "") -> Dict[str, float]:
    """``{name: timer(fn)}`` for every contestant; one that raises is printed and timed NaN, so a failing
    baseline never hides the others."""
    t = {}
    for name, f in fns.items():
        try:
            t[name] = timer(f)
        except Exception as e:
            print(f"{label} {name}: {type(e).__name__}: {e}", flush=True)
            t[name] = float("nan")
    return t


def fwd_bwd(f: Callable[..., torch.Tensor], args: Sequence[object], grad: torch.Tensor) -> Callable[[], None]:
    """A contestant for ``time_all``: clears the gradients of the tensor arguments that require one, then runs
    ``f(*args).backward(grad)`` (forward + backward, the training form of an op)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def go():
        for t in leaves:
            t.grad = None
        f(*args).backward(grad)
    return go


def check_close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 2e-2) -> None:
    """Refuse to time a contestant whose output is off: relative Frobenius error against ``ref`` below ``tol``
    (bf16 rounding is ~4e-3)."""
    from pgolf_kernels.testing import rel_err

    err = rel_err(got, ref)
    if not err < tol:
        raise RuntimeError(f"{what}: relative error {err:.3g} against the baseline (expected < {tol})")


def make_row(
    kernel: str,
    case: str,
    ours_ms: float,
    baseline: str,
    baseline_ms: float,
    **extra,
) -> Dict[str, object]:
    row = {
        "kernel": kernel,
        "case": case,
        "ours_ms": round(float(ours_ms), 6),
        "baseline": baseline,
        "baseline_ms": round(float(baseline_ms), 6),
        "speedup": round(float(baseline_ms) / float(ours_ms), 4) if ours_ms > 0 else float("nan"),
    }
    for k, v in extra.items():
        row[k] = round(v, 4) if isinstance(v, float) else v
    return row


def env_folder(var: str) -> str:
    """The folder named by environment variable ``var``, created when missing; "" when unset. A path naming a file
    is refused by name (benches keep compile caches there across device calls)."""
    d = os.environ.get(var, "")
    if d and os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"{var} = {d!r}: expected a folder (or a path to create), got a file")
    if d:
        os.makedirs(d, exist_ok=True)
    return d


def env_flag(var: str, default: bool = False) -> bool:
    """An on/off bench setting from environment variable ``var``: "1" on, "0" off, unset or "" the default. Any other
    value is refused by name: a bench knob that took "yes" or "true" as off would time the wrong case silently."""
    v = os.environ.get(var, "")
    if v == "":
        return bool(default)
    if v not in ("0", "1"):
        raise ValueError(f"{var} = {v!r}: expected 1 (on) or 0 (off)")
    return v == "1"


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def markdown_table(rows: List[Dict[str, object]], columns: Optional[List[str]] = None) -> str:
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = ["kernel", "case", "ours_ms", "baseline", "baseline_ms", "speedup"]
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def save_results(kernel: str, rows: List[Dict[str, object]], results_dir: Optional[str] = None, notes: str = "") -> str:
    """Write <results_dir>/<kernel>-<gpu>.json and .md; return the JSON path."""
    results_dir = results_dir or os.environ.get("PGOLF_BENCH_RESULTS", RESULTS_DIR)
    os.makedirs(results_dir, exist_ok=True)
    info = env_info()
    slug = gpu_slug() if torch.cuda.is_available() else "cpu"
    payload = dict(info, kernel=kernel, notes=notes, rows=rows)
    jpath = os.path.join(results_dir, f"{kernel}-{slug}.json")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(results_dir, f"{kernel}-{slug}.md"), "w") as f:
        f.write(f"# {kernel} on {info['device']}\n\n")
        f.write(f"torch {info['torch']}, triton {info['triton']}, {info['date']}\n\n")
        if notes:
            f.write(notes.strip() + "\n\n")
        f.write(markdown_table(rows))
    return jpath


def run_child(cmd: List[str], timeout: float, log_dir: str, name: str, env=None, cwd=None,
              stop_when: Optional[Callable[[str], bool]] = None, poll_s: float = 0.5):
    """Run ``cmd`` with its output in ``log_dir/name.log`` / ``.err`` -> (return code, or None when it was stopped
    at ``timeout`` or by ``stop_when``, stdout, stderr). Files, not pipes, and its own process group: when it is
    stopped the whole group is killed (Inductor's compile workers too, which subprocess.run's kill would leave
    holding its pipes open, so that run() never returned) and what it printed so far is read back; the files stay,
    so a partial log survives even when the caller is killed first. ``stop_when(stdout so far)``, polled every
    ``poll_s`` seconds: True stops the child there (a bench that needs only an early line of its output)."""
    os.makedirs(log_dir, exist_ok=True)
    # a repeated child gets name-2, name-3, ...: the logs of every run stay (a second run had overwritten the
    # first, whose one slow step then could not be looked at)
    base, i = name, 1
    while os.path.exists(os.path.join(log_dir, f"{name}.log")):
        i += 1
        name = f"{base}-{i}"
    out_path, err_path = os.path.join(log_dir, f"{name}.log"), os.path.join(log_dir, f"{name}.err")

    def read(path: str) -> str:
        with open(path, errors="replace") as f:
            return f.read()

    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env, cwd=cwd, start_new_session=True)
        deadline = time.monotonic() + timeout
        rc = None
        while True:
            try:
                rc = proc.wait(timeout=max(0.0, min(poll_s if stop_when else timeout, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline or (stop_when is not None and stop_when(read(out_path))):
                    break
        try:  # the group's stragglers too (a compile worker outliving a finished child)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return rc, read(out_path), read(err_path)
