"""Time from process start to the first scored token, cold and warm, for the eval driver as users run it.

Each measurement is one ``python3 -m train.eval`` child process (the CLI of the README), on the default
11-layer model's int6 artifact (randomized projections) and a synthetic val shard of 2,000 documents with
the official length distribution, scoring a 1/8 share (every 8th batch), so the scoring part stays short.

* cold: empty ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` (fresh folders: no FX-graph, AOTAutograd,
  Triton-binary or autotune cache; the machine's own page cache may still hold torch's files);
* warm: a second process on the same folders (what a user's second eval on one machine meets).

``ours_ms`` = warm time to the first scored token, ``baseline_ms`` = cold (so ``speedup`` is what the caches
save). Extra columns split both into start-up (interpreter + imports), artifact load, warm-up (compile,
autotune, the synthetic-token shape sweep) and val load, with the warm-up's phases
(``train.warmup``: shape sweep, first and second TTT / scoring passes), the val_bpb of both processes
(equal: the caches must not change a score), and the compile statistics of ``train.warmup.compile_cache_counts``
(frames, cache hits and misses, seconds per compile phase: Dynamo tracing, backend, code generation, module
loading, Triton compile waits, host C++ builds), and the Triton binaries each child built (``triton_builds``: the
package's own kernels by name and when, Inductor's counted).

Cases: env ``PGOLF_WARMUP_CASES`` (default ``seeds-ref,seeds-kernel``; also ``records-ref``,
``records-kernel``, ``seeds-ref-graphs`` / ``seeds-ref-graphs-eager``: ``--cuda-graphs`` with and without
torch.compile, their time to the first score including the graphs' warm steps and capture; and
``seeds-ref-default`` / ``records-ref-default``: the driver's defaults for ``--reference``, i.e. what a user gets
(``records-ref-default`` with ``PGOLF_WARMUP_DOCS=50000`` and the default share 0/8 is case (c)); ``seeds-ref-precompiled``:
the same with ``--precompiled`` in the case's cache folder; ``seeds-ref-cachefile``: the defaults with ``--compile-cache``,
whose second process runs on empty cache folders with the first one's file; ``seeds-ref-overlap`` /
``seeds-ref-overlap-process``: the defaults with ``--overlap-compile`` (thread) / ``--overlap-compile process``;
``records-ref-rolling`` / ``records-kernel-rolling``: the records' recipe with ``--schedule rolling``, the driver's
other defaults; ``records-ref-rolling-tail``: with ``--tail-block`` too): recipe and path.
``PGOLF_WARMUP_DOCS`` (default 2000; 50000 = the official-size set, 62,021,846 tokens) and ``PGOLF_WARMUP_SHARE``
(default ``0/8``; ``all`` = every document) size the scoring: ``PGOLF_WARMUP_DOCS=50000 PGOLF_WARMUP_SHARE=all``
with ``seeds-ref-default`` is the eval benchmark's case (b), run through the CLI cold and warm.
``PGOLF_WARMUP_BUDGET_S`` (default 540) stops starting new children
once the next would not fit. ``PGOLF_WARMUP_CACHES=DIR`` keeps each case's cache folders in ``DIR/<case>`` after the
bench (default: a temp folder), and ``PGOLF_WARMUP_RUNS`` (default ``cold,warm``) picks the children: a case whose
cold and warm processes do not fit one device call runs ``cold`` in one bench process and ``warm`` in the next, on
the same machine and folder (a cold run refuses a non-empty folder, a warm one an empty folder). ``PGOLF_WARMUP_PROFILE=DIR`` runs each warm child under cProfile and writes
``DIR/warmup-<case>.prof`` and the top functions by cumulative time to ``DIR/warmup-<case>-top.txt``
(what a warm cache leaves of the warm-up; cProfile's overhead inflates Python-heavy phases such as
Dynamo tracing, so read its shares, not its seconds).
``PGOLF_WARMUP_STOP_AT_FIRST_SCORE=1`` stops each child at the driver's first-score line (``train.eval.first_score_line``,
logged with CUDA graphs): the row then holds the time to the first score (``*_stopped`` says so) and no scoring
figures. A child stopped at the budget after that line still gives its first score. ``PGOLF_WARMUP_LOG_DIR=DIR``
writes each driver's whole output to ``DIR/eval-<ns>.log`` / ``.err`` (default: the case's cache folder).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from bench.harness import env_flag, make_row

KERNEL = "warmup"
_T0 = time.perf_counter()
BUDGET_S = float(os.environ.get("PGOLF_WARMUP_BUDGET_S", "540"))
# name -> (recipe, --reference, extra CLI args)
# (graphs are explicit in every case: the driver's --cuda-graphs auto turns them on for --reference on CUDA)
CASES = {"seeds-ref": ("seeds", True, ("--cuda-graphs", "off")), "seeds-kernel": ("seeds", False, ("--cuda-graphs", "off")),
         # (--no-tail-block: these cases' rows were measured before the records' recipe turned the tail block on)
         "records-ref": ("records", True, ("--cuda-graphs", "off", "--no-tail-block")),
         "records-kernel": ("records", False, ("--cuda-graphs", "off", "--no-tail-block")),
         # the TTT step captured as CUDA graphs over shape buckets, with and without torch.compile under them
         "seeds-ref-graphs": ("seeds", True, ("--cuda-graphs", "on")),
         "seeds-ref-graphs-eager": ("seeds", True, ("--cuda-graphs", "on", "--compile", "off")),
         "seeds-ref-default": ("seeds", True, ()),
         "records-ref-default": ("records", True, ()),
         # the defaults plus ahead-of-time compiled forward functions in the case's cache folder (train/precompiled.py):
         # the cold process compiles and saves them, the warm one loads them without Dynamo tracing
         "seeds-ref-precompiled": ("seeds", True, ("--precompiled", "{caches}/precompiled")),
         # the defaults plus --compile-cache: the cold process writes the file at its end; the second process runs
         # with other, empty cache folders and loads the file (a fresh machine that was handed the file)
         "seeds-ref-cachefile": ("seeds", True, ("--compile-cache", "{work}/seeds-ref.compile-cache")),
         # case (c) on a fresh machine handed the file of an earlier eval of the same recipe (synthetic val set): the
         # cold process writes it, the warm one runs on empty folders with it (in two bench processes when both do not
         # fit one device call: PGOLF_WARMUP_CACHES + PGOLF_WARMUP_RUNS)
         "records-ref-rolling-tail-cachefile": ("records", True, ("--schedule", "rolling", "--tail-block", "--compile-cache",
                                                                   "{work}/records-ref-rolling-tail.compile-cache")),
         # the defaults plus --overlap-compile: eager graphs first, the compile in a background thread
         # (train/overlap.py); the time to the first score is the eager graphs' preparation only
         "seeds-ref-overlap": ("seeds", True, ("--overlap-compile",)),
         # (refused by the CLI on CUDA until its GPU test passes, docs/STATUS.md)
         "seeds-ref-overlap-process": ("seeds", True, ("--overlap-compile", "process")),
         # case (c) under the rolling schedule (rows refilled as documents finish): the batch schedule's first
         # batch (the 64 longest documents, up to 85,043 tokens = 1,771 chunks of 48) ran nearly empty steps for
         # 129.9 of 145.6 s on a 1/64 share (no graphs); on the 0/8 share rolling has no step of <= 8 rows (batch:
         # 1,144 of 4,184) but pads more (fill 0.780 vs 0.913, bench/results/schedule-work-cpu.md): which is faster
         # depends on what a small step costs, which these cases measure against records-ref-default
         "records-ref-rolling": ("records", True, ("--schedule", "rolling", "--no-tail-block")),
         "records-kernel-rolling": ("records", False, ("--schedule", "rolling", "--no-tail-block")),
         # the same with the last block at the scored chunk only (TTTConfig.tail_block: ~80 % of one of 11 blocks
         # fewer FLOPs per step at chunk 48, window 2048)
         "records-ref-rolling-tail": ("records", True, ("--schedule", "rolling", "--tail-block")),
         # case (c) on the batch schedule (the default) with the tail block, and with finer window buckets: counted
         # on the CPU (bench/results/schedule-work-cpu.md), the 1/8 share with its phases replays 268.2 M positions
         # rolling, 256.2 M batch, 243.2 M batch with --graph-window-step 96 (37 buckets instead of 22)
         "records-ref-tail": ("records", True, ("--tail-block",)),
         "records-ref-tail-w96": ("records", True, ("--tail-block", "--graph-window-step", "96")),
         # the same with each graph captured at its bucket's first step, which is its warm step (no synthetic warm
         # steps: 20.4 s cold / 17.2 s warm of records-ref-tail-w96's 119 graphs on an H200)
         "records-ref-tail-w96-first-use": ("records", True, ("--tail-block", "--graph-window-step", "96",
                                                              "--graph-capture", "first-use")),
         # records-ref-tail-w96 with --parallel-compile auto (off by default): run with first-use (when auto was the
         # default) the 1/8 share scored at 845k window tokens/s against 1.19M; this case and the one above, apart,
         # say which of the two did it
         "records-ref-tail-w96-parallel": ("records", True, ("--tail-block", "--graph-window-step", "96",
                                                             "--parallel-compile", "auto")),
         # first-use with the global pass's child only (its compile, ~13 s inside the timed eval, took 1.4 s from the
         # child's entries in the run above)
         "records-ref-tail-w96-first-use-global": ("records", True, ("--tail-block", "--graph-window-step", "96",
                                                                     "--graph-capture", "first-use",
                                                                     "--parallel-compile", "global")),
         # graphs ahead (the share's own plan, the rare ones left out) with the global pass's child only
         "records-ref-tail-w96-global": ("records", True, ("--tail-block", "--graph-window-step", "96",
                                                           "--parallel-compile", "global")),
         # the same with the adapters' optimizer fused (pgolf_kernels.adam_rows; auto keeps --reference on torch ops):
         # every one of the share's 4,431 steps updates all 320.9 M adapter parameters
         "records-ref-tail-w96-global-fused": ("records", True, ("--tail-block", "--graph-window-step", "96",
                                                                 "--parallel-compile", "global",
                                                                 "--fused-optimizer", "on")),
         # case (c)'s kernel path beside it, graphs forced on (auto keeps them off until every kernel-path GPU
         # replay test has passed): its step is 94.1 GPU-ms against 99.2 for the reference with the same optimizer
         # but host-bound without graphs (107.9 ms, profile-ttt-h200.md measurement 6); this says what replay
         # gives it in the eval, and its val_bpb against the reference row's 3.636866
         "records-kernel-tail-w96-global-graphs": ("records", False, ("--tail-block", "--graph-window-step", "96",
                                                                      "--parallel-compile", "global",
                                                                      "--cuda-graphs", "on")),
         # the same with --fused-mlp named (the MLP's activation in the up-projection's epilogue; the profile's step
         # gave 92.65 -> 89.01 GPU-ms with it on an H100, profile-ttt-h100.md measurement 5). Since --fused-mlp auto
         # turns it on for the kernel path, the case above runs it too
         "records-kernel-tail-w96-global-graphs-mlp": ("records", False, ("--tail-block", "--graph-window-step", "96",
                                                                          "--parallel-compile", "global",
                                                                          "--cuda-graphs", "on", "--fused-mlp", "on")),
         # the kernel path at the driver's defaults, the reference's records-ref-tail-w96-global beside it: CUDA graphs
         # by auto, int6 codes dequantized at load (--unfreeze-int6 load), --fused-mlp by auto. At build 65bea80 the
         # -graphs-mlp case above scored the share in 282.0 s against 278.4 s (H100, warmup-h100.md), 47.8 s of it a
         # second capture after the first global pass, which the load-time switch removes
         "records-kernel-tail-w96-global": ("records", False, ("--tail-block", "--graph-window-step", "96",
                                                              "--parallel-compile", "global")),
         # the same with each graph captured at its bucket's first step, that real step its warm step: the case
         # above spent 8.9 s of its 188.1 s timed eval preparing 45 graphs, 5.97 s of it synthetic warm steps
         # (H100, build 6f07a71); records-ref-tail-w96-first-use-global is the reference's row beside it
         "records-kernel-tail-w96-global-first-use": ("records", False, ("--tail-block", "--graph-window-step", "96",
                                                                        "--parallel-compile", "global",
                                                                        "--graph-capture", "first-use"))}
MEAN_DOC_TOKENS = 1240  # the official mean document length (62,021,846 / 50,000)


def _size() -> tuple:
    """(documents, tokens, --share argument or None) from PGOLF_WARMUP_DOCS / PGOLF_WARMUP_SHARE."""
    from train.synthetic import OFFICIAL_DOCS, OFFICIAL_TOKENS

    raw = os.environ.get("PGOLF_WARMUP_DOCS", "2000")
    if not raw.isdigit() or not 1 <= int(raw) <= OFFICIAL_DOCS:
        raise ValueError(f"PGOLF_WARMUP_DOCS = {raw!r}: expected a whole number of documents, 1..{OFFICIAL_DOCS}")
    n = int(raw)
    share = os.environ.get("PGOLF_WARMUP_SHARE", "0/8")
    k, _, m = share.partition("/")
    if share != "all" and not (k.isdigit() and m.isdigit() and 0 <= int(k) < int(m)):
        raise ValueError(f"PGOLF_WARMUP_SHARE = {share!r}: expected 'all' or k/n with 0 <= k < n (e.g. 0/8)")
    tokens = OFFICIAL_TOKENS if n == OFFICIAL_DOCS else n * MEAN_DOC_TOKENS
    return n, tokens, None if share == "all" else share


def _tokenizer() -> str:
    from bench.bench_eval import _data_dir

    d = _data_dir()
    if d is None:
        raise FileNotFoundError("bench warmup: the sp1024 tokenizer (fineweb_1024_bpe.model) was not found; "
                                "set PGOLF_SHARED_DATA to the shared data folder")
    return os.path.join(d, "fineweb_1024_bpe.model")


# the driver's line when its first scores are in (train.eval, CUDA graphs): read from a child stopped before its report
_FIRST_SCORE_RE = re.compile(r"\[eval\] first score ([0-9.]+) s after process start")
# PGOLF_WARMUP_STOP_AT_FIRST_SCORE=1: stop each child at that line (its row then holds the time to the first score
# and not the rest): the warm-up target needs only that figure, and a whole 50,000-document child costs ~130-200 s
STOP_AT_FIRST = env_flag("PGOLF_WARMUP_STOP_AT_FIRST_SCORE")


def triton_builds(cache_dir: str, since: float, timeline: int = 40) -> Dict[str, object]:
    """The Triton binaries a child built into its ``TRITON_CACHE_DIR`` (``cache_dir``): every ``*.cubin`` written at
    or after ``since`` (the child's launch, epoch seconds), by kernel name. Inductor's generated kernels
    (``triton_*``, built by its worker pool) are counted together; the package's own (JIT-compiled in the driver's
    own thread, one at a time, the first time a specialization is launched) by name, with the seconds after
    ``since`` at which the first ``timeline`` of them were written. A warm child that hit every cache builds none.
    Why: the kernel path's warm-up took 27 s more than the reference's at case (c), its first TTT pass 44.5 s
    against 6.9 s (H200, bench/results/warmup-h200.md), with fewer Dynamo frames' compile seconds than the
    reference's; Triton's JIT is not in those counters."""
    import glob

    built = []
    for path in glob.glob(os.path.join(cache_dir, "*", "*.cubin")):
        t = os.path.getmtime(path)
        if t >= since:
            built.append((t - since, os.path.basename(path)[:-len(".cubin")]))
    built.sort()
    package = [(round(t, 2), name) for t, name in built if not name.startswith("triton_")]
    by_name: Dict[str, int] = {}
    for _, name in package:
        by_name[name] = by_name.get(name, 0) + 1
    inductor = [t for t, name in built if name.startswith("triton_")]
    out: Dict[str, object] = {"package": len(package), "package_by_name": by_name, "inductor": len(inductor)}
    if package:
        out["package_first_s"], out["package_last_s"] = package[0][0], package[-1][0]
        out["package_timeline"] = package[:timeline]
    if inductor:
        out["inductor_first_s"], out["inductor_last_s"] = round(inductor[0], 2), round(inductor[-1], 2)
    return out


def _child(args: List[str], caches: str, timeout: float, profile: Optional[str] = None) -> Dict[str, object]:
    """One ``train.eval`` child on the cache folders ``caches`` -> its JSON report. Stopped at ``timeout`` (or at
    its first score with ``STOP_AT_FIRST``): a partial report from its output (``first_score_s``, ``stopped``) when
    it printed its first-score line, else ``subprocess.TimeoutExpired``."""
    from bench.harness import run_child

    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
               TRITON_CACHE_DIR=os.path.join(caches, "triton"))
    out = os.path.join(caches, f"rep-{time.time_ns()}.json")
    launched = time.time()
    t = time.perf_counter()
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    # the driver's whole output: PGOLF_WARMUP_LOG_DIR (a device run's $OUT) keeps it past the machine; a child stopped
    # at its limit leaves no report, and this row prints only its phase lines and last lines
    log_dir = os.environ.get("PGOLF_WARMUP_LOG_DIR") or os.path.join(caches, "logs")
    rc, stdout, stderr = run_child([sys.executable, *prof, "-m", "train.eval", *args, "--json", out], timeout,
                                   log_dir, f"eval-{time.time_ns()}", env=env,
                                   stop_when=(lambda text: _FIRST_SCORE_RE.search(text) is not None)
                                   if STOP_AT_FIRST else None)
    wall = time.perf_counter() - t
    lines = [line for line in stdout.splitlines() if line.startswith("[eval]")]
    # every phase line (global passes: their time and what they compiled), then the last lines
    print("\n".join([line for line in lines if line.startswith("[eval] phase")] + ["..."]
                    + ["\n".join(lines)[-1200:]]), flush=True)
    if rc is None:
        m = _FIRST_SCORE_RE.search(stdout)
        if m is None:
            raise subprocess.TimeoutExpired(args, timeout, output=stdout[-4000:])
        return dict(first_score_s=float(m.group(1)), child_wall_s=wall,
                    stopped="at its first score" if STOP_AT_FIRST else f"at the {timeout:.0f} s limit, after its first score",
                    triton_builds=triton_builds(env["TRITON_CACHE_DIR"], launched))
    if rc != 0:
        raise RuntimeError(f"train.eval exited {rc}: {(stdout + stderr)[-4000:]}")
    with open(out) as f:
        rep = json.load(f)
    rep["child_wall_s"] = wall
    rep["triton_builds"] = triton_builds(env["TRITON_CACHE_DIR"], launched)
    return rep


_KEYS = ("startup_s", "load_s", "load_parts", "compile_cache_end", "compile_cache_file", "warmup_s", "val_load_s",
         "to_scoring_s", "score_s", "wall_s", "child_wall_s", "val_bpb", "phases")
_RATE_KEYS = ("warm_shapes_s", "ttt_pass0_s", "ttt_pass1_s", "score_pass0_s", "score_pass1_s")


def _first_score_s(rep: Dict[str, object]) -> float:
    """Process start to the first scored token: the driver's ``first_score_s`` (with CUDA graphs: when the first
    step's scores were on the device). Without it, ``to_scoring_s`` plus the graphs' preparation, which ran after
    the driver's own clock for that stopped and before any token was scored."""
    if rep.get("first_score_s") is not None:
        return float(rep["first_score_s"])
    return float(rep["to_scoring_s"]) + float((rep.get("cuda_graphs") or {}).get("graph_prepare_s", 0.0))


def _split(rep: Dict[str, object], tag: str) -> Dict[str, object]:
    out = {f"{tag}_{k}": rep.get(k) for k in _KEYS}
    out[f"{tag}_first_score_s"] = _first_score_s(rep)
    if rep.get("stopped"):  # a partial report: the child was stopped after its first score, before its report
        out[f"{tag}_stopped"] = rep["stopped"]
    if rep.get("cuda_graphs"):
        out[f"{tag}_cuda_graphs"] = {k: v for k, v in rep["cuda_graphs"].items() if not isinstance(v, list)}
    rates = rep.get("warmup_rates") or {}
    out.update({f"{tag}_{k}": rates.get(k) for k in _RATE_KEYS if k in rates})
    out[f"{tag}_compile_cache"] = {k: v for k, v in rates.items() if k == "dynamo_frames" or "." in k}
    if rep.get("overlap_compile"):
        out[f"{tag}_overlap_compile"] = rep["overlap_compile"]
    if rep.get("triton_builds") is not None:
        out[f"{tag}_triton_builds"] = rep["triton_builds"]
    return out


def _profile_summary(prof: str, top: int = 60) -> str:
    """The ``top`` functions of a cProfile dump by cumulative time, as pstats prints them."""
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def case_label(recipe: str, reference: bool, extra_args: tuple) -> str:
    """What a case runs, for its row: recipe, path, and each option of ``extra_args`` in words."""
    pairs = set(zip(extra_args, extra_args[1:]))
    # the records' recipe is phased: the CLI dequantizes its int6 codes at load (--unfreeze-int6 load, the default)
    kernels = "kernels (fused LoRA; int6 dequantized at load)" if recipe == "records" else "kernels (int6 + fused LoRA)"
    head = f"{recipe} recipe, {'--reference (bf16 + bmm LoRA)' if reference else kernels}"
    if not extra_args:
        return head + ", the driver's defaults"
    if extra_args[0] == "--precompiled":
        return head + ", the driver's defaults + --precompiled"
    if extra_args[0] == "--overlap-compile":
        return (head + f", the driver's defaults + --overlap-compile {extra_args[1] if len(extra_args) > 1 else 'thread'} "
                "(eager graphs first, compiled graphs from a batch boundary)")
    opts = [w for w, on in (("CUDA graphs", ("--cuda-graphs", "on") in pairs),
                            ("rolling schedule", ("--schedule", "rolling") in pairs),
                            ("--tail-block", "--tail-block" in extra_args)) if on]
    opts += [f"{a} {b}" for a, b in zip(extra_args, extra_args[1:])
             if a in ("--graph-window-step", "--graph-capture", "--graph-min-steps", "--parallel-compile",
                      "--fused-optimizer")]
    if "--compile-cache" in extra_args:
        return head + ", the driver's defaults + " + " + ".join(
            opts + ["--compile-cache (warm = empty cache folders + the cold process's file)"])
    return head + ", " + ", ".join(["eager" if "--compile" in extra_args else "compiled"] + opts)


def runs_and_caches() -> tuple:
    """(children to run, in order; persistent cache root or None) from PGOLF_WARMUP_RUNS / PGOLF_WARMUP_CACHES."""
    raw = os.environ.get("PGOLF_WARMUP_RUNS", "cold,warm")
    tags = [t for t in raw.split(",") if t]
    if not tags or any(t not in ("cold", "warm") for t in tags) or len(set(tags)) != len(tags):
        raise ValueError(f"PGOLF_WARMUP_RUNS = {raw!r}: expected 'cold', 'warm' or 'cold,warm'")
    if tags == ["warm"] and not os.environ.get("PGOLF_WARMUP_CACHES"):
        raise ValueError("PGOLF_WARMUP_RUNS = 'warm' needs PGOLF_WARMUP_CACHES: the folder an earlier cold run filled")
    from bench.harness import env_folder

    return sorted(tags, key=("cold", "warm").index), env_folder("PGOLF_WARMUP_CACHES") or None


def _case_caches(root: Optional[str], work: str, name: str, tags: List[str]) -> str:
    """The case's cache folder: a fresh temp folder, or ``root/name``, which must be empty for a cold run and
    filled for a warm-only one (a warm run on empty folders would be a cold run by another name)."""
    if root is None:
        return tempfile.mkdtemp(prefix=f"caches-{name}-", dir=work)
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    filled = any(os.scandir(d))
    if "cold" in tags and filled:
        raise ValueError(f"PGOLF_WARMUP_CACHES: {d} is not empty, so a cold run there would not be cold; "
                         f"empty it or set PGOLF_WARMUP_RUNS=warm")
    if tags == ["warm"] and not filled:
        raise ValueError(f"PGOLF_WARMUP_CACHES: {d} is empty; run PGOLF_WARMUP_RUNS=cold first (same machine)")
    return d


def run(quick: bool = False) -> List[Dict[str, object]]:
    import torch

    from bench.bench_eval import build_artifact
    from train.synthetic import write_synthetic_val

    names = os.environ.get("PGOLF_WARMUP_CASES", "seeds-ref,seeds-kernel").split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"PGOLF_WARMUP_CASES = {','.join(names)!r}: unknown case(s) {unknown}; expected a comma list "
                         f"of {', '.join(CASES)}")
    stop_bad = [n for n in names if STOP_AT_FIRST and "--compile-cache" in CASES[n][2]]
    if stop_bad:  # its cold child writes the file at exit: stopped at its first score, it would write none
        raise ValueError(f"PGOLF_WARMUP_STOP_AT_FIRST_SCORE=1 with {stop_bad}: a --compile-cache case needs its "
                         f"cold child to run to its end; expected cases without --compile-cache")
    n_docs, n_tokens, share = _size()
    tags, cache_root = runs_and_caches()
    work = tempfile.mkdtemp(prefix="pgolf-warmup-")
    case_caches = {name: _case_caches(cache_root, work, name, tags) for name in names}  # refusals before the build
    # {work}: where a case's compile-cache file lives; under PGOLF_WARMUP_CACHES it outlives the bench process, so the
    # warm process of a later bench (a fresh cache folder + the file) finds it
    keep = cache_root or work
    for name in names:
        files = [a.replace("{work}", keep) for a in CASES[name][2] if "{work}" in a]
        if cache_root is not None and "cold" in tags and any(os.path.exists(f) for f in files):
            raise ValueError(f"PGOLF_WARMUP_CACHES: {files[0]} exists, so the cold process of {name} would load it; "
                             f"remove it or set PGOLF_WARMUP_RUNS=warm")
        if tags == ["warm"] and not all(os.path.isfile(f) for f in files):
            raise ValueError(f"PGOLF_WARMUP_CACHES: {files[0]} is missing; run PGOLF_WARMUP_RUNS=cold first (same machine)")
    art = os.path.join(work, "model.pgolf")
    # on the CPU: the parent process must not hold GPU memory or a CUDA context while the children run
    build_artifact(art, None, train_steps=0, device="cpu")
    val = write_synthetic_val(work, n_docs=n_docs, total_tokens=n_tokens)
    tok = _tokenizer()
    rows: List[Dict[str, object]] = []
    for name in names:
        recipe, reference, extra_args = CASES[name]
        args = ["--artifact", art, "--val", val, "--tokenizer", tok, "--recipe", recipe, *(["--share", share] if share else []),
                "--allow-tokenizer-mismatch", *extra_args] + (["--reference"] if reference else [])
        caches = case_caches[name]
        args = [a.replace("{caches}", caches).replace("{work}", keep) for a in args]
        # with a compile-cache file the second process gets empty cache folders of its own: only the file carries over
        fresh = "--compile-cache" in extra_args
        reps: Dict[str, Optional[Dict[str, object]]] = {"cold": None, "warm": None}
        note = ""
        for tag in tags:
            left = BUDGET_S - (time.perf_counter() - _T0)
            if left < 60:
                note = f"{tag} not run: {left:.0f} s of the bench budget left"
                break
            t = time.perf_counter()
            prof_dir = os.environ.get("PGOLF_WARMUP_PROFILE")
            prof = os.path.join(prof_dir, f"warmup-{name}.prof") if prof_dir and tag == "warm" else None
            try:
                dirs = tempfile.mkdtemp(prefix=f"caches-{name}-{tag}-", dir=work) if fresh and tag == "warm" else caches
                reps[tag] = _child(args, dirs, timeout=left, profile=prof)
                if prof:
                    with open(os.path.join(prof_dir, f"warmup-{name}-top.txt"), "w") as f:
                        f.write(_profile_summary(prof))
            except subprocess.TimeoutExpired:
                note = f"{tag} did not reach its report within {time.perf_counter() - t:.0f} s (budget)"
                break
            except RuntimeError as e:
                note = f"{tag} failed: {' '.join(str(e).split())[-300:]}"
                print(f"bench warmup: {name}: {tag} child output (tail):\n{e}", flush=True)
                break
        if note:
            print(f"bench warmup: {name}: {note}", flush=True)
        cold, warm = reps["cold"], reps["warm"]
        extra = _split(cold, "cold") if cold is not None else {}
        if warm is not None:
            extra.update(_split(warm, "warm"))
            if cold is not None and "stopped" not in cold and "stopped" not in warm:
                extra["bpb_equal"] = warm.get("val_bpb") == cold.get("val_bpb")
            elif cache_root is not None:  # warm-only: the cold process ran in an earlier bench process
                extra["warm_caches_from"] = "an earlier bench process's cold run on this machine (PGOLF_WARMUP_CACHES)"
        label = case_label(recipe, reference, extra_args) + f"; {f'share {share} of ' if share else 'all '}{n_docs:,} synthetic docs"
        nan = float("nan")
        rows.append(make_row(KERNEL, label, 1e3 * _first_score_s(warm) if warm else nan, "cold caches",
                             1e3 * _first_score_s(cold) if cold else nan, docs=(cold or {}).get("docs"),
                             gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", note=note,
                             **extra))
    return rows
