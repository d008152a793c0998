"""Regenerate README.md's results section from bench/results/*.json.

    python3 -m bench.report            # rewrite the block between the results markers
    python3 -m bench.report --print    # print the markdown instead
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from .harness import RESULTS_DIR, markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"
COLUMNS = ["case", "ours_ms", "baseline", "baseline_ms", "speedup"]
# extra columns worth showing in the summary when a kernel's rows carry them
EXTRA = ["tflops", "gbps", "tokens_per_s_per_gpu", "val_bpb"]


def render(results_dir: str = RESULTS_DIR) -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            d = json.load(f)
        rows = d.get("rows", [])
        cols = list(COLUMNS)
        for e in EXTRA:
            if any(e in r for r in rows):
                cols.append(e)
        name = os.path.basename(path)
        parts.append(
            f"### `{name}` — {d.get('device')} · torch {d.get('torch')} · triton {d.get('triton')} · {d.get('date')}\n\n"
            + (d.get("notes", "").strip() + "\n\n" if d.get("notes") else "")
            + markdown_table(rows, cols)
        )
    if not parts:
        return "(no GPU results yet)\n"
    head = ("speedup = baseline_ms / ours_ms (> 1 means ours is faster). Times are medians "
            "(triton.testing.do_bench or CUDA-graph replay, as each file's notes say).\n\n")
    return head + "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.report")
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args(argv)
    md = render()
    if args.print:
        print(md)
        return 0
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(pre + START + "\n" + md + END + post)
    print(f"README.md results section updated from {len(glob.glob(os.path.join(RESULTS_DIR, '*.json')))} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
