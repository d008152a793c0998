"""Where one SGD step of the phased recipe's global pass spends its time (a profiling tool, not a benchmark row).

A global step = one chunk of ``global_chunk_tokens`` targets (records: 32,768, its pieces of ``global_seq_len``
2048 in micro-batches of ``global_batch_seqs``): forward and backward to every base weight, then SGD with momentum
on fp32 masters with the gradient clipped (``train.phased.global_pass``). The eval runs three such passes inside its
timed part (case (c): 10.5 s of 186.7 s on an H100, ``bench/results/warmup-h100.md``), the same driver code on both
paths unless the kernel path's view is on (``train.adapters.base_view``).

Variants, each compiled as the eval compiles (``train.forward.compile_rows_nll``), on synthetic documents:

* ``reference``: the ``--reference`` model (bf16 weights), the blocks' own torch ops;
* ``kernel``: the kernel path's model (int6 codes dequantized at load, as the eval's CLI), the blocks' own ops;
* ``kernel-fused``: the same under ``FusedBase`` (the view the eval's kernel path passes with ``PGOLF_GLOBAL_FUSED=1``).

Prints per variant: ms per SGD step (wall, synchronized, the median of ``--reps`` passes), the profiled GPU-busy ms
per step against the wall (the host's share), and the top CUDA kernels.

    python3 -m bench.profile_global [--variants reference,kernel,kernel-fused] [--chunks 8] [--reps 3] [--top 25]
                                    [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

VARIANTS = ("reference", "kernel", "kernel-fused")


def _pass_fn(model, cfg, stream, rows, lut, view):
    from train.phased import global_pass
    from train.scoring import make_state

    def run():
        st = make_state(stream, lut)
        st.ledger.count[:] = 1   # synthetic tokens, every target "scored": the pass's legality is tested elsewhere
        return global_pass(model, stream, rows, cfg, st, view=view)

    return run


def _per_step(run, steps: int, top: int):
    """``profile_ttt._profile`` over whole passes (its figures per pass) divided by the pass's SGD steps: profiled wall,
    GPU busy, the top kernels (ms and launches per step), GPU ms by category and by pass group."""
    from bench.profile_ttt import _profile

    wall, busy, rows, cats, groups = _profile(lambda _: run(), None, top)
    per = lambda d: {k: round(v / steps, 3) for k, v in d.items()}  # noqa: E731
    return (wall / steps, busy / steps, [(n, round(ms / steps, 3), c // steps) for n, ms, c in rows], per(cats),
            per(groups))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--chunks", type=int, default=8, help="chunks of the pass (SGD steps = chunks - 1; default 8)")
    p.add_argument("--reps", type=int, default=3, help="timed passes per variant after one warm pass (default 3)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="directory for profile_global.json")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"profile_global: --variants: {bad}; expected a comma list of {', '.join(VARIANTS)}")
    if a.chunks < 2 or a.reps < 1:
        raise SystemExit(f"profile_global: --chunks must be >= 2 and --reps >= 1, got {a.chunks} and {a.reps}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_global: needs a CUDA GPU")
    from bench.bench_eval import build_artifact
    from train import eval as ev
    from train.adapters import FusedBase, fused_choices
    from train.eval_fixtures import synthetic_lut
    from train.forward import compile_rows_nll
    from train.phased import global_rows
    from train.ttt_config import recipe
    from train.warmup import _synthetic_docs

    dev = "cuda"
    cfg = recipe("records")
    path = os.path.join(tempfile.mkdtemp(), "model.ptz")
    build_artifact(path, None, train_steps=0, device=dev)
    L = cfg.global_seq_len
    per_chunk = cfg.global_chunk_tokens // L
    # documents of 2 pieces of L targets each: per_chunk pieces per chunk, the eval's full-length micro-batches
    n_docs = (a.chunks * per_chunk + 1) // 2
    stream, starts, ns = _synthetic_docs(1024, n_docs, 2 * L, torch.Generator().manual_seed(0), dev)
    rows = global_rows(starts, ns, np.arange(n_docs), L)
    lut = synthetic_lut()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "chunks": a.chunks,
           "chunk_tokens": cfg.global_chunk_tokens, "seq_len": L, "batch_seqs": cfg.global_batch_seqs,
           "variants": {}}
    for v in variants:
        model, _ = ev.load_model(path, reference=v == "reference", device=dev)
        ev.unfreeze_at_load(model, "ttt", cfg)
        compile_rows_nll(model, True)
        # the view the eval's kernel path passes with PGOLF_GLOBAL_FUSED=1, whatever the switch in this process
        view = FusedBase(*fused_choices(model, cfg, "kernel")) if v == "kernel-fused" else None
        run = _pass_fn(model, cfg, stream, rows, lut, view)
        t = time.perf_counter()
        info = run()   # compiles
        first = time.perf_counter() - t
        steps = info["steps"]
        ts = []
        for _ in range(a.reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) / steps * 1e3)
        wall, busy, table, cats, groups = _per_step(run, steps, a.top)
        res = dict(first_pass_s=round(first, 2), steps=steps, ms_per_step=round(statistics.median(ts), 3),
                   ms_per_step_all=[round(x, 3) for x in ts], profiled_wall_ms=round(wall, 3),
                   gpu_busy_ms=round(busy, 3), categories_ms=cats, groups_ms=groups, top=table,
                   view=type(view).__name__ if view is not None else None)
        out["variants"][v] = res
        print(f"[{v}] first pass {first:.1f} s; {steps} steps, {res['ms_per_step']:.2f} ms/step (median of "
              f"{a.reps}: {res['ms_per_step_all']}); profiled wall {wall:.2f} ms, GPU busy {busy:.2f} ms; by "
              f"category {cats}; by group {groups}")
        for name, ms, n in table:
            print(f"    {ms:8.3f} ms  x{n:<4d} {name}")
        del model, run
        torch.cuda.empty_cache()
    base = out["variants"].get("kernel") or out["variants"].get("reference")
    fused = out["variants"].get("kernel-fused")
    if base and fused:
        out["fused_speedup"] = round(base["ms_per_step"] / fused["ms_per_step"], 3)
        print(f"kernel-fused vs {'kernel' if 'kernel' in out['variants'] else 'reference'}: "
              f"{out['fused_speedup']:.3f}x per SGD step")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "profile_global.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
