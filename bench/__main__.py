"""Run every kernel benchmark: ``python -m bench [--only NAME ...] [--quick]``.

Each ``bench/bench_<name>.py`` exposes ``KERNEL`` and ``run(quick: bool) -> list[row]``;
results go to ``bench/results/<kernel>-<gpu>.json`` (+ .md) via ``bench.harness``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", nargs="*", default=None, help="bench module names (e.g. int6 lora ns)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    ap.add_argument("--results-dir", default=None, help="where to write JSON/markdown (default bench/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m bench: no CUDA GPU is present on this machine; the benchmarks time GPU kernels "
              "and need one (an H100/H200). Nothing was run.")
        return 0
    if args.results_dir:
        os.environ["PGOLF_BENCH_RESULTS"] = args.results_dir
    from . import harness

    here = os.path.dirname(os.path.abspath(__file__))
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))
    if args.only:
        names = [n for n in names if n in args.only]
    failed = []
    summary = []
    for n in names:
        t0 = time.time()
        print(f"== bench {n}", flush=True)
        try:
            mod = importlib.import_module(f"bench.bench_{n}")
            rows = mod.run(quick=args.quick)
            path = harness.save_results(mod.KERNEL, rows)
            print(harness.markdown_table(rows))
            print(f"-> {path} ({time.time() - t0:.1f}s)", flush=True)
            for r in rows:
                summary.append(r)
        except Exception:
            traceback.print_exc()
            failed.append(n)
    if failed:
        print(f"benchmarks failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
